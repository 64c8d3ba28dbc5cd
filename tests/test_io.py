"""Tests of anomnet.imageio: every supported image kind, every bad input, masks, folders, writers."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image, ImageFile

from anomnet import durable, imageio
from anomnet.errors import ConfigError, DatasetError, ImageReadError

RNG = np.random.default_rng(0)


def _u8(shape: tuple[int, ...]) -> np.ndarray:
    return RNG.integers(0, 256, shape, dtype=np.uint8)


def _u16(shape: tuple[int, ...]) -> np.ndarray:
    return RNG.integers(0, 65536, shape, dtype=np.uint16)


def _as_rgb(gray: np.ndarray, scale: float) -> np.ndarray:
    return np.repeat(gray[..., None].astype(np.float32) / np.float32(scale), 3, axis=2)


# ------------------------------------------------------------------ a 16-bit PNG encoder


def _paeth(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    p = a + b - c
    pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
    return np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))


def _png16(values: np.ndarray, color_type: int, filters: np.ndarray) -> bytes:
    """Encode ``uint16`` HxWxC as a 16-bit PNG using the given filter type per row."""
    h, w, ch = values.shape
    raw = np.empty((h, w, ch, 2), np.int32)
    raw[..., 0], raw[..., 1] = values >> 8, values & 0xFF
    raw = raw.reshape(h, w, 2 * ch)
    pad = np.zeros((h + 1, w + 1, 2 * ch), np.int32)
    pad[1:, 1:] = raw
    a, b, c = pad[1:, :-1], pad[:-1, 1:], pad[:-1, :-1]
    preds = [np.zeros_like(a), a, b, (a + b) >> 1, _paeth(a, b, c)]
    rows = b"".join(
        bytes([f]) + ((raw[r] - preds[f][r]) & 0xFF).astype(np.uint8).tobytes() for r, f in enumerate(filters)
    )

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims ``width`` x ``height`` (the data is a stub)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")
    )
    return path


# ------------------------------------------------------------------ supported images


def test_extensions() -> None:
    assert frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}) == imageio.IMAGE_EXTENSIONS


@pytest.mark.parametrize("ext", [".png", ".bmp", ".tif"])
def test_rgb8_lossless(tmp_path: Path, ext: str) -> None:
    data = _u8((7, 11, 3))
    Image.fromarray(data).save(tmp_path / f"x{ext}")
    img = imageio.read_image(tmp_path / f"x{ext}")
    assert img.dtype == np.float32 and img.shape == (7, 11, 3) and img.flags.c_contiguous
    np.testing.assert_array_equal(img, data.astype(np.float32) / 255)


def test_gray8_repeated_to_rgb(tmp_path: Path) -> None:
    data = _u8((6, 5))
    Image.fromarray(data, "L").save(tmp_path / "g.png")
    np.testing.assert_array_equal(imageio.read_image(tmp_path / "g.png"), _as_rgb(data, 255))


def test_gray_alpha_drops_alpha(tmp_path: Path) -> None:
    data = _u8((6, 5, 2))
    Image.fromarray(data, "LA").save(tmp_path / "la.png")
    np.testing.assert_array_equal(imageio.read_image(tmp_path / "la.png"), _as_rgb(data[..., 0], 255))


def test_rgba_drops_alpha(tmp_path: Path) -> None:
    data = _u8((6, 5, 4))
    data[..., 3] = 0  # fully transparent: colour must still come through unchanged
    Image.fromarray(data, "RGBA").save(tmp_path / "a.png")
    np.testing.assert_array_equal(imageio.read_image(tmp_path / "a.png"), data[..., :3].astype(np.float32) / 255)


def test_palette(tmp_path: Path) -> None:
    im = Image.new("P", (4, 3))
    im.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    im.putdata([0, 1, 2, 1] * 3)
    im.save(tmp_path / "p.png")
    img = imageio.read_image(tmp_path / "p.png")
    np.testing.assert_array_equal(img[0, 1], [1, 0, 0])
    np.testing.assert_array_equal(img[0, 2], [0, 0, 1])
    np.testing.assert_array_equal(img[0, 0], [0, 0, 0])


@pytest.mark.parametrize("ext", [".png", ".bmp", ".tif"])
def test_one_bit(tmp_path: Path, ext: str) -> None:
    bits = RNG.integers(0, 2, (9, 10)).astype(bool)
    Image.fromarray(bits).convert("1").save(tmp_path / f"b{ext}")
    np.testing.assert_array_equal(imageio.read_image(tmp_path / f"b{ext}"), _as_rgb(bits.astype(np.uint8), 1))


def test_jpeg(tmp_path: Path) -> None:
    data = np.full((16, 16, 3), (200, 100, 50), np.uint8)
    Image.fromarray(data).save(tmp_path / "x.jpg", quality=95)
    img = imageio.read_image(tmp_path / "x.jpg")
    assert img.shape == (16, 16, 3) and img.dtype == np.float32
    np.testing.assert_allclose(img, data / 255, atol=3 / 255)


def test_gray16_png_keeps_precision(tmp_path: Path) -> None:
    data = np.full((4, 5), 1000, np.uint16)
    data[0, 0], data[1, 1] = 1001, 65535
    Image.fromarray(data).save(tmp_path / "g16.png")
    img = imageio.read_image(tmp_path / "g16.png")
    assert img[2, 2, 0] == np.float32(1000) / np.float32(65535)
    assert img[0, 0, 0] != img[2, 2, 0]  # 1001 and 1000 stay distinct: no 8-bit rounding
    np.testing.assert_array_equal(img, _as_rgb(data, 65535))


@pytest.mark.parametrize(("color_type", "channels"), [(2, 3), (6, 4), (4, 2)])
@pytest.mark.parametrize("filters", ["all", "simple"])
def test_colour16_png_keeps_precision(tmp_path: Path, color_type: int, channels: int, filters: str) -> None:
    """PIL keeps only the high byte of 16-bit colour PNGs; io decodes the low byte too."""
    h, w = 13, 17
    data = _u16((h, w, channels))
    kinds = RNG.integers(0, 5 if filters == "all" else 3, h)
    kinds[:5] = [0, 1, 2, 3, 4] if filters == "all" else [0, 1, 2, 0, 2]  # every filter type occurs
    (tmp_path / "c16.png").write_bytes(_png16(data, color_type, kinds))
    img = imageio.read_image(tmp_path / "c16.png")
    expected = _as_rgb(data[..., 0], 65535) if channels == 2 else data[..., :3].astype(np.float32) / np.float32(65535)
    np.testing.assert_array_equal(img, expected)


def test_rgb16_tiff_keeps_precision(tmp_path: Path) -> None:
    data = _u16((5, 6, 3))
    data[0, 0] = (1000, 1001, 65535)
    tifffile.imwrite(tmp_path / "x.tif", data, photometric="rgb")
    img = imageio.read_image(tmp_path / "x.tif")
    np.testing.assert_array_equal(img, data.astype(np.float32) / np.float32(65535))


def test_rgb16_tiff_planar(tmp_path: Path) -> None:
    data = _u16((4, 3, 5))  # planar RGB: S, Y, X
    tifffile.imwrite(tmp_path / "p.tiff", data[:3], photometric="rgb", planarconfig="separate")
    img = imageio.read_image(tmp_path / "p.tiff")
    np.testing.assert_array_equal(img, np.moveaxis(data[:3], 0, -1).astype(np.float32) / np.float32(65535))


def test_float_tiff(tmp_path: Path) -> None:
    gray = RNG.random((5, 4), dtype=np.float32)
    rgb = RNG.random((5, 4, 3), dtype=np.float32)
    tifffile.imwrite(tmp_path / "g.tif", gray)
    tifffile.imwrite(tmp_path / "c.tif", rgb, photometric="rgb")
    np.testing.assert_array_equal(imageio.read_image(tmp_path / "g.tif"), np.repeat(gray[..., None], 3, axis=2))
    np.testing.assert_array_equal(imageio.read_image(tmp_path / "c.tif"), rgb)


def test_float_tiff_out_of_range(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "f.tif", np.full((3, 3), 2.5, np.float32))
    with pytest.raises(ImageReadError, match=r"\[0, 1\].*2\.5"):
        imageio.read_image(tmp_path / "f.tif")


def test_extension_does_not_matter(tmp_path: Path) -> None:
    data = _u8((3, 4, 3))
    Image.fromarray(data).save(tmp_path / "really_a_png.jpg", format="PNG")
    np.testing.assert_array_equal(imageio.read_image(tmp_path / "really_a_png.jpg"), data / np.float32(255))


# ------------------------------------------------------------------ bad images


def _valid_bytes(tmp_path: Path, fmt: str) -> bytes:
    path = tmp_path / f"valid.{fmt.lower()}"
    Image.fromarray(_u8((64, 64, 3))).save(path, format=fmt)
    return path.read_bytes()


def _bad(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / "x.png"
    if kind == "missing":
        return tmp_path / "nothing_here.png"
    if kind == "folder":
        path.mkdir()
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "random":
        path.write_bytes(np.random.default_rng(1).integers(0, 256, 777, dtype=np.uint8).tobytes())
    elif kind == "text":
        path.write_text("not an image at all\n")
    elif kind == "truncated_png":
        data = _valid_bytes(tmp_path, "PNG")
        path.write_bytes(data[: len(data) // 2])
    elif kind == "truncated_jpeg":
        data = _valid_bytes(tmp_path, "JPEG")
        path = tmp_path / "x.jpg"
        path.write_bytes(data[: len(data) // 2])
    elif kind == "truncated_tiff":
        path = tmp_path / "x.tif"
        tifffile.imwrite(path, _u16((64, 64, 3)), photometric="rgb")
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "corrupt_png":
        data = bytearray(_valid_bytes(tmp_path, "PNG"))
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    elif kind == "two_channel_tiff":
        path = tmp_path / "x.tif"
        tifffile.imwrite(path, _u8((5, 6, 2)), photometric="minisblack", planarconfig="contig")
    elif kind == "five_channel_tiff":
        path = tmp_path / "x.tif"
        tifffile.imwrite(path, _u8((5, 6, 5)), photometric="minisblack", planarconfig="contig")
    elif kind == "int32_tiff":
        path = tmp_path / "x.tif"
        tifffile.imwrite(path, np.full((4, 4), -5, np.int32))
    elif kind == "bomb":
        _png_header_only(path, 12_000, 9_000)  # 108 megapixels
    elif kind == "huge_bomb":
        _png_header_only(path, 30_000, 30_000)  # beyond PIL's own hard limit
    return path


BAD = {
    "missing": "not found",
    "folder": "is a folder",
    "empty": "empty",
    "random": "not an image",
    "text": "not an image",
    "truncated_png": "truncated",
    "truncated_jpeg": "truncated",
    "truncated_tiff": "truncated",
    "corrupt_png": "corrupt",
    "two_channel_tiff": "2 channels",
    "five_channel_tiff": "5 channels",
    "int32_tiff": "32-bit signed integer",
    "bomb": "108 megapixels",
    "huge_bomb": "decompression bomb",
}


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_image_names_file_and_problem(tmp_path: Path, kind: str) -> None:
    path = _bad(tmp_path, kind)
    with pytest.raises(ImageReadError) as info:
        imageio.read_image(path)
    message = str(info.value)
    assert str(path) in message and BAD[kind] in message
    assert info.value.path == path
    assert info.value.__cause__ is None  # no PIL / numpy traceback chained in


def test_truncated_refused_even_if_pil_is_lenient(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(ImageReadError, match="truncated"):
        imageio.read_image(_bad(tmp_path, "truncated_png"))
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored afterwards


def test_zero_size(tmp_path: Path) -> None:
    path = _png_header_only(tmp_path / "z.png", 0, 10)
    with pytest.raises(ImageReadError, match="z.png"):
        imageio.read_image(path)


# ------------------------------------------------------------------ masks


@pytest.mark.parametrize(
    ("dtype", "value", "mode"),
    [(np.uint8, 255, "L"), (np.uint8, 1, "L"), (np.uint16, 65535, None), (np.uint8, 255, "RGB"), (np.uint8, 255, "1")],
)
def test_mask_binary(tmp_path: Path, dtype: type, value: int, mode: str | None) -> None:
    truth = np.zeros((8, 9), bool)
    truth[2:5, 3:7] = True
    values = truth.astype(dtype) * dtype(value)
    if mode == "RGB":
        im = Image.fromarray(np.repeat(values[..., None], 3, axis=2))
    elif mode == "1":
        im = Image.fromarray(truth).convert("1")
    else:
        im = Image.fromarray(values)
    im.save(tmp_path / "m.png")
    mask = imageio.read_mask(tmp_path / "m.png", expected_hw=(8, 9))
    assert mask.dtype == np.bool_
    np.testing.assert_array_equal(mask, truth)


@pytest.mark.parametrize("value", [0, 255])
def test_mask_single_value(tmp_path: Path, value: int) -> None:
    Image.fromarray(np.full((4, 4), value, np.uint8)).save(tmp_path / "m.png")
    assert (imageio.read_mask(tmp_path / "m.png") == bool(value)).all()


def test_mask_wrong_size_names_mask_and_sizes(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(tmp_path / "m.png")
    with pytest.raises(ImageReadError) as info:
        imageio.read_mask(tmp_path / "m.png", expected_hw=(20, 24))
    message = str(info.value)
    assert str(tmp_path / "m.png") in message and "10x12" in message and "20x24" in message


def test_mask_not_binary_lists_values(tmp_path: Path) -> None:
    Image.fromarray(np.array([[0, 7, 255, 128]], np.uint8)).save(tmp_path / "m.png")
    with pytest.raises(ImageReadError, match=r"m\.png.*not binary.*0, 7, 128, 255"):
        imageio.read_mask(tmp_path / "m.png")


def test_mask_two_nonzero_values(tmp_path: Path) -> None:
    Image.fromarray(np.array([[100, 200]], np.uint8)).save(tmp_path / "m.png")
    with pytest.raises(ImageReadError, match="100, 200"):
        imageio.read_mask(tmp_path / "m.png")


def test_mask_many_values_are_abbreviated(tmp_path: Path) -> None:
    Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16)).save(tmp_path / "m.png")
    with pytest.raises(ImageReadError, match=r"256 distinct values"):
        imageio.read_mask(tmp_path / "m.png")


def test_mask_coloured(tmp_path: Path) -> None:
    data = np.zeros((3, 3, 3), np.uint8)
    data[1, 1] = (255, 0, 0)
    Image.fromarray(data).save(tmp_path / "m.png")
    with pytest.raises(ImageReadError, match="coloured"):
        imageio.read_mask(tmp_path / "m.png")


def test_mask_jpeg_hint(tmp_path: Path) -> None:
    data = np.zeros((32, 32), np.uint8)
    data[8:20, 5:27] = 255
    Image.fromarray(data).save(tmp_path / "m.jpg", quality=50)
    with pytest.raises(ImageReadError, match="PNG"):
        imageio.read_mask(tmp_path / "m.jpg")


def test_mask_bad_file(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError, match="not found"):
        imageio.read_mask(tmp_path / "none.png")


# ------------------------------------------------------------------ headers, folders, tensors


def test_image_size(tmp_path: Path) -> None:
    Image.fromarray(_u8((7, 11, 3))).save(tmp_path / "x.jpg")
    tifffile.imwrite(tmp_path / "f.tif", RNG.random((5, 9, 3), dtype=np.float32), photometric="rgb")
    assert imageio.image_size(tmp_path / "x.jpg") == (7, 11)
    assert imageio.image_size(str(tmp_path / "f.tif")) == (5, 9)
    with pytest.raises(ImageReadError, match="not found"):
        imageio.image_size(tmp_path / "none.png")
    with pytest.raises(ImageReadError, match="not an image"):
        imageio.image_size(_bad(tmp_path, "random"))


def test_image_size_does_not_decode(tmp_path: Path) -> None:
    path = _bad(tmp_path, "truncated_png")
    assert imageio.image_size(path) == (64, 64)


def test_list_images(tmp_path: Path) -> None:
    for name in ["b.png", "a.JPG", "c.tiff", "d.bmp", "e.jpeg", "f.TIF", "notes.txt", ".hidden.png", "._a.png"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "z.png").write_bytes(b"x")
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "y.png").write_bytes(b"x")
    names = [p.name for p in imageio.list_images(tmp_path)]
    assert names == ["a.JPG", "b.png", "c.tiff", "d.bmp", "e.jpeg", "f.TIF"]
    recursive = imageio.list_images(str(tmp_path), recursive=True)
    assert recursive[-1] == tmp_path / "sub" / "z.png" and len(recursive) == 7


def test_list_images_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"no image files.*\.png"):
        imageio.list_images(tmp_path)
    with pytest.raises(DatasetError, match="not found"):
        imageio.list_images(tmp_path / "missing")
    (tmp_path / "f.png").write_bytes(b"x")
    with pytest.raises(DatasetError, match="not a folder"):
        imageio.list_images(tmp_path / "f.png")


def test_to_tensor() -> None:
    image = RNG.random((4, 5, 3), dtype=np.float32)
    t = imageio.to_tensor(image)
    assert t.shape == (3, 4, 5) and t.dtype == torch.float32 and t.is_contiguous()
    np.testing.assert_array_equal(t.numpy(), image.transpose(2, 0, 1))
    with pytest.raises(ConfigError):
        imageio.to_tensor(np.zeros((4, 5), np.float32))


# ------------------------------------------------------------------ writers


@pytest.mark.parametrize("shape", [(6, 7), (6, 7, 3)])
def test_write_png_round_trip(tmp_path: Path, shape: tuple[int, ...]) -> None:
    data = _u8(shape)
    target = tmp_path / "out" / "x.png"
    imageio.write_png(target, data)
    np.testing.assert_array_equal(np.asarray(Image.open(target)), data)
    assert os.listdir(target.parent) == ["x.png"]


def test_write_png_rejects_bad_arrays(tmp_path: Path) -> None:
    for bad in (np.zeros((4, 4), np.float32), np.zeros((4, 4, 2), np.uint8)):
        with pytest.raises(ConfigError):
            imageio.write_png(tmp_path / "x.png", bad)
    assert not list(tmp_path.iterdir())


def test_write_png_failure_leaves_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "x.png"
    target.write_bytes(b"old")

    def failing_fsync(fd: int) -> None:  # the temporary file holds the new data, then the disk fails
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="disk full"):
        imageio.write_png(target, _u8((3, 3)))
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["x.png"]


def test_atomic_write_text(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b.json"
    imageio.atomic_write_text(target, "first")
    imageio.atomic_write_text(str(target), "zweite ünïcode\n")
    assert target.read_text(encoding="utf-8") == "zweite ünïcode\n"
    assert os.listdir(target.parent) == ["b.json"]


def test_atomic_writes_get_the_usual_permissions(tmp_path) -> None:
    import os

    from anomnet.imageio import atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "r.html", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "r.html").stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("shape", [(1, 1), (5, 7), (7, 5, 3), (33, 64, 3)])
@pytest.mark.parametrize("level", [0, 1, 4, 9])
def test_encode_png_settings_keep_the_pixels(tmp_path: Path, shape: tuple[int, ...], level: int) -> None:
    from io import BytesIO

    data = np.random.default_rng(level).integers(0, 256, shape, dtype=np.uint8)
    for strategy in (zlib.Z_DEFAULT_STRATEGY, zlib.Z_RLE):
        png = imageio.encode_png(data, level, strategy)
        assert np.array_equal(np.asarray(Image.open(BytesIO(png))), data)
        durable.write_file(tmp_path / "x.png", png)  # our own reader walks every chunk and CRC
        rgb = data if data.ndim == 3 else np.repeat(data[..., None], 3, axis=2)
        assert np.array_equal(np.round(imageio.read_image(tmp_path / "x.png") * 255).astype(np.uint8), rgb)
    with pytest.raises(ConfigError, match="level"):
        imageio.encode_png(data, 10)
