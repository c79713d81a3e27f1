"""``upperson serve``: a search API (FastAPI) and a search page over gallery indexes ("scenarios").

Routes (OpenAPI docs at ``/docs``):

* ``POST /api/search`` ``{"scenario", "query", "top_k"}``: text → image.
* ``POST /api/search/image``: image → image, either ``{"scenario", "row", "top_k"}`` ("more like this"
  indexed row, itself left out) or multipart ``scenario``, ``top_k``, ``file`` (an uploaded image,
  encoded with the scenario's model).
* ``GET /api/images/{scenario}/{row}`` and ``.../thumbnail``: an indexed image by its row, never by
  a path from the client; the file must still resolve inside the gallery root.
* ``GET /api/scenarios``, ``POST /api/scenarios/{name}/reload``, ``GET /api/health``.
* ``GET /``: the page (static files of this package, nothing from the internet).

With a token, every ``/api`` route needs ``Authorization: Bearer <token>`` (compared in constant
time); the page and ``/docs`` are public, the page asks for the token. Bad input gets a 4xx JSON
``{"detail": "..."}`` that says what is wrong; a bug gets a 500 with the same shape and the traceback
goes to the server log only.
"""

from __future__ import annotations

import functools
import hmac
import io
import ipaddress
import logging
import time
from pathlib import Path
from typing import Any, Callable

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.datastructures import UploadFile
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from upperson.data.datasets import IMAGE_ERRORS, read_image, to_rgb
from upperson.retrieval.scenarios import (
    Hit,
    MissingImageError,
    Scenario,
    ScenarioError,
    Scenarios,
    ScenarioSpec,
    UnknownRowError,
    UnknownScenarioError,
)
from upperson.version import __version__

logger = logging.getLogger(__name__)

MAX_TOP_K = 1000
"""Most hits one request may ask for."""
MAX_QUERY_CHARS = 1000
"""Longest text query accepted (the text encoder reads 77 tokens, roughly 300 characters, anyway)."""
MAX_UPLOAD_BYTES = 20 * 2**20
"""Largest request body (an uploaded image and its form fields): 20 MiB."""
THUMBNAIL_SIZE = (192, 384)
"""Thumbnails fit in this ``(width, height)``, aspect kept."""
UPLOAD_FORMATS = ("JPEG", "PNG", "BMP", "WEBP", "GIF", "TIFF")
"""Pillow formats accepted for uploads (JPEG includes phones' multi-picture MPO files); others are refused
(EPS, for one, would run Ghostscript)."""
STATIC_DIR = Path(__file__).with_name("static")
_MEDIA_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".bmp": "image/bmp", ".webp": "image/webp"}
_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class TextSearch(BaseModel):
    """A text query."""

    model_config = ConfigDict(extra="forbid")
    scenario: str
    query: str = Field(max_length=MAX_QUERY_CHARS, description="what the person looks like")
    top_k: int = Field(10, ge=1, le=MAX_TOP_K, description="hits wanted (fewer if the gallery is smaller)")

    @field_validator("query")
    @classmethod
    def _not_blank(cls, query: str) -> str:
        if not query.strip():
            raise ValueError("the query is empty; describe the person, e.g. 'a woman in a red coat'")
        return query


class RowSearch(BaseModel):
    """More like an indexed image."""

    model_config = ConfigDict(extra="forbid")
    scenario: str
    row: int = Field(ge=0, description="row of the image in the scenario's index (a hit's 'row')")
    top_k: int = Field(10, ge=1, le=MAX_TOP_K)


class UploadSearch(BaseModel):
    """The form fields of an image upload."""

    scenario: str
    top_k: int = Field(10, ge=1, le=MAX_TOP_K)


class HitOut(BaseModel):
    row: int
    score: float
    path: str = Field(description="relative to the gallery root")
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
    filename: str | None = Field(description="the uploaded file's name, or null for a row")
    top_k: int
    took_ms: float
    hits: list[HitOut]


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
) -> FastAPI:
    """The API and page over ``scenarios``.

    Args:
        scenarios: loaded scenarios, or specs to load on ``device``.
        token: if given, every ``/api`` route requires ``Authorization: Bearer <token>``.
        max_upload_bytes: largest request body; larger ones get 413.
    """
    if not isinstance(scenarios, Scenarios):
        scenarios = Scenarios(scenarios, device=device)
    app = FastAPI(
        title="upperson",
        version=__version__,
        description="Text-based person retrieval over indexed galleries (one frozen CLIP, an adapter per scenario).",
    )
    app.state.scenarios = scenarios
    app.state.token_required = token is not None
    app.add_middleware(_BodyLimit, max_bytes=max_upload_bytes)
    _add_error_handlers(app)
    app.include_router(_api(scenarios, max_upload_bytes), prefix="/api", dependencies=[Depends(_token_check(token))])

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers=_PAGE_HEADERS)

    app.mount("/static", _StaticWithHeaders(directory=STATIC_DIR), name="static")
    return app


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


def _api(scenarios: Scenarios, max_upload_bytes: int) -> APIRouter:
    api = APIRouter()
    thumbnail = functools.lru_cache(maxsize=1024)(_thumbnail_jpeg)

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
            raise HTTPException(409, f"could not reload: {error}; still serving the previous index ({len(served.index)} images)") from error

    @api.post("/search", response_model=TextSearchOut)
    def search(body: TextSearch) -> dict[str, Any]:
        """The scenario's gallery ranked for a text description."""
        scenario = scenarios[body.scenario]
        started = time.perf_counter()
        hits = scenario.search_text(body.query, body.top_k)
        return {**body.model_dump(), "took_ms": _since(started), "hits": _hits_out(scenario, hits)}

    @api.post("/search/image", response_model=ImageSearchOut, openapi_extra={"requestBody": _IMAGE_SEARCH_BODY})
    async def search_image(request: Request) -> dict[str, Any]:
        """The gallery ranked by similarity to an indexed image (JSON with ``row``) or an uploaded one (multipart)."""
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type == "application/json":
            body = _validated(RowSearch, await _json(request))
            return await run_in_threadpool(_search_row, scenarios[body.scenario], body)
        if content_type == "multipart/form-data":
            async with request.form(max_files=1, max_fields=8) as form:
                fields = _validated(UploadSearch, {key: value for key, value in form.items() if isinstance(value, str)})
                upload = form.get("file")
                if not isinstance(upload, UploadFile):
                    raise HTTPException(422, "file: attach the image as the form field 'file'")
                data = await upload.read(max_upload_bytes + 1)
                filename = upload.filename
            if len(data) > max_upload_bytes:
                raise HTTPException(413, f"the image is over the upload limit of {max_upload_bytes // 2**20} MiB")
            scenario = scenarios[fields.scenario]
            return await run_in_threadpool(_search_upload, scenario, data, filename, fields.top_k)
        raise HTTPException(
            415, "send JSON {scenario, row, top_k} for an indexed image, or multipart/form-data with scenario, top_k and file for an upload"
        )

    @api.get("/images/{scenario}/{row}", response_class=FileResponse)
    def image(scenario: str, row: int) -> FileResponse:
        """The indexed image file of a row, as it is on disk."""
        path = scenarios[scenario].image_file(row)
        return FileResponse(path, media_type=_MEDIA_TYPES.get(path.suffix.lower()), headers={"Cache-Control": "no-cache"})

    @api.get("/images/{scenario}/{row}/thumbnail", response_class=Response)
    def image_thumbnail(scenario: str, row: int) -> Response:
        """A JPEG of the row's image that fits in 192x384."""
        path = scenarios[scenario].image_file(row)
        stat = path.stat()
        try:
            data = thumbnail(path, stat.st_size, stat.st_mtime_ns)
        except IMAGE_ERRORS as error:
            raise HTTPException(422, f"the image of row {row} cannot be read ({type(error).__name__}: {error})") from error
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "no-cache"})

    return api


def _search_row(scenario: Scenario, body: RowSearch) -> dict[str, Any]:
    started = time.perf_counter()
    hits = scenario.search_row(body.row, body.top_k)
    return {
        "scenario": scenario.name, "row": body.row, "filename": None, "top_k": body.top_k,
        "took_ms": _since(started), "hits": _hits_out(scenario, hits),
    }


def _search_upload(scenario: Scenario, data: bytes, filename: str | None, top_k: int) -> dict[str, Any]:
    started = time.perf_counter()
    hits = scenario.search_image(_decode_upload(data), top_k)
    return {
        "scenario": scenario.name, "row": None, "filename": filename, "top_k": top_k,
        "took_ms": _since(started), "hits": _hits_out(scenario, hits),
    }


def _decode_upload(data: bytes) -> Image.Image:
    """RGB image of uploaded bytes: 415 for what is not an image, 422 for bombs and broken files."""
    try:
        with Image.open(io.BytesIO(data), formats=UPLOAD_FORMATS) as image:
            width, height = image.size
            if width * height > Image.MAX_IMAGE_PIXELS:
                raise HTTPException(
                    422, f"the image is {width}x{height} pixels, over the decompression-bomb limit of {Image.MAX_IMAGE_PIXELS:,} pixels"
                )
            return to_rgb(image)
    except Image.DecompressionBombError as error:
        raise HTTPException(422, f"refused as a decompression bomb: {error}") from error
    except UnidentifiedImageError as error:
        raise HTTPException(415, f"the upload is not an image ({', '.join(UPLOAD_FORMATS)} are accepted)") from error
    except IMAGE_ERRORS as error:
        raise HTTPException(422, f"the image cannot be decoded ({type(error).__name__}: {error})") from error


def _thumbnail_jpeg(path: Path, size: int, mtime_ns: int) -> bytes:
    """JPEG bytes of ``path`` shrunk into :data:`THUMBNAIL_SIZE` (cached by path, size and mtime)."""
    image = read_image(path)
    image.thumbnail(THUMBNAIL_SIZE)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=85)
    return out.getvalue()


def _hits_out(scenario: Scenario, hits: list[Hit]) -> list[dict[str, Any]]:
    out = []
    for hit in hits:
        dimensions = scenario.image_dimensions(hit.row)
        width, height = dimensions if dimensions is not None else (None, None)
        out.append({"row": hit.row, "score": hit.score, "path": hit.path, "width": width, "height": height})
    return out


def _since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)


async def _json(request: Request) -> Any:
    try:
        return await request.json()
    except ValueError as error:
        raise HTTPException(422, f"the request body is not valid JSON ({error})") from error


def _validated(model: type[BaseModel], data: Any) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as error:  # located like FastAPI's own errors: ("body", field, ...)
        raise RequestValidationError([{**item, "loc": ("body", *item["loc"])} for item in error.errors()]) from error


def _token_check(token: str | None) -> Callable[..., None]:
    bearer = HTTPBearer(auto_error=False, description="the token `upperson serve` was started with")
    expected = token.encode() if token is not None else None

    def check(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if expected is None:
            return
        given = credentials.credentials.encode() if credentials is not None else b""
        if not hmac.compare_digest(given, expected):
            what = "wrong token" if credentials is not None else "missing token"
            raise HTTPException(
                401, f"{what}: send the header 'Authorization: Bearer <token>' with the server's token", headers={"WWW-Authenticate": "Bearer"}
            )

    return check if token is not None else _no_check


def _no_check() -> None:
    return None


def _add_error_handlers(app: FastAPI) -> None:
    """Every error is JSON ``{"detail": "<what is wrong>"}``; library lookups map to 404."""

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _describe_validation(error.errors())}, status_code=422)

    for error_type in (UnknownScenarioError, UnknownRowError, MissingImageError):
        app.add_exception_handler(error_type, _not_found)

    @app.exception_handler(Exception)
    async def internal(request: Request, error: Exception) -> JSONResponse:
        # Starlette re-raises the error after this response, so the server logs the traceback
        return JSONResponse({"detail": f"internal error ({type(error).__name__}); the server log has the details"}, status_code=500)


async def _not_found(request: Request, error: Exception) -> JSONResponse:
    return JSONResponse({"detail": str(error.args[0]) if error.args else str(error)}, status_code=404)


def _describe_validation(errors: Any) -> str:
    """``field: problem; field: problem`` from FastAPI's error list (locations start with the source)."""
    parts = []
    for error in errors:
        location = [str(part) for part in error.get("loc", ())[1:]]
        message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{'.'.join(location)}: {message}" if location else message)
    return "; ".join(parts) or "invalid request"


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
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
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


class _StaticWithHeaders(StaticFiles):
    """The page's scripts and styles, with the page's security headers."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(_PAGE_HEADERS)
        return response
