"""The load-test driver (benchmarks/serve_load.py) on a tiny model: it starts `anomnet serve` and stops by itself."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (make setup-all)")
pytest.importorskip("uvicorn", reason="the serve extra is not installed (make setup-all)")
pytest.importorskip("multipart", reason="the serve extra is not installed (make setup-all)")

from anomnet.cli import main  # noqa: E402

DRIVER = Path(__file__).resolve().parents[1] / "benchmarks" / "serve_load.py"


def _driver():  # noqa: ANN202 - the module
    spec = importlib.util.spec_from_file_location("serve_load", DRIVER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["serve_load"] = module
    spec.loader.exec_module(module)
    return module


def test_load_driver_runs_a_bounded_test_and_writes_its_section(folder_dataset: Path, tmp_path: Path) -> None:
    model = tmp_path / "model"
    assert main(["fit", "--data", str(folder_dataset), "--out", str(model), "--image-size", "64", "--quiet"]) == 0
    md = tmp_path / "BENCH.md"
    md.write_text("# Benchmarks\n\n<!-- bench:other -->\nkept\n<!-- /bench:other -->\n")
    out = tmp_path / "r.json"
    args = ["--data", str(folder_dataset), "--model-dir", str(model), "--clients", "2", "--requests", "5"]
    args += ["--warmup", "1", "--threads", "1", "--out", str(out), "--markdown", str(md)]
    assert _driver().main(args) == 0
    report = json.loads(out.read_text())
    assert report["answered"] == report["ok"] == 5 and report["errors"] == {} and report["stopped_by"] == "requests"
    assert report["server_predict_200"] == 6  # the server counted the warm-up too
    assert report["detector"] == "patchcore" and report["images"] == 8
    lat = report["latency_ms"]
    assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]
    assert report["rss_mb"]["end"] > 0 and report["command"].startswith("python benchmarks/serve_load.py --data")
    text = md.read_text()
    assert "<!-- bench:other -->\nkept" in text and "<!-- bench:serve-load -->" in text
    assert f"Command: `{report['command']}`" in text and "| 2 | 5 | 0 |" in text


def test_load_driver_stops_at_its_time_limit(folder_dataset: Path, tmp_path: Path) -> None:
    model = tmp_path / "model"
    assert main(["fit", "--data", str(folder_dataset), "--out", str(model), "--image-size", "64", "--quiet"]) == 0
    args = ["--data", str(folder_dataset), "--model-dir", str(model), "--clients", "1", "--requests", "100000"]
    args += ["--duration", "1.5", "--warmup", "0", "--threads", "1", "--out", str(tmp_path / "r.json")]
    assert _driver().main(args) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["stopped_by"] == "duration" and 0 < report["answered"] < 100000 and report["wall_s"] < 30


def test_percentile_is_nearest_rank() -> None:
    percentile = _driver().percentile
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50 and percentile(values, 95) == 95 and percentile(values, 99) == 99
    assert percentile([3.0], 99) == 3.0
