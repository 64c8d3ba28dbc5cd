"""Image and mask I/O: the one place where anomnet touches image files.

Every reader returns plain numpy arrays and raises :class:`~anomnet.errors.ImageReadError`
(naming the file and the problem in plain words) for anything it cannot use; no exception
from deep inside PIL, tifffile or zlib reaches the caller.

* :func:`read_image` -> ``float32`` ``HxWx3`` RGB in [0, 1]. 8-bit data is divided by 255,
  16-bit data by 65535 (so 16-bit precision survives), float TIFFs must already be in [0, 1].
  Gray, gray+alpha, RGB, RGBA, palette and 1-bit images are accepted; alpha is dropped.
* :func:`read_mask` -> ``bool`` ``HxW``; the file must hold 0 and at most one other value.
* :func:`list_images`, :func:`image_size`, :func:`to_tensor`.
* :func:`write_png`, :func:`write_tiff`, :func:`atomic_write_text`: atomic writes (:func:`anomnet.durable.write_file`);
  :func:`encode_png` (PNG bytes, e.g. for HTTP).

Rules every reader follows (docs/hostile-input.md lists how each is tested):

* Formats: PNG, JPEG, TIFF and BMP, recognised by their first bytes, never by the file name.
  PIL is asked to open only the one format found (``Image.open(formats=[...])``), so none of
  its other plugins (GIF, WebP, ICO, PPM, EPS, which would run Ghostscript) is ever reached.
* Size: at most :data:`MAX_IMAGE_PIXELS` pixels and sides at most :data:`MAX_ASPECT_RATIO`
  times apart, checked from the header before any pixel is decoded.
* Bounded decoding: compressed data is inflated into at most what the header promises. A PNG
  is walked first (every chunk's CRC, image data inflating to exactly the promised size: a
  bomb, a truncated stream or missing rows are refused, never zero-filled); TIFF strips and
  tiles are decoded one at a time by :mod:`anomnet.decoders.tiff`, each capped at its share.
* Orientation: the EXIF orientation (JPEG, PNG eXIf, XMP ``tiff:Orientation``, the TIFF
  Orientation tag) is applied to every format and bit depth alike, so pixels come back as
  image viewers show them; :func:`image_size` reports that size. Masks are read the same way,
  so a mask stays aligned with its image when both carry the same tag.

PIL does the decoding except where it would lose data: gray/RGB(A) TIFFs of 8 bits or more are
decoded by :mod:`anomnet.decoders.tiff` (PIL reduces 16-bit RGB to 8 bits, cannot open float
RGB and drops extra channels; tifffile's own decoding is unbounded and needs imagecodecs for
LZW), and 16-bit colour PNGs (interlaced or not) are decoded twice by PIL's own C decoder, once
for the high and once for the low bytes (PIL keeps only the high byte).
"""

from __future__ import annotations

import os
import struct
import tempfile
import threading
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from anomnet import durable
from anomnet.decoders import DecodeError
from anomnet.decoders import png as png_decode
from anomnet.decoders import tiff as tiff_decode
from anomnet.errors import ConfigError, DatasetError, ImageReadError

if TYPE_CHECKING:  # torch is imported where it is used: reading images needs no torch (exported models)
    import torch

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"})
"""File name endings :func:`list_images` picks up (compared case-insensitively)."""

MAX_IMAGE_PIXELS = 40_000_000
"""Images with more pixels are refused (a corrupt header or a decompression bomb), unless
``$ANOMNET_MAX_MEGAPIXELS`` says otherwise (:func:`image_pixel_limit`). Decoding one to float RGB
takes about 16 bytes per pixel (0.7 GB at 40 MP); scoring it takes a few times more."""

MAX_MEGAPIXELS_ENV = "ANOMNET_MAX_MEGAPIXELS"


def image_pixel_limit() -> int:
    """:data:`MAX_IMAGE_PIXELS`, or ``$ANOMNET_MAX_MEGAPIXELS`` (1 to 150; PIL refuses more): larger cameras."""
    raw = os.environ.get(MAX_MEGAPIXELS_ENV, "").strip()
    if not raw:
        return MAX_IMAGE_PIXELS
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 1 <= value <= 150:  # NaN fails too; PIL itself refuses more than about 179 MP
        raise ConfigError(f"{MAX_MEGAPIXELS_ENV}={raw!r} must be a number of megapixels from 1 to 150")
    return int(value * 1_000_000)


MAX_ASPECT_RATIO = 100
"""Images whose long side exceeds this many times the short side are refused: resizing a strip
of 2,000,000 x 1 pixels to a square takes gigabytes, and no inspected part is that shape."""

_PNG_SIGNATURE = png_decode.SIGNATURE
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


class _Pixels(NamedTuple):
    """Decoded pixels ``HxWxC`` (C: 1 gray, 2 gray+alpha, 3 RGB, 4 RGBA) and their full-scale value."""

    data: np.ndarray
    scale: float
    format: str


# --------------------------------------------------------------------------------------
# public readers
# --------------------------------------------------------------------------------------


def read_image(path: str | Path) -> np.ndarray:
    """Read an image as ``float32`` ``HxWx3`` RGB in [0, 1].

    8-bit data is divided by 255 and 16-bit data by 65535; float TIFFs must hold values in
    [0, 1]. Gray images are repeated into three channels and alpha is dropped.

    Raises:
        ImageReadError: missing file, a folder, an empty file, not an image, truncated or
            corrupt data, an unsupported channel layout or pixel type, a zero-size image or
            one of more than :data:`MAX_IMAGE_PIXELS` pixels.
    """
    pixels = _read_pixels(Path(path))
    data = pixels.data
    color = data[..., :1] if data.shape[2] <= 2 else data[..., :3]
    # one float32 HxWx3 allocation (gray is broadcast into it): the decoded samples plus this are the peak
    image = np.empty((data.shape[0], data.shape[1], 3), dtype=np.float32)
    if pixels.scale != 1.0:
        np.divide(color, np.float32(pixels.scale), out=image, dtype=np.float32, casting="unsafe")
    else:
        image[...] = color
    return image


def read_mask(path: str | Path, expected_hw: tuple[int, int] | None = None) -> np.ndarray:
    """Read a defect mask as ``bool`` ``HxW`` (True = defective pixel).

    The file must be single-channel (or RGB with equal channels; alpha is ignored) and hold
    0 plus at most one other value (e.g. 0/255, 0/1, 0/65535); a file holding one value only
    is all-good (0) or all-defective (anything else).

    Args:
        path: the mask file.
        expected_hw: the ``(H, W)`` of the image the mask belongs to; a mask of another size
            is an error.

    Raises:
        ImageReadError: everything :func:`read_image` refuses, a mask of the wrong size,
            a coloured mask or one with more than two distinct values.
    """
    path = Path(path)
    pixels = _read_pixels(path)
    data = pixels.data
    height, width = data.shape[:2]
    if expected_hw is not None and (height, width) != tuple(expected_hw):
        exp_h, exp_w = expected_hw
        raise ImageReadError(
            path, f"mask is {height}x{width} (HxW) but its image is {exp_h}x{exp_w}; a mask must have the image's size"
        )
    if data.shape[2] in (3, 4):
        rgb = data[..., :3]
        if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
            raise ImageReadError(path, "mask is coloured (its R, G and B channels differ); expected a black/white mask")
    values = data[..., 0]
    distinct = np.unique(values)
    if len(distinct) > 2 or (len(distinct) == 2 and distinct[0] != 0):
        shown = ", ".join(_format_value(v) for v in distinct[:8])
        more = f", ... ({len(distinct)} distinct values)" if len(distinct) > 8 else ""
        hint = " (JPEG compression blurs masks: save masks as PNG)" if pixels.format == "JPEG" else ""
        raise ImageReadError(
            path,
            f"mask is not binary: it holds the values {shown}{more}; expected 0 for good pixels "
            f"and one other value (e.g. 255) for defective pixels{hint}",
        )
    return np.ascontiguousarray(values != 0)


def image_size(path: str | Path) -> tuple[int, int]:
    """``(H, W)`` of an image as :func:`read_image` returns it (orientation applied), from its header only.

    Raises:
        ImageReadError: the file is missing, a folder, empty or not a readable image.
    """
    path = Path(path)
    _check_file(path)
    fmt = _format_of(path)
    if fmt == "TIFF":
        try:
            import tifffile

            with tifffile.TiffFile(path) as tif:
                page = tif.pages.first
                height, width = int(page.imagelength), int(page.imagewidth)
                if int(page.tags.valueof(274, 1) or 1) in _TRANSPOSING_ORIENTATIONS:
                    return width, height
                return height, width
        except Exception:  # noqa: BLE001 - PIL gets a try and reports the problem
            pass
    with _quiet_bomb_warning():
        try:
            with _pil_open(path, fmt) as im:
                if _exif_orientation(im) in _TRANSPOSING_ORIENTATIONS:
                    return im.width, im.height
                return im.height, im.width
        except Image.DecompressionBombError:
            raise ImageReadError(path, _too_large_message(None, None)) from None
        except UnidentifiedImageError:
            raise ImageReadError(path, _UNKNOWN_FORMAT) from None
        except Exception as exc:  # noqa: BLE001 - turned into a plain message
            raise ImageReadError(path, f"cannot read the image header ({_describe(exc)})") from None


def list_images(folder: str | Path, recursive: bool = False) -> list[Path]:
    """Image files in ``folder`` (by :data:`IMAGE_EXTENSIONS`), sorted by path.

    Hidden files and folders (names starting with ".", e.g. macOS ``._x.png``) are skipped.

    Raises:
        DatasetError: the folder is missing, is not a folder or holds no image file.
    """
    folder = Path(folder)
    if not folder.exists():
        raise DatasetError(f"{folder}: folder not found")
    if not folder.is_dir():
        raise DatasetError(f"{folder}: not a folder")
    images = sorted(p for p in _walk(folder, recursive) if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not images:
        where = "in it or its subfolders" if recursive else "directly in it"
        raise DatasetError(f"{folder}: no image files {where} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    return images


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """``HxWx3`` float image -> contiguous ``[3,H,W]`` float32 tensor (a copy)."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ConfigError(f"expected an HxWx3 image, got shape {image.shape}")
    import torch

    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32))


# --------------------------------------------------------------------------------------
# atomic writers
# --------------------------------------------------------------------------------------


def write_png(path: str | Path, array: np.ndarray, level: int = 6, strategy: int = zlib.Z_DEFAULT_STRATEGY) -> None:
    """Write a ``uint8`` ``HxW`` (gray) or ``HxWx3`` (RGB) array as PNG, atomically (see :func:`encode_png`).

    The data goes to a temporary file in the target folder which then replaces ``path``, so
    an error never leaves a half-written file. Missing parent folders are created.
    """
    data = encode_png(array, level, strategy)
    durable.write_file(path, data)


def encode_png(array: np.ndarray, level: int = 6, strategy: int = zlib.Z_DEFAULT_STRATEGY) -> bytes:
    """The PNG file bytes of a ``uint8`` ``HxW`` (gray) or ``HxWx3`` (RGB) array (e.g. to send over HTTP).

    Every row is stored with PNG's "Up" filter (the difference to the row above: cheap in numpy, and
    on heat maps and photos about as small as libpng's per-row filter choice), in one IDAT chunk
    deflated at zlib ``level`` (0-9) with ``strategy`` (``zlib.Z_DEFAULT_STRATEGY``, ``Z_RLE``...).
    The settings change size and time, never the pixels. numpy and zlib release the GIL, so
    several threads encode side by side (:class:`anomnet.predict.outputs.OutputWriter`).
    """
    array = np.asarray(array)
    if array.dtype != np.uint8 or not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3)):
        raise ConfigError(f"a PNG needs a uint8 HxW or HxWx3 array, got {array.dtype} of shape {array.shape}")
    if not 0 <= level <= 9:
        raise ConfigError(f"PNG compression level must be 0-9, got {level}")
    height, width = array.shape[:2]
    if height < 1 or width < 1:
        raise ConfigError(f"a PNG needs at least one pixel, got shape {array.shape}")
    rows = array.reshape(height, -1)
    body = np.empty((height, rows.shape[1] + 1), np.uint8)
    body[:, 0] = 2  # filter type Up
    body[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=body[1:, 1:])  # uint8 arithmetic wraps modulo 256, as PNG's filter
    deflate = zlib.compressobj(level, zlib.DEFLATED, 15, zlib.DEF_MEM_LEVEL, strategy)
    idat = deflate.compress(body.data) + deflate.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0 if array.ndim == 2 else 2, 0, 0, 0)
    chunks = (_png_chunk(b"IHDR", header), _png_chunk(b"IDAT", idat), _png_chunk(b"IEND", b""))
    return b"\x89PNG\r\n\x1a\n" + b"".join(chunks)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return b"".join((struct.pack(">I", len(data)), kind, data, struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))))


def write_tiff(path: str | Path, array: np.ndarray) -> None:
    """Write a 2-D ``float32`` or ``float16`` array (a raw anomaly map) as a single-page TIFF, atomically.

    ``float16`` is what MVTec AD 2's evaluation server accepts (:mod:`anomnet.predict.submission`).
    """
    from io import BytesIO as _BytesIO

    import tifffile

    array = np.asarray(array)
    if array.ndim != 2 or array.dtype not in (np.float32, np.float16):
        raise ConfigError(f"write_tiff needs a float32 or float16 HxW array, got {array.dtype} of shape {array.shape}")
    buf = _BytesIO()
    tifffile.imwrite(buf, np.ascontiguousarray(array))
    durable.write_file(path, buf.getvalue())


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (temporary file + ``os.replace``)."""
    data = text.encode("utf-8", errors="surrogateescape")  # non-UTF-8 file names keep their bytes
    durable.write_file(path, data)


# --------------------------------------------------------------------------------------
# output guards: checked before any work, so a bad path never costs a fit or loses a result
# --------------------------------------------------------------------------------------


def _real(path: str | Path) -> Path:
    return Path(os.path.realpath(os.fspath(path)))


def check_writable(path: str | Path, what: str, folder: bool = False) -> None:
    """Raise ConfigError unless ``path`` (a file, or a folder when ``folder``) can be created or replaced.

    The nearest existing ancestor must be a writable folder (a file in the way, a read-only
    file system or missing permissions are all reported here, before anything is computed).
    """
    target = Path(path)
    if target.exists() and (target.is_dir() != folder):
        kind = "a folder" if target.is_dir() else "a file"
        raise ConfigError(f"{what} {target}: is {kind}")
    probe = target if (folder and target.is_dir()) else target.parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"{what} {target}: cannot be created ({probe} is not a folder)")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {target}: cannot be written ({probe} is not writable)")
    try:
        fd, name = tempfile.mkstemp(prefix=".anomnet-write-check.", dir=probe)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        raise ConfigError(f"{what} {target}: cannot be written ({exc.strerror or exc})") from None


def check_not_input(target: str | Path, inputs: list[Path], what: str, folder: bool = False) -> None:
    """Raise ConfigError when writing ``target`` would replace an input file or land inside an input folder.

    ``inputs`` are the files and folders the command reads (images, image folders, model files).
    An output folder inside a scanned input folder would have its own heat maps scored next run.
    """
    out = _real(target)
    for item in inputs:
        src = _real(item)
        if out == src:
            raise ConfigError(f"{what} {target} is also an input ({item}): refusing to overwrite it")
        if folder and src.is_dir() and out.is_relative_to(src):
            raise ConfigError(f"{what} {target} lies inside the input folder {item}: choose a folder outside it")
        if not folder and src.is_dir() and out.is_relative_to(src) and out.suffix.lower() in IMAGE_EXTENSIONS:
            raise ConfigError(
                f"{what} {target} would be read as an image of the input folder {item}: choose another path"
            )


# --------------------------------------------------------------------------------------
# decoding
# --------------------------------------------------------------------------------------

_SUPPORTED = ("PNG", "JPEG", "TIFF", "BMP")
_UNKNOWN_FORMAT = "not an image file, or a format that cannot be read (supported: PNG, JPEG, TIFF, BMP)"
_OTHER_FORMATS = (
    (b"GIF8", "GIF"),
    (b"%!PS", "PostScript"),
    (b"\xc5\xd0\xd3\xc6", "EPS"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"\x00\x00\x02\x00", "CUR"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
    (b"\xffO\xffQ", "JPEG 2000"),
    (b"8BPS", "Photoshop"),
    (b"qoif", "QOI"),
    (b"DDS ", "DDS"),
    (b"%PDF", "PDF"),
)


def _format_of(path: Path) -> str:
    """The decoder for ``path`` by its first bytes (PNG, JPEG, TIFF or BMP); anything else is refused.

    PIL is only ever asked to open the format found here, so its other plugins (EPS, which runs
    Ghostscript, GIF, WebP, ICO, PPM, ...) are never reached whatever the file holds.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as exc:
        raise ImageReadError(path, f"cannot open the file ({exc.strerror or exc})") from None
    if head.startswith(_PNG_SIGNATURE):
        return "PNG"
    if head[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if head[:4] in _TIFF_MAGIC:
        return "TIFF"
    if head[:2] == b"BM":
        return "BMP"
    other = next((name for magic, name in _OTHER_FORMATS if head.startswith(magic)), None)
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        other = "WebP"
    elif len(head) > 2 and head[:1] == b"P" and head[1:2] in b"1234567" and head[2:3].isspace():
        other = "PNM"
    if other is not None:
        return _refuse_format(path, other)
    raise ImageReadError(path, _UNKNOWN_FORMAT)


def _refuse_format(path: Path, name: str) -> str:
    raise ImageReadError(path, f"{name} files are not read (supported: {', '.join(_SUPPORTED)})")


def _read_pixels(path: Path) -> _Pixels:
    """Decode ``path`` fully into :class:`_Pixels` (oriented); every failure is an :class:`ImageReadError`."""
    _check_file(path)
    fmt = _format_of(path)
    png: png_decode.PngHeader | None = None
    try:
        if fmt == "TIFF":
            pixels, orientation = _read_tiff(path)
            if pixels is not None:
                return _oriented(pixels, orientation)
        elif fmt == "PNG":
            with open(path, "rb") as f:
                png = png_decode.read_header(f.read(33))
                _check_dims(path, png.height, png.width)
                f.seek(0)
                png_decode.check_png(f)
    except DecodeError as exc:
        raise ImageReadError(path, f"corrupt or truncated image ({exc})") from None
    except OSError as exc:
        raise ImageReadError(path, f"cannot read the file ({exc.strerror or exc})") from None
    pixels, orientation = _read_with_pil(path, fmt, png)
    return _oriented(pixels, orientation)


def _check_file(path: Path) -> None:
    try:
        if not path.exists():
            raise ImageReadError(path, "file not found")
        if path.is_dir():
            raise ImageReadError(path, "is a folder, not an image file")
        if path.stat().st_size == 0:
            raise ImageReadError(path, "file is empty (0 bytes)")
        with open(path, "rb"):
            pass
    except ImageReadError:
        raise
    except OSError as exc:
        raise ImageReadError(path, f"cannot open the file ({exc.strerror or exc})") from None


def _check_dims(path: Path, height: int, width: int) -> None:
    """Refuse zero sizes, more than :data:`MAX_IMAGE_PIXELS` and sides further apart than :data:`MAX_ASPECT_RATIO`."""
    if height <= 0 or width <= 0:
        raise ImageReadError(path, f"image has zero size ({width}x{height} pixels)")
    if height * width > image_pixel_limit():
        raise ImageReadError(path, _too_large_message(height, width))
    if max(height, width) > MAX_ASPECT_RATIO * min(height, width):
        raise ImageReadError(
            path,
            f"image is {width}x{height} pixels, a side ratio of {max(height, width) / min(height, width):.0f}:1; "
            f"the limit is {MAX_ASPECT_RATIO}:1 (a corrupt header, or a strip to cut into parts first)",
        )


def _too_large_message(height: int | None, width: int | None) -> str:
    limit = f"the limit of {image_pixel_limit() / 1e6:.0f} megapixels (${MAX_MEGAPIXELS_ENV} raises it)"
    size = f"{width}x{height} = {height * width / 1e6:.0f} megapixels" if height and width else "too large"
    return f"image is {size}, more than {limit} (a corrupt header or a decompression bomb?)"


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return text or type(exc).__name__


def _format_value(value: np.generic) -> str:
    return str(int(value)) if np.asarray(value).dtype.kind in "iub" else f"{float(value):g}"


@contextmanager
def _quiet_bomb_warning() -> Iterator[None]:
    """Silence PIL's decompression-bomb warning: :data:`MAX_IMAGE_PIXELS` is checked here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        yield


_strict_lock = threading.Lock()
_strict_depth = 0
_strict_saved = False


@contextmanager
def _strict_truncation() -> Iterator[None]:
    """Turn ``ImageFile.LOAD_TRUNCATED_IMAGES`` off while decoding (restored afterwards).

    Nested or concurrent readers share one counter, so the flag comes back only after the
    last reader has finished.
    """
    global _strict_depth, _strict_saved
    with _strict_lock:
        if _strict_depth == 0:
            _strict_saved = ImageFile.LOAD_TRUNCATED_IMAGES
            ImageFile.LOAD_TRUNCATED_IMAGES = False
        _strict_depth += 1
    try:
        yield
    finally:
        with _strict_lock:
            _strict_depth -= 1
            if _strict_depth == 0:
                ImageFile.LOAD_TRUNCATED_IMAGES = _strict_saved


@contextmanager
def _pil_open(path: Path, fmt: str) -> Iterator[ImageFile.ImageFile]:
    """``Image.open`` restricted to the one plugin ``fmt`` (no other PIL plugin is ever tried)."""
    with open(path, "rb") as f, Image.open(f, formats=[fmt]) as im:
        yield im


def _read_with_pil(path: Path, fmt: str, png: png_decode.PngHeader | None) -> tuple[_Pixels, int]:
    """Decode with PIL in stored pixel order; returns the pixels and the orientation to apply."""
    with _strict_truncation(), _quiet_bomb_warning():
        try:
            with _pil_open(path, fmt) as im:
                _check_dims(path, im.height, im.width)
                im.load()
                orientation = _exif_orientation(im) or 1
                if png is not None and png.depth == 16 and png.color_type in (2, 4, 6):
                    return _Pixels(_png16(path, im, png.color_type), 65535.0, "PNG"), orientation
                return _pil_to_pixels(path, im), orientation
        except ImageReadError:
            raise
        except Image.DecompressionBombError:
            raise ImageReadError(path, _too_large_message(None, None)) from None
        except UnidentifiedImageError:
            raise ImageReadError(path, _UNKNOWN_FORMAT) from None
        except MemoryError:
            raise ImageReadError(path, "not enough memory to decode the image") from None
        except Exception as exc:  # noqa: BLE001 - any decoder failure means bad data
            raise ImageReadError(path, f"corrupt or truncated image data ({_describe(exc)})") from None


_EXIF_ORIENTATION = 0x0112
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def _exif_orientation(im: Image.Image) -> int | None:
    """The orientation PIL finds in EXIF (JPEG APP1, PNG eXIf, TIFF tag 274) or XMP, if valid."""
    try:
        if im.format == "PNG" and "exif" not in im.info and not im.im:
            value = Image.Image.getexif(im).get(_EXIF_ORIENTATION)  # header only: PNG's getexif would decode
        else:
            value = im.getexif().get(_EXIF_ORIENTATION)
    except Exception:  # noqa: BLE001 - a damaged EXIF block is ignored like an absent one
        return None
    return value if isinstance(value, int) and 1 <= value <= 8 else None


def _oriented(pixels: _Pixels, orientation: int) -> _Pixels:
    """Turn stored pixels the way viewers show them (EXIF orientation 1-8, the same for every format)."""
    data = pixels.data
    turned = {
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1],
        5: lambda a: a.transpose(1, 0, 2),
        6: lambda a: a.transpose(1, 0, 2)[:, ::-1],
        7: lambda a: a.transpose(1, 0, 2)[::-1, ::-1],
        8: lambda a: a.transpose(1, 0, 2)[::-1],
    }.get(orientation)
    if turned is None:
        return pixels
    return pixels._replace(data=np.ascontiguousarray(turned(data)))


def _as_hwc(array: np.ndarray) -> np.ndarray:
    return array[..., None] if array.ndim == 2 else array


def _pil_to_pixels(path: Path, im: Image.Image) -> _Pixels:
    """Turn a loaded PIL image into :class:`_Pixels` by its mode."""
    fmt = im.format or ""
    mode = im.mode
    if mode == "1":
        return _Pixels(_as_hwc(np.asarray(im.convert("L"))), 255.0, fmt)
    if mode in ("L", "LA", "RGB", "RGBA"):
        return _Pixels(_as_hwc(np.asarray(im)), 255.0, fmt)
    if mode in ("P", "PA"):
        target = "RGBA" if mode == "PA" or "transparency" in im.info else "RGB"
        return _Pixels(np.asarray(im.convert(target)), 255.0, fmt)
    conversions = {"La": "LA", "RGBa": "RGBA", "RGBX": "RGB", "CMYK": "RGB", "YCbCr": "RGB", "LAB": "RGB", "HSV": "RGB"}
    if mode in conversions:
        return _Pixels(_as_hwc(np.asarray(im.convert(conversions[mode]))), 255.0, fmt)
    if mode.startswith("I;16"):
        return _Pixels(_as_hwc(np.asarray(im).astype(np.uint16)), 65535.0, fmt)
    if mode == "I":
        data = np.asarray(im)
        if data.size and (data.min() < 0 or data.max() > 65535):
            raise ImageReadError(path, "32-bit integer pixels outside 0..65535 are not supported")
        return _Pixels(_as_hwc(data.astype(np.uint16)), 65535.0, fmt)
    if mode == "F":
        return _Pixels(_as_hwc(_checked_float(path, np.asarray(im))), 1.0, fmt)
    raise ImageReadError(path, f"unsupported pixel format (PIL mode {mode!r})")


def _checked_float(path: Path, data: np.ndarray) -> np.ndarray:
    data = data.astype(np.float32)
    if not np.isfinite(data).all():
        raise ImageReadError(path, "floating-point image holds NaN or infinite values")
    if data.size and (data.min() < 0.0 or data.max() > 1.0):
        raise ImageReadError(
            path,
            f"floating-point pixel values must lie in [0, 1]; this image holds values "
            f"from {float(data.min()):g} to {float(data.max()):g}",
        )
    return data


# ----------------------------------------------------------------------------- 16-bit colour PNG


def _png16(path: Path, im: Image.Image, color_type: int) -> np.ndarray:
    """Full-precision pixels of a 16-bit colour PNG (``uint16`` HxWxC), decoded by PIL's own C decoder.

    PIL keeps only the high byte of each 16-bit colour sample. Its PNG decoder (which undoes the
    filters and the Adam7 interlacing) is run again with an unpacker that keeps the bytes PIL
    drops: the low bytes for RGB / RGBA ("RGB;16L" reads the second byte of each big-endian
    sample as its high one), all four bytes for gray+alpha (decoded as 8-bit RGBA, which has
    the same bytes per pixel).
    """
    if color_type == 4:
        raw = _pil_redecode(path, "RGBA").astype(np.uint16)
        return np.stack([(raw[..., 0] << 8) | raw[..., 1], (raw[..., 2] << 8) | raw[..., 3]], axis=-1)
    high = np.asarray(im)
    low = _pil_redecode(path, "RGB;16L" if color_type == 2 else "RGBA;16L")
    out = high.astype(np.uint16) << 8
    out |= low
    return out


def _pil_redecode(path: Path, rawmode: str) -> np.ndarray:
    with _pil_open(path, "PNG") as im:
        tile = im.tile[0]
        # Pillow >= 11 keeps tiles as named tuples, older versions as plain ones
        replaced: Any = tile._replace(args=rawmode) if hasattr(tile, "_replace") else (*tile[:3], rawmode)
        im.tile = [replaced]
        im.load()
        return np.asarray(im)


# ----------------------------------------------------------------------------- TIFF

_PHOTOMETRIC_COLOR_CHANNELS = {0: 1, 1: 1, 3: 1, 2: 3, 6: 3, 8: 3, 9: 3, 10: 3, 5: 4}
"""TIFF photometric interpretation -> colour samples (miniswhite, minisblack, palette, rgb,
ycbcr, cielab, icclab, itulab, separated/CMYK)."""
_SAMPLE_KINDS = {1: "u", 2: "i", 3: "f"}


def _read_tiff(path: Path) -> tuple[_Pixels | None, int]:
    """Decode a TIFF's first page here (bounded, see :mod:`anomnet.decoders.tiff`) or leave it to PIL.

    Gray and RGB(A) pages of 8 bits or more in a compression decoded here are read here (PIL
    reduces 16-bit RGB to 8 bits, cannot open float RGB and drops extra channels); the others
    (palette, CMYK, YCbCr, 1-bit, JPEG-compressed, ...) go to PIL: ``(None, 1)``. Channel
    layouts are checked here for every TIFF. Returns the pixels in stored order and the
    Orientation tag.
    """
    import tifffile

    try:
        tif = tifffile.TiffFile(path)
    except Exception:  # noqa: BLE001 - PIL gets a try and reports the problem
        return None, 1
    with tif:
        if not tif.pages:
            raise ImageReadError(path, "TIFF file holds no image")
        try:
            page = tif.pages.first
            height, width = int(page.imagelength), int(page.imagewidth)
            spp = int(page.samplesperpixel)
            photometric = int(page.photometric)
            extras = [int(e) for e in (page.extrasamples or ())]
            bits = int(page.bitspersample)
            kind = _SAMPLE_KINDS.get(int(page.sampleformat), "?")
            compression = int(page.compression)
            orientation = int(page.tags.valueof(274, 1) or 1)
            layout = tiff_decode.Layout(
                height,
                width,
                spp,
                np.dtype(f"{tif.byteorder}{kind}{bits // 8}")
                if kind != "?" and bits in (8, 16, 32, 64)
                else np.dtype("V1"),
                int(page.planarconfig) == 2,
                compression,
                int(page.predictor),
                int(page.rowsperstrip),
                (int(page.tilelength), int(page.tilewidth)) if page.is_tiled else None,
                tuple(int(o) for o in page.dataoffsets),
                tuple(int(c) for c in page.databytecounts),
            )
            depth, fill_order = int(page.imagedepth), int(page.fillorder)
        except Exception as exc:  # noqa: BLE001 - damaged header
            raise ImageReadError(path, f"damaged TIFF header ({_describe(exc)})") from None
        _check_dims(path, height, width)
        color = _PHOTOMETRIC_COLOR_CHANNELS.get(photometric)
        if color is None:
            return None, 1
        extra = spp - color
        has_alpha = extra == 1 and bool(extras) and extras[0] in (1, 2)
        if extra < 0 or extra > 1 or (extra == 1 and not has_alpha):
            raise ImageReadError(
                path,
                f"{spp} channels per pixel are not supported; an image must be gray, gray+alpha, RGB or RGBA",
            )
        if photometric not in (1, 2) or bits < 8:
            return None, 1
        if layout.dtype.kind == "V":
            raise ImageReadError(path, f"{bits}-bit TIFF samples (sample format {page.sampleformat}) are not supported")
        if depth != 1 or fill_order != 1:
            raise ImageReadError(path, "TIFF volumes and reversed bit order (FillOrder 2) are not supported")
        pil_exact = bits == 8 or (bits == 16 and kind == "u" and spp == 1)
        if compression == 5 and pil_exact:
            return None, 1  # libtiff's LZW is fast; the one here (pure Python) is for what PIL would round
        if compression not in tiff_decode.COMPRESSIONS:
            if pil_exact:
                return None, 1  # PIL (libtiff) decodes these exactly, with bounded buffers
            raise ImageReadError(
                path,
                f"TIFF compression {compression} is not supported for {bits}-bit colour or float images "
                f"(supported: {', '.join(sorted(set(tiff_decode.COMPRESSIONS.values())))})",
            )
    try:
        with open(path, "rb") as f:
            data = tiff_decode.decode(f, layout, path.stat().st_size)
    except DecodeError as exc:
        raise ImageReadError(path, f"corrupt or truncated TIFF data ({exc})") from None
    except MemoryError:
        raise ImageReadError(path, "not enough memory to decode the image") from None
    return _tiff_scale(path, data), orientation


def _tiff_dtype(byteorder: str, kind: str, bits: int) -> np.dtype:
    """The samples' dtype in file byte order; ``V1`` (refused later) for kinds and sizes numpy has not."""
    if kind == "?" or bits not in (8, 16, 32, 64) or (kind == "f" and bits == 8):
        return np.dtype("V1")
    return np.dtype(f"{byteorder}{kind}{bits // 8}")


def _tiff_scale(path: Path, data: np.ndarray) -> _Pixels:
    if data.dtype.kind == "u" and data.dtype.itemsize == 1:
        return _Pixels(data.astype(np.uint8, copy=False), 255.0, "TIFF")
    if data.dtype.kind == "u" and data.dtype.itemsize == 2:
        return _Pixels(data.astype(np.uint16, copy=False), 65535.0, "TIFF")
    if data.dtype.kind == "f":
        return _Pixels(_checked_float(path, data), 1.0, "TIFF")
    kind = {"i": "signed integer", "u": "unsigned integer", "c": "complex", "b": "boolean"}.get(data.dtype.kind, "")
    raise ImageReadError(
        path,
        f"{data.dtype.itemsize * 8}-bit {kind} pixels are not supported "
        f"(supported: 8- and 16-bit unsigned integers, float in [0, 1])",
    )


# ----------------------------------------------------------------------------- folders


def _walk(folder: Path, recursive: bool, _seen: set[tuple[int, int]] | None = None) -> Iterator[Path]:
    """Files in ``folder`` (and its subfolders when ``recursive``), skipping hidden names.

    Symlinked folders are followed, but every real folder is visited once, so a link back to
    an ancestor (``ln -s . x``) neither loops nor lists the same files twice.
    """
    seen = _seen if _seen is not None else set()
    try:
        st = folder.stat()
        entries = sorted(folder.iterdir())
    except OSError as exc:
        raise DatasetError(f"{folder}: cannot list the folder ({exc.strerror or exc})") from None
    key = (st.st_dev, st.st_ino)
    if key in seen:
        return
    seen.add(key)
    for entry in entries:
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            if recursive:
                yield from _walk(entry, recursive, seen)
        elif entry.is_file():
            try:
                file_st = entry.stat()
            except OSError:
                continue
            file_key = (file_st.st_dev, file_st.st_ino)
            if file_key not in seen:  # two links to one file: scored once
                seen.add(file_key)
                yield entry
