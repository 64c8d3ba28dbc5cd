"""Throughput of ``anomnet predict`` (one process) against ``predict --engine ray`` on this machine.

Writes ``benchmarks/ray-throughput.json`` and the ``ray-throughput`` section of BENCHMARKS.md, the
figures docs/scaling.md's arithmetic uses::

    python benchmarks/ray_throughput.py                       # the recorded run (an idle machine)
    python benchmarks/ray_throughput.py --images 12 --noop-images 64 --max-train 10 \\
        --out /tmp/rt.json --markdown /tmp/rt.md              # a quick check of the driver
    python benchmarks/ray_throughput.py --dry-run             # print the command only
    python benchmarks/ray_throughput.py --png-settings --images 83 \\
        --out benchmarks/png-settings.json                    # only the PNG settings table (section png-settings)

Steps, each timed on the wall clock, one after another: fit PatchCore on ``--data`` (``--max-train``
images); lay out ``--images`` test images (copies, cycled); run ``anomnet predict`` on one image
(the fixed cost: start-up and model load) and on all of them, then ``anomnet predict --engine ray`` on
all of them (a fresh local Ray: its start is in the wall time and reported apart), and check both give
the same scores; the local run's CPU time (user + system of the process) is recorded too, a figure a busy
machine changes little. Then the engine's own overhead: a model that costs nothing (``NullScorer``) on
``--noop-images`` tiny images, locally and on Ray. Last, the per-image costs on one core: decoding,
the model, writing the outputs (drawing, PNG encoding, writing the files), and loading the model; and
the PNG settings table: CPU time of this thread and file size of each output kind at several zlib levels
and strategies (``anomnet.imageio.encode_png``) and with Pillow's default writer, every file checked to decode
to the same pixels (``--png-settings``: this table only, as section ``png-settings``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import resource
import shlex
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BOTTLE = ROOT.parent / "shared" / "datasets" / "mvtec_ad" / "bottle"
SECTION = "ray-throughput"
PNG_SECTION = "png-settings"
ANOMNET = [sys.executable, "-m", "anomnet.cli"]


class NullScorer:
    """A model that costs nothing: score 0, an all-zero map (the engine's and the I/O's cost alone)."""

    batch_size = 16

    def __init__(self) -> None:
        from anomnet.decisions.calibration import Calibration

        self.calibration = Calibration(validation_scores=[0.0, 1.0], threshold=0.5, pixel_threshold=0.5)

    def score_arrays(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.zeros(len(images)), np.zeros(images.shape[:3], np.float32)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Local predict vs predict --engine ray: throughput and overheads.")
    p.add_argument("--data", default=str(BOTTLE), help=f"dataset whose test images are scored (default {BOTTLE})")
    p.add_argument("--images", type=int, default=400, help="images scored per run (test images cycled; default 400)")
    p.add_argument("--noop-images", type=int, default=2000, help="tiny images of the no-op runs (default 2000)")
    p.add_argument("--max-train", type=int, default=60, help="training images of the model (default 60)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="Ray workers = local torch threads")
    p.add_argument("--work-dir", default=str(ROOT / "runs" / "bench-ray"), help="model, images and outputs")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / f"{SECTION}.json"), help="the JSON report")
    p.add_argument("--markdown", default=str(ROOT / "BENCHMARKS.md"), help="file whose section is replaced")
    p.add_argument("--png-settings", action="store_true", help="only the PNG settings table (section png-settings)")
    p.add_argument("--dry-run", action="store_true", help="print the command and exit")
    return p


def command_line(argv: list[str]) -> str:
    return " ".join(["python", "benchmarks/ray_throughput.py", *map(shlex.quote, argv)])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    a = parser().parse_args(argv)
    command = command_line(argv)
    print(command, flush=True)
    if a.dry_run:
        return 0
    from anomnet.bench import _cpu_name

    work = Path(a.work_dir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    report: dict[str, Any] = {
        "command": command,
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "workers": a.workers,
        "load_avg_before": os.getloadavg()[0],
        "json": _shown(Path(a.out)),
    }
    model = work / "model"
    fit = [*ANOMNET, "--threads", str(a.workers), "fit", "--data", a.data, "--out", str(model), "--quiet"]
    report["fit_seconds"] = _timed([*fit, "--max-train", str(a.max_train)])[0]
    images = _lay_out(Path(a.data), work / "images", a.images)
    if a.png_settings:
        report["png"] = _png_settings(model, images)
        return _finish(a, report, PNG_SECTION, render_png(report))
    predict = [*ANOMNET, "--threads", str(a.workers), "predict", "--model-dir", str(model), "--quiet"]
    one, _ = _timed([*predict, str(next(iter(sorted(images.iterdir())))), "--out", str(work / "out-one")])
    cpu_before = _children_cpu()
    local, _ = _timed([*predict, str(images), "--out", str(work / "out-local")])
    local_cpu = _children_cpu() - cpu_before
    ray_cmd = [*ANOMNET, "predict", "--engine", "ray", "--model-dir", str(model), "--quiet", "--workers"]
    ray_wall, ray_out = _timed([*ray_cmd, str(a.workers), str(images), "--out", str(work / "out-ray")])
    report["runs"] = {
        "local_one_image": {"images": 1, "wall_s": one},
        "local": {"images": a.images, "wall_s": local, "cpu_s": local_cpu},
        "ray": {"images": a.images, "wall_s": ray_wall, **_ray_summary(ray_out)},
    }
    report["max_score_difference"] = _score_difference(work / "out-local", work / "out-ray", a.images)
    report["noop"] = _noop(work / "tiny", a.noop_images, a.workers)
    report["per_image"] = _components(model, images)
    report["png"] = _png_settings(model, images)
    return _finish(a, report, SECTION, render(report))


def _finish(a: argparse.Namespace, report: dict[str, Any], section: str, text: str) -> int:
    from anomnet.bench import write_section

    report["load_avg_after"] = os.getloadavg()[0]
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=2) + "\n")
    text = text.replace("LOAD_AFTER", f"{report['load_avg_after']:.2f}")
    print(text)
    write_section(Path(a.markdown), section, text)
    return 0


def _children_cpu() -> float:
    """User + system CPU seconds of the finished child processes so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _shown(path: Path) -> str:
    """``path`` relative to the repository when it lies inside it."""
    real = path.resolve()
    return str(real.relative_to(ROOT)) if real.is_relative_to(ROOT) else str(path)


def _timed(cmd: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}")
    return wall, proc.stdout


def _lay_out(data: Path, folder: Path, n: int) -> Path:
    from anomnet.data import load_dataset

    sources = [s.path for s in load_dataset(data).test]
    folder.mkdir(parents=True)
    for i in range(n):
        src, dst = sources[i % len(sources)], folder / f"{i:05d}{sources[i % len(sources)].suffix}"
        shutil.copyfile(src, dst)  # copies: a folder scan scores two links to one file once
    return folder


_SUMMARY = re.compile(
    r"time: ([\d.]+) s on (\d+) worker\(s\) \(([\d.]+) images/s; first row after ([\d.]+) s\), Ray start ([\d.]+) s"
)


def _ray_summary(stdout: str) -> dict[str, float]:
    match = _SUMMARY.search(stdout)
    if match is None:
        raise SystemExit(f"no summary line in the Ray run's output:\n{stdout}")
    run, workers, rate, first, start = map(float, match.groups())
    return {"engine_s": run, "workers": workers, "first_row_s": first, "ray_start_s": start, "engine_rate": rate}


def _score_difference(a: Path, b: Path, n: int) -> float:
    import csv

    def scores(folder: Path) -> dict[str, float]:
        with (folder / "results.csv").open() as f:
            return {Path(r["path"]).name: float(r["score"]) for r in csv.DictReader(f)}

    left, right = scores(a), scores(b)
    if len(left) != n or set(left) != set(right):
        raise SystemExit(f"local and Ray runs scored different inputs ({len(left)} vs {len(right)} rows)")
    return max(abs(left[k] - right[k]) for k in left)


def _noop(folder: Path, n: int, workers: int) -> dict[str, Any]:
    from PIL import Image

    from anomnet.engine.ray_predict import BATCH_SIZE, ensure_ray, predict_on_ray
    from anomnet.predict.inputs import collect_inputs
    from anomnet.predict.outputs import predict_images

    folder.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(np.full((8, 8, 3), i % 256, np.uint8)).save(folder / f"{i:05d}.png")
    start = time.perf_counter()
    predict_images(NullScorer(), [folder], folder.parent / "noop-local")
    local = time.perf_counter() - start
    ensure_ray(num_cpus=workers)
    summary = predict_on_ray(
        collect_inputs([folder], batch=True),
        {None: NullScorer()},
        folder.parent / "noop-ray",
        workers=workers,
        progress=False,
    )
    import ray

    ray.shutdown()
    blocks = math.ceil(n / max(1, min(256, math.ceil(n / (workers * 4)))))
    steady = summary.seconds - summary.first_row_seconds
    return {
        "images": n,
        "local_s": local,
        "ray_s": summary.seconds,
        "ray_first_row_s": summary.first_row_seconds,
        "blocks": blocks,
        "map_calls": math.ceil(n / BATCH_SIZE),
        "ray_steady_s_per_image": steady / max(1, n - n / blocks),
    }


def _components(model: Path, images: Path) -> dict[str, float]:
    """Seconds per image on one core: decode, model (batch 8), outputs (and their parts); the model's load time."""
    import torch

    from anomnet import durable, imageio
    from anomnet.predict.outputs import PNG_SETTINGS, output_files, write_image_outputs
    from anomnet.predict.scoring import ImageRef, load_scorer, score_refs

    torch.set_num_threads(1)
    files = sorted(images.iterdir())[:8]
    start = time.perf_counter()
    pixels = [imageio.read_image(f) for f in files]
    decode = (time.perf_counter() - start) / len(files)
    start = time.perf_counter()
    scorer = load_scorer(model)
    load = time.perf_counter() - start
    scorer.score_arrays(np.stack(pixels[:1]))  # warm-up
    start = time.perf_counter()
    scorer.score_arrays(np.stack(pixels))
    model_s = (time.perf_counter() - start) / len(files)
    rows = score_refs(scorer, [ImageRef(str(f)) for f in files], keep_maps=True, keep_images=True)
    start = time.perf_counter()
    for i, r in enumerate(rows):
        assert r.image is not None and r.anomaly_map is not None and r.mask is not None
        write_image_outputs(
            images.parent / "components", str(i), r.image, r.anomaly_map, r.mask, scorer.calibration, False
        )
    outputs = (time.perf_counter() - start) / len(rows)
    start = time.perf_counter()
    drawn = [_drawn(r, scorer.calibration) for r in rows]
    draw = (time.perf_counter() - start) / len(rows)
    start = time.perf_counter()
    encoded = [{k: imageio.encode_png(a, *PNG_SETTINGS[k]) for k, a in d.items()} for d in drawn]
    encode = (time.perf_counter() - start) / len(rows)
    start = time.perf_counter()
    for i, e in enumerate(encoded):
        for kind, path in output_files(images.parent / "components-write", str(i), False).items():
            durable.write_file(path, e[kind])
    write = (time.perf_counter() - start) / len(rows)
    return {
        "decode_s": decode,
        "model_s": model_s,
        "outputs_s": outputs,
        "outputs_draw_s": draw,
        "outputs_encode_s": encode,
        "outputs_write_s": write,
        "model_load_s": load,
    }


def _drawn(row: Any, cal: Any) -> dict[str, np.ndarray]:
    """The pictures of one scored row, as the output writer draws them."""
    from anomnet.predict.visualize import draw_contour, heatmap, overlay

    return {
        "heatmap": heatmap(row.anomaly_map, cal),
        "overlay": draw_contour(overlay(row.image, row.anomaly_map, cal), row.mask),
        "mask": row.mask.astype(np.uint8) * 255,
    }


PNG_CANDIDATES: list[tuple[str, int, int]] = [
    ("default", 1, 0),
    ("default", 2, 0),
    ("default", 4, 0),
    ("default", 6, 0),
    ("default", 9, 0),
    ("rle", 1, 3),
    ("filtered", 4, 1),
    ("huffman", 1, 2),
]
"""(strategy name, zlib level, zlib strategy constant) of the encoder settings measured."""


def _png_settings(model: Path, images: Path) -> dict[str, Any]:
    """Per output kind and setting: CPU ms of this thread per image and KB per file, on 8 of ``images``.

    Every file is decoded again (Pillow) and compared with its picture: a setting never changes the pixels.
    Also measured: Pillow's own PNG writer at its defaults (level 6, a filter chosen per row), the writer
    before these settings, and a 1-bit mask (the same pixels, read back as 0/1 by some readers).
    """
    import io as _bytesio

    from PIL import Image

    from anomnet import imageio
    from anomnet.predict.outputs import PNG_SETTINGS
    from anomnet.predict.scoring import ImageRef, load_scorer, score_refs

    scorer = load_scorer(model)
    laid_out = sorted(images.iterdir())
    files = laid_out[:: max(1, len(laid_out) // 8)][:8]  # spread over the test set's kinds of defect and good
    rows = score_refs(scorer, [ImageRef(str(f)) for f in files], keep_maps=True, keep_images=True)
    drawn = [_drawn(r, scorer.calibration) for r in rows]

    def pillow(array: np.ndarray, **kw: Any) -> bytes:
        buf = _bytesio.BytesIO()
        Image.fromarray(array).save(buf, format="PNG", **kw)
        return buf.getvalue()

    encoders: dict[str, Any] = {
        f"{name} {level}": (lambda a, lv=level, st=strategy: imageio.encode_png(a, lv, st))
        for name, level, strategy in PNG_CANDIDATES
    }
    encoders["pillow default (before)"] = pillow
    table: dict[str, dict[str, dict[str, float]]] = {}
    for kind in ("heatmap", "overlay", "mask"):
        table[kind] = {}
        candidates = dict(encoders)
        if kind == "mask":
            candidates["pillow 1-bit"] = lambda a: pillow(a > 0)
        for label, encode in candidates.items():
            cpu, size = 0.0, 0
            for d in drawn:
                start = time.thread_time()
                data = encode(d[kind])
                cpu += time.thread_time() - start
                size += len(data)
                back = np.asarray(Image.open(_bytesio.BytesIO(data)).convert("L" if kind == "mask" else "RGB"))
                if not np.array_equal(back, d[kind]):
                    raise SystemExit(f"{label} changed the pixels of a {kind}")
            table[kind][label] = {"cpu_ms": 1000 * cpu / len(drawn), "kb": size / len(drawn) / 1024}
    names = {(lv, st): f"{name} {lv}" for name, lv, st in PNG_CANDIDATES}
    chosen = {kind: names.get(setting, str(setting)) for kind, setting in PNG_SETTINGS.items()}
    shape = rows[0].anomaly_map.shape if rows[0].anomaly_map is not None else None
    return {"images": len(drawn), "shape": list(shape or []), "table": table, "chosen": chosen}


def render(r: dict[str, Any]) -> str:
    runs, noop, per = r["runs"], r["noop"], r["per_image"]
    n = runs["local"]["images"]
    fixed = runs["local_one_image"]["wall_s"]
    ray = runs["ray"]
    lines = [
        f"## {SECTION}",
        "",
        f"Command: `{r['command']}` ({r['date']}; {r['cpu']}, {r['cores']} cores; 1-minute load average "
        f"{r['load_avg_before']:.2f} before, LOAD_AFTER after). JSON: `{r['json']}`.",
        "",
        "| run | images | wall s | images/s | notes |",
        "|---|---|---|---|---|",
        f"| `anomnet predict` (1 process, {r['workers']} torch threads) | {n} | {runs['local']['wall_s']:.1f} | "
        f"{n / runs['local']['wall_s']:.2f} | start-up + model load + 1 image: {fixed:.1f} s; "
        f"steady {(n - 1) / max(1e-9, runs['local']['wall_s'] - fixed):.2f} images/s |",
        f"| `predict --engine ray` ({int(ray['workers'])} workers x 1 CPU, local Ray) | {n} | {ray['wall_s']:.1f} | "
        f"{n / ray['wall_s']:.2f} | Ray start {ray['ray_start_s']:.1f} s, first row after {ray['first_row_s']:.1f} s, "
        f"engine {ray['engine_rate']:.2f} images/s from hand-over to last row |",
        f"| no-op model, in process | {noop['images']} (8x8) | {noop['local_s']:.1f} | "
        f"{noop['images'] / noop['local_s']:.1f} | reading + writing outputs only |",
        f"| no-op model, `--engine ray` | {noop['images']} (8x8) | {noop['ray_s']:.1f} | "
        f"{noop['images'] / noop['ray_s']:.1f} | first row after {noop['ray_first_row_s']:.1f} s; then "
        f"{1000 * noop['ray_steady_s_per_image']:.2f} ms per image over {noop['blocks']} blocks |",
        "",
        f"Per image on one core: decode {1000 * per['decode_s']:.0f} ms, model {1000 * per['model_s']:.0f} ms "
        f"(batch 8), outputs (heat map, overlay, mask PNGs) {1000 * per['outputs_s']:.0f} ms (drawing "
        f"{1000 * per['outputs_draw_s']:.0f}, PNG encoding {1000 * per['outputs_encode_s']:.0f}, writing with fsync "
        f"{1000 * per['outputs_write_s']:.0f}; `anomnet predict` writes them on a pool of threads beside scoring); "
        f"loading the model {per['model_load_s']:.1f} s. The local run's process used "
        f"{1000 * runs['local']['cpu_s'] / n:.0f} ms of CPU per image (user + system, all threads). "
        f"Local and Ray scores differ by at most {r['max_score_difference']:.2g}.",
        "",
        _png_table(r["png"]),
    ]
    return "\n".join(lines)


def _png_table(png: dict[str, Any]) -> str:
    table = png["table"]
    labels = list(dict.fromkeys(label for kind in table.values() for label in kind))
    lines = [
        f"PNG settings (`anomnet.imageio.encode_png`: Up filter, zlib level and strategy), {png['images']} images "
        f"of {'x'.join(map(str, png['shape']))} px: CPU ms of the encoding thread per image / KB per file; "
        "every file decodes to the same pixels. Chosen: "
        + ", ".join(f"{kind} `{label}`" for kind, label in png["chosen"].items())
        + ".",
        "",
        "| setting | heat map ms | heat map KB | overlay ms | overlay KB | mask ms | mask KB |",
        "|---|---|---|---|---|---|---|",
    ]
    for label in labels:
        cells = []
        for kind in ("heatmap", "overlay", "mask"):
            v = table[kind].get(label)
            cells += [f"{v['cpu_ms']:.1f}", f"{v['kb']:.1f}"] if v else ["-", "-"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def render_png(r: dict[str, Any]) -> str:
    return "\n".join(
        [
            f"## {PNG_SECTION}",
            "",
            f"Command: `{r['command']}` ({r['date']}; {r['cpu']}, {r['cores']} cores; 1-minute load average "
            f"{r['load_avg_before']:.2f} before, LOAD_AFTER after; CPU time of one thread, which a busy machine "
            f"changes little). JSON: `{r['json']}`.",
            "",
            _png_table(r["png"]),
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
