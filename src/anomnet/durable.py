"""Durable writes: files replaced atomically, the fsync helpers, and folders replaced whole without losing the
user's files.

:func:`write_file` writes one file: the data goes to a temporary file in the target folder, is flushed to
disk and then replaces the file in one step, so an error or a kill never leaves a half-written file.
Every file anomnet writes gets :func:`file_mode` (0666 minus the umask).

:func:`write_folder` writes a model folder or an exported folder. The new files go into a staging
folder beside the target (``.NAME.*.staging``) and are flushed to disk; the entries of the target
that its kind does not own (the user's notes, a ``preds/`` folder: whatever ``owned`` does not
name) are moved into the staging folder; then the staging folder and the target swap places in
one atomic step (``renameat2(RENAME_EXCHANGE)`` on Linux; elsewhere two renames) and the old
files are removed. A file of the user's whose name the new folder needs is refused, never
replaced.

A kill at any point leaves the target holding the old files or the new ones, never a mix (with
two renames there is one instant without a target; the next write puts the old folder back). A
kill during the moves leaves some of the user's entries in the staging folder; a hidden mark file
in it (:data:`MARK`) lists them, and the next :func:`write_folder` to the same target puts them
back (:func:`recover`). Nothing of the user's is ever removed: an entry that cannot be put back
stays where it is, with a warning.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable, Collection
from contextlib import suppress
from functools import cache
from pathlib import Path
from typing import Any

from anomnet.errors import ConfigError

MARK = ".anomnet-swap"
"""The hidden file that marks a folder of an unfinished swap and says what it holds."""
_SUFFIX = ".staging"

Owned = Callable[[Path], Collection[str]]
"""The names of the entries that a folder's kind owns in a given folder (an empty collection: none)."""


def write_file(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file, flushed, + ``os.replace``); parent folders are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, file_mode())  # mkstemp's 0600 would make shared outputs unreadable to others
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp_name)
        raise


def _umask() -> int:
    """The process umask (read once: reading it means setting it, which is not thread-safe)."""
    global _UMASK
    if _UMASK is None:
        _UMASK = os.umask(0o022)
        os.umask(_UMASK)
    return _UMASK


_UMASK: int | None = None


def file_mode() -> int:
    """Permissions of every file anomnet writes (outputs and model files alike): 0666 minus the umask."""
    return 0o666 & ~_umask()


def folder_mode() -> int:
    """Permissions of the folders anomnet creates itself with mkdtemp: 0777 minus the umask."""
    return 0o777 & ~_umask()


def fsync_file(path: str | Path) -> None:
    """Flush a file's data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_folder(folder: str | Path) -> None:
    """Make the renames, links and new files in ``folder`` durable (a no-op where folders cannot be opened)."""
    with suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_folder(target: str | Path, fill: Callable[[Path], None], owned: Owned, what: str) -> Path:
    """Write the folder ``target`` whole: ``fill`` writes the new files into an empty folder (see module doc).

    ``owned(folder)`` names the entries of ``folder`` that belong to the kind of folder being
    written (``what``, e.g. "model folder"): those are replaced, every other entry of an
    existing target is kept.
    """
    target = Path(target)
    if target.is_symlink():  # a link to the folder: the folder it names is written, the link stays
        target = Path(os.path.realpath(target))
    if target.exists() and not target.is_dir():
        raise ConfigError(f"{target}: is a file, not a {what}")
    target.parent.mkdir(parents=True, exist_ok=True)
    recover(target, owned)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=_SUFFIX, dir=target.parent))
    marks: list[int] = []
    try:
        os.chmod(staging, folder_mode())  # mkdtemp's 0700 would hide the folder from the team
        marks.append(_mark(staging, {"target": target.name, "role": "new", "carry": []}))
        fill(staging)
        _flush(staging)
        _swap(staging, target, owned, what, marks)
    except BaseException:
        _release(marks)
        recover(target, owned)  # what the swap had done is undone: the old folder, the user's entries back
        raise
    _release(marks)
    return target


def recover(target: str | Path, owned: Owned) -> None:
    """Finish what an interrupted :func:`write_folder` to ``target`` left beside it (see module doc)."""
    target = Path(target)
    if not target.parent.is_dir():
        return
    found: list[tuple[Path, dict[str, Any], int]] = []
    prefix = f".{target.name}."
    for entry in target.parent.iterdir():
        if entry.name.startswith(prefix) and entry.name.endswith(_SUFFIX) and entry.is_dir():
            claimed = _claim(entry, target.name)
            if claimed is not None:
                found.append((entry, *claimed))
    try:
        if not os.path.lexists(target):  # killed between the two renames of the fallback: the old one goes back
            old = [folder for folder, record, _ in found if record.get("role") == "old"]
            if old:
                _try(_restore, old[0], target)
        for folder, record, _ in found:
            if folder.exists():
                _try(_settle, folder, record, target, owned)
        own = _claim(target, target.name) if target.is_dir() else None
        if own is not None:  # a mark left in the target itself by an interrupted swap: of no further use
            _unmark(target)
            found.append((target, *own))
    finally:
        _release([fd for _, _, fd in found])


def _restore(old: Path, target: Path) -> None:
    os.replace(old, target)
    fsync_folder(target.parent)
    _unmark(target)


def _try(step: Callable[..., object], folder: Path, *args: Any) -> None:
    try:
        step(folder, *args)
    except OSError as exc:
        warnings.warn(
            f"{folder}: left by an interrupted write, cannot be cleared ({exc.strerror or exc}); nothing was removed",
            stacklevel=4,
        )


def _swap(staging: Path, target: Path, owned: Owned, what: str, marks: list[int]) -> None:
    if not target.exists():
        os.replace(staging, target)
        fsync_folder(target.parent)
        _unmark(target)
        return
    mine = {*owned(target), MARK}
    theirs = sorted(entry.name for entry in target.iterdir() if entry.name not in mine)
    clash = [name for name in theirs if os.path.lexists(staging / name)]
    if clash:
        raise ConfigError(
            f"{target / clash[0]} is not part of a {what} (anomnet did not write it) and the new {what} has a "
            "file of that name: anomnet replaces only its own files; move it away or choose another folder"
        )
    _write_mark(marks[0], {"target": target.name, "role": "new", "carry": theirs})  # what a next write puts back
    marks.append(_mark(target, {"target": target.name, "role": "old"}))
    for name in theirs:
        os.replace(target / name, staging / name)
    fsync_folder(staging)
    if _exchange(staging, target):
        old = staging
    else:
        old = staging.with_name(staging.name[: -len(_SUFFIX)] + "-old" + _SUFFIX)
        os.replace(target, old)
        os.replace(staging, target)
    fsync_folder(target.parent)
    _unmark(target)
    _settle(old, {"role": "old"}, target, owned)


def _settle(folder: Path, record: dict[str, Any], target: Path, owned: Owned) -> None:
    """Put the user's entries in a left-over ``folder`` back into ``target``, then remove the folder if nothing is left.

    A staging folder (role ``new``) lists the entries it took in its mark; in an old folder
    (role ``old``) every entry its kind does not own is the user's.
    """
    if record.get("role") == "new":
        carry = record.get("carry")
        theirs = (
            [n for n in carry if isinstance(n, str) and os.path.lexists(folder / n)] if isinstance(carry, list) else []
        )
    else:
        mine = {*owned(folder), MARK}
        theirs = [entry.name for entry in folder.iterdir() if entry.name not in mine]
    kept = []
    for name in theirs:
        if "/" in name or name in ("", ".", "..") or not target.is_dir() or os.path.lexists(target / name):
            kept.append(name)
        else:
            os.replace(folder / name, target / name)
    if kept:
        warnings.warn(
            f"{folder}: holds {', '.join(kept)}, left there by an interrupted write of {target}; they cannot be put "
            "back (the names are taken) and are kept there",
            stacklevel=3,
        )
        return
    fsync_folder(target)
    shutil.rmtree(folder)


def _flush(folder: Path) -> None:
    """Every file below ``folder`` gets the files' permissions and goes to disk, then the folders' entries."""
    for root, _, names in os.walk(folder):
        for name in names:
            path = Path(root) / name
            if name != MARK:
                os.chmod(path, file_mode())
                fsync_file(path)
        fsync_folder(root)


# -- the mark file -------------------------------------------------------------------------------


def _mark(folder: Path, record: dict[str, Any]) -> int:
    """Create ``folder``'s mark holding ``record``; the descriptor returned holds a lock until released."""
    fd = os.open(folder / MARK, os.O_RDWR | os.O_CREAT, file_mode())
    _lock(fd, blocking=True)
    _write_mark(fd, record)
    return fd


def _write_mark(fd: int, record: dict[str, Any]) -> None:
    data = json.dumps(record).encode("utf-8", errors="surrogateescape")
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, data)
    os.fsync(fd)


def _claim(folder: Path, target_name: str) -> tuple[dict[str, Any], int] | None:
    """The record of a folder of an unfinished swap to ``target_name`` and a descriptor locking it.

    None when ``folder`` has no mark, a mark of another target, or one that a running write holds.
    """
    try:
        fd = os.open(folder / MARK, os.O_RDWR)
    except OSError:
        return None
    if not _lock(fd, blocking=False):
        os.close(fd)
        return None
    try:
        record = json.loads(os.read(fd, 1 << 20).decode("utf-8", errors="surrogateescape"))
    except (OSError, ValueError):
        record = None
    if not isinstance(record, dict) or record.get("target") != target_name:
        os.close(fd)
        return None
    return record, fd


def _unmark(folder: Path) -> None:
    with suppress(FileNotFoundError):
        os.unlink(folder / MARK)


def _release(fds: list[int]) -> None:
    while fds:
        with suppress(OSError):
            os.close(fds.pop())


def _lock(fd: int, blocking: bool) -> bool:
    try:
        import fcntl
    except ImportError:  # no advisory locks on this system: a concurrent write is not detected
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    return True


# -- swapping two folders in one step ------------------------------------------------------------

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_UNSUPPORTED = {errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM}


@cache
def _renameat2() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a C library without renameat2 (glibc before 2.28)
        return None


def _exchange(a: Path, b: Path) -> bool:
    """Swap the folders ``a`` and ``b`` in one atomic step; False where the system cannot (nothing done then)."""
    call = _renameat2()
    if call is None:
        return False
    if call(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in _UNSUPPORTED:
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))
