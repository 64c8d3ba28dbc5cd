"""Operating points in words: what other false-alarm rates would do, before a user re-picks the threshold.

An *operating point* is an image threshold and what it means: the false-alarm rate asked for, the
threshold the model's conformal rule gives for it
(:meth:`~anomnet.decisions.calibration.Calibration.conformal_threshold`),
the rate its good calibration images support, and -- where labelled images exist (the demo's and
``anomnet test``'s test set) -- the false alarms and the recall it gives there. ``anomnet fit``,
``anomnet calibrate --dry-run``, the demo and the test report print the same table.
"""

from __future__ import annotations

import math
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from anomnet.decisions.calibration import Calibration

RATES = (0.01, 0.02, 0.05, 0.1)
"""False-alarm rates the table shows by default."""


@dataclass(frozen=True)
class OperatingPoint:
    """One threshold and its rates; the counts are on a labelled set (0 without one)."""

    asked: float | None
    """False-alarm rate asked for; None for the model's own threshold when another method chose it."""
    threshold: float
    supported: float
    """False-alarm rate the good calibration images support: ``(1 + #{v >= threshold}) / (n + 1)``."""
    current: bool = False
    """This is the model's threshold now."""
    good: int = 0
    false_alarms: int = 0
    defective: int = 0
    caught: int = 0

    @property
    def false_alarm_rate(self) -> float:
        return self.false_alarms / self.good if self.good else math.nan

    @property
    def recall(self) -> float:
        return self.caught / self.defective if self.defective else math.nan


def operating_points(
    cal: Calibration,
    scores: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    rates: Sequence[float] = RATES,
) -> list[OperatingPoint]:
    """The conformal threshold at each rate (and the model's own threshold when it is none of them).

    With ``scores`` and ``labels`` (1 = defective) each point also counts false alarms and caught defects.
    """
    s = np.asarray(scores if scores is not None else [], dtype=np.float64)
    y = np.asarray(labels if labels is not None else [], dtype=np.int64)
    if s.shape != y.shape:
        raise ValueError(f"{s.size} scores but {y.size} labels")

    def point(asked: float | None, threshold: float, supported: float) -> OperatingPoint:
        flagged = s >= threshold
        current = threshold == cal.threshold and (
            asked is None or cal.image_method != "conformal" or asked == cal.max_false_alarm
        )
        return OperatingPoint(
            asked,
            threshold,
            supported,
            current,
            int(np.sum(y == 0)),
            int(np.sum(flagged & (y == 0))),
            int(np.sum(y == 1)),
            int(np.sum(flagged & (y == 1))),
        )

    points = [point(rate, *cal.conformal_threshold(rate)) for rate in rates] if cal.validation_scores else []
    if not any(p.current for p in points):
        asked = cal.max_false_alarm if cal.image_method == "conformal" else None
        points.append(point(asked, cal.threshold, cal.achieved_false_alarm))
        points.sort(key=lambda p: -p.threshold)
    return points


def _pct(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{100 * value:.3g} %"


def _count(part: int, whole: int) -> str:
    return f"{part} of {whole} ({_pct(part / whole)})" if whole else "n/a"


def describe(cal: Calibration, labelled: str = "") -> str:
    """The sentence above the table."""
    n = len(cal.validation_scores)
    intro = (
        "operating points: the threshold the conformal rule gives for each asked false-alarm rate, and the rate "
        f"the good calibration images support (finest 1/{n + 1} = {_pct(1 / (n + 1))})"
        if n
        else "operating points: no good calibration images, so no false-alarm rate is supported"
    )
    return intro + (f"; false alarms and recall on the {labelled} images" if labelled else "")


def cells(points: Sequence[OperatingPoint], cal: Calibration, labelled: str = "") -> list[list[str]]:
    """Header and rows of the table as text; the false-alarm and recall columns when ``labelled`` names the set."""
    n = len(cal.validation_scores)
    header = ["asked false-alarm rate", "image threshold", f"supported by {n} good calibration images"]
    if labelled:
        header += [f"{labelled} false alarms", f"{labelled} defects caught (recall)"]
    rows = [header]
    for p in points:
        asked = f"{100 * p.asked:g} %" if p.asked is not None else f"- ({cal.image_method})"
        row = [asked + (" (model)" if p.current else ""), f"{p.threshold:.6g}", _pct(p.supported)]
        if labelled:
            row += [_count(p.false_alarms, p.good), _count(p.caught, p.defective)]
        rows.append(row)
    return rows


def format_table(points: Sequence[OperatingPoint], cal: Calibration, labelled: str = "") -> list[str]:
    """The table as text lines; ``labelled`` names the labelled set (e.g. ``"test"``) when the points have counts."""
    rows = cells(points, cal, labelled)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [describe(cal, labelled) + ":"] + ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def suggest(points: Sequence[OperatingPoint]) -> OperatingPoint | None:
    """A sensible point on the labelled set: the most defects caught among the rates that held there.

    A rate *held* when its false-alarm rate on the labelled good images is at most the rate asked for.
    When none held, the best balance: most defects caught minus good images flagged (Youden's J).
    """
    usable = [p for p in points if p.asked is not None and p.good and p.defective]
    held = [p for p in usable if p.asked is not None and p.false_alarm_rate <= p.asked]
    if held:
        return max(held, key=lambda p: (p.recall, -p.false_alarm_rate))
    if not usable:
        return None
    return max(usable, key=lambda p: (p.recall - p.false_alarm_rate, -p.false_alarm_rate))


def calibrate_command(model_dir: str | Path, point: OperatingPoint, cal: Calibration) -> str:
    """The ``anomnet calibrate`` command that sets ``point``'s threshold on the model in ``model_dir``."""
    if point.asked is None:
        raise ValueError("only a point with an asked false-alarm rate has a calibrate command")
    method = "" if cal.image_method == "conformal" else " --image-threshold conformal"
    return f"anomnet calibrate --model-dir {shlex.quote(str(model_dir))}{method} --max-false-alarm {point.asked:g}"


def changes(before: Calibration, after: Calibration) -> list[str]:
    """What a recalibration changes, one line per changed threshold or setting (empty: nothing)."""
    out = []
    if before.threshold != after.threshold or before.image_method != after.image_method:
        out.append(
            f"image threshold {before.threshold:.6g} ({before.image_method}, supported false-alarm rate "
            f"{_pct(before.achieved_false_alarm)}) -> {after.threshold:.6g} ({after.image_method}, "
            f"{_pct(after.achieved_false_alarm)})"
        )
    if before.pixel_threshold != after.pixel_threshold or before.pixel_method != after.pixel_method:
        out.append(
            f"pixel threshold {before.pixel_threshold:.6g} ({before.pixel_method}) -> "
            f"{after.pixel_threshold:.6g} ({after.pixel_method})"
        )
    if before.postprocess != after.postprocess:
        out.append(f"mask post-processing {before.postprocess.describe()} -> {after.postprocess.describe()}")
    if before.validation_scores != after.validation_scores:
        out.append(
            f"calibration images {len(before.validation_scores)} -> {len(after.validation_scores)} (scores recomputed)"
        )
    return out
