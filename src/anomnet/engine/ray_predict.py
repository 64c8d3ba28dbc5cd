"""``anomnet predict --engine ray``: score many images on a Ray cluster (or a local Ray), nothing lost.

The driver lists the inputs (:mod:`anomnet.predict.inputs`) and hands Ray Data a table of references
(path, output name, product; never pixels), cut into blocks. ``map_batches`` runs a pool of
:class:`~anomnet.engine.worker.BatchScorer` actors, each loading a product's model once and keeping it;
every worker reads its images from the shared storage, writes their heat maps, overlays and masks into
``OUT`` itself and sends back only the result rows (about 200 bytes an image). The driver streams the
rows into the journal (:mod:`anomnet.engine.rows`), shows progress and finally writes results.parquet,
results.csv and results.jsonl.

Nothing lost: a worker that dies (killed, out of memory, a lost node) is restarted by Ray and its block
is run again; finalisation keeps one row per input, so a block scored twice gives no duplicate. After
the stream ends, inputs still without a row are sent once more; any left then are reported (never
invented), and ``--resume`` picks them up with everything else that has no row yet. An image that kills
every worker scoring it ends as an error row after a few tries (:mod:`anomnet.engine.worker`), not in a
retry loop; a damaged results.parquet or journal part found by ``--resume`` is removed with a note, and
its inputs are scored again.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from anomnet.engine.models import check_products
from anomnet.engine.rows import (
    ATTEMPTS,
    JOURNAL,
    RESULTS_PARQUET,
    Journal,
    clear_journal,
    done_keys,
    drop_damaged,
    finalise,
    inputs_table,
)
from anomnet.engine.worker import BatchScorer
from anomnet.errors import ConfigError
from anomnet.predict.inputs import InputImage
from anomnet.predict.outputs import OWNED_FILES, claim_outputs, clear_previous_run
from anomnet.predict.scoring import Scorer

if TYPE_CHECKING:  # the ray extra's pyarrow: a core install imports this module without it
    import pyarrow as pa

BATCH_SIZE = 16
"""References per ``map_batches`` call (the worker splits them further by the model's own batch size)."""
BLOCKS_PER_WORKER = 4
"""Blocks per worker at least (small runs still spread); a block is the unit Ray retries."""
MAX_BLOCK_ROWS = 256
PASSES = 2
"""Stream passes: the second sends inputs that still have no row (should none be left by the first)."""


class EngineFailed(RuntimeError):  # noqa: N818 - reads as what happened
    """The engine stopped before every input had a row; the rows so far are kept for ``--resume``."""


@dataclass
class RunSummary:
    inputs: int
    resumed: int = 0
    """Inputs skipped because an earlier run recorded their row (``--resume``)."""
    scored: int = 0
    """Rows this run produced."""
    failed: int = 0
    """Error rows among all the inputs' rows."""
    missing: list[InputImage] = field(default_factory=list)
    """Inputs without a row at the end (none unless the engine failed them twice)."""
    startup_seconds: float = 0.0
    """Connecting to (or starting) Ray."""
    seconds: float = 0.0
    """From handing the references to Ray to the last row (workers' start and model loading included)."""
    first_row_seconds: float = math.nan
    workers: int = 0

    @property
    def images_per_second(self) -> float:
        return self.scored / self.seconds if self.seconds > 0 else math.nan

    def lines(self) -> list[str]:
        rate = f"{self.images_per_second:.2f}" if self.scored else "-"
        out = [
            f"images: {self.inputs} ({self.scored} scored now, {self.resumed} already done), "
            f"failed: {self.failed}, missing: {len(self.missing)}",
            f"time: {self.seconds:.1f} s on {self.workers} worker(s) ({rate} images/s; first row after "
            f"{self.first_row_seconds:.1f} s), Ray start {self.startup_seconds:.1f} s",
        ]
        return out


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to the cluster at ``address`` (``auto``: the one ``ray start`` runs here) or start a local Ray."""
    import ray

    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {
        "include_dashboard": False,
        "logging_level": logging.WARNING,
        "runtime_env": {"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}},
    }
    if not address:
        ray.init(num_cpus=num_cpus, **kwargs)
        return
    try:
        ray.init(address=address, **kwargs)
    except ConnectionError as exc:
        raise ConfigError(
            f"--address {address}: no Ray cluster answers there ({exc}). Is it running ('ray status' on the head)? "
            "With Ray's token authentication this machine needs the cluster's token (~/.ray/auth_token) and "
            "RAY_AUTH_MODE=token (docs/scaling.md)"
        ) from None


def predict_on_ray(
    refs: Sequence[InputImage],
    models: Mapping[str | None, str | Scorer],
    out: str | Path,
    *,
    raw_maps: bool = False,
    image_outputs: bool = True,
    resume: bool = False,
    address: str | None = None,
    workers: int | None = None,
    worker_cpus: float = 1,
    batch_size: int = BATCH_SIZE,
    progress: bool = True,
    scorer_class: type[BatchScorer] = BatchScorer,
    note: Callable[[str], None] | None = None,
) -> RunSummary:
    """Score ``refs`` on Ray into ``out`` (see the module docstring); returns the run's summary.

    ``note``: where remarks go (a damaged file set aside by ``resume``); default standard error.

    ``models``: product -> model folder (or a :class:`~anomnet.predict.scoring.Scorer`), key None for every
    image without its own; ``workers``: scorer actors (default: the cluster's CPUs / ``worker_cpus``);
    ``image_outputs``: False writes only the result rows (no heat maps, overlays, masks).
    """
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
    if worker_cpus <= 0:
        raise ConfigError(f"--worker-cpus must be above 0, got {worker_cpus}")
    if workers is not None and workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {workers}")
    check_products(refs, models)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if not resume:
        clear_previous_run(out)
        clear_journal(out)
        (out / RESULTS_PARQUET).unlink(missing_ok=True)
    if resume:
        for line in drop_damaged(out):
            (note or _stderr_note)(line)
    done = done_keys(out) if resume else set()
    todo = [r for r in refs if r.key not in done]
    claim_outputs(
        out,
        list(refs) if image_outputs else [],
        raw_maps,
        summaries=[RESULTS_PARQUET, *(_claimed(out) if resume else [])],
    )
    summary = RunSummary(inputs=len(refs), resumed=len(refs) - len(todo))
    if todo:
        _run(
            todo,
            models,
            out,
            out if image_outputs else None,
            raw_maps,
            (address, workers, worker_cpus, batch_size),
            progress,
            scorer_class,
            summary,
        )
    table = finalise(out, refs)
    have = set(zip(table.column("product").to_pylist(), table.column("path").to_pylist()))
    summary.missing = [r for r in refs if r.key not in have]
    summary.failed = table.num_rows - table.column("error").null_count
    return summary


def _claimed(out: Path) -> list[str]:
    """The files an earlier run into ``out`` listed as its own (kept listed when a run resumes it)."""
    try:
        owned = json.loads((out / OWNED_FILES).read_text())
    except (OSError, ValueError):
        return []
    return [str(f) for f in owned.get("files", [])] if isinstance(owned, dict) else []


def _run(
    todo: list[InputImage],
    models: Mapping[str | None, str | Scorer],
    out: Path,
    image_out: Path | None,
    raw_maps: bool,
    engine: tuple[str | None, int | None, float, int],
    progress: bool,
    scorer_class: type[BatchScorer],
    summary: RunSummary,
) -> None:
    address, workers, worker_cpus, batch_size = engine
    start = time.perf_counter()
    ensure_ray(address)
    import ray

    summary.startup_seconds = time.perf_counter() - start
    if workers is None:
        workers = max(1, int(ray.cluster_resources().get("CPU", 1) // worker_cpus))
    summary.workers = workers
    journal = Journal(out)
    got: set[tuple[str | None, str]] = set()
    bar = _progress_bar(len(todo), progress)
    start = time.perf_counter()
    try:
        for _ in range(PASSES):
            pending = [r for r in todo if r.key not in got]
            if not pending:
                break
            stream = _stream(
                pending, models, out / JOURNAL, image_out, raw_maps, workers, worker_cpus, batch_size, scorer_class
            )
            for table in stream:
                if math.isnan(summary.first_row_seconds):
                    summary.first_row_seconds = time.perf_counter() - start
                journal.append(table)
                new = set(zip(table.column("product").to_pylist(), table.column("path").to_pylist())) - got
                got |= new
                summary.scored += len(new)
                if bar is not None:
                    bar.update(len(new))
    except KeyboardInterrupt:
        journal.flush()  # the rows received so far survive an interrupt too
        raise
    except Exception as exc:
        journal.flush()
        raise EngineFailed(
            f"the Ray engine stopped ({type(exc).__name__}: {exc}); {len(got)} of {len(todo)} rows of this run "
            f"are kept in {out}: run the same command with --resume to score the rest"
        ) from exc
    finally:
        if bar is not None:
            bar.close()
    journal.flush()
    summary.seconds = time.perf_counter() - start


def _stream(
    refs: list[InputImage],
    models: Mapping[str | None, str | Scorer],
    journal_folder: Path,
    out: Path | None,
    raw_maps: bool,
    workers: int,
    worker_cpus: float,
    batch_size: int,
    scorer_class: type[BatchScorer],
) -> Iterator[pa.Table]:
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the driver shows one bar of its own
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    ordered = sorted(refs, key=lambda r: r.product or "")  # blocks of one product: few models per worker
    table = inputs_table(ordered)
    rows = max(1, min(MAX_BLOCK_ROWS, math.ceil(len(ordered) / (workers * BLOCKS_PER_WORKER))))
    blocks = [table.slice(i, rows) for i in range(0, table.num_rows, rows)]
    threads = max(1, int(worker_cpus))
    attempts = journal_folder / ATTEMPTS
    ds = ray.data.from_arrow(blocks).map_batches(
        scorer_class,
        fn_constructor_kwargs={
            "models": dict(models),
            "out": None if out is None else str(out),
            "raw_maps": raw_maps,
            "threads": threads,
            "attempts": str(attempts),
        },
        batch_size=batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=worker_cpus,
    )  # Ray Data's defaults for actors: a worker that dies is replaced and its block runs again
    yield from ds.iter_batches(batch_size=None, batch_format="pyarrow")


def _stderr_note(line: str) -> None:
    print(f"anomnet: note: {line}", file=sys.stderr)


def _progress_bar(total: int, enabled: bool):  # noqa: ANN202 - tqdm or None
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="predict (ray)", unit="img", file=sys.stderr, mininterval=1.0)
