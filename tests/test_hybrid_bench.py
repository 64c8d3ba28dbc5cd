"""The hybrid section's measurements: threshold choices in bench rows, the branch report, the section's table."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from anomnet.decisions.calibrate import parse_choices
from anomnet.errors import ConfigError

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _machine() -> dict:
    """The run fields of a section report that the tables below do not look at."""
    return {
        "cpu": "cpu",
        "cpu_cores": 2,
        "torch": "2",
        "started": "now",
        "seconds": 60.0,
        "load_min": 1.0,
        "load_max": 2.0,
    }


def test_threshold_choices_are_parsed_from_text() -> None:
    assert parse_choices({"pixel_method": "mean-std", "pixel_std_k": "4", "closing": "8", "fill_holes": "on"}) == {
        "pixel_method": "mean-std",
        "pixel_std_k": 4.0,
        "closing": 8,
        "fill_holes": True,
    }
    with pytest.raises(ConfigError, match="unknown threshold"):
        parse_choices({"colour": "red"})
    with pytest.raises(ConfigError, match="closing='x' is not a valid int"):
        parse_choices({"closing": "x"})


def test_bench_rows_take_threshold_choices_and_report_the_branches(
    folder_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from anomnet.cli import main

    monkeypatch.setattr(sys, "argv", ["anomnet", "bench"])
    variant = (
        "hy:model=hybrid;branches=a:patchcore,b:patchcore;image_size=64;batch_size=4;b.blur_sigma=24;"
        "synthetic=cutpaste;synthetic_per_image=2;pixel_method=mean-std;pixel_std_k=2"
    )
    args = ["bench", "--data", str(folder_dataset), "--models", "", "--variant", variant]
    out = tmp_path / "bench.json"
    assert (
        main([*args, "--rescore", "pixel_method=quantile", "--out", str(out), "--work-dir", str(tmp_path / "w")]) == 0
    )
    cal = json.loads((tmp_path / "w" / "hy" / "anomnet.json").read_text())["calibration"]
    assert cal["pixel_method"] == "mean-std" and cal["pixel_std_k"] == 2.0
    row, rescored = json.loads(out.read_text())["rows"]
    assert row["settings"]["pixel_method"] == "mean-std" and rescored["settings"]["pixel_method"] == "quantile"
    report = row["branches"]
    assert set(report["tested"]) == {"a", "b"} and report["choice"]["chosen"] in ("a", "b")
    assert all(0.0 <= t["metrics"]["au_pro@0.05"] <= 1.0 for t in report["tested"].values())
    assert row["trunk_ms_b1"] > 0  # timed against its branch's backbone trunk


def test_the_section_table_judges_the_choice_in_hindsight() -> None:
    sys.path.insert(0, str(BENCHMARKS))
    import hybrid as section

    def row(dataset: str, name: str, chosen: str | None, **metrics: float) -> dict:
        r = {
            "dataset": dataset,
            "group": "piped",
            "row": name,
            "metrics": metrics,
            "rescored": [{"settings": {"pixel_method": "mean-std"}, "metrics": {"seg_f1": 0.3}}],
            "fit_s": 1.0,
            "ratio_b1": 2.0,
            "peak_rss_mb": 500.0,
        }
        if chosen:
            candidates = {"x": {"au_pro@0.05": 0.6}, "y": {"au_pro@0.05": 0.5}}
            tested = {
                "x": {"metrics": {"au_pro@0.05": 0.7, "seg_f1": 0.2}},
                "y": {"metrics": {"au_pro@0.05": 0.8, "seg_f1": 0.1}},
            }
            r["branches"] = {"choice": {"chosen": chosen, "criterion": "au_pro@0.05", "candidates": candidates}}
            r["branches"]["tested"] = tested
        return r

    report = {
        **_machine(),
        "command": "python benchmarks/hybrid.py",
        "rows": [
            row("A", "patchcore", None, image_auroc=1.0, seg_f1=0.25, pixel_f1_max=0.4),
            row("A", "hybrid", "x", image_auroc=1.0, seg_f1=0.2, pixel_f1_max=0.5),
        ],
    }
    text = section.render(report)
    assert "| A | hybrid | x | (au_pro@0.05) x 60.00, y 50.00 | y / x | no/yes |" in text
    assert "| A | patchcore | 100.00 | n/a | n/a | n/a | 25.00 | 30.00 | 40.00 | 1 | 2.0 | 500 |" in text
    assert "INCOMPLETE" in text


def test_a_resumed_run_keeps_the_earlier_rows_outside_its_plan_and_lists_every_command() -> None:
    sys.path.insert(0, str(BENCHMARKS))
    import hybrid as section

    def row(dataset: str, name: str, fit_s: float = 1.0) -> dict:
        return {"dataset": dataset, "row": name, "fit_s": fit_s}

    earlier = [row("PA_BDP01_TL", "hybrid"), row("bottle", "patchcore"), row("PA_BDP01_TL", "patchcore")]
    now = [row("bottle-tiled", "patchcore", 2.0), row("bottle", "patchcore", 2.0)]  # bottle measured again
    merged = section.merge_rows(now, earlier, {("bottle-tiled", "patchcore"), ("bottle", "patchcore")})
    assert [(r["dataset"], r["row"]) for r in merged] == [
        ("bottle", "patchcore"),
        ("bottle-tiled", "patchcore"),
        ("PA_BDP01_TL", "patchcore"),
        ("PA_BDP01_TL", "hybrid"),
    ]
    assert merged.count(now[1]) == 1 and earlier[1] not in merged  # no row twice
    report = {
        **_machine(),
        "command": "python benchmarks/hybrid.py --resume x",
        "commands": ["python benchmarks/hybrid.py --datasets piped", "python benchmarks/hybrid.py --resume x"],
        "complete": True,
        "rows": [],
    }
    text = section.render(report)
    assert "Command: `python benchmarks/hybrid.py --datasets piped`" in text
    assert "Command: `python benchmarks/hybrid.py --resume x`" in text
