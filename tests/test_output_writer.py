"""The output writer: pooled files decode to the serial writer's pixels, a failing write is that image's error
row, the pool stays bounded, and predict, the hot folder and the batch engine all write through it."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomnet import imageio
from anomnet.decisions.calibration import Calibration
from anomnet.predict import outputs
from anomnet.predict.inputs import InputImage
from anomnet.predict.outputs import OutputWriter, predict_images, score_and_write, write_image_outputs
from anomnet.predict.scoring import ImagePrediction, ImageRef, score_refs
from anomnet.predict.visualize import draw_contour, heatmap, overlay


class MapScorer:
    """Score = the image's maximum red value; map = the red channel (a bright square is a defect)."""

    batch_size = 3

    def __init__(self) -> None:
        self.calibration = Calibration(validation_scores=[0.1, 0.2, 0.3], threshold=0.5, pixel_threshold=0.5)

    def score_arrays(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return images[..., 0].max(axis=(1, 2)).astype(np.float64), images[..., 0].astype(np.float32)


def _images(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        h, w = (40, 48) if i % 4 else (33, 29)  # two sizes
        pixels = (rng.random((h, w, 3)) * 100).astype(np.uint8)
        if i % 2:
            pixels[5 : 5 + i, 8 : 8 + i, 0] = 250  # a defect of its own size
        path = folder / f"img{i:02d}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def _decoded(path: str | Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_pooled_files_decode_to_the_serial_writers_pixels(tmp_path: Path) -> None:
    paths = _images(tmp_path / "in", 9)
    scorer = MapScorer()
    rows = predict_images(scorer, [tmp_path / "in"], tmp_path / "out", raw_maps=True)
    assert all(r.error is None for r in rows) and any(r.defective for r in rows) and not all(r.defective for r in rows)
    cal = scorer.calibration
    serial = score_refs(scorer, [ImageRef(str(p)) for p in paths], keep_maps=True, keep_images=True)
    for path, row, ref in zip(paths, rows, serial):
        assert ref.image is not None and ref.anomaly_map is not None and ref.mask is not None
        expected = {
            "heatmap": heatmap(ref.anomaly_map, cal),
            "overlay": draw_contour(overlay(ref.image, ref.anomaly_map, cal), ref.mask),
            "mask": ref.mask.astype(np.uint8) * 255,
        }
        assert set(row.outputs) == {"heatmap", "overlay", "mask", "map"}
        for kind, pixels in expected.items():
            assert np.array_equal(_decoded(row.outputs[kind]), pixels), (path.name, kind)
        written = write_image_outputs(
            tmp_path / "serial", path.stem, ref.image, ref.anomaly_map, ref.mask, cal, raw_maps=True
        )
        for kind in written:  # the serial writer's files, byte for byte
            assert Path(written[kind]).read_bytes() == Path(row.outputs[kind]).read_bytes(), (path.name, kind)


def test_a_failing_write_is_that_images_error_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _images(tmp_path / "in", 7)
    real = imageio.write_png

    def full_disk_for_img03(path: str | Path, *args: object, **kwargs: object) -> None:
        if "img03" in str(path) and "overlays" in str(path):
            raise OSError(28, "No space left on device")
        real(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(imageio, "write_png", full_disk_for_img03)
    rows = predict_images(MapScorer(), [tmp_path / "in"], tmp_path / "out")
    failed = [r for r in rows if r.error]
    assert [Path(r.path).name for r in failed] == ["img03.png"]
    assert failed[0].error is not None and failed[0].error.startswith("outputs could not be written")
    assert "No space left" in failed[0].error and failed[0].score > 0  # the score stays
    assert all(r.outputs and Path(r.outputs["overlay"]).is_file() for r in rows if not r.error)
    csv_rows = (tmp_path / "out" / "results.csv").read_text().splitlines()
    assert len(csv_rows) == 8 and "outputs could not be written" in next(r for r in csv_rows if "img03" in r)


def test_an_unexpected_failure_is_raised_not_swallowed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _images(tmp_path / "in", 2)

    def broken(*args: object, **kwargs: object) -> None:
        raise ValueError("a bug")

    monkeypatch.setattr(outputs, "write_image_outputs", broken)
    with pytest.raises(ValueError, match="a bug"):  # the hot folder and the engine then score one by one
        score_and_write(MapScorer(), [InputImage(p, p.stem) for p in sorted((tmp_path / "in").iterdir())], tmp_path)


def test_the_pool_is_bounded_and_rows_drop_their_pixels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    running, most = 0, 0
    lock = threading.Lock()

    def slow_write(out: Path, name: str, *args: object) -> dict[str, str]:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.02)
        with lock:
            running -= 1
        return {"mask": str(out / name)}

    monkeypatch.setattr(outputs, "write_image_outputs", slow_write)
    cal = MapScorer().calibration
    rows = []
    with OutputWriter(tmp_path, threads=2, pending=3) as writer:
        for i in range(12):
            row = ImagePrediction(
                f"{i}.png", image=np.zeros((4, 4, 3), np.float32), anomaly_map=np.zeros((4, 4)), mask=np.zeros((4, 4))
            )
            writer.submit(row, str(i), cal)
            assert row.image is None and row.anomaly_map is None and row.mask is None  # held by the pool only
            assert len(writer._queue) <= 3
            rows.append(row)
    assert most <= 2
    assert [r.outputs["mask"] for r in rows] == [str(tmp_path / str(i)) for i in range(12)]


def test_every_batch_path_writes_through_the_writer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """score_and_write is the step of predict, the hot folder and the engine's workers: it submits to a writer."""
    paths = _images(tmp_path / "in", 4)
    submitted: list[str] = []
    real = OutputWriter.submit

    def counting(self: OutputWriter, row: ImagePrediction, name: str, *args: object, **kwargs: object) -> None:
        submitted.append(name)
        real(self, row, name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(OutputWriter, "submit", counting)
    rows = score_and_write(MapScorer(), [InputImage(p, p.stem) for p in paths], tmp_path / "out", keep_maps=True)
    assert submitted == [p.stem for p in paths]
    assert all(Path(r.outputs["heatmap"]).is_file() for r in rows)
    assert all(r.anomaly_map is not None and r.image is None for r in rows)  # maps kept as asked, pixels dropped


def test_the_next_batch_is_decoded_on_another_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = _images(tmp_path / "in", 7)
    (tmp_path / "in" / "img03.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage")  # unreadable, mid-run
    threads: list[str] = []
    real = imageio.read_image

    def recording(path: str | Path, *args: object, **kwargs: object) -> np.ndarray:
        threads.append(threading.current_thread().name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(imageio, "read_image", recording)
    done: list[int] = []
    rows = score_and_write(MapScorer(), [InputImage(p, p.stem) for p in paths], tmp_path / "out", progress=done.append)
    assert done == [3, 3, 1]
    assert sum(name.startswith("anomnet-read") for name in threads) == 7  # every file read ahead
    assert [r.error is not None for r in rows] == [False, False, False, True, False, False, False]
    assert rows[3].error is not None and "outputs" not in rows[3].error and not rows[3].outputs
    assert [r.score for r in rows[:3]] == [r.score for r in predict_images(MapScorer(), paths[:3])]
