"""train_rotation_samples: each training input in its own pose and k - 1 turned poses drawn for it (seeded)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from anomnet.data import load_dataset
from anomnet.detectors import create_detector
from anomnet.detectors.hybrid.config import HybridConfig
from anomnet.errors import ConfigError
from anomnet.transforms import rotate, rotation_angles


def _pose_of(turned: torch.Tensor, image: torch.Tensor, angles: tuple[float, ...]) -> int:
    found = [i for i, a in enumerate(angles) if torch.allclose(turned, rotate(image[None], a)[0], atol=1e-5)]
    assert len(found) == 1, found
    return found[0]


def test_sampled_poses_are_drawn_per_input_seeded_and_counted(folder_dataset: Path) -> None:
    train = load_dataset(folder_dataset).train[:8]
    settings = {"image_size": 32, "batch_size": 8, "train_rotations": 8, "train_rotation_samples": 3}
    det = create_detector("patchcore", settings)
    batches = list(det.training_batches(train))
    assert [b.shape[0] for b in batches] == [8, 8, 8] and det.training_count(train) == 24
    assert torch.equal(batches[0], next(iter(det.training_batches(train, augment=False))))  # its own pose first
    angles = rotation_angles(8)
    poses = [[_pose_of(b[i], batches[0][i], angles) for b in batches[1:]] for i in range(8)]
    assert all(0 not in p and len(set(p)) == 2 for p in poses)  # two distinct turned poses per input
    assert len({p[0] for p in poses}) > 2  # drawn per input, not one angle for the whole batch
    again = list(create_detector("patchcore", settings).training_batches(train))
    assert all(torch.equal(a, b) for a, b in zip(batches, again, strict=True))  # seeded
    other = list(create_detector("patchcore", {**settings, "seed": 1}).training_batches(train))
    assert not all(torch.equal(a, b) for a, b in zip(batches, other, strict=True))
    owners = det.input_owners(train)
    assert all(torch.equal(owners.next_batch(8), torch.arange(8, dtype=torch.int32)) for _ in batches)
    assert owners.complete()


def test_all_poses_unless_sampled_and_bad_counts_refused() -> None:
    assert create_detector("patchcore", {"train_rotations": 4}).config.poses_per_input == 4
    assert create_detector("patchcore", {"train_rotations": 4, "train_rotation_samples": 4}).config.poses_per_input == 4
    with pytest.raises(ConfigError, match="train_rotation_samples=3 is more than the train_rotations=2"):
        create_detector("patchcore", {"train_rotations": 2, "train_rotation_samples": 3})
    with pytest.raises(ConfigError, match="train_rotation_samples=-1 is out of range"):
        create_detector("patchcore", {"train_rotation_samples": -1})


def test_patchcore_bank_from_sampled_poses_knows_its_owners(folder_dataset: Path) -> None:
    split = load_dataset(folder_dataset)
    base = {"image_size": 32, "coreset_ratio": 0.5}
    sizes = {}
    for name, extra in {"off": {}, "sampled": {"train_rotations": 8, "train_rotation_samples": 2}}.items():
        det = create_detector("patchcore", {**base, **extra})
        det.fit(split.train, split.validation, progress=False)
        bank = det.model.memory_bank
        assert isinstance(bank, torch.Tensor)
        sizes[name] = bank.shape[0]
        assert det.supports_leave_out
    assert sizes["sampled"] == 2 * sizes["off"]


def test_the_hybrid_gives_its_branches_the_sampled_poses() -> None:
    settings = {"branches": "patchcore,anomnet", "train_rotations": 8, "train_rotation_samples": 2}
    det = create_detector("hybrid", settings)
    assert isinstance(det.config, HybridConfig)
    assert {c["train_rotation_samples"] for c in det.config.branch_configs.values()} == {2}
