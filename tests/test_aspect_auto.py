"""aspect=auto: fit decides stretch or pad from the training images' sides, and only the decided value is used."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tests.old_models import ROOT as OLD_MODELS
from tests.old_models import fixed_input

from anomnet import api
from anomnet.detectors import Detector, create_detector
from anomnet.detectors.hybrid.config import HybridConfig
from anomnet.errors import NotFittedError
from anomnet.imageio import read_image
from anomnet.model_io import OldModelFormatWarning
from anomnet.transforms import PAD_RATIO, Preprocess, choose_aspect

QUICK = {"image_size": 64, "batch_size": 4}


def _dataset(root: Path, height: int, width: int, n_train: int = 6, seed: int = 0) -> Path:
    """train/, test/good, test/blob and masks/ of ``height x width`` striped images (bright-square defects)."""
    rng = np.random.default_rng(seed)
    for sub in ("train", "test/good", "test/blob", "masks"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    y, x = np.mgrid[0:height, 0:width]

    def texture() -> np.ndarray:
        base = 0.5 + 0.25 * np.sin(x / 3.0 + rng.uniform(0, 0.3)) * np.cos(y / 5.0)
        img = np.stack([base, base * 0.9, base * 0.8], axis=-1) + rng.normal(0, 0.02, (height, width, 3))
        return np.clip(img, 0, 1)

    def save(a: np.ndarray, p: Path) -> None:
        Image.fromarray((a * 255).astype(np.uint8)).save(p)

    for i in range(n_train):
        save(texture(), root / "train" / f"t{i:03d}.png")
    for i in range(2):
        save(texture(), root / "test" / "good" / f"g{i:03d}.png")
        img, mask = texture(), np.zeros((height, width), dtype=np.uint8)
        r, c = rng.integers(4, height - 12), rng.integers(4, width - 12)
        img[r : r + 8, c : c + 8] = [1.0, 0.1, 0.1]
        mask[r : r + 8, c : c + 8] = 255
        save(img, root / "test" / "blob" / f"b{i:03d}.png")
        Image.fromarray(mask).save(root / "masks" / f"b{i:03d}.png")
    return root


def _test_images(data: Path) -> torch.Tensor:
    files = sorted((data / "test").rglob("*.png"))
    return torch.stack([torch.from_numpy(read_image(f)).permute(2, 0, 1) for f in files])


def _saved_config(folder: Path) -> dict:
    return json.loads((folder / "anomnet.json").read_text())["config"]


@pytest.fixture(scope="module")
def tall(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _dataset(tmp_path_factory.mktemp("tall") / "data", 128, 64)  # 64 wide, 128 high


# -- the rule ------------------------------------------------------------------------------------


def test_the_rule_pads_clearly_oblong_images_and_says_why() -> None:
    assert choose_aspect([(1250, 500)] * 3) == ("pad", "pad (training images 500x1250: long/short side 2.50 > 1.5)")
    assert choose_aspect([(900, 900)]) == ("stretch", "stretch (training images 900x900: long/short side 1.00 <= 1.5)")
    # crops of varied shape, as the crops stress variant (median 1.3): stretched, as measured
    aspect, why = choose_aspect([(100, 100), (100, 130), (140, 100)])
    assert aspect == "stretch" and why.endswith("3 training images of 3 sizes: median long/short side 1.30 <= 1.5)")
    # the median decides: one odd image does not decide for the set; the long side may lie either way
    assert choose_aspect([(100, 100), (100, 104), (100, 300)])[0] == "stretch"
    assert choose_aspect([(100, 200), (200, 100), (100, 100)])[0] == "pad"
    assert choose_aspect([(100, int(100 * PAD_RATIO))])[0] == "stretch"  # at the ratio: stretched
    assert choose_aspect([(100, int(100 * PAD_RATIO) + 1)])[0] == "pad"


# -- never a guess before fit --------------------------------------------------------------------


def test_auto_is_the_default_and_nothing_runs_on_it_before_fit() -> None:
    det = create_detector("patchcore", QUICK)
    assert det.config.aspect == "auto"
    with pytest.raises(NotFittedError, match="aspect=auto"):
        det.preprocess(torch.rand(1, 3, 40, 80))
    with pytest.raises(NotFittedError, match="aspect=auto"):
        det.preprocess.restore(torch.rand(1, 64, 64), (40, 80))
    from anomnet.export.geometry import GraphGeometry

    with pytest.raises(NotFittedError, match="aspect=auto"):
        GraphGeometry(Preprocess(64, aspect="auto"))


def test_training_batches_of_a_fit_without_start_fit_decide_by_the_images_they_read(tall: Path) -> None:
    from anomnet.data import load_dataset

    det = create_detector("patchcore", QUICK)
    batches = list(det.training_batches(load_dataset(tall).train))
    assert det.config.aspect == "pad" and det.preprocess.aspect == "pad" and batches[0].shape[-2:] == (64, 64)


# -- fit decides; the decided value is saved and used --------------------------------------------


def test_non_square_training_images_fit_as_pad_exactly(tall: Path, tmp_path: Path) -> None:
    auto = api.fit("patchcore", tall, tmp_path / "auto", settings=QUICK, progress=False)
    forced = api.fit("patchcore", tall, tmp_path / "pad", settings={**QUICK, "aspect": "pad"}, progress=False)
    assert auto.config.aspect == "pad" and _saved_config(tmp_path / "auto")["aspect"] == "pad"
    record = json.loads((tmp_path / "auto" / "anomnet.json").read_text())["fit_record"]
    assert record["data_sources"]["aspect"] == "pad (training images 64x128: long/short side 2.00 > 1.5)"
    assert "aspect" not in forced.fit_record.data_sources  # forced: nothing was decided
    x = _test_images(tall)
    a, b = Detector.load(tmp_path / "auto").predict(x), Detector.load(tmp_path / "pad").predict(x)
    assert torch.equal(a.scores, b.scores) and torch.equal(a.maps, b.maps)


def test_square_training_images_fit_as_stretch_exactly(folder_dataset: Path, tmp_path: Path) -> None:
    auto = api.fit("patchcore", folder_dataset, tmp_path / "auto", settings=QUICK, progress=False)
    forced = api.fit("patchcore", folder_dataset, settings={**QUICK, "aspect": "stretch"}, progress=False)
    assert _saved_config(tmp_path / "auto")["aspect"] == "stretch"
    assert auto.fit_record.data_sources["aspect"] == "stretch (training images 64x64: long/short side 1.00 <= 1.5)"
    x = _test_images(folder_dataset)
    a, b = auto.predict(x), forced.predict(x)
    assert torch.equal(a.scores, b.scores) and torch.equal(a.maps, b.maps)


def test_a_forced_setting_wins_over_the_images(tall: Path) -> None:
    det = api.fit("patchcore", tall, settings={**QUICK, "aspect": "stretch"}, progress=False)
    assert det.config.aspect == "stretch" and det.preprocess.aspect == "stretch"


def test_fit_prints_what_it_chose_and_why(tall: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from anomnet.cli import EXIT_OK, main

    args = ["fit", "--data", str(tall), "--out", str(tmp_path / "m"), "--quiet", "--set", "image_size=64"]
    assert main(args) == EXIT_OK
    assert "aspect: pad (training images 64x128: long/short side 2.00 > 1.5)" in capsys.readouterr().out


def test_hybrid_branches_take_the_decided_value(tall: Path) -> None:
    settings = {
        **QUICK,
        "branches": "sharp:patchcore,smooth:patchcore",
        "smooth.blur_sigma": 8.0,
        "synthetic": "cutpaste",
        "synthetic_per_image": 1,
    }
    det = api.fit("hybrid", tall, settings=settings, val_fraction=0.34, progress=False)
    assert det.config.aspect == "pad"
    assert isinstance(det.config, HybridConfig)
    assert {a: c["aspect"] for a, c in det.config.branch_configs.items()} == {"sharp": "pad", "smooth": "pad"}
    assert all(b.preprocess.aspect == "pad" for b in det.fitted_branches().values())


# -- old folders ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["patchcore", "hybrid"])
def test_a_folder_saved_before_the_setting_existed_loads_as_stretch(name: str, tmp_path: Path) -> None:
    folder = tmp_path / name
    shutil.copytree(OLD_MODELS / name, folder)
    meta = json.loads((folder / "anomnet.json").read_text())
    meta["config"].pop("aspect")
    for branch in meta["config"].get("branch_configs", {}).values():
        branch.pop("aspect")
    # such a folder predates the checksums too: format version 1
    meta.update(format_version=1, weights_sha256=None, config_sha256=None)
    (folder / "anomnet.json").write_text(json.dumps(meta))
    with pytest.warns(OldModelFormatWarning):
        det = Detector.load(folder)
    assert det.config.aspect == "stretch"
    assert all(c["aspect"] == "stretch" for c in getattr(det.config, "branch_configs", {}).values())
    record = json.loads((folder / "scores.json").read_text())
    assert [float(v) for v in det.predict(fixed_input()).scores] == pytest.approx(record["scores"], rel=1e-5)


# -- export --------------------------------------------------------------------------------------


def test_export_of_an_auto_fitted_pad_model_keeps_parity(tall: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from anomnet.export import export_model, graph_reference
    from anomnet.exported import load_exported, parity, score_scale

    folder = tmp_path / "m"
    api.fit("patchcore", tall, folder, settings=QUICK, progress=False)
    assert _saved_config(folder)["aspect"] == "pad"
    model = load_exported(export_model(folder, "onnx", tmp_path / "onnx"))
    images = (_test_images(tall).permute(0, 2, 3, 1).numpy() * 255 + 0.5).astype(np.uint8)
    scores, maps, _ = model.run(images)
    ref_scores, ref_maps = graph_reference(Detector.load(folder), images)
    assert parity(ref_scores, ref_maps, scores, maps, score_scale(model.calibration))["ok"]
