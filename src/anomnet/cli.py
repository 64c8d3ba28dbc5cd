"""Command-line interface: ``anomnet fit | test | predict | export | models | demo | bench | serve | watch | fit-many``.

Each command has its ``add_<command>_parser`` (its options) and its ``cmd_<command>`` (its run), paired in
:data:`COMMANDS`. Exit codes: 0 success; 2 bad input or settings (the message says which file or value);
3 ``predict`` finished but some images could not be read; 1 an unexpected internal error.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from anomnet.install import install_command

EXIT_OK, EXIT_INTERNAL, EXIT_INPUT, EXIT_SOME_FAILED = 0, 1, 2, 3

DATA_HELP = (
    "dataset: an MVTec-AD-style category folder (train/good, test/<defect>, ground_truth/<defect>), "
    "an MVTec root together with --category, a generic folder (train/, test/good, test/<defect>, optional masks/), "
    "or the word 'elpv' for the ELPV solar-cell set"
)


def _parse_settings(items: list[str]) -> dict[str, str]:
    from anomnet.errors import ConfigError

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        out[key.strip()] = value.strip()
    return out


# -- command-line options shared by fit and calibrate ---------------------------------------------


def add_threshold_arguments(parser: argparse.ArgumentParser, with_max_false_alarm: bool) -> None:
    """Threshold and mask post-processing options (default None = keep the default / current value)."""
    from anomnet.decisions.calibration import DEFAULT_PIXEL_FALSE_ALARM, IMAGE_METHODS, PIXEL_METHODS

    g = parser.add_argument_group("thresholds and masks (see README 'Thresholds')")
    g.add_argument(
        "--image-threshold",
        dest="image_method",
        choices=IMAGE_METHODS,
        default=None,
        help="how the image threshold is chosen: conformal (default; --max-false-alarm), mean-std (--std-k), "
        "fixed (--image-value) or f1 (F1-optimal on --labelled)",
    )
    if with_max_false_alarm:
        g.add_argument(
            "--max-false-alarm",
            type=float,
            default=None,
            help="target false-alarm rate of the conformal image threshold (default 0.01)",
        )
    g.add_argument("--std-k", type=float, default=None, help="k of the mean + k*std image threshold (default 3)")
    g.add_argument("--image-value", type=float, default=None, help="the fixed image threshold")
    g.add_argument(
        "--pixel-threshold",
        dest="pixel_method",
        choices=PIXEL_METHODS,
        default=None,
        help="how the mask threshold is chosen: quantile (default; --pixel-false-alarm), mean-std (mean + "
        "--pixel-std-k x std of the good validation pixels, MVTec AD 2's baseline), f1 (F1-optimal on --labelled), "
        "segf1 (searched with closing / hole filling / min area for the best SegF1 on --labelled), "
        "fixed (--pixel-value)",
    )
    g.add_argument("--pixel-std-k", type=float, default=None, help="k of the mean + k*std pixel threshold (default 3)")
    g.add_argument(
        "--pixel-false-alarm",
        type=float,
        default=None,
        help=(
            f"share of good validation pixels allowed above the pixel threshold (default {DEFAULT_PIXEL_FALSE_ALARM:g})"
        ),
    )
    g.add_argument("--pixel-value", type=float, default=None, help="the fixed pixel threshold")
    g.add_argument(
        "--labelled",
        default=None,
        metavar="PATH",
        help="labelled validation set for the f1 methods: a folder with good/, <defect>/ and optional masks/ "
        "(see README)",
    )
    g.add_argument(
        "--closing",
        type=int,
        default=None,
        metavar="PX",
        help="mask post-processing: closing with a disk of this radius (0 off)",
    )
    g.add_argument(
        "--fill-holes",
        dest="fill_holes",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="mask post-processing: fill holes inside regions",
    )
    g.add_argument(
        "--min-area",
        type=int,
        default=None,
        metavar="PX",
        help="mask post-processing: drop regions smaller than this many pixels (0 off)",
    )


def choices_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The threshold / post-processing values the user set on the command line."""
    from anomnet.decisions.calibrate import OPTION_FIELDS, POSTPROCESS_FIELDS

    names = OPTION_FIELDS | POSTPROCESS_FIELDS
    return {k: v for k, v in vars(args).items() if k in names and v is not None}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="anomnet",
        description="Unsupervised visual anomaly detection: train on good images, then score, flag and locate defects.",
        epilog="Exit codes: 0 ok, 2 bad input or settings, 3 predict: some images failed, 1 internal error.",
    )
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: all cores)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add, _ in COMMANDS.values():
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Before torch starts its OpenMP threads: idle threads sleep instead of spinning. With
    # spinning, any other busy process on a 2-core machine made a batch-1 forward many times slower
    # (timed by hand, docs/design.md). A value the user set is kept.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = build_parser().parse_args(argv)
    from anomnet.runtime import tune_allocator

    tune_allocator()
    if args.threads is not None and not 1 <= args.threads <= 1024:
        print(f"anomnet: error: --threads must be between 1 and 1024, got {args.threads}", file=sys.stderr)
        return EXIT_INPUT
    from anomnet.errors import AnomnetError

    try:
        if args.threads:
            os.environ["ANOMNET_THREADS"] = str(args.threads)  # an exported model's runtime reads it
            if not _scores_exported_model(args):  # scoring an exported model imports no torch
                import torch

                torch.set_num_threads(args.threads)
        return COMMANDS[args.command][1](args)
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in TRAINING_STACK:
            raise
        print(
            f"anomnet: error: '{args.command}' needs {exc.name}, part of the training stack: "
            f"{install_command('train')} (exported models score without it: docs/export.md)",
            file=sys.stderr,
        )
        return EXIT_INPUT
    except AnomnetError as exc:
        print(f"anomnet: error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt:
        print("anomnet: interrupted", file=sys.stderr)
        return 130


TRAINING_STACK = {"torch", "safetensors", "faiss", "efficientnet_lite_pytorch", "matplotlib", "skimage", "elpv_dataset"}
"""Modules of the ``anomnet[train]`` extra (a lean runtime install has none of them)."""


def _scores_exported_model(args: argparse.Namespace) -> bool:
    from anomnet.exported import is_exported

    return args.command == "predict" and args.model_dir is not None and is_exported(args.model_dir)


def _fit_settings(args: argparse.Namespace) -> dict[str, Any]:
    settings: dict[str, Any] = dict(_parse_settings(args.settings))
    for key, value in (
        ("backbone", args.backbone),
        ("weights", args.weights),
        ("image_size", args.image_size),
        ("tile", args.tile),
        ("tile_scales", args.tile_scales),
        ("tile_overlap", args.tile_overlap),
    ):
        if value is not None:
            settings[key] = value
    return settings


def add_fit_parser(sub: Any) -> None:
    p = sub.add_parser(
        "fit",
        help="train a detector on good images and save it",
        description=(
            "Train on the good training images, calibrate the thresholds (on the training images themselves, "
            "each scored leave-one-out or cross-fitted, and on any held-out validation images), save the model folder."
        ),
    )
    p.add_argument("--model", default=None, help="detector name (see 'anomnet models'; default: patchcore)")
    p.add_argument("--data", required=True, help=DATA_HELP)
    p.add_argument("--category", default=None, help="category inside an MVTec-style root folder (e.g. bottle)")
    p.add_argument(
        "--layout", default="auto", choices=["auto", "mvtec", "folder", "elpv"], help="dataset layout (default: detect)"
    )
    p.add_argument(
        "--out", required=True, help="folder to write the model into (must not hold a model yet, unless --overwrite)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace the model already in --out")
    p.add_argument("--backbone", default=None, help="feature backbone (see 'anomnet models')")
    p.add_argument(
        "--weights",
        default=None,
        help="backbone weights file (torchvision-format state dict; needed for the ResNet family)",
    )
    p.add_argument("--image-size", type=int, default=None, help="side the images are resized to (default 256)")
    p.add_argument(
        "--tile",
        type=int,
        default=None,
        metavar="PX",
        help=(
            "high-resolution tiling: train and predict on overlapping tiles of PX pixels, each resized to "
            "--image-size (default: off); see docs/tiling.md"
        ),
    )
    p.add_argument(
        "--tile-scales",
        default=None,
        metavar="S,...",
        help="pyramid scales the image is resized by before tiling, e.g. 1,0.5 (default 1)",
    )
    p.add_argument(
        "--tile-overlap",
        type=float,
        default=None,
        metavar="F",
        help="least share of a tile that neighbouring tiles overlap (default 0.25)",
    )
    p.add_argument(
        "--set",
        dest="settings",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any detector setting, e.g. --set coreset_ratio=0.05 (repeatable; see 'anomnet models --settings')",
    )
    p.add_argument(
        "--val-fraction",
        type=float,
        default=None,
        help="share of good training images held out for calibration (default: 0.1 with --calibration holdout, "
        "none otherwise; an MVTec AD 2 object's validation/good/ is used instead, 0 turns hold-out off)",
    )
    p.add_argument(
        "--calibration",
        default="auto",
        choices=["auto", "holdout", "loo", "crossfit"],
        help="what calibrates the thresholds (docs/decisions.md): loo = every training image scored without its "
        "own memory-bank patches (patchcore, tocoad, cpr; a hybrid through its chosen branch), crossfit = every "
        "training image scored by a model fitted on the other folds, holdout = only held-out images; held-out images "
        "are pooled with the others (default auto: loo for patchcore, tocoad, cpr and hybrid, crossfit for anomnet "
        "and inpformer below 100 training images, holdout otherwise)",
    )
    p.add_argument(
        "--folds", type=int, default=5, help="folds of --calibration crossfit (default 5; each fold is one more fit)"
    )
    p.add_argument(
        "--exclude-suspects",
        action="store_true",
        help="refit without the suspect training images (those whose left-out score stands far above the rest)",
    )
    p.add_argument(
        "--max-false-alarm",
        type=float,
        default=0.01,
        help="target false-alarm rate of the image threshold on good images (default 0.01)",
    )
    add_threshold_arguments(p, with_max_false_alarm=False)
    p.add_argument(
        "--max-train", type=int, default=None, help="use at most this many training images (seeded random subset)"
    )
    p.add_argument("--seed", type=int, default=0, help="random seed for splits and sampling (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def cmd_fit(args: argparse.Namespace) -> int:
    from anomnet import api
    from anomnet.detectors import DEFAULT_DETECTOR

    model = args.model or DEFAULT_DETECTOR
    det = api.fit(
        model,
        args.data,
        args.out,
        args.category,
        args.layout,
        _fit_settings(args),
        args.val_fraction,
        args.seed,
        args.max_false_alarm,
        args.max_train,
        progress=not args.quiet,
        labelled=args.labelled,
        overwrite=args.overwrite,
        calibration=args.calibration,
        folds=args.folds,
        exclude_suspects=args.exclude_suspects,
        **{k: v for k, v in choices_from_args(args).items() if k != "max_false_alarm"},
    )
    if det.calibration.excluded:
        print(f"left out {len(det.calibration.excluded)} suspect training image(s) and refitted without them:")
        print("\n".join(f"  {path}" for path in det.calibration.excluded))
    print(f"saved {model} model to {args.out}")
    if (aspect := det.describe_aspect()) is not None:  # aspect=auto: what the training images decided
        print(aspect)
    choice = det.describe_choice()  # the hybrid: which branch predicts, and why
    if choice is not None:
        print(choice)
    print("\n".join(det.calibration.summary()))
    print("\n".join(operating_points_lines(det.calibration, args.out)))
    return EXIT_OK


def operating_points_lines(cal: Any, model_dir: str | Path) -> list[str]:
    """The operating-points table of a model (anomnet.decisions.operating_points) and how to pick another point."""
    import shlex

    from anomnet.decisions.operating_points import format_table, operating_points

    return format_table(operating_points(cal), cal) + [
        f"pick another: anomnet calibrate --model-dir {shlex.quote(str(model_dir))} --max-false-alarm RATE "
        "(add --dry-run to see it first)"
    ]


def add_calibrate_parser(sub: Any) -> None:
    p = sub.add_parser(
        "calibrate",
        help="choose other thresholds / mask post-processing for a fitted model",
        description=(
            "Re-pick the image and pixel thresholds and the mask post-processing of a saved model "
            "without refitting, from its saved validation statistics (or, with --data, recomputed from "
            "the dataset's validation split), then save the model again."
        ),
    )
    p.add_argument("--model-dir", required=True, help="model folder written by 'anomnet fit'")
    p.add_argument(
        "--data",
        default=None,
        help=(
            "recompute the validation statistics from this dataset's validation split (same --val-fraction and "
            "the model's seed as at fit)"
        ),
    )
    p.add_argument("--category", default=None, help="category inside an MVTec-style root folder")
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        help="with --data: share of good training images held out (default 0.1)",
    )
    p.add_argument(
        "--calibration",
        default=None,
        choices=["holdout", "loo"],
        help="with --data: also score the model's training images found in the data leave-one-out (loo; "
        "memory-bank detectors), or only images it was not trained on (holdout); default: as at fit",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the thresholds, the operating points and what would change; save nothing",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_threshold_arguments(p, with_max_false_alarm=True)


def cmd_calibrate(args: argparse.Namespace) -> int:
    from anomnet import api
    from anomnet.decisions.operating_points import changes

    before = _saved_calibration(args.model_dir)
    det = api.calibrate(
        args.model_dir,
        args.data,
        args.category,
        args.val_fraction,
        args.labelled,
        save=not args.dry_run,
        progress=not args.quiet,
        calibration=args.calibration,
        **choices_from_args(args),
    )
    print("\n".join(det.calibration.summary()))
    print("\n".join(operating_points_lines(det.calibration, args.model_dir)))
    if before is not None:
        changed = changes(before, det.calibration)
        if changed:
            print(("would change:" if args.dry_run else "changed:") + "".join(f"\n  {line}" for line in changed))
        else:
            print("nothing would change" if args.dry_run else "nothing changed")
    print("not saved (--dry-run)" if args.dry_run else f"saved to {args.model_dir}")
    return EXIT_OK


def _saved_calibration(model_dir: str) -> Any:
    """The calibration saved in a model folder, or None when it cannot be read (calibrate then says why)."""
    import json

    from anomnet.decisions.calibration import Calibration
    from anomnet.errors import AnomnetError

    try:
        meta = json.loads((Path(model_dir) / "anomnet.json").read_text(encoding="utf-8"))
        return Calibration.from_dict(meta["calibration"])
    except (OSError, ValueError, KeyError, TypeError, AnomnetError):
        return None


def format_metrics(metrics: dict[str, float]) -> str:
    width = max(len(k) for k in metrics)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  ------"]
    for k, v in metrics.items():
        lines.append(
            f"{k:<{width}}  {'n/a' if v is None or (isinstance(v, float) and math.isnan(v)) else f'{100 * v:6.2f}'}"
        )
    return "\n".join(lines)


def add_test_parser(sub: Any) -> None:
    p = sub.add_parser(
        "test",
        help="evaluate a saved model on a test set",
        description=(
            "Score the test split, print image AUROC, pixel AUROC, AU-PRO and F1 values, and write them as JSON."
        ),
    )
    p.add_argument("--model-dir", required=True, help="model folder written by 'anomnet fit'")
    p.add_argument("--data", required=True, help=DATA_HELP)
    p.add_argument("--category", default=None, help="category inside an MVTec-style root folder")
    p.add_argument(
        "--layout", default="auto", choices=["auto", "mvtec", "folder", "elpv"], help="dataset layout (default: detect)"
    )
    p.add_argument("--json", default=None, help="metrics JSON path (default: <model-dir>/metrics.json)")
    p.add_argument(
        "--eval-size",
        type=int,
        default=None,
        help="compare maps and masks at this fixed size instead of each mask's own resolution",
    )
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default 8)")
    p.add_argument(
        "--heatmaps", default=None, help="folder for a few heat-map images (image | overlay | heat map | ground truth)"
    )
    p.add_argument(
        "--report",
        default=None,
        metavar="PATH.html",
        help=(
            "also write one self-contained HTML report: metrics, ROC / PR / PRO curves, score histograms with "
            "the threshold, the worst false alarms and misses with heat maps"
        ),
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def cmd_test(args: argparse.Namespace) -> int:
    from anomnet import api, imageio
    from anomnet.model_io import model_files

    json_out = args.json or str(Path(args.model_dir) / "metrics.json")
    protected = model_files(args.model_dir) + ([Path(args.data)] if Path(args.data).exists() else [])
    for what, target, folder in (
        ("--json", json_out, False),
        ("--report", args.report, False),
        ("--heatmaps", args.heatmaps, True),
    ):
        if target:
            imageio.check_not_input(target, protected, what, folder)
            imageio.check_writable(target, what, folder)
    res = api.test(
        args.model_dir,
        args.data,
        args.category,
        args.layout,
        json_out,
        args.eval_size,
        args.batch_size,
        args.heatmaps,
        progress=not args.quiet,
        report=args.report,
    )
    print(format_metrics(res.metrics) + "  (percent)")
    print(
        f"{len(res.scores)} test images, {1000 * res.seconds_per_image:.1f} ms per image; metrics written to {json_out}"
    )
    if args.heatmaps:
        print(f"heat maps written to {args.heatmaps}")
    if args.report:
        print(f"report written to {args.report}")
    return EXIT_OK


def add_predict_parser(sub: Any) -> None:
    p = sub.add_parser(
        "predict",
        help="score images with a saved model",
        description=(
            "Print each image's anomaly score, conformal p-value and decision; with --out also write "
            "heat maps, overlays, masks (and raw maps), results.csv and results.jsonl. A file that "
            "cannot be read is listed with its reason; the others are still scored (exit code 3)."
        ),
    )
    p.add_argument(
        "--model-dir",
        default=None,
        help="model folder written by 'anomnet fit' (required unless --engine ray with --model / --model-root)",
    )
    p.add_argument(
        "images",
        nargs="+",
        help="image files or folders (searched recursively); '-' reads paths from stdin, one per line; "
        "with --engine ray also globs ('dir/**/*.png', quoted) and CSV/Parquet manifests (a 'path' column, "
        "optionally 'product')",
    )
    p.add_argument(
        "--out",
        default=None,
        help="output folder: heatmaps/, overlays/, masks/ (maps/ with --raw-maps), results.csv, results.jsonl",
    )
    p.add_argument(
        "--raw-maps",
        action="store_true",
        help=(
            "with --out: also the raw float32 anomaly maps as TIFF at the original resolution (MVTec AD 2 "
            "submission format)"
        ),
    )
    p.add_argument(
        "--out-layout",
        default="anomnet",
        choices=["anomnet", "mvtec-ad2"],
        help="with --out: anomnet's files (default), or mvtec-ad2: only anomaly_images/<object>/<split>/<stem>.tiff "
        "(float16) and anomaly_images_thresholded/.../<stem>.png, the layout MVTec AD 2's evaluation server reads "
        "(docs/mvtec_ad2.md)",
    )
    p.add_argument("--csv", default=None, help="also write the results as CSV to this path")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--shard",
        default=None,
        metavar="i/N",
        help="score only shard i (from 0) of N: every N-th image of the path-sorted input list, so N jobs "
        "cover it once (output names as in the whole list)",
    )
    g = p.add_argument_group("batch engine (--engine ray; see docs/scaling.md)")
    g.add_argument(
        "--engine",
        choices=["local", "ray"],
        default="local",
        help="local: this process (default); ray: Ray Data workers on a local Ray or the cluster at --address, "
        "inputs may also be globs and CSV/Parquet manifests, results also as results.parquet (needs --out and "
        "the anomnet[ray] extra)",
    )
    g.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="PRODUCT=DIR",
        help="with --engine ray: the model of one product (repeatable); a manifest's 'product' column picks it",
    )
    g.add_argument(
        "--model-root",
        default=None,
        metavar="DIR",
        help="with --engine ray: one model per product, each a subfolder of DIR named after it (as fit-many writes)",
    )
    g.add_argument(
        "--resume",
        action="store_true",
        help="with --engine ray: keep the rows already in --out and score only the inputs without one",
    )
    g.add_argument(
        "--address",
        default=None,
        help="with --engine ray: the Ray cluster to use ('auto': the one 'ray start' runs here; "
        "default: start a local Ray)",
    )
    g.add_argument(
        "--rows-only",
        action="store_true",
        help="with --engine ray: only the result rows (results.parquet/.csv/.jsonl), no heat maps, overlays, masks",
    )
    g.add_argument("--workers", type=int, default=None, help="scorer workers (default: cluster CPUs / --worker-cpus)")
    g.add_argument(
        "--worker-cpus", type=float, default=1, help="CPUs (and torch threads) each scorer worker takes (default 1)"
    )
    g.add_argument(
        "--batch-size", type=int, default=None, help="images a worker takes per call (default 16)", metavar="N"
    )


def cmd_predict(args: argparse.Namespace) -> int:
    from anomnet.engine import command

    if args.engine == "ray":
        return command.predict_command(args)
    command.check_local(args)
    from anomnet import imageio
    from anomnet.predict.outputs import model_folder_files, predict_files  # no torch: an exported model scores without

    inputs = [Path(i) for i in args.images if i != "-"] + model_folder_files(args.model_dir)
    if args.out:
        imageio.check_not_input(args.out, inputs, "--out", folder=True)
        imageio.check_writable(args.out, "--out", folder=True)
    if args.csv:
        imageio.check_not_input(args.csv, inputs, "--csv")
        imageio.check_writable(args.csv, "--csv")
    results = predict_files(
        args.model_dir,
        args.images,
        out_dir=args.out,
        raw_maps=args.raw_maps,
        progress=not args.quiet,
        shard=args.shard,
        out_layout=args.out_layout,
    )
    unread = [r for r in results if r.error and r.score != r.score]
    unwritten = [r for r in results if r.error and r.score == r.score]
    print("path\tscore\tp_value\tdecision\tdefect_pixels")
    for r in results:
        if r.error and r.score != r.score:
            print(f"{r.path}\t-\t-\terror: {r.error}\t-")
        else:
            decision = "DEFECTIVE" if r.defective else "good"
            print(
                f"{r.path}\t{r.score:.6g}\t{r.p_value:.4g}\t{decision}\t{r.defect_pixels}"
                + (f"\terror: {r.error}" if r.error else "")
            )
    if args.csv:
        from anomnet.predict.outputs import csv_text

        imageio.atomic_write_text(args.csv, csv_text(results))
    if args.raw_maps and not args.out:
        print("anomnet: --raw-maps writes nothing without --out", file=sys.stderr)
    if args.out and args.out_layout == "mvtec-ad2":
        print(f"outputs written to {args.out} (anomaly_images/, anomaly_images_thresholded/: MVTec AD 2 layout)")
    elif args.out:
        maps = ", maps/" if args.raw_maps else ""
        print(f"outputs written to {args.out} (results.csv, results.jsonl, heatmaps/, overlays/, masks/{maps})")
    if unread:
        print(
            f"anomnet: {len(unread)} of {len(results)} images could not be read (see the error column)", file=sys.stderr
        )
    if unwritten:
        print(
            f"anomnet: the outputs of {len(unwritten)} of {len(results)} images could not be written", file=sys.stderr
        )
    if unread or unwritten:
        return EXIT_SOME_FAILED
    return EXIT_OK


def add_export_parser(sub: Any) -> None:
    p = sub.add_parser(
        "export",
        help="export a fitted model as one ONNX, OpenVINO or TorchScript graph (scored without torch)",
        description=(
            "Write the fitted model as one graph from raw uint8 images (any size) to image scores, anomaly maps at "
            "the input's resolution and decisions, with its thresholds and a manifest (docs/export.md). The graph "
            "is checked against the model before the folder is written."
        ),
    )
    p.add_argument("--model-dir", required=True, help="fitted model folder written by 'anomnet fit'")
    p.add_argument(
        "--format",
        required=True,
        choices=["onnx", "openvino", "torchscript"],
        help="onnx (ONNX Runtime), openvino (OpenVINO IR, float32) or torchscript (needs torch to run)",
    )
    p.add_argument("--out", required=True, help="folder to write the exported model into (new or empty)")
    p.add_argument("--overwrite", action="store_true", help="replace an exported model already in --out")


def cmd_export(args: argparse.Namespace) -> int:
    from anomnet.export import export_model
    from anomnet.exported import read_manifest

    out = export_model(args.model_dir, args.format, args.out, overwrite=args.overwrite)
    manifest = read_manifest(out, check_files=False)
    check = manifest["verified"]
    print(
        f"exported the {manifest['detector']} model {args.model_dir} as {args.format} to {out}; on probe images its "
        f"scores differ from the model's by {check['score_rel']:.2g} and its maps by {check['map_rel']:.2g} (relative)"
    )
    runtime = "needs torch" if args.format == "torchscript" else "no torch: a line PC needs the wheel with [runtime]"
    print(f"score with it: anomnet predict --model-dir {out} IMAGES ({runtime})")
    return EXIT_OK


def add_models_parser(sub: Any) -> None:
    p = sub.add_parser(
        "models",
        help="list detectors and backbones",
        description="List the detectors and backbones this anomnet provides.",
    )
    p.add_argument("--settings", action="store_true", help="also list each detector's settings with defaults")


def cmd_models(args: argparse.Namespace) -> int:
    import dataclasses

    from anomnet.backbones import available_backbones
    from anomnet.detectors import DEFAULT_DETECTOR, DETECTORS

    print("detectors:")
    default_of: dict[str, list[str]] = {}  # backbone -> the detectors whose default it is
    for name, cls in sorted(DETECTORS.items()):
        print(f"  {name:<12} {cls.description}{'  [default]' if name == DEFAULT_DETECTOR else ''}")
        defaults = cls.config_class().to_dict()
        if defaults.get("backbone"):
            default_of.setdefault(defaults["backbone"], []).append(name)
        if args.settings:
            for f in dataclasses.fields(cls.config_class):
                print(f"      {f.name} = {defaults[f.name]!r}")
    print("backbones:")
    for b in available_backbones():
        extra = "  (needs --weights FILE)" if b.needs_weights_file else ""
        default = f"  [default of {', '.join(default_of[b.name])}]" if b.name in default_of else ""
        layers = f"layers {','.join(b.default_layers)} of {','.join(b.layers)}"
        print(f"  {b.name:<18} {layers}{extra}{default}")
    return EXIT_OK


def add_demo_parser(sub: Any) -> None:
    p = sub.add_parser(
        "demo",
        help="the built-in example: fit and test PatchCore on ELPV solar cells",
        description=(
            "Fit the default detector on good ELPV solar cells (installed with anomnet), test it on "
            "held-out good and defective cells, print the metrics and write heat maps."
        ),
    )
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--model", default=None, help="detector (default patchcore)")
    p.add_argument(
        "--max-train",
        type=int,
        default=DEMO_TRAIN,
        help=f"good training cells per model (default {DEMO_TRAIN}: keeps the demo to a few minutes)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace the model an earlier demo left in --out")
    route = p.add_mutually_exclusive_group()
    route.add_argument(
        "--per-type",
        dest="one_model",
        action="store_false",
        default=False,
        help="the default: one model per cell type (mono, poly), each calibrated on its own good cells; the test "
        "cells pooled by conformal p-value",
    )
    route.add_argument(
        "--one-model",
        dest="one_model",
        action="store_true",
        default=False,
        help="one model for both cell types (the cells' types not used)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def cmd_demo(args: argparse.Namespace) -> int:
    import json

    from anomnet import api, imageio
    from anomnet.data import elpv_cell_types, load_dataset
    from anomnet.detectors import DEFAULT_DETECTOR
    from anomnet.evaluation.report import write_pooled_report

    model = args.model or DEFAULT_DETECTOR
    out = Path(args.out)
    split = load_dataset("elpv")
    parts = {"": split} if args.one_model else demo_parts(split, elpv_cell_types())
    print(
        f"ELPV solar cells: {len(split.train)} good training cells, {len(split.validation)} validation, "
        f"{len(split.test)} test ({sum(s.label for s in split.test)} defective)"
        + (f"; one model per cell type ({', '.join(parts)})" if len(parts) > 1 else "")
    )
    train = args.max_train
    fitted: dict[str, tuple[Any, Any]] = {}
    for kind, part in parts.items():
        where, cells = (out / kind, f"{kind} cells") if kind else (out, "cells")
        det = api.fit(model, part, where / "model", max_train=train, progress=not args.quiet, overwrite=args.overwrite)
        print(
            f"fitted {model} on {min(train, len(part.train))} good {cells}; image threshold "
            f"{det.calibration.threshold:.5g} at a {det.calibration.achieved_false_alarm:.3g} false-alarm rate on "
            f"{len(det.calibration.validation_scores)} good calibration {cells} ({det.calibration.source_note})"
        )
        res = api.test(
            where / "model",  # the saved model, so the report names its folder
            part,
            json_out=where / "metrics.json",
            heatmaps_dir=where / "heatmaps",
            heatmaps=8 // len(parts),
            progress=not args.quiet,
            report=where / "report.html",
        )
        print(format_metrics(res.metrics) + f"  (percent, {len(part.test)} test {cells})")
        print("\n".join(demo_operating_points(det.calibration, res.scores, res.labels, where / "model")))
        print(
            f"metrics: {where / 'metrics.json'}; heat maps (image | overlay | heat map): {where / 'heatmaps'}/; "
            f"report: {where / 'report.html'}"
        )
        fitted[kind] = (det.calibration, res)
    if len(parts) > 1:
        metrics = pooled_metrics(fitted)
        payload = {
            "dataset": split.name,
            "detector": model,
            "pooled_by": POOLED_BY,
            "test_images": len(split.test),
            "metrics": metrics,
            "parts": {k: str(out / k / "metrics.json") for k in parts},
        }
        imageio.atomic_write_text(out / "metrics.json", json.dumps(payload, indent=2, allow_nan=False))
        pooled_note = (
            f"All {len(split.test)} test cells, each scored and decided by its cell type's model; ranked for the "
            f"AUROC by {POOLED_BY} under its own model's calibration."
        )
        write_pooled_report(
            out / "report.html",
            f"anomnet demo report: {model} on {split.name}, one model per cell type",
            metrics,
            pooled_note,
            [(k, f"{k}/report.html", len(p.test)) for k, p in parts.items()],
        )
        print(
            format_metrics(metrics) + f"  (percent, all {len(split.test)} test cells, each scored by its type's "
            f"model, pooled by {POOLED_BY})"
        )
        print(f"pooled metrics: {out / 'metrics.json'}; pooled report: {out / 'report.html'}")
    else:
        metrics = fitted[""][1].metrics
    print(in_words(metrics, split.test))
    return EXIT_OK


DEMO_TRAIN = 300
"""Good training cells each of the demo's models fits on (one per cell type by default; 300 in all with --one-model)."""
POOLED_BY = "conformal p-value"
"""How the demo ranks cells scored by different models: each model's own calibration turns a score into a p-value."""


def demo_parts(split: Any, types: dict[Path, str]) -> dict[str, Any]:
    """The demo's split cut by cell type (train, validation and test alike); ``{"": split}`` when a cell has none."""
    from anomnet.data import DatasetSplit

    samples = [*split.train, *split.validation, *split.test]
    if not samples or any(s.path not in types for s in samples):
        return {"": split}
    keep = lambda items, kind: [s for s in items if types[s.path] == kind]  # noqa: E731
    return {
        kind: DatasetSplit(
            f"{split.name}:{kind}",
            keep(split.train, kind),
            keep(split.validation, kind),
            keep(split.test, kind),
            list(split.warnings),
        )
        for kind in sorted({types[s.path] for s in samples})
    }


def pooled_metrics(fitted: dict[str, tuple[Any, Any]]) -> dict[str, float]:
    """Image metrics of test cells scored by different models: ranked by p-value, decided by each model's threshold.

    A cell's conformal p-value against its own model's calibration scores puts the models on one scale; cells
    above every calibration score share the smallest p-value, so the score over its model's threshold breaks ties.
    """
    import numpy as np

    from anomnet.evaluation.metrics import f1_max, image_auroc

    rank, labels, called = [], [], []
    for cal, res in fitted.values():
        scores = np.asarray(res.scores, dtype=np.float64)
        ratio = scores / cal.threshold if math.isfinite(cal.threshold) and cal.threshold > 0 else scores
        rank.append(-np.log(cal.p_values(scores)) + 1e-6 * np.tanh(ratio))
        labels.append(np.asarray(res.labels, dtype=np.int64))
        called.append(cal.decide(scores))
    r, y, c = np.concatenate(rank), np.concatenate(labels), np.concatenate(called)
    bad, good = int((y == 1).sum()), int((y == 0).sum())
    hits, alarms = int((c & (y == 1)).sum()), int((c & (y == 0)).sum())
    precision = hits / (hits + alarms) if hits + alarms else math.nan
    recall = hits / bad if bad else math.nan
    return {
        "image_auroc": float(image_auroc(r, y)) if bad and good else math.nan,
        "image_f1_max": float(f1_max(r, y)[0]) if bad and good else math.nan,
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall > 0 else math.nan,
        "false_alarm_rate": alarms / good if good else math.nan,
    }


def demo_operating_points(cal: Any, scores: Any, labels: Any, model_dir: Path) -> list[str]:
    """The operating points on the demo's own test cells, and the command that sets a sensible one."""
    from anomnet.decisions.operating_points import calibrate_command, format_table, operating_points, suggest

    points = operating_points(cal, scores, labels)
    lines = format_table(points, cal, "test")
    best = suggest(points)
    if best is None or best.asked is None:
        return lines
    held = best.false_alarm_rate <= best.asked
    why = (
        "catches the most defective cells among the rates whose false-alarm rate held on the test cells"
        if held
        else "is the best balance (defective cells caught minus good cells flagged): no rate held on the test cells"
    )
    if best.current:
        return [*lines, f"the model's own rate {100 * best.asked:g} % {why}"]
    return [
        *lines,
        f"asked {100 * best.asked:g} % {why} (chosen in hindsight on the test cells: new cells may differ a "
        "little); set it with:",
        f"  {calibrate_command(model_dir, best, cal)}",
    ]


def in_words(metrics: dict[str, float], test: Any) -> str:
    """What the threshold does on the test cells, said as a quality engineer would put it."""
    bad = sum(1 for s in test if s.label == 1)
    good = len(test) - bad
    found, flagged = metrics.get("recall", float("nan")), metrics.get("false_alarm_rate", float("nan"))
    if math.isnan(found) or math.isnan(flagged):
        return "no threshold summary: the test set needs both good and defective cells"
    return (
        f"At the calibrated threshold the detector caught {round(found * bad)} of {bad} defective cells "
        f"({100 * found:.1f} %) and wrongly flagged {round(flagged * good)} of {good} good cells "
        f"({100 * flagged:.1f} %). Image AUROC {100 * metrics['image_auroc']:.1f} % says how well the scores rank "
        "defective above good cells at any threshold; a lower threshold (anomnet calibrate) finds more "
        "defects at the cost of more false alarms."
    )


def add_fit_many_parser(sub: Any) -> None:
    from anomnet.fit_many import ENGINES  # the fit-many command itself: anomnet.fit_many

    p = sub.add_parser(
        "fit-many",
        help="fit one model per category folder (on Ray when installed), with a summary table",
        description="Fit one model per category folder of --data (each subfolder with train/, e.g. the MVTec AD "
        "root) into --out/<category>, test it when it has a test split, and print a table. On Ray each "
        "category is a task of --cpus-per-fit CPUs; a failing category is reported and the others go on.",
    )
    p.add_argument("--data", required=True, help="root folder: one dataset folder per category")
    p.add_argument("--out", required=True, help="folder for the models, one subfolder per category")
    p.add_argument("--model", default=None, help="detector name (see 'anomnet models'; default: patchcore)")
    p.add_argument("--categories", default=None, help="comma-separated categories (default: every one)")
    p.add_argument(
        "--engine",
        choices=ENGINES,
        default="auto",
        help="ray: one Ray task per category; local: one after another here; auto (default): ray when installed",
    )
    p.add_argument("--address", default=None, help="with ray: the cluster ('auto': the local 'ray start' one)")
    p.add_argument("--cpus-per-fit", type=float, default=1, help="CPUs (torch threads) of each fit (default 1)")
    p.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE", help="detector setting")
    p.add_argument("--image-size", type=int, default=None, help="side the images are resized to (default 256)")
    p.add_argument("--backbone", default=None, help="feature backbone (see 'anomnet models')")
    p.add_argument("--max-train", type=int, default=None, help="at most this many training images per category")
    p.add_argument(
        "--val-fraction",
        type=float,
        default=None,
        help="good training images held out (default: 0.1 with --calibration holdout, none otherwise)",
    )
    p.add_argument(
        "--calibration",
        default="auto",
        choices=["auto", "holdout", "loo", "crossfit"],
        help="what calibrates the thresholds, as in 'anomnet fit' (default auto: the detector's measured default)",
    )
    p.add_argument("--max-false-alarm", type=float, default=0.01, help="target false-alarm rate (default 0.01)")
    p.add_argument("--seed", type=int, default=0, help="seed of the validation split and the detectors (default 0)")
    p.add_argument("--no-test", action="store_true", help="do not evaluate on the test splits")
    p.add_argument("--overwrite", action="store_true", help="replace models already in --out")
    p.add_argument("--skip-existing", action="store_true", help="keep the models already in --out, fit the rest")
    p.add_argument("--quiet", action="store_true", help="no per-category progress lines")


def cmd_fit_many(args: argparse.Namespace) -> int:
    from anomnet import fit_many

    return fit_many.command(args, _parse_settings(args.settings))


def add_bench_parser(sub: Any) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmark speed, memory and accuracy of detectors on your data; writes a JSON report",
        description="Time the backbone alone and each detector's fit and predict (batch 1 and 16) on CPU, "
        "measure peak memory and the metrics; write the JSON report to --out and, if asked, "
        "a Markdown table to --markdown.",
    )
    p.add_argument("--data", required=True, help=DATA_HELP)
    p.add_argument("--category", default=None, help="category inside an MVTec-style root folder")
    p.add_argument("--models", default="patchcore", help="comma-separated detectors (default patchcore)")
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME:KEY=VALUE;...",
        help="extra configuration rows, e.g. 'pc-1pct:model=patchcore;coreset_ratio=0.01' (repeatable)",
    )
    p.add_argument(
        "--out", required=True, metavar="JSON", help="the JSON report to write (every row, its metrics and fit record)"
    )
    p.add_argument(
        "--markdown", default=None, metavar="PATH", help="also write the Markdown table to this file (default: none)"
    )
    p.add_argument(
        "--section",
        default=None,
        metavar="NAME",
        help="with --markdown: replace only this named section of the file, so several runs share one file; "
        "without it the whole file is written",
    )
    p.add_argument(
        "--work-dir",
        default=None,
        help="folder for the fitted models (default: a temporary folder, removed afterwards)",
    )
    p.add_argument(
        "--rescore",
        action="append",
        default=[],
        metavar="KEY=VALUE;...",
        help="extra rows from each fitted model with scoring-time settings changed, e.g. 'alpha=0' "
        "(repeatable; only for models that have those settings)",
    )
    p.add_argument(
        "--memory-images",
        type=int,
        default=0,
        help="also fit PatchCore on this many training images (the set repeated) and report peak memory, "
        "e.g. 1000 (default 0: skip)",
    )


def cmd_bench(args: argparse.Namespace) -> int:
    from anomnet import bench

    return bench.main(args)


def add_serve_parser(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="run the inspection service (HTTP API + review page) for one or more models",
        description="Serve fitted or exported models over HTTP: POST /v1/models/NAME/predict, GET /v1/models, "
        f"/healthz, /metrics, and the review page at /. Needs the serve extra: {install_command('serve')}. "
        "The API key, if any, comes from $ANOMNET_API_KEY or --api-key-file (never the command line).",
    )
    p.add_argument(
        "--model",
        action="append",
        required=True,
        metavar="NAME=DIR",
        help="a model folder (fitted or exported) served under NAME (repeatable: one per product)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument(
        "--image-root", default=None, help="folder that JSON image paths are relative to (default: paths refused)"
    )
    p.add_argument("--review-dir", default=None, help="folder for the review page's marks (default: marks are refused)")
    p.add_argument("--max-upload-mb", type=float, default=32.0, help="largest request body in MiB (default 32)")
    p.add_argument(
        "--max-megapixels", type=float, default=40.0, help="largest image, read from its header (default 40)"
    )
    p.add_argument(
        "--max-request-megapixels",
        type=float,
        default=64.0,
        help="pixels of one request's images together, read from their headers (default 64)",
    )
    p.add_argument("--max-images", type=int, default=16, help="images per request (default 16)")
    p.add_argument("--workers", type=int, default=1, help="scoring threads (default 1)")
    p.add_argument("--queue", type=int, default=8, help="requests waiting for a worker before 429 (default 8)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds a request may take (default 60, then 504)")
    p.add_argument(
        "--body-timeout",
        type=float,
        default=10.0,
        help="seconds a request's body may take to arrive, read before it takes a worker place (default 10, then 408)",
    )
    p.add_argument(
        "--reload-check",
        type=float,
        default=2.0,
        help="seconds between looks at each model folder: a recalibrated or refitted model is loaded and swapped "
        "in whole (default 2; 0: never)",
    )
    p.add_argument("--api-key-file", default=None, help="file holding the API key clients send as X-API-Key")
    p.add_argument(
        "--log-level",
        default="info",
        choices=("critical", "error", "warning", "info", "debug"),
        help="server log detail (default info: one line per request)",
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from anomnet.errors import ConfigError
    from anomnet.serve import missing_extra

    missing = missing_extra()
    if missing:
        raise ConfigError(missing)
    from anomnet.serve.app import create_app, serve
    from anomnet.serve.limits import Limits, MiB

    models: dict[str, str] = {}
    for item in args.model:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise ConfigError(f"--model {item!r}: expected NAME=DIR, e.g. --model bottle=runs/bottle")
        if name in models:
            raise ConfigError(f"--model {name}: the name is given twice")
        models[name] = folder
    api_key = os.environ.get("ANOMNET_API_KEY") or None
    if args.api_key_file:
        try:
            api_key = Path(args.api_key_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"--api-key-file {args.api_key_file}: cannot be read ({exc.strerror or exc})") from None
    limits = Limits(
        max_upload_bytes=int(args.max_upload_mb * MiB),
        max_pixels=int(args.max_megapixels * 1e6),
        max_request_pixels=int(args.max_request_megapixels * 1e6),
        max_images=args.max_images,
        workers=args.workers,
        queue=args.queue,
        timeout_s=args.timeout,
        body_timeout_s=args.body_timeout,
        api_key=api_key,
    )
    reload_check = args.reload_check if args.reload_check > 0 else None
    app = create_app(models, limits, args.image_root, args.review_dir, reload_check)
    if api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"anomnet: note: listening on {args.host} without an API key ($ANOMNET_API_KEY)", file=sys.stderr)
    print(f"serving {', '.join(sorted(models))} on http://{args.host}:{args.port}/ (review page at /)", flush=True)
    serve(app, args.host, args.port, args.log_level)
    return EXIT_OK


def add_watch_parser(sub: Any) -> None:
    p = sub.add_parser(
        "watch",
        help="score images as they arrive in a folder (hot folder for camera stations)",
        description="Score each image file that lands in INBOX once it is completely written (unchanged for "
        "--settle seconds, or renamed in from a temporary name such as x.tmp / x.part); write its heat map, "
        "overlay and mask into --out, append its row to OUT/results.csv and OUT/results.jsonl, and move it to "
        "OUT/processed (or OUT/errors when it cannot be read). A restart (even after a kill) scores no file "
        "twice and skips none. Stops on Ctrl-C / SIGTERM after the current batch. See docs/watch.md.",
    )
    p.add_argument("--model-dir", required=True, help="model folder (fitted, or exported by 'anomnet export')")
    p.add_argument("inbox", metavar="INBOX", help="the folder the camera station writes into")
    p.add_argument("--out", required=True, help="output folder (outside INBOX; one watcher per folder)")
    p.add_argument(
        "--settle",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="a file is scored once its size and time stamp stayed the same this long (default 2; 0: at once, "
        "for stations that write a temporary name and rename the finished file)",
    )
    p.add_argument("--poll", type=float, default=0.5, metavar="SECONDS", help="seconds between scans (default 0.5)")
    p.add_argument("--once", action="store_true", help="process what is in INBOX, then exit (3: some files failed)")
    p.add_argument("--done", default=None, metavar="DIR", help="where scored files go (default OUT/processed)")
    p.add_argument("--errors", default=None, metavar="DIR", help="where unreadable files go (default OUT/errors)")
    p.add_argument(
        "--keep",
        action="store_true",
        help="leave files in INBOX; results.jsonl marks them done (a file whose content changes is scored again)",
    )
    p.add_argument("--recursive", action="store_true", help="also watch the subfolders of INBOX")
    p.add_argument("--raw-maps", action="store_true", help="also write the raw float32 anomaly maps (maps/*.tiff)")


def cmd_watch(args: argparse.Namespace) -> int:
    from anomnet import imageio
    from anomnet.model_io import model_files
    from anomnet.watch import WatchOptions, watch

    imageio.check_not_input(args.out, [Path(args.inbox), *model_files(args.model_dir)], "--out", folder=True)
    options = WatchOptions(
        settle=args.settle,
        poll=args.poll,
        done_dir=Path(args.done) if args.done else None,
        error_dir=Path(args.errors) if args.errors else None,
        keep=args.keep,
        recursive=args.recursive,
        raw_maps=args.raw_maps,
    )
    summary = watch(args.model_dir, args.inbox, args.out, options, once=args.once)
    return EXIT_SOME_FAILED if args.once and summary.errors else EXIT_OK


COMMANDS: dict[str, tuple[Callable[[Any], None], Callable[[argparse.Namespace], int]]] = {
    # name: (add its parser, run it); in the order of 'anomnet --help'
    "fit": (add_fit_parser, cmd_fit),
    "test": (add_test_parser, cmd_test),
    "predict": (add_predict_parser, cmd_predict),
    "export": (add_export_parser, cmd_export),
    "calibrate": (add_calibrate_parser, cmd_calibrate),
    "models": (add_models_parser, cmd_models),
    "demo": (add_demo_parser, cmd_demo),
    "bench": (add_bench_parser, cmd_bench),
    "serve": (add_serve_parser, cmd_serve),
    "fit-many": (add_fit_many_parser, cmd_fit_many),
    "watch": (add_watch_parser, cmd_watch),
}

if __name__ == "__main__":
    sys.exit(main())
