"""INP-Former's settings.

``batch_size`` is the feature-extraction / prediction batch, ``train_batch_size`` the images per
training step. The budget is ``epochs`` over the training inputs (the paper: 10), capped at
``max_steps`` steps; ``steps`` > 0 gives the step count directly. The defaults were chosen by
measurement on PIPED and bottle (docs/inpformer.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from anomnet.backbones import DEFAULT_BACKBONE
from anomnet.detectors.base import DetectorConfig
from anomnet.errors import ConfigError

Fuse = Literal["auto", "concat", "mean"]
Optimizer = Literal["adamw", "stableadamw"]


@dataclass
class INPFormerConfig(DetectorConfig):
    batch_size: int = 16  # images per feature-extraction / prediction batch
    train_batch_size: int = 16  # images per training step (the paper: 16)
    backbone: str = DEFAULT_BACKBONE
    layers: tuple[str, ...] | None = None  # None: stage2-4 (EfficientNet-Lite), the backbone's own default otherwise
    weights: str | None = None  # backbone weights file (ResNet, DINOv2 ViT); stored inside the model
    # token grid: levels pooled / interpolated to input / grid_stride (0: the finest level's grid;
    # None: 8 for CNN levels, a ViT's own 14 px patch grid)
    grid_stride: int | None = None
    patch_size: int = 1  # local average over a patch_size^2 neighbourhood of each level (1: none; odd)
    # how the encoder levels become one token: "concat" (channels side by side: CNN levels of different
    # widths), "mean" (the paper's average of ViT layers; levels of one width); "auto": mean for equal widths
    fuse: Fuse = "auto"
    groups: int = 0  # reconstruction groups (0: one per level for concat, 2 for mean, as the paper)
    num_inps: int = 6  # M, the intrinsic normal prototypes per image
    extractor_depth: int = 1  # INP extractor blocks (the paper: 1)
    decoder_depth: int = 8  # INP-guided decoder blocks (the paper: 8)
    heads: int = 0  # attention heads (0: about one per 64 channels, a divisor of the token width)
    mlp_ratio: float = 4.0
    coherence_weight: float = 0.2  # weight of the INP coherence loss (the paper: 0.2)
    mining_gamma: float = 3.0  # exponent of the soft-mining re-weighting (the paper: 3)
    # optimisation (the paper: StableAdamW, lr 1e-3, wd 1e-4, batch 16, warm-up then cosine to lr / 10).
    # Budget: epochs over the training inputs (images, tiles, poses) as steps of train_batch_size, at most
    # max_steps; steps > 0 sets the step count directly instead.
    epochs: float = 20.0
    max_steps: int = 1000
    steps: int = 0
    optimizer: Optimizer = "stableadamw"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup: float = 0.1  # share of the steps with a linear warm-up of the learning rate
    grad_clip: float = 0.1  # gradient norm clipping (the paper: 0.1; 0: off)
    # CPU budget: tokens per image a step sends through bottleneck and decoder (0: all; the INPs always see
    # all tokens), and bfloat16 autocast of the trained network in training (prediction stays float32)
    train_tokens: int = 256
    bf16: bool = True
    # augmentation of the training images (the hybrid paper: flips and random scaling)
    flip: bool = False  # random horizontal and vertical flips
    scale_jitter: float = 0.0  # random zoom by a factor in [1 - j, 1 + j] (0: off)
    # scoring
    blur_sigma: float = 4.0
    top_share: float = 0.01  # image score: mean of this share of the highest map pixels (the paper: 1 %); 0: maximum

    RANGES: ClassVar[dict[str, tuple[float | None, float | None]]] = {
        "train_batch_size": (1, 4096),
        "grid_stride": (0, 256),
        "patch_size": (1, 31),
        "groups": (0, 64),
        "num_inps": (1, 1024),
        "extractor_depth": (1, 16),
        "decoder_depth": (1, 64),
        "heads": (0, 256),
        "mlp_ratio": (0.25, 16.0),
        "coherence_weight": (0.0, 100.0),
        "mining_gamma": (0.0, 16.0),
        "epochs": (0.0, 100_000.0),
        "max_steps": (1, 10_000_000),
        "steps": (0, 10_000_000),
        "lr": (1e-12, 10.0),
        "weight_decay": (0.0, 10.0),
        "warmup": (0.0, 1.0),
        "grad_clip": (0.0, None),
        "train_tokens": (0, None),
        "scale_jitter": (0.0, 0.5),
        "blur_sigma": (0.0, 64.0),
        "top_share": (0.0, 1.0),
    }
    ALIASES: ClassVar[dict[str, str]] = {"top_ratio": "top_share"}

    def validate(self) -> None:
        super().validate()
        if self.patch_size % 2 == 0:
            raise ConfigError(f"setting patch_size={self.patch_size!r} must be odd")
