"""BENCHMARKS.md section ``export``: predict latency and memory of each runtime of an exported model.

For every detector: fit (or reuse) a model on the data, export it as ONNX, OpenVINO and TorchScript,
then time predict at batch 1 and 16 for eager torch (the in-memory model exactly as ``anomnet
predict`` runs it: faiss / IVF search, EfficientAD in bfloat16 where the CPU has it), TorchScript,
ONNX Runtime and OpenVINO (float32), each in its own process and alternately with the eager backbone
trunk (EfficientNet-Lite0 to its last block at the same input size and batch), so every time is also
a multiple of the trunk's. Memory: the peak resident set of a separate process that only loads that
runtime and predicts one batch of 16 (the ONNX Runtime and OpenVINO ones import no torch).

Inputs are the first 16 test images as uint8, resized to the model's input size (``image_size``), the
shape the other BENCHMARKS.md sections time predict at. Run on an idle machine::

    python benchmarks/export_bench.py --data ../shared/datasets/mvtec_ad/bottle --work-dir runs/bench-export \
        --markdown BENCHMARKS.md --section export

(``--dry-run`` prints the plan; fitted and exported models in ``--work-dir`` are reused.) On a machine
that others load, wall-clock ratios swing with their work; ``--clock cpu`` times each call by this
process's CPU time instead, with every runtime and the trunk on one thread (``--threads 1``), which
the other processes' load barely moves (the section then says so).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BOTTLE = ROOT.parent / "shared" / "datasets" / "mvtec_ad" / "bottle"
RUNTIMES = ("eager", "torchscript", "onnx", "openvino")
BATCHES = (1, 16)
# Training budgets: predict's cost does not depend on them (the networks and banks keep their shapes).
BLOCKS = 4  # timing blocks per runtime and batch size (alternating with the trunk's)
DEFAULT_SETTINGS = {
    "patchcore": "",
    "anomnet": "",
    "efficientad": "steps=100;distill_steps=100",
    "tocoad": "",
    "inpformer": "steps=50",
    "cpr": "",
}


def _settings(text: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in text.split(";") if item)


def _images(data: str, size: int, n: int = 16) -> np.ndarray:
    """The first ``n`` test images (train images if there is no test/), uint8 at ``size``; imports no torch."""
    from PIL import Image

    from anomnet.imageio import list_images

    root = Path(data)
    paths = list_images(root / "test", recursive=True) if (root / "test").is_dir() else []
    paths = (paths or list_images(root / "train", recursive=True))[:n]
    out = [np.asarray(Image.open(p).convert("RGB").resize((size, size), Image.BILINEAR)) for p in paths]
    return np.stack([out[i % len(out)] for i in range(n)])


def _peak_rss_mb() -> float:
    """This process's peak resident set: VmHWM (ru_maxrss would count the forking parent's memory too)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _runner(runtime: str, model_dir: Path, exports: dict[str, str]) -> Any:
    """uint8 [B,H,W,3] -> whatever the runtime returns, for one runtime."""
    if runtime == "eager":
        import torch

        from anomnet.detectors.base import Detector

        det = Detector.load(model_dir)
        return lambda x: det.predict(torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255.0)
    from anomnet.exported import load_exported

    return load_exported(exports[runtime]).run


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One runtime of one model in this process: ``kind`` ``time`` (with the trunk) or ``memory`` (alone)."""
    threads = spec.get("threads")
    if threads:
        os.environ["ANOMNET_THREADS"] = str(threads)
    images = _images(spec["data"], spec["image_size"])
    run = _runner(spec["runtime"], Path(spec["model_dir"]), spec["exports"])
    if spec["kind"] == "memory":
        run(images)
        return {"peak_rss_mb": _peak_rss_mb(), "torch_loaded": "torch" in sys.modules}
    import torch

    from anomnet.bench import _trunk_for
    from anomnet.detectors.base import Detector

    if threads:
        torch.set_num_threads(threads)
    clock = time.process_time if spec.get("clock") == "cpu" else time.perf_counter
    trunk = _trunk_for(Detector.load(spec["model_dir"]))
    tensor = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    out: dict[str, Any] = {}
    for b in BATCHES:
        repeats = spec["repeats"] if b == 1 else max(3, spec["repeats"] // 4)
        x, t = images[:b], tensor[:b]
        ours: list[float] = []
        ref: list[float] = []
        with torch.inference_mode():
            # alternately in blocks, so a change of load hits both alike; each block starts with an untimed
            # call, because the other runtime's thread pool still spins for a moment after its last call
            # (timed call by call, ONNX Runtime's spinning threads tripled the torch trunk's time)
            for _ in range(BLOCKS):
                share = -(-repeats // BLOCKS)
                for fn, arg, times in ((run, x, ours), (trunk, t, ref)):
                    fn(arg)
                    for _ in range(share):
                        start = clock()
                        fn(arg)
                        times.append((clock() - start) * 1000.0 / b)
        out[f"ms_b{b}"] = statistics.median(ours)
        out[f"trunk_ms_b{b}"] = statistics.median(ref)
        out[f"ratio_b{b}"] = out[f"ms_b{b}"] / out[f"trunk_ms_b{b}"]
    out["load_avg"] = list(os.getloadavg())
    return out


def _run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"worker failed: {spec['kind']} {spec['model']} {spec['runtime']} (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def prepare(args: argparse.Namespace, model: str) -> tuple[Path, dict[str, str], int]:
    """The fitted model of ``model`` in the work folder (fitted now if missing) and its three exports."""
    from anomnet import api
    from anomnet.export import export_model
    from anomnet.exported import FORMATS, is_exported, read_manifest

    work = Path(args.work_dir)
    folder = work / model
    settings = {**_settings(DEFAULT_SETTINGS.get(model, "")), **_settings(args.set.get(model, ""))}
    if not (folder / "anomnet.json").is_file():
        print(f"fitting {model} ({settings or 'defaults'}) ...", file=sys.stderr)
        api.fit(model, args.data, out=folder, settings=settings, progress=False)
    weights = json.loads((folder / "anomnet.json").read_text())["weights_sha256"]
    exports = {}
    for fmt in FORMATS:
        out = work / f"{model}-{fmt}"
        if not (is_exported(out) and read_manifest(out, check_files=False)["source"].get("weights_sha256") == weights):
            print(f"exporting {model} as {fmt} ...", file=sys.stderr)
            export_model(folder, fmt, out, overwrite=True)
        exports[fmt] = str(out)
    size = int(json.loads((folder / "anomnet.json").read_text())["config"]["image_size"])
    return folder, exports, size


def render(report: dict[str, Any]) -> str:
    cpu_clock = report.get("clock") == "cpu"
    lines = [
        "## export",
        "",
        f"Command: `{report['command']}`",
        "",
        f"{report['date']}, {report['cpu']}, {report['cpu_cores']} cores, threads {report['threads'] or 'all'}; "
        f"data {report['data']}; input: 16 test images as uint8 at the model's input size. Times in ms per image "
        + ("(median; this process's CPU time on one thread, `--clock cpu`)" if cpu_clock else "(median)")
        + ", x trunk = multiple of the eager EfficientNet-Lite0 trunk timed alternately in the same process at "
        "the same size and batch. Eager = the in-memory model as `anomnet predict` runs it (faiss / IVF search; "
        "EfficientAD in bfloat16 where the CPU supports it); the exports run exact search in float32 "
        "(docs/export.md). Memory: peak resident set of a process that loads only that runtime and predicts 16 "
        "images (ONNX Runtime and OpenVINO without torch).",
        "",
        "| detector | runtime | ms b1 | x trunk b1 | ms b16 | x trunk b16 | peak RSS MB | torch loaded |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['model']} | {r['runtime']} | {r['ms_b1']:.1f} | {r['ratio_b1']:.2f} | {r['ms_b16']:.1f} | "
            f"{r['ratio_b16']:.2f} | {r['peak_rss_mb']:.0f} | {'yes' if r['torch_loaded'] else 'no'} |"
        )
    loads = [v for r in report["rows"] for v in r.get("load_avg", [])]
    if loads:
        lines += ["", f"1-minute load average during the rows: {min(loads):.1f} to {max(loads):.1f}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--data", default=str(BOTTLE), help="dataset to fit on and take the timing images from")
    p.add_argument("--models", default=",".join(DEFAULT_SETTINGS), help="comma-separated detectors")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="MODEL:KEY=VALUE;...",
        help="fit settings of one detector (default budgets: "
        + "; ".join(f"{k}: {v or 'defaults'}" for k, v in DEFAULT_SETTINGS.items())
        + ")",
    )
    p.add_argument(
        "--work-dir", default=str(ROOT / "runs" / "bench-export"), help="fitted and exported models (reused)"
    )
    p.add_argument("--threads", type=int, default=None, help="CPU threads of every runtime (default: all cores)")
    p.add_argument("--repeats", type=int, default=20, help="timed calls at batch 1 (a quarter of them at batch 16)")
    p.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall: elapsed time (an idle machine); cpu: the process's CPU time, one thread (a loaded machine)",
    )
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "export.json"), help="the JSON report")
    p.add_argument("--markdown", default=None, help="also write the section into this Markdown file")
    p.add_argument("--section", default="export", help="section name in --markdown (default export)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and stop")
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    args.set = dict(item.split(":", 1) for item in args.set)
    if args.clock == "cpu" and args.threads not in (None, 1):
        raise SystemExit("--clock cpu times one thread: leave --threads out or set it to 1")
    if args.clock == "cpu":
        args.threads = 1
    models = [m for m in args.models.split(",") if m]
    if args.dry_run:
        for m in models:
            settings = {**_settings(DEFAULT_SETTINGS.get(m, "")), **_settings(args.set.get(m, ""))}
            print(f"{m}: fit {settings or 'defaults'} -> {args.work_dir}/{m}; runtimes {', '.join(RUNTIMES)}")
        return 0
    from anomnet.bench import _cpu_name, command_line, write_section
    from anomnet.imageio import atomic_write_text

    rows = []
    for model in models:
        folder, exports, size = prepare(args, model)
        for runtime in RUNTIMES:
            spec = {
                "model": model,
                "runtime": runtime,
                "model_dir": str(folder),
                "exports": exports,
                "data": args.data,
                "image_size": size,
                "threads": args.threads,
                "repeats": args.repeats,
                "clock": args.clock,
            }
            row = {"model": model, "runtime": runtime, **_run_worker({**spec, "kind": "time"})}
            row.update(_run_worker({**spec, "kind": "memory"}))
            print(json.dumps(row), file=sys.stderr)
            rows.append(row)
    report = {
        "command": command_line(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": _cpu_name(),
        "cpu_cores": os.cpu_count(),
        "threads": args.threads,
        "clock": args.clock,
        "data": args.data,
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(report, indent=2))
    text = render(report)
    if args.markdown:
        write_section(Path(args.markdown), args.section, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
