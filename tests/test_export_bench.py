"""benchmarks/export_bench.py (BENCHMARKS.md section export): the plan, the table, and a memory worker without torch."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "export_bench.py"


def _module():  # noqa: ANN202 - the script, imported by path
    spec = importlib.util.spec_from_file_location("export_bench", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dry_run_prints_each_detector_and_runtime() -> None:
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--models", "patchcore,efficientad"],
        capture_output=True,
        text=True,
        check=True,
    )
    lines = out.stdout.splitlines()
    assert len(lines) == 2 and "'steps': '100'" in lines[1]
    assert all("eager, torchscript, onnx, openvino" in line for line in lines)


def test_section_starts_with_its_command_and_has_every_row() -> None:
    bench = _module()
    row = {"ms_b1": 2.0, "ratio_b1": 0.5, "ms_b16": 1.0, "ratio_b16": 0.25, "peak_rss_mb": 120.4, "load_avg": [0.1]}
    rows = [
        {**row, "model": "patchcore", "runtime": r, "torch_loaded": r in ("eager", "torchscript")}
        for r in bench.RUNTIMES
    ]
    report = {"command": "python benchmarks/export_bench.py --x", "date": "d", "cpu": "c", "cpu_cores": 2}
    text = bench.render({**report, "threads": None, "data": "bottle", "rows": rows})
    lines = text.splitlines()
    assert lines[0] == "## export" and lines[2] == "Command: `python benchmarks/export_bench.py --x`"
    assert "| patchcore | onnx | 2.0 | 0.50 | 1.0 | 0.25 | 120 | no |" in lines
    assert "| patchcore | eager | 2.0 | 0.50 | 1.0 | 0.25 | 120 | yes |" in lines
    json.dumps(report)


def test_peak_memory_is_the_workers_own_not_its_parents() -> None:
    """ru_maxrss of a forked child counts the parent's memory; the workers report their own (VmHWM)."""
    bench = _module()
    ballast = b"\x01" * (400 << 20)  # written, so resident: the parent holds 400 MB more than any child needs
    parent = bench._peak_rss_mb()
    code = f"import sys; sys.path.insert(0, {str(SCRIPT.parent)!r}); import export_bench as b; print(b._peak_rss_mb())"
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert parent > 400 and 0 < float(child.stdout) < 200
    del ballast


def test_cpu_clock_times_one_thread_and_says_so() -> None:
    bench = _module()
    row = {"ms_b1": 2.0, "ratio_b1": 0.5, "ms_b16": 1.0, "ratio_b16": 0.25, "peak_rss_mb": 120.4, "load_avg": [9.0]}
    report = {"command": "c", "date": "d", "cpu": "c", "cpu_cores": 2, "threads": 1, "data": "bottle"}
    rows = [{**row, "model": "patchcore", "runtime": "onnx", "torch_loaded": False}]
    assert "CPU time on one thread, `--clock cpu`" in bench.render({**report, "clock": "cpu", "rows": rows})
    assert "CPU time" not in bench.render({**report, "clock": "wall", "rows": rows})
    refused = subprocess.run(
        [sys.executable, str(SCRIPT), "--models", "patchcore", "--clock", "cpu", "--threads", "2"],
        capture_output=True,
        text=True,
    )
    assert refused.returncode != 0 and "--clock cpu times one thread" in refused.stderr
