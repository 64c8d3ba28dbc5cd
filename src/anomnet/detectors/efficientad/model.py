"""EfficientAD's predict-time networks: teacher, student and autoencoder, assembled from the settings.

The PDN lives in :mod:`.pdn`, the autoencoder in :mod:`.autoencoder`, the backbone teacher in :mod:`.distill`.
"""

from __future__ import annotations

import torch
from torch import nn

from anomnet.backbones.resnet import IMAGENET_MEAN, IMAGENET_STD
from anomnet.detectors.efficientad.autoencoder import Autoencoder
from anomnet.detectors.efficientad.config import EfficientADConfig
from anomnet.detectors.efficientad.distill import BackboneTeacher
from anomnet.detectors.efficientad.pdn import pdn

OUT_CHANNELS = 384
_MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
_STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def imagenet_normalize(images: torch.Tensor) -> torch.Tensor:
    """``(images - mean) / std`` with ImageNet's channel statistics: the student's and autoencoder's
    input in the paper's code (``imagenet_norm=true``). ``images``: ``[B,3,H,W]`` RGB in [0, 1]."""
    return (images - _MEAN.to(images)) / _STD.to(images)


def build_networks(c: EfficientADConfig, size: int, n: int) -> tuple[nn.Module, nn.Sequential, Autoencoder]:
    """Teacher (frozen), student (2 x 384 channels) and autoencoder for ``size`` px inputs and an ``n x n`` grid."""
    teacher: nn.Module = (
        pdn(c.model_size, OUT_CHANNELS, c.padding).eval()
        if c.teacher == "distilled"
        else BackboneTeacher(c.backbone, c.teacher_layers, OUT_CHANNELS, c.padding, c.seed)
    )
    teacher.requires_grad_(False)
    student = pdn(c.model_size, 2 * OUT_CHANNELS, c.padding).eval()
    autoencoder = Autoencoder(size, n, OUT_CHANNELS).eval()
    return teacher, student, autoencoder
