"""High-resolution tiling: fit and predict on overlapping tiles at one or more pyramid scales.

A detector normally sees the whole image resized to ``image_size``; on multi-megapixel images
that erases defects a few pixels wide. With tiling, each image is resized by every scale in
``scales`` (1 = original resolution, 0.5 = half), cut into square tiles of ``tile`` pixels of
that scaled image with at least ``overlap`` (a fraction of the tile) shared between
neighbours, and each tile is what the detector's preprocessing (resize to ``image_size``)
and network see. Training streams the tiles in batches; prediction stitches the tile maps
back into one map per scale, weighting each tile by a separable sine window (high in the
middle, small but positive at the edges, so seams blend and every pixel has weight), brings
each scale's map to the original resolution and averages the scales. The image score is the
maximum of that stitched map (``score="map"``) or the largest tile score the detector gave
(``score="tile"``).

The settings live in :class:`anomnet.detectors.base.DetectorConfig` (``tile``,
``tile_overlap``, ``tile_scales``, ``tile_score``), so they are saved with every model and a
loaded model tiles exactly as the fitted one did.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from anomnet.data import Sample, iter_batches
from anomnet.errors import ConfigError
from anomnet.imageio import image_size
from anomnet.transforms import Preprocess, resize, upsample_maps

SCORES = ("map", "tile")
MIN_TILE = 32


@dataclass(frozen=True)
class Tiling:
    """Tile side (px of the image at each scale), overlap fraction, pyramid scales, image score."""

    tile: int
    overlap: float = 0.25
    scales: tuple[float, ...] = (1.0,)
    score: str = "map"

    def __post_init__(self) -> None:
        if self.tile < MIN_TILE:
            raise ConfigError(f"tile must be 0 (no tiling) or at least {MIN_TILE} px, got {self.tile}")
        if not 0.0 <= self.overlap < 1.0:
            raise ConfigError(f"tile_overlap must be in [0, 1), got {self.overlap}")
        if not self.scales:
            raise ConfigError("tile_scales needs at least one scale, e.g. 1 or 1,0.5")
        for s in self.scales:
            if not (0.0 < s <= 4.0) or math.isnan(s):
                raise ConfigError(f"tile_scales must be in (0, 4], got {s}")
        if len(set(self.scales)) != len(self.scales):
            raise ConfigError(f"tile_scales has a repeated scale: {','.join(f'{s:g}' for s in self.scales)}")
        if self.score not in SCORES:
            raise ConfigError(f"tile_score must be one of {', '.join(SCORES)}, got {self.score!r}")


def axis_starts(length: int, tile: int, overlap: float) -> list[int]:
    """Start offsets of tiles of side ``min(tile, length)`` covering ``[0, length)`` exactly.

    The first tile starts at 0, the last ends at ``length``; starts are spread evenly, so
    neighbours overlap by at least ``overlap * tile`` pixels (more where the length asks for it).
    """
    if length < 1:
        raise ConfigError(f"cannot tile an axis of length {length}")
    t = min(tile, length)
    if t == length:
        return [0]
    stride = max(1.0, t * (1.0 - overlap))
    n = math.ceil((length - t) / stride - 1e-9) + 1
    return [round(i * (length - t) / (n - 1)) for i in range(n)]


def tile_grid(hw: tuple[int, int], tile: int, overlap: float) -> list[tuple[int, int, int, int]]:
    """Tiles ``(top, left, height, width)`` of an ``hw`` image, row by row."""
    h, w = hw
    th, tw = min(tile, h), min(tile, w)
    return [(y, x, th, tw) for y in axis_starts(h, tile, overlap) for x in axis_starts(w, tile, overlap)]


def scaled_size(hw: tuple[int, int], scale: float) -> tuple[int, int]:
    return max(1, round(hw[0] * scale)), max(1, round(hw[1] * scale))


def count_tiles(hw: tuple[int, int], tiling: Tiling) -> int:
    """Tiles of one ``hw`` image over all scales."""
    return sum(len(tile_grid(scaled_size(hw, s), tiling.tile, tiling.overlap)) for s in tiling.scales)


def window(length: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Blending weights ``sin(pi (i + 1/2) / length)``: 1 in the middle, positive at both ends."""
    i = torch.arange(length, dtype=torch.float64)
    return torch.sin(math.pi * (i + 0.5) / length).to(dtype)


def iter_tiles(image: torch.Tensor, tiling: Tiling) -> Iterator[tuple[float, tuple[int, int, int, int], torch.Tensor]]:
    """``(scale, (top, left, h, w), tile [3,h,w])`` of one ``[3,H,W]`` image, scale by scale."""
    hw = (int(image.shape[-2]), int(image.shape[-1]))
    for s in tiling.scales:
        scaled = resize(image[None], scaled_size(hw, s))[0]
        for box in tile_grid((int(scaled.shape[-2]), int(scaled.shape[-1])), tiling.tile, tiling.overlap):
            y, x, th, tw = box
            yield s, box, scaled[:, y : y + th, x : x + tw]


def training_batches(
    samples: Sequence[Sample], tiling: Tiling, preprocess: Preprocess, batch_size: int, progress: str | None = None
) -> Iterator[torch.Tensor]:
    """Preprocessed tiles ``[b,3,S,S]`` of every sample, ``batch_size`` at a time (streamed: one image at a time)."""
    pending: list[torch.Tensor] = []
    for batch in iter_batches(samples, 1, size=None, progress=progress):
        for _, _, tile in iter_tiles(batch.images[0], tiling):
            pending.append(preprocess(tile[None].contiguous())[0])
            if len(pending) == batch_size:
                yield torch.stack(pending)
                pending = []
    if pending:
        yield torch.stack(pending)


def count_training_tiles(samples: Sequence[Sample], tiling: Tiling) -> int:
    """How many tiles :func:`training_batches` yields (image sizes read from the file headers)."""
    return sum(count_tiles(image_size(s.path), tiling) for s in samples)


PredictFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def stitch(maps: torch.Tensor, boxes: Sequence[tuple[int, int, int, int]], hw: tuple[int, int]) -> torch.Tensor:
    """Window-weighted average of tile maps ``[n,h,w]`` (each at its box's size) on an ``hw`` canvas."""
    canvas = torch.zeros(hw, dtype=torch.float32)
    weight = torch.zeros(hw, dtype=torch.float32)
    for m, (y, x, th, tw) in zip(maps, boxes):
        wgt = window(th)[:, None] * window(tw)[None, :]
        canvas[y : y + th, x : x + tw] += m * wgt
        weight[y : y + th, x : x + tw] += wgt
    if bool((weight <= 0).any()):  # cannot happen with a grid from tile_grid; guards hand-made boxes
        raise ConfigError("tiles do not cover the whole image")
    return canvas / weight


def predict_tiled(
    predict_preprocessed: PredictFn, preprocess: Preprocess, images: torch.Tensor, tiling: Tiling, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores ``[B]`` and stitched maps ``[B,H,W]`` of ``[B,3,H,W]`` images, tile by tile.

    ``predict_preprocessed`` is the detector's own (scores and ``S x S`` maps of preprocessed
    tiles); each tile map is restored to the tile's size by ``preprocess.restore``.
    """
    hw = (int(images.shape[-2]), int(images.shape[-1]))
    all_scores, all_maps = [], []
    for image in images.float():
        full = torch.zeros(hw, dtype=torch.float32)
        best_tile = -math.inf
        for s in tiling.scales:
            scaled = resize(image[None], scaled_size(hw, s))[0]
            shw = (int(scaled.shape[-2]), int(scaled.shape[-1]))
            boxes = tile_grid(shw, tiling.tile, tiling.overlap)
            tile_maps = []
            for start in range(0, len(boxes), batch_size):
                chunk = boxes[start : start + batch_size]
                tiles = torch.stack([scaled[:, y : y + th, x : x + tw] for y, x, th, tw in chunk])
                scores, maps = predict_preprocessed(preprocess(tiles))
                best_tile = max(best_tile, float(scores.float().max()))
                tile_maps.append(preprocess.restore(maps.float(), (chunk[0][2], chunk[0][3])))
            stitched = stitch(torch.cat(tile_maps), boxes, shw)
            full += upsample_maps(stitched[None], hw)[0]
        full /= len(tiling.scales)
        all_maps.append(full)
        all_scores.append(full.max() if tiling.score == "map" else torch.tensor(best_tile))
    return torch.stack(all_scores).float(), torch.stack(all_maps)
