"""The review feedback loop: marks saved through the service form a labelled folder that recalibrates the model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (make setup-all)")
pytest.importorskip("httpx", reason="the serve extra is not installed (make setup-all)")
pytest.importorskip("multipart", reason="the serve extra is not installed (make setup-all)")

from fastapi.testclient import TestClient  # noqa: E402

from anomnet.cli import EXIT_OK, main  # noqa: E402
from anomnet.decisions.calibrate import load_labelled  # noqa: E402
from anomnet.detectors.base import Detector  # noqa: E402
from anomnet.evaluation.metrics import f1_max  # noqa: E402
from anomnet.serve.app import create_app  # noqa: E402
from anomnet.serve.review import image_id  # noqa: E402

SMALL = ["--image-size", "64", "--set", "batch_size=4", "--quiet"]


def test_marks_form_a_labelled_folder_that_recalibrates_without_refitting(folder_dataset: Path, tmp_path: Path) -> None:
    model = tmp_path / "model"
    assert main(["fit", "--data", str(folder_dataset), "--out", str(model), *SMALL]) == EXIT_OK
    weights_before = (model / "weights.safetensors").read_bytes()
    review = tmp_path / "review"
    c = TestClient(create_app({"synth": model}, review_dir=review), raise_server_exceptions=False)

    images = sorted((folder_dataset / "test").rglob("*.png"))
    scores, labels = [], []
    for path in images:
        result = c.post("/v1/models/synth/predict", files={"file": (path.name, path.read_bytes(), "image/png")})
        row = result.json()["results"][0]
        truly_bad = path.parent.name == "blob"
        # what an operator would click: the model's mistakes as such, its right calls confirmed
        mark = {
            (True, True): "confirmed_defect",
            (True, False): "missed_defect",
            (False, True): "false_alarm",
            (False, False): "confirmed_good",
        }[(truly_bad, row["defective"])]
        r = c.post(
            "/v1/models/synth/review", files={"file": (path.name, path.read_bytes(), "image/png")}, data={"mark": mark}
        )
        assert r.status_code == 200, r.text
        entry = r.json()
        assert entry["label"] == ("defective" if truly_bad else "good") and entry["id"] == image_id(path.read_bytes())
        assert (review / "synth" / entry["file"]).read_bytes() == path.read_bytes()  # kept exactly as sent
        scores.append(row["score"])
        labels.append(int(truly_bad))

    listing = c.get("/v1/models/synth/review").json()
    assert listing["counts"] == {"good": 4, "defective": 4}
    assert "--labelled" in listing["calibrate"] and str(review / "synth") in listing["calibrate"]
    samples = load_labelled(review / "synth")  # the layout calibrate reads
    assert sorted(s.label for s in samples) == [0] * 4 + [1] * 4

    assert (
        main(["calibrate", "--model-dir", str(model), "--labelled", str(review / "synth"), "--image-threshold", "f1"])
        == EXIT_OK
    )
    det = Detector.load(model)
    _, expected = f1_max(np.asarray(scores), np.asarray(labels))
    assert det.calibration.image_method == "f1"
    assert det.calibration.threshold == pytest.approx(expected, rel=1e-5)
    assert det.calibration.labelled is not None and det.calibration.labelled["images"] == 8
    assert (model / "weights.safetensors").read_bytes() == weights_before  # recalibrated, not refitted

    # the service's next answer uses the new threshold
    c2 = TestClient(create_app({"synth": model}), raise_server_exceptions=False)
    info = c2.get("/v1/models").json()["models"][0]
    assert info["image_method"] == "f1" and info["threshold"] == pytest.approx(expected, rel=1e-5)


def test_review_marks_by_path_undo_and_refusals(folder_dataset: Path, tmp_path: Path) -> None:
    from test_serve import FakeScorer, png  # noqa: PLC0415 - the shared fake

    review = tmp_path / "review"
    c = TestClient(
        create_app({"fake": FakeScorer()}, image_root=folder_dataset, review_dir=review), raise_server_exceptions=False
    )
    r = c.post("/v1/models/fake/review", json={"path": "test/good/g000.png", "mark": "false_alarm"})
    assert r.status_code == 200, r.text
    key = r.json()["id"]
    assert (review / "fake" / r.json()["file"]).read_bytes() == (folder_dataset / "test/good/g000.png").read_bytes()
    index = json.loads((review / "fake" / "review.json").read_text())
    assert index["marks"][key]["mark"] == "false_alarm" and index["model"] == "fake"
    assert c.delete(f"/v1/models/fake/review/{key}").json() == {"removed": key}
    assert c.delete(f"/v1/models/fake/review/{key}").status_code == 404
    assert not list((review / "fake" / "good").iterdir())

    r = c.post("/v1/models/fake/review", json={"path": "../../etc/passwd", "mark": "false_alarm"})
    assert r.status_code == 403 and "outside the image root" in r.json()["detail"]
    r = c.post("/v1/models/fake/review", files={"file": ("a.png", png(), "image/png")}, data={"mark": "bad"})
    assert r.status_code == 400 and "mark 'bad' unknown" in r.json()["detail"]
    r = c.post(
        "/v1/models/fake/review",
        files={"file": ("a.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "image/png")},
        data={"mark": "false_alarm"},
    )
    assert r.status_code == 400 and "a.png" in r.json()["detail"]
    assert not (review / "fake" / "good").exists() or not list((review / "fake" / "good").iterdir())
    files = [("file", ("a.png", png(), "image/png")), ("file", ("b.png", png(3), "image/png"))]
    r = c.post("/v1/models/fake/review", files=files, data={"mark": "false_alarm"})
    assert r.status_code == 400 and "one image" in r.json()["detail"]
    assert c.delete("/v1/models/fake/review/..%2F..%2Fx").status_code in (400, 404)

    no_review = TestClient(create_app({"fake": FakeScorer()}), raise_server_exceptions=False)
    r = no_review.post(
        "/v1/models/fake/review", files={"file": ("a.png", png(), "image/png")}, data={"mark": "false_alarm"}
    )
    assert r.status_code == 403 and "review folder" in r.json()["detail"]
