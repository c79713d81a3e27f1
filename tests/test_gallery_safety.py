"""`upperson index`/`search` never delete, read or draw anything outside what they own.

Each test reproduces a defect of the first gallery code: `--out` wiping the photos, a tampered
index.json drawing files from outside the gallery, symlinks aborting the index, unreadable images
crashing `--figure`, and long queries cut without a word.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import upperson
from conftest import SMALL_IMAGE
from test_search import _block_image, _merged, _save_run
from upperson import visualize
from upperson.cli import main
from upperson.retrieval.gallery import FEATURES_FILE, INDEX_FILE, GalleryIndex, model_from_index
from upperson.tokenizer import CONTEXT_LENGTH, get_tokenizer
from upperson.visualize import FigureLayout, save_retrieval_figure


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return _save_run(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def model(run: tuple[Path, Path]) -> upperson.RetrievalModel:
    return _merged(run[1])


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """A project folder holding ``photos/`` (four images in two folders) and a notes file."""
    project = tmp_path / "project"
    for number, name in enumerate(["a.jpg", "b.png", "trip/c.png", "trip/d.jpg"]):
        _block_image(project / "photos" / name, number)
    (project / "notes.txt").write_text("my notes")
    return project / "photos"


def _files(folder: Path) -> dict[str, bytes]:
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def _index(run: tuple[Path, Path], images: Path, out: Path | None) -> list[str]:
    config, adapter = run
    argv = ["index", "--config", str(config), "--adapter", str(adapter), "--images", str(images)]
    return argv + (["--out", str(out)] if out is not None else [])


def _build(model: upperson.RetrievalModel, images: Path, out: Path, run: tuple[Path, Path]) -> GalleryIndex:
    return GalleryIndex.build(model, images, out, adapter=run[1], image_size=SMALL_IMAGE, batch_size=4)


# --------------------------------------------------------------------------------------------
# --out never deletes what upperson did not write


@pytest.mark.parametrize("out_of", ["parent", "images"])
def test_out_holding_the_photos_is_refused_and_nothing_deleted(
    run: tuple[Path, Path], photos: Path, out_of: str, capsys: pytest.CaptureFixture[str]
) -> None:
    project = photos.parent
    out = project if out_of == "parent" else photos
    before = _files(project)
    assert main(_index(run, photos, out)) == 1
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and str(out) in error and "contains the image folder" in error
    assert _files(project) == before


def test_out_that_is_a_foreign_folder_is_refused(run: tuple[Path, Path], photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    documents = tmp_path / "documents"
    documents.mkdir()
    (documents / "thesis.pdf").write_bytes(b"%PDF-1.4 years of work")
    assert main(_index(run, photos, documents)) == 1
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert f"{documents} is not empty and is not an upperson index" in error and "choose a new or empty folder" in error
    assert _files(documents) == {"thesis.pdf": b"%PDF-1.4 years of work"}


def test_index_with_foreign_files_added_is_not_replaced(
    model: upperson.RetrievalModel, run: tuple[Path, Path], photos: Path, tmp_path: Path
) -> None:
    out = tmp_path / "index"
    _build(model, photos, out, run)
    (out / "my-notes.txt").write_text("do not delete")
    with pytest.raises(ValueError, match=r"my-notes\.txt.*not written by upperson"):
        _build(model, photos, out, run)
    assert (out / "my-notes.txt").read_text() == "do not delete" and (out / INDEX_FILE).is_file()


def test_reindex_replaces_only_its_own_index(model: upperson.RetrievalModel, run: tuple[Path, Path], photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "index"
    keep = tmp_path / ".index.old" / "keep.txt"  # the name the first code used for the previous index
    keep.parent.mkdir()
    keep.write_text("mine")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert len(_build(model, photos, empty, run)) == 4  # an empty folder is fine
    _build(model, photos, out, run)
    _block_image(photos / "e.png", 7)
    assert len(_build(model, photos, out, run)) == 5
    assert keep.read_text() == "mine"
    assert sorted(path.name for path in tmp_path.iterdir()) == [".index.old", "empty", "index", "project"]
    assert sorted(path.name for path in out.iterdir()) == [FEATURES_FILE, INDEX_FILE]


def test_default_out_inside_the_images_is_still_written(run: tuple[Path, Path], photos: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_index(run, photos, None)) == 0
    assert "indexed 4 images" in capsys.readouterr().out
    assert GalleryIndex.load(photos / ".upperson-index").paths == ["a.jpg", "b.png", "trip/c.png", "trip/d.jpg"]


def _exited_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_lock_stops_a_second_writer_and_stale_locks_are_taken_over(
    model: upperson.RetrievalModel, run: tuple[Path, Path], photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "index"
    lock = tmp_path / "index.lock"
    lock.write_text(f"{os.getppid()}\n")  # a live process other than this one holds it
    with pytest.raises(ValueError, match=rf"another process \(pid {os.getppid()}\) is writing the index {out}.*{lock}"):
        _build(model, photos, out, run)
    assert not out.exists() and lock.read_text() == f"{os.getppid()}\n"
    assert main(_index(run, photos, out)) == 1
    assert f"is writing the index {out}" in capsys.readouterr().err

    lock.write_text(f"{_exited_pid()}\n")  # its writer died: stale
    assert len(_build(model, photos, out, run)) == 4
    assert not lock.exists()


def test_lock_is_released_when_the_build_fails(model: upperson.RetrievalModel, run: tuple[Path, Path], photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "documents"
    out.mkdir()
    (out / "thesis.pdf").write_bytes(b"x")
    with pytest.raises(ValueError):
        _build(model, photos, out, run)
    assert not (tmp_path / "documents.lock").exists()


# --------------------------------------------------------------------------------------------
# index.json is validated: nothing outside the gallery root is read or drawn


@pytest.fixture
def built(model: upperson.RetrievalModel, run: tuple[Path, Path], photos: Path, tmp_path: Path) -> Path:
    out = tmp_path / "index"
    _build(model, photos, out, run)
    return out


def _edit_index(out: Path, **changes: object) -> None:
    payload = json.loads((out / INDEX_FILE).read_text())
    payload.update(changes)
    (out / INDEX_FILE).write_text(json.dumps(payload))


@pytest.mark.parametrize("bad", ["/etc/hostname", "../../outside.png", "trip/../../outside.png", ""])
def test_entries_leaving_the_root_are_refused(built: Path, tmp_path: Path, bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    _block_image(tmp_path / "outside.png", 1)
    payload = json.loads((built / INDEX_FILE).read_text())
    paths, files = payload["paths"], payload["files"]
    files[bad] = files.pop(paths[1])
    _edit_index(built, paths=[paths[0], bad, *paths[2:]], files=files)
    with pytest.raises(ValueError, match=rf"tampered or invalid {built / INDEX_FILE}: entry 1 path {bad!r}"):
        GalleryIndex.load(built)
    figure = tmp_path / "figure.png"
    assert main(["search", str(built), "a person", "--figure", str(figure), "--device", "cpu"]) == 1
    assert "entry 1 path" in capsys.readouterr().err and not figure.exists()


def test_image_replaced_by_a_symlink_out_of_the_root_is_refused(built: Path, photos: Path, tmp_path: Path) -> None:
    _block_image(tmp_path / "secret.png", 2)
    (photos / "b.png").unlink()
    (photos / "b.png").symlink_to(tmp_path / "secret.png")
    with pytest.raises(ValueError, match=r"entry 1 path 'b.png' resolves outside the gallery"):
        GalleryIndex.load(built)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"paths": "a.jpg"}, r"field 'paths' must be a list of strings"),
        ({"paths": ["a.jpg", 3, "trip/c.png", "trip/d.jpg"]}, r"field 'paths' must be a list of strings"),
        ({"files": []}, r"field 'files' must be an object"),
        ({"files": {"a.jpg": {"size": "big"}}}, r"field 'files' must map each path to its size and mtime_ns"),
        ({"image_dir": "relative/photos"}, r"field 'image_dir' must be an absolute path"),
        ({"image_dir": "/photos\nx"}, r"field 'image_dir' must be an absolute path"),
        ({"image_dir": "/photos"}, r"its gallery root /photos is outside"),
        ({"metadata": None}, r"field 'metadata' must be an object"),
        ({"skipped": [{"error": "x"}]}, r"field 'skipped' must be a list of"),
        ({"format_version": 99}, r"format version 99.*newer upperson"),
    ],
)
def test_malformed_index_json_is_named(built: Path, changes: dict[str, object], message: str) -> None:
    _edit_index(built, **changes)
    with pytest.raises(ValueError, match=rf"{built / INDEX_FILE}: {message}"):
        GalleryIndex.load(built)


def test_index_json_that_is_not_an_object_is_named(built: Path) -> None:
    (built / INDEX_FILE).write_text("[1, 2]")
    with pytest.raises(ValueError, match=rf"{built / INDEX_FILE}: must be a JSON object"):
        GalleryIndex.load(built)


def test_corrupt_features_file_is_named(built: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (built / FEATURES_FILE).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00garbage")
    with pytest.raises(ValueError, match=rf"{built / FEATURES_FILE}: not a readable safetensors file"):
        GalleryIndex.load(built)
    assert main(["search", str(built), "a person", "--device", "cpu"]) == 1
    assert f"{built / FEATURES_FILE}: not a readable safetensors file" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        ({"other": torch.zeros(4, 8)}, r"holds no 'features' tensor"),
        ({"features": torch.zeros(4)}, r"'features' must be a \[N, D\] matrix, got shape \(4,\)"),
        ({"features": torch.zeros(3, 8, dtype=torch.float16)}, r"3 feature rows but 4 paths"),
    ],
)
def test_features_of_the_wrong_shape_are_named(built: Path, tensors: dict[str, torch.Tensor], message: str) -> None:
    save_file(tensors, str(built / FEATURES_FILE))
    with pytest.raises(ValueError, match=rf"{built / FEATURES_FILE}: {message}"):
        GalleryIndex.load(built)


def test_features_of_another_width_than_the_model_are_named(built: Path) -> None:
    save_file({"features": torch.zeros(4, 7, dtype=torch.float16)}, str(built / FEATURES_FILE))
    _edit_index(built, feature_dim=7)
    index = GalleryIndex.load(built)
    model = model_from_index(index)
    width = model.backbone_spec.embed_dim
    with pytest.raises(ValueError, match=rf"features of 7 dimensions but the model's embeddings have {width}: it was not built by this model"):
        index.search(model, ["a person"])


# --------------------------------------------------------------------------------------------
# symlinks in the gallery


def test_symlinks_that_dangle_loop_or_leave_the_root_are_skipped_and_listed(
    model: upperson.RetrievalModel, run: tuple[Path, Path], photos: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "elsewhere"
    _block_image(outside / "x.png", 3)
    (photos / "dangling.jpg").symlink_to(photos / "gone.jpg")
    (photos / "loop1.png").symlink_to(photos / "loop2.png")
    (photos / "loop2.png").symlink_to(photos / "loop1.png")
    (photos / "escape.png").symlink_to(outside / "x.png")
    (photos / "alias.png").symlink_to(photos / "a.jpg")  # stays inside: indexed
    (photos / "ext").symlink_to(outside, target_is_directory=True)
    (photos / "trip" / "up").symlink_to(photos, target_is_directory=True)  # a folder loop
    os.mkfifo(photos / "pipe.jpg")  # reading it would block forever
    index = _build(model, photos, tmp_path / "index", run)
    assert index.paths == ["a.jpg", "alias.png", "b.png", "trip/c.png", "trip/d.jpg"]
    reasons = {entry["path"]: entry["error"] for entry in index.skipped}
    assert set(reasons) == {"dangling.jpg", "loop1.png", "loop2.png", "escape.png", "ext", "trip/up", "pipe.jpg"}
    assert reasons["dangling.jpg"].startswith("dangling symlink")
    assert reasons["loop1.png"].startswith("symlink loop") and reasons["loop2.png"].startswith("symlink loop")
    assert reasons["escape.png"] == f"symlink to {outside / 'x.png'}, outside the gallery"
    assert reasons["ext"] == f"symlink to {outside}, outside the gallery"
    assert reasons["trip/up"].startswith("folder symlink")
    assert reasons["pipe.jpg"].startswith("not a regular file")
    assert GalleryIndex.load(tmp_path / "index").skipped == index.skipped


# --------------------------------------------------------------------------------------------
# --figure with images that cannot be read


def test_figure_draws_placeholders_for_unreadable_and_outside_images(photos: Path, tmp_path: Path) -> None:
    truncated, missing, outside = photos / "trip" / "c.png", photos / "missing.jpg", tmp_path / "outside.png"
    truncated.write_bytes(truncated.read_bytes()[:40])
    _block_image(outside, 0)
    figure = tmp_path / "figure.png"
    save_retrieval_figure(figure, ["q"], [[photos / "a.jpg", truncated, missing, outside]], top_k=4, root=photos)
    layout, size = FigureLayout(), (128, 48)
    with Image.open(figure) as image:
        placeholder = visualize.PLACEHOLDER_COLOUR
        for column, expected in enumerate([None, placeholder, placeholder, placeholder]):
            left, top = layout.cell_origin(0, column, size)
            centre = image.getpixel((left + layout.frame + 2, top + layout.frame + 2))
            if expected is None:
                assert centre != placeholder
            else:
                assert centre == expected


def test_cli_figure_with_a_truncated_image(run: tuple[Path, Path], photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "index"
    assert main(_index(run, photos, out)) == 0
    for name in ("b.png", "trip/d.jpg"):
        path = photos / name
        path.write_bytes(path.read_bytes()[:60])
    figure = tmp_path / "figure.png"
    assert main(["search", str(out), "a person", "--top-k", "4", "--figure", str(figure), "--device", "cpu"]) == 0
    with Image.open(figure) as image:
        assert image.size == FigureLayout().size(1, 4, (128, 48))


# --------------------------------------------------------------------------------------------
# long queries


def test_long_query_warns_with_the_dropped_token_count(built: Path, caplog: pytest.LogCaptureFixture) -> None:
    index = GalleryIndex.load(built)
    model = model_from_index(index)
    long_query = "a tall woman wearing " + " and ".join(f"a {colour} scarf" for colour in ["red", "blue", "green", "white"] * 6)
    dropped = len(get_tokenizer().encode(long_query)) + 2 - CONTEXT_LENGTH
    assert dropped > 0
    with caplog.at_level(logging.WARNING, logger="upperson"):
        index.search(model, ["a short query", long_query], top_k=2)
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "'a tall woman wearing a red scarf and a blue" in warnings[0]
    assert f"its last {dropped} tokens were dropped" in warnings[0]
    full = upperson.tokenize(long_query)[0]
    assert full.shape == (CONTEXT_LENGTH,) and full[-1] == get_tokenizer().eot_token_id
    assert full[1:-1].tolist() == get_tokenizer().encode(long_query)[: CONTEXT_LENGTH - 2]
