"""The synthetic CUHK-PEDES generator (format, determinism, caching, captions) and the retrieval figure."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from upperson.data import load_dataset, synthetic
from upperson.data.synthetic import COLOUR_WORDS, generate_synthetic_cuhk, sample_identities
from upperson.visualize import MATCH_COLOUR, MISMATCH_COLOUR, FigureLayout, save_retrieval_figure

SMALL: dict[str, Any] = {"num_train_ids": 5, "num_val_ids": 2, "num_test_ids": 3, "images_per_id": 2, "seed": 3, "image_size": (64, 24)}
TOTAL_IDS = 5 + 2 + 3


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_synthetic_cuhk(tmp_path_factory.mktemp("synthetic"), **SMALL)


def read_records(directory: Path) -> list[dict[str, Any]]:
    return json.loads((directory / "reid_raw.json").read_text())


def test_writes_cuhk_pedes_format(dataset: Path) -> None:
    assert dataset.name == "CUHK-PEDES"
    records = read_records(dataset)
    assert len(records) == TOTAL_IDS * SMALL["images_per_id"]
    ids_by_split: dict[str, set[int]] = {"train": set(), "val": set(), "test": set()}
    for record in records:
        assert set(record) == {"split", "captions", "file_path", "processed_tokens", "id"}
        assert isinstance(record["id"], int)
        ids_by_split[record["split"]].add(record["id"])
        assert len(record["captions"]) == 2 and all(isinstance(c, str) and c for c in record["captions"])
        assert len(record["processed_tokens"]) == 2
        assert all(tokens and all(isinstance(t, str) for t in tokens) for tokens in record["processed_tokens"])
        folder = "train_query" if record["split"] == "train" else "test_query"
        assert record["file_path"].startswith(f"{folder}/p{record['id']:05d}_s") and record["file_path"].endswith(".jpg")
        with Image.open(dataset / "imgs" / record["file_path"]) as image:
            assert image.mode == "RGB" and image.size == (24, 64)
    assert ids_by_split["train"] == set(range(1, 6))
    assert ids_by_split["val"] == {6, 7}
    assert ids_by_split["test"] == {8, 9, 10}
    assert len({record["file_path"] for record in records}) == len(records)


def test_real_reader_loads_it(dataset: Path) -> None:
    data = load_dataset("cuhk-pedes", dataset.parent)
    assert sorted({sample.pid for sample in data.train}) == list(range(5))
    assert len(data.train) == 5 * 2 * 2
    test = data.splits["test"]
    assert len(test.image_paths) == 3 * 2 and len(test.captions) == 3 * 2 * 2


def test_same_seed_same_bytes_other_seed_differs(dataset: Path, tmp_path: Path) -> None:
    again = generate_synthetic_cuhk(tmp_path / "again", **SMALL)
    assert (again / "reid_raw.json").read_bytes() == (dataset / "reid_raw.json").read_bytes()
    for record in read_records(dataset):
        assert (again / "imgs" / record["file_path"]).read_bytes() == (dataset / "imgs" / record["file_path"]).read_bytes()
    other = generate_synthetic_cuhk(tmp_path / "other", **(SMALL | {"seed": 4}))
    assert (other / "reid_raw.json").read_bytes() != (dataset / "reid_raw.json").read_bytes()


def test_images_vary_within_and_across_identities(dataset: Path) -> None:
    records = [record for record in read_records(dataset) if record["split"] == "train"]
    contents = [(dataset / "imgs" / record["file_path"]).read_bytes() for record in records]
    assert len(set(contents)) == len(contents)


def test_cached_dataset_is_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = generate_synthetic_cuhk(tmp_path, **SMALL)
    stamp = (first / "reid_raw.json").stat().st_mtime_ns

    def must_not_run(*args: object) -> None:
        raise AssertionError("a complete dataset with the same parameters was regenerated")

    monkeypatch.setattr(synthetic, "_write_dataset", must_not_run)
    assert generate_synthetic_cuhk(tmp_path, **SMALL) == first
    assert (first / "reid_raw.json").stat().st_mtime_ns == stamp


def test_other_parameters_regenerate(tmp_path: Path) -> None:
    generate_synthetic_cuhk(tmp_path, **SMALL)
    bigger = generate_synthetic_cuhk(tmp_path, **(SMALL | {"images_per_id": 3}))
    assert len(read_records(bigger)) == TOTAL_IDS * 3
    assert [path.name for path in tmp_path.iterdir()] == ["CUHK-PEDES"]


def test_interrupted_run_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def crash_on_third(*args: object, **kwargs: object) -> Image.Image:
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return Image.new("RGB", (24, 64))

    monkeypatch.setattr(synthetic, "render_person", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        generate_synthetic_cuhk(tmp_path, **SMALL)
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_overwrite_data_it_did_not_write(tmp_path: Path) -> None:
    (tmp_path / "CUHK-PEDES").mkdir()
    (tmp_path / "CUHK-PEDES" / "reid_raw.json").write_text("[]")
    with pytest.raises(FileExistsError, match="not written by the synthetic generator"):
        generate_synthetic_cuhk(tmp_path, **SMALL)
    assert (tmp_path / "CUHK-PEDES" / "reid_raw.json").read_text() == "[]"


def test_captions_describe_the_identity(dataset: Path) -> None:
    people = sample_identities(TOTAL_IDS, SMALL["seed"])
    for record in read_records(dataset):
        person = people[record["id"] - 1]
        for caption in record["captions"]:
            words = caption.lower()
            assert any(word in words for word in COLOUR_WORDS[person.top_colour]), caption
            assert any(word in words for word in COLOUR_WORDS[person.shoe_colour]), caption
            assert "hair" in words and person.hair_length in words, caption
            if person.bottom_colour is not None:
                assert any(word in words for word in COLOUR_WORDS[person.bottom_colour]), caption
            if person.bag_colour is not None:
                assert any(word in words for word in COLOUR_WORDS[person.bag_colour]), caption
            if person.hat_colour is not None:
                assert "hat" in words or "cap" in words, caption
        assert record["captions"][0] != record["captions"][1]


def test_identities_are_distinct_and_varied() -> None:
    people = sample_identities(300, seed=0)
    assert len({person.signature() for person in people}) == 300
    assert {person.top for person in people} == {"t-shirt", "jacket", "coat", "dress"}
    assert {person.top_pattern for person in people} == {"plain", "striped", "checked", "dotted"}
    assert {person.bottom for person in people} == {"trousers", "shorts", "skirt", None}
    assert {person.bag for person in people} == {"backpack", "handbag", None}
    assert len({person.top_colour for person in people}) == len(COLOUR_WORDS)
    assert sample_identities(300, seed=0) == people


def test_rejects_bad_parameters(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="num_test_ids"):
        generate_synthetic_cuhk(tmp_path, **(SMALL | {"num_test_ids": 0}))


# --------------------------------------------------------------------------------------------
# Retrieval figure


def gallery(tmp_path: Path, count: int) -> list[Path]:
    paths = []
    for index in range(count):
        path = tmp_path / f"g{index}.png"
        Image.new("RGB", (10, 30), (0, 0, 40 * index)).save(path)
        paths.append(path)
    return paths


def test_retrieval_figure_layout_and_frames(tmp_path: Path) -> None:
    images = gallery(tmp_path, 5)
    queries = ["a woman in a red coat " * 20, "a man in black"]  # the first is too long and gets cut
    ranked = [images[:5], images[1:4]]
    matches = [[True, False, False, True, False], [False, True, False]]
    layout = FigureLayout()
    size = (40, 16)
    path = save_retrieval_figure(tmp_path / "figure.png", queries, ranked, matches, top_k=4, gallery_image_size=size)
    with Image.open(path) as written:
        figure = written.convert("RGB")
        cell_width, cell_height = 16 + 2 * layout.frame, 40 + 2 * layout.frame
        assert figure.size == layout.size(2, 4, size)
        assert figure.width == layout.size(2, 3, size)[0] + cell_width + layout.gap
        assert figure.height == layout.size(1, 4, size)[1] + cell_height + layout.gap
        for row, flags in enumerate(matches):
            for column, match in enumerate(flags[:4]):
                left, top = layout.cell_origin(row, column, size)
                expected = MATCH_COLOUR if match else MISMATCH_COLOUR
                assert figure.getpixel((left + 1, top + 1)) == expected
                assert figure.getpixel((left + cell_width - 2, top + cell_height - 2)) == expected
                assert figure.getpixel((left + cell_width // 2, top + cell_height // 2)) == (0, 0, 40 * (column + row))
        left, top = layout.cell_origin(0, 4, size)
        assert left >= figure.width - layout.margin  # top_k=4 drops the fifth image
        left, top = layout.cell_origin(1, 3, size)
        assert figure.getpixel((left + 1, top + 1)) == (255, 255, 255)  # the second row has 3 images only
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".tmp"] == []


def test_retrieval_figure_rejects_mismatched_inputs(tmp_path: Path) -> None:
    images = gallery(tmp_path, 2)
    with pytest.raises(ValueError, match="match flags"):
        save_retrieval_figure(tmp_path / "f.png", ["q"], [images], [[True]])
    with pytest.raises(ValueError, match="one ranked list"):
        save_retrieval_figure(tmp_path / "f.png", ["q", "r"], [images], [[True, False]])


def test_studio_scene_has_a_plain_backdrop(tmp_path: Path) -> None:
    street = generate_synthetic_cuhk(tmp_path / "street", **SMALL)
    studio = generate_synthetic_cuhk(tmp_path / "studio", **SMALL, scene="studio")
    assert [(r["id"], r["split"]) for r in read_records(street)] == [(r["id"], r["split"]) for r in read_records(studio)]
    def mean_left_edge(directory: Path, record: dict[str, Any]) -> list[float]:
        """Mean colour of the left image column above the floor line: wall only (person is centred)."""
        with Image.open(directory / "imgs" / record["file_path"]) as image:
            pixels = [image.convert("RGB").getpixel((0, y)) for y in range(0, 40)]
        return [sum(channel) / len(pixels) for channel in zip(*pixels)]

    studio_walls = [mean_left_edge(studio, record) for record in read_records(studio)]
    street_walls = [mean_left_edge(street, record) for record in read_records(street)]
    for wall in studio_walls:  # JPEG noise averages out
        assert all(abs(channel - expected) <= 8 for channel, expected in zip(wall, synthetic.STUDIO_WALL))
    assert sum(all(abs(c - e) <= 8 for c, e in zip(wall, synthetic.STUDIO_WALL)) for wall in street_walls) <= 1
    with pytest.raises(ValueError, match="scene"):
        generate_synthetic_cuhk(tmp_path / "bad", **SMALL, scene="beach")  # type: ignore[arg-type]
