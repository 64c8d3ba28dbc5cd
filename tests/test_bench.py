"""The bench core: Markdown sections never overwrite each other, and a run writes only where it is told."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from anomnet.bench import write_section


def test_sections_replace_only_their_own_block(tmp_path: Path) -> None:
    path = tmp_path / "BENCHMARKS.md"
    write_section(path, "a", "table A v1\n")
    write_section(path, "b", "table B\n")
    write_section(path, "a", "table A v2\n")
    text = path.read_text()
    assert text.startswith("# Benchmarks")
    assert "table A v2" in text and "table A v1" not in text
    assert "table B" in text
    assert text.index("table A v2") < text.index("table B")  # a replaced section keeps its place
    assert text.count("<!-- bench:a -->") == 1 and text.count("<!-- /bench:a -->") == 1


def test_without_section_the_whole_file_is_written(tmp_path: Path) -> None:
    path = tmp_path / "B.md"
    path.write_text("old\n")
    write_section(path, None, "new\n")
    assert path.read_text() == "# Benchmarks\n\nnew\n"


def _bench(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data: Path, *extra: str) -> int:
    from anomnet.cli import main

    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.setattr(sys, "argv", ["anomnet", "bench"])
    return main(
        [
            "bench",
            "--data",
            str(data),
            "--models",
            "",
            "--variant",
            "tiny:model=patchcore;image_size=64",
            "--out",
            str(tmp_path / "out" / "bench.json"),
            *extra,
        ]
    )


def test_bench_writes_only_the_json_it_is_told(
    folder_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "cwd").mkdir()
    assert _bench(tmp_path, monkeypatch, folder_dataset) == 0
    assert list((tmp_path / "cwd").iterdir()) == []  # nothing relative to the working directory
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["bench.json"]
    report = json.loads((tmp_path / "out" / "bench.json").read_text())
    (row,) = report["rows"]
    assert row["name"] == "tiny" and 0.0 <= row["metrics"]["image_auroc"] <= 1.0
    record = row["fit_record"]  # the detector's fit record travels into the bench JSON
    assert record is not None and record["phases"], record
    assert "fit_info" not in row
    assert len(row["memory_bank"]) == 2 and row["memory_bank"][0] > 0  # PatchCore's bank: rows x feature width


def test_bench_markdown_section_only_when_asked(
    folder_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "cwd").mkdir()
    md = tmp_path / "notes.md"
    md.write_text("# Benchmarks\n\nkept text\n")
    work = tmp_path / "models"
    assert (
        _bench(
            tmp_path,
            monkeypatch,
            folder_dataset,
            "--markdown",
            str(md),
            "--section",
            "tiny-run",
            "--work-dir",
            str(work),
        )
        == 0
    )
    text = md.read_text()
    assert "kept text" in text and "<!-- bench:tiny-run -->" in text and "| tiny |" in text
    assert list((tmp_path / "cwd").iterdir()) == []
    assert (work / "tiny").is_dir()


ROOT = Path(__file__).resolve().parents[1]
SECTIONS_SCRIPT = ROOT / "benchmarks" / "sections.py"


def test_sections_script_help_and_dry_run() -> None:
    import subprocess

    proc = subprocess.run([sys.executable, str(SECTIONS_SCRIPT), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run(
        [sys.executable, str(SECTIONS_SCRIPT), "tiling", "--dry-run", "--json-dir", "J"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("anomnet bench ") and "--out J/tiling.json" in proc.stdout
    assert "--section tiling" in proc.stdout and "tiled-256-pyramid" in proc.stdout


# BENCHMARKS.md sections whose driver is not benchmarks/sections.py
OWN_DRIVERS = {
    "suite": "suite.py",
    "hybrid": "hybrid.py",
    "export": "export_bench.py",
    "serve-load": "serve_load.py",
    "ray-throughput": "ray_throughput.py",
    "png-settings": "ray_throughput.py",
    "decisions": "decisions.py",
    "learned-stages": "learned_stages.py",
    "scaling-curves": "scaling_curves.py",
    "aspect": "aspect_study.py",
    "pose": "pose_study.py",
}


def test_every_benchmarks_section_names_its_driver() -> None:
    import re

    text = (ROOT / "BENCHMARKS.md").read_text()
    names = re.findall(r"<!-- bench:([\w.-]+) -->", text)
    assert names
    for name in names:
        block = text.split(f"<!-- bench:{name} -->", 1)[1].split(f"<!-- /bench:{name} -->", 1)[0]
        assert (ROOT / "benchmarks" / f"{name}.json").is_file(), name
        if name in OWN_DRIVERS:  # sections with a driver of their own name it at their top
            assert f"Command: `python benchmarks/{OWN_DRIVERS[name]}" in block, name
            assert (ROOT / "benchmarks" / OWN_DRIVERS[name]).is_file(), name
            continue
        assert f"`python benchmarks/sections.py {name}`" in block, name
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_sections", SECTIONS_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert set(names) - set(OWN_DRIVERS) <= set(module.SECTIONS) | set(module.STUDIES)


def test_section_without_markdown_is_refused(
    folder_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "cwd").mkdir()
    assert _bench(tmp_path, monkeypatch, folder_dataset, "--section", "x") == 2  # a clear input error, no run
    assert not (tmp_path / "out").exists()
