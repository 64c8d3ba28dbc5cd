"""The post-processing study (benchmarks/postprocess_study.py) runs end to end on a tiny model and agrees with
`anomnet test`."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

from anomnet import api
from anomnet.data import load_dataset
from anomnet.decisions.postprocess import MaskPostprocess

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "postprocess_study.py"
_spec = importlib.util.spec_from_file_location("postprocess_study", SCRIPT)
assert _spec is not None and _spec.loader is not None
pp = importlib.util.module_from_spec(_spec)
sys.modules["postprocess_study"] = pp  # dataclasses look their module up there
_spec.loader.exec_module(pp)
VARIANTS, collect_maps, half_split, render, seg_f1, study = (
    pp.VARIANTS,
    pp.collect_maps,
    pp.half_split,
    pp.render,
    pp.seg_f1,
    pp.study,
)


def test_study_on_a_tiny_model(folder_dataset: Path) -> None:
    split = load_dataset(folder_dataset, val_fraction=0.25)
    det = api.fit(
        "patchcore", split, None, settings={"image_size": 64, "batch_size": 4}, progress=False, pixel_false_alarm=0.01
    )
    tm = collect_maps(det, split.test)
    result = study(det, tm, grid_size=3)
    assert [r["variant"] for r in result["rows"]] == [name for name, _ in VARIANTS]
    none = result["rows"][0]
    # the study's SegF1 at the calibrated threshold is what `anomnet test` reports as seg_f1
    assert math.isclose(none["seg_f1_cal"], api.test(det, split, progress=False).metrics["seg_f1"])
    assert none["best_seg_f1"] >= none["seg_f1_opt"] - 1e-12  # the grid contains the raw optimum
    assert 0.0 < none["seg_f1_opt"] <= 1.0 and 0.0 < none["au_pro@0.3"] <= 1.0
    a, b = half_split(tm)
    assert sorted(a + b) == list(range(len(tm.maps))) and abs(len(a) - len(b)) <= 2
    assert seg_f1(tm, math.inf, MaskPostprocess()) == 0.0
    text = render(
        {
            "command": "x",
            "date": "d",
            "data": "y",
            "models": [{"model": "patchcore", "fit_s": 1.0, "test_images": len(tm.maps), **result}],
        }
    )
    assert "| closing r=8 + fill + min area 1024 |" in text and "half A" in text


def test_script_help_runs_in_a_subprocess() -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--markdown" in proc.stdout and "--out" in proc.stdout


def test_script_writes_only_where_told(folder_dataset: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "reports" / "pp.json"
    md = tmp_path / "notes.md"
    # a tiny model: the study's own fit uses default settings, so patch api.fit to a small image size
    from anomnet import api as api_mod

    real_fit = api_mod.fit
    monkeypatch.setattr(
        api_mod,
        "fit",
        lambda model, split, out_dir, **kw: real_fit(
            model, split, out_dir, settings={"image_size": 64, "batch_size": 4}, pixel_false_alarm=0.01, **kw
        ),
    )
    assert pp.main(["--data", str(folder_dataset), "--out", str(out), "--markdown", str(md)]) == 0
    report = json.loads(out.read_text())
    assert report["models"][0]["model"] == "patchcore"
    assert "<!-- bench:postprocessing -->" in md.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "notes.md", "reports"]
