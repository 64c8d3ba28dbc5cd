"""The hot folder's durable record: results.jsonl / results.csv (append-only) and a small state file.

``results.jsonl`` is the journal: one line per processed file, appended with a single write,
flushed and synced before anything else happens to that file. ``results.csv`` holds the same
rows and is always derived from the JSON lines, so the two can be rebuilt to agree. The state
file (``.anomnet-watch.json``, replaced atomically) lists the *claims*: files taken from the
inbox whose processing has not finished, each with the output name chosen for it and, once its
row is written, where it goes. It also keeps the two results files' sizes at the moment the
claims were made: everything after those offsets belongs to the open claims, so after a crash
:meth:`Journal.recover` drops a torn last line, finds which claims already have their row, and
rewrites the CSV's tail from the JSON lines. See docs/watch.md for every crash window.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from anomnet import durable, imageio
from anomnet.errors import AnomnetError
from anomnet.predict.outputs import CSV_COLUMNS

STATE_FILE = ".anomnet-watch.json"
LOCK_FILE = ".anomnet-watch.lock"
RESULTS_JSONL = "results.jsonl"
RESULTS_CSV = "results.csv"
STATE_VERSION = 1

WATCH_CSV_COLUMNS = (*CSV_COLUMNS, "source", "time", "id")
"""``anomnet predict``'s columns, then the inbox path the file arrived as, when it was scored and the row id."""

CLAIMED, RECORDED = "claimed", "recorded"


class WatchError(AnomnetError):
    """The hot folder cannot start or go on (its output folder is in use, unwritable or not its own)."""


@dataclass
class Claim:
    """A file taken from the inbox whose processing has not finished."""

    id: str
    source: str
    size: int
    mtime_ns: int
    name: str
    """Output name (heat map, overlay and mask are ``<kind>/<name>.png``)."""
    stage: str = CLAIMED
    """``claimed`` (no row yet) or ``recorded`` (its row is in results.jsonl; it still has to be moved)."""
    dest: str | None = None
    """Where the file goes once recorded (None: it stays in the inbox)."""
    attempts: int = 1
    """Times in a row its scoring may have been under way when the watcher died (the first try counts from the
    claim on; a restart scores each unrecorded claim alone, counting it up before and clearing it after): see
    :data:`anomnet.watch.folder.MAX_SCORING_ATTEMPTS`."""


@dataclass
class State:
    claims: list[Claim] = field(default_factory=list)
    jsonl_offset: int = 0
    csv_offset: int = 0


class Journal:
    """The results files and state file of one output folder, locked against a second watcher."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.jsonl = out / RESULTS_JSONL
        self.csv = out / RESULTS_CSV
        self.state_path = out / STATE_FILE
        out.mkdir(parents=True, exist_ok=True)
        self._lock = _lock(out / LOCK_FILE)
        self._check_csv_header()

    def close(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    # -- state ----------------------------------------------------------------------------

    def load_state(self) -> State:
        if not self.state_path.is_file():
            return State()
        try:
            raw = json.loads(self.state_path.read_text())
            if raw.get("version") != STATE_VERSION:
                raise ValueError(f"version {raw.get('version')!r}, expected {STATE_VERSION}")
            return State([Claim(**c) for c in raw["claims"]], int(raw["jsonl_offset"]), int(raw["csv_offset"]))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise WatchError(
                f"{self.state_path}: unreadable hot-folder state ({exc}); it is only written by anomnet watch. "
                "Deleting it starts over: files still in the inbox are then scored again"
            ) from None

    def save_state(self, state: State) -> None:
        data = {
            "version": STATE_VERSION,
            "claims": [asdict(c) for c in state.claims],
            "jsonl_offset": state.jsonl_offset,
            "csv_offset": state.csv_offset,
        }
        try:
            imageio.atomic_write_text(self.state_path, json.dumps(data, indent=1))
        except OSError as exc:
            raise WatchError(
                f"{self.state_path}: cannot be written ({exc.strerror or exc}); the watcher stops, and its next "
                "start resumes where it stopped"
            ) from None

    def sizes(self) -> tuple[int, int]:
        """Current sizes of results.jsonl and results.csv (0 when missing)."""
        return _size(self.jsonl), _size(self.csv)

    # -- rows -----------------------------------------------------------------------------

    def append_jsonl(self, records: list[dict[str, Any]]) -> None:
        """Append the rows to results.jsonl with one write, synced to disk before it returns."""
        if records:
            _append(self.jsonl, "".join(json.dumps(r) + "\n" for r in records))

    def append_csv(self, records: list[dict[str, Any]]) -> None:
        """Append the rows to results.csv (its header first when the file is new), synced to disk."""
        if records:
            _append(self.csv, csv_rows(records, header=_size(self.csv) == 0))

    def recover(self, state: State) -> dict[str, dict[str, Any]]:
        """After a crash: the rows written since the open claims were made, by id; both files made whole.

        A torn last line of results.jsonl (a kill mid-append) is cut off; results.csv is cut back to
        its size when the claims were made and rewritten from those JSON lines.
        """
        rows: dict[str, dict[str, Any]] = {}
        ordered: list[dict[str, Any]] = []
        size = _size(self.jsonl)
        start = min(state.jsonl_offset, size)
        good_end = start
        if size > start:
            with open(self.jsonl, "rb") as f:
                f.seek(start)
                tail = f.read()
            for line in tail.splitlines(keepends=True):
                if not line.endswith(b"\n"):
                    break
                try:
                    record = json.loads(line)
                except ValueError:
                    break
                if not isinstance(record, dict):
                    break
                ordered.append(record)
                rows[str(record.get("id"))] = record
                good_end += len(line)
            if good_end < size:
                _truncate(self.jsonl, good_end)
        if _size(self.csv) > state.csv_offset:
            _truncate(self.csv, state.csv_offset)
        if ordered:
            self.append_csv(ordered)
        return rows

    def records(self) -> Iterator[dict[str, Any]]:
        """Every complete row of results.jsonl (a torn last line is skipped)."""
        if not self.jsonl.is_file():
            return
        with open(self.jsonl, "rb") as f:
            for line in f:
                if not line.endswith(b"\n"):
                    return
                with contextlib.suppress(ValueError):
                    record = json.loads(line)
                    if isinstance(record, dict):
                        yield record

    def _check_csv_header(self) -> None:
        if _size(self.csv) == 0:
            return
        with open(self.csv, encoding="utf-8", errors="replace", newline="") as f:
            first = f.readline().rstrip("\r\n")
        if first != ",".join(WATCH_CSV_COLUMNS):
            raise WatchError(
                f"{self.csv} was not written by anomnet watch (its columns are {first[:120]!r}); "
                "give the hot folder an output folder of its own"
            )


def csv_rows(records: list[dict[str, Any]], header: bool) -> str:
    """The CSV lines of ``records`` (the header first when ``header``)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    if header:
        w.writerow(WATCH_CSV_COLUMNS)
    for rec in records:
        w.writerow(["" if rec.get(c) is None else rec[c] for c in WATCH_CSV_COLUMNS])
    return buf.getvalue()


def _append(path: Path, text: str) -> None:
    data = text.encode("utf-8", errors="surrogateescape")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, durable.file_mode())
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise WatchError(
            f"{path}: rows cannot be appended ({exc.strerror or exc}); the watcher stops, and its next start "
            "resumes where it stopped"
        ) from None


def _truncate(path: Path, size: int) -> None:
    os.truncate(path, size)
    durable.fsync_file(path)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _lock(path: Path) -> IO[bytes] | None:
    """Hold an exclusive lock on ``path`` for the life of the process (None where locks do not exist)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return None
    handle = open(path, "ab")  # noqa: SIM115 - held open while the watcher runs
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise WatchError(f"{path.parent}: another anomnet watch is already writing to this output folder") from None
    return handle
