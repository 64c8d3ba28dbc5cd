"""The service under hostile requests: bounded work per request, slow or vanishing clients, odd JSON, the API key."""

from __future__ import annotations

import logging
import socket
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'anomnet[serve]'")
pytest.importorskip("httpx", reason="the serve extra is not installed: pip install 'anomnet[serve]'")
pytest.importorskip("multipart", reason="the serve extra is not installed: pip install 'anomnet[serve]'")

import httpx  # noqa: E402

from anomnet import imageio  # noqa: E402
from anomnet.serve.app import background_server, create_app  # noqa: E402
from anomnet.serve.limits import Limits  # noqa: E402
from test_serve import FakeScorer, assert_refused, client, png, upload  # noqa: E402

KEY = "s3cret-key-123"


def test_the_openapi_document_needs_the_api_key_like_every_v1_route() -> None:
    c = client(limits=Limits(api_key=KEY))
    assert_refused(c.get("/v1/openapi.json"), 401, "X-API-Key")
    r = c.get("/v1/openapi.json", headers={"X-API-Key": KEY})
    assert r.status_code == 200 and "/v1/models/{name}/predict" in r.json()["paths"]
    assert c.get("/openapi.json").status_code == 404  # not served anywhere else either
    assert client().get("/v1/openapi.json").status_code == 200  # without a key configured: open, as every route


def test_a_deeply_nested_json_body_is_a_400_not_a_recursion_error() -> None:
    c = client()
    body = b'{"paths": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    r = c.post("/v1/models/fake/predict", content=body, headers={"content-type": "application/json"})
    assert_refused(r, 400, "nested too deeply")


def test_a_json_body_is_small() -> None:
    c = client()
    body = b'{"paths": [' + b'"a.png",' * 200_000 + b'"b.png"]}'  # 1.6 MB of paths
    r = c.post("/v1/models/fake/predict", content=body, headers={"content-type": "application/json"})
    assert_refused(r, 413, "a JSON body may be at most 1048576 bytes")


def test_a_review_mark_of_the_wrong_type_is_a_400(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(png())
    c = client(image_root=tmp_path / "images", review_dir=tmp_path / "review")
    for mark in (["false_alarm"], {"x": 1}, 3, None):
        r = c.post("/v1/models/fake/review", json={"path": "a.png", "mark": mark})
        assert_refused(r, 400, "unknown; use one of: false_alarm")
    r = c.post("/v1/models/fake/review", files=upload(png()), data={"mark": "nonsense"})
    assert_refused(r, 400, "mark 'nonsense' unknown")
    assert c.post("/v1/models/fake/review", json={"path": "a.png", "mark": "false_alarm"}).status_code == 200


def _flat_png(side: int) -> bytes:
    return imageio.encode_png(np.full((side, side, 3), 90, np.uint8))


def test_a_request_has_a_pixel_budget_checked_from_the_headers() -> None:
    # the case scaled down 16x: eight images within the per-image limit, too many pixels together
    limits = Limits(max_pixels=1_000_000, max_request_pixels=4_000_000, max_images=16)
    c = client(limits=limits)
    files = [("file", (f"{i}.png", _flat_png(1000), "image/png")) for i in range(8)]
    r = c.post("/v1/models/fake/predict", files=files)
    assert_refused(r, 413, "more than this service's limit of 4 megapixels per request (at 4.png)")
    assert c.post("/v1/models/fake/predict", files=files[:4]).status_code == 200
    assert Limits().max_request_pixels == 64_000_000  # the default: 8 x 16 MP is refused
    assert c.get("/v1/models").json()["limits"]["max_request_pixels"] == 4_000_000


def test_the_images_of_a_request_are_decoded_one_at_a_time() -> None:
    """Eight 1 MP images: the peak holds about one decoded image (12 MB as float32), not eight (96 MB)."""
    limits = Limits(max_pixels=1_000_000, max_request_pixels=8_000_000, max_images=16)
    c = client(limits=limits)
    files = [("file", (f"{i}.png", _flat_png(1000), "image/png")) for i in range(8)]
    assert c.post("/v1/models/fake/predict", files=files[:1]).status_code == 200  # warm up
    tracemalloc.start()
    try:
        r = c.post("/v1/models/fake/predict", files=files)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert r.status_code == 200 and len(r.json()["results"]) == 8
    one = 1000 * 1000 * 3 * 4
    assert peak < 3.5 * one, f"peak {peak / 1e6:.0f} MB while scoring 8 images of {one / 1e6:.0f} MB each"


def _half_body(url: str) -> socket.socket:
    """A client that sends the head and half of its body, then waits."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(
        b"POST /v1/models/fake/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n"
        b"Content-Type: multipart/form-data; boundary=abc\r\n\r\n--abc\r\n" + b"x" * 100
    )
    return sock


def test_slow_clients_hold_no_worker_place_and_real_clients_are_served() -> None:
    """Nine clients that send half a body and wait: worker and queue places stay free for the real ones."""
    app = create_app({"fake": FakeScorer()}, Limits(workers=1, queue=8, timeout_s=60, body_timeout_s=3))
    pool = app.state.anomnet.pool
    with background_server(app) as url:
        slow = [_half_body(url) for _ in range(9)]
        try:
            time.sleep(0.5)
            assert pool.held == 0
            for _ in range(3):
                r = httpx.post(f"{url}/v1/models/fake/predict", files=upload(png()), timeout=30)
                assert r.status_code == 200, r.text
            answers = []
            for sock in slow:  # each slow client is cut off after the body timeout, with a 408
                answer = b""
                while b"did not arrive within" not in answer and (chunk := sock.recv(65536)):
                    answer += chunk
                answers.append(answer.decode(errors="replace"))
            assert all(a.startswith("HTTP/1.1 408") and "limit of 3 s" in a for a in answers), answers[0]
        finally:
            for sock in slow:
                sock.close()
        assert pool.held == 0


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_a_client_hanging_up_mid_body_is_no_500_and_leaves_no_traceback() -> None:
    app = create_app({"fake": FakeScorer()}, Limits(workers=1, queue=1))
    records = _Records()
    loggers = [logging.getLogger(n) for n in ("uvicorn", "uvicorn.error", "anomnet", "")]
    for logger in loggers:
        logger.addHandler(records)
    try:
        with background_server(app) as url:
            for _ in range(3):
                _half_body(url).close()  # sent half, then hung up
            time.sleep(0.5)
            assert httpx.post(f"{url}/v1/models/fake/predict", files=upload(png()), timeout=30).status_code == 200
            metrics = httpx.get(f"{url}/metrics").text
            assert app.state.anomnet.pool.held == 0
    finally:
        for logger in loggers:
            logger.removeHandler(records)
    assert 'status="500"' not in metrics, metrics
    assert 'route="/v1/models/{name}/predict",status="499"} 3' in metrics
    tracebacks = [r.getMessage() for r in records.records if r.exc_info]
    assert not tracebacks, tracebacks
