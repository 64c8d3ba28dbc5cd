"""CPR: windowed local retrieval, global retrieval, foreground suppression, loss, pairs, fit/save/load/tiling."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from anomnet import api
from anomnet.data import load_dataset
from anomnet.detectors import Detector, create_detector
from anomnet.detectors.cpr import CPR
from anomnet.detectors.cpr.foreground import ForegroundBranch, fisher_discriminant
from anomnet.detectors.cpr.head import RetrievalHead
from anomnet.detectors.cpr.losses import distance_weights, features_at, hinge_power, retrieval_loss
from anomnet.detectors.cpr.pairs import sample_pairs
from anomnet.detectors.cpr.retrieval import GlobalRetrieval, block_matrix, window_distances
from anomnet.errors import ConfigError

SMALL = {"image_size": 64, "batch_size": 4, "train_batch_size": 2, "steps": 3, "train_crop": 32, "points": 20}


def _unit(*values: float) -> torch.Tensor:
    v = torch.tensor(values, dtype=torch.float32)
    return v / v.norm()


# -- local retrieval: the window ------------------------------------------------------------
def _bank_with_match_at(offset: tuple[int, int], size: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    """Query: feature a at the centre, b elsewhere. Bank image 0: c everywhere except one a at centre + offset."""
    a, b, c = _unit(1, 0, 0, 0), _unit(0, 1, 0, 0), _unit(0, 0, 1, 0)
    query = b[:, None, None].expand(4, size, size).clone()
    query[:, size // 2, size // 2] = a
    bank = c[:, None, None].expand(4, size, size).clone()
    bank[:, size // 2 + offset[0], size // 2 + offset[1]] = a
    return query[None], bank[None]


def test_a_patch_searches_only_its_window_in_the_retrieved_images() -> None:
    index = torch.zeros(1, 1, dtype=torch.long)
    query, bank = _bank_with_match_at((0, 2))  # the only match is two cells to the right
    centre = (0, 4, 4)
    assert window_distances(query, bank, index, 1)[centre] == pytest.approx(1.0)  # 1 - cos(a, c)
    assert window_distances(query, bank, index, 3)[centre] == pytest.approx(1.0)  # still outside a 3x3 window
    assert window_distances(query, bank, index, 5)[centre] == pytest.approx(0.0, abs=1e-6)  # inside a 5x5 window
    query, bank = _bank_with_match_at((1, -1))
    assert window_distances(query, bank, index, 3)[centre] == pytest.approx(0.0, abs=1e-6)
    assert window_distances(query, bank, index, 1)[centre] == pytest.approx(1.0)


def test_only_the_retrieved_images_are_searched_and_padding_never_matches() -> None:
    query, match = _bank_with_match_at((0, 0))
    _, other = _bank_with_match_at((0, 3))  # no match within reach of a 3x3 window
    bank = torch.cat([other, match])
    d = window_distances(query.expand(2, -1, -1, -1), bank, torch.tensor([[0], [1]]), 3)
    assert d[0, 4, 4] == pytest.approx(1.0) and d[1, 4, 4] == pytest.approx(0.0, abs=1e-6)
    # k = 2: the best of both images
    assert window_distances(query, bank, torch.tensor([[0, 1]]), 3)[0, 4, 4] == pytest.approx(0.0, abs=1e-6)
    # a corner query of a zero vector would match the zero padding (cos 0 -> 1) exactly as an inside c does;
    # a feature orthogonal to everything inside must stay at distance 1, never below
    q = torch.zeros(1, 4, 9, 9)
    q[:, 3] = 1.0  # d, orthogonal to a, b, c
    assert torch.allclose(window_distances(q, bank[:1], torch.zeros(1, 1, dtype=torch.long), 5), torch.ones(1, 9, 9))
    # chunked and batched computations agree
    qq = F.normalize(torch.randn(3, 4, 9, 9), dim=1)
    idx = torch.tensor([[0, 1], [1, 0], [1, 1]])
    assert torch.allclose(window_distances(qq, bank, idx, 3, chunk=1), window_distances(qq, bank, idx, 3, chunk=8))


# -- global retrieval ---------------------------------------------------------------------
def _block_images(layouts: list[list[int]], cells: int = 10) -> torch.Tensor:
    """One-hot descriptor features ``[N, 3, cells, cells]`` whose 2x2 blocks hold the given codewords."""
    out = torch.zeros(len(layouts), 3, cells, cells)
    half = cells // 2
    for i, layout in enumerate(layouts):
        for b, code in enumerate(layout):
            y, x = divmod(b, 2)
            out[i, code, y * half : (y + 1) * half, x * half : (x + 1) * half] = 1.0
    return out


def test_block_matrix_averages_each_block() -> None:
    m = block_matrix(7, 3)
    assert m.shape == (3, 7) and torch.allclose(m.sum(1), torch.ones(3))
    assert (m > 0).sum(0).tolist() == [1] * 7  # every cell in exactly one block


def test_global_retrieval_picks_the_images_with_the_same_layout() -> None:
    layouts = [[0, 0, 1, 1], [1, 1, 0, 0], [0, 1, 0, 1], [2, 2, 2, 2], [0, 1, 2, 0], [1, 0, 1, 0]]
    train = _block_images(layouts)
    g = GlobalRetrieval(blocks=2, block_share=0.75)
    g.set_codebook(torch.eye(3))
    g.set_refs(g.histograms(train))
    hist = g.histograms(train)
    assert torch.allclose(hist.sum(-1), torch.ones(6, 4))
    for i in range(6):
        assert int(g.retrieve(train[i : i + 1], 1)[0, 0]) == i
    # a "defect" that changes one block of image 4 does not change which image is picked first:
    # the worst-matching block is left out (block_share 0.75 keeps 3 of 4 blocks)
    query = _block_images([[0, 1, 2, 2]])
    assert int(g.retrieve(query, 1)[0, 0]) == 4
    g.block_share = 1.0
    assert int(g.retrieve(query, 1)[0, 0]) != 4 or g.distances(g.histograms(query))[0, 4] > 1.0
    # k images, the most similar first
    idx = g.retrieve(train[2:3], 3)
    assert idx.shape == (1, 3) and int(idx[0, 0]) == 2


# -- foreground ---------------------------------------------------------------------------
def _object_features(n: int, noise: float, seed: int, texture: bool = False) -> torch.Tensor:
    """``[n, 2, 32, 32]``: background (0, 0) around a central disc (3, 3), plus noise; or a texture of both."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    disc = ((yy - 15.5) ** 2 + (xx - 15.5) ** 2 < 10.0**2).float()
    if texture:
        disc = (torch.rand(n, 32, 32, generator=g) < 0.5).float()
    base = 3.0 * disc.expand(n, 32, 32)
    return torch.stack([base, base], 1) + noise * torch.randn(n, 2, 32, 32, generator=g)


def test_foreground_branch_finds_the_object_and_not_a_texture() -> None:
    fg = ForegroundBranch()
    found = fg.fit(_object_features(6, 0.3, 0), torch.Generator().manual_seed(0))
    assert found.fitted and found.object_like and found.border_share > 0.95 and found.centre_share < 0.05
    weights = fg(_object_features(1, 0.3, 1))[0]
    assert weights[12:20, 12:20].min() > 0.5 and weights[12:20, 12:20].mean() > 0.8  # the object near 1
    assert weights[:3].mean() < 0.15 and weights[:3].max() < 0.35  # the background near 0
    texture = ForegroundBranch()
    found = texture.fit(_object_features(6, 0.3, 0, texture=True), torch.Generator().manual_seed(0))
    assert not found.object_like and not texture.object_like


def test_fisher_discriminant_separates_two_gaussians() -> None:
    g = torch.Generator().manual_seed(0)
    neg = torch.randn(500, 3, generator=g) * torch.tensor([1.0, 5.0, 5.0])
    pos = neg + torch.tensor([2.0, 0.0, 0.0])  # apart along the low-variance axis only
    w, b = fisher_discriminant(neg, pos)
    assert abs(float(w[0])) > 10 * max(abs(float(w[1])), abs(float(w[2])))
    assert float(((pos @ w + b) > 0).float().mean()) > 0.8 and float(((neg @ w + b) < 0).float().mean()) > 0.8


@pytest.mark.slow
def test_foreground_suppresses_background_responses(bottle: Path) -> None:
    split = load_dataset(bottle)
    # the paper's strides 4 and 8 (the default from 256 px; at 128 px the default is the finer pair)
    settings = {**SMALL, "image_size": 128, "steps": 0, "blur_sigma": 0, "layers": "stage2,stage3"}
    det = create_detector("cpr", settings)
    assert isinstance(det, CPR)
    det.fit(split.train[:24], [], progress=False)
    record = det.fit_record.phase("foreground")
    assert record is not None and record.extra["object_like"] and record.extra["used"]  # bottle: an object
    from anomnet.imageio import read_image, to_tensor

    good = next(s for s in split.test if s.label == 0)
    image = det.preprocess(to_tensor(read_image(good.path))[None])
    image[:, :, 4:16, 4:16] = 0.7  # a grey smudge on the white background
    on = det.predict_preprocessed(image)[1][0]
    det.config.foreground = "off"  # a scoring-time setting
    off = det.predict_preprocessed(image)[1][0]
    assert off[4:16, 4:16].mean() > 0.3  # the raw retrieval sees the smudge ...
    assert on[4:16, 4:16].mean() < 0.25 * off[4:16, 4:16].mean()  # ... the background weights suppress it
    assert torch.allclose(on[56:72, 56:72], off[56:72, 56:72], rtol=0.2)  # the bottle's centre is kept


# -- loss and pairs -----------------------------------------------------------------------
def test_loss_on_a_hand_computed_case() -> None:
    # one image, D = 2, a 1 x 2 feature map read at the two pixel centres of a 1 x 2 image
    query = torch.tensor([[[[1.0, 1.0]], [[0.0, 0.0]]]])  # both locations (1, 0)
    ref = torch.tensor([[[[0.6, 1.0]], [[0.8, 0.0]]]])  # (0.6, 0.8) and (1, 0)
    pts = torch.tensor([[[0.0, 0.0], [0.0, 1.0]]])
    assert torch.allclose(features_at(ref, pts, (1, 2)), torch.tensor([[[0.6, 1.0], [0.8, 0.0]]]))
    w = torch.tensor([[1.0, 1.0]])
    # positive: cos 0.6 and 1.0 -> ((0.8 - 0.6)^3 + 0) / 2
    # negative: the same pairs, weights 1 and 0.5 -> (((0.6 + 0.2) * 1)^3 + ((1.0 + 0.2) * 0.5)^3) / 2
    neg_w = torch.tensor([[1.0, 0.5]])
    l_pos, l_neg = retrieval_loss(query, ref, (pts, pts, w), (pts, pts, neg_w), (1, 2), 0.8, -0.2, 3)
    assert l_pos.item() == pytest.approx(0.2**3 / 2, rel=1e-5)
    assert l_neg.item() == pytest.approx((0.8**3 + 0.6**3) / 2, rel=1e-5)
    # padding (weight 0) neither adds nor counts
    assert hinge_power(torch.tensor([0.0, 0.0]), torch.tensor([1.0, 0.0]), 0.8, 3, True).item() == pytest.approx(0.8**3)
    # gradients flow to both sides
    q = query.clone().requires_grad_()
    r = ref.clone().requires_grad_()
    a, b = retrieval_loss(q, r, (pts, pts, w), (pts, pts, neg_w), (1, 2))
    (a + b).backward()
    assert q.grad is not None and q.grad.abs().sum() > 0 and r.grad is not None and r.grad.abs().sum() > 0


def test_distance_weights_keep_their_count() -> None:
    q = torch.tensor([[[0.0, 0.0, 0.0]]])
    r = torch.tensor([[[1.0, 2.0, 5.0]]])
    w = distance_weights(q, r, torch.tensor([[1.0, 1.0, 0.0]]))
    assert torch.allclose(w, torch.tensor([[0.4, 1.6, 0.0]]))  # 1 : 4, summing to the 2 valid pairs


def test_pairs_respect_the_defect_the_foreground_and_the_shift() -> None:
    masks = torch.zeros(2, 16, 16)
    masks[0, 4:8, 4:8] = 1
    weights = torch.zeros(2, 16, 16)
    weights[:, :, 8:] = 1.0  # foreground: the right half only
    pos, anomalous, neg = sample_pairs(masks, weights, 30, torch.Generator().manual_seed(0), True, min_shift=5.0)
    assert pos.query.shape == (2, 30, 2) and torch.equal(pos.query, pos.reference)
    valid = pos.weight > 0
    assert (pos.query[..., 1][valid] >= 8).all()  # drawn where the foreground is
    a_valid = anomalous.weight > 0
    assert a_valid[0].sum() == 16 and a_valid[1].sum() == 0  # all 16 defect pixels of image 0, none of image 1
    y, x = anomalous.query[0][a_valid[0]].long().unbind(1)
    assert masks[0, y, x].all()
    assert neg is not None
    n_valid = neg.weight > 0
    assert ((neg.query - neg.reference).norm(dim=-1)[n_valid] > 5.0).all()
    assert n_valid.sum() > 0 and (neg.reference[..., 1][n_valid] >= 8).all()


def test_fused_head_computes_the_same_features() -> None:
    torch.manual_seed(0)
    head = RetrievalHead([5, 7], width=16, dim=8)
    levels = [torch.randn(4, 5, 8, 8), torch.randn(4, 7, 4, 4)]
    head.train()
    head(levels)  # BatchNorm statistics that are not the identity
    head.eval()
    for a, b in zip(head(levels), head.fused()(levels)):
        assert torch.allclose(a, b, atol=1e-5)
        assert torch.allclose(a.norm(dim=1), torch.ones(()), atol=1e-5)


# -- the detector end to end ----------------------------------------------------------------
def test_bad_settings_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="windows"):
        create_detector("cpr", {"windows": "3,2"})
    with pytest.raises(ConfigError, match="windows"):
        create_detector("cpr", {"layers": "stage1,stage2,stage3"})
    with pytest.raises(ConfigError, match="head_width"):
        create_detector("cpr", {"head_width": 30})
    with pytest.raises(ConfigError, match="defect_kinds"):
        create_detector("cpr", {"defect_kinds": "dent"})


def test_fit_test_predict_save_load(folder_dataset: Path, tmp_path: Path) -> None:
    det = api.fit("cpr", folder_dataset, tmp_path / "m", settings=SMALL, progress=False)
    phases = [p.name for p in det.fit_record.phases]
    assert phases == ["levels", "features", "global_retrieval", "foreground", "train", "bank"]
    train = det.fit_record.phase("train")
    assert train is not None and train.steps == 3 and train.loss_first and train.loss_last
    assert det.fit_record.data_sources["defects"].startswith("drawn")
    res = api.test(det, folder_dataset, progress=False)
    assert res.metrics["image_auroc"] > 0.9  # the bright squares of the fixture stand out
    loaded = Detector.load(tmp_path / "m")
    assert isinstance(loaded, CPR)
    images = torch.rand(3, 3, 64, 64)
    a, b = det.predict(images), loaded.predict(images)
    assert torch.equal(a.scores, b.scores) and torch.equal(a.maps, b.maps)
    assert a.maps.shape == (3, 64, 64)
    # scoring-time settings reach the prediction
    loaded.config.k_images = 1
    assert not torch.equal(loaded.predict(images).maps, a.maps)


def test_tiling_rotations_and_defect_crops(folder_dataset: Path, tmp_path: Path) -> None:
    crops = tmp_path / "crops"
    crops.mkdir()
    crop = np.ones((10, 10, 3))
    crop[3:7, 3:7] = [0.1, 0.1, 0.9]
    Image.fromarray((crop * 255).astype(np.uint8)).save(crops / "blue.png")
    settings = {**SMALL, "image_size": 32, "tile": 48, "train_rotations": 2, "defects": str(crops)}
    det = api.fit("cpr", folder_dataset, settings=settings, progress=False)
    features = det.fit_record.phase("features")
    split = load_dataset(folder_dataset, val_fraction=0)  # leave-one-out calibration: every image trains
    assert features is not None and features.extra["inputs"] == det.training_count(split.train) > 2 * len(split.train)
    assert det.fit_record.data_sources["defects"] == f"{crops} (1 crops)"
    pred = det.predict(torch.rand(2, 3, 64, 80))
    assert pred.maps.shape == (2, 64, 80) and torch.isfinite(pred.scores).all()


def test_missing_defect_folder_fails_before_the_fit(folder_dataset: Path, tmp_path: Path) -> None:
    det = create_detector("cpr", {**SMALL, "defects": str(tmp_path / "nowhere")})
    split = load_dataset(folder_dataset)
    with pytest.raises(ConfigError, match="nowhere"):
        det.fit(split.train, split.validation, progress=False)
    assert det.fit_record.phase("features") is None


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_prediction_is_traceable_torch(folder_dataset: Path) -> None:
    det = api.fit("cpr", folder_dataset, settings={**SMALL, "steps": 1}, progress=False)
    assert isinstance(det, CPR)
    x = torch.rand(2, 3, 64, 64)
    model = det.model
    model.batch_chunk = 1 << 30  # one batched pass, no per-image loop
    with torch.inference_mode():
        expected = model(x, det.config)
    with torch.no_grad():
        traced = torch.jit.trace(
            lambda images: model(images, det.config), (torch.rand(2, 3, 64, 64),), check_trace=False
        )
        got = traced(x)
    assert torch.allclose(got[0], expected[0], atol=1e-5) and torch.allclose(got[1], expected[1], atol=1e-5)
    assert math.isfinite(float(got[0].sum()))


def test_command_line_fit_test_predict(folder_dataset: Path, tmp_path: Path) -> None:
    from anomnet.cli import EXIT_OK, main

    out = tmp_path / "cpr-model"
    sets = [a for k, v in SMALL.items() if k != "image_size" for a in ("--set", f"{k}={v}")]
    fit = ["fit", "--model", "cpr", "--data", str(folder_dataset), "--out", str(out), "--image-size", "64"]
    assert main([*fit, *sets, "--quiet"]) == EXIT_OK
    assert main(["test", "--model-dir", str(out), "--data", str(folder_dataset), "--quiet"]) == EXIT_OK
    assert main(["predict", "--model-dir", str(out), str(folder_dataset / "test"), "--out", str(tmp_path / "p")]) == (
        EXIT_OK
    )
    assert (tmp_path / "p" / "results.csv").is_file()
    assert main([*fit, "--overwrite", "--set", "windows=2,1", "--quiet"]) == 2  # a bad setting: exit 2


def test_default_levels_follow_the_image_size_and_are_saved(tmp_path: Path) -> None:
    from anomnet.data import Sample

    def images(side: int, n: int = 3) -> list[Sample]:
        out = []
        for i in range(n):
            path = tmp_path / f"{side}_{i}.png"
            rng = np.random.default_rng(i)
            Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(path)
            out.append(Sample(path, 0))
        return out

    tiny = {**SMALL, "steps": 0}
    # images smaller than the input (upsampled to it): strides 2 and 4; larger: the paper's 4 and 8 (docs/cpr.md)
    small = create_detector("cpr", {**tiny, "image_size": 64})
    small.fit(images(48), [], progress=False)
    assert small.config.layers == ("stage1", "stage2")
    levels = small.fit_record.phase("levels")
    assert levels is not None and levels.extra["image_side"] == 48 and levels.extra["layers"] == ["stage1", "stage2"]
    large = create_detector("cpr", {**tiny, "image_size": 64})
    large.fit(images(96), [], progress=False)
    assert large.config.layers == ("stage2", "stage3")
    given = create_detector("cpr", {**tiny, "image_size": 64, "layers": "stage2,stage3"})
    given.fit(images(48), [], progress=False)
    assert given.config.layers == ("stage2", "stage3")  # given levels are kept
    # the resolved levels are saved: the loaded model has them, whatever the default is
    small.save(tmp_path / "m")
    loaded = Detector.load(tmp_path / "m")
    assert loaded.config.layers == ("stage1", "stage2")
    x = torch.rand(1, 3, 64, 64)
    assert torch.allclose(small.predict(x).maps, loaded.predict(x).maps, atol=1e-5)


def test_bank_inputs_keep_a_coreset_of_the_references_of_a_full_fit(folder_dataset: Path, tmp_path: Path) -> None:
    settings = {**SMALL, "image_size": 32, "tile": 48}
    full = api.fit("cpr", folder_dataset, settings=settings, progress=False)
    small = api.fit("cpr", folder_dataset, settings={**settings, "bank_inputs": 3}, progress=False)
    assert isinstance(full, CPR) and isinstance(small, CPR)
    n = int(full.model.banks[0].shape[0])
    full.config.bank_inputs = 3
    kept = full.reference_inputs()  # the fit's choice: greedy k-center on the retrieval histograms
    assert n > 3 and kept.tolist() == sorted(kept.tolist()) and len(kept) == 3
    bank = small.fit_record.phase("bank")
    assert bank is not None and bank.extra == {"inputs": n, "kept": 3}
    # the same head and banks as the full fit, restricted to the kept inputs (so one fit can be re-scored)
    for a, b in zip(small.model.banks, full.model.banks):
        assert torch.equal(a, b[kept])
    assert torch.equal(small.model.retrieval.refs, full.model.retrieval.refs[kept])
    assert small.model.input_owner is not None and full.model.input_owner is not None
    assert torch.equal(small.model.input_owner, full.model.input_owner[kept])
    full.model.keep_inputs(kept)
    images = torch.rand(2, 3, 64, 80)
    assert torch.equal(full.predict(images).maps, small.predict(images).maps)
    loaded = Detector.load(small.save(tmp_path / "m"))
    assert isinstance(loaded, CPR) and loaded.config.bank_inputs == 3  # saved with the settings
    with pytest.raises(ConfigError):
        create_detector("cpr", {"bank_inputs": -1})
