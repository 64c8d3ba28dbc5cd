"""Result rows of a batch run as Arrow tables: how they become durable, and the final files.

Durability: the driver appends every batch of rows it receives to a *journal*, Parquet part files in
``OUT/.anomnet-run/`` each written atomically (temporary file + rename, flushed every
:data:`FLUSH_ROWS` rows or :data:`FLUSH_SECONDS` seconds): a row in a part file survives any later
crash; a row still in memory when the driver dies is scored again by ``--resume`` (its image outputs are
replaced atomically, so nothing doubles). Finalisation reads the previous results and every part, keeps
one row per input key (product, path) -- the last one written, so a block that Ray ran twice after a
worker died still gives one row --, orders them as the inputs, and writes ``results.parquet``,
``results.csv`` and ``results.jsonl`` atomically before the journal is removed.

A recorded file that cannot be read (a results.parquet or part file cut short by a full disk or a copy
that stopped) is removed by :func:`drop_damaged` before a resumed run counts its rows: its inputs have no
row then, so they are scored again.

:class:`Attempts` counts, in ``OUT/.anomnet-run/attempts/``, how often an input's scoring was under way
when its worker died, so that an image that kills every worker scoring it becomes an error row rather
than a retry loop (:mod:`anomnet.engine.worker`).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import math
import os
import shutil
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from anomnet import durable, imageio
from anomnet.predict.inputs import InputImage
from anomnet.predict.outputs import PREDICT_CSV_COLUMNS
from anomnet.predict.scoring import ImagePrediction

JOURNAL = ".anomnet-run"
"""Folder of ``OUT`` that holds the part files of a run until it is finalised."""
ATTEMPTS = "attempts"
"""Folder of the journal holding one small file per input whose scoring was under way (see :class:`Attempts`)."""
RESULTS_PARQUET = "results.parquet"
FLUSH_ROWS = 4096
FLUSH_SECONDS = 10.0

INPUT_SCHEMA = pa.schema([("path", pa.string()), ("name", pa.string()), ("product", pa.string())])
"""The reference table the engine distributes: one row per input."""

SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("product", pa.string()),
        ("score", pa.float64()),
        ("p_value", pa.float64()),
        ("defective", pa.bool_()),
        ("threshold", pa.float64()),
        ("defect_pixels", pa.int64()),
        ("regions", pa.int64()),
        ("boxes", pa.list_(pa.list_(pa.int64()))),
        ("error", pa.string()),
        ("outputs", pa.map_(pa.string(), pa.string())),
    ]
)
"""One result row per input; the numbers are null on an error row.

``threshold`` is the image threshold the decision was made with; part files and results written before
rows carried it are read with it null (:func:`_read`).
"""


def inputs_table(refs: Sequence[InputImage]) -> pa.Table:
    return pa.table(
        {
            "path": pa.array([r.path for r in refs], pa.string()),
            "name": pa.array([r.name for r in refs], pa.string()),
            "product": pa.array([r.product for r in refs], pa.string()),
        },
        schema=INPUT_SCHEMA,
    )


def refs_of(table: pa.Table) -> list[InputImage]:
    cols = table.to_pydict()
    return [InputImage(p, n, pr) for p, n, pr in zip(cols["path"], cols["name"], cols["product"])]


def rows_table(predictions: Sequence[ImagePrediction], products: Sequence[str | None]) -> pa.Table:
    """The rows of ``predictions`` (one per input, in order) with each input's product."""
    records = []
    for pred, product in zip(predictions, products):
        rec = pred.record()
        records.append(
            {
                "path": rec["path"],
                "product": product,
                "score": rec["score"],
                "p_value": rec["p_value"],
                "defective": rec["defective"],
                "threshold": rec["threshold"],
                "defect_pixels": rec["defect_pixels"],
                "regions": rec["regions"],
                "boxes": rec["boxes"],
                "error": rec["error"],
                "outputs": list(rec["outputs"].items()),
            }
        )
    return pa.Table.from_pylist(records, schema=SCHEMA)


def error_rows(refs: Sequence[InputImage], error: str) -> pa.Table:
    return rows_table([ImagePrediction(r.path, error=error) for r in refs], [r.product for r in refs])


def predictions_of(table: pa.Table) -> list[tuple[ImagePrediction, str | None]]:
    """Each row back as an :class:`ImagePrediction` with its product."""
    out = []
    for rec in table.to_pylist():
        pred = ImagePrediction(
            rec["path"],
            math.nan if rec["score"] is None else rec["score"],
            math.nan if rec["p_value"] is None else rec["p_value"],
            rec["defective"],
            rec["error"],
            threshold=math.nan if rec["threshold"] is None else rec["threshold"],
            defect_pixels=rec["defect_pixels"],
            regions=rec["regions"],
            boxes=rec["boxes"] or [],
            outputs=dict(rec["outputs"] or []),
        )
        out.append((pred, rec["product"]))
    return out


# -- the journal ----------------------------------------------------------------------------------


class Journal:
    """Appends row tables to atomically written Parquet part files in ``OUT/.anomnet-run/``."""

    def __init__(self, out: Path, flush_rows: int | None = None, flush_seconds: float | None = None) -> None:
        self.folder = Path(out) / JOURNAL
        self.folder.mkdir(parents=True, exist_ok=True)
        self.flush_rows = FLUSH_ROWS if flush_rows is None else flush_rows
        self.flush_seconds = FLUSH_SECONDS if flush_seconds is None else flush_seconds
        self._run = f"{time.time_ns():020d}"  # part names sort in the order they were written, across runs
        self._seq = 0
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._last_flush = time.monotonic()

    def append(self, table: pa.Table) -> None:
        self._pending.append(table.select(SCHEMA.names).cast(SCHEMA))
        self._pending_rows += table.num_rows
        if self._pending_rows >= self.flush_rows or time.monotonic() - self._last_flush >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            write_parquet(self.folder / f"part-{self._run}-{self._seq:06d}.parquet", pa.concat_tables(self._pending))
            self._seq += 1
        self._pending, self._pending_rows = [], 0
        self._last_flush = time.monotonic()


def write_parquet(path: Path, table: pa.Table) -> None:
    """``table`` as a Parquet file at ``path``, atomically."""
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    durable.write_file(path, buf.getvalue().to_pybytes())


def recorded(out: Path) -> pa.Table:
    """Every row recorded in ``out``: the previous final results, then the journal's parts in order."""
    tables = []
    final = Path(out) / RESULTS_PARQUET
    if final.is_file():
        tables.append(_read(final))
    folder = Path(out) / JOURNAL
    if folder.is_dir():
        tables.extend(_read(part) for part in sorted(folder.glob("part-*.parquet")))
    return pa.concat_tables(tables) if tables else SCHEMA.empty_table()


def _read(path: Path) -> pa.Table:
    table = pq.read_table(path)
    if "threshold" not in table.column_names:  # written before rows carried the threshold: unknown
        table = table.append_column("threshold", pa.nulls(table.num_rows, pa.float64()))
    return table.select(SCHEMA.names).cast(SCHEMA)


def drop_damaged(out: Path) -> list[str]:
    """Remove the recorded files of ``out`` that cannot be read; one note per file (its rows are scored again)."""
    files = [Path(out) / RESULTS_PARQUET, *sorted((Path(out) / JOURNAL).glob("part-*.parquet"))]
    notes = []
    for path in files:
        if not path.is_file():
            continue
        try:
            _read(path)
        except (OSError, pa.ArrowException, KeyError, ValueError) as exc:
            path.unlink(missing_ok=True)
            what = "the results of the earlier run" if path.name == RESULTS_PARQUET else "a journal part"
            notes.append(
                f"{path} ({what}) cannot be read ({type(exc).__name__}: {str(exc)[:200]}): removed; "
                "the inputs whose rows it held are scored again"
            )
    return notes


def done_keys(out: Path) -> set[tuple[str | None, str]]:
    """The input keys that already have a row in ``out`` (what ``--resume`` skips)."""
    table = recorded(out)
    return set(zip(table.column("product").to_pylist(), table.column("path").to_pylist()))


def clear_journal(out: Path, keep_attempts: bool = False) -> None:
    """Remove the journal (``keep_attempts``: all but the attempt counts, which a resumed run still needs)."""
    folder = Path(out) / JOURNAL
    if not keep_attempts or not (folder / ATTEMPTS).is_dir():
        shutil.rmtree(folder, ignore_errors=True)
        return
    for part in folder.glob("part-*.parquet"):
        part.unlink(missing_ok=True)


def finalise(out: Path, refs: Sequence[InputImage]) -> pa.Table:
    """One row per input of ``refs`` that has one, in input order; written as results.parquet/.csv/.jsonl.

    Rows of inputs not in ``refs`` (an earlier run over other inputs) are dropped; the journal is
    removed once the final files are in place.
    """
    table = recorded(out)
    last: dict[tuple[str | None, str], int] = {}
    for i, key in enumerate(zip(table.column("product").to_pylist(), table.column("path").to_pylist())):
        last[key] = i  # a later row of the same input replaces an earlier one
    order = [last[r.key] for r in refs if r.key in last]
    result = table.take(pa.array(order, pa.int64())) if order else SCHEMA.empty_table()
    write_results(Path(out), result)
    clear_journal(out, keep_attempts=len(order) < len(refs))  # inputs without a row: --resume goes on counting
    return result


def write_results(out: Path, table: pa.Table) -> None:
    """results.parquet, results.csv and results.jsonl (the columns of ``predict``, plus product when used)."""
    rows = predictions_of(table)
    with_product = any(product is not None for _, product in rows)
    columns: Iterable[str] = (
        PREDICT_CSV_COLUMNS[:1] + ("product",) + PREDICT_CSV_COLUMNS[1:] if with_product else PREDICT_CSV_COLUMNS
    )
    lines, buf = [], io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for pred, product in rows:
        rec: dict[str, Any] = pred.record()
        if with_product:
            rec = {"path": rec["path"], "product": product, **rec}
        w.writerow(["" if rec[c] is None else rec[c] for c in columns])
        lines.append(json.dumps(rec) + "\n")
    write_parquet(out / RESULTS_PARQUET, table)
    imageio.atomic_write_text(out / "results.csv", buf.getvalue())
    imageio.atomic_write_text(out / "results.jsonl", "".join(lines))


# -- attempts ---------------------------------------------------------------------------------------


class Attempts:
    """How often each input's scoring was under way when its worker died: one small file per input.

    The files live in the output folder (shared storage, like the image outputs the workers write), so
    the worker that Ray starts in place of a dead one, on this machine or another, reads the counts.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def _path(self, ref: InputImage) -> Path:
        key = hashlib.sha256(f"{ref.product}\0{ref.path}".encode("utf-8", "surrogateescape")).hexdigest()[:32]
        return self.folder / key

    def get(self, ref: InputImage) -> int:
        try:
            return int(self._path(ref).read_text() or 0)
        except (OSError, ValueError):
            return 0

    def set(self, refs: Sequence[InputImage], count: int) -> None:
        """Record ``count`` for each input (0: forget it).

        Not synced to disk: the counts must outlive a worker process, not the machine (after a power cut an
        input is merely tried once more).
        """
        self.folder.mkdir(parents=True, exist_ok=True)
        for ref in refs:
            if count <= 0:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._path(ref))
            else:
                self._path(ref).write_text(str(count))
