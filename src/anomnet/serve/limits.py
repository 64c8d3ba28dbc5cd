"""What the inspection service refuses, and how: the limits a real deployment needs.

Nothing here imports FastAPI, so the checks are tested (and usable) without the ``serve`` extra.

* :class:`Limits` -- upload size, pixel limits per image and per request (read from the image
  headers before any decoding), images per request, worker pool and queue size, body-read and
  per-request timeouts, optional API key.
* :func:`check_image_bytes` -- the declared content type and the file's magic bytes must name
  one of the formats anomnet reads (PNG, JPEG, TIFF, BMP), and agree with each other.
* :func:`read_below` -- a file named by a client, relative to an allowed root: no absolute
  paths, no ``..`` out of it, no symlink out of it (the path is resolved, then opened component
  by component without following links, so a link swapped in meanwhile is refused too), only
  regular files, and never more bytes than the upload limit.
* :class:`WorkerPool` -- a bounded thread pool with a queue limit: a request that finds every
  worker busy and the queue full is refused at once (429) instead of piling up.

Every refusal is a :class:`RequestError`: an HTTP status and a reason in plain words.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, TypeVar

from anomnet.errors import ConfigError

T = TypeVar("T")

MiB = 1 << 20


class RequestError(Exception):
    """A request the service refuses: ``status`` (4xx/5xx) and ``reason`` (sent to the client)."""

    def __init__(self, status: int, reason: str, headers: dict[str, str] | None = None) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers or {}
        super().__init__(f"{status}: {reason}")


@dataclass(frozen=True)
class Limits:
    """The service's limits (``anomnet serve --help`` lists the flags that set them)."""

    max_upload_bytes: int = 32 * MiB
    """A request body (all its images together) may be at most this large (413 otherwise)."""
    max_pixels: int = 40_000_000
    """An image may have at most this many pixels, read from its header before decoding (413 otherwise)."""
    max_request_pixels: int = 64_000_000
    """The images of one request may have at most this many pixels together, read from their headers (413)."""
    max_images: int = 16
    """Images per request."""
    workers: int = 1
    """Scoring threads."""
    queue: int = 8
    """Requests that may wait for a worker; one more is refused with 429."""
    timeout_s: float = 60.0
    """A request's scoring must end this many seconds after it arrived (504 otherwise)."""
    body_timeout_s: float = 10.0
    """A request's body must have arrived this many seconds after its head (408 otherwise); it is read before
    the request takes a worker or queue place, so slow senders never hold one."""
    api_key: str | None = None
    """When set, every /v1 and /metrics request must carry it in the ``X-API-Key`` header (401 otherwise)."""

    def __post_init__(self) -> None:
        checks: list[tuple[str, float, float, float]] = [
            ("max_upload_bytes", self.max_upload_bytes, 1024, 1 << 34),
            ("max_pixels", self.max_pixels, 1, 1 << 34),
            ("max_request_pixels", self.max_request_pixels, 1, 1 << 36),
            ("max_images", self.max_images, 1, 4096),
            ("workers", self.workers, 1, 256),
            ("queue", self.queue, 0, 100_000),
            ("timeout_s", self.timeout_s, 0.01, 86_400),
            ("body_timeout_s", self.body_timeout_s, 0.01, 86_400),
        ]
        for name, value, low, high in checks:
            if not low <= value <= high:
                raise ConfigError(f"service limit {name}={value!r} is out of range [{low:g}, {high:g}]")
        if self.api_key is not None and (len(self.api_key) < 8 or not self.api_key.isprintable()):
            raise ConfigError("the API key must be at least 8 printable characters")


# --------------------------------------------------------------------------------------
# content type and magic bytes
# --------------------------------------------------------------------------------------

SIGNATURES: dict[str, tuple[bytes, ...]] = {
    "png": (b"\x89PNG\r\n\x1a\n",),
    "jpeg": (b"\xff\xd8\xff",),
    "tiff": (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"),
    "bmp": (b"BM",),
}
"""The first bytes of each image format anomnet reads."""

EXTENSIONS = {"png": ".png", "jpeg": ".jpg", "tiff": ".tif", "bmp": ".bmp"}

CONTENT_TYPES: dict[str, str] = {
    "image/png": "png",
    "image/jpeg": "jpeg",
    "image/jpg": "jpeg",
    "image/pjpeg": "jpeg",
    "image/tiff": "tiff",
    "image/bmp": "bmp",
    "image/x-bmp": "bmp",
    "image/x-ms-bmp": "bmp",
}
"""Declared content types and the format each promises."""

GENERIC_TYPES = frozenset({"", "application/octet-stream"})
"""Content types that promise no format (then the magic bytes alone decide)."""


def sniff_format(head: bytes) -> str | None:
    """The image format the first bytes announce (``png``, ``jpeg``, ``tiff``, ``bmp``), or None."""
    for fmt, signatures in SIGNATURES.items():
        if any(head.startswith(sig) for sig in signatures):
            return fmt
    return None


def check_image_bytes(name: str, data: bytes, content_type: str | None) -> str:
    """The format of an image a client sent; :class:`RequestError` (415 / 400) when it is not one we read.

    ``content_type`` is the declared type (``None`` for a server-side file, which has none).
    """
    if not data:
        raise RequestError(400, f"{name}: the file is empty (0 bytes)")
    declared = None
    if content_type is not None:
        mime = content_type.split(";", 1)[0].strip().lower()
        if mime not in GENERIC_TYPES:
            declared = CONTENT_TYPES.get(mime)
            if declared is None:
                raise RequestError(
                    415,
                    f"{name}: content type {mime!r} is not an image type this service reads "
                    f"(PNG, JPEG, TIFF or BMP: {', '.join(sorted(CONTENT_TYPES))})",
                )
    found = sniff_format(data[:16])
    if found is None:
        raise RequestError(
            415, f"{name}: the data is not a PNG, JPEG, TIFF or BMP file (its first bytes say otherwise)"
        )
    if declared is not None and declared != found:
        raise RequestError(415, f"{name}: declared as {declared.upper()} but the data is a {found.upper()} file")
    return found


def check_pixels(name: str, height: int, width: int, limits: Limits) -> None:
    """413 when a header announces more pixels than ``limits.max_pixels`` (checked before decoding)."""
    if height * width > limits.max_pixels:
        raise RequestError(
            413,
            f"{name}: the image is {width}x{height} = {height * width / 1e6:.1f} megapixels, more than this "
            f"service's limit of {limits.max_pixels / 1e6:g} megapixels",
        )


# --------------------------------------------------------------------------------------
# server-side files below an allowed root
# --------------------------------------------------------------------------------------


def resolve_below(root: Path, relative: str) -> tuple[Path, tuple[str, ...]]:
    """The real root and the real path's components below it, or :class:`RequestError` (400 / 403).

    ``relative`` must be a relative path; it is resolved (``..`` and links) and must stay below
    ``root``'s real location.
    """
    if not isinstance(relative, str) or not relative.strip():
        raise RequestError(400, "an image path must be a non-empty string")
    if "\x00" in relative:
        raise RequestError(400, "an image path must not contain NUL characters")
    if PurePosixPath(relative).is_absolute() or PureWindowsPath(relative).is_absolute() or relative.startswith("~"):
        raise RequestError(403, f"{relative!r}: absolute paths are refused; give a path relative to the image root")
    real_root = Path(os.path.realpath(root))
    target = Path(os.path.realpath(real_root / relative))
    if not target.is_relative_to(real_root):
        raise RequestError(403, f"{relative!r}: the path leads outside the image root")
    if target == real_root:
        raise RequestError(400, f"{relative!r}: names the image root itself, not a file")
    return real_root, target.relative_to(real_root).parts


def read_below(root: Path, relative: str, max_bytes: int) -> bytes:
    """The bytes of the regular file ``root/relative`` (at most ``max_bytes``), never of a file outside ``root``.

    Raises:
        RequestError: 400 bad path or not a regular file, 403 outside the root, 404 missing,
            413 larger than ``max_bytes``.
    """
    real_root, parts = resolve_below(root, relative)
    dir_fd = os.open(real_root, os.O_RDONLY | os.O_DIRECTORY)
    fd = -1
    try:
        for part in parts[:-1]:
            nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
            os.close(dir_fd)
            dir_fd = nxt
        fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise RequestError(400, f"{relative!r}: not a regular file")
        if st.st_size > max_bytes:
            raise RequestError(413, f"{relative!r}: {st.st_size} bytes, more than the limit of {max_bytes} bytes")
        chunks: list[bytes] = []
        total = 0
        while chunk := os.read(fd, 1 << 20):
            total += len(chunk)
            if total > max_bytes:
                raise RequestError(413, f"{relative!r}: more than the limit of {max_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)
    except FileNotFoundError:
        raise RequestError(404, f"{relative!r}: no such file below the image root") from None
    except NotADirectoryError:
        raise RequestError(404, f"{relative!r}: no such file below the image root") from None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EMLINK):  # a link appeared after the path was resolved
            raise RequestError(403, f"{relative!r}: the path leads outside the image root") from None
        if exc.errno in (errno.EISDIR,):
            raise RequestError(400, f"{relative!r}: not a regular file") from None
        raise RequestError(403, f"{relative!r}: cannot be read ({exc.strerror or exc})") from None
    finally:
        if fd >= 0:
            os.close(fd)
        os.close(dir_fd)


# --------------------------------------------------------------------------------------
# bounded worker pool
# --------------------------------------------------------------------------------------


class WorkerPool:
    """``workers`` threads and at most ``queue`` waiting jobs; :meth:`reserve` refuses (429) beyond that.

    A reserved :class:`Slot` is held from the moment a request is admitted until its job has
    finished (not merely until the request gave up waiting), so the bound holds even for
    requests that timed out while their job still runs.
    """

    def __init__(self, workers: int, queue: int) -> None:
        self.workers = workers
        self.capacity = workers + queue
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="anomnet-score")
        self._lock = threading.Lock()
        self._held = 0
        self._running = 0

    @property
    def held(self) -> int:
        """Admitted requests whose job has not finished (running or waiting)."""
        with self._lock:
            return self._held

    @property
    def running(self) -> int:
        with self._lock:
            return self._running

    def reserve(self) -> Slot:
        with self._lock:
            if self._held >= self.capacity:
                raise RequestError(
                    429,
                    f"the service is busy: {self.workers} worker(s) and {self.capacity - self.workers} queued "
                    "request(s) already; retry later",
                    {"Retry-After": "1"},
                )
            self._held += 1
        return Slot(self)

    def _release(self) -> None:
        with self._lock:
            self._held -= 1

    def _submit(self, fn: Callable[[], T]) -> Future[T]:
        def job() -> T:
            with self._lock:
                self._running += 1
            try:
                return fn()
            finally:
                with self._lock:
                    self._running -= 1

        return self._executor.submit(job)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class Slot:
    """One admitted request's place in a :class:`WorkerPool`: submit one job, then :meth:`close`."""

    def __init__(self, pool: WorkerPool) -> None:
        self._pool = pool
        self._handed_over = False
        self._closed = False

    def submit(self, fn: Callable[[], T]) -> Future[T]:
        """Run ``fn`` on a worker; the slot is released when it has finished (or was cancelled before starting)."""
        if self._handed_over or self._closed:
            raise RuntimeError("a slot runs one job")
        self._handed_over = True
        future = self._pool._submit(fn)
        future.add_done_callback(self._done)
        return future

    def _done(self, _: Any) -> None:
        self._pool._release()

    def close(self) -> None:
        """Release the slot if no job was handed over (the job releases it otherwise)."""
        if not self._handed_over and not self._closed:
            self._pool._release()
        self._closed = True
