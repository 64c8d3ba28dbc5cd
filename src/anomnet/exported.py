"""Exported models (``anomnet export``): a graph plus its manifest, scored without torch.

An exported folder holds one graph and ``manifest.json``::

    E/
      manifest.json   format and version, detector and its settings, the whole calibration (thresholds,
                      validation scores for p-values, mask post-processing), the input contract, and
                      the SHA-256 of every file the graph reads (checked before the graph is opened)
      model.onnx      --format onnx         (ONNX Runtime; tensor files beside it for graphs over 2 GB)
      model.xml/.bin  --format openvino     (OpenVINO IR, float32 weights)
      model.pt        --format torchscript  (torch.jit; needs torch)

The graph: input ``images`` ``uint8 [B,H,W,3]`` RGB, any ``B >= 1`` and any ``H, W >= 1`` (all
images of one call share a size); outputs ``scores`` ``float32 [B]``, ``maps`` ``float32 [B,H,W]``
(the anomaly map at the input's resolution) and ``decisions`` ``bool [B]`` (score at or above the
image threshold). Preprocessing, the detector's networks, the exact nearest-neighbour search,
blur and normalisation are inside it. :func:`load_exported` opens a folder as a
:class:`~anomnet.predict.scoring.Scorer`, so ``anomnet predict``, the service, the hot folder and the
Ray engine score exported models like fitted ones. This module imports no torch (only the
TorchScript runtime does, when a TorchScript graph is opened).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from anomnet import __version__
from anomnet.decisions.calibration import Calibration
from anomnet.errors import AnomnetError, ConfigError, ModelFormatError
from anomnet.install import install_command

FORMAT_NAME = "anomnet-export"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
GRAPH_FILES: dict[str, tuple[str, ...]] = {
    "onnx": ("model.onnx",),
    "openvino": ("model.xml", "model.bin"),
    "torchscript": ("model.pt",),
}
"""The graph files of each format; the first is the one a runtime opens."""
FORMATS = tuple(GRAPH_FILES)
RUNTIME_PACKAGES = {"onnx": "onnxruntime", "openvino": "openvino", "torchscript": "torch"}

INPUT_NAME = "images"
OUTPUT_NAMES = ("scores", "maps", "decisions")

SCORE_RTOL = 1e-4
"""Parity tolerance of scores: ``|exported - reference| <= SCORE_RTOL * max(|reference|, spread)``, the spread
being the standard deviation of the model's validation scores (:func:`score_scale`)."""
MAP_RTOL = 1e-4
"""Parity tolerance of maps: ``max |exported - reference| <= MAP_RTOL * max |reference|`` (per image)."""


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_exported(folder: str | Path) -> bool:
    """True when ``folder`` holds an exported model: a ``manifest.json`` of anomnet's export format (any version)."""
    return _manifest_or_none(Path(folder)) is not None


def _manifest_or_none(folder: Path) -> dict[str, Any] | None:
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == FORMAT_NAME else None


def owned_entries(folder: str | Path) -> set[str]:
    """The entries an exported folder owns (replaced by ``export --overwrite``): its manifest and the files it lists.

    None when the folder's ``manifest.json`` is not anomnet's: then nothing in it is an export's.
    """
    manifest = _manifest_or_none(Path(folder))
    if manifest is None:
        return set()
    files = manifest.get("files")
    listed = [name for name in files if _inside(name)] if isinstance(files, dict) else []
    return {MANIFEST, *(name.split("/")[0] for name in listed)}


def _inside(name: object) -> bool:
    """True for a relative path below the folder (``a`` or ``a/b``; never absolute, ``..``, ``.`` or empty parts)."""
    if not isinstance(name, str) or not name or "\\" in name or name.startswith("/"):
        return False
    return all(part not in ("", ".", "..") for part in name.split("/"))


def read_manifest(folder: str | Path, check_files: bool = True) -> dict[str, Any]:
    """The manifest of an exported folder, checked; with ``check_files`` the SHA-256 of every file it lists too."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise ModelFormatError(f"{folder}: no such exported model folder")
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelFormatError(f"{folder}: not an exported model ({MANIFEST} is missing)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ModelFormatError(f"{path}: unreadable manifest ({type(exc).__name__}: {exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise ModelFormatError(f"{path}: not an anomnet export manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ModelFormatError(
            f"{folder}: export format version {manifest.get('format_version')} (written by anomnet "
            f"{manifest.get('anomnet_version', '?')}); this anomnet {__version__} reads version {FORMAT_VERSION}: "
            "export the model again with this version"
        )
    fmt = manifest.get("graph_format")
    if fmt not in GRAPH_FILES:
        raise ModelFormatError(f"{path}: graph_format {fmt!r} is not one of {', '.join(FORMATS)}")
    files = manifest.get("files")
    if not isinstance(files, dict) or not set(GRAPH_FILES[fmt]) <= set(files):
        raise ModelFormatError(f"{path}: 'files' must give the SHA-256 of {', '.join(GRAPH_FILES[fmt])}")
    for name, digest in files.items():
        if not _inside(name) or name == MANIFEST:
            raise ModelFormatError(f"{path}: 'files' may name only files inside the folder, got {name!r}")
        if not isinstance(digest, str):
            raise ModelFormatError(f"{path}: the SHA-256 of {name!r} must be text, got {digest!r}")
    for key, kind in (("detector", str), ("calibration", dict), ("batch_size", int)):
        if not isinstance(manifest.get(key), kind):
            raise ModelFormatError(f"{path}: field {key!r} is missing or has the wrong type")
    if check_files:
        for name, digest in files.items():
            graph = folder / name
            if not graph.is_file():
                raise ModelFormatError(f"{graph}: missing (the exported folder is incomplete)")
            if file_sha256(graph) != digest:
                raise ModelFormatError(
                    f"{graph}: does not match {MANIFEST} (its SHA-256 differs: the file was replaced or damaged); "
                    "export the model again or restore the whole folder"
                )
    return manifest


def exported_files(folder: str | Path) -> list[Path]:
    """The files an exported folder owns (outputs must never be written over them)."""
    folder = Path(folder)
    names = {name for files in GRAPH_FILES.values() for name in files}
    return [folder / MANIFEST] + [folder / n for n in sorted(names)]


def to_uint8(images: np.ndarray) -> np.ndarray:
    """``[B,H,W,3]`` float in [0, 1] -> uint8: exact for 8-bit sources (``read_image`` divides them by 255)."""
    return np.clip(np.rint(np.asarray(images, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)


Run = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]


def _onnx_runtime(graph: Path, threads: int | None) -> Run:
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])

    def run(images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        scores, maps, decisions = session.run(list(OUTPUT_NAMES), {INPUT_NAME: images})
        return scores, maps, decisions

    return run


def openvino_config(threads: int | None) -> dict[str, Any]:
    """OpenVINO CPU settings: float32 inference (the CPU plugin's default on CPUs with bf16 units is bf16)."""
    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    return config


def _openvino_runtime(graph: Path, threads: int | None) -> Run:
    import openvino as ov

    compiled = ov.Core().compile_model(str(graph), "CPU", openvino_config(threads))
    request = compiled.create_infer_request()
    outputs = [compiled.output(name) for name in OUTPUT_NAMES]

    def run(images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        result = request.infer({INPUT_NAME: images})
        scores, maps, decisions = (np.array(result[port]) for port in outputs)  # copies: the request reuses them
        return scores, maps, decisions

    return run


def _torchscript_runtime(graph: Path, threads: int | None) -> Run:
    import torch

    if threads:
        torch.set_num_threads(threads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.13 marks torch.jit deprecated; it still loads
        module = torch.jit.load(str(graph), map_location="cpu").eval()

    def run(images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        with torch.inference_mode():
            scores, maps, decisions = module(torch.from_numpy(images))
        return scores.numpy(), maps.numpy(), decisions.numpy()

    return run


RUNTIMES: dict[str, Callable[[Path, int | None], Run]] = {
    "onnx": _onnx_runtime,
    "openvino": _openvino_runtime,
    "torchscript": _torchscript_runtime,
}


def open_graph(fmt: str, graph: Path, threads: int | None = None) -> Run:
    """The runtime of ``fmt`` (``onnx``, ``openvino``, ``torchscript``) with the graph file ``graph`` loaded."""
    package = RUNTIME_PACKAGES[fmt]
    try:
        return RUNTIMES[fmt](graph, threads)
    except ImportError:
        extra = "" if package == "torch" else f" ({install_command('runtime')})"
        raise ModelFormatError(
            f"{graph}: a {fmt} graph needs the {package} package{extra}, which is not installed"
        ) from None
    except AnomnetError:
        raise
    except Exception as exc:  # the runtime's own error types: a graph it cannot open
        raise ModelFormatError(f"{graph}: the {fmt} runtime cannot open the graph ({exc})") from None


def score_scale(calibration: Calibration) -> float:
    """The spread of a model's scores: the standard deviation of its validation scores (0 without them)."""
    v = np.asarray(calibration.validation_scores, dtype=np.float64)
    return float(v.std()) if v.size > 1 else 0.0


def parity(
    ref_scores: np.ndarray, ref_maps: np.ndarray, scores: np.ndarray, maps: np.ndarray, scale: float = 0.0
) -> dict[str, Any]:
    """How far an exported model's scores and maps are from the reference's, relative (see SCORE_RTOL, MAP_RTOL).

    ``score_rel``: the largest ``|s - r| / max(|r|, scale)`` (``scale``, e.g. :func:`score_scale`,
    keeps scores near zero, such as a hybrid's normalised ones, from counting rounding as a relative
    error); ``map_rel``: the largest, over images, of ``max |m - r| / max |r|``; ``ok``: both within
    tolerance and the shapes equal.
    """
    ref_scores, scores = np.asarray(ref_scores, np.float64), np.asarray(scores, np.float64)
    ref_maps, maps = np.asarray(ref_maps, np.float64), np.asarray(maps, np.float64)
    if ref_scores.shape != scores.shape or ref_maps.shape != maps.shape:
        return {"ok": False, "score_rel": float("inf"), "map_rel": float("inf")}
    score_rel = float(np.max(np.abs(scores - ref_scores) / np.maximum(np.abs(ref_scores), max(scale, 1e-12))))
    per_image = np.abs(maps - ref_maps).reshape(len(maps), -1).max(1)
    map_scale = np.maximum(np.abs(ref_maps).reshape(len(maps), -1).max(1), 1e-12)
    map_rel = float(np.max(per_image / map_scale))
    return {"ok": score_rel <= SCORE_RTOL and map_rel <= MAP_RTOL, "score_rel": score_rel, "map_rel": map_rel}


class ExportedModel:
    """An exported model folder in the :class:`~anomnet.predict.scoring.Scorer` shape (no torch, except TorchScript)."""

    def __init__(self, folder: str | Path, threads: int | None = None) -> None:
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        self.graph_format: str = self.manifest["graph_format"]
        self.detector: str = self.manifest["detector"]
        try:
            self._calibration = Calibration.from_dict(self.manifest["calibration"])
        except ConfigError as exc:
            raise ModelFormatError(f"{self.folder / MANIFEST}: calibration unusable ({exc})") from None
        self._batch_size = int(self.manifest["batch_size"])
        self._run = open_graph(self.graph_format, self.folder / GRAPH_FILES[self.graph_format][0], threads)

    @property
    def calibration(self) -> Calibration:
        return self._calibration

    @property
    def batch_size(self) -> int:
        return self._batch_size

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The graph itself: ``uint8 [B,H,W,3]`` -> scores ``[B]``, maps ``[B,H,W]``, decisions ``[B]``."""
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3 or 0 in images.shape:
            raise ConfigError(
                f"an exported model takes uint8 images of shape [B,H,W,3], got {images.dtype} {tuple(images.shape)}"
            )
        try:
            scores, maps, decisions = self._run(np.ascontiguousarray(images))
        except AnomnetError:
            raise
        except Exception as exc:  # a runtime failure on this input (e.g. out of memory)
            raise ModelFormatError(f"{self.folder}: the {self.graph_format} runtime failed ({exc})") from None
        return np.asarray(scores, np.float32), np.asarray(maps, np.float32), np.asarray(decisions, bool)

    def score_arrays(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``[B,H,W,3]`` float RGB in [0, 1] -> scores ``[B]`` (float64), maps ``[B,H,W]`` (float32).

        The graph takes 8-bit pixels: images read from 8-bit files pass unchanged, 16-bit ones are
        rounded to 8 bits first.
        """
        scores, maps, _ = self.run(to_uint8(images))
        return scores.astype(np.float64), maps


def load_exported(folder: str | Path, threads: int | None = None) -> ExportedModel:
    """The :class:`~anomnet.predict.scoring.Scorer` of an exported model folder (``threads``: its CPU threads).

    ``threads`` defaults to ``$ANOMNET_THREADS`` (set by ``anomnet --threads``), else the runtime's own default.
    """
    if threads is None and os.environ.get("ANOMNET_THREADS", "").isdigit():
        threads = int(os.environ["ANOMNET_THREADS"]) or None
    return ExportedModel(folder, threads)
