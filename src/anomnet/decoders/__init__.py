"""Bounded decoding helpers behind :mod:`anomnet.imageio` (nothing else should import them).

Every helper here decodes at most what the file's header promises: a compressed stream that
inflates to more, or stops short, is refused with :class:`DecodeError` (a plain message that
:mod:`anomnet.imageio` turns into an :class:`~anomnet.errors.ImageReadError` naming the file).
"""

from __future__ import annotations

import zlib

STEP = 1 << 20
"""Bytes inflated per call: the most a decoder holds beyond what the header promises."""


class DecodeError(ValueError):
    """The data contradicts its header (truncated, too long, damaged); the message says how."""


class Inflater:
    """Streaming zlib inflate that refuses output beyond ``expected`` bytes.

    ``keep`` keeps the output (else it is only counted, e.g. to validate a stream another
    decoder reads). :meth:`finish` requires a complete stream of exactly ``expected`` bytes,
    or at least ``minimum`` when that is given (segments whose last rows may be left out).
    """

    def __init__(self, expected: int, keep: bool, what: str) -> None:
        self._d = zlib.decompressobj()
        self.expected = expected
        self.total = 0
        self.keep = keep
        self.what = what
        self._out = bytearray()

    def feed(self, data: bytes) -> None:
        while data and not self._d.eof:
            try:
                out = self._d.decompress(data, STEP)
            except zlib.error as exc:
                raise DecodeError(f"{self.what}: damaged compressed data ({exc})") from None
            self._take(out)
            data = self._d.unconsumed_tail

    def _take(self, out: bytes) -> None:
        self.total += len(out)
        if self.total > self.expected:
            raise DecodeError(
                f"{self.what}: the compressed data inflates to more than the {self.expected} bytes "
                "the header promises (a decompression bomb?)"
            )
        if self.keep:
            self._out += out

    def finish(self, minimum: int | None = None) -> bytes:
        while not self._d.eof:
            try:
                out = self._d.decompress(b"", STEP)
            except zlib.error as exc:
                raise DecodeError(f"{self.what}: damaged compressed data ({exc})") from None
            if not out:
                break
            self._take(out)
        if not self._d.eof:
            raise DecodeError(f"{self.what}: the compressed data is truncated (the stream stops before its end)")
        least = self.expected if minimum is None else minimum
        if self.total < least:
            raise DecodeError(
                f"{self.what}: the compressed data holds {self.total} bytes, fewer than the {least} "
                "the header promises (truncated)"
            )
        return bytes(self._out)


def inflate(data: bytes, expected: int, what: str, minimum: int | None = None) -> bytes:
    """Inflate one zlib stream into at most ``expected`` bytes (see :class:`Inflater`)."""
    inflater = Inflater(expected, keep=True, what=what)
    inflater.feed(data)
    return inflater.finish(minimum)
