"""Real-looking defects (spots, cracks, scratches) and real defect crops: masks, seeds, folders, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anomnet.errors import ConfigError
from anomnet.synthesis import RealisticDefects, load_defect_crops, synthesize_batch
from anomnet.synthesis.defect_shapes import MIN_ALPHA, crack_alpha, scratch_alpha, spot_alpha


def _image(h: int = 96, w: int = 80, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (0.3 + 0.4 * torch.rand(3, h, w, generator=g)).contiguous()


def _rng(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _save(path: Path, array: np.ndarray) -> None:
    Image.fromarray((np.clip(array, 0, 1) * 255).astype(np.uint8)).save(path)


@pytest.mark.parametrize("shape", [spot_alpha, crack_alpha, scratch_alpha])
def test_shapes_are_opacities_with_no_faint_rim(shape) -> None:
    for seed in range(6):
        alpha = shape(64, 72, (30.0, 40.0), _rng(seed))
        assert alpha.shape == (64, 72) and alpha.max() <= 1.0 and alpha.sum() > 0
        visible = alpha[alpha > 0]
        assert visible.min() >= MIN_ALPHA  # every masked pixel is visibly changed


@pytest.mark.parametrize("kind", ["spot", "crack", "scratch"])
def test_mask_is_exactly_the_changed_pixels(kind: str) -> None:
    gen = RealisticDefects(kinds=(kind,))
    for seed in range(12):
        img = _image(seed=seed)
        out, mask = gen(img, _rng(seed))
        assert out.shape == img.shape and mask.shape == img.shape[-2:]
        assert set(mask.unique().tolist()) <= {0.0, 1.0} and mask.sum() > 0
        assert out.min() >= 0 and out.max() <= 1
        changed = (out - img).abs().amax(0) > 1e-6
        assert torch.equal(out[:, ~mask.bool()], img[:, ~mask.bool()])  # nothing changes outside the mask
        assert changed[mask.bool()].float().mean() > 0.99  # and the masked pixels did change


def test_seeded_and_each_seed_differs() -> None:
    gen = RealisticDefects()
    img = _image()
    a, ma = gen(img, _rng(3))
    b, mb = gen(img, _rng(3))
    c, mc = gen(img, _rng(4))
    assert torch.equal(a, b) and torch.equal(ma, mb)
    assert not torch.equal(ma, mc)


def test_several_defects_per_image_and_batches() -> None:
    gen = RealisticDefects(kinds=("spot",), count=(3, 3), spot_size=(0.02, 0.03))
    _, mask = gen(_image(128, 128), _rng(0))
    from scipy import ndimage

    assert ndimage.label(mask.numpy())[1] >= 2  # (two may touch)
    images, masks = synthesize_batch(gen, torch.stack([_image(seed=i) for i in range(4)]), _rng(1), probability=0.5)
    assert images.shape == (4, 3, 96, 80) and masks.shape == (4, 96, 80)


def test_defects_are_centred_on_the_allowed_pixels() -> None:
    gen = RealisticDefects(kinds=("spot",), count=(2, 2), spot_size=(0.02, 0.02))
    allowed = torch.zeros(96, 80, dtype=torch.bool)
    allowed[:, :20] = True
    for seed in range(8):
        _, mask = gen.paste(_image(), _rng(seed), allowed)
        cols = mask.nonzero()[:, 1]
        assert cols.max() < 20 + 6  # a spot of radius ~2 px around a centre in the first 20 columns
    # an empty allowed mask means anywhere
    _, mask = gen.paste(_image(), _rng(0), torch.zeros(96, 80, dtype=torch.bool))
    assert mask.sum() > 0


def test_bad_settings_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="kinds"):
        RealisticDefects(kinds=("dent",))
    with pytest.raises(ConfigError, match="count"):
        RealisticDefects(count=(0, 2))
    with pytest.raises(ConfigError, match=r"\[3,H,W\]"):
        RealisticDefects().paste(torch.zeros(1, 8, 8), _rng(0))


def _crop_folder(root: Path) -> Path:
    """Two red defects on white: one with a mask file (a 4x4 square inside the crop), one without."""
    root.mkdir(parents=True)
    crop = np.ones((12, 12, 3))
    crop[4:8, 4:8] = [0.9, 0.05, 0.05]
    _save(root / "a.png", crop)
    mask = np.zeros((12, 12))
    mask[4:8, 4:8] = 1
    _save(root / "a_mask.png", mask)
    blob = np.ones((10, 14, 3))
    blob[3:7, 2:12] = [0.9, 0.05, 0.05]
    (root / "sub").mkdir()
    _save(root / "sub" / "b.png", blob)
    return root


def test_real_crop_folder_masks_from_files_or_from_the_crop(tmp_path: Path) -> None:
    crops = load_defect_crops(_crop_folder(tmp_path / "crops"))
    assert [Path(c.source).name for c in crops] == ["a.png", "b.png"]
    assert crops[0].mask.sum() == 16 and crops[0].mask[4:8, 4:8].all()  # the mask file
    assert crops[1].mask[3:7, 2:12].all() and crops[1].mask.sum() == 40  # differs from the white border


def test_real_crops_are_what_gets_pasted(tmp_path: Path) -> None:
    crops = load_defect_crops(_crop_folder(tmp_path / "crops"))
    gen = RealisticDefects(crops=crops, count=(1, 2), crop_size=(0.15, 0.3))
    img = torch.full((3, 64, 64), 0.5)
    for seed in range(6):
        out, mask = gen(img, _rng(seed))
        inside = mask.bool()
        assert inside.any() and torch.equal(out[:, ~inside], img[:, ~inside])
        red, green = out[0][inside], out[1][inside]
        assert (red > green + 0.2).float().mean() > 0.9  # the red defect, blended at 0.7-1.0


@pytest.mark.parametrize("case", ["missing", "empty", "only-masks", "not-a-folder"])
def test_unusable_crop_folders_are_named(tmp_path: Path, case: str) -> None:
    folder = tmp_path / "crops"
    if case == "empty":
        folder.mkdir()
    elif case == "only-masks":
        folder.mkdir()
        _save(folder / "x_mask.png", np.ones((4, 4)))
    elif case == "not-a-folder":
        folder.write_text("x")
    with pytest.raises(ConfigError, match=str(folder)):
        load_defect_crops(folder)


def test_an_empty_mask_file_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "crops"
    folder.mkdir()
    _save(folder / "a.png", np.ones((8, 8, 3)) * 0.2)
    _save(folder / "a_mask.png", np.zeros((8, 8)))
    with pytest.raises(ConfigError, match="a_mask.png"):
        load_defect_crops(folder)
