"""Model folders on disk: settings in JSON, tensors in safetensors, never pickle.

Opening a model folder cannot run code. A folder written by another format version is
refused with a message that says which version it has and which this anomnet reads.

A model folder is written whole: both files go into a temporary sibling folder that is then
renamed into place, so a kill mid-write leaves the old model or the new one, never a mix.
``anomnet.json`` holds the SHA-256 of the weights file, checked at load: weights copied over
from another model or damaged on disk are refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from anomnet import __version__
from anomnet.errors import ConfigError, ModelFormatError
from anomnet.io import file_mode, folder_mode

FORMAT_NAME = "anomnet-model"
FORMAT_VERSION = 1
META_FILE = "anomnet.json"
TENSOR_FILE = "weights.safetensors"


def write_model(directory: str | Path, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    """Write ``meta`` and ``tensors`` as the model folder ``directory``, replacing it whole (see module doc)."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"{directory}: is a file, not a model folder")
    directory.parent.mkdir(parents=True, exist_ok=True)
    contiguous = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    try:
        os.chmod(staging, folder_mode())  # mkdtemp's 0700 would hide the model from the team
        save_file(contiguous, str(staging / TENSOR_FILE))
        header = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "anomnet_version": __version__,
            **meta,
            "weights_sha256": _sha256(staging / TENSOR_FILE),
        }
        if "config" in meta:
            header["config_sha256"] = _config_hash(meta["config"])
        (staging / META_FILE).write_text(json.dumps(header, indent=2, sort_keys=True))
        for name in (TENSOR_FILE, META_FILE):
            os.chmod(staging / name, file_mode())
            _fsync(staging / name)  # on disk before the rename makes the folder the model
        _replace_folder(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def _replace_folder(staging: Path, directory: Path) -> None:
    """Move ``staging`` to ``directory``; an existing model there is moved aside first, then removed.

    Files in an existing folder that the model does not own (a metrics.json, heat maps) are
    carried over, so replacing a model never deletes the user's other files.
    """
    if not directory.exists():
        os.replace(staging, directory)
        return
    carried: list[str] = []
    aside = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old.", dir=directory.parent))
    try:
        for entry in sorted(directory.iterdir()):
            if entry.name not in (TENSOR_FILE, META_FILE) and not (staging / entry.name).exists():
                os.replace(entry, staging / entry.name)
                carried.append(entry.name)
        os.replace(directory, aside / directory.name)
        os.replace(staging, directory)
    except BaseException:
        # Interrupted before the new model was in place: the old one and the user's files go back.
        if (aside / directory.name).exists() and not directory.exists():
            os.replace(aside / directory.name, directory)
        for name in reversed(carried):
            os.replace(staging / name, directory / name)
        shutil.rmtree(aside, ignore_errors=True)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _config_hash(config: Any) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def model_files(directory: str | Path) -> list[Path]:
    """The files a model folder owns (outputs must never be written over them)."""
    return [Path(directory) / META_FILE, Path(directory) / TENSOR_FILE]


def check_model_target(directory: str | Path, overwrite: bool) -> None:
    """Before a fit: ``directory`` must be writable and, unless ``overwrite``, hold no model yet."""
    from anomnet.io import check_writable

    directory = Path(directory)
    if (directory / META_FILE).exists() and not overwrite:
        raise ConfigError(f"{directory} already holds a model: choose another --out, or pass --overwrite to replace it")
    check_writable(directory, "model folder", folder=True)


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
    for key, kind in (("detector", str), ("config", dict), ("calibration", dict)):
        if key in meta and not isinstance(meta[key], kind):
            shape = "text" if kind is str else "a JSON object"
            raise ModelFormatError(f"{meta_path}: field {key!r} must be {shape}, got {meta[key]!r}")
    tensor_path = directory / TENSOR_FILE
    if not tensor_path.is_file():
        raise ModelFormatError(f"{tensor_path}: missing (the model folder is incomplete)")
    expected = meta.get("weights_sha256")
    if expected is not None and (not isinstance(expected, str) or _sha256(tensor_path) != expected):
        raise ModelFormatError(
            f"{tensor_path}: does not match {META_FILE} (its checksum differs: the weights were replaced, copied "
            "from another model or damaged); re-train or restore the whole model folder"
        )
    expected_config = meta.get("config_sha256")
    if expected_config is not None and _config_hash(meta.get("config")) != expected_config:
        raise ModelFormatError(
            f"{meta_path}: the detector settings were changed after fitting (they must match the weights); "
            "re-fit with the new settings, or restore the file (thresholds can be changed with 'anomnet calibrate')"
        )
    try:
        tensors = load_file(str(tensor_path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ModelFormatError(f"{tensor_path}: damaged tensor file ({exc})") from None
    return meta, tensors
