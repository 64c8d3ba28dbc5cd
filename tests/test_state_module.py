"""A detector's state is its model's state dict; model folders written by an earlier anomnet still load.

The folders in ``tests/data/old_models`` were written by the code of the commit named in each
``scores.json`` (see ``tests/old_models.py``); their scores on the fixed input were recorded then.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from tests.old_models import ROOT, fixed_input

from anomnet.data import load_dataset
from anomnet.detectors import Detector, create_detector
from anomnet.errors import ModelFormatError, NotFittedError
from anomnet.model_io import read_model, write_model

OLD = sorted(p.name for p in ROOT.iterdir() if (p / "scores.json").is_file())


@pytest.mark.parametrize("name", OLD)
def test_old_model_folder_gives_its_recorded_scores(name: str) -> None:
    record = json.loads((ROOT / name / "scores.json").read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an older format version may warn; it must load all the same
        detector = Detector.load(ROOT / name)
    pred = detector.predict(fixed_input())
    assert [float(v) for v in pred.scores] == pytest.approx(record["scores"], rel=1e-5)
    assert float(pred.maps.mean()) == pytest.approx(record["map_mean"], rel=1e-5)
    assert float(pred.maps.amax()) == pytest.approx(record["map_max"], rel=1e-5)


def test_the_saved_state_is_the_models_state_dict(folder_dataset, tmp_path) -> None:
    """Saved tensors are named as ``detector.model.state_dict()`` names them; the packaged backbone stays out."""
    split = load_dataset(folder_dataset)
    det = create_detector("patchcore", {"image_size": 64, "batch_size": 4})
    assert not det.fitted
    with pytest.raises(NotFittedError, match="not fitted"):
        det.state_tensors()
    det.fit(split.train, split.validation, progress=False)
    assert det.fitted
    saved = det.state_tensors()
    assert set(saved) == {k for k in det.model.state_dict() if not k.startswith("features.backbone.")}
    assert {"memory_bank", "bank_owner"} <= set(saved)
    det.save(tmp_path / "m")
    loaded = Detector.load(tmp_path / "m")
    assert loaded.fitted and not create_detector("patchcore").fitted
    for key, value in det.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key


def test_tensors_that_do_not_fit_the_model_are_refused(tmp_path) -> None:
    meta, tensors = read_model(ROOT / "patchcore")
    for extra in ({"nowhere.weight": torch.zeros(1)}, {"features.nowhere": torch.zeros(1)}):
        write_model(tmp_path / "m", meta, {**tensors, **extra})
        with pytest.raises(ModelFormatError, match="saved tensors do not fit the patchcore detector"):
            Detector.load(tmp_path / "m")
    write_model(tmp_path / "m", meta, {k: v for k, v in tensors.items() if k != "memory_bank"})
    with pytest.raises(ModelFormatError, match="memory_bank"):
        Detector.load(tmp_path / "m")


def test_a_tocoad_folder_with_the_older_names_loads(folder_dataset, tmp_path) -> None:
    """ToCoAD's old folders (too large to keep here: the whole fine-tuned backbone) named it ``backbone.*``."""
    split = load_dataset(folder_dataset)
    det = create_detector("tocoad", {"image_size": 64, "batch_size": 4, "stage1": False, "stage2": False})
    det.fit(split.train, split.validation, progress=False)
    det.save(tmp_path / "m")
    meta, tensors = read_model(tmp_path / "m")
    old = {k.removeprefix("features."): v for k, v in tensors.items()}
    assert len([k for k in old if k.startswith("backbone.")]) == len(det.features.backbone.state_dict())
    write_model(tmp_path / "m", meta, old)
    x = fixed_input()
    assert torch.equal(Detector.load(tmp_path / "m").predict(x).maps, det.predict(x).maps)
