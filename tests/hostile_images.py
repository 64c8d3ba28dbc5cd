"""Hostile image files for the reader's tests, generated on the fly (nothing binary is committed).

Each ``make_*`` writes one file into a given folder and returns its path. The PNG and TIFF
writers build files byte by byte, so headers can promise what the data does not hold.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def chunk(kind: bytes, data: bytes, crc: int | None = None) -> bytes:
    """One PNG chunk (the right CRC unless ``crc`` is given)."""
    value = zlib.crc32(kind + data) if crc is None else crc
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", value)


def png_bytes(
    width: int, height: int, depth: int, color_type: int, idat: bytes, interlace: int = 0, extra: bytes = b""
) -> bytes:
    """A PNG with the given header and (already compressed) image data; ``extra`` chunks go before IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, color_type, 0, 0, interlace)
    return PNG_SIGNATURE + chunk(b"IHDR", ihdr) + extra + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def bomb_stream(size: int) -> bytes:
    """A zlib stream of ``size`` zero bytes (about 1/1000 of that when compressed)."""
    compressor = zlib.compressobj(9)
    piece = bytes(1 << 20)
    parts = [compressor.compress(piece) for _ in range(size >> 20)]
    return b"".join(parts) + compressor.compress(bytes(size & ((1 << 20) - 1))) + compressor.flush()


def make_png16_bomb(folder: Path, size: int = 256 << 20) -> Path:
    """16-bit RGB PNG of 1x1 pixel whose image data inflates to ``size`` bytes."""
    path = folder / "png16_bomb.png"
    path.write_bytes(png_bytes(1, 1, 16, 2, bomb_stream(size)))
    return path


def make_png8_bomb(folder: Path, size: int = 256 << 20) -> Path:
    """8-bit RGB PNG of 1x1 pixel whose image data inflates to ``size`` bytes."""
    path = folder / "png8_bomb.png"
    path.write_bytes(png_bytes(1, 1, 8, 2, bomb_stream(size)))
    return path


def tiff_bytes(
    width: int,
    height: int,
    samples: int,
    bits: int,
    strips: list[bytes],
    compression: int = 1,
    predictor: int = 1,
    photometric: int | None = None,
    extra_tags: list[tuple[int, int, int]] | None = None,
) -> bytes:
    """A little-endian TIFF whose strips (already compressed) are given; rows per strip from their count."""
    rows_per_strip = -(-height // len(strips))
    photometric = photometric if photometric is not None else (2 if samples >= 3 else 1)
    tags: list[tuple[int, int, int, bytes | int]] = [
        (256, 4, 1, width),
        (257, 4, 1, height),
        (258, 3, samples, b"".join(struct.pack("<H", bits) for _ in range(samples)) if samples > 2 else bits),
        (259, 3, 1, compression),
        (262, 3, 1, photometric),
        (277, 3, 1, samples),
        (278, 4, 1, rows_per_strip),
        (284, 3, 1, 1),
        (317, 3, 1, predictor),
    ]
    if samples in (2, 4):
        tags.append((338, 3, 1, 2))  # unassociated alpha
    for tag, typ, value in extra_tags or []:
        tags.append((tag, typ, 1, value))
    header = 8
    data = b"".join(strips)
    data_at = header
    ifd_at = data_at + len(data) + (len(data) & 1)
    n_tags = len(tags) + 2
    extra_at = ifd_at + 2 + 12 * n_tags + 4
    offsets, counts, at = [], [], data_at
    for s in strips:
        offsets.append(at)
        counts.append(len(s))
        at += len(s)
    tags.append(
        (273, 4, len(strips), b"".join(struct.pack("<I", o) for o in offsets) if len(strips) > 1 else offsets[0])
    )
    tags.append((279, 4, len(strips), b"".join(struct.pack("<I", c) for c in counts) if len(strips) > 1 else counts[0]))
    tags.sort()
    entries, blobs = b"", b""
    for tag, typ, count, value in tags:
        if isinstance(value, bytes):
            if len(value) <= 4:
                entries += struct.pack("<HHI", tag, typ, count) + value.ljust(4, b"\0")
            else:
                entries += struct.pack("<HHII", tag, typ, count, extra_at + len(blobs))
                blobs += value
        elif typ == 3:
            entries += struct.pack("<HHIHH", tag, typ, count, value, 0)
        else:
            entries += struct.pack("<HHII", tag, typ, count, value)
    out = b"II*\x00" + struct.pack("<I", ifd_at) + data + b"\0" * (ifd_at - data_at - len(data))
    return out + struct.pack("<H", len(tags)) + entries + b"\0\0\0\0" + blobs


def make_tiff_deflate_bomb(folder: Path, size: int = 256 << 20) -> Path:
    """16-bit RGB deflate TIFF of 1x1 pixel whose strip inflates to ``size`` bytes."""
    path = folder / "tiff_bomb.tif"
    path.write_bytes(tiff_bytes(1, 1, 3, 16, [bomb_stream(size)], compression=8))
    return path


def lzw_encode(data: bytes) -> bytes:
    """TIFF LZW (MSB-first, early change), as libtiff writes it: a test encoder for the reader's decoder."""
    codes: list[tuple[int, int]] = [(256, 9)]
    table = {bytes([i]): i for i in range(256)}
    next_code, width, w = 258, 9, b""
    for value in data:
        wc = w + bytes([value])
        if wc in table:
            w = wc
            continue
        codes.append((table[w], width))
        table[wc] = next_code
        next_code += 1
        if next_code > (1 << width) - 1 and width < 12:
            width += 1
        if next_code >= 4093:
            codes.append((256, width))
            table = {bytes([i]): i for i in range(256)}
            next_code, width = 258, 9
        w = bytes([value])
    if w:
        codes.append((table[w], width))
        next_code += 1
        if next_code > (1 << width) - 1 and width < 12:
            width += 1
    codes.append((257, width))
    acc, nbits, out = 0, 0, bytearray()
    for code, bits in codes:
        acc = (acc << bits) | code
        nbits += bits
        while nbits >= 8:
            nbits -= 8
            out.append((acc >> nbits) & 0xFF)
    if nbits:
        out.append((acc << (8 - nbits)) & 0xFF)
    return bytes(out)


def png16_rows(values: np.ndarray, filter_type: int = 0) -> bytes:
    """Scanlines of ``uint16`` HxWxC with one filter type for every row (0 None, 1 Sub; others only on zeros)."""
    h, w, c = values.shape
    raw = values.astype(">u2").tobytes()
    stride = w * c * 2
    rows = []
    for r in range(h):
        row = np.frombuffer(raw[r * stride : (r + 1) * stride], np.uint8).astype(np.int32)
        if filter_type == 1:
            row = (row - np.concatenate([np.zeros(2 * c, np.int32), row[: -2 * c]])) & 0xFF
        rows.append(bytes([filter_type]) + row.astype(np.uint8).tobytes())
    return b"".join(rows)


# ------------------------------------------------------------------ fuzzing: seeds and mutants


def seed_files(folder: Path) -> list[Path]:
    """Small valid files of every kind the reader supports (PNG, JPEG, TIFF, BMP, their usual layouts)."""
    import tifffile
    from PIL import Image

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    rgb16 = rng.integers(0, 65536, (12, 16, 3), dtype=np.uint16)
    folder.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []

    def pil(name: str, im: Image.Image, **kw: object) -> None:
        im.save(folder / name, **kw)
        paths.append(folder / name)

    exif = Image.Exif()
    exif[0x0112] = 6
    pil("rgb.png", Image.fromarray(rgb))
    pil("gray.png", Image.fromarray(rgb[..., 0]))
    pil("palette.png", Image.fromarray(rgb).convert("P"))
    pil("one_bit.png", Image.fromarray(rgb[..., 0] > 128))
    pil("rgba_exif.png", Image.fromarray(np.dstack([rgb, rgb[..., :1]])), exif=exif)
    pil("gray16.png", Image.fromarray(rgb16[..., 0]))
    for name, data in (
        ("rgb16.png", png_bytes(16, 12, 16, 2, zlib.compress(png16_rows(rgb16, 1)))),
        ("rgba16_adam7.png", png_bytes(16, 12, 16, 6, zlib.compress(_adam7(np.dstack([rgb16, rgb16[..., :1]]))), 1)),
        ("la16.png", png_bytes(16, 12, 16, 4, zlib.compress(png16_rows(rgb16[..., :2])))),
    ):
        (folder / name).write_bytes(data)
        paths.append(folder / name)
    pil("rgb.jpg", Image.fromarray(rgb), quality=90)
    pil("gray_exif.jpg", Image.fromarray(rgb[..., 0]), exif=exif)
    pil("progressive.jpg", Image.fromarray(rgb), progressive=True)
    pil("rgb.bmp", Image.fromarray(rgb))
    pil("palette.bmp", Image.fromarray(rgb).convert("P"))
    pil("lzw.tif", Image.fromarray(rgb), compression="tiff_lzw")
    pil("packbits.tif", Image.fromarray(rgb), compression="packbits")
    pil("cmyk.tif", Image.fromarray(rgb).convert("CMYK"), exif=exif)
    pil("palette.tif", Image.fromarray(rgb).convert("P"))
    pil("jpeg.tif", Image.fromarray(rgb), compression="jpeg")
    for name, kw in (
        ("rgb16.tif", {"photometric": "rgb"}),
        ("rgb16_deflate.tif", {"photometric": "rgb", "compression": "zlib"}),
        ("rgb16_tiles.tif", {"photometric": "rgb", "tile": (16, 16)}),
        ("rgb16_planar.tif", {"photometric": "rgb", "planarconfig": "separate"}),
    ):
        data16 = np.moveaxis(rgb16, -1, 0) if kw.get("planarconfig") == "separate" else rgb16
        tifffile.imwrite(folder / name, data16, **kw)
        paths.append(folder / name)
    tifffile.imwrite(folder / "float.tif", rgb16[..., 0].astype(np.float32) / 65535, compression="zlib")
    paths.append(folder / "float.tif")
    rows = rgb16.astype("<u2").tobytes()
    (folder / "lzw16.tif").write_bytes(tiff_bytes(16, 12, 3, 16, [lzw_encode(rows)], compression=5))
    paths.append(folder / "lzw16.tif")
    return paths


def _adam7(values: np.ndarray) -> bytes:
    passes = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
    return b"".join(png16_rows(values[y0::dy, x0::dx]) for x0, y0, dx, dy in passes if values[y0::dy, x0::dx].size)


def _png_chunks(data: bytes) -> list[tuple[bytes, bytes]] | None:
    if not data.startswith(PNG_SIGNATURE):
        return None
    pos, out = 8, []
    while pos + 12 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        out.append((kind, data[pos + 8 : pos + 8 + length]))
        pos += 12 + length
    return out


def _join_png(chunks: list[tuple[bytes, bytes]]) -> bytes:
    return PNG_SIGNATURE + b"".join(chunk(kind, body) for kind, body in chunks)


def _tiff_patch_dims(data: bytes, rng: np.random.Generator) -> bytes:
    """Overwrite the first IFD's width, height, strip offsets or byte counts with absurd values."""
    if data[:2] not in (b"II", b"MM") or len(data) < 8:
        return data
    end = "<" if data[:2] == b"II" else ">"
    out = bytearray(data)
    ifd = struct.unpack(end + "I", data[4:8])[0]
    if ifd + 2 > len(data):
        return data
    count = struct.unpack(end + "H", data[ifd : ifd + 2])[0]
    for i in range(min(count, 64)):
        at = ifd + 2 + 12 * i
        if at + 12 > len(data):
            break
        tag, typ = struct.unpack(end + "HH", data[at : at + 4])
        if tag in (256, 257, 273, 278, 279, 322, 323) and rng.random() < 0.5:
            value = int(rng.choice([0, 1, 2**16 - 1, 2**31 - 1, 2**32 - 1, int(rng.integers(0, 2**20))]))
            if typ == 3:
                out[at + 8 : at + 10] = struct.pack(end + "H", value & 0xFFFF)
            else:
                out[at + 8 : at + 12] = struct.pack(end + "I", value & 0xFFFFFFFF)
    return bytes(out)


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    """One random mutant: bit flips, truncation, overwritten runs, PNG chunk games, absurd headers, bombs."""
    kind = int(rng.integers(0, 7))
    out = bytearray(data)
    if kind == 0:  # bit flips
        for _ in range(int(rng.integers(1, 9))):
            at = int(rng.integers(0, len(out)))
            out[at] ^= 1 << int(rng.integers(0, 8))
        return bytes(out)
    if kind == 1:  # truncation
        return bytes(out[: int(rng.integers(1, len(out)))])
    if kind == 2:  # a run of 0x00 or 0xFF
        at = int(rng.integers(0, len(out)))
        run = int(rng.integers(1, 32))
        out[at : at + run] = bytes([int(rng.choice([0, 255]))]) * len(out[at : at + run])
        return bytes(out)
    chunks = _png_chunks(data)
    if kind == 3 and chunks:  # chunk games: drop, duplicate or swap chunks (CRCs stay right)
        i, j = (int(x) for x in rng.integers(0, len(chunks), 2))
        game = int(rng.integers(0, 3))
        if game == 0:
            del chunks[i]
        elif game == 1:
            chunks.insert(j, chunks[i])
        else:
            chunks[i], chunks[j] = chunks[j], chunks[i]
        return _join_png(chunks)
    if kind == 4 and chunks:  # absurd IHDR (right CRC)
        ihdr = bytearray(chunks[0][1])
        if len(ihdr) == 13:
            field = int(rng.integers(0, 4))
            if field < 2:
                value = int(rng.choice([0, 1, 2**31 - 1, 2**32 - 1, int(rng.integers(0, 100_000))]))
                ihdr[4 * field : 4 * field + 4] = struct.pack(">I", value)
            else:
                ihdr[6 + field] = int(rng.integers(0, 256))
            chunks[0] = (chunks[0][0], bytes(ihdr))
        return _join_png(chunks)
    if kind == 5 and chunks:  # zlib bomb in place of the image data (right CRC)
        bomb = bomb_stream(int(rng.integers(8, 64)) << 20)
        body = [(k, b) for k, b in chunks if k != b"IDAT"]
        return _join_png([*body[:1], (b"IDAT", bomb), *body[1:]])
    if data[:2] in (b"II", b"MM"):
        return _tiff_patch_dims(data, rng)
    if data[:2] == b"BM" and len(out) >= 26:
        out[18:26] = struct.pack("<ii", int(rng.integers(-(2**31), 2**31)), int(rng.integers(-(2**31), 2**31)))
        return bytes(out)
    out[int(rng.integers(0, len(out)))] ^= 0xFF
    return bytes(out)
