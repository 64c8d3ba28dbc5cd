"""PNG structure check: every chunk's CRC, the header, and image data of exactly the promised size.

PIL decodes PNGs but trusts them: it ignores the CRC of image data and fills rows missing
from a short or truncated stream with zeros. :func:`check_png` walks the file first (streaming:
it holds one 1 MiB piece of inflated data at a time) and refuses such files, so PIL only ever
sees data whose size the header bounds.
"""

from __future__ import annotations

import struct
import zlib
from typing import IO, NamedTuple

from anomnet.decoders import DecodeError, Inflater

SIGNATURE = b"\x89PNG\r\n\x1a\n"

_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}
"""Colour type -> allowed bit depths (PNG specification, table 11.1)."""
_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
"""Adam7 passes: (x start, y start, x step, y step)."""
_PIECE = 1 << 20


class PngHeader(NamedTuple):
    width: int
    height: int
    depth: int
    color_type: int
    interlaced: bool


def read_header(head: bytes) -> PngHeader:
    """The IHDR fields from the first 33 bytes of a PNG (its CRC and values checked)."""
    if len(head) < 33 or head[:8] != SIGNATURE:
        raise DecodeError("truncated PNG header")
    length, kind = struct.unpack(">I4s", head[8:16])
    if kind != b"IHDR" or length != 13:
        raise DecodeError("damaged PNG: the file does not start with a valid IHDR chunk")
    if zlib.crc32(head[12:29]) != struct.unpack(">I", head[29:33])[0]:
        raise DecodeError("damaged PNG: the CRC of the IHDR chunk does not match its data")
    width, height, depth, color_type, compression, filtering, interlace = struct.unpack(">IIBBBBB", head[16:29])
    if color_type not in _DEPTHS or depth not in _DEPTHS[color_type]:
        raise DecodeError(f"damaged PNG: bit depth {depth} with colour type {color_type} is not a valid combination")
    if compression != 0 or filtering != 0 or interlace > 1:
        raise DecodeError("damaged PNG: unknown compression, filter or interlace method in IHDR")
    return PngHeader(width, height, depth, color_type, bool(interlace))


def data_size(header: PngHeader) -> int:
    """Bytes of filtered scanlines (filter byte + packed pixels per row) the header promises."""
    bits = header.depth * _CHANNELS[header.color_type]
    passes = _ADAM7 if header.interlaced else ((0, 0, 1, 1),)
    total = 0
    for x0, y0, dx, dy in passes:
        cols = (header.width - x0 + dx - 1) // dx if header.width > x0 else 0
        rows = (header.height - y0 + dy - 1) // dy if header.height > y0 else 0
        if cols and rows:
            total += rows * (1 + (cols * bits + 7) // 8)
    return total


def check_png(f: IO[bytes]) -> PngHeader:
    """Walk a PNG from its start: CRCs, chunk order, and image data inflating to exactly the promised size.

    Raises:
        DecodeError: a damaged or truncated file, or image data of another size than the header's.
    """
    header = read_header(f.read(33))
    inflater = Inflater(data_size(header), keep=False, what="PNG image data")
    seen_idat = ended_idat = False
    while True:
        head = f.read(8)
        if not head:
            break  # a missing IEND is tolerated when the image data is complete (checked below)
        if len(head) < 8:
            raise DecodeError("truncated PNG: the file ends inside a chunk header")
        length, kind = struct.unpack(">I4s", head)
        if length > 0x7FFFFFFF or not kind.isalpha():
            raise DecodeError(f"damaged PNG: invalid chunk header {kind!r} of length {length}")
        crc = zlib.crc32(kind)
        remaining = length
        is_idat = kind == b"IDAT"
        if is_idat and ended_idat:
            raise DecodeError("damaged PNG: image data (IDAT) chunks are not consecutive")
        if seen_idat and not is_idat:
            ended_idat = True
        seen_idat = seen_idat or is_idat
        failed: DecodeError | None = None  # reported after the CRC, which names the damage better
        while remaining:
            piece = f.read(min(remaining, _PIECE))
            if not piece:
                raise DecodeError(f"truncated PNG: the file ends inside a {kind.decode()} chunk")
            crc = zlib.crc32(piece, crc)
            remaining -= len(piece)
            if is_idat and failed is None:
                try:
                    inflater.feed(piece)
                except DecodeError as exc:
                    failed = exc
        stored = f.read(4)
        if len(stored) < 4:
            raise failed or DecodeError(f"truncated PNG: the file ends inside a {kind.decode()} chunk")
        if struct.unpack(">I", stored)[0] != crc:
            raise DecodeError(f"damaged PNG: the CRC of a {kind.decode()} chunk does not match its data")
        if failed is not None:
            raise failed
        if kind == b"IEND":
            break
    if not seen_idat:
        raise DecodeError("damaged PNG: no image data (IDAT chunk)")
    inflater.finish()
    return header
