"""The service scores exported model folders (issue 14 part 1) through the same step as fitted ones."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (make setup-all)")
pytest.importorskip("httpx", reason="the serve extra is not installed (make setup-all)")
pytest.importorskip("multipart", reason="the serve extra is not installed (make setup-all)")
if importlib.util.find_spec("anomnet.export") is None:
    pytest.skip("model export (anomnet.export) is not in this anomnet", allow_module_level=True)
pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (make setup-all)")

from fastapi.testclient import TestClient  # noqa: E402

from anomnet.cli import main  # noqa: E402
from anomnet.serve.app import create_app  # noqa: E402


def test_exported_and_fitted_models_side_by_side(folder_dataset: Path, tmp_path: Path) -> None:
    from anomnet.export import export_model

    model = tmp_path / "model"
    assert main(["fit", "--data", str(folder_dataset), "--out", str(model), "--image-size", "64", "--quiet"]) == 0
    exported = export_model(model, "onnx", tmp_path / "exported")
    c = TestClient(create_app({"fitted": model, "exported": exported}), raise_server_exceptions=False)
    info = {m["name"]: m for m in c.get("/v1/models").json()["models"]}
    assert info["exported"]["kind"] == "exported" and info["fitted"]["kind"] == "fitted"
    assert info["exported"]["detector"] == info["fitted"]["detector"] == "patchcore"
    assert info["exported"]["threshold"] == pytest.approx(info["fitted"]["threshold"], rel=1e-6)
    for path in sorted((folder_dataset / "test").rglob("*.png")):
        files = {"file": (path.name, path.read_bytes(), "image/png")}
        fitted = c.post("/v1/models/fitted/predict", files=files).json()["results"][0]
        got = c.post("/v1/models/exported/predict?mask=true", files=files).json()["results"][0]
        assert got["score"] == pytest.approx(fitted["score"], rel=1e-4)
        assert got["decision"] == fitted["decision"] and got["p_value"] == fitted["p_value"]
        assert got["defect_pixels"] == pytest.approx(
            fitted["defect_pixels"], abs=max(2, 0.01 * fitted["defect_pixels"])
        )
        assert "mask_png" in got
