"""The detector's preprocessing and map restoring as per-axis sampling tables, for exported graphs.

:class:`~anomnet.transforms.Preprocess` resizes with ``F.interpolate(antialias=True)``, mirror-pads
(``aspect="pad"``), crops, and maps anomaly maps back with a crop border, a cut and a bilinear
resize. In a graph whose input size is only known at run time these become, for each axis, a table
of source indices and weights computed from the input's size inside the graph (``[n_out, taps]``),
applied as a gather and a weighted sum. Every runtime executes gathers, sums and products alike,
while ONNX ``Resize`` with antialiasing does not (OpenVINO's differs from torch by up to 0.5 grey
levels of [0, 1]; docs/export.md). The tables reproduce torch's own weights (its antialiased
triangle filter and its half-pixel bilinear rule), so the graph equals :class:`Preprocess` to float
rounding at any input size; ``tests/test_export.py`` checks it.
"""

from __future__ import annotations

import torch
import torch.onnx.operators

from anomnet.transforms import Preprocess

MIRROR_STEPS = 12
"""Mirror-padding rounds unrolled in the graph: each round at most triples the length, so 12 rounds
fill any square from a 2-pixel side (a 1-pixel side is repeated, as :func:`anomnet.transforms._mirror_pad`)."""

Table = tuple[torch.Tensor, torch.Tensor]
"""Source indices ``[n_out, taps]`` (int64) and weights ``[n_out, taps]`` (float32) of one axis."""


def _i64(value: torch.Tensor | int) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else torch.tensor(value, dtype=torch.int64)


def _arange(n: torch.Tensor | int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """``torch.arange`` of a length that a traced graph reads at run time (a 0-d tensor) or a constant."""
    return torch.arange(n, dtype=dtype)  # type: ignore[arg-type]  # the stubs omit tensor lengths


def antialias_table(n_in: torch.Tensor, n_out: torch.Tensor | int) -> Table:
    """torch's antialiased bilinear resize (``F.interpolate(..., antialias=True)``) from ``n_in`` to ``n_out``.

    As ATen's CPU kernel: ``scale = n_in / n_out``, support ``max(scale, 1)``, output ``i`` centred
    at ``scale * (i + 0.5)``, triangle weights over the window, normalised to sum 1.
    """
    n_in_f = n_in.to(torch.float32)
    scale = n_in_f / _i64(n_out).to(torch.float32)
    support = torch.clamp(scale, min=1.0)
    invscale = 1.0 / support
    center = scale * (_arange(n_out, torch.float32) + 0.5)
    xmin = torch.clamp(torch.floor(center - support + 0.5), min=0.0)  # = trunc: negatives clamp to 0 either way
    taps = torch.ceil(support).to(torch.int64) * 2 + 1
    j = xmin[:, None] + _arange(taps, torch.float32)[None, :]
    w = torch.clamp(1.0 - torch.abs((j - center[:, None] + 0.5) * invscale), min=0.0)
    w = w * (j < n_in_f).to(torch.float32)
    w = w / w.sum(1, keepdim=True)
    return torch.minimum(j.to(torch.int64), n_in - 1), w


def bilinear_table(n_in: torch.Tensor | int, n_out: torch.Tensor | int) -> Table:
    """torch's bilinear resize without antialiasing (``align_corners=False``) from ``n_in`` to ``n_out``."""
    n_in = _i64(n_in)
    scale = n_in.to(torch.float32) / _i64(n_out).to(torch.float32)
    src = torch.clamp(scale * (_arange(n_out, torch.float32) + 0.5) - 0.5, min=0.0)
    i0 = torch.minimum(torch.floor(src).to(torch.int64), n_in - 1)
    lam = torch.clamp(src - i0.to(torch.float32), 0.0, 1.0)
    i1 = torch.minimum(i0 + 1, n_in - 1)
    return torch.stack([i0, i1], 1), torch.stack([1.0 - lam, lam], 1)


def mirror_index(n: torch.Tensor, before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """Source index of each position after mirror-padding an axis of ``n`` by ``before`` / ``after``.

    The rounds of :func:`anomnet.transforms._mirror_pad`: reflect by at most ``length - 1`` per side,
    again on the padded result while padding is left; what a 1-pixel axis cannot reflect is repeated.
    """
    index = _arange(n)
    for _ in range(MIRROR_STEPS):
        last = index.shape[0] - 1
        top, bottom = torch.minimum(before, _i64(last)), torch.minimum(after, _i64(last))
        pos = _arange(index.shape[0] + top + bottom) - top
        pos = torch.where(pos < 0, -pos, pos)
        pos = torch.where(pos > last, 2 * last - pos, pos)
        index = index[pos]
        before, after = before - top, after - bottom
    pos = torch.clamp(_arange(index.shape[0] + before + after) - before, min=0, max=index.shape[0] - 1)
    return index[pos]


def round_ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``round(num / den)`` of positive integers, halves to even (Python's ``round``), in integers."""
    q = torch.div(2 * num + den, 2 * den, rounding_mode="floor")
    tie = torch.remainder(2 * num + den, 2 * den) == 0
    return q - (tie & (torch.remainder(q, 2) == 1)).to(torch.int64)


class GraphGeometry:
    """:class:`Preprocess` (``__call__``) and ``restore`` for inputs whose size the graph reads at run time."""

    def __init__(self, preprocess: Preprocess) -> None:
        preprocess.check_resolved()  # a graph is made of a fitted detector: "auto" is decided by then
        self.p = preprocess

    def _content(self, h: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Top, left, height, width of the image in the ``image_size`` square (``Preprocess._content_box``)."""
        s = _i64(self.p.image_size)
        if self.p.aspect == "stretch":
            zero = torch.zeros((), dtype=torch.int64)
            return zero, zero, s, s
        m = torch.maximum(h, w)
        ch = torch.clamp(round_ratio(h * s, m), min=1, max=self.p.image_size)
        cw = torch.clamp(round_ratio(w * s, m), min=1, max=self.p.image_size)
        return torch.div(s - ch, 2, rounding_mode="floor"), torch.div(s - cw, 2, rounding_mode="floor"), ch, cw

    def _input_table(self, n: torch.Tensor, content: torch.Tensor, start: torch.Tensor) -> Table:
        """Resize ``n`` -> ``content``, mirror-fill to the square, then crop: one axis of ``__call__``."""
        index, weight = antialias_table(n, content)
        if self.p.aspect == "pad":
            pos = mirror_index(content, start, self.p.image_size - content - start)
            index, weight = index[pos], weight[pos]
        if self.p.crop:
            a = (self.p.image_size - self.p.output_size) // 2
            index, weight = index[a : a + self.p.output_size], weight[a : a + self.p.output_size]
        return index, weight

    def _output_table(self, n: torch.Tensor, content: torch.Tensor, start: torch.Tensor) -> Table:
        """Crop border (repeated edge), cut of the mirrored band, bilinear resize to ``n``: one axis of ``restore``."""
        index, weight = bilinear_table(content, n)
        index = index + start
        if self.p.crop:
            a = (self.p.image_size - self.p.output_size) // 2
            index = torch.clamp(index - a, min=0, max=self.p.output_size - 1)
        return index, weight

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """``[B,3,H,W]`` float in [0, 1] -> ``[B,3,S,S]``, as ``Preprocess.__call__``."""
        size = torch.onnx.operators.shape_as_tensor(images)
        h, w = size[2], size[3]
        top, left, ch, cw = self._content(h, w)
        rows = self._input_table(h, ch, top)
        cols = self._input_table(w, cw, left)
        out = _sample(_sample(images, cols, -1), rows, -2)
        side = self.p.output_size  # a fixed size, stated so that the graph's shape inference knows it
        return out.reshape(-1, 3, side, side)

    def restore(self, maps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Maps ``[B,S,S]`` -> ``[B,H,W]`` for the images ``like`` ``[B,3,H,W]``, as ``Preprocess.restore``."""
        size = torch.onnx.operators.shape_as_tensor(like)
        h, w = size[2], size[3]
        top, left, ch, cw = self._content(h, w)
        rows = self._output_table(h, ch, top)
        cols = self._output_table(w, cw, left)
        return _sample(_sample(maps, cols, -1), rows, -2)


def _sample(x: torch.Tensor, table: Table, dim: int) -> torch.Tensor:
    """Axis ``dim`` (-1 or -2) of ``x`` resampled by ``table``: ``out[i] = sum_t weight[i, t] * x[index[i, t]]``."""
    index, weight = table
    if dim == -1:
        return (x[..., index] * weight).sum(-1)
    return (x[..., index, :] * weight[:, :, None]).sum(-2)
