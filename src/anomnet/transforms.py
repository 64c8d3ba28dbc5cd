"""Geometric preprocessing shared by every detector.

A detector sees images resized to ``image_size`` (and optionally centre-cropped to ``crop``);
its anomaly map is mapped back to the caller's resolution with :meth:`Preprocess.restore`.
The same functions serve training, prediction and export, so the paths cannot drift apart.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from anomnet.errors import ConfigError, NotFittedError


def resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear, antialiased resize of ``[B,C,H,W]`` float images (no-op when already ``size``).

    Working memory stays within the input plus the output plus one pass's result: torch's
    antialiased kernel resizes the width first and holds an ``H x out_W`` intermediate, which
    for a tall strip (width grown, height shrunk: 2,000,000 x 1 pixels to 256 x 256 took 6 GB)
    dwarfs both; such images get their height resized first, in a pass of its own (the same
    result up to float rounding, since the kernel is separable).
    """
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    height, width = int(images.shape[-2]), int(images.shape[-1])
    out_h, out_w = int(size[0]), int(size[1])
    if height * out_w > max(height * width, out_h * out_w) and out_h * width < height * out_w:
        images = F.interpolate(images, size=(out_h, width), mode="bilinear", antialias=True, align_corners=False)
    return F.interpolate(images, size=(out_h, out_w), mode="bilinear", antialias=True, align_corners=False)


def upsample_maps(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of ``[B,H,W]`` maps to ``size`` (no antialiasing: maps are upsampled)."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def rotate(images: torch.Tensor, degrees: float) -> torch.Tensor:
    """``[B,C,H,W]`` turned counter-clockwise about the centre; multiples of 90 degrees exactly
    (square images), other angles bilinearly with the corners filled by reflection."""
    turns = degrees / 90.0
    if turns == round(turns) and images.shape[-1] == images.shape[-2]:
        return torch.rot90(images, int(round(turns)) % 4, dims=(-2, -1))
    a = math.radians(degrees)
    cos, sin = math.cos(a), math.sin(a)
    theta = torch.tensor([[cos, sin, 0.0], [-sin, cos, 0.0]], dtype=images.dtype, device=images.device)
    grid = F.affine_grid(theta.expand(images.shape[0], 2, 3), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def rotation_angles(count: int) -> tuple[float, ...]:
    """The ``count`` poses of the rotation augmentation: ``360 k / count`` degrees, 0 first."""
    return tuple(360.0 * k / count for k in range(count))


Aspect = Literal["auto", "stretch", "pad"]
"""How a non-square image becomes the square the network sees: ``"stretch"``, ``"pad"`` (see
:class:`Preprocess`), or ``"auto"``: one of the two, chosen at fit from the training images' sides
(:func:`choose_aspect`) and saved with the model in its place."""
ASPECTS: tuple[Aspect, ...] = ("auto", "stretch", "pad")
PAD_RATIO = 1.5
"""``aspect="auto"`` pads when the median long/short side ratio of the training images is above this
(measured: docs/design.md, BENCHMARKS.md section ``aspect``)."""
MIN_IMAGE_SIZE = 32
"""The least ``image_size`` and ``crop`` (also the lower bound of :class:`~anomnet.detectors.base.DetectorConfig`)."""


@dataclass(frozen=True)
class Preprocess:
    """Resize to ``image_size`` (square), then optionally centre-crop to ``crop``.

    ``aspect="stretch"`` resizes every image to the square (a non-square image is stretched);
    ``"pad"`` keeps its aspect ratio: the longer side becomes ``image_size`` and the shorter one
    is filled to the square by mirroring the image, so texture is not stretched differently per
    image. :meth:`restore` drops the filled band again. ``"auto"`` is a setting not yet decided
    (a detector's fit turns it into one of the two): such a Preprocess refuses to run.
    """

    image_size: int = 256
    crop: int | None = None
    aspect: Aspect = "stretch"

    def __post_init__(self) -> None:
        if self.image_size < MIN_IMAGE_SIZE:
            raise ConfigError(f"image_size must be at least {MIN_IMAGE_SIZE}, got {self.image_size}")
        if self.crop is not None and not MIN_IMAGE_SIZE <= self.crop <= self.image_size:
            raise ConfigError(
                f"crop must be between {MIN_IMAGE_SIZE} and image_size={self.image_size}, got {self.crop}"
            )
        if self.aspect not in ASPECTS:
            raise ConfigError(f"aspect must be one of {', '.join(ASPECTS)}, got {self.aspect!r}")

    def check_resolved(self) -> None:
        """Raise NotFittedError while ``aspect`` is ``"auto"``: only a fit decides it (never a guess)."""
        if self.aspect == "auto":
            raise NotFittedError(
                "aspect=auto is decided by fit from the training images' sides: fit the detector first "
                "(or set aspect=stretch or aspect=pad)"
            )

    @property
    def output_size(self) -> int:
        """Side of the square the detector's network sees."""
        return self.crop or self.image_size

    def _crop_box(self) -> tuple[int, int]:
        top = (self.image_size - self.output_size) // 2
        return top, top + self.output_size

    def _content_box(self, size: tuple[int, int]) -> tuple[int, int, int, int]:
        """Top, left, height, width of the image inside the ``image_size`` square."""
        self.check_resolved()
        s = self.image_size
        if self.aspect == "stretch":
            return 0, 0, s, s
        h, w = size
        scale = s / max(h, w)
        ch, cw = max(1, min(s, round(h * scale))), max(1, min(s, round(w * scale)))
        return (s - ch) // 2, (s - cw) // 2, ch, cw

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """``[B,3,H,W]`` in [0,1] -> ``[B,3,S,S]`` with ``S = output_size``."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ConfigError(f"expected images of shape [B,3,H,W], got {tuple(images.shape)}")
        top, left, ch, cw = self._content_box((int(images.shape[-2]), int(images.shape[-1])))
        out = resize(images.float(), (ch, cw))
        if (ch, cw) != (self.image_size, self.image_size):
            out = _mirror_pad(out, top, self.image_size - ch - top, left, self.image_size - cw - left)
        if self.crop:
            a, b = self._crop_box()
            out = out[:, :, a:b, a:b]
        return out.contiguous()

    def restore(self, maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Map ``[B,S,S]`` maps back onto images of ``size`` (H, W).

        With a crop, the border the network never saw takes the edge values of the map
        (replicate padding), so it neither hides nor invents defects there. With
        ``aspect="pad"`` the mirrored band is cut off first.
        """
        if self.crop:
            a, b = self._crop_box()
            maps = F.pad(maps[:, None], (a, self.image_size - b, a, self.image_size - b), mode="replicate")[:, 0]
        top, left, ch, cw = self._content_box(size)
        if (ch, cw) != (self.image_size, self.image_size):
            maps = maps[:, top : top + ch, left : left + cw]
        return upsample_maps(maps, size)


def choose_aspect(sizes: Sequence[tuple[int, int]]) -> tuple[Literal["stretch", "pad"], str]:
    """What ``aspect="auto"`` becomes for training images of ``sizes`` (H, W), and why, in words.

    ``"pad"`` when the median long/short side ratio is above :data:`PAD_RATIO` (a square resize
    would squeeze the long side: KolektorSDD's 500 x 1250 images), else ``"stretch"`` (square
    images, and ones close enough that padding measured no better: crops of varied shape).
    """
    if not sizes:
        raise ConfigError("aspect=auto needs at least one training image to decide on")
    ratio = statistics.median(max(h, w) / max(1, min(h, w)) for h, w in sizes)
    aspect: Literal["stretch", "pad"] = "pad" if ratio > PAD_RATIO else "stretch"
    distinct = set(sizes)
    if len(distinct) == 1:
        h, w = next(iter(distinct))
        what = f"training images {w}x{h}: long/short side {ratio:.2f}"
    else:
        what = f"{len(sizes)} training images of {len(distinct)} sizes: median long/short side {ratio:.2f}"
    return aspect, f"{aspect} ({what} {'>' if aspect == 'pad' else '<='} {PAD_RATIO})"


def _mirror_pad(x: torch.Tensor, top: int, bottom: int, left: int, right: int) -> torch.Tensor:
    """Fill to the padded size by mirroring (repeatedly where the pad is wider than the image)."""
    while top or bottom or left or right:
        h, w = int(x.shape[-2]), int(x.shape[-1])
        t, b = min(top, h - 1), min(bottom, h - 1)
        lft, r = min(left, w - 1), min(right, w - 1)
        if not (t or b or lft or r):  # a 1-pixel side cannot be mirrored: repeat it
            return F.pad(x, (left, right, top, bottom), mode="replicate")
        x = F.pad(x, (lft, r, t, b), mode="reflect")
        top, bottom, left, right = top - t, bottom - b, left - lft, right - r
    return x
