"""ToCoAD's fit record says how far each stage moved the backbone: relative weight change and feature cosine."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from anomnet import api
from anomnet.detectors import Detector
from anomnet.training import parameter_snapshot, weight_change

SMALL = {
    "image_size": 64,
    "batch_size": 4,
    "train_batch_size": 4,
    "stage1_steps": 3,
    "stage2_steps": 4,
    "stage2": True,  # both stages (the default trains neither)
}


def test_weight_change_hand_computed() -> None:
    net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[3.0, 0.0], [0.0, 4.0]]))  # norm 5
        net[0].bias.zero_()  # all zero: no relative change of its own
        net[1].weight.copy_(torch.tensor([[1.0, 0.0]]))  # norm 1
    before = parameter_snapshot(net)
    with torch.no_grad():
        net[0].weight[0, 0] += 0.3  # 0.3 / 5 = 0.06
        net[0].bias[1] = 0.4
        net[1].weight[0, 1] = 0.2  # 0.2 / 1 = 0.2: the largest own relative change
    change = weight_change(before, net)
    assert change["relative"] == pytest.approx(math.sqrt(0.3**2 + 0.4**2 + 0.2**2) / math.sqrt(26.0))
    assert change["largest_tensor"] == "1.weight" and change["largest_relative"] == pytest.approx(0.2)
    assert weight_change(parameter_snapshot(net), net)["relative"] == 0.0


def test_fit_record_logs_backbone_change_per_stage(folder_dataset, tmp_path) -> None:
    det = api.fit("tocoad", folder_dataset, tmp_path / "m", settings=SMALL, progress=False)
    stage1, stage2 = det.fit_record.phase("stage1"), det.fit_record.phase("stage2")
    assert stage1 is not None and stage2 is not None
    # stage I trains the discriminator only: the backbone and its bank-level features stay exactly as they were
    assert stage1.extra["backbone_change"]["relative"] == 0.0
    assert set(stage1.extra["feature_cosine"]) == {"stage3", "stage4"}
    assert all(v == pytest.approx(1.0, abs=1e-6) for v in stage1.extra["feature_cosine"].values())
    # stage II fine-tunes it: a small, non-zero move, named by the parameter that moved most
    change = stage2.extra["backbone_change"]
    params = dict(det.features.backbone.named_parameters())
    assert 0.0 < change["relative"] < 1.0 and change["largest_relative"] >= change["relative"]
    assert change["largest_tensor"] in params
    cosines = stage2.extra["feature_cosine"]
    assert set(cosines) == {"stage3", "stage4"} and all(-1.0 <= v < 1.0 for v in cosines.values())
    # saved with the model (anomnet.json) and read back
    saved = json.loads((tmp_path / "m" / "anomnet.json").read_text())
    assert "backbone_change" in json.dumps(saved)
    loaded = Detector.load(tmp_path / "m").fit_record.phase("stage2")
    assert loaded is not None and loaded.extra["backbone_change"] == change
    assert loaded.extra["feature_cosine"] == cosines
