"""The MVTec AD 2 protocol end to end on a small MVTec AD 2-shaped fixture built from bottle at full resolution:
layout (validation/good is the validation split, test_public with its masks, unlabelled private splits), thresholds
from validation only, SegF1 and AU-PRO@0.05 from `anomnet test`, and predict's submission layout
(anomaly_images/<object>/<split>/<stem>.tiff in float16, anomaly_images_thresholded/.../<stem>.png in {0, 255})."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from tests.ad2_fixture import build_mvtec_ad2
from tests.read_spy import spy_on_image_reads

from anomnet import api
from anomnet.data import load_dataset
from anomnet.errors import ConfigError
from anomnet.predict.submission import map_float16, relative_name

pytestmark = pytest.mark.slow
SMALL = ["--image-size", "64", "--set", "batch_size=4", "--quiet"]


@pytest.fixture
def ad2(bottle: Path, tmp_path: Path) -> Path:
    return build_mvtec_ad2(bottle, tmp_path / "mvtec_ad_2")


def test_the_layout_is_read_with_its_own_validation_split(ad2: Path) -> None:
    split = load_dataset(ad2)
    assert [s.path.parent for s in split.train] == [ad2 / "train" / "good"] * 8  # nothing held out
    assert [s.path for s in split.validation] == sorted((ad2 / "validation" / "good").glob("*.png"))
    good = [s for s in split.test if s.label == 0]
    bad = [s for s in split.test if s.label == 1]
    assert len(good) == 2 and len(bad) == 3 and all(s.defect_type == "bad" for s in bad)
    for s in bad:
        assert s.mask_path == ad2 / "test_public" / "ground_truth" / "bad" / f"{s.path.stem}_mask.png"
    assert sorted(split.unlabelled) == ["test_private", "test_private_mixed"]
    assert [p.name for p in split.unlabelled["test_private_mixed"]] == [f"{i:03d}_mixed.png" for i in range(4)]
    # the dataset root plus the object, as for MVTec AD; --val-fraction 0 turns validation off
    assert load_dataset(ad2.parent, "bottle").validation == split.validation
    assert load_dataset(ad2, val_fraction=0.0).validation == []


def test_an_empty_private_split_does_not_stop_fit(ad2: Path) -> None:
    for f in (ad2 / "test_private").iterdir():
        f.unlink()
    split = load_dataset(ad2)
    assert "test_private" not in split.unlabelled and any("test_private" in w for w in split.warnings)


def test_submission_names_follow_mvtec(tmp_path: Path) -> None:
    root = tmp_path / "mvtec_ad_2"
    assert str(relative_name(root / "can" / "test_private" / "000_regular.png")) == "can/test_private/000_regular"
    assert str(relative_name(root / "can" / "test_public" / "bad" / "003_x.png")) == "can/test_public/bad/003_x"
    with pytest.raises(ConfigError, match="not inside an MVTec AD 2 test split"):
        relative_name(root / "can" / "train" / "good" / "000.png")
    assert map_float16(np.array([[1e6, -1e6, 0.5]], np.float32)).tolist() == [[65504.0, -65504.0, 0.5]]


def test_protocol_end_to_end(ad2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from anomnet.cli import EXIT_OK, main

    reads = spy_on_image_reads(monkeypatch)  # fit and calibrate read only training and validation images
    model = tmp_path / "model"
    fit = ["fit", "--data", str(ad2), "--out", str(model), "--pixel-threshold", "mean-std", *SMALL]
    assert main(fit) == EXIT_OK
    assert reads and {p.parent.parent.name for p in reads} == {"train", "validation"}
    monkeypatch.undo()
    cal = api.load(model).calibration
    # PatchCore calibrates on its 8 training images scored leave-one-out, pooled with the 4 validation images
    assert len(cal.validation_scores) == 8 + 4 and cal.pixel_method == "mean-std"
    assert cal.pixel_threshold == pytest.approx(cal.pixel_mean + 3 * cal.pixel_std)

    # anomnet test: SegF1 and AU-PRO@0.05 on test_public
    metrics_json = tmp_path / "metrics.json"
    assert main(["test", "--model-dir", str(model), "--data", str(ad2), "--json", str(metrics_json), "--quiet"]) == 0
    metrics = json.loads(metrics_json.read_text())
    assert metrics["test_images"] == 5 and metrics["pixel_metrics_images"] == 5
    for key in ("seg_f1", "au_pro@0.05", "au_pro@0.3", "pixel_auroc", "image_auroc"):
        assert 0.0 <= metrics["metrics"][key] <= 1.0, key

    # predict: the submission layout, nothing else in the folder
    sub = tmp_path / "submission"
    splits = [str(ad2 / s) for s in ("test_private", "test_private_mixed", "test_public")]
    capsys.readouterr()
    assert main(["predict", "--model-dir", str(model), *splits, "--out", str(sub), "--out-layout", "mvtec-ad2"]) == 0
    assert "MVTec AD 2 layout" in capsys.readouterr().out
    assert sorted(p.name for p in sub.iterdir()) == ["anomaly_images", "anomaly_images_thresholded"]
    for kind, suffix in (("anomaly_images", ".tiff"), ("anomaly_images_thresholded", ".png")):
        assert sorted(p.name for p in (sub / kind / "bottle").iterdir()) == sorted(
            ["test_private", "test_private_mixed", "test_public"]
        )
        assert sorted(p.name for p in (sub / kind / "bottle" / "test_private").iterdir()) == [
            f"{i:03d}_regular{suffix}" for i in range(4)
        ]
        assert sorted(p.name for p in (sub / kind / "bottle" / "test_public").iterdir()) == ["bad", "good"]
    det = api.load(model)
    for image in (ad2 / "test_private" / "001_regular.png", ad2 / "test_public" / "bad" / "000_regular.png"):
        rel = image.relative_to(ad2.parent).with_suffix("")
        amap = tifffile.imread(sub / "anomaly_images" / f"{rel}.tiff")
        mask = np.asarray(Image.open(sub / "anomaly_images_thresholded" / f"{rel}.png"))
        assert amap.dtype == np.float16 and amap.shape == (900, 900) and mask.shape == (900, 900)
        assert set(np.unique(mask).tolist()) <= {0, 255}
        (pred,) = api.predict(det, [image], keep_maps=True)
        assert pred.anomaly_map is not None and pred.mask is not None
        # the model's own map in float16 (batched with other images it may differ in the last float32 bits)
        assert np.allclose(amap.astype(np.float32), pred.anomaly_map, rtol=1e-3, atol=1e-3)
        assert np.mean((mask == 255) != pred.mask) < 1e-3 and (mask == 255).sum() == pytest.approx(
            pred.mask.sum(), rel=0.01
        )


def test_the_tiled_protocol_on_wide_frames(bottle: Path, tmp_path: Path) -> None:
    obj = build_mvtec_ad2(bottle, tmp_path / "wide", train=4, validation=2, public_good=1, public_bad=2, wide=True)
    det = api.fit(
        "patchcore",
        obj,
        tmp_path / "m",
        settings={"image_size": 64, "tile": 900},
        progress=False,
        pixel_method="mean-std",
    )
    assert det.tiling is not None
    res = api.test(tmp_path / "m", obj, progress=False)
    assert res.metrics["au_pro@0.05"] == res.metrics["au_pro@0.05"]  # computed on the 900 x 1800 masks
    sub = tmp_path / "sub"
    (row,) = api.predict(
        tmp_path / "m", [obj / "test_private" / "000_regular.png"], out_dir=sub, out_layout="mvtec-ad2"
    )
    assert row.error is None
    assert tifffile.imread(sub / "anomaly_images" / "bottle" / "test_private" / "000_regular.tiff").shape == (900, 1800)
    with pytest.raises(ConfigError, match="needs an output folder"):
        api.predict(tmp_path / "m", [obj / "test_private"], out_layout="mvtec-ad2")
    with pytest.raises(ConfigError, match="not inside an MVTec AD 2 test split"):
        api.predict(tmp_path / "m", [obj / "train" / "good"], out_dir=sub, out_layout="mvtec-ad2")
