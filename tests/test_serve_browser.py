"""The search page in a real browser: Debian's headless chromium driven by selenium against uvicorn.

The server runs in a background thread on a free port with a token, as `upperson serve` runs it.
The page must ask for the token, search on Enter, show the API's hits in the API's order, open a
hit in the larger view and search "more like this" with it.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from test_search import QUERIES, _save_run

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROMIUM_OPTIONS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1280,1000",
)
TOKEN = "browser-token"
WAIT_S = 90  # generous: the CI machine may be busy


def _missing() -> str | None:
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.is_file()]
    if missing:
        return f"{' and '.join(missing)} missing: install Debian's packages chromium chromium-driver (apt-get install chromium chromium-driver)"
    return None


if _missing():
    pytest.skip(_missing(), allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install 'upperson[test]')")
pytest.importorskip("uvicorn", reason="needs uvicorn (pip install 'upperson[serve]')")
httpx = pytest.importorskip("httpx")

import uvicorn  # noqa: E402
from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from test_serve import _gallery, _index  # noqa: E402
from upperson.retrieval.scenarios import ScenarioSpec  # noqa: E402
from upperson.retrieval.serve import create_app  # noqa: E402


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def base_url(tmp_path: Path) -> Iterator[str]:
    gallery = _gallery(tmp_path / "gallery")
    _, adapter = _save_run(tmp_path / "run", seed=1)
    app = create_app([ScenarioSpec("street", _index(adapter, gallery, tmp_path / "index"))], token=TOKEN)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=_free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + WAIT_S
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{server.config.port}"
    server.should_exit = True
    thread.join(timeout=30)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[object]:
    options = Options()
    options.binary_location = str(CHROMIUM)
    for argument in (*CHROMIUM_OPTIONS, f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(WAIT_S)
    yield driver
    driver.quit()


def _api(base_url: str, path: str, body: dict) -> list[tuple[str, str]]:
    response = httpx.post(f"{base_url}{path}", json=body, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=WAIT_S)
    assert response.status_code == 200, response.text
    return [(str(hit["row"]), hit["path"]) for hit in response.json()["hits"]]


def _shown(driver: object, source: str) -> list[tuple[str, str]]:
    """The grid's (row, path) in order, once the results of ``source`` and their thumbnails are in."""
    wait = WebDriverWait(driver, WAIT_S)
    results = driver.find_element(By.ID, "results")
    wait.until(lambda _: results.get_attribute("data-source") == source and results.get_attribute("data-thumbnails") == "loaded")
    return [(hit.get_attribute("data-row"), hit.get_attribute("data-path")) for hit in results.find_elements(By.CSS_SELECTOR, "button.hit")]


def test_page_searches_like_the_api(base_url: str, browser: object, tmp_path: Path) -> None:
    driver = browser
    wait = WebDriverWait(driver, WAIT_S)
    driver.get(f"{base_url}/")

    token = wait.until(lambda d: d.find_element(By.ID, "token") if d.find_element(By.ID, "token").is_displayed() else None)
    token.send_keys(TOKEN, Keys.ENTER)  # the page asked for the token: the server requires one
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#scenario option[value='street']"))
    assert not driver.find_element(By.ID, "token-form").is_displayed()

    top_k = driver.find_element(By.ID, "top-k")
    top_k.clear()
    top_k.send_keys("6")
    driver.find_element(By.ID, "query").send_keys(QUERIES[0], Keys.ENTER)
    shown = _shown(driver, f"text:{QUERIES[0]}")
    assert shown == _api(base_url, "/api/search", {"scenario": "street", "query": QUERIES[0], "top_k": 6})
    assert len(shown) == 6
    status = driver.find_element(By.ID, "status").text
    assert "6 results" in status and " ms" in status
    thumbnails = driver.find_elements(By.CSS_SELECTOR, "#results button.hit img")
    assert all(image.get_attribute("src").startswith("blob:") and image.get_attribute("naturalWidth") != "0" for image in thumbnails)

    first = driver.find_element(By.CSS_SELECTOR, "#results button.hit")
    first.send_keys(Keys.ENTER)  # grid items are buttons: the keyboard opens them
    viewer = driver.find_element(By.ID, "viewer")
    wait.until(lambda _: viewer.get_attribute("open") is not None)
    wait.until(lambda d: d.find_element(By.ID, "viewer-image").get_attribute("src").startswith("blob:"))
    assert shown[0][1] in driver.find_element(By.ID, "viewer-title").text
    driver.find_element(By.ID, "more-like-this").click()
    row = shown[0][0]
    similar = _shown(driver, f"row:{row}")
    assert similar == _api(base_url, "/api/search/image", {"scenario": "street", "row": int(row), "top_k": 6})
    assert row not in [hit_row for hit_row, _ in similar]
    assert viewer.get_attribute("open") is None

    upload = tmp_path / "gallery" / "p05.png"
    driver.find_element(By.ID, "image-file").send_keys(str(upload))  # what picking a file in the dialog does
    uploaded = _shown(driver, "upload:p05.png")
    response = httpx.post(
        f"{base_url}/api/search/image", data={"scenario": "street", "top_k": "6"}, files={"file": ("p05.png", upload.read_bytes())},
        headers={"Authorization": f"Bearer {TOKEN}"}, timeout=WAIT_S,
    )
    assert uploaded == [(str(hit["row"]), hit["path"]) for hit in response.json()["hits"]]
    assert uploaded[0][1] == "p05.png"  # its own copy in the gallery comes first

    screenshot = tmp_path / "search-page.png"
    assert driver.save_screenshot(str(screenshot))
    assert screenshot.stat().st_size > 1000 and screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gallery_files_never_run_as_pages_on_the_servers_origin(tmp_path: Path, browser: object) -> None:
    """A PNG with a script appended behind a .png symlink to payload.html, and an SVG swapped in later: no script runs."""
    import io

    from PIL import Image

    gallery = _gallery(tmp_path / "gallery", count=3)
    png = io.BytesIO()
    Image.new("RGB", (24, 48), (10, 120, 200)).save(png, "PNG")
    (gallery / "payload.html").write_bytes(png.getvalue() + b"<script>document.title='pwned'</script>")
    (gallery / "photo.png").symlink_to("payload.html")
    _, adapter = _save_run(tmp_path / "run", seed=1)
    app = create_app([ScenarioSpec("s", _index(adapter, gallery, tmp_path / "index"))])
    paths = app.state.scenarios["s"].index.paths
    (gallery / "drawing.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg"><script>document.title="pwned"</script></svg>')
    (gallery / "p01.png").unlink()
    (gallery / "p01.png").symlink_to("drawing.svg")
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=_free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + WAIT_S
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        for name in ("photo.png", "p01.png"):
            browser.get(f"http://127.0.0.1:{server.config.port}/api/images/s/{paths.index(name)}")
            time.sleep(0.5)  # give a script, if one ran, the time to run
            assert browser.title != "pwned", name
            assert browser.execute_script("return document.contentType") in ("image/png", "application/json"), name
    finally:
        server.should_exit = True
        thread.join(timeout=30)
