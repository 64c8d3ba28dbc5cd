"""From a fitted detector to decisions: run it over the calibration images and set its thresholds.

* :func:`calibrate_detector` -- after ``fit``: image scores and pooled pixel values of the good
  validation images (plus, optionally, a labelled validation set) -> :class:`Calibration`.
* :func:`recalibrate` -- a saved model, new threshold choices (and optionally data) -> saved again,
  no refitting. Behind ``anomnet calibrate`` and ``api.calibrate``.
* :func:`load_labelled` -- the labelled validation set for the F1-optimal thresholds.

A **labelled validation set** is given as a folder laid out like a dataset's test part::

    labelled/
      good/              good images
      <defect>/          defective images, one folder per defect type (any name but good/ok)
      masks/             optional masks, <stem>.png / <stem>_mask.png, flat or masks/<defect>/
                         (ground_truth/<defect>/ as in MVTec AD works too)

or as a whole dataset folder (MVTec category or generic layout with train/), whose test split
is then used -- only do that with a split that is not the one you report test results on.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from anomnet.calibration import (
    PIXELS_PER_IMAGE,
    Calibration,
    LabelledStatistics,
    ThresholdOptions,
    calibrate,
)
from anomnet.data import _GOOD_NAMES, Sample, _MaskIndex, _subfolders, load_dataset
from anomnet.detectors.base import Detector
from anomnet.errors import ConfigError, DatasetError
from anomnet.evaluate import run_predictions
from anomnet.io import list_images
from anomnet.metrics import PixelMetricAccumulator
from anomnet.postprocess import MaskPostprocess
from anomnet.segsearch import search_segmentation

OPTION_FIELDS = {f.name for f in dataclasses.fields(ThresholdOptions)}
POSTPROCESS_FIELDS = {f.name for f in dataclasses.fields(MaskPostprocess)}


def validation_pixel_statistics(
    detector: Detector,
    validation: Sequence[Sample],
    batch_size: int = 8,
    per_image: int = PIXELS_PER_IMAGE,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Image scores of the good validation images and a seeded sample of up to ``per_image`` map values each."""
    scores: list[float] = []
    pixels: list[np.ndarray] = []
    g = torch.Generator().manual_seed(0)
    for _, pred in run_predictions(detector, validation, batch_size, progress="calibrate" if progress else None):
        scores.extend(pred.scores.tolist())
        for amap in pred.maps:
            flat = amap.reshape(-1)
            if flat.numel() > per_image:
                flat = flat[torch.randperm(flat.numel(), generator=g)[:per_image]]
            pixels.append(flat.numpy().astype(np.float32, copy=False))
    return np.asarray(scores, dtype=np.float64), (np.concatenate(pixels) if pixels else np.zeros(0, np.float32))


def labelled_statistics(
    detector: Detector,
    samples: Sequence[Sample],
    source: str,
    batch_size: int = 8,
    progress: bool = False,
    search: bool = False,
) -> LabelledStatistics:
    """Image F1-optimal threshold and (with masks) the pixel F1-optimal threshold on a labelled set.

    ``search``: also search the pixel threshold jointly with the mask post-processing for the best
    SegF1 (the ``segf1`` pixel method, :mod:`anomnet.segsearch`); the maps are kept for it.
    """
    has_masks = any(s.mask_path is not None for s in samples)
    acc = PixelMetricAccumulator() if has_masks else None
    kept_maps: list[np.ndarray] = []
    kept_masks: list[np.ndarray] = []
    scores: list[float] = []
    labels: list[int] = []
    for batch, pred in run_predictions(
        detector, samples, batch_size, with_masks=has_masks, progress="labelled" if progress else None
    ):
        scores.extend(pred.scores.tolist())
        labels.extend(s.label for s in batch.samples)
        if acc is not None:
            assert batch.masks is not None
            for amap, mask, s in zip(pred.maps, batch.masks, batch.samples):
                if s.label == 0 or s.mask_path is not None:  # a defective image without mask says nothing about pixels
                    acc.add(amap.numpy(), mask.numpy())
                    if search:
                        kept_maps.append(amap.numpy().astype(np.float32))
                        kept_masks.append(mask.numpy().astype(bool))
    pixel_f1 = pixel_thr = math.nan
    n_masks = sum(1 for s in samples if s.mask_path is not None)
    if acc is not None:
        px = acc.compute(pro_limits=(0.3,))
        pixel_f1, pixel_thr = px.f1_max, px.f1_threshold
    stats = LabelledStatistics.from_scores(source, np.asarray(scores), np.asarray(labels), pixel_f1, pixel_thr, n_masks)
    if search and n_masks and not math.isnan(pixel_thr):
        found = search_segmentation(kept_maps, kept_masks, pixel_thr)
        post = found.postprocess
        stats = dataclasses.replace(
            stats,
            search_f1=found.f1,
            search_threshold=found.threshold,
            search_closing=post.closing,
            search_fill_holes=bool(post.fill_holes),
            search_min_area=post.min_area,
            search_candidates=found.candidates,
        )
    return stats


def calibrate_detector(
    detector: Detector,
    validation: Sequence[Sample],
    options: ThresholdOptions | None = None,
    labelled: Sequence[Sample] | str | Path | None = None,
    postprocess: MaskPostprocess | None = None,
    batch_size: int | None = None,
    progress: bool = False,
) -> Calibration:
    """Set ``detector.calibration`` from its good validation images (and a labelled set) and return it."""
    bs: int = batch_size or int(getattr(detector.config, "batch_size", 8))
    scores, pixels = validation_pixel_statistics(detector, validation, bs, progress=progress)
    search = options is not None and options.pixel_method == "segf1"
    lab = _labelled(detector, labelled, bs, progress, search)
    detector.calibration = calibrate(
        scores, map_values=pixels, options=options or ThresholdOptions(), labelled=lab, postprocess=postprocess
    )
    return detector.calibration


def _labelled(
    detector: Detector,
    labelled: Sequence[Sample] | str | Path | None,
    batch_size: int,
    progress: bool,
    search: bool = False,
) -> LabelledStatistics | None:
    if labelled is None:
        return None
    source, samples = labelled_samples(labelled)
    return labelled_statistics(detector, samples, source, batch_size, progress, search)


def labelled_samples(labelled: Sequence[Sample] | str | Path) -> tuple[str, list[Sample]]:
    """``(source, samples)`` of a labelled validation set given as a folder or as samples."""
    if isinstance(labelled, (str, Path)):
        return str(labelled), load_labelled(labelled)
    return "given samples", list(labelled)


def recalibrate(
    detector: Detector,
    changes: dict[str, Any],
    validation: Sequence[Sample] | None = None,
    labelled: Sequence[Sample] | str | Path | None = None,
    progress: bool = False,
) -> Calibration:
    """New threshold choices / post-processing on a fitted detector, without refitting.

    ``changes`` holds :class:`ThresholdOptions` and :class:`MaskPostprocess` field names (others
    keep their current values). With ``validation`` the validation statistics are recomputed
    first (e.g. for a model saved before pixel statistics existed); otherwise the stored ones are used.
    """
    unknown = sorted(set(changes) - OPTION_FIELDS - POSTPROCESS_FIELDS)
    if unknown:
        raise ConfigError(
            f"unknown threshold / post-processing choice(s): {', '.join(unknown)}; "
            f"known: {', '.join(sorted(OPTION_FIELDS | POSTPROCESS_FIELDS))}"
        )
    old = detector.calibration
    options = dataclasses.replace(old.options, **{k: v for k, v in changes.items() if k in OPTION_FIELDS})
    post = dataclasses.replace(old.postprocess, **{k: v for k, v in changes.items() if k in POSTPROCESS_FIELDS})
    if validation is not None:
        if not validation and options.image_method != "fixed":
            raise ConfigError(
                "no good validation images to calibrate the threshold on (--val-fraction 0 or too few training "
                "images): hold some out (--val-fraction 0.1), or give a fixed threshold (--image-threshold fixed)"
            )
        return calibrate_detector(detector, validation, options, labelled, post, progress=progress)
    bs = getattr(detector.config, "batch_size", 8)
    lab = _labelled(detector, labelled, bs, progress, options.pixel_method == "segf1")
    detector.calibration = old.rethreshold(options, lab, post)
    return detector.calibration


def load_labelled(path: str | Path) -> list[Sample]:
    """The images of a labelled validation set (layout in this module's docstring)."""
    root = Path(path)
    if not root.is_dir():
        raise DatasetError(f"{root}: labelled validation folder not found")
    if (root / "train").is_dir():
        samples = load_dataset(root).test
    else:
        test_dir = next((root / n for n in ("test", "test_public") if (root / n).is_dir()), root)
        mask_root = next((d / n for d in (root, test_dir) for n in ("masks", "ground_truth") if (d / n).is_dir()), None)
        flat = _MaskIndex(mask_root) if mask_root is not None else None
        samples = []
        for folder in _subfolders(test_dir, skip=("masks", "ground_truth")):
            images = list_images(folder, recursive=True)
            if folder.name in _GOOD_NAMES:
                samples.extend(Sample(p, 0) for p in images)
                continue
            per_defect = _MaskIndex(mask_root / folder.name, recursive=True) if mask_root is not None else None
            for image in images:
                mask = (per_defect.find(image.stem) if per_defect else None) or (
                    flat.find(image.stem) if flat else None
                )
                samples.append(Sample(image, 1, mask, folder.name))
    if not samples:
        raise DatasetError(f"{root}: no images in the labelled validation set (expected good/ and <defect>/ folders)")
    if not any(s.label for s in samples):
        raise DatasetError(
            f"{root}: the labelled validation set has no defective images (one folder per defect type next to good/)"
        )
    return samples


def parse_choices(raw: dict[str, Any]) -> dict[str, Any]:
    """Threshold / post-processing choices given as text (``{"pixel_method": "mean-std", "closing": "8"}``)
    turned into their fields' types; ConfigError names an unknown choice or a bad value."""
    types = {f.name: str(f.type) for cls in (ThresholdOptions, MaskPostprocess) for f in dataclasses.fields(cls)}
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in types:
            raise ConfigError(f"unknown threshold / post-processing choice {key!r}; known: {', '.join(sorted(types))}")
        kind = types[key].replace(" | None", "")
        if not isinstance(value, str) or kind == "str":
            out[key] = value
            continue
        try:
            if kind == "bool":
                if value.lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                    raise ValueError(value)
                out[key] = value.lower() in ("1", "true", "yes", "on")
            else:
                out[key] = {"int": int, "float": float}[kind](value)
        except ValueError:
            raise ConfigError(f"threshold choice {key}={value!r} is not a valid {kind}") from None
    return out


def split_choices(choices: dict[str, Any], base: Calibration | None = None) -> tuple[ThresholdOptions, MaskPostprocess]:
    """Options and post-processing from ``choices`` on top of ``base``'s (or the defaults)."""
    options = base.options if base is not None else ThresholdOptions()
    post = base.postprocess if base is not None else MaskPostprocess()
    options = dataclasses.replace(options, **{k: v for k, v in choices.items() if k in OPTION_FIELDS})
    post = dataclasses.replace(post, **{k: v for k, v in choices.items() if k in POSTPROCESS_FIELDS})
    return options, post
