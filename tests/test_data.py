"""Tests of anomnet.data: layouts, validation split, ELPV, MVTec bottle, batches."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from anomnet import data as data_mod
from anomnet.data import Batch, DatasetSplit, Sample, iter_batches, load_dataset, split_validation
from anomnet.errors import ConfigError, DatasetError, ImageReadError

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
BOTTLE = SHARED / "mvtec_ad" / "bottle"


def _png(path: Path, hw: tuple[int, int] = (8, 8), value: int = 128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((*hw, 3), value, np.uint8)).save(path)
    return path


def _mask(path: Path, hw: tuple[int, int] = (8, 8), box: tuple[int, int, int, int] = (1, 1, 3, 3)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    m = np.zeros(hw, np.uint8)
    r0, c0, r1, c1 = box
    m[r0:r1, c0:c1] = 255
    Image.fromarray(m).save(path)
    return path


def _names(samples: list[Sample]) -> list[str]:
    return [s.path.name for s in samples]


# ------------------------------------------------------------------ generic folder layout


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "mydata"
    for i in range(6):
        _png(root / "train" / f"t{i}.png")
    for i in range(4):
        _png(root / "train" / "day2" / f"u{i}.png")
    _png(root / "test" / "good" / "g0.png")
    _png(root / "test" / "good" / "001.png")  # same stem as a mask: good images get none
    _png(root / "test" / "scratch" / "001.png")
    _png(root / "test" / "scratch" / "002.png")
    _png(root / "test" / "dent" / "010.png")
    _png(root / "test" / "dent" / "011.jpg")
    _mask(root / "masks" / "001_mask.png")
    _mask(root / "masks" / "002.png")
    _mask(root / "masks" / "dent" / "010.png")
    return root


def test_folder_layout(folder: Path) -> None:
    split = load_dataset(folder, val_fraction=0.2, seed=3)
    assert isinstance(split, DatasetSplit) and split.name == "folder:mydata"
    assert len(split.train) == 8 and len(split.validation) == 2
    assert all(s.label == 0 and s.mask_path is None for s in split.train + split.validation)
    by_name = {(s.defect_type, s.path.name): s for s in split.test}
    assert len(split.test) == 6
    assert by_name[("good", "001.png")].label == 0 and by_name[("good", "001.png")].mask_path is None
    assert by_name[("scratch", "001.png")].mask_path == folder / "masks" / "001_mask.png"
    assert by_name[("scratch", "002.png")].mask_path == folder / "masks" / "002.png"
    assert by_name[("dent", "010.png")].mask_path == folder / "masks" / "dent" / "010.png"
    assert by_name[("dent", "011.jpg")].mask_path is None and by_name[("dent", "011.jpg")].label == 1
    assert any("011.jpg" in w and "no mask" in w for w in split.warnings)


def test_folder_layout_explicit_and_fit_only(tmp_path: Path) -> None:
    root = tmp_path / "fit"
    for i in range(3):
        _png(root / "train" / f"{i}.bmp")
    split = load_dataset(root, layout="folder", val_fraction=0)
    assert len(split.train) == 3 and split.validation == [] and split.test == []


def test_folder_unused_mask_warning(folder: Path) -> None:
    _mask(folder / "masks" / "999.png")
    split = load_dataset(folder)
    assert any("999.png" in w and "match no" in w for w in split.warnings)


def test_folder_ambiguous_stems(folder: Path) -> None:
    _png(folder / "test" / "dent" / "002.png")  # 002 now in scratch/ and dent/, flat masks/002.png
    with pytest.raises(DatasetError) as info:
        load_dataset(folder)
    message = str(info.value)
    assert str(folder / "test" / "scratch" / "002.png") in message
    assert str(folder / "test" / "dent" / "002.png") in message


def test_folder_two_masks_for_one_image(folder: Path) -> None:
    _mask(folder / "masks" / "002_mask.png")
    with pytest.raises(DatasetError, match="more than one mask"):
        load_dataset(folder)


def test_folder_loose_test_images(folder: Path) -> None:
    _png(folder / "test" / "loose.png")
    with pytest.raises(DatasetError, match="test/good"):
        load_dataset(folder)


def test_folder_empty_train(tmp_path: Path) -> None:
    (tmp_path / "d" / "train").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"no image files.*\.png"):
        load_dataset(tmp_path / "d")


def test_bad_paths_and_layouts(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not found"):
        load_dataset(tmp_path / "missing")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(DatasetError, match="not a folder"):
        load_dataset(tmp_path / "file.txt")
    with pytest.raises(DatasetError, match="Accepted"):
        load_dataset(tmp_path)
    with pytest.raises(DatasetError, match="layout"):
        load_dataset(tmp_path, layout="coco")
    with pytest.raises(DatasetError, match=r"\[0, 1\)"):
        load_dataset(tmp_path, val_fraction=1.0)


# ------------------------------------------------------------------ MVTec-style layout


@pytest.fixture
def mvtec_root(tmp_path: Path) -> Path:
    root = tmp_path / "mvtec"
    for category in ("cable", "screw"):
        cat = root / category
        for i in range(10):
            _png(cat / "train" / "good" / f"{i:03d}.png")
        _png(cat / "test" / "good" / "000.png")
        _png(cat / "test" / "crack" / "000.png")
        _png(cat / "test" / "crack" / "001.png")
        _png(cat / "test" / "cut" / "000.png")
        _mask(cat / "ground_truth" / "crack" / "000_mask.png")
        _mask(cat / "ground_truth" / "crack" / "001.png")  # BTAD-style name
    return root


def test_mvtec_category_folder(mvtec_root: Path) -> None:
    split = load_dataset(mvtec_root / "cable")
    assert split.name == "mvtec:cable"
    assert len(split.train) == 9 and len(split.validation) == 1
    assert [(s.defect_type, s.label) for s in split.test] == [("crack", 1), ("crack", 1), ("cut", 1), ("good", 0)]
    masks = [s.mask_path for s in split.test]
    assert masks[0] == mvtec_root / "cable" / "ground_truth" / "crack" / "000_mask.png"
    assert masks[1] == mvtec_root / "cable" / "ground_truth" / "crack" / "001.png"
    assert masks[2] is None and masks[3] is None
    assert len(split.warnings) == 1 and "cut" in split.warnings[0]


def test_mvtec_root_with_category(mvtec_root: Path) -> None:
    split = load_dataset(mvtec_root, category="screw", layout="mvtec")
    assert split.name == "mvtec:screw"
    assert load_dataset(mvtec_root / "screw", category="screw").name == "mvtec:screw"


def test_mvtec_root_without_category_lists_categories(mvtec_root: Path) -> None:
    with pytest.raises(DatasetError, match="cable, screw"):
        load_dataset(mvtec_root)
    with pytest.raises(DatasetError, match="cable, screw"):
        load_dataset(mvtec_root, category="bottle")


def test_btad_ok_folders(tmp_path: Path) -> None:
    cat = tmp_path / "01"
    for i in range(5):
        _png(cat / "train" / "ok" / f"{i:04d}.bmp")
    _png(cat / "test" / "ok" / "0000.bmp")
    _png(cat / "test" / "ko" / "0001.bmp")
    _mask(cat / "ground_truth" / "ko" / "0001.png")
    split = load_dataset(cat, val_fraction=0.2)
    assert len(split.train) == 4 and len(split.validation) == 1
    assert [(s.label, s.mask_path) for s in split.test] == [(1, cat / "ground_truth" / "ko" / "0001.png"), (0, None)]


def test_masks_folder_means_generic_layout(tmp_path: Path) -> None:
    root = tmp_path / "d"
    _png(root / "train" / "good" / "a.png")
    _png(root / "train" / "good" / "b.png")
    _png(root / "test" / "good" / "c.png")
    _png(root / "test" / "bad" / "d.png")
    _mask(root / "masks" / "d.png")
    split = load_dataset(root)
    assert split.name == "folder:d"
    assert [s.mask_path for s in split.test if s.label == 1] == [root / "masks" / "d.png"]


@pytest.mark.slow
def test_mvtec_bottle_counts() -> None:
    if not BOTTLE.is_dir():
        pytest.skip(f"{BOTTLE} not available")
    split = load_dataset(BOTTLE)
    assert split.name == "mvtec:bottle"
    assert len(split.train) + len(split.validation) == 209
    assert len(split.validation) == 21
    assert not {s.path for s in split.train} & {s.path for s in split.validation}
    assert len(split.test) == 83
    defective = [s for s in split.test if s.label == 1]
    assert len(defective) == 63
    assert all(s.mask_path is not None and s.mask_path.is_file() for s in defective)
    assert {s.defect_type for s in defective} == {"broken_large", "broken_small", "contamination"}
    assert split.warnings == []
    assert load_dataset(BOTTLE.parent, category="bottle").test == split.test


@pytest.mark.slow
def test_mvtec_bottle_masks_align() -> None:
    if not BOTTLE.is_dir():
        pytest.skip(f"{BOTTLE} not available")
    split = load_dataset(BOTTLE)
    samples = [s for s in split.test if s.label == 1][:2] + [s for s in split.test if s.label == 0][:1]
    batches = list(iter_batches(samples, 4, with_masks=True))
    assert len(batches) == 1
    batch = batches[0]
    assert batch.images.shape == (3, 3, 900, 900) and batch.masks is not None
    assert batch.masks.dtype == torch.bool and batch.masks.shape == (3, 900, 900)
    assert batch.masks[0].any() and batch.masks[1].any() and not batch.masks[2].any()


# ------------------------------------------------------------------ validation split


def _samples(names: list[str]) -> list[Sample]:
    return [Sample(Path(f"/d/{n}.png"), 0) for n in names]


@settings(max_examples=60, deadline=None)
@given(
    names=st.lists(st.text("abcdefghij0123456789", min_size=1, max_size=6), unique=True, max_size=40),
    fraction=st.floats(0.0, 0.95),
    seed=st.integers(0, 2**31),
    shuffle_seed=st.integers(0, 1000),
)
def test_split_validation_properties(names: list[str], fraction: float, seed: int, shuffle_seed: int) -> None:
    samples = _samples(names)
    train, val = split_validation(samples, fraction, seed)
    shuffled = list(samples)
    np.random.default_rng(shuffle_seed).shuffle(shuffled)
    assert split_validation(shuffled, fraction, seed) == (train, val)  # order independent + deterministic
    assert not set(train) & set(val)
    assert sorted(train + val, key=str) == sorted(samples, key=str)
    n = len(samples)
    if fraction == 0 or n < 2:
        assert val == []
    else:
        assert 1 <= len(val) <= n - 1
        assert len(val) == min(n - 1, max(1, int(np.floor(fraction * n + 0.5))))


def test_split_validation_seed_matters_and_bounds() -> None:
    samples = _samples([f"{i:03d}" for i in range(50)])
    assert split_validation(samples, 0.2, 0)[1] != split_validation(samples, 0.2, 1)[1]
    assert len(split_validation(samples, 0.1, 0)[1]) == 5
    assert split_validation(samples[:1], 0.5, 0) == (samples[:1], [])
    for bad in (-0.1, 1.0, float("nan")):
        with pytest.raises(DatasetError, match="validation fraction"):
            split_validation(samples, bad, 0)


# ------------------------------------------------------------------ ELPV

elpv_installed = pytest.mark.skipif(
    importlib.util.find_spec("elpv_dataset") is None, reason="elpv-dataset not installed"
)


@elpv_installed
def test_elpv_counts() -> None:
    split = load_dataset("elpv")
    assert split.name == "elpv"
    normal_test = [s for s in split.test if s.label == 0]
    defective = [s for s in split.test if s.label == 1]
    assert (len(split.train), len(split.validation), len(normal_test)) == (905, 151, 452)
    assert len(split.train) + len(split.validation) + len(normal_test) == 1508
    assert len(defective) == 715 and all(s.defect_type == "defective" and s.mask_path is None for s in defective)
    groups = [{s.path for s in split.train}, {s.path for s in split.validation}, {s.path for s in normal_test}]
    assert not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2])
    again = load_dataset("elpv", seed=0)
    assert again.train == split.train and again.test == split.test
    assert load_dataset("elpv", seed=1).train != split.train


@elpv_installed
def test_elpv_read_one_image() -> None:
    split = load_dataset("elpv")
    image = data_mod.read_image(split.test[-1].path)
    assert image.shape == (300, 300, 3) and image.dtype == np.float32
    assert 0.0 <= image.min() <= image.max() <= 1.0


@elpv_installed
def test_elpv_cell_type() -> None:
    mono = load_dataset("elpv", cell_type="mono")
    poly = load_dataset("elpv", cell_type="poly")
    assert mono.name == "elpv:mono"
    assert sum(s.label for s in mono.test) + sum(s.label for s in poly.test) == 715
    with pytest.raises(DatasetError, match="mono"):
        load_dataset("elpv", cell_type="cdte")


def test_elpv_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "elpv_dataset" else real(name, *a)
    )
    with pytest.raises(DatasetError, match="pip install elpv-dataset"):
        load_dataset("elpv")


def test_elpv_local_copy(tmp_path: Path) -> None:
    lines = []
    for i in range(10):
        _png(tmp_path / "images" / f"cell{i:04d}.png")
        lines.append(f"images/cell{i:04d}.png  {[0.0, 1.0, 0.3333333333333333][i % 3]}  {'mono' if i < 5 else 'poly'}")
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    split = load_dataset(tmp_path)  # auto-detected by labels.csv + images/
    assert split.name == "elpv"
    assert len(split.train) + len(split.validation) + sum(1 for s in split.test if s.label == 0) == 4
    assert sum(s.label for s in split.test) == 3
    (tmp_path / "labels.csv").write_text("images/cell0000.png  zero  mono\n")
    with pytest.raises(DatasetError, match="line 1"):
        load_dataset(tmp_path, layout="elpv")


# ------------------------------------------------------------------ batches


def _stand_in_resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return torch.nn.functional.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False)


@pytest.fixture
def sized(tmp_path: Path) -> list[Sample]:
    specs = [("a", (8, 8)), ("b", (8, 8)), ("c", (6, 10)), ("d", (8, 8)), ("e", (8, 8)), ("f", (8, 8))]
    samples = []
    for i, (name, hw) in enumerate(specs):
        path = _png(tmp_path / f"{name}.png", hw, value=10 * i)
        mask = _mask(tmp_path / f"{name}_mask.png", hw, box=(i % 3, 1, i % 3 + 2, 4)) if name in "ac" else None
        samples.append(Sample(path, int(mask is not None), mask, "x" if mask else "good"))
    return samples


def test_iter_batches_groups_sizes(sized: list[Sample]) -> None:
    batches = list(iter_batches(sized, batch_size=2))
    assert [len(b.samples) for b in batches] == [2, 1, 2, 1]
    assert [tuple(b.images.shape) for b in batches] == [(2, 3, 8, 8), (1, 3, 6, 10), (2, 3, 8, 8), (1, 3, 8, 8)]
    assert [s for b in batches for s in b.samples] == sized
    assert batches[1].original_hw == [(6, 10)]
    assert all(b.masks is None and b.images.dtype == torch.float32 for b in batches)
    assert torch.allclose(batches[0].images[1], torch.full((3, 8, 8), 10 / 255))


def test_iter_batches_resizes(sized: list[Sample], monkeypatch: pytest.MonkeyPatch) -> None:
    if importlib.util.find_spec("anomnet.transforms") is None:  # stand-in until transforms exists
        import sys
        import types

        monkeypatch.setitem(sys.modules, "anomnet.transforms", types.SimpleNamespace(resize=_stand_in_resize))
    batches = list(iter_batches(sized, batch_size=4, size=16))
    assert [tuple(b.images.shape) for b in batches] == [(4, 3, 16, 16), (2, 3, 16, 16)]
    assert batches[0].original_hw == [(8, 8), (8, 8), (6, 10), (8, 8)]
    assert torch.allclose(batches[0].images[2], torch.full((3, 16, 16), 20 / 255), atol=1e-6)
    rect = list(iter_batches(sized[:1], batch_size=1, size=(4, 12)))
    assert rect[0].images.shape == (1, 3, 4, 12)


def test_iter_batches_masks(sized: list[Sample]) -> None:
    batches = list(iter_batches(sized, batch_size=3, with_masks=True))
    first = batches[0]
    assert first.masks is not None and first.masks.dtype == torch.bool and first.masks.shape == (2, 8, 8)
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[0:2, 1:4] = True
    assert torch.equal(first.masks[0], expected)
    assert not first.masks[1].any()  # good image: all False
    c = batches[1]
    assert c.masks is not None and c.masks.shape == (1, 6, 10) and c.masks[0, 2:4, 1:4].all()


def test_iter_batches_masks_with_size_keep_original_resolution(sized: list[Sample]) -> None:
    batches = list(iter_batches(sized, batch_size=8, size=16, with_masks=True))
    assert [len(b.samples) for b in batches] == [2, 1, 3]  # split where the original size changes
    assert all(b.images.shape[-2:] == (16, 16) for b in batches)
    assert batches[1].masks is not None and batches[1].masks.shape == (1, 6, 10)


def test_iter_batches_wrong_mask_size(tmp_path: Path) -> None:
    image = _png(tmp_path / "i.png", (8, 8))
    mask = _mask(tmp_path / "i_mask.png", (4, 4))
    with pytest.raises(ImageReadError) as info:
        list(iter_batches([Sample(image, 1, mask, "x")], 1, with_masks=True))
    assert str(mask) in str(info.value) and "4x4" in str(info.value) and "8x8" in str(info.value)


def test_iter_batches_workers_match_serial(sized: list[Sample]) -> None:
    serial = list(iter_batches(sized, 2, with_masks=True))
    threaded = list(iter_batches(sized, 2, with_masks=True, num_workers=2))
    assert len(serial) == len(threaded)
    for a, b in zip(serial, threaded, strict=True):
        assert isinstance(b, Batch) and a.samples == b.samples and torch.equal(a.images, b.images)
        assert a.masks is not None and b.masks is not None and torch.equal(a.masks, b.masks)


def test_iter_batches_worker_error_is_image_read_error(sized: list[Sample], tmp_path: Path) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"garbage")
    with pytest.raises(ImageReadError, match="broken.png"):
        list(iter_batches([*sized, Sample(broken, 0)], 2, num_workers=2))


def test_iter_batches_progress_and_settings(sized: list[Sample], capsys: pytest.CaptureFixture[str]) -> None:
    assert len(list(iter_batches(sized, 10, progress="reading"))) == 3
    assert "reading" in capsys.readouterr().err
    assert list(iter_batches([], 4)) == []
    with pytest.raises(ConfigError):
        list(iter_batches(sized, 0))
    with pytest.raises(ConfigError):
        list(iter_batches(sized, 2, size=(0, 5)))


def test_mvtec_ad2_layout(tmp_path: Path) -> None:
    cat = tmp_path / "can"
    for i in range(6):
        _png(cat / "train" / "good" / f"{i:03d}_regular.png")
    for i in range(2):
        _png(cat / "validation" / "good" / f"{i:03d}_regular.png")
    _png(cat / "test_public" / "good" / "000_regular.png")
    _png(cat / "test_public" / "bad" / "000_regular.png")
    _mask(cat / "test_public" / "ground_truth" / "bad" / "000_regular_mask.png")
    split = load_dataset(cat)
    assert len(split.train) == 6  # the official validation/good images are the validation set
    assert [s.path.parent.parent.name for s in split.validation] == ["validation", "validation"]
    assert [(s.defect_type, s.mask_path) for s in split.test] == [
        ("bad", cat / "test_public" / "ground_truth" / "bad" / "000_regular_mask.png"),
        ("good", None),
    ]
    assert len(load_dataset(cat, val_fraction=0).validation) == 0
