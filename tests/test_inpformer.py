"""INP-Former: losses on hand-computed cases, the INP extractor, the decoder's attention restriction, the
optimiser, and the detector end to end (fit / test / predict / save / load / tiling) on tiny data."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tests.conftest import make_folder_dataset
from tests.test_vit_backbone import dinov2_state

from anomnet import api
from anomnet.backbones.vit import ViTExtractor
from anomnet.data import Sample, load_dataset
from anomnet.detectors import create_detector
from anomnet.detectors.inpformer import INPDecoderBlock, INPExtractorBlock, INPFormer
from anomnet.detectors.inpformer.detector import augment
from anomnet.detectors.inpformer.losses import coherence_loss, scale_gradient, soft_mining_loss
from anomnet.detectors.inpformer.model import auto_heads, split_evenly
from anomnet.detectors.inpformer.optim import StableAdamW, warm_cosine
from anomnet.errors import ConfigError, ModelFormatError, NotFittedError
from anomnet.imageio import read_image, to_tensor

TINY = {"image_size": 64, "steps": 4, "train_batch_size": 4, "batch_size": 4, "decoder_depth": 4}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# -- losses ------------------------------------------------------------------------------------------
def test_coherence_loss_by_hand() -> None:
    tokens = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [-1.0, 0.0]]])  # [1, 3, 2]
    inps = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])  # [1, 2, 2]
    loss, dist = coherence_loss(tokens, inps)
    c45 = 1.0 / math.sqrt(2.0)
    # token 1 lies on INP 1; token 2 is 45 degrees from INP 2; token 3 is 135 degrees from INP 2, 180 from INP 1
    expected = torch.tensor([[0.0, 1.0 - c45, 1.0 + c45]])
    assert torch.allclose(dist, expected, atol=1e-6)
    assert loss.item() == pytest.approx(float(expected.mean()), abs=1e-6)


def test_coherence_loss_pulls_each_token_to_its_nearest_inp_only() -> None:
    tokens = torch.tensor([[[1.0, 0.1], [0.1, 1.0]]])
    inps = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]], requires_grad=True)
    loss, _ = coherence_loss(tokens, inps)
    loss.backward()
    assert inps.grad is not None
    assert inps.grad[0, 0].abs().sum() > 0 and inps.grad[0, 1].abs().sum() > 0
    assert torch.equal(inps.grad[0, 2], torch.zeros(2))  # nobody's nearest INP: no gradient


def test_soft_mining_value_is_the_global_cosine_loss() -> None:
    en = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])  # [1, C=2, h=1, w=2]: locations (1, 0) and (0, 1)
    de = torch.tensor([[[[1.0, 1.0]], [[0.0, 1.0]]]])  # locations (1, 0) and (1, 1)
    # vec(en) = (1, 0, 0, 1), vec(de) = (1, 1, 0, 1): cos = 2 / (sqrt 2 * sqrt 3)
    expected = 1.0 - 2.0 / (math.sqrt(2.0) * math.sqrt(3.0))
    for gamma in (0.0, 3.0):
        loss = soft_mining_loss([en], [de], gamma)
        assert loss.item() == pytest.approx(expected, abs=1e-6)
    two = soft_mining_loss([en, en], [de, en], 3.0)  # mean over groups: a perfect group counts 0
    assert two.item() == pytest.approx(expected / 2, abs=1e-6)


def test_soft_mining_reweights_the_gradient_toward_hard_locations() -> None:
    torch.manual_seed(1)
    en = torch.randn(2, 8, 3, 3)
    de = (en + 0.3 * torch.randn(2, 8, 3, 3)).requires_grad_(True)
    plain = de.detach().clone().requires_grad_(True)
    (1.0 - F.cosine_similarity(en.flatten(1), plain.flatten(1), dim=1)).mean().backward()
    soft_mining_loss([en], [de], gamma=3.0).backward()
    d = 1.0 - F.cosine_similarity(en, de.detach(), dim=1)  # [2, 3, 3] per-location distances
    factor = (d / d.mean()) ** 3
    assert de.grad is not None and plain.grad is not None
    assert torch.allclose(de.grad, plain.grad * factor[:, None], atol=1e-6)
    hard = d.flatten().argmax()
    easy = d.flatten().argmin()
    assert factor.flatten()[hard] > 1.0 > factor.flatten()[easy]  # hard locations get more, easy ones less


def test_scale_gradient_keeps_the_value() -> None:
    x = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    y = scale_gradient(x, torch.tensor([0.0, 2.0, 0.5]))
    assert torch.equal(y, x.detach())
    y.sum().backward()
    assert x.grad is not None and torch.equal(x.grad, torch.tensor([0.0, 2.0, 0.5]))


# -- extractor, decoder, model -----------------------------------------------------------------------
def test_inp_extractor_shapes_and_its_tokens_are_the_images_own() -> None:
    block = INPExtractorBlock(dim=24, heads=2).eval()
    queries = torch.randn(3, 6, 24)
    tokens = torch.randn(3, 50, 24)
    out = block(queries, tokens)
    assert out.shape == (3, 6, 24)
    other = tokens.clone()
    other[1] = torch.randn(50, 24)  # another image in the batch changes
    out2 = block(queries, other)
    assert torch.equal(out2[0], out[0]) and torch.equal(out2[2], out[2])  # each image's INPs from its own tokens
    assert not torch.allclose(out2[1], out[1])


def test_model_extracts_m_inps_per_image_at_train_and_test_time() -> None:
    det = INPFormer(INPFormer.config_class.from_dict({**TINY, "num_inps": 5}))  # type: ignore[arg-type]
    feats = det.model.encode(torch.rand(2, 3, 64, 64))
    assert feats.shape == (2, 24 + 40 + 80, 8, 8)  # lite0 stage2-4 on the stride-8 grid
    det.model.train()
    targets, recon, tokens, inps = det.model.reconstruct(feats)
    assert tokens.shape == (2, 64, 144) and inps.shape == (2, 5, 144)
    assert [t.shape[1] for t in targets] == [24, 40, 80] and [r.shape for r in recon] == [t.shape for t in targets]
    det.model.eval()
    with torch.no_grad():
        assert torch.allclose(det.model.extract_inps(tokens), inps, atol=1e-6)  # same INPs in eval mode


def test_decoder_attends_only_to_the_inps() -> None:
    block = INPDecoderBlock(dim=16, heads=4).eval()
    tokens = torch.randn(2, 30, 16)
    inps = torch.randn(2, 6, 16)
    attn, values = block.attention(tokens, inps)
    assert attn.shape == (2, 4, 30, 6)  # every token's keys are the 6 INPs, nothing else
    assert values.shape == (2, 4, 6, 4)
    out = block(tokens, inps)
    # a token sees no other token: changing token 7 changes output 7 only
    moved = tokens.clone()
    moved[:, 7] = torch.randn(2, 16)
    out2 = block(moved, inps)
    changed = (out2 - out).abs().amax(-1) > 1e-6
    assert changed[:, 7].all() and changed.sum() == 2
    # no residual path from the token: its values come from the INPs alone. LayerNorm makes a token and
    # the same token scaled by 3 give the same query, so a residual connection would be the only
    # difference between their outputs.
    assert torch.allclose(block(3.0 * tokens, inps), out, atol=1e-5)
    # and with the INPs changed the output changes for every token
    assert ((block(tokens, inps + torch.randn_like(inps)) - out).abs().amax(-1) > 1e-4).all()


def test_decoder_output_without_inps_carries_no_trace_of_the_image() -> None:
    """With every INP value projected to zero the decoder output is the same constant for any image."""
    block = INPDecoderBlock(dim=8, heads=2).eval()
    with torch.no_grad():
        block.kv.weight[8:] = 0.0  # value half of the kv projection
        block.kv.bias[8:] = 0.0
    a = block(torch.randn(1, 10, 8), torch.randn(1, 6, 8))
    b = block(torch.randn(1, 10, 8), torch.randn(1, 6, 8))
    assert torch.allclose(a, b, atol=1e-6) and torch.allclose(a, a[:, :1].expand_as(a), atol=1e-6)


def test_groups_heads_and_fuse_modes() -> None:
    assert split_evenly(8, 2) == [[0, 1, 2, 3], [4, 5, 6, 7]] and split_evenly(5, 3) == [[0, 1], [2, 3], [4]]
    with pytest.raises(ConfigError):
        split_evenly(2, 3)
    assert [auto_heads(d) for d in (384, 768, 1024, 144, 120, 7)] == [6, 12, 16, 2, 2, 1]
    det = INPFormer(INPFormer.config_class.from_dict({**TINY, "decoder_depth": 8}))  # type: ignore[arg-type]
    assert det.model.fuse == "concat" and det.model.level_groups == [[0], [1], [2]]
    assert det.model.decoder_groups == [[0, 1, 2], [3, 4, 5], [6, 7]]
    with pytest.raises(ConfigError, match="one width"):
        create_detector("inpformer", {**TINY, "fuse": "mean"})
    with pytest.raises(ConfigError, match="decoder_depth"):
        create_detector("inpformer", {**TINY, "decoder_depth": 2})
    with pytest.raises(ConfigError, match="patch_size"):
        create_detector("inpformer", {"patch_size": 2})


# -- optimiser, augmentation ---------------------------------------------------------------------------
def test_stable_adamw_equals_adamw_until_the_update_is_clipped() -> None:
    torch.manual_seed(0)
    w1 = torch.nn.Parameter(torch.randn(5, 5))
    w2 = torch.nn.Parameter(w1.detach().clone())
    stable = StableAdamW([w1], lr=0.01, weight_decay=0.1, eps=1e-8)
    plain = torch.optim.AdamW([w2], lr=0.01, weight_decay=0.1, eps=1e-8)
    for _ in range(3):  # steady gradients: RMS(g / denom) stays near 1, no clipping
        g = torch.ones(5, 5)
        w1.grad, w2.grad = g.clone(), g.clone()
        stable.step()
        plain.step()
    assert torch.allclose(w1, w2, atol=1e-6)
    w1.grad = torch.full((5, 5), 1000.0)  # a sudden spike: Adam's step ~ lr * 1000 / sqrt(0.001 * 1000^2)
    w2.grad = w1.grad.clone()
    before = w1.detach().clone()
    stable.step()
    plain.step()
    assert (w1 - before * (1 - 0.01 * 0.1)).abs().max() < (w2 - before * (1 - 0.01 * 0.1)).abs().max()


def test_warm_cosine_schedule() -> None:
    assert warm_cosine(0, 100, 10) == pytest.approx(0.1)
    assert warm_cosine(9, 100, 10) == pytest.approx(1.0)
    assert warm_cosine(10, 100, 10) == pytest.approx(1.0)
    assert warm_cosine(100, 100, 10) == pytest.approx(0.1)
    assert warm_cosine(55, 100, 10) == pytest.approx(0.55)


def test_step_budget_follows_epochs_with_a_cap() -> None:
    det = create_detector("inpformer", {"epochs": 10, "train_batch_size": 16, "max_steps": 100})
    assert isinstance(det, INPFormer)
    assert det.step_budget(29) == 19  # ceil(10 * 29 / 16), a PIPED class
    assert det.step_budget(189) == 100  # 119 capped at max_steps
    assert det.step_budget(5) == 10  # fewer images than a batch: the batch is all of them, 10 passes
    assert create_detector("inpformer", {"steps": 7}).step_budget(1000) == 7  # type: ignore[attr-defined]
    assert create_detector("inpformer", {"epochs": 0}).step_budget(10) == 1  # type: ignore[attr-defined]


def test_augment_flips_and_zooms() -> None:
    images = torch.rand(64, 3, 16, 16)
    g = torch.Generator().manual_seed(0)
    flipped = augment(images, True, 0.0, g)
    same = [torch.equal(a, b) for a, b in zip(flipped, images)]
    assert 0 < sum(same) < 64  # some images flipped, some not
    for a, b in zip(flipped, images):  # each is the image or one of its flips
        assert any(torch.equal(a, v) for v in (b, b.flip(-1), b.flip(-2), b.flip(-1).flip(-2)))
    zoomed = augment(images, False, 0.3, g)
    assert zoomed.shape == images.shape and not torch.equal(zoomed, images)
    assert torch.equal(augment(images, False, 0.0, g), images)


# -- the detector end to end ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_folder_dataset(tmp_path_factory.mktemp("inp") / "data", n_train=10, n_good=3, n_bad=3)


def test_fit_test_predict_save_load(data: Path, tmp_path: Path) -> None:
    # hold-out asked for (auto cross-fits below 100 images: five more fits, tested in test_loo_calibration.py)
    det = api.fit("inpformer", data, tmp_path / "m", settings=TINY, calibration="holdout", progress=False)
    train = det.fit_record.phase("train")
    assert train is not None and train.steps == 4 and set(train.loss_last) == {"loss", "mining", "coherence"}
    assert train.extra["epochs"] == pytest.approx(4 * 4 / 9, abs=0.01)  # 9 of the 10 images train, 1 validates
    assert det.fit_record.phase("load").extra["cached_features"] is True  # type: ignore[union-attr]
    res = api.test(tmp_path / "m", data, progress=False)
    assert 0.0 <= res.metrics["image_auroc"] <= 1.0 and "au_pro@0.05" in res.metrics
    preds = api.predict(tmp_path / "m", [data / "test" / "blob"])
    assert len(preds) == 3 and all(p.error is None for p in preds)
    loaded = api.load(tmp_path / "m")
    images = torch.rand(2, 3, 50, 70)
    a, b = det.predict(images), loaded.predict(images)
    assert a.maps.shape == (2, 50, 70)
    assert torch.equal(a.scores, b.scores) and torch.equal(a.maps, b.maps)  # save / load identity
    state = loaded.state_tensors()
    assert "inps" in state and not any(".backbone." in k for k in state)  # packaged weights not copied


def test_training_learns_the_normal_images(data: Path) -> None:
    split = load_dataset(data)
    det = create_detector("inpformer", {**TINY, "steps": 30})
    det.fit(split.train, split.validation, progress=False)
    train = det.fit_record.phase("train")
    assert train is not None and train.loss_last["mining"] < 0.5 * train.loss_first["mining"]
    good = [s for s in split.test if s.label == 0]
    bad = [s for s in split.test if s.label == 1]

    def score(samples: list[Sample]) -> torch.Tensor:
        return det.predict(torch.stack([to_tensor(read_image(s.path)) for s in samples])).scores

    assert score(bad).min() > score(good).max()  # the bright squares are not reconstructed


def test_fit_is_seeded_and_augmentation_encodes_each_step(data: Path) -> None:
    split = load_dataset(data)
    runs = []
    for _ in range(2):
        det = create_detector("inpformer", {**TINY, "flip": True, "scale_jitter": 0.1})
        assert isinstance(det, INPFormer)
        frozen = {k: v.clone() for k, v in det.features.backbone.state_dict().items()}
        det.fit(split.train, split.validation, progress=False)
        assert det.fit_record.phase("load").extra["cached_features"] is False  # type: ignore[union-attr]
        # the encoder stays frozen in eval mode while training encodes each augmented batch: its
        # BatchNorm statistics (which train mode would update) are untouched
        assert not det.features.training
        assert all(torch.equal(v, det.features.backbone.state_dict()[k]) for k, v in frozen.items())
        runs.append(det.predict(torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))).maps)
    assert torch.equal(runs[0], runs[1])


def test_tiling_and_rotations_go_through_training_batches(data: Path) -> None:
    split = load_dataset(data)
    det = create_detector("inpformer", {**TINY, "tile": 32, "image_size": 32, "train_rotations": 2})
    det.fit(split.train, split.validation, progress=False)
    load = det.fit_record.phase("load")
    assert load is not None and load.extra["inputs"] == det.training_count(split.train)  # tiles x poses
    assert load.extra["inputs"] > 2 * len(split.train)
    pred = det.predict(torch.rand(1, 3, 64, 96))
    assert pred.maps.shape == (1, 64, 96)


def test_predict_is_a_pure_tensor_function(data: Path) -> None:
    """Prediction traces to TorchScript as one graph and gives the same output (ready for export)."""
    split = load_dataset(data)
    det = create_detector("inpformer", TINY)
    det.fit(split.train, split.validation, progress=False)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        traced = torch.jit.trace(lambda images: det.model(images, det.config), (x,), check_trace=False)
        scores, maps = traced(x)
        ref_scores, ref_maps = det.model(x, det.config)
    assert torch.allclose(maps, ref_maps, atol=1e-5) and torch.allclose(scores, ref_scores, atol=1e-5)


def test_not_fitted_and_damaged_models(tmp_path: Path, data: Path) -> None:
    det = create_detector("inpformer", TINY)
    with pytest.raises(NotFittedError):
        det.predict(torch.rand(1, 3, 64, 64))
    with pytest.raises(NotFittedError):
        det.state_tensors()
    fitted = api.fit("inpformer", data, tmp_path / "m", settings=TINY, progress=False)
    tensors = fitted.state_tensors()
    other = create_detector("inpformer", TINY)
    with pytest.raises(KeyError):
        other.load_state_tensors({k: v for k, v in tensors.items() if k != "inps"})
    bigger = create_detector("inpformer", {**TINY, "num_inps": 7})
    with pytest.raises(RuntimeError):
        bigger.load_state_tensors(tensors)
    meta = (tmp_path / "m" / "anomnet.json").read_text()
    (tmp_path / "m" / "anomnet.json").write_text(meta.replace('"num_inps": 6', '"num_inps": 7'))
    with pytest.raises(ModelFormatError):
        api.load(tmp_path / "m")


def test_vit_encoder_from_a_dinov2_file_lives_in_the_model(data: Path, tmp_path: Path) -> None:
    weights = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(dinov2_state(384, 12), weights)
    settings = {
        **TINY,
        "image_size": 56,
        "backbone": "dinov2_vits14",
        "weights": str(weights),
        "layers": "block2,block3,block4,block5",
    }
    det = api.fit("inpformer", data, tmp_path / "m", settings=settings, progress=False)
    assert isinstance(det.features.backbone, ViTExtractor)
    assert det.model.fuse == "mean" and det.model.level_groups == [[0, 1], [2, 3]]  # the paper's two groups
    assert det.model.dim == 384 and det.model.heads == 6
    assert det.features(torch.rand(1, 3, 56, 56)).shape == (1, 4 * 384, 4, 4)  # the ViT's own 4 x 4 token grid
    weights.unlink()
    loaded = api.load(tmp_path / "m")
    x = torch.rand(1, 3, 56, 56)
    assert torch.equal(loaded.predict(x).maps, det.predict(x).maps)
    assert any(k.startswith("features.backbone.blocks.11.") for k in loaded.state_tensors())


def test_cli_fit_test_predict_with_a_dinov2_weights_file(data: Path, tmp_path: Path) -> None:
    from anomnet.cli import EXIT_INPUT, EXIT_OK, main

    weights = tmp_path / "w.pth"
    torch.save(dinov2_state(384, 12), weights)
    out = tmp_path / "m"
    common = ["--set", "steps=2", "--set", "train_batch_size=4", "--set", "decoder_depth=2", "--quiet"]
    args = ["fit", "--model", "inpformer", "--data", str(data), "--image-size", "42", *common]
    assert main([*args, "--out", str(out), "--backbone", "dinov2_vits14", "--weights", str(weights)]) == EXIT_OK
    assert main(["test", "--model-dir", str(out), "--data", str(data), "--quiet"]) == EXIT_OK
    assert main(["predict", "--model-dir", str(out), str(data / "test" / "good"), "--quiet"]) == EXIT_OK
    wrong = ["--out", str(tmp_path / "m2"), "--backbone", "dinov2_vitb14", "--weights", str(weights)]
    assert main([*args, *wrong]) == EXIT_INPUT  # a ViT-S file for ViT-B: a clear error, no traceback


def test_crossfit_fold_models_train_for_the_final_models_step_count(data: Path, monkeypatch) -> None:
    """By epochs a fold model (half of the images) would take fewer steps than the final model and score on
    another scale; cross-fitting gives each fold model the final model's step count."""
    from anomnet.decisions import calibrate

    seen: list[int] = []
    real = calibrate.image_statistics

    def spy(detector, samples, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(int(detector.model.train_steps[0]))
        return real(detector, samples, *args, **kwargs)

    monkeypatch.setattr(calibrate, "image_statistics", spy)
    by_epochs = {k: v for k, v in TINY.items() if k != "steps"} | {"epochs": 2.0, "train_batch_size": 2}
    det = api.fit("inpformer", data, None, settings=by_epochs, calibration="crossfit", folds=2, progress=False)
    final = int(det.model.train_steps[0])
    assert final == 10  # 2 epochs of 10 images in batches of 2
    assert det.step_budget(5) == 5  # what a fold model's 5 images would have given
    # the final model (its in-sample scores set the scale) and the two fold models (held-out and in-sample images)
    assert len(seen) >= 5 and set(seen) == {final}  # (calibration scores the validation images too)
    assert det.fold_settings() == {"steps": "10"}
    assert create_detector("inpformer", {**TINY}).fold_settings() == {}  # unfitted, or steps set: nothing
