"""EfficientAD settings: Literal choices and RANGES are checked once by :class:`DetectorConfig`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from anomnet.backbones import DEFAULT_BACKBONE
from anomnet.detectors.base import DetectorConfig


@dataclass
class EfficientADConfig(DetectorConfig):
    batch_size: int = 8  # prediction batch (images per forward pass at prediction and for statistics)
    model_size: Literal["s", "m"] = "s"  # EfficientAD-S / -M PDNs
    padding: bool = False  # PDN paddings (the authors' code: none)
    # backbone: its features directly (better at CPU budgets, measured) | distilled: a PDN distilled from it
    teacher: Literal["backbone", "distilled"] = "backbone"
    backbone: str = DEFAULT_BACKBONE
    teacher_layers: tuple[str, ...] | None = None  # None: the backbone's default layers
    # cdo: hard + CDO + AE + ST-AE | original: hard + generic-image penalty + AE + ST-AE
    loss: Literal["cdo", "original"] = "cdo"
    # student + autoencoder training steps (bottle: 100 / 200 / 400 / 800 -> AU-PRO 29 / 61 / 89 / 94)
    steps: int = 800
    train_batch_size: int = 2  # training images per step
    lr: float = 1e-3
    hard_quantile: float = 0.999
    cdo_gamma: float = 2.0
    synth_probability: float = 0.4  # share of training images given noise patches (CDO)
    avoid_background: bool = True
    penalty: bool = True  # the generic-image penalty of the original losses
    # Loss coefficients: total = coeff_hard * hard + coeff_ood * (CDO | penalty) + coeff_ae * AE + coeff_stae * ST-AE.
    # coeff_ood weights the out-of-distribution term of the chosen loss: CDO (loss=cdo) or the penalty
    # (loss=original). All 1.0: the unweighted sum the detector used before these settings existed.
    coeff_hard: float = 1.0
    coeff_ood: float = 1.0
    coeff_ae: float = 1.0
    coeff_stae: float = 1.0
    # Student and autoencoder inputs ImageNet mean/std normalised, as in the paper's code (the teacher
    # normalises on its own). False (the default) keeps the [0, 1] inputs every earlier model was trained on.
    imagenet_norm: bool = False
    distill_steps: int = 200  # about 1 min on 2 idle cores; cached
    distill_batch: int = 8
    distill_crop: int = 128
    distill_lr: float = 1e-3
    distill_on_train: bool = True  # distil on the training images too (else on the generic pool only)
    pool_dir: str | None = None  # generic image folder (default: anomnet.image_pool's default source)
    pool_limit: int | None = 200
    cache_dir: str | None = None  # distilled-teacher cache (default ~/.cache/anomnet/efficientad; "off": none)
    alpha: float = 0.5  # weight of the local (student-teacher) map; used at scoring time
    # the local map: "squared" (EfficientAD's mean squared error per cell) or "normalized" (the squared distance of
    # the L2-normalised teacher and student vectors, the discrepancy CDO optimises; the thesis' eq. 4.10);
    # read at scoring time, both maps' validation quantiles are stored at fit; "normalized_raw": the same distance
    # of the teacher's own (not channel-standardised) vectors and the student's mapped back to that scale
    st_map: Literal["squared", "normalized", "normalized_raw"] = "squared"
    q_a: float = 0.9
    q_b: float = 0.995
    bf16: bool = True  # bfloat16 convolutions (about 2x faster on CPUs with AVX512-BF16 / AMX)

    ALIASES: ClassVar[dict[str, str]] = {"train_batch": "train_batch_size"}
    RANGES: ClassVar[dict[str, tuple[float | None, float | None]]] = {
        "steps": (0, 10_000_000),
        "train_batch_size": (1, 4096),
        "lr": (0.0, None),
        "hard_quantile": (0.0, 1.0),
        "cdo_gamma": (0.0, None),
        "synth_probability": (0.0, 1.0),
        "coeff_hard": (0.0, 1000.0),
        "coeff_ood": (0.0, 1000.0),
        "coeff_ae": (0.0, 1000.0),
        "coeff_stae": (0.0, 1000.0),
        "distill_steps": (0, 10_000_000),
        "distill_batch": (1, 4096),
        "distill_crop": (16, 4096),
        "distill_lr": (0.0, None),
        "pool_limit": (1, None),
        "alpha": (0.0, 1.0),
        "q_a": (0.0, 1.0),
        "q_b": (0.0, 1.0),
    }
