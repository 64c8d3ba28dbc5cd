"""The image reader under hostile input: every case a fuzzing run found, as a generated file.

Bombs are measured in a child process (peak resident memory against a bound), hangs under a
time limit; the rest are direct: each file is either read correctly or refused with an
:class:`ImageReadError` naming it, and ``anomnet predict`` gives it an error row (exit 3).
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import EpsImagePlugin, Image

from anomnet import imageio
from anomnet.errors import ConfigError, ImageReadError
from hostile_images import (
    bomb_stream,
    chunk,
    lzw_encode,
    make_png8_bomb,
    make_png16_bomb,
    make_tiff_deflate_bomb,
    png16_rows,
    png_bytes,
    tiff_bytes,
)

RNG = np.random.default_rng(21)
SRC = Path(__file__).resolve().parents[1] / "src"


def _child(code: str, timeout: float = 60) -> dict:
    """Run ``code`` in a fresh python (anomnet importable); it prints one JSON line, returned here."""
    env = {"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=timeout, env=env
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _read_peak(path: Path) -> dict:
    """Peak memory (MB) that reading ``path`` adds, and the outcome, measured in a child process."""
    return _child(
        f"""
        import json, resource
        from anomnet import imageio
        from anomnet.errors import ConfigError, ImageReadError
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            imageio.read_image({str(path)!r})
            outcome = "read"
        except ImageReadError as exc:
            outcome = exc.problem
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({{"peak_mb": (after - before) / 1024, "outcome": outcome}}))
        """
    )


# ------------------------------------------------------------------ memory: bombs


@pytest.mark.parametrize("make", [make_png16_bomb, make_png8_bomb, make_tiff_deflate_bomb])
def test_decompression_bombs_are_refused_within_bounded_memory(tmp_path: Path, make) -> None:
    path = make(tmp_path)  # 1x1 pixel promised, 256 MB of image data inside
    assert path.stat().st_size < 400_000
    result = _read_peak(path)
    assert "more than" in result["outcome"] and "bomb" in result["outcome"]
    assert result["peak_mb"] < 48, result


def test_bomb_is_refused_by_image_size_too_cheaply(tmp_path: Path) -> None:
    path = make_png16_bomb(tmp_path, size=8 << 20)
    assert imageio.image_size(path) == (1, 1)  # the header is honest; the data is refused on read
    with pytest.raises(ImageReadError, match="png16_bomb.png"):
        imageio.read_image(path)


# ------------------------------------------------------------------ time: the Paeth hang


def test_wide_16bit_paeth_png_does_not_hang(tmp_path: Path) -> None:
    """10 KB, 1 x 3,000,000 16-bit RGB, Paeth rows: over a minute before; now refused at once."""
    path = tmp_path / "wide16.png"
    path.write_bytes(png_bytes(3_000_000, 1, 16, 2, zlib.compress(b"\x04" + bytes(18_000_000), 9)))
    result = _child(
        f"""
        import json, time
        from anomnet import imageio
        from anomnet.errors import ConfigError, ImageReadError
        t = time.perf_counter()
        try:
            imageio.read_image({str(path)!r}); outcome = "read"
        except ImageReadError as exc:
            outcome = exc.problem
        print(json.dumps({{"s": time.perf_counter() - t, "outcome": outcome}}))
        """,
        timeout=30,
    )
    assert result["s"] < 5 and "ratio" in result["outcome"]


def test_16bit_paeth_and_average_rows_decode_fast_and_exactly(tmp_path: Path) -> None:
    from test_io import _png16

    values = RNG.integers(0, 65536, (30, 3000, 3), dtype=np.uint16)
    path = tmp_path / "paeth.png"
    path.write_bytes(_png16(values, 2, np.array([4, 3] * 15)))
    image = imageio.read_image(path)
    np.testing.assert_array_equal(image, values / np.float32(65535))


# ------------------------------------------------------------------ pixels and shape


@pytest.mark.parametrize(
    ("width", "height", "problem"),
    [
        (2_000_000, 1, "ratio"),
        (3_000_000, 1, "ratio"),
        (2_000_000, 50, "megapixels"),
        (20_000, 50, "ratio"),
        (1, 100_000_000, "megapixels"),
        (300, 300_000, "megapixels"),
        (10_000, 10_000, "megapixels"),
        (1, 101, "ratio"),
    ],
)
def test_header_limits(tmp_path: Path, width: int, height: int, problem: str) -> None:
    path = tmp_path / "big.png"
    path.write_bytes(png_bytes(width, height, 8, 0, zlib.compress(b"\0")))
    with pytest.raises(ImageReadError, match=problem) as info:
        imageio.read_image(path)
    assert info.value.path == path


def test_limits_are_documented_values() -> None:
    assert imageio.MAX_IMAGE_PIXELS == 40_000_000 and imageio.MAX_ASPECT_RATIO == 100


def test_pixel_limit_can_be_raised_for_large_cameras(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "wide.png"
    Image.fromarray(np.zeros((40, 100), np.uint8)).save(path)  # 4,000 pixels
    monkeypatch.setenv(imageio.MAX_MEGAPIXELS_ENV, "0.001")
    with pytest.raises(ConfigError, match="from 1 to 150"):
        imageio.read_image(path)
    monkeypatch.setenv(imageio.MAX_MEGAPIXELS_ENV, "lots")
    with pytest.raises(ConfigError, match="ANOMNET_MAX_MEGAPIXELS"):
        imageio.read_image(path)
    monkeypatch.setattr(imageio, "MAX_IMAGE_PIXELS", 3_000)
    monkeypatch.delenv(imageio.MAX_MEGAPIXELS_ENV)
    with pytest.raises(ImageReadError, match="ANOMNET_MAX_MEGAPIXELS raises it"):
        imageio.read_image(path)
    monkeypatch.setenv(imageio.MAX_MEGAPIXELS_ENV, "1")  # 1 MP is above the 3,000 pixels patched in
    assert imageio.read_image(path).shape == (40, 100, 3)


def test_image_within_limits_reads(tmp_path: Path) -> None:
    data = RNG.integers(0, 256, (3, 300), dtype=np.uint8)  # 100:1 exactly
    Image.fromarray(data).save(tmp_path / "strip.png")
    assert imageio.read_image(tmp_path / "strip.png").shape == (3, 300, 3)


def test_deflate_tiff_near_the_pixel_limit_is_refused_from_its_header(tmp_path: Path) -> None:
    path = tmp_path / "big.tif"
    path.write_bytes(tiff_bytes(10_000, 10_000, 3, 16, [bomb_stream(1 << 16)], compression=8))
    with pytest.raises(ImageReadError, match="megapixels"):
        imageio.read_image(path)


def test_resize_of_a_tall_strip_takes_little_memory() -> None:
    """2,000,000 x 1 pixels to 256 x 256 asked torch for 6 GB (width pass first); now the input's order of size."""
    result = _child(
        """
        import json, resource, torch
        from anomnet.transforms import resize
        x = torch.rand(1, 3, 2_000_000, 1)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        y = resize(x, (256, 256))
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({"peak_mb": (after - before) / 1024, "shape": list(y.shape)}))
        """
    )
    assert result["shape"] == [1, 3, 256, 256] and result["peak_mb"] < 200, result


def test_resize_in_two_passes_matches_one() -> None:
    import torch
    import torch.nn.functional as F

    from anomnet.transforms import resize

    x = torch.rand(2, 3, 900, 5, generator=torch.Generator().manual_seed(0))
    one = F.interpolate(x, size=(64, 64), mode="bilinear", antialias=True, align_corners=False)
    torch.testing.assert_close(resize(x, (64, 64)), one, atol=1e-5, rtol=0)
    y = torch.rand(1, 3, 40, 50)
    assert torch.equal(resize(y, (64, 64)), F.interpolate(y, size=(64, 64), mode="bilinear", antialias=True))


# ------------------------------------------------------------------ valid files that were refused


def test_lzw_tiff_8bit_reads(tmp_path: Path) -> None:
    data = RNG.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(data).save(tmp_path / "lzw.tif", compression="tiff_lzw")
    np.testing.assert_array_equal(imageio.read_image(tmp_path / "lzw.tif"), data / np.float32(255))


@pytest.mark.parametrize("predictor", [1, 2])
def test_lzw_tiff_16bit_rgb_reads_at_full_precision(tmp_path: Path, predictor: int) -> None:
    data = RNG.integers(0, 65536, (40, 50, 3), dtype=np.uint16)
    stored = data.astype(np.int64)
    if predictor == 2:
        stored = np.diff(stored, axis=1, prepend=0) & 0xFFFF
    rows = stored.astype("<u2").tobytes()
    half = 20 * 50 * 3 * 2
    strips = [lzw_encode(rows[:half]), lzw_encode(rows[half:])]
    path = tmp_path / "lzw16.tif"
    path.write_bytes(tiff_bytes(50, 40, 3, 16, strips, compression=5, predictor=predictor))
    np.testing.assert_array_equal(imageio.read_image(path), data / np.float32(65535))


# ------------------------------------------------------------------ silently wrong before


def test_truncated_zlib_stream_is_refused(tmp_path: Path) -> None:
    rows = bytes(range(256)) * 96  # 32 rows of 8-bit gray, 767 pixels wide... as one stream
    stream = zlib.compress(b"".join(b"\0" + bytes(RNG.integers(0, 256, 64, dtype=np.uint8)) for _ in range(48)), 0)
    path = tmp_path / "half.png"
    path.write_bytes(png_bytes(64, 48, 8, 0, stream[: len(stream) // 2]))
    with pytest.raises(ImageReadError, match="truncated") as info:
        imageio.read_image(path)
    assert info.value.path == path
    del rows


def test_header_promising_more_rows_than_the_data_holds_is_refused(tmp_path: Path) -> None:
    rows = b"".join(b"\0" + bytes(RNG.integers(0, 256, 64, dtype=np.uint8)) for _ in range(48))
    path = tmp_path / "short.png"
    path.write_bytes(png_bytes(64, 4_800, 8, 0, zlib.compress(rows)))  # 4,800 rows promised, 48 there
    with pytest.raises(ImageReadError, match="fewer than"):
        imageio.read_image(path)


def test_idat_crc_is_checked(tmp_path: Path) -> None:
    rows = b"".join(b"\0" + bytes(RNG.integers(0, 256, 16, dtype=np.uint8)) for _ in range(16))
    good = png_bytes(16, 16, 8, 0, zlib.compress(rows, 0))
    data = bytearray(good)
    at = data.index(b"IDAT") + 4 + 40  # a stored (uncompressed) pixel byte: the stream stays valid
    data[at] ^= 0x01
    path = tmp_path / "flip.png"
    path.write_bytes(bytes(data))
    with pytest.raises(ImageReadError, match="CRC"):
        imageio.read_image(path)


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def _viewer(data: np.ndarray, orientation: int) -> np.ndarray:
    """What an image viewer shows (PIL's transposes, an independent implementation)."""
    method = {
        2: Image.Transpose.FLIP_LEFT_RIGHT,
        3: Image.Transpose.ROTATE_180,
        4: Image.Transpose.FLIP_TOP_BOTTOM,
        5: Image.Transpose.TRANSPOSE,
        6: Image.Transpose.ROTATE_270,
        7: Image.Transpose.TRANSVERSE,
        8: Image.Transpose.ROTATE_90,
    }.get(orientation)
    return data if method is None else np.asarray(Image.fromarray(data).transpose(method))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_16bit_colour_png_orientation_like_8bit(tmp_path: Path, orientation: int) -> None:
    values = RNG.integers(0, 65536, (4, 6, 3), dtype=np.uint16)
    values[..., 0] = values[..., 0] & 0xFF00 | 0x0055  # high bytes alone would not show a missing turn
    path = tmp_path / "o16.png"
    path.write_bytes(
        png_bytes(6, 4, 16, 2, zlib.compress(png16_rows(values)), extra=chunk(b"eXIf", _exif(orientation)))
    )
    image = imageio.read_image(path)
    high = _viewer((values >> 8).astype(np.uint8), orientation).astype(np.uint16)
    low = _viewer((values & 0xFF).astype(np.uint8), orientation)
    np.testing.assert_array_equal(image, ((high << 8) | low) / np.float32(65535))
    assert imageio.image_size(path) == image.shape[:2]


def test_16bit_png_xmp_orientation(tmp_path: Path) -> None:
    values = RNG.integers(0, 65536, (4, 6, 3), dtype=np.uint16)
    xmp = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:Description tiff:Orientation="6"/></x:xmpmeta>'
    itxt = chunk(b"iTXt", b"XML:com.adobe.xmp\0\0\0\0\0" + xmp)
    path = tmp_path / "xmp16.png"
    path.write_bytes(png_bytes(6, 4, 16, 2, zlib.compress(png16_rows(values)), extra=itxt))
    assert imageio.read_image(path).shape == (6, 4, 3)


@pytest.mark.parametrize(("color_type", "channels"), [(2, 3), (6, 4), (4, 2)])
def test_interlaced_16bit_png_keeps_16_bits(tmp_path: Path, color_type: int, channels: int) -> None:
    values = RNG.integers(0, 65536, (13, 11, channels), dtype=np.uint16)
    path = tmp_path / "adam7.png"
    path.write_bytes(png_bytes(11, 13, 16, color_type, zlib.compress(_adam7_rows(values)), interlace=1))
    color = values[..., :1].repeat(3, axis=2) if channels == 2 else values[..., :3]
    np.testing.assert_array_equal(imageio.read_image(path), color / np.float32(65535))


def _adam7_rows(values: np.ndarray) -> bytes:
    passes = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
    return b"".join(png16_rows(values[y0::dy, x0::dx]) for x0, y0, dx, dy in passes if values[y0::dy, x0::dx].size)


@pytest.mark.parametrize("mode", ["CMYK", "P", "RGB", "L"])
@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_tiff_orientation_applied_once_for_every_layout(tmp_path: Path, mode: str, orientation: int) -> None:
    data = np.zeros((4, 6, 3), np.uint8)
    data[0, :] = 255
    data[:, 0, 1] = 200
    im = Image.fromarray(data).convert(mode)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "o.tif"
    im.save(path, exif=exif)
    expected = _viewer(np.asarray(im.convert("RGB")), orientation) / np.float32(255)
    np.testing.assert_allclose(imageio.read_image(path), expected, atol=0.02)
    assert imageio.image_size(path) == expected.shape[:2]


def test_16bit_tiff_orientation(tmp_path: Path) -> None:
    values = RNG.integers(0, 65536, (4, 6, 3), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "o16.tif", values, photometric="rgb", extratags=[(274, 3, 1, 6, True)])
    expected = np.rot90(values, -1)
    np.testing.assert_array_equal(imageio.read_image(tmp_path / "o16.tif"), expected / np.float32(65535))


# ------------------------------------------------------------------ format policy


def _other_format(tmp_path: Path, fmt: str) -> Path:
    path = tmp_path / "looks_like.png"
    if fmt == "EPS":
        path.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n%%EOF\n")
    else:
        Image.fromarray(RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path, format=fmt)
    return path


@pytest.mark.parametrize("fmt", ["GIF", "PPM", "WEBP", "ICO", "EPS"])
def test_other_formats_are_refused_by_content(tmp_path: Path, fmt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(EpsImagePlugin, "_accept", lambda prefix: calls.append("eps") or False)
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: calls.append("gs"))
    path = _other_format(tmp_path, fmt)
    with pytest.raises(ImageReadError, match="supported: PNG, JPEG, TIFF, BMP") as info:
        imageio.read_image(path)
    assert info.value.path == path
    with pytest.raises(ImageReadError):
        imageio.image_size(path)
    assert calls == []  # PIL's EPS plugin was never even asked


def test_bmp_and_jpeg_still_read_by_content(tmp_path: Path) -> None:
    data = RNG.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    Image.fromarray(data).save(tmp_path / "x.png", format="BMP")
    np.testing.assert_array_equal(imageio.read_image(tmp_path / "x.png"), data / np.float32(255))
    Image.fromarray(data).save(tmp_path / "y.tif", format="JPEG")
    assert imageio.read_image(tmp_path / "y.tif").shape == (5, 7, 3)


# ------------------------------------------------------------------ predict: error rows, exit 3


def _hostile_files(folder: Path) -> list[Path]:
    files = [
        make_png16_bomb(folder, size=32 << 20),
        make_tiff_deflate_bomb(folder, size=32 << 20),
        _other_format(folder, "EPS"),
    ]
    wide = folder / "wide.png"
    wide.write_bytes(png_bytes(2_000_000, 1, 8, 2, zlib.compress(b"\0" + bytes(6_000_000), 9)))
    short = folder / "short.png"
    short.write_bytes(png_bytes(64, 48_000, 8, 0, zlib.compress(bytes(65 * 48))))
    huge = folder / "huge.png"
    huge.write_bytes(png_bytes(10_000, 10_000, 16, 2, zlib.compress(bytes(1000))))
    return [*files, wide, short, huge]


def test_predict_gives_error_rows_for_hostile_files(tmp_path: Path) -> None:
    from anomnet.cli import EXIT_SOME_FAILED, main
    from conftest import make_folder_dataset

    data = make_folder_dataset(tmp_path / "data", n_train=6, n_good=1, n_bad=1, size=32)
    model = tmp_path / "model"
    assert main(["fit", "--data", str(data), "--out", str(model), "--image-size", "32", "--quiet"]) == 0
    hostile = tmp_path / "hostile"
    hostile.mkdir()
    files = _hostile_files(hostile)
    good = data / "test" / "good" / "g000.png"
    out = tmp_path / "pred"
    code = main(["predict", "--model-dir", str(model), *map(str, files), str(good), "--out", str(out), "--quiet"])
    assert code == EXIT_SOME_FAILED
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    errors = {Path(r["path"]).name: r["error"] for r in rows}
    assert len(rows) == len(files) + 1
    assert errors.pop("g000.png") is None
    assert all(errors[f.name] for f in files), errors


def test_struct_helpers_build_valid_files(tmp_path: Path) -> None:
    """The generators themselves: an honest file from them reads back exactly."""
    values = RNG.integers(0, 65536, (3, 4, 3), dtype=np.uint16)
    path = tmp_path / "ok.tif"
    path.write_bytes(tiff_bytes(4, 3, 3, 16, [zlib.compress(values.astype("<u2").tobytes())], compression=8))
    np.testing.assert_array_equal(imageio.read_image(path), values / np.float32(65535))
    assert struct.unpack(">I", chunk(b"IEND", b"")[-4:])[0] == zlib.crc32(b"IEND")


def test_float_tiff_with_floating_point_predictor(tmp_path: Path) -> None:
    values = RNG.random((5, 7)).astype(np.float32)
    planes = values.astype(">f4").view(np.uint8).reshape(5, 7, 4).transpose(0, 2, 1).reshape(5, 28)
    diffs = (np.diff(planes.astype(np.int32), axis=1, prepend=0) & 0xFF).astype(np.uint8)
    path = tmp_path / "fp3.tif"
    strip = zlib.compress(diffs.tobytes())
    path.write_bytes(tiff_bytes(7, 5, 1, 32, [strip], compression=8, predictor=3, extra_tags=[(339, 3, 3)]))
    np.testing.assert_array_equal(imageio.read_image(path), np.repeat(values[..., None], 3, axis=2))
