"""Geometric preprocessing shared by every detector.

A detector sees images resized to ``image_size`` (and optionally centre-cropped to ``crop``);
its anomaly map is mapped back to the caller's resolution with :meth:`Preprocess.restore`.
The same functions serve training, prediction and export, so the paths cannot drift apart.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from anomnet.errors import ConfigError


def resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear, antialiased resize of ``[B,C,H,W]`` float images (no-op when already ``size``)."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    return F.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False)


def upsample_maps(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of ``[B,H,W]`` maps to ``size`` (no antialiasing: maps are upsampled)."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


@dataclass(frozen=True)
class Preprocess:
    """Resize to ``image_size`` (square), then optionally centre-crop to ``crop``."""

    image_size: int = 256
    crop: int | None = None

    def __post_init__(self) -> None:
        if self.image_size < 32:
            raise ConfigError(f"image_size must be at least 32, got {self.image_size}")
        if self.crop is not None and not 32 <= self.crop <= self.image_size:
            raise ConfigError(f"crop must be between 32 and image_size={self.image_size}, got {self.crop}")

    @property
    def output_size(self) -> int:
        """Side of the square the detector's network sees."""
        return self.crop or self.image_size

    def _crop_box(self) -> tuple[int, int]:
        top = (self.image_size - self.output_size) // 2
        return top, top + self.output_size

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """``[B,3,H,W]`` in [0,1] -> ``[B,3,S,S]`` with ``S = output_size``."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ConfigError(f"expected images of shape [B,3,H,W], got {tuple(images.shape)}")
        out = resize(images.float(), (self.image_size, self.image_size))
        if self.crop:
            a, b = self._crop_box()
            out = out[:, :, a:b, a:b]
        return out.contiguous()

    def restore(self, maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Map ``[B,S,S]`` maps back onto images of ``size`` (H, W).

        With a crop, the border the network never saw takes the edge values of the map
        (replicate padding), so it neither hides nor invents defects there.
        """
        if self.crop:
            a, b = self._crop_box()
            maps = F.pad(maps[:, None], (a, self.image_size - b, a, self.image_size - b), mode="replicate")[:, 0]
        return upsample_maps(maps, size)


def feature_grid_size(image_size: int, stride: int) -> int:
    """Spatial side of a feature map with 'same' padding at ``stride``."""
    return math.ceil(image_size / stride)
