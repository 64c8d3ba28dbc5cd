"""Image-score thresholds calibrated on good validation images only.

Each score ``s`` gets a conformal p-value ``p(s) = (1 + #{validation scores >= s}) / (n + 1)``;
an image is called defective when ``p(s) <= max_false_alarm``. With ``n`` good validation
images the finest false-alarm rate that can be guaranteed is ``1 / (n + 1)``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from anomnet.errors import ConfigError


@dataclass
class Calibration:
    """Validation statistics and the image threshold derived from them."""

    validation_scores: list[float] = field(default_factory=list)
    max_false_alarm: float = 0.01
    threshold: float = math.inf
    achieved_false_alarm: float = 1.0
    note: str = ""
    map_low: float = 0.0  # median anomaly-map value of the good validation images
    map_high: float = 1.0  # highest anomaly-map value seen on them (heat maps put it mid-scale)

    def p_values(self, scores: np.ndarray) -> np.ndarray:
        """Conformal p-value of each score against the validation scores."""
        v = np.sort(np.asarray(self.validation_scores, dtype=np.float64))
        s = np.asarray(scores, dtype=np.float64)
        at_least = len(v) - np.searchsorted(v, s, side="left")
        return (1.0 + at_least) / (len(v) + 1.0)

    def decide(self, scores: np.ndarray) -> np.ndarray:
        """True where a score is at or above the threshold (called defective)."""
        return np.asarray(scores, dtype=np.float64) >= self.threshold

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Calibration:
        return cls(**data)


def calibrate(
    validation_scores: np.ndarray, max_false_alarm: float = 0.01, map_values: np.ndarray | None = None
) -> Calibration:
    """Threshold such that at most ``max_false_alarm`` of good images are expected to be flagged.

    ``map_values`` (a sample of the validation images' anomaly-map values) sets the heat-map scale.
    """
    cal = _calibrate_scores(validation_scores, max_false_alarm)
    if map_values is not None and len(map_values):
        cal.map_low = float(np.median(map_values))
        cal.map_high = float(max(np.max(map_values), cal.map_low + 1e-12))
    return cal


def _calibrate_scores(validation_scores: np.ndarray, max_false_alarm: float) -> Calibration:
    if not 0.0 < max_false_alarm < 1.0:
        raise ConfigError(f"max_false_alarm must be in (0, 1), got {max_false_alarm}")
    v = np.sort(np.asarray(validation_scores, dtype=np.float64))[::-1]
    n = len(v)
    if n == 0:
        return Calibration([], max_false_alarm, math.inf, 1.0, "no validation images: every image is called good")
    finest = 1.0 / (n + 1)
    note = ""
    # Flag s when #{v >= s} <= k, i.e. s > v[k] (v sorted descending), with k = floor(alpha (n+1)) - 1.
    k = int(math.floor(max_false_alarm * (n + 1) + 1e-9)) - 1
    if k < 0:
        k = 0
        note = (
            f"{n} validation images support a false-alarm rate of at best 1/{n + 1} = {finest:.3g}; "
            f"{max_false_alarm:g} was asked for, {finest:.3g} is used (add good validation images for a finer rate)"
        )
    threshold = float(np.nextafter(v[k], np.inf)) if k < n else float(v[-1])
    achieved = (k + 1) / (n + 1)
    return Calibration([float(x) for x in v[::-1]], max_false_alarm, threshold, achieved, note)
