"""The learned-stages section's driver: its plan, the merge of side-by-side parts, its table."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "learned_stages.py"


def _module() -> ModuleType:
    sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("learned_stages", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(part: str, dataset: str, row: str, auroc: float, rescored: list[dict] | None = None) -> dict:
    metrics = {"image_auroc": auroc, "pixel_auroc": 0.9, "au_pro@0.3": 0.8, "au_pro@0.05": 0.5, "seg_f1": 0.4}
    return {
        "part": part,
        "dataset": dataset,
        "row": row,
        "settings": {"steps": "1"},
        "metrics": metrics,
        "rescored": rescored or [],
        "fit_s": 12.0,
        "ratio_b1": 2.0,
    }


def _report(rows: list[dict], command: str) -> dict:
    run = {"cpu": "cpu", "cpu_cores": 2, "torch": "2", "started": "2026-01-01 00:00 UTC", "seconds": 60.0}
    return {**run, "load_min": 1.0, "load_max": 9.0, "command": command, "commands": [command], "rows": rows}


def test_plan_runs_row_by_row_and_rescores_efficientad_with_the_normalised_map() -> None:
    m = _module()
    plan = m.plan(["anomnet", "efficientad"], {"all"})
    anomnet = [p for p in plan if p[0] == "anomnet"]
    assert anomnet[0][3] == "no-training" and anomnet[0][4]["stage1_epochs"] == "0"
    assert {p[1] for p in anomnet} == {"bottle-128", "PA_BTN01_RL", "PA_FVN01_TL", "PA_BRG03_TL"}
    assert all(p[4]["image_size"] == "128" for p in anomnet if p[1] == "bottle-128")
    ead = [p for p in plan if p[0] == "efficientad"]
    assert [p[3] for p in ead[:2]] == ["S-100", "S-100"] and all(p[5] == [{"st_map": "normalized"}] for p in ead)
    assert all(p[4]["image_size"] == "128" for p in ead)
    assert m.plan(["efficientad"], {"PA_BTN01_RL-128"}) == [p for p in ead if p[1] == "PA_BTN01_RL-128"]


def test_render_shows_means_rescored_rows_and_missing_datasets() -> None:
    m = _module()
    rescored = [{"settings": {"st_map": "normalized"}, "metrics": {"image_auroc": 0.5}}]
    rows = [
        _row("efficientad", "A", "S-100", 1.0, rescored),
        _row("efficientad", "B", "S-100", 0.8, rescored),
        _row("efficientad", "A", "M-100", 0.9),
    ]
    text = m.render(_report(rows, "python benchmarks/learned_stages.py"))
    assert text.startswith("## learned-stages") and "Command: `python benchmarks/learned_stages.py`" in text
    assert "| S-100 | 90.00 |" in text  # the mean over A and B
    assert "| S-100 st_map=normalized | 50.00 |" in text
    assert "| M-100 | - |" in text and "1 of 2" in text  # measured on one dataset only: no mean
    assert "| A | S-100 st_map=normalized | steps=1 | 50.00 |" in text and "(same model)" in text
    assert "INCOMPLETE" in text


def test_parts_run_side_by_side_are_merged_by_resume(tmp_path: Path) -> None:
    a, b, out, md = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "out.json", tmp_path / "B.md"
    planned = _module().plan(["efficientad"], {"PA_BTN01_RL-128"})
    rows = [_row(p[0], p[1], p[3], 0.9, []) | {"settings": p[4]} for p in planned]
    a.write_text(json.dumps(_report(rows[:2], "first")))
    b.write_text(json.dumps(_report(rows[2:], "second")))
    md.write_text("# Benchmarks\n")
    args = ["--parts", "efficientad", "--datasets", "PA_BTN01_RL-128", "--resume", str(a), "--resume", str(b)]

    def merge(*extra: str) -> dict[str, Any]:
        proc = subprocess.run(
            [sys.executable, str(SCRIPT), *args, *extra, "--out", str(out), "--markdown", str(md)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        report: dict[str, Any] = json.loads(out.read_text())
        return report

    merged = merge()
    assert len(merged["rows"]) == len(planned) and merged["complete"] is True
    assert merged["commands"][:2] == ["first", "second"] and merged["seconds"] >= 120.0
    assert "<!-- bench:learned-stages -->" in md.read_text() and "Commands, one after another" in md.read_text()
    # --merge-only measures nothing: a plan row that no report has leaves the merged report incomplete
    b.write_text(json.dumps(_report(rows[2:-1], "second")))
    merged = merge("--merge-only")
    assert len(merged["rows"]) == len(planned) - 1 and merged["complete"] is False
    assert "INCOMPLETE" in md.read_text()
    # reports that carry the same earlier commands list each command once
    a.write_text(json.dumps(_report(rows[:2], "first") | {"commands": ["first", "shared"]}))
    b.write_text(json.dumps(_report(rows[2:], "second") | {"commands": ["shared", "second"]}))
    assert merge("--merge-only")["commands"][:3] == ["first", "shared", "second"]


def test_tocoad_part_plans_the_stage_ablation_table6_and_budgets_with_valid_settings() -> None:
    from anomnet.detectors import create_detector

    m = _module()
    plan = m.plan(["tocoad"], {"all"})
    rows = list(dict.fromkeys(p[3] for p in plan))
    assert rows[:4] == [
        "patchcore (no training, reweight=image)",
        "no-training (PatchCore + eq. 9, the default)",
        "stage1-only",
        "stage1+2",
    ]
    settings = {p[3]: p[4] for p in plan if p[1] == "bottle-128"}
    assert settings["patchcore (no training, reweight=image)"] == {
        "image_size": "128",
        "stage1": "false",
        "stage2": "false",
        "reweight": "image",
    }
    assert settings["stage1+2 cross-entropy"]["disc_loss"] == "cross_entropy"
    assert {"bottle-128", "PA_BTN01_RL-128"} <= {p[1] for p in plan}
    for row, s in settings.items():  # every row's settings are ToCoAD's (a typo would fail the run, not here)
        config = create_detector("tocoad", s).config
        assert config.image_size == 128, row
        # every row says which stages it trains (the default trains neither)
        assert config.stage2 == row.startswith("stage1+2"), row
        assert (config.stage1 is True) == (row == "stage1-only"), row


def test_tocoad_render_adds_what_each_fit_did_from_its_fit_record() -> None:
    m = _module()
    stage1 = {"name": "stage1", "seconds": 25.4, "extra": {"synthetic_pixel_auroc": 0.9871}}
    stage2 = {
        "name": "stage2",
        "seconds": 47.3,
        "extra": {
            "backbone_change": {"relative": 6.1e-5, "largest_tensor": "x", "largest_relative": 5.6e-3},
            "feature_cosine": {"stage3": 0.99541, "stage4": 0.99762},
            "curve": {"sym": [-0.0008, -0.01, -0.0362], "neg": [0.045, 0.042]},
        },
    }
    trained = _row("tocoad", "A", "stage1+2 (default)", 1.0) | {"fit_record": {"phases": [stage1, stage2]}}
    frozen = _row("tocoad", "A", "no-training (PatchCore + eq. 9)", 1.0) | {"fit_record": {"phases": []}}
    text = m.render(_report([frozen, trained], "python benchmarks/learned_stages.py --parts tocoad"))
    assert "What each fit did (its fit record):" in text
    assert "| A | stage1+2 (default) | 25 / 47 | 6.1e-05 (5.6e-03) | 0.9954 / 0.9976 | -0.001 / -0.036 |" in text
    assert "| 0.045 / 0.042 | 98.71 |" in text
    assert "| A | no-training (PatchCore + eq. 9) | - / - | - | - | - | - | - |" in text
    # other parts get no such table
    assert "What each fit did" not in m.render(_report([_row("cpr", "A", "steps-50", 1.0)], "c"))
