"""ToCoAD: focal loss, SimSiam stop-gradient, decoder shapes, stage switches, fit/predict/save/load."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from anomnet import api
from anomnet.cli import EXIT_OK, main
from anomnet.data import load_dataset
from anomnet.detectors import Detector, create_detector
from anomnet.detectors.tocoad.detector import default_decoder_layers
from anomnet.detectors.tocoad.discriminator import Discriminator
from anomnet.detectors.tocoad.losses import discriminator_loss, focal_loss
from anomnet.detectors.tocoad.simsiam import SimSiamHead, multilevel_simsiam_loss, simsiam_loss
from anomnet.errors import ConfigError
from anomnet.evaluation.evaluate import evaluate

SMALL = {
    "image_size": 64,
    "batch_size": 4,
    "train_batch_size": 4,
    "stage1_steps": 15,
    "stage2_steps": 8,
    "stage2": True,  # the paper's two stages (stage I follows stage II); the default trains neither
}


def test_focal_loss_hand_computed() -> None:
    # one pixel anomalous, one normal; both with p(anomalous) = 0.75
    logits = torch.tensor([0.0, math.log(3.0)]).view(1, 2, 1, 1).expand(1, 2, 1, 2).contiguous()
    target = torch.tensor([[[1.0, 0.0]]])
    a = 0.25**2 * -math.log(0.75)  # p_t = 0.75
    b = 0.75**2 * -math.log(0.25)  # p_t = 0.25
    assert focal_loss(logits, target, gamma=2.0).item() == pytest.approx((a + b) / 2, rel=1e-6)
    assert focal_loss(logits, target, gamma=2.0, alpha=0.25).item() == pytest.approx(
        (0.25 * a + 0.75 * b) / 2, rel=1e-6
    )
    assert focal_loss(logits, target, gamma=0.0).item() == pytest.approx(
        F.cross_entropy(logits, target.long()).item(), rel=1e-6
    )


def test_discriminator_loss_focal_or_cross_entropy(folder_dataset, monkeypatch) -> None:
    """disc_loss=cross_entropy (the paper's Table 6) trains the discriminator, in stage I and in L_neg, on the
    unweighted cross-entropy instead of the focal loss."""
    logits = torch.randn(2, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    target = (torch.rand(2, 3, 3, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    ce = F.cross_entropy(logits, target.long())
    assert discriminator_loss(logits, target, "cross_entropy", 2.0, 0.25).item() == pytest.approx(ce.item(), rel=1e-6)
    focal = focal_loss(logits, target, 2.0, 0.25)
    assert discriminator_loss(logits, target, "focal", 2.0, 0.25).item() == pytest.approx(focal.item(), rel=1e-6)
    assert create_detector("tocoad", {}).config.disc_loss == "focal"
    with pytest.raises(ConfigError):
        create_detector("tocoad", {"disc_loss": "hinge"})
    import anomnet.detectors.tocoad.detector as tocoad_detector

    kinds: list[str] = []

    def spy(logits: torch.Tensor, target: torch.Tensor, kind, gamma: float, alpha: float | None) -> torch.Tensor:
        kinds.append(kind)
        return discriminator_loss(logits, target, kind, gamma, alpha)

    monkeypatch.setattr(tocoad_detector, "discriminator_loss", spy)
    split = load_dataset(folder_dataset)
    settings = {**SMALL, "stage1_steps": 2, "stage2_steps": 2, "warmup": 0.0, "disc_loss": "cross_entropy"}
    det = create_detector("tocoad", settings)
    det.fit(split.train[:4], [], progress=False)
    stage1 = det.fit_record.phase("stage1")
    assert stage1 is not None and set(stage1.loss_first) == {"cross_entropy"}
    assert kinds == ["cross_entropy"] * 4  # 2 stage I steps, 2 joint stage II steps (L_neg)


def test_simsiam_stop_gradient_on_the_projection_targets() -> None:
    g = torch.Generator().manual_seed(0)
    z1, z2 = (torch.randn(4, 8, generator=g).requires_grad_() for _ in range(2))
    p1, p2 = (torch.randn(4, 8, generator=g).requires_grad_() for _ in range(2))
    loss = simsiam_loss(p1, p2, z1, z2)
    loss.backward()
    assert z1.grad is None and z2.grad is None  # no gradient reaches the targets
    assert p1.grad is not None and p1.grad.abs().sum() > 0 and p2.grad is not None
    assert loss.item() == pytest.approx(
        -0.5 * (F.cosine_similarity(p1, z2).mean() + F.cosine_similarity(p2, z1).mean()).item()
    )


def test_simsiam_heads_one_per_level_gradient_only_through_the_predictor_branch() -> None:
    torch.manual_seed(0)
    head = SimSiamHead([5, 7], proj_dim=16)
    assert len(head.levels) == 2 and all(isinstance(h.predictor, nn.Linear) for h in head.levels)  # one layer
    assert isinstance(SimSiamHead([5], proj_dim=16, pred_dim=4).levels[0].predictor, nn.Sequential)
    levels1 = [torch.randn(4, 5, 3, 3), torch.randn(4, 7, 2, 2)]
    levels2 = [t + 0.1 * torch.randn_like(t) for t in levels1]
    out1, out2 = head(levels1), head(levels2)
    loss = multilevel_simsiam_loss(out1, out2)
    per_level = [simsiam_loss(p1, p2, z1, z2) for (z1, p1), (z2, p2) in zip(out1, out2)]
    assert loss.item() == pytest.approx(sum(x.item() for x in per_level) / 2)
    # each level's projection receives exactly what flows back through its own prediction
    for (z1, p1), (z2, p2) in zip(out1, out2):
        g_p1, g_p2, g_z1, g_z2 = torch.autograd.grad(loss, [p1, p2, z1, z2], retain_graph=True)
        via_p1 = torch.autograd.grad(p1, z1, g_p1, retain_graph=True)[0]
        via_p2 = torch.autograd.grad(p2, z2, g_p2, retain_graph=True)[0]
        assert torch.allclose(g_z1, via_p1, atol=1e-7) and torch.allclose(g_z2, via_p2, atol=1e-7)
    # a level's loss trains only its own head
    per_level[0].backward()
    assert all(p.grad is None for p in head.levels[1].parameters())
    with pytest.raises(ValueError, match="2 level heads"):
        head(levels1[:1])


def test_patch_reweighting_is_eq9_on_every_patch() -> None:
    from anomnet.components import NearestNeighbors
    from anomnet.detectors.tocoad.model import ToCoADModel

    g = torch.Generator().manual_seed(0)
    bank = torch.randn(30, 6, generator=g)
    model = ToCoADModel(None, num_neighbors=4, chunk=3)  # type: ignore[arg-type]
    model.memory_bank, model.nn = bank, NearestNeighbors(bank, "exact")
    flat = torch.randn(7, 6, generator=g)
    nearest = torch.cdist(flat, bank).argmin(1)
    weights = model.patch_weights(flat, nearest)
    for n in range(len(flat)):  # eq. 9 by hand: softmax over m* and its 3 nearest bank neighbours
        support = torch.cdist(bank[nearest[n]][None], bank)[0].argsort()[:4]
        dists = torch.linalg.vector_norm(flat[n] - bank[support], dim=-1)
        assert weights[n].item() == pytest.approx(1.0 - torch.softmax(dists, 0)[0].item(), rel=1e-5)
    assert ((weights > 0) & (weights < 1)).all()


def test_discriminator_output_at_input_resolution() -> None:
    disc = Discriminator([16, 24, 40, 80])
    levels = [torch.randn(2, c, 64 // s, 64 // s) for c, s in ((16, 2), (24, 4), (40, 8), (80, 16))]
    assert disc(levels, (64, 64)).shape == (2, 2, 64, 64)


def test_default_decoder_layers() -> None:
    assert default_decoder_layers("efficientnet_lite0", ("stage3", "stage4")) == (
        "stage1",
        "stage2",
        "stage3",
        "stage4",
    )
    assert default_decoder_layers("resnet18", ("layer2", "layer3")) == ("layer1", "layer2", "layer3")


def test_bad_settings_are_config_errors() -> None:
    for bad in (
        {"generator": "noise"},
        {"lambda_sym": "1.5"},
        {"train_batch_size": "1"},
        {"stage1_steps": "-1"},
        {"alpha": "1.5"},
        {"warmup": "1.5"},
        {"head_lr": "-0.1"},
        {"pred_dim": "-1"},
        {"reweight": "pixel"},
    ):
        with pytest.raises(ConfigError):
            create_detector("tocoad", bad)
    with pytest.raises(ConfigError, match="-1"):  # the old names are aliases: still checked
        create_detector("tocoad", {"steps1": "-1"})
    old = create_detector("tocoad", {"steps1": "3", "steps2": "2", "train_batch": "4"}).config
    assert (old.stage1_steps, old.stage2_steps, old.train_batch_size) == (3, 2, 4)
    new = create_detector("tocoad", {}).config
    assert (new.alpha, new.warmup, new.head_lr, new.pred_dim, new.reweight) == (0.25, 0.2, 0.2, 0, "patch")
    assert create_detector("tocoad", {"pred_dim": "64"}).config.pred_dim == 64  # saved settings still load


def test_fit_predict_save_load(folder_dataset, tmp_path) -> None:
    det = api.fit("tocoad", folder_dataset, tmp_path / "m", settings=SMALL, progress=False)
    split = load_dataset(folder_dataset)
    res = evaluate(det, split.test, progress=False)
    assert res.metrics["image_auroc"] == 1.0 and res.metrics["pixel_auroc"] > 0.9
    names = [p.name for p in det.fit_record.phases]
    assert "stage1" in names and "stage2" in names and det.fit_record.phase("stage2").extra["lambda"] == 0.5
    assert "neg" in det.fit_record.phase("stage2").extra["curve"]  # L_neg after the warm-up
    assert Detector.load(tmp_path / "m").fit_record.phase("stage1").steps == SMALL["stage1_steps"]
    # the backbone was fine-tuned, and the fine-tuned weights are what the model saves
    pretrained = create_detector("patchcore", {"image_size": 64}).features.backbone.state_dict()
    tuned = det.features.backbone.state_dict()
    assert any(not torch.equal(pretrained[k], tuned[k]) for k in pretrained)
    saved = det.state_tensors()
    assert all(torch.equal(saved[f"features.backbone.{k}"], v) for k, v in tuned.items())
    loaded = Detector.load(tmp_path / "m")
    x = torch.rand(3, 3, 70, 60, generator=torch.Generator().manual_seed(0))
    a, b = det.predict(x), loaded.predict(x)
    assert torch.equal(a.scores, b.scores) and torch.equal(a.maps, b.maps)
    assert loaded.config == det.config and loaded.calibration == det.calibration


def test_stage_one_alone_leaves_the_backbone_as_patchcore(folder_dataset) -> None:
    split = load_dataset(folder_dataset)
    pc = create_detector("patchcore", {"image_size": 64, "batch_size": 4})
    pc.fit(split.train, split.validation, progress=False)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    expected = pc.predict(x)
    for reweight in ("image", "patch"):
        toco = create_detector("tocoad", {**SMALL, "stage1": "true", "stage2": "false", "reweight": reweight})
        toco.fit(split.train, split.validation, progress=False)
        assert toco.fit_record.phase("stage1") is not None and toco.fit_record.phase("stage2") is None
        assert torch.equal(toco.memory_bank, pc.memory_bank)
        got = toco.predict(x)
        if reweight == "image":  # PatchCore's scoring: exactly PatchCore
            assert torch.equal(got.scores, expected.scores)
        else:  # eq. 9 on every patch: each patch shrinks by its weight in (0, 1), the map with it
            assert (got.maps <= expected.maps + 1e-4).all() and not torch.equal(got.maps, expected.maps)
            # the image score, the largest re-weighted patch, is at least PatchCore's re-weighted maximum
            assert (got.scores >= expected.scores - 1e-4).all()


def test_default_trains_nothing_and_stage_one_follows_stage_two(folder_dataset) -> None:
    """The default (stage II measured no better than the pretrained backbone) is PatchCore's bank scored with eq. 9:
    no training phase at all; stage2=true alone runs both stages, stage1=true alone runs stage I only."""
    train = load_dataset(folder_dataset).train[:4]
    base = {"image_size": 64, "batch_size": 4, "train_batch_size": 4, "stage1_steps": 2, "stage2_steps": 2}
    default = create_detector("tocoad", {}).config
    assert default.stage2 is False and default.stage1 is None
    det = create_detector("tocoad", base)
    det.fit(train, [], progress=False)
    assert not {"load", "stage1", "stage2"} & {p.name for p in det.fit_record.phases}
    pc = create_detector("patchcore", {"image_size": 64, "batch_size": 4})
    pc.fit(train, [], progress=False)
    assert torch.equal(det.memory_bank, pc.memory_bank)
    for settings, phases in (({"stage2": "true"}, {"stage1", "stage2"}), ({"stage1": "true"}, {"stage1"})):
        det = create_detector("tocoad", {**base, **settings})
        det.fit(train, [], progress=False)
        assert {"stage1", "stage2"} & {p.name for p in det.fit_record.phases} == phases, settings


def test_stage_two_alone_is_pure_simsiam(folder_dataset) -> None:
    split = load_dataset(folder_dataset)
    det = create_detector("tocoad", {**SMALL, "stage1": "false", "generator": "cutpaste"})
    det.fit(split.train[:6], split.validation, progress=False)
    stage2 = det.fit_record.phase("stage2")
    assert det.fit_record.phase("stage1") is None and stage2 is not None and stage2.extra["lambda"] == 1.0
    assert "neg" not in stage2.loss_last


def test_stage_two_simsiam_loss_learns_and_reaches_the_backbone() -> None:
    """The regression: the SimSiam loss stayed near 0 for every step, so the backbone got no signal.

    Images with structure that differs between images (smooth random colour patterns): views of
    one image are predictable from each other, as on real parts (the near-uniform synthetic
    test images are not). Measured: loss by tenths about 0 -> -0.13..-0.16; before, flat within 0.03.
    """
    from anomnet.backbones import RANDOM_WEIGHTS, create_backbone
    from anomnet.synthesis import CutPaste

    g = torch.Generator().manual_seed(0)
    images = F.interpolate(torch.rand(16, 3, 8, 8, generator=g), size=(64, 64), mode="bilinear", align_corners=False)
    settings = {"image_size": 64, "train_batch_size": 8, "stage1": "false", "stage2_steps": 20, "warmup": 0.4}
    det = create_detector("tocoad", settings)
    trunk = create_backbone(det.config.backbone, det.trunk_layers, RANDOM_WEIGHTS)
    pretrained = det.features.backbone.state_dict()
    trunk.load_state_dict(pretrained)
    det.finetune(trunk, None, images, CutPaste(), torch.Generator().manual_seed(0), False)
    stage2 = det.fit_record.phase("stage2")
    assert stage2 is not None and stage2.steps == 20 and stage2.extra["warmup_steps"] == 8
    assert stage2.extra["levels"] == ["stage3", "stage4"]
    curve = stage2.extra["curve"]
    sym = curve["sym"]
    assert len(sym) == 10 and abs(sym[0]) < 0.1  # the untrained predictor: about orthogonal to the target
    assert sum(sym[-3:]) / 3 < sum(sym[:3]) / 3 - 0.05, sym  # the loss falls, not flat near 0
    # after the warm-up the gradient reaches the backbone (12 joint steps, by tenths), and moves it
    assert len(curve["backbone_grad"]) == 10 and min(curve["backbone_grad"]) > 0
    tuned = trunk.state_dict()
    assert any(not torch.equal(pretrained[k], tuned[k]) for k in pretrained if k in tuned)


def test_cli_fit_test_predict(folder_dataset, tmp_path) -> None:
    out = tmp_path / "m"
    sets = [a for k, v in SMALL.items() if k != "image_size" for a in ("--set", f"{k}={v}")]
    assert (
        main(
            [
                "fit",
                "--model",
                "tocoad",
                "--data",
                str(folder_dataset),
                "--out",
                str(out),
                "--image-size",
                "64",
                *sets,
                "--quiet",
            ]
        )
        == EXIT_OK
    )
    assert main(["test", "--model-dir", str(out), "--data", str(folder_dataset), "--quiet"]) == EXIT_OK
    assert main(["predict", "--model-dir", str(out), str(folder_dataset / "test")]) == EXIT_OK


def test_texture_source_is_explicit_and_recorded(folder_dataset, tmp_path, monkeypatch) -> None:
    split = load_dataset(folder_dataset)
    tiny = {**SMALL, "stage1_steps": 1, "stage2_steps": 0}
    with pytest.raises(ConfigError, match="missing"):
        create_detector("tocoad", {**tiny, "textures": str(tmp_path / "missing")}).fit(
            split.train[:4], [], progress=False
        )
    monkeypatch.delenv("ANOMNET_TEXTURE_DIR", raising=False)
    sources = []
    for cwd in (tmp_path, folder_dataset):  # the same settings from another working directory: the same source
        monkeypatch.chdir(cwd)
        det = create_detector("tocoad", {**tiny, "textures": str(folder_dataset / "train")})
        det.fit(split.train[:4], [], progress=False)
        sources.append(det.fit_record.data_sources["textures"])
    assert sources[0] == sources[1] and str((folder_dataset / "train").resolve()) in sources[0]
    assert "files)" in sources[0]


def test_stage_two_heads_on_deeper_levels(folder_dataset) -> None:
    """head_layers puts the SimSiam heads on levels past the memory bank (the paper's layer3 + layer4 equivalent):
    the training trunk runs to them, their gradient moves the levels the bank is built from."""
    split = load_dataset(folder_dataset)
    settings = {**SMALL, "stage1": "false", "generator": "cutpaste", "stage2_steps": 4, "warmup": 0.25}
    det = create_detector("tocoad", {**settings, "head_layers": "stage5,stage7"})
    assert det.trunk_layers[-1] == "stage7" and [det.trunk_layers[i] for i in det._bank_idx] == ["stage3", "stage4"]
    before = {k: v.clone() for k, v in det.features.backbone.state_dict().items()}
    det.fit(split.train[:6], split.validation, progress=False)
    stage2 = det.fit_record.phase("stage2")
    assert stage2 is not None and stage2.extra["levels"] == ["stage5", "stage7"]
    after = det.features.backbone.state_dict()
    assert set(after) == set(before) and any(not torch.equal(before[k], after[k]) for k in before)
    assert det.predict(torch.rand(2, 3, 64, 64)).maps.shape == (2, 64, 64)
    default = create_detector("tocoad", settings)
    assert [default.trunk_layers[i] for i in default._head_idx] == ["stage3", "stage4"]
    with pytest.raises(ConfigError):
        create_detector("tocoad", {"head_layers": "stage99"})
