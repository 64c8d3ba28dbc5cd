"""EfficientAD: PDN geometry and cost, losses, noise patches, and the detector end to end (tiny sizes)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tests.conftest import make_folder_dataset

from anomnet import api
from anomnet.data import load_dataset
from anomnet.detectors import create_detector
from anomnet.detectors.efficientad.autoencoder import Autoencoder
from anomnet.detectors.efficientad.detector import _adam, _masked_mean
from anomnet.detectors.efficientad.distill import orthonormal_projection
from anomnet.detectors.efficientad.losses import (
    cdo_loss,
    discrepancy,
    hard_feature_loss,
    quantile_value,
    weighted_total,
)
from anomnet.detectors.efficientad.model import imagenet_normalize
from anomnet.detectors.efficientad.pdn import count_macs, map_padding, output_size, patch_offset, pdn
from anomnet.errors import ConfigError
from anomnet.synthesis.appearance import appearance_augment
from anomnet.synthesis.base import synthesize_batch
from anomnet.synthesis.noise_patches import NoisePatches, foreground_mask


# -- PDN ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("size,padding", [("s", False), ("s", True), ("m", False)])
def test_pdn_receptive_field_is_33x33(size: str, padding: bool) -> None:
    torch.manual_seed(0)
    net = pdn(size, 8, padding).double().eval()
    s = 72
    x = torch.rand(1, 3, s, s, dtype=torch.float64)
    with torch.no_grad():
        base = net(x)
        n = output_size(s, padding)
        assert base.shape[-2:] == (n, n)
        for y, xx in ((37, 40), (3, 60), (70, 0)):
            x2 = x.clone()
            x2[0, :, y, xx] += 1.0
            changed = (net(x2) - base).abs().amax(1)[0] > 0
            off = patch_offset(padding)
            rows = torch.tensor([off + 4 * i <= y <= off + 4 * i + 32 for i in range(n)])
            cols = torch.tensor([off + 4 * j <= xx <= off + 4 * j + 32 for j in range(n)])
            expected = rows[:, None] & cols[None, :]  # empty for (70, 0) without padding: no patch holds it
            assert expected.any() or (not padding and y == 70)
            assert torch.equal(changed, expected), (y, xx)


def test_output_grid_and_map_padding() -> None:
    assert output_size(256, False) == 56 and output_size(256, True) == 64
    assert map_padding(256, False) == (4, 4) and map_padding(256, True) == (0, 0)


def test_mac_count_matches_hand_count() -> None:
    # EfficientAD-S at 256 px without padding: conv outputs 253, 123, 59, 56 px
    hand = 253**2 * 128 * 3 * 16 + 123**2 * 256 * 128 * 16 + 59**2 * 256 * 256 * 9 + 56**2 * 384 * 256 * 16
    assert count_macs(pdn("s", 384), 256) == hand
    assert count_macs(pdn("m", 384), 64) > 3 * count_macs(pdn("s", 384), 64)


def test_autoencoder_shapes() -> None:
    ae = Autoencoder(64, output_size(64), 384).eval()
    assert ae(torch.rand(2, 3, 64, 64)).shape == (2, 384, 8, 8)
    with pytest.raises(ConfigError):
        Autoencoder(80, 12)


def test_orthonormal_projection_keeps_distances() -> None:
    p = orthonormal_projection(20, 64, seed=3)
    a, b = torch.randn(20), torch.randn(20)
    assert torch.allclose((p @ a - p @ b).norm(), (a - b).norm(), atol=1e-5)


# -- losses ------------------------------------------------------------------------------------
def test_hard_loss_keeps_only_the_top_quantile() -> None:
    values = torch.randperm(1000).double().reshape(1, 10, 10, 10)
    # the 0.999 quantile of 0..999 is 998.001: only 999 is at or above it
    assert hard_feature_loss(values, 0.999).item() == 999.0
    assert hard_feature_loss(values, 0.99).item() == pytest.approx(sum(range(990, 1000)) / 10)
    x = torch.rand(2, 7, 5, 5)
    assert quantile_value(x.reshape(-1), 0.93) == pytest.approx(torch.quantile(x.reshape(-1), 0.93).item())
    mask = torch.zeros(2, 5, 5, dtype=torch.bool)
    mask[1, 2, 3] = True  # only the 7 channel values of one position count
    assert hard_feature_loss(x, 0.0, mask).item() == pytest.approx(x[1, :, 2, 3].mean().item())


@pytest.mark.parametrize("q", [0.0, 0.1, 0.5, 0.93, 0.995, 0.999, 1.0])
def test_quantile_value_matches_torch_on_both_paths(q: float) -> None:
    torch.manual_seed(0)
    for x in (torch.rand(5003), torch.randint(0, 7, (4001,)).float()):  # distinct values and many ties
        assert quantile_value(x, q).item() == pytest.approx(torch.quantile(x, q).item(), abs=1e-6)


def test_reconstruction_terms_mean_over_the_kept_cells_equals_the_masked_mean() -> None:
    torch.manual_seed(0)
    err = torch.rand(2, 5, 4, 4)
    keep = torch.rand(2, 4, 4) > 0.3
    reference = err[keep[:, None].expand_as(err)].mean()  # every kept value, as before the channel means
    assert _masked_mean(err.mean(1), keep).item() == pytest.approx(reference.item(), rel=1e-6)
    assert _masked_mean(err.mean(1), torch.ones_like(keep)).item() == pytest.approx(err.mean().item(), rel=1e-6)


def test_channels_last_student_computes_the_same_outputs() -> None:
    torch.manual_seed(0)
    x = torch.rand(2, 3, 64, 64)
    net = pdn("s", 8).eval()
    with torch.no_grad():
        plain = net(x)
        net.to(memory_format=torch.channels_last)
        last = net(x.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(plain, last, atol=1e-5)


def test_adam_is_fused_where_torch_allows_and_plain_before(monkeypatch) -> None:
    params = [torch.nn.Parameter(torch.zeros(3))]
    assert _adam(params, 1e-3).defaults["fused"] is True  # torch 2.4+ on CPU
    real = torch.optim.Adam

    def old_torch_adam(*args, fused: bool | None = None, **kwargs):  # noqa: ANN202 - stands in for torch < 2.4
        if fused:
            raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of supported devices")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.optim, "Adam", old_torch_adam)
    assert not _adam(params, 1e-3).defaults["fused"]


def test_cdo_loss_on_a_hand_computed_case() -> None:
    teacher = torch.tensor([[1.0, 0.0], [1.0, 0.0], [2.0, 0.0]]).T.reshape(1, 2, 1, 3)
    student = torch.tensor([[3.0, 0.0], [0.0, 5.0], [-1.0, 0.0]]).T.reshape(1, 2, 1, 3)
    d = discrepancy(teacher, student)[0, 0]
    assert torch.allclose(d, torch.tensor([0.0, 2.0, 4.0]))
    anomalous = torch.tensor([[[False, False, True]]])
    # normal d = [0, 2], mean 1, w = [0, 4]; anomalous d = [4], w = 1: (0 + 8 - 4) / (4 + 1)
    assert cdo_loss(teacher, student, anomalous, gamma=2.0).item() == pytest.approx(0.8)
    # gamma 0: plain sums, (0 + 2 - 4) / 3
    assert cdo_loss(teacher, student, anomalous, gamma=0.0).item() == pytest.approx(-2 / 3)
    # all normal: d = [0, 2, 4], mean 2, w = [0, 1, 4]: (0 + 2 + 16) / 5
    assert cdo_loss(teacher, student, torch.zeros_like(anomalous), gamma=2.0).item() == pytest.approx(3.6)


def test_cdo_gradient_pulls_normal_and_pushes_anomalous() -> None:
    torch.manual_seed(0)
    teacher = torch.randn(1, 4, 2, 2)
    student = (teacher + 0.3 * torch.randn(1, 4, 2, 2)).requires_grad_()
    anomalous = torch.tensor([[[False, True], [False, False]]])
    cdo_loss(teacher, student, anomalous).backward()
    with torch.no_grad():
        step = student - 0.01 * student.grad
        before, after = discrepancy(teacher, student)[0], discrepancy(teacher, step)[0]
    assert after[0, 1] > before[0, 1]  # the synthetic defect moves away from the teacher
    assert (after[~anomalous[0]] <= before[~anomalous[0]] + 1e-7).all()


# -- synthetic anomalies -----------------------------------------------------------------------
def _object_image(size: int = 96) -> torch.Tensor:
    img = torch.zeros(3, size, size)
    img[:, 30:70, 20:60] = 0.7  # a gray object on a black background
    return img


def test_noise_patch_masks_match_altered_pixels() -> None:
    gen = NoisePatches(avoid_background=False)
    rng = torch.Generator().manual_seed(1)
    for _ in range(20):
        img = torch.rand(3, 80, 120) * 0.5
        out, mask = gen(img, rng)
        assert mask.shape == (80, 120) and mask.sum() > 0
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
        changed = (out != img).any(0)
        assert torch.equal(changed, mask.bool())
        assert out.min() >= 0 and out.max() <= 1
        side_max = round(80 / 10)
        assert mask.sum() <= 4 * side_max**2


def test_noise_patches_avoid_the_background() -> None:
    img = _object_image()
    fg = foreground_mask(img)
    assert fg[50, 40] and not fg[5, 5] and not fg[90, 90]
    gen = NoisePatches(avoid_background=True)
    rng = torch.Generator().manual_seed(0)
    near = torch.nn.functional.max_pool2d(fg[None, None].float(), 11, 1, 5)[0, 0] > 0  # fg grown by half a max patch
    for _ in range(30):
        _, mask = gen(img, rng)
        assert (mask.bool() & fg).any()
        assert not (mask.bool() & ~near).any()


def test_noise_patches_probability_and_seed() -> None:
    images = _object_image()[None].repeat(200, 1, 1, 1)
    out1, masks1 = synthesize_batch(NoisePatches(), images, torch.Generator().manual_seed(5), 0.4)
    out2, masks2 = synthesize_batch(NoisePatches(), images, torch.Generator().manual_seed(5), 0.4)
    assert torch.equal(out1, out2) and torch.equal(masks1, masks2)
    share = (masks1.flatten(1).amax(1) > 0).float().mean().item()
    assert 0.28 < share < 0.52


def test_appearance_augment_is_seeded_and_in_range() -> None:
    img = torch.rand(3, 32, 32)
    a = appearance_augment(img, torch.Generator().manual_seed(2))
    b = appearance_augment(img, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and a.min() >= 0 and a.max() <= 1
    changed = sum(not torch.equal(appearance_augment(img, torch.Generator().manual_seed(s)), img) for s in range(10))
    assert changed >= 8


# -- detector ----------------------------------------------------------------------------------
TINY = {
    "image_size": 64,
    "steps": 4,
    "distill_steps": 2,
    "distill_crop": 64,
    "distill_batch": 4,
    "pool_limit": 4,
    "batch_size": 4,
}


def test_settings_are_checked() -> None:
    for bad in (
        {"model_size": "l"},
        {"teacher": "x"},
        {"loss": "x"},
        {"alpha": 2},
        {"q_a": 0.99, "q_b": 0.9},
        {"image_size": 80},
        {"coeff_hard": -0.1},
        {"coeff_ood": 1001},
        {"coeff_ae": float("nan")},
        {"coeff_stae": "x"},
        {"imagenet_norm": "maybe"},
    ):
        with pytest.raises(ConfigError):
            create_detector("efficientad", bad)


def test_fit_predict_save_load(folder_dataset: Path, tmp_path: Path) -> None:
    settings = {**TINY, "teacher": "distilled", "cache_dir": str(tmp_path / "cache")}
    det = api.fit("efficientad", folder_dataset, out=tmp_path / "m", settings=settings, progress=False)
    assert det.fit_record.phase("distill").extra["cached"] is False
    res = api.test(tmp_path / "m", folder_dataset, progress=False)
    assert 0.0 <= res.metrics["image_auroc"] <= 1.0 and "au_pro@0.3" in res.metrics
    loaded = api.load(tmp_path / "m")
    x = torch.rand(3, 3, 70, 90)
    a, b = det.predict(x), loaded.predict(x)
    assert a.maps.shape == (3, 70, 90)
    assert torch.equal(a.scores, b.scores) and torch.equal(a.maps, b.maps)
    # the scores are the maxima of the fused map; alpha moves them
    loaded.config.alpha = 1.0
    assert not torch.equal(loaded.predict(x).scores, a.scores)
    # a second fit with the same settings reads the distilled teacher from the cache
    again = create_detector("efficientad", {**settings, "steps": 1})
    again.fit(list(load_dataset(folder_dataset).train), [], progress=False)
    assert again.fit_record.phase("distill").extra["cached"] is True
    for k, v in det.model.teacher.state_dict().items():
        assert torch.equal(v, again.model.teacher.state_dict()[k])


@pytest.mark.parametrize(
    "extra",
    [
        {"teacher": "backbone", "loss": "original"},
        {"model_size": "m", "padding": True, "teacher": "distilled", "cache_dir": "off"},
    ],
)
def test_variants_fit_and_reload(folder_dataset: Path, tmp_path: Path, extra: dict) -> None:
    det = api.fit(
        "efficientad", folder_dataset, out=tmp_path / "m", settings={**TINY, "steps": 2, **extra}, progress=False
    )
    x = torch.rand(2, 3, 64, 64)
    assert torch.equal(det.predict(x).maps, api.load(tmp_path / "m").predict(x).maps)


def test_bench_rescore_changes_alpha_and_restores(folder_dataset: Path, tmp_path: Path) -> None:
    from anomnet import bench

    split = load_dataset(folder_dataset)
    det = api.fit("efficientad", split, settings={**TINY, "steps": 2, "cache_dir": "off"}, progress=False)
    threshold = det.calibration.threshold
    m0 = bench.rescore(det, split, {"alpha": "0"})
    m1 = bench.rescore(det, split, {"alpha": "1"})
    assert det.config.alpha == 0.5 and det.calibration.threshold == threshold
    assert m0["pixel_auroc"] != m1["pixel_auroc"]
    assert bench._accepts(det, "alpha=0") and not bench._accepts(det, "coreset_ratio=0.1")


def _fit_on_blobs(folder: Path, steps: int):
    split = load_dataset(make_folder_dataset(folder, n_train=12, n_good=6, n_bad=6))
    det = create_detector("efficientad", {"image_size": 64, "batch_size": 4, "steps": steps, "train_batch_size": 4})
    det.fit(split.train, split.validation, progress=False)
    return det, split


def test_finds_the_defects(tmp_path: Path) -> None:
    """Bright squares on a striped texture are found (random scores or flat maps fail these bars)."""
    from anomnet.evaluation.evaluate import evaluate

    det, split = _fit_on_blobs(tmp_path / "data", steps=20)
    metrics = evaluate(det, split.test, progress=False).metrics
    assert metrics["image_auroc"] >= 0.95
    assert metrics["pixel_auroc"] >= 0.9


def test_generic_image_source_is_explicit_and_recorded(folder_dataset: Path, tmp_path: Path, monkeypatch) -> None:
    split = load_dataset(folder_dataset)
    settings = {**TINY, "steps": 1, "loss": "original", "teacher": "backbone"}
    with pytest.raises(ConfigError, match="missing"):
        create_detector("efficientad", {**settings, "pool_dir": str(tmp_path / "missing")}).fit(
            split.train, [], progress=False
        )
    monkeypatch.delenv("ANOMNET_TEXTURE_DIR", raising=False)
    det = create_detector("efficientad", settings)
    det.fit(split.train, [], progress=False)
    assert det.fit_record.data_sources["generic_images"].startswith("scikit-image sample photos")


def test_resnet_teacher_weights_travel_inside_the_model(folder_dataset: Path, tmp_path: Path, monkeypatch) -> None:
    """A saved ResNet-backed EfficientAD does not re-read $ANOMNET_WEIGHTS_DIR when it is loaded."""
    from anomnet.backbones import create_backbone
    from anomnet.detectors import Detector

    weights = tmp_path / "w"
    weights.mkdir()
    torch.manual_seed(3)
    torch.save(create_backbone("resnet18", ("layer2", "layer3"), "random").state_dict(), weights / "resnet18.pth")
    monkeypatch.setenv("ANOMNET_WEIGHTS_DIR", str(weights))
    settings = {**TINY, "steps": 1, "backbone": "resnet18", "teacher_layers": "layer2,layer3"}
    det = api.fit("efficientad", folder_dataset, out=tmp_path / "m", settings=settings, progress=False)
    other = tmp_path / "other"
    other.mkdir()
    torch.manual_seed(4)
    torch.save(create_backbone("resnet18", ("layer2", "layer3"), "random").state_dict(), other / "resnet18.pth")
    monkeypatch.setenv("ANOMNET_WEIGHTS_DIR", str(other))  # a different file: must not be read
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    loaded = Detector.load(tmp_path / "m")
    assert torch.equal(det.predict(x).maps, loaded.predict(x).maps)
    monkeypatch.setenv("ANOMNET_WEIGHTS_DIR", str(tmp_path / "empty"))
    assert torch.equal(det.predict(x).scores, Detector.load(tmp_path / "m").predict(x).scores)


# -- loss coefficients and input normalisation ------------------------------------------------
def test_weighted_total_weights_each_term() -> None:
    terms = {"hard": torch.tensor(1.5), "cdo": torch.tensor(-0.25), "ae": torch.tensor(2.0)}
    assert weighted_total(terms, {}).item() == pytest.approx(3.25)
    assert weighted_total(terms, {"hard": 0.0, "cdo": 2.0, "ae": 0.5}).item() == pytest.approx(0.5)
    # all-ones coefficients add the very same values as the plain sum
    assert torch.equal(weighted_total(terms, dict.fromkeys(terms, 1.0)), terms["hard"] + terms["cdo"] + terms["ae"])


def _first_step_losses(split, **settings) -> dict[str, float]:
    """The losses of the first training step (before any update: the terms do not depend on the coefficients)."""
    det = create_detector("efficientad", {**TINY, "steps": 1, "cache_dir": "off", **settings})
    det.fit(split.train, [], progress=False)
    return det.fit_record.phase("train").loss_first


@pytest.fixture(scope="module")
def small_split(tmp_path_factory: pytest.TempPathFactory):
    return load_dataset(make_folder_dataset(tmp_path_factory.mktemp("coeff") / "data", n_train=4))


@pytest.mark.parametrize("loss", ["cdo", "original"])
def test_each_coefficient_reaches_the_loss(small_split, loss: str) -> None:
    """Each coefficient scales its term in the total; 0 removes the term (every coefficient is 0 in one fit)."""
    ood = "cdo" if loss == "cdo" else "penalty"
    base = _first_step_losses(small_split, loss=loss)
    assert set(base) == {"total", "hard", ood, "ae", "stae"}
    assert base["total"] == pytest.approx(sum(base[k] for k in ("hard", ood, "ae", "stae")), rel=1e-5)
    for weights in ({"hard": 0.0, ood: 2.5, "ae": 0.5, "stae": 3.0}, {"hard": 2.0, ood: 0.0, "ae": 0.0, "stae": 0.0}):
        settings = {f"coeff_{'ood' if k == ood else k}": w for k, w in weights.items()}
        got = _first_step_losses(small_split, loss=loss, **settings)
        if loss == "original" and weights[ood] == 0.0:
            assert "penalty" not in got  # coeff_ood 0 skips the penalty pass, as penalty=false does
            got = {**got, "penalty": base["penalty"]}
        for k in weights:  # the terms are recorded unweighted: the same as with the default coefficients
            assert got[k] == pytest.approx(base[k], rel=1e-5), (weights, k)
        expected = sum(w * base[k] for k, w in weights.items())
        assert got["total"] == pytest.approx(expected, rel=1e-5, abs=1e-7), weights
    if loss == "original":
        assert "penalty" not in _first_step_losses(small_split, loss=loss, penalty=False)


def test_imagenet_normalize_matches_the_paper_constants() -> None:
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = torch.rand(2, 3, 8, 8)
    assert torch.allclose(imagenet_normalize(x), (x - mean) / std)
    assert torch.allclose(imagenet_normalize(mean.expand(1, 3, 4, 4)), torch.zeros(1, 3, 4, 4), atol=1e-6)


def test_imagenet_norm_feeds_student_and_autoencoder_only(small_split, tmp_path: Path) -> None:
    from anomnet.detectors import Detector

    det = create_detector("efficientad", {**TINY, "steps": 1, "imagenet_norm": True})
    det.fit(small_split.train, [], progress=False)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    seen: list[torch.Tensor] = []
    model = det.model
    hooks = [m.register_forward_pre_hook(lambda _m, a: seen.append(a[0])) for m in (model.student, model.autoencoder)]
    model.raw_maps(x)
    for h in hooks:
        h.remove()
    assert len(seen) == 2 and all(torch.allclose(s.float(), imagenet_normalize(x)) for s in seen)
    t = model.teacher_features(x)
    ((st, ae),) = model.raw_maps(x)
    model.imagenet_norm = False  # the same weights on raw inputs: other maps, same teacher
    ((st0, ae0),) = model.raw_maps(x)
    assert torch.equal(model.teacher_features(x), t)
    assert not torch.allclose(st, st0) and not torch.allclose(ae, ae0)
    model.imagenet_norm = True
    det.save(tmp_path / "m")
    loaded = Detector.load(tmp_path / "m")
    assert loaded.config.imagenet_norm is True
    assert torch.equal(det.predict(x).maps, loaded.predict(x).maps)


def test_models_saved_before_the_new_settings_still_load(small_split, tmp_path: Path) -> None:
    """A model folder whose settings lack coeff_* and imagenet_norm loads with the old behaviour."""
    import json

    from anomnet.detectors import Detector
    from anomnet.model_io import META_FILE, _config_hash

    det = create_detector("efficientad", {**TINY, "steps": 2, "train_batch": 2})  # an old alias, old settings
    det.fit(small_split.train, [], progress=False)
    det.save(tmp_path / "m")
    meta_path = tmp_path / "m" / META_FILE
    meta = json.loads(meta_path.read_text())
    for key in ("coeff_hard", "coeff_ood", "coeff_ae", "coeff_stae", "imagenet_norm"):
        del meta["config"][key]
    meta["config_sha256"] = _config_hash(meta["config"])  # as an older anomnet wrote it
    meta_path.write_text(json.dumps(meta))
    loaded = Detector.load(tmp_path / "m")
    c = loaded.config
    assert (c.coeff_hard, c.coeff_ood, c.coeff_ae, c.coeff_stae, c.imagenet_norm) == (1.0, 1.0, 1.0, 1.0, False)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    assert torch.equal(det.predict(x).scores, loaded.predict(x).scores)
    assert torch.equal(det.predict(x).maps, loaded.predict(x).maps)


@pytest.mark.parametrize("padding", [False, True])
def test_pdn_m_is_the_reference_architecture(padding: bool) -> None:
    """EfficientAD-M layer by layer as the authors' get_pdn_medium: (type, in, out, kernel, padding)."""
    from torch import nn

    p = 1 if padding else 0
    expected = [
        ("conv", 3, 256, 4, 3 * p),
        ("relu",),
        ("pool", 2, 2, p),
        ("conv", 256, 512, 4, 3 * p),
        ("relu",),
        ("pool", 2, 2, p),
        ("conv", 512, 512, 1, 0),
        ("relu",),
        ("conv", 512, 512, 3, p),
        ("relu",),
        ("conv", 512, 384, 4, 0),
        ("relu",),
        ("conv", 384, 384, 1, 0),
    ]
    layers = []
    for m in pdn("m", 384, padding):
        if isinstance(m, nn.Conv2d):
            layers.append(("conv", m.in_channels, m.out_channels, m.kernel_size[0], m.padding[0]))
        elif isinstance(m, nn.AvgPool2d):
            layers.append(("pool", m.kernel_size, m.stride, m.padding))
        else:
            assert isinstance(m, nn.ReLU)
            layers.append(("relu",))
    assert layers == expected


def test_normalized_local_map_is_a_scoring_setting(small_split, tmp_path: Path) -> None:
    """st_map=normalized: the local map is CDO's discrepancy of the L2-normalised vectors, with its own
    validation quantiles stored at fit; it travels with the saved model and is refused for a model saved
    without those quantiles."""
    from anomnet import bench
    from anomnet.detectors import Detector
    from anomnet.detectors.efficientad.model import OUT_CHANNELS

    det = create_detector("efficientad", {**TINY, "steps": 2, "cache_dir": "off"})
    det.fit(small_split.train, small_split.validation, progress=False)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    (squared, _), (normalized, _) = det.model.raw_maps(x, ("squared", "normalized"))
    with torch.no_grad(), det.model.autocast():
        s = det.model.student(x).float()[:, :OUT_CHANNELS]
    expected = discrepancy(det.model.teacher_features(x), s)
    assert torch.allclose(normalized, expected, atol=1e-5)
    assert normalized.min() >= 0 and normalized.max() <= 4 and not torch.allclose(normalized, squared)
    qn = det.model.quantiles_normalized
    assert qn is not None and qn[0] < qn[1]
    before = det.predict(x)
    det.config.st_map = "normalized"
    after = det.predict(x)
    assert not torch.equal(before.maps, after.maps)
    det.save(tmp_path / "m")
    loaded = Detector.load(tmp_path / "m")
    assert loaded.config.st_map == "normalized"
    assert torch.equal(loaded.predict(x).maps, after.maps)
    # bench --rescore st_map=... scores the same fitted model both ways
    det.config.st_map = "squared"
    assert bench._accepts(det, "st_map=normalized")
    bench.rescore(det, small_split, {"st_map": "normalized"})
    assert det.config.st_map == "squared"
    # a model saved before the setting has no such quantiles: the squared map works, the normalised one is refused
    tensors = {k: v for k, v in det.state_tensors().items() if k != "quantiles_normalized"}
    det = type(det)(det.config)
    det.load_state_tensors(tensors)
    assert det.model.quantiles_normalized is None
    assert torch.equal(det.predict(x).maps, before.maps)
    det.config.st_map = "normalized"
    with pytest.raises(ConfigError, match="st_map=normalized"):
        det.predict(x)
    with pytest.raises(ConfigError):
        create_detector("efficientad", {"st_map": "cosine"})


def test_normalized_raw_map_undoes_the_channel_standardisation(small_split, tmp_path: Path) -> None:
    """st_map=normalized_raw: CDO's discrepancy of the teacher's own vectors and the student's mapped back to
    that scale (``x * std + mean``), its validation quantiles stored at fit, refused for models saved without."""
    from anomnet.detectors import Detector
    from anomnet.detectors.efficientad.model import OUT_CHANNELS

    det = create_detector("efficientad", {**TINY, "steps": 2, "cache_dir": "off"})
    det.fit(small_split.train, small_split.validation, progress=False)
    m = det.model
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    (normalized, _), (raw, _) = m.raw_maps(x, ("normalized", "normalized_raw"))
    with torch.no_grad(), m.autocast():
        s = m.student(x).float()[:, :OUT_CHANNELS]
    t = m.teacher_features(x)
    expected = discrepancy(t * m.teacher_std + m.teacher_mean, s * m.teacher_std + m.teacher_mean)
    assert torch.allclose(raw, expected, atol=1e-5) and not torch.allclose(raw, normalized)
    qr = m.quantiles_normalized_raw
    assert qr is not None and qr[0] < qr[1]
    squared = det.predict(x)
    det.config.st_map = "normalized_raw"
    after = det.predict(x)
    assert not torch.equal(squared.maps, after.maps)
    det.save(tmp_path / "m")
    assert torch.equal(Detector.load(tmp_path / "m").predict(x).maps, after.maps)
    tensors = {k: v for k, v in det.state_tensors().items() if k != "quantiles_normalized_raw"}
    old = type(det)(det.config)
    old.load_state_tensors(tensors)
    assert old.model.quantiles_normalized_raw is None
    with pytest.raises(ConfigError, match="st_map=normalized_raw"):
        old.predict(x)


def test_tensor_names_of_old_model_folders_still_load() -> None:
    """Folders written before the state lived in one module (a backbone, a distilled and a file-backed ResNet
    teacher; written by the code of cacc1fc, 20 to 63 MB, so only their tensors' names, dtypes and shapes are
    kept in tests/data/old_models/efficientad_tensors.json) load by name into today's model."""
    import json

    record = json.loads((Path(__file__).parent / "data" / "old_models" / "efficientad_tensors.json").read_text())
    dtypes = {"F32": torch.float32, "F16": torch.float16, "I64": torch.int64}
    for old in record.values():
        det = create_detector("efficientad", old["settings"])
        tensors = {}
        for name, kind in old["tensors"].items():
            dtype, _, shape = kind.partition(" ")
            tensors[name] = torch.zeros([int(n) for n in shape.split("x") if n], dtype=dtypes[dtype])
        det.load_state_tensors(tensors)  # KeyError on a missing or unknown name, RuntimeError on a shape
        assert det.fitted
