"""Preprocessing and map restoration."""

from __future__ import annotations

import pytest
import torch

from anomnet.components.blur import gaussian_blur
from anomnet.detectors.base import DetectorConfig
from anomnet.errors import ConfigError
from anomnet.transforms import MIN_IMAGE_SIZE, Preprocess, resize


def test_resize_and_crop_shapes() -> None:
    x = torch.rand(2, 3, 300, 200)
    assert Preprocess(256)(x).shape == (2, 3, 256, 256)
    assert Preprocess(256, 224)(x).shape == (2, 3, 224, 224)
    assert resize(x, (300, 200)) is x
    with pytest.raises(ConfigError):
        Preprocess(256, 300)
    with pytest.raises(ConfigError):
        Preprocess(256)(torch.rand(2, 1, 30, 30))


@pytest.mark.parametrize("name", ["image_size", "crop"])
def test_the_settings_refuse_every_size_the_preprocessing_cannot_take(name: str) -> None:
    with pytest.raises(ConfigError, match=rf"setting {name}={MIN_IMAGE_SIZE - 1} is out of range \[{MIN_IMAGE_SIZE}, "):
        DetectorConfig(**{name: MIN_IMAGE_SIZE - 1})
    with pytest.raises(ConfigError, match=f"must be .*{MIN_IMAGE_SIZE}"):
        Preprocess(MIN_IMAGE_SIZE - 1) if name == "image_size" else Preprocess(64, MIN_IMAGE_SIZE - 1)
    config = DetectorConfig(image_size=MIN_IMAGE_SIZE, crop=MIN_IMAGE_SIZE)  # the least size both take
    assert Preprocess(config.image_size, config.crop)(torch.rand(1, 3, 40, 50)).shape == (1, 3, 32, 32)


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


def test_rotate_quarter_turns_are_exact_and_other_angles_keep_the_size() -> None:
    from anomnet.transforms import rotate, rotation_angles

    x = torch.rand(2, 3, 8, 8)
    assert torch.equal(rotate(x, 90.0), torch.rot90(x, 1, dims=(-2, -1)))
    assert torch.equal(rotate(x, 360.0), x)
    y = rotate(x, 45.0)
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert rotation_angles(4) == (0.0, 90.0, 180.0, 270.0)


def test_train_rotations_multiply_the_training_inputs(folder_dataset) -> None:
    from anomnet.data import load_dataset
    from anomnet.detectors import create_detector

    split = load_dataset(folder_dataset)
    det = create_detector("patchcore", {"image_size": 64, "train_rotations": 4})
    batches = list(det.training_batches(split.train[:3]))
    assert sum(b.shape[0] for b in batches) == det.training_count(split.train[:3]) == 12
    assert torch.equal(batches[1], torch.rot90(batches[0], 1, dims=(-2, -1)))
    assert sum(b.shape[0] for b in det.training_batches(split.train[:3], augment=False)) == 3


def test_aspect_pad_keeps_the_shape_and_restores_onto_the_image_only() -> None:
    pre = Preprocess(64, aspect="pad")
    x = torch.rand(1, 3, 40, 80)  # 1:2 -> 32 x 64 inside the square, 16 rows mirrored above and below
    out = pre(x)
    assert out.shape == (1, 3, 64, 64)
    assert torch.allclose(out[:, :, 16:48], resize(x, (32, 64)))
    assert torch.allclose(out[:, :, 15], out[:, :, 17])  # mirrored about the first image row
    maps = torch.zeros(1, 64, 64)
    maps[:, 16:48] = 1.0  # the image band; the mirrored band must not reach the restored map
    assert torch.allclose(pre.restore(maps, (40, 80)), torch.ones(1, 40, 80))
    assert Preprocess(64, aspect="pad")(torch.rand(1, 3, 2, 90)).shape == (1, 3, 64, 64)  # pad wider than the image
    with pytest.raises(ConfigError):
        Preprocess(64, aspect="squash")  # type: ignore[arg-type]
