"""``anomnet export``: a fitted model folder -> an exported folder (one graph + manifest), verified, written whole.

The graph is traced once from :class:`~anomnet.export.graph.ExportGraph` with torch's
TorchScript-based tracer: ONNX (opset :data:`OPSET`) through ``torch.onnx.export``, OpenVINO IR
converted from that ONNX graph (weights kept float32), TorchScript saved as traced. Before the
folder is put in place the new graph is run by its own runtime on two probe images of a size it
was not traced at and compared with the model's graph-mode prediction
(:func:`graph_reference`); an export that does not reproduce the model is refused. The manifest
holds the SHA-256 of every file the export wrote (the graph, OpenVINO's weights, ONNX tensors
stored beside the graph). The folder is written by :func:`anomnet.durable.write_folder` (a kill
leaves the old export or the new one; the other files in ``out`` stay), never inside or over the
source model folder, never over a folder that is not an export.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from anomnet import __version__
from anomnet.components.graph_mode import graph_mode
from anomnet.detectors.base import Detector
from anomnet.durable import MARK, write_folder
from anomnet.errors import ConfigError, ModelFormatError
from anomnet.export.graph import ExportGraph
from anomnet.exported import (
    FORMAT_NAME,
    FORMAT_VERSION,
    FORMATS,
    GRAPH_FILES,
    INPUT_NAME,
    MANIFEST,
    OUTPUT_NAMES,
    file_sha256,
    is_exported,
    open_graph,
    owned_entries,
    parity,
    score_scale,
)
from anomnet.imageio import check_writable
from anomnet.install import install_command
from anomnet.predict.scoring import MODEL_META

OPSET = 17
PROBE_SEED = 1234


def graph_reference(detector: Detector, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What the exported graph must compute for ``uint8 [B,H,W,3]`` images: the detector's prediction in
    graph mode (exact search, float32; :mod:`anomnet.components.graph_mode`). Scores ``[B]``, maps ``[B,H,W]``."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).to(torch.float32) / 255.0
    with graph_mode():
        pred = detector.predict(x)
    return pred.scores.float().numpy(), pred.maps.float().numpy()


def probe_images(count: int, height: int, width: int, seed: int = PROBE_SEED) -> np.ndarray:
    """Seeded smooth colour images ``uint8 [count, height, width, 3]`` (traced and verified on, never scored)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    out = np.empty((count, height, width, 3), dtype=np.uint8)
    for i in range(count):
        f = rng.uniform(2, 9, 3)
        phase = rng.uniform(0, 6.3, 3)
        for c in range(3):
            wave = 0.5 + 0.4 * np.sin(f[c] * (x + (c + 1) * y) + phase[c]) + rng.normal(0, 0.03, (height, width))
            out[i, :, :, c] = np.clip(np.rint(wave * 255), 0, 255)
    return out


# -- the three formats ---------------------------------------------------------------------------


def _write_onnx(graph: ExportGraph, example: torch.Tensor, path: Path) -> None:
    dynamic = {INPUT_NAME: {0: "batch", 1: "height", 2: "width"}, "scores": {0: "batch"}}
    dynamic.update({"maps": {0: "batch", 1: "height", 2: "width"}, "decisions": {0: "batch"}})
    torch.onnx.export(
        graph,
        (example,),
        str(path),
        dynamo=False,  # the TorchScript-based exporter: the detectors' Python runs once, at trace time
        opset_version=OPSET,
        input_names=[INPUT_NAME],
        output_names=list(OUTPUT_NAMES),
        dynamic_axes=dynamic,
        do_constant_folding=True,
    )


def write_onnx(graph: ExportGraph, example: torch.Tensor, folder: Path) -> None:
    _write_onnx(graph, example, folder / GRAPH_FILES["onnx"][0])


def write_openvino(graph: ExportGraph, example: torch.Tensor, folder: Path) -> None:
    import openvino as ov

    with tempfile.TemporaryDirectory(dir=folder) as scratch:  # the ONNX step and any tensor files beside it
        onnx_path = Path(scratch) / "graph.onnx"
        _write_onnx(graph, example, onnx_path)
        model = ov.convert_model(str(onnx_path))
        # float32 weights: save_model's default halves them to float16, which moves scores by ~1e-3
        ov.save_model(model, str(folder / GRAPH_FILES["openvino"][0]), compress_to_fp16=False)


def write_torchscript(graph: ExportGraph, example: torch.Tensor, folder: Path) -> None:
    traced = torch.jit.trace(graph, (example,), check_trace=False)
    traced.save(str(folder / GRAPH_FILES["torchscript"][0]))


WRITERS: dict[str, Callable[[ExportGraph, torch.Tensor, Path], None]] = {
    "onnx": write_onnx,
    "openvino": write_openvino,
    "torchscript": write_torchscript,
}
MODULES = {"onnx": "onnx", "openvino": "openvino", "torchscript": "torch"}


# -- the export ----------------------------------------------------------------------------------


def export_model(model_dir: str | Path, fmt: str, out: str | Path, overwrite: bool = False) -> Path:
    """Export the fitted model in ``model_dir`` as a ``fmt`` graph (``onnx``, ``openvino``, ``torchscript``) to ``out``.

    ``out`` must be new, empty or, with ``overwrite``, an exported folder (a ``manifest.json`` of
    anomnet's export format): then the export's own files are replaced and every other file in it
    stays. It is checked before any work. Raises :class:`ConfigError` for a model that cannot be expressed as a
    graph (tiling) or an export that does not reproduce the model.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; use one of: {', '.join(FORMATS)}")
    model_dir, out = Path(model_dir), Path(out)
    _check_target(model_dir, out, overwrite)
    _check_module(fmt)
    detector = Detector.load(model_dir)
    graph = ExportGraph(detector).eval()
    side = detector.config.image_size
    example = torch.from_numpy(probe_images(1, side + 16, side + 48, PROBE_SEED + 1))

    def fill(staging: Path) -> None:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the tracer's notes on Python values it keeps as constants
            WRITERS[fmt](graph, example, staging)
        verified = verify_export(staging, fmt, detector, graph)
        files = {name: file_sha256(staging / name) for name in _written_files(staging)}
        manifest = _manifest(detector, graph, fmt, files, model_dir, verified)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))

    return write_folder(out, fill, owned_entries, "exported folder")


def _written_files(folder: Path) -> list[str]:
    """Every file below ``folder`` as a relative path: what the runtime may read (the graph and its data files)."""
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != MARK)
    if any(p.is_symlink() for p in folder.rglob("*")):
        raise ModelFormatError("the exporter wrote a symbolic link; nothing was written")
    return names


def verify_export(folder: Path, fmt: str, detector: Detector, graph: ExportGraph) -> dict[str, Any]:
    """Run the graph written to ``folder`` by its runtime on two probe images and compare with the model."""
    side = detector.config.image_size
    images = probe_images(2, side + 40, max(32, side - 24))
    scores, maps, decisions = open_graph(fmt, folder / GRAPH_FILES[fmt][0])(images)
    ref_scores, ref_maps = graph_reference(detector, images)
    report = parity(ref_scores, ref_maps, scores, maps, score_scale(detector.calibration))
    if not report["ok"] or not np.array_equal(decisions, scores >= np.float32(graph.threshold)):
        raise ModelFormatError(
            f"the exported {fmt} graph does not reproduce the {detector.name} model on the probe images "
            f"(score difference {report['score_rel']:.3g}, map difference {report['map_rel']:.3g} relative); "
            "nothing was written"
        )
    return {"images": list(images.shape), **{k: v for k, v in report.items() if k != "ok"}}


def _manifest(
    detector: Detector,
    graph: ExportGraph,
    fmt: str,
    files: dict[str, str],
    model_dir: Path | None,
    verified: dict[str, Any] | None,
) -> dict[str, Any]:
    source: dict[str, Any] = {}
    if model_dir is not None:
        meta = json.loads((model_dir / MODEL_META).read_text())
        source = {"model_dir": str(model_dir.resolve()), "weights_sha256": meta.get("weights_sha256")}
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "anomnet_version": __version__,
        "graph_format": fmt,
        "files": files,
        "detector": detector.name,
        "settings": detector.config.to_dict(),
        "calibration": detector.calibration.to_dict(),
        "batch_size": int(detector.config.batch_size),
        "decision_threshold_float32": graph.threshold,
        "input": {
            "name": INPUT_NAME,
            "dtype": "uint8",
            "shape": ["batch", "height", "width", 3],
            "channels": "RGB",
            "sizes": "any batch >= 1 and height, width >= 1; the images of one call share a size",
            "pixels": "8-bit values; the graph divides by 255 (16-bit images: round to 8 bits first)",
        },
        "outputs": {
            "scores": {"dtype": "float32", "shape": ["batch"]},
            "maps": {"dtype": "float32", "shape": ["batch", "height", "width"]},
            "decisions": {"dtype": "bool", "shape": ["batch"], "rule": "score >= decision_threshold_float32"},
        },
        "computation": {
            "search": "exact nearest neighbours in plain torch (no faiss, no IVF cells)",
            "precision": "float32",
            "exporter": "torch.onnx (TorchScript-based tracer)" if fmt != "torchscript" else "torch.jit.trace",
            "opset": OPSET if fmt != "torchscript" else None,
            "torch": torch.__version__,
        },
        "source": source,
        "verified": verified,
    }


def _check_module(fmt: str) -> None:
    try:
        __import__(MODULES[fmt])
    except ImportError:
        raise ConfigError(f"--format {fmt} needs the {MODULES[fmt]} package: {install_command('export')}") from None


def _check_target(model_dir: Path, out: Path, overwrite: bool) -> None:
    """Before any work: a fitted model to read, and an ``out`` that is neither it, in it, nor someone else's folder."""
    if not (model_dir / MODEL_META).is_file():
        if is_exported(model_dir):
            raise ConfigError(f"{model_dir} is already an exported model: export the fitted model folder it came from")
        raise ModelFormatError(f"{model_dir}: not a fitted model folder ({MODEL_META} is missing)")
    src, dst = model_dir.resolve(), out.resolve()
    if dst == src or dst.is_relative_to(src) or src.is_relative_to(dst):
        raise ConfigError(f"--out {out} overlaps the model folder {model_dir}: choose a folder outside it")
    if out.exists():
        if not out.is_dir():
            raise ConfigError(f"--out {out}: is a file")
        if is_exported(out):
            if not overwrite:
                raise ConfigError(f"{out} already holds an exported model: choose another --out, or pass --overwrite")
        elif (out / MANIFEST).exists():
            raise ConfigError(
                f"--out {out}: its {MANIFEST} is not an anomnet export manifest, so the folder is not an exported "
                "model (an export is written only into a new or empty folder, or over an export): choose another --out"
            )
        elif any(out.iterdir()):
            raise ConfigError(f"--out {out} is a folder with other files in it: choose a new or empty folder")
    check_writable(out, "--out", folder=True)
