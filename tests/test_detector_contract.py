"""Every registered detector through the contract of docs/adding-a-detector.md, at tiny settings on 64 px images.

Fit; predict shapes, dtypes, finite values, maps at the input's size; "not fitted" said before fit;
a save / load round trip that scores the same; the extension points answering; and the export's
graph: the detector's preprocessing and ``predict_preprocessed`` traced in graph mode at one image
size, run at another, equal to the detector's prediction in graph mode. A new detector gets a row
in ``SETTINGS`` (the first test fails until it has one).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from tests.conftest import make_folder_dataset

from anomnet.data import Sample, iter_batches, load_dataset
from anomnet.detectors import DETECTORS, Detector, create_detector
from anomnet.errors import ConfigError, NotFittedError

# The least work that exercises every part of each detector (none of these learns anything useful).
SETTINGS: dict[str, dict[str, object]] = {
    "patchcore": {},
    "anomnet": {"num_centroids": 8, "stage1_epochs": 1, "stage2_epochs": 1, "init_samples": 500},
    "efficientad": {"steps": 2, "distill_steps": 1, "distill_crop": 64, "pool_limit": 2, "bf16": False},
    "tocoad": {"train_batch_size": 2, "stage1_steps": 1, "stage2_steps": 1, "stage2": True},
    "inpformer": {"steps": 1, "train_batch_size": 2, "decoder_depth": 3},
    "cpr": {"train_batch_size": 2, "steps": 1, "train_crop": 32, "points": 8},
    "hybrid": {"branches": "a:patchcore,b:patchcore", "b.blur_sigma": 8.0, "synthetic_per_image": 1},
}
COMMON = {"image_size": 64, "batch_size": 4}


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Sample], list[Sample], torch.Tensor]:
    """Training and validation samples (64 px) and a test batch of 3 images at 72 x 80 px."""
    root = make_folder_dataset(tmp_path_factory.mktemp("contract") / "data", n_train=6, n_good=2, n_bad=1)
    split = load_dataset(root, val_fraction=0.34)
    test = next(iter(iter_batches(list(split.test), 3, size=None))).images
    return list(split.train), list(split.validation), torch.nn.functional.interpolate(test, size=(72, 80))


def test_every_registered_detector_has_contract_settings() -> None:
    assert sorted(SETTINGS) == sorted(DETECTORS)


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_detector_contract(name: str, images: tuple[list[Sample], list[Sample], torch.Tensor], tmp_path: Path) -> None:
    train, validation, test = images
    det = create_detector(name, {**COMMON, **SETTINGS[name]})
    assert not det.fitted
    with pytest.raises(NotFittedError):
        det.predict(test)
    with pytest.raises(NotFittedError):
        det.state_tensors()

    det.fit(train, validation, progress=False)
    assert det.fitted
    pred = det.predict(test)
    assert pred.scores.shape == (3,) and pred.maps.shape == (3, 72, 80)
    assert pred.scores.dtype == pred.maps.dtype == torch.float32
    assert bool(torch.isfinite(pred.scores).all()) and bool(torch.isfinite(pred.maps).all())
    with pytest.raises(ConfigError, match="shape"):
        det.predict(test[:, :1])

    det.save(tmp_path / "model")
    loaded = Detector.load(tmp_path / "model")
    assert type(loaded) is type(det) and _as_json(loaded.config.to_dict()) == _as_json(det.config.to_dict())
    assert loaded.fitted
    again = loaded.predict(test)
    torch.testing.assert_close(again.scores, pred.scores, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(again.maps, pred.maps, rtol=1e-5, atol=1e-6)

    _check_extension_points(loaded, test)
    _check_graph(loaded)


def _as_json(value: object) -> object:
    return json.loads(json.dumps(value, sort_keys=True))


def _check_extension_points(det: Detector, test: torch.Tensor) -> None:
    assert isinstance(det.accepts_labelled, bool) and isinstance(det.can_leave_out, bool)
    assert det.backbone_name is None or isinstance(det.backbone_name, str)
    branches = det.fitted_branches()
    assert all(isinstance(b, Detector) for b in branches.values())
    assert (det.choice is None) == (not branches) and (det.describe_choice() is None) == (not branches)
    if det.supports_leave_out:  # a fitted detector that records its training images can leave one out
        assert det.can_leave_out
        with det.leave_out([0]):
            assert det.predict(test).scores.shape == (3,)
    elif not det.can_leave_out:
        with pytest.raises(ConfigError, match="cannot leave"):
            det.leave_out([0])


def _check_graph(det: Detector) -> None:
    """What ``anomnet export`` traces (``ExportGraph``), traced at one size and run at another."""
    from anomnet.export import graph_reference
    from anomnet.export.graph import ExportGraph
    from anomnet.export.writer import probe_images
    from anomnet.exported import parity

    det.calibration.threshold = 0.0
    graph = ExportGraph(det).eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the tracer's notes on Python values it keeps as constants
        traced = torch.jit.trace(graph, (torch.from_numpy(probe_images(1, 80, 112)),), check_trace=False)
        pixels = probe_images(2, 104, 40, seed=7)
        scores, maps, decisions = (t.numpy() for t in traced(torch.from_numpy(pixels)))
    ref_scores, ref_maps = graph_reference(det, pixels)
    assert maps.shape == (2, 104, 40) and decisions.dtype == np.bool_ and np.array_equal(decisions, scores >= 0.0)
    report = parity(ref_scores, ref_maps, scores, maps, scale=float(np.abs(ref_scores).max()))
    assert report["ok"], report  # the tolerances of the export's own check (anomnet.exported.parity)
