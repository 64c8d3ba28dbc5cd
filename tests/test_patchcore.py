"""PatchCore end to end on small synthetic data (real EfficientNet-Lite0 weights)."""

from __future__ import annotations

import pytest
import torch

from anomnet import api
from anomnet.data import load_dataset
from anomnet.detectors import Detector, create_detector
from anomnet.errors import BackboneWeightsError, ConfigError, NotFittedError
from anomnet.evaluation.evaluate import evaluate

SMALL = {"image_size": 64, "batch_size": 4}


def test_fit_predict_finds_the_defects(folder_dataset, tmp_path) -> None:
    det = api.fit("patchcore", folder_dataset, tmp_path / "m", settings=SMALL, progress=False)
    split = load_dataset(folder_dataset, val_fraction=0)  # leave-one-out calibration: no image held out
    res = evaluate(det, split.test, progress=False)
    assert res.metrics["image_auroc"] == 1.0
    assert res.metrics["pixel_auroc"] > 0.9
    assert det.memory_bank is not None and det.memory_bank.shape[0] == round(0.1 * len(split.train) * 8 * 8)


def test_maps_come_back_at_input_resolution(folder_dataset, tmp_path) -> None:
    det = api.fit("patchcore", folder_dataset, None, settings={**SMALL, "crop": 56}, progress=False)
    pred = det.predict(torch.rand(2, 3, 90, 70))
    assert pred.scores.shape == (2,) and pred.maps.shape == (2, 90, 70)
    assert torch.isfinite(pred.maps).all()


def test_save_load_gives_bit_identical_scores(folder_dataset, tmp_path) -> None:
    det = api.fit("patchcore", folder_dataset, tmp_path / "m", settings=SMALL, progress=False)
    loaded = Detector.load(tmp_path / "m")
    x = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    a, b = det.predict(x), loaded.predict(x)
    assert torch.equal(a.scores, b.scores) and torch.equal(a.maps, b.maps)
    assert loaded.calibration == det.calibration
    assert loaded.config == det.config


def test_ivf_model_saves_its_cells(folder_dataset, tmp_path) -> None:
    split = load_dataset(folder_dataset)
    det = create_detector("patchcore", {**SMALL, "nn_backend": "ivf", "coreset_ratio": "0.5"})
    det.fit(split.train, split.validation, progress=False)
    assert "nn_centroids" in det.state_tensors()
    det.save(tmp_path / "m")
    loaded = Detector.load(tmp_path / "m")
    assert loaded.model.nn.backend == "ivf"
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    assert torch.equal(det.predict(x).maps, loaded.predict(x).maps)


def test_exact_and_faiss_search_give_the_same_scores(folder_dataset) -> None:
    pytest.importorskip("faiss")
    split = load_dataset(folder_dataset)
    exact = create_detector("patchcore", {**SMALL, "nn_backend": "exact"})
    exact.fit(split.train, split.validation, progress=False)
    fa = create_detector("patchcore", {**SMALL, "nn_backend": "faiss", "aspect": exact.config.aspect})  # as fit decided
    fa.load_state_tensors(exact.state_tensors())
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    pe, pf = exact.predict(x), fa.predict(x)
    assert torch.allclose(pe.scores, pf.scores, rtol=1e-4, atol=1e-4)
    assert torch.allclose(pe.maps, pf.maps, rtol=1e-4, atol=1e-4)


def test_resnet_weights_travel_inside_the_model(folder_dataset, tmp_path) -> None:
    from anomnet.backbones import create_backbone

    net = create_backbone("resnet18", ("layer2", "layer3"), "random")
    # a torchvision-format state dict (no wrapper) written to a user file
    sd = {k.split("net.", 1)[-1]: v for k, v in net.state_dict().items()}
    torch.save(sd, tmp_path / "r18.pth")
    det = api.fit(
        "patchcore",
        folder_dataset,
        tmp_path / "m",
        settings={**SMALL, "backbone": "resnet18", "weights": str(tmp_path / "r18.pth")},
        progress=False,
    )
    (tmp_path / "r18.pth").unlink()  # the saved model must not need the file any more
    loaded = Detector.load(tmp_path / "m")
    x = torch.rand(1, 3, 64, 64)
    assert torch.equal(det.predict(x).scores, loaded.predict(x).scores)


def test_wrong_weights_file_is_a_clear_error(folder_dataset, tmp_path) -> None:
    torch.save({"conv1.weight": torch.zeros(3)}, tmp_path / "bad.pth")
    with pytest.raises(BackboneWeightsError, match="bad.pth"):
        api.fit(
            "patchcore",
            folder_dataset,
            None,
            settings={**SMALL, "backbone": "wide_resnet50_2", "weights": str(tmp_path / "bad.pth")},
            progress=False,
        )


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ConfigError, match="coreset_ratio"):
        create_detector("patchcore", {"coreset_ratio": "0"})
    with pytest.raises(ConfigError, match="unknown model"):
        create_detector("nope")
    with pytest.raises(ConfigError):
        create_detector("patchcore", {"backbone": "vgg"})
    with pytest.raises(NotFittedError, match="not fitted"):
        create_detector("patchcore", SMALL).predict(torch.rand(1, 3, 64, 64))
    with pytest.raises(ConfigError, match="patch_size=4"):
        create_detector("patchcore", {"patch_size": "4"})
    with pytest.raises(ConfigError, match="nn_backend='hnsw'"):
        create_detector("patchcore", {"nn_backend": "hnsw"})


def test_resnet_features_refuse_to_run_before_weights_exist() -> None:
    det = create_detector("patchcore", {**SMALL, "backbone": "resnet18"})
    with pytest.raises(NotFittedError, match="weights"):
        det.extract(torch.rand(1, 3, 64, 64))


def test_fit_records_its_phases(folder_dataset) -> None:
    split = load_dataset(folder_dataset)
    det = create_detector("patchcore", SMALL)
    det.fit(split.train, split.validation, progress=False)
    assert [p.name for p in det.fit_record.phases] == ["features", "coreset", "index"]
    assert det.fit_record.seed == 0


def test_chunked_coreset_bounds_the_buffer(folder_dataset) -> None:
    """A chunk smaller than the training set gives a bank of the same size, chunk by chunk."""
    split = load_dataset(folder_dataset)
    det = create_detector("patchcore", {**SMALL, "coreset_chunk": 100})
    det.fit(split.train, split.validation, progress=False)
    n = len(split.train) * 64
    expected = sum(max(1, round(0.1 * min(100, n - s))) for s in range(0, n, 100))
    assert det.memory_bank.shape[0] == expected


@pytest.mark.parametrize("chunk", [200_000, 100])
def test_coreset_max_caps_the_bank_and_leaves_small_banks_alone(folder_dataset, chunk: int) -> None:
    """Above ``coreset_max`` patches the share kept drops for every chunk, so the bank holds about the cap."""
    split = load_dataset(folder_dataset)
    n = len(split.train) * 64  # 8 x 8 patches per 64 px image
    capped = create_detector(
        "patchcore", {**SMALL, "coreset_ratio": "0.5", "coreset_max": "20", "coreset_chunk": chunk}
    )
    capped.fit(split.train, split.validation, progress=False)
    chunks = -(-n // min(chunk, n))
    assert 20 - chunks <= capped.memory_bank.shape[0] <= 20 + chunks  # rounding: within a patch per chunk
    assert capped.fit_record.phases[1].extra == {"patches": n, "ratio": 20 / n}
    loose = create_detector("patchcore", {**SMALL, "coreset_max": str(n)})  # 10 % of n is below the cap
    loose.fit(split.train, split.validation, progress=False)
    assert loose.memory_bank.shape[0] == round(0.1 * n)
    with pytest.raises(ConfigError):
        create_detector("patchcore", {"coreset_max": "-1"})
