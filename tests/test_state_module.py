"""Model folders written by an earlier anomnet load and give the scores that anomnet gave.

The folders in ``tests/data/old_models`` were written by the code of the commit named in each
``scores.json`` (see ``tests/old_models.py``); their scores on the fixed input were recorded then.
"""

from __future__ import annotations

import json
import warnings

import pytest
from tests.old_models import ROOT, fixed_input

from anomnet.detectors import Detector

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
