"""The images a run scores: files as given, folders searched recursively, paths from stdin; each
with an output name no other input of the run has (the name its output files take)."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from anomnet import imageio


@dataclass(frozen=True)
class InputImage:
    path: Path
    name: str  # output name without extension, may contain '/'


def expand_inputs(items: Iterable[str | Path], stdin: TextIO | None = None) -> list[InputImage]:
    """Files as given, folders searched recursively, ``-`` reads one path per line from ``stdin``."""
    found: list[tuple[Path, str]] = []

    def add(path: Path, name: str) -> None:
        found.append((path, name))

    for item in items:
        if str(item) == "-":
            for line in stdin or sys.stdin:
                line = line.strip()
                if line:
                    add(Path(line), Path(line).stem)
            continue
        p = Path(item)
        if p.is_dir():
            for f in imageio.list_images(p, recursive=True):
                add(f, f.relative_to(p).with_suffix("").as_posix())
        else:
            add(p, p.stem)
    return unique_names(found)


def unique_names(found: list[tuple[Path, str]]) -> list[InputImage]:
    """Give every input an output name no other input has (a suffix never equals a real name)."""
    wanted = {name for _, name in found}
    taken: set[str] = set()
    out: list[InputImage] = []
    for path, name in found:
        unique, n = name, 1
        while unique in taken or (unique != name and unique in wanted):
            n += 1
            unique = f"{name}__{n}"
        taken.add(unique)
        out.append(InputImage(path, unique))
    return out
