"""The line-PC install: the wheel (``make wheel``) in a fresh virtual environment, no torch, scores exported models.

It builds the wheel with ``make wheel`` (the build prints no deprecation), creates a venv and installs the bare
wheel there (the base dependencies only), checks that ``anomnet predict`` on an ONNX export then stops with an
install hint, runs that hint as printed (the wheel with the ``runtime`` extra: onnxruntime and openvino from the
package index), checks that torch cannot be imported there, and runs that venv's ``anomnet predict`` on an ONNX
and an OpenVINO export: the rows equal the fitted model's. Slow (a venv and two pip installs), so it runs only
when ``ANOMNET_RUNTIME_INSTALL_TEST`` is set; ``make test-all`` (and so ``.ci/run``) sets it to ``required``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from tests.conftest import make_folder_dataset

from anomnet import api

REPO = Path(__file__).resolve().parents[1]
WANTED = os.environ.get("ANOMNET_RUNTIME_INSTALL_TEST", "")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not WANTED, reason="set ANOMNET_RUNTIME_INSTALL_TEST=1 to build the torch-free venv (CI does)"),
]


def _rows(anomnet: Path | list[str], model: Path, images: Path, cwd: Path) -> list[list[str]]:
    command = [str(anomnet)] if isinstance(anomnet, Path) else anomnet
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    out = subprocess.run(
        [*command, "--threads", "1", "predict", "--model-dir", str(model), str(images), "--quiet"],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    return [line.split("\t") for line in out.stdout.splitlines() if "\t" in line]


def test_a_venv_without_torch_scores_exported_models(tmp_path: Path) -> None:
    try:
        from anomnet.export import export_model
    except ImportError as exc:  # pragma: no cover - the export extra is part of CI's install
        pytest.skip(f"the export extra is not installed ({exc})")
    data = make_folder_dataset(tmp_path / "data")
    api.fit("patchcore", data, out=tmp_path / "model", settings={"image_size": 64}, progress=False)
    exports = [export_model(tmp_path / "model", fmt, tmp_path / fmt) for fmt in ("onnx", "openvino")]

    dist = tmp_path / "dist"
    build = subprocess.run(
        ["make", "-C", str(REPO), "wheel", f"DIST={dist}", "WHEEL_FLAGS=-v"], capture_output=True, text=True
    )
    assert build.returncode == 0, build.stdout + build.stderr
    noise = [line for line in (build.stdout + build.stderr).splitlines() if "deprecat" in line.lower()]
    assert noise == []  # e.g. setuptools' "project.license as a TOML table is deprecated"
    (wheel,) = dist.glob("anomnet-*.whl")

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    bare = subprocess.run([str(python), "-m", "pip", "install", "--quiet", str(wheel)], capture_output=True, text=True)
    assert bare.returncode == 0, bare.stdout + bare.stderr
    refused = subprocess.run(
        [str(venv / "bin" / "anomnet"), "predict", "--model-dir", str(exports[0]), str(data / "test")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    hint = re.search(r"needs the onnxruntime package \((.+ -m pip install .+)\), which", refused.stderr)
    assert refused.returncode == 2 and hint, refused.stderr
    assert hint.group(1) == f"{python} -m pip install '{wheel}[runtime]'"
    install = subprocess.run(["bash", "-c", hint.group(1) + " --quiet"], capture_output=True, text=True, cwd=tmp_path)
    assert install.returncode == 0, install.stdout + install.stderr
    probe = subprocess.run(
        [
            str(python),
            "-c",
            "import importlib.util as u; print([m for m in ('torch', 'safetensors', 'faiss') if u.find_spec(m)])",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert probe.stdout.strip() == "[]", probe.stdout + probe.stderr  # no training stack in the runtime install

    fitted = _rows([sys.executable, "-m", "anomnet.cli"], tmp_path / "model", data / "test", REPO)
    assert len(fitted) == 9  # header + 8 test images
    for folder in exports:
        lean = _rows(venv / "bin" / "anomnet", folder, data / "test", tmp_path)
        assert [r[0] for r in lean] == [r[0] for r in fitted]
        for a, b in zip(fitted[1:], lean[1:]):
            assert abs(float(a[1]) - float(b[1])) <= 1e-4 * abs(float(a[1])), (folder.name, a, b)
            assert a[3] == b[3], (folder.name, a, b)  # decision
