"""The hot folder: score each image that lands in an inbox, once, and record it durably.

Each poll: scan the inbox, wait until files have settled (:mod:`anomnet.watch.inbox`), then per
batch of settled files

1. **claim** them: choose each output name, save the claims and the results files' sizes in the
   state file (atomically);
2. **score** them and write their image outputs (:func:`anomnet.predict.outputs.score_and_write`, the step
   ``predict`` uses), then re-check that no file changed meanwhile;
3. **record** them: choose where each file goes (processed or errors folder, a free name), append
   the rows to results.jsonl then results.csv (synced), mark the claims ``recorded``;
4. **move** each file (:func:`anomnet.watch.moves.finish_move`), then drop the claims.

A restart first finishes what the state file lists (:meth:`HotFolder.recover`): claims with a row
are only moved, claims without one are scored again, one at a time, under the name they were given.
So a kill at any point ends in exactly one row per file. A file whose scoring was under way each
time the watcher died (:data:`MAX_SCORING_ATTEMPTS`: a decoder crash, the out-of-memory killer)
gets an error row instead of a third try: one bad file cannot keep the line in a crash loop.
docs/watch.md walks through each crash window.

The watcher never follows a symbolic link in the inbox (it says so, once per link), stops with a
clear message when the inbox itself disappears, and prints file names that are not valid text
with escapes (``\xff``), so a strict UTF-8 console never stops it.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any

from anomnet import imageio
from anomnet.durable import fsync_folder
from anomnet.errors import ConfigError
from anomnet.predict.inputs import InputImage
from anomnet.predict.outputs import output_files, score_and_write
from anomnet.predict.scoring import ImagePrediction, Scorer, load_scorer
from anomnet.watch.inbox import SettleTracker, Signature, scan, signature
from anomnet.watch.journal import CLAIMED, RECORDED, Claim, Journal, WatchError
from anomnet.watch.moves import MoveResult, finish_move, free_path

Log = Callable[[str], None]

MAX_SCORING_ATTEMPTS = 3
"""A file whose scoring was under way this many times when the watcher died gets an error row, not another try
(three: a kill by hand that lands on a file twice, once in a batch and once while it is retried alone, is not
the file's doing; a file that kills the decoder does so every time)."""


def print_log(message: str) -> None:
    """The default log: one time-stamped line on stdout, flushed at once (readable through a pipe or a service log).

    Whatever the console's encoding, the line is printed: what it cannot show is escaped.
    """
    line = f"{datetime.now():%Y-%m-%d %H:%M:%S}  {message}"
    encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
    try:
        line.encode(encoding)
    except (UnicodeEncodeError, LookupError):
        line = line.encode(encoding if _known(encoding) else "ascii", "backslashreplace").decode(
            encoding if _known(encoding) else "ascii"
        )
    print(line, flush=True)


def _known(encoding: str) -> bool:
    import codecs

    try:
        codecs.lookup(encoding)
    except LookupError:
        return False
    return True


def printable(name: str) -> str:
    """A file name as it can be printed anywhere: bytes that are not UTF-8 as ``\\xff``, control characters escaped."""
    try:
        shown = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that did not come from a file name's bytes
        shown = name.encode("utf-8", "backslashreplace").decode("utf-8")
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in shown)


class InboxGone(WatchError):
    """The inbox folder disappeared while the watcher ran (deleted, renamed or unmounted)."""

    def __init__(self, message: str, summary: WatchSummary) -> None:
        super().__init__(message)
        self.summary = summary


@dataclass(frozen=True)
class WatchOptions:
    settle: float = 2.0
    """Seconds a file's size, modification time and inode must stay the same before it is scored (0: at once)."""
    poll: float = 0.5
    """Seconds between two scans of the inbox."""
    done_dir: Path | None = None
    """Where scored files go (default ``OUT/processed``)."""
    error_dir: Path | None = None
    """Where files that could not be scored go (default ``OUT/errors``)."""
    keep: bool = False
    """Leave files in the inbox; results.jsonl marks them done (a file whose content changes is scored again)."""
    recursive: bool = False
    """Also watch subfolders of the inbox (names keep their subfolder)."""
    raw_maps: bool = False
    """Also write the raw float32 anomaly map as TIFF (``maps/<name>.tiff``)."""


@dataclass
class WatchSummary:
    """What one run of the watcher did."""

    processed: int = 0
    """Files that got their row."""
    defective: int = 0
    errors: int = 0
    """Rows with an error (the file could not be scored, or its image outputs could not be written)."""


class HotFolder:
    """A watcher over one inbox writing into one output folder; see the module docstring."""

    def __init__(
        self,
        scorer: Scorer,
        inbox: str | Path,
        out: str | Path,
        options: WatchOptions | None = None,
        log: Log = print_log,
    ) -> None:
        self.scorer = scorer
        self.inbox = Path(os.path.abspath(inbox))  # the state file's paths must not depend on the working folder
        self.out = Path(os.path.abspath(out))
        self.options = options or WatchOptions()
        self.log = log
        self.done_dir = Path(os.path.abspath(self.options.done_dir or self.out / "processed"))
        self.error_dir = Path(os.path.abspath(self.options.error_dir or self.out / "errors"))
        self._check_folders()
        self.journal = Journal(self.out)
        self.state = self.journal.load_state()
        self.tracker = SettleTracker(self.options.settle)
        self.summary = WatchSummary()
        self._links: set[Path] = set()  # symbolic links already reported
        self._seen: set[tuple[str, int, int]] = set()
        if self.options.keep:
            for rec in self.journal.records():
                self._seen.add(_seen_key(rec.get("source"), rec.get("source_size"), rec.get("source_mtime_ns")))

    # -- set-up -------------------------------------------------------------------------------

    def _check_folders(self) -> None:
        opts = self.options
        if not math.isfinite(opts.settle) or opts.settle < 0:
            raise ConfigError(f"settle must be a number of seconds >= 0, got {opts.settle}")
        if not math.isfinite(opts.poll) or opts.poll <= 0:
            raise ConfigError(f"poll must be a number of seconds > 0, got {opts.poll}")
        if not self.inbox.is_dir():
            raise ConfigError(f"inbox {self.inbox}: no such folder")
        imageio.check_not_input(self.out, [self.inbox], "--out", folder=True)
        imageio.check_writable(self.out, "--out", folder=True)
        inbox = os.path.realpath(self.inbox)
        for what, folder in (("--done", self.done_dir), ("--errors", self.error_dir)):
            if opts.keep:  # nothing is moved
                break
            real = os.path.realpath(folder)
            if real == inbox or (opts.recursive and Path(real).is_relative_to(inbox)):
                raise ConfigError(
                    f"{what} {folder} lies in the watched inbox {self.inbox}: its files would be scored again"
                )
            imageio.check_writable(folder, what, folder=True)

    def close(self) -> None:
        self.journal.close()

    def __enter__(self) -> HotFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the loop -----------------------------------------------------------------------------

    def run(self, once: bool = False, stop: threading.Event | None = None) -> WatchSummary:
        """Recover, then poll until ``stop`` is set (or, with ``once``, until no file is left to score).

        Raises:
            InboxGone: the inbox folder disappeared (after the files already taken were recorded and moved).
        """
        stop = stop or threading.Event()
        settle = f"settle {self.options.settle:g} s" if self.options.settle else "files scored at first sight"
        where = "left in the inbox" if self.options.keep else f"moved to {self.done_dir} (errors: {self.error_dir})"
        self.log(f"watching {self.inbox} -> {self.out} ({settle}; processed files {where})")
        gone = False
        with _stop_on_signals(stop, self.log):
            self.recover()
            while not stop.is_set():
                if not os.path.isdir(self.inbox):
                    gone = True
                    self.log(
                        f"STOPPED    the inbox {self.inbox} is gone (deleted, renamed or unmounted): no file can "
                        "arrive; every file taken before is recorded. Start the watcher again once the inbox is back"
                    )
                    break
                handled, waiting = self.poll(stop)
                if once and not handled and not waiting:
                    break
                if not handled:
                    stop.wait(self.options.poll)
        s = self.summary
        self.log(f"stopped: {s.processed} files processed, {s.defective} defective, {s.errors} failed")
        if gone:
            raise InboxGone(f"the inbox {self.inbox} disappeared while it was watched (see the log above)", s)
        return s

    def poll(self, stop: threading.Event | None = None) -> tuple[int, int]:
        """One scan: process every settled file; returns (files processed, files still settling)."""
        if any(c.stage == CLAIMED for c in self.state.claims):  # a batch broke off with an exception
            self.recover()
        claimed = {c.source for c in self.state.claims}
        paths = [
            p
            for p in scan(self.inbox, self.options.recursive, [self.out, self.done_dir, self.error_dir], self._link)
            if str(p) not in claimed
        ]
        if self.options.keep:
            paths = [p for p in paths if not self._is_seen(p)]
        ready = self.tracker.update(paths)
        waiting = len(paths) - len(ready)
        handled = 0
        batch = max(1, self.scorer.batch_size)
        for start in range(0, len(ready), batch):
            if stop is not None and stop.is_set():
                break
            handled += self._process(ready[start : start + batch])
        return handled, waiting

    def _link(self, path: Path) -> None:
        """Say once per link that it is skipped (a link could lead anywhere: it is never followed)."""
        if path in self._links:
            return
        self._links.add(path)
        try:
            target = printable(os.readlink(path))
        except OSError:
            target = "?"
        self.log(
            f"SKIPPED    {self._show(str(path))}: a symbolic link (to {target}); links are never followed, "
            "copy or move the file itself into the inbox"
        )

    def _is_seen(self, path: Path) -> bool:
        sig = signature(path)
        return sig is not None and _seen_key(str(path), sig.size, sig.mtime_ns) in self._seen

    # -- one batch ----------------------------------------------------------------------------

    def _process(self, files: list[tuple[Path, Signature]]) -> int:
        claims = self._claim(files)
        self._checkpoint("claimed")
        recorded = self._score_and_record(claims)
        self._finish(recorded)
        return len(recorded)

    def _claim(self, files: list[tuple[Path, Signature]]) -> list[Claim]:
        taken = {c.name for c in self.state.claims}
        claims = []
        for path, sig in files:
            name = self._free_name(self._relative(path).with_suffix("").as_posix(), taken)
            taken.add(name)
            claims.append(Claim(uuid.uuid4().hex, str(path), sig.size, sig.mtime_ns, name))
        self.state.claims.extend(claims)
        self.state.jsonl_offset, self.state.csv_offset = self.journal.sizes()
        self.journal.save_state(self.state)
        return claims

    def _free_name(self, name: str, taken: set[str]) -> str:
        """``name`` or ``name__2``, ``__3`` ...: no output file of it exists yet and no open claim uses it."""
        unique, n = name, 1
        while unique in taken or any(
            f.exists() for f in output_files(self.out, unique, self.options.raw_maps).values()
        ):
            n += 1
            unique = f"{name}__{n}"
        return unique

    def _score_and_record(self, claims: list[Claim], alone: bool = False) -> list[Claim]:
        """Score the claimed files, write their outputs and rows; returns the claims now recorded.

        ``alone`` (one claim, after a restart): its try is counted in the state file before and after
        scoring, and a file already tried :data:`MAX_SCORING_ATTEMPTS` times gets an error row instead.
        """
        if not claims:
            return []
        rows = [self._score_alone(claims[0])] if alone else self._score(claims)
        self._checkpoint("scored")
        records: list[dict[str, Any]] = []
        recorded: list[Claim] = []
        dropped: list[Claim] = []
        taken = {Path(c.dest) for c in self.state.claims if c.dest is not None}
        for claim, row in zip(claims, rows):
            now = signature(Path(claim.source))
            if now is None or (now.size, now.mtime_ns) != (claim.size, claim.mtime_ns):
                if now is None:
                    self.log(f"GONE       {self._show(claim.source)}: removed from the inbox before it was scored")
                else:
                    self.log(f"WAIT       {self._show(claim.source)}: changed while scored; waiting until it settles")
                    self.tracker.forget(Path(claim.source))
                for f in row.outputs.values():  # the outputs of a version that is not the final one
                    Path(f).unlink(missing_ok=True)
                dropped.append(claim)
                continue
            claim.dest = self._destination(claim, row, taken)
            if claim.dest is not None:
                taken.add(Path(claim.dest))
            records.append(self._record(claim, row))
            recorded.append(claim)
        self._checkpoint("outputs written")
        self.journal.append_jsonl(records)
        self._checkpoint("jsonl appended")
        self.journal.append_csv(records)
        self._checkpoint("csv appended")
        for claim in recorded:
            claim.stage = RECORDED
        self.state.claims = [c for c in self.state.claims if c not in dropped]
        self.journal.save_state(self.state)
        for claim, rec in zip(recorded, records):
            self._count(claim, rec)
        return recorded

    def _score(self, claims: list[Claim]) -> list[ImagePrediction]:
        """Rows of the claimed files, their image outputs written (:func:`anomnet.predict.outputs.score_and_write`).

        A file that makes the model itself fail gets an error row and the others go on (a file that
        crashed the watcher would otherwise crash it again at every restart).
        """
        items = [InputImage(c.source, c.name) for c in claims]
        try:
            return score_and_write(self.scorer, items, self.out, self.options.raw_maps)
        except Exception:  # noqa: BLE001 - one bad file must not stop the line: find it
            return [self._score_one(item) for item in items]

    def _score_alone(self, claim: Claim) -> ImagePrediction:
        if claim.attempts >= MAX_SCORING_ATTEMPTS:
            return ImagePrediction(
                claim.source,
                error=f"not scored: the watcher died (killed, out of memory or crashed) while scoring this file, "
                f"{claim.attempts} times; it is not tried again",
            )
        claim.attempts += 1
        self.journal.save_state(self.state)
        row = self._score([claim])[0]
        claim.attempts = 0  # it returned: whatever stops the watcher now is not this file's doing
        self.journal.save_state(self.state)
        return row

    def _score_one(self, item: InputImage) -> ImagePrediction:
        try:
            return score_and_write(self.scorer, [item], self.out, self.options.raw_maps)[0]
        except Exception as exc:  # noqa: BLE001 - see _score
            return ImagePrediction(str(item.path), error=f"could not be scored: {type(exc).__name__}: {exc}")

    def _destination(self, claim: Claim, row: ImagePrediction, taken: set[Path]) -> str | None:
        if self.options.keep:
            return None
        folder = self.error_dir if math.isnan(row.score) else self.done_dir
        return str(free_path(folder / self._relative(Path(claim.source)), taken))

    def _record(self, claim: Claim, row: ImagePrediction) -> dict[str, Any]:
        rec = row.record()
        rec["path"] = claim.dest or claim.source
        rec.update(
            source=claim.source,
            time=datetime.now().astimezone().isoformat(timespec="seconds"),
            id=claim.id,
            source_size=claim.size,
            source_mtime_ns=claim.mtime_ns,
        )
        return rec

    def _count(self, claim: Claim, rec: dict[str, Any]) -> None:
        s = self.summary
        s.processed += 1
        src = self._show(claim.source)
        to = f" -> {self._show(claim.dest)}" if claim.dest else ""
        if rec["score"] is None:
            s.errors += 1
            self.log(f"ERROR      {src}: {rec['error']}{to}")
            return
        if rec["error"]:
            s.errors += 1
        decision = "DEFECTIVE" if rec["defective"] else "good"
        s.defective += bool(rec["defective"])
        found = f" ({rec['regions']} regions, {rec['defect_pixels']} px)" if rec["defective"] else ""
        note = f"  error: {rec['error']}" if rec["error"] else ""
        self.log(f"{decision:<10} {src}  score {rec['score']:.4g}  p {rec['p_value']:.3g}{found}{to}{note}")

    def _finish(self, claims: list[Claim]) -> None:
        """Move recorded files to their destination, then drop their claims."""
        finished: list[Claim] = []
        folders: set[Path] = set()
        for claim in claims:
            if claim.dest is None:
                finished.append(claim)
                if self.options.keep:
                    self._seen.add(_seen_key(claim.source, claim.size, claim.mtime_ns))
                continue
            src, dst = Path(claim.source), Path(claim.dest)
            now = signature(src)
            if now is not None and (now.size, now.mtime_ns) != (claim.size, claim.mtime_ns):
                # the inbox name holds a newer file: ours was moved before a restart; the new one is scanned
                finished.append(claim)
                continue
            try:
                result = finish_move(src, dst)
                if result is MoveResult.TAKEN:  # only when something else wrote there meanwhile
                    moved_to = free_path(dst)
                    finish_move(src, moved_to)
                    self.log(
                        f"NOTE       {dst} was taken by another file: {self._show(claim.source)} went to {moved_to}"
                    )
                elif result is MoveResult.VANISHED:
                    self.log(f"NOTE       {self._show(claim.source)} was removed before it could be moved")
            except OSError as exc:
                self.log(f"MOVE FAILED {self._show(claim.source)} -> {dst}: {exc}; retried at the next start")
                continue
            folders.update((src.parent, dst.parent))
            finished.append(claim)
            self._checkpoint("moved")
        for folder in folders:
            fsync_folder(folder)
        if finished:
            self.state.claims = [c for c in self.state.claims if c not in finished]
            self.journal.save_state(self.state)

    # -- restart ------------------------------------------------------------------------------

    def recover(self) -> None:
        """Finish the claims a killed run left: record the unrecorded (scoring them again), move the recorded."""
        if not self.state.claims:
            return
        claimed = [c for c in self.state.claims if c.stage == CLAIMED]
        if claimed:
            rows = self.journal.recover(self.state)
            for claim in claimed:
                rec = rows.get(claim.id)
                if rec is not None:
                    claim.stage = RECORDED
                    claim.dest = None if self.options.keep else rec.get("path")
            self.state.jsonl_offset, self.state.csv_offset = self.journal.sizes()
            self.journal.save_state(self.state)
        again = sum(c.stage == CLAIMED for c in self.state.claims)
        self.log(
            f"resuming: {len(self.state.claims)} files the last run did not finish "
            f"({again} to score again, {len(self.state.claims) - again} already recorded, to move)"
        )
        for claim in [c for c in self.state.claims if c.stage == CLAIMED]:  # alone: a file that kills is found
            self._score_and_record([claim], alone=True)
        self._finish([c for c in self.state.claims if c.stage == RECORDED])

    # -- helpers ------------------------------------------------------------------------------

    def _checkpoint(self, step: str) -> None:
        """A named point between two durable steps (tests make it raise to simulate a kill there)."""

    def _relative(self, path: Path) -> Path:
        try:
            return path.relative_to(self.inbox)
        except ValueError:
            return Path(path.name)

    def _show(self, path: str | None) -> str:
        """A path as the log shows it: relative to the inbox or the output folder, escaped where not text."""
        if path is None:
            return "-"
        p = Path(path)
        for base in (self.inbox, self.out):
            if p.is_relative_to(base):
                rel = p.relative_to(base).as_posix()
                return printable(rel if base == self.inbox else f"{self.out.name}/{rel}")
        return printable(str(p))


def _seen_key(source: Any, size: Any, mtime_ns: Any) -> tuple[str, int, int]:
    return (str(source), int(size or 0), int(mtime_ns or 0))


@contextmanager
def _stop_on_signals(stop: threading.Event, log: Log) -> Iterator[None]:
    """SIGINT / SIGTERM ask the loop to stop after the current batch; a second one stops at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous: dict[signal.Signals, Any] = {}

    def handler(signum: int, frame: FrameType | None) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        log(f"{signal.Signals(signum).name}: stopping after the current batch (again to stop at once)")

    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def watch(
    model: str | Path | Scorer,
    inbox: str | Path,
    out: str | Path,
    options: WatchOptions | None = None,
    once: bool = False,
    log: Log = print_log,
    stop: threading.Event | None = None,
) -> WatchSummary:
    """Watch ``inbox`` with a fitted or exported model folder (or a scorer) until stopped; see :class:`HotFolder`."""
    with HotFolder(load_scorer(model), inbox, out, options, log) as folder:
        return folder.run(once=once, stop=stop)
