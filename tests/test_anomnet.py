"""AnomNet: the loss functions on hand-computed cases, and the detector end to end on small synthetic data."""

from __future__ import annotations

import math

import pytest
import torch

from anomnet import api
from anomnet.data import load_dataset
from anomnet.detectors import Detector, create_detector
from anomnet.detectors import anomnet as am
from anomnet.detectors.anomnet import detector as am_detector
from anomnet.detectors.anomnet.losses import (
    attraction_loss,
    centroid_entropy,
    contrastive_losses,
    nearest_centroid,
    pseudo_labels,
    sample_rows,
    separation_loss,
    squared_distances,
)
from anomnet.errors import ConfigError, NotFittedError
from anomnet.evaluation.evaluate import evaluate

SMALL = {
    "image_size": 64,
    "batch_size": 4,
    "train_batch_size": 4,
    "num_centroids": 16,
    "stage1_epochs": 2,
    "stage2_epochs": 2,
    "init_samples": 2000,
}

# The paper's Table 1 variants (and the lambda sweep) as settings; the same table is in docs/anomnet.md.
VARIANTS = {
    "a": {"stages": 1, "use_att": True, "use_sep": True, "use_ent": True, "use_con": False},
    "b": {"stages": 1, "use_att": True, "use_sep": True, "use_ent": True, "use_con": True},
    "c": {"stages": 2, "use_att": True, "use_sep": False, "use_ent": False, "use_con": False},
    "d": {"stages": 2, "use_att": True, "use_sep": False, "use_ent": True, "use_con": False},
    "e": {"stages": 2, "use_att": True, "use_sep": True, "use_ent": False, "use_con": False},
    "f": {"stages": 2, "use_att": True, "use_sep": True, "use_ent": True, "use_con": False},
    "g": {},
    "lambda": {"lambda_con": 0.2},
}


def t(*rows: tuple[float, ...]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


# -- losses ------------------------------------------------------------------------------


def test_attraction_is_the_mean_squared_distance_to_the_nearest_centroid() -> None:
    feats = t((0, 0), (3, 4))
    centroids = t((0, 1), (3, 0))
    # f1: 1 (to C1) vs 9; f2: 18 vs 16 (to C2) -> (1 + 16) / 2
    assert attraction_loss(feats, centroids).item() == pytest.approx(8.5)


def test_attraction_gradient_equals_the_min_formulation() -> None:
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(50, 4, dtype=torch.float64, generator=g, requires_grad=True)
    cents = torch.randn(6, 4, dtype=torch.float64, generator=g, requires_grad=True)
    attraction_loss(feats, cents).backward()
    grads = feats.grad.clone(), cents.grad.clone()
    feats.grad = cents.grad = None
    squared_distances(feats, cents).min(1).values.mean().backward()
    assert torch.allclose(grads[0], feats.grad) and torch.allclose(grads[1], cents.grad)


def test_nearest_centroid_in_chunks() -> None:
    g = torch.Generator().manual_seed(1)
    feats, cents = torch.randn(1000, 8, generator=g), torch.randn(30, 8, generator=g)
    d2, idx = nearest_centroid(feats, cents, chunk=64)
    ref = squared_distances(feats, cents)
    assert torch.equal(idx, ref.argmin(1))
    assert torch.allclose(d2, ref.min(1).values, atol=1e-4)


def test_separation_hinge() -> None:
    two = t((0, 0), (0.3, 0.4))  # 0.5 apart
    assert separation_loss(two, theta=1.0).item() == pytest.approx(0.5)
    assert separation_loss(two, theta=0.2).item() == 0.0  # farther than theta: no loss
    three = t((0, 0), (3, 0), (0, 4))  # pair distances 3, 4, 5
    assert separation_loss(three, theta=4.5).item() == pytest.approx((1.5 + 0.5 + 0.0) / 3)
    assert separation_loss(t((1, 2)), theta=1.0).item() == 0.0


def test_separation_has_finite_gradients_for_identical_centroids() -> None:
    c = torch.zeros(3, 4, requires_grad=True)
    separation_loss(c, 1.0).backward()
    assert torch.isfinite(c.grad).all()


def test_gaussian_entropy_of_a_known_centroid_set() -> None:
    # (+-1, 0), (0, +-1): mean 0, unbiased variances 2/3 per axis, no covariance
    c = t((1, 0), (-1, 0), (0, 1), (0, -1))
    expected = 0.5 * (2 * math.log(2 * math.pi * math.e) + 2 * math.log(2 / 3))
    assert centroid_entropy(c, "diag", eps=0.0).item() == pytest.approx(expected)
    assert centroid_entropy(c, "logdet", eps=0.0).item() == pytest.approx(expected)
    # correlated set: the full covariance sees the correlation, the diagonal does not
    c = t((0, 0), (2, 0), (0, 2))  # variances 4/3, covariance -2/3, det 4/3
    assert centroid_entropy(c, "logdet", eps=0.0).item() == pytest.approx(
        0.5 * (2 * math.log(2 * math.pi * math.e) + math.log(4 / 3))
    )
    assert centroid_entropy(c, "diag", eps=0.0).item() == pytest.approx(
        0.5 * (2 * math.log(2 * math.pi * math.e) + 2 * math.log(4 / 3))
    )


def test_entropy_is_finite_when_there_are_fewer_centroids_than_dimensions() -> None:
    c = torch.randn(3, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for est in ("diag", "logdet"):
        assert math.isfinite(centroid_entropy(c, est).item())
    spread = centroid_entropy(2 * c, "logdet") - centroid_entropy(c, "logdet")
    assert spread.item() > 0  # wider sets have more entropy
    with pytest.raises(ConfigError, match="entropy"):
        centroid_entropy(c, "nope")


def test_pseudo_labels_are_the_nearest_centroid() -> None:
    feats = t((0, 0), (3, 4), (2.9, 0))
    centroids = t((0, 1), (3, 0))
    assert pseudo_labels(feats, centroids).tolist() == [0, 1, 1]


def test_contrastive_terms_on_vectors_at_0_60_90_degrees() -> None:
    def at(deg: float, r: float = 1.0) -> tuple[float, float]:
        return (r * math.cos(math.radians(deg)), r * math.sin(math.radians(deg)))

    feats = t(at(0), at(60, 2.0), at(90, 0.5))  # lengths do not matter: features are L2-normalised
    labels = torch.tensor([0, 0, 1])
    l_pos, l_neg = contrastive_losses(feats, labels, margin=0.1)
    assert l_pos.item() == pytest.approx(1 - 0.5)  # the one same-label pair: cos 60 = 0.5
    # different-label pairs: cos 90 = 0 (below the margin: 0) and cos 30 = 0.866 (0.766)
    assert l_neg.item() == pytest.approx((0.0 + (math.sqrt(3) / 2 - 0.1)) / 2)
    # a single label: no negative pairs; all distinct labels: no positive pairs
    assert contrastive_losses(feats, torch.tensor([0, 0, 0]))[1].item() == 0.0
    assert contrastive_losses(feats, torch.tensor([0, 1, 2]))[0].item() == 0.0


def test_sample_rows_bounds_the_contrastive_batch() -> None:
    g = torch.Generator().manual_seed(0)
    rows = sample_rows(10_000, 2048, g)
    assert rows is not None and rows.shape == (2048,) and rows.unique().numel() == 2048 and int(rows.max()) < 10_000
    assert sample_rows(100, 2048, g) is None  # few enough: every row


def test_training_never_builds_a_larger_similarity_matrix(folder_dataset, monkeypatch) -> None:
    sizes: list[int] = []
    real = am_detector.contrastive_losses

    def spy(feats, labels, margin=0.1):
        sizes.append(feats.shape[0])
        return real(feats, labels, margin)

    monkeypatch.setattr(am_detector, "contrastive_losses", spy)
    split = load_dataset(folder_dataset)
    det = create_detector("anomnet", {**SMALL, "con_samples": 100, "stage1_epochs": 1, "stage2_epochs": 1})
    det.fit(split.train, split.validation, progress=False)
    assert sizes and max(sizes) == 100  # a batch holds 4 * 8 * 8 = 256 features


def test_separation_term_samples_its_centroids_above_sep_samples(folder_dataset, monkeypatch) -> None:
    sizes: list[int] = []
    real = am_detector.separation_loss

    def spy(centroids, theta):
        sizes.append(centroids.shape[0])
        return real(centroids, theta)

    monkeypatch.setattr(am_detector, "separation_loss", spy)
    split = load_dataset(folder_dataset)
    settings = {**SMALL, "stage1_epochs": 1, "stage2_epochs": 0}
    det = create_detector("anomnet", {**settings, "sep_samples": 8})
    det.fit(split.train, split.validation, progress=False)
    assert det.model.centroids.shape[0] == 16 and sizes and set(sizes) == {8}  # a pair matrix of 8 x 8, not 16 x 16
    sizes.clear()
    det = create_detector("anomnet", {**settings, "sep_samples": 0})  # 0: every centroid, the paper's term
    det.fit(split.train, split.validation, progress=False)
    assert sizes and set(sizes) == {16}


# -- the detector ----------------------------------------------------------------------


def test_fit_predict_finds_the_defects(folder_dataset, tmp_path) -> None:
    # hold-out calibration: the maps are normalised with the held-out images, which then lie in [0, 1]
    det = api.fit("anomnet", folder_dataset, tmp_path / "m", settings=SMALL, calibration="holdout", progress=False)
    split = load_dataset(folder_dataset)
    res = evaluate(det, split.test, progress=False)
    assert res.metrics["image_auroc"] == 1.0
    assert res.metrics["pixel_auroc"] > 0.9
    assert det.model.centroids.shape[0] == 16
    # min-max normalised with the validation maps: good validation images lie in [0, 1]
    assert det.calibration.validation_scores and max(det.calibration.validation_scores) <= 1.0 + 1e-6
    assert min(det.calibration.validation_scores) >= 0.0


def test_maps_come_back_at_input_resolution(folder_dataset) -> None:
    det = api.fit("anomnet", folder_dataset, None, settings={**SMALL, "crop": 56}, progress=False)
    pred = det.predict(torch.rand(2, 3, 90, 70))
    assert pred.scores.shape == (2,) and pred.maps.shape == (2, 90, 70)
    assert torch.isfinite(pred.maps).all()


def test_save_load_gives_bit_identical_scores(folder_dataset, tmp_path) -> None:
    det = api.fit("anomnet", folder_dataset, tmp_path / "m", settings={**SMALL, "adapter_kernel": 3}, progress=False)
    loaded = Detector.load(tmp_path / "m")
    x = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    a, b = det.predict(x), loaded.predict(x)
    assert torch.equal(a.scores, b.scores) and torch.equal(a.maps, b.maps)
    assert loaded.calibration == det.calibration
    assert loaded.config == det.config


def _collapse_run(folder_dataset, adapter: str) -> list[dict]:
    """Attraction only, at a high learning rate: the setting that invites collapse."""
    split = load_dataset(folder_dataset)
    settings = {
        **SMALL,
        "adapter": adapter,
        "stages": 1,
        "use_sep": False,
        "use_ent": False,
        "use_con": False,
        "lr": 0.01,
        "stage1_epochs": 30,
        "num_centroids": 4,
    }
    det = create_detector("anomnet", settings)
    det.fit(split.train, split.validation, progress=False)
    return det.history


def test_collapse_guard_keeps_the_feature_variance(folder_dataset) -> None:
    """The residual branch's norm is bounded by max_residual = 0.5: variance floor (1 - 0.5)^2."""
    floor = (1 - create_detector("anomnet").config.max_residual) ** 2
    guarded = _collapse_run(folder_dataset, "residual")
    unguarded = _collapse_run(folder_dataset, "plain")
    ratio = lambda h: h[-1]["feature_variance"] / h[0]["feature_variance"]  # noqa: E731
    assert ratio(guarded) >= floor
    assert ratio(unguarded) < floor / 2  # without the guard the same training collapses: the test can fail


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_ablation_variants_build_and_train(folder_dataset, variant) -> None:
    split = load_dataset(folder_dataset)
    settings = {
        k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in VARIANTS[variant].items()
    }  # as --set gives them
    det = create_detector("anomnet", {**SMALL, **settings, "stage1_epochs": 1, "stage2_epochs": 1})
    det.fit(split.train[:6], split.validation, progress=False)
    pred = det.predict(torch.rand(1, 3, 64, 64))
    assert torch.isfinite(pred.maps).all()
    stages = {h["stage"] for h in det.history}
    assert stages == ({"init", 1} if det.config.stages == 1 else {"init", 1, 2})


def test_residual_bound_holds_for_any_weights() -> None:
    for kernel in (1, 3):
        adapter = am.CoordConvAdapter(12, "residual", rank=4, kernel=kernel, max_residual=0.5)
        torch.nn.init.normal_(adapter.up.weight, std=3.0)
        f1, f2 = torch.randn(2, 1, 12, 5, 5, generator=torch.Generator().manual_seed(kernel))
        # same locations, different features: the adapted difference keeps >= (1 - rho) of its norm
        diff = (adapter(f1) - adapter(f2)).norm()
        assert diff >= 0.5 * (f1 - f2).norm() - 1e-5


def test_row_and_map_paths_agree(folder_dataset) -> None:
    """A 1x1 adapter trains on sampled rows and predicts on maps: both must compute the same thing."""
    adapter = am.CoordConvAdapter(6, "residual", rank=3, kernel=1, coord_weight=2.0)
    torch.nn.init.normal_(adapter.up.weight)
    f = torch.randn(2, 6, 4, 5)
    rows = adapter.forward_rows(f.permute(0, 2, 3, 1).reshape(-1, 6), am.coordinates(4, 5).repeat(2, 1))
    assert torch.allclose(adapter(f), rows, atol=1e-6)
    plain = am.CoordConvAdapter(6, "plain", kernel=1)
    grid = torch.cat([f, am.coordinates(4, 5).T.reshape(1, 2, 4, 5).expand(2, -1, -1, -1)], 1)
    assert torch.allclose(plain(f), plain.conv(grid).permute(0, 2, 3, 1).reshape(-1, 6), atol=1e-6)


def test_default_layers_per_backbone_family() -> None:
    assert create_detector("anomnet").features.backbone.layers == ("stage2", "stage3", "stage4")
    assert create_detector("anomnet", {"backbone": "resnet18"}).features.backbone.layers == (
        "layer1",
        "layer2",
        "layer3",
    )
    assert create_detector("anomnet", {"layers": "stage3,stage5"}).features.backbone.layers == ("stage3", "stage5")


@pytest.mark.parametrize("normalize", ["scale", "channel"])
def test_feature_normalisations_train_and_reload(folder_dataset, tmp_path, normalize) -> None:
    det = api.fit("anomnet", folder_dataset, tmp_path / "m", settings={**SMALL, "normalize": normalize}, progress=False)
    loaded = Detector.load(tmp_path / "m")
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    assert torch.equal(det.predict(x).maps, loaded.predict(x).maps)
    if normalize == "scale":  # one scalar for every channel, no centring
        assert torch.all(det.model.feat_mean == 0) and torch.all(det.model.feat_std == det.model.feat_std[0])


def test_bad_settings_are_refused() -> None:
    for bad in (
        {"adapter": "mlp"},
        {"entropy": "knn"},
        {"stages": "3"},
        {"num_centroids": "0"},
        {"centroid_init": "random"},
        {"adapter_kernel": "2"},
        {"max_residual": "1"},
        {"normalize": "l2"},
    ):
        with pytest.raises(ConfigError):
            create_detector("anomnet", bad)
    with pytest.raises(NotFittedError, match="not fitted"):
        create_detector("anomnet", SMALL).predict(torch.rand(1, 3, 64, 64))
    with pytest.raises(ConfigError, match="max_residual=1.0"):
        create_detector("anomnet", {"max_residual": "1"})


def test_old_setting_names_keep_their_meaning() -> None:
    """Before the naming scheme: epochs1/epochs2, and batch_size was the training batch."""
    old = create_detector("anomnet", {"epochs1": "3", "epochs2": "4", "batch_size": "8"}).config
    assert (old.stage1_epochs, old.stage2_epochs, old.train_batch_size, old.batch_size) == (3, 4, 8, 8)
    new = create_detector("anomnet", {"batch_size": "8"}).config
    assert (new.batch_size, new.train_batch_size) == (8, 32)


def test_fit_record_holds_the_stages(folder_dataset, tmp_path) -> None:
    det = api.fit("anomnet", folder_dataset, tmp_path / "m", settings=SMALL, progress=False)
    names = [p.name for p in det.fit_record.phases]
    assert names == ["features", "init", "stage1", "stage2", "normalisation"]
    stage1 = det.fit_record.phase("stage1")
    assert stage1 is not None and stage1.steps == 2 and "att" in stage1.loss_last
    loaded = Detector.load(tmp_path / "m")
    assert [p.name for p in loaded.fit_record.phases] == names and len(loaded.history) == 5


def test_resnet_weights_travel_inside_the_model(folder_dataset, tmp_path, monkeypatch) -> None:
    from anomnet.backbones import create_backbone

    net = create_backbone("resnet18", ("layer1", "layer2", "layer3"), "random")
    torch.save(net.state_dict(), tmp_path / "r18.pth")
    settings = {**SMALL, "backbone": "resnet18", "weights": str(tmp_path / "r18.pth")}
    det = api.fit("anomnet", folder_dataset, tmp_path / "m", settings=settings, progress=False)
    (tmp_path / "r18.pth").unlink()  # the saved model must not need the file any more
    monkeypatch.setenv("ANOMNET_WEIGHTS_DIR", str(tmp_path / "elsewhere"))  # nor the weights folder
    loaded = Detector.load(tmp_path / "m")
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    assert torch.equal(det.predict(x).maps, loaded.predict(x).maps)
    with pytest.raises(NotFittedError, match="weights"):
        create_detector("anomnet", settings).extract(x)


def test_centroid_ratio_sets_the_count_and_coreset_init_picks_training_features(folder_dataset) -> None:
    det = create_detector("anomnet", {**SMALL, "num_centroids": 8, "centroid_ratio": 0.05, "centroid_init": "coreset"})
    assert det.centroid_count(1000) == 50 and det.centroid_count(100) == 8  # never below num_centroids
    split = load_dataset(folder_dataset)
    det.fit(split.train, split.validation, progress=False)
    n_patches = det.training_count(split.train) * (SMALL["image_size"] // 8) ** 2
    assert det.model.centroids.shape[0] == det.centroid_count(n_patches)
    with pytest.raises(ConfigError):
        create_detector("anomnet", {"centroid_ratio": 1.5})
