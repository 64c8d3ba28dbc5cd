"""The line-PC install: a fresh virtual environment with ``anomnet[runtime]`` and no torch scores exported models.

It creates a venv, installs this source tree with the runtime extra from the package index (no
torch, no training stack: the base dependencies plus onnxruntime and openvino), checks that torch
cannot be imported there, and runs that venv's ``anomnet predict`` on an ONNX and an OpenVINO
export: the rows equal the fitted model's. Slow (a venv and a pip install), so it runs only when
``ANOMNET_RUNTIME_INSTALL_TEST`` is set; ``.ci/run`` sets it to ``required``.
"""

from __future__ import annotations

import os
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

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", f"{REPO}[runtime]"], capture_output=True, text=True
    )
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
