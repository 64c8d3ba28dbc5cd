"""Cost curves (issue 24): fit time and peak memory against the number of training images, predict latency and
peak memory against the input size, untiled and tiled. Writes ``benchmarks/scaling-curves.json``, one PNG per
curve (``docs/img/scaling-*.png``) and, with ``--markdown``, the ``scaling-curves`` section::

    python benchmarks/scaling_curves.py --markdown BENCHMARKS.md      # the recorded run (hours, idle machine)
    python benchmarks/scaling_curves.py --dry-run                     # the plan: every point, done or to do
    python benchmarks/scaling_curves.py --plot-only benchmarks/scaling-curves.json --markdown BENCHMARKS.md

Fit curve: ``api.fit`` (what ``anomnet fit`` runs: fit and calibration) of each detector at its defaults on
N training images (``--counts``): seeded augmented copies of the source images (bottle's 209 train/good
images: flips, 90-degree turns, small square crops), written once into ``RUNS/augmented`` with their recipe.
Predict curve: each detector fitted once on ``--data`` (bottle), untiled and tiled (``--tile`` px tiles, as
README's bottle example and section ``hybrid``; PatchCore with a 1 % coreset there), then ``predict`` of one
source image resized to S x S (``--sizes``) at batch 1: untiled it is resized to the detector's input size
and the map restored to S x S; tiled it is cut into tiles.

Every point runs in its own process, so its peak RSS (``ru_maxrss``, as ``anomnet bench``'s
``peak_rss_fit_mb``) is its own and a crash, an out-of-memory kill or the per-point time limit
(``--point-timeout``) becomes a row with its error. Rows are written to the JSON after each point and a
point already there is skipped (``--retry-errors`` measures error rows again).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hybrid import TILE, TILED_MODEL  # noqa: E402  (section hybrid's tiled settings)

ROOT = Path(__file__).resolve().parents[1]
BOTTLE = ROOT.parent / "shared" / "datasets" / "mvtec_ad" / "bottle"
SECTION = "scaling-curves"
MODELS = ("patchcore", "anomnet", "cpr", "hybrid")
COUNTS = (50, 200, 1000, 5000)
SIZES = (256, 512, 1024, 2048, 4096)
MODES = ("untiled", "tiled")
RECIPE = ".recipe.json"
RECIPE_VERSION = 1
CROP = (0.9, 1.0)  # side of the square crop, as a share of the shorter side
PLOTS = {
    "fit-time": "Fit time (api.fit: fit + calibration)",
    "fit-memory": "Fit peak memory (RSS)",
    "predict-latency": "Predict latency, batch 1",
    "predict-memory": "Predict peak memory (RSS)",
}
TAIL = 600  # characters of a failed point's standard error kept in its row


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Cost curves: fit against training images, predict against image size.")
    p.add_argument("--models", default=",".join(MODELS), help=f"detectors (default {','.join(MODELS)})")
    p.add_argument("--counts", default=",".join(map(str, COUNTS)), help="training images per fit point")
    p.add_argument("--sizes", default=",".join(map(str, SIZES)), help="square input sides (px) per predict point")
    p.add_argument("--modes", default=",".join(MODES), help="predict modes: untiled, tiled (default both)")
    p.add_argument("--tile", type=int, default=int(TILE), help=f"tile side of the tiled mode (default {TILE})")
    p.add_argument("--source", default=str(BOTTLE / "train" / "good"), help="folder of good images to augment")
    p.add_argument("--data", default=str(BOTTLE), help="dataset the predict curve's models are fitted on")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a setting of every fit (repeatable), e.g. image_size=64 for a quick check",
    )
    p.add_argument("--runs", default=str(ROOT / "runs" / "scaling-curves"), help="augmented images and fitted models")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / f"{SECTION}.json"), help="the JSON report")
    p.add_argument("--img-dir", default=str(ROOT / "docs" / "img"), help="folder of the PNG plots")
    p.add_argument("--markdown", default=None, help=f"write section {SECTION} of this file (e.g. BENCHMARKS.md)")
    p.add_argument("--point-timeout", type=float, default=7200.0, help="seconds per point before it is killed")
    p.add_argument("--threads", type=int, default=None, help="torch threads of each point (default: all cores)")
    p.add_argument("--repeats", type=int, default=5, help="timed predict calls per point (after one warm-up)")
    p.add_argument("--seed", type=int, default=0, help="seed of the augmentation")
    p.add_argument("--retry-errors", action="store_true", help="measure the points recorded with an error again")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    p.add_argument("--plot-only", metavar="JSON", help="only render the plots (and --markdown) from this JSON")
    return p


def command_line(argv: list[str]) -> str:
    return " ".join(["python", "benchmarks/scaling_curves.py", *map(shlex.quote, argv)])


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _settings(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise SystemExit(f"scaling_curves: --set {item!r}: expected KEY=VALUE")
        out[key.strip()] = value.strip()
    return out


# ---------------------------------------------------------------------------------------------------- images


def augmented(source: Path, i: int, seed: int) -> Any:
    """Copy ``i`` (0-based) of the sorted images of ``source``: image ``i mod n``, seeded flips, a 90-degree
    turn and a square crop of 90-100 % of its shorter side at a random place. A pure function of its inputs."""
    import numpy as np
    from PIL import Image

    from anomnet.imageio import list_images

    images = list_images(source)
    rng = np.random.default_rng([seed, i])
    img: Image.Image = Image.open(images[i % len(images)])
    img.load()
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    turns = int(rng.integers(0, 4))
    if turns:
        img = img.transpose(
            [Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270][turns - 1]
        )
    w, h = img.size
    side = max(1, int(min(w, h) * rng.uniform(*CROP)))
    left, top = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
    return img.crop((left, top, left + side, top + side))


def recipe(source: Path, seed: int) -> dict[str, Any]:
    return {
        "source": os.path.abspath(source),  # as given (a ../shared that is a link stays ../shared)
        "seed": seed,
        "version": RECIPE_VERSION,
        "copy i": "source image i mod n (sorted); flip left-right p=0.5, flip top-bottom p=0.5, "
        f"turn by k x 90 degrees (k uniform in 0-3), square crop of {CROP[0]}-{CROP[1]} of the shorter side at a "
        "uniform place; rng = numpy default_rng([seed, i])",
    }


def ensure_pool(source: Path, runs: Path, count: int, seed: int) -> Path:
    """``runs/augmented`` holding copies 0..count-1 (written once: a copy already there is kept when the recorded
    recipe matches; a different recipe starts the pool again). Each file is written whole (renamed into place)."""
    import shutil

    pool = runs / "augmented"
    want = recipe(source, seed)
    if (pool / RECIPE).is_file() and json.loads((pool / RECIPE).read_text()) != want:
        shutil.rmtree(pool)
    pool.mkdir(parents=True, exist_ok=True)
    (pool / RECIPE).write_text(json.dumps(want, indent=2) + "\n")
    for i in range(count):
        target = pool / f"aug-{i:05d}.png"
        if not target.is_file():
            partial = pool / f".aug-{i:05d}.partial.png"
            augmented(source, i, seed).save(partial)
            partial.rename(target)
    return pool


def count_folder(pool: Path, runs: Path, count: int) -> Path:
    """A dataset in the generic folder layout whose ``train/`` holds copies 0..count-1 (hard links into the pool)."""
    train = runs / f"train-{count}" / "train"
    names = [f"aug-{i:05d}.png" for i in range(count)]
    if train.is_dir() and sorted(p.name for p in train.iterdir()) == names:
        return train.parent
    train.mkdir(parents=True, exist_ok=True)
    for name in names:
        if not (train / name).exists():
            try:
                os.link(pool / name, train / name)
            except OSError:  # another file system
                import shutil

                shutil.copyfile(pool / name, train / name)
    return train.parent


# ---------------------------------------------------------------------------------------------------- workers


def fit_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """``api.fit`` of one detector (saved to ``spec['out']`` if given): seconds, peak RSS (as ``anomnet bench``)."""
    from anomnet import api
    from anomnet.bench import _peak_rss_mb

    before = _peak_rss_mb()
    t = time.perf_counter()
    det = api.fit(spec["model"], spec["data"], spec.get("out"), settings=spec["settings"], progress=False)
    fit_s = time.perf_counter() - t
    return {
        "fit_s": fit_s,
        "peak_rss_fit_mb": _peak_rss_mb(),
        "rss_before_fit_mb": before,
        "calibration": det.calibration.source,
        "fit_record": det.fit_record.to_dict(),
    }


def predict_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Load a fitted model, predict one image resized to ``size`` x ``size`` at batch 1: median ms and peak RSS."""
    import torch

    from anomnet import api
    from anomnet.bench import _peak_rss_mb, _time_per_image
    from anomnet.imageio import read_image, to_tensor
    from anomnet.tiling import count_tiles

    det = api.load(spec["model_dir"])
    size = int(spec["size"])
    image = to_tensor(read_image(spec["image"]))[None]
    x = torch.nn.functional.interpolate(image, size=(size, size), mode="bilinear", antialias=True).clamp(0, 1)
    del image
    loaded = _peak_rss_mb()
    with torch.inference_mode():
        ms = _time_per_image(det.predict, x, 1, spec["repeats"], budget_s=spec.get("budget_s", 60.0))
    tiles = 1 if det.tiling is None else count_tiles((size, size), det.tiling)  # the hybrid's: its branches'
    return {"predict_ms": ms, "peak_rss_mb": _peak_rss_mb(), "rss_loaded_mb": loaded, "tiles": tiles}


WORKERS = {"fit": fit_worker, "predict": predict_worker}


def run_point(kind: str, spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run one point in its own process (its own session, killed whole at ``timeout``): its result, or ``error``."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, json.dumps(spec)]
    path = os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))
    env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, "PYTHONPATH": path}  # as `anomnet` runs (cli.main)
    load = os.getloadavg()[0]
    t = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return {"error": f"time limit: killed after {timeout:g} s", "wall_s": time.perf_counter() - t}
    row: dict[str, Any] = {"wall_s": time.perf_counter() - t, "load_avg": [load, os.getloadavg()[0]]}
    if proc.returncode == 0:
        try:
            return {**row, **json.loads(out.strip().splitlines()[-1])}
        except (ValueError, IndexError):
            pass
    if proc.returncode is not None and proc.returncode < 0:
        why = f"killed by signal {-proc.returncode}" + (" (the out-of-memory killer?)" if proc.returncode == -9 else "")
    else:
        why = f"exit {proc.returncode}"
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    return {**row, "error": f"{why}: {lines[-1][-TAIL:] if lines else 'no message'}", "stderr_tail": err[-TAIL:]}


# ---------------------------------------------------------------------------------------------------- plan


def tiled_settings(model: str, tile: int) -> dict[str, str]:
    return {"tile": str(tile), **TILED_MODEL.get(model, {})}


def plan(a: argparse.Namespace) -> list[dict[str, Any]]:
    """Every point, in run order: the fit curve, then per detector and mode the fit on ``--data`` and its sizes."""
    common = _settings(a.set)
    models = [m for m in a.models.split(",") if m]
    modes = [m for m in a.modes.split(",") if m]
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise SystemExit(f"scaling_curves: unknown mode(s) {', '.join(bad)}; use {', '.join(MODES)}")
    points: list[dict[str, Any]] = []
    for count in sorted(_ints(a.counts)):
        for m in models:
            points.append({"curve": "fit", "model": m, "images": count, "settings": dict(common), "threads": a.threads})
    for m in models:
        for mode in modes:
            settings = {**common, **(tiled_settings(m, a.tile) if mode == "tiled" else {})}
            common_point = {"model": m, "mode": mode, "settings": settings, "threads": a.threads}
            points.append({"curve": "predict-model", **common_point})
            for size in sorted(_ints(a.sizes)):
                points.append({"curve": "predict", **common_point, "size": size})
    return points


def key(point: dict[str, Any]) -> str:
    fields = ("curve", "model", "images", "mode", "size", "settings", "threads")
    return json.dumps({f: point.get(f) for f in fields}, sort_keys=True)


def model_dir(runs: Path, point: dict[str, Any]) -> Path:
    label = "-".join(f"{k}={v}" for k, v in sorted(point["settings"].items()))
    return runs / "models" / f"{point['model']}-{point['mode']}{'-' + label if label else ''}"


def measure(a: argparse.Namespace, point: dict[str, Any], runs: Path) -> dict[str, Any]:
    base = {"model": point["model"], "settings": point["settings"], "threads": point["threads"]}
    if point["curve"] == "fit":
        pool = ensure_pool(Path(a.source), runs, point["images"], a.seed)
        data = count_folder(pool, runs, point["images"])
        return run_point("fit", {**base, "data": str(data)}, a.point_timeout)
    target = model_dir(runs, point)
    if point["curve"] == "predict-model":
        if (target / "anomnet.json").is_file():
            import shutil

            shutil.rmtree(target)  # a model of an earlier run whose row was not recorded: fitted again
        return run_point("fit", {**base, "data": a.data, "out": str(target)}, a.point_timeout)
    if not (target / "anomnet.json").is_file():
        return {"error": "no fitted model (its fit failed or was not run)"}
    from anomnet.imageio import list_images

    spec = {"model_dir": str(target), "size": point["size"], "image": str(list_images(Path(a.source))[0])}
    spec["threads"] = point["threads"]
    spec.update(repeats=a.repeats, budget_s=_budget(a))
    return run_point("predict", spec, a.point_timeout)


def _budget(a: argparse.Namespace) -> float:
    """Seconds of timed predict calls after which a point stops at 3 (a slow point keeps within its limit)."""
    return max(60.0, a.point_timeout / 10)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:  # one point, in its own process, set up as `anomnet` sets itself up
        worker, spec = WORKERS[argv[1]], json.loads(argv[2])
        from anomnet.runtime import tune_allocator

        tune_allocator()
        import torch

        if spec.get("threads"):
            torch.set_num_threads(int(spec["threads"]))
        print(json.dumps({**worker(spec), "torch_threads": torch.get_num_threads()}))
        return 0
    a = parser().parse_args(argv)
    command = command_line(argv)
    print(command, flush=True)
    if a.plot_only:
        write_outputs(json.loads(Path(a.plot_only).read_text()), a)
        return 0
    out, runs = Path(a.out), Path(a.runs)
    points = plan(a)
    old = json.loads(out.read_text()) if out.is_file() else {}
    done = {key(r): r for r in old.get("rows", []) if not (a.retry_errors and r.get("error"))}
    if a.dry_run:
        for p in points:
            row = done.get(key(p))
            state = "to do" if row is None else ("done, error" if row.get("error") else "done")
            print(f"{state:12} {_label(p)}")
        copies = max(_ints(a.counts), default=0)
        print(f"augmented copies: {copies} in {runs / 'augmented'} ({recipe(Path(a.source), a.seed)})")
        return 0
    import torch

    from anomnet.bench import _cpu_name
    from anomnet.imageio import atomic_write_text, image_size, list_images

    report: dict[str, Any] = {
        "command": command,
        "commands": [c for c in old.get("commands", []) if c != command] + [command],
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": _cpu_name(),
        "cpu_cores": os.cpu_count(),
        "torch": torch.__version__,
        "recipe": recipe(Path(a.source), a.seed),
        "source_images": len(list_images(Path(a.source))),
        "predict_image": str(list_images(Path(a.source))[0]),
        "predict_image_hw": list(image_size(list_images(Path(a.source))[0])),
        "data": a.data,
        "point_timeout_s": a.point_timeout,
        "repeats": a.repeats,
        "predict_budget_s": _budget(a),
        "json": os.path.relpath(out.resolve(), ROOT) if out.resolve().is_relative_to(ROOT) else str(out),
        "rows": [r for r in old.get("rows", []) if key(r) not in {key(p) for p in points} or key(r) in done],
    }
    for p in points:
        k = key(p)
        if k in done and not _model_missing(p, points, done, runs):
            continue
        print(f"[scaling-curves] {_label(p)}", file=sys.stderr, flush=True)
        row = {**p, **measure(a, p, runs)}
        report["rows"] = [r for r in report["rows"] if key(r) != k] + [row]
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, json.dumps(report, indent=2) + "\n")  # after every point: a resumable run
        print(f"  {row.get('error') or _short(row)}", file=sys.stderr, flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(report, indent=2) + "\n")
    write_outputs(report, a)
    return 0


def _model_missing(p: dict[str, Any], points: list[dict[str, Any]], done: dict[str, Any], runs: Path) -> bool:
    """Whether ``p`` is a recorded model fit whose folder is gone while some of its predict points are to do."""
    if p["curve"] != "predict-model" or done[key(p)].get("error") or (model_dir(runs, p) / "anomnet.json").is_file():
        return False
    mine = [q for q in points if q["curve"] == "predict" and model_dir(runs, q) == model_dir(runs, p)]
    return any(key(q) not in done for q in mine)


def _label(p: dict[str, Any]) -> str:
    where = f"{p['images']} images" if p["curve"] == "fit" else p["mode"]
    size = f" {p['size']} px" if p["curve"] == "predict" else ""
    settings = ", ".join(f"{k}={v}" for k, v in p["settings"].items())
    return f"{p['curve']} {p['model']} {where}{size}" + (f" ({settings})" if settings else "")


def _short(r: dict[str, Any]) -> str:
    if "predict_ms" in r:
        return f"{r['predict_ms']:.0f} ms, peak RSS {r['peak_rss_mb']:.0f} MB, {r['tiles']} tile(s)"
    return f"fit {r['fit_s']:.1f} s, peak RSS {r['peak_rss_fit_mb']:.0f} MB"


# ---------------------------------------------------------------------------------------------------- outputs


def write_outputs(report: dict[str, Any], a: argparse.Namespace) -> None:
    """The PNG plots into ``--img-dir``; the section into ``--markdown`` when given (and on standard output)."""
    img_dir = Path(a.img_dir)
    plots = plot(report, img_dir)
    where = Path(a.markdown).resolve().parent if a.markdown else Path.cwd()
    text = render(report, [os.path.relpath(p.resolve(), where) for p in plots])
    print(text)
    if a.markdown:
        from anomnet.bench import write_section

        write_section(Path(a.markdown), SECTION, text)


def _ok(report: dict[str, Any], curve: str) -> list[dict[str, Any]]:
    return [r for r in report["rows"] if r["curve"] == curve and not r.get("error")]


def plot(report: dict[str, Any], img_dir: Path) -> list[Path]:
    """One PNG per curve (log-log), one line per detector (and mode); error points are left out."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img_dir.mkdir(parents=True, exist_ok=True)
    curves = {
        "fit-time": ("fit", "images", "fit_s", "training images", "seconds"),
        "fit-memory": ("fit", "images", "peak_rss_fit_mb", "training images", "peak RSS (MB)"),
        "predict-latency": ("predict", "size", "predict_ms", "input side (px)", "ms per image"),
        "predict-memory": ("predict", "size", "peak_rss_mb", "input side (px)", "peak RSS (MB)"),
    }
    paths = []
    for name, (curve, xkey, ykey, xlabel, ylabel) in curves.items():
        fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
        rows = _ok(report, curve)
        models = list(dict.fromkeys(r["model"] for r in report["rows"]))  # one colour per detector in every plot
        present = {(r["model"], r.get("mode", "")) for r in rows}
        lines = [(m, mode) for m in models for mode in ("", *MODES) if (m, mode) in present]
        for model, mode in lines:
            pts = sorted((r[xkey], r[ykey]) for r in rows if r["model"] == model and r.get("mode", "") == mode)
            ax.plot(
                [x for x, _ in pts],
                [y for _, y in pts],
                "--" if mode == "tiled" else "-",
                marker="o",
                color=f"C{models.index(model)}",
                label=f"{model} {mode}".strip(),
            )
        ax.set_xscale("log")
        ax.set_yscale("log")
        xs = sorted({r[xkey] for r in rows})
        ax.set_xticks(xs, [f"{x:,}" for x in xs])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 1 else f"{v:g}"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(PLOTS[name])
        ax.grid(True, which="both", alpha=0.3)
        if lines:
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = img_dir / f"scaling-{name}.png"
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


def _shown(path: str) -> str:
    """A path beside or inside this repository relative to it (``../shared/datasets/...``), others as given."""
    p = Path(path)
    if p.is_absolute():
        for q in (p, p.resolve()):
            if q.is_relative_to(ROOT.parent):
                return os.path.relpath(q, ROOT)
    return path


def _cell(r: dict[str, Any] | None, fmt: str) -> str:
    if r is None:
        return "-"
    if r.get("error"):
        return "error: " + str(r["error"]).split(":")[0]
    return fmt.format(**r)


def render(r: dict[str, Any], plots: list[str]) -> str:
    rows = r["rows"]
    loads = [v for row in rows for v in row.get("load_avg", [])]
    threads = "/".join(str(t) for t in sorted({row["torch_threads"] for row in rows if "torch_threads" in row})) or "?"
    lines = [
        f"## {SECTION}",
        "",
        "Command: " + ", then ".join(f"`{c}`" for c in r.get("commands", [r["command"]])),
        "",
        f"Last run {r['date']}: {r['cpu']}, {r['cpu_cores']} cores, torch threads per point: {threads}, "
        f"torch {r['torch']}"
        + (f"; 1-minute load average {min(loads):.1f}-{max(loads):.1f} around the points" if loads else "")
        + f". JSON: `{r['json']}`. Each point ran in its own process (time limit "
        f"{r['point_timeout_s']:g} s); peak RSS is that process's maximum resident memory (`ru_maxrss`), libraries "
        "and data index included.",
        "",
        f"**Fit** against training images: `api.fit` (fit and calibration, what `anomnet fit` runs) at each "
        f"detector's defaults on N images that are **augmented copies** of the {r['source_images']} images of "
        f"`{_shown(r['recipe']['source'])}` (seeded: {r['recipe']['copy i']}; seed {r['recipe']['seed']}). "
        "A detector that holds images out (the hybrid's choice) trains on the others. Cells: seconds / peak RSS MB.",
        "",
    ]
    fits = [x for x in rows if x["curve"] == "fit"]
    counts = sorted({x["images"] for x in fits})
    models = list(dict.fromkeys(x["model"] for x in rows))
    if fits:
        lines += ["| detector | calibration | " + " | ".join(f"{n:,} images" for n in counts) + " |"]
        lines += ["|---|---|" + "---|" * len(counts)]
        for m in models:
            mine = {x["images"]: x for x in fits if x["model"] == m}
            if not mine:
                continue
            cal = ", ".join(sorted({x["calibration"] for x in mine.values() if x.get("calibration")})) or "-"
            cells = [_cell(mine.get(n), "{fit_s:,.1f} s / {peak_rss_fit_mb:,.0f} MB") for n in counts]
            lines.append(f"| {m} | {cal} | " + " | ".join(cells) + " |")
        lines.append("")
    preds = [x for x in rows if x["curve"] == "predict"]
    sizes = sorted({x["size"] for x in preds})
    if preds:
        lines += [
            f"**Predict** against input size: each detector fitted once on `{_shown(r['data'])}` (untiled at its "
            "default input size; tiled with the settings shown), then `predict` of one source image "
            f"(`{Path(r['predict_image']).name}`, {r['predict_image_hw'][1]} x {r['predict_image_hw'][0]} px) resized "
            "to S x S (bilinear, antialiased; upsampled above its own size), batch 1, median of "
            f"{r['repeats']} timed calls after a warm-up (fewer, at least 3, once they have taken "
            f"{r['predict_budget_s']:g} s). Untiled, the "
            "image is resized to the detector's input size and the map restored to S x S; tiled, it is cut into "
            "tiles, their number growing with S. Cells: ms / peak RSS MB (tiles); peak RSS includes the loaded "
            "model and the S x S image and map.",
            "",
            "| detector | mode | settings | " + " | ".join(f"{s:,} px" for s in sizes) + " |",
            "|---|---|---|" + "---|" * len(sizes),
        ]
        for m in models:
            for mode in MODES:
                mine = {x["size"]: x for x in preds if x["model"] == m and x["mode"] == mode}
                if not mine:
                    continue
                settings = ", ".join(f"{k}={v}" for k, v in next(iter(mine.values()))["settings"].items()) or "defaults"
                cells = [_cell(mine.get(s), "{predict_ms:,.0f} ms / {peak_rss_mb:,.0f} MB ({tiles})") for s in sizes]
                lines.append(f"| {m} | {mode} | {settings} | " + " | ".join(cells) + " |")
        lines.append("")
    errors = [x for x in rows if x.get("error")]
    if errors:
        lines.append("Errors: " + "; ".join(f"{_label(x)}: {x['error']}" for x in errors) + ".")
        lines.append("")
    if plots:  # one image per paragraph
        for p in plots:
            lines += [f"![{Path(p).stem}]({p})", ""]
    return "\n".join(lines).rstrip("\n") + "\n"


if __name__ == "__main__":
    sys.exit(main())
