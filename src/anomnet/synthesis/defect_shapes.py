"""Real-looking defect shapes as opacity maps: spots, cracks and scratches (seeded, pure torch).

Each ``*_alpha`` function returns an ``[H, W]`` opacity in ``{0} U [min_alpha, 1]`` for one
defect drawn with ``rng``: 0 where the image stays as it is, at least ``min_alpha`` where the
defect's colour is blended in (so a defect's mask, ``alpha > 0``, is exactly the pixels that
change). Sizes are fractions of the image's shorter side, widths in pixels at least 1, so the
same generator works at 128 px and at 1024 px.

* spot: an irregular blob (radius modulated by a few random harmonics), a soft rim;
* crack: a jagged random walk, tapering at both ends, sometimes with one branch;
* scratch: a long, thin, gently curved stroke whose opacity fades towards its ends.
"""

from __future__ import annotations

import math

import torch

from anomnet.synthesis.base import randint, uniform

MIN_ALPHA = 0.25
"""Least opacity of a defect pixel: fainter rims are cut (the mask is only what visibly changed)."""


def _cut(alpha: torch.Tensor, min_alpha: float) -> torch.Tensor:
    alpha = alpha.clamp(0.0, 1.0)
    return torch.where(alpha >= min_alpha, alpha, torch.zeros_like(alpha))


def _box(h: int, w: int, cy: float, cx: float, radius: float) -> tuple[int, int, int, int]:
    """Pixel rows ``[y0, y1)`` and columns ``[x0, x1)`` of a square of ``radius`` about the centre, in bounds."""
    y0, y1 = max(0, int(math.floor(cy - radius))), min(h, int(math.ceil(cy + radius)) + 1)
    x0, x1 = max(0, int(math.floor(cx - radius))), min(w, int(math.ceil(cx + radius)) + 1)
    return y0, y1, x0, x1


def _grid(y0: int, y1: int, x0: int, x1: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-centre coordinates of a window: ``ys [h, 1]``, ``xs [1, w]``."""
    ys = torch.arange(y0, y1, dtype=torch.float32)[:, None] + 0.5
    xs = torch.arange(x0, x1, dtype=torch.float32)[None, :] + 0.5
    return ys, xs


def spot_alpha(
    h: int,
    w: int,
    centre: tuple[float, float],
    rng: torch.Generator,
    size: tuple[float, float] = (0.02, 0.08),
    min_alpha: float = MIN_ALPHA,
) -> torch.Tensor:
    """An irregular blob centred at ``centre`` (y, x in pixels), radius ``size`` x the shorter side."""
    radius = max(1.0, uniform(rng, *size) * min(h, w))
    harmonics = [(k, uniform(rng, 0.0, 0.25 / k**0.5), uniform(rng, 0.0, 2 * math.pi)) for k in range(2, 6)]
    rim = uniform(rng, 1.0, max(1.0, 0.5 * radius))  # width of the soft rim in pixels
    opacity = uniform(rng, 0.7, 1.0)
    cy, cx = centre
    alpha = torch.zeros(h, w)
    y0, y1, x0, x1 = _box(h, w, cy, cx, radius * 1.8 + rim)
    ys, xs = _grid(y0, y1, x0, x1)
    theta = torch.atan2(ys - cy, xs - cx)
    edge = radius * (1.0 + sum(a * torch.cos(k * theta + p) for k, a, p in harmonics))
    dist = torch.sqrt((ys - cy) ** 2 + (xs - cx) ** 2)
    alpha[y0:y1, x0:x1] = opacity * ((edge - dist) / rim + 0.5).clamp(0.0, 1.0)
    out = _cut(alpha, min_alpha)
    if not bool((out > 0).any()):  # a one-pixel spot at least
        out[min(h - 1, max(0, int(cy))), min(w - 1, max(0, int(cx)))] = 1.0
    return out


def polyline_alpha(
    h: int,
    w: int,
    points: torch.Tensor,
    widths: torch.Tensor,
    opacity: torch.Tensor,
    min_alpha: float = MIN_ALPHA,
) -> torch.Tensor:
    """Opacity of a stroke along ``points [P, 2]`` (y, x): segment ``s`` has width ``widths[s]`` px
    and opacity ``opacity[s]``; a pixel takes the segment nearest to its centre (relative to the
    half width), with one pixel of antialiasing."""
    a, b = points[:-1], points[1:]  # [S, 2]
    margin = float(widths.max()) + 2.0
    y0, x0 = max(0, int(points[:, 0].min() - margin)), max(0, int(points[:, 1].min() - margin))
    y1, x1 = min(h, int(points[:, 0].max() + margin) + 1), min(w, int(points[:, 1].max() + margin) + 1)
    alpha = torch.zeros(h, w)
    if y1 <= y0 or x1 <= x0:
        return alpha
    ys, xs = _grid(y0, y1, x0, x1)
    p = torch.stack([ys.expand(-1, x1 - x0), xs.expand(y1 - y0, -1)], dim=-1).reshape(-1, 1, 2)  # [N, 1, 2]
    ab = b - a
    t = (((p - a) * ab).sum(-1) / (ab * ab).sum(-1).clamp_min(1e-12)).clamp(0.0, 1.0)  # [N, S]
    dist = (p - (a + t[..., None] * ab)).norm(dim=-1)  # [N, S]
    cover = (widths / 2.0 - dist + 0.5).clamp(0.0, 1.0) * opacity  # [N, S]
    alpha[y0:y1, x0:x1] = cover.amax(1).reshape(y1 - y0, x1 - x0)
    return _cut(alpha, min_alpha)


def _random_walk(
    start: tuple[float, float], heading: float, length: float, steps: int, turn: float, rng: torch.Generator
) -> torch.Tensor:
    pts = [start]
    y, x = start
    step = length / steps
    for _ in range(steps):
        heading += math.radians(uniform(rng, -turn, turn))
        y, x = y + step * math.sin(heading), x + step * math.cos(heading)
        pts.append((y, x))
    return torch.tensor(pts, dtype=torch.float32)


def _taper(n: int, thick: float, thin: float) -> torch.Tensor:
    """``n`` widths, ``thick`` in the middle, ``thin`` at both ends."""
    s = (torch.arange(n, dtype=torch.float32) + 0.5) / n
    return thin + (thick - thin) * torch.sin(math.pi * s)


def crack_alpha(
    h: int,
    w: int,
    centre: tuple[float, float],
    rng: torch.Generator,
    size: tuple[float, float] = (0.1, 0.4),
    min_alpha: float = MIN_ALPHA,
) -> torch.Tensor:
    """A jagged crack through ``centre``: length ``size`` x the shorter side, 1 to 3 px wide, tapered."""
    side = min(h, w)
    length = max(4.0, uniform(rng, *size) * side)
    steps = max(4, int(length / max(2.0, side / 64)))
    heading = uniform(rng, 0.0, 2 * math.pi)
    thick = uniform(rng, 1.2, max(1.5, 3.0 * side / 256))
    half = _random_walk(centre, heading, length / 2, steps // 2, 30.0, rng)
    other = _random_walk(centre, heading + math.pi, length / 2, steps - steps // 2, 30.0, rng)
    points = torch.cat([other.flip(0), half[1:]])
    alpha = polyline_alpha(h, w, points, _taper(len(points) - 1, thick, 0.6), torch.ones(len(points) - 1), min_alpha)
    if uniform(rng, 0.0, 1.0) < 0.5:  # one branch from a point of the crack
        origin = points[randint(rng, 1, len(points) - 1)]
        branch = _random_walk(
            (float(origin[0]), float(origin[1])),
            heading + math.radians(uniform(rng, 30.0, 70.0)) * (1 if uniform(rng, 0, 1) < 0.5 else -1),
            length * uniform(rng, 0.2, 0.5),
            max(2, steps // 3),
            30.0,
            rng,
        )
        widths = _taper(len(branch) - 1, thick * 0.7, 0.6)
        alpha = torch.maximum(alpha, polyline_alpha(h, w, branch, widths, torch.ones(len(branch) - 1), min_alpha))
    return alpha


def scratch_alpha(
    h: int,
    w: int,
    centre: tuple[float, float],
    rng: torch.Generator,
    size: tuple[float, float] = (0.2, 0.6),
    min_alpha: float = MIN_ALPHA,
) -> torch.Tensor:
    """A thin, gently curved stroke through ``centre``: length ``size`` x the shorter side, fading at the ends."""
    side = min(h, w)
    length = max(4.0, uniform(rng, *size) * side)
    heading = uniform(rng, 0.0, 2 * math.pi)
    bend = uniform(rng, -0.15, 0.15) * length  # sagitta of the arc
    cy, cx = centre
    dy, dx = math.sin(heading), math.cos(heading)
    t = torch.linspace(-0.5, 0.5, 25)
    ys = cy + t * length * dy + bend * (1 - 4 * t * t) * dx
    xs = cx + t * length * dx - bend * (1 - 4 * t * t) * dy
    points = torch.stack([ys, xs], dim=1)
    width = uniform(rng, 1.0, max(1.2, 2.0 * side / 256))
    mid = (t[:-1] + t[1:]) / 2
    opacity = uniform(rng, 0.6, 1.0) * (0.5 + 0.5 * torch.cos(math.pi * mid)).clamp_min(min_alpha + 0.05)
    return polyline_alpha(h, w, points, torch.full((len(points) - 1,), width), opacity, min_alpha)
