"""Clean-up of predicted binary masks (the MVTec AD 2 hybrid framework's post-processing).

Three optional steps, applied in this order to ``anomaly map >= pixel threshold``:

1. **closing** with a disk of radius ``closing`` pixels: joins fragments of one defect that a
   thin gap separates. The outside of the image does not erode, so regions that touch the image
   border stay whole (scipy's ``binary_closing`` would treat the outside as background).
2. **hole filling**: background enclosed by a region (not connected to the border) becomes part
   of it (``scipy.ndimage.binary_fill_holes``, 4-connected background).
3. **minimum area**: 8-connected regions smaller than ``min_area`` pixels are dropped (the same
   connectivity as the AU-PRO regions in :mod:`anomnet.evaluation.metrics`).

Sizes are in pixels of the mask, which is at the original image's resolution. The settings are
part of a model's :class:`~anomnet.decisions.calibration.Calibration`, so every mask a model produces
(``anomnet predict``, ``api.predict``) is cleaned the same way.

:func:`postprocess_map` carries the cleaning over to the anomaly map, for metrics that need a
continuous map (AU-PRO): the map is changed as little as possible so that thresholding it at
the pixel threshold gives exactly the cleaned mask (see its docstring).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from anomnet.errors import ConfigError

_EIGHT = np.ones((3, 3), dtype=bool)


MAX_CLOSING = 512  # px radius: a larger disk closes a whole multi-megapixel image and takes minutes
MAX_MIN_AREA = 100_000_000  # px: larger than any image anomnet reads (io.MAX_IMAGE_PIXELS)


@dataclass(frozen=True)
class MaskPostprocess:
    """Mask clean-up settings; all off by default."""

    closing: int = 0
    """Radius in pixels of the disk used for morphological closing (0: off)."""
    fill_holes: bool = False
    """Fill background enclosed by a region."""
    min_area: int = 0
    """Drop 8-connected regions with fewer pixels than this (0: off)."""

    def __post_init__(self) -> None:
        for name, limit in (("closing", MAX_CLOSING), ("min_area", MAX_MIN_AREA)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                raise ConfigError(f"mask post-processing: {name} must be a whole number of pixels >= 0, got {value!r}")
            if value > limit:
                raise ConfigError(f"mask post-processing: {name}={value} is larger than the limit {limit} px")
        if not isinstance(self.fill_holes, (bool, np.bool_)):
            raise ConfigError(f"mask post-processing: fill_holes must be true or false, got {self.fill_holes!r}")

    @property
    def enabled(self) -> bool:
        return self.closing > 0 or bool(self.fill_holes) or self.min_area > 0

    def describe(self) -> str:
        parts = [
            f"closing r={self.closing}" if self.closing else "",
            "hole filling" if self.fill_holes else "",
            f"min area {self.min_area} px" if self.min_area else "",
        ]
        return ", ".join(p for p in parts if p) or "none"

    def apply(self, mask: np.ndarray) -> np.ndarray:
        """The cleaned copy of a 2-D boolean mask."""
        m = np.asarray(mask)
        if m.ndim != 2:
            raise ConfigError(f"a mask must be 2-D (H x W), got shape {m.shape}")
        m = m.astype(bool, copy=True)
        if self.closing > 0 and m.any():
            m = close(m, int(self.closing))
        if self.fill_holes and m.any():
            m = ndimage.binary_fill_holes(m)
        if self.min_area > 1 and m.any():
            labels, n = ndimage.label(m, structure=_EIGHT)
            if n:
                sizes = np.bincount(labels.ravel(), minlength=n + 1)
                keep = sizes >= self.min_area
                keep[0] = False
                m = keep[labels]
        return m

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> MaskPostprocess:
        data = dict(data or {})
        unknown = sorted(set(data) - {"closing", "fill_holes", "min_area"})
        if unknown:
            raise ConfigError(f"unknown mask post-processing setting(s): {', '.join(unknown)}")
        return cls(**data)


def disk(radius: int) -> np.ndarray:
    """Boolean disk of the given radius, ``(2r+1) x (2r+1)``."""
    r = int(radius)
    y, x = np.ogrid[-r : r + 1, -r : r + 1]
    return (x * x + y * y) <= r * r


def close(mask: np.ndarray, radius: int) -> np.ndarray:
    """Morphological closing with :func:`disk` ``(radius)``; the outside of the image does not erode.

    Computed with two exact Euclidean distance transforms (dilation: within ``radius`` of the
    mask; erosion: farther than ``radius`` from the dilation's background), which equals
    ``ndimage.binary_closing`` with the disk on the mask padded by ``radius`` and is several times
    faster for larger radii.
    """
    r = int(radius)
    padded = np.pad(np.asarray(mask, dtype=bool), r, mode="constant")
    dilated = ndimage.distance_transform_edt(~padded) <= r + 1e-6
    if dilated.all():
        return dilated[r:-r, r:-r].copy()
    closed = ndimage.distance_transform_edt(dilated) > r + 1e-6
    return closed[r:-r, r:-r]


def count_regions(mask: np.ndarray) -> int:
    """Number of 8-connected regions of a boolean mask."""
    return int(ndimage.label(np.asarray(mask, dtype=bool), structure=_EIGHT)[1]) if np.any(mask) else 0


def region_boxes(mask: np.ndarray) -> list[list[int]]:
    """Bounding box ``[x0, y0, x1, y1]`` (ends exclusive) of each 8-connected region, in label order."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return []
    labels, _ = ndimage.label(mask, structure=_EIGHT)
    return [[s[1].start, s[0].start, s[1].stop, s[0].stop] for s in ndimage.find_objects(labels) if s is not None]


PEAK_LEVEL = 0.5
"""Where the region of an image's maximum ends: halfway between the typical good map value and the maximum."""


def peak_region(amap: np.ndarray, level: float) -> np.ndarray:
    """The 8-connected region of ``amap >= level`` that holds the map's maximum (empty for a map without numbers).

    ``level`` is lowered to the maximum when it lies above it, so the region holds at least the maximum's pixel.
    """
    amap = np.asarray(amap, dtype=np.float32)
    finite = np.isfinite(amap)
    if amap.ndim != 2 or not finite.any():
        return np.zeros(amap.shape, dtype=bool)
    values = np.where(finite, amap, -np.inf)
    peak = np.unravel_index(int(np.argmax(values)), amap.shape)
    above = values >= min(float(level), float(values[peak]))
    labels, _ = ndimage.label(above, structure=_EIGHT)
    return labels == labels[peak]


def postprocess_map(amap: np.ndarray, threshold: float, settings: MaskPostprocess) -> tuple[np.ndarray, np.ndarray]:
    """Cleaned mask and the anomaly map made consistent with it.

    ``mask = settings.apply(amap >= threshold)``. The returned map equals ``amap`` except where
    the cleaning changed the mask: pixels it removed are lowered to just below the threshold,
    pixels it added (closing, filled holes) are raised to the threshold. So ``map >= threshold``
    is exactly the cleaned mask, and the ranking of all other pixels is untouched; metrics of
    the map (AU-PRO) then measure the cleaned segmentation. Without cleaning the map is returned
    as is.
    """
    amap = np.asarray(amap, dtype=np.float32)
    raw = amap >= threshold
    if not settings.enabled or not np.isfinite(threshold):
        return raw, amap
    mask = settings.apply(raw)
    t32 = np.float32(threshold)
    at_or_above = t32 if t32 >= threshold else np.nextafter(t32, np.float32(np.inf))
    below = np.nextafter(at_or_above, np.float32(-np.inf))
    out = amap.copy()
    out[raw & ~mask] = below
    out[mask & ~raw] = at_or_above
    return mask, out


class SegmentationCounts:
    """Pixel TP / FP / FN of predicted masks against ground truth, pooled over images (SegF1 of MVTec AD 2)."""

    def __init__(self) -> None:
        self.tp = self.fp = self.fn = 0

    def add(self, predicted: np.ndarray, truth: np.ndarray) -> None:
        p, t = np.asarray(predicted, dtype=bool), np.asarray(truth, dtype=bool)
        if p.shape != t.shape:
            raise ConfigError(f"predicted mask shape {p.shape} differs from the ground truth's {t.shape}")
        tp = int(np.count_nonzero(p & t))
        self.tp += tp
        self.fp += int(np.count_nonzero(p)) - tp
        self.fn += int(np.count_nonzero(t)) - tp

    def f1(self) -> float:
        """``2 TP / (2 TP + FP + FN)``; NaN when there is no defect pixel at all, 0 when none is found."""
        if self.tp + self.fn == 0:
            return float("nan")
        return 2.0 * self.tp / (2 * self.tp + self.fp + self.fn)
