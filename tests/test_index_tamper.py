"""A tampered or malformed gallery index is refused at load, naming index.json (or the features file) and the field.

Each test reproduces a defect of the loader: an ``image_dir`` edited to ``/`` served /etc/passwd (the
root was taken on trust from the file it guards), a NUL inside a path passed, deeply nested JSON or
an ``image_size`` of 100000x100000 or missing metadata ended in "internal error", and NaN features
gave ``nan`` scores.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import upperson
from conftest import SMALL_IMAGE
from test_search import _block_image, _merged, _save_run
from upperson.cli import main
from upperson.config import MAX_IMAGE_SIDE
from upperson.retrieval.gallery import FEATURES_FILE, INDEX_FILE, GalleryIndex, GalleryIndexError


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return _save_run(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def model(run: tuple[Path, Path]) -> upperson.RetrievalModel:
    return _merged(run[1])


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    for number, name in enumerate(["a.jpg", "b.png", "trip/c.png", "trip/d.jpg"]):
        _block_image(tmp_path / "project" / "photos" / name, number)
    return tmp_path / "project" / "photos"


@pytest.fixture
def built(model: upperson.RetrievalModel, run: tuple[Path, Path], photos: Path, tmp_path: Path) -> Path:
    """An index in ``tmp/index`` of the images in ``tmp/project/photos`` (next to it)."""
    out = tmp_path / "index"
    GalleryIndex.build(model, photos, out, adapter=run[1], image_size=SMALL_IMAGE, batch_size=4)
    return out


def _payload(out: Path) -> dict:
    return json.loads((out / INDEX_FILE).read_text())


def _write(out: Path, payload: dict) -> None:
    (out / INDEX_FILE).write_text(json.dumps(payload))


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "internal error" not in error, error
    return error


def _search(out: Path, *extra: str) -> list[str]:
    return ["search", str(out), "a person", "--device", "cpu", *extra]


# --------------------------------------------------------------------------------------------
# row 3: the gallery root is not taken from index.json


@pytest.mark.parametrize("root", ["/", "/tmp/../../../"])
def test_index_json_whose_root_is_moved_to_slash_is_refused(built: Path, root: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    payload = _payload(built)
    stat = {"size": 1, "mtime_ns": 1}
    payload.update(image_dir=root, paths=["etc/passwd.jpg", "proc/self/environ.png"], files={"etc/passwd.jpg": stat, "proc/self/environ.png": stat})
    payload["rows"], payload["next_row"] = [0, 1], 4
    _write(built, payload)
    save_file({"features": load_file(str(built / FEATURES_FILE))["features"][:2].contiguous()}, str(built / FEATURES_FILE))
    with pytest.raises(GalleryIndexError, match=rf"tampered or invalid {built / INDEX_FILE}: its gallery root / is outside {tmp_path}"):
        GalleryIndex.load(built)
    assert main(_search(built, "--json", str(tmp_path / "hits.json"))) == 1
    error = _one_error_line(capsys)
    assert str(built / INDEX_FILE) in error and "--gallery-root" in error and not (tmp_path / "hits.json").exists()


def test_the_unedited_attack_paths_are_refused_too(built: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The report's own paths (no image suffix) under a root that is allowed."""
    payload = _payload(built)
    paths = ["etc/passwd", "proc/self/environ", *payload["paths"][2:]]
    payload["files"] = dict(zip(paths, payload["files"].values()))
    payload["paths"] = paths
    _write(built, payload)
    with pytest.raises(GalleryIndexError, match=r"entry 0 path 'etc/passwd' is not an image file \(\.bmp, \.jpeg"):
        GalleryIndex.load(built)
    assert main(_search(built)) == 1 and "entry 0 path 'etc/passwd'" in _one_error_line(capsys)


def test_hidden_entries_are_refused(built: Path) -> None:
    """The index never records hidden files (``.ssh/id_rsa.png`` next to the index would be one)."""
    payload = _payload(built)
    payload["files"][".ssh/key.png"] = payload["files"].pop(payload["paths"][1])
    payload["paths"][1] = ".ssh/key.png"
    _write(built, payload)
    with pytest.raises(GalleryIndexError, match=r"entry 1 path '.ssh/key.png' has a hidden component"):
        GalleryIndex.load(built)


def test_an_index_copied_away_from_its_images_is_refused_naming_the_fix(built: Path, photos: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere" / "copy"
    shutil.copytree(built, elsewhere)
    with pytest.raises(GalleryIndexError, match=rf"gallery root {photos.resolve()} is outside {elsewhere.parent.resolve()} .*--gallery-root {photos.resolve()}"):
        GalleryIndex.load(elsewhere)
    assert len(GalleryIndex.load(elsewhere, gallery_root=photos)) == 4


def test_gallery_root_given_at_load_bounds_the_root(built: Path, photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert len(GalleryIndex.load(built, gallery_root=photos)) == 4
    assert len(GalleryIndex.load(built, gallery_root=tmp_path / "project")) == 4
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(GalleryIndexError, match=rf"its gallery root {photos.resolve()} is outside {other.resolve()} \(the allowed gallery root\)"):
        GalleryIndex.load(built, gallery_root=other)
    assert main(_search(built, "--gallery-root", str(other))) == 1
    assert "is outside" in _one_error_line(capsys)


def test_an_index_far_from_its_images_loads_with_the_gallery_root(
    model: upperson.RetrievalModel, run: tuple[Path, Path], photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "runs" / "demo" / "gallery-index"
    GalleryIndex.build(model, photos, out, adapter=run[1], image_size=SMALL_IMAGE, batch_size=4)
    with pytest.raises(GalleryIndexError, match=r"is outside .*runs/demo \(the folder holding the index\).*--gallery-root"):
        GalleryIndex.load(out)
    assert len(GalleryIndex.load(out, gallery_root=photos)) == 4
    assert main(_search(out, "--gallery-root", str(photos))) == 0
    assert "a.jpg" in capsys.readouterr().out


def test_format_1_index_with_an_absolute_root_still_loads(built: Path, photos: Path) -> None:
    payload = _payload(built)
    payload.update(format_version=1, image_dir=str(photos.resolve()))
    for key in ("rows", "next_row", "feature_dim"):
        payload.pop(key)
    _write(built, payload)
    index = GalleryIndex.load(built)
    assert index.image_dir == photos.resolve() and index.rows == [0, 1, 2, 3]


# --------------------------------------------------------------------------------------------
# row 8: control characters


@pytest.mark.parametrize("bad", ["normal.jpg\u0000.png", "a\nb.jpg", "\x1b[2Jc.png", "d\x7f.jpg", "e\u0085.png"])
def test_control_characters_in_paths_are_refused(built: Path, bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    payload = _payload(built)
    payload["files"][bad] = payload["files"].pop(payload["paths"][1])
    payload["paths"][1] = bad
    _write(built, payload)
    with pytest.raises(GalleryIndexError, match=rf"tampered or invalid {built / INDEX_FILE}: entry 1 path .* contains a control character"):
        GalleryIndex.load(built)
    assert main(_search(built)) == 1 and "contains a control character" in _one_error_line(capsys)


# --------------------------------------------------------------------------------------------
# row 9: the schema of index.json


def test_deeply_nested_json_is_named(built: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (built / INDEX_FILE).write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(GalleryIndexError, match=rf"{built / INDEX_FILE}: nested too deeply"):
        GalleryIndex.load(built)
    assert main(_search(built)) == 1 and "nested too deeply" in _one_error_line(capsys)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("image_size", [100000, 100000], rf"be two integers in 1\.\.{MAX_IMAGE_SIDE}"),
        ("image_size", [64], rf"be two integers in 1\.\.{MAX_IMAGE_SIDE}"),
        ("image_size", [64, True], rf"be two integers in 1\.\.{MAX_IMAGE_SIDE}"),
        ("image_size", None, rf"be two integers in 1\.\.{MAX_IMAGE_SIDE}"),
        ("method", None, "be a method name"),
        ("method", 3, "be a method name"),
        ("backbone_sha256", None, "be a SHA-256"),
        ("backbone_sha256", "abc", "be a SHA-256"),
        ("backbone_source", [], "be a string"),
        ("config", "lora", "be an object or null"),
        ("adapter", 1, "be a string or null"),
        ("adapter_sha256", "x", "be a SHA-256 or null"),
        ("precision", "fp8", "be one of"),
    ],
)
def test_metadata_fields_are_checked(built: Path, field: str, value: object, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    payload = _payload(built)
    if value is None and field in ("image_size", "method", "backbone_sha256"):
        del payload["metadata"][field]  # missing (it was a KeyError)
    else:
        payload["metadata"][field] = value
    _write(built, payload)
    with pytest.raises(GalleryIndexError, match=rf"{built / INDEX_FILE}: field 'metadata\.{field}' must {message}"):
        GalleryIndex.load(built)
    assert main(_search(built)) == 1 and f"metadata.{field}" in _one_error_line(capsys)


def test_an_unknown_method_is_named(built: Path, capsys: pytest.CaptureFixture[str]) -> None:
    payload = _payload(built)
    payload["metadata"]["method"] = "no-such-method"
    _write(built, payload)
    with pytest.raises(GalleryIndexError, match=r"field 'metadata\.method' must be a method name .*got 'no-such-method'"):
        GalleryIndex.load(built)


# --------------------------------------------------------------------------------------------
# row 10: the features themselves


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_features_are_refused(built: Path, bad: float, capsys: pytest.CaptureFixture[str]) -> None:
    features = load_file(str(built / FEATURES_FILE))["features"].clone()
    features[2, 1] = bad
    save_file({"features": features}, str(built / FEATURES_FILE))
    with pytest.raises(GalleryIndexError, match=rf"{built / FEATURES_FILE}: the features of entry 2 \('trip/c.png'\) hold NaN or infinite values"):
        GalleryIndex.load(built)
    assert main(_search(built)) == 1
    error = _one_error_line(capsys)
    assert "NaN or infinite" in error and "nan" not in error.replace("NaN", "")


def test_feature_width_other_than_index_json_is_refused(built: Path) -> None:
    features = load_file(str(built / FEATURES_FILE))["features"]
    save_file({"features": torch.zeros(len(features), features.shape[1] + 1, dtype=torch.float16)}, str(built / FEATURES_FILE))
    with pytest.raises(GalleryIndexError, match=rf"{FEATURES_FILE}: features of {features.shape[1] + 1} dimensions but {INDEX_FILE} records {features.shape[1]}"):
        GalleryIndex.load(built)


def test_training_configs_share_the_image_size_bound() -> None:
    from upperson.config import ConfigError, load_config

    assert load_config(None, [f"data.image_size=[{MAX_IMAGE_SIDE},{MAX_IMAGE_SIDE}]"]).data.image_size == (MAX_IMAGE_SIDE, MAX_IMAGE_SIDE)
    with pytest.raises(ConfigError, match=rf"data.image_size must be at most {MAX_IMAGE_SIDE} a side, got \[100000, 128\]"):
        load_config(None, ["data.image_size=[100000,128]"])
