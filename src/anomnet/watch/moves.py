"""Moving a processed file out of the inbox without ever replacing a file already at the destination.

:func:`move_no_clobber` links the file under its new name (``link`` fails when the name is taken,
so nothing is ever replaced) and then removes the inbox name; across file systems it copies to a
temporary name, syncs it to disk and links that into place. A kill between the two steps leaves
the same file under both names; :func:`finish_move` (run again after a restart) sees that and
only removes the inbox name, so a move is safe to repeat at any point.
"""

from __future__ import annotations

import errno
import filecmp
import os
import shutil
import tempfile
from collections.abc import Iterable
from contextlib import suppress
from enum import Enum
from pathlib import Path

from anomnet.durable import fsync_file

_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS}


class MoveResult(Enum):
    MOVED = "moved"
    ALREADY = "already moved"
    VANISHED = "gone from both places"
    TAKEN = "destination taken by another file"


def free_path(path: Path, taken: Iterable[Path] = ()) -> Path:
    """``path`` itself, or the first ``<stem>__2<suffix>``, ``__3``, ... that exists nowhere and is not ``taken``."""
    reserved = set(taken)
    candidate, n = path, 1
    while os.path.lexists(candidate) or candidate in reserved:
        n += 1
        candidate = path.with_name(f"{path.stem}__{n}{path.suffix}")
    return candidate


def move_no_clobber(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst``; FileExistsError when ``dst`` exists (it is never replaced)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst, follow_symlinks=False)
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno == errno.EXDEV:
            _copy_no_clobber(src, dst)
        elif exc.errno in _NO_HARD_LINKS:  # a file system without hard links: check, then rename
            if os.path.lexists(dst):
                raise FileExistsError(errno.EEXIST, "file exists", str(dst)) from None
            os.rename(src, dst)
            return
        else:
            raise
    os.unlink(src)


def _copy_no_clobber(src: Path, dst: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    os.close(fd)
    try:
        shutil.copy2(src, tmp)  # the data and the times and permissions
        fsync_file(tmp)
        os.link(tmp, dst)
    finally:
        with suppress(OSError):
            os.unlink(tmp)


def finish_move(src: Path, dst: Path) -> MoveResult:
    """Bring a move that may have been interrupted to its end: the file at ``dst``, none at ``src``."""
    src_there, dst_there = os.path.lexists(src), os.path.lexists(dst)
    if src_there and not dst_there:
        move_no_clobber(src, dst)
        return MoveResult.MOVED
    if not src_there:
        return MoveResult.ALREADY if dst_there else MoveResult.VANISHED
    if _same_file(src, dst):  # killed between link and unlink (or between copy and unlink)
        os.unlink(src)
        return MoveResult.ALREADY
    return MoveResult.TAKEN


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b) or filecmp.cmp(a, b, shallow=False)
    except OSError:
        return False
