"""The teacher: backbone features on the PDN's output grid, and their distillation into a PDN (cached).

EfficientAD distils a WideResNet-101 into the PDN on ImageNet. Offline we distil our default
backbone instead: PatchCore-style locally aware features of EfficientNet-Lite0 (stage3 + stage4,
3x3 average, concatenated: 120 channels) computed on the image upscaled 2x, so that their stride-8
grid is the PDN's stride-4 grid; a fixed orthonormal map (seeded) lifts them to 384 channels without
changing any distance. The PDN learns them on random crops of the training images and of a
generic image pool (:func:`anomnet.image_pool.generic_images`).

The distilled weights are cached (``~/.cache/anomnet/efficientad`` or a folder given by the
user) under a key made of every input of the distillation; a saved detector holds the teacher
weights itself, so prediction never needs the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save
from torch import nn

from anomnet.backbones import build_backbone
from anomnet.components.features import PatchFeatures
from anomnet.detectors.efficientad.pdn import map_padding, output_size, pdn
from anomnet.durable import write_file
from anomnet.training import FitRecord, timed_phase, train_phase

CACHE_ENV = "ANOMNET_CACHE_DIR"


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "anomnet")) / "efficientad"


def orthonormal_projection(in_channels: int, out_channels: int, seed: int) -> torch.Tensor:
    """``[out, in]`` matrix with orthonormal columns (distance preserving) when ``in <= out``;
    a Gaussian random projection scaled by ``1/sqrt(out)`` otherwise."""
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(out_channels, in_channels, generator=g, dtype=torch.float64)
    if in_channels <= out_channels:
        q, r = torch.linalg.qr(m)
        return (q * torch.sign(torch.diagonal(r))).float()
    return (m / out_channels**0.5).float()


class BackboneTeacher(nn.Module):
    """Images ``[B,3,S,S]`` -> backbone features ``[B,out_channels,n,n]`` on the PDN's ``n x n`` output grid."""

    projection: torch.Tensor

    def __init__(
        self,
        backbone: str,
        layers: Sequence[str] | None,
        out_channels: int,
        padding: bool,
        seed: int,
        search: bool = False,
    ) -> None:
        super().__init__()
        # a file-backed backbone reads the weights folder only with ``search`` (fit); else it waits for saved tensors
        self.features = PatchFeatures(build_backbone(backbone, layers, None, search=search), 3, None).eval()
        self.padding = padding
        channels = self.features.channels
        self.register_buffer("projection", orthonormal_projection(channels, out_channels, seed))

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        s = images.shape[-1]
        n = output_size(s, self.padding)
        before, _ = map_padding(s, self.padding)
        big = F.interpolate(images.float(), scale_factor=2.0, mode="bilinear", align_corners=False)
        f = self.features(big)
        if f.shape[-1] != s // 4:
            f = F.interpolate(f, size=(s // 4, s // 4), mode="bilinear", align_corners=False)
        f = f[..., before : before + n, before : before + n]
        return torch.einsum("oc,bchw->bohw", self.projection, f).contiguous()


@dataclass(frozen=True)
class DistillSettings:
    model_size: str
    padding: bool
    out_channels: int
    backbone: str
    layers: tuple[str, ...] | None
    steps: int
    batch: int
    crop: int
    lr: float
    seed: int
    image_size: int
    pool: str  # identity of the generic pool (files and sizes)
    train: str  # identity of the training images ("" when they are not used)

    def key(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:20]


def files_identity(paths: Sequence[Path | str], extra: Sequence[str] = ()) -> str:
    """A digest of file names, sizes and modification times (changes when any file does)."""
    h = hashlib.sha256()
    for p in sorted(str(x) for x in paths):
        try:
            st = os.stat(p)
            h.update(f"{p}|{st.st_size}|{int(st.st_mtime)}\n".encode())
        except OSError:
            h.update(f"{p}|missing\n".encode())
    for e in extra:
        h.update(f"{e}\n".encode())
    return h.hexdigest()[:20]


def _random_crop(image: torch.Tensor, crop: int, g: torch.Generator, rescale: bool) -> torch.Tensor:
    """A ``crop x crop`` patch of ``[3,H,W]``; with ``rescale`` from a random-size square resized to ``crop``."""
    h, w = image.shape[-2:]
    side = crop
    if rescale:
        hi = min(h, w)
        side = int(torch.randint(min(crop, hi), hi + 1, (1,), generator=g)) if hi > crop else hi
    side = min(side, h, w)
    top = int(torch.randint(0, h - side + 1, (1,), generator=g))
    left = int(torch.randint(0, w - side + 1, (1,), generator=g))
    out = image[:, top : top + side, left : left + side]
    if side != crop:
        out = F.interpolate(out[None], size=(crop, crop), mode="bilinear", antialias=side > crop, align_corners=False)[
            0
        ]
    if float(torch.rand((), generator=g)) < 0.5:
        out = out.flip(-1)
    return out


def pool_tensors(images: Sequence[np.ndarray]) -> list[torch.Tensor]:
    return [torch.from_numpy(np.ascontiguousarray(im.transpose(2, 0, 1))).float() for im in images]


class ImageList(Protocol):
    """Indexable images ``[3,H,W]`` (a list, or a view that converts on access)."""

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> torch.Tensor: ...


def distill_teacher(
    settings: DistillSettings,
    target: BackboneTeacher,
    train_images: torch.Tensor | None,
    pool: ImageList,
    cache_dir: Path | None,
    record: FitRecord,
    bf16: bool = True,
    progress: bool = True,
) -> nn.Sequential:
    """Train (or load from the cache) a PDN that regresses ``target``'s channel-standardised features.

    Each step takes ``batch`` random ``crop`` px crops, half from ``train_images`` ``[N,3,S,S]``
    (when given) and half from ``pool`` (random scale, flips). The phase ``distill`` goes into
    ``record`` (its ``extra`` says whether the cache served it, and the cache key).
    """
    teacher = pdn(settings.model_size, settings.out_channels, settings.padding)
    key = settings.key()
    path = cache_dir / f"teacher-{key}.safetensors" if cache_dir is not None else None
    if path is not None and path.is_file():
        with timed_phase(record, "distill", cached=True, key=key):
            teacher.load_state_dict(load_file(str(path)))
        return teacher.eval()
    g = torch.Generator().manual_seed(settings.seed)
    torch.manual_seed(settings.seed)

    def batch() -> torch.Tensor:
        crops = []
        for i in range(settings.batch):
            from_train = train_images is not None and (not pool or i % 2 == 0)
            if from_train and train_images is not None:
                crops.append(
                    _random_crop(
                        train_images[int(torch.randint(len(train_images), (1,), generator=g))], settings.crop, g, False
                    )
                )
            else:
                crops.append(
                    _random_crop(pool[int(torch.randint(len(pool), (1,), generator=g))], settings.crop, g, True)
                )
        return torch.stack(crops)

    # channel statistics of the target, from a few batches
    with torch.no_grad():
        feats = torch.cat([target(batch()) for _ in range(max(1, min(64 // settings.batch, settings.steps)))])
        mean = feats.mean((0, 2, 3), keepdim=True)
        std = feats.std((0, 2, 3), keepdim=True).clamp_min(1e-6)
    teacher.train().to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    opt = torch.optim.Adam(teacher.parameters(), lr=settings.lr, weight_decay=1e-5)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, settings.steps))

    def step(_: int) -> float:
        x = batch()
        with torch.no_grad():
            y = (target(x) - mean) / std
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = teacher(x.contiguous(memory_format=torch.channels_last))
        loss = (out.float() - y).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        return loss.item()

    phase = train_phase(record, "distill", step, settings.steps, progress=progress)
    phase.extra.update(cached=False, key=key)
    teacher.eval()
    teacher = teacher.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
    summary = {"cached": False, "key": key, "seconds": phase.seconds, "loss": phase.loss_last.get("loss", float("nan"))}
    if path is not None:
        write_file(path, save({k: v.contiguous() for k, v in teacher.state_dict().items()}))
        write_file(path.with_suffix(".json"), json.dumps({**asdict(settings), **summary}, indent=2).encode())
    return teacher
