"""The one evaluation path: run a detector over samples, then image and pixel metrics.

Anomaly maps are compared with each ground-truth mask at the mask's original resolution
(maps come back from ``Detector.predict`` at the input image's resolution), or at a fixed
``eval_size`` when asked.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from anomnet.data import Batch, Sample, iter_batches
from anomnet.decisions.calibration import Calibration
from anomnet.decisions.postprocess import SegmentationCounts
from anomnet.detectors.base import Detector, Prediction
from anomnet.errors import ConfigError
from anomnet.evaluation.metrics import (
    PixelCurves,
    PixelMetricAccumulator,
    f1_max,
    false_alarm_rate,
    image_auroc,
    precision_recall_f1,
)
from anomnet.transforms import resize

PRO_LIMITS = (0.3, 0.05)

#: Longest side of the images, maps and masks :func:`evaluate` keeps for display (``keep_worst``).
KEEP_SIDE = 384


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
class KeptImage:
    """A test image kept for display, shrunk to at most :data:`KEEP_SIDE` pixels a side."""

    sample: Sample
    score: float
    image: np.ndarray
    """``uint8`` ``h x w x 3``."""
    anomaly_map: np.ndarray
    """``float32`` ``h x w``, the detector's map resized like the image."""
    mask: np.ndarray | None = None
    """``bool`` ``h x w`` ground truth, when the test set has masks."""
    defective: bool = False
    """The model's decision (:meth:`~anomnet.decisions.calibration.Calibration.verdict`)."""
    predicted: np.ndarray | None = None
    """``bool`` ``h x w``: the model's defect mask (its verdict at full resolution, shrunk); empty when called good."""


@dataclass
class EvaluationResult:
    metrics: dict[str, float]
    paths: list[str] = field(default_factory=list)
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0))
    seconds_per_image: float = 0.0
    pixel_curves: PixelCurves | None = None
    """Pixel ROC / PR / PRO curves (``curve_points > 0`` and masks present)."""
    worst_good: list[KeptImage] = field(default_factory=list)
    """The ``keep_worst`` highest-scoring good images, highest first (the likeliest false alarms)."""
    worst_defective: list[KeptImage] = field(default_factory=list)
    """The ``keep_worst`` lowest-scoring defective images, lowest first (the likeliest misses)."""
    pixel_images: int = 0
    """Test images the pixel metrics used (0 without masks)."""
    pixel_skipped: list[str] = field(default_factory=list)
    """Defective test images left out of the pixel metrics because they have no mask."""


class _WorstKeeper:
    """Keeps the N highest-scoring good and N lowest-scoring defective images, shrunk (bounded memory)."""

    def __init__(self, n: int, side: int, calibration: Calibration) -> None:
        self.n, self.side, self.calibration = n, side, calibration
        self.good: list[tuple[float, int, KeptImage]] = []  # min-heap on score
        self.bad: list[tuple[float, int, KeptImage]] = []  # min-heap on -score
        self.count = 0

    def add(self, batch: Batch, pred: Prediction) -> None:
        for i, sample in enumerate(batch.samples):
            score = float(pred.scores[i])
            heap, key = (self.bad, -score) if sample.label else (self.good, score)
            self.count += 1
            if len(heap) < self.n:
                heapq.heappush(heap, (key, self.count, self._keep(batch, pred, i, score)))
            elif key > heap[0][0]:
                heapq.heapreplace(heap, (key, self.count, self._keep(batch, pred, i, score)))

    def _keep(self, batch: Batch, pred: Prediction, i: int, score: float) -> KeptImage:
        h, w = batch.images.shape[-2:]
        f = min(1.0, self.side / max(h, w))
        size = (max(1, round(h * f)), max(1, round(w * f)))
        image = resize(batch.images[i : i + 1], size)[0].permute(1, 2, 0).numpy()
        amap = resize(pred.maps[i][None, None].float(), size)[0, 0].numpy()
        mask = None
        if batch.masks is not None:
            mask = _shrink_mask(batch.masks[i], size)
        defective, predicted = self.calibration.verdict(score, pred.maps[i].float().numpy())
        image8 = (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
        return KeptImage(
            batch.samples[i], score, image8, amap.astype(np.float32), mask, defective, _shrink_mask(predicted, size)
        )

    def result(self) -> tuple[list[KeptImage], list[KeptImage]]:
        good = [k for _, _, k in sorted(self.good, key=lambda t: (-t[0], t[1]))]
        bad = [k for _, _, k in sorted(self.bad, key=lambda t: (-t[0], t[1]))]
        return good, bad


def _shrink_mask(mask: np.ndarray | torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    m = torch.as_tensor(np.asarray(mask, dtype=np.float32))
    return F.interpolate(m[None, None], size=size, mode="nearest")[0, 0].numpy() > 0.5


EVAL_SIZE_RANGE = (16, 4096)
"""Sides ``eval_size`` may take (a larger one allocates gigabytes per batch of maps)."""


def evaluate(
    detector: Detector,
    samples: Sequence[Sample],
    batch_size: int = 8,
    eval_size: int | None = None,
    progress: bool = True,
    pro_limits: Sequence[float] = PRO_LIMITS,
    keep_worst: int = 0,
    curve_points: int = 0,
) -> EvaluationResult:
    """Image AUROC / F1, pixel AUROC / F1 / AU-PRO (when masks exist), and P/R/F1 at the model's threshold.

    For reports: ``keep_worst`` keeps that many highest-scoring good and lowest-scoring defective
    images with their maps (shrunk to :data:`KEEP_SIDE`); ``curve_points`` records the pixel
    curves at that resolution (see :class:`~anomnet.evaluation.metrics.PixelCurves`).
    """
    low, high = EVAL_SIZE_RANGE
    if eval_size not in (None, 0) and not (isinstance(eval_size, int) and low <= eval_size <= high):
        raise ConfigError(f"eval_size={eval_size!r} is out of range: a side of {low} to {high} pixels (or 0: off)")
    has_masks = any(s.mask_path is not None for s in samples)
    acc = PixelMetricAccumulator() if has_masks else None
    seg = SegmentationCounts() if has_masks else None  # the masks the model produces (Calibration.verdict)
    keeper = _WorstKeeper(keep_worst, KEEP_SIDE, detector.calibration) if keep_worst > 0 else None
    # A defective image without a mask says nothing about its pixels: counting it as all-good
    # would turn its defect into false alarms. Such images count for image metrics only.
    pixel_skipped = [str(smp.path) for smp in samples if smp.label == 1 and smp.mask_path is None] if has_masks else []
    pixel_images = (len(samples) - len(pixel_skipped)) if has_masks else 0
    scores: list[float] = []
    labels: list[int] = []
    paths: list[str] = []
    elapsed = 0.0
    t0 = time.perf_counter()
    for batch, pred in run_predictions(
        detector, samples, batch_size, with_masks=has_masks, progress="test" if progress else None
    ):
        elapsed += time.perf_counter() - t0
        scores.extend(pred.scores.tolist())
        labels.extend(s.label for s in batch.samples)
        paths.extend(str(s.path) for s in batch.samples)
        if keeper is not None:
            keeper.add(batch, pred)
        if acc is not None and batch.masks is not None:
            keep = [i for i, smp in enumerate(batch.samples) if not (smp.label == 1 and smp.mask_path is None)]
            maps, masks, kept_scores = pred.maps[keep], batch.masks[keep], pred.scores[keep].tolist()
            if eval_size:
                maps = F.interpolate(maps[:, None], size=(eval_size, eval_size), mode="bilinear", align_corners=False)[
                    :, 0
                ]
                masks = F.interpolate(masks[:, None].float(), size=(eval_size, eval_size), mode="nearest")[:, 0] > 0.5
            for amap, mask, score in zip(maps, masks, kept_scores):
                acc.add(amap.numpy(), mask.numpy())
                # the masks the model itself produces: its verdict (no mask for an image called good)
                seg.add(detector.calibration.verdict(score, amap.numpy())[1], mask.numpy())  # type: ignore[union-attr]
        t0 = time.perf_counter()

    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    metrics: dict[str, float] = {"image_auroc": image_auroc(s, y)}
    metrics["image_f1_max"], _ = f1_max(s, y)
    thr = detector.calibration.threshold
    metrics["precision"], metrics["recall"], metrics["f1"] = precision_recall_f1(s, y, thr)
    metrics["false_alarm_rate"] = false_alarm_rate(s, y, thr)
    pixel_curves = None
    if acc is not None:
        px = acc.compute(pro_limits=tuple(pro_limits), curve_points=curve_points)
        pixel_curves = px.curves
        metrics["pixel_auroc"] = px.auroc
        metrics["pixel_f1_max"] = px.f1_max
        metrics["seg_f1"] = seg.f1()  # type: ignore[union-attr]
        for limit, value in px.au_pro.items():
            metrics[f"au_pro@{limit:g}"] = value
    n = max(1, len(scores))
    worst_good, worst_defective = keeper.result() if keeper is not None else ([], [])
    return EvaluationResult(
        metrics, paths, y, s, elapsed / n, pixel_curves, worst_good, worst_defective, pixel_images, pixel_skipped
    )
