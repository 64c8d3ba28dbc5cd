"""ToCoAD settings: Literal choices and RANGES are checked once by :class:`DetectorConfig`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from anomnet.detectors.patchcore import PatchCoreConfig
from anomnet.detectors.tocoad.losses import DiscLoss


@dataclass
class ToCoADConfig(PatchCoreConfig):
    # contrastive fine-tuning of the backbone: off by default, it measured no better than the pretrained backbone
    # (BENCHMARKS.md section learned-stages, part tocoad; docs/tocoad.md): the default is PatchCore + eq. 9
    stage2: bool = False
    # discriminator pre-training on synthetic anomalies; None: with stage II (its L_neg is the stage's only use)
    stage1: bool | None = None
    decoder_layers: tuple[str, ...] | None = None  # None: the 4 levels up to the deepest memory-bank layer
    # stage II SimSiam heads: None = the two deepest memory-bank levels; e.g. stage5,stage7 for EfficientNet-Lite
    # (strides 16 and 32, the paper's layer3 + layer4 equivalent): levels past the bank are computed in training only
    head_layers: tuple[str, ...] | None = None
    generator: Literal["perlin", "cutpaste"] = "perlin"
    textures: str | None = None  # texture folder (None: anomnet.image_pool's default source)
    texture_limit: int = 100  # textures read from the folder (seeded subset)
    anomaly_prob: float = 0.5  # share of training images that get a synthetic anomaly
    rotate: bool = True  # generator: random 90-degree and slight rotations of the good image
    max_angle: float = 10.0
    train_batch_size: int = 8  # images per training step (both stages; 2 or more for the SimSiam BatchNorm)
    stage1_steps: int = 200  # stage I budget (training steps of train_batch_size images)
    stage2_steps: int = 100  # stage II budget (the head warm-up included)
    warmup: float = 0.2  # share of stage II's steps that first train only the SimSiam heads (backbone frozen)
    lr1: float = 1e-3  # Adam, stage I (the paper: 1e-4 for 100 epochs; measured too slow for this budget)
    lr2: float = 0.001  # SGD, stage II backbone (cosine to 0 after the warm-up); 0.01 lowered AU-PRO on bottle
    head_lr: float = 0.2  # SGD, stage II SimSiam heads (constant, as SimSiam's predictor); 0.05 learned too slowly
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lambda_sym: float = 0.5  # L = lambda L_sym + (1 - lambda) L_neg
    # the discriminator's loss, in stage I and in L_neg: focal (gamma, alpha) or plain cross-entropy (Table 6)
    disc_loss: DiscLoss = "focal"
    focal_gamma: float = 2.0
    alpha: float = 0.25  # focal loss class weight alpha_t: alpha for anomalous pixels, 1 - alpha for normal
    proj_dim: int = 256
    pred_dim: int = 0  # 0: the paper's one-layer predictor; > 0: SimSiam's bottleneck MLP of that width
    reweight: Literal["patch", "image"] = "patch"  # eq. 9 on every patch (paper) or on the image score only
    crop_scale: float = 0.6  # smallest area fraction of the random resized crop of the views

    ALIASES: ClassVar[dict[str, str]] = {
        **PatchCoreConfig.ALIASES,
        "steps1": "stage1_steps",
        "steps2": "stage2_steps",
        "train_batch": "train_batch_size",
    }
    RANGES: ClassVar[dict[str, tuple[float | None, float | None]]] = {
        "texture_limit": (1, None),
        "anomaly_prob": (0.0, 1.0),
        "max_angle": (0.0, 180.0),
        "train_batch_size": (2, 4096),
        "stage1_steps": (0, 10_000_000),
        "stage2_steps": (0, 10_000_000),
        "warmup": (0.0, 1.0),
        "lr1": (0.0, None),
        "lr2": (0.0, None),
        "head_lr": (0.0, None),
        "momentum": (0.0, 1.0),
        "weight_decay": (0.0, None),
        "lambda_sym": (0.0, 1.0),
        "focal_gamma": (0.0, None),
        "alpha": (0.0, 1.0),
        "proj_dim": (1, None),
        "pred_dim": (0, None),
        "crop_scale": (1e-6, 1.0),
    }
