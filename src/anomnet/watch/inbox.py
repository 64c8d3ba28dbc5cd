"""What the hot folder sees in its inbox: candidate image files, and when each one is completely written.

A camera station hands over an image in one of two ways: it writes the file under its final name
(possibly slowly, in chunks), or it writes under a temporary name and renames the finished file
into place. Temporary names (:func:`is_temporary`) are never candidates, so a renamed-in file is
seen only once it is complete. A file written in place is *settled* (ready to score) once its
size, modification time and inode have stayed the same for ``settle`` seconds of this process's
own clock (:class:`SettleTracker`); the file system's clock is never compared with ours, so a
network share with a skewed clock does not matter. ``settle=0`` trusts every file at first sight
(for stations that only ever rename finished files in).
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from anomnet.imageio import IMAGE_EXTENSIONS

TEMPORARY_SUFFIXES: tuple[str, ...] = (
    ".tmp",
    ".temp",
    ".part",
    ".partial",
    ".crdownload",
    ".download",
    ".filepart",
    ".swp",
    "~",
)
"""Name endings (compared case-insensitively) of files still being written; ignored until renamed."""


def is_temporary(name: str) -> bool:
    """True for names a writer uses while the file is incomplete: dot-files, ``~x``, ``x.tmp``, ``x.part`` ..."""
    lower = name.lower()
    return name.startswith((".", "~")) or lower.endswith(TEMPORARY_SUFFIXES)


def is_candidate(name: str) -> bool:
    """An image file name (by :data:`anomnet.imageio.IMAGE_EXTENSIONS`) that is not a temporary name."""
    return not is_temporary(name) and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


@dataclass(frozen=True)
class Signature:
    """What must stay the same while a file settles (a new file under the same name has another inode)."""

    size: int
    mtime_ns: int
    inode: int


def signature(path: Path) -> Signature | None:
    """The file's signature, or None when it is gone or is not a regular file."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    return Signature(st.st_size, st.st_mtime_ns, st.st_ino)


def scan(
    inbox: Path, recursive: bool, skip: Iterable[Path] = (), on_link: Callable[[Path], None] | None = None
) -> list[Path]:
    """Candidate files in ``inbox`` (regular files, sorted); hidden folders and ``skip`` folders are not entered.

    Symbolic links are never followed (one could lead anywhere on the machine): ``on_link`` is told of
    each link with a candidate's name (or, with ``recursive``, any link that is not hidden).
    """
    skipped = {os.path.realpath(p) for p in skip}
    return sorted(_walk(inbox, recursive, skipped, on_link))


def _walk(folder: Path, recursive: bool, skipped: set[str], on_link: Callable[[Path], None] | None) -> Iterator[Path]:
    try:
        entries = list(os.scandir(folder))
    except OSError:  # the folder vanished or cannot be read: nothing to see there now
        return
    for entry in entries:
        try:
            if entry.is_symlink():
                if on_link is not None and (is_candidate(entry.name) or (recursive and not is_temporary(entry.name))):
                    on_link(Path(entry.path))
            elif entry.is_file(follow_symlinks=False):
                if is_candidate(entry.name):
                    yield Path(entry.path)
            elif (
                recursive
                and entry.is_dir(follow_symlinks=False)
                and not entry.name.startswith(".")
                and os.path.realpath(entry.path) not in skipped
            ):
                yield from _walk(Path(entry.path), recursive, skipped, on_link)
        except OSError:
            continue


class SettleTracker:
    """Remembers each candidate's signature and since when it has been unchanged."""

    def __init__(self, settle: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.settle = settle
        self.clock = clock
        self._since: dict[Path, tuple[Signature, float]] = {}

    def update(self, paths: Iterable[Path]) -> list[tuple[Path, Signature]]:
        """Record the current signature of ``paths`` (this scan); return those settled, in the given order.

        Paths not in this scan are forgotten (moved away or deleted).
        """
        now = self.clock()
        ready: list[tuple[Path, Signature]] = []
        seen: dict[Path, tuple[Signature, float]] = {}
        for path in paths:
            sig = signature(path)
            if sig is None:
                continue
            previous = self._since.get(path)
            since = previous[1] if previous is not None and previous[0] == sig else now
            seen[path] = (sig, since)
            if now - since >= self.settle:
                ready.append((path, sig))
        self._since = seen
        return ready

    def forget(self, path: Path) -> None:
        """Start the wait for ``path`` over (it changed while it was being scored)."""
        self._since.pop(path, None)
