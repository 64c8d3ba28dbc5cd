"""The module EfficientAD predicts with: teacher, student, autoencoder, the statistics fit measures, scoring.

The PDN lives in :mod:`.pdn`, the autoencoder in :mod:`.autoencoder`, the backbone teacher in :mod:`.distill`.
The networks are built from the settings once; the scoring-time settings (``alpha``, ``st_map``) are
read from the config each prediction is given, so a fitted model can be scored with other values.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from anomnet.backbones.resnet import IMAGENET_MEAN, IMAGENET_STD
from anomnet.components.graph_mode import graph_mode_active
from anomnet.components.score_reduction import max_score
from anomnet.detectors.efficientad.autoencoder import Autoencoder
from anomnet.detectors.efficientad.config import EfficientADConfig
from anomnet.detectors.efficientad.distill import BackboneTeacher
from anomnet.detectors.efficientad.losses import discrepancy
from anomnet.detectors.efficientad.pdn import map_padding, output_size, pdn
from anomnet.errors import ConfigError

OUT_CHANNELS = 384
_MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
_STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def imagenet_normalize(images: torch.Tensor) -> torch.Tensor:
    """``(images - mean) / std`` with ImageNet's channel statistics: the student's and autoencoder's
    input in the paper's code (``imagenet_norm=true``). ``images``: ``[B,3,H,W]`` RGB in [0, 1]."""
    return (images - _MEAN.to(images)) / _STD.to(images)


class EfficientADModel(nn.Module):
    """Images ``[B,3,S,S]`` -> (scores ``[B]``, maps ``[B,S,S]``): the maximum of the fused map.

    Teacher (frozen), student (2 x 384 channels) and autoencoder for ``size`` px inputs on an
    ``n x n`` output grid; buffers filled by fit: the teacher's channel mean and standard deviation
    and the validation quantiles q_a, q_b of the local and global maps (``quantiles``: st q_a, st q_b,
    ae q_a, ae q_b; ``quantiles_normalized`` and ``quantiles_normalized_raw``: the normalised local maps', None in
    models saved before their ``st_map`` kind existed).
    """

    teacher_mean: torch.Tensor
    teacher_std: torch.Tensor
    quantiles: torch.Tensor
    quantiles_normalized: torch.Tensor | None
    quantiles_normalized_raw: torch.Tensor | None

    def __init__(self, c: EfficientADConfig, size: int) -> None:
        super().__init__()
        self.size, self.n = size, output_size(size, c.padding)
        self.padding, self.imagenet_norm, self.bf16, self.batch_size = c.padding, c.imagenet_norm, c.bf16, c.batch_size
        self.teacher: nn.Module = (
            pdn(c.model_size, OUT_CHANNELS, c.padding).eval()
            if c.teacher == "distilled"
            else BackboneTeacher(c.backbone, c.teacher_layers, OUT_CHANNELS, c.padding, c.seed)
        )
        self.teacher.requires_grad_(False)
        self.student = pdn(c.model_size, 2 * OUT_CHANNELS, c.padding).eval()
        self.autoencoder = Autoencoder(size, self.n, OUT_CHANNELS).eval()
        for name in ("teacher_mean", "teacher_std", "quantiles"):
            self.register_buffer(name, torch.empty(0))
        self.register_buffer("quantiles_normalized", None)
        self.register_buffer("quantiles_normalized_raw", None)

    def autocast(self) -> torch.autocast:
        # graph mode (export, and its eager reference) runs float32: ONNX / OpenVINO graphs carry no bf16 autocast
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16 and not graph_mode_active())

    def teacher_features(self, images: torch.Tensor) -> torch.Tensor:
        """The teacher's output normalised by its channel statistics on the training images."""
        with torch.no_grad(), self.autocast():
            t = self.teacher(images)
        return (t.float() - self.teacher_mean) / self.teacher_std

    def student_input(self, images: torch.Tensor) -> torch.Tensor:
        """The student's and autoencoder's input: ImageNet-normalised with ``imagenet_norm``, else as given."""
        return imagenet_normalize(images) if self.imagenet_norm else images

    def raw_maps(
        self, images: torch.Tensor, st_maps: tuple[str, ...] = ("squared",)
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Un-normalised student-teacher and student-autoencoder maps ``[B,n,n]``, one pair per ``st_maps`` kind.

        The student-teacher map is ``"squared"``, the mean squared error over the channels, or
        ``"normalized"``, :func:`~.losses.discrepancy` of the L2-normalised vectors (CDO's), or
        ``"normalized_raw"``, the same of the vectors at the teacher's own scale (the channel standardisation
        undone on both: ``x * std + mean``); one forward pass.
        """
        t = self.teacher_features(images)
        x = self.student_input(images)
        with self.autocast():
            s = self.student(x)
            a = self.autoencoder(x)
        s, a = s.float(), a.float()
        map_ae = (a - s[:, OUT_CHANNELS:]).pow(2).mean(1)
        s_st = s[:, :OUT_CHANNELS]
        out = []
        for kind in st_maps:
            if kind == "normalized":
                m_st = discrepancy(t, s_st)
            elif kind == "normalized_raw":
                mean, std = self.teacher_mean, self.teacher_std
                m_st = discrepancy(t * std + mean, s_st * std + mean)
            else:
                m_st = (t - s_st).pow(2).mean(1)
            out.append((m_st, map_ae))
        return out

    def combined_map(self, images: torch.Tensor, config: EfficientADConfig) -> torch.Tensor:
        """``[B,n,n]`` fused map: quantile-normalised local and global maps mixed by ``alpha``."""
        ((m_st, m_ae),) = self.raw_maps(images, (config.st_map,))
        q = self.quantiles
        if config.st_map in ("normalized", "normalized_raw"):
            stored = self.quantiles_normalized if config.st_map == "normalized" else self.quantiles_normalized_raw
            if stored is None:
                raise ConfigError(
                    f"st_map={config.st_map} needs that map's validation quantiles, which this model was saved "
                    "without (it predates the setting): fit it again, or use st_map=squared"
                )
            q = torch.cat([stored, q[2:]])
        m_st = 0.1 * (m_st - q[0]) / (q[1] - q[0]).clamp_min(1e-12)
        m_ae = 0.1 * (m_ae - q[2]) / (q[3] - q[2]).clamp_min(1e-12)
        return config.alpha * m_st + (1.0 - config.alpha) * m_ae

    def forward(self, images: torch.Tensor, config: EfficientADConfig) -> tuple[torch.Tensor, torch.Tensor]:
        if graph_mode_active():  # one pass over any batch (an exported graph has no loop over it)
            m = self.combined_map(images, config)
        else:
            m = torch.cat([self.combined_map(part, config) for part in images.split(self.batch_size)])
        before, after = map_padding(self.size, self.padding)
        grid = F.pad(m[:, None], (before, after, before, after))
        full = F.interpolate(grid, size=(self.size, self.size), mode="bilinear", align_corners=False)[:, 0]
        return max_score(m), full
