"""The images a run scores, each with an output name no other input of the run has (the name its output
files take).

An input item is one of:

- a folder: its images, searched recursively (output names keep the path below the folder);
- ``-``: paths on standard input, one per line;
- anything else: one image file (a missing or unreadable one becomes an error row).

The batch engine (``predict --engine ray``, ``batch=True``) also takes:

- a glob such as ``'/data/line3/**/*.png'`` (quoted, so the engine expands it, not the shell): the image
  files it matches, sorted (names keep the path below the glob's fixed leading folder);
- a manifest, ``*.csv`` or ``*.parquet``, with a ``path`` column (relative paths are relative to the
  manifest's folder) and an optional ``product`` column that picks the model of each image (names keep
  the path below the folder all the manifest's images share);

and there each image is scored once per product (the same file listed twice is one input) and paths are
made absolute, so workers on other machines (or with another working folder) find the same files on the
shared storage. ``predict`` keeps paths as given and scores a file listed twice twice.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from anomnet import imageio
from anomnet.errors import ConfigError
from anomnet.install import install_command

MANIFEST_SUFFIXES = (".csv", ".parquet")
PATH_COLUMN, PRODUCT_COLUMN = "path", "product"
_MAGIC = re.compile(r"[*?[]")


@dataclass(frozen=True)
class InputImage:
    """One image of a run: its path, its unique output name (no extension, may contain '/') and its product."""

    path: str
    name: str
    product: str | None = None

    @property
    def key(self) -> tuple[str | None, str]:
        """What makes an input one input: its product and its file."""
        return (self.product, self.path)


def collect_inputs(items: Iterable[str | Path], stdin: TextIO | None = None, batch: bool = False) -> list[InputImage]:
    """Every input named by ``items``, in the given order; ``batch``: the batch engine's inputs (see above)."""
    found: list[tuple[str, str, str | None]] = []  # (path, wanted name, product)
    where = _absolute if batch else str
    for item in items:
        text = str(item)
        path = Path(text)
        if text == "-":
            for line in stdin or sys.stdin:
                if line.strip():
                    found.append((where(Path(line.strip())), Path(line.strip()).stem, None))
        elif path.is_dir():
            for f in imageio.list_images(path, recursive=True):
                found.append((where(f), f.relative_to(path).with_suffix("").as_posix(), None))
        elif batch and path.suffix.lower() in MANIFEST_SUFFIXES and path.is_file():
            found.extend(_manifest_inputs(path))
        elif batch and _MAGIC.search(text) and not path.exists():
            found.extend(_glob_inputs(text))
        else:
            found.append((where(path), path.stem, None))
    if batch:  # each (product, file) once, named by its first listing
        first: dict[tuple[str | None, str], tuple[str, str, str | None]] = {}
        for entry in found:
            first.setdefault((entry[2], entry[0]), entry)
        found = list(first.values())
    named = unique_names([(p, name) for p, name, _ in found])
    return [InputImage(i.path, i.name, product) for i, (_, _, product) in zip(named, found)]


def unique_names(found: Sequence[tuple[str | Path, str]]) -> list[InputImage]:
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
        out.append(InputImage(str(path), unique))
    return out


def _absolute(path: str | Path) -> str:
    return os.path.abspath(os.fspath(path))  # not realpath: a link is the input the user named


def _glob_inputs(pattern: str) -> list[tuple[str, str, None]]:
    import glob

    parts = Path(pattern).parts
    fixed = next(i for i, part in enumerate(parts) if _MAGIC.search(part))
    base = Path(*parts[:fixed]) if fixed else Path(".")
    matches = sorted(
        Path(m) for m in glob.glob(pattern, recursive=True) if Path(m).suffix.lower() in imageio.IMAGE_EXTENSIONS
    )
    files = [m for m in matches if m.is_file()]
    if not files:
        raise ConfigError(f"{pattern}: no image file matches this pattern")
    return [(_absolute(f), f.relative_to(base).with_suffix("").as_posix(), None) for f in files]


def read_manifest(path: str | Path) -> list[tuple[str, str | None]]:
    """``(path, product)`` of each row of a CSV or Parquet manifest; relative paths against its folder."""
    manifest = Path(path)
    try:
        import pyarrow as pa
        import pyarrow.csv as pacsv
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(
            f"{manifest}: reading a manifest needs pyarrow (install the extra: {install_command('ray')})"
        ) from None
    try:
        if manifest.suffix.lower() == ".csv":
            types = {PATH_COLUMN: pa.string(), PRODUCT_COLUMN: pa.string()}
            table = pacsv.read_csv(manifest, convert_options=pacsv.ConvertOptions(column_types=types))
        else:
            table = pq.read_table(manifest)
    except (OSError, pa.ArrowException) as exc:
        raise ConfigError(f"{manifest}: not a readable {manifest.suffix[1:].upper()} manifest ({exc})") from None
    if PATH_COLUMN not in table.column_names:
        raise ConfigError(
            f"{manifest}: a manifest needs a '{PATH_COLUMN}' column (and optionally '{PRODUCT_COLUMN}'); "
            f"found: {', '.join(table.column_names) or 'no columns'}"
        )
    paths = table.column(PATH_COLUMN).to_pylist()
    products = table.column(PRODUCT_COLUMN).to_pylist() if PRODUCT_COLUMN in table.column_names else [None] * len(paths)
    rows: list[tuple[str, str | None]] = []
    for i, (p, product) in enumerate(zip(paths, products)):
        if p is None or not str(p).strip():
            raise ConfigError(f"{manifest}: row {i + 1} has no path")
        product = None if product is None or not str(product).strip() else str(product).strip()
        rows.append((os.path.join(manifest.parent, str(p).strip()), product))
    return rows


def _manifest_inputs(manifest: Path) -> list[tuple[str, str, str | None]]:
    rows = [(_absolute(p), product) for p, product in read_manifest(manifest)]
    if not rows:
        return []
    base = Path(os.path.commonpath([os.path.dirname(p) for p, _ in rows]))
    return [(p, Path(p).relative_to(base).with_suffix("").as_posix(), product) for p, product in rows]
