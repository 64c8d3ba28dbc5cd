"""Calibration on the training images themselves: leave-one-image-out (memory-bank detectors), cross-fitting,
suspect training images, and calibration data that overlaps the training set (found by content hash)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tests.conftest import make_folder_dataset

from anomnet import api
from anomnet.data import Sample, iter_batches, load_dataset
from anomnet.decisions.calibrate import content_hash, find_suspects, fold_assignment
from anomnet.detectors import create_detector
from anomnet.errors import ConfigError

SMALL = {"image_size": 64, "batch_size": 4}


def _scores(det, samples: list[Sample]) -> np.ndarray:
    batch = next(iter(iter_batches(samples, len(samples), size=None)))
    return det.predict(batch.images).scores.numpy().astype(np.float64)


@pytest.mark.parametrize("extra", [{}, {"train_rotations": 2}, {"tile": 32}])
def test_leave_out_searches_the_bank_without_the_images_own_patches(folder_dataset, extra) -> None:
    train = load_dataset(folder_dataset, val_fraction=0).train[:6]
    det = create_detector("patchcore", {**SMALL, **extra})
    det.fit(train, [], progress=False)
    owner = det.model.bank_owner
    assert owner is not None and owner.shape == (det.memory_bank.shape[0],)
    assert set(owner.tolist()) == set(range(len(train)))  # every image (its tiles, its poses) has bank patches
    before = _scores(det, train)
    bank, nn = det.memory_bank, det.model.nn
    for i in (0, 3):
        with det.leave_out([i]):
            assert len(det.model.nn) == int((owner != i).sum())
            loo = _scores(det, train[i : i + 1])[0]
        # the same score as a model whose bank never held image i's patches
        ref = create_detector("patchcore", {**SMALL, **extra, "aspect": det.config.aspect})  # as fit decided
        ref.model.features = det.model.features
        ref.model.set_bank(bank[owner != i], nn.backend, nn.probe)
        assert loo == pytest.approx(_scores(ref, train[i : i + 1])[0], rel=1e-6)
        assert loo > before[i]  # its own patches made it look more normal than it is
    assert det.memory_bank is bank and det.model.nn is nn  # restored after the block
    assert np.array_equal(_scores(det, train), before)


def test_fit_calibrates_on_every_training_image_by_default(folder_dataset, tmp_path) -> None:
    det = api.fit("patchcore", folder_dataset, tmp_path / "m", settings=SMALL, progress=False)
    cal = det.calibration
    whole = load_dataset(folder_dataset, val_fraction=0).train
    assert cal.source == "loo" and len(cal.validation_scores) == len(whole) == 12  # no hold-out: all 12 calibrate
    assert cal.training_hashes == [content_hash(s.path) for s in whole]
    expected = []
    for i, s in enumerate(whole):
        with det.leave_out([i]):
            expected.append(_scores(det, [s])[0])
    assert sorted(expected) == pytest.approx(cal.validation_scores, rel=1e-6)
    assert "12 training images, each scored without its own memory-bank patches" in "\n".join(cal.summary())
    # the hold-out choice is still there, and held-out images are pooled with the left-out scores
    held = api.fit("patchcore", folder_dataset, None, settings=SMALL, calibration="holdout", progress=False)
    assert held.calibration.source == "holdout" and len(held.calibration.validation_scores) == 1
    pooled = api.fit("patchcore", folder_dataset, None, settings=SMALL, val_fraction=0.25, progress=False)
    assert pooled.calibration.source == "loo" and len(pooled.calibration.validation_scores) == 12
    assert "9 training images" in pooled.calibration.source_note and "3 good images held out" in (
        pooled.calibration.source_note
    )


def test_saved_model_recalibrates_to_the_same_numbers(folder_dataset, tmp_path) -> None:
    det = api.fit("patchcore", folder_dataset, tmp_path / "m", settings=SMALL, progress=False)
    loaded = api.load(tmp_path / "m")
    assert torch.equal(loaded.model.bank_owner, det.model.bank_owner)
    again = api.calibrate(tmp_path / "m", folder_dataset, save=False, progress=False).calibration
    assert again.source == "loo" and again.validation_scores == det.calibration.validation_scores
    assert again.pixel_tail == det.calibration.pixel_tail and again.threshold == det.calibration.threshold


def _plant_defect(root: Path) -> Path:
    """A defective image (a bright square) among the good training images."""
    image = np.asarray(Image.open(root / "test" / "blob" / "b000.png"))
    planted = root / "train" / "t005b.png"
    Image.fromarray(image).save(planted)
    return planted


def test_planted_defect_is_listed_first_and_excluded_on_request(tmp_path) -> None:
    root = make_folder_dataset(tmp_path / "data", n_train=16)
    planted = _plant_defect(root)
    det = api.fit("patchcore", root, None, settings=SMALL, progress=False)
    suspects = det.calibration.suspects
    assert suspects and suspects[0]["image"] == str(planted) and suspects[0]["rank"] == 1
    assert str(planted) in "\n".join(det.calibration.summary())
    report = tmp_path / "report.html"
    api.test(det, root, report=report, progress=False)
    page = report.read_text()
    block = page.split("<h2>Suspect training images</h2>", 1)[1].split("<h2>", 1)[0]
    assert f"1. {planted} — left-out score {suspects[0]['score']:.5g}" in block and "<img" in block
    assert "each scored without its own memory-bank patches" in page  # the calibration set, in words
    clean = api.fit("patchcore", root, tmp_path / "m", settings=SMALL, exclude_suspects=True, progress=False)
    assert str(planted) in clean.calibration.excluded
    assert content_hash(planted) not in clean.calibration.training_hashes
    assert len(clean.calibration.training_hashes) == 17 - len(clean.calibration.excluded)
    assert api.load(tmp_path / "m").calibration.excluded == clean.calibration.excluded


def test_find_suspects_uses_a_robust_margin() -> None:
    rng = np.random.default_rng(0)
    scores = rng.normal(10, 1, 40)
    samples = [Sample(Path(f"{i}.png"), 0) for i in range(42)]
    assert find_suspects(scores, samples[:40]) == []  # 40 good images: nothing stands out by 5 robust stds
    odd = np.concatenate([scores, [30.0, 20.0]])
    found = find_suspects(odd, samples)
    assert [s["image"] for s in found] == ["40.png", "41.png"] and found[0]["z"] > found[1]["z"] > 5


def test_calibrate_on_overlapping_data_finds_the_training_images(folder_dataset, tmp_path) -> None:
    # fit with a 10 % hold-out, then calibrate with a 30 % "validation" split of the same data
    det = api.fit(
        "patchcore",
        folder_dataset,
        tmp_path / "m",
        settings=SMALL,
        calibration="holdout",
        val_fraction=0.1,
        progress=False,
    )
    first = load_dataset(folder_dataset, val_fraction=0.1)
    wider = load_dataset(folder_dataset, val_fraction=0.3).validation
    trained = [s for s in wider if s.path in {t.path for t in first.train}]
    fresh = [s for s in wider if s not in trained]
    assert trained and fresh  # the 0.1 split lies inside the 0.3 split: most of it was trained on
    # a model that can leave an image out scores the training images among them that way
    cal = api.calibrate(tmp_path / "m", folder_dataset, val_fraction=0.3, save=False, progress=False).calibration
    assert f"{len(trained)} of the given images were training images of this model: each scored" in cal.source_note
    owners = [first.train.index(s) for s in trained]
    expected = list(_scores(det, fresh))
    for i, s in zip(owners, trained):
        with det.leave_out([i]):
            expected.append(_scores(det, [s])[0])
    assert cal.source == "loo" and cal.validation_scores == pytest.approx(sorted(expected), rel=1e-6)
    # one that cannot leaves them out, and says how many
    loaded = api.load(tmp_path / "m")
    loaded.model.bank_owner = None
    cal = api.calibrate(loaded, folder_dataset, val_fraction=0.3, progress=False).calibration
    assert f"{len(trained)} of the given images were training images of this model and are left out" in (
        cal.source_note
    )
    assert cal.source == "holdout" and cal.validation_scores == pytest.approx(sorted(_scores(det, fresh)), rel=1e-6)
    assert cal.achieved_false_alarm == pytest.approx(1 / (len(fresh) + 1))


def test_crossfit_scores_each_image_with_a_model_fitted_without_its_fold(folder_dataset) -> None:
    det = api.fit("patchcore", folder_dataset, None, settings=SMALL, calibration="crossfit", folds=3, progress=False)
    train = load_dataset(folder_dataset, val_fraction=0).train
    cal = det.calibration
    assert cal.source == "crossfit" and len(cal.validation_scores) == len(train)
    fold = fold_assignment(len(train), 3, 0)
    ref = create_detector("patchcore", {**SMALL, "seed": 0})
    ref.fit([s for s, f in zip(train, fold) if f != fold[0]], [], progress=False)
    score = _scores(ref, train[:1])[0]
    assert min(abs(v - score) for v in cal.validation_scores) < 1e-6 * score  # among the out-of-fold scores
    assert len(det.calibration.training_hashes) == len(train) and det.memory_bank.shape[0] == round(0.1 * 12 * 64)


def test_crossfit_can_put_each_fold_model_on_the_final_models_scale(folder_dataset) -> None:
    """``scale_to``: a fold model's scores times (final model's in-sample median / fold model's in-sample median)."""
    from anomnet.decisions.calibrate import out_of_fold_statistics

    train = load_dataset(folder_dataset, val_fraction=0).train
    tiny = {**SMALL, "num_centroids": 16, "stage1_epochs": 1, "stage2_epochs": 1, "seed": 0}
    make = lambda: create_detector("anomnet", tiny)  # noqa: E731
    final = make()
    final.fit(train, [], progress=False)
    plain = out_of_fold_statistics(make, train, [], folds=2, per_image=8)
    scaled = out_of_fold_statistics(make, train, [], folds=2, per_image=8, scale_to=final)
    fold = fold_assignment(len(train), 2, 0)
    for f in (0, 1):
        inside = [s for s, k in zip(train, fold) if k != f]
        model = make()
        model.fit(inside, [], progress=False)
        factor = np.median(_scores(final, train)) / np.median(_scores(model, inside))
        assert abs(factor - 1) > 1e-3  # the fold model is on another scale
        held = fold == f
        assert scaled.scores[held] == pytest.approx(plain.scores[held] * factor, rel=1e-5)
        for i in np.flatnonzero(held):
            assert scaled.pixels[i] == pytest.approx(plain.pixels[i] * factor, rel=1e-5)
    assert create_detector("inpformer").rescale_folds and not final.rescale_folds  # only INP-Former asks for it


def test_sources_a_detector_cannot_use_are_refused(folder_dataset) -> None:
    with pytest.raises(ConfigError, match="cannot leave one training image out"):
        api.fit("efficientad", folder_dataset, None, calibration="loo", progress=False)
    one = load_dataset(folder_dataset, val_fraction=0)
    one.train = one.train[:1]
    with pytest.raises(ConfigError, match="needs at least 2 different training images, got 1"):
        api.fit("patchcore", one, None, settings=SMALL, progress=False)
    with pytest.raises(ConfigError, match="at least 2 folds"):
        api.fit("patchcore", folder_dataset, None, settings=SMALL, calibration="crossfit", folds=1, progress=False)


def test_cli_fit_calibration_flags(folder_dataset, tmp_path, capsys) -> None:
    from anomnet.cli import main

    root = folder_dataset
    planted = _plant_defect(root)
    small = ["--image-size", "64", "--set", "batch_size=4", "--quiet"]
    assert main(["fit", "--data", str(root), "--out", str(tmp_path / "m"), *small, "--exclude-suspects"]) == 0
    out = capsys.readouterr().out
    assert "suspect training images" not in out or str(planted) not in out.split("left out")[0]
    assert f"left out 1 suspect training image(s) and refitted without them:\n  {planted}" in out
    args = ["fit", "--data", str(root), "--out", str(tmp_path / "h"), *small, "--calibration", "holdout"]
    assert main(args) == 0
    assert "supported by 1 good validation images" in capsys.readouterr().out


def test_tocoad_calibrates_leave_one_out_with_its_patch_reweighting(folder_dataset) -> None:
    settings = {**SMALL, "stage1": False, "stage2": False}  # the bank part: fine-tuning is tested elsewhere
    det = api.fit("tocoad", folder_dataset, None, settings=settings, progress=False)
    train = load_dataset(folder_dataset, val_fraction=0).train
    assert det.calibration.source == "loo" and len(det.calibration.validation_scores) == len(train)
    owner, bank, nn = det.model.bank_owner, det.memory_bank, det.model.nn
    with det.leave_out([2]):
        loo = _scores(det, train[2:3])[0]
    det.model.set_bank(bank[owner != 2], nn.backend, nn.probe)  # eq. 9's support searched in the same reduced bank
    assert loo == pytest.approx(_scores(det, train[2:3])[0], rel=1e-6)


def test_cpr_leaves_an_image_out_of_its_banks_and_retrieval(folder_dataset) -> None:
    settings = {"image_size": 64, "batch_size": 4, "train_batch_size": 2, "steps": 3, "train_crop": 32, "points": 20}
    det = api.fit("cpr", folder_dataset, None, settings=settings, calibration="loo", progress=False)
    train = load_dataset(folder_dataset, val_fraction=0).train
    assert det.calibration.source == "loo" and len(det.calibration.validation_scores) == len(train)
    m = det.model
    owner, banks, refs, fg = m.input_owner, m.banks, m.retrieval.refs, m.train_foreground
    assert owner is not None and owner.tolist() == list(range(len(train)))
    inside = _scores(det, train[4:5])[0]
    with det.leave_out([4]):
        loo = _scores(det, train[4:5])[0]
    assert all(a is b for a, b in zip(m.banks, banks)) and m.retrieval.refs is refs  # restored
    keep = owner != 4
    m.banks, m.retrieval.refs = [b[keep] for b in banks], refs[keep]
    m.train_foreground = None if fg is None else fg[keep]
    assert loo == pytest.approx(_scores(det, train[4:5])[0], rel=1e-6)
    assert loo > inside  # its own rows made it look more normal than it is


def test_auto_cross_fits_a_detector_that_trains_on_few_images(folder_dataset) -> None:
    """auto: AnomNet and INP-Former cross-fit below CROSSFIT_BELOW good training images, hold out above;
    PatchCore leaves out."""
    from anomnet.api import _image_count, resolve_source
    from anomnet.decisions.calibrate import CROSSFIT_BELOW

    anomnet = create_detector("anomnet", SMALL)
    below = CROSSFIT_BELOW["anomnet"]
    assert resolve_source("auto", anomnet, below - 1) == "crossfit"
    assert resolve_source("auto", anomnet, below) == "holdout"
    assert resolve_source("holdout", anomnet, 12) == "holdout"  # asked for: kept
    assert resolve_source("auto", create_detector("patchcore", SMALL), 12) == "loo"
    assert resolve_source("auto", create_detector("efficientad"), 12) == "holdout"
    inp = create_detector("inpformer")  # measured like AnomNet (docs/decisions.md)
    assert resolve_source("auto", inp, CROSSFIT_BELOW["inpformer"] - 1) == "crossfit"
    assert resolve_source("auto", inp, CROSSFIT_BELOW["inpformer"]) == "holdout"
    assert resolve_source("auto", create_detector("hybrid"), 12) == "loo"  # through its chosen branch
    count = _image_count(folder_dataset, None, "auto", "auto", anomnet)
    assert count == len(load_dataset(folder_dataset, val_fraction=0).train) == 12
    assert resolve_source("auto", anomnet, count) == "crossfit"
    assert _image_count(folder_dataset, None, "auto", "holdout", anomnet) is None  # not counted when not needed
