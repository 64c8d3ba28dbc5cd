"""Anomaly generators: masks non-empty, in bounds, exactly where pixels changed; seeded; texture fallback."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from anomnet.errors import ConfigError
from anomnet.synthesis import CutPaste, PerlinAnomaly, load_textures, perlin_noise, random_rotation, synthesize_batch
from anomnet.synthesis.perlin import perlin_mask


def _image(h: int = 48, w: int = 48, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (0.3 + 0.4 * torch.rand(3, h, w, generator=g)).contiguous()


def _textures() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.rand(3, 40, 60, generator=g), torch.rand(3, 64, 32, generator=g)]


def _rng(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_perlin_noise_is_seeded_and_bounded() -> None:
    a = perlin_noise(37, 53, (4, 8), _rng(0), angle=30.0)
    b = perlin_noise(37, 53, (4, 8), _rng(0), angle=30.0)
    c = perlin_noise(37, 53, (4, 8), _rng(1), angle=30.0)
    assert a.shape == (37, 53) and torch.equal(a, b) and not torch.equal(a, c)
    assert a.abs().max() <= 1.5 and a.std() > 0.05


@pytest.mark.parametrize("seed", range(8))
def test_perlin_mask_is_never_empty(seed: int) -> None:
    m = perlin_mask(32, 40, _rng(seed), threshold=(0.6, 0.7))
    assert m.shape == (32, 40) and set(m.unique().tolist()) <= {0.0, 1.0}
    assert m.sum() >= 1


@pytest.mark.parametrize(
    "make",
    [lambda: PerlinAnomaly(_textures(), rotate=False), lambda: PerlinAnomaly([], rotate=False), lambda: CutPaste()],
)
def test_mask_matches_the_altered_pixels(make) -> None:
    gen = make()
    for seed in range(10):
        img = _image(seed=seed)
        out, mask = gen(img, _rng(seed))
        assert out.shape == img.shape and mask.shape == img.shape[-2:]
        assert set(mask.unique().tolist()) <= {0.0, 1.0} and mask.sum() > 0
        assert out.min() >= 0 and out.max() <= 1
        inside, outside = mask.bool(), ~mask.bool()
        diff = (out - img).abs().amax(0)
        assert torch.equal(out[:, outside], img[:, outside])  # nothing changes outside the mask
        assert (diff[inside] > 1e-4).float().mean() > 0.9  # (nearly) every masked pixel changed


def test_cutpaste_mask_is_one_rectangle() -> None:
    _, mask = CutPaste()(_image(), _rng(3))
    rows, cols = mask.any(1).nonzero()[:, 0], mask.any(0).nonzero()[:, 0]
    box = mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    assert box.all() and box.sum() == mask.sum()


@pytest.mark.parametrize("make", [lambda: PerlinAnomaly(_textures(), rotate=True), lambda: CutPaste(rotate=True)])
def test_generators_are_seeded(make) -> None:
    gen, img = make(), _image()
    a, ma = gen(img, _rng(5))
    b, mb = gen(img, _rng(5))
    c, mc = gen(img, _rng(6))
    assert torch.equal(a, b) and torch.equal(ma, mb)
    assert not torch.equal(ma, mc)


def test_rotation_then_defect() -> None:
    gen, img = PerlinAnomaly(_textures(), rotate=True, max_angle=5.0), _image()
    out, mask = gen(img, _rng(2))
    rng = _rng(2)
    base = gen.normal(img, rng)  # the same draws: first the turn, then the defect
    assert not torch.allclose(base, img)
    assert torch.equal(out[:, mask == 0], base[:, mask == 0])


def test_random_rotation_quarter_turns_are_exact() -> None:
    img = _image(16, 16)
    turned = random_rotation(img, _rng(0), max_angle=0.0)
    assert any(torch.equal(turned, torch.rot90(img, k, (1, 2))) for k in range(4))
    wide = _image(16, 24)
    assert random_rotation(wide, _rng(1), max_angle=8.0).shape == wide.shape


def test_synthesize_batch_probability() -> None:
    gen, imgs = CutPaste(), torch.stack([_image(seed=i) for i in range(4)])
    _, m0 = synthesize_batch(gen, imgs, _rng(0), 0.0)
    x1, m1 = synthesize_batch(gen, imgs, _rng(0), 1.0)
    assert m0.sum() == 0 and all(m.sum() > 0 for m in m1) and x1.shape == imgs.shape


def test_textures_fall_back_to_builtin_photos_without_dtd(tmp_path, monkeypatch) -> None:
    pytest.importorskip("skimage")
    monkeypatch.delenv("ANOMNET_TEXTURE_DIR", raising=False)  # as on a fresh machine: no texture folder set
    tex = load_textures(size=32)
    assert len(tex) >= 3 and all(t.shape[0] == 3 and min(t.shape[-2:]) <= 32 for t in tex)
    out, mask = PerlinAnomaly(tex)(_image(), _rng(0))
    assert mask.sum() > 0


def test_textures_from_a_user_folder(tmp_path) -> None:
    folder = tmp_path / "tex"
    folder.mkdir()
    for i in range(3):
        Image.fromarray((np.random.default_rng(i).random((20, 30, 3)) * 255).astype(np.uint8)).save(
            folder / f"t{i}.png"
        )
    with_builtin = load_textures(folder, size=64)
    assert len(with_builtin) >= 3 and tuple(with_builtin[0].shape) == (3, 20, 30)
    with pytest.raises(ConfigError, match="missing"):
        load_textures(tmp_path / "missing")
