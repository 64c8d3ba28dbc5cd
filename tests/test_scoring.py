"""The scoring step (anomnet.predict.scoring): a row per reference, in order, batched by size, torch-free to import."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomnet import model_io
from anomnet.decisions.calibration import Calibration
from anomnet.decisions.postprocess import region_boxes
from anomnet.errors import ConfigError, ModelFormatError
from anomnet.predict import scoring
from anomnet.predict.scoring import ImageRef, load_scorer, score_refs


class FakeScorer:
    """Score = mean brightness; map = the red channel. Records the batch shapes it was given."""

    def __init__(self, batch_size: int = 2, fail_on_width: int | None = None) -> None:
        self.calibration = Calibration(validation_scores=[0.1, 0.2, 0.3], threshold=0.5, pixel_threshold=0.5)
        self.batch_size = batch_size
        self.calls: list[tuple[int, ...]] = []
        self.fail_on_width = fail_on_width

    def score_arrays(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.calls.append(images.shape)
        if images.shape[2] == self.fail_on_width:
            raise ConfigError("too narrow for this model")
        return images.mean(axis=(1, 2, 3)).astype(np.float64), images[..., 0].astype(np.float32)


def _png(path: Path, value: int, size: tuple[int, int] = (8, 8)) -> Path:
    Image.fromarray(np.full((*size, 3), value, np.uint8)).save(path)
    return path


def test_one_row_per_reference_in_order_with_read_errors(tmp_path: Path) -> None:
    refs = [
        ImageRef(str(_png(tmp_path / "a.png", 255))),
        ImageRef(str(tmp_path / "missing.png")),
        ImageRef(str(_png(tmp_path / "b.png", 0, (8, 12)))),
        ImageRef(str(_png(tmp_path / "c.png", 0))),
        ImageRef("in-memory", np.full((8, 12, 3), 0.9, np.float32)),
    ]
    scorer = FakeScorer(batch_size=8)
    rows = score_refs(scorer, refs)
    assert [r.path for r in rows] == [r.path for r in refs]
    assert rows[1].error and np.isnan(rows[1].score) and rows[1].defective is None
    assert [r.defective for r in rows] == [True, None, False, False, True]
    assert rows[0].score == pytest.approx(1.0) and rows[0].defect_pixels == 64 and rows[0].boxes == [[0, 0, 8, 8]]
    assert rows[2].defect_pixels == 0 and rows[2].regions == 0 and rows[2].boxes == []
    # conformal p-value against the three validation scores
    assert rows[0].p_value == pytest.approx(1 / 4) and rows[2].p_value == pytest.approx(1.0)
    # same-size images share a batch: two 8x8 (a, c) and two 8x12 (b, in-memory)
    assert sorted(s[:3] for s in scorer.calls) == [(2, 8, 8), (2, 8, 12)]
    assert rows[0].anomaly_map is None and rows[0].image is None  # dropped unless asked for
    kept = score_refs(scorer, refs[:1], keep_maps=True, keep_images=True)[0]
    assert kept.anomaly_map is not None and kept.mask is not None and kept.image is not None


def test_batches_respect_batch_size_and_pixel_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    refs = [ImageRef(f"m{i}", np.zeros((10, 10, 3), np.float32)) for i in range(5)]
    scorer = FakeScorer(batch_size=2)
    score_refs(scorer, refs)
    assert [s[0] for s in scorer.calls] == [2, 2, 1]
    monkeypatch.setattr(scoring, "BATCH_PIXELS", 250)  # two 10x10 images fit, three do not
    scorer = FakeScorer(batch_size=16)
    score_refs(scorer, refs)
    assert [s[0] for s in scorer.calls] == [2, 2, 1]


def test_a_batch_the_model_refuses_gives_error_rows_the_rest_go_on() -> None:
    refs = [ImageRef("narrow", np.zeros((8, 3, 3), np.float32)), ImageRef("fine", np.ones((8, 8, 3), np.float32))]
    rows = score_refs(FakeScorer(fail_on_width=3), refs)
    assert "too narrow" in (rows[0].error or "") and rows[1].error is None and rows[1].defective


def test_wrong_array_shape_is_an_error_row() -> None:
    rows = score_refs(FakeScorer(), [ImageRef("gray", np.zeros((8, 8), np.float32))])
    assert rows[0].error and "HxWx3" in rows[0].error


def test_region_boxes() -> None:
    mask = np.zeros((6, 8), bool)
    mask[1:3, 1:4] = True
    mask[4, 6] = True
    mask[5, 7] = True  # diagonal neighbour: same 8-connected region
    assert region_boxes(mask) == [[1, 1, 4, 3], [6, 4, 8, 6]]
    assert region_boxes(np.zeros((3, 3), bool)) == []


def test_load_scorer_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelFormatError, match="no such model folder"):
        load_scorer(tmp_path / "nope")
    with pytest.raises(ModelFormatError, match="neither a fitted model"):
        load_scorer(tmp_path)
    assert scoring.MODEL_META == model_io.META_FILE
    fake = FakeScorer()
    assert load_scorer(fake) is fake


def test_importing_the_scoring_step_does_not_import_torch() -> None:
    code = "import sys, anomnet.predict.scoring, anomnet.predict.outputs; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
