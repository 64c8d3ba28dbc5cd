"""Request counts, a latency histogram and image decisions, rendered in the Prometheus text format.

Written by hand (a few counters and one histogram), so the ``serve`` extra needs no metrics
library. Thread-safe: the request middleware and the scoring workers update it concurrently.
"""

from __future__ import annotations

import math
import threading
from collections import Counter
from collections.abc import Callable

LATENCY_BUCKETS: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""Upper bounds (seconds) of the request latency histogram; ``+Inf`` is added."""


class Metrics:
    """What ``GET /metrics`` reports."""

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.buckets = tuple(sorted(buckets))
        self._lock = threading.Lock()
        self._requests: Counter[tuple[str, str, str]] = Counter()  # (method, route, status)
        self._latency: dict[str, list[int]] = {}  # route -> cumulative-free bucket counts (+Inf last)
        self._latency_sum: dict[str, float] = {}
        self._latency_count: Counter[str] = Counter()
        self._images: Counter[tuple[str, str]] = Counter()  # (model, outcome)
        self._gauges: dict[str, tuple[str, Callable[[], float]]] = {}

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        with self._lock:
            self._requests[(method, route, str(status))] += 1
            counts = self._latency.setdefault(route, [0] * (len(self.buckets) + 1))
            counts[_bucket(self.buckets, seconds)] += 1
            self._latency_sum[route] = self._latency_sum.get(route, 0.0) + seconds
            self._latency_count[route] += 1

    def observe_image(self, model: str, outcome: str) -> None:
        """``outcome``: ``good``, ``defective`` or ``error``."""
        with self._lock:
            self._images[(model, outcome)] += 1

    def gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        """A value read when the metrics are rendered (e.g. the worker pool's queue)."""
        self._gauges[name] = (help_text, read)

    def requests(self, route: str | None = None, status: int | None = None) -> int:
        """Requests counted so far, optionally of one route and / or status."""
        with self._lock:
            return sum(
                n
                for (_, r, s), n in self._requests.items()
                if (route is None or r == route) and (status is None or s == str(status))
            )

    def render(self) -> str:
        """The Prometheus text exposition format (version 0.0.4)."""
        lines: list[str] = []
        with self._lock:
            lines += [
                "# HELP anomnet_requests_total HTTP requests by method, route and status code.",
                "# TYPE anomnet_requests_total counter",
            ]
            for (method, route, status), n in sorted(self._requests.items()):
                labels = _labels(method=method, route=route, status=status)
                lines.append(f"anomnet_requests_total{labels} {n}")
            lines += [
                "# HELP anomnet_request_duration_seconds Time from a request's arrival to its response, by route.",
                "# TYPE anomnet_request_duration_seconds histogram",
            ]
            for route in sorted(self._latency):
                running = 0
                for bound, n in zip((*self.buckets, math.inf), self._latency[route]):
                    running += n
                    le = "+Inf" if math.isinf(bound) else f"{bound:g}"
                    lines.append(f"anomnet_request_duration_seconds_bucket{_labels(route=route, le=le)} {running}")
                lines.append(
                    f"anomnet_request_duration_seconds_sum{_labels(route=route)} {self._latency_sum[route]:.6f}"
                )
                lines.append(
                    f"anomnet_request_duration_seconds_count{_labels(route=route)} {self._latency_count[route]}"
                )
            lines += [
                "# HELP anomnet_images_total Images scored, by model and outcome (good, defective, error).",
                "# TYPE anomnet_images_total counter",
            ]
            for (model, outcome), n in sorted(self._images.items()):
                lines.append(f"anomnet_images_total{_labels(model=model, outcome=outcome)} {n}")
        for name, (help_text, read) in sorted(self._gauges.items()):
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name} {read():g}"]
        return "\n".join(lines) + "\n"


def _bucket(buckets: tuple[float, ...], seconds: float) -> int:
    for i, bound in enumerate(buckets):
        if seconds <= bound:
            return i
    return len(buckets)


def _labels(**labels: str) -> str:
    def escape(v: str) -> str:
        return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

    return "{" + ",".join(f'{k}="{escape(v)}"' for k, v in labels.items()) + "}"
