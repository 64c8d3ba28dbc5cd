"""The README, followed as a new user would, in a fresh clone: README drift fails CI.

The clone is the committed tree (``git archive HEAD``: what CI's fresh clone holds; uncommitted edits are
not in it). The test runs the README's own code blocks, read from that README.md at run time:

1. ``## Two commands``: ``make demo`` (creates ``.venv`` with ``make setup``; the ``make test`` line is
   the run this test is part of, so it is not repeated), then ``make lint`` on that install; neither may
   print a deprecation or an unused-config note.
2. A command that needs a missing extra (``anomnet serve``) prints an install hint; the hint, run as
   printed, installs the extra into the copy's ``.venv``.
3. ``## Your own data`` (with ``source .venv/bin/activate``, as the README says), on a small generic-layout
   folder the test writes at the README's own paths (``path/to/mydata``, ``new_parts/``, ``part_17.png``).
4. ``## Python API`` in another folder with the same data.
5. ``### Export and the line PC``: the export extra, ``anomnet export``, predict with the export and
   ``make wheel``; then the line-PC block in a separate folder that holds only what the README says to copy
   there (the wheel, the export folder, the images), with no ``.venv`` on the path.

Slow (a venv with torch, the demo, two more installs: minutes), so it runs only when
``ANOMNET_README_TEST`` is set; ``make test-all`` (and so ``.ci/run``) sets it to ``required``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tests.conftest import make_folder_dataset

REPO = Path(__file__).resolve().parents[1]
WANTED = os.environ.get("ANOMNET_README_TEST", "")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not WANTED, reason="set ANOMNET_README_TEST=1 to follow the README in a fresh clone (CI does)"),
]

NOISE = re.compile(r"deprecat|unused section", re.IGNORECASE)
"""What a clean install and lint must not print (setuptools' licence-table warning, mypy's unused overrides)."""


def readme_blocks(readme: str, heading: str) -> list[str]:
    """The fenced code blocks right under ``heading``: up to the next heading of any level."""
    lines = readme.splitlines()
    start = lines.index(heading) + 1
    end = next((i for i in range(start, len(lines)) if re.match(r"#{1,6} ", lines[i])), len(lines))
    return re.findall(r"^```\w*\n(.*?)^```", "\n".join(lines[start:end]) + "\n", re.MULTILINE | re.DOTALL)


def _env(with_venv: Path | None = None) -> dict[str, str]:
    """A user's shell: none of this test run's interpreter, make or anomnet settings."""
    drop = ("VIRTUAL_ENV", "PYTHONPATH", "MAKEFLAGS", "MAKELEVEL", "MFLAGS", "PYTHONHOME")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("ANOMNET_")}
    own = str(REPO / ".venv" / "bin")
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p and p != own)
    return env


def _run(script: str, cwd: Path, timings: dict[str, float], step: str) -> str:
    """Run a README block with bash (stop at the first failing command); its output, or a failure naming it."""
    start = time.monotonic()
    done = subprocess.run(
        ["bash", "-c", "set -euo pipefail -x\n" + script],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    timings[step] = time.monotonic() - start
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"README step {step!r} failed (exit {done.returncode}):\n{output[-6000:]}"
    return output


def _clone_of_head(to: Path) -> Path:
    """The committed tree, as a fresh clone has it (in CI the checkout is that clone: the same files)."""
    to.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", "HEAD"], capture_output=True)
    assert archive.returncode == 0, archive.stderr.decode(errors="replace")
    subprocess.run(["tar", "-x", "-C", str(to)], input=archive.stdout, check=True)
    return to


def _user_images(where: Path) -> None:
    """The README's example paths: a generic-layout folder, a folder of new parts and one loose image."""
    make_folder_dataset(where / "path" / "to" / "mydata", n_train=12, n_good=3, n_bad=3, size=64)
    new_parts = where / "new_parts"
    new_parts.mkdir()
    images = sorted((where / "path" / "to" / "mydata" / "test").rglob("*.png"))
    for image in images[:3]:
        shutil.copy(image, new_parts / image.name)
    Image.fromarray(np.asarray(Image.open(images[-1]))).save(where / "part_17.png")


def test_the_readme_runs_as_written(tmp_path: Path) -> None:
    if shutil.which("git") is None or shutil.which("make") is None:  # pragma: no cover - CI has both
        pytest.fail("following the README needs git and make")
    clone = _clone_of_head(tmp_path / "anomnet")
    readme = (clone / "README.md").read_text(encoding="utf-8")
    timings: dict[str, float] = {}

    # 1. The two commands (the test suite itself is this run), then lint on the install they made.
    (two,) = readme_blocks(readme, "## Two commands")
    demo = "\n".join(line for line in two.splitlines() if not line.startswith("make test"))
    assert "make demo" in demo
    out = _run(demo, clone, timings, "make demo")
    assert (clone / "runs" / "demo" / "report.html").is_file()
    out += _run("make lint", clone, timings, "make lint")
    assert not NOISE.findall(out), [line for line in out.splitlines() if NOISE.search(line)]

    # 2. A missing extra's hint, run as printed.
    refused = subprocess.run(
        [str(clone / ".venv" / "bin" / "anomnet"), "serve", "--model", "m=runs/demo"],
        cwd=clone,
        env=_env(),
        capture_output=True,
        text=True,
    )
    hint = re.search(r"needs the serve extra: (.+ -m pip install -e \S+)", refused.stderr)
    assert refused.returncode == 2 and hint, refused.stderr
    assert hint.group(1) == f"{clone}/.venv/bin/python -m pip install -e '{clone}[serve]'"
    _run(hint.group(1) + " --quiet", tmp_path, timings, "the serve hint")
    _run(".venv/bin/python -c 'import fastapi, uvicorn, multipart'", clone, timings, "serve extra present")

    # 3. Your own data, with the README's paths.
    _user_images(clone)
    (own,) = readme_blocks(readme, "## Your own data")
    _run("source .venv/bin/activate\n" + own, clone, timings, "your own data")
    assert (clone / "runs" / "predictions" / "results.csv").is_file()

    # 4. The Python API, in a folder of its own (it fits its own model).
    api_dir = tmp_path / "api"
    api_dir.mkdir()
    _user_images(api_dir)
    (python_block,) = readme_blocks(readme, "## Python API")
    (api_dir / "example.py").write_text(python_block)
    _run(f"{clone}/.venv/bin/python example.py", api_dir, timings, "python api")

    # 5. Export, the wheel, and the line PC with only what the README says to copy there.
    blocks = readme_blocks(readme, "### Export and the line PC")
    assert len(blocks) == 2, "expected the export block and the line-PC block"
    _run("source .venv/bin/activate\n" + blocks[0], clone, timings, "export and wheel")
    line_pc = tmp_path / "line-pc"
    line_pc.mkdir()
    for item in [*clone.glob("dist/anomnet-*.whl"), clone / "runs" / "mymodel-onnx", clone / "new_parts"]:
        (shutil.copytree if item.is_dir() else shutil.copy)(item, line_pc / item.name)
    _run(blocks[1], line_pc, timings, "line PC")
    rows = (line_pc / "results" / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + 3, rows
    probe = "import importlib.util as u; print([m for m in ('torch', 'faiss') if u.find_spec(m)])"
    assert "[]" in _run(f"anomnet-env/bin/python -c {probe!r}", line_pc, timings, "no torch").splitlines()

    print("README steps (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()), file=sys.stderr)
