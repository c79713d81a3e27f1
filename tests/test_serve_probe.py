"""`upperson serve` under a security and bad-input probe (issue 16): hostile gallery files, hostile bodies, bad flags.

Every case here was a 500, a silent misconfiguration or a script running on the server's origin;
each is now a 4xx (or a refusal at startup) in one line that names the field.
"""

from __future__ import annotations

import io
import json
import os
import socket
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from test_search import _block_image, _save_run  # noqa: E402
from test_serve import _free_port, _gallery, _index  # noqa: E402
from upperson.cli import main  # noqa: E402
from upperson.retrieval import scenarios as scenarios_module  # noqa: E402
from upperson.retrieval import serve  # noqa: E402
from upperson.retrieval.gallery import INDEX_FILE  # noqa: E402
from upperson.retrieval.scenarios import Scenario, ScenarioError, Scenarios, ScenarioSpec, display_path, read_scenario_file  # noqa: E402
from upperson.retrieval.serve import create_app  # noqa: E402

TOKEN = "probe-token-0123"
POLYGLOT_SCRIPT = b"<script>document.title='pwned'</script>"
NON_UTF8_NAME = b"caf\xe9.png"
BIDI_NAME = "\u202egnp.exe.png"  # shows as "png.exe.png" reversed: a file name that lies about its type


def _png_bytes(width: int = 24, height: int = 48, colour: tuple[int, int, int] = (10, 120, 200)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(out, "PNG")
    return out.getvalue()


@dataclass
class Hostile:
    """A gallery with a PNG+HTML polyglot behind a .png symlink and a bidi-override name."""

    root: Path
    gallery: Path
    index: Path
    adapter: Path
    scenarios: Scenarios

    def row(self, path: str) -> int:
        index = self.scenarios["h"].index
        return index.rows[index.paths.index(path)]


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Hostile:
    root = tmp_path_factory.mktemp("hostile")
    gallery = _gallery(root / "gallery", count=4)
    (gallery / "payload.html").write_bytes(_png_bytes() + POLYGLOT_SCRIPT)
    (gallery / "photo.png").symlink_to("payload.html")
    _block_image(gallery / BIDI_NAME, 6)
    _, adapter = _save_run(root / "run", seed=1)
    index = _index(adapter, gallery, root / "index")
    return Hostile(root, gallery, index, adapter, Scenarios([ScenarioSpec("h", index)]))


@pytest.fixture(scope="module")
def client(hostile: Hostile) -> TestClient:
    return TestClient(create_app(hostile.scenarios), raise_server_exceptions=False)


@pytest.fixture(scope="module")
def guarded(hostile: Hostile) -> TestClient:
    return TestClient(create_app(hostile.scenarios, token=TOKEN), raise_server_exceptions=False)


def _small_index(hostile: Hostile, tmp_path: Path) -> tuple[Path, Path]:
    gallery = _gallery(tmp_path / "gallery", count=3)
    return gallery, _index(hostile.adapter, gallery, tmp_path / "index")


def _assert_guarded(response) -> None:
    headers = response.headers
    assert headers["x-content-type-options"] == "nosniff", response.request.url
    assert headers["referrer-policy"] == "no-referrer" and headers["cross-origin-resource-policy"] == "same-origin"
    assert "frame-ancestors 'none'" in headers["content-security-policy"]


# --- row 1: gallery files are served by their decoded format, with nosniff and a sandboxing CSP -------------


def test_png_html_polyglot_behind_a_png_symlink_is_served_as_png_not_html(hostile: Hostile, client: TestClient) -> None:
    response = client.get(f"/api/images/h/{hostile.row('photo.png')}")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"  # decoded by Pillow, not guessed from payload.html
    assert response.content == (hostile.gallery / "payload.html").read_bytes()
    _assert_guarded(response)
    policy = response.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "sandbox" in policy  # even a sniffing client could run nothing


@pytest.mark.parametrize(
    ("target", "data"),
    [
        ("drawing.svg", b'<svg xmlns="http://www.w3.org/2000/svg"><script>document.title="pwned"</script></svg>'),
        ("page.html", b"<html><script>document.title='pwned'</script></html>"),
        ("page.gif.html", b"GIF89a<script>document.title='pwned'</script>"),
    ],
)
def test_gallery_file_that_is_no_raster_image_is_415_never_html_or_svg(hostile: Hostile, tmp_path: Path, target: str, data: bytes) -> None:
    gallery, index = _small_index(hostile, tmp_path)
    client = TestClient(create_app([ScenarioSpec("s", index)]), raise_server_exceptions=False)
    index = client.app.state.scenarios["s"].index
    row = index.rows[index.paths.index("p01.png")]
    (gallery / target).write_bytes(data)
    (gallery / "p01.png").unlink()
    (gallery / "p01.png").symlink_to(target)  # swapped in after indexing, inside the gallery
    response = client.get(f"/api/images/s/{row}")
    assert response.status_code == 415, response.text
    assert "not a JPEG, PNG, WebP, BMP or GIF image" in response.json()["detail"]
    assert response.headers["content-type"] == "application/json"
    thumbnail = client.get(f"/api/images/s/{row}/thumbnail")
    assert thumbnail.status_code == 415 and thumbnail.headers["content-type"] == "application/json"
    _assert_guarded(response)


def test_every_response_carries_the_security_headers(hostile: Hostile, client: TestClient, guarded: TestClient, monkeypatch) -> None:
    small = TestClient(create_app(hostile.scenarios, max_upload_bytes=100), raise_server_exceptions=False)
    responses = [
        client.get("/"),
        client.get("/static/app.js"),
        client.get("/api/health"),
        client.get("/api/scenarios"),
        client.get("/api/images/h/0/thumbnail"),
        client.get("/api/images/h/999"),
        client.get("/api/nothing"),
        client.post("/api/search", json={"scenario": "h", "query": ""}),
        small.post("/api/search", content=b"x" * 200, headers={"content-type": "application/json"}),
        guarded.get("/api/health"),
        guarded.get("/openapi.json"),
    ]
    monkeypatch.setattr(Scenario, "describe", lambda self: 1 / 0)
    crashed = client.get("/api/scenarios")
    assert crashed.status_code == 500
    for response in [*responses, crashed]:
        _assert_guarded(response)
    assert "default-src 'self'" in responses[0].headers["content-security-policy"]  # the page keeps its own policy
    assert "sandbox" in responses[2].headers["content-security-policy"]


# --- row 2 and 20: tokens ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("token", "message"),
    [
        ("", "token is empty"),
        ("   ", "token is empty"),
        ("pässwort-secret", "printable ASCII"),
        ("two words", "printable ASCII"),
        ("tab\there", "printable ASCII"),
    ],
)
def test_empty_or_unsendable_tokens_are_refused(hostile: Hostile, token: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        create_app(hostile.scenarios, token=token)


def test_cli_refuses_an_empty_token_from_the_flag_or_the_variable(hostile: Hostile, monkeypatch, capsys) -> None:
    def no_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(scenarios_module.Scenarios, "__init__", no_load)
    argv = ["serve", "--scenario", f"h={hostile.index}", "--device", "cpu", "--port", str(_free_port())]
    for extra, environment, message in [
        (["--token", ""], None, "--token is empty"),
        ([], "", "UPPERSON_TOKEN is empty"),
        (["--token", "naïve-token"], None, "--token must be printable ASCII"),
    ]:
        if environment is None:
            monkeypatch.delenv("UPPERSON_TOKEN", raising=False)
        else:
            monkeypatch.setenv("UPPERSON_TOKEN", environment)
        assert main([*argv, *extra]) == 1
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and message in error and "internal error" not in error, error


# --- row 4: uploads bounded in pixels and in concurrent decoding memory --------------------------------------


def _png_of_size(width: int, height: int) -> bytes:
    """A valid all-black RGB PNG, written row by row so the test never holds its pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor = zlib.compressobj(9)
    row = bytes(1 + 3 * width)
    pixels = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def _upload(client: TestClient, data: bytes, name: str = "query.png", top_k: int = 2):
    return client.post(
        "/api/search/image", data={"scenario": "h", "top_k": str(top_k)}, files={"file": (name, data, "application/octet-stream")}
    )


def test_9000x9000_png_under_the_bomb_limit_is_refused_by_the_pixel_limit_before_decoding(client: TestClient, monkeypatch) -> None:
    data = _png_of_size(9000, 9000)
    assert len(data) < 300_000 and 9000 * 9000 < Image.MAX_IMAGE_PIXELS  # small, and Pillow alone would decode it
    decoded = []
    monkeypatch.setattr(serve, "to_rgb", lambda image: decoded.append(image) or image)
    response = _upload(client, data)
    assert response.status_code == 422
    assert "9000x9000 pixels, over the upload limit of 40,000,000 pixels" in response.json()["detail"]
    assert decoded == []


def test_concurrent_decodes_stay_within_the_memory_budget_and_the_rest_get_503(hostile: Hostile, monkeypatch) -> None:
    data = _png_bytes(200, 200)
    cost = 200 * 200 * serve.DECODE_BYTES_PER_PIXEL
    inside, most = 0, 0
    lock = threading.Lock()
    real_to_rgb = serve.to_rgb

    def slow_to_rgb(image: Image.Image) -> Image.Image:
        nonlocal inside, most
        with lock:
            inside += 1
            most = max(most, inside)
        time.sleep(0.3)
        with lock:
            inside -= 1
        return real_to_rgb(image)

    monkeypatch.setattr(serve, "to_rgb", slow_to_rgb)
    impatient = TestClient(create_app(hostile.scenarios, decode_memory_bytes=cost, decode_wait_s=0.05), raise_server_exceptions=False)
    with ThreadPoolExecutor(max_workers=6) as pool:
        responses = list(pool.map(lambda _: _upload(impatient, data), range(6)))
    statuses = sorted(response.status_code for response in responses)
    assert most == 1 and 200 in statuses and 503 in statuses and set(statuses) == {200, 503}, statuses
    busy = next(response for response in responses if response.status_code == 503)
    assert busy.headers["retry-after"].isdigit() and "busy decoding other images" in busy.json()["detail"]

    most = 0
    patient = TestClient(create_app(hostile.scenarios, decode_memory_bytes=2 * cost, decode_wait_s=30), raise_server_exceptions=False)
    with ThreadPoolExecutor(max_workers=6) as pool:
        statuses = [response.status_code for response in pool.map(lambda _: _upload(patient, data), range(6))]
    assert statuses == [200] * 6 and most == 2


def test_large_uploads_are_reduced_while_decoding(hostile: Hostile, client: TestClient, monkeypatch) -> None:
    decoded, encoded = [], []
    real_to_rgb, real_search = serve.to_rgb, Scenario.search_image
    monkeypatch.setattr(serve, "to_rgb", lambda image: decoded.append(image.size) or real_to_rgb(image))
    monkeypatch.setattr(Scenario, "search_image", lambda self, image, top_k: encoded.append(image.size) or real_search(self, image, top_k))
    height, width = hostile.scenarios["h"].image_size
    jpeg = io.BytesIO()
    Image.new("RGB", (4000, 8000), (200, 30, 30)).save(jpeg, "JPEG", quality=80)
    assert _upload(client, jpeg.getvalue(), "big.jpg").status_code == 200
    assert _upload(client, _png_of_size(2000, 4000), "big.png").status_code == 200
    assert _upload(client, _png_bytes(24, 48)).status_code == 200
    assert decoded == [(500, 1000), (2000, 4000), (24, 48)]  # JPEG decodes at 1/8 scale (draft); PNG has no such mode
    for size in encoded[:2]:  # then reduced by a whole factor while at least twice the model's input
        assert 2 * width <= size[0] < 4 * width and 2 * height <= size[1] < 4 * height, size
    assert encoded[2] == (24, 48)  # an image near the model's size is encoded as it is


# --- row 5 and 20: file names JSON cannot carry, or that lie on screen ----------------------------------------


def test_display_path_escapes_undecodable_bytes_and_invisible_controls() -> None:
    assert display_path("sub/p01.png") == "sub/p01.png"
    assert display_path(os.fsdecode(NON_UTF8_NAME)) == "caf\\xe9.png"
    assert display_path(BIDI_NAME) == "\\u202egnp.exe.png"
    assert display_path("a\u200bb\u2066c\x00d\x1be\u2028f.png") == "a\\u200bb\\u2066c\\x00d\\x1be\\u2028f.png"
    assert display_path("Zoë/日本.png") == "Zoë/日本.png"
    json.dumps(display_path("\udcff\ud800"), ensure_ascii=False).encode("utf-8")  # encodable


def test_undecodable_and_bidi_file_names_are_hits_with_a_safe_display_form(hostile: Hostile) -> None:
    undecodable = os.fsdecode(NON_UTF8_NAME)
    Path(hostile.gallery / undecodable).write_bytes((hostile.gallery / "p01.png").read_bytes())
    scenarios = Scenarios([ScenarioSpec("h", hostile.index)])
    index = scenarios["h"].index
    # as an index holds it where the indexer recorded the name (a loader may also refuse such an index as tampered)
    index.paths[index.paths.index("p01.png")] = undecodable
    client = TestClient(create_app(scenarios), raise_server_exceptions=False)
    row_of = {path: row for path, row in zip(index.paths, index.rows)}
    odd = {row_of[undecodable]: "caf\\xe9.png", row_of[BIDI_NAME]: "\\u202egnp.exe.png"}
    text = client.post("/api/search", json={"scenario": "h", "query": "a person", "top_k": 100})
    plain = next(row for row in index.rows if row not in odd)
    rows = client.post("/api/search/image", json={"scenario": "h", "row": plain, "top_k": 100})
    upload = _upload(client, _png_bytes(), top_k=100)
    for response in (text, rows, upload):
        assert response.status_code == 200, response.text
        paths = {hit["row"]: hit["path"] for hit in response.json()["hits"]}
        assert {row: paths.get(row) for row in odd} == odd, (response.request.url, paths)
    for row in odd:
        for url in (f"/api/images/h/{row}", f"/api/images/h/{row}/thumbnail"):
            assert client.get(url).status_code == 200, url  # the server still finds the file by its row
    more = client.post("/api/search/image", json={"scenario": "h", "row": row_of[undecodable], "top_k": 3})
    assert more.status_code == 200


def test_uploaded_file_name_is_echoed_in_its_display_form(client: TestClient) -> None:
    response = _upload(client, _png_bytes(), name="\u202egnp.exe.png")
    assert response.status_code == 200 and response.json()["filename"] == "\\u202egnp.exe.png"


# --- row 6 and 18: bodies that do not parse, and the token before the body -------------------------------------


UNPARSABLE = [
    (b'{"scenario": "h", "query": "\xff\xfe"}', "not UTF-8"),
    (b"[" * 100_000, "nested too deeply"),
    (b'{"scenario": "h", "query": "a man", "top_k": ' + b"7" * 5000 + b"}", "not valid JSON"),
    (b"{not json", "not valid JSON"),
]


@pytest.mark.parametrize(("body", "message"), UNPARSABLE)
@pytest.mark.parametrize("route", ["/api/search", "/api/search/image"])
def test_unparsable_json_bodies_are_422(client: TestClient, route: str, body: bytes, message: str) -> None:
    response = client.post(route, content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert message in detail and "\n" not in detail and len(detail) < 300


@pytest.mark.parametrize(("body", "message"), UNPARSABLE)
def test_the_token_is_checked_before_the_body_is_read(guarded: TestClient, body: bytes, message: str) -> None:
    for route in ("/api/search", "/api/search/image"):
        response = guarded.post(route, content=body, headers={"content-type": "application/json"})
        assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer", response.text
        authorised = guarded.post(route, content=body, headers={"content-type": "application/json", "Authorization": f"Bearer {TOKEN}"})
        assert authorised.status_code == 422 and message in authorised.json()["detail"]
    upload = guarded.post("/api/search/image", data={"scenario": "h"}, files={"file": ("x.png", _png_bytes())})
    assert upload.status_code == 401


def test_token_is_required_on_unknown_api_paths_too(guarded: TestClient) -> None:
    assert guarded.get("/api/nothing").status_code == 401
    assert guarded.get("/api/nothing", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 404


def test_search_body_must_be_declared_json(client: TestClient) -> None:
    body = json.dumps({"scenario": "h", "query": "a man"}).encode()
    response = client.post("/api/search", content=body, headers={"content-type": "text/plain"})  # a cross-site form could send this
    assert response.status_code == 415 and "application/json" in response.json()["detail"]


@pytest.fixture
def real_server(hostile: Hostile) -> Iterator[str]:
    uvicorn = pytest.importorskip("uvicorn")
    server = uvicorn.Server(uvicorn.Config(create_app(hostile.scenarios), host="127.0.0.1", port=_free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{server.config.port}"
    server.should_exit = True
    thread.join(timeout=30)


def test_real_server_answers_hostile_bodies_and_keeps_the_connection(real_server: str) -> None:
    httpx = pytest.importorskip("httpx")
    with httpx.Client(base_url=real_server, timeout=60) as http:
        for body, _ in UNPARSABLE:
            for route in ("/api/search", "/api/search/image"):
                response = http.post(route, content=body, headers={"content-type": "application/json"})
                assert response.status_code == 422, (route, response.text)
                followed = http.post("/api/search", json={"scenario": "h", "query": "a man", "top_k": 1})
                assert followed.status_code == 200  # the same keep-alive connection still works


# --- row 7 and 8: files that vanish, index paths no file system takes ----------------------------------------


def test_image_deleted_between_the_row_check_and_the_response_is_404(hostile: Hostile, tmp_path: Path, monkeypatch) -> None:
    gallery, index = _small_index(hostile, tmp_path)
    client = TestClient(create_app([ScenarioSpec("s", index)]), raise_server_exceptions=False)
    real = Scenario.image_file

    def checked_then_deleted(self: Scenario, row: int) -> Path:
        path = real(self, row)
        path.unlink(missing_ok=True)
        return path

    monkeypatch.setattr(Scenario, "image_file", checked_then_deleted)
    for row, suffix in ((0, ""), (1, "/thumbnail")):
        response = client.get(f"/api/images/s/{row}{suffix}")
        assert response.status_code == 404, response.text
        assert "is no longer in the gallery" in response.json()["detail"]


@pytest.mark.parametrize("bad", ["p01.png\u0000.png", "p01\n.png", "p01.png\x1b[2J"])
def test_index_path_with_control_characters_is_404_never_500(hostile: Hostile, bad: str) -> None:
    scenarios = Scenarios([ScenarioSpec("h", hostile.index)])
    scenarios["h"].index.paths[1] = bad  # as if index.json said so (the index loader refuses such files as tampered)
    client = TestClient(create_app(scenarios), raise_server_exceptions=False)
    for url in ("/api/images/h/1", "/api/images/h/1/thumbnail"):
        response = client.get(url)
        assert response.status_code == 404, response.text
        assert "control characters" in response.json()["detail"] and "\n" not in response.json()["detail"]
    hits = client.post("/api/search", json={"scenario": "h", "query": "a man", "top_k": 100})
    assert hits.status_code == 200 and display_path(bad) in [hit["path"] for hit in hits.json()["hits"]]


# --- row 9: an index that cannot be read is 409 on reload and one line at startup ------------------------------


def _tamper(index: Path, change) -> None:
    payload = json.loads((index / INDEX_FILE).read_text())
    (index / INDEX_FILE).write_text(change(payload))


TAMPERED = [
    (lambda payload: "[" * 100_000, "index.json"),
    (lambda payload: json.dumps({**payload, "metadata": {**payload["metadata"], "image_size": [100000, 100000]}}), "image_size"),
    (lambda payload: json.dumps({**payload, "metadata": {**payload["metadata"], "image_size": [64]}}), "image_size"),
    (lambda payload: json.dumps({**payload, "metadata": {k: v for k, v in payload["metadata"].items() if k != "method"}}), "method"),
]


@pytest.mark.parametrize(("change", "field"), TAMPERED)
def test_reload_of_an_unreadable_index_is_409_in_one_line(hostile: Hostile, tmp_path: Path, change, field: str) -> None:
    _, index = _small_index(hostile, tmp_path)
    client = TestClient(create_app([ScenarioSpec("s", index)]), raise_server_exceptions=False)
    _tamper(index, change)
    response = client.post("/api/scenarios/s/reload")
    assert response.status_code == 409, response.text
    detail = response.json()["detail"]
    assert "\n" not in detail and field in detail and "still serving the previous index (3 images)" in detail
    assert client.post("/api/search", json={"scenario": "s", "query": "a man", "top_k": 2}).status_code == 200


@pytest.mark.parametrize(("change", "field"), TAMPERED)
def test_serve_startup_on_an_unreadable_index_is_one_line(hostile: Hostile, tmp_path: Path, capsys, change, field: str) -> None:
    _, index = _small_index(hostile, tmp_path)
    _tamper(index, change)
    assert main(["serve", "--scenario", f"s={index}", "--device", "cpu", "--port", str(_free_port())]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "internal error" not in error and "scenario 's'" in error and field in error, error


# --- row 15: serve.yaml is read as strictly as training configs ------------------------------------------------


def test_serve_yaml_with_a_key_written_twice_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "serve.yaml"
    config.write_text("- {name: a, index: X, index: Y}\n")
    with pytest.raises(ScenarioError, match=r"serve.yaml.*key 'index' is written twice"):
        read_scenario_file(config)
    config.write_text("- name: a\n  index: X\n  name: b\n")
    with pytest.raises(ScenarioError, match="key 'name' is written twice"):
        read_scenario_file(config)
    config.write_text("- {name: a, index: X, adapter: Z}\n")
    assert read_scenario_file(config) == [ScenarioSpec("a", tmp_path / "X", tmp_path / "Z")]


# --- row 17: every bad flag is one line before any model loads --------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--port", "70000"], "--port 70000: must be 1 to 65535"),
        (["--port", "0"], "--port 0: must be 1 to 65535"),
        (["--device", "tpu"], "--device 'tpu'"),
        (["--device", "cuda:99"], "--device 'cuda:99'"),
        (["--device", "meta"], "--device 'meta'"),
        (["--host", "not a host!"], "--host 'not a host!'"),
        (["--host", ""], "--host ''"),
        (["--host", "999.1.1.1"], "--host '999.1.1.1'"),
        (["--threads", "0"], "--threads must be >= 1"),
    ],
)
def test_bad_serve_flags_are_one_line_before_any_model_loads(hostile: Hostile, monkeypatch, capsys, flags: list[str], message: str) -> None:
    def no_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(scenarios_module.Scenarios, "__init__", no_load)
    monkeypatch.delenv("UPPERSON_TOKEN", raising=False)
    argv = ["serve", "--scenario", f"h={hostile.index}", "--device", "cpu", "--port", str(_free_port()), *flags]
    assert main(argv) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and message in error and "internal error" not in error, error


def test_a_port_in_use_is_refused_before_any_model_loads(hostile: Hostile, monkeypatch, capsys) -> None:
    monkeypatch.setattr(scenarios_module.Scenarios, "__init__", lambda *args, **kwargs: pytest.fail("models loaded"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--scenario", f"h={hostile.index}", "--device", "cpu", "--port", str(port)]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and f"cannot listen on 127.0.0.1:{port}" in error, error


# --- row 20: invisible queries, no docs UI from a CDN -------------------------------------------------------------


@pytest.mark.parametrize("query", ["\u200b\u200b", "\x00", "\u200e\u202e \u2060", "\ufeff\t"])
def test_queries_without_a_visible_character_are_empty(client: TestClient, query: str) -> None:
    response = client.post("/api/search", json={"scenario": "h", "query": query})
    assert response.status_code == 422 and "query: the query is empty" in response.json()["detail"]


def test_no_docs_ui_that_loads_a_cdn(client: TestClient) -> None:
    for url in ("/docs", "/redoc", "/docs/oauth2-redirect"):
        assert client.get(url).status_code == 404, url
    schema = client.get("/openapi.json")
    assert schema.status_code == 200 and "/api/search" in schema.json()["paths"]
    assert "cdn" not in schema.text.lower()
