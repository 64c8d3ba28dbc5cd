"""From a fitted detector to decisions: run it over the calibration images and set its thresholds.

* :func:`calibrate_detector` -- after ``fit``: image scores and pooled pixel values of the good
  validation images (plus, optionally, a labelled validation set) -> :class:`Calibration`.
* :func:`recalibrate` -- a saved model, new threshold choices (and optionally data) -> saved again,
  no refitting. Behind ``anomnet calibrate`` and ``api.calibrate``.
* :func:`leave_one_out_statistics` / :func:`out_of_fold_statistics` -- the training images' own
  calibration scores: each scored without its own memory-bank patches (``loo``), or by a model
  fitted on the other folds (``crossfit``); they calibrate beside any held-out images (pooled).
* :func:`find_suspects` -- training images whose left-out score stands far above the others'.
* :func:`content_hash` -- what a model records of each training image, so later calibration
  data that overlaps the training set is found.
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
import hashlib
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from anomnet.data import _GOOD_NAMES, Sample, _MaskIndex, _progress_bar, _subfolders, load_dataset
from anomnet.decisions.calibration import (
    PIXELS_PER_IMAGE,
    SOURCES,
    Calibration,
    LabelledStatistics,
    ThresholdOptions,
    calibrate,
)
from anomnet.decisions.postprocess import MaskPostprocess
from anomnet.decisions.segsearch import search_segmentation
from anomnet.detectors.base import Detector
from anomnet.errors import ConfigError, DatasetError
from anomnet.evaluation.evaluate import run_predictions
from anomnet.evaluation.metrics import PixelMetricAccumulator
from anomnet.imageio import list_images

OPTION_FIELDS = {f.name for f in dataclasses.fields(ThresholdOptions)}
POSTPROCESS_FIELDS = {f.name for f in dataclasses.fields(MaskPostprocess)}
HASH_CHARS = 16  # hex digits of SHA-256 kept per training image (64 bits: no collision in practice)
SUSPECT_Z = 5.0  # a training image is suspect when its left-out score lies this many robust stds above the median
MAX_SUSPECTS = 5
DEFAULT_FOLDS = 5
# the image threshold a model decides with, given its labelled statistics (the segf1 search scores under it)
ImageThresholdOf = Callable[[LabelledStatistics], float]
# Calibration source per detector when none is asked for (measured, docs/decisions.md); others: holdout.
# The hybrid leaves out through its chosen branch (held-out images calibrate when that branch cannot).
DEFAULT_SOURCES = {"patchcore": "loo", "tocoad": "loo", "cpr": "loo", "hybrid": "loo"}
# Detectors that train calibrate by cross-fitting when they have fewer good training images than this (a 10 %
# hold-out of fewer than 10 images supports no rate below 1/11); more images: hold-out. Measured for AnomNet on
# PIPED (32 images): hold-out flagged 20 of 128 good test images at 1 % asked, cross-fitting 1; INP-Former 25 and 11
# (docs/decisions.md). EfficientAD's fits take minutes each: five more are not a default.
CROSSFIT_BELOW = {"anomnet": 100, "inpformer": 100}


@dataclasses.dataclass
class ImageStatistics:
    """Image scores of some good images and a seeded sample of each one's map values, in the images' order."""

    scores: np.ndarray
    pixels: list[np.ndarray]

    @classmethod
    def empty(cls) -> ImageStatistics:
        return cls(np.zeros(0, dtype=np.float64), [])

    def __add__(self, other: ImageStatistics) -> ImageStatistics:
        return ImageStatistics(np.concatenate([self.scores, other.scores]), self.pixels + other.pixels)

    def pooled_pixels(self) -> np.ndarray:
        return np.concatenate(self.pixels) if self.pixels else np.zeros(0, np.float32)


def _pixel_sample(amap: torch.Tensor, per_image: int, g: torch.Generator) -> np.ndarray:
    flat = amap.reshape(-1)
    if per_image <= 0:
        return np.zeros(0, np.float32)
    if flat.numel() > per_image:
        flat = flat[torch.randperm(flat.numel(), generator=g)[:per_image]]
    return flat.numpy().astype(np.float32, copy=False)


def image_statistics(
    detector: Detector,
    samples: Sequence[Sample],
    batch_size: int,
    g: torch.Generator,
    per_image: int = PIXELS_PER_IMAGE,
    progress: str | None = None,
) -> ImageStatistics:
    """Scores and pixel samples of ``samples`` as the detector predicts them."""
    scores: list[float] = []
    pixels: list[np.ndarray] = []
    for _, pred in run_predictions(detector, samples, batch_size, progress=progress):
        scores.extend(pred.scores.tolist())
        pixels.extend(_pixel_sample(amap, per_image, g) for amap in pred.maps)
    return ImageStatistics(np.asarray(scores, dtype=np.float64), pixels)


def validation_pixel_statistics(
    detector: Detector,
    validation: Sequence[Sample],
    batch_size: int = 8,
    per_image: int = PIXELS_PER_IMAGE,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Image scores of the good validation images and a seeded sample of up to ``per_image`` map values each."""
    g = torch.Generator().manual_seed(0)
    stats = image_statistics(detector, validation, batch_size, g, per_image, "calibrate" if progress else None)
    return stats.scores, stats.pooled_pixels()


def content_hash(path: str | Path) -> str:
    """First :data:`HASH_CHARS` hex digits of the SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError as exc:
        raise DatasetError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    return digest.hexdigest()[:HASH_CHARS]


def leave_one_out_statistics(
    detector: Detector,
    samples: Sequence[Sample],
    owners: Sequence[Sequence[int]],
    g: torch.Generator,
    per_image: int = PIXELS_PER_IMAGE,
    progress: bool = False,
) -> ImageStatistics:
    """Each training image ``samples[i]`` scored with the bank patches of the training images ``owners[i]``
    (itself, and any byte-identical copy) left out of every nearest-neighbour search: one pass, no refit."""
    if not detector.supports_leave_out:
        raise ConfigError(
            f"the {detector.name} model cannot leave one training image out (it does not record which image each "
            "part of it came from): calibrate with held-out images (--calibration holdout) or refit"
        )
    stats = ImageStatistics.empty()
    bar = _progress_bar("leave-one-out" if progress else None, len(samples))
    for sample, own in zip(samples, owners):
        with detector.leave_out(own):
            stats = stats + image_statistics(detector, [sample], 1, g, per_image)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return stats


def same_image_owners(hashes: Sequence[str]) -> list[list[int]]:
    """For each training image the positions of every training image with its content (itself first)."""
    where: dict[str, list[int]] = {}
    for i, h in enumerate(hashes):
        where.setdefault(h, []).append(i)
    return [[i] + [j for j in where[h] if j != i] for i, h in enumerate(hashes)]


def fold_assignment(n: int, folds: int, seed: int) -> np.ndarray:
    """The fold (0 .. folds-1) of each of ``n`` images: a seeded permutation dealt round-robin."""
    if folds < 2:
        raise ConfigError(f"cross-fitting needs at least 2 folds, got {folds}")
    if n < folds:
        raise ConfigError(f"cross-fitting with {folds} folds needs at least {folds} training images, got {n}")
    fold = np.empty(n, dtype=np.int64)
    fold[np.random.default_rng(seed).permutation(n)] = np.arange(n) % folds
    return fold


def out_of_fold_statistics(
    make: Callable[[], Detector],
    train: Sequence[Sample],
    validation: Sequence[Sample],
    folds: int = DEFAULT_FOLDS,
    seed: int = 0,
    per_image: int = PIXELS_PER_IMAGE,
    progress: bool = False,
    scale_to: Detector | None = None,
) -> ImageStatistics:
    """Cross-fitting: every training image scored by a fresh detector (``make()``) fitted on the other folds.

    Returns the statistics in ``train``'s order. ``folds`` fits, each on ``(folds - 1) / folds`` of
    the images; the final model is fitted on all of them by the caller. ``scale_to`` (the fitted final
    model): each fold model's scores and map values are multiplied by the final model's median score on
    its training images over the fold model's median score on its own, so that a fold model whose fit
    landed on another score scale calibrates on the final model's.
    """
    fold = fold_assignment(len(train), folds, seed)
    g = torch.Generator().manual_seed(0)
    scores = np.zeros(len(train), dtype=np.float64)
    pixels: list[np.ndarray] = [np.zeros(0, np.float32)] * len(train)

    def median_score(detector: Detector, samples: Sequence[Sample]) -> float:  # no pixel sample: g untouched
        return float(np.median(image_statistics(detector, samples, detector.config.batch_size, g, 0).scores))

    reference = median_score(scale_to, train) if scale_to is not None else None
    for f in range(folds):
        inside = [s for s, k in zip(train, fold) if k != f]
        held = [i for i, k in enumerate(fold) if k == f]
        detector = make()
        detector.fit(inside, validation, progress=progress)
        bs = detector.config.batch_size
        stats = image_statistics(detector, [train[i] for i in held], bs, g, per_image)
        factor = 1.0
        if reference is not None:
            own = median_score(detector, inside)
            factor = reference / own if own > 0 and reference > 0 else 1.0
        for j, i in enumerate(held):
            scores[i], pixels[i] = stats.scores[j] * factor, stats.pixels[j] * np.float32(factor)
    return ImageStatistics(scores, pixels)


def find_suspects(
    scores: np.ndarray, samples: Sequence[Sample], z: float = SUSPECT_Z, most: int = MAX_SUSPECTS
) -> list[dict[str, Any]]:
    """Training images whose left-out score ``s`` stands out: ``(s - median) / (1.4826 MAD) > z``, highest first.

    The median and the median absolute deviation (MAD, scaled to a normal std) of the training images'
    own left-out scores are barely moved by a few odd images, so a defective or wrong part among the
    goods stands out against the rest. At most ``most`` are listed.
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.size < 5:
        return []
    median = float(np.median(s))
    spread = 1.4826 * float(np.median(np.abs(s - median)))
    if spread <= 0:
        spread = float(np.std(s)) or 1.0
    robust = (s - median) / spread
    order = [int(i) for i in np.argsort(-robust, kind="stable") if robust[i] > z][:most]
    return [
        {"rank": r + 1, "image": str(samples[i].path), "score": float(s[i]), "z": float(robust[i])}
        for r, i in enumerate(order)
    ]


def labelled_statistics(
    detector: Detector,
    samples: Sequence[Sample],
    source: str,
    batch_size: int = 8,
    progress: bool = False,
    search: ImageThresholdOf | None = None,
) -> LabelledStatistics:
    """Image F1-optimal threshold and (with masks) the pixel F1-optimal threshold on a labelled set.

    ``search``: also search the pixel threshold jointly with the mask post-processing for the best
    SegF1 (the ``segf1`` pixel method, :mod:`anomnet.decisions.segsearch`); the maps are kept for it.
    ``search`` gives the image threshold the model will decide with (it may depend on these labelled
    statistics): images scored below it have no mask in the search, as in the model's verdict.
    """
    has_masks = any(s.mask_path is not None for s in samples)
    acc = PixelMetricAccumulator() if has_masks else None
    kept_maps: list[np.ndarray] = []
    kept_masks: list[np.ndarray] = []
    kept_scores: list[float] = []
    scores: list[float] = []
    labels: list[int] = []
    for batch, pred in run_predictions(
        detector, samples, batch_size, with_masks=has_masks, progress="labelled" if progress else None
    ):
        scores.extend(pred.scores.tolist())
        labels.extend(s.label for s in batch.samples)
        if acc is not None:
            assert batch.masks is not None
            for amap, mask, s, score in zip(pred.maps, batch.masks, batch.samples, pred.scores.tolist()):
                if s.label == 0 or s.mask_path is not None:  # a defective image without mask says nothing about pixels
                    acc.add(amap.numpy(), mask.numpy())
                    if search is not None:
                        kept_maps.append(amap.numpy().astype(np.float32))
                        kept_masks.append(mask.numpy().astype(bool))
                        kept_scores.append(float(score))
    pixel_f1 = pixel_thr = math.nan
    n_masks = sum(1 for s in samples if s.mask_path is not None)
    if acc is not None:
        px = acc.compute(pro_limits=(0.3,))
        pixel_f1, pixel_thr = px.f1_max, px.f1_threshold
    stats = LabelledStatistics.from_scores(source, np.asarray(scores), np.asarray(labels), pixel_f1, pixel_thr, n_masks)
    if search is not None and n_masks and not math.isnan(pixel_thr):
        threshold = search(stats)
        found = search_segmentation(kept_maps, kept_masks, pixel_thr, called_good=[s < threshold for s in kept_scores])
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
    *,
    train: Sequence[Sample] | None = None,
    source: str = "holdout",
    out_of_fold: ImageStatistics | None = None,
) -> Calibration:
    """Set ``detector.calibration`` from its calibration images (and a labelled set) and return it.

    ``source`` says which images calibrate (see :data:`anomnet.decisions.calibration.SOURCES`): ``holdout``
    the good ``validation`` images only; ``loo`` also every ``train`` image, scored without its own
    memory-bank patches (:func:`leave_one_out_statistics`); ``crossfit`` also every ``train`` image
    with its ``out_of_fold`` statistics (:func:`out_of_fold_statistics`). The scores are pooled.
    With ``train`` the calibration records their content hashes, and with training scores the
    suspect training images (:func:`find_suspects`).
    """
    if source not in SOURCES:
        raise ConfigError(f"calibration source {source!r} unknown; use one of: {', '.join(SOURCES)}")
    if source != "holdout" and train is None:
        raise ConfigError(f"the {source} calibration needs the training images")
    bs: int = batch_size or detector.config.batch_size
    train = list(train or [])
    hashes = [content_hash(s.path) for s in train]
    g = torch.Generator().manual_seed(0)
    own = ImageStatistics.empty()
    if source == "loo" and detector.can_leave_out and not detector.supports_leave_out and validation:
        source = "holdout"  # a hybrid whose chosen branch cannot leave out: its held-out images calibrate
    if source == "loo":
        if len(set(hashes)) < 2:
            raise ConfigError(
                f"leave-one-out calibration needs at least 2 different training images, got {len(set(hashes))}: "
                "add good images, or calibrate on held-out ones (--calibration holdout --val-fraction 0.1)"
            )
        own = leave_one_out_statistics(detector, train, same_image_owners(hashes), g, progress=progress)
    elif source == "crossfit":
        if out_of_fold is None or out_of_fold.scores.size != len(train):
            raise ConfigError("the crossfit calibration needs the out-of-fold statistics of every training image")
        own = out_of_fold
    held = image_statistics(detector, validation, bs, g, progress="calibrate" if progress else None)
    note = describe_source(source, len(own.scores), len(held.scores))
    cal = _calibrate(detector, own + held, options, labelled, postprocess, bs, progress)
    cal.source, cal.source_note, cal.training_hashes = source, note, hashes
    cal.suspects = find_suspects(own.scores, train) if own.scores.size else []
    detector.calibration = cal
    return cal


def describe_source(source: str, own: int, held: int, reused: int = 0, dropped: int = 0) -> str:
    """The calibration set in words."""
    parts = []
    if own:
        how = {
            "loo": "each scored without its own memory-bank patches (leave-one-out)",
            "crossfit": "each scored by a model fitted without its fold (cross-fitting)",
        }[source]
        parts.append(f"{own} training images, {how}")
    if reused:
        parts.append(f"{reused} of the given images were training images of this model: each scored leave-one-out")
    if dropped:
        parts.append(
            f"{dropped} of the given images were training images of this model and are left out (a model scores "
            "its own training images lower than new good images)"
        )
    if held or not parts:
        parts.append(f"{held} good images held out of training")
    return "; ".join(parts)


def _calibrate(
    detector: Detector,
    stats: ImageStatistics,
    options: ThresholdOptions | None,
    labelled: Sequence[Sample] | str | Path | None,
    postprocess: MaskPostprocess | None,
    batch_size: int,
    progress: bool,
) -> Calibration:
    options = options or ThresholdOptions()

    def image_threshold(lab: LabelledStatistics) -> float:
        return calibrate(stats.scores, options=_image_only(options), labelled=lab).threshold

    search = image_threshold if options.pixel_method == "segf1" else None
    lab = _labelled(detector, labelled, batch_size, progress, search)
    return calibrate(
        stats.scores,
        map_values=stats.pooled_pixels(),
        options=options,
        labelled=lab,
        postprocess=postprocess,
    )


def _image_only(options: ThresholdOptions) -> ThresholdOptions:
    """``options`` with a pixel threshold that needs nothing: for the image threshold alone."""
    return dataclasses.replace(options, pixel_method="fixed", pixel_value=0.0)


def _labelled(
    detector: Detector,
    labelled: Sequence[Sample] | str | Path | None,
    batch_size: int,
    progress: bool,
    search: ImageThresholdOf | None = None,
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
    keep their current values). With ``validation`` the calibration statistics are recomputed
    first from those good images; any of them the model was trained on (found by content hash) is
    scored leave-one-out where the model can do that, else left out -- a model's own training
    images score lower than new good images. Otherwise the stored statistics are used.
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
        return _recalibrate_on(detector, validation, options, labelled, post, progress)
    bs = detector.config.batch_size

    def image_threshold(lab: LabelledStatistics) -> float:
        return old.rethreshold(_image_only(options), lab, post).threshold

    lab = _labelled(detector, labelled, bs, progress, image_threshold if options.pixel_method == "segf1" else None)
    detector.calibration = old.rethreshold(options, lab, post)
    return detector.calibration


def _recalibrate_on(
    detector: Detector,
    images: Sequence[Sample],
    options: ThresholdOptions,
    labelled: Sequence[Sample] | str | Path | None,
    post: MaskPostprocess,
    progress: bool,
) -> Calibration:
    """Calibration statistics recomputed from good ``images``; training images among them found by hash."""
    old = detector.calibration
    positions: dict[str, list[int]] = {}
    for i, h in enumerate(old.training_hashes):
        positions.setdefault(h, []).append(i)
    trained: list[tuple[int, Sample]] = []
    fresh: list[Sample] = []
    for sample in images:
        h = content_hash(sample.path) if positions else ""
        if h in positions:
            trained.append((positions[h][0], sample))
        else:
            fresh.append(sample)
    trained.sort(key=lambda t: t[0])  # training order, as at fit: the same data gives the same calibration
    loo = bool(trained) and detector.supports_leave_out
    if not fresh and not loo and options.image_method != "fixed":
        raise ConfigError(
            "no good calibration images left: "
            + (f"all {len(trained)} given images were training images of this model; " if trained else "")
            + "give good images it was not trained on, or a fixed threshold (--image-threshold fixed)"
        )
    bs = detector.config.batch_size
    g = torch.Generator().manual_seed(0)
    own = ImageStatistics.empty()
    if loo:
        owners = [positions[old.training_hashes[i]] for i, _ in trained]
        own = leave_one_out_statistics(detector, [s for _, s in trained], owners, g, progress=progress)
    held = image_statistics(detector, fresh, bs, g, progress="calibrate" if progress else None)
    all_training = loo and len(trained) == len(old.training_hashes)
    if all_training:  # the model's whole training set, leave-one-out: as at fit
        note = describe_source("loo", len(trained), len(fresh))
    else:
        note = describe_source("loo", 0, len(fresh), len(trained) if loo else 0, 0 if loo else len(trained))
    cal = _calibrate(detector, own + held, options, labelled, post, bs, progress)
    cal.source = "loo" if loo else "holdout"
    cal.source_note, cal.training_hashes, cal.excluded = note, old.training_hashes, old.excluded
    cal.suspects = find_suspects(own.scores, [s for _, s in trained]) if all_training else []
    detector.calibration = cal
    return cal


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
