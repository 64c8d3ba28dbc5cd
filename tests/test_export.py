"""anomnet export: parity of every detector x format with the in-memory model, the manifest, and torch-free predict.

Parity reference: the fitted model's own prediction in graph mode (exact nearest-neighbour search in
torch, float32; docs/export.md), on real bottle images at several sizes and batch sizes. The export
tests skip when the export extra (onnx, onnxruntime, openvino) is not installed.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from tests.conftest import BOTTLE, make_folder_dataset

from anomnet import api, imageio
from anomnet.components.graph_mode import graph_mode
from anomnet.data import load_dataset
from anomnet.detectors import DETECTORS
from anomnet.detectors.base import Detector
from anomnet.errors import ConfigError, ModelFormatError
from anomnet.export import geometry
from anomnet.exported import (
    FORMATS,
    GRAPH_FILES,
    MANIFEST,
    ExportedModel,
    load_exported,
    openvino_config,
    parity,
    read_manifest,
    score_scale,
    to_uint8,
)
from anomnet.install import install_command
from anomnet.transforms import Preprocess, _mirror_pad

REPO = Path(__file__).resolve().parents[1]


def _missing(*modules: str) -> list[str]:
    missing = []
    for name in modules:
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    return missing


EXTRA_MISSING = _missing("onnx", "onnxruntime", "openvino")
needs_export = pytest.mark.skipif(
    bool(EXTRA_MISSING),
    reason=f"the export extra is not installed ({', '.join(EXTRA_MISSING)} missing) (make setup-all)",
)


def test_the_export_extra_is_installed_where_required() -> None:
    if os.environ.get("ANOMNET_EXPORT_TEST") == "required":  # CI (.ci/run): the parity tests must not skip
        assert not EXTRA_MISSING, f"the export extra is missing: {', '.join(EXTRA_MISSING)}"


needs_bottle = pytest.mark.skipif(not BOTTLE.is_dir(), reason="shared MVTec bottle data not present")

# Small budgets: the tests check the graph, not the detectors' accuracy.
SETTINGS: dict[str, dict[str, object]] = {
    "patchcore": {"image_size": 64},
    "patchcore-pad": {"image_size": 64, "aspect": "pad", "crop": 56},
    "anomnet": {"image_size": 64, "num_centroids": 16, "stage1_epochs": 2, "stage2_epochs": 2, "init_samples": 2000},
    "efficientad": {"image_size": 64, "steps": 4, "distill_steps": 2, "distill_crop": 64, "pool_limit": 4},
    "tocoad": {"image_size": 64, "train_batch_size": 4, "stage1_steps": 3, "stage2_steps": 2, "stage2": True},
    "inpformer": {"image_size": 64, "steps": 4, "train_batch_size": 4, "decoder_depth": 4},
    "cpr": {"image_size": 64, "train_batch_size": 2, "steps": 3, "train_crop": 32, "points": 20},
    # the fused prediction of two PatchCore branches (normalised scores and maps; fast)
    "hybrid": {
        "branches": "sharp:patchcore,smooth:patchcore",
        "image_size": 64,
        "sharp.blur_sigma": 1.0,
        "smooth.blur_sigma": 24.0,
        "synthetic": "cutpaste",
        "synthetic_per_image": 3,
        "mode": "fuse",
    },
}
SETTINGS = {k: v for k, v in SETTINGS.items() if k.split("-")[0] in DETECTORS}  # a detector still being written


# -- geometry: the graph's preprocessing equals Preprocess (no export extra needed) ---------------


@pytest.mark.parametrize(
    "size,crop,aspect",
    [(64, None, "stretch"), (64, 48, "stretch"), (64, None, "pad"), (64, 56, "pad"), (256, 224, "pad")],
)
def test_graph_geometry_equals_preprocess_at_any_size(size: int, crop: int | None, aspect: str) -> None:
    pre = Preprocess(size, crop, aspect)  # type: ignore[arg-type]
    graph = geometry.GraphGeometry(pre)
    gen = torch.Generator().manual_seed(0)
    for hw in [(900, 900), (300, 451), (451, 300), (64, 64), (40, 80), (31, 200), (33, 1), (2, 2), (7, 300)]:
        x = torch.rand(2, 3, *hw, generator=gen)
        assert (graph.preprocess(x) - pre(x)).abs().max() < 2e-5, hw
        maps = torch.rand(2, pre.output_size, pre.output_size, generator=gen)
        assert (graph.restore(maps, x) - pre.restore(maps, hw)).abs().max() < 2e-5, hw


def test_mirror_index_follows_the_repeated_mirror_padding() -> None:
    for n, before, after in [(5, 2, 3), (5, 4, 4), (2, 30, 31), (3, 100, 0), (1, 5, 6), (10, 0, 0)]:
        x = torch.arange(n, dtype=torch.float32).reshape(1, 1, 1, n)
        padded = _mirror_pad(x, 0, 0, before, after)[0, 0, 0]
        index = geometry.mirror_index(torch.tensor(n), torch.tensor(before), torch.tensor(after))
        assert torch.equal(padded, index.float()), (n, before, after)


def test_round_ratio_is_pythons_round() -> None:
    num = torch.arange(1, 3000)
    for den in (7, 64, 256, 300, 512):
        expected = torch.tensor([round(int(n) / den) for n in num])
        assert torch.equal(geometry.round_ratio(num, torch.tensor(den)), expected)


def test_decision_threshold_in_float32_decides_as_float64() -> None:
    from anomnet.export.graph import float32_at_or_above

    for value in (0.1, 1 / 3, 17.000001, 1e-8, 2.5):
        t = np.float32(float32_at_or_above(value))
        scores = np.array([np.nextafter(t, np.float32(0)), t, np.nextafter(t, np.float32(np.inf))], np.float32)
        assert np.array_equal(scores >= t, scores.astype(np.float64) >= value)
    with pytest.raises(ConfigError, match="NaN"):
        float32_at_or_above(float("nan"))


def test_to_uint8_recovers_8_bit_pixels() -> None:
    pixels = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, axis=3)
    assert np.array_equal(to_uint8(pixels.astype(np.float32) / np.float32(255)), pixels)


# -- fitted and exported models (cached per test session) ------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("export")


@cache
def _bottle_batches() -> dict[str, np.ndarray]:
    """Real bottle test images, uint8: originals (900 x 900), non-square and small resizes."""
    names = ["broken_large/000.png", "good/000.png", "contamination/001.png"]
    images = np.stack([(imageio.read_image(BOTTLE / "test" / n) * 255 + 0.5).astype(np.uint8) for n in names])

    def resized(h: int, w: int) -> np.ndarray:
        return np.stack([np.asarray(Image.fromarray(im).resize((w, h), Image.BILINEAR)) for im in images])

    return {"900x900 b2": images[:2], "300x451 b3": resized(300, 451), "451x300 b1": resized(451, 300)[:1]}


@cache
def _fitted(key: str, root: str) -> Path:
    """A small model of ``key`` fitted on 6 bottle images, its threshold between the scores of the test batch."""
    name = key.split("-")[0]
    folder = Path(root) / key
    split = load_dataset(BOTTLE)
    settings = {"batch_size": 4, **SETTINGS[key]}
    det = api.fit(name, split, out=folder, max_train=6, settings=settings, progress=False)
    x = torch.from_numpy(_bottle_batches()["300x451 b3"]).permute(0, 3, 1, 2).float() / 255
    with graph_mode():
        scores = np.sort(det.predict(x).scores.numpy())
    api.calibrate(folder, image_method="fixed", image_value=float(scores[0] + scores[1]) / 2, progress=False)
    return folder


@cache
def _exported(key: str, fmt: str, root: str) -> Path:
    from anomnet.export import export_model

    return export_model(_fitted(key, root), fmt, Path(root) / f"{key}-{fmt}")


@cache
def _reference(key: str, root: str, batch: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from anomnet.export import graph_reference

    det = Detector.load(_fitted(key, root))
    scores, maps = graph_reference(det, _bottle_batches()[batch])
    return scores, maps, det.calibration.decide(scores)


@pytest.mark.slow
@needs_bottle
@needs_export
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("key", list(SETTINGS))
def test_exported_model_matches_the_in_memory_model(key: str, fmt: str, workdir: Path) -> None:
    model = load_exported(_exported(key, fmt, str(workdir)))
    assert model.detector == key.split("-")[0] and model.graph_format == fmt
    decided = []
    for batch, images in _bottle_batches().items():
        scores, maps, decisions = model.run(images)
        ref_scores, ref_maps, ref_decisions = _reference(key, str(workdir), batch)
        assert maps.shape == images.shape[:3]
        report = parity(ref_scores, ref_maps, scores, maps, score_scale(model.calibration))
        assert report["ok"], (batch, report)
        assert np.array_equal(decisions, ref_decisions), batch  # exactly the in-memory model's decisions
        assert np.array_equal(decisions, model.calibration.decide(scores))  # and the manifest's threshold's
        decided.extend(decisions.tolist())
    assert any(decided) and not all(decided)  # the threshold splits the images: decisions are tested both ways


@pytest.mark.slow
@needs_bottle
@needs_export
def test_openvino_runs_float32_not_the_cpus_bf16_default(workdir: Path) -> None:
    import openvino as ov

    folder = _exported("patchcore", "openvino", str(workdir))
    core = ov.Core()
    ours = core.compile_model(str(folder / "model.xml"), "CPU", openvino_config(None))
    assert str(ours.get_property("INFERENCE_PRECISION_HINT")) == "<Type: 'float32'>"
    default = core.compile_model(str(folder / "model.xml"), "CPU")
    if "bfloat16" not in str(default.get_property("INFERENCE_PRECISION_HINT")):
        pytest.skip("this CPU's OpenVINO default is float32 already")
    images = _bottle_batches()["300x451 b3"]
    ref_scores, ref_maps, _ = _reference("patchcore", str(workdir), "300x451 b3")
    result = default.create_infer_request().infer({"images": images})
    bf16 = parity(ref_scores, ref_maps, result[default.output("scores")], result[default.output("maps")])
    assert not bf16["ok"]  # what the f32 hint avoids: bf16 moves scores well past the tolerance
    scores, maps, _ = load_exported(folder).run(images)
    assert parity(ref_scores, ref_maps, scores, maps)["ok"]


# -- the exported folder -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """PatchCore on the synthetic folder dataset (64 px, fast)."""
    root = tmp_path_factory.mktemp("small")
    data = make_folder_dataset(root / "data")
    api.fit("patchcore", data, out=root / "model", settings={"image_size": 64}, progress=False)
    return root / "model"


@pytest.fixture(scope="module")
def small_onnx(small_model: Path) -> Path:
    if EXTRA_MISSING:
        pytest.skip(f"the export extra is not installed ({', '.join(EXTRA_MISSING)} missing)")
    from anomnet.export import export_model

    return export_model(small_model, "onnx", small_model.parent / "exported")


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_manifest_carries_the_whole_calibration_and_contract(small_model: Path, small_onnx: Path) -> None:
    manifest = read_manifest(small_onnx)
    det = Detector.load(small_model)
    assert manifest["calibration"] == json.loads(json.dumps(det.calibration.to_dict()))
    assert manifest["settings"] == json.loads(json.dumps(det.config.to_dict()))
    assert manifest["detector"] == "patchcore" and manifest["graph_format"] == "onnx"
    assert manifest["input"]["dtype"] == "uint8" and manifest["input"]["shape"] == ["batch", "height", "width", 3]
    assert manifest["verified"]["score_rel"] <= 1e-4 and manifest["verified"]["map_rel"] <= 1e-4
    model = load_exported(small_onnx)
    scores = np.linspace(0, 2 * det.calibration.threshold, 7)
    assert np.array_equal(model.calibration.p_values(scores), det.calibration.p_values(scores))
    assert np.array_equal(model.calibration.decide(scores), det.calibration.decide(scores))


def test_damaged_or_foreign_folders_are_refused(small_onnx: Path, tmp_path: Path) -> None:
    bad = _copy(small_onnx, tmp_path / "tampered")
    with open(bad / "model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ModelFormatError, match="SHA-256 differs"):
        load_exported(bad)
    old = _copy(small_onnx, tmp_path / "old")
    manifest = json.loads((old / MANIFEST).read_text())
    (old / MANIFEST).write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(ModelFormatError, match="export format version 99"):
        load_exported(old)
    gone = _copy(small_onnx, tmp_path / "gone")
    (gone / "model.onnx").unlink()
    with pytest.raises(ModelFormatError, match="missing"):
        load_exported(gone)
    with pytest.raises(ConfigError, match=r"uint8 images of shape \[B,H,W,3\]"):
        load_exported(small_onnx).run(np.zeros((1, 8, 8, 3), np.float32))


def test_export_never_writes_over_the_model_or_another_folder(small_model: Path, small_onnx: Path, tmp_path: Path):
    from anomnet.export import export_model

    before = sorted((p.name, p.stat().st_mtime_ns) for p in small_model.iterdir())
    with pytest.raises(ConfigError, match="overlaps the model folder"):
        export_model(small_model, "onnx", small_model / "exported")
    with pytest.raises(ConfigError, match="overlaps the model folder"):
        export_model(small_model, "onnx", small_model)
    with pytest.raises(ConfigError, match="already holds an exported model"):
        export_model(small_model, "onnx", small_onnx)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="other files"):
        export_model(small_model, "onnx", busy)
    with pytest.raises(ConfigError, match="already an exported model"):
        export_model(small_onnx, "onnx", tmp_path / "again")
    with pytest.raises(ConfigError, match="unknown export format"):
        export_model(small_model, "tflite", tmp_path / "x")
    assert sorted((p.name, p.stat().st_mtime_ns) for p in small_model.iterdir()) == before
    assert (busy / "notes.txt").read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind


@needs_export
def test_overwrite_replaces_an_export_whole(small_model: Path, tmp_path: Path) -> None:
    from anomnet.export import export_model

    out = export_model(small_model, "torchscript", tmp_path / "e")
    export_model(small_model, "onnx", out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == sorted([MANIFEST, *GRAPH_FILES["onnx"]])
    assert read_manifest(out)["graph_format"] == "onnx"


def test_a_tiled_model_says_it_cannot_be_exported(tmp_path: Path) -> None:
    from anomnet.detectors import create_detector
    from anomnet.export.graph import ExportGraph

    det = create_detector("patchcore", {"image_size": 64, "tile": 128})
    with pytest.raises(ConfigError, match="tiling .* cannot be exported"):
        ExportGraph(det)


def test_a_missing_runtime_is_named(small_onnx: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ModelFormatError, match="needs the onnxruntime package") as caught:
        ExportedModel(small_onnx)
    assert f"({install_command('runtime')})" in str(caught.value)  # the command for this checkout


# -- the command line, and predict without torch -----------------------------------------------------


def _predict_rows(args: list[str], env: dict[str, str] | None = None) -> list[list[str]]:
    out = subprocess.run(
        [sys.executable, "-m", "anomnet.cli", "--threads", "1", "predict", *args, "--quiet"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stderr
    return [line.split("\t") for line in out.stdout.splitlines() if "\t" in line]


def test_cli_export_then_predict_gives_the_fitted_models_rows(small_model: Path, tmp_path: Path) -> None:
    if EXTRA_MISSING:
        pytest.skip(f"the export extra is not installed ({', '.join(EXTRA_MISSING)} missing)")
    from anomnet.cli import main

    images = small_model.parent / "data" / "test"
    assert (
        main(
            [
                "--threads",
                "1",
                "export",
                "--model-dir",
                str(small_model),
                "--format",
                "openvino",
                "--out",
                str(tmp_path / "ov"),
            ]
        )
        == 0
    )
    fitted = _predict_rows(["--model-dir", str(small_model), str(images)])
    exported = _predict_rows(["--model-dir", str(tmp_path / "ov"), str(images), "--out", str(tmp_path / "pred")])
    assert [r[0] for r in exported] == [r[0] for r in fitted] and len(fitted) == 9  # header + 8 images
    for a, b in zip(fitted[1:], exported[1:]):
        assert abs(float(a[1]) - float(b[1])) <= 1e-4 * abs(float(a[1]))
        assert a[3] == b[3]  # decision
    with open(tmp_path / "pred" / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 8


SHIM = """
import atexit, json, os, sys
sys.modules["torch"] = None  # `import torch` now raises ImportError, as on a line PC without it
def _report():
    names = [m for m in sys.modules if m.split(".")[0] in ("torch", "safetensors", "faiss")
             or m in ("anomnet.api", "anomnet.model_io") or m.startswith("anomnet.detectors")
             or m.startswith("anomnet.export.")]
    with open(os.environ["ANOMNET_IMPORT_REPORT"], "w") as f:
        json.dump([m for m in names if sys.modules.get(m) is not None], f)
atexit.register(_report)
"""


def test_predict_on_an_exported_folder_runs_with_torch_unimportable(small_onnx: Path, tmp_path: Path) -> None:
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(textwrap.dedent(SHIM))
    report = tmp_path / "imports.json"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(shim), str(REPO / "src")]),
        "ANOMNET_IMPORT_REPORT": str(report),
    }
    images = small_onnx.parent / "data" / "test"
    with_torch = _predict_rows(["--model-dir", str(small_onnx), str(images)])
    without = _predict_rows(["--model-dir", str(small_onnx), str(images), "--out", str(tmp_path / "p")], env)
    assert without == with_torch and len(without) == 9
    assert json.loads(report.read_text()) == []  # no torch, api, model_io, detectors or export code was loaded
    failed = subprocess.run(
        [sys.executable, "-m", "anomnet.cli", "predict", "--model-dir", str(small_onnx.parent / "model"), str(images)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
    )
    assert failed.returncode == 2 and install_command("train") in failed.stderr  # a fitted model needs torch


def test_graph_mode_changes_nothing_but_the_search(small_model: Path) -> None:
    """Graph mode's eager prediction is the model's own: the faiss search it replaces is exact too here."""
    det = Detector.load(small_model)
    x = torch.rand(2, 3, 70, 90, generator=torch.Generator().manual_seed(0))
    default = det.predict(x)
    with graph_mode():
        graph = det.predict(x)
    assert torch.allclose(default.scores, graph.scores, rtol=1e-4)
    assert (default.maps - graph.maps).abs().max() <= 1e-4 * default.maps.abs().max()
    assert F.mse_loss(default.maps, graph.maps) < 1e-8


def test_parity_tolerances() -> None:
    scores, maps = np.array([10.0, 1e-6]), np.ones((2, 4, 4))
    assert parity(scores, maps, scores * (1 + 5e-5), maps + 5e-5)["ok"]
    assert not parity(scores, maps, scores * (1 + 2e-4), maps)["ok"]
    assert not parity(scores, maps, scores, maps + 2e-4)["ok"]
    assert not parity(scores, maps, scores + [0, 1e-5], maps)["ok"]  # relative to a score near zero ...
    assert parity(scores, maps, scores + [0, 1e-5], maps, scale=1.0)["ok"]  # ... unless the spread is the scale
    assert not parity(scores, maps, scores[:1], maps[:1])["ok"]
