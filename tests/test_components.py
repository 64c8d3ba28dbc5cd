"""The shared components: the one Gaussian blur against the former convolution blur, patch features' grid rule."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from anomnet.backbones import create_backbone
from anomnet.components import PatchFeatures, gaussian_blur, kmeans, nearest_centroid


def conv_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """The former ``transforms.gaussian_blur`` (separable convolution, reflect padding), kept as reference."""
    radius = int(4.0 * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=maps.dtype)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    out = maps[:, None]
    pad_h = min(radius, out.shape[-2] - 1)
    pad_w = min(radius, out.shape[-1] - 1)
    out = F.pad(out, (pad_w, pad_w, pad_h, pad_h), mode="reflect")
    kh = kernel[radius - pad_h : radius + pad_h + 1] if pad_h < radius else kernel
    kw = kernel[radius - pad_w : radius + pad_w + 1] if pad_w < radius else kernel
    out = F.conv2d(out, (kh / kh.sum()).view(1, 1, -1, 1))
    out = F.conv2d(out, (kw / kw.sum()).view(1, 1, 1, -1))
    return out[:, 0]


@pytest.mark.parametrize("shape,sigma", [((256, 256), 4.0), ((7, 300), 4.0), ((64, 33), 2.0), ((3, 5), 1.0)])
def test_matrix_blur_equals_the_former_convolution_blur(shape, sigma) -> None:
    maps = torch.rand(2, *shape, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(gaussian_blur(maps, sigma), conv_blur(maps, sigma), atol=1e-6)
    assert gaussian_blur(maps, 0) is maps


def test_patch_features_grid_rule() -> None:
    backbone = create_backbone("resnet18", ("layer2", "layer3"), "random")
    x = torch.rand(1, 3, 64, 64)
    finest = PatchFeatures(backbone, 3, grid_stride=0)
    assert finest(x).shape == (1, 128 + 256, 8, 8) and finest.channels == 384
    assert PatchFeatures(backbone, 3, grid_stride=16)(x).shape[-2:] == (4, 4)
    pooled = PatchFeatures(backbone, 1, 100)
    assert pooled(x).shape[1] == 100 == pooled.channels


def test_kmeans_finds_two_clusters() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(50, 2, generator=gen), torch.randn(50, 2, generator=gen) + 20])
    c = kmeans(x, 2, gen)
    assert sorted(int(v) for v in torch.bincount(nearest_centroid(x, c)[1])) == [50, 50]
