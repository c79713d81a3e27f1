"""`check_dataset` on a clean fixture and on one broken in every way the check must catch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from test_training import tiny_overrides, write_cuhk_fixture
from upperson.cli import main
from upperson.data import DatasetFormatError, ImageDataset, build_transforms, check_dataset, load_dataset


def write_jpeg(path: Path, size: tuple[int, int] = (8, 16)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (10, 120, 240)).save(path, format="JPEG")


def write_cuhk(root: Path, records: list[object]) -> Path:
    directory = root / "CUHK-PEDES"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "reid_raw.json").write_text(json.dumps(records))
    return directory


def record(split: str, pid: int, file: str, captions: object) -> dict[str, object]:
    return {"split": split, "captions": captions, "file_path": file, "id": pid}


GOOD = [
    record("train", 1, "train/a.jpg", ["a man in red", "he has a bag", "black shoes"]),
    record("train", 1, "train/a2.jpg", ["the man in red"]),
    record("train", 2, "train/b.jpg", ["a woman in blue", "long hair"]),
    record("train", 2, "train/b2.jpg", ["the woman in blue"]),
    record("val", 3, "val/c.jpg", ["a boy", "a kid"]),
    record("val", 3, "val/c2.jpg", ["the boy"]),
    record("test", 4, "test/d.jpg", ["a girl", "a dress"]),
    record("test", 4, "test/e.jpg", ["the girl", "again"]),
]


def write_good(root: Path) -> Path:
    directory = write_cuhk(root, GOOD)
    for item in GOOD:
        write_jpeg(directory / "imgs" / item["file_path"])
    return directory


def test_clean_dataset_reports_counts_and_ok(tmp_path: Path) -> None:
    write_good(tmp_path)
    report = check_dataset("cuhk-pedes", tmp_path)
    assert report.ok and report.problems == []
    assert [(s.split, s.ids, s.images, s.captions) for s in report.splits] == [
        ("train", 2, 4, 7), ("val", 1, 2, 3), ("test", 1, 2, 4),
    ]
    assert report.images_checked == 8 and report.images_decoded
    text = report.format()
    assert "train          2         4         7   11,003/34,054/68,126" in text
    assert "OK: the dataset can be used" in text


@pytest.fixture
def broken_root(tmp_path: Path) -> Path:
    records = [
        record("train", 1, "train/a.jpg", ["a man in red", "he has a bag"]),
        record("train", 2, "train/missing.jpg", ["a woman in blue", "long hair"]),
        record("train", 3, "train/corrupt.jpg", ["a child", "   "]),
        record("train", 4, "train/f.jpg", "a caption that is not a list"),
        record("trian", 5, "train/g.jpg", ["typo in split"]),
        record("test", 6, "test/d.jpg", ["a girl", "a dress"]),
        ["not", "an", "object"],
    ]
    directory = write_cuhk(tmp_path, records)
    for name in ("train/a.jpg", "train/f.jpg", "train/g.jpg", "test/d.jpg"):
        write_jpeg(directory / "imgs" / name)
    (directory / "imgs" / "train" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg at all")
    return tmp_path


def test_broken_dataset_lists_every_problem(broken_root: Path) -> None:
    report = check_dataset("cuhk-pedes", broken_root)
    assert not report.ok
    kinds = sorted(problem.kind for problem in report.problems)
    assert kinds == [
        "empty_caption", "malformed_record", "malformed_record", "missing_image",
        "missing_split", "single_image_identity", "single_image_identity", "single_image_identity",
        "single_image_identity", "unknown_split", "unreadable_image",
    ]
    text = report.format()
    assert "reid_raw.json record 3: field 'captions' must be a non-empty list of strings, got str 'a caption that is not a list'" in text
    assert "reid_raw.json record 4: field 'split' must be one of 'train', 'val', 'test', got 'trian'" in text
    assert "reid_raw.json record 6: must be a JSON object with fields 'split', 'captions', 'file_path', 'id', got list" in text
    assert "reid_raw.json record 2: caption 1 is empty" in text
    assert "imgs/train/missing.jpg (train split) does not exist" in text
    assert "imgs/train/corrupt.jpg (train split): OSError" in text
    assert "error: malformed record (2)" in text and "warning: empty caption (left out) (1)" in text
    assert text.splitlines()[-1].startswith("FAILED")
    # valid records are still counted: train a, missing, corrupt (one caption kept); test d
    assert [(s.split, s.ids, s.images, s.captions) for s in report.splits] == [("train", 3, 3, 5), ("test", 1, 1, 2)]


def test_without_decoding_missing_files_are_still_found(broken_root: Path) -> None:
    report = check_dataset("cuhk-pedes", broken_root, verify_images=False)
    assert {p.kind for p in report.problems} >= {"missing_image"}
    assert "unreadable_image" not in {p.kind for p in report.problems}
    assert "looked up only (decoding skipped)" in report.format()


def test_missing_annotation_file_is_a_failed_report(tmp_path: Path) -> None:
    report = check_dataset("rstpreid", tmp_path)
    assert not report.ok
    assert [p.kind for p in report.problems] == ["missing_annotation"]
    assert "data_captions.json not found" in report.format()


def test_long_problem_lists_are_capped(tmp_path: Path) -> None:
    records = [record("train", i + 1, f"train/{i}.jpg", ["x"]) for i in range(15)] + [record("test", 99, "t.jpg", ["y"])]
    write_cuhk(tmp_path, records)
    write_jpeg(tmp_path / "CUHK-PEDES" / "imgs" / "t.jpg")
    text = check_dataset("cuhk-pedes", tmp_path).format(max_per_kind=4)
    assert "error: missing image file (15)" in text
    assert "    ... and 11 more" in text
    assert text.count("does not exist") == 4


def test_truncated_image_is_a_warning_and_still_loads(tmp_path: Path) -> None:
    directory = write_good(tmp_path)
    path = directory / "imgs" / "test" / "e.jpg"
    write_jpeg(path, size=(64, 128))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 9 // 10])
    report = check_dataset("cuhk-pedes", tmp_path)
    assert report.ok
    assert [p.kind for p in report.problems] == ["truncated_image"]
    gallery = load_dataset("cuhk-pedes", tmp_path).split("test")
    item = ImageDataset(gallery.image_paths, gallery.image_pids, build_transforms((32, 16), train=False))[1]
    assert item is not None and item["images"].shape == (3, 32, 16)


def test_no_images_at_all_says_where_they_are_expected(tmp_path: Path) -> None:
    write_cuhk(tmp_path, GOOD)
    text = check_dataset("cuhk-pedes", tmp_path / "CUHK-PEDES").format(max_per_kind=1)
    assert f"none of the 8 image files exists (e.g. imgs/train/a.jpg under {tmp_path / 'CUHK-PEDES'}); unpack the images there" in text
    assert "error: missing image file (9)" in text


def test_duplicate_images_shared_ids_and_single_image_ids_are_warnings(tmp_path: Path) -> None:
    records = [
        record("train", 1, "train/a.jpg", ["a man in red"]),
        record("train", 1, "train/a2.jpg", ["the man in red"]),
        record("train", 2, "train/b.jpg", ["a woman in blue"]),
        record("test", 1, "test/c.jpg", ["a man in red again"]),
        record("test", 7, "test/d.jpg", ["a girl"]),
        record("test", 7, "test/d.jpg", ["the same girl"]),
        record("test", 7, "test/e.jpg", ["the girl from behind"]),
    ]
    directory = write_cuhk(tmp_path, records)
    for item in records:
        write_jpeg(directory / "imgs" / item["file_path"])
    report = check_dataset("cuhk-pedes", tmp_path)
    assert report.ok
    found = sorted((problem.kind, problem.message) for problem in report.problems if problem.kind != "missing_split")
    assert found == [
        ("duplicate_image", "imgs/test/d.jpg is the image of reid_raw.json records 4 (test) and 5 (test)"),
        ("shared_identity", "id 1 is in the train and test splits (reid_raw.json records 0, 1 and 3); test scores would count a person seen in train"),
        ("single_image_identity", "test split: id 1 has a single image (imgs/test/c.jpg)"),
        ("single_image_identity", "train split: id 2 has a single image (imgs/train/b.jpg)"),
    ]
    text = report.format()
    assert "warning: image of several records (1)" in text and "warning: identity in several splits (1)" in text
    assert "warning: identity with a single image (2)" in text and text.splitlines()[-1].startswith("OK")


def _blank_test_captions(directory: Path) -> None:
    path = directory / "reid_raw.json"
    records = json.loads(path.read_text())
    for item in records:
        if item["split"] == "test":
            item["captions"] = ["  ", ""]
    path.write_text(json.dumps(records))


def test_eval_split_whose_captions_are_all_empty_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = write_good(tmp_path)
    _blank_test_captions(directory)
    report = check_dataset("cuhk-pedes", tmp_path)
    assert not report.ok
    errors = [(problem.kind, problem.message) for problem in report.problems if problem.fatal]
    assert errors == [
        ("empty_split", "reid_raw.json: the test split has 2 images but no caption (all 4 are empty): no queries to "
         "evaluate with; give its records captions"),
    ]
    assert main(["data", "check", str(tmp_path), "--dataset", "cuhk-pedes"]) == 1
    assert "FAILED" in capsys.readouterr().out
    with pytest.raises(DatasetFormatError, match=r"reid_raw.json: the test split has 2 images but no caption"):
        load_dataset("cuhk-pedes", tmp_path)


def test_training_refuses_an_eval_split_without_queries_before_the_first_epoch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = write_cuhk_fixture(tmp_path / "data", {"train": 4, "test": 2})
    _blank_test_captions(root / "CUHK-PEDES")
    argv = ["train"]
    for item in tiny_overrides(root, tmp_path / "runs", epochs=1):
        argv += ["--set", item]
    assert main(argv) == 1
    error = capsys.readouterr().err
    assert "the dataset would break training" in error and "the test split has 4 images but no caption" in error
    assert not list((tmp_path / "runs").rglob("*.safetensors"))  # stopped before training
