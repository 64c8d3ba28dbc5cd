"""A served model follows its folder: recalibrated or refitted, it is picked up whole, under concurrent requests."""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'anomnet[serve]'")
pytest.importorskip("httpx", reason="the serve extra is not installed: pip install 'anomnet[serve]'")
pytest.importorskip("multipart", reason="the serve extra is not installed: pip install 'anomnet[serve]'")

import httpx  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from anomnet.cli import main  # noqa: E402
from anomnet.detectors.base import Detector  # noqa: E402
from anomnet.imageio import atomic_write_text  # noqa: E402
from anomnet.serve.app import background_server, create_app  # noqa: E402
from anomnet.serve.limits import Limits  # noqa: E402

SMALL = ["--image-size", "64", "--set", "batch_size=4", "--quiet"]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from conftest import make_folder_dataset

    root = tmp_path_factory.mktemp("reload")
    data = make_folder_dataset(root / "data")
    assert main(["fit", "--data", str(data), "--out", str(root / "model"), *SMALL]) == 0
    return root / "model", data


def _version(model: Path) -> str:
    return hashlib.sha256((model / "anomnet.json").read_bytes()).hexdigest()[:16]


def _set_threshold(model: Path, threshold: float) -> str:
    """What ``anomnet calibrate`` does to the folder: the model saved again (replaced whole) with a new threshold."""
    det = Detector.load(model)
    det.calibration.threshold = threshold
    det.save(model)
    return _version(model)


def test_a_recalibrated_model_is_picked_up_whole_under_concurrent_requests(fitted: tuple[Path, Path]) -> None:
    model, data = fitted
    images = sorted((data / "test").rglob("*.png"))
    files = [("file", (p.name, p.read_bytes(), "image/png")) for p in images]
    app = create_app({"m": model}, Limits(workers=2, queue=16), reload_check_s=0.0)
    with background_server(app) as url:
        first = httpx.get(f"{url}/v1/models").json()["models"][0]
        assert first["version"] == _version(model) and first["threshold"] is not None
        scores = sorted(r["score"] for r in httpx.post(f"{url}/v1/models/m/predict", files=files).json()["results"])
        # thresholds that call none, some and all of the images defective: a mix would show in the decisions
        written = {first["version"]: first["threshold"]}
        answers: list[dict[str, Any]] = []
        failures: list[str] = []
        stop = threading.Event()

        def keep_asking() -> None:
            while not stop.is_set():
                r = httpx.post(f"{url}/v1/models/m/predict", files=files, timeout=60)
                if r.status_code != 200:
                    failures.append(r.text)
                    return
                answers.append(r.json())

        clients = [threading.Thread(target=keep_asking) for _ in range(3)]
        for t in clients:
            t.start()
        try:
            for threshold in (scores[-1] + 1.0, scores[len(scores) // 2], scores[0] - 1.0, scores[len(scores) // 3]):
                version = _set_threshold(model, threshold)
                written[version] = threshold
                deadline = time.monotonic() + 60
                while httpx.get(f"{url}/v1/models").json()["models"][0]["version"] != version:
                    assert time.monotonic() < deadline, "the recalibrated model was never picked up"
                    time.sleep(0.05)
                seen = len(answers)
                while len(answers) < seen + 3 and not failures:  # requests with the new model
                    time.sleep(0.05)
        finally:
            stop.set()
            for t in clients:
                t.join(60)
    assert not failures, failures[0]
    versions = {a["version"] for a in answers}
    assert len(versions) >= 4, versions  # the clients saw the models change under them
    for answer in answers:
        # each answer is one model's: its version, its threshold, and decisions by that threshold
        assert answer["version"] in written
        assert answer["threshold"] == pytest.approx(written[answer["version"]], rel=1e-6)
        for result in answer["results"]:
            assert result["threshold"] == answer["threshold"]
            assert result["defective"] == (result["score"] >= answer["threshold"])
    final = app.state.anomnet.models.get("m")
    assert final.version == _version(model)


def test_a_folder_that_cannot_be_loaded_keeps_the_served_model_and_says_so(
    fitted: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import shutil

    model = tmp_path / "model"
    shutil.copytree(fitted[0], model)
    app = create_app({"m": model}, reload_check_s=None)
    registry = app.state.anomnet.models
    c = TestClient(app, raise_server_exceptions=False)
    before = c.get("/v1/models").json()["models"][0]
    meta = (model / "anomnet.json").read_text()
    with caplog.at_level(logging.WARNING, logger="anomnet.serve"):
        atomic_write_text(model / "anomnet.json", "{ not json")
        assert registry.reload("m").version == before["version"]
    assert "m: " in caplog.text and "cannot be loaded" in caplog.text and before["version"] in caplog.text
    image = next((fitted[1] / "test").rglob("*.png"))
    r = c.post("/v1/models/m/predict", files={"file": (image.name, image.read_bytes(), "image/png")})
    assert r.status_code == 200 and r.json()["version"] == before["version"]  # still served, by the old model
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="anomnet.serve"):
        atomic_write_text(model / "anomnet.json", meta + "\n")
        new = registry.reload("m")
    assert new.version == _version(model) != before["version"]
    assert f"reloaded {model}: version {before['version']} -> {new.version}" in caplog.text
    assert c.get("/v1/models").json()["models"][0]["version"] == new.version
