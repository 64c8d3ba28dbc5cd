"""Conformal thresholds, model folders and settings parsing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from anomnet.decisions.calibration import Calibration, calibrate
from anomnet.detectors.base import DetectorConfig
from anomnet.errors import ConfigError, ModelFormatError
from anomnet.model_io import META_FILE, TENSOR_FILE, read_model, write_model


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 200), alpha=st.floats(0.001, 0.5), seed=st.integers(0, 1000))
def test_conformal_threshold_false_alarm_rate(n: int, alpha: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    val = rng.normal(size=n)
    cal = calibrate(val, alpha)
    # exchangeable new good scores: expected false-alarm rate <= max(alpha, 1/(n+1))
    flagged_val = cal.decide(val).sum()
    k = int(np.floor(alpha * (n + 1) + 1e-9)) - 1
    assert flagged_val == max(k, 0)
    assert cal.achieved_false_alarm <= max(alpha, 1 / (n + 1)) + 1e-12
    # p-value rule and threshold rule agree
    probe = rng.normal(size=500)
    p = cal.p_values(probe)
    assert np.array_equal(cal.decide(probe), p <= cal.achieved_false_alarm + 1e-12)


def test_conformal_false_alarm_rate_on_fresh_good_scores() -> None:
    rng = np.random.default_rng(0)
    rates = []
    for _ in range(400):
        cal = calibrate(rng.normal(size=99), 0.05)
        rates.append(cal.decide(rng.normal(size=200)).mean())
    assert abs(np.mean(rates) - 0.05) < 0.01


def test_too_few_validation_images_are_reported() -> None:
    cal = calibrate(np.array([1.0, 2.0, 3.0]), 0.01)
    assert cal.achieved_false_alarm == pytest.approx(0.25)
    assert "1/4" in cal.note
    assert cal.decide(np.array([3.0, 3.0001]))[1] and not cal.decide(np.array([3.0]))[0]
    assert calibrate(np.array([]), 0.01).decide(np.array([1e9])).sum() == 0
    with pytest.raises(ConfigError):
        calibrate(np.array([1.0]), 1.5)


def test_calibration_round_trip() -> None:
    cal = calibrate(np.array([0.1, 0.5, 0.2]), 0.3, map_values=np.array([0.0, 1.0, 2.0]))
    assert Calibration.from_dict(json.loads(json.dumps(cal.to_dict()))) == cal
    assert cal.map_low == 1.0 and cal.map_high == 2.0


def test_model_folder_round_trip_and_errors(tmp_path) -> None:
    t = {"a": torch.randn(3, 4), "b": torch.arange(5)}
    write_model(tmp_path / "m", {"detector": "x"}, t)
    meta, back = read_model(tmp_path / "m")
    assert meta["detector"] == "x" and torch.equal(back["a"], t["a"]) and torch.equal(back["b"], t["b"])

    with pytest.raises(ModelFormatError, match="no such model folder"):
        read_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFormatError, match="missing"):
        read_model(tmp_path / "empty")

    meta_path = tmp_path / "m" / META_FILE
    data = json.loads(meta_path.read_text())
    data["format_version"] = 99
    meta_path.write_text(json.dumps(data))
    with pytest.raises(ModelFormatError, match="format version 99"):
        read_model(tmp_path / "m")

    meta_path.write_text("{not json")
    with pytest.raises(ModelFormatError, match="unreadable"):
        read_model(tmp_path / "m")

    write_model(tmp_path / "m2", {}, t)
    (tmp_path / "m2" / TENSOR_FILE).write_bytes(b"\x00" * 10)
    with pytest.raises(ModelFormatError, match="damaged"):
        read_model(tmp_path / "m2")


def test_model_file_cannot_smuggle_pickles(tmp_path) -> None:
    """A torch pickle renamed to the tensor file is refused, never unpickled."""
    write_model(tmp_path / "m", {}, {"a": torch.zeros(1)})
    torch.save({"a": torch.zeros(1)}, tmp_path / "m" / TENSOR_FILE)
    with pytest.raises(ModelFormatError):
        read_model(tmp_path / "m")


def test_settings_are_coerced_from_strings() -> None:
    from dataclasses import dataclass

    @dataclass
    class C(DetectorConfig):
        ratio: float = 0.1
        layers: tuple[str, ...] | None = None
        flag: bool = False

    c = C.from_dict({"ratio": "0.5", "layers": "a, b", "flag": "yes", "crop": "none", "image_size": "224"})
    assert c.ratio == 0.5 and c.layers == ("a", "b") and c.flag is True and c.crop is None and c.image_size == 224
    assert C.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    with pytest.raises(ConfigError, match="unknown setting"):
        C.from_dict({"nope": 1})
    with pytest.raises(ConfigError, match="not a valid int"):
        C.from_dict({"image_size": "big"})
