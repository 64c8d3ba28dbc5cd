"""The DINOv2 ViT backbones (anomnet.backbones.vit): official key names, loading, errors, use by detectors.

No weights ship: every test builds a random state dict in the DINOv2 release's format by hand.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tests.conftest import make_folder_dataset

from anomnet import api
from anomnet.backbones import WEIGHTS_DIR_ENV, available_backbones, build_backbone, create_backbone
from anomnet.backbones.vit import PATCH_SIZE, POS_GRID, VIT_CONFIGS, official_file_name, token_grid
from anomnet.errors import BackboneWeightsError, ModelFormatError

BLOCK_KEYS = {
    "norm1.weight": lambda d: (d,),
    "norm1.bias": lambda d: (d,),
    "attn.qkv.weight": lambda d: (3 * d, d),
    "attn.qkv.bias": lambda d: (3 * d,),
    "attn.proj.weight": lambda d: (d, d),
    "attn.proj.bias": lambda d: (d,),
    "ls1.gamma": lambda d: (d,),
    "norm2.weight": lambda d: (d,),
    "norm2.bias": lambda d: (d,),
    "mlp.fc1.weight": lambda d: (4 * d, d),
    "mlp.fc1.bias": lambda d: (4 * d,),
    "mlp.fc2.weight": lambda d: (d, 4 * d),
    "mlp.fc2.bias": lambda d: (d,),
    "ls2.gamma": lambda d: (d,),
}


def dinov2_state(dim: int, depth: int, registers: int = 0, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random state dict with the DINOv2 release's key names and shapes (written out here, not from our code)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, std: float = 0.02) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    state = {
        "cls_token": rnd(1, 1, dim),
        "pos_embed": rnd(1, 1 + 37 * 37, dim),
        "mask_token": torch.zeros(1, dim),
        "patch_embed.proj.weight": rnd(dim, 3, 14, 14),
        "patch_embed.proj.bias": rnd(dim),
        "norm.weight": torch.ones(dim),
        "norm.bias": torch.zeros(dim),
    }
    if registers:
        state["register_tokens"] = rnd(1, registers, dim)
    for i in range(depth):
        for key, shape in BLOCK_KEYS.items():
            if key.startswith(("norm1.weight", "norm2.weight")):
                value = 1.0 + rnd(*shape(dim), std=0.1)
            elif key.endswith("gamma"):
                value = 0.1 + rnd(*shape(dim), std=0.02)
            else:
                value = rnd(*shape(dim))
            state[f"blocks.{i}.{key}"] = value
    return state


@pytest.fixture(scope="module")
def vits_state() -> dict[str, torch.Tensor]:
    return dinov2_state(384, 12)


@pytest.fixture(scope="module")
def vits_file(tmp_path_factory: pytest.TempPathFactory, vits_state: dict[str, torch.Tensor]) -> Path:
    path = tmp_path_factory.mktemp("w") / "dinov2_vits14_pretrain.pth"
    torch.save(vits_state, path)
    return path


def reference_tokens(state: dict[str, torch.Tensor], images: torch.Tensor, blocks: int, heads: int) -> torch.Tensor:
    """DINOv2's forward written out independently: normalise, patchify, class token, position embedding
    (bicubic, with the release's +0.1 scale-factor rule), register tokens after the class token, pre-norm
    blocks with layer scale. Returns the patch tokens ``[B, N, D]`` after ``blocks`` blocks."""
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = (images - mean) / std
    b, _, hh, ww = x.shape
    x = F.conv2d(x, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=14)
    h0, w0 = x.shape[-2:]
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([state["cls_token"].expand(b, -1, -1), x], dim=1)
    pos = state["pos_embed"]
    if (h0, w0) != (37, 37):
        dim = pos.shape[-1]
        grid = pos[:, 1:].reshape(1, 37, 37, dim).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=((h0 + 0.1) / 37, (w0 + 0.1) / 37), mode="bicubic")
        pos = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)
    x = x + pos
    extra = 1
    if "register_tokens" in state:
        x = torch.cat([x[:, :1], state["register_tokens"].expand(b, -1, -1), x[:, 1:]], dim=1)
        extra += state["register_tokens"].shape[1]
    d = x.shape[-1]
    for i in range(blocks):
        p = {k[len(f"blocks.{i}.") :]: v for k, v in state.items() if k.startswith(f"blocks.{i}.")}
        y = F.layer_norm(x, (d,), p["norm1.weight"], p["norm1.bias"], 1e-6)
        q, k, v = F.linear(y, p["attn.qkv.weight"], p["attn.qkv.bias"]).chunk(3, dim=-1)
        split = lambda t: t.reshape(b, -1, heads, d // heads).transpose(1, 2)  # noqa: E731
        att = (split(q) @ split(k).transpose(-1, -2) / math.sqrt(d // heads)).softmax(-1) @ split(v)
        att = F.linear(att.transpose(1, 2).reshape(b, -1, d), p["attn.proj.weight"], p["attn.proj.bias"])
        x = x + p["ls1.gamma"] * att
        y = F.layer_norm(x, (d,), p["norm2.weight"], p["norm2.bias"], 1e-6)
        y = F.gelu(F.linear(y, p["mlp.fc1.weight"], p["mlp.fc1.bias"]))
        y = F.linear(y, p["mlp.fc2.weight"], p["mlp.fc2.bias"])
        x = x + p["ls2.gamma"] * y
    return x[:, extra:]


# -- registry and key names ------------------------------------------------------------------------
def test_six_dinov2_backbones_listed_with_weights_file() -> None:
    names = [i.name for i in available_backbones() if i.name.startswith("dinov2")]
    assert names == ["dinov2_vits14", "dinov2_vits14_reg", "dinov2_vitb14", "dinov2_vitb14_reg"] + [
        "dinov2_vitl14",
        "dinov2_vitl14_reg",
    ]
    info = {i.name: i for i in available_backbones()}
    assert info["dinov2_vitb14"].default_layers == tuple(f"block{i}" for i in range(2, 10))
    assert info["dinov2_vitl14"].default_layers == tuple(f"block{i}" for i in range(4, 20, 2))
    assert all(info[n].needs_weights_file for n in names)
    assert official_file_name("dinov2_vitb14_reg") == "dinov2_vitb14_reg4_pretrain.pth"


@pytest.mark.parametrize("name", list(VIT_CONFIGS))
def test_state_dict_has_the_release_keys_and_shapes(name: str) -> None:
    cfg = VIT_CONFIGS[name]
    with torch.device("meta"):
        model = build_backbone(name)  # not ready: built on meta, no memory
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    want = {k: tuple(v.shape) for k, v in dinov2_state(4, 0, cfg.registers).items()}  # top-level keys
    want = {k: s[:-1] + (cfg.dim,) if k != "patch_embed.proj.weight" else (cfg.dim, 3, 14, 14) for k, s in want.items()}
    want["patch_embed.proj.bias"] = (cfg.dim,)
    want["pos_embed"] = (1, 1 + POS_GRID * POS_GRID, cfg.dim)
    for i in range(cfg.depth):
        want.update({f"blocks.{i}.{k}": shape(cfg.dim) for k, shape in BLOCK_KEYS.items()})
    assert got == want


# -- forward -------------------------------------------------------------------------------------
def test_forward_matches_an_independent_reference(vits_state: dict[str, torch.Tensor], vits_file: Path) -> None:
    model = create_backbone("dinov2_vits14", ["block0", "block2"], vits_file)
    for side in (518, 112):  # the release's own 37 x 37 grid, and an interpolated 8 x 8 one
        images = torch.rand(2, 3, side, side, generator=torch.Generator().manual_seed(side))
        f0, f2 = model(images)
        n = side // PATCH_SIZE
        assert f0.shape == f2.shape == (2, 384, n, n)
        ref = reference_tokens(vits_state, images, 3, heads=6)
        assert torch.allclose(f2.flatten(2).transpose(1, 2), ref, atol=1e-4), side
        ref0 = reference_tokens(vits_state, images, 1, heads=6)
        assert torch.allclose(f0.flatten(2).transpose(1, 2), ref0, atol=1e-4)


def test_register_tokens_are_used_and_dropped(tmp_path: Path) -> None:
    state = dinov2_state(384, 12, registers=4, seed=1)
    path = tmp_path / "reg.safetensors"
    from safetensors.torch import save_file

    save_file(state, str(path))
    model = create_backbone("dinov2_vits14_reg", ["block1"], path)
    images = torch.rand(1, 3, 70, 70)
    (feat,) = model(images)
    assert feat.shape == (1, 384, 5, 5)  # 25 patch tokens, class and 4 register tokens dropped
    assert torch.allclose(feat.flatten(2).transpose(1, 2), reference_tokens(state, images, 2, 6), atol=1e-4)
    changed = dict(state, register_tokens=torch.randn(1, 4, 384))  # (a constant shift would vanish in LayerNorm)
    path2 = tmp_path / "reg2.pth"
    torch.save(changed, path2)
    (feat2,) = create_backbone("dinov2_vits14_reg", ["block1"], path2)(images)
    assert not torch.allclose(feat, feat2, atol=1e-3)  # the registers take part in the attention


def test_input_not_a_multiple_of_14_covers_the_whole_image(vits_file: Path) -> None:
    model = create_backbone("dinov2_vits14", ["block0"], vits_file)
    assert token_grid(256, 256) == (18, 18) and token_grid(100, 130) == (7, 9) and token_grid(5, 5) == (1, 1)
    (feat,) = model(torch.rand(1, 3, 100, 130))
    assert feat.shape == (1, 384, 7, 9)
    assert model.strides() == [14] and model.channels() == [384]


def test_position_embedding_keeps_the_release_grid_and_interpolates_others(vits_file: Path) -> None:
    model = create_backbone("dinov2_vits14", ["block0"], vits_file)
    assert model.position_embedding(37, 37) is model.pos_embed
    pos = model.position_embedding(10, 20)
    assert pos.shape == (1, 1 + 200, 384)
    assert torch.equal(pos[:, 0], model.pos_embed[:, 0])  # the class position is never interpolated
    with torch.no_grad():
        model.pos_embed[:, 1:] = 0.5  # a constant grid stays constant
    assert torch.allclose(model.position_embedding(9, 13)[:, 1:], torch.full((1, 117, 384), 0.5), atol=1e-5)


# -- loading errors --------------------------------------------------------------------------------
def test_missing_and_unexpected_keys_are_named(tmp_path: Path, vits_state: dict[str, torch.Tensor]) -> None:
    state = dict(vits_state)
    del state["blocks.11.ls2.gamma"]
    state["blocks.3.attn.q_norm.weight"] = torch.ones(384)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(BackboneWeightsError) as exc:
        create_backbone("dinov2_vits14", None, path)
    msg = str(exc.value)
    assert str(path) in msg and "1 missing key(s): blocks.11.ls2.gamma" in msg
    assert "1 unexpected key(s): blocks.3.attn.q_norm.weight" in msg


def test_wrong_size_is_named_with_a_guess(tmp_path: Path) -> None:
    path = tmp_path / "vitb.pth"
    torch.save(dinov2_state(768, 12), path)
    with pytest.raises(BackboneWeightsError) as exc:
        create_backbone("dinov2_vits14", None, path)
    msg = str(exc.value)
    assert "looks like dinov2_vitb14 weights" in msg
    assert "pos_embed expected (1, 1370, 384) found (1, 1370, 768)" in msg


def test_registers_mismatch_and_other_grids_are_named(tmp_path: Path, vits_state: dict[str, torch.Tensor]) -> None:
    path = tmp_path / "noreg.pth"
    torch.save(vits_state, path)
    with pytest.raises(BackboneWeightsError, match=r"looks like dinov2_vits14 weights.*missing key.*register_tokens"):
        create_backbone("dinov2_vits14_reg", None, path)
    other = dict(vits_state, pos_embed=torch.zeros(1, 1 + 16 * 16, 384))  # a 224 px model
    torch.save(other, path)
    with pytest.raises(BackboneWeightsError, match=r"pos_embed expected \(1, 1370, 384\) found \(1, 257, 384\)"):
        create_backbone("dinov2_vits14", None, path)


@pytest.mark.parametrize(
    "prefix,expected",
    [("teacher.backbone.", "training checkpoint"), ("", "SwiGLU")],
)
def test_unsupported_formats_get_a_guess(tmp_path: Path, prefix: str, expected: str) -> None:
    state = {prefix + k: v for k, v in dinov2_state(64, 2).items()}
    if not prefix:  # ViT-g style feed-forward
        state = {k.replace("mlp.fc1", "mlp.w12"): v for k, v in state.items()}
    path = tmp_path / "x.pth"
    torch.save(state, path)
    with pytest.raises(BackboneWeightsError, match=expected):
        create_backbone("dinov2_vits14", None, path)


def test_release_file_name_is_found_in_the_weights_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, vits_state: dict[str, torch.Tensor]
) -> None:
    monkeypatch.setenv(WEIGHTS_DIR_ENV, str(tmp_path))
    with pytest.raises(BackboneWeightsError, match="dinov2_vits14_pretrain.pth"):
        build_backbone("dinov2_vits14", ["block0"], None, search=True)
    torch.save(vits_state, tmp_path / "dinov2_vits14_pretrain.pth")
    model = build_backbone("dinov2_vits14", ["block0"], None, search=True)
    assert model.ready and torch.equal(model.cls_token, vits_state["cls_token"])


# -- used by the other detectors --------------------------------------------------------------------
def test_patchcore_on_vit_saves_the_weights_inside_the_model(
    tmp_path: Path, vits_state: dict[str, torch.Tensor]
) -> None:
    data = make_folder_dataset(tmp_path / "data", n_train=6, n_good=2, n_bad=2)
    weights = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(vits_state, weights)
    settings = {"backbone": "dinov2_vits14", "weights": str(weights), "layers": "block2,block5", "image_size": 56}
    det = api.fit("patchcore", data, tmp_path / "model", settings=settings, progress=False)
    weights.unlink()  # the saved model must not need the file any more
    loaded = api.load(tmp_path / "model")
    images = torch.rand(2, 3, 64, 64)
    assert torch.allclose(loaded.predict(images).maps, det.predict(images).maps, atol=1e-5)
    (tmp_path / "model" / "weights.safetensors").write_bytes(b"")  # and a damaged folder is a clear error
    with pytest.raises(ModelFormatError):
        api.load(tmp_path / "model")
