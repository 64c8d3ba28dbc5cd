"""The inspection service: a FastAPI app that scores images with one or more models, and serves the review page.

Routes (``docs/serve.md`` has examples):

* ``POST /v1/models/{name}/predict`` -- multipart image file(s), or JSON ``{"paths": [...]}`` naming
  files below the server's ``image_root``; query (or JSON) options ``mask``, ``heatmap``,
  ``overlay`` add base64 PNGs. One result per image: score, p-value, decision, defect-pixel
  count, regions (bounding boxes).
* ``GET /v1/models`` (each model's thresholds and version), ``GET /v1/openapi.json``, ``GET /healthz``,
  ``GET /metrics`` (Prometheus text).
* ``GET|POST /v1/models/{name}/review``, ``DELETE /v1/models/{name}/review/{id}`` -- the
  operator's marks (:mod:`anomnet.serve.review`).
* ``GET /`` -- the review page (``static/``, every asset local).

Every image is scored by :func:`anomnet.predict.scoring.score_refs`, the step ``anomnet predict`` uses. A request's
body is read (bounded in size and time) before it takes a worker place; on the worker every image header is
checked (pixels per image and per request) before the images are decoded and scored, one at a time, all
with one snapshot of the model (:mod:`anomnet.serve.models`: a recalibrated folder is picked up whole).
Every refusal is a JSON ``{"detail": reason}`` with a 4xx status (:mod:`anomnet.serve.limits`);
an unexpected failure is a 500 whose body says only that (the traceback goes to the server log).
"""

import asyncio
import base64
import hmac
import json
import re
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, MutableMapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from anomnet import imageio
from anomnet.errors import AnomnetError, ConfigError, ImageReadError
from anomnet.predict.scoring import ImagePrediction, ImageRef, Scorer, score_refs
from anomnet.predict.visualize import draw_contour, heatmap, overlay
from anomnet.serve.limits import (
    EXTENSIONS,
    Limits,
    RequestError,
    WorkerPool,
    check_image_bytes,
    check_pixels,
    read_below,
)
from anomnet.serve.metrics import Metrics
from anomnet.serve.models import CHECK_SECONDS, ModelRegistry, ServedModel, finite, load_served
from anomnet.serve.review import MARKS, ReviewStore

# FastAPI is imported where it is used: this module imports without the serve extra (create_app says what is
# missing). No `from __future__ import annotations` here: FastAPI reads the routes' annotations as objects.
if TYPE_CHECKING:
    from fastapi import FastAPI, Request

STATIC = Path(__file__).with_name("static")
API_KEY_HEADER = "X-API-Key"
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
OUTPUT_OPTIONS = ("mask", "heatmap", "overlay")
PAGE_HEADERS = {
    # The page loads nothing from elsewhere: a line PC is offline, and a stray CDN link would fail there.
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; "
    "script-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
}

ASGIApp = Callable[
    [MutableMapping[str, Any], Callable[[], Awaitable[MutableMapping[str, Any]]], Callable[..., Awaitable[None]]],
    Awaitable[None],
]


def load_models(models: Mapping[str, str | Path | Scorer]) -> dict[str, ServedModel]:
    """Open every model (a fitted or exported folder, or a scorer) under its name; ConfigError on a bad name."""
    if not models:
        raise ConfigError("no model to serve: give at least one --model NAME=DIR")
    served: dict[str, ServedModel] = {}
    for name, model in models.items():
        if not MODEL_NAME.match(name) or name in (".", ".."):
            raise ConfigError(
                f"model name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
            )
        served[name] = load_served(name, model)
    return served


class _State:
    """What the routes share: the models, limits, pool, metrics, review store and a private temp folder."""

    def __init__(
        self,
        models: ModelRegistry,
        limits: Limits,
        image_root: Path | None,
        review: ReviewStore | None,
    ) -> None:
        self.models = models
        self.limits = limits
        self.image_root = image_root
        self.review = review
        self.pool = WorkerPool(limits.workers, limits.queue)
        self.metrics = Metrics()
        self.metrics.gauge("anomnet_workers_busy", "Scoring jobs running now.", lambda: self.pool.running)
        self.metrics.gauge(
            "anomnet_requests_admitted", "Requests holding a worker or queue place now.", lambda: self.pool.held
        )
        self.metrics.gauge("anomnet_queue_capacity", "Worker plus queue places.", lambda: self.pool.capacity)
        self._tmp = tempfile.TemporaryDirectory(prefix="anomnet-serve-")
        self.tmp = Path(self._tmp.name)

    def model(self, name: str) -> ServedModel:
        """The current snapshot of model ``name``: a request scores all its images with this one."""
        model = self.models.get(name)
        if model is None:
            raise RequestError(404, f"no model named {name!r}; this service has: {', '.join(self.models.names())}")
        return model

    def close(self) -> None:
        self.pool.shutdown()
        self._tmp.cleanup()


@dataclass
class _Image:
    """One image of a request: uploaded bytes, or a path below the image root (read on the worker)."""

    name: str
    data: bytes | None = None
    content_type: str | None = None
    path: str | None = None


def create_app(
    models: Mapping[str, str | Path | Scorer],
    limits: Limits | None = None,
    image_root: str | Path | None = None,
    review_dir: str | Path | None = None,
    reload_check_s: float | None = CHECK_SECONDS,
) -> "FastAPI":
    """The service for ``models`` (name -> fitted / exported model folder or scorer).

    ``image_root``: the folder JSON ``paths`` are relative to (none: paths are refused).
    ``review_dir``: where the review page's marks are saved (none: marks are refused).
    ``reload_check_s``: how often (seconds) a model folder is looked at for a recalibrated or refitted
    model, which then replaces the served one whole (:mod:`anomnet.serve.models`); None: never.
    """
    from anomnet.serve import missing_extra

    missing = missing_extra()
    if missing:
        raise ConfigError(missing)
    from fastapi import Depends, FastAPI, Request
    from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
    from fastapi.staticfiles import StaticFiles

    limits = limits or Limits()
    if image_root is not None and not Path(image_root).is_dir():
        raise ConfigError(f"image root {image_root}: not a folder")
    state = _State(
        ModelRegistry(load_models(models), reload_check_s),
        limits,
        Path(image_root) if image_root is not None else None,
        ReviewStore(review_dir) if review_dir is not None else None,
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        state.close()

    app = FastAPI(
        lifespan=lifespan,
        title="anomnet inspection service",
        version="1",
        docs_url=None,  # the interactive docs page loads its scripts from a CDN: not on an offline line PC
        redoc_url=None,
        openapi_url=None,  # served below, behind the API key like every /v1 route
    )
    app.state.anomnet = state

    @app.exception_handler(RequestError)
    async def _refused(request: Request, exc: RequestError) -> JSONResponse:
        return JSONResponse({"detail": exc.reason}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(AnomnetError)
    async def _bad_input(request: Request, exc: AnomnetError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=400)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        # Starlette re-raises the exception after this response, so the server log gets the traceback.
        return JSONResponse({"detail": "internal error (the server log has the details)"}, status_code=500)

    async def require_key(request: Request) -> None:
        if limits.api_key is None:
            return
        sent = request.headers.get(API_KEY_HEADER, "")
        if not hmac.compare_digest(sent.encode(), limits.api_key.encode()):
            raise RequestError(
                401,
                f"missing or wrong API key (send it in the {API_KEY_HEADER} header)",
                {"WWW-Authenticate": "ApiKey"},
            )

    keyed = [Depends(require_key)]

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "models": state.models.names()}

    @app.get("/v1/openapi.json", dependencies=keyed, include_in_schema=False)
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/metrics", dependencies=keyed)
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", dependencies=keyed)
    async def list_models() -> dict[str, Any]:
        return {
            "models": [m.info() for m in state.models.all()],
            "review": state.review is not None,
            "image_root": state.image_root is not None,
            "limits": {
                "max_upload_bytes": limits.max_upload_bytes,
                "max_pixels": limits.max_pixels,
                "max_request_pixels": limits.max_request_pixels,
                "max_images": limits.max_images,
            },
        }

    @app.post("/v1/models/{name}/predict", dependencies=keyed)
    async def predict(name: str, request: Request) -> dict[str, Any]:
        started = time.monotonic()
        state.model(name)  # 404 before the body is read
        # the body is read (bounded, within the body timeout) before a worker place is taken: a client that
        # sends slowly holds no place that a real one needs
        images, options = await _read_in_time(request, state, False, started)
        slot = state.pool.reserve()
        try:
            model = state.model(name)  # one snapshot for every image of the request
            future = slot.submit(lambda: _score(state, model, images, options))
            results = await _wait(future, started + limits.timeout_s, limits.timeout_s)
        finally:
            slot.close()
        cal = model.scorer.calibration
        return {"model": name, "version": model.version or None, "threshold": finite(cal.threshold), "results": results}

    @app.get("/v1/models/{name}/review", dependencies=keyed)
    async def list_marks(name: str) -> dict[str, Any]:
        store = _review(state, name)
        marks = store.marks(name)
        folder = store.folder(name)
        return {
            "model": name,
            "folder": str(folder),
            "marks": marks,
            "counts": {label: sum(1 for m in marks if m["label"] == label) for label in ("good", "defective")},
            "calibrate": f"anomnet calibrate --model-dir {state.model(name).source} --labelled {folder} "
            "--image-threshold f1",
        }

    @app.post("/v1/models/{name}/review", dependencies=keyed)
    async def mark(name: str, request: Request) -> dict[str, Any]:
        started = time.monotonic()
        store = _review(state, name)
        images, options = await _read_in_time(request, state, True, started)
        if len(images) != 1:
            raise RequestError(400, f"a mark is for one image, got {len(images)}")
        slot = state.pool.reserve()
        try:
            future = slot.submit(lambda: _save_mark(state, store, name, images[0], str(options["mark"])))
            entry: dict[str, Any] = await _wait(future, started + limits.timeout_s, limits.timeout_s)
        finally:
            slot.close()
        return entry

    @app.delete("/v1/models/{name}/review/{key}", dependencies=keyed)
    async def unmark(name: str, key: str) -> dict[str, Any]:
        store = _review(state, name)
        if not store.remove(name, key):
            raise RequestError(404, f"no mark for image {key!r}")
        return {"removed": key}

    @app.get("/")
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers=PAGE_HEADERS)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(_BodyLimit, max_bytes=limits.max_upload_bytes)
    app.add_middleware(_RecordMetrics, metrics=state.metrics)
    return app


# --------------------------------------------------------------------------------------
# reading a request
# --------------------------------------------------------------------------------------


async def _read_request(request: "Request", state: _State, with_mark: bool) -> tuple[list[_Image], dict[str, Any]]:
    """The images and options of a predict / review request (multipart upload or JSON paths)."""
    from starlette.datastructures import UploadFile

    limits = state.limits
    content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    options: dict[str, Any] = {k: _flag(request.query_params.get(k), k) for k in OUTPUT_OPTIONS}
    images: list[_Image] = []
    if content_type == "multipart/form-data":
        # one file more than allowed gets through the parser, so the count below can say which limit it was
        form = await request.form(max_files=limits.max_images + 1, max_fields=16, max_part_size=4096)
        try:
            for key, value in form.multi_items():
                if isinstance(value, UploadFile):
                    data = await value.read()
                    name = _display_name(value.filename or key)
                    check_image_bytes(name, data, value.content_type)
                    images.append(_Image(name, data, value.content_type))
                elif key in OUTPUT_OPTIONS:
                    options[key] = _flag(value, key)
                elif key == "mark" and with_mark:
                    options["mark"] = value
                else:
                    raise RequestError(400, f"unknown form field {key!r}")
        finally:
            await form.close()
    elif content_type == "application/json":
        try:
            body = json.loads(await _json_bytes(request))
        except ValueError as exc:
            raise RequestError(400, f"the JSON body cannot be parsed ({exc})") from None
        except RecursionError:
            raise RequestError(400, "the JSON body is nested too deeply to be a request of this service") from None
        if not isinstance(body, dict):
            raise RequestError(400, 'the JSON body must be an object, e.g. {"paths": ["part_17.png"]}')
        allowed = {"paths", *OUTPUT_OPTIONS} if not with_mark else {"path", "mark"}
        unknown = sorted(set(body) - allowed)
        if unknown:
            raise RequestError(
                400, f"unknown JSON field(s): {', '.join(unknown)} (known: {', '.join(sorted(allowed))})"
            )
        paths = [body["path"]] if with_mark and "path" in body else body.get("paths", [])
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise RequestError(400, '"paths" must be a list of strings')
        if paths and state.image_root is None:
            raise RequestError(403, "this service was started without an image root: server-side paths are refused")
        images = [_Image(_display_name(p), path=p) for p in paths]
        options.update({k: _flag(body[k], k) for k in OUTPUT_OPTIONS if k in body})
        if with_mark and "mark" in body:
            options["mark"] = body["mark"]
    else:
        raise RequestError(
            415,
            f'send the images as multipart/form-data (file fields) or JSON {{"paths": [...]}}, not {content_type!r}',
        )
    if not images:
        raise RequestError(400, "no image in the request (multipart file fields, or JSON paths)")
    if len(images) > limits.max_images:
        raise RequestError(413, f"{len(images)} images in one request, more than the limit of {limits.max_images}")
    mark = options.get("mark")
    if with_mark and (not isinstance(mark, str) or mark not in MARKS):
        shown = repr(mark) if isinstance(mark, str) else f"of type {type(mark).__name__}"
        raise RequestError(400, f"mark {shown[:80]} unknown; use one of: {', '.join(MARKS)} (a string)")
    return images, options


MAX_JSON_BYTES = 1 << 20
"""A JSON request names files and options: its body may be at most 1 MiB (the upload limit is for images)."""


async def _json_bytes(request: "Request") -> bytes:
    """The body of a JSON request, refused (413) beyond :data:`MAX_JSON_BYTES` while it streams in."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_JSON_BYTES:
            raise RequestError(
                413, f"a JSON body may be at most {MAX_JSON_BYTES} bytes (it names files; upload images as multipart)"
            )
        chunks.append(chunk)
    return b"".join(chunks)


CLIENT_GONE = 499
"""The status recorded (never sent: nobody listens) for a request whose client hung up before its body arrived."""


async def _read_in_time(
    request: "Request", state: _State, with_mark: bool, started: float
) -> tuple[list[_Image], dict[str, Any]]:
    """:func:`_read_request` within the body timeout (and the request's limit): a body trickling in is cut off."""
    from starlette.requests import ClientDisconnect

    limits = state.limits
    budget = min(limits.body_timeout_s, limits.timeout_s)
    try:
        return await asyncio.wait_for(
            _read_request(request, state, with_mark), timeout=started + budget - time.monotonic()
        )
    except TimeoutError:
        raise RequestError(
            408, f"the request body did not arrive within this service's limit of {budget:g} s", {"Connection": "close"}
        ) from None
    except ClientDisconnect:
        raise RequestError(CLIENT_GONE, "the client closed the connection before its request body arrived") from None


def _flag(value: Any, name: str) -> bool:
    if value is None or isinstance(value, bool):
        return bool(value)
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise RequestError(400, f"option {name}={value!r}: use true or false")


def _display_name(name: str) -> str:
    """A client-given name as it is echoed back: printable, at most 200 characters."""
    clean = "".join(ch if ch.isprintable() else "?" for ch in str(name))
    return clean[:200] or "image"


async def _wait(future: Any, deadline: float, timeout_s: float) -> Any:
    remaining = deadline - time.monotonic()
    try:
        return await asyncio.wait_for(asyncio.wrap_future(future), timeout=max(remaining, 0.0))
    except TimeoutError:
        raise RequestError(
            504, f"the request did not finish within this service's limit of {timeout_s:g} s; retry later"
        ) from None


def _review(state: _State, name: str) -> ReviewStore:
    state.model(name)
    if state.review is None:
        raise RequestError(403, "this service was started without a review folder (--review-dir): marks are refused")
    return state.review


# --------------------------------------------------------------------------------------
# the work done on a worker thread
# --------------------------------------------------------------------------------------


def _materialise(state: _State, image: _Image) -> tuple[bytes, str, Path, int]:
    """The image's bytes, format and pixels, written to a private temporary file whose header has been checked."""
    if image.path is not None:
        assert state.image_root is not None
        data = read_below(state.image_root, image.path, state.limits.max_upload_bytes)
        fmt = check_image_bytes(image.name, data, None)
    else:
        assert image.data is not None
        data = image.data
        fmt = check_image_bytes(image.name, data, image.content_type)
    tmp = state.tmp / f"{uuid.uuid4().hex}{EXTENSIONS[fmt]}"
    with open(tmp, "xb") as f:  # a private scratch file, removed after scoring: no fsync, no rename needed
        f.write(data)
    try:
        height, width = imageio.image_size(tmp)
    except ImageReadError as exc:
        tmp.unlink(missing_ok=True)
        if "megapixels" in exc.problem:  # io's own pixel limit (a header beyond anything it reads): say ours
            raise RequestError(
                413,
                f"{image.name}: the image is too large: its header announces more than this service's limit of "
                f"{state.limits.max_pixels / 1e6:g} megapixels",
            ) from None
        raise RequestError(400, f"{image.name}: {exc.problem}") from None
    try:
        check_pixels(image.name, height, width, state.limits)
    except RequestError:
        tmp.unlink(missing_ok=True)
        raise
    return data, fmt, tmp, height * width


def _score(state: _State, model: ServedModel, images: list[_Image], options: dict[str, Any]) -> list[dict[str, Any]]:
    """Every image's result: all headers checked against the limits first, then decoded and scored one at a time.

    One image at a time keeps a request's memory to one decoded image (and its maps) whatever the number
    of images; the pixel budget bounds the request's work before any decoding.
    """
    limits = state.limits
    files: list[Path] = []
    try:
        total = pixels = 0
        for image in images:
            data, _, tmp, size = _materialise(state, image)
            image.data = None  # the temporary file holds it now
            files.append(tmp)
            total += len(data)
            pixels += size
            if total > limits.max_upload_bytes:
                raise RequestError(
                    413, f"the request's images add up to more than the limit of {limits.max_upload_bytes} bytes"
                )
            if pixels > limits.max_request_pixels:
                raise RequestError(
                    413,
                    f"the request's images add up to more than this service's limit of "
                    f"{limits.max_request_pixels / 1e6:g} megapixels per request (at {image.name}); "
                    "send them in several requests",
                )
            del data
        keep_maps = any(options[k] for k in OUTPUT_OPTIONS)
        results = []
        for image, tmp in zip(images, files):
            with model.lock:
                (row,) = score_refs(
                    model.scorer, [ImageRef(str(tmp))], keep_maps=keep_maps, keep_images=options["overlay"]
                )
            if row.error is not None:
                state.metrics.observe_image(model.name, "error")
                status = 422 if row.error.startswith("could not be scored") else 400
                raise RequestError(status, f"{image.name}: {row.error}")
            state.metrics.observe_image(model.name, "defective" if row.defective else "good")
            results.append(_result(image.name, row, model, options))
            del row  # its maps and image: the next image is decoded without them
            tmp.unlink(missing_ok=True)
        return results
    finally:
        for f in files:
            f.unlink(missing_ok=True)


def _result(name: str, row: ImagePrediction, model: ServedModel, options: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": name,
        "score": finite(row.score),
        "p_value": finite(row.p_value),
        "defective": bool(row.defective),
        "decision": "defective" if row.defective else "good",
        "threshold": finite(model.scorer.calibration.threshold),
        "defect_pixels": row.defect_pixels,
        "regions": [{"box": box} for box in row.boxes],
    }
    cal = model.scorer.calibration
    if row.anomaly_map is not None:
        out["height"], out["width"] = (int(s) for s in row.anomaly_map.shape[:2])
    if options["mask"] and row.mask is not None:
        out["mask_png"] = _png64(row.mask.astype("uint8") * 255)
    if options["heatmap"] and row.anomaly_map is not None:
        out["heatmap_png"] = _png64(heatmap(row.anomaly_map, cal))
    if options["overlay"] and row.image is not None and row.anomaly_map is not None and row.mask is not None:
        out["overlay_png"] = _png64(draw_contour(overlay(row.image, row.anomaly_map, cal), row.mask))
    return out


def _save_mark(state: _State, store: ReviewStore, model: str, image: _Image, mark: str) -> dict[str, Any]:
    data, fmt, tmp, _ = _materialise(state, image)
    try:
        imageio.read_image(tmp)  # a file calibrate could not read must not enter the labelled folder
    except ImageReadError as exc:
        raise RequestError(400, f"{image.name}: {exc.problem}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return store.save(model, image.name, data, fmt, mark)


def _png64(array: Any) -> str:
    return base64.b64encode(imageio.encode_png(array)).decode("ascii")


# --------------------------------------------------------------------------------------
# ASGI middleware
# --------------------------------------------------------------------------------------


class _BodyLimit:
    """413 for a body larger than ``max_bytes``: by its Content-Length at once, else while it streams in."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        from starlette.responses import JSONResponse

        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        reason = f"the request body is larger than this service's limit of {self.max_bytes} bytes"
        for key, value in scope.get("headers", []):
            if key == b"content-length":
                if not value.isdigit():
                    await JSONResponse({"detail": "bad Content-Length header"}, status_code=400)(scope, receive, send)
                    return
                if int(value) > self.max_bytes:
                    await JSONResponse({"detail": reason}, status_code=413, headers={"Connection": "close"})(
                        scope, receive, send
                    )
                    return
        received = 0

        async def limited() -> Any:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise RequestError(413, reason, {"Connection": "close"})
            return message

        await self.app(scope, limited, send)


class _RecordMetrics:
    """Counts every request by method, route template and status, and its latency."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def record_status(message: MutableMapping[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.observe_request(scope.get("method", ""), route, status, time.perf_counter() - started)


def serve(app: "FastAPI", host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Run ``app`` with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_keep_alive=5, server_header=False)


@contextmanager
def background_server(app: "FastAPI", host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run ``app`` in a thread on ``host`` (port 0: a free one) while the block runs; yields its base URL."""
    import socket

    import uvicorn

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_keep_alive=5, server_header=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="anomnet-serve")
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the service did not start")
            time.sleep(0.01)
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()


__all__ = ["Limits", "ServedModel", "background_server", "create_app", "load_models", "serve"]
