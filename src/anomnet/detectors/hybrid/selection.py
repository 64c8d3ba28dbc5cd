"""The hybrid's branch choice: every candidate measured on data the test set never touches.

**Selection data.** With a labelled validation set (``anomnet fit --labelled PATH``): its images
and masks. Otherwise the good validation images, each followed by ``synthetic_per_image``
defective copies from a seeded generator of :mod:`anomnet.synthesis` (the mask is what it
changed): ``realistic`` (spots, cracks, scratches, or the user's real defect crops:
:class:`~anomnet.synthesis.defects.RealisticDefects`), ``perlin``, ``cutpaste`` or ``noise``;
``synthetic_where="object"`` centres realistic and noise defects on the object (pixels unlike the
image border, as :func:`~anomnet.synthesis.noise_patches.foreground_mask` finds it; anywhere when
there are none), where real defects lie.
Only the training split's validation images are read; the dataset's test split never reaches
the detector's ``fit``.

**Candidates.** Each branch; with ``mode`` fuse or auto and two or more branches also ``fused``
(:func:`~anomnet.detectors.hybrid.model.fuse`, normalised on the good validation images). Each is
run on the selection images at their own resolution (so tiling and each branch's own preprocessing
apply), its maps and the masks then shrunk to at most ``select_side`` pixels on the long side, and
measured with the evaluation's metrics (:mod:`anomnet.evaluation.metrics`): AU-PRO@0.05 and @0.3, pixel
F1-max, pixel AUROC, image AUROC. The candidate with the highest ``criterion`` is chosen (the
first in branch order on a tie; a NaN criterion never wins). All values are the choice's evidence.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from anomnet.data import Sample, iter_batches
from anomnet.detectors.base import Detector, Prediction
from anomnet.detectors.hybrid.config import HybridConfig
from anomnet.detectors.hybrid.model import Normalisation, fuse
from anomnet.errors import ConfigError
from anomnet.evaluation.metrics import PixelMetricAccumulator, image_auroc
from anomnet.synthesis.base import AnomalyGenerator
from anomnet.transforms import resize

METRICS = ("au_pro@0.05", "au_pro@0.3", "pixel_f1_max", "pixel_auroc", "image_auroc")
FUSED = "fused"


@dataclass
class SelectionBatch:
    """Images of one size ``[B,3,H,W]``, their masks ``[B,H,W]`` (bool) and labels."""

    images: torch.Tensor
    masks: torch.Tensor
    labels: list[int]


def make_generator(config: HybridConfig) -> AnomalyGenerator:
    """The synthetic-defect generator the ``synthetic`` setting names (no global turn of the image)."""
    kind = config.synthetic
    if kind == "realistic":
        from anomnet.synthesis.defect_crops import load_defect_crops
        from anomnet.synthesis.defects import RealisticDefects

        crops = load_defect_crops(config.defects, seed=config.seed) if config.defects else None
        return RealisticDefects(crops=crops, avoid_background=config.synthetic_where == "object")
    if kind == "perlin":
        from anomnet.synthesis import PerlinAnomaly, load_textures

        return PerlinAnomaly(load_textures(config.textures, seed=config.seed), rotate=False)
    if kind == "cutpaste":
        from anomnet.synthesis import CutPaste

        return CutPaste()
    from anomnet.synthesis.noise_patches import NoisePatches

    return NoisePatches(avoid_background=config.synthetic_where == "object")


def synthetic_batches(
    validation: Sequence[Sample], generator: AnomalyGenerator, per_image: int, seed: int, batch_size: int
) -> Iterator[SelectionBatch]:
    """Each good validation image, then ``per_image`` defective copies of it (seeded: the same for every branch)."""
    rng = torch.Generator().manual_seed(seed)
    for batch in iter_batches(validation, 1):
        image = batch.images[0]
        copies = [generator(image, rng) for _ in range(per_image)]
        images = torch.stack([image, *(c[0] for c in copies)])
        masks = torch.stack([torch.zeros(image.shape[-2:], dtype=torch.bool), *(c[1] > 0.5 for c in copies)])
        labels = [0] + [1] * per_image
        for start in range(0, len(labels), batch_size):
            end = start + batch_size
            yield SelectionBatch(images[start:end], masks[start:end], labels[start:end])


def labelled_batches(samples: Sequence[Sample], batch_size: int) -> Iterator[SelectionBatch]:
    """A labelled validation set's images and masks (a defective image without a mask is left out)."""
    usable = [s for s in samples if s.label == 0 or s.mask_path is not None]
    if not any(s.label for s in usable):
        raise ConfigError("the hybrid's labelled selection set needs defective images with masks")
    for batch in iter_batches(usable, batch_size, with_masks=True):
        assert batch.masks is not None
        yield SelectionBatch(batch.images, batch.masks, [s.label for s in batch.samples])


class CandidateScore:
    """Metrics of one candidate over the selection data, maps and masks shrunk to ``side``."""

    def __init__(self, side: int) -> None:
        self.side = side
        self.pixels = PixelMetricAccumulator()
        self.scores: list[float] = []
        self.labels: list[int] = []

    def add(self, pred: Prediction, batch: SelectionBatch) -> None:
        self.scores.extend(pred.scores.double().tolist())
        self.labels.extend(batch.labels)
        maps, masks = shrink(pred.maps.float(), batch.masks, self.side)
        for amap, mask in zip(maps, masks):
            self.pixels.add(amap.numpy(), mask.numpy())

    def result(self) -> dict[str, float]:
        px = self.pixels.compute(pro_limits=(0.05, 0.3))
        return {
            "au_pro@0.05": px.au_pro[0.05],
            "au_pro@0.3": px.au_pro[0.3],
            "pixel_f1_max": px.f1_max,
            "pixel_auroc": px.auroc,
            "image_auroc": image_auroc(np.asarray(self.scores), np.asarray(self.labels)),
        }


def shrink(maps: torch.Tensor, masks: torch.Tensor, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Maps (bilinear) and masks (nearest) brought to at most ``side`` pixels on the long side."""
    h, w = maps.shape[-2:]
    if max(h, w) <= side:
        return maps, masks
    f = side / max(h, w)
    size = (max(1, round(h * f)), max(1, round(w * f)))
    small_masks = F.interpolate(masks[:, None].float(), size=size, mode="nearest")[:, 0] > 0.5
    return resize(maps[:, None], size)[:, 0], small_masks


def evaluate_candidates(
    branches: dict[str, Detector],
    batches: Iterator[SelectionBatch],
    side: int,
    norms: dict[str, Normalisation] | None = None,
) -> tuple[dict[str, dict[str, float]], int, int]:
    """Metrics of every branch (and of the fused map when ``norms`` are given) on the selection batches.

    Returns ``(metrics by candidate, good images, defective images)``.
    """
    names = list(branches)
    scores = {n: CandidateScore(side) for n in names}
    if norms is not None:
        scores[FUSED] = CandidateScore(side)
    good = bad = 0
    with torch.inference_mode():
        for batch in batches:
            preds = {n: branches[n].predict(batch.images) for n in names}
            for n in names:
                scores[n].add(preds[n], batch)
            if norms is not None:
                scores[FUSED].add(fuse([preds[n] for n in names], [norms[n] for n in names]), batch)
            bad += sum(batch.labels)
            good += len(batch.labels) - sum(batch.labels)
    if bad == 0 or good == 0:
        raise ConfigError("the branch choice needs good and defective selection images")
    return {n: s.result() for n, s in scores.items()}, good, bad


def choose(metrics: dict[str, dict[str, float]], criterion: str) -> str:
    """The candidate with the highest ``criterion`` (the first on a tie; NaN never wins)."""
    best, best_value = next(iter(metrics)), -np.inf
    for name, values in metrics.items():
        value = values[criterion]
        if value == value and value > best_value:
            best, best_value = name, value
    return best
