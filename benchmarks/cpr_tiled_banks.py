"""Tiled CPR in bounded memory (issue 24): bank size, references per tile, accuracy, predict time, peak RSS.

On tiled bottle (512 px tiles, as BENCHMARKS.md section ``hybrid``) CPR stores the retrieval features of
every training tile. This fits today's setting once (its own process: fit and test peak RSS, accuracy,
predict time), re-scores that fitted model with fewer stored references (``bank_inputs``, the greedy
k-center choice the fit makes) and other scoring settings (``k_images``, ``windows``) -- the re-scored
model is the one a fit with that ``bank_inputs`` gives, as the choice follows the training -- and
fits each ``--fit`` setting in its own process for its peak RSS::

    python benchmarks/cpr_tiled_banks.py --out benchmarks/cpr-tiled-banks.json \\
        --variants '{"bank_inputs": 300}' '{"bank_inputs": 300, "k_images": 5}' --fit '{"bank_inputs": 300}'

Predict time: batch 1 on a full-resolution image, as a multiple of the backbone trunk at the input size
timed interleaved with it (``anomnet.bench._time_interleaved``), so a load on the machine hits both alike.
A run stopped after today's fit can go on with ``--resume JSON --model FOLDER`` (a copy of that fit).
Also one thread each (``_1t``), which a loaded machine disturbs less. Peak RSS in MB: ``resource.getrusage``
of the worker process after the fit and after the test.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BOTTLE = Path("/work/shared/datasets/mvtec_ad/bottle")
TILED = {"tile": "512"}
TODAY = {**TILED, "bank_inputs": "0"}  # every training tile stored (the setting before bank_inputs)
METRICS = ("image_auroc", "pixel_auroc", "au_pro@0.3", "au_pro@0.05")


def _rss() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _timing(det: Any, data: Path) -> dict[str, float]:
    """Predict on one full-resolution image against one trunk pass on that image at the input size (as
    section ``hybrid``'s tiled rows), timed alternately; then the same with one thread each."""
    import torch

    from anomnet.bench import _time_interleaved, _timing_images, _trunk_for
    from anomnet.data import load_dataset

    split = load_dataset(str(data), None, val_fraction=0.0)
    images = _timing_images(split, None, n=1)
    small = _timing_images(split, det.config.image_size, n=1)
    net = _trunk_for(det)

    def trunk(_: torch.Tensor) -> Any:
        return net(small)

    predict_ms, trunk_ms = _time_interleaved(det.predict, trunk, images, 1, 5)
    out = {"predict_ms_b1": predict_ms, "trunk_ms_b1": trunk_ms, "ratio_b1": predict_ms / trunk_ms}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread each: less sensitive to other jobs on a loaded machine
    try:
        predict_ms, trunk_ms = _time_interleaved(det.predict, trunk, images, 1, 5)
    finally:
        torch.set_num_threads(threads)
    out.update(predict_ms_b1_1t=predict_ms, trunk_ms_b1_1t=trunk_ms, ratio_b1_1t=predict_ms / trunk_ms)
    return out


def _bank_mb(det: Any) -> float:
    return sum(b.numel() * b.element_size() for b in det.model.banks) / 2**20


def fit_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Fit on tiled bottle with ``spec['settings']``, save to ``spec['out']``, test and time."""
    from anomnet import api
    from anomnet.data import load_dataset

    t = time.perf_counter()
    det = api.fit("cpr", str(spec["data"]), spec["out"], settings=spec["settings"], progress=False)
    out: dict[str, Any] = {"fit_s": time.perf_counter() - t, "peak_rss_fit_mb": _rss(), "bank_mb": _bank_mb(det)}
    out["fit_phases"] = {p["name"]: p for p in det.fit_record.to_dict()["phases"]}
    res = api.test(det, load_dataset(str(spec["data"]), None, val_fraction=0.0), progress=False)
    out["metrics"] = {k: res.metrics.get(k) for k in METRICS}
    out["peak_rss_test_mb"] = _rss()
    out.update(_timing(det, spec["data"]))
    return out


def rescore_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Load the model at ``spec['model']`` and test it with each variant's references and scoring settings."""
    from anomnet import api
    from anomnet.data import load_dataset

    det: Any = api.load(spec["model"])
    m, base = det.model, det.config
    split = load_dataset(str(spec["data"]), None, val_fraction=0.0)
    saved = (m.banks, m.retrieval.refs, m.train_foreground, m.input_owner)
    rows: list[dict[str, Any]] = [{"variant": {}, "kept_inputs": len(saved[1]), "bank_mb": _bank_mb(det)}]
    rows[0].update(_timing(det, spec["data"]))  # today's model as fitted (its accuracy: report["today"])
    for variant in spec["variants"]:
        m.banks, m.retrieval.refs, m.train_foreground, m.input_owner = saved
        det.config = dataclasses.replace(
            base, **{k: tuple(v) if isinstance(v, list) else v for k, v in variant.items()}
        )
        det.config.validate()
        kept = det.reference_inputs()  # what a fit with this bank_inputs keeps
        m.keep_inputs(kept)
        res = api.test(det, split, progress=False)
        row = {"variant": variant, "kept_inputs": len(kept), "bank_mb": _bank_mb(det)}
        row["metrics"] = {k: res.metrics.get(k) for k in METRICS}
        row.update(_timing(det, spec["data"]))
        row["load1"] = os.getloadavg()[0]
        print(json.dumps(row), file=sys.stderr, flush=True)
        rows.append(row)
    return {"rows": rows}


def _padded_search(query: Any, bank: Any, index: Any, window: int) -> Any:
    """The windowed search as it was before bank_inputs (a zero-padded copy of each retrieved input), for timing."""
    import torch
    import torch.nn.functional as F

    b, _, h, w = query.shape
    r = window // 2
    inside = F.pad(torch.ones(1, 1, h, w), (r, r, r, r))[0, 0] > 0
    best = torch.full((b, h, w), float("inf"))
    for j in range(int(index.shape[1])):
        ref = F.pad(bank[index[:, j]].to(query.dtype).contiguous(), (r, r, r, r))
        for dy in range(window):
            for dx in range(window):
                sim = (query * ref[:, :, dy : dy + h, dx : dx + w]).sum(1)
                best = torch.minimum(best, torch.where(inside[dy : dy + h, dx : dx + w], 1.0 - sim, float("inf")))
    return best


def profile_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Median ms of each stage of one full-resolution image's prediction (its tiles in one batch), each stage
    timed alternately with one trunk pass at the input size; one thread (``spec['threads']``)."""
    import statistics

    import torch

    from anomnet import api
    from anomnet.bench import _timing_images, _trunk_for
    from anomnet.data import load_dataset
    from anomnet.detectors.cpr.retrieval import window_distances
    from anomnet.tiling import iter_tiles

    torch.set_num_threads(int(spec.get("threads", 1)))
    det: Any = api.load(spec["model"])
    m, c = det.model, det.config
    split = load_dataset(str(spec["data"]), None, val_fraction=0.0)
    image = _timing_images(split, None, n=1)
    x = det.preprocess(torch.stack([t for _, _, t in iter_tiles(image[0].float(), det.tiling)]))
    small, trunk = x[:1], _trunk_for(det)
    times: dict[str, list[float]] = {}

    def timed(name: str, fn: Any, *args: Any) -> Any:
        t = time.perf_counter()
        out = fn(*args)
        times.setdefault(name, []).append((time.perf_counter() - t) * 1000.0)
        return out

    with torch.inference_mode():
        for _ in range(6):
            timed("trunk", trunk, small)
            timed("predict", det.predict, image)
            levels = timed("backbone levels", m.levels, x)
            desc = levels[m.desc_level]
            index = timed("global retrieval", m.retrieval.retrieve, desc, c.k_images)
            feats = timed("head", m.features, levels)
            for i, (f, bank, window) in enumerate(zip(feats, m.banks, c.windows)):
                timed(f"search level {i}", window_distances, f, bank, index, window, m.batch_chunk)
                timed(f"search level {i}, padded (before)", _padded_search, f, bank, index, window)
    ms = {k: statistics.median(v[1:]) for k, v in times.items()}
    return {
        "tiles": int(x.shape[0]),
        "threads": torch.get_num_threads(),
        "ms": ms,
        "x_trunk": {k: v / ms["trunk"] for k, v in ms.items()},
    }


def render(report: dict[str, Any]) -> str:
    """The docs/cpr.md table: today's fit, the re-scored variants and the fits of the chosen settings."""

    def pct(row: dict[str, Any], key: str) -> str:
        v = row.get("metrics", {}).get(key)
        return "" if v is None else f"{100 * v:.2f}"

    def x(row: dict[str, Any], key: str) -> str:
        return "" if key not in row else f"{row[key]:.1f}x"

    def mb(row: dict[str, Any], key: str) -> str:
        return "" if key not in row else f"{row[key]:,.0f}"

    lines = [
        "| setting | references | bank MB | image AUROC | AU-PRO@0.05 | predict x trunk | 1 thread | fit peak RSS MB "
        "| peak RSS after test MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    today = report["today"]
    timing = today.get("timing", today)
    refs = today["fit_phases"]["bank"]["extra"].get("kept", today["fit_phases"]["features"]["extra"]["inputs"])
    base = report.get("today_settings", TODAY)
    given = ", ".join(f"{k}={v}" for k, v in base.items() if k not in TILED)
    name = "today (every tile)" if base == TODAY else f"{given or 'defaults'} (fit)"
    lines.append(
        f"| {name} | {refs} | {today['bank_mb']:,.0f} | {pct(today, 'image_auroc')} | "
        f"{pct(today, 'au_pro@0.05')} | {x(timing, 'ratio_b1')} | {x(timing, 'ratio_b1_1t')} | "
        f"{mb(today, 'peak_rss_fit_mb')} | {mb(today, 'peak_rss_test_mb')} |"
    )
    for row in report.get("rescored", []):
        name = ", ".join(f"{k}={v}" for k, v in row["variant"].items())
        lines.append(
            f"| {name} (re-scored) | {row['kept_inputs']} | {row['bank_mb']:,.0f} | {pct(row, 'image_auroc')} | "
            f"{pct(row, 'au_pro@0.05')} | {x(row, 'ratio_b1')} | {x(row, 'ratio_b1_1t')} | | |"
        )
    for row in report.get("fits", []):
        name = ", ".join(f"{k}={v}" for k, v in row["settings"].items() if k not in TILED)
        kept = row["fit_phases"]["bank"]["extra"].get("kept", "")
        lines.append(
            f"| {name} (own fit) | {kept} | {row['bank_mb']:,.0f} | {pct(row, 'image_auroc')} | "
            f"{pct(row, 'au_pro@0.05')} | {x(row, 'ratio_b1')} | {x(row, 'ratio_b1_1t')} | "
            f"{mb(row, 'peak_rss_fit_mb')} | {mb(row, 'peak_rss_test_mb')} |"
        )
    return "\n".join(lines)


def _settings(text: str) -> dict[str, str]:
    """The 512 px tiles plus the settings of a JSON object, as the text values ``api.fit`` takes."""
    given = json.loads(text).items()
    return {**TILED, **{k: ",".join(map(str, v)) if isinstance(v, list) else str(v) for k, v in given}}


def _worker(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", kind, json.dumps(spec)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Tiled CPR: bounded banks on tiled bottle (issue 24).")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "cpr-tiled-banks.json"))
    p.add_argument("--data", default=str(BOTTLE))
    p.add_argument(
        "--today",
        default=None,
        help="JSON settings of the fit the variants re-score, over the 512 px tiles (default: every tile stored, "
        "bank_inputs=0, the setting before bank_inputs)",
    )
    p.add_argument("--variants", nargs="*", default=[], help="JSON settings to re-score today's fit with")
    p.add_argument("--fit", nargs="*", default=[], help="JSON settings to fit (own process) for their peak RSS")
    p.add_argument("--resume", metavar="JSON", help="reuse this report's fit of today's setting ...")
    p.add_argument("--model", help="... saved in this folder (a copy of the interrupted run's model)")
    p.add_argument("--profile", metavar="MODEL", help="time the prediction's stages of this fitted model, into --out")
    p.add_argument("--render", metavar="JSON", help="only print the table of a report")
    p.add_argument("--worker", nargs=2, metavar=("KIND", "SPEC"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.render:
        print(render(json.loads(Path(a.render).read_text())))
        return 0
    if a.profile:
        existing = json.loads(Path(a.out).read_text())
        existing["profile"] = _worker("profile", {"data": a.data, "model": a.profile, "threads": 1})
        existing["profile"]["command"] = "python benchmarks/cpr_tiled_banks.py " + " ".join(
            shlex.quote(x) for x in (argv or sys.argv[1:])
        )
        Path(a.out).write_text(json.dumps(existing, indent=1, default=str))
        print(json.dumps(existing["profile"], indent=1))
        return 0
    if a.worker:
        kind, spec = a.worker[0], json.loads(a.worker[1])
        workers = {"fit": fit_worker, "rescore": rescore_worker, "profile": profile_worker}
        print(json.dumps(workers[kind](spec), default=str))
        return 0
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    command = "python benchmarks/cpr_tiled_banks.py " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:]))
    earlier: dict[str, Any] = json.loads(Path(a.resume).read_text()) if a.resume else {}
    report: dict[str, Any] = {
        "command": command,
        "commands": [*earlier.get("commands", [earlier["command"]] if earlier else []), command],
        "started": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu_cores": os.cpu_count(),
        "settings": TILED,
        "today_settings": _settings(a.today) if a.today else TODAY,
        "load1": [os.getloadavg()[0]],
    }

    def save() -> None:
        report["load1"].append(os.getloadavg()[0])
        Path(a.out).write_text(json.dumps(report, indent=1, default=str))

    with tempfile.TemporaryDirectory(prefix="cpr-tiled-") as work:
        full = a.model or str(Path(work) / "today")
        if "today" in earlier and a.model:
            report["today"] = earlier["today"]  # fit, accuracy and peak RSS; timed again below
        else:
            report["today"] = _worker("fit", {"data": a.data, "out": full, "settings": report["today_settings"]})
        save()
        if a.variants:
            spec = {"data": a.data, "model": full, "variants": [json.loads(v) for v in a.variants]}
            rows = _worker("rescore", spec)["rows"]
            report["today"]["timing"] = rows[0]  # today's model timed in the same process as the variants
            report["rescored"] = rows[1:]
            save()
        report["fits"] = []
        for i, text in enumerate(a.fit):
            settings = _settings(text)
            res = _worker("fit", {"data": a.data, "out": str(Path(work) / f"fit{i}"), "settings": settings})
            report["fits"].append({"settings": settings, **res})
            save()
    print(render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
