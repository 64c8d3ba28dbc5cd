"""Bounded load test of the inspection service on loopback: N concurrent clients, M requests, then it stops.

Starts ``anomnet serve`` (a separate process, as deployed) with a PatchCore model, sends real images from
``--data`` (its test split, cycled) as multipart uploads from ``--clients`` threads until ``--requests``
requests are answered or ``--duration`` seconds have passed, and reports errors, latency percentiles,
throughput and the server's memory (RSS) after the warm-up, halfway and at the end (a leak shows as growth in
the second half). Writes the JSON report (``--out``) and, with ``--markdown``, the ``serve-load`` section of
BENCHMARKS.md. Exits 1 when any request failed.

    python benchmarks/serve_load.py --data ../shared/datasets/mvtec_ad/bottle --model-dir runs/serve-load-bottle \\
        --clients 4 --requests 400 --markdown BENCHMARKS.md --out benchmarks/serve-load.json

The model folder is fitted first (PatchCore, default settings, ``--max-train`` images) unless it holds a model.
Take the recorded figures on an idle machine: the clients share the machine with the server.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BOTTLE = ROOT.parent / "shared" / "datasets" / "mvtec_ad" / "bottle"
SECTION = "serve-load"
MODEL_NAME = "bench"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Bounded loopback load test of `anomnet serve` with a PatchCore model.")
    p.add_argument("--data", default=str(BOTTLE), help=f"dataset whose test images are sent (default {BOTTLE})")
    p.add_argument(
        "--model-dir",
        default=str(ROOT / "runs" / "serve-load-bottle"),
        help="PatchCore model folder; fitted on --data first when it holds no model (default runs/serve-load-bottle)",
    )
    p.add_argument("--max-train", type=int, default=None, help="training images for that fit (default: all)")
    p.add_argument("--clients", type=int, default=4, help="concurrent clients (default 4)")
    p.add_argument("--requests", type=int, default=400, help="requests to send, one image each (default 400)")
    p.add_argument("--duration", type=float, default=600.0, help="stop sending after this many seconds (default 600)")
    p.add_argument("--warmup", type=int, default=8, help="requests sent one by one before measuring (default 8)")
    p.add_argument("--threads", type=int, default=None, help="torch threads of the server (default: all cores)")
    p.add_argument("--workers", type=int, default=1, help="the server's scoring threads (default 1)")
    p.add_argument("--queue", type=int, default=None, help="the server's queue (default: --clients, so no 429)")
    p.add_argument("--overlay", action="store_true", help="ask for the overlay PNG too (the review page's request)")
    p.add_argument("--out", default=None, help="JSON report (default: none)")
    p.add_argument("--markdown", default=None, help="also write the serve-load section of this Markdown file")
    return p


# -------------------------------------------------------------------------------------- server process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mb(pid: int) -> tuple[float, float]:
    """Resident memory now and its peak (VmRSS, VmHWM) of process ``pid`` in MiB; NaN where /proc is missing."""
    values = {"VmRSS": float("nan"), "VmHWM": float("nan")}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in values:
                values[key] = int(rest.split()[0]) / 1024.0
    except OSError:
        pass
    return values["VmRSS"], values["VmHWM"]


def start_server(model_dir: Path, port: int, a: argparse.Namespace) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "anomnet.cli"]
    if a.threads:
        cmd += ["--threads", str(a.threads)]
    cmd += ["serve", "--model", f"{MODEL_NAME}={model_dir}", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--workers", str(a.workers), "--queue", str(a.queue if a.queue is not None else a.clients)]
    cmd += ["--log-level", "warning"]
    print("server:", " ".join(shlex.quote(c) for c in cmd), flush=True)
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def wait_healthy(proc: subprocess.Popen[bytes], port: int, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise SystemExit(f"the server exited with {proc.returncode}: {err[-2000:]}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"the server did not answer /healthz within {timeout_s:.0f} s")


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


# -------------------------------------------------------------------------------------- clients


def multipart(name: str, data: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


class Load:
    """Hands out request numbers until ``total`` or the deadline; collects each answer's latency and status."""

    def __init__(self, total: int, deadline: float) -> None:
        self.total, self.deadline = total, deadline
        self.next = 0
        self.lock = threading.Lock()
        self.latencies: list[float] = []
        self.errors: dict[str, int] = {}

    def take(self) -> int | None:
        with self.lock:
            if self.next >= self.total or time.monotonic() >= self.deadline:
                return None
            self.next += 1
            return self.next - 1

    def record(self, seconds: float, error: str | None) -> None:
        with self.lock:
            if error is None:
                self.latencies.append(seconds)
            else:
                self.errors[error] = self.errors.get(error, 0) + 1

    @property
    def answered(self) -> int:
        with self.lock:
            return len(self.latencies) + sum(self.errors.values())


def post(conn: http.client.HTTPConnection, path: str, body: bytes, ctype: str) -> tuple[int, bytes]:
    conn.request("POST", path, body=body, headers={"Content-Type": ctype})
    response = conn.getresponse()
    return response.status, response.read()


def client(port: int, path: str, bodies: list[tuple[bytes, str]], load: Load) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    while (i := load.take()) is not None:
        body, ctype = bodies[i % len(bodies)]
        started = time.perf_counter()
        try:
            status, payload = post(conn, path, body, ctype)
            error = None if status == 200 and b'"results"' in payload else f"HTTP {status}"
        except (OSError, http.client.HTTPException) as exc:
            error = type(exc).__name__
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        load.record(time.perf_counter() - started, error)
    conn.close()


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (q in [0, 100])."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), math.ceil(q / 100 * len(sorted_values) - 1e-9)))
    return sorted_values[rank - 1]


# -------------------------------------------------------------------------------------- the run


def ensure_model(a: argparse.Namespace) -> tuple[Path, dict[str, Any]]:
    model_dir = Path(a.model_dir)
    if not (model_dir / "anomnet.json").is_file():
        cmd = [sys.executable, "-m", "anomnet.cli"]
        if a.threads:
            cmd += ["--threads", str(a.threads)]
        cmd += ["fit", "--model", "patchcore", "--data", a.data, "--out", str(model_dir), "--quiet"]
        if a.max_train:
            cmd += ["--max-train", str(a.max_train)]
        print("fit:", " ".join(shlex.quote(c) for c in cmd), flush=True)
        subprocess.run(cmd, check=True)
    meta = json.loads((model_dir / "anomnet.json").read_text())
    if meta.get("detector") != "patchcore":
        print(f"note: {model_dir} holds a {meta.get('detector')} model, not PatchCore", flush=True)
    return model_dir, meta


def test_images(data: str) -> list[Path]:
    root = Path(data) / "test"
    images = sorted(p for p in root.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".tif"))
    if not images:
        raise SystemExit(f"{root}: no test images")
    return images


def run(a: argparse.Namespace, command: str) -> dict[str, Any]:
    from anomnet.bench import _cpu_name as cpu_name  # the CPU named as in every other section

    if a.clients < 1 or a.requests < 1 or a.duration <= 0 or a.warmup < 0:
        raise SystemExit("--clients, --requests and --duration must be positive, --warmup at least 0")
    model_dir, meta = ensure_model(a)
    images = test_images(a.data)
    bodies = [multipart(p.name, p.read_bytes()) for p in images]
    path = f"/v1/models/{MODEL_NAME}/predict" + ("?overlay=true" if a.overlay else "")
    port = free_port()
    proc = start_server(model_dir, port, a)
    try:
        wait_healthy(proc, port)
        rss_start, _ = rss_mb(proc.pid)
        warm = Load(a.warmup, time.monotonic() + a.duration)
        client(port, path, bodies, warm)
        if warm.errors:
            raise SystemExit(f"warm-up requests failed: {warm.errors}")
        rss_warm, _ = rss_mb(proc.pid)
        load = Load(a.requests, time.monotonic() + a.duration)
        samples: list[tuple[float, int, float]] = []  # (seconds, answered, rss)
        stop = threading.Event()
        t0 = time.perf_counter()

        def sample() -> None:
            while not stop.wait(0.5):
                samples.append((time.perf_counter() - t0, load.answered, rss_mb(proc.pid)[0]))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        threads = [threading.Thread(target=client, args=(port, path, bodies, load)) for _ in range(a.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        stop.set()
        sampler.join()
        rss_end, rss_peak = rss_mb(proc.pid)
        half = [rss for _, answered, rss in samples if answered >= load.answered / 2]
        rss_mid = half[0] if half else float("nan")
        metrics = _server_requests(port)
        load_avg = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    finally:
        stop_server(proc)
    lat = sorted(load.latencies)
    answered = load.answered
    return {
        "command": command,
        "date": time.strftime("%Y-%m-%d"),
        "cpu": cpu_name(),
        "cpu_cores": os.cpu_count(),
        "load_avg_after": list(load_avg),
        "model_dir": str(model_dir),
        "detector": meta.get("detector"),
        "settings": {k: meta.get("config", {}).get(k) for k in ("backbone", "image_size", "coreset_ratio", "tile")},
        "json": a.out,
        "data": a.data,
        "images": len(images),
        "clients": a.clients,
        "requests_asked": a.requests,
        "duration_limit_s": a.duration,
        "stopped_by": "requests" if answered >= a.requests else "duration",
        "warmup": a.warmup,
        "server": {"threads": a.threads, "workers": a.workers, "queue": a.queue if a.queue is not None else a.clients},
        "overlay": a.overlay,
        "answered": answered,
        "ok": len(lat),
        "errors": load.errors,
        "wall_s": wall,
        "throughput_per_s": len(lat) / wall if wall > 0 else float("nan"),
        "latency_ms": {
            "p50": 1000 * percentile(lat, 50),
            "p95": 1000 * percentile(lat, 95),
            "p99": 1000 * percentile(lat, 99),
            "mean": 1000 * sum(lat) / len(lat) if lat else float("nan"),
            "max": 1000 * lat[-1] if lat else float("nan"),
        },
        "rss_mb": {
            "started": rss_start,
            "after_warmup": rss_warm,
            "halfway": rss_mid,
            "end": rss_end,
            "peak": rss_peak,
        },
        "server_predict_200": metrics,
    }


def _server_requests(port: int) -> int | None:
    """The server's own count of answered predict requests (from /metrics), to cross-check the clients'."""
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    except (OSError, http.client.HTTPException):
        return None
    key = 'anomnet_requests_total{method="POST",route="/v1/models/{name}/predict",status="200"} '
    for line in text.splitlines():
        if line.startswith(key):
            return int(line[len(key) :])
    return 0


def markdown(r: dict[str, Any]) -> str:
    lat, rss, srv = r["latency_ms"], r["rss_mb"], r["server"]
    threads = srv["threads"] or "all cores"
    errors = sum(r["errors"].values())
    busy = r["load_avg_after"][0] > 0.5 * (r["cpu_cores"] or 1)
    limit = r["duration_limit_s"]
    settings = ", ".join(f"{k} {v}" for k, v in r["settings"].items() if v not in (None, 0))
    stopped = "its request count" if r["stopped_by"] == "requests" else f"its time limit of {limit:g} s"
    lines = [
        "### Inspection service under load (`anomnet serve`, loopback)",
        "",
        f"Command: `{r['command']}` ({r['date']}; {r['cpu']}, {r['cpu_cores']} cores; 1-minute load average "
        f"{r['load_avg_after'][0]:.1f} at the end{', other processes were busy' if busy else ''}).",
        "",
        f"{r['clients']} concurrent clients sent {r['answered']} requests (one {Path(r['data']).name} test image each, "
        f"{r['images']} images cycled, multipart upload{', with the overlay PNG' if r['overlay'] else ''}) to a "
        f"{r['detector']} model ({settings}) after {r['warmup']} warm-up requests; the run stopped by "
        f"{stopped}. "
        f"Server: `anomnet --threads {threads} serve --workers {srv['workers']} --queue {srv['queue']}`, a separate "
        "process on the same machine as the clients. Latency is the client's, from sending the request to the parsed "
        "answer.",
        "",
        "| clients | requests | errors | throughput (img/s) | p50 ms | p95 ms | p99 ms | max ms |",
        "|---|---|---|---|---|---|---|---|",
        f"| {r['clients']} | {r['answered']} | {errors} | {r['throughput_per_s']:.2f} | {lat['p50']:.0f} | "
        f"{lat['p95']:.0f} | {lat['p99']:.0f} | {lat['max']:.0f} |",
        "",
        "Server memory (RSS, MiB): "
        f"{rss['started']:.0f} started, {rss['after_warmup']:.0f} after the warm-up, {rss['halfway']:.0f} halfway, "
        f"{rss['end']:.0f} at the end (growth over the second half {rss['end'] - rss['halfway']:+.1f}; peak "
        f"{rss['peak']:.0f}). The server counted {r['server_predict_200']} answered predict requests "
        "(warm-up included)." + (f" JSON: `{r['json']}`." if r["json"] else ""),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    command = "python benchmarks/serve_load.py " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:]))
    print("command:", command, flush=True)
    report = run(a, command)
    print(json.dumps(report, indent=1))
    if a.out:
        from anomnet.imageio import atomic_write_text

        atomic_write_text(a.out, json.dumps(report, indent=1) + "\n")
    if a.markdown:
        from anomnet.bench import write_section

        write_section(Path(a.markdown), SECTION, markdown(report))
        print(f"section {SECTION} written to {a.markdown}")
    errors = sum(report["errors"].values())
    if errors:
        print(f"{errors} request(s) failed: {report['errors']}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
