"""Bounded TIFF strip and tile decoding (uncompressed, deflate, LZW, PackBits; predictors 1-3).

tifffile parses the tags; the pixel data is decoded here, one segment (strip or tile) at a time,
each inflated into at most the bytes its share of the image takes: tifffile's own fallback
inflates whole segments with no limit and needs the optional imagecodecs package for LZW, the
most common TIFF compression. A segment that holds less data than promised is refused, never
zero-filled.
"""

from __future__ import annotations

import math
from typing import IO, NamedTuple

import numpy as np

from anomnet.decoders import DecodeError, inflate

COMPRESSIONS = {1: "none", 5: "LZW", 8: "deflate", 32946: "deflate", 32773: "PackBits"}
"""TIFF compression codes decoded here (others go to PIL)."""

MAX_SEGMENT_BYTES = 256 << 20
"""Largest decoded strip or tile (tiles of real files are kilobytes to a few megabytes)."""


class Layout(NamedTuple):
    """What the tags say about the first page's pixel data."""

    height: int
    width: int
    samples: int
    dtype: np.dtype
    planar: bool
    compression: int
    predictor: int
    rows_per_strip: int
    tile: tuple[int, int] | None
    offsets: tuple[int, ...]
    counts: tuple[int, ...]


def decode(f: IO[bytes], layout: Layout, file_size: int) -> np.ndarray:
    """The page as ``HxWxS`` in native byte order.

    Raises:
        DecodeError: an unsupported layout, or segments that are damaged, short or too long.
    """
    h, w, s = layout.height, layout.width, layout.samples
    if layout.compression not in COMPRESSIONS:
        raise DecodeError(f"TIFF compression {layout.compression} is not supported")
    if layout.predictor not in (1, 2, 3) or (layout.predictor == 3 and layout.dtype.kind != "f"):
        raise DecodeError(f"TIFF predictor {layout.predictor} is not supported for {layout.dtype} samples")
    item = layout.dtype.itemsize
    planes = s if layout.planar else 1
    per_pixel = 1 if layout.planar else s
    if layout.tile is not None:
        tl, tw = layout.tile
        if tl <= 0 or tw <= 0:
            raise DecodeError("TIFF tile size is zero")
        across, down = math.ceil(w / tw), math.ceil(h / tl)
        boxes = [(r * tl, c * tw, tl, tw) for r in range(down) for c in range(across)]
    else:
        rps = min(max(layout.rows_per_strip, 1), h)
        boxes = [(r, 0, min(rps, h - r), w) for r in range(0, h, rps)]
    full_rows = layout.tile[0] if layout.tile is not None else min(max(layout.rows_per_strip, 1), h)
    if len(layout.offsets) != len(boxes) * planes or len(layout.counts) != len(layout.offsets):
        raise DecodeError(
            f"TIFF holds {len(layout.offsets)} strips or tiles where its size needs {len(boxes) * planes}"
        )
    out = np.empty((h, w, s), dtype=layout.dtype.newbyteorder("="))
    stored = layout.dtype.newbyteorder(layout.dtype.byteorder)
    for plane in range(planes):
        for index, (top, left, rows, cols) in enumerate(boxes):
            seg = plane * len(boxes) + index
            size = rows * cols * per_pixel * item
            if size > MAX_SEGMENT_BYTES:
                raise DecodeError(f"TIFF strip or tile of {size} bytes is larger than the limit of {MAX_SEGMENT_BYTES}")
            offset, count = layout.offsets[seg], layout.counts[seg]
            if offset <= 0 or offset >= file_size or count <= 0:
                raise DecodeError(f"TIFF strip or tile {seg} lies outside the file (truncated?)")
            f.seek(offset)
            raw = f.read(min(count, file_size - offset))
            cap = full_rows * cols * per_pixel * item  # a last strip may be stored full length
            data = _decompress(raw, layout.compression, size, cap, f"TIFF strip or tile {seg}")
            array = _unpredict(data, layout.predictor, stored, rows, cols, per_pixel)
            bottom, right = min(top + rows, h), min(left + cols, w)
            block = array[: bottom - top, : right - left]
            if layout.planar:
                out[top:bottom, left:right, plane] = block[..., 0]
            else:
                out[top:bottom, left:right] = block
    return out


def _decompress(raw: bytes, compression: int, size: int, cap: int, what: str) -> bytes:
    if compression == 1:
        data = raw[:size]
    elif compression in (8, 32946):
        data = inflate(raw, cap, what, minimum=size)[:size]
    elif compression == 5:
        data = lzw_decode(raw, size, what)
    else:
        data = packbits_decode(raw, size, what)
    if len(data) < size:
        raise DecodeError(f"{what}: holds {len(data)} bytes, fewer than the {size} its size needs (truncated)")
    return data


def _unpredict(data: bytes, predictor: int, dtype: np.dtype, rows: int, cols: int, samples: int) -> np.ndarray:
    """Undo the horizontal (2) or floating-point (3) predictor; ``rows x cols x samples`` native values."""
    if predictor == 3:  # bytes of each row: differenced, then grouped most significant first
        item = dtype.itemsize
        diffs = np.frombuffer(data, np.uint8).reshape(rows, cols * samples * item)
        planes = np.cumsum(diffs, axis=1, dtype=np.uint8).reshape(rows, item, cols * samples)
        grouped = np.ascontiguousarray(planes.transpose(0, 2, 1))
        values = grouped.view(dtype.newbyteorder(">")).reshape(rows, cols, samples)
        return values.astype(dtype.newbyteorder("="))
    values = np.frombuffer(data, dtype).reshape(rows, cols, samples).astype(dtype.newbyteorder("="))
    if predictor == 2:
        values = np.cumsum(values, axis=1, dtype=values.dtype)
    return values


def lzw_decode(data: bytes, size: int, what: str) -> bytes:
    """TIFF LZW (MSB-first codes of 9 to 12 bits, early change) into at most ``size`` bytes."""
    if data[:2] == b"\x00\x01":
        raise DecodeError(f"{what}: old-style LZW compression is not supported")
    out = bytearray()
    table: list[bytes] = [bytes([i]) for i in range(256)] + [b"", b""]
    width, prev = 9, b""
    bitpos, total = 0, len(data) * 8
    padded = data + b"\x00\x00\x00"
    while bitpos + width <= total:
        byte = bitpos >> 3
        chunk = (padded[byte] << 16) | (padded[byte + 1] << 8) | padded[byte + 2]
        code = (chunk >> (24 - (bitpos & 7) - width)) & ((1 << width) - 1)
        bitpos += width
        if code == 256:
            del table[258:]
            width, prev = 9, b""
            continue
        if code == 257:
            break
        if code < len(table):
            entry = table[code]
            if prev and len(table) < 4096:
                table.append(prev + entry[:1])
        elif code == len(table) and prev and len(table) < 4096:
            entry = prev + prev[:1]
            table.append(entry)
        else:
            raise DecodeError(f"{what}: damaged LZW data (code {code} before its table entry)")
        out += entry
        if len(out) >= size:
            return bytes(out[:size])
        prev = entry
        if len(table) >= (1 << width) - 1 and width < 12:
            width += 1
    return bytes(out)


def packbits_decode(data: bytes, size: int, what: str) -> bytes:
    """PackBits run-length data into at most ``size`` bytes."""
    out = bytearray()
    pos, n = 0, len(data)
    while pos < n and len(out) < size:
        header = data[pos]
        pos += 1
        if header < 128:
            out += data[pos : pos + header + 1]
            pos += header + 1
        elif header > 128:
            if pos >= n:
                break
            out += data[pos : pos + 1] * (257 - header)
            pos += 1
    return bytes(out[:size])
