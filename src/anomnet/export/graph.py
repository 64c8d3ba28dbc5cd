"""The module an export traces: raw uint8 images -> image scores, anomaly maps at input size, decisions."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from anomnet.detectors.base import Detector
from anomnet.errors import ConfigError
from anomnet.export.geometry import GraphGeometry


def float32_at_or_above(value: float) -> float:
    """The smallest float32 ``t >= value``: for a float32 score ``s``, ``s >= t`` exactly when ``s >= value``.

    So the graph's float32 comparison gives the decisions of :meth:`Calibration.decide`, which
    compares the same scores with the float64 threshold.
    """
    if math.isnan(value):
        raise ConfigError("the image threshold is NaN: calibrate the model before exporting it")
    t = np.float32(value)
    if float(t) < value:
        t = np.nextafter(t, np.float32(np.inf))
    return float(t)


class ExportGraph(nn.Module):
    """``[B,H,W,3]`` uint8 RGB -> scores ``[B]`` float32, maps ``[B,H,W]`` float32, decisions ``[B]`` bool.

    The detector's preprocessing (:class:`~anomnet.export.geometry.GraphGeometry`), its
    ``predict_preprocessed`` (traced in graph mode: exact search, float32) and the map's way back
    to the input's resolution, then ``score >= threshold`` with the model's image threshold.
    Pixels are divided by 255, as :func:`anomnet.imageio.read_image` does for 8-bit files.
    """

    def __init__(self, detector: Detector) -> None:
        super().__init__()
        if detector.tiling is not None:
            raise ConfigError(
                f"a {detector.name} model fitted with tiling (tile={detector.config.tile}) cannot be exported: its "
                "tile layout depends on each image's size and is not expressed as a graph; export a model fitted "
                "without --tile"
            )
        self.detector = detector
        # the detector's predict-time module, registered here so that a trace holds its tensors as parameters
        self.model = detector.model.eval().requires_grad_(False)
        self.geometry = GraphGeometry(detector.preprocess)
        self.threshold = float32_at_or_above(float(detector.calibration.threshold))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = images.permute(0, 3, 1, 2).to(torch.float32) / 255.0
        scores, maps = self.detector.predict_preprocessed(self.geometry.preprocess(x))
        scores = scores.to(torch.float32)
        maps = self.geometry.restore(maps.to(torch.float32), x)
        return scores, maps, scores >= self.threshold
