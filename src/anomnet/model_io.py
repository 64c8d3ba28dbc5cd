"""Model folders on disk: settings in JSON, tensors in safetensors, never pickle.

Opening a model folder cannot run code. A folder written by another format version is
refused with a message that says which version it has and which this anomnet reads.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from anomnet import __version__
from anomnet.errors import ModelFormatError

FORMAT_NAME = "anomnet-model"
FORMAT_VERSION = 1
META_FILE = "anomnet.json"
TENSOR_FILE = "weights.safetensors"


def write_model(directory: str | Path, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    """Write ``meta`` and ``tensors`` into ``directory`` atomically (files are replaced whole)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    header = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "anomnet_version": __version__, **meta}
    contiguous = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    _atomic(directory / TENSOR_FILE, lambda p: save_file(contiguous, str(p)))
    _atomic(directory / META_FILE, lambda p: Path(p).write_text(json.dumps(header, indent=2, sort_keys=True)))
    return directory


def read_model(directory: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read a model folder written by :func:`write_model`; :class:`ModelFormatError` on any problem."""
    directory = Path(directory)
    meta_path = directory / META_FILE
    if not directory.is_dir():
        raise ModelFormatError(f"{directory}: no such model folder")
    if not meta_path.is_file():
        raise ModelFormatError(f"{directory}: not an anomnet model folder ({META_FILE} is missing)")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFormatError(f"{meta_path}: unreadable model settings ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise ModelFormatError(f"{meta_path}: not an anomnet model file")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise ModelFormatError(
            f"{directory}: model format version {version} (written by anomnet {meta.get('anomnet_version', '?')}); "
            f"this anomnet {__version__} reads format version {FORMAT_VERSION}. Re-train the model with this version."
        )
    tensor_path = directory / TENSOR_FILE
    if not tensor_path.is_file():
        raise ModelFormatError(f"{tensor_path}: missing (the model folder is incomplete)")
    try:
        tensors = load_file(str(tensor_path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ModelFormatError(f"{tensor_path}: damaged tensor file ({exc})") from None
    return meta, tensors


def _atomic(target: Path, write: Any) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
