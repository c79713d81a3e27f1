"""``upperson serve``: a search API (FastAPI) and a search page over gallery indexes ("scenarios").

Routes (the OpenAPI schema at ``/openapi.json``; no docs UI, whose Swagger/ReDoc pages load scripts and
fonts from a CDN):

* ``POST /api/search`` ``{"scenario", "query", "top_k"}``: text → image.
* ``POST /api/search/image``: image → image, either ``{"scenario", "row", "top_k"}`` ("more like this"
  indexed row, itself left out) or multipart ``scenario``, ``top_k``, ``file`` (an uploaded image,
  encoded with the scenario's model).
* ``GET /api/images/{scenario}/{row}`` and ``.../thumbnail``: an indexed image by its row, never by
  a path from the client; the file must still resolve inside the gallery root, and is served as the
  raster format Pillow decodes it as (JPEG, PNG, WebP, BMP, GIF), never by its name: anything else
  (HTML, SVG, ...) is 415.
* ``GET /api/scenarios``, ``POST /api/scenarios/{name}/reload``, ``GET /api/health``.

A ``row`` (in a request, a URL or a hit) is the image's stable row id in the scenario's index
(:meth:`~upperson.retrieval.gallery.GalleryIndex.position`), not its place in the index: after the folder
is re-indexed and the scenario reloaded, a row still names the same image, and a row whose image was
removed is 404 ("was removed from the gallery"), never another image.
* ``GET /``: the page (static files of this package, nothing from the internet).

With a token, every path but the page, its files and ``/openapi.json`` needs ``Authorization: Bearer
<token>`` (compared in constant time), checked before anything reads the request body; the page asks
for the token. Every response carries ``X-Content-Type-Options: nosniff``, ``Referrer-Policy:
no-referrer``, ``Cross-Origin-Resource-Policy: same-origin`` and a Content-Security-Policy (the page's
allows its own files; the API's allows nothing and sandboxes). Bad input gets a 4xx JSON ``{"detail":
"..."}`` in one line that says what is wrong; a bug gets a 500 with the same shape and the traceback
goes to the server log only. File names are shown in :func:`~upperson.retrieval.scenarios.display_path`
form (undecodable bytes and invisible controls escaped).
"""

from __future__ import annotations

import hmac
import io
import ipaddress
import json
import logging
import math
import os
import re
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.security import HTTPBearer
from fastapi.staticfiles import StaticFiles
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from upperson.data.datasets import IMAGE_ERRORS, to_rgb
from upperson.retrieval.gallery import MissingRowError
from upperson.retrieval.scenarios import (
    Hit,
    MissingImageError,
    Scenario,
    ScenarioError,
    Scenarios,
    ScenarioSpec,
    UnknownScenarioError,
    display_path,
)
from upperson.version import __version__

logger = logging.getLogger(__name__)

MAX_TOP_K = 1000
"""Most hits one request may ask for."""
MAX_QUERY_CHARS = 1000
"""Longest text query accepted (the text encoder reads 77 tokens, roughly 300 characters, anyway)."""
MAX_UPLOAD_BYTES = 20 * 2**20
"""Largest request body (an uploaded image and its form fields): 20 MiB."""
MAX_UPLOAD_PIXELS = 40_000_000
"""Most pixels an uploaded image may declare (a 79 KB PNG can declare 9000x9000, 81 million); larger are refused
before decoding."""
DECODE_MEMORY_BYTES = 2**30
"""Memory that concurrent image decodes (uploads and thumbnails) may hold together: 1 GiB, three of the largest uploads."""
DECODE_BYTES_PER_PIXEL = 8
"""Estimated decode memory per pixel of an 8-bit image: the decoded pixels (up to 4 bytes) and their RGB copy."""
_WIDE_BYTES_PER_PIXEL = 24
"""The same for 16/32-bit grey and float images (``I``, ``I;16``, ``F``), which :func:`to_rgb` scales through numpy."""
DECODE_WAIT_S = 2.0
"""How long a decode waits for memory before the request is refused as busy (503 with ``Retry-After``)."""
THUMBNAIL_SIZE = (192, 384)
"""Thumbnails fit in this ``(width, height)``, aspect kept."""
UPLOAD_FORMATS = ("JPEG", "PNG", "BMP", "WEBP", "GIF", "TIFF")
"""Pillow formats accepted for uploads (JPEG includes phones' multi-picture MPO files); others are refused
(EPS, for one, would run Ghostscript)."""
GALLERY_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF")
"""Pillow formats a gallery file is served (and thumbnailed) as: raster formats browsers show. Anything else
(HTML, SVG, a script named .png) is refused with 415."""
_MEDIA_TYPES = {"JPEG": "image/jpeg", "MPO": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "BMP": "image/bmp", "GIF": "image/gif"}
"""The Content-Type by the format Pillow identifies a file as, never by its name (JPEG opens multi-picture files as MPO)."""
STATIC_DIR = Path(__file__).with_name("static")
_PUBLIC_PATHS = frozenset({"/", "/openapi.json"})
"""Paths (besides ``/static/...``) served without the token: the page, which asks for it, and the API schema."""
_PAGE_CSP = "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
_API_CSP = "default-src 'none'; frame-ancestors 'none'; sandbox"
"""For everything but the page: no scripts, styles or frames, and a sandbox even if a client rendered a response."""
_TOKEN = re.compile(r"[\x21-\x7e]+")
"""What a token may hold: printable ASCII without spaces, the characters an Authorization header carries as they are."""
_CHUNK_BYTES = 2**16


class TextSearch(BaseModel):
    """A text query."""

    model_config = ConfigDict(extra="forbid")
    scenario: str
    query: str = Field(max_length=MAX_QUERY_CHARS, description="what the person looks like")
    top_k: int = Field(10, ge=1, le=MAX_TOP_K, description="hits wanted (fewer if the gallery is smaller)")

    @field_validator("query")
    @classmethod
    def _not_blank(cls, query: str) -> str:
        if not any(char.isprintable() and not char.isspace() for char in query):  # only spaces, NUL, zero-width, bidi marks
            raise ValueError("the query is empty; describe the person, e.g. 'a woman in a red coat'")
        return query


class RowSearch(BaseModel):
    """More like an indexed image."""

    model_config = ConfigDict(extra="forbid")
    scenario: str
    row: int = Field(ge=0, description="the image's stable row id in the scenario's index (a hit's 'row')")
    top_k: int = Field(10, ge=1, le=MAX_TOP_K)


class UploadSearch(BaseModel):
    """The form fields of an image upload."""

    scenario: str
    top_k: int = Field(10, ge=1, le=MAX_TOP_K)


class HitOut(BaseModel):
    row: int = Field(description="the image's stable row id: the same image after re-indexing, never another one")
    score: float
    path: str = Field(
        description="relative to the gallery root, for display: undecodable bytes and control/bidi characters escaped "
        "(\\xNN, \\uNNNN); fetch the file by row"
    )
    width: int | None
    height: int | None


class TextSearchOut(BaseModel):
    scenario: str
    query: str
    top_k: int
    took_ms: float
    hits: list[HitOut]


class ImageSearchOut(BaseModel):
    scenario: str
    row: int | None = Field(description="the indexed image searched with, or null for an upload")
    filename: str | None = Field(description="the uploaded file's name (display form), or null for a row")
    top_k: int
    took_ms: float
    hits: list[HitOut]


_TEXT_SEARCH_BODY = {"required": True, "content": {"application/json": {"schema": TextSearch.model_json_schema()}}}
_IMAGE_SEARCH_BODY = {
    "required": True,
    "content": {
        "application/json": {"schema": RowSearch.model_json_schema()},
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["scenario", "file"],
                "properties": {
                    "scenario": {"type": "string"},
                    "top_k": {"type": "integer", "default": 10, "minimum": 1, "maximum": MAX_TOP_K},
                    "file": {"type": "string", "format": "binary", "description": f"an image, at most {MAX_UPLOAD_BYTES // 2**20} MiB"},
                },
            }
        },
    },
}


def create_app(
    scenarios: Scenarios | list[ScenarioSpec],
    token: str | None = None,
    *,
    device: str = "cpu",
    max_upload_bytes: int = MAX_UPLOAD_BYTES,
    max_upload_pixels: int = MAX_UPLOAD_PIXELS,
    decode_memory_bytes: int = DECODE_MEMORY_BYTES,
    decode_wait_s: float = DECODE_WAIT_S,
) -> FastAPI:
    """The API and page over ``scenarios``.

    Args:
        scenarios: loaded scenarios, or specs to load on ``device``.
        token: if given, every path but the page and the schema requires ``Authorization: Bearer <token>``
            (:func:`check_token`: not empty, printable ASCII).
        max_upload_bytes: largest request body; larger ones get 413.
        max_upload_pixels: most pixels an uploaded image may declare; more get 422 before decoding.
        decode_memory_bytes: memory concurrent decodes may hold together (:class:`DecodeBudget`).
        decode_wait_s: how long a decode waits for that memory before the request gets 503.
    """
    if token is not None:
        check_token(token)
    if not isinstance(scenarios, Scenarios):
        scenarios = Scenarios(scenarios, device=device)
    app = FastAPI(
        title="upperson",
        version=__version__,
        description="Text-based person retrieval over indexed galleries (one frozen CLIP, an adapter per scenario).",
        docs_url=None,  # Swagger UI and ReDoc load their scripts and fonts from a CDN: /openapi.json only
        redoc_url=None,
    )
    app.state.scenarios = scenarios
    app.state.token_required = token is not None
    app.add_middleware(_BodyLimit, max_bytes=max_upload_bytes)
    if token is not None:
        app.add_middleware(_TokenCheck, token=token)
    app.add_middleware(_SecurityHeaders)
    _add_error_handlers(app)
    # the bearer scheme only documents the token in the schema: _TokenCheck enforces it before any body is read
    documented = [Depends(HTTPBearer(auto_error=False, description="the token `upperson serve` was started with"))] if token else []
    budget = DecodeBudget(decode_memory_bytes, decode_wait_s)
    app.include_router(_api(scenarios, max_upload_bytes, max_upload_pixels, budget), prefix="/api", dependencies=documented)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def check_token(token: str, name: str = "token") -> None:
    """Refuse a token that would protect nothing (empty) or that clients cannot send as it is (not printable ASCII).

    Raises:
        ValueError: naming ``name`` (the flag or variable it came from) and the fix.
    """
    example = "e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))'"
    if not token.strip():
        raise ValueError(f"{name} is empty, which would protect nothing: give a secret ({example}) or none to serve without one")
    if not _TOKEN.fullmatch(token):
        raise ValueError(f"{name} must be printable ASCII without spaces, as an Authorization header carries it ({example})")


def run_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve ``app`` with uvicorn until interrupted; warns when ``host`` is reachable from other machines."""
    import uvicorn

    if not is_loopback(host):
        unprotected = "" if app.state.token_required else "; no --token is set, so anyone who can reach it can search the galleries"
        logger.warning("binding %s: the API is reachable from other machines%s", host, unprotected)
    uvicorn.run(app, host=host, port=port, log_level=log_level)


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine (``localhost``, 127.x, ``::1``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # another host name: it may resolve to any interface
        return False


class DecodeBudget:
    """Bytes of memory that image decodes running at the same time may hold together.

    A decode reserves its estimated memory (:func:`_decode_cost`, read from the header, after any JPEG draft)
    and waits up to ``wait_s`` for it; one that does not get it is refused with 503 and ``Retry-After``. A
    single decode larger than the whole budget runs alone.
    """

    def __init__(self, max_bytes: int, wait_s: float) -> None:
        if max_bytes < 1:
            raise ValueError(f"decode_memory_bytes must be >= 1, got {max_bytes}")
        self.max_bytes = max_bytes
        self.wait_s = wait_s
        self._free = max_bytes
        self._changed = threading.Condition()

    @contextmanager
    def reserve(self, cost: int) -> Iterator[None]:
        cost = min(cost, self.max_bytes)
        with self._changed:
            if not self._changed.wait_for(lambda: self._free >= cost, timeout=self.wait_s):
                retry_after = str(max(1, math.ceil(self.wait_s)))
                raise HTTPException(503, "the server is busy decoding other images; retry shortly", headers={"Retry-After": retry_after})
            self._free -= cost
        try:
            yield
        finally:
            with self._changed:
                self._free += cost
                self._changed.notify_all()


def _api(scenarios: Scenarios, max_upload_bytes: int, max_upload_pixels: int, budget: DecodeBudget) -> APIRouter:
    api = APIRouter()
    thumbnails = _Thumbnails(budget)

    @api.get("/health")
    def health() -> dict[str, Any]:
        """Liveness, and how many scenarios and models are in memory."""
        return {"status": "ok", "version": __version__, "scenarios": len(scenarios), "models": len(scenarios.models)}

    @api.get("/scenarios")
    def list_scenarios() -> list[dict[str, Any]]:
        """The served scenarios: name, image count, method, backbone and adapter."""
        return [scenario.describe() for scenario in scenarios]

    @api.post("/scenarios/{name}/reload")
    def reload(name: str) -> dict[str, Any]:
        """Re-read a scenario's index (and adapter) from disk; on failure the old one keeps serving (409)."""
        try:
            return scenarios.reload(name).describe()
        except ScenarioError as error:
            served = scenarios[name]
            raise HTTPException(
                409, f"could not reload: {_one_line(str(error))}; still serving the previous index ({len(served.index)} images)"
            ) from error

    @api.post("/search", response_model=TextSearchOut, openapi_extra={"requestBody": _TEXT_SEARCH_BODY})
    async def search(request: Request) -> dict[str, Any]:
        """The scenario's gallery ranked for a text description (a JSON body, ``Content-Type: application/json``)."""
        if _content_type(request) != "application/json":
            raise HTTPException(415, "send the search as JSON {scenario, query, top_k} with Content-Type: application/json")
        body = _validated(TextSearch, await _json(request))
        return await run_in_threadpool(_search_text, scenarios[body.scenario], body)

    @api.post("/search/image", response_model=ImageSearchOut, openapi_extra={"requestBody": _IMAGE_SEARCH_BODY})
    async def search_image(request: Request) -> dict[str, Any]:
        """The gallery ranked by similarity to an indexed image (JSON with ``row``) or an uploaded one (multipart)."""
        content_type = _content_type(request)
        if content_type == "application/json":
            body = _validated(RowSearch, await _json(request))
            return await run_in_threadpool(_search_row, scenarios[body.scenario], body)
        if content_type == "multipart/form-data":
            try:
                form = await request.form(max_files=1, max_fields=8)
            except StarletteHTTPException as error:  # Starlette answers a malformed multipart body with 400
                if error.status_code != 400:
                    raise
                raise HTTPException(422, f"the multipart body cannot be read ({_one_line(str(error.detail))})") from error
            try:
                fields = _validated(UploadSearch, {key: value for key, value in form.items() if isinstance(value, str)})
                upload = form.get("file")
                if not isinstance(upload, UploadFile):
                    raise HTTPException(422, "file: attach the image as the form field 'file'")
                data = await upload.read(max_upload_bytes + 1)
                filename = display_path(upload.filename) if upload.filename is not None else None
            finally:
                await form.close()
            if len(data) > max_upload_bytes:
                raise HTTPException(413, f"the image is over the upload limit of {max_upload_bytes // 2**20} MiB")
            scenario = scenarios[fields.scenario]
            decoded = await run_in_threadpool(_decode_upload, data, scenario.image_size, max_upload_pixels, budget)
            return await run_in_threadpool(_search_upload, scenario, decoded, filename, fields.top_k)
        raise HTTPException(
            415, "send JSON {scenario, row, top_k} for an indexed image, or multipart/form-data with scenario, top_k and file for an upload"
        )

    @api.get("/images/{scenario}/{row}", response_class=StreamingResponse)
    def image(scenario: str, row: int) -> StreamingResponse:
        """The indexed image file of a row as it is on disk, typed by the raster format it decodes as."""
        file = scenarios[scenario].open_image(row)
        try:
            media_type = _gallery_media_type(file, row)
            size = str(os.fstat(file.fileno()).st_size)
        except BaseException:
            file.close()
            raise
        return StreamingResponse(_chunks(file), media_type=media_type, headers={"Cache-Control": "no-cache", "Content-Length": size})

    @api.get("/images/{scenario}/{row}/thumbnail", response_class=Response)
    def image_thumbnail(scenario: str, row: int) -> Response:
        """A JPEG of the row's image that fits in 192x384."""
        with scenarios[scenario].open_image(row) as file:
            data = thumbnails.get(file, row)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "no-cache"})

    return api


def _search_text(scenario: Scenario, body: TextSearch) -> dict[str, Any]:
    started = time.perf_counter()
    hits = scenario.search_text(body.query, body.top_k)
    return {**body.model_dump(), "took_ms": _since(started), "hits": _hits_out(scenario, hits)}


def _search_row(scenario: Scenario, body: RowSearch) -> dict[str, Any]:
    started = time.perf_counter()
    hits = scenario.search_row(body.row, body.top_k)
    return {
        "scenario": scenario.name, "row": body.row, "filename": None, "top_k": body.top_k,
        "took_ms": _since(started), "hits": _hits_out(scenario, hits),
    }


def _search_upload(scenario: Scenario, image: Image.Image, filename: str | None, top_k: int) -> dict[str, Any]:
    started = time.perf_counter()
    hits = scenario.search_image(image, top_k)
    return {
        "scenario": scenario.name, "row": None, "filename": filename, "top_k": top_k,
        "took_ms": _since(started), "hits": _hits_out(scenario, hits),
    }


def _decode_upload(data: bytes, image_size: tuple[int, int], max_pixels: int, budget: DecodeBudget) -> Image.Image:
    """RGB image of uploaded bytes, at least twice ``image_size`` (height, width) where it was larger.

    415 for what is not an image; 422 for bombs, images over ``max_pixels`` (both before decoding) and broken files.
    """
    try:
        with Image.open(io.BytesIO(data), formats=UPLOAD_FORMATS) as image:
            width, height = image.size
            if width * height > Image.MAX_IMAGE_PIXELS:
                raise HTTPException(
                    422, f"the image is {width}x{height} pixels, over the decompression-bomb limit of {Image.MAX_IMAGE_PIXELS:,} pixels"
                )
            if width * height > max_pixels:
                raise HTTPException(422, f"the image is {width}x{height} pixels, over the upload limit of {max_pixels:,} pixels")
            return _decode_reduced(image, (2 * image_size[1], 2 * image_size[0]), budget)
    except Image.DecompressionBombError as error:
        raise HTTPException(422, f"refused as a decompression bomb: {error}") from error
    except UnidentifiedImageError as error:
        raise HTTPException(415, f"the upload is not an image ({', '.join(UPLOAD_FORMATS)} are accepted)") from error
    except IMAGE_ERRORS as error:
        raise HTTPException(422, f"the image cannot be decoded ({type(error).__name__}: {_one_line(str(error))})") from error


def _decode_reduced(image: Image.Image, at_least: tuple[int, int], budget: DecodeBudget) -> Image.Image:
    """8-bit RGB of an opened (not yet decoded) image, reduced by a whole factor while it stays at least ``at_least``
    (width, height); decoded within ``budget``. JPEG decodes at 1/2, 1/4 or 1/8 scale (``draft``) already."""
    image.draft(None, at_least)  # a no-op for other formats
    with budget.reserve(_decode_cost(image)):
        rgb = to_rgb(image)
        factor = min(rgb.width // at_least[0], rgb.height // at_least[1])
        return rgb.reduce(factor) if factor > 1 else rgb


def _decode_cost(image: Image.Image) -> int:
    wide = image.mode in ("I", "F") or image.mode.startswith("I;16")
    return image.width * image.height * (_WIDE_BYTES_PER_PIXEL if wide else DECODE_BYTES_PER_PIXEL)


def _gallery_media_type(file: BinaryIO, row: int) -> str:
    """The Content-Type of a gallery file by the format Pillow identifies in it (header only); 415 for anything else."""
    try:
        with Image.open(file, formats=GALLERY_FORMATS) as image:
            media_type = _MEDIA_TYPES[image.format]
    except (UnidentifiedImageError, *IMAGE_ERRORS) as error:
        raise HTTPException(415, f"the file of row {row} is not a JPEG, PNG, WebP, BMP or GIF image; it is not served") from error
    file.seek(0)
    return media_type


def _chunks(file: BinaryIO) -> Iterator[bytes]:
    with file:
        while chunk := file.read(_CHUNK_BYTES):
            yield chunk


class _Thumbnails:
    """JPEG thumbnails of gallery files by (file, size, mtime), the ``size`` most recently used kept."""

    def __init__(self, budget: DecodeBudget, size: int = 1024) -> None:
        self.budget = budget
        self.size = size
        self._cache: OrderedDict[tuple[int, ...], bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, file: BinaryIO, row: int) -> bytes:
        stat = os.fstat(file.fileno())
        key = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        data = self._encode(file, row)
        with self._lock:
            self._cache[key] = data
            while len(self._cache) > self.size:
                self._cache.popitem(last=False)
        return data

    def _encode(self, file: BinaryIO, row: int) -> bytes:
        try:
            with Image.open(file, formats=GALLERY_FORMATS) as image:
                thumbnail = _decode_reduced(image, THUMBNAIL_SIZE, self.budget)
        except UnidentifiedImageError as error:
            raise HTTPException(415, f"the file of row {row} is not a JPEG, PNG, WebP, BMP or GIF image; it is not served") from error
        except IMAGE_ERRORS as error:
            raise HTTPException(422, f"the image of row {row} cannot be read ({type(error).__name__}: {_one_line(str(error))})") from error
        thumbnail.thumbnail(THUMBNAIL_SIZE)
        out = io.BytesIO()
        thumbnail.save(out, "JPEG", quality=85)
        return out.getvalue()


def _hits_out(scenario: Scenario, hits: list[Hit]) -> list[dict[str, Any]]:
    out = []
    for hit in hits:
        dimensions = scenario.image_dimensions(hit.row)
        width, height = dimensions if dimensions is not None else (None, None)
        out.append({"row": hit.row, "score": hit.score, "path": display_path(hit.path), "width": width, "height": height})
    return out


def _since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)


def _content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def _json(request: Request) -> Any:
    """The body as JSON; 422 for anything that does not parse (not UTF-8, broken, nested too deeply, a huge number)."""
    try:
        text = (await request.body()).decode("utf-8")
    except UnicodeDecodeError as error:
        raise HTTPException(422, f"the request body is not UTF-8 (byte {error.start}); send JSON encoded as UTF-8") from error
    try:
        return json.loads(text)
    except RecursionError as error:
        raise HTTPException(422, "the request body is nested too deeply to read as JSON") from error
    except json.JSONDecodeError as error:
        raise HTTPException(422, f"the request body is not valid JSON ({error})") from error
    except ValueError as error:  # an integer of more digits than Python converts (sys.get_int_max_str_digits)
        raise HTTPException(422, "the request body is not valid JSON (a number too long to read)") from error


def _validated(model: type[BaseModel], data: Any) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as error:  # located like FastAPI's own errors: ("body", field, ...)
        raise RequestValidationError([{**item, "loc": ("body", *item["loc"])} for item in error.errors()]) from error


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _is_public(path: str) -> bool:
    return path in _PUBLIC_PATHS or path.startswith("/static/")


def _security_headers(path: str) -> dict[str, str]:
    """The headers every response carries; the page and its files get a policy that lets them run."""
    page = path == "/" or path.startswith("/static/")
    return {
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cross-Origin-Resource-Policy": "same-origin",
        "Content-Security-Policy": _PAGE_CSP if page else _API_CSP,
    }


def _add_error_handlers(app: FastAPI) -> None:
    """Every error is JSON ``{"detail": "<what is wrong>"}``; library lookups map to 404."""

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _describe_validation(error.errors())}, status_code=422)

    for error_type in (UnknownScenarioError, MissingRowError, MissingImageError):
        app.add_exception_handler(error_type, _not_found)

    @app.exception_handler(Exception)
    async def internal(request: Request, error: Exception) -> JSONResponse:
        # Starlette sends this outside the middleware (hence the headers here) and re-raises the error for the log
        return JSONResponse(
            {"detail": f"internal error ({type(error).__name__}); the server log has the details"},
            status_code=500,
            headers=_security_headers(request.url.path),
        )


async def _not_found(request: Request, error: Exception) -> JSONResponse:
    return JSONResponse({"detail": str(error.args[0]) if error.args else str(error)}, status_code=404)


def _describe_validation(errors: Any) -> str:
    """``field: problem; field: problem`` from FastAPI's error list (locations start with the source)."""
    parts = []
    for error in errors:
        location = [str(part) for part in error.get("loc", ())[1:]]
        message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{'.'.join(location)}: {message}" if location else message)
    return _one_line("; ".join(parts)) or "invalid request"


class _SecurityHeaders:
    """Set :func:`_security_headers` on every response (replacing any a route set itself)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        extra = [(name.lower().encode(), value.encode()) for name, value in _security_headers(scope["path"]).items()]
        names = {name for name, _ in extra}

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                kept = [(name, value) for name, value in message.get("headers", []) if name.lower() not in names]
                message = {**message, "headers": [*kept, *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


class _TokenCheck:
    """Refuse requests without ``Authorization: Bearer <token>`` (401) before anything reads their body.

    Every path needs it but :data:`_PUBLIC_PATHS` and the page's files; the comparison is on bytes in
    constant time (a token is printable ASCII, :func:`check_token`).
    """

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.expected = token.encode("ascii")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or _is_public(scope["path"]):
            await self.app(scope, receive, send)
            return
        header = next((value for name, value in scope["headers"] if name == b"authorization"), None)
        scheme, _, given = (header or b"").strip().partition(b" ")
        if header is not None and scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self.expected):
            await self.app(scope, receive, send)
            return
        what = "missing token" if header is None else "wrong token"
        response = JSONResponse(
            {"detail": f"{what}: send the header 'Authorization: Bearer <token>' with the server's token"},
            status_code=401,
            headers={"WWW-Authenticate": "Bearer"},
        )
        await response(scope, receive, send)


class _BodyLimit:
    """Refuse request bodies over ``max_bytes`` with 413, by Content-Length up front or while streaming."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or len(declared) > 18 or int(declared) > self.max_bytes):
            response = JSONResponse({"detail": self._message()}, status_code=413)
            await response(scope, receive, send)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise HTTPException(413, self._message())
            return message

        await self.app(scope, limited, send)

    def _message(self) -> str:
        return f"the request body is over the limit of {self.max_bytes:,} bytes ({self.max_bytes / 2**20:g} MiB)"
