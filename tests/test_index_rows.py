"""Row ids of a gallery index are stable: a row, once given, always means the same image, or is gone.

Reproduces the defect of rows as positions in the sorted path list: row 3 was ``m_p00204_s00813.jpg``,
and after ``a_*.jpg`` images were added and the folder re-indexed it was ``a_03.jpg``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import upperson
from conftest import SMALL_IMAGE
from test_search import _block_image, _merged, _save_run
from upperson.cli import main
from upperson.retrieval.gallery import INDEX_FILE, GalleryIndex, GalleryIndexError, MissingRowError, model_from_index


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return _save_run(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def model(run: tuple[Path, Path]) -> upperson.RetrievalModel:
    return _merged(run[1])


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    for number, name in enumerate(["m_p00201.jpg", "m_p00202.jpg", "m_p00203.jpg", "m_p00204.jpg"]):
        _block_image(tmp_path / "photos" / name, number)
    return tmp_path / "photos"


def _build(model: upperson.RetrievalModel, photos: Path, out: Path, adapter: Path) -> GalleryIndex:
    return GalleryIndex.build(model, photos, out, adapter=adapter, image_size=SMALL_IMAGE, batch_size=4)


def _by_row(index: GalleryIndex) -> dict[int, str]:
    return {row: index.paths[index.position(row)] for row in index.rows}


def test_rows_keep_their_image_across_reindexing_and_reload(model: upperson.RetrievalModel, run: tuple[Path, Path], photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "index"
    first = _build(model, photos, out, run[1])
    assert _by_row(first) == {0: "m_p00201.jpg", 1: "m_p00202.jpg", 2: "m_p00203.jpg", 3: "m_p00204.jpg"}
    for number in range(3):
        _block_image(photos / f"a_{number:02d}.jpg", 4 + number)  # sort before every existing path
    (photos / "m_p00202.jpg").unlink()
    second = _build(model, photos, out, run[1])
    expected = {0: "m_p00201.jpg", 2: "m_p00203.jpg", 3: "m_p00204.jpg", 4: "a_00.jpg", 5: "a_01.jpg", 6: "a_02.jpg"}
    assert _by_row(second) == expected and second.next_row == 7
    reloaded = GalleryIndex.load(out)
    assert _by_row(reloaded) == expected and reloaded.next_row == 7
    for row in (0, 3, 5):  # each row's feature is its own image's
        assert torch.equal(reloaded.features[reloaded.position(row)], first.features[first.position(row)] if row < 4 else second.features[second.position(row)])
    _block_image(photos / "m_p00202.jpg", 1)  # the removed image comes back: a new row, its old one stays gone
    third = _build(model, photos, out, run[1])
    assert third.paths[third.position(7)] == "m_p00202.jpg" and 1 not in third.rows


def test_a_removed_row_is_gone_and_an_unknown_one_never_given(model: upperson.RetrievalModel, run: tuple[Path, Path], photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "index"
    _build(model, photos, out, run[1])
    (photos / "m_p00202.jpg").unlink()
    index = _build(model, photos, out, run[1])
    with pytest.raises(MissingRowError, match=r"row 1 was removed from the gallery .* re-indexed") as gone:
        index.position(1)
    assert gone.value.gone
    with pytest.raises(MissingRowError, match=r"no row 9: .* rows below 4 were given") as unknown:
        index.position(9)
    assert not unknown.value.gone
    with pytest.raises(MissingRowError):
        index.position(-1)


def test_rebuilding_for_another_adapter_keeps_the_rows(model: upperson.RetrievalModel, run: tuple[Path, Path], photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "index"
    _build(model, photos, out, run[1])
    (photos / "m_p00201.jpg").unlink()
    _block_image(photos / "a.jpg", 6)
    _, other = _save_run(tmp_path / "other", seed=2)
    index = _build(_merged(other), photos, out, other)  # features all re-encoded, ids kept
    assert _by_row(index) == {1: "m_p00202.jpg", 2: "m_p00203.jpg", 3: "m_p00204.jpg", 4: "a.jpg"}


def test_search_hits_carry_the_stable_row(model: upperson.RetrievalModel, run: tuple[Path, Path], photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "index"
    _build(model, photos, out, run[1])
    _block_image(photos / "a.jpg", 6)
    index = _build(model, photos, out, run[1])
    hits = index.search(model_from_index(index), ["a person"], top_k=5)[0]
    assert {hit.row: hit.path.name for hit in hits} == {row: Path(path).name for row, path in _by_row(index).items()}
    scores, positions = index.rank(index.features[index.position(4) : index.position(4) + 1].float(), 1)
    assert index.rows[int(positions[0, 0])] == 4  # rank gives positions; rows maps them to ids
    assert main(["search", str(out), "a person", "--device", "cpu", "--json", str(tmp_path / "hits.json")]) == 0
    listed = json.loads((tmp_path / "hits.json").read_text())[0]["hits"]
    assert {hit["row"]: Path(hit["path"]).name for hit in listed} == {row: Path(path).name for row, path in _by_row(index).items()}


def test_format_1_indexes_load_with_rows_as_positions(model: upperson.RetrievalModel, run: tuple[Path, Path], photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "index"
    _build(model, photos, out, run[1])
    payload = json.loads((out / INDEX_FILE).read_text())
    payload.update(format_version=1, image_dir=str(photos.resolve()))
    for key in ("rows", "next_row", "feature_dim"):
        del payload[key]
    (out / INDEX_FILE).write_text(json.dumps(payload))
    index = GalleryIndex.load(out)
    assert index.rows == [0, 1, 2, 3] and index.next_row == 4
    _block_image(photos / "a.jpg", 6)
    assert _by_row(_build(model, photos, out, run[1]))[4] == "a.jpg"  # upgraded: the positions became the ids


@pytest.mark.parametrize(
    ("rows", "next_row", "message"),
    [
        ([0, 1, 1, 2], 4, r"field 'rows' must be one distinct integer per path"),
        ([0, 1, 2], 4, r"field 'rows' must be one distinct integer per path"),
        ([0, 1, "2", 3], 4, r"field 'rows' must be one distinct integer per path"),
        ([0, 1, 2, 4], 4, r"field 'rows' must be .* 0 <= row < next_row"),
        ([-1, 1, 2, 3], 4, r"field 'rows' must be .* 0 <= row < next_row"),
        ([0, 1, 2, 3], "4", r"field 'next_row' must be an integer"),
    ],
)
def test_tampered_rows_are_refused(model: upperson.RetrievalModel, run: tuple[Path, Path], photos: Path, tmp_path: Path, rows: list, next_row: object, message: str) -> None:
    out = tmp_path / "index"
    _build(model, photos, out, run[1])
    payload = json.loads((out / INDEX_FILE).read_text())
    payload.update(rows=rows, next_row=next_row)
    (out / INDEX_FILE).write_text(json.dumps(payload))
    with pytest.raises(GalleryIndexError, match=rf"{out / INDEX_FILE}: {message}"):
        GalleryIndex.load(out)
