"""Gallery search: index building (incremental, skipping bad files), ranking == brute force, CLI."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import upperson
from conftest import SMALL_IMAGE, randomise_petl
from upperson.cli import format_hits_table, main
from upperson.config import DataConfig, EvalConfig, RunConfig, TrainConfig, save_config
from upperson.data.transforms import build_transforms
from upperson.retrieval.gallery import FEATURES_FILE, INDEX_FILE, GalleryIndex, SearchHit, model_from_index
from upperson.visualize import NEUTRAL_COLOUR, FigureLayout

OPTIONS = {"prefix_length": 2, "lora_rank": 2}
QUERIES = ["a woman in a red coat", "a man with a blue backpack and grey trousers"]
COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 40), (40, 220, 220), (220, 40, 220), (240, 240, 240), (15, 15, 15)]


def _trained_model(seed: int) -> upperson.RetrievalModel:
    model = upperson.create_model("up-person", backbone="tiny", image_size=SMALL_IMAGE, **OPTIONS)
    randomise_petl(model, seed=seed)
    return model


def _save_run(run_dir: Path, seed: int = 1) -> tuple[Path, Path]:
    run_dir.mkdir(parents=True, exist_ok=True)
    adapter = upperson.save_adapter(_trained_model(seed), run_dir / "best.safetensors")
    config = RunConfig(
        method="up-person",
        backbone="tiny",
        model=dict(OPTIONS),
        data=DataConfig(image_size=SMALL_IMAGE, num_workers=0),
        train=TrainConfig(precision="fp32"),
        eval=EvalConfig(batch_size=4),
        device="cpu",
    )
    save_config(config, run_dir / "config.yaml")
    return run_dir / "config.yaml", adapter


def _block_image(path: Path, number: int) -> None:
    """A pedestrian-shaped picture of two coloured blocks (top and bottom), different per number."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (24, 48), COLOURS[number % len(COLOURS)])
    image.paste(COLOURS[(3 * number + 1) % len(COLOURS)], (0, 24 + number % 5, 24, 48))
    image.save(path)


@pytest.fixture
def run(tmp_path: Path) -> tuple[Path, Path]:
    return _save_run(tmp_path / "run")


@pytest.fixture
def gallery(tmp_path: Path) -> Path:
    """11 readable images (jpg/png/bmp/webp, upper-case suffix, a subfolder), a corrupt jpg, a text file
    and a hidden folder that must be ignored."""
    root = tmp_path / "gallery"
    names = ["a.jpg", "b.png", "c.PNG", "d.bmp", "e.webp", "f.jpeg", "sub/g.png", "sub/h.jpg", "sub/deep/i.png", "j.png", "k.png"]
    for number, name in enumerate(names):
        _block_image(root / name, number)
    (root / "broken.jpg").write_bytes(b"not a jpeg at all")
    (root / "notes.txt").write_text("not an image")
    _block_image(root / ".hidden" / "x.png", 0)
    return root


def _build(model: upperson.RetrievalModel, gallery: Path, out: Path, adapter: Path) -> GalleryIndex:
    return GalleryIndex.build(model, gallery, out, adapter=adapter, image_size=SMALL_IMAGE, batch_size=4)


def _merged(adapter: Path) -> upperson.RetrievalModel:
    model = upperson.create_model("up-person", backbone="tiny", image_size=SMALL_IMAGE, **OPTIONS)
    upperson.load_adapter(model, adapter)
    model.merge_lora()
    return model.eval()


def _count_encoded(model: upperson.RetrievalModel) -> list[int]:
    """Wrap ``model.encode_image`` to record how many images each call encodes."""
    calls: list[int] = []
    encode = model.encode_image

    def counting(images: torch.Tensor) -> torch.Tensor:
        calls.append(images.shape[0])
        return encode(images)

    model.encode_image = counting  # type: ignore[method-assign]
    return calls


def test_index_written_with_count_and_skipped(tmp_path: Path, run: tuple[Path, Path], gallery: Path) -> None:
    _, adapter = run
    index = _build(_merged(adapter), gallery, tmp_path / "index", adapter)
    assert len(index) == 11 and index.features.dtype == torch.float16
    assert (tmp_path / "index" / FEATURES_FILE).is_file()
    payload = json.loads((tmp_path / "index" / INDEX_FILE).read_text())
    assert [entry["path"] for entry in payload["skipped"]] == ["broken.jpg"]
    assert "sub/deep/i.png" in payload["paths"] and "c.PNG" in payload["paths"]
    assert not any(path.startswith(".") or path.endswith(".txt") for path in payload["paths"])
    assert set(payload["files"]) == set(payload["paths"])
    metadata = payload["metadata"]
    assert metadata["method"] == "up-person" and metadata["config"]["lora_rank"] == 2
    assert metadata["adapter"] == str(adapter.resolve()) and len(metadata["adapter_sha256"]) == 64
    assert metadata["image_size"] == list(SMALL_IMAGE) and metadata["upperson_version"] == upperson.__version__
    loaded = GalleryIndex.load(tmp_path / "index")
    assert loaded.paths == index.paths and torch.equal(loaded.features, index.features)
    norms = loaded.features.float().norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=2e-3)


def test_search_equals_brute_force(tmp_path: Path, run: tuple[Path, Path], gallery: Path) -> None:
    _, adapter = run
    index = _build(_merged(adapter), gallery, tmp_path / "index", adapter)
    hits = index.search(model_from_index(index), QUERIES, top_k=5)

    reference = upperson.create_model("up-person", backbone="tiny", image_size=SMALL_IMAGE, **OPTIONS).eval()
    upperson.load_adapter(reference, adapter)  # unmerged, fp32 features: an independent path
    transform = build_transforms(SMALL_IMAGE, train=False)
    paths = sorted(p for p in gallery.rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png", ".bmp", ".webp"} and ".hidden" not in p.parts and p.name != "broken.jpg")
    with torch.no_grad():
        images = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])
        similarity = F.normalize(reference.encode_text(upperson.tokenize(QUERIES)), dim=-1) @ F.normalize(reference.encode_image(images), dim=-1).t()
    for query_hits, scores in zip(hits, similarity):
        assert len(query_hits) == 5 and all(isinstance(hit, SearchHit) for hit in query_hits)
        by_path = dict(zip(paths, scores.tolist()))
        best = scores.sort(descending=True).values.tolist()
        for rank, hit in enumerate(query_hits):
            assert hit.score == pytest.approx(by_path[hit.path], abs=1e-2)
            assert by_path[hit.path] == pytest.approx(best[rank], abs=2e-3)  # same order up to fp16 near-ties
    assert len(index.search(model_from_index(index), QUERIES[:1], top_k=50)[0]) == 11


def test_incremental_reindex_reuses_adds_and_drops(tmp_path: Path, run: tuple[Path, Path], gallery: Path) -> None:
    _, adapter = run
    model = _merged(adapter)
    calls = _count_encoded(model)
    first = _build(model, gallery, tmp_path / "index", adapter)
    assert sum(calls) == 11
    calls.clear()
    (gallery / "sub" / "h.jpg").unlink()
    _block_image(gallery / "sub" / "new.png", 5)
    second = _build(model, gallery, tmp_path / "index", adapter)
    assert sum(calls) == 1
    assert "sub/h.jpg" not in second.paths and "sub/new.png" in second.paths and len(second) == 11
    for path in set(first.paths) & set(second.paths):
        assert torch.equal(first.features[first.paths.index(path)], second.features[second.paths.index(path)])
    assert [entry["path"] for entry in second.skipped] == ["broken.jpg"]  # unchanged, so not retried but still listed
    calls.clear()
    os.utime(gallery / "a.jpg", ns=(0, 10**18))  # a changed mtime means the file is re-encoded
    _block_image(gallery / "broken.jpg", 2)  # a repaired file is retried
    third = _build(model, gallery, tmp_path / "index", adapter)
    assert sum(calls) == 2 and third.skipped == [] and len(third) == 12


def test_other_adapter_rebuilds_from_scratch(tmp_path: Path, run: tuple[Path, Path], gallery: Path, caplog: pytest.LogCaptureFixture) -> None:
    _, adapter = run
    _build(_merged(adapter), gallery, tmp_path / "index", adapter)
    _, other_adapter = _save_run(tmp_path / "other", seed=2)
    model = _merged(other_adapter)
    calls = _count_encoded(model)
    with caplog.at_level(logging.INFO, logger="upperson.retrieval.gallery"):
        index = _build(model, gallery, tmp_path / "index", other_adapter)
    assert sum(calls) == 11
    assert "rebuilding from scratch" in caplog.text
    assert index.metadata["adapter"] == str(other_adapter.resolve())


def test_cli_index_and_search(tmp_path: Path, run: tuple[Path, Path], gallery: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config, adapter = run
    out = tmp_path / "index"
    assert main(["index", "--config", str(config), "--adapter", str(adapter), "--images", str(gallery), "--out", str(out), "--batch-size", "5"]) == 0
    assert "indexed 11 images" in capsys.readouterr().out
    results, figure = tmp_path / "hits.json", tmp_path / "hits.png"
    code = main(["search", str(out), *QUERIES, "--top-k", "3", "--json", str(results), "--figure", str(figure), "--device", "cpu"])
    assert code == 0
    printed = capsys.readouterr().out
    assert printed.count("query: ") == 2 and "rank" in printed
    payload = json.loads(results.read_text())
    assert [entry["query"] for entry in payload] == QUERIES
    assert all(len(entry["hits"]) == 3 and entry["hits"][0]["score"] >= entry["hits"][2]["score"] for entry in payload)
    with Image.open(figure) as image:
        layout = FigureLayout()
        assert image.size == layout.size(2, 3, (128, 48))
        assert image.convert("RGB").getpixel(layout.cell_origin(1, 2, (128, 48))) == NEUTRAL_COLOUR


def test_cli_search_table_shows_file_names_that_cannot_lie_on_screen(
    tmp_path: Path, run: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    config, adapter = run
    gallery = tmp_path / "gallery"
    _block_image(gallery / "\u202egnp.exe.png", 1)  # U+202E shows the name reversed, as "png.exe.png"
    _block_image(gallery / "plain.png", 2)
    out = tmp_path / "index"
    assert main(["index", "--config", str(config), "--adapter", str(adapter), "--images", str(gallery), "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["search", str(out), "a person", "--top-k", "2", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "\\u202egnp.exe.png" in printed and "\u202e" not in printed and "plain.png" in printed


def test_hits_table_escapes_undecodable_bytes_and_controls(tmp_path: Path) -> None:
    root = tmp_path / "gallery"
    names = [os.fsdecode(b"caf\xe9.png"), "sub/\u2066x\u200b.png", "ok/Zo\u00eb.png"]
    hits = [SearchHit(root / name, 0.5, row) for row, name in enumerate(names)]
    table = format_hits_table(hits, root)
    lines = table.splitlines()[1:]
    assert [line.split()[-1] for line in lines] == ["caf\\xe9.png", "sub/\\u2066x\\u200b.png", "ok/Zo\u00eb.png"]
    table.encode("utf-8")  # no lone surrogate left to break a terminal or a pipe


def test_cli_search_missing_adapter_fails_clearly(tmp_path: Path, run: tuple[Path, Path], gallery: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config, adapter = run
    out = tmp_path / "index"
    assert main(["index", "--config", str(config), "--adapter", str(adapter), "--images", str(gallery), "--out", str(out)]) == 0
    moved = tmp_path / "moved.safetensors"
    shutil.move(adapter, moved)
    capsys.readouterr()
    assert main(["search", str(out), "a person", "--device", "cpu"]) == 1
    error = capsys.readouterr().err
    assert str(adapter.resolve()) in error and "--adapter" in error
    assert main(["search", str(out), "a person", "--device", "cpu", "--adapter", str(moved)]) == 0


def test_faiss_ranking_equals_torch(tmp_path: Path, run: tuple[Path, Path], gallery: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("faiss")
    from upperson.retrieval import gallery as search

    _, adapter = run
    index = _build(_merged(adapter), gallery, tmp_path / "index", adapter)
    model = model_from_index(index)
    exact = index.search(model, QUERIES, top_k=6)

    def no_torch(*args: object) -> None:
        raise AssertionError("the torch path ran although FAISS was requested")

    monkeypatch.setattr(search, "_rank_torch", no_torch)
    with_faiss = index.search(model, QUERIES, top_k=6, faiss_threshold=0)
    for torch_hits, faiss_hits in zip(exact, with_faiss):
        assert [hit.path for hit in torch_hits] == [hit.path for hit in faiss_hits]
        assert [hit.score for hit in torch_hits] == pytest.approx([hit.score for hit in faiss_hits], abs=1e-5)


@pytest.mark.parametrize(("rows", "queries", "block", "buffer"), [(1000, 1, 64, 1 << 24), (1000, 7, 96, 2500), (5, 3, 2048, 1 << 24)])
def test_rank_torch_equals_brute_force(rows: int, queries: int, block: int, buffer: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks that do not divide the gallery, query groups (a score buffer of 2 or 3 queries), tiny galleries."""
    from upperson.retrieval import gallery as search

    monkeypatch.setattr(search, "_SCORE_BLOCK", block)
    monkeypatch.setattr(search, "_SCORE_BUFFER", buffer)
    generator = torch.Generator().manual_seed(0)
    features = F.normalize(torch.randn(rows, 32, generator=generator), dim=1).half()
    query_features = F.normalize(torch.randn(queries, 32, generator=generator), dim=1)
    k = min(10, rows)
    scores, indices = search._rank_torch(query_features, features, k)
    reference = (query_features.double() @ features.double().t()).float()  # [Q, N]
    expected_scores, expected_indices = reference.topk(k, dim=1)
    assert torch.equal(indices, expected_indices)
    assert torch.allclose(scores, expected_scores, atol=1e-6)
