"""The pose driver (benchmarks/pose_study.py) end to end, tiny: source and posed rows, resumable, the section."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import pose_study  # noqa: E402
from test_stress import _mvtec  # noqa: E402


def test_driver_measures_source_and_posed_resumes_and_renders(tmp_path: Path, capsys) -> None:
    data = _mvtec(tmp_path / "PA_TINY", n_train=8)
    out, md = tmp_path / "pose.json", tmp_path / "BENCH.md"
    md.write_text("# Benchmarks\n\n<!-- bench:other -->\nkept\n<!-- /bench:other -->\n")
    args = ["--datasets", str(data), "--models", "patchcore", "--settings", "r8s2", "--set", "image_size=32"]
    args += ["--runs", str(tmp_path / "runs"), "--out", str(out), "--markdown", str(md)]
    assert pose_study.main(args) == 0
    assert capsys.readouterr().out.startswith("command: python benchmarks/pose_study.py --datasets")
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert [(r["variant"], r["setting"]) for r in rows] == [("source", "r1"), ("posed", "r1"), ("posed", "r8s2")]
    assert rows[2]["settings"] == {"train_rotations": "8", "train_rotation_samples": "2", "image_size": "32"}
    assert all(r["fit_s"] > 0 and 0 <= r["metrics"]["image_auroc"] <= 1 for r in rows)
    assert (tmp_path / "runs" / "stress" / "PA_TINY-posed" / "train" / "good").is_dir()

    text = md.read_text()
    assert "<!-- bench:other -->\nkept" in text
    assert "<!-- bench:pose -->\n## pose: parts in any pose" in text
    assert "Command: `python benchmarks/pose_study.py" in text
    assert "| PA_TINY | posed | patchcore | r8s2 |" in text and "| PIPED mean (1 classes; " in text

    # a second run measures nothing again; --render rewrites the section from the JSON alone
    assert pose_study.main(args) == 0
    assert json.loads(out.read_text())["rows"] == rows
    md.write_text("")
    assert pose_study.main(["--render", "--out", str(out), "--markdown", str(md)]) == 0
    assert "| PA_TINY | posed | patchcore | r1 |" in md.read_text()
    # another variant adds its rows beside the kept ones
    assert pose_study.main([*args, "--kinds", "rotated", "--settings", ""]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["variant"], r["setting"]) for r in rows[3:]] == [("rotated", "r1")]
    assert "| PA_TINY | rotated | patchcore | r1 |" in md.read_text()
    # the augmentation on the dataset itself: a row beside its r1 reference, which is not repeated
    assert pose_study.main([*args, "--kinds", "source"]) == 0
    assert [(r["variant"], r["setting"]) for r in json.loads(out.read_text())["rows"][4:]] == [("source", "r8s2")]
    text = md.read_text()
    assert "| PA_TINY | source | patchcore | r8s2 |" in text and "| PA_TINY | source | patchcore | r1 |" not in text
    assert not any("| PA_TINY | source |" in line and " (" in line.split("|")[-3] for line in text.splitlines())
