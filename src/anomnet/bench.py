"""`anomnet bench`: speed, peak memory and accuracy of each detector in one run.

The run writes only where it is told: the JSON report (``--out``), optionally a Markdown table
(``--markdown PATH``, the whole file or one ``--section`` of it) and the fitted models
(``--work-dir``; without it a temporary folder that is removed afterwards). Each configuration
runs in its own process so its peak RSS is its own. Speeds are reported in milliseconds per image
and as a ratio to the backbone-only forward pass timed in the same
run (the whole backbone trunk, no classifier head, same input size and batch).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from anomnet.decisions.calibrate import OPTION_FIELDS, POSTPROCESS_FIELDS, parse_choices
from anomnet.errors import AnomnetError, ConfigError
from anomnet.imageio import atomic_write_text

if TYPE_CHECKING:
    from anomnet.detectors.base import Detector

BATCHES = (1, 16)
CHOICES = OPTION_FIELDS | POSTPROCESS_FIELDS
"""Variant keys that are threshold / mask post-processing choices (``pixel_method=mean-std``), not settings."""


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _time_per_image(fn: Any, images: torch.Tensor, batch: int, repeats: int, budget_s: float = 30.0) -> float:
    """Median milliseconds per image of ``fn`` on batches of ``batch`` images (after one warm-up call);
    fewer repeats (at least 3) once they have taken ``budget_s`` seconds (slow detectors)."""
    x = images[:batch]
    fn(x)
    times = []
    start = time.perf_counter()
    for i in range(repeats):
        if i >= 3 and time.perf_counter() - start > budget_s:
            break
        t = time.perf_counter()
        fn(x)
        times.append((time.perf_counter() - t) * 1000.0 / batch)
    return statistics.median(times)


def _time_interleaved(fn: Any, ref: Any, images: torch.Tensor, batch: int, repeats: int) -> tuple[float, float]:
    """Median ms per image of ``fn`` and of ``ref``, timed alternately (one warm-up call each)."""
    x = images[:batch]
    with torch.inference_mode():
        fn(x)
        ref(x)
        a: list[float] = []
        b: list[float] = []
        for _ in range(repeats):
            for f, times in ((fn, a), (ref, b)):
                t = time.perf_counter()
                f(x)
                times.append((time.perf_counter() - t) * 1000.0 / batch)
    return statistics.median(a), statistics.median(b)


def _trunk_for(det: Detector) -> Any:
    """The whole backbone trunk of the detector's backbone (random weights for the ResNets), or None."""
    from anomnet.backbones import available_backbones, create_backbone

    name = det.backbone_name
    info = next((b for b in available_backbones() if b.name == name), None)
    if info is None:
        return None
    return create_backbone(info.name, (info.layers[-1],), "random" if info.needs_weights_file else None)


def _timing_images(split: Any, size: int | None, n: int = 16) -> torch.Tensor:
    from anomnet.data import iter_batches

    samples = list(split.test)[:n] or list(split.train)[:n]
    images = next(iter(iter_batches(samples, n, size=size))).images
    if images.shape[0] < n:
        images = images.repeat((n + images.shape[0] - 1) // images.shape[0], 1, 1, 1)[:n]
    return images


def backbone_worker(spec: dict[str, Any]) -> dict[str, Any]:
    from anomnet.backbones import available_backbones, create_backbone
    from anomnet.data import load_dataset

    info = next(b for b in available_backbones() if b.name == spec["backbone"])
    split = load_dataset(spec["data"], spec.get("category"))
    images = _timing_images(split, spec["image_size"])
    out: dict[str, Any] = {"backbone": info.name, "image_size": spec["image_size"]}
    for label, layers in (("trunk", (info.layers[-1],)), ("default_layers", info.default_layers)):
        net = create_backbone(info.name, layers, "random" if info.needs_weights_file else None)
        with torch.inference_mode():
            for b in BATCHES:
                out[f"{label}_ms_b{b}"] = _time_per_image(net, images, b, repeats=20 if b == 1 else 5)
        out[f"{label}_layers"] = list(layers)
    return out


def detector_worker(spec: dict[str, Any]) -> dict[str, Any]:
    from anomnet import api
    from anomnet.data import DatasetSplit, load_dataset

    split = load_dataset(spec["data"], spec.get("category"), val_fraction=0.0)  # its test split
    choices = spec.get("thresholds", {})  # threshold / mask post-processing choices of the row, as text
    t = time.perf_counter()
    det = api.fit(  # the training split and calibration as `anomnet fit` makes them
        spec["model"],
        spec["data"],
        spec["out"],
        category=spec.get("category"),
        settings=spec["settings"],
        max_train=spec.get("max_train"),
        progress=False,
        **parse_choices(choices),
    )
    fit_s = time.perf_counter() - t
    rss_fit = _peak_rss_mb()
    res = api.test(det, split, progress=False)
    tiled = det.tiling is not None  # a tiled model is timed on the full-resolution images it is meant for
    images = _timing_images(split, None if tiled else det.config.image_size)
    out: dict[str, Any] = {"fit_s": fit_s, "peak_rss_fit_mb": rss_fit, "metrics": res.metrics, "timed_full_res": tiled}
    trunk = None if tiled else _trunk_for(det)
    for b in BATCHES:
        repeats = (20 if b == 1 else 5) // (4 if tiled else 1)
        if trunk is None:
            out[f"predict_ms_b{b}"] = _time_per_image(det.predict, images, b, repeats=repeats)
        else:  # interleaved with the trunk, so a change of load hits both alike
            out[f"predict_ms_b{b}"], out[f"trunk_ms_b{b}"] = _time_interleaved(det.predict, trunk, images, b, repeats)
    out["test_ms_per_image_full_res"] = 1000.0 * res.seconds_per_image
    out["peak_rss_mb"] = _peak_rss_mb()
    out["memory_bank"] = _bank_shape(det)
    out["fit_record"] = det.fit_record.to_dict()  # phases, seconds, losses, data sources
    # recalibrated as `anomnet calibrate --data` does: the held-out images of the model's seed (and, with
    # leave-one-out calibration, the training images, each scored without itself)
    held = load_dataset(spec["data"], spec.get("category"), val_fraction=0.1, seed=det.config.seed)
    good = (list(held.train) if det.calibration.source == "loo" else []) + list(held.validation)
    recal = DatasetSplit(split.name, split.train, good, split.test)
    out["rescored"] = [{"settings": extra, "metrics": rescore(det, recal, extra)} for extra in spec.get("rescore", [])]
    out["branches"] = branch_report(det, recal, choices)
    return out


def branch_report(det: Detector, split: Any, choices: dict[str, str]) -> dict[str, Any] | None:
    """For a detector made of branches (the hybrid): its choice and its evidence, and every fitted branch
    calibrated on the validation images with the row's choices and evaluated on the test split, so the choice
    can be judged in hindsight. None for other detectors."""
    branches = det.fitted_branches()
    if not branches:
        return None
    from anomnet import api
    from anomnet.decisions.calibrate import calibrate_detector, split_choices

    options, post = split_choices(parse_choices(choices))
    tested: dict[str, Any] = {}
    for alias, branch in branches.items():
        calibrate_detector(branch, split.validation, options, None, post)
        tested[alias] = {"detector": branch.name, "metrics": api.test(branch, split, progress=False).metrics}
    return {"choice": det.choice, "tested": tested}


def rescore(det: Any, split: Any, changes: dict[str, str]) -> dict[str, float]:
    """Metrics of the fitted ``det`` with scoring-time settings (e.g. ``alpha``) or threshold / post-processing
    choices (e.g. ``pixel_method=mean-std``) changed: the thresholds are recalibrated on the validation
    images, then the test split is evaluated; the settings and thresholds are restored."""
    from anomnet import api
    from anomnet.decisions.calibrate import recalibrate

    settings = {k: v for k, v in changes.items() if k not in CHOICES}
    chosen = parse_choices({k: v for k, v in changes.items() if k in CHOICES})
    old_config, old_calibration = det.config, det.calibration
    try:
        det.config = type(old_config).from_dict({**old_config.to_dict(), **settings})
        recalibrate(det, chosen, validation=split.validation)  # the fit's statistics and choices, but ``chosen``
        return api.test(det, split, progress=False).metrics
    finally:
        det.config, det.calibration = old_config, old_calibration


def memory_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Fit on ``images`` training images (the training set repeated) and report time and peak RSS."""
    from anomnet.data import load_dataset
    from anomnet.detectors import create_detector

    split = load_dataset(spec["data"], spec.get("category"))
    n = spec["images"]
    train = (list(split.train) * (n // max(1, len(split.train)) + 1))[:n]
    base_rss = _peak_rss_mb()
    det = create_detector(spec["model"], spec["settings"])
    t = time.perf_counter()
    det.fit(train, split.validation, progress=False)
    return {
        "model": spec["model"],
        "images": n,
        "fit_s": time.perf_counter() - t,
        "peak_rss_mb": _peak_rss_mb(),
        "rss_before_fit_mb": base_rss,
        "memory_bank": _bank_shape(det),
    }


def _bank_shape(det: Detector) -> list[int] | None:
    """The memory bank's shape of a PatchCore (or ToCoAD) model, None for other detectors."""
    from anomnet.detectors.patchcore import PatchCore

    return list(det.memory_bank.shape) if isinstance(det, PatchCore) else None


def _run_worker(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "anomnet.bench", kind, json.dumps(spec)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise BenchError(
            f"benchmark worker failed ({kind}, {spec.get('name', spec.get('backbone'))}), exit {proc.returncode}"
        )
    return json.loads(proc.stdout.strip().splitlines()[-1])


class BenchError(AnomnetError):
    """A benchmark worker process failed."""


def _accepts(det: Any, changes: str) -> bool:
    """Whether every setting named in ``changes`` ('k=v;k=v') is one of ``det``'s settings."""
    names = {k.partition("=")[0].strip() for k in filter(None, changes.split(";"))}
    return names <= set(det.config.to_dict()) | CHOICES


def _parse_variant(text: str, default_model: str) -> tuple[str, str, dict[str, str]]:
    name, _, rest = text.partition(":")
    settings: dict[str, str] = {}
    for item in filter(None, rest.split(";")):
        k, _, v = item.partition("=")
        settings[k.strip()] = v.strip()
    model = settings.pop("model", default_model)
    return name, model, settings


def main(args: argparse.Namespace) -> int:
    """Run ``anomnet bench``: the JSON report to ``args.out``, the Markdown only to ``args.markdown`` if given."""
    if getattr(args, "section", None) and not getattr(args, "markdown", None):
        raise ConfigError("--section names a section of the --markdown file: give --markdown PATH too")
    if args.work_dir is not None:
        return run(args, Path(args.work_dir))
    with tempfile.TemporaryDirectory(prefix="anomnet-bench-") as work:
        return run(args, Path(work))


def run(args: argparse.Namespace, work: Path) -> int:
    from anomnet.detectors import create_detector

    configs: list[tuple[str, str, dict[str, str]]] = [(m, m, {}) for m in args.models.split(",") if m]
    configs += [_parse_variant(v, configs[0][1] if configs else "patchcore") for v in args.variant]
    backbones: dict[tuple[str, int], dict[str, Any]] = {}
    rows: list[dict[str, Any]] = []
    for i, (name, model, given) in enumerate(configs):
        settings = {k: v for k, v in given.items() if k not in CHOICES}
        thresholds = {k: v for k, v in given.items() if k in CHOICES}  # threshold / post-processing choices
        parse_choices(thresholds)  # checked before any long work, as the settings are
        det = create_detector(model, settings)  # validates the settings before any long work
        key = (det.backbone_name or "efficientnet_lite0", det.config.image_size)
        if key not in backbones:
            print(f"[bench] backbone {key[0]} at {key[1]} px", file=sys.stderr)
            spec = {"backbone": key[0], "image_size": key[1], "data": args.data, "category": args.category}
            backbones[key] = _run_worker("backbone", spec)
        print(f"[bench] {name}: fit, test, timing", file=sys.stderr)
        spec = {
            "name": name,
            "model": model,
            "settings": settings,
            "thresholds": thresholds,
            "data": args.data,
            "category": args.category,
            "out": str(work / name),
        }
        rescores = getattr(args, "rescore", None) or []
        spec["rescore"] = [_parse_variant(":" + r, model)[2] for r in rescores if _accepts(det, r)]
        load_before = os.getloadavg()[0]
        result = _run_worker("detector", spec)
        result["load_avg"] = [load_before, os.getloadavg()[0]]  # 1-minute load average before / after this row
        bb = backbones[key]
        for b in BATCHES:  # the trunk timed beside this detector in its own process when there is one
            result[f"ratio_b{b}"] = result[f"predict_ms_b{b}"] / result.get(f"trunk_ms_b{b}", bb[f"trunk_ms_b{b}"])
        rows.append({"name": name, "model": model, "settings": given, "backbone": key[0], **result})
        for extra in result.pop("rescored", None) or []:  # the same fitted model, scored with other settings
            label = ";".join(f"{k}={v}" for k, v in extra["settings"].items())
            rows.append(
                {
                    **rows[-1],
                    "name": f"{name} {label}",
                    "settings": {**settings, **extra["settings"]},
                    "metrics": extra["metrics"],
                    "rescored_from": name,
                }
            )
        if i + 1 < len(configs):  # an interrupted run keeps the rows it has measured
            _write_report(args, backbones, rows, None, pending=[c[0] for c in configs[i + 1 :]])
    memory = None
    if args.memory_images:
        print(f"[bench] memory check: patchcore fit on {args.memory_images} images", file=sys.stderr)
        spec = {
            "model": "patchcore",
            "settings": {},
            "images": args.memory_images,
            "data": args.data,
            "category": args.category,
        }
        memory = _run_worker("memory", spec)
    print(_write_report(args, backbones, rows, memory))
    return 0


def command_line() -> str:
    """The command as typed: ``anomnet bench ...`` or the script that ran (``python benchmarks/x.py ...``)."""
    if sys.argv[1:2] == ["bench"]:
        return "anomnet bench " + " ".join(shlex.quote(a) for a in sys.argv[2:])
    return " ".join(["python", *(shlex.quote(a) for a in sys.argv)])


def write_outputs(args: argparse.Namespace, report: dict[str, Any], text: str) -> None:
    """The JSON report to ``args.out``; the Markdown ``text`` to ``args.markdown`` (its ``args.section``) if given."""
    json_path = Path(args.out)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json_path, json.dumps(report, indent=2))
    if getattr(args, "markdown", None):
        write_section(Path(args.markdown), getattr(args, "section", None), text)


def _write_report(
    args: argparse.Namespace,
    backbones: dict[tuple[str, int], dict[str, Any]],
    rows: list[dict[str, Any]],
    memory: dict[str, Any] | None,
    pending: Sequence[str] = (),
) -> str:
    """Write the JSON (and the Markdown if asked) of the rows measured so far; ``pending``: configurations to run."""
    report = {
        "command": command_line(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu": _cpu_name(),
        "torch": torch.__version__,
        "data": args.data,
        "backbones": list(backbones.values()),
        "rows": rows,
        "memory_check": memory,
        "pending": list(pending),
    }
    text = render_markdown(report, getattr(args, "section", None))
    write_outputs(args, report, text)
    return text


TITLE = "# Benchmarks\n"


def write_section(path: Path, section: str | None, text: str) -> None:
    """Write ``text`` as the whole file (``section`` None) or replace only that section of it.

    A section lives between ``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->`` so several
    benchmark commands (one per detector family) share BENCHMARKS.md without overwriting each
    other; a new section is appended.
    """
    if section is None:
        atomic_write_text(path, TITLE + "\n" + text)
        return
    begin, end = f"<!-- bench:{section} -->", f"<!-- /bench:{section} -->"
    block = f"{begin}\n{text}{end}\n"
    old = path.read_text() if path.exists() else TITLE
    if begin in old and end in old:
        head, rest = old.split(begin, 1)
        new = head + block + rest.split(end, 1)[1].lstrip("\n")
    else:
        new = old.rstrip("\n") + "\n\n" + block
    atomic_write_text(path, new)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _pct(v: Any) -> str:
    return "n/a" if v is None or v != v else f"{100 * v:.2f}"


def _load_note(r: dict[str, Any]) -> list[str]:
    loads = [v for row in r["rows"] for v in row.get("load_avg", [])]
    if not loads:
        return []
    busy = max(loads) > 0.5 * (r["cpu_cores"] or 1)
    return [
        f"1-minute load average around the rows: {min(loads):.1f} to {max(loads):.1f} on {r['cpu_cores']} cores"
        + (
            "; other processes shared the cores, so absolute times are slower than on an idle machine (the predict"
            " ratios time the trunk alternately with the detector and are less affected)."
            if busy
            else " (idle machine)."
        )
    ]


def render_markdown(r: dict[str, Any], section: str | None = None) -> str:
    h = "###" if section else "##"
    lines = [
        *([f"## {section}", ""] if section else []),
        f"Produced by `{r['command']}` on {r['date']}: {r['cpu_cores']} CPU cores ({r['cpu']}), "
        f"{r['torch_threads']} torch threads, torch {r['torch']}. Data: `{r['data']}`.",
        *_load_note(r),
        "",
        f"{h} Backbone forward pass alone (ms per image)",
        "",
        "| backbone | px | trunk b1 | trunk b16 | detector layers | layers b1 | layers b16 |",
        "|---|---|---|---|---|---|---|",
    ]
    for b in r["backbones"]:
        lines.append(
            f"| {b['backbone']} | {b['image_size']} | {b['trunk_ms_b1']:.1f} | {b['trunk_ms_b16']:.1f} | "
            f"{','.join(b['default_layers_layers'])} | {b['default_layers_ms_b1']:.1f} | "
            f"{b['default_layers_ms_b16']:.1f} |"
        )
    lines += [
        "",
        "'trunk' is the whole feature trunk (every block, no classifier head); "
        "'layers' stops after the detector's deepest layer.",
        "",
        f"{h} Detectors",
        "",
        "Metrics in percent on the test split; AU-PRO as MVTec's official evaluation, "
        "maps at the masks' full resolution.",
        "Predict: ms per image at the detector's input size, and the ratio to the backbone trunk at the same batch",
        "(the trunk timed alternately with the detector in the same process, so a change of load hits both alike);",
        "for tiled models (`tile` set) on the full-resolution images, every tile included. Test: ms per image of",
        "the whole test pass at full resolution (read, predict, restore the map; batch 8).",
        "Fit RSS: peak resident memory of the process after fitting; peak RSS: after testing too (the exact pixel",
        "metrics hold 8 bytes per ground-truth pixel).",
        "",
        "| config | settings | image AUROC | pixel AUROC | AU-PRO@0.3 | AU-PRO@0.05 | pixel F1-max | image F1-max "
        "| F1 @thr | fit s | predict b1 ms (x) | predict b16 ms (x) | test ms | fit RSS MB | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        m = row["metrics"]
        settings = ", ".join(f"{k}={v}" for k, v in row["settings"].items()) or "defaults"
        lines.append(
            f"| {row['name']} | {settings} | {_pct(m.get('image_auroc'))} | {_pct(m.get('pixel_auroc'))} | "
            f"{_pct(m.get('au_pro@0.3'))} | {_pct(m.get('au_pro@0.05'))} | {_pct(m.get('pixel_f1_max'))} | "
            f"{_pct(m.get('image_f1_max'))} | {_pct(m.get('f1'))} | {row['fit_s']:.1f} | "
            f"{row['predict_ms_b1']:.1f} ({row['ratio_b1']:.2f}x) | "
            f"{row['predict_ms_b16']:.1f} ({row['ratio_b16']:.2f}x) | "
            f"{row.get('test_ms_per_image_full_res', float('nan')):.0f} | "
            f"{row['peak_rss_fit_mb']:.0f} | {row['peak_rss_mb']:.0f} |"
        )
    rows = r["rows"]
    if r.get("pending"):
        lines += ["", f"**Run in progress or interrupted**: not measured yet: {', '.join(r['pending'])}."]
    if any(row.get("rescored_from") for row in rows):
        lines += [
            "",
            "Rows named '<config> KEY=VALUE' rescore the fitted model of `<config>` "
            "with a scoring-time setting changed "
            "(threshold recalibrated on the validation images): its fit and predict columns are that model's.",
        ]
    if len(rows) > 1 and rows[0]["model"] == "patchcore":
        ref = rows[0]
        lines += [
            "",
            f"Predict time as a multiple of the first row's ({ref['name']}, same run), batch 1 / batch 16: "
            + ", ".join(
                f"{row['name']} {row['predict_ms_b1'] / ref['predict_ms_b1']:.1f}x / "
                f"{row['predict_ms_b16'] / ref['predict_ms_b16']:.1f}x"
                for row in rows[1:]
                if not row.get("rescored_from")
            )
            + ".",
        ]
    mem = r.get("memory_check")
    if mem:
        lines += [
            "",
            f"{h} Memory check",
            "",
            f"{mem['model']} fit on {mem['images']} training images at the default 256 px (the training set repeated): "
            f"{mem['fit_s']:.0f} s, peak RSS {mem['peak_rss_mb']:.0f} MB "
            f"(of which {mem['rss_before_fit_mb']:.0f} MB before fitting: "
            f"libraries and data index), memory bank {mem['memory_bank'][0]} x {mem['memory_bank'][1]}.",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    from anomnet.runtime import tune_allocator

    tune_allocator()
    kind, spec_json = sys.argv[1], sys.argv[2]
    worker = {"backbone": backbone_worker, "detector": detector_worker, "memory": memory_worker}[kind]
    result = worker(json.loads(spec_json))
    print(json.dumps(result))
