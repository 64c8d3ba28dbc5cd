"""Preprocessing and map restoration."""

from __future__ import annotations

import pytest
import torch

from anomnet.components.blur import gaussian_blur
from anomnet.errors import ConfigError
from anomnet.transforms import Preprocess, resize


def test_resize_and_crop_shapes() -> None:
    x = torch.rand(2, 3, 300, 200)
    assert Preprocess(256)(x).shape == (2, 3, 256, 256)
    assert Preprocess(256, 224)(x).shape == (2, 3, 224, 224)
    assert resize(x, (300, 200)) is x
    with pytest.raises(ConfigError):
        Preprocess(256, 300)
    with pytest.raises(ConfigError):
        Preprocess(256)(torch.rand(2, 1, 30, 30))


def test_restore_returns_input_resolution_and_keeps_constants() -> None:
    p = Preprocess(256, 224)
    m = torch.full((1, 224, 224), 3.0)
    out = p.restore(m, (900, 700))
    assert out.shape == (1, 900, 700)
    assert torch.allclose(out, torch.tensor(3.0))


def test_restore_places_the_crop_in_the_middle() -> None:
    p = Preprocess(256, 128)
    m = torch.zeros(1, 128, 128)
    m[0, 64, 64] = 1.0
    out = p.restore(m, (256, 256))
    assert out[0].argmax() == 128 * 256 + 128


def test_gaussian_blur_preserves_mass_and_constants() -> None:
    m = torch.zeros(1, 64, 64)
    m[0, 32, 32] = 1.0
    b = gaussian_blur(m, 4.0)
    assert torch.isclose(b.sum(), torch.tensor(1.0), atol=1e-4)
    assert b[0].argmax() == 32 * 64 + 32
    c = torch.full((2, 10, 12), 5.0)
    assert torch.allclose(gaussian_blur(c, 4.0), c)
    assert gaussian_blur(m, 0) is m
