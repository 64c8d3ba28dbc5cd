"""The demo: ELPV cut by cell type, one model per type, the test cells pooled by conformal p-value."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

import anomnet.data
from anomnet.cli import EXIT_OK, demo_parts, main, pooled_metrics
from anomnet.data import elpv_cell_types, load_elpv
from anomnet.decisions.calibration import Calibration


def _fake_elpv(root: Path, good: int = 10, bad: int = 2) -> Path:
    """A tiny ELPV layout: labels.csv (path, defect probability, type) and 64 px cells of both types."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    lines = []
    for kind, base in (("mono", 60), ("poly", 160)):
        for i in range(good + bad):
            img = np.clip(rng.normal(base, 8, (64, 64)), 0, 255)
            if i >= good:
                img[20:40, 20:40] = 255 - base  # a defect
            name = f"images/{kind}_{i:02d}.png"
            Image.fromarray(img.astype(np.uint8)).save(root / name)
            lines.append(f"{name} {1.0 if i >= good else 0.0} {kind}")
    lines.append("images/unsure.png 0.3333333333333333 mono")  # an uncertain cell: left out
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(root / "images" / "unsure.png")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root


def test_cell_types_name_every_cell_of_the_split(tmp_path: Path) -> None:
    root = _fake_elpv(tmp_path / "elpv")
    split, types = load_elpv(root), elpv_cell_types(root)
    assert all(types[s.path] == s.path.name.split("_")[0] for s in [*split.train, *split.validation, *split.test])


def test_the_split_is_cut_by_cell_type_and_falls_back_to_one_part(tmp_path: Path) -> None:
    root = _fake_elpv(tmp_path / "elpv")
    split = load_elpv(root)
    parts = demo_parts(split, elpv_cell_types(root))
    assert list(parts) == ["mono", "poly"]
    for kind, part in parts.items():
        assert part.name == f"elpv:{kind}"
        for mine, whole in ((part.train, split.train), (part.validation, split.validation), (part.test, split.test)):
            assert mine == [s for s in whole if s.path.name.startswith(kind)]
    assert demo_parts(split, {}) == {"": split}  # cells of unknown type: one model


def test_pooling_by_p_value_puts_two_models_on_one_scale() -> None:
    """Raw scores on different scales rank badly together; each model's own p-values rank well."""
    mono = Calibration(validation_scores=[1.0, 2.0, 3.0], threshold=3.0)
    poly = Calibration(validation_scores=[100.0, 200.0, 300.0], threshold=300.0)
    labels = np.array([0, 1])
    fitted = {
        "mono": (mono, SimpleNamespace(scores=np.array([2.5, 5.0]), labels=labels)),  # good 2.5, defective 5
        "poly": (poly, SimpleNamespace(scores=np.array([250.0, 400.0]), labels=labels)),
    }
    m = pooled_metrics(fitted)
    assert m["image_auroc"] == 1.0  # raw pooling would rank the good poly cell (250) above the defective mono (5)
    assert m["recall"] == 1.0 and m["false_alarm_rate"] == 0.0 and m["precision"] == 1.0
    # cells above every calibration score tie on p-value; the score over the threshold breaks the tie
    fitted["mono"] = (mono, SimpleNamespace(scores=np.array([2.5, 4.0, 9.0]), labels=np.array([0, 0, 1])))
    fitted["poly"] = (poly, SimpleNamespace(scores=np.array([250.0, 500.0]), labels=labels))
    assert pooled_metrics(fitted)["image_auroc"] == 1.0


def _run_demo(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str
) -> tuple[Path, str]:
    """The demo on a tiny fake ELPV with ``args``: its output folder and what it printed."""
    root = _fake_elpv(tmp_path / "elpv")
    monkeypatch.setattr(anomnet.data, "_elpv_data_dir", lambda: root)
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quiet", *args]) == EXIT_OK
    return out, capsys.readouterr().out


def test_the_demo_fits_a_model_per_cell_type_and_pools_the_metrics(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out, text = _run_demo(tmp_path, monkeypatch, capsys)  # one model per cell type is the default
    assert "one model per cell type (mono, poly)" in text and "pooled by conformal p-value" in text
    for kind in ("mono", "poly"):
        assert (out / kind / "model").is_dir() and (out / kind / "report.html").is_file()
        assert json.loads((out / kind / "metrics.json").read_text())["dataset"] == f"elpv:{kind}"
        assert any((out / kind / "heatmaps").iterdir())
        assert f"anomnet calibrate --model-dir {out / kind / 'model'}" in text or "the model's own rate" in text
    pooled = json.loads((out / "metrics.json").read_text())
    assert pooled["pooled_by"] == "conformal p-value" and pooled["test_images"] == 10  # 3 + 3 good, 2 + 2 defective
    assert pooled["metrics"]["image_auroc"] > 0.9
    assert "At the calibrated threshold the detector caught" in text
    report = (out / "report.html").read_text()  # the pooled page links each type's own report
    assert 'href="mono/report.html"' in report and 'href="poly/report.html"' in report
    assert "one model per cell type" in report and f"{100 * pooled['metrics']['image_auroc']:.2f}" in report
    assert not (out / "model").exists()


def test_the_demo_fits_one_model_for_both_cell_types_when_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out, text = _run_demo(tmp_path, monkeypatch, capsys, "--one-model", "--max-train", "12")
    assert "one model per cell type" not in text and "fitted patchcore on 12 good cells" in text
    assert (out / "model").is_dir() and (out / "report.html").is_file()
    assert not (out / "mono").exists() and not (out / "poly").exists()
    assert json.loads((out / "metrics.json").read_text())["dataset"] == "elpv"
    with pytest.raises(SystemExit):  # the two routes exclude each other
        main(["demo", "--out", str(out), "--one-model", "--per-type"])
