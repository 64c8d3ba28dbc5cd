"""Evaluation metrics for anomaly detection: image level and pixel level.

Image level (one score and one label per image, small arrays held in memory):

* :func:`image_auroc` -- ROC AUC, ties counted as one half (Mann-Whitney U with average ranks).
* :func:`f1_max` -- the best F1 over all thresholds ``score >= t`` and the threshold reaching it.
* :func:`precision_recall_f1` -- the three numbers at one threshold.
* :func:`roc_curve`, :func:`precision_recall_curve` -- the curves behind AUROC and F1-max.

Pixel level (exact, with memory bounded by 8 bytes per pixel): :class:`PixelMetricAccumulator`
collects anomaly maps and ground-truth masks one image at a time and then computes the pixel
AUROC, the pixel F1-max and the AU-PRO exactly as MVTec AD's official evaluation script does
(``compute_pro`` and ``trapezoid`` of ``mvtec_ad_evaluation``), and on request the same walk's
ROC / PR / PRO curves thinned to a bounded number of points (:class:`PixelCurves`, for plots):

* ground-truth regions are the 8-connected components of each mask, pooled over the test set;
  every region weighs the same (each of its pixels adds ``1 / region size`` to the overlap);
* all pixel scores of all images are sorted together; the false positive rate at threshold ``t``
  is the share of ALL normal pixels (good images included) with ``score >= t``;
* of a run of equal scores only the last curve point is kept; the curve starts at ``(0, 0)``,
  ends at ``(1, 1)``, and values are clipped to at most 1;
* the trapezoid integral goes up to the FPR limit; when the limit is not an FPR value of the
  curve, the piece between the last point below it and the limit is added with the PRO
  interpolated linearly; the area is divided by the limit.

The one deliberate difference from the official script: FPRs are computed in float64 (the
script casts them to float32), so results agree with it to about 1e-7, not to the last bit.

Conventions: "predicted anomalous" means ``score >= threshold``; a metric that needs both
classes is ``nan`` when one is missing; malformed input (NaN or infinite scores, shape
mismatches, labels that are not 0/1) raises :class:`anomnet.errors.ConfigError`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from anomnet.errors import ConfigError

__all__ = [
    "PixelCurves",
    "PixelMetricAccumulator",
    "PixelMetrics",
    "f1_max",
    "image_auroc",
    "precision_recall_curve",
    "precision_recall_f1",
    "roc_curve",
]

#: Number of sorted pixels :meth:`PixelMetricAccumulator.compute` handles per step (its float64
#: temporaries are a few times this many elements). Tests set it tiny to exercise chunk edges.
CHUNK_SIZE: int = 1 << 21

#: Largest storage block (in pixels) the accumulator allocates when it has to grow.
BLOCK_SIZE: int = 1 << 23

_MIN_BLOCK = 1 << 16
_LOW32 = np.uint64(0xFFFFFFFF)
_SHIFT32 = np.uint64(32)
_SIGN32 = np.uint32(0x80000000)
_MAX_REGIONS = 0xFFFFFFFF
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


# --------------------------------------------------------------------------------------------
# Input checking
# --------------------------------------------------------------------------------------------


def _to_numpy(value: Any) -> np.ndarray:
    """A numpy array from a numpy array, a torch tensor (any device) or a sequence."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # torch.Tensor, without importing torch
        tensor = value.detach().cpu()
        if tensor.is_floating_point():
            tensor = tensor.float()  # float16 / bfloat16 have no (or no exact) numpy twin
        return tensor.numpy()
    return np.asarray(value)


def _image_scores(scores: Any) -> npt.NDArray[np.float64]:
    arr = _to_numpy(scores)
    if arr.ndim != 1:
        raise ConfigError(f"image scores must be a 1-D array, got shape {arr.shape}")
    if arr.dtype == bool or not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ConfigError(f"image scores must be real numbers, got dtype {arr.dtype}")
    arr = arr.astype(np.float64, copy=False)
    if not np.isfinite(arr).all():
        bad = int(np.count_nonzero(~np.isfinite(arr)))
        raise ConfigError(f"image scores contain {bad} NaN or infinite value(s)")
    return arr


def _binary_labels(labels: Any, n: int) -> npt.NDArray[np.bool_]:
    arr = _to_numpy(labels)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ConfigError(f"labels must be a 1-D array of the scores' length {n}, got shape {arr.shape}")
    if arr.dtype == bool:
        return arr
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ConfigError(f"labels must be 0/1 or bool, got dtype {arr.dtype}")
    if not np.isin(arr, (0, 1)).all():
        raise ConfigError("labels must be 0 (good) or 1 (anomalous); found other values")
    return arr == 1


def _check_threshold(threshold: float) -> float:
    try:
        t = float(threshold)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"threshold must be a number, got {threshold!r}") from exc
    if math.isnan(t):
        raise ConfigError("threshold must not be NaN")
    return t


def _check_limits(pro_limits: float | Iterable[float]) -> list[float]:
    if isinstance(pro_limits, (int, float, np.floating, np.integer)):
        pro_limits = [pro_limits]
    limits = []
    for lim in pro_limits:
        value = float(lim)
        if not (0.0 < value <= 1.0):
            raise ConfigError(f"AU-PRO FPR limits must lie in (0, 1], got {lim!r}")
        if value not in limits:  # a repeated limit is computed once
            limits.append(value)
    return limits


# --------------------------------------------------------------------------------------------
# Image level
# --------------------------------------------------------------------------------------------


def image_auroc(scores: npt.ArrayLike, labels: npt.ArrayLike) -> float:
    """Area under the ROC curve of image scores; ``labels`` 1/True = anomalous.

    Ties between a good and an anomalous image count one half (average ranks), which is the
    area under the ROC curve drawn through all distinct thresholds. ``nan`` when either class
    is missing.
    """
    s = _image_scores(scores)
    y = _binary_labels(labels, s.shape[0])
    n_pos = int(np.count_nonzero(y))
    n_neg = y.shape[0] - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    u = float(np.sum(_average_ranks(s)[y])) - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


def _average_ranks(values: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """1-based ranks; a group of equal values all get the mean of the ranks they span."""
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    starts = np.flatnonzero(np.append(True, sorted_values[1:] != sorted_values[:-1]))
    ends = np.append(starts[1:], values.size)  # exclusive
    group_rank = (starts + 1 + ends) / 2.0  # mean of starts+1 .. ends
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = np.repeat(group_rank, ends - starts)
    return ranks


def precision_recall_f1(scores: npt.ArrayLike, labels: npt.ArrayLike, threshold: float) -> tuple[float, float, float]:
    """Precision, recall and F1 when ``score >= threshold`` is called anomalous (0/0 is 0)."""
    s = _image_scores(scores)
    y = _binary_labels(labels, s.shape[0])
    pred = s >= _check_threshold(threshold)
    tp = int(np.count_nonzero(pred & y))
    fp = int(np.count_nonzero(pred & ~y))
    fn = int(np.count_nonzero(~pred & y))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2.0 * tp / (2 * tp + fp + fn) if tp else 0.0
    return precision, recall, f1


def false_alarm_rate(scores: npt.ArrayLike, labels: npt.ArrayLike, threshold: float) -> float:
    """Share of the good images (label 0) with ``score >= threshold``: flagged although good (NaN without any)."""
    s = _image_scores(scores)
    y = _binary_labels(labels, s.shape[0])
    good = ~y
    if not good.any():
        return float("nan")
    return float(np.count_nonzero((s >= _check_threshold(threshold)) & good) / np.count_nonzero(good))


def f1_max(scores: npt.ArrayLike, labels: npt.ArrayLike) -> tuple[float, float]:
    """The best F1 over all thresholds ``score >= t`` and the threshold reaching it.

    Only the distinct scores are candidate thresholds; when several reach the best F1 the
    highest one is returned. ``(nan, nan)`` when there is no anomalous image.
    """
    s = _image_scores(scores)
    y = _binary_labels(labels, s.shape[0])
    n_pos = int(np.count_nonzero(y))
    if n_pos == 0:
        return float("nan"), float("nan")
    tp, fp, thresholds = _counts_by_threshold(s, y)
    f1 = 2.0 * tp / (tp + fp + n_pos)  # = 2 TP / (2 TP + FP + FN)
    best = int(np.argmax(f1))
    return float(f1[best]), float(thresholds[best])


def _counts_by_threshold(
    s: npt.NDArray[np.float64], y: npt.NDArray[np.bool_]
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    """TP and FP counts when ``score >= t``, for every distinct score ``t``, highest first."""
    order = np.argsort(-s, kind="stable")
    s_desc = s[order]
    tp = np.cumsum(y[order], dtype=np.int64)
    fp = np.arange(1, s.shape[0] + 1, dtype=np.int64) - tp
    run_end = np.append(s_desc[:-1] != s_desc[1:], True)
    return tp[run_end], fp[run_end], s_desc[run_end]


def roc_curve(
    scores: npt.ArrayLike, labels: npt.ArrayLike
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Image ROC curve: ``(fpr, tpr, thresholds)`` through every distinct score, highest first.

    The curve starts at ``(0, 0)`` with threshold ``inf`` and ends at ``(1, 1)``; its trapezoid
    area is :func:`image_auroc`. Raises :class:`ConfigError` when a class is missing.
    """
    s = _image_scores(scores)
    y = _binary_labels(labels, s.shape[0])
    n_pos = int(np.count_nonzero(y))
    n_neg = y.shape[0] - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ConfigError("a ROC curve needs both good and anomalous images")
    tp, fp, thresholds = _counts_by_threshold(s, y)
    return (
        np.concatenate(([0.0], fp / n_neg)),
        np.concatenate(([0.0], tp / n_pos)),
        np.concatenate(([np.inf], thresholds)),
    )


def precision_recall_curve(
    scores: npt.ArrayLike, labels: npt.ArrayLike
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Image precision-recall curve: ``(precision, recall, thresholds)``, highest threshold first.

    One point per distinct score (``score >= t`` called anomalous). Raises :class:`ConfigError`
    when there is no anomalous image.
    """
    s = _image_scores(scores)
    y = _binary_labels(labels, s.shape[0])
    n_pos = int(np.count_nonzero(y))
    if n_pos == 0:
        raise ConfigError("a precision-recall curve needs anomalous images")
    tp, fp, thresholds = _counts_by_threshold(s, y)
    return tp / (tp + fp), tp / n_pos, thresholds


# --------------------------------------------------------------------------------------------
# Pixel level
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PixelCurves:
    """Pixel ROC, precision-recall and PRO curves, thinned to a bounded number of points.

    Points follow the threshold from the highest score down (one per distinct score), starting at
    FPR = TPR = PRO = 0 (precision 1 there by convention) and ending at FPR = TPR = PRO = 1.
    With ``n`` = ``curve_points`` of :meth:`PixelMetricAccumulator.compute`, the points are
    binned by ``floor(fpr * n) + floor(tpr * n)`` and the first and last point of every bin are
    kept: at most ``4 n + 3`` points, and two neighbouring kept points are either neighbours on
    the full curve or less than ``1 / n`` apart in FPR and TPR. ``pro`` is the MVTec per-region
    overlap (the curve AU-PRO integrates).
    """

    fpr: npt.NDArray[np.float64]
    tpr: npt.NDArray[np.float64]
    precision: npt.NDArray[np.float64]
    pro: npt.NDArray[np.float64]


@dataclass(frozen=True)
class PixelMetrics:
    """Pixel-level results of :meth:`PixelMetricAccumulator.compute`.

    ``au_pro`` maps each FPR limit to the normalised area under the PRO curve up to it;
    ``curves`` holds the thinned curves when they were asked for.
    """

    auroc: float
    f1_max: float
    f1_threshold: float
    au_pro: dict[float, float] = field(default_factory=dict)
    num_normal_pixels: int = 0
    num_anomalous_pixels: int = 0
    num_regions: int = 0
    curves: PixelCurves | None = None


def _float32_to_ordered_uint32(scores: npt.NDArray[np.float32]) -> npt.NDArray[np.uint32]:
    """Map float32 values to uint32 so that unsigned order equals float order (-0.0 must be gone)."""
    bits = scores.view(np.uint32)
    negative = (bits & _SIGN32) != 0
    return np.where(negative, ~bits, bits | _SIGN32)


def _ordered_uint32_to_float(key_hi: int) -> float:
    """Inverse of :func:`_float32_to_ordered_uint32` for one value."""
    bits = key_hi ^ 0x80000000 if key_hi & 0x80000000 else (~key_hi) & 0xFFFFFFFF
    return float(np.array([bits], dtype=np.uint32).view(np.float32)[0])


def _curve_bin(fp: int, tp: int, n_normal: int, n_pos: int, n: int) -> int:
    """``floor(fpr * n) + floor(tpr * n)`` in exact integers (see :class:`PixelCurves`)."""
    return int(fp) * n // n_normal + int(tp) * n // n_pos


def _area_up_to(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Trapezoid area of the polyline (x, y) restricted to x <= limit, MVTec style.

    ``x`` is non-decreasing. Segments whose end lies at or below the limit count fully. The
    segment that strictly straddles the limit (there is one only when the limit is not an x value)
    adds ``0.5 * (y_interp + y0) * (limit - x0)`` with ``y_interp`` linear between its ends --
    the official ``trapezoid``'s correction term.
    """
    x0, x1, y0, y1 = x[:-1], x[1:], y[:-1], y[1:]
    full = x1 <= limit
    area = float(np.sum(0.5 * (y0[full] + y1[full]) * (x1[full] - x0[full])))
    straddle = np.flatnonzero((x0 < limit) & (x1 > limit))
    if straddle.size:
        i = int(straddle[0])
        y_interp = y0[i] + (y1[i] - y0[i]) * (limit - x0[i]) / (x1[i] - x0[i])
        area += float(0.5 * (y_interp + y0[i]) * (limit - x0[i]))
    return area


class PixelMetricAccumulator:
    """Collects anomaly maps and masks, then computes exact pixel AUROC, F1-max and AU-PRO.

    Every pixel is stored as one uint64: the float32 score mapped to an order-preserving uint32 in
    the high half, and a global ground-truth region id in the low half (0 = normal pixel, k > 0 =
    the k-th region found so far over all images). Memory is 8 bytes per pixel; ``compute`` sorts
    the keys in place and walks them from the highest score down in chunks of :data:`CHUNK_SIZE`.

    Scores are compared at float32 precision (float64 maps are rounded to float32 first).

    Args:
        capacity: optional total number of pixels that will be added; storage for exactly that
            many is reserved up front (more can still be added).
    """

    def __init__(self, capacity: int | None = None) -> None:
        if capacity is not None and (int(capacity) != capacity or capacity < 0):
            raise ConfigError(f"capacity must be a non-negative integer or None, got {capacity!r}")
        # Storage: list of [block, fill] pairs; keys live in block[:fill].
        self._blocks: list[tuple[np.ndarray, int]] = []
        if capacity:
            self._blocks.append((np.empty(int(capacity), dtype=np.uint64), 0))
        self._num_pixels = 0
        self._num_normal = 0
        self._region_sizes: list[np.ndarray] = []  # one int64 array per image with regions
        self._num_regions = 0
        self._sorted = True  # whether the stored keys are one block, sorted ascending

    # -- collecting ----------------------------------------------------------------------------

    @property
    def num_pixels(self) -> int:
        """Pixels added so far."""
        return self._num_pixels

    @property
    def num_regions(self) -> int:
        """Ground-truth regions (8-connected components) found so far."""
        return self._num_regions

    def add(self, anomaly_map: Any, mask: Any | None = None) -> None:
        """Add one image: an H x W anomaly map and its H x W ground-truth mask (None = all good).

        The map may be a numpy array or a torch tensor of any real dtype; the mask may be bool or
        numeric (non-zero = anomalous).
        """
        scores = _to_numpy(anomaly_map)
        if scores.ndim != 2:
            raise ConfigError(f"anomaly map must be 2-D (H x W), got shape {scores.shape}")
        if scores.dtype == bool or not (
            np.issubdtype(scores.dtype, np.floating) or np.issubdtype(scores.dtype, np.integer)
        ):
            raise ConfigError(f"anomaly map must hold real numbers, got dtype {scores.dtype}")
        # One float32 copy; adding +0.0 also turns -0.0 into +0.0 so both get the same key.
        with np.errstate(over="ignore"):  # float64 beyond the float32 range -> inf -> rejected below
            scores32 = np.add(scores, np.float32(0.0), dtype=np.float32)
        if not np.isfinite(scores32).all():
            bad = int(np.count_nonzero(~np.isfinite(scores32)))
            raise ConfigError(
                f"anomaly map of shape {scores.shape} contains {bad} NaN or infinite value(s)"
                " (or values beyond the float32 range)"
            )

        if mask is None:
            region_ids = None
            n_regions = 0
        else:
            m = _to_numpy(mask)
            if m.shape != scores.shape:
                raise ConfigError(f"mask shape {tuple(m.shape)} differs from anomaly map shape {tuple(scores.shape)}")
            if m.dtype != bool:
                if not (np.issubdtype(m.dtype, np.integer) or np.issubdtype(m.dtype, np.floating)):
                    raise ConfigError(f"mask must be bool or numeric, got dtype {m.dtype}")
                if np.issubdtype(m.dtype, np.floating) and not np.isfinite(m).all():
                    raise ConfigError("mask contains NaN or infinite values")
                m = m != 0
            labeled, n_regions = ndimage.label(m, structure=_EIGHT_CONNECTED)
            if self._num_regions + n_regions > _MAX_REGIONS:
                raise ConfigError(f"more than {_MAX_REGIONS} ground-truth regions in total")
            if n_regions:
                sizes = np.bincount(labeled.ravel(), minlength=n_regions + 1)[1:].astype(np.int64)
                self._region_sizes.append(sizes)
                region_ids = labeled.astype(np.uint64).ravel()
                region_ids[region_ids != 0] += np.uint64(self._num_regions)
            else:
                region_ids = None
            del labeled

        keys = _float32_to_ordered_uint32(scores32.ravel()).astype(np.uint64)
        del scores32
        keys <<= _SHIFT32
        n_anomalous = 0
        if region_ids is not None:
            keys |= region_ids
            n_anomalous = int(np.count_nonzero(region_ids))
            del region_ids
        self._store(keys)
        self._num_pixels += keys.size
        self._num_normal += keys.size - n_anomalous
        self._num_regions += n_regions

    def _store(self, keys: np.ndarray) -> None:
        """Append keys to the block storage, growing it geometrically up to BLOCK_SIZE per block."""
        if keys.size == 0:
            return
        self._sorted = False
        pos = 0
        while pos < keys.size:
            if self._blocks and self._blocks[-1][1] < self._blocks[-1][0].size:
                block, fill = self._blocks[-1]
            else:
                remaining = keys.size - pos
                size = max(remaining, min(BLOCK_SIZE, max(self._num_pixels + pos, _MIN_BLOCK)))
                block, fill = np.empty(size, dtype=np.uint64), 0
                self._blocks.append((block, fill))
            take = min(block.size - fill, keys.size - pos)
            block[fill : fill + take] = keys[pos : pos + take]
            self._blocks[-1] = (block, fill + take)
            pos += take

    def _sorted_keys(self) -> np.ndarray:
        """All keys, ascending, in one array (sorted in place; consolidates blocks once)."""
        if not self._blocks:
            return np.empty(0, dtype=np.uint64)
        if len(self._blocks) > 1:
            # Copy into one exact-size array, freeing each block right after it is copied, so the
            # peak stays near 8 bytes per pixel plus one block (no concatenate of everything).
            out = np.empty(self._num_pixels, dtype=np.uint64)
            pos = 0
            while self._blocks:
                block, fill = self._blocks.pop(0)
                out[pos : pos + fill] = block[:fill]
                pos += fill
                del block
            self._blocks = [(out, out.size)]
        block, fill = self._blocks[0]
        keys = block[:fill]
        if not self._sorted:
            keys.sort()  # in place: no argsort, no copy
            self._sorted = True
        return keys

    # -- computing -----------------------------------------------------------------------------

    def compute(
        self,
        pro_limits: float | Sequence[float] = (0.3,),
        *,
        chunk_size: int | None = None,
        curve_points: int = 0,
    ) -> PixelMetrics:
        """Pixel AUROC, pixel F1-max (and its threshold) and AU-PRO for each FPR limit.

        All metrics are ``nan`` when there is no anomalous pixel; AUROC and AU-PRO are ``nan``
        when there is no normal pixel (the F1-max is still defined then). Can be called again,
        also after adding more images. With ``curve_points > 0`` (and both classes present) the
        same walk also records the curves (:class:`PixelCurves`) at that resolution.
        """
        limits = _check_limits(pro_limits)
        step = CHUNK_SIZE if chunk_size is None else int(chunk_size)
        if step < 1:
            raise ConfigError(f"chunk_size must be at least 1, got {chunk_size!r}")
        if int(curve_points) != curve_points or curve_points < 0:
            raise ConfigError(f"curve_points must be a non-negative integer, got {curve_points!r}")
        n_normal = self._num_normal
        n_pos = self._num_pixels - n_normal
        n_regions = self._num_regions
        nan = float("nan")
        if n_pos == 0:
            return PixelMetrics(nan, nan, nan, {lim: nan for lim in limits}, n_normal, 0, 0)

        keys = self._sorted_keys()
        inv_size = np.zeros(n_regions + 1, dtype=np.float64)
        if n_regions:
            inv_size[1:] = 1.0 / np.concatenate(self._region_sizes)
        both_classes = n_normal > 0

        # Last curve point so far: counts (for AUROC) and (FPR, PRO) (for AU-PRO).
        prev_fp, prev_tp, prev_x, prev_y = 0, 0, 0.0, 0.0
        carry_fp, carry_tp, carry_pro = 0, 0, 0.0  # totals over all pixels walked so far
        auc_twice = 0  # exact integer: sum over segments of (tp0 + tp1) * (fp1 - fp0)
        areas = {lim: 0.0 for lim in limits}
        max_limit = max(limits)
        best_f1, best_hi = -1.0, 0
        record = bool(curve_points) and both_classes
        curve_parts: list[tuple[np.ndarray, ...]] = []
        pending: tuple[np.ndarray, ...] | None = None
        prev_bin = -1
        if record:  # smallest counts reaching floor(count * n / total) = k, for k = 1..n
            levels = np.arange(1, int(curve_points) + 1, dtype=np.int64)
            fp_levels = -((-levels * n_normal) // int(curve_points))
            tp_levels = -((-levels * n_pos) // int(curve_points))

        end = keys.size
        while end > 0:
            start = max(0, end - step)
            chunk = keys[start:end][::-1]  # descending scores
            hi = chunk >> _SHIFT32
            rid = (chunk & _LOW32).view(np.int64)
            m = chunk.size
            is_normal = rid == 0
            cfp = np.cumsum(is_normal, dtype=np.int64)
            ctp = np.arange(1, m + 1, dtype=np.int64)
            ctp -= cfp
            cfp += carry_fp
            ctp += carry_tp
            cpro = np.cumsum(inv_size[rid])
            cpro += carry_pro
            del rid, is_normal
            # A point ends a run of equal scores; the run may continue in the next chunk.
            is_end = np.empty(m, dtype=bool)
            np.not_equal(hi[:-1], hi[1:], out=is_end[:-1])
            is_end[-1] = start == 0 or (int(keys[start - 1]) >> 32) != int(hi[-1])
            carry_fp, carry_tp, carry_pro = int(cfp[-1]), int(ctp[-1]), float(cpro[-1])
            fp_e, tp_e, pro_e, hi_e = cfp[is_end], ctp[is_end], cpro[is_end], hi[is_end]
            del chunk, hi, cfp, ctp, cpro, is_end
            end = start
            if fp_e.size == 0:
                continue

            f1 = 2.0 * tp_e / (tp_e + fp_e + n_pos)
            j = int(np.argmax(f1))
            if f1[j] > best_f1:
                best_f1, best_hi = float(f1[j]), int(hi_e[j])

            if both_classes:
                fp_all = np.concatenate(([prev_fp], fp_e))
                tp_all = np.concatenate(([prev_tp], tp_e))
                auc_twice += int(np.sum((tp_all[:-1] + tp_all[1:]) * np.diff(fp_all)))
                if prev_x <= max_limit:
                    x = np.concatenate(([prev_x], fp_e / n_normal))
                    y = np.concatenate(([prev_y], np.minimum(pro_e / n_regions, 1.0)))
                    for lim in limits:
                        areas[lim] += _area_up_to(x, y, lim)
                    prev_x, prev_y = float(x[-1]), float(y[-1])
                prev_fp, prev_tp = int(fp_e[-1]), int(tp_e[-1])
            if record:
                # Keep the first and the last point of every bin. Bins start where the counts pass
                # a level (found by binary search, exact integers); a chunk's last point waits for
                # the next chunk to tell whether it ends its bin, so chunking changes nothing.
                m_e = fp_e.size
                cuts = np.union1d(np.searchsorted(fp_e, fp_levels), np.searchsorted(tp_e, tp_levels))
                cuts = cuts[(cuts > 0) & (cuts < m_e)]
                first_bin = _curve_bin(fp_e[0], tp_e[0], n_normal, n_pos, curve_points)
                new_at_start = first_bin != prev_bin
                if pending is not None and new_at_start:
                    curve_parts.append(pending)
                idx = np.union1d(cuts, cuts - 1)  # first point of a bin and the last of the one before
                if new_at_start:
                    idx = np.union1d([0], idx)
                if start == 0:  # the last point of the walk (FPR = TPR = 1)
                    idx = np.union1d(idx, [m_e - 1])
                fp_k, tp_k = fp_e[idx], tp_e[idx]
                point = (fp_k / n_normal, tp_k / n_pos, tp_k / (tp_k + fp_k), np.minimum(pro_e[idx] / n_regions, 1.0))
                curve_parts.append(point)
                last = m_e - 1
                pending = (
                    None
                    if (idx.size and idx[-1] == last)
                    else (
                        fp_e[last:] / n_normal,
                        tp_e[last:] / n_pos,
                        tp_e[last:] / (tp_e[last:] + fp_e[last:]),
                        np.minimum(pro_e[last:] / n_regions, 1.0),
                    )
                )
                prev_bin = _curve_bin(fp_e[last], tp_e[last], n_normal, n_pos, curve_points)

        f1_threshold = _ordered_uint32_to_float(best_hi)
        if not both_classes:
            return PixelMetrics(nan, best_f1, f1_threshold, {lim: nan for lim in limits}, 0, n_pos, n_regions)

        # The official curve ends with an appended (1, 1).
        if prev_x <= max_limit:
            x = np.array([prev_x, 1.0])
            y = np.array([prev_y, 1.0])
            for lim in limits:
                areas[lim] += _area_up_to(x, y, lim)
        auroc = auc_twice / (2 * n_pos * n_normal)
        au_pro = {lim: areas[lim] / lim for lim in limits}
        curves = None
        if record:
            fpr, tpr, precision, pro = (
                np.concatenate(([start_value], *(part[i] for part in curve_parts)))
                for i, start_value in enumerate((0.0, 0.0, 1.0, 0.0))
            )
            curves = PixelCurves(fpr, tpr, precision, pro)
        return PixelMetrics(auroc, best_f1, f1_threshold, au_pro, n_normal, n_pos, n_regions, curves)
