"""Per-object segmentation settings by search: the pixel threshold and the mask post-processing
chosen together for the best SegF1 on a labelled validation set (the ``segf1`` pixel method).

The MVTec AD 2 hybrid framework (Wang et al., VAND 2025) tuned the threshold, the closing and the
hole filling of each object by hand trials; this automates those trials on a labelled validation
set. Candidates (all in pixels of the original images):

* thresholds: the raw F1-optimal threshold of the labelled maps, and the values at which the share
  of pooled labelled pixels at or above the threshold is that threshold's share times
  :data:`SHARE_FACTORS` (a scale-free bracket around it, from a seeded sample of the pixels);
* closing radii: 0 and :data:`CLOSING_FRACTIONS` of the median long image side;
* hole filling off / on;
* minimum areas: 0 and :data:`AREA_FRACTIONS` of the median image area.

SegF1 is pooled over the images (``2 TP / (2 TP + FP + FN)``, as MVTec AD 2 and
:class:`~anomnet.decisions.postprocess.SegmentationCounts` count it), each mask as the model's one verdict
makes it: an image the image threshold calls good has no mask (its defect pixels count as missed).
For each image, threshold, radius and hole-filling choice the mask is labelled once; every minimum area
is then scored from the regions' sizes and true-positive counts. Ties go to the earlier candidate: no
post-processing before any, smaller radii and areas before larger ones, so a setting is only switched on
when it helps.
Memory: the labelled maps are kept in float32 with their masks (5 bytes per pixel).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from anomnet.decisions.postprocess import MaskPostprocess, close
from anomnet.errors import ConfigError

SHARE_FACTORS = (4.0, 2.8, 2.0, 1.4, 1 / 1.4, 1 / 2.0, 1 / 2.8, 1 / 4.0)
CLOSING_FRACTIONS = (0.002, 0.005, 0.01, 0.02)
AREA_FRACTIONS = (1e-5, 1e-4, 1e-3)
SAMPLE_PER_IMAGE = 65536
_EIGHT = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class SearchResult:
    """The best combination found, its pooled SegF1 and how many combinations were scored."""

    f1: float
    threshold: float
    postprocess: MaskPostprocess
    candidates: int


def candidate_thresholds(maps: Sequence[np.ndarray], raw_threshold: float, seed: int = 0) -> list[float]:
    """The raw F1-optimal threshold first, then thresholds whose share of pixels at or above is scaled."""
    rng = np.random.default_rng(seed)
    parts = []
    for amap in maps:
        flat = np.asarray(amap, dtype=np.float32).ravel()
        if flat.size > SAMPLE_PER_IMAGE:
            flat = flat[rng.choice(flat.size, SAMPLE_PER_IMAGE, replace=False)]
        parts.append(flat)
    pooled = np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.float32)
    out = [float(raw_threshold)]
    if pooled.size == 0 or not math.isfinite(raw_threshold):
        return out
    share = max(1, int(pooled.size - np.searchsorted(pooled, raw_threshold, side="left"))) / pooled.size
    for factor in SHARE_FACTORS:
        k = int(round(min(1.0, share * factor) * pooled.size))  # pixels at or above the candidate
        value = float(pooled[max(0, pooled.size - max(1, k))])
        if value not in out:
            out.append(value)
    return out


def candidate_settings(shapes: Sequence[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """Closing radii and minimum areas (px) scaled to the median image side and area; 0 (off) first."""
    side = float(np.median([max(h, w) for h, w in shapes]))
    area = float(np.median([h * w for h, w in shapes]))
    radii = sorted({0, *(int(round(f * side)) for f in CLOSING_FRACTIONS)})
    areas = sorted({0, *(int(round(f * area)) for f in AREA_FRACTIONS)} - {1})
    return radii, areas


def search_segmentation(
    maps: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    raw_threshold: float,
    thresholds: Sequence[float] | None = None,
    radii: Sequence[int] | None = None,
    areas: Sequence[int] | None = None,
    called_good: Sequence[bool] | None = None,
) -> SearchResult:
    """The threshold / closing / hole filling / minimum area of the best pooled SegF1 over ``maps``.

    ``masks`` are the ground truth (all False for good images). ``called_good``: per image, whether the
    image threshold calls it good (then it predicts no pixel, whatever the pixel threshold). Candidates
    default to the ones described in this module's docstring.
    """
    if len(maps) != len(masks) or not maps:
        raise ConfigError(f"the segmentation search needs maps and masks in pairs, got {len(maps)} and {len(masks)}")
    good = [False] * len(maps) if called_good is None else [bool(g) for g in called_good]
    if len(good) != len(maps):
        raise ConfigError(f"the segmentation search needs a verdict per map, got {len(good)} for {len(maps)} maps")
    truth_total = 0
    for amap, mask in zip(maps, masks):
        if np.shape(amap) != np.shape(mask):
            raise ConfigError(f"anomaly map shape {np.shape(amap)} differs from its mask's {np.shape(mask)}")
        truth_total += int(np.count_nonzero(mask))
    if truth_total == 0:
        raise ConfigError("the segmentation search needs defect pixels in the labelled masks")
    default_radii, default_areas = candidate_settings([np.shape(m) for m in maps])
    thresholds = list(thresholds) if thresholds is not None else candidate_thresholds(maps, raw_threshold)
    radii = sorted(set(radii)) if radii is not None else default_radii
    areas = sorted(set(areas)) if areas is not None else default_areas
    fills = (False, True)
    # tp[t, r, f, a] and predicted[t, r, f, a] pooled over the images
    shape = (len(thresholds), len(radii), len(fills), len(areas))
    tp = np.zeros(shape, dtype=np.int64)
    predicted = np.zeros(shape, dtype=np.int64)
    area_edges = np.asarray(areas, dtype=np.int64)
    for amap, mask, is_good in zip(maps, masks, good):
        if is_good:  # no mask: predicts nothing, misses its defect pixels (counted in truth_total)
            continue
        amap = np.asarray(amap, dtype=np.float32)
        truth = np.asarray(mask, dtype=bool)
        for ti, t in enumerate(thresholds):
            raw = amap >= t
            for ri, r in enumerate(radii):
                closed = close(raw, r) if r > 0 and raw.any() else raw
                for fi, fill in enumerate(fills):
                    m = ndimage.binary_fill_holes(closed) if fill and closed.any() else closed
                    sizes, hits = _region_counts(m, truth)
                    # a region is kept by every minimum area up to its size
                    kept = sizes[None, :] >= area_edges[:, None]
                    tp[ti, ri, fi] += (kept * hits[None, :]).sum(axis=1)
                    predicted[ti, ri, fi] += (kept * sizes[None, :]).sum(axis=1)
    f1 = 2.0 * tp / (predicted + truth_total)
    best = min(itertools.product(*map(range, shape)), key=lambda i: (-f1[i], _complexity(i)))
    ti, ri, fi, ai = best
    post = MaskPostprocess(int(radii[ri]), bool(fills[fi]), int(areas[ai]) if areas[ai] > 1 else 0)
    return SearchResult(float(f1[best]), float(thresholds[ti]), post, int(f1.size))


def _complexity(index: tuple[int, ...]) -> tuple[int, ...]:
    """Earlier candidates win ties: the first threshold, then no / smaller post-processing."""
    ti, ri, fi, ai = index
    return (ri + fi + ai, ri, fi, ai, ti)


def _region_counts(mask: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Size and number of ground-truth pixels of each 8-connected region of ``mask``."""
    if not mask.any():
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    labels, n = ndimage.label(mask, structure=_EIGHT)
    flat = labels.ravel()
    sizes = np.bincount(flat, minlength=n + 1)[1:]
    hits = np.bincount(flat, weights=truth.ravel(), minlength=n + 1)[1:].astype(np.int64)
    return sizes.astype(np.int64), hits
