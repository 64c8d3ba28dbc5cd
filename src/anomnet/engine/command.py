"""``anomnet predict --engine ray``: the command-line step (checks, run, summary, exit code)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from anomnet.errors import ConfigError
from anomnet.install import install_command

EXIT_OK, EXIT_INTERNAL, EXIT_SOME_FAILED = 0, 1, 3


def check_local(args: argparse.Namespace) -> None:
    """Refuse engine-only options with the local engine (before any work)."""
    used = [
        flag
        for flag, value in (
            ("--model", args.model),
            ("--model-root", args.model_root),
            ("--resume", args.resume),
            ("--rows-only", args.rows_only),
            ("--address", args.address),
            ("--workers", args.workers),
            ("--batch-size", args.batch_size),
        )
        if value
    ]
    if used:
        raise ConfigError(f"{', '.join(used)}: only with --engine ray (the local engine scores with --model-dir)")
    if args.model_dir is None:
        raise ConfigError("--model-dir is required (the model folder written by 'anomnet fit' or 'anomnet export')")


def predict_command(args: argparse.Namespace) -> int:
    """Run ``predict --engine ray``; returns the exit code."""
    from anomnet import imageio
    from anomnet.predict.shard import Shard

    if args.out is None:
        raise ConfigError("--engine ray needs --out (the folder for results.parquet/.csv/.jsonl and the image files)")
    if args.csv:
        raise ConfigError("--csv: with --engine ray the CSV is OUT/results.csv")
    if getattr(args, "out_layout", "anomnet") != "anomnet":
        raise ConfigError(f"--out-layout {args.out_layout}: only with the local engine")
    shard = Shard.parse(args.shard) if args.shard else None
    try:
        import ray  # noqa: F401
        import ray.data  # noqa: F401
    except ImportError:
        raise ConfigError(f"--engine ray needs Ray: {install_command('ray')}") from None
    from anomnet.engine.models import resolve_models
    from anomnet.engine.ray_predict import BATCH_SIZE, EngineFailed, predict_on_ray
    from anomnet.predict.inputs import collect_inputs

    models = resolve_models(args.model_dir, args.model, args.model_root)
    protected = [Path(i) for i in args.images if i != "-" and Path(i).exists()] + [Path(m) for m in models.values()]
    imageio.check_not_input(args.out, protected, "--out", folder=True)
    imageio.check_writable(args.out, "--out", folder=True)
    refs = collect_inputs(args.images, batch=True)
    if shard is not None:
        refs = shard.select(refs)
    try:
        summary = predict_on_ray(
            refs,
            models,
            args.out,
            raw_maps=args.raw_maps,
            image_outputs=not args.rows_only,
            resume=args.resume,
            address=args.address,
            workers=args.workers,
            worker_cpus=args.worker_cpus,
            batch_size=args.batch_size or BATCH_SIZE,
            progress=not args.quiet,
        )
    except EngineFailed as exc:
        print(f"anomnet: error: {exc}", file=sys.stderr)
        return EXIT_INTERNAL
    print("\n".join(summary.lines()))
    files = "" if args.rows_only else ", heatmaps/, overlays/, masks/" + (", maps/" if args.raw_maps else "")
    print(f"outputs written to {args.out} (results.parquet, results.csv, results.jsonl{files})")
    if summary.missing:
        print(
            f"anomnet: {len(summary.missing)} of {summary.inputs} inputs have no row (the engine failed them "
            "twice): run the same command with --resume",
            file=sys.stderr,
        )
        return EXIT_INTERNAL
    if summary.failed:
        print(
            f"anomnet: {summary.failed} of {summary.inputs} images failed (see the error column of results.csv)",
            file=sys.stderr,
        )
        return EXIT_SOME_FAILED
    return EXIT_OK
