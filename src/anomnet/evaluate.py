"""The one evaluation path: run a detector over samples, then image and pixel metrics.

Anomaly maps are compared with each ground-truth mask at the mask's original resolution
(maps come back from ``Detector.predict`` at the input image's resolution), or at a fixed
``eval_size`` when asked.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from anomnet.data import Batch, Sample, iter_batches
from anomnet.detectors.base import Detector, Prediction
from anomnet.metrics import PixelMetricAccumulator, f1_max, image_auroc, precision_recall_f1

PRO_LIMITS = (0.3, 0.05)


def run_predictions(
    detector: Detector,
    samples: Sequence[Sample],
    batch_size: int = 8,
    with_masks: bool = False,
    progress: str | None = None,
) -> Iterator[tuple[Batch, Prediction]]:
    """Predict batch by batch at the images' own resolution (a batch never mixes sizes)."""
    for batch in iter_batches(samples, batch_size, size=None, with_masks=with_masks, progress=progress):
        yield batch, detector.predict(batch.images)


@dataclass
class EvaluationResult:
    metrics: dict[str, float]
    paths: list[str] = field(default_factory=list)
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0))
    seconds_per_image: float = 0.0


def evaluate(
    detector: Detector,
    samples: Sequence[Sample],
    batch_size: int = 8,
    eval_size: int | None = None,
    progress: bool = True,
    pro_limits: Sequence[float] = PRO_LIMITS,
) -> EvaluationResult:
    """Image AUROC / F1, pixel AUROC / F1 / AU-PRO (when masks exist), and P/R/F1 at the model's threshold."""
    has_masks = any(s.mask_path is not None for s in samples)
    acc = PixelMetricAccumulator() if has_masks else None
    scores: list[float] = []
    labels: list[int] = []
    paths: list[str] = []
    elapsed = 0.0
    t0 = time.perf_counter()
    for batch, pred in run_predictions(detector, samples, batch_size, with_masks=has_masks, progress="test" if progress else None):
        elapsed += time.perf_counter() - t0
        scores.extend(pred.scores.tolist())
        labels.extend(s.label for s in batch.samples)
        paths.extend(str(s.path) for s in batch.samples)
        if acc is not None:
            assert batch.masks is not None
            maps, masks = pred.maps, batch.masks
            if eval_size:
                maps = F.interpolate(maps[:, None], size=(eval_size, eval_size), mode="bilinear", align_corners=False)[:, 0]
                masks = F.interpolate(masks[:, None].float(), size=(eval_size, eval_size), mode="nearest")[:, 0] > 0.5
            for amap, mask in zip(maps, masks):
                acc.add(amap.numpy(), mask.numpy())
        t0 = time.perf_counter()

    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    metrics: dict[str, float] = {"image_auroc": image_auroc(s, y)}
    metrics["image_f1_max"], _ = f1_max(s, y)
    thr = detector.calibration.threshold
    metrics["precision"], metrics["recall"], metrics["f1"] = precision_recall_f1(s, y, thr)
    if acc is not None:
        px = acc.compute(pro_limits=tuple(pro_limits))
        metrics["pixel_auroc"] = px.auroc
        metrics["pixel_f1_max"] = px.f1_max
        for limit, value in px.au_pro.items():
            metrics[f"au_pro@{limit:g}"] = value
    n = max(1, len(scores))
    return EvaluationResult(metrics, paths, y, s, elapsed / n)


def validation_statistics(detector: Detector, validation: Sequence[Sample], batch_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Image scores of the good validation images and a sample of their map values (for display scaling)."""
    scores: list[float] = []
    pixels: list[np.ndarray] = []
    g = torch.Generator().manual_seed(0)
    for _, pred in run_predictions(detector, validation, batch_size):
        scores.extend(pred.scores.tolist())
        flat = pred.maps.reshape(-1)
        take = torch.randint(flat.numel(), (min(flat.numel(), 20000),), generator=g)
        pixels.append(flat[take].numpy())
    return np.asarray(scores), (np.concatenate(pixels) if pixels else np.zeros(0))
