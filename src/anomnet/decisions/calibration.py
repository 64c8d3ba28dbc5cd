"""Thresholds and normalisation statistics, derived from good validation images, saved with a model.

Everything here works on numbers only (no detector): :mod:`anomnet.decisions.calibrate` runs a detector
over the validation (and an optional labelled) set and hands the statistics to :func:`calibrate`.

**Image threshold** (``image_method``); an image is called defective when ``score >= threshold``:

* ``conformal`` (default): every score gets a conformal p-value
  ``p(s) = (1 + #{validation scores >= s}) / (n + 1)``; the threshold flags ``p(s) <= max_false_alarm``.
  With ``n`` good validation images the finest false-alarm rate is ``1 / (n + 1)``.
* ``mean-std``: ``mean + std_k * std`` of the validation scores (the MVTec AD 2 baseline; sample std).
* ``fixed``: a value the user gives.
* ``f1``: the F1-optimal threshold on a labelled validation set with defective images.

Whatever the method, every prediction gets its conformal p-value, and ``achieved_false_alarm``
is the false-alarm rate the validation set supports for the chosen threshold:
``(1 + #{validation scores >= threshold}) / (n + 1)`` (for ``conformal`` the guarantee itself).

**Pixel threshold** (``pixel_method``) for the masks of defective images; a pixel of an image called
defective is defective when ``map >= pixel_threshold`` (a good image has no mask, a defective one at
least the region of its maximum: :meth:`Calibration.verdict`):

* ``quantile`` (default): the per-pixel false-alarm target ``pixel_false_alarm`` (default 1e-4)
  as an upper quantile of the pooled map values of the good validation images. A sample of up
  to 65,536 pixels per image is pooled; the top of its sorted values is kept as a table
  (``pixel_tail``: every rank below 256, then 256 log-spaced ranks), so the target can be changed
  later without the data.
* ``mean-std``: ``mean + pixel_std_k * std`` of the pooled good validation pixels (population
  std; ``pixel_std_k`` 3 is MVTec AD 2's baseline segmentation threshold).
* ``f1``: the F1-optimal pixel threshold on a labelled validation set with masks.
* ``segf1``: the pixel threshold searched jointly with the mask post-processing (closing radius,
  hole filling, minimum area) for the best SegF1 on a labelled validation set with masks
  (:mod:`anomnet.decisions.segsearch`); the chosen post-processing replaces the current one.
* ``fixed``: a value the user gives.

Mask post-processing settings (:class:`~anomnet.decisions.postprocess.MaskPostprocess`) are kept here too,
so every mask a saved model produces is cleaned identically. :meth:`Calibration.rethreshold`
picks other methods on a fitted model without refitting.
"""

from __future__ import annotations

import math
import typing
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import numpy as np

from anomnet.decisions.postprocess import PEAK_LEVEL, MaskPostprocess, peak_region
from anomnet.errors import ConfigError

IMAGE_METHODS = ("conformal", "mean-std", "fixed", "f1")
PIXEL_METHODS = ("quantile", "mean-std", "f1", "segf1", "fixed")
SOURCES = ("holdout", "loo", "crossfit")  # where the calibration scores come from (anomnet.decisions.calibrate)
DEFAULT_PIXEL_FALSE_ALARM = 1e-4  # measured on bottle, docs/decisions.md
PIXELS_PER_IMAGE = 65536
_TAIL_DENSE = 256
_TAIL_LOG = 256


@dataclass
class ThresholdOptions:
    """How the image and pixel thresholds are chosen."""

    image_method: str = "conformal"
    max_false_alarm: float = 0.01
    std_k: float = 3.0
    image_value: float | None = None
    pixel_method: str = "quantile"
    pixel_false_alarm: float = DEFAULT_PIXEL_FALSE_ALARM
    pixel_value: float | None = None
    pixel_std_k: float = 3.0

    def __post_init__(self) -> None:
        if self.image_method not in IMAGE_METHODS:
            raise ConfigError(
                f"image threshold method {self.image_method!r} unknown; use one of: {', '.join(IMAGE_METHODS)}"
            )
        if self.pixel_method not in PIXEL_METHODS:
            raise ConfigError(
                f"pixel threshold method {self.pixel_method!r} unknown; use one of: {', '.join(PIXEL_METHODS)}"
            )
        if not 0.0 < self.max_false_alarm < 1.0:
            raise ConfigError(f"max_false_alarm must be in (0, 1), got {self.max_false_alarm}")
        if not 0.0 < self.pixel_false_alarm < 1.0:
            raise ConfigError(f"pixel_false_alarm must be in (0, 1), got {self.pixel_false_alarm}")
        for name in ("std_k", "pixel_std_k"):
            if not math.isfinite(getattr(self, name)):
                raise ConfigError(f"{name} must be a finite number, got {getattr(self, name)}")
        if self.image_method == "fixed" and (self.image_value is None or not math.isfinite(self.image_value)):
            raise ConfigError("the 'fixed' image threshold needs a finite value (--image-value / image_value=)")
        if self.pixel_method == "fixed" and (self.pixel_value is None or not math.isfinite(self.pixel_value)):
            raise ConfigError("the 'fixed' pixel threshold needs a finite value (--pixel-value / pixel_value=)")


@dataclass
class LabelledStatistics:
    """What a labelled validation set (good + defective images, optional masks) tells the thresholds."""

    source: str
    images: int
    defective: int
    image_f1: float = math.nan
    image_f1_threshold: float = math.nan
    masks: int = 0
    pixel_f1: float = math.nan
    pixel_f1_threshold: float = math.nan
    # the joint search of the ``segf1`` pixel method (anomnet.decisions.segsearch); NaN / 0 when not run
    search_f1: float = math.nan
    search_threshold: float = math.nan
    search_closing: int = 0
    search_fill_holes: bool = False
    search_min_area: int = 0
    search_candidates: int = 0

    @property
    def search_postprocess(self) -> MaskPostprocess:
        return MaskPostprocess(int(self.search_closing), bool(self.search_fill_holes), int(self.search_min_area))

    @classmethod
    def from_scores(
        cls,
        source: str,
        scores: np.ndarray,
        labels: np.ndarray,
        pixel_f1: float = math.nan,
        pixel_f1_threshold: float = math.nan,
        masks: int = 0,
    ) -> LabelledStatistics:
        from anomnet.evaluation.metrics import f1_max

        labels = np.asarray(labels, dtype=np.int64)
        n_bad = int(labels.sum())
        f1, thr = f1_max(np.asarray(scores, dtype=np.float64), labels) if n_bad else (math.nan, math.nan)
        return cls(
            source, int(labels.size), n_bad, float(f1), float(thr), masks, float(pixel_f1), float(pixel_f1_threshold)
        )


@dataclass
class Calibration:
    """Validation statistics, the thresholds derived from them, and the mask post-processing."""

    validation_scores: list[float] = field(default_factory=list)
    max_false_alarm: float = 0.01
    threshold: float = math.inf
    achieved_false_alarm: float = 1.0
    note: str = ""
    map_low: float = 0.0  # median anomaly-map value of the good validation images
    map_high: float = 1.0  # highest anomaly-map value seen on them (heat maps put it mid-scale)
    image_method: str = "conformal"
    std_k: float = 3.0
    image_value: float | None = None
    score_mean: float = math.nan  # of the validation scores (normalisation statistics)
    score_std: float = math.nan
    pixel_method: str = "quantile"
    pixel_false_alarm: float = DEFAULT_PIXEL_FALSE_ALARM
    pixel_value: float | None = None
    pixel_threshold: float = math.inf
    pixel_achieved_false_alarm: float = math.nan  # share of sampled good validation pixels >= pixel_threshold
    pixel_note: str = ""
    pixel_std_k: float = 3.0
    pixel_mean: float = math.nan  # of the sampled good validation pixels (the mean-std pixel threshold)
    pixel_std: float = math.nan  # their population standard deviation
    pixel_count: int = 0  # sampled good validation pixels
    pixel_tail: list[list[float]] = field(
        default_factory=list
    )  # [rank, value]: value of the rank-th highest sampled pixel
    labelled: dict[str, Any] | None = None  # LabelledStatistics as a dict, when one was given
    postprocess: MaskPostprocess = field(default_factory=MaskPostprocess)
    # Where the calibration scores came from (anomnet.decisions.calibrate, docs/decisions.md): "holdout" (good images
    # held out of training), "loo" (also every training image, scored without its own memory-bank patches),
    # "crossfit" (also every training image, scored by a model fitted on the other folds).
    source: str = "holdout"
    source_note: str = ""  # the calibration set in words
    training_hashes: list[str] = field(default_factory=list)  # content hashes of the training images, fit order
    suspects: list[dict[str, Any]] = field(default_factory=list)  # {rank, image, score, z}: most suspect first
    excluded: list[str] = field(default_factory=list)  # training images left out as suspects at fit

    # -- using it -------------------------------------------------------------------------
    def p_values(self, scores: np.ndarray) -> np.ndarray:
        """Conformal p-value of each score against the validation scores."""
        v = np.sort(np.asarray(self.validation_scores, dtype=np.float64))
        s = np.asarray(scores, dtype=np.float64)
        at_least = len(v) - np.searchsorted(v, s, side="left")
        return (1.0 + at_least) / (len(v) + 1.0)

    def decide(self, scores: np.ndarray) -> np.ndarray:
        """True where a score is at or above the image threshold (called defective)."""
        return np.asarray(scores, dtype=np.float64) >= self.threshold

    def verdict(self, score: float, anomaly_map: np.ndarray) -> tuple[bool, np.ndarray]:
        """The one decision and defect mask of an image: every path (predict, API, service, test, report) uses it.

        The image threshold decides: a score below it is a good image, whose mask is empty. A defective image's
        mask is ``map >= pixel_threshold``, post-processed, plus the region of its maximum when that mask misses
        it: the 8-connected region around the maximum of ``map >= min(pixel_threshold, map_low + PEAK_LEVEL *
        (max - map_low))`` (:func:`~anomnet.decisions.postprocess.peak_region`). So a defective image always shows where
        it is most anomalous, and the pixel threshold never contradicts the image threshold.
        """
        amap = np.asarray(anomaly_map, dtype=np.float32)
        if not bool(score >= self.threshold):
            return False, np.zeros(amap.shape, dtype=bool)
        raw = amap >= self.pixel_threshold
        mask = self.postprocess.apply(raw) if self.postprocess.enabled else raw
        values = np.where(np.isfinite(amap), amap, -np.inf)
        peak = int(np.argmax(values)) if values.size else 0
        if values.size == 0 or not np.isfinite(values.flat[peak]) or mask.flat[peak]:
            return True, mask
        top = float(values.flat[peak])
        level = min(self.pixel_threshold, self.map_low + PEAK_LEVEL * (top - self.map_low))
        return True, mask | peak_region(amap, level)

    def conformal_threshold(self, max_false_alarm: float) -> tuple[float, float]:
        """Image threshold and supported false-alarm rate of the conformal rule at ``max_false_alarm`` (no change)."""
        cal = replace(self)
        _set_image_threshold(cal, ThresholdOptions(max_false_alarm=max_false_alarm), None)
        return cal.threshold, cal.achieved_false_alarm

    @property
    def options(self) -> ThresholdOptions:
        return ThresholdOptions(
            self.image_method,
            self.max_false_alarm,
            self.std_k,
            self.image_value,
            self.pixel_method,
            self.pixel_false_alarm,
            self.pixel_value,
            self.pixel_std_k,
        )

    def summary(self) -> list[str]:
        """Human-readable lines: both thresholds, how they were chosen, what they mean."""
        n = len(self.validation_scores)
        how = {
            "conformal": f"conformal, max false-alarm rate {self.max_false_alarm:g}",
            "mean-std": f"mean + {self.std_k:g} std of {n} validation scores",
            "fixed": "fixed value",
            "f1": "F1-optimal on the labelled set",
        }[self.image_method]
        lines = [
            f"image threshold {self.threshold:.6g} ({how}); false-alarm rate supported by {n} good "
            f"{'validation images' if self.source == 'holdout' else 'calibration scores'}: "
            f"{self.achieved_false_alarm:.3g} (finest possible {1 / (n + 1):.3g})"
        ]
        if self.note:
            lines.append(f"note: {self.note}")
        if self.source_note:
            lines.append(f"calibration set: {self.source_note}")
        lines.extend(self.suspect_lines())
        phow = {
            "quantile": f"per-pixel false-alarm target {self.pixel_false_alarm:g} "
            f"on {self.pixel_count} good validation pixels",
            "mean-std": f"mean + {self.pixel_std_k:g} std of {self.pixel_count} good validation pixels",
            "fixed": "fixed value",
            "f1": "F1-optimal segmentation on the labelled set",
            "segf1": "searched with the mask post-processing for the best SegF1 on the labelled set",
        }[self.pixel_method]
        rate = (
            ""
            if math.isnan(self.pixel_achieved_false_alarm)
            else f"; {self.pixel_achieved_false_alarm:.3g} of good validation pixels are above it"
        )
        lines.append(
            f"pixel threshold {self.pixel_threshold:.6g} ({phow}){rate}; it only draws the defect mask of an image "
            "the image threshold calls defective (a good image has none)"
        )
        if self.pixel_note:
            lines.append(f"note: {self.pixel_note}")
        lines.append(f"mask post-processing: {self.postprocess.describe()}")
        return lines

    def suspect_lines(self) -> list[str]:
        """The suspect training images in words (empty when there are none)."""
        if not self.suspects:
            return []
        lines = [
            f"suspect training images ({len(self.suspects)}; their left-out scores stand far above the other "
            "training images', see docs/decisions.md): check them, or refit with --exclude-suspects"
        ]
        for s in self.suspects:
            lines.append(f"  {s['rank']}. {s['image']}  score {s['score']:.5g}  (robust z {s['z']:.1f})")
        return lines

    # -- changing it ----------------------------------------------------------------------
    def rethreshold(
        self,
        options: ThresholdOptions | None = None,
        labelled: LabelledStatistics | None = None,
        postprocess: MaskPostprocess | None = None,
    ) -> Calibration:
        """A copy with thresholds recomputed from the stored statistics (no data needed).

        The ``f1`` methods use ``labelled`` when given, else the labelled statistics stored earlier.
        """
        options = options or self.options
        cal = replace(
            self,
            labelled=asdict(labelled) if labelled is not None else self.labelled,
            postprocess=postprocess if postprocess is not None else self.postprocess,
        )
        lab = LabelledStatistics(**cal.labelled) if cal.labelled else None
        _set_image_threshold(cal, options, lab)
        _set_pixel_threshold(cal, options, lab)
        return cal

    # -- persistence ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["postprocess"] = self.postprocess.to_dict()
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Calibration:
        if not isinstance(data, dict):
            raise ConfigError(f"calibration must be a JSON object of fields, got {data!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown calibration field(s): {', '.join(unknown)}")
        values = dict(data)
        if not isinstance(values.get("postprocess"), (dict, type(None))):
            raise ConfigError(f"calibration field postprocess must be a JSON object, got {values['postprocess']!r}")
        values["postprocess"] = MaskPostprocess.from_dict(values.get("postprocess"))
        cal = cls(**values)
        cal.check_types()
        return cal

    def check_types(self) -> None:
        """ConfigError naming the field when a (hand-edited) value has the wrong type or is NaN where it cannot be."""
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            value, hint = getattr(self, f.name), hints[f.name]
            nan_ok = isinstance(f.default, float) and math.isnan(f.default)
            if hint is float or hint == (float | None):
                if value is None and hint is not float:
                    continue
                if isinstance(value, bool) or not isinstance(value, (int, float)) or (value != value and not nan_ok):
                    raise ConfigError(f"calibration field {f.name} must be a number, got {value!r}")
            elif hint is int and (isinstance(value, bool) or not isinstance(value, int)):
                raise ConfigError(f"calibration field {f.name} must be a whole number, got {value!r}")
            elif hint is str and not isinstance(value, str):
                raise ConfigError(f"calibration field {f.name} must be text, got {value!r}")
        if not isinstance(self.validation_scores, list) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and v == v for v in self.validation_scores
        ):
            raise ConfigError("calibration field validation_scores must be a list of numbers")
        for name, allowed in (("image_method", IMAGE_METHODS), ("pixel_method", PIXEL_METHODS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(
                    f"calibration field {name}={getattr(self, name)!r} is not one of {', '.join(allowed)}"
                )
        self._check_source()
        self._check_values()

    def _check_source(self) -> None:
        """ConfigError naming the field for a bad calibration-source field (source, hashes, suspects)."""
        if self.source not in SOURCES:
            raise ConfigError(f"calibration field source={self.source!r} is not one of {', '.join(SOURCES)}")
        for name in ("training_hashes", "excluded"):
            value = getattr(self, name)
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"calibration field {name} must be a list of text, got {value!r}")
        keys = {"rank", "image", "score", "z"}
        if not isinstance(self.suspects, list) or not all(
            isinstance(s, dict) and set(s) == keys and isinstance(s["image"], str) and _is_number(s["score"])
            for s in self.suspects
        ):
            raise ConfigError(f"calibration field suspects must be a list of {sorted(keys)} objects")

    def _check_values(self) -> None:
        """ConfigError naming the field for values no calibration produces (ranges, tables, infinite thresholds)."""
        for name in ("max_false_alarm", "pixel_false_alarm"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ConfigError(f"calibration field {name} must lie in (0, 1), got {getattr(self, name)!r}")
        for name in ("std_k", "pixel_std_k", "image_value", "pixel_value"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ConfigError(f"calibration field {name} must be a finite number, got {value!r}")
        if self.pixel_count < 0:
            raise ConfigError(f"calibration field pixel_count must be >= 0, got {self.pixel_count}")
        # Only an uncalibrated model (no validation data) has an infinite threshold; an edited one flags all or nothing.
        if self.validation_scores and not math.isfinite(self.threshold):
            raise ConfigError(
                f"calibration field threshold must be finite with validation scores, got {self.threshold}"
            )
        if self.pixel_tail and not math.isfinite(self.pixel_threshold):
            raise ConfigError(f"calibration field pixel_threshold must be finite, got {self.pixel_threshold}")
        if not isinstance(self.pixel_tail, list) or not all(
            isinstance(row, list) and len(row) == 2 and all(_is_number(v) for v in row) for row in self.pixel_tail
        ):
            raise ConfigError("calibration field pixel_tail must be a list of [rank, value] number pairs")
        if self.labelled is not None:
            try:
                LabelledStatistics(**self.labelled)
            except TypeError:
                raise ConfigError(
                    f"calibration field labelled is not a labelled-set summary: {self.labelled!r}"
                ) from None


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def calibrate(
    validation_scores: np.ndarray,
    max_false_alarm: float = 0.01,
    map_values: np.ndarray | None = None,
    *,
    options: ThresholdOptions | None = None,
    labelled: LabelledStatistics | None = None,
    postprocess: MaskPostprocess | None = None,
) -> Calibration:
    """Thresholds from the good validation images' scores and pooled map values.

    ``map_values`` (a sample of the validation images' anomaly-map values) sets the heat-map
    scale and the ``quantile`` pixel threshold. ``options`` overrides ``max_false_alarm`` when given.
    """
    options = options or ThresholdOptions(max_false_alarm=max_false_alarm)
    v = np.sort(np.asarray(validation_scores, dtype=np.float64))
    cal = Calibration(validation_scores=[float(x) for x in v], postprocess=postprocess or MaskPostprocess())
    if v.size:
        cal.score_mean = float(v.mean())
        cal.score_std = float(v.std(ddof=1)) if v.size > 1 else 0.0
    if map_values is not None and len(map_values):
        pixels = np.asarray(map_values, dtype=np.float32).ravel()
        cal.map_low = float(np.median(pixels))
        cal.map_high = max(float(np.max(pixels)), cal.map_low + 1e-12)
        cal.pixel_count = int(pixels.size)
        cal.pixel_tail = tail_table(pixels)
        cal.pixel_mean = float(np.mean(pixels, dtype=np.float64))
        cal.pixel_std = float(np.std(pixels, dtype=np.float64))
    return cal.rethreshold(options, labelled)


# -- image threshold ------------------------------------------------------------------------


def _set_image_threshold(cal: Calibration, o: ThresholdOptions, lab: LabelledStatistics | None) -> None:
    v = np.asarray(cal.validation_scores, dtype=np.float64)
    n = v.size
    cal.image_method, cal.max_false_alarm, cal.std_k, cal.image_value = (
        o.image_method,
        o.max_false_alarm,
        o.std_k,
        o.image_value,
    )
    cal.note = ""
    if o.image_method == "conformal":
        cal.threshold, cal.achieved_false_alarm, cal.note = _conformal(v, o.max_false_alarm)
        return
    if o.image_method == "mean-std":
        if n == 0:
            raise ConfigError("the mean-std image threshold needs good validation images (none were held out)")
        cal.threshold = float(cal.score_mean + o.std_k * cal.score_std)
    elif o.image_method == "fixed":
        cal.threshold = float(o.image_value)  # type: ignore[arg-type]
    else:  # f1
        if lab is None or lab.defective == 0 or math.isnan(lab.image_f1_threshold):
            raise ConfigError(
                "the f1 image threshold needs a labelled validation set with defective images (--labelled PATH)"
            )
        cal.threshold = float(lab.image_f1_threshold)
        cal.note = (
            f"F1 {lab.image_f1:.3f} on the labelled set {lab.source} ({lab.images} images, {lab.defective} defective)"
        )
    cal.achieved_false_alarm = float((1 + np.count_nonzero(v >= cal.threshold)) / (n + 1))
    if n and cal.achieved_false_alarm > cal.max_false_alarm:
        extra = (
            f"{np.count_nonzero(v >= cal.threshold)} of {n} good validation images score at or above it "
            f"(supported false-alarm rate {cal.achieved_false_alarm:.3g} > {cal.max_false_alarm:g})"
        )
        cal.note = f"{cal.note}; {extra}" if cal.note else extra


def _conformal(v: np.ndarray, max_false_alarm: float) -> tuple[float, float, str]:
    """Threshold, supported rate and note of the conformal rule on validation scores ``v``."""
    n = v.size
    if n == 0:
        return math.inf, 1.0, "no validation images: every image is called good"
    d = np.sort(v)[::-1]
    finest = 1.0 / (n + 1)
    note = ""
    # Flag s when #{v >= s} <= k, i.e. s > d[k] (d sorted descending), with k = floor(alpha (n+1)) - 1.
    k = int(math.floor(max_false_alarm * (n + 1) + 1e-9)) - 1
    if k < 0:
        k = 0
        note = (
            f"{n} calibration images support a false-alarm rate of at best 1/{n + 1} = {finest:.3g}; "
            f"{max_false_alarm:g} was asked for, {finest:.3g} is used (add good images for a finer rate)"
        )
    threshold = float(np.nextafter(d[k], np.inf)) if k < n else float(d[-1])
    return threshold, (k + 1) / (n + 1), note


# -- pixel threshold ------------------------------------------------------------------------


def tail_table(pixels: np.ndarray) -> list[list[float]]:
    """``[rank, value]`` of the sorted (descending) pooled pixel values at every rank < 256, then log-spaced."""
    d = np.sort(np.asarray(pixels, dtype=np.float32).ravel())[::-1]
    n = d.size
    if n == 0:
        return []
    ranks = np.arange(min(n, _TAIL_DENSE))
    if n > _TAIL_DENSE:
        logr = np.unique(np.round(np.geomspace(_TAIL_DENSE, n - 1, _TAIL_LOG)).astype(np.int64))
        ranks = np.concatenate([ranks, logr[logr >= _TAIL_DENSE]])
    return [[int(r), float(d[r])] for r in ranks]


def pixel_quantile_threshold(tail: list[list[float]], count: int, target: float) -> tuple[float, float, str]:
    """Threshold with at most ``floor(target * count)`` sampled good pixels at or above it.

    Returns ``(threshold, share of sampled pixels at or above it, note)``. Exact at the stored
    ranks; between them the value is interpolated linearly in log(rank + 1).
    """
    if not tail or count == 0:
        return math.inf, math.nan, "no validation pixels: masks stay empty"
    k = int(math.floor(target * count + 1e-9))
    note = ""
    if k == 0:
        note = (
            f"{count} sampled good validation pixels support a per-pixel false-alarm rate of at best 1/{count} = "
            f"{1 / count:.3g}; {target:g} was asked for, the threshold lies just above the highest one"
        )
    ranks = np.array([r for r, _ in tail], dtype=np.float64)
    values = np.array([v for _, v in tail], dtype=np.float64)
    value = values[-1] if k >= ranks[-1] else float(np.interp(np.log1p(k), np.log1p(ranks), values))
    exact = k in set(ranks.astype(np.int64).tolist())
    # Pixels strictly above the k-th highest value are flagged: k of them (fewer with ties).
    threshold = float(np.nextafter(np.float32(value), np.float32(np.inf))) if exact else value
    return threshold, k / count, note


def _set_pixel_threshold(cal: Calibration, o: ThresholdOptions, lab: LabelledStatistics | None) -> None:
    cal.pixel_method, cal.pixel_false_alarm, cal.pixel_value = o.pixel_method, o.pixel_false_alarm, o.pixel_value
    cal.pixel_std_k = o.pixel_std_k
    cal.pixel_note = ""
    if o.pixel_method == "quantile":
        cal.pixel_threshold, cal.pixel_achieved_false_alarm, cal.pixel_note = pixel_quantile_threshold(
            cal.pixel_tail, cal.pixel_count, o.pixel_false_alarm
        )
        return
    if o.pixel_method == "fixed":
        cal.pixel_threshold = float(o.pixel_value)  # type: ignore[arg-type]
    elif o.pixel_method == "mean-std":
        if cal.pixel_count == 0 or math.isnan(cal.pixel_mean) or math.isnan(cal.pixel_std):
            raise ConfigError(
                "the mean-std pixel threshold needs the good validation pixels' mean and std, which this model has "
                "not stored: recompute them with `anomnet calibrate --data DATASET` (or refit)"
            )
        cal.pixel_threshold = float(cal.pixel_mean + o.pixel_std_k * cal.pixel_std)
    elif o.pixel_method == "segf1":
        if lab is None or lab.masks == 0 or math.isnan(lab.search_threshold):
            raise ConfigError(
                "the segf1 pixel threshold needs a labelled validation set with masks of its defective images "
                "(--labelled PATH); it searches the threshold together with the mask post-processing"
            )
        cal.pixel_threshold = float(lab.search_threshold)
        cal.postprocess = lab.search_postprocess
        cal.pixel_note = (
            f"SegF1 {lab.search_f1:.3f} on the labelled set {lab.source} ({lab.masks} masks, best of "
            f"{lab.search_candidates} threshold / post-processing combinations)"
        )
    else:  # f1
        if lab is None or lab.masks == 0 or math.isnan(lab.pixel_f1_threshold):
            raise ConfigError(
                "the f1 pixel threshold needs a labelled validation set with masks of its defective images "
                "(--labelled PATH)"
            )
        cal.pixel_threshold = float(lab.pixel_f1_threshold)
        cal.pixel_note = f"segmentation F1 {lab.pixel_f1:.3f} on the labelled set {lab.source} ({lab.masks} masks)"
    cal.pixel_achieved_false_alarm = _share_at_or_above(cal.pixel_tail, cal.pixel_count, cal.pixel_threshold)


def _share_at_or_above(tail: list[list[float]], count: int, threshold: float) -> float:
    """Estimated share of sampled good validation pixels at or above ``threshold`` (from the tail table)."""
    if not tail or count == 0:
        return math.nan
    ranks = np.array([r for r, _ in tail], dtype=np.float64)
    values = np.array([v for _, v in tail], dtype=np.float64)
    above = values >= threshold
    if not above.any():
        return 0.0
    last = int(np.flatnonzero(above)[-1])
    if last == len(values) - 1:
        return math.nan if ranks[-1] < count - 1 else 1.0  # beyond the stored tail
    return float(ranks[last] + 1) / count
