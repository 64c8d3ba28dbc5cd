"""The cost-curve driver (benchmarks/scaling_curves.py) end to end at a tiny scale: points in their own
processes, rows in the JSON, resumable, the section and the plots; failed points become error rows."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import scaling_curves as curves  # noqa: E402


def test_driver_measures_every_point_resumes_and_renders(folder_dataset: Path, tmp_path: Path, capsys) -> None:
    out, img, md, runs = tmp_path / "curves.json", tmp_path / "img", tmp_path / "BENCH.md", tmp_path / "runs"
    md.write_text("# Benchmarks\n\n<!-- bench:other -->\nkept\n<!-- /bench:other -->\n")
    args = ["--models", "patchcore", "--counts", "4,8", "--sizes", "128", "--tile", "64", "--set", "image_size=64"]
    args += ["--source", str(folder_dataset / "train"), "--data", str(folder_dataset), "--runs", str(runs)]
    args += ["--out", str(out), "--img-dir", str(img), "--markdown", str(md), "--repeats", "1", "--threads", "1"]
    assert curves.main(args) == 0
    assert capsys.readouterr().out.startswith("python benchmarks/scaling_curves.py --models patchcore")

    report = json.loads(out.read_text())
    rows = report["rows"]
    assert [r.get("error") for r in rows] == [None] * 6, rows
    fits = [r for r in rows if r["curve"] == "fit"]
    assert [r["images"] for r in fits] == [4, 8]
    assert all(r["fit_s"] > 0 and r["peak_rss_fit_mb"] >= r["rss_before_fit_mb"] > 0 for r in fits)
    assert all(r["settings"] == {"image_size": "64"} for r in fits)
    preds = {(r["mode"], r["size"]): r for r in rows if r["curve"] == "predict"}
    assert set(preds) == {("untiled", 128), ("tiled", 128)}
    assert preds["tiled", 128]["settings"] == {"image_size": "64", "tile": "64", "coreset_ratio": "0.01"}
    assert preds["untiled", 128]["tiles"] == 1 and preds["tiled", 128]["tiles"] == 9  # 64 px tiles, 25 % overlap: 3 x 3
    assert all(r["predict_ms"] > 0 and r["peak_rss_mb"] >= r["rss_loaded_mb"] for r in preds.values())
    # the augmented copies: written once with their recipe, nested (the 4-image set is the 8's first four)
    pool = runs / "augmented"
    assert len(list(pool.glob("aug-*.png"))) == 8 and json.loads((pool / ".recipe.json").read_text())["seed"] == 0
    assert sorted(p.name for p in (runs / "train-4" / "train").iterdir()) == [f"aug-{i:05d}.png" for i in range(4)]
    # each copy is a seeded function of its index: the file again from the recipe, and not its source image
    source = np.asarray(Image.open(folder_dataset / "train" / "t000.png"))
    copy = np.asarray(Image.open(pool / "aug-00000.png"))
    assert np.array_equal(copy, np.asarray(curves.augmented(folder_dataset / "train", 0, 0)))
    assert copy.shape != source.shape or not np.array_equal(copy, source)

    text = md.read_text()
    assert "<!-- bench:other -->\nkept" in text
    assert "<!-- bench:scaling-curves -->\n## scaling-curves\n\nCommand: `python" in text
    assert "augmented copies" in text and "| patchcore | loo |" in text and "| patchcore | tiled |" in text
    assert "(9) |" in text and "\n![scaling-fit-time](img/scaling-fit-time.png)\n" in text
    names = ["fit-time", "fit-memory", "predict-latency", "predict-memory"]
    assert all((img / f"scaling-{n}.png").stat().st_size > 1000 for n in names)

    # a second run measures nothing again: every row is kept as it was
    assert curves.main(args) == 0
    assert json.loads(out.read_text())["rows"] == rows
    assert curves.main([*args, "--dry-run"]) == 0
    assert "to do" not in capsys.readouterr().out

    # the plots and the section again from the JSON alone
    for n in names:
        (img / f"scaling-{n}.png").unlink()
    md.write_text("# Benchmarks\n")
    assert curves.main(["--plot-only", str(out), "--img-dir", str(img), "--markdown", str(md)]) == 0
    assert all((img / f"scaling-{n}.png").is_file() for n in names) and "| patchcore | untiled |" in md.read_text()


@pytest.mark.parametrize(
    ("kind", "timeout", "expected"),
    [("fit", 0.01, "time limit: killed after 0.01 s"), ("no-such-worker", 60.0, "exit 1: KeyError: 'no-such-worker'")],
)
def test_a_point_that_fails_or_runs_too_long_is_an_error_row(kind: str, timeout: float, expected: str) -> None:
    row = curves.run_point(kind, {"model": "patchcore"}, timeout)
    assert row["error"] == expected and row["wall_s"] >= 0


def test_plan_and_render_of_error_rows() -> None:
    a = curves.parser().parse_args(["--models", "cpr,hybrid", "--counts", "50", "--sizes", "256", "--modes", "tiled"])
    points = curves.plan(a)
    assert [curves._label(p) for p in points] == [
        "fit cpr 50 images",
        "fit hybrid 50 images",
        "predict-model cpr tiled (tile=512)",
        "predict cpr tiled 256 px (tile=512)",
        "predict-model hybrid tiled (tile=512)",
        "predict hybrid tiled 256 px (tile=512)",
    ]
    rows = [{**points[0], "error": "killed by signal 9 (the out-of-memory killer?): no message"}]
    report = {"command": "c", "date": "d", "cpu": "x", "cpu_cores": 2, "torch": "t"}
    report.update(point_timeout_s=60.0, source_images=209, data="bottle", rows=rows)
    report["recipe"] = curves.recipe(curves.ROOT.parent / "shared" / "x", 0)
    report.update(predict_image="000.png", predict_image_hw=[900, 900], repeats=5, json="x.json", predict_budget_s=60)
    text = curves.render(report, [])
    assert "| cpr | - | error: killed by signal 9 (the out-of-memory killer?) |" in text
    assert "Errors: fit cpr 50 images: killed by signal 9" in text
    assert "**augmented copies** of the 209 images of `../shared/x`" in text  # shown relative to the repository


def test_a_recorded_model_whose_folder_is_gone_is_fitted_again_only_when_a_point_needs_it(tmp_path: Path) -> None:
    a = curves.parser().parse_args(["--models", "patchcore", "--counts", "4", "--sizes", "64,128", "--modes", "tiled"])
    points = curves.plan(a)
    fit = next(p for p in points if p["curve"] == "predict-model")
    done = {curves.key(p): dict(p) for p in points if p["curve"] != "predict" or p["size"] == 64}
    assert curves._model_missing(fit, points, done, tmp_path)  # the 128 px point needs the model
    (curves.model_dir(tmp_path, fit)).mkdir(parents=True)
    (curves.model_dir(tmp_path, fit) / "anomnet.json").write_text("{}")
    assert not curves._model_missing(fit, points, done, tmp_path)  # there
    done.update({curves.key(p): dict(p) for p in points})
    assert not curves._model_missing(fit, points, done, tmp_path / "elsewhere")  # gone, but no point needs it
    done[curves.key(fit)]["error"] = "exit 1: x"
    assert not curves._model_missing(fit, points, done, tmp_path / "elsewhere")  # a failed fit stays failed
