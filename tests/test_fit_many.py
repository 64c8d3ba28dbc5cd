"""`anomnet fit-many`: one model per category, failures isolated per category, the summary table; local and Ray."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tests.conftest import make_folder_dataset

from anomnet import fit_many as fm
from anomnet.errors import DatasetError

SMALL = {"image_size": 64, "batch_size": 4}


def _root(tmp_path: Path) -> Path:
    """Three categories: one with a test split, one without, one with a corrupt training image."""
    root = tmp_path / "root"
    make_folder_dataset(root / "alpha", n_train=8, n_good=2, n_bad=2, seed=1)
    make_folder_dataset(root / "beta", n_train=8, n_good=0, n_bad=0, seed=2)
    for sub in ("test/good", "test/blob", "masks"):
        for f in (root / "beta" / sub).iterdir():
            f.unlink()
        (root / "beta" / sub).rmdir()
    (root / "beta" / "test").rmdir()
    (root / "broken" / "train").mkdir(parents=True)
    for i in range(4):  # enough images to calibrate on, one of them truncated
        (root / "broken" / "train" / f"{i}.png").write_bytes((root / "alpha" / "train" / f"t00{i}.png").read_bytes())
    (root / "broken" / "train" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (root / "notes").mkdir()  # no train/: not a category
    return root


def test_find_categories(tmp_path: Path) -> None:
    root = _root(tmp_path)
    assert [name for name, _ in fm.find_categories(root)] == ["alpha", "beta", "broken"]
    assert [name for name, _ in fm.find_categories(root, ["beta"])] == ["beta"]
    with pytest.raises(DatasetError, match="no category gamma"):
        fm.find_categories(root, ["gamma"])
    with pytest.raises(DatasetError, match="is one dataset"):
        fm.find_categories(root / "alpha")
    with pytest.raises(DatasetError, match="no category folder"):
        fm.find_categories(root / "notes")


def _check(results: list[fm.CategoryResult], out: Path) -> None:
    by = {r.category: r for r in results}
    assert [r.category for r in results] == ["alpha", "beta", "broken"]
    assert by["alpha"].status == "ok" and by["alpha"].metrics["image_auroc"] is not None
    assert by["alpha"].test_images == 4 and (out / "alpha" / "metrics.json").is_file()
    assert by["beta"].status == "ok" and by["beta"].metrics == {} and by["beta"].fit_seconds is not None
    assert by["broken"].status == "failed" and by["broken"].error and "bad.png" in by["broken"].error
    assert (out / "alpha" / "anomnet.json").is_file() and (out / "beta" / "anomnet.json").is_file()
    assert not (out / "broken" / "anomnet.json").exists()
    saved = json.loads((out / fm.SUMMARY_FILE).read_text())
    assert [c["status"] for c in saved["categories"]] == ["ok", "ok", "failed"]


def test_local_engine_isolates_a_failing_category(tmp_path: Path) -> None:
    root, out = _root(tmp_path), tmp_path / "models"
    results = fm.fit_many(root, out, "patchcore", settings=SMALL, engine="local", progress=False)
    _check(results, out)
    table = fm.summary_table(results)
    assert table.splitlines()[0].split() == ["category", "detector", *fm.TABLE_METRICS, "fit", "s", "status"]
    assert "broken" in table and "failed:" in table
    # a second run keeps what is there with --skip-existing and refuses to overwrite without it
    again = fm.fit_many(root, out, "patchcore", settings=SMALL, engine="local", progress=False, skip_existing=True)
    assert [r.status for r in again] == ["skipped", "skipped", "failed"]
    refused = fm.fit_many(root, out, "patchcore", settings=SMALL, engine="local", progress=False, categories=["beta"])
    assert refused[0].status == "failed" and "already holds a model" in (refused[0].error or "")


def test_categories_calibrate_as_fit_does(tmp_path: Path) -> None:
    """Each category's split and calibration are `anomnet fit`'s: PatchCore on all 8 training images, leave-one-out."""
    from anomnet.detectors.base import Detector

    root, out = _root(tmp_path), tmp_path / "models"
    fm.fit_many(root, out, "patchcore", settings=SMALL, engine="local", progress=False, categories=["alpha"])
    cal = Detector.load(out / "alpha").calibration
    assert cal.source == "loo" and len(cal.validation_scores) == 8 and len(cal.training_hashes) == 8
    fm.fit_many(
        root,
        out,
        "patchcore",
        settings=SMALL,
        engine="local",
        progress=False,
        categories=["beta"],
        calibration="holdout",
    )
    held = Detector.load(out / "beta").calibration
    assert held.source == "holdout" and len(held.validation_scores) == 1  # 10 % of 8, at least one


def test_cli_fit_many_exit_code_and_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from anomnet.cli import main

    root, out = _root(tmp_path), tmp_path / "models"
    argv = ["fit-many", "--data", str(root), "--out", str(out), "--engine", "local", "--image-size", "64"]
    assert main([*argv, "--set", "batch_size=4", "--categories", "beta,broken", "--no-test"]) == 3
    captured = capsys.readouterr()
    assert "beta" in captured.out and "1 of 2 categories failed: broken" in captured.err
    assert "[2/2] broken: failed" in captured.err
    assert main([*argv, "--categories", "nope"]) == 2


def test_ray_engine_fits_categories_as_tasks(local_ray: None, tmp_path: Path) -> None:
    root, out = _root(tmp_path), tmp_path / "models"
    results = fm.fit_many(root, out, "patchcore", settings=SMALL, engine="ray", progress=False)
    _check(results, out)
    assert json.loads((out / fm.SUMMARY_FILE).read_text())["engine"] == "ray"
