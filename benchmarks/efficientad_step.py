"""What one EfficientAD training step costs, part by part, and the step before and after its CPU changes.

At the default settings (S, backbone teacher, CDO, 256 px, 2 images a step) on one dataset's training images:

- ``parts``: median ms of each part of a step, timed one after another inside a step (appearance augmentation,
  noise patches, the teacher on the 2x upscaled image, student and autoencoder forward passes, the loss terms,
  backward, optimizer), as the detector's step runs them;
- ``ab``: the step as it ran before (unfused Adam, the hard loss' quantile from two ``kthvalue`` passes,
  reconstruction terms over a boolean gather of every channel, loss terms on mixed layouts) against the
  detector's own step (``EfficientAD._train`` with ``steps=2``), timed alternately, so a change of load hits
  both alike; the ratio is now / before.

::

    python benchmarks/efficientad_step.py --data ../shared/datasets/piped/PA_BTN01_RL --out effad-step.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch


def _old_quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    n = values.numel()
    pos = q * (n - 1)
    k = int(pos)
    lo = values.kthvalue(k + 1).values
    hi = values.kthvalue(k + 2).values if k + 1 < n else lo
    return lo + (pos - k) * (hi - lo)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="a dataset folder (its training images are used)")
    p.add_argument("--rounds", type=int, default=6, help="timed rounds (after one warm-up round)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="an EfficientAD setting")
    p.add_argument("--out", default=None, help="write the JSON report here")
    a = p.parse_args(argv)

    from anomnet.data import load_dataset
    from anomnet.detectors import create_detector
    from anomnet.detectors.efficientad.detector import EfficientAD, _masked_mean
    from anomnet.detectors.efficientad.losses import cdo_loss, hard_feature_loss, quantile_value
    from anomnet.detectors.efficientad.model import OUT_CHANNELS
    from anomnet.synthesis.appearance import appearance_augment
    from anomnet.synthesis.base import synthesize_batch
    from anomnet.synthesis.noise_patches import NoisePatches

    settings = dict(kv.split("=", 1) for kv in a.set)
    det = create_detector("efficientad", settings)
    assert isinstance(det, EfficientAD)
    c = det.config
    split = load_dataset(a.data)
    g = det.start_fit(split.train)
    images = det._load_images(split.train, None)
    det._teacher_statistics(images)
    m = det.model
    synth = NoisePatches(avoid_background=c.avoid_background)
    idx = list(range(min(c.train_batch_size, len(images))))

    # -- parts of the detector's step, timed one after another -------------------------------------
    m.student.train().to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    m.autoencoder.train()
    params = list(m.student.parameters()) + list(m.autoencoder.parameters())
    opt = torch.optim.Adam(params, lr=1e-6, weight_decay=1e-5, fused=True)
    parts: dict[str, list[float]] = {}

    def step_parts(record: bool) -> None:
        clock = [time.perf_counter()]

        def tick(name: str) -> None:
            now = time.perf_counter()
            if record:
                parts.setdefault(name, []).append(1000.0 * (now - clock[0]))
            clock[0] = now

        x = torch.stack([appearance_augment(images[i], g) for i in idx])
        tick("appearance augmentation")
        x, masks = synthesize_batch(synth, x, g, c.synth_probability)
        anomalous = det._anomaly_grid(masks)
        normal = ~anomalous
        tick("noise patches")
        t = m.teacher_features(x)
        tick("teacher (2x upscaled image)")
        xc = x.contiguous(memory_format=torch.channels_last)
        with m.autocast():
            s = m.student(xc).to(torch.float32, memory_format=torch.contiguous_format)
        tick("student forward")
        with m.autocast():
            ae = m.autoencoder(x).to(torch.float32, memory_format=torch.contiguous_format)
        tick("autoencoder forward")
        s_st, s_ae = s[:, :OUT_CHANNELS], s[:, OUT_CHANNELS:]
        hard = hard_feature_loss((t - s_st).pow(2), c.hard_quantile, normal)
        tick("hard loss (0.999 quantile)")
        cdo = cdo_loss(t, s_st, anomalous, c.cdo_gamma)
        tick("CDO loss")
        rec = _masked_mean((t - ae).pow(2).mean(1), normal) + _masked_mean((ae - s_ae).pow(2).mean(1), normal)
        tick("AE and ST-AE losses")
        opt.zero_grad(set_to_none=True)
        (hard + cdo + rec).backward()
        tick("backward")
        opt.step()
        tick("optimizer")

    for r in range(a.rounds + 1):
        step_parts(r > 0)

    # -- before / now, alternately ------------------------------------------------------------------
    def before_step() -> Callable[[], None]:
        m.student.train().to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        m.autoencoder.train().to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
        old_opt = torch.optim.Adam(params, lr=1e-6, weight_decay=1e-5)

        def run() -> None:
            import anomnet.detectors.efficientad.losses as losses

            losses.quantile_value = _old_quantile  # hard_feature_loss reads it from its module
            try:
                for _ in range(2):
                    x = torch.stack([appearance_augment(images[i], g) for i in idx])
                    x, masks = synthesize_batch(synth, x, g, c.synth_probability)
                    anomalous = det._anomaly_grid(masks)
                    normal = ~anomalous
                    t = m.teacher_features(x)
                    with m.autocast():
                        s = m.student(x.contiguous(memory_format=torch.channels_last)).float()
                        ae = m.autoencoder(x).float()
                    s_st, s_ae = s[:, :OUT_CHANNELS], s[:, OUT_CHANNELS:]
                    keep = normal[:, None].expand_as(ae)
                    total = (
                        hard_feature_loss((t - s_st).pow(2), c.hard_quantile, normal)
                        + cdo_loss(t, s_st, anomalous, c.cdo_gamma)
                        + (t - ae).pow(2)[keep].mean()
                        + (ae - s_ae).pow(2)[keep].mean()
                    )
                    old_opt.zero_grad(set_to_none=True)
                    total.backward()
                    old_opt.step()
            finally:
                losses.quantile_value = quantile_value

        return run

    def now_step() -> None:
        c.steps = 2
        det._train(images, None, g, False)  # type: ignore[arg-type]  # CDO: no generic pool

    ab: dict[str, list[float]] = {"before": [], "now": []}
    for r in range(a.rounds + 1):
        for name, fn in (("before", before_step()), ("now", now_step)):
            t0 = time.perf_counter()
            fn()
            if r:
                ab[name].append(1000.0 * (time.perf_counter() - t0) / 2)

    med = {k: statistics.median(v) for k, v in parts.items()}
    total = sum(med.values())
    report = {
        "command": "python benchmarks/efficientad_step.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "data": a.data,
        "settings": settings,
        "image_size": det.size,
        "batch": len(idx),
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg()[0],
        "parts_ms_median": med,
        "parts_share": {k: v / total for k, v in med.items()},
        "step_ms_sum_of_medians": total,
        "ab_ms_per_step": ab,
        "ab_median_ms": {k: statistics.median(v) for k, v in ab.items()},
        "ratio_now_to_before": statistics.median(ab["now"]) / statistics.median(ab["before"]),
    }
    for k, v in med.items():
        print(f"{k:30s} {v:8.0f} ms  {100 * v / total:5.1f} %")
    print(
        f"step (sum of medians) {total:.0f} ms; before {report['ab_median_ms']['before']:.0f} ms, now "
        f"{report['ab_median_ms']['now']:.0f} ms a step (ratio {report['ratio_now_to_before']:.2f})"
    )
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
