"""The scoring step: (a model, a batch of image references) -> one result row per reference.

One pure function, :func:`score_refs`, serves ``anomnet predict``, the inspection service, the
hot folder and the batch engines alike, so every path reads images, batches them, applies the
model's thresholds and counts defect regions the same way. It keeps no state between calls and
writes nothing; callers decide what to do with the rows (print, write files, send JSON).

A *model* is anything with the :class:`Scorer` shape: a fitted detector (wrapped by
:class:`DetectorScorer`) or an exported model (:mod:`anomnet.exported`, which runs without
torch). :func:`load_scorer` opens either kind of folder. This module imports neither torch nor
the detectors until a detector is actually loaded, so an exported model scores on a machine
that has no torch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from anomnet import imageio
from anomnet.decisions.calibration import Calibration
from anomnet.decisions.postprocess import region_boxes
from anomnet.errors import AnomnetError, ConfigError, ImageReadError, ModelFormatError

if TYPE_CHECKING:
    from anomnet.detectors.base import Detector

EXPORT_MANIFEST = "manifest.json"
"""The file that marks a folder as an exported model (see :mod:`anomnet.exported`)."""

MODEL_META = "anomnet.json"
"""The file that marks a folder as a fitted model (see :mod:`anomnet.model_io`)."""

BATCH_PIXELS = 1 << 26
"""At most this many pixels (about 67 million: 0.8 GB of float32 RGB) go to the model in one call."""


@dataclass(frozen=True)
class ImageRef:
    """One input: a file, or pixels already decoded (``image``, ``HxWx3`` float32 in [0, 1]) named ``path``."""

    path: str
    image: np.ndarray | None = None


@dataclass
class ImagePrediction:
    """The result row of one input; ``error`` is set (and the numbers are NaN) when it failed.

    ``defective`` and ``mask`` are the model's one verdict (:meth:`~anomnet.decisions.calibration.Calibration.verdict`):
    a good image has no defect pixels and no regions, a defective one at least the region of its maximum.
    """

    path: str
    score: float = math.nan
    p_value: float = math.nan
    defective: bool | None = None
    error: str | None = None
    threshold: float = math.nan
    """The model's image threshold the decision was made with (``defective`` is ``score >= threshold``)."""
    anomaly_map: np.ndarray | None = None
    mask: np.ndarray | None = None
    defect_pixels: int | None = None
    regions: int | None = None
    boxes: list[list[int]] = field(default_factory=list)
    """Bounding box ``[x0, y0, x1, y1]`` (ends exclusive, original pixels) of each 8-connected mask region."""
    outputs: dict[str, str] = field(default_factory=dict)
    image: np.ndarray | None = None
    """The decoded input (only when the caller asked to keep it, e.g. to draw an overlay)."""

    def record(self) -> dict[str, Any]:
        """JSON-ready summary (no arrays)."""
        return {
            "path": self.path,
            "score": None if math.isnan(self.score) else self.score,
            "p_value": None if math.isnan(self.p_value) else self.p_value,
            "defective": self.defective,
            "threshold": None if not math.isfinite(self.threshold) else self.threshold,
            "defect_pixels": self.defect_pixels,
            "regions": self.regions,
            "boxes": self.boxes,
            "error": self.error,
            "outputs": self.outputs,
        }


@runtime_checkable
class Scorer(Protocol):
    """What the scoring step needs of a model: its thresholds, a batch size and a batch scorer."""

    @property
    def calibration(self) -> Calibration: ...

    @property
    def batch_size(self) -> int: ...

    def score_arrays(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``[B,H,W,3]`` float32 RGB in [0, 1] -> image scores ``[B]`` and anomaly maps ``[B,H,W]`` (float32)."""
        ...


class DetectorScorer:
    """A fitted in-memory detector in the :class:`Scorer` shape."""

    def __init__(self, detector: Detector) -> None:
        self.detector = detector

    @property
    def calibration(self) -> Calibration:
        return self.detector.calibration

    @property
    def batch_size(self) -> int:
        return int(self.detector.config.batch_size)

    def score_arrays(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import torch

        batch = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).permute(0, 3, 1, 2).contiguous()
        pred = self.detector.predict(batch)
        return pred.scores.float().numpy().astype(np.float64), pred.maps.float().numpy()


def load_scorer(model: str | Path | Scorer | Detector) -> Scorer:
    """A scorer from a fitted model folder, an exported model folder, a detector or a scorer."""
    if isinstance(model, Scorer):
        return model
    if not isinstance(model, (str, Path)):  # a Detector (imported lazily: it needs torch)
        return DetectorScorer(model)
    folder = Path(model)
    if (folder / MODEL_META).is_file():
        from anomnet.detectors.base import Detector

        return DetectorScorer(Detector.load(folder))
    if (folder / EXPORT_MANIFEST).is_file():
        from anomnet.exported import load_exported

        return load_exported(folder)
    if not folder.is_dir():
        raise ModelFormatError(f"{folder}: no such model folder")
    raise ModelFormatError(f"{folder}: neither a fitted model ({MODEL_META}) nor an exported model ({EXPORT_MANIFEST})")


def score_refs(
    scorer: Scorer, refs: Sequence[ImageRef], keep_maps: bool = False, keep_images: bool = False
) -> list[ImagePrediction]:
    """One row per reference, in order: score, p-value, decision, mask size and regions, or the read error.

    Images are read (a file that cannot be read becomes an error row, the others go on), grouped
    by size and scored ``scorer.batch_size`` (and at most :data:`BATCH_PIXELS` pixels) at a time.
    ``keep_maps`` keeps each anomaly map and mask in its row, ``keep_images`` the decoded image.
    """
    rows: list[ImagePrediction | None] = [None] * len(refs)
    by_shape: dict[tuple[int, ...], list[tuple[int, np.ndarray]]] = {}
    for i, ref in enumerate(refs):
        try:
            image = _read(ref)
        except ImageReadError as exc:
            rows[i] = ImagePrediction(ref.path, error=exc.problem)
            continue
        by_shape.setdefault(image.shape, []).append((i, image))
    cal = scorer.calibration
    for items in by_shape.values():
        for chunk in _chunks(items, scorer.batch_size):
            try:
                scores, maps = scorer.score_arrays(np.stack([image for _, image in chunk]))
            except AnomnetError as exc:
                for i, _ in chunk:
                    rows[i] = ImagePrediction(refs[i].path, error=f"could not be scored: {exc}")
                continue
            for (i, image), score, amap in zip(chunk, scores, maps):
                rows[i] = _row(cal, refs[i].path, float(score), amap, image, keep_maps, keep_images)
    return [r for r in rows if r is not None]


def _read(ref: ImageRef) -> np.ndarray:
    if ref.image is None:
        return imageio.read_image(ref.path)
    image = np.asarray(ref.image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ImageReadError(Path(ref.path), f"expected an HxWx3 RGB image, got an array of shape {image.shape}")
    return np.ascontiguousarray(image, dtype=np.float32)


def _chunks(items: list[tuple[int, np.ndarray]], batch_size: int) -> Iterator[list[tuple[int, np.ndarray]]]:
    if batch_size < 1:
        raise ConfigError(f"batch size must be at least 1, got {batch_size}")
    chunk: list[tuple[int, np.ndarray]] = []
    pixels = 0
    for item in items:
        size = item[1].shape[0] * item[1].shape[1]
        if chunk and (len(chunk) == batch_size or pixels + size > BATCH_PIXELS):
            yield chunk
            chunk, pixels = [], 0
        chunk.append(item)
        pixels += size
    if chunk:
        yield chunk


def _row(
    cal: Calibration, path: str, score: float, amap: np.ndarray, image: np.ndarray, keep_maps: bool, keep_images: bool
) -> ImagePrediction:
    amap = np.asarray(amap, dtype=np.float32)
    defective, mask = cal.verdict(score, amap)
    boxes = region_boxes(mask)
    return ImagePrediction(
        path,
        score,
        float(cal.p_values(np.array([score]))[0]),
        defective,
        threshold=float(cal.threshold),
        anomaly_map=amap if keep_maps else None,
        mask=mask if keep_maps else None,
        defect_pixels=int(mask.sum()),
        regions=len(boxes),
        boxes=boxes,
        image=image if keep_images else None,
    )
