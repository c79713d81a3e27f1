"""`upperson serve` names images by stable row ids, and reads them inside a gallery root it is given.

Reproduces the defect of serving rows as positions: after ``a_*.jpg`` images were added and the folder
re-indexed, ``GET /api/images/s/3`` served ``a_03.jpg`` instead of the ``m_p00204.jpg`` a client had
been shown as row 3. Expected rows and rankings come from the index files (``GalleryIndex.load`` and
its stored features), never from the server's code path.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch.nn.functional as F

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

import upperson  # noqa: E402
from conftest import SMALL_IMAGE  # noqa: E402
from test_search import QUERIES, _block_image, _merged, _save_run  # noqa: E402
from upperson.cli import main  # noqa: E402
from upperson.retrieval.gallery import GalleryIndex  # noqa: E402
from upperson.retrieval.scenarios import ScenarioError, Scenarios, ScenarioSpec, read_scenario_file  # noqa: E402
from upperson.retrieval.serve import create_app  # noqa: E402

PHOTOS = ["m_p00201.jpg", "m_p00202.jpg", "m_p00203.jpg", "m_p00204.jpg"]


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_run(tmp_path_factory.mktemp("run"))[1]


@pytest.fixture(scope="module")
def model(adapter: Path) -> upperson.RetrievalModel:
    return _merged(adapter)


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    for number, name in enumerate(PHOTOS):
        _block_image(tmp_path / "photos" / name, number)
    return tmp_path / "photos"


def _build(model: upperson.RetrievalModel, photos: Path, out: Path, adapter: Path) -> GalleryIndex:
    return GalleryIndex.build(model, photos, out, adapter=adapter, image_size=SMALL_IMAGE, batch_size=4)


def _expected_more_like(index_dir: Path, row: int, top_k: int, gallery_root: Path | None = None) -> list[int]:
    """Brute force over the stored features: row ids by cosine to ``row``'s feature, itself left out."""
    index = GalleryIndex.load(index_dir, gallery_root=gallery_root)
    features = F.normalize(index.features.float(), dim=-1)
    scores = features @ features[index.position(row)]
    return [index.rows[int(position)] for position in scores.argsort(descending=True) if index.rows[int(position)] != row][:top_k]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# --- rows are stable ids ------------------------------------------------------------------------------------


def test_a_row_serves_the_same_file_after_reindexing_and_reload(
    model: upperson.RetrievalModel, adapter: Path, photos: Path, tmp_path: Path
) -> None:
    out = tmp_path / "index"
    first = _build(model, photos, out, adapter)
    row = first.rows[first.paths.index("m_p00204.jpg")]
    removed = first.rows[first.paths.index("m_p00202.jpg")]
    client = TestClient(create_app([ScenarioSpec("s", out)]))
    expected = (photos / "m_p00204.jpg").read_bytes()
    assert client.get(f"/api/images/s/{row}").content == expected

    for number in range(3):
        _block_image(photos / f"a_{number:02d}.jpg", 4 + number)  # sort before every existing path
    (photos / "m_p00202.jpg").unlink()
    second = _build(model, photos, out, adapter)
    assert second.position(row) != first.position(row)  # the file moved: serving by position would be wrong
    reloaded = client.post("/api/scenarios/s/reload")
    assert reloaded.status_code == 200 and reloaded.json()["images"] == 6

    image = client.get(f"/api/images/s/{row}")
    assert image.status_code == 200 and image.content == expected
    assert client.get(f"/api/images/s/{row}/thumbnail").status_code == 200

    more = client.post("/api/search/image", json={"scenario": "s", "row": row, "top_k": 10})
    assert more.status_code == 200, more.text
    body = more.json()
    assert body["row"] == row and [hit["row"] for hit in body["hits"]] == _expected_more_like(out, row, 10)
    by_row = {second.rows[position]: path for position, path in enumerate(second.paths)}
    assert all(hit["path"] == by_row[hit["row"]] for hit in body["hits"])

    text = client.post("/api/search", json={"scenario": "s", "query": QUERIES[0], "top_k": 10}).json()["hits"]
    assert sorted(hit["row"] for hit in text) == sorted(second.rows)
    for hit in text:  # each hit's row fetches the very file the hit names
        assert hit["path"] == by_row[hit["row"]]
        assert client.get(f"/api/images/s/{hit['row']}").content == (photos / hit["path"]).read_bytes()

    for response in (
        client.get(f"/api/images/s/{removed}"),
        client.get(f"/api/images/s/{removed}/thumbnail"),
        client.post("/api/search/image", json={"scenario": "s", "row": removed, "top_k": 3}),
    ):
        assert response.status_code == 404, response.text
        assert f"scenario 's': row {removed} was removed from the gallery" in response.json()["detail"]
    never = client.get(f"/api/images/s/{second.next_row}")
    assert never.status_code == 404 and f"no row {second.next_row}: never given" in never.json()["detail"]


# --- the gallery root, given at serve time --------------------------------------------------------------------


@pytest.fixture
def elsewhere(model: upperson.RetrievalModel, adapter: Path, photos: Path, tmp_path: Path) -> Path:
    """An index kept apart from its images: the folder holding it (``indexes``) does not hold ``photos``."""
    out = tmp_path / "indexes" / "s"
    _build(model, photos, out, adapter)
    return out


def test_an_index_apart_from_its_images_needs_a_gallery_root(elsewhere: Path, photos: Path) -> None:
    with pytest.raises(ScenarioError, match=r"scenario 's'.*gallery root .* is outside"):
        Scenarios([ScenarioSpec("s", elsewhere)])
    with pytest.raises(ScenarioError, match=r"is outside .*allowed gallery root"):
        Scenarios([ScenarioSpec("s", elsewhere, gallery_root=photos / "sub")])  # a folder inside the images is not enough
    client = TestClient(create_app([ScenarioSpec("s", elsewhere, gallery_root=photos)]))
    row = GalleryIndex.load(elsewhere, gallery_root=photos).rows[0]
    assert client.get(f"/api/images/s/{row}").content == (photos / PHOTOS[0]).read_bytes()
    reloaded = client.post("/api/scenarios/s/reload")  # the reload reads the index inside the same root
    assert reloaded.status_code == 200, reloaded.text
    assert reloaded.json()["images"] == len(PHOTOS)


def test_serve_yaml_gallery_root_is_relative_to_the_file(elsewhere: Path, photos: Path, tmp_path: Path) -> None:
    config = tmp_path / "serve.yaml"
    config.write_text("- {name: s, index: indexes/s, gallery_root: photos}\n- {name: t, index: indexes/s, gallery_root: .}\n")
    specs = read_scenario_file(config)
    assert specs == [
        ScenarioSpec("s", tmp_path / "indexes/s", gallery_root=tmp_path / "photos"),
        ScenarioSpec("t", tmp_path / "indexes/s", gallery_root=tmp_path / "."),
    ]
    scenarios = Scenarios(specs)
    assert [len(scenario.index) for scenario in scenarios] == [len(PHOTOS), len(PHOTOS)]
    config.write_text("- {name: s, index: indexes/s, gallery_root: [photos]}\n")
    with pytest.raises(ScenarioError, match=r"scenario 1 'gallery_root' must be a folder path \(a string\)"):
        read_scenario_file(config)


def test_cli_gallery_root_applies_to_every_scenario(
    elsewhere: Path, photos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    started = {}

    def fake_run(app: object, host: str, port: int, log_level: str) -> None:
        started.update(app=app)

    import uvicorn

    monkeypatch.setattr(uvicorn, "run", fake_run)
    monkeypatch.delenv("UPPERSON_TOKEN", raising=False)
    base = ["serve", "--device", "cpu", "--port", str(_free_port())]
    assert main([*base, "--scenario", f"s={elsewhere}"]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "scenario 's'" in error and "--gallery-root" in error, error

    assert main([*base, "--scenario", f"s={elsewhere}", "--scenario", f"t={elsewhere}", "--gallery-root", str(photos)]) == 0
    assert "2 scenario(s) on 1 model(s)" in capsys.readouterr().out
    client = TestClient(started["app"])
    for name in ("s", "t"):
        assert client.get(f"/api/images/{name}/0").content == (photos / PHOTOS[0]).read_bytes()
        assert client.post(f"/api/scenarios/{name}/reload").status_code == 200

    config = tmp_path / "serve.yaml"
    config.write_text("- {name: s, index: indexes/s, gallery_root: photos}\n")
    assert main([*base, "--config", str(config), "--gallery-root", str(photos)]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "--gallery-root applies to --scenario entries" in error and "gallery_root:" in error, error
