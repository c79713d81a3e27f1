"""`upperson serve`: the API equals `GalleryIndex.search`, scenarios share one backbone, bad input is a 4xx.

Scenarios are tiny UP-Person runs on the 'tiny' CLIP over a 12-image synthetic gallery; every
expected ranking comes from a separately built (merged) model through `GalleryIndex.search` or from
the index's stored features, never from the server's own code path.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import socket
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

import upperson  # noqa: E402
from conftest import SMALL_IMAGE, randomise_petl  # noqa: E402
from test_search import OPTIONS, QUERIES, _block_image, _save_run  # noqa: E402
from upperson.cli import main  # noqa: E402
from upperson.data.datasets import read_image  # noqa: E402
from upperson.retrieval import serve  # noqa: E402
from upperson.retrieval.gallery import INDEX_FILE, GalleryIndex, encode_images, model_from_index  # noqa: E402
from upperson.retrieval.scenarios import ScenarioError, Scenarios, ScenarioSpec, read_scenario_file  # noqa: E402
from upperson.retrieval.serve import MAX_UPLOAD_BYTES, create_app, is_loopback  # noqa: E402

TOKEN = "s3cret-token"


@dataclass
class Served:
    """Two runs of one method structure (a, b), one of another structure (c), their indexes over one gallery."""

    root: Path
    gallery: Path
    index_a: Path
    index_b: Path
    index_c: Path
    adapter_c: Path
    scenarios: Scenarios

    def specs(self, *names: str) -> list[ScenarioSpec]:
        folders = {"a": self.index_a, "b": self.index_b, "c": self.index_c}
        return [ScenarioSpec(name, folders[name]) for name in names]


def _gallery(root: Path, count: int = 12) -> Path:
    for number in range(count):
        _block_image(root / ("sub" if number % 3 == 0 else "") / f"p{number:02d}.png", number)
    return root


def _index(adapter: Path, gallery: Path, out: Path, **options: object) -> Path:
    model = upperson.create_model("up-person", backbone="tiny", image_size=SMALL_IMAGE, **{**OPTIONS, **options})
    upperson.load_adapter(model, adapter)
    model.merge_lora()
    GalleryIndex.build(model.eval(), gallery, out, adapter=adapter, image_size=SMALL_IMAGE, batch_size=6)
    return out


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Served:
    root = tmp_path_factory.mktemp("serve")
    gallery = _gallery(root / "gallery")
    _, adapter_a = _save_run(root / "run-a", seed=1)
    _, adapter_b = _save_run(root / "run-b", seed=2)
    other = upperson.create_model("up-person", backbone="tiny", image_size=SMALL_IMAGE, **{**OPTIONS, "lora_rank": 4})
    randomise_petl(other, seed=3)
    adapter_c = upperson.save_adapter(other, root / "run-c" / "best.safetensors")
    index_a = _index(adapter_a, gallery, root / "index-a")
    index_b = _index(adapter_b, gallery, root / "index-b")
    index_c = _index(adapter_c, gallery, root / "index-c", lora_rank=4)
    specs = [ScenarioSpec("a", index_a), ScenarioSpec("b", index_b)]
    return Served(root, gallery, index_a, index_b, index_c, adapter_c, Scenarios(specs))


@pytest.fixture(scope="module")
def client(served: Served) -> TestClient:
    return TestClient(create_app(served.scenarios))


def _expected_text(index_dir: Path, query: str, top_k: int) -> list[tuple[str, float]]:
    """(relative path, score) of `GalleryIndex.search` with the scenario's own, separately built, merged model."""
    index = GalleryIndex.load(index_dir)
    hits = index.search(model_from_index(index), [query], top_k)[0]
    return [(hit.path.relative_to(index.image_dir).as_posix(), hit.score) for hit in hits]


def _expected_row(index_dir: Path, row: int, top_k: int) -> list[int]:
    """Brute force over the stored features: row ids by cosine to ``row``'s feature, itself left out."""
    index = GalleryIndex.load(index_dir)
    features = F.normalize(index.features.float(), dim=-1)
    scores = features @ features[index.position(row)]
    order = [index.rows[int(i)] for i in scores.argsort(descending=True) if index.rows[int(i)] != row]
    return order[:top_k]


def _row_of(index: GalleryIndex, path: str) -> int:
    """The stable row id of the image at ``path``."""
    return index.rows[index.paths.index(path)]


def _path_of(index: GalleryIndex, row: int) -> str:
    return index.paths[index.position(row)]


def _assert_hits_equal(hits: list[dict], expected: list[tuple[str, float]]) -> None:
    assert [hit["path"] for hit in hits] == [path for path, _ in expected]
    assert [hit["score"] for hit in hits] == pytest.approx([score for _, score in expected], abs=1e-5)


# --- rankings and sharing ---------------------------------------------------------------------------------


def test_rankings_equal_gallery_search_for_every_scenario(served: Served, client: TestClient) -> None:
    assert len(served.scenarios.models) == 1 and len(served.scenarios.backbones) == 1
    expected = {(name, query): _expected_text(folder, query, 5) for name, folder in (("a", served.index_a), ("b", served.index_b)) for query in QUERIES}
    assert expected[("a", QUERIES[0])] != expected[("b", QUERIES[0])]  # the adapters really differ
    for name, query in [("a", QUERIES[0]), ("b", QUERIES[0]), ("a", QUERIES[1]), ("b", QUERIES[1]), ("a", QUERIES[0])]:
        response = client.post("/api/search", json={"scenario": name, "query": query, "top_k": 5})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["scenario"] == name and body["query"] == query and body["top_k"] == 5 and body["took_ms"] > 0
        _assert_hits_equal(body["hits"], expected[(name, query)])
        for hit in body["hits"]:
            index = served.scenarios[name].index
            assert _path_of(index, hit["row"]) == hit["path"] and (hit["width"], hit["height"]) == (24, 48)


def test_one_model_object_for_scenarios_of_one_structure(served: Served) -> None:
    (shared,) = served.scenarios.models
    assert all(scenario.model is shared for scenario in served.scenarios)
    before = shared.swaps
    for name in ("a", "b", "a"):
        served.scenarios[name].search_text(QUERIES[0], 3)
    assert shared.swaps >= before + 2  # each change of scenario copied the other adapter in
    frozen = dict(shared.model.backbone_state_dict())
    assert not any(p.requires_grad for p in frozen.values())
    assert not shared.model.lora_merged  # the shared frozen tensors are never written


def test_another_structure_gets_its_own_model_on_the_same_backbone_tensors(served: Served) -> None:
    scenarios = Scenarios(served.specs("a", "c"))
    assert len(scenarios.models) == 2 and len(scenarios.backbones) == 1
    first, second = (scenario.model.model for scenario in scenarios)
    first_frozen, second_frozen = first.backbone_state_dict(), second.backbone_state_dict()
    assert set(first_frozen) == set(second_frozen)
    assert all(first_frozen[name] is second_frozen[name] for name in first_frozen)  # one copy of the backbone
    assert first.trainable_state_dict()["clip.transformer.resblocks.0.attn.lora.key.lora_a"].shape[0] == 2
    assert second.trainable_state_dict()["clip.transformer.resblocks.0.attn.lora.key.lora_a"].shape[0] == 4
    client = TestClient(create_app(scenarios))
    for name, folder in (("c", served.index_c), ("a", served.index_a)):
        body = client.post("/api/search", json={"scenario": name, "query": QUERIES[1], "top_k": 6}).json()
        _assert_hits_equal(body["hits"], _expected_text(folder, QUERIES[1], 6))


def test_more_like_this_ranks_by_the_stored_feature_without_the_image_itself(served: Served, client: TestClient) -> None:
    for row in (0, 7):
        response = client.post("/api/search/image", json={"scenario": "b", "row": row, "top_k": 4})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["row"] == row and body["filename"] is None
        assert [hit["row"] for hit in body["hits"]] == _expected_row(served.index_b, row, 4)
    everything = client.post("/api/search/image", json={"scenario": "b", "row": 0, "top_k": 1000}).json()
    assert len(everything["hits"]) == 11  # the whole gallery but the image itself


def test_uploaded_image_is_encoded_with_the_scenarios_model(served: Served, client: TestClient) -> None:
    index = GalleryIndex.load(served.index_a)
    path = index.image_dir / index.paths[5]
    response = client.post(
        "/api/search/image", data={"scenario": "a", "top_k": "3"}, files={"file": ("query.png", path.read_bytes(), "image/png")}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["filename"] == "query.png" and body["row"] is None
    features = encode_images(model_from_index(index), [read_image(path)], SMALL_IMAGE, torch.device("cpu"))
    scores, positions = index.rank(features, 3)
    assert [hit["row"] for hit in body["hits"]] == [index.rows[position] for position in positions[0].tolist()]
    assert [hit["score"] for hit in body["hits"]] == pytest.approx(scores[0].tolist(), abs=1e-5)
    assert body["hits"][0]["row"] == index.rows[5] and body["hits"][0]["score"] > 0.99  # the gallery's own copy of it


def test_32_parallel_requests_all_get_their_own_answer(served: Served, client: TestClient) -> None:
    requests = []
    for number in range(32):
        name = "ab"[number % 2]
        if number % 4 < 2:
            requests.append(("/api/search", {"scenario": name, "query": QUERIES[number % 3 % 2], "top_k": 5}))
        else:
            requests.append(("/api/search/image", {"scenario": name, "row": number % 12, "top_k": 5}))
    folders = {"a": served.index_a, "b": served.index_b}
    expected = [
        [path for path, _ in _expected_text(folders[body["scenario"]], body["query"], 5)]
        if "query" in body
        else [_path_of(served.scenarios[body["scenario"]].index, row) for row in _expected_row(folders[body["scenario"]], body["row"], 5)]
        for _, body in requests
    ]
    with ThreadPoolExecutor(max_workers=32) as pool:
        responses = list(pool.map(lambda request: client.post(request[0], json=request[1]), requests))
    assert [response.status_code for response in responses] == [200] * 32
    assert [[hit["path"] for hit in response.json()["hits"]] for response in responses] == expected


# --- scenarios, health, page ------------------------------------------------------------------------------


def test_scenarios_health_and_docs(client: TestClient) -> None:
    listed = client.get("/api/scenarios").json()
    assert [entry["name"] for entry in listed] == ["a", "b"]
    assert listed[0]["images"] == 12 and listed[0]["method"] == "up-person" and listed[0]["backbone"] == "tiny"
    assert listed[0]["adapter"] == "best.safetensors" and len(listed[0]["adapter_sha256"]) == 64
    assert client.get("/api/health").json() == {"status": "ok", "version": upperson.__version__, "scenarios": 2, "models": 1}
    assert client.get("/docs").status_code == 404 and client.get("/redoc").status_code == 404  # their UIs load a CDN
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/api/search", "/api/search/image", "/api/scenarios", "/api/images/{scenario}/{row}/thumbnail"} <= set(paths)
    assert set(paths["/api/search/image"]["post"]["requestBody"]["content"]) == {"application/json", "multipart/form-data"}


def test_page_and_its_files_are_served_locally(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    html = page.text
    for needle in ('id="query"', 'for="query"', 'id="scenario"', 'for="scenario"', 'id="results"', "/static/app.js", "/static/style.css"):
        assert needle in html
    assert "http://" not in html and "https://" not in html  # nothing from the internet
    script = client.get("/static/app.js")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"] and "https://" not in script.text
    assert client.get("/static/style.css").status_code == 200
    assert client.get("/static/../serve.py").status_code == 404
    assert client.get("/static/%2e%2e/serve.py").status_code == 404


def test_images_and_thumbnails_by_row(served: Served, client: TestClient) -> None:
    index = served.scenarios["a"].index
    full = client.get("/api/images/a/3")
    assert full.status_code == 200 and full.headers["content-type"] == "image/png"
    assert full.content == (index.image_dir / _path_of(index, 3)).read_bytes()
    thumbnail = client.get("/api/images/a/3/thumbnail")
    assert thumbnail.status_code == 200 and thumbnail.headers["content-type"] == "image/jpeg"
    with Image.open(io.BytesIO(thumbnail.content)) as image:
        assert image.format == "JPEG" and image.width <= serve.THUMBNAIL_SIZE[0] and image.height <= serve.THUMBNAIL_SIZE[1]


def test_large_gallery_images_get_bounded_thumbnails(tmp_path: Path, served: Served) -> None:
    gallery = tmp_path / "gallery"
    _block_image(gallery / "small.png", 1)
    Image.new("RGB", (1200, 2400), (90, 10, 10)).save(gallery / "big.jpg")
    index = _index(served.root / "run-a" / "best.safetensors", gallery, tmp_path / "index")
    client = TestClient(create_app([ScenarioSpec("big", index)]))
    row = _row_of(GalleryIndex.load(index), "big.jpg")
    hits = client.post("/api/search", json={"scenario": "big", "query": "red", "top_k": 2}).json()["hits"]
    assert {(hit["path"], hit["width"], hit["height"]) for hit in hits} == {("big.jpg", 1200, 2400), ("small.png", 24, 48)}
    with Image.open(io.BytesIO(client.get(f"/api/images/big/{row}/thumbnail").content)) as image:
        assert image.size == (192, 384)


# --- bad input ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"scenario": "nope", "query": "a man", "top_k": 3}, 404, "unknown scenario 'nope'"),
        ({"scenario": "a", "query": "", "top_k": 3}, 422, "query: the query is empty"),
        ({"scenario": "a", "query": "  \n\t ", "top_k": 3}, 422, "query: the query is empty"),
        ({"scenario": "a", "query": "x" * 1001, "top_k": 3}, 422, "query: String should have at most 1000 characters"),
        ({"scenario": "a", "query": "a man", "top_k": 0}, 422, "top_k: Input should be greater than or equal to 1"),
        ({"scenario": "a", "query": "a man", "top_k": 1001}, 422, "top_k: Input should be less than or equal to 1000"),
        ({"scenario": "a", "query": "a man", "top_k": "many"}, 422, "top_k: Input should be a valid integer"),
        ({"scenario": "a", "top_k": 3}, 422, "query: Field required"),
        ({"scenario": "a", "query": "a man", "colour": "red"}, 422, "colour: Extra inputs are not permitted"),
        ({"scenario": "a", "query": 7}, 422, "query: Input should be a valid string"),
    ],
)
def test_bad_text_searches_say_what_is_wrong(client: TestClient, body: dict, status: int, message: str) -> None:
    response = client.post("/api/search", json=body)
    assert response.status_code == status
    assert isinstance(response.json()["detail"], str) and message in response.json()["detail"]


def test_bad_bodies_and_routes(client: TestClient) -> None:
    cases = [
        (client.post("/api/search", content=b"{not json", headers={"content-type": "application/json"}), 422, "JSON"),
        (client.post("/api/search/image", content=b"{not json", headers={"content-type": "application/json"}), 422, "not valid JSON"),
        (client.post("/api/search/image", json={"scenario": "a", "row": 12}), 404, "no row 12"),
        (client.post("/api/search/image", json={"scenario": "a", "row": -1}), 422, "row: Input should be greater than or equal to 0"),
        (client.post("/api/search/image", json={"scenario": "zz", "row": 1}), 404, "unknown scenario 'zz'"),
        (client.post("/api/search/image", json={"scenario": "a", "row": 1, "top_k": 5000}), 422, "top_k"),
        (client.post("/api/search/image", json=[1, 2]), 422, "valid dictionary"),
        (client.post("/api/search/image", content=b"row=1", headers={"content-type": "text/plain"}), 415, "multipart/form-data"),
        (client.post("/api/search/image", data={"scenario": "a", "top_k": "3"}, files={"other": ("x.png", b"x")}), 422, "form field 'file'"),
        (client.post("/api/search/image", data={"top_k": "3"}, files={"file": ("x.png", b"x")}), 422, "scenario: Field required"),
        (client.get("/api/images/a/12"), 404, "no row 12"),
        (client.get("/api/images/a/-3/thumbnail"), 404, "no row -3"),
        (client.get("/api/images/zz/0"), 404, "unknown scenario"),
        (client.get("/api/images/a/first"), 422, "row: Input should be a valid integer"),
        (client.post("/api/scenarios/zz/reload"), 404, "unknown scenario"),
        (client.get("/api/nothing"), 404, "Not Found"),
    ]
    for response, status, message in cases:
        assert response.status_code == status, (response.request.url, response.text)
        detail = response.json()["detail"]
        assert isinstance(detail, str) and message in detail, (response.request.url, detail)


def _png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (10, 120, 200)).save(out, "PNG")
    return out.getvalue()


def _upload(client: TestClient, data: bytes, name: str = "query.png") -> tuple[int, str]:
    response = client.post("/api/search/image", data={"scenario": "a", "top_k": "2"}, files={"file": (name, data, "image/png")})
    return response.status_code, response.json()["detail"] if response.status_code != 200 else ""


def test_bad_uploads(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    status, detail = _upload(client, b"just some text, no image")
    assert status == 415 and "not an image" in detail
    assert _upload(client, b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n")[0] == 415  # Ghostscript is never run
    status, detail = _upload(client, _png(40, 80)[:60])
    assert status == 422 and "cannot be decoded" in detail
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    status, detail = _upload(client, _png(100, 100))  # over twice the limit: Pillow refuses to open it
    assert status == 422 and "decompression bomb" in detail
    with pytest.warns(Image.DecompressionBombWarning):
        status, detail = _upload(client, _png(40, 40))  # over the limit but under twice it: Pillow only warns, we refuse
    assert status == 422 and "decompression-bomb limit" in detail


def test_upload_over_the_limit_is_413(client: TestClient) -> None:
    status, detail = _upload(client, b"\x89PNG" + bytes(MAX_UPLOAD_BYTES))
    assert status == 413 and "limit" in detail


def test_streamed_body_over_the_limit_is_413(served: Served) -> None:
    small = TestClient(create_app(served.scenarios, max_upload_bytes=10_000))

    def chunks():  # no Content-Length: the limit is enforced while reading
        yield b'{"scenario": "a", "query": "'
        for _ in range(20):
            yield b"x" * 1000
        yield b'"}'

    response = small.post("/api/search", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413 and "limit of 10,000 bytes" in response.json()["detail"]
    assert small.post("/api/search", json={"scenario": "a", "query": "a man"}).status_code == 200


# --- paths --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "/api/images/a/..%2f..%2f..%2fsecret.txt",
        "/api/images/a/%2e%2e%2f%2e%2e%2fsecret.txt",
        "/api/images/a/%2e%2e/%2e%2e/secret.txt",
        "/api/images/a/0/..%2f..%2fsecret.txt",
        "/api/images/a/%2fetc%2fpasswd",
        "/api/images/%2e%2e/0",
        "/api/images/a/0%00/thumbnail",
        "/api/images/a/0/thumbnail/..%2f..%2fsecret.txt",
    ],
)
def test_traversal_attempts_fail(served: Served, client: TestClient, url: str) -> None:
    secret = served.root / "secret.txt"
    secret.write_text("TOP SECRET")
    response = client.get(url)
    assert response.status_code in (404, 422), url
    assert b"TOP SECRET" not in response.content and b"root:" not in response.content


def test_image_swapped_for_a_symlink_out_of_the_gallery_is_not_served(tmp_path: Path, served: Served) -> None:
    gallery = _gallery(tmp_path / "gallery", count=3)
    index = _index(served.root / "run-a" / "best.safetensors", gallery, tmp_path / "index")
    client = TestClient(create_app([ScenarioSpec("s", index)]))
    outside = tmp_path / "outside.png"
    _block_image(outside, 9)
    row = _row_of(GalleryIndex.load(index), "p01.png")
    assert client.get(f"/api/images/s/{row}").status_code == 200
    (gallery / "p01.png").unlink()
    (gallery / "p01.png").symlink_to(outside)
    for url in (f"/api/images/s/{row}", f"/api/images/s/{row}/thumbnail"):
        response = client.get(url)
        assert response.status_code == 404 and "no longer resolves to a file inside the gallery" in response.json()["detail"]
    (gallery / "p01.png").unlink()
    assert "no longer in the gallery" in client.get(f"/api/images/s/{row}").json()["detail"]


# --- token --------------------------------------------------------------------------------------------------


def test_token_is_required_on_every_api_route(served: Served) -> None:
    client = TestClient(create_app(served.scenarios, token=TOKEN))
    routes = [
        ("get", "/api/health", None),
        ("get", "/api/scenarios", None),
        ("post", "/api/search", {"scenario": "a", "query": "a man", "top_k": 2}),
        ("post", "/api/search/image", {"scenario": "a", "row": 1, "top_k": 2}),
        ("get", "/api/images/a/1", None),
        ("get", "/api/images/a/1/thumbnail", None),
        ("post", "/api/scenarios/a/reload", None),
    ]
    for method, url, body in routes:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}, {"Authorization": TOKEN}):
            response = getattr(client, method)(url, json=body, headers=headers) if body else getattr(client, method)(url, headers=headers)
            assert response.status_code == 401, (url, headers)
            assert "token" in response.json()["detail"] and response.headers["www-authenticate"] == "Bearer"
        response = getattr(client, method)(url, json=body, headers={"Authorization": f"Bearer {TOKEN}"}) if body else getattr(
            client, method
        )(url, headers={"Authorization": f"Bearer {TOKEN}"})
        assert response.status_code == 200, (url, response.text)
    assert client.get("/").status_code == 200 and client.get("/static/app.js").status_code == 200  # the page asks for the token
    assert "HTTPBearer" in client.get("/openapi.json").json()["components"]["securitySchemes"]


# --- reload -------------------------------------------------------------------------------------------------


def test_reload_serves_the_rebuilt_index_and_keeps_the_old_one_on_errors(tmp_path: Path, served: Served) -> None:
    gallery = _gallery(tmp_path / "gallery", count=4)
    adapter = served.root / "run-a" / "best.safetensors"
    index = _index(adapter, gallery, tmp_path / "index")
    client = TestClient(create_app([ScenarioSpec("live", index)]))
    assert client.get("/api/scenarios").json()[0]["images"] == 4
    _block_image(gallery / "new" / "arrival.png", 6)
    _index(adapter, gallery, index)  # `upperson index` again: the folder is replaced atomically
    assert client.get("/api/scenarios").json()[0]["images"] == 4  # nothing changes until the reload
    reloaded = client.post("/api/scenarios/live/reload")
    assert reloaded.status_code == 200 and reloaded.json()["images"] == 5
    hits = client.post("/api/search", json={"scenario": "live", "query": QUERIES[0], "top_k": 10}).json()["hits"]
    assert "new/arrival.png" in [hit["path"] for hit in hits]
    _assert_hits_equal(hits, _expected_text(index, QUERIES[0], 10))

    payload = json.loads((index / INDEX_FILE).read_text())
    first = payload["paths"][0]
    payload["files"]["../../escape.png"] = payload["files"].pop(first)
    (index / INDEX_FILE).write_text(json.dumps({**payload, "paths": ["../../escape.png", *payload["paths"][1:]]}))
    failed = client.post("/api/scenarios/live/reload")
    assert failed.status_code == 409
    detail = failed.json()["detail"]
    assert "could not reload" in detail and "tampered" in detail and "still serving the previous index (5 images)" in detail
    assert client.post("/api/search", json={"scenario": "live", "query": QUERIES[0], "top_k": 10}).json()["hits"] == hits
    shutil.rmtree(index)
    assert "does not exist" in client.post("/api/scenarios/live/reload").json()["detail"]
    assert client.get("/api/scenarios").json()[0]["images"] == 5


def test_reload_onto_another_adapter_drops_the_unused_model(tmp_path: Path, served: Served) -> None:
    index = served.root / f"index-{tmp_path.name}"  # beside the gallery: an index is read from the folder holding it
    shutil.copytree(served.index_a, index)
    scenarios = Scenarios([ScenarioSpec("s", index)])
    client = TestClient(create_app(scenarios))
    _index(served.adapter_c, served.gallery, index, lora_rank=4)
    assert client.post("/api/scenarios/s/reload").status_code == 200
    assert len(scenarios.models) == 1 and scenarios["s"].model.model.trainable_state_dict()[
        "clip.transformer.resblocks.0.attn.lora.key.lora_a"
    ].shape[0] == 4
    _assert_hits_equal(
        client.post("/api/search", json={"scenario": "s", "query": QUERIES[0], "top_k": 4}).json()["hits"],
        _expected_text(index, QUERIES[0], 4),
    )


# --- loading scenarios, CLI ---------------------------------------------------------------------------------


def test_scenario_specs_are_checked(tmp_path: Path, served: Served) -> None:
    with pytest.raises(ScenarioError, match="NAME=INDEX_DIR"):
        ScenarioSpec.parse("just-a-folder")
    with pytest.raises(ScenarioError, match="not allowed"):
        ScenarioSpec("../evil", served.index_a)
    with pytest.raises(ScenarioError, match="more than once"):
        Scenarios([ScenarioSpec("a", served.index_a), ScenarioSpec("a", served.index_b)])
    with pytest.raises(ScenarioError, match="scenario 'x'.*does not exist"):
        Scenarios([ScenarioSpec("x", tmp_path / "missing")])
    moved = tmp_path / "moved.safetensors"
    shutil.copy(served.adapter_c, moved)
    with pytest.raises(ScenarioError, match="not the one the index was built with"):
        Scenarios([ScenarioSpec("a", served.index_a, adapter=moved)])
    config = tmp_path / "conf" / "serve.yaml"
    config.parent.mkdir()
    config.write_text(f"- {{name: a, index: {served.index_a}}}\n- {{name: c, index: ../c-index, adapter: run/c.safetensors}}\n")
    assert read_scenario_file(config) == [
        ScenarioSpec("a", served.index_a),
        ScenarioSpec("c", config.parent / "../c-index", config.parent / "run/c.safetensors"),
    ]
    for text, message in [("{a: 1}", "YAML list"), ("- {name: a}", "needs 'index'"), ("- {name: a, index: x, port: 1}", "unknown key")]:
        config.write_text(text)
        with pytest.raises(ScenarioError, match=message):
            read_scenario_file(config)


def test_cli_serve_builds_the_app_and_hands_it_to_uvicorn(
    served: Served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    started = {}

    def fake_run(app: object, host: str, port: int, log_level: str) -> None:
        started.update(app=app, host=host, port=port)

    import uvicorn

    monkeypatch.setattr(uvicorn, "run", fake_run)
    monkeypatch.setenv("UPPERSON_TOKEN", TOKEN)
    config = tmp_path / "serve.yaml"
    config.write_text(f"- name: b\n  index: {served.index_b}\n")
    port = _free_port()
    argv = ["serve", "--scenario", f"a={served.index_a}", "--config", str(config), "--port", str(port), "--device", "cpu"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "2 scenario(s) on 1 model(s), 1 backbone(s)" in printed and f"http://127.0.0.1:{port}/" in printed and "token required" in printed
    assert started["port"] == port and f"http://127.0.0.1:{port}/openapi.json" in printed
    client = TestClient(started["app"])
    assert client.get("/api/scenarios").status_code == 401
    assert client.get("/api/scenarios", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert "reachable from other machines" not in caplog.text

    monkeypatch.delenv("UPPERSON_TOKEN")
    with caplog.at_level(logging.WARNING, logger="upperson.retrieval.serve"):
        assert main(["serve", "--scenario", f"a={served.index_a}", "--host", "0.0.0.0", "--port", str(_free_port()), "--device", "cpu"]) == 0
    assert "reachable from other machines" in caplog.text and "no --token" in caplog.text
    assert TestClient(started["app"]).get("/api/scenarios").status_code == 200

    assert main(["serve"]) == 1
    assert "give at least one --scenario" in capsys.readouterr().err
    assert main(["serve", "--scenario", f"a={tmp_path / 'none'}"]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "upperson serve: error: scenario 'a'" in error and "does not exist" in error


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_is_loopback() -> None:
    assert all(is_loopback(host) for host in ("127.0.0.1", "localhost", "::1", "[::1]", "127.1.2.3"))
    assert not any(is_loopback(host) for host in ("0.0.0.0", "::", "192.168.1.4", "example.org", ""))


def test_server_ranks_in_place_even_where_faiss_is_installed(served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    from upperson.retrieval import gallery

    def no_faiss(*args: object) -> None:
        raise AssertionError("the server must rank in place, not copy the gallery into a FAISS index per query")

    monkeypatch.setattr(gallery, "_faiss", lambda: object())
    monkeypatch.setattr(gallery, "_rank_faiss", no_faiss)
    assert len(served.scenarios["a"].search_text("a man", 3)) == 3
