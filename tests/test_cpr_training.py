"""CPR's training settings: the head's widths, the negative shift, the reference code's augmentations."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from anomnet import api
from anomnet.detectors import Detector, create_detector
from anomnet.detectors.cpr import CPR
from anomnet.detectors.cpr.augment import lightness, reference_augment, salt_and_pepper, scale_lightness
from anomnet.detectors.cpr.head import RetrievalHead
from anomnet.errors import ConfigError

SMALL = {"image_size": 64, "batch_size": 4, "train_batch_size": 2, "steps": 2, "train_crop": 32, "points": 20}


# -- the head's widths ----------------------------------------------------------------------
def test_head_widths_follow_the_reference_layout() -> None:
    head = RetrievalHead([24, 40], width=192, dim=384, block=256)
    level = head.levels[0]
    assert level.inp.conv.weight.shape == (192, 24, 1, 1)
    first, three, third, pool = level.block.branches
    assert first.conv.weight.shape == (64, 192, 1, 1) and third.conv.weight.shape == (64, 192, 1, 1)
    assert three[0].conv.weight.shape == (48, 192, 1, 1) and three[1].conv.weight.shape == (64, 48, 3, 3)
    assert pool.conv.weight.shape == (64, 192, 1, 1)
    assert level.out.weight.shape == (384, 256, 1, 1)
    levels = [torch.randn(2, 24, 8, 8), torch.randn(2, 40, 4, 4)]
    head.train()
    head(levels)
    head.eval()
    for a, b in zip(head(levels), head.fused()(levels)):
        assert a.shape[1] == 384 and torch.allclose(a, b, atol=1e-5)


def test_head_block_zero_is_the_head_width() -> None:
    a, b = RetrievalHead([8], width=16, dim=8), RetrievalHead([8], width=16, dim=8, block=16)
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}


def test_head_block_reaches_the_fitted_model_and_survives_save_load(folder_dataset: Path, tmp_path: Path) -> None:
    settings = {**SMALL, "head_width": 16, "head_block": 24, "head_dim": 12}
    det = api.fit("cpr", folder_dataset, tmp_path / "m", settings=settings, progress=False)
    assert isinstance(det, CPR)
    assert det.model.head.levels[0].out.weight.shape == (12, 24, 1, 1)
    loaded = Detector.load(tmp_path / "m")
    assert isinstance(loaded, CPR) and loaded.config.head_block == 24
    images = torch.rand(2, 3, 64, 64)
    assert torch.equal(det.predict(images).maps, loaded.predict(images).maps)


def test_bad_head_block_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="head_block"):
        create_detector("cpr", {"head_block": 30})
    with pytest.raises(ConfigError, match="head_block"):
        create_detector("cpr", {"head_block": -4})


# -- the negative shift ---------------------------------------------------------------------
def test_negative_shift_outside_the_window_or_the_reference_codes() -> None:
    ours = create_detector("cpr", {"layers": "stage2,stage3", "windows": "3,1"})
    ref = create_detector("cpr", {"layers": "stage2,stage3", "windows": "3,1", "negative_shift": "window"})
    assert isinstance(ours, CPR) and isinstance(ref, CPR)
    # stride 4 at the finest level, window 3: the reference code's 4 x 1 x sqrt 2, ours twice that
    assert ref.negative_shift() == pytest.approx(4 * 2**0.5)
    assert ours.negative_shift() == pytest.approx(8 * 2**0.5)
    with pytest.raises(ConfigError, match="negative_shift"):
        create_detector("cpr", {"negative_shift": "far"})


# -- the reference code's augmentations -----------------------------------------------------
def test_salt_and_pepper_whitens_or_blackens_a_few_whole_pixels() -> None:
    images = torch.full((64, 3, 32, 32), 0.5)
    out = salt_and_pepper(images, torch.Generator().manual_seed(0))
    changed = (out != images).any(1)  # [B, H, W]
    per_image = changed.flatten(1).float().mean(1)
    assert (per_image <= 0.03 + 1e-6).all()
    hit = per_image > 0
    assert 5 <= int(hit.sum()) <= 35  # about 30 % of the 64 images
    values = out.permute(0, 2, 3, 1)[changed]  # [n, 3]: every changed pixel is white or black on all channels
    assert ((values == 1).all(1) | (values == 0).all(1)).all()
    assert torch.equal(images, torch.full((64, 3, 32, 32), 0.5))  # the input is not modified


def test_scale_lightness_keeps_hue_and_saturation() -> None:
    import colorsys

    rgb = torch.tensor([0.8, 0.3, 0.1]).view(1, 3, 1, 1)
    out = scale_lightness(rgb, torch.tensor([1.1]))
    h0, l0, s0 = colorsys.rgb_to_hls(*rgb.flatten().tolist())
    h1, l1, s1 = colorsys.rgb_to_hls(*out.flatten().tolist())
    assert l1 == pytest.approx(l0 * 1.1, abs=1e-6)
    assert h1 == pytest.approx(h0, abs=1e-6) and s1 == pytest.approx(s0, abs=1e-6)
    images = torch.rand(4, 3, 8, 8)
    assert torch.allclose(scale_lightness(images, torch.ones(4)), images, atol=1e-6)  # factor 1: unchanged
    grey = torch.full((1, 3, 2, 2), 0.95)
    assert torch.allclose(scale_lightness(grey, torch.tensor([1.1])), torch.ones(1, 3, 2, 2))  # clipped at white


def test_lightness_changes_about_a_third_of_the_images_by_at_most_ten_percent() -> None:
    images = torch.rand(90, 3, 8, 8) * 0.5 + 0.25
    out = lightness(images, torch.Generator().manual_seed(1))
    changed = (out - images).abs().flatten(1).amax(1) > 1e-5
    assert 15 <= int(changed.sum()) <= 45
    light = lambda x: (x.amax(1) + x.amin(1)) / 2  # noqa: E731
    ratio = (light(out) / light(images)).flatten(1)
    assert ((ratio - 1).abs() <= 0.1 + 1e-5).all()
    assert torch.allclose(ratio.amin(1), ratio.amax(1), atol=1e-4)  # one factor per image


def test_augment_reaches_the_training_pairs(folder_dataset: Path) -> None:
    def pairs(augment: bool) -> tuple[torch.Tensor, torch.Tensor]:
        det = create_detector("cpr", {**SMALL, "augment": augment, "anomaly_prob": 0.0, "train_batch_size": 16})
        assert isinstance(det, CPR)
        images = (torch.rand(6, 3, 32, 32) * 100 + 80).to(torch.uint8)  # no pure white / black pixels
        neighbours = torch.tensor([[1], [0], [3], [2], [5], [4]])
        gen = torch.Generator().manual_seed(0)
        query, reference, _, _ = det._pairs(images, neighbours, det._defect_generator(), gen, 32, False)
        return query, reference

    plain_q, plain_r = pairs(False)
    assert not ((plain_q == 0) | (plain_q == 1)).any()
    query, reference = pairs(True)
    for out in (query, reference):  # salt and pepper (and lightness) on some of the 16 pairs, not all
        noisy = ((out == 0) | (out == 1)).flatten(1).any(1)
        assert 0 < int(noisy.sum()) < 16
    assert reference_augment(torch.rand(2, 3, 4, 4), torch.Generator()).shape == (2, 3, 4, 4)
