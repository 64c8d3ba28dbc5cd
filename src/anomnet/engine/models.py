"""The models of a batch run: which model scores each input (:mod:`anomnet.predict.inputs` lists the inputs).

``--model-dir DIR`` (every image), ``--model NAME=DIR`` (images of product NAME) and ``--model-root ROOT``
(one model per subfolder, named after it: the layout ``anomnet fit-many`` writes); a product without a
model is refused before any work.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from anomnet.errors import ConfigError, ModelFormatError
from anomnet.predict.inputs import InputImage
from anomnet.predict.scoring import EXPORT_MANIFEST, MODEL_META


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
                models[sub.name] = os.path.abspath(sub)
        if not models:
            raise ModelFormatError(
                f"--model-root {root_dir}: no model folder inside (each product's model is a subfolder, "
                "as 'anomnet fit-many' writes them)"
            )
    for item in named:
        name, sep, folder = item.partition("=")
        if not sep or not name.strip() or not folder.strip():
            raise ConfigError(f"--model expects NAME=DIR (the product name and its model folder), got {item!r}")
        models[name.strip()] = os.path.abspath(folder.strip())
    if model_dir is not None:
        models[None] = os.path.abspath(model_dir)
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


def check_products(refs: Sequence[InputImage], models: Mapping[str | None, object]) -> None:
    """Refuse, before any work, inputs whose product has no model."""
    missing = sorted({str(r.product) for r in refs if model_for(models, r.product) is None})
    if missing:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise ConfigError(
            f"no model for product(s) {shown}: add --model NAME=DIR for each, or --model-dir DIR for the rest"
        )
