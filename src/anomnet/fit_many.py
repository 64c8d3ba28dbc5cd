"""``anomnet fit-many --data ROOT --out MODELS``: one model per category folder, on Ray or one after another.

A *category* is a subfolder of ROOT holding a dataset ``anomnet fit`` reads (MVTec style:
``train/good/`` and ``test/``; or generic: ``train/`` and optional ``test/``), e.g. the MVTec AD root
or one folder per product. Each category is fitted by :func:`anomnet.api.fit` into ``MODELS/<category>``
(the layout ``predict --model-root MODELS`` reads) and, when it has a test split, evaluated by
:func:`anomnet.api.test` (``MODELS/<category>/metrics.json``). With ``engine="ray"`` every category is
one Ray task that asks for ``cpus_per_fit`` CPUs (and runs torch with as many threads), so a cluster fits
as many categories at once as it has room for; ``engine="local"`` fits them in this process, in order.
A category that fails (bad data, a worker that died) is reported with its reason and never stops the
others. ``MODELS/fit-many.json`` keeps the summary of the last run.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from anomnet import imageio
from anomnet.errors import AnomnetError, ConfigError, DatasetError

ENGINES = ("auto", "local", "ray")
SUMMARY_FILE = "fit-many.json"
TABLE_METRICS = ("image_auroc", "pixel_auroc", "au_pro@0.3")


@dataclass
class CategoryResult:
    """What happened to one category."""

    category: str
    detector: str
    model_dir: str
    status: str = "ok"
    """``ok``, ``failed`` or ``skipped`` (a model was there and ``skip_existing``)."""
    error: str | None = None
    fit_seconds: float | None = None
    test_seconds: float | None = None
    test_images: int = 0
    metrics: dict[str, float | None] = field(default_factory=dict)


@dataclass(frozen=True)
class FitJob:
    """Everything one category's fit needs (sent to a Ray worker as it is)."""

    category: str
    data_dir: str
    model_dir: str
    detector: str
    settings: dict[str, Any] = field(default_factory=dict)
    val_fraction: float | None = None  # None: api.fit's default for the detector's calibration
    calibration: str = "auto"
    seed: int = 0
    max_false_alarm: float = 0.01
    max_train: int | None = None
    overwrite: bool = False
    test: bool = True
    threads: int | None = None


def find_categories(root: str | Path, only: Sequence[str] = ()) -> list[tuple[str, Path]]:
    """The category folders of ``root`` (each with a ``train/`` folder), by name; ``only`` picks some."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset root not found")
    if (root / "train").is_dir():
        raise DatasetError(f"{root}: is one dataset (it has train/), not a root of categories: use 'anomnet fit'")
    found = {p.name: p for p in sorted(root.iterdir()) if p.is_dir() and (p / "train").is_dir()}
    if only:
        unknown = [c for c in only if c not in found]
        if unknown:
            listed = ", ".join(found) or "none"
            raise DatasetError(f"{root}: no category {', '.join(unknown)} (categories with a train/ folder: {listed})")
        return [(c, found[c]) for c in only]
    if not found:
        raise DatasetError(f"{root}: no category folder (a subfolder with train/, e.g. an MVTec AD category)")
    return list(found.items())


def fit_category(job: FitJob) -> CategoryResult:
    """Fit (and test) one category; every failure is caught and reported in the result, never raised."""
    result = CategoryResult(job.category, job.detector, job.model_dir)
    try:
        if job.threads:
            import torch

            torch.set_num_threads(job.threads)
        from anomnet import api
        from anomnet.data import load_dataset

        start = time.perf_counter()
        det = api.fit(  # the split and the calibration as `anomnet fit` makes them
            job.detector,
            job.data_dir,
            job.model_dir,
            settings=job.settings,
            val_fraction=job.val_fraction,
            calibration=job.calibration,
            seed=job.seed,
            max_false_alarm=job.max_false_alarm,
            max_train=job.max_train,
            progress=False,
            overwrite=job.overwrite,
        )
        result.fit_seconds = time.perf_counter() - start
        split = load_dataset(job.data_dir, val_fraction=0.0, seed=job.seed) if job.test else None
        if split is not None and split.test:
            start = time.perf_counter()
            res = api.test(det, split, json_out=Path(job.model_dir) / "metrics.json", progress=False)
            result.test_seconds = time.perf_counter() - start
            result.test_images = len(split.test)
            result.metrics = {k: (None if v is None or math.isnan(v) else float(v)) for k, v in res.metrics.items()}
    except AnomnetError as exc:
        result.status, result.error = "failed", str(exc)
    except Exception as exc:  # one category must never stop the others: its row says what went wrong
        result.status, result.error = "failed", f"{type(exc).__name__}: {exc}"
    return result


def fit_many(
    root: str | Path,
    out: str | Path,
    detector: str,
    *,
    settings: dict[str, Any] | None = None,
    categories: Sequence[str] = (),
    engine: str = "auto",
    address: str | None = None,
    cpus_per_fit: float = 1,
    skip_existing: bool = False,
    progress: bool = True,
    **fit_options: Any,
) -> list[CategoryResult]:
    """Fit every category of ``root`` into ``out/<category>`` (see the module docstring); one result each.

    ``fit_options``: ``val_fraction``, ``calibration``, ``seed``, ``max_false_alarm``, ``max_train``, ``overwrite``,
    ``test``.
    """
    if engine not in ENGINES:
        raise ConfigError(f"--engine {engine!r}: use one of {', '.join(ENGINES)}")
    if cpus_per_fit <= 0:
        raise ConfigError(f"--cpus-per-fit must be above 0, got {cpus_per_fit}")
    found = find_categories(root, categories)
    out = Path(out)
    imageio.check_not_input(out, [Path(root)], "--out", folder=True)
    imageio.check_writable(out, "--out", folder=True)
    if engine == "auto":
        engine = "ray" if _have_ray() else "local"
    threads = max(1, int(cpus_per_fit))
    jobs, results = [], {}
    for name, folder in found:
        model_dir = out / name
        if skip_existing and (model_dir / "anomnet.json").is_file():
            results[name] = CategoryResult(name, detector, str(model_dir), status="skipped", error="model exists")
            continue
        jobs.append(
            FitJob(name, str(folder), str(model_dir), detector, dict(settings or {}), threads=threads, **fit_options)
        )
    report = _reporter(len(found), progress)
    for r in results.values():
        report(r)
    if engine == "local":
        for job in jobs:
            results[job.category] = report(fit_category(job))
    else:
        for r in _fit_on_ray(jobs, address, cpus_per_fit, report):
            results[r.category] = r
    ordered = [results[name] for name, _ in found]
    out.mkdir(parents=True, exist_ok=True)
    summary = {"root": str(root), "engine": engine, "categories": [asdict(r) for r in ordered]}
    imageio.atomic_write_text(out / SUMMARY_FILE, json.dumps(summary, indent=2))
    return ordered


def _have_ray() -> bool:
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


def _fit_on_ray(jobs: list[FitJob], address: str | None, cpus_per_fit: float, report: Any) -> list[CategoryResult]:
    if not jobs:
        return []
    from anomnet.engine.ray_predict import ensure_ray

    ensure_ray(address)
    import ray

    task = ray.remote(fit_category).options(num_cpus=cpus_per_fit, max_retries=1)
    pending = {task.remote(job): job for job in jobs}
    done: list[CategoryResult] = []
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            job = pending.pop(ref)
            try:
                result = ray.get(ref)
            except Exception as exc:  # the worker died twice (killed, out of memory): this category failed
                result = CategoryResult(job.category, job.detector, job.model_dir, "failed", f"{type(exc).__name__}")
            done.append(report(result))
    return done


def _reporter(total: int, enabled: bool) -> Any:
    count = 0

    def report(result: CategoryResult) -> CategoryResult:
        nonlocal count
        count += 1
        if enabled:
            what = f"fitted in {result.fit_seconds:.1f} s" if result.status == "ok" else result.status
            reason = f": {result.error}" if result.error else ""
            print(f"[{count}/{total}] {result.category}: {what}{reason}", file=sys.stderr, flush=True)
        return result

    return report


def summary_table(results: Sequence[CategoryResult]) -> str:
    """The per-category table: detector, metrics in percent (when a test split exists), fit seconds, status."""
    head = ["category", "detector", *TABLE_METRICS, "fit s", "status"]
    rows = []
    for r in results:
        values = [r.metrics.get(m) for m in TABLE_METRICS]
        metrics = ["-" if v is None else f"{100 * v:.2f}" for v in values]
        fit = "-" if r.fit_seconds is None else f"{r.fit_seconds:.1f}"
        status = r.status if r.error is None else f"{r.status}: {r.error}"
        rows.append([r.category, r.detector, *metrics, fit, status])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip() for line in [head, *rows]]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def command(args: argparse.Namespace, settings: dict[str, Any]) -> int:
    """Run ``fit-many``; exit code 0, or 3 when a category failed."""
    from anomnet.detectors import DEFAULT_DETECTOR

    for key, value in (("image_size", args.image_size), ("backbone", args.backbone)):
        if value is not None:
            settings[key] = value
    results = fit_many(
        args.data,
        args.out,
        args.model or DEFAULT_DETECTOR,
        settings=settings,
        categories=[c.strip() for c in args.categories.split(",") if c.strip()] if args.categories else (),
        engine=args.engine,
        address=args.address,
        cpus_per_fit=args.cpus_per_fit,
        skip_existing=args.skip_existing,
        progress=not args.quiet,
        val_fraction=args.val_fraction,
        calibration=args.calibration,
        seed=args.seed,
        max_false_alarm=args.max_false_alarm,
        max_train=args.max_train,
        overwrite=args.overwrite,
        test=not args.no_test,
    )
    print(summary_table(results) + "\n(metrics in percent; summary in " + str(Path(args.out) / SUMMARY_FILE) + ")")
    failed = [r.category for r in results if r.status == "failed"]
    if failed:
        print(f"anomnet: {len(failed)} of {len(results)} categories failed: {', '.join(failed)}", file=sys.stderr)
        return 3
    return 0
