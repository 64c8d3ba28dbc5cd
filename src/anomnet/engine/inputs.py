"""The references of a batch run: which images to score, under which output name, with which model.

An input item is one of:

- a folder: its images, searched recursively (output names keep the path below the folder);
- a glob such as ``'/data/line3/**/*.png'`` (quoted, so the engine expands it, not the shell): the image
  files it matches, sorted (names keep the path below the glob's fixed leading folder);
- a manifest, ``*.csv`` or ``*.parquet``, with a ``path`` column (relative paths are relative to the
  manifest's folder) and an optional ``product`` column that picks the model of each image (names keep
  the path below the folder all the manifest's images share);
- ``-``: paths on standard input, one per line;
- anything else: one image file (a missing or unreadable one becomes an error row, as in ``predict``).

Each image is scored once per product: the same file listed twice is one input. Paths are made
absolute, so workers on other machines (or with another working folder) find the same files on the
shared storage. Models: ``--model-dir DIR`` (every image), ``--model NAME=DIR`` (images of product
NAME) and ``--model-root ROOT`` (one model per subfolder, named after it: the layout ``anomnet
fit-many`` writes); a product without a model is refused before any work.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from anomnet import imageio
from anomnet.errors import ConfigError, ModelFormatError
from anomnet.install import install_command
from anomnet.predict.inputs import unique_names
from anomnet.predict.scoring import EXPORT_MANIFEST, MODEL_META

MANIFEST_SUFFIXES = (".csv", ".parquet")
PATH_COLUMN, PRODUCT_COLUMN = "path", "product"
_MAGIC = re.compile(r"[*?[]")


@dataclass(frozen=True)
class InputRef:
    """One image of a batch run: its absolute path, its unique output name and its product (or None)."""

    path: str
    name: str
    product: str | None = None

    @property
    def key(self) -> tuple[str | None, str]:
        """What makes an input one input: its product and its file."""
        return (self.product, self.path)


def collect_inputs(items: Iterable[str | Path], stdin: TextIO | None = None) -> list[InputRef]:
    """Every input named by ``items`` (folders, globs, manifests, files, ``-``), each once, in the given order."""
    found: list[tuple[str, str, str | None]] = []  # (absolute path, wanted name, product)
    for item in items:
        text = str(item)
        path = Path(text)
        if text == "-":
            for line in stdin or sys.stdin:
                if line.strip():
                    found.append((_absolute(line.strip()), Path(line.strip()).stem, None))
        elif path.is_dir():
            for f in imageio.list_images(path, recursive=True):
                found.append((_absolute(f), f.relative_to(path).with_suffix("").as_posix(), None))
        elif path.suffix.lower() in MANIFEST_SUFFIXES and path.is_file():
            found.extend(_manifest_inputs(path))
        elif _MAGIC.search(text) and not path.exists():
            found.extend(_glob_inputs(text))
        else:
            found.append((_absolute(path), path.stem, None))
    seen: set[tuple[str | None, str]] = set()
    kept: list[tuple[str, str, str | None]] = []
    for abs_path, name, product in found:
        if (product, abs_path) not in seen:
            seen.add((product, abs_path))
            kept.append((abs_path, name, product))
    named = unique_names([(Path(p), name) for p, name, _ in kept])
    return [InputRef(p, n.name, product) for (p, _, product), n in zip(kept, named)]


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


# -- models ---------------------------------------------------------------------------------------


def resolve_models(
    model_dir: str | Path | None = None, named: Sequence[str] = (), root: str | Path | None = None
) -> dict[str | None, str]:
    """The model of each product (key None: the model of every image without its own), folders checked."""
    models: dict[str | None, str] = {}
    if root is not None:
        root_dir = Path(root)
        if not root_dir.is_dir():
            raise ModelFormatError(f"--model-root {root_dir}: no such folder")
        for sub in sorted(p for p in root_dir.iterdir() if p.is_dir()):
            if _is_model(sub):
                models[sub.name] = _absolute(sub)
        if not models:
            raise ModelFormatError(
                f"--model-root {root_dir}: no model folder inside (each product's model is a subfolder, "
                "as 'anomnet fit-many' writes them)"
            )
    for item in named:
        name, sep, folder = item.partition("=")
        if not sep or not name.strip() or not folder.strip():
            raise ConfigError(f"--model expects NAME=DIR (the product name and its model folder), got {item!r}")
        models[name.strip()] = _absolute(folder.strip())
    if model_dir is not None:
        models[None] = _absolute(model_dir)
    if not models:
        raise ConfigError("no model: give --model-dir DIR, --model NAME=DIR or --model-root DIR")
    for product, folder in models.items():
        if not _is_model(Path(folder)):
            what = "--model-dir" if product is None else f"--model {product}="
            raise ModelFormatError(
                f"{what}{folder}: not a model folder (neither a fitted model, {MODEL_META}, "
                f"nor an exported one, {EXPORT_MANIFEST})"
            )
    return models


def _is_model(folder: Path) -> bool:
    return (folder / MODEL_META).is_file() or (folder / EXPORT_MANIFEST).is_file()


def model_for(models: Mapping[str | None, object], product: str | None) -> object | None:
    """The model of ``product``: its own, else the model for every image, else None."""
    if product is not None and product in models:
        return models[product]
    return models.get(None)


def check_products(refs: Sequence[InputRef], models: Mapping[str | None, object]) -> None:
    """Refuse, before any work, inputs whose product has no model."""
    missing = sorted({str(r.product) for r in refs if model_for(models, r.product) is None})
    if missing:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise ConfigError(
            f"no model for product(s) {shown}: add --model NAME=DIR for each, or --model-dir DIR for the rest"
        )
