"""What the hybrid predicts with: the chosen branch's prediction, or the branches' maps fused.

**Normalisation** (for the fused map): each branch's maps are put on one scale by the mean and
standard deviation of its map values on the good validation images (``z = (map - mean) / std``),
and its image scores by those of its validation image scores. **Fusion**: the mean of the
normalised maps, and the mean of the normalised image scores. The same functions serve the choice
on validation data (:mod:`anomnet.detectors.hybrid.selection`) and prediction, so what was
measured is what runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from anomnet.components.graph_mode import graph_mode_active
from anomnet.detectors.base import Detector, Prediction
from anomnet.errors import NotFittedError

_EPS = 1e-12


@dataclass(frozen=True)
class Normalisation:
    """One branch's scale on the good validation images: image-score and map-value mean and std."""

    image_mean: float = 0.0
    image_std: float = 1.0
    pixel_mean: float = 0.0
    pixel_std: float = 1.0

    def as_tensor(self) -> torch.Tensor:
        return torch.tensor([self.image_mean, self.image_std, self.pixel_mean, self.pixel_std], dtype=torch.float64)

    @classmethod
    def from_tensor(cls, row: torch.Tensor) -> Normalisation:
        a, b, c, d = (float(v) for v in row.double())
        return cls(a, b, c, d)

    def apply(self, pred: Prediction) -> Prediction:
        # float32 in graph mode (export): OpenVINO's CPU plugin computes float64 graphs wrongly (docs/export.md)
        dtype = torch.float32 if graph_mode_active() else torch.float64
        scores = (pred.scores.to(dtype) - self.image_mean) / max(self.image_std, _EPS)
        maps = (pred.maps.to(dtype) - self.pixel_mean) / max(self.pixel_std, _EPS)
        return Prediction(scores.float(), maps.float())


class NormalisationAccumulator:
    """Running sums of image scores and map values of the good validation images of one branch."""

    def __init__(self) -> None:
        self.scores: list[float] = []
        self.pixels = 0
        self.total = 0.0
        self.squares = 0.0

    def add(self, pred: Prediction) -> None:
        self.scores.extend(pred.scores.double().tolist())
        maps = pred.maps.double()
        self.pixels += maps.numel()
        self.total += float(maps.sum())
        self.squares += float((maps * maps).sum())

    def result(self) -> Normalisation:
        if not self.scores or self.pixels == 0:
            raise NotFittedError("the hybrid's normalisation needs good validation images")
        s = np.asarray(self.scores, dtype=np.float64)
        mean = self.total / self.pixels
        var = max(self.squares / self.pixels - mean * mean, 0.0)
        return Normalisation(float(s.mean()), float(s.std()), mean, float(np.sqrt(var)))


def fuse(preds: Sequence[Prediction], norms: Sequence[Normalisation]) -> Prediction:
    """The mean of the branches' normalised image scores and maps."""
    normalised = [n.apply(p) for p, n in zip(preds, norms)]
    scores = torch.stack([p.scores for p in normalised]).mean(0)
    maps = torch.stack([p.maps for p in normalised]).mean(0)
    return Prediction(scores, maps)


class HybridModel(nn.Module):
    """Images -> the prediction of the used branch (select) or of the used branches fused.

    The branch detectors' modules are its submodules (``networks``), so an export finds their
    networks here; the choice (``used``, ``fused``) and ``norms`` are plain attributes, saved by the
    hybrid detector as its ``hybrid.*`` tensors.
    """

    def __init__(self) -> None:
        super().__init__()
        self.branches: dict[str, Detector] = {}
        self.networks = nn.ModuleDict()
        self.used: list[str] = []  # the branches predict runs, in the order of the config
        self.fused = False
        self.norms: dict[str, Normalisation] = {}

    def add(self, alias: str, branch: Detector) -> None:
        self.branches[alias] = branch
        self.networks[alias] = branch.model

    def forward(self, images: torch.Tensor) -> Prediction:
        if not self.used:
            raise NotFittedError("the hybrid detector is not fitted: call fit() or load a saved model")
        if not self.fused:
            return self.branches[self.used[0]].predict(images)
        preds = [self.branches[name].predict(images) for name in self.used]
        return fuse(preds, [self.norms[name] for name in self.used])
