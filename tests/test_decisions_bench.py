"""The decisions section's arithmetic: operating points, the oracle recall, binomial intervals, pooling."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import decisions as bench  # noqa: E402


def test_oracle_recall_is_the_best_recall_with_no_more_false_alarms() -> None:
    good = np.array([1.0, 2.0, 3.0, 10.0])
    bad = np.array([2.5, 4.0, 11.0, 0.5])
    assert bench.oracle_recall(good, bad, 0) == 0.25  # above 10: only 11
    assert bench.oracle_recall(good, bad, 1) == 0.5  # above 3: 4 and 11
    assert bench.oracle_recall(good, bad, 4) == 1.0


def test_clopper_pearson_interval() -> None:
    assert bench.clopper_pearson(0, 16) == pytest.approx((0.0, 0.2059), abs=1e-4)  # 1 - 0.025 ** (1 / 16)
    low, high = bench.clopper_pearson(3, 16)
    assert 0.04 < low < 3 / 16 < high < 0.46


def test_operating_point_applies_the_conformal_threshold() -> None:
    cal = np.arange(1.0, 33.0)  # 32 calibration scores: at 1 % the finest rate 1/33, just above the highest
    p = bench.operating_point(cal, 0.01, np.array([31.0, 33.0, 5.0]), np.array([40.0, 20.0]))
    assert p["supported"] == pytest.approx(1 / 33) and p["threshold"] > 32.0
    assert (p["false_alarms"], p["caught"], p["recall"]) == (1, 1, 0.5)
    assert p["oracle_recall"] == 0.5  # one false alarm allowed: above 31 only 40


def test_pooled_piped_sums_counts_and_renders(tmp_path) -> None:
    point = {"asked": 0.01, "threshold": 1.0, "supported": 1 / 33, "false_alarms": 1, "good": 16}
    point.update({"false_alarm_rate": 1 / 16, "false_alarm_ci95": [0.0, 0.3], "caught": 12, "defective": 16})
    point.update({"recall": 0.75, "oracle_recall": 1.0})
    source = {"calibration_images": 32, "calibration_scores": [], "points": [point] * 3, "seconds": 1.0}
    rows = [{"dataset": c, "model": "patchcore", "sources": {"loo": source}} for c in bench.PIPED]
    pooled = bench.pooled(rows)
    assert list(pooled) == ["loo"] and pooled["loo"][0]["false_alarms"] == 8 and pooled["loo"][0]["good"] == 128
    assert pooled["loo"][0]["recall"] == 0.75 and pooled["loo"][0]["oracle_recall"] == 1.0
    report = {"command": "python benchmarks/decisions.py", "date": "now", "cpu": "cpu", "cores": 2}
    report.update({"load_avg_before": 1.0, "rows": rows, "absent": ["kolektorsdd"], "pooled_piped": {}})
    report["pooled_piped"]["patchcore"] = pooled
    text = bench.render(report)
    assert text.startswith("## decisions\n\nCommand: `python benchmarks/decisions.py`")
    assert "| patchcore | loo | 1 % | 8/128 |" in text and "Not present on this machine: kolektorsdd." in text
