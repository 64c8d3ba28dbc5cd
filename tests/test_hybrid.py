"""The hybrid detector: branches from registered detectors, the measured choice and its evidence, the fused map,
save / load / predict / tiling like every detector, and a choice that never reads the test set."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from tests.read_spy import spy_on_image_reads

from anomnet import api
from anomnet.detectors import Detector, create_detector
from anomnet.detectors.hybrid import FUSED, METRICS, Hybrid, Normalisation, choose, fuse
from anomnet.detectors.hybrid.selection import CandidateScore, SelectionBatch, shrink
from anomnet.errors import ConfigError
from anomnet.evaluation.metrics import PixelMetricAccumulator
from anomnet.model_io import read_model

# two quick PatchCore branches; "smooth" blurs its maps so much that small defects fade
QUICK = {
    "branches": "sharp:patchcore,smooth:patchcore",
    "image_size": 64,
    "batch_size": 4,
    "sharp.blur_sigma": 1.0,
    "smooth.blur_sigma": 24.0,
    "synthetic": "cutpaste",
    "synthetic_per_image": 3,
}


def _fit(data: Path, out: Path | None = None, **settings: object) -> Hybrid:
    det = api.fit("hybrid", data, out, settings={**QUICK, **settings}, val_fraction=0.25, progress=False)
    assert isinstance(det, Hybrid)
    return det


# -- settings -------------------------------------------------------------------------------------


def test_branch_settings_and_shared_settings() -> None:
    det = create_detector("hybrid", {"branches": "patchcore,anomnet", "anomnet.stage1_epochs": "2", "batch_size": 4})
    assert isinstance(det, Hybrid)
    assert det.config.branch_settings == {"anomnet": {"stage1_epochs": "2"}}
    pc, an = det.config.branch_configs["patchcore"], det.config.branch_configs["anomnet"]
    assert an["stage1_epochs"] == 2 and pc["batch_size"] == an["batch_size"] == 4  # set on the hybrid: every branch
    assert an["image_size"] == type(det.branch("anomnet").config)().image_size  # left at default: the branch's own
    tiled = create_detector("hybrid", {"branches": "a:patchcore,b:patchcore", "tile": 128, "b.tile": 64, "seed": 7})
    assert tiled.config.branch_configs["a"]["tile"] == 128 and tiled.config.branch_configs["b"]["tile"] == 64
    assert {c["seed"] for c in tiled.config.branch_configs.values()} == {7}
    # a saved config rebuilds the same branches, whatever the branch defaults are by then
    again = create_detector("hybrid", json.loads(json.dumps(tiled.config.to_dict())))
    assert json.dumps(again.config.branch_configs) == json.dumps(tiled.config.branch_configs)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"branches": "patchcore,nope"}, "'nope' is not a detector"),
        ({"branches": "hybrid"}, "'hybrid' is not a detector"),
        ({"branches": "patchcore,patchcore"}, "twice"),
        ({"branches": ""}, "at least one"),
        ({"branches": "patchcore", "anomnet.epochs1": 1}, "not a branch"),
        ({"branches": "patchcore", "patchcore.colour": 1}, r"branch patchcore \(patchcore\): unknown setting"),
        ({"branches": "patchcore", ".x": 1}, "BRANCH.KEY"),
        ({"mode": "vote"}, "mode='vote' is not one of"),
        ({"criterion": "loss"}, "criterion='loss'"),
    ],
)
def test_bad_settings_name_the_problem(settings: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        create_detector("hybrid", settings)


# -- the choice -----------------------------------------------------------------------------------


def test_choose_takes_the_highest_criterion_first_on_ties_never_nan() -> None:
    metrics = {
        "a": {"au_pro@0.05": 0.5},
        "b": {"au_pro@0.05": 0.7},
        "c": {"au_pro@0.05": 0.7},
        "d": {"au_pro@0.05": math.nan},
    }
    assert choose(metrics, "au_pro@0.05") == "b"
    assert choose({"x": {"m": math.nan}, "y": {"m": 0.1}}, "m") == "y"


def test_candidate_metrics_are_the_evaluations_metrics_on_shrunk_maps() -> None:
    rng = np.random.default_rng(0)
    maps = torch.from_numpy(rng.random((4, 40, 80)).astype(np.float32))
    masks = torch.zeros(4, 40, 80, dtype=torch.bool)
    masks[1:, 10:20, 20:40] = True
    maps[1:, 10:20, 20:40] += 0.5
    score = CandidateScore(side=40)
    batch = SelectionBatch(torch.zeros(4, 3, 40, 80), masks, [0, 1, 1, 1])
    score.add(_pred(maps.amax((1, 2)), maps), batch)
    small_maps, small_masks = shrink(maps, masks, 40)
    assert small_maps.shape == (4, 20, 40) and small_masks.shape == (4, 20, 40)
    acc = PixelMetricAccumulator()
    for m, k in zip(small_maps, small_masks):
        acc.add(m.numpy(), k.numpy())
    px = acc.compute(pro_limits=(0.05, 0.3))
    result = score.result()
    assert result["au_pro@0.05"] == px.au_pro[0.05] and result["pixel_f1_max"] == px.f1_max
    assert result["image_auroc"] == 1.0 and set(result) == set(METRICS)


def _pred(scores: torch.Tensor, maps: torch.Tensor):  # noqa: ANN202
    from anomnet.detectors import Prediction

    return Prediction(scores, maps)


def test_fit_chooses_by_the_criterion_and_records_the_evidence(folder_dataset: Path, tmp_path: Path) -> None:
    det = _fit(folder_dataset, tmp_path / "m")
    evidence = det.evidence
    assert set(evidence) == {"sharp", "smooth"} and all(set(v) == set(METRICS) for v in evidence.values())
    best = max(evidence, key=lambda k: evidence[k]["au_pro@0.05"])
    assert det.choice["chosen"] == best == "sharp"  # the blurred branch loses the small synthetic defects
    assert evidence["sharp"]["au_pro@0.05"] > evidence["smooth"]["au_pro@0.05"]
    phase = det.fit_record.phase("select")
    assert phase is not None and phase.extra["chosen"] == "sharp" and phase.extra["defective_images"] == 9
    assert "cutpaste" in phase.extra["source"] and phase.extra["good_images"] == 3
    assert det.fit_record.phase("sharp:coreset") is not None and det.fit_record.phase("smooth:coreset") is not None
    # saved: the chosen branch's tensors only, the choice, the evidence; loaded: the same predictions
    meta, tensors = read_model(tmp_path / "m")
    assert any(k.startswith("branch.sharp.") for k in tensors)
    assert not any(k.startswith("branch.smooth.") for k in tensors)
    assert meta["config"]["branch_configs"]["smooth"]["blur_sigma"] == 24.0
    loaded = Detector.load(tmp_path / "m")
    assert isinstance(loaded, Hybrid)
    assert loaded.choice == det.choice and "sharp" in loaded.describe_choice()
    images = torch.rand(2, 3, 64, 64)
    a, b = det.predict(images), loaded.predict(images)
    assert torch.equal(a.scores, b.scores) and torch.equal(a.maps, b.maps)
    assert torch.equal(a.maps, det.branch("sharp").predict(images).maps)  # select mode: the branch's own map


def test_leave_one_out_calibrates_through_the_chosen_branch(folder_dataset: Path) -> None:
    from anomnet.data import load_dataset
    from anomnet.decisions.calibrate import image_statistics

    det = api.fit("hybrid", folder_dataset, None, settings=QUICK, calibration="loo", progress=False)
    split = load_dataset(folder_dataset, val_fraction=0.1)  # the hybrid keeps its hold-out for the choice
    cal = det.calibration
    assert det.supports_leave_out and cal.source == "loo"
    assert len(cal.validation_scores) == len(split.train) + len(split.validation) and split.validation
    g = torch.Generator().manual_seed(0)
    inside = float(image_statistics(det, split.train[:1], 1, g).scores[0])
    with det.leave_out([0]):  # the chosen branch's bank without training image 0
        left_out = float(image_statistics(det, split.train[:1], 1, g).scores[0])
    assert left_out > inside  # its own rows made it look more normal than it is
    assert min(abs(v - left_out) for v in cal.validation_scores) <= 1e-6 * left_out  # (the scores are kept sorted)
    assert min(abs(v - inside) for v in cal.validation_scores) > 1e-6 * inside
    # a fused map cannot leave an image out: its held-out images calibrate, and it says so
    fuse = {**QUICK, "mode": "fuse"}
    fused = api.fit("hybrid", folder_dataset, None, settings=fuse, calibration="loo", progress=False)
    assert not fused.supports_leave_out and fused.calibration.source == "holdout"
    assert len(fused.calibration.validation_scores) == len(split.validation)
    with pytest.raises(ConfigError, match="fused map"):
        fused.leave_out([0])


def test_keep_branches_saves_every_branch(folder_dataset: Path, tmp_path: Path) -> None:
    _fit(folder_dataset, tmp_path / "m", keep_branches=True)
    _, tensors = read_model(tmp_path / "m")
    assert {k.split(".")[1] for k in tensors if k.startswith("branch.")} == {"sharp", "smooth"}


def test_fused_map_is_the_mean_of_the_normalised_branch_maps(folder_dataset: Path, tmp_path: Path) -> None:
    det = _fit(folder_dataset, tmp_path / "m", mode="fuse")
    assert det.choice["chosen"] == FUSED and set(det.evidence) == {"sharp", "smooth", FUSED}
    # the normalisation is each branch's mean / std on the good validation images
    from anomnet.data import load_dataset

    validation = load_dataset(folder_dataset, val_fraction=0.25).validation
    from anomnet.evaluation.evaluate import run_predictions

    maps, scores = [], []
    for _, pred in run_predictions(det.branch("sharp"), validation, 4):
        maps.append(pred.maps.double())
        scores.append(pred.scores.double())
    px, sc = torch.cat(maps), torch.cat(scores)
    norm = det.model.norms["sharp"]
    assert norm.pixel_mean == pytest.approx(float(px.mean()), rel=1e-9)
    assert norm.pixel_std == pytest.approx(float(px.std(unbiased=False)), rel=1e-6)
    assert norm.image_mean == pytest.approx(float(sc.mean())) and norm.image_std == pytest.approx(float(sc.std(False)))
    images = torch.rand(2, 3, 64, 64)
    parts = [det.branch(a).predict(images) for a in ("sharp", "smooth")]
    norms = [det.model.norms[a] for a in ("sharp", "smooth")]
    expected = [(p.maps.double() - n.pixel_mean) / n.pixel_std for p, n in zip(parts, norms)]
    fused = det.predict(images)
    assert torch.allclose(fused.maps.double(), (expected[0] + expected[1]) / 2, atol=1e-5)
    assert torch.allclose(fused.maps, fuse(parts, [det.model.norms[a] for a in ("sharp", "smooth")]).maps)
    loaded = Detector.load(tmp_path / "m")
    assert torch.equal(loaded.predict(images).maps, fused.maps)


def test_normalisation_round_trips_through_a_tensor() -> None:
    n = Normalisation(1.5, 0.25, -2.0, 4.0)
    assert Normalisation.from_tensor(n.as_tensor()) == n


def test_tiled_branches_predict_at_full_resolution(folder_dataset: Path, tmp_path: Path) -> None:
    det = _fit(folder_dataset, tmp_path / "m", tile=32, mode="auto")
    assert all(c["tile"] == 32 for c in det.config.branch_configs.values())
    chosen = det.model.used
    assert all(det.branch(a).tiling is not None for a in chosen)
    images = torch.rand(1, 3, 64, 96)  # not square: tiles cover it, the map comes back at 64 x 96
    pred = det.predict(images)
    assert pred.maps.shape == (1, 64, 96)
    assert torch.equal(Detector.load(tmp_path / "m").predict(images).maps, pred.maps)
    res = api.test(tmp_path / "m", folder_dataset, progress=False)
    assert 0.0 <= res.metrics["au_pro@0.05"] <= 1.0


# -- never the test set ---------------------------------------------------------------------------


def test_the_choice_never_reads_the_test_set(folder_dataset: Path, tmp_path: Path, monkeypatch) -> None:
    for image in (folder_dataset / "test").rglob("*.png"):
        image.write_bytes(b"poisoned: not an image")  # reading any test image would fail the fit
    reads = spy_on_image_reads(monkeypatch)
    det = _fit(folder_dataset, tmp_path / "m", mode="auto")
    assert det.choice["chosen"] in ("sharp", "smooth", FUSED)
    assert reads and all(p.parent.name == "train" for p in reads), {p.parent.name for p in reads}


def test_a_labelled_validation_set_decides_instead_of_synthetic_defects(folder_dataset: Path, tmp_path: Path) -> None:
    from tests.conftest import make_folder_dataset

    labelled = make_folder_dataset(tmp_path / "labelled", n_train=1, seed=5)  # another draw: its test part
    det = api.fit(
        "hybrid",
        folder_dataset,
        tmp_path / "m",
        settings=QUICK,
        val_fraction=0.25,
        progress=False,
        labelled=labelled,
    )
    assert isinstance(det, Hybrid)
    phase = det.fit_record.phase("select")
    assert phase is not None and phase.extra["source"] == "labelled validation set (8 images)"
    assert phase.extra["defective_images"] == 4 and phase.extra["good_images"] == 4
    assert det.calibration.labelled is not None  # the same set also serves the f1 thresholds


def test_fit_command_prints_the_choice(folder_dataset: Path, tmp_path: Path, capsys) -> None:
    from anomnet.cli import EXIT_OK, main

    sets = [a for k, v in QUICK.items() for a in ("--set", f"{k}={v}")]
    args = ["fit", "--model", "hybrid", "--data", str(folder_dataset), "--out", str(tmp_path / "m"), "--quiet"]
    assert main([*args, "--val-fraction", "0.25", *sets]) == EXIT_OK
    out = capsys.readouterr().out
    assert "hybrid: predicts with sharp" in out and "au_pro@0.05 on the selection data" in out


def test_a_folder_of_real_defect_crops_feeds_the_selection_defects(tmp_path: Path) -> None:
    from PIL import Image

    from anomnet.detectors.hybrid.config import HybridConfig
    from anomnet.detectors.hybrid.selection import make_generator

    crops = tmp_path / "crops"
    crops.mkdir()
    for i in range(2):
        Image.fromarray(np.full((12, 16, 3), 40 * i, np.uint8)).save(crops / f"c{i}.png")
    generator = make_generator(HybridConfig(branches=("patchcore",), defects=str(crops)))
    assert len(generator.crops) == 2  # type: ignore[attr-defined]
    image, mask = generator(torch.full((3, 64, 64), 0.8), torch.Generator().manual_seed(0))
    assert mask.any() and torch.equal(image[:, ~mask.bool()], torch.full((3, 64, 64), 0.8)[:, ~mask.bool()])


@pytest.mark.slow
def test_the_papers_branches_by_default_fit_save_load_and_tile(folder_dataset: Path, tmp_path: Path) -> None:
    """INP-Former and CPR (the defaults), at tiny budgets: fit, choice, save, load, tiled predict."""
    tiny = {
        "image_size": 64,
        "batch_size": 4,
        "tile": 48,
        "synthetic_per_image": 2,
        "inpformer.steps": 2,
        "inpformer.train_batch_size": 4,
        "inpformer.decoder_depth": 4,
        "cpr.steps": 2,
        "cpr.train_batch_size": 2,
        "cpr.train_crop": 32,
        "cpr.points": 20,
    }
    det = api.fit("hybrid", folder_dataset, tmp_path / "m", settings=tiny, val_fraction=0.25, progress=False)
    assert isinstance(det, Hybrid) and list(det.specs.items()) == [("inpformer", "inpformer"), ("cpr", "cpr")]
    assert set(det.evidence) == {"inpformer", "cpr"} and det.choice["chosen"] in ("inpformer", "cpr")
    assert all(c["tile"] == 48 for c in det.config.branch_configs.values())
    images = torch.rand(1, 3, 64, 80)
    pred = det.predict(images)
    assert pred.maps.shape == (1, 64, 80)
    loaded = Detector.load(tmp_path / "m")
    assert torch.allclose(loaded.predict(images).maps, pred.maps)


def test_selection_defects_lie_on_the_object_unless_asked_otherwise() -> None:
    from anomnet.detectors.hybrid.config import HybridConfig
    from anomnet.detectors.hybrid.selection import make_generator

    image = torch.zeros(3, 96, 96)
    image[:, 32:64, 32:64] = 0.8  # an object on a black background
    on_object = outside = 0
    for where in ("object", "anywhere"):
        generator = make_generator(HybridConfig(branches=("patchcore",), synthetic_where=where))
        rng = torch.Generator().manual_seed(0)
        for _ in range(20):
            _, mask = generator(image, rng)
            ys, xs = torch.nonzero(mask > 0.5, as_tuple=True)
            inside = bool(((ys.float().mean() - 47.5).abs() < 24) & ((xs.float().mean() - 47.5).abs() < 24))
            if where == "object":
                on_object += inside
            else:
                outside += not inside
    assert on_object == 20 and outside > 5


# -- golden scores: the prediction path of the hybrid pinned on real images ------------------------

# the fused prediction of two PatchCore branches at different input sizes, so each branch preprocesses on its own
GOLDEN_SETTINGS = {**QUICK, "mode": "fuse", "smooth.image_size": 48, "seed": 0}
GOLDEN = [  # 6 image scores (3 broken, 3 good), then the maps' mean and maximum (PatchCore on its default Lite1)
    112.13677215576172,
    113.27482604980469,
    136.595458984375,
    -6.524043083190918,
    -3.4009487628936768,
    -2.2883400917053223,
    4.447941780090332,
    11.450165748596191,
]


@pytest.mark.slow
def test_hybrid_scores_are_unchanged(bottle: Path) -> None:
    from anomnet.data import iter_batches, load_dataset

    split = load_dataset(bottle)
    det = create_detector("hybrid", GOLDEN_SETTINGS)
    det.fit(split.train[:8], split.validation[:3], progress=False)
    batch = next(iter(iter_batches(split.test[:3] + split.test[-3:], 6, size=96)))
    pred = det.predict(batch.images)
    got = [float(v) for v in pred.scores] + [float(pred.maps.mean()), float(pred.maps.amax())]
    assert pred.maps.shape == (6, 96, 96)
    assert got == pytest.approx(GOLDEN, rel=1e-4)
