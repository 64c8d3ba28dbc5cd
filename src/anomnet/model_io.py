"""Model folders on disk: settings in JSON, tensors in safetensors, never pickle.

Opening a model folder cannot run code. A folder written by another format version is
refused with a message that says which version it has and which this anomnet reads.

A model folder is written whole by :func:`anomnet.durable.write_folder`: both files go into a
staging folder beside it that then takes its place, so a kill mid-write leaves the old model or
the new one, never a mix, and the other files in the folder (metrics, the user's notes) stay.
``anomnet.json`` holds the SHA-256 of the weights file and of the detector settings, checked at
load: weights copied over from another model, damaged on disk, or settings edited by hand are
refused. In format version 2 both checksums are required; a folder of version 1 (written before
they were) still loads, with an :class:`OldModelFormatWarning`, and its checksums are checked
where it has them.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from anomnet import __version__
from anomnet.durable import write_folder
from anomnet.errors import ConfigError, ModelFormatError

FORMAT_NAME = "anomnet-model"
FORMAT_VERSION = 2
"""Version 2: ``weights_sha256`` and ``config_sha256`` are required (version 1 folders may lack them)."""
READ_VERSIONS = (1, 2)
META_FILE = "anomnet.json"
TENSOR_FILE = "weights.safetensors"
HASHES = ("weights_sha256", "config_sha256")


class OldModelFormatWarning(UserWarning):
    """A model folder of an earlier format version was loaded: it has fewer checks; saving it again upgrades it."""


def write_model(directory: str | Path, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    """Write ``meta`` and ``tensors`` as the model folder ``directory``, replacing it whole (see module doc)."""
    contiguous = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}

    def fill(staging: Path) -> None:
        save_file(contiguous, str(staging / TENSOR_FILE))
        header = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "anomnet_version": __version__,
            **meta,
            "weights_sha256": _sha256(staging / TENSOR_FILE),
            "config_sha256": _config_hash(meta.get("config")),
        }
        (staging / META_FILE).write_text(json.dumps(header, indent=2, sort_keys=True))

    return write_folder(directory, fill, owned_files, "model folder")


def owned_files(directory: str | Path) -> tuple[str, ...]:
    """The names of the files a model folder owns; none when its ``anomnet.json`` is not an anomnet model's."""
    try:
        meta = json.loads((Path(directory) / META_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return ()
    return (META_FILE, TENSOR_FILE) if isinstance(meta, dict) and meta.get("format") == FORMAT_NAME else ()


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
    from anomnet.imageio import check_writable

    directory = Path(directory)
    ours = owned_files(directory)
    for name in (META_FILE, TENSOR_FILE):
        if name not in ours and (directory / name).exists():
            raise ConfigError(
                f"{directory / name} is not part of a model folder (anomnet did not write it) and a model folder has "
                "a file of that name: anomnet replaces only its own files; move it away or choose another --out"
            )
    if ours and not overwrite:
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
    written_by = meta.get("anomnet_version", "?")
    if version not in READ_VERSIONS:
        raise ModelFormatError(
            f"{directory}: model format version {version} (written by anomnet {written_by}); this anomnet "
            f"{__version__} reads format versions {', '.join(map(str, READ_VERSIONS))}. Re-train the model with "
            "this version."
        )
    for key, kind in (("detector", str), ("config", dict), ("calibration", dict)):
        if key in meta and not isinstance(meta[key], kind):
            shape = "text" if kind is str else "a JSON object"
            raise ModelFormatError(f"{meta_path}: field {key!r} must be {shape}, got {meta[key]!r}")
    tensor_path = directory / TENSOR_FILE
    if not tensor_path.is_file():
        raise ModelFormatError(f"{tensor_path}: missing (the model folder is incomplete)")
    missing = [key for key in HASHES if meta.get(key) is None]
    if version == FORMAT_VERSION and missing:
        raise ModelFormatError(
            f"{meta_path}: {missing[0]} is missing (a model folder of format version {FORMAT_VERSION} carries the "
            "checksums of its weights and settings, so that damaged or replaced weights are refused); restore the "
            "whole model folder or re-fit it"
        )
    if version != FORMAT_VERSION:
        unchecked = f"; its {' and '.join(missing)} cannot be checked" if missing else ""
        warnings.warn(
            f"{directory}: a model folder of format version {version} (written by anomnet {written_by}), loaded "
            f"with fewer checks{unchecked}. Re-fit it, or write it again in version {FORMAT_VERSION} as it is "
            "(Python: Detector.load(folder).save(folder))",
            OldModelFormatWarning,
            stacklevel=3,
        )
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
