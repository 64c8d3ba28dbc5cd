"""The service's limits without the service (anomnet.serve.limits, .metrics, .review import no FastAPI)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomnet import durable, imageio
from anomnet.errors import ConfigError
from anomnet.install import install_command
from anomnet.serve.limits import (
    Limits,
    RequestError,
    WorkerPool,
    check_image_bytes,
    check_pixels,
    read_below,
    sniff_format,
)
from anomnet.serve.metrics import Metrics
from anomnet.serve.review import ReviewStore, image_id, safe_stem


def _png_bytes(size: tuple[int, int] = (8, 8)) -> bytes:
    return imageio.encode_png(np.zeros((*size, 3), np.uint8))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_upload_bytes", 10),
        ("max_pixels", 0),
        ("max_images", 0),
        ("workers", 0),
        ("queue", -1),
        ("timeout_s", 0.0),
        ("api_key", "short"),
        ("api_key", "with\nnewline-key"),
    ],
)
def test_limits_refuse_values_out_of_range(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=field.replace("_", ".") if field != "api_key" else "API key"):
        Limits(**{field: value})  # type: ignore[arg-type]


def test_sniff_every_supported_format(tmp_path: Path) -> None:
    pixels = np.random.default_rng(0).integers(0, 255, (6, 7, 3), dtype=np.uint8)
    for fmt, pil_name in (("png", "PNG"), ("jpeg", "JPEG"), ("tiff", "TIFF"), ("bmp", "BMP")):
        path = tmp_path / f"x.{fmt}"
        Image.fromarray(pixels).save(path, format=pil_name)
        assert sniff_format(path.read_bytes()[:16]) == fmt
        assert check_image_bytes("x", path.read_bytes(), f"image/{fmt}") == fmt
        assert check_image_bytes("x", path.read_bytes(), "application/octet-stream") == fmt
        assert check_image_bytes("x", path.read_bytes(), None) == fmt
    gif = tmp_path / "x.gif"
    Image.fromarray(pixels).save(gif, format="GIF")
    assert sniff_format(gif.read_bytes()) is None


def test_content_type_and_magic_bytes_must_agree() -> None:
    png = _png_bytes()
    with pytest.raises(RequestError, match="declared as JPEG but the data is a PNG") as exc:
        check_image_bytes("a.png", png, "image/jpeg")
    assert exc.value.status == 415
    with pytest.raises(RequestError, match="content type 'text/plain'") as exc:
        check_image_bytes("a.png", png, "text/plain")
    assert exc.value.status == 415
    with pytest.raises(RequestError, match="not a PNG, JPEG, TIFF or BMP") as exc:
        check_image_bytes("a.png", b"<html>hello</html>", "image/png")
    assert exc.value.status == 415
    with pytest.raises(RequestError, match="empty") as exc:
        check_image_bytes("a.png", b"", "image/png")
    assert exc.value.status == 400
    assert check_image_bytes("a.png", png, "image/png; charset=binary") == "png"


def test_pixel_limit_names_the_size() -> None:
    limits = Limits(max_pixels=1000)
    check_pixels("ok", 10, 100, limits)
    with pytest.raises(RequestError, match=r"101x10 = 0.0 megapixels.*0.001 megapixels") as exc:
        check_pixels("big", 10, 101, limits)
    assert exc.value.status == 413


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.png").write_bytes(_png_bytes())
    (tmp_path / "secret.png").write_bytes(b"\x89PNG\r\n\x1a\nsecret")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\nsecret")
    return root


def test_read_below_reads_files_inside_the_root(root: Path) -> None:
    assert read_below(root, "sub/a.png", 1 << 20) == (root / "sub" / "a.png").read_bytes()
    assert read_below(root, "sub/../sub/./a.png", 1 << 20) == (root / "sub" / "a.png").read_bytes()
    (root / "link.png").symlink_to(root / "sub" / "a.png")  # a link that stays inside is fine
    assert read_below(root, "link.png", 1 << 20) == (root / "sub" / "a.png").read_bytes()
    (root / "sublink").symlink_to(root / "sub")
    assert read_below(root, "sublink/a.png", 1 << 20) == (root / "sub" / "a.png").read_bytes()


@pytest.mark.parametrize(
    ("relative", "status", "reason"),
    [
        ("../secret.png", 403, "outside the image root"),
        ("sub/../../secret.png", 403, "outside the image root"),
        ("/etc/passwd", 403, "absolute paths are refused"),
        ("~/secret.png", 403, "absolute paths are refused"),
        ("C:\\secret.png", 403, "absolute paths are refused"),
        ("out.png", 403, "outside the image root"),  # symlink to a file outside
        ("outdir/b.png", 403, "outside the image root"),  # symlinked folder outside
        ("missing.png", 404, "no such file"),
        ("sub/a.png/x", 404, "no such file"),
        ("sub", 400, "not a regular file"),
        (".", 400, "image root itself"),
        ("fifo.png", 400, "not a regular file"),
        ("a\x00.png", 400, "NUL"),
        ("", 400, "non-empty"),
    ],
)
def test_read_below_refuses_everything_else(root: Path, relative: str, status: int, reason: str) -> None:
    (root / "out.png").symlink_to(root.parent / "secret.png")
    (root / "outdir").symlink_to(root.parent / "outside")
    os.mkfifo(root / "fifo.png")  # opening it must not block
    with pytest.raises(RequestError, match=reason) as exc:
        read_below(root, relative, 1 << 20)
    assert exc.value.status == status


def test_read_below_caps_the_size(root: Path) -> None:
    with pytest.raises(RequestError, match="more than the limit") as exc:
        read_below(root, "sub/a.png", 10)
    assert exc.value.status == 413


def test_read_below_refuses_a_link_swapped_in_after_resolving(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The path is resolved first, then opened without following links: a link planted in between is refused."""
    import anomnet.serve.limits as limits_module

    real_resolve = limits_module.resolve_below

    def resolve_then_swap(r: Path, rel: str) -> tuple[Path, tuple[str, ...]]:
        result = real_resolve(r, rel)
        (root / "sub" / "a.png").unlink()
        (root / "sub" / "a.png").symlink_to(root.parent / "secret.png")
        return result

    monkeypatch.setattr(limits_module, "resolve_below", resolve_then_swap)
    with pytest.raises(RequestError, match="outside the image root") as exc:
        read_below(root, "sub/a.png", 1 << 20)
    assert exc.value.status == 403


def test_worker_pool_admits_workers_plus_queue_then_refuses() -> None:
    pool = WorkerPool(workers=1, queue=1)
    gate = threading.Event()
    first, second = pool.reserve(), pool.reserve()
    with pytest.raises(RequestError, match="busy") as exc:
        pool.reserve()
    assert exc.value.status == 429 and exc.value.headers["Retry-After"] == "1"
    f1 = first.submit(gate.wait)
    f2 = second.submit(lambda: 42)
    time.sleep(0.05)
    assert pool.running == 1 and pool.held == 2
    gate.set()
    assert f2.result(timeout=5) == 42 and f1.result(timeout=5)
    deadline = time.monotonic() + 5
    while pool.held and time.monotonic() < deadline:  # released by the jobs' done callbacks
        time.sleep(0.01)
    assert pool.held == 0
    third = pool.reserve()
    third.close()  # an unused slot is given back on close
    third.close()
    assert pool.held == 0
    pool.shutdown()


def test_metrics_render_counts_and_histogram() -> None:
    m = Metrics(buckets=(0.1, 1.0))
    m.observe_request("GET", "/healthz", 200, 0.05)
    m.observe_request("GET", "/healthz", 200, 0.5)
    m.observe_request("POST", '/v1/"x"', 429, 5.0)
    m.observe_image("bottle", "defective")
    m.gauge("anomnet_test_gauge", "a test value", lambda: 3)
    text = m.render()
    assert 'anomnet_requests_total{method="GET",route="/healthz",status="200"} 2' in text
    assert 'route="/v1/\\"x\\"",status="429"} 1' in text  # label values escaped
    assert 'anomnet_request_duration_seconds_bucket{route="/healthz",le="0.1"} 1' in text
    assert 'anomnet_request_duration_seconds_bucket{route="/healthz",le="1"} 2' in text
    assert 'anomnet_request_duration_seconds_bucket{route="/healthz",le="+Inf"} 2' in text
    assert 'anomnet_request_duration_seconds_count{route="/healthz"} 2' in text
    assert 'anomnet_images_total{model="bottle",outcome="defective"} 1' in text
    assert "anomnet_test_gauge 3" in text
    assert m.requests("/healthz") == 2 and m.requests(status=429) == 1


def test_review_store_writes_the_labelled_layout(tmp_path: Path) -> None:
    store = ReviewStore(tmp_path / "review")
    png = _png_bytes()
    entry = store.save("bottle", "../../etc/x y.png", png, "png", "false_alarm")
    key = image_id(png)
    assert entry["file"] == f"good/x_y-{key}.png" and entry["label"] == "good"
    assert (tmp_path / "review" / "bottle" / entry["file"]).read_bytes() == png
    moved = store.save("bottle", "x y.png", png, "png", "confirmed_defect")  # relabelled: the file moves
    assert moved["file"] == f"defective/x_y-{key}.png"
    assert not (tmp_path / "review" / "bottle" / entry["file"]).exists()
    assert [m["mark"] for m in store.marks("bottle")] == ["confirmed_defect"]
    assert store.remove("bottle", key) and not store.remove("bottle", key)
    assert not (tmp_path / "review" / "bottle" / moved["file"]).exists()
    with pytest.raises(RequestError, match="16 hex digits"):
        store.remove("bottle", "../x")
    with pytest.raises(RequestError, match="unknown"):
        store.save("bottle", "a.png", png, "png", "maybe")


def test_review_store_refuses_a_folder_linked_outside(tmp_path: Path) -> None:
    (tmp_path / "review" / "bottle").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "review" / "bottle" / "good").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(RequestError, match="outside"):
        ReviewStore(tmp_path / "review").save("bottle", "a.png", _png_bytes(), "png", "false_alarm")
    assert list((tmp_path / "elsewhere").iterdir()) == []


def test_safe_stem() -> None:
    assert safe_stem("../../a b/c?d.png") == "c_d"
    assert safe_stem("") == "image" and safe_stem("...") == "image"
    assert len(safe_stem("x" * 300 + ".png")) == 40


def test_encode_png_and_write_file(tmp_path: Path) -> None:
    array = np.arange(48, dtype=np.uint8).reshape(4, 4, 3)
    durable.write_file(tmp_path / "a.png", imageio.encode_png(array))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), array)
    with pytest.raises(ConfigError):
        imageio.encode_png(np.zeros((4, 4), np.float32))


def test_cli_serve_says_what_to_install(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import anomnet.serve
    from anomnet.cli import EXIT_INPUT
    from anomnet.cli import main as cli_main

    monkeypatch.setattr(anomnet.serve, "missing_extra", lambda: anomnet.serve.MISSING_EXTRA + "; missing: fastapi")
    assert cli_main(["serve", "--model", "a=x"]) == EXIT_INPUT
    assert install_command("serve") in capsys.readouterr().err


def test_the_app_module_imports_without_the_extra_and_says_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    import anomnet.serve
    from anomnet.serve import app

    monkeypatch.setattr(anomnet.serve, "missing_extra", lambda: anomnet.serve.MISSING_EXTRA + "; missing: uvicorn")
    with pytest.raises(ConfigError, match="missing: uvicorn") as caught:
        app.create_app({"m": "runs/none"})
    assert install_command("serve") in str(caught.value)
