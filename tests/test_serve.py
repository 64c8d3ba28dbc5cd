"""The inspection service over HTTP: results equal `anomnet predict`'s, and every limit refuses with a 4xx reason."""

from __future__ import annotations

import base64
import io
import struct
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the serve extra is not installed (make setup-all)")
pytest.importorskip("httpx", reason="the serve extra is not installed (make setup-all)")
pytest.importorskip("multipart", reason="the serve extra is not installed (make setup-all)")

import httpx  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from anomnet import (
    api,  # noqa: E402
    imageio,
)
from anomnet.cli import EXIT_INPUT, main  # noqa: E402
from anomnet.decisions.calibration import Calibration  # noqa: E402
from anomnet.errors import ConfigError  # noqa: E402
from anomnet.serve.app import background_server, create_app  # noqa: E402
from anomnet.serve.limits import Limits  # noqa: E402

SMALL = ["--image-size", "64", "--set", "batch_size=4", "--quiet"]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A small PatchCore model fitted on the synthetic dataset: (model folder, dataset folder)."""
    from conftest import make_folder_dataset

    root = tmp_path_factory.mktemp("serve")
    data = make_folder_dataset(root / "data")
    assert main(["fit", "--data", str(data), "--out", str(root / "model"), *SMALL]) == 0
    return root / "model", data


class FakeScorer:
    """Score = mean brightness, map = red channel; optionally slow (``delay``), gated or failing."""

    def __init__(self, delay: float = 0.0, gate: threading.Event | None = None, fail: Exception | None = None) -> None:
        self.calibration = Calibration(validation_scores=[0.1, 0.2, 0.3], threshold=0.5, pixel_threshold=0.5)
        self.batch_size = 4
        self.delay, self.gate, self.fail = delay, gate, fail
        self.started = threading.Event()

    def score_arrays(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.started.set()
        if self.gate is not None:
            self.gate.wait(10)
        time.sleep(self.delay)
        if self.fail is not None:
            raise self.fail
        return images.mean(axis=(1, 2, 3)).astype(np.float64), images[..., 0].astype(np.float32)


def png(value: int = 200, size: tuple[int, int] = (16, 16)) -> bytes:
    return imageio.encode_png(np.full((*size, 3), value, np.uint8))


def upload(data: bytes, name: str = "part.png", content_type: str = "image/png") -> dict[str, Any]:
    return {"file": (name, data, content_type)}


def client(scorer: Any = None, **kwargs: Any) -> TestClient:
    limits = kwargs.pop("limits", Limits())
    app = create_app({"fake": scorer or FakeScorer()}, limits, **kwargs)
    return TestClient(app, raise_server_exceptions=False)


def assert_refused(response: httpx.Response, status: int, reason: str) -> None:
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert reason in detail, detail
    assert "Traceback" not in response.text


# ---------------------------------------------------------------------------------------- results


def test_upload_gives_the_predict_command_results(fitted: tuple[Path, Path]) -> None:
    model, data = fitted
    c = TestClient(create_app({"synth": model}), raise_server_exceptions=False)
    for path in (data / "test" / "blob" / "b000.png", data / "test" / "good" / "g000.png"):
        expected = api.predict(model, [path])[0]
        r = c.post(
            "/v1/models/synth/predict?mask=true&heatmap=1&overlay=yes", files=upload(path.read_bytes(), path.name)
        )
        assert r.status_code == 200, r.text
        got = r.json()["results"][0]
        assert got["name"] == path.name
        assert got["score"] == pytest.approx(expected.score, rel=1e-6)
        assert got["p_value"] == pytest.approx(expected.p_value)
        assert got["defective"] == expected.defective
        assert got["decision"] == ("defective" if expected.defective else "good")
        assert got["defect_pixels"] == expected.defect_pixels
        assert [r["box"] for r in got["regions"]] == expected.boxes
        mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(got["mask_png"]))))
        assert mask.shape == (64, 64) and int((mask == 255).sum()) == expected.defect_pixels
        for key in ("heatmap_png", "overlay_png"):
            assert Image.open(io.BytesIO(base64.b64decode(got[key]))).size == (64, 64)
    assert (
        c.post("/v1/models/synth/predict", files=upload(png()))
        .json()["results"][0]
        .keys()
        .isdisjoint({"mask_png", "heatmap_png", "overlay_png"})
    )


def test_several_models_and_server_side_paths(fitted: tuple[Path, Path]) -> None:
    model, data = fitted
    c = TestClient(create_app({"synth": model, "fake": FakeScorer()}, image_root=data), raise_server_exceptions=False)
    models = c.get("/v1/models").json()["models"]
    assert [m["name"] for m in models] == ["fake", "synth"]
    synth = models[1]
    assert synth["detector"] == "patchcore" and synth["kind"] == "fitted" and synth["image_method"] == "conformal"
    assert synth["validation_images"] >= 1 and synth["finest_false_alarm"] == 1 / (synth["validation_images"] + 1)
    assert c.get("/healthz").json() == {"status": "ok", "models": ["fake", "synth"]}
    paths = ["test/blob/b001.png", "test/good/g001.png"]
    r = c.post("/v1/models/synth/predict", json={"paths": paths, "mask": True})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    expected = api.predict(model, [data / p for p in paths])
    assert [x["name"] for x in results] == paths
    assert [x["score"] for x in results] == pytest.approx([e.score for e in expected], rel=1e-6)
    assert "mask_png" in results[0]
    fake = c.post("/v1/models/fake/predict", json={"paths": paths}).json()["results"]
    assert [x["score"] for x in fake] != [x["score"] for x in results]  # the other model answered
    assert_refused(c.post("/v1/models/nope/predict", files=upload(png())), 404, "no model named 'nope'")


def test_several_images_in_one_upload_keep_their_order() -> None:
    c = client()
    files = [("file", (f"{v}.png", png(v), "image/png")) for v in (10, 250, 100)]
    results = c.post("/v1/models/fake/predict", files=files).json()["results"]
    assert [x["name"] for x in results] == ["10.png", "250.png", "100.png"]
    assert [x["score"] for x in results] == pytest.approx([10 / 255, 250 / 255, 100 / 255], rel=1e-5)
    assert [x["decision"] for x in results] == ["good", "defective", "good"]


# ---------------------------------------------------------------------------------------- limits


def test_server_side_paths_never_leave_the_image_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "ok.png").write_bytes(png())
    (tmp_path / "secret.png").write_bytes(png(7))
    (root / "out.png").symlink_to(tmp_path / "secret.png")
    c = client(image_root=root)
    assert c.post("/v1/models/fake/predict", json={"paths": ["ok.png"]}).status_code == 200
    for bad, status, reason in (
        ("../secret.png", 403, "outside the image root"),
        (str(tmp_path / "secret.png"), 403, "absolute paths are refused"),
        (str(root / "ok.png"), 403, "absolute paths are refused"),
        ("out.png", 403, "outside the image root"),
        ("missing.png", 404, "no such file"),
    ):
        assert_refused(c.post("/v1/models/fake/predict", json={"paths": ["ok.png", bad]}), status, reason)
    assert_refused(
        client().post("/v1/models/fake/predict", json={"paths": ["ok.png"]}), 403, "started without an image root"
    )


def test_upload_size_limit_by_header_and_while_streaming() -> None:
    c = client(limits=Limits(max_upload_bytes=4096))
    big = png(size=(200, 200)) + b"\x00" * 8000
    assert_refused(c.post("/v1/models/fake/predict", files=upload(big)), 413, "larger than this service's limit")

    def chunks():  # no Content-Length: the limit must hold while the body streams in
        for _ in range(10):
            yield b"x" * 1000

    r = c.post(
        "/v1/models/fake/predict",
        content=chunks(),
        headers={"content-type": "multipart/form-data; boundary=abc"},
    )
    assert_refused(r, 413, "larger than this service's limit")
    assert c.post("/v1/models/fake/predict", files=upload(png())).status_code == 200


def _png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels (a decompression bomb's header)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    )


def test_pixel_limit_is_checked_from_the_header_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def must_not_decode(path: Any) -> np.ndarray:
        raise AssertionError("the image was decoded before its size was checked")

    c = client(limits=Limits(max_pixels=10_000))
    monkeypatch.setattr(imageio, "read_image", must_not_decode)
    r = c.post("/v1/models/fake/predict", files=upload(_png_header_only(9_000, 9_000), "bomb.png"))
    assert_refused(r, 413, "bomb.png: the image is 9000x9000 = 81.0 megapixels, more than this service's limit")
    # beyond even anomnet.imageio's own limit (100 MP): the message quotes the service's limit, not the reader's
    r = client().post("/v1/models/fake/predict", files=upload(_png_header_only(30_000, 30_000), "huge.png"))
    assert_refused(r, 413, "huge.png: the image is too large: its header announces more than this service's limit")
    assert "limit of 40 megapixels" in r.json()["detail"] and "100" not in r.json()["detail"]
    assert_refused(c.post("/v1/models/fake/predict", files=upload(png(size=(101, 100)))), 413, "megapixels")
    monkeypatch.undo()
    assert c.post("/v1/models/fake/predict", files=upload(png(size=(100, 100)))).status_code == 200


def test_content_type_magic_bytes_and_bad_images_are_4xx_with_the_reason() -> None:
    c = client()
    data = png()
    cases = [
        (upload(data, content_type="text/plain"), 415, "content type 'text/plain'"),
        (upload(data, content_type="image/jpeg"), 415, "declared as JPEG but the data is a PNG"),
        (upload(b"GIF89a....", content_type="image/png"), 415, "not a PNG, JPEG, TIFF or BMP"),
        (upload(data[:60], "cut.png"), 400, "cut.png: "),
        (upload(b"", "empty.png"), 400, "empty"),
    ]
    for files, status, reason in cases:
        assert_refused(c.post("/v1/models/fake/predict", files=files), status, reason)
    truncated = c.post("/v1/models/fake/predict", files=upload(data[:60], "cut.png")).json()["detail"]
    assert "corrupt" in truncated or "truncated" in truncated or "header" in truncated
    assert c.post("/v1/models/fake/predict", files=upload(data, content_type="application/octet-stream")).is_success
    assert_refused(
        c.post("/v1/models/fake/predict", content=b"x", headers={"content-type": "text/plain"}), 415, "multipart"
    )
    assert_refused(c.post("/v1/models/fake/predict", json={"paths": "a.png"}), 400, "list of strings")
    assert_refused(c.post("/v1/models/fake/predict", json={"path": ["a.png"]}), 400, "unknown JSON field")
    assert_refused(c.post("/v1/models/fake/predict", json=[1, 2]), 400, "must be an object")
    assert_refused(c.post("/v1/models/fake/predict", files={"mask": (None, "1")}), 400, "no image")
    assert_refused(c.post("/v1/models/fake/predict?mask=maybe", files=upload(data)), 400, "use true or false")


def test_image_count_limit() -> None:
    c = client(limits=Limits(max_images=2))
    files = [("file", (f"{i}.png", png(), "image/png")) for i in range(3)]
    assert_refused(c.post("/v1/models/fake/predict", files=files), 413, "3 images in one request")
    assert c.post("/v1/models/fake/predict", files=files[:2]).status_code == 200


def test_full_queue_gets_429_and_the_queue_drains() -> None:
    gate = threading.Event()
    scorer = FakeScorer(gate=gate)
    app = create_app({"fake": scorer}, Limits(workers=1, queue=1, timeout_s=30))
    pool = app.state.anomnet.pool
    with background_server(app) as url:
        results: list[int] = []

        def post() -> None:
            results.append(httpx.post(f"{url}/v1/models/fake/predict", files=upload(png()), timeout=30).status_code)

        threads = [threading.Thread(target=post) for _ in range(2)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while pool.held < 2 and time.monotonic() < deadline:  # one scoring (held at the gate), one queued
            time.sleep(0.01)
        assert pool.held == 2 and scorer.started.wait(5)
        r = httpx.post(f"{url}/v1/models/fake/predict", files=upload(png()), timeout=30)
        assert_refused(r, 429, "busy")
        assert r.headers["retry-after"] == "1"
        gate.set()
        for t in threads:
            t.join(30)
        assert results == [200, 200]
        assert httpx.post(f"{url}/v1/models/fake/predict", files=upload(png()), timeout=30).status_code == 200
        metrics = httpx.get(f"{url}/metrics").text
        assert 'route="/v1/models/{name}/predict",status="429"} 1' in metrics


def test_request_timeout_gives_504_and_frees_the_slot_when_the_job_ends() -> None:
    app = create_app({"fake": FakeScorer(delay=0.6)}, Limits(workers=1, queue=0, timeout_s=0.2))
    c = TestClient(app, raise_server_exceptions=False)
    started = time.monotonic()
    assert_refused(c.post("/v1/models/fake/predict", files=upload(png())), 504, "limit of 0.2 s")
    assert time.monotonic() - started < 0.55
    pool = app.state.anomnet.pool
    assert pool.held == 1  # the job still runs: its place stays taken
    assert_refused(c.post("/v1/models/fake/predict", files=upload(png())), 429, "busy")
    deadline = time.monotonic() + 5
    while pool.held and time.monotonic() < deadline:
        time.sleep(0.01)
    assert pool.held == 0


def test_a_body_that_trickles_in_gets_408_and_frees_its_place() -> None:
    import socket

    app = create_app({"fake": FakeScorer()}, Limits(workers=1, queue=0, timeout_s=0.5))
    with background_server(app) as url:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(
                b"POST /v1/models/fake/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n"
                b"Content-Type: multipart/form-data; boundary=abc\r\n\r\n--abc\r\n"
            )  # ... and the rest never comes
            answer = ""
            while "did not arrive within" not in answer and (chunk := sock.recv(65536)):  # head and body may split
                answer += chunk.decode(errors="replace")
        assert answer.startswith("HTTP/1.1 408") and "did not arrive within" in answer
        assert app.state.anomnet.pool.held == 0
        assert httpx.post(f"{url}/v1/models/fake/predict", files=upload(png()), timeout=30).status_code == 200


def test_api_key() -> None:
    c = client(limits=Limits(api_key="s3cret-key-123"))
    for method, url in (("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/v1/models/fake/predict")):
        assert_refused(c.request(method, url), 401, "X-API-Key")
        assert_refused(c.request(method, url, headers={"X-API-Key": "wrong-key-1234"}), 401, "API key")
    assert c.get("/v1/models", headers={"X-API-Key": "s3cret-key-123"}).status_code == 200
    r = c.post("/v1/models/fake/predict", files=upload(png()), headers={"X-API-Key": "s3cret-key-123"})
    assert r.status_code == 200
    assert c.get("/healthz").status_code == 200 and c.get("/").status_code == 200  # the page asks for the key itself


def test_failures_inside_never_leak_a_traceback() -> None:
    c = client(FakeScorer(fail=RuntimeError("secret internals at 0xdeadbeef")))
    r = c.post("/v1/models/fake/predict", files=upload(png()))
    assert r.status_code == 500
    assert r.json() == {"detail": "internal error (the server log has the details)"}
    assert "deadbeef" not in r.text
    c = client(FakeScorer(fail=ConfigError("images must be at least 32 px")))
    assert_refused(c.post("/v1/models/fake/predict", files=upload(png())), 422, "could not be scored: images must be")


def test_metrics_count_requests_latency_and_images() -> None:
    c = client()
    for _ in range(3):
        c.post("/v1/models/fake/predict", files=upload(png(250)))
    c.post("/v1/models/fake/predict", files=upload(b"nope", content_type="image/png"))
    c.get("/nowhere")
    text = c.get("/metrics").text
    assert 'anomnet_requests_total{method="POST",route="/v1/models/{name}/predict",status="200"} 3' in text
    assert 'anomnet_requests_total{method="POST",route="/v1/models/{name}/predict",status="415"} 1' in text
    assert 'anomnet_requests_total{method="GET",route="unmatched",status="404"} 1' in text
    assert 'anomnet_request_duration_seconds_count{route="/v1/models/{name}/predict"} 4' in text
    assert 'anomnet_request_duration_seconds_bucket{route="/v1/models/{name}/predict",le="+Inf"} 4' in text
    assert 'anomnet_images_total{model="fake",outcome="defective"} 3' in text
    assert "anomnet_queue_capacity 9" in text


def test_page_and_assets_are_local() -> None:
    c = client()
    page = c.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for asset in ("/static/review.js", "/static/review.css"):
        assert c.get(asset).status_code == 200
    text = page.text + c.get("/static/review.js").text + c.get("/static/review.css").text
    assert "http://" not in text and "https://" not in text and "//cdn" not in text
    assert c.get("/docs").status_code == 404  # FastAPI's docs page would load scripts from a CDN


def test_bad_model_names_and_folders() -> None:
    with pytest.raises(ConfigError, match="model name"):
        create_app({"../x": FakeScorer()})
    with pytest.raises(ConfigError, match="no model"):
        create_app({})
    with pytest.raises(ConfigError, match="image root"):
        create_app({"a": FakeScorer()}, image_root="/no/such/folder")


def test_cli_serve_checks_its_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--model", "nameonly"]) == EXIT_INPUT
    assert "expected NAME=DIR" in capsys.readouterr().err
    assert main(["serve", "--model", f"a={tmp_path / 'none'}"]) == EXIT_INPUT
    assert "no such model folder" in capsys.readouterr().err
    assert main(["serve", "--model", "a=x", "--model", "a=y"]) == EXIT_INPUT
    assert "given twice" in capsys.readouterr().err
    assert main(["serve", "--model", "a=x", "--workers", "0"]) == EXIT_INPUT
    assert "workers" in capsys.readouterr().err


def test_cli_serve_passes_the_request_budget_body_timeout_and_reload_check(
    fitted: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from anomnet.serve import app as app_module

    served: list[Any] = []
    monkeypatch.setattr(app_module, "serve", lambda app, *args, **kwargs: served.append(app))
    model, _ = fitted
    argv = ["serve", "--model", f"m={model}", "--max-request-megapixels", "5", "--body-timeout", "3"]
    assert main([*argv, "--reload-check", "0"]) == 0
    state = served[0].state.anomnet
    assert state.limits.max_request_pixels == 5_000_000 and state.limits.body_timeout_s == 3.0
    assert state.models.check_s is None
    assert main(argv) == 0 and served[1].state.anomnet.models.check_s == 2.0
