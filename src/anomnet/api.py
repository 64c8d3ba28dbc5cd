"""Python API; the CLI is a thin layer over these functions.

>>> from anomnet import api
>>> detector = api.fit("patchcore", "path/to/bottle", out="runs/bottle")
>>> result = api.test("runs/bottle", "path/to/bottle")
>>> for p in api.predict("runs/bottle", ["part1.png", "part2.png"]): print(p.path, p.score, p.defective)
"""

from __future__ import annotations

import json
import os
import random
import sys
from collections.abc import Iterable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from anomnet import imageio
from anomnet.data import DatasetSplit, Sample, load_dataset
from anomnet.decisions.calibrate import (
    CROSSFIT_BELOW,
    DEFAULT_FOLDS,
    DEFAULT_SOURCES,
    calibrate_detector,
    fold_assignment,
    labelled_samples,
    out_of_fold_statistics,
    recalibrate,
    split_choices,
)
from anomnet.decisions.calibration import SOURCES
from anomnet.detectors import DEFAULT_DETECTOR, Detector, create_detector
from anomnet.errors import AnomnetError, ConfigError
from anomnet.evaluation.evaluate import EvaluationResult, evaluate
from anomnet.model_io import check_model_target
from anomnet.predict.inputs import unique_names
from anomnet.predict.outputs import predict_files
from anomnet.predict.scoring import ImagePrediction
from anomnet.predict.shard import Shard
from anomnet.predict.visualize import heatmap, labelled_panels, overlay


def fit(
    model: str = DEFAULT_DETECTOR,
    data: str | Path | DatasetSplit = "",
    out: str | Path | None = None,
    category: str | None = None,
    layout: str = "auto",
    settings: dict[str, Any] | None = None,
    val_fraction: float | None = None,
    seed: int = 0,
    max_false_alarm: float = 0.01,
    max_train: int | None = None,
    progress: bool = True,
    labelled: str | Path | Sequence[Sample] | None = None,
    overwrite: bool = False,
    calibration: str = "auto",
    folds: int = DEFAULT_FOLDS,
    exclude_suspects: bool = False,
    **thresholds: Any,
) -> Detector:
    """Fit ``model`` on the good training images of ``data``, calibrate its thresholds, save to ``out``.

    ``calibration``: where the calibration scores come from (docs/decisions.md): ``loo`` every
    training image scored without its own memory-bank patches (memory-bank detectors), ``crossfit``
    every training image scored by a model fitted on the other ``folds`` folds, ``holdout`` only
    good images held out of training; ``auto`` the detector's measured default (PatchCore, ToCoAD
    and CPR ``loo``, the hybrid through its chosen branch; AnomNet and INP-Former ``crossfit`` below 100
    good training images; the others ``holdout``).
    ``val_fraction``: share of the training images held out (``None``: 0.1 for ``holdout``, none
    otherwise); held-out images (and a dataset's own validation
    images, e.g. MVTec AD 2's or ELPV's) calibrate too, pooled with the training images' scores.
    ``exclude_suspects``: refit without the suspect training images the first calibration lists.
    ``thresholds``: threshold and mask post-processing choices (``image_method``, ``std_k``,
    ``image_value``, ``pixel_method``, ``pixel_false_alarm``, ``pixel_value``, ``closing``,
    ``fill_holes``, ``min_area``; see :mod:`anomnet.decisions.calibration`); ``labelled``: a labelled
    validation set for the ``f1`` methods (see :mod:`anomnet.decisions.calibrate`). ``out`` must not
    hold a model yet unless ``overwrite``; it is checked before any work.
    """
    if max_train is not None and max_train < 1:
        raise ConfigError(f"max_train must be at least 1, got {max_train}")
    if out is not None:
        _check_out_holds_no_data(out, data, labelled)
        check_model_target(out, overwrite)
    asked = {"seed": seed, **(settings or {})}
    make = partial(create_detector, model, asked)
    detector = make()
    source = resolve_source(calibration, detector, _image_count(data, category, layout, calibration, detector))
    if source == "crossfit":
        fold_assignment(folds, folds, seed)  # a bad fold count fails before any work
    if val_fraction is None and detector.needs_validation and labelled is None:
        val_fraction = 0.1  # its fit needs held-out good images, whatever calibrates (they calibrate too)
    split = data if isinstance(data, DatasetSplit) else _load_for(source, data, category, layout, val_fraction, seed)
    _print_warnings(split)
    train = list(split.train)
    if max_train is not None and len(train) > max_train:
        train = sorted(random.Random(seed).sample(train, max_train), key=lambda s: str(s.path))
    if source == "holdout" and not split.validation and thresholds.get("image_method", "conformal") != "fixed":
        raise ConfigError(
            "no good validation images to calibrate the threshold on (--val-fraction 0 or too few training images): "
            "hold some out (--val-fraction 0.1), calibrate on the training images (--calibration loo or crossfit), "
            "or give a fixed threshold (--image-threshold fixed --image-value V)"
        )
    options, post = split_choices({"max_false_alarm": max_false_alarm, **thresholds})
    excluded: list[str] = []
    for attempt in range(2):
        if labelled is not None and detector.accepts_labelled:  # the hybrid chooses its branch
            detector.labelled_validation = labelled_samples(labelled)[1]
        detector.fit(train, split.validation, progress=progress)
        out_of_fold = None
        if source == "crossfit":  # fold models train as the final model did (its fold_settings)
            make_fold = partial(create_detector, model, {**asked, **detector.fold_settings()})
            scale_to = detector if detector.rescale_folds else None
            out_of_fold = out_of_fold_statistics(
                make_fold, train, split.validation, folds, seed, progress=progress, scale_to=scale_to
            )
        cal = calibrate_detector(
            detector,
            split.validation,
            options,
            labelled,
            post,
            progress=progress,
            train=train,
            source=source,
            out_of_fold=out_of_fold,
        )
        if attempt or not exclude_suspects or not cal.suspects:
            break
        excluded = [str(s["image"]) for s in cal.suspects]
        train = [s for s in train if str(s.path) not in set(excluded)]
        detector = make()
    detector.calibration.excluded = excluded
    if out is not None:
        detector.save(out)
    return detector


def resolve_source(calibration: str, detector: Detector, images: int | None = None) -> str:
    """The calibration source asked for, ``auto`` resolved for ``detector`` (with ``images`` good training
    images: cross-fitting below :data:`CROSSFIT_BELOW` for a detector listed there); ConfigError when it cannot
    be used."""
    if calibration == "auto":
        below = CROSSFIT_BELOW.get(detector.name)
        if below is not None and images is not None and images < below:
            return "crossfit"
        return DEFAULT_SOURCES.get(detector.name, "holdout")
    if calibration not in SOURCES:
        raise ConfigError(f"calibration {calibration!r} unknown; use auto or one of: {', '.join(SOURCES)}")
    if calibration == "loo" and not detector.can_leave_out:
        raise ConfigError(
            f"the {detector.name} detector cannot leave one training image out (only memory-bank and retrieval "
            "detectors: patchcore, tocoad, cpr, and a hybrid choosing one); use --calibration crossfit or holdout"
        )
    return calibration


def _image_count(
    data: str | Path | DatasetSplit, category: str | None, layout: str, calibration: str, detector: Detector
) -> int | None:
    """The good training images ``auto`` counts for ``detector`` (None when its choice does not depend on them)."""
    if calibration != "auto" or detector.name not in CROSSFIT_BELOW:
        return None
    split = data if isinstance(data, DatasetSplit) else load_dataset(data, category, layout, 0.0)
    return len(split.train) + (len(split.validation) if isinstance(data, DatasetSplit) else 0)


def _load_for(
    source: str, data: str | Path, category: str | None, layout: str, val_fraction: float | None, seed: int
) -> DatasetSplit:
    """The dataset split for a fit: with ``val_fraction=None`` and a source that calibrates on the training
    images, no training image is held out (a dataset's own validation images are kept)."""
    if val_fraction is not None or source == "holdout":
        return load_dataset(data, category, layout, 0.1 if val_fraction is None else val_fraction, seed)
    split = load_dataset(data, category, layout, 0.1, seed)
    whole = load_dataset(data, category, layout, 0.0, seed)
    carved = {s.path for s in split.train + split.validation} == {s.path for s in whole.train}
    return whole if carved else split


def _check_out_holds_no_data(out: str | Path, *sources: object) -> None:
    """A model folder is replaced whole: it must not be, or hold, a dataset the command reads."""
    target = Path(os.path.realpath(out))
    for source in sources:
        if isinstance(source, (str, Path)) and str(source) and Path(source).exists():
            real = Path(os.path.realpath(source))
            if real.is_relative_to(target):
                raise ConfigError(f"model folder {out} holds the dataset {source}: choose an --out outside the data")


def load(model_dir: str | Path) -> Detector:
    """Load a saved model folder."""
    return Detector.load(model_dir)


def test(
    model_dir: str | Path | Detector,
    data: str | Path | DatasetSplit,
    category: str | None = None,
    layout: str = "auto",
    json_out: str | Path | None = None,
    eval_size: int | None = None,
    batch_size: int = 8,
    heatmaps_dir: str | Path | None = None,
    heatmaps: int = 6,
    progress: bool = True,
    report: str | Path | None = None,
) -> EvaluationResult:
    """Evaluate a model on the test split of ``data``; optionally write metrics JSON, heat maps and an HTML report."""
    if report is not None:
        from anomnet.evaluation import report as _report  # matplotlib is imported only when a report is asked for

        _report.check_report_path(report)  # a bad path fails now, not after the evaluation
    detector = model_dir if isinstance(model_dir, Detector) else load(model_dir)
    split = data if isinstance(data, DatasetSplit) else load_dataset(data, category, layout)
    _print_warnings(split)
    if not split.test:
        raise AnomnetError(f"{split.name}: no test images to evaluate")
    # A report also needs the curves and the worst cases, recorded by the same evaluation pass.
    keep_worst, curve_points = (0, 0) if report is None else (_report.WORST_CASES, _report.CURVE_POINTS)
    result = evaluate(
        detector, split.test, batch_size, eval_size, progress, keep_worst=keep_worst, curve_points=curve_points
    )
    if report is not None:
        _report.write_report(
            result, detector, report, split.name, None if isinstance(model_dir, Detector) else model_dir
        )
    if json_out is not None:
        payload = {
            "dataset": split.name,
            "detector": detector.name,
            "config": detector.config.to_dict(),
            "threshold": detector.calibration.threshold,
            "pixel_threshold": detector.calibration.pixel_threshold
            if np.isfinite(detector.calibration.pixel_threshold)
            else None,
            "test_images": len(split.test),
            "pixel_metrics_images": result.pixel_images,
            "pixel_metrics_skipped": result.pixel_skipped,  # defective images without a mask: image metrics only
            "seconds_per_image": result.seconds_per_image,
            "metrics": {k: (None if v != v else v) for k, v in result.metrics.items()},  # NaN -> null
        }
        imageio.atomic_write_text(json_out, json.dumps(payload, indent=2, default=_json_default, allow_nan=False))
    if heatmaps_dir is not None and heatmaps > 0:
        write_heatmaps(detector, _showcase(split.test, heatmaps), heatmaps_dir)
    return result


def predict(
    model_dir: str | Path | Detector,
    images: Iterable[str | Path],
    keep_maps: bool = False,
    out_dir: str | Path | None = None,
    raw_maps: bool = False,
    progress: bool = False,
    shard: str | Shard | None = None,
    out_layout: str = "anomnet",
) -> list[ImagePrediction]:
    """Score each image file (folders are searched recursively, ``"-"`` reads paths from stdin).

    ``model_dir``: a fitted model folder, an exported model folder (``anomnet export``) or a detector.
    (The work is :func:`anomnet.predict.outputs.predict_files`, which imports no torch.)

    Each result has score, p_value, defective, the mask's size, regions and boxes; ``anomaly_map`` and
    ``mask`` are arrays only with ``keep_maps=True`` (else None). A bad file gets ``error`` set, the rest
    go on. With ``out_dir``: heat maps, overlays, masks (and raw float32 maps with
    ``raw_maps``), results.csv and results.jsonl (layout in :mod:`anomnet.predict.outputs`). ``shard``
    (``"i/N"``): only shard ``i`` of ``N`` of the path-sorted inputs (see :mod:`anomnet.predict.shard`).
    ``out_layout="mvtec-ad2"``: instead of those files only the float16 maps and the masks in MVTec AD 2's
    submission layout (:mod:`anomnet.predict.submission`).
    """
    return predict_files(model_dir, images, keep_maps, out_dir, raw_maps, progress, shard, out_layout)


def calibrate(
    model_dir: str | Path | Detector,
    data: str | Path | DatasetSplit | None = None,
    category: str | None = None,
    val_fraction: float = 0.1,
    labelled: str | Path | Sequence[Sample] | None = None,
    save: bool = True,
    progress: bool = True,
    calibration: str | None = None,
    **choices: Any,
) -> Detector:
    """Choose other thresholds / mask post-processing for a fitted model without refitting.

    ``choices`` as in :func:`fit`; the rest keep their saved values. Without ``data`` the saved
    calibration statistics are used; with it they are recomputed from its validation split
    (seeded with the model's seed) and, when the calibration source is ``loo`` (``calibration``,
    default the model's own), its training images too. Images the model was trained on are found
    by content hash: scored leave-one-out where the model can, else left out (the summary says how
    many). The model folder is saved again when ``save``.
    """
    detector = model_dir if isinstance(model_dir, Detector) else load(model_dir)
    source = calibration or detector.calibration.source
    if source != detector.calibration.source and data is None:
        raise ConfigError(f"changing the calibration source to {source} needs the images: give --data")
    if source not in ("holdout", "loo"):
        raise ConfigError(
            f"calibrate cannot recompute a {source} calibration (it needs refitting on folds): "
            "give --calibration holdout or loo, or refit"
        )
    if source == "loo":
        resolve_source("loo", detector)
    validation = None
    if data is not None:
        split = (
            data
            if isinstance(data, DatasetSplit)
            else load_dataset(data, category, "auto", val_fraction, detector.config.seed)
        )
        validation = (list(split.train) if source == "loo" else []) + list(split.validation)
    recalibrate(detector, choices, validation, labelled, progress)
    if save and not isinstance(model_dir, Detector):
        detector.save(model_dir)
    return detector


def write_heatmaps(detector: Detector, samples: Sequence[Sample], out_dir: str | Path) -> list[Path]:
    """For each sample one PNG: image | overlay | heat map | ground truth (if any), titled, side by side,
    with the model's colour bar (its numbers in anomaly-map units, the pixel threshold marked;
    :func:`anomnet.predict.visualize.labelled_panels`)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    names = unique_names([(s.path, f"{s.defect_type}_{s.path.stem}") for s in samples])
    for s, named in zip(samples, names):
        image = imageio.read_image(s.path)
        amap = detector.predict(imageio.to_tensor(image)[None]).maps[0].numpy()
        panels = [
            ("image", (image * 255 + 0.5).astype(np.uint8)),
            ("overlay", overlay(image, amap, detector.calibration)),
            ("heat map", heatmap(amap, detector.calibration)),
        ]
        if s.mask_path is not None:
            mask = imageio.read_mask(s.mask_path, image.shape[:2])
            panels.append(("ground truth", np.repeat((mask[..., None] * 255).astype(np.uint8), 3, axis=2)))
        target = out_dir / f"{named.name}.png"  # two images of one stem (nested folders) keep one file each
        imageio.write_png(target, labelled_panels(panels, detector.calibration)[0])
        written.append(target)
    return written


def _showcase(test: Sequence[Sample], n: int) -> list[Sample]:
    """A few test images: defective ones of each type first, then good ones."""
    by_type: dict[str, list[Sample]] = {}
    for s in test:
        by_type.setdefault(s.defect_type, []).append(s)
    order = sorted(by_type, key=lambda t: (t == "good", t))
    picked: list[Sample] = []
    i = 0
    while len(picked) < n and any(i < len(v) for v in by_type.values()):
        for t in order:
            if i < len(by_type[t]) and len(picked) < n:
                picked.append(by_type[t][i])
        i += 1
    return picked


def _print_warnings(split: DatasetSplit) -> None:
    for warning in split.warnings:
        print(f"anomnet: note: {warning}", file=sys.stderr)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, tuple):
        return list(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    raise TypeError(type(obj).__name__)
