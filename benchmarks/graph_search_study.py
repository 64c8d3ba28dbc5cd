"""Why the exported search is a full exact scan: what the cheaper exact ideas cost on a real PatchCore bank.

For a fitted PatchCore model and a few test images of its data:

- **pruning**: the bank cut into balanced principal-axis cells of ``--cell-size`` vectors with their radii;
  the share of test patches whose nearest neighbour is *proved* after probing ``P`` cells (the next cell's
  lower bound ``|q - c| - r`` at least the best distance found), and for a PCA lower bound with ``p``
  components (``|P(q - b)|^2 + (|r_q| - |r_b|)^2``) how many bank vectors fall below the true nearest
  distance (the candidates a top-k would have to keep);
- **ops**: single-thread CPU time of the product ``[patches of one image, D] x [D, bank]`` alone, with the
  bank norms added in a separate pass, and reduced by ArgMin or TopK(1), in ONNX Runtime and OpenVINO.

::

    python benchmarks/graph_search_study.py --model-dir runs/bench-export/patchcore \\
        --data ../shared/datasets/mvtec_ad/bottle --out benchmarks/graph_search_study.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from anomnet.detectors.base import Detector
from anomnet.imageio import list_images, read_image


def _cells(bank: torch.Tensor, size: int) -> list[torch.Tensor]:
    """Balanced principal-axis cells: rows of ``bank`` split along the principal axis until each part is one cell."""
    leaves: list[torch.Tensor] = []
    stack = [(torch.arange(len(bank)), max(1, -(-len(bank) // size)))]
    while stack:
        idx, count = stack.pop()
        if count == 1:
            leaves.append(idx)
            continue
        part = bank[idx] - bank[idx].mean(0)
        axis = torch.linalg.svd(part, full_matrices=False)[2][0]
        order = torch.argsort(part @ axis, stable=True)
        cut = round(len(idx) * (count // 2) / count)
        stack += [(idx[order[:cut]], count // 2), (idx[order[cut:]], count - count // 2)]
    return leaves


def pruning(bank: torch.Tensor, queries: torch.Tensor, size: int) -> dict[str, Any]:
    bank, queries = bank.double(), queries.double()
    exact = torch.cdist(queries, bank)
    best = exact.min(1).values
    leaves = _cells(bank, size)
    centroids = torch.stack([bank[c].mean(0) for c in leaves])
    radius = torch.stack([(bank[c] - centroids[i]).norm(dim=1).max() for i, c in enumerate(leaves)])
    lower = torch.cdist(queries, centroids) - radius
    order = lower.argsort(1)
    cell_min = torch.stack([exact[:, c].min(1).values for c in leaves], 1)  # [N, cells]
    settled = {}
    for probe in (1, 2, 4, 8, 16):
        found = cell_min.gather(1, order[:, :probe]).min(1).values
        settled[probe] = float((lower.gather(1, order[:, probe : probe + 1])[:, 0] >= found).double().mean())
    mean = bank.mean(0)
    vectors = torch.linalg.eigh((bank - mean).T @ (bank - mean))[1].flip(1)
    candidates = {}
    for p in (16, 32, 64):
        head, tail = vectors[:, :p], vectors[:, p:]
        qt, bt = (queries - mean) @ tail, (bank - mean) @ tail
        lb = torch.cdist((queries - mean) @ head, (bank - mean) @ head) ** 2
        lb += (qt.norm(dim=1)[:, None] - bt.norm(dim=1)[None]) ** 2
        count = (lb < best[:, None] ** 2).sum(1).double()
        candidates[p] = {"median": float(count.median()), "share_within_16": float((count <= 16).double().mean())}
    return {
        "cells": len(leaves),
        "radius_median": float(radius.median()),
        "nearest_distance_median": float(best.median()),
        "settled_after_probing": settled,
        "pca_candidates": candidates,
    }


def ops(bank: torch.Tensor, queries: torch.Tensor, repeats: int) -> dict[str, float]:
    """ms of one thread's CPU time per call (median) of the search's pieces in ONNX Runtime and OpenVINO."""
    import onnxruntime as ort
    import openvino as ov

    norms = (bank * bank).sum(1)
    augmented = torch.cat([-2.0 * bank, norms[:, None]], 1).T.contiguous()

    class Piece(torch.nn.Module):
        def __init__(self, kind: str) -> None:
            super().__init__()
            self.kind = kind

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.kind == "product+norms pass":
                return (x @ (-2.0 * bank).T) + norms[None]
            d2 = torch.cat([x, torch.ones_like(x[:, :1])], 1) @ augmented
            if self.kind == "+argmin":
                return torch.argmin(d2, 1)
            if self.kind == "+top1":
                return torch.topk(d2, 1, 1, largest=False)[1]
            return d2[:, :1]

    runs = {}
    core = ov.Core()
    for kind in ("product", "product+norms pass", "+argmin", "+top1"):
        path = Path(tempfile.gettempdir()) / f"graph_search_study_{kind.replace(' ', '_').replace('+', '')}.onnx"
        torch.onnx.export(Piece(kind), (queries,), str(path), dynamo=False, opset_version=17, input_names=["q"])
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        runs[f"onnxruntime {kind}"] = lambda s=session: s.run(None, {"q": queries.numpy()})
        config = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": 1}
        compiled = core.compile_model(ov.convert_model(str(path)), "CPU", config)
        path.unlink()
        request = compiled.create_infer_request()
        runs[f"openvino {kind}"] = lambda r=request: r.infer({"q": queries.numpy()})
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeats):  # alternately, so a change of load hits all alike
        for name, fn in runs.items():
            fn()
            start = time.process_time()
            fn()
            times[name].append((time.process_time() - start) * 1000.0)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", required=True, help="a fitted PatchCore model")
    p.add_argument("--data", required=True, help="its dataset (test images are taken from test/)")
    p.add_argument("--images", type=int, default=4, help="test images whose patches are the queries")
    p.add_argument("--cell-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="benchmarks/graph_search_study.json")
    args = p.parse_args()
    torch.set_num_threads(1)
    det = Detector.load(args.model_dir)
    bank = det.model.nn.bank  # type: ignore[attr-defined]
    paths = list_images(Path(args.data) / "test", recursive=True)
    paths = [paths[i * len(paths) // args.images] for i in range(args.images)]
    images = torch.stack([torch.as_tensor(read_image(p)) for p in paths])
    images = images.permute(0, 3, 1, 2) if images.shape[-1] == 3 else images
    feats = det.model.extract(det.preprocess(images.float()))  # type: ignore[attr-defined]
    queries = feats.reshape(-1, feats.shape[-1]).contiguous()
    per_image = queries[: queries.shape[0] // args.images]
    report = {
        "model_dir": args.model_dir,
        "bank": list(bank.shape),
        "query_patches": queries.shape[0],
        "images": [str(p) for p in paths],
        "pruning": pruning(bank, queries, args.cell_size),
        "ops_ms_one_thread_cpu": ops(bank, per_image, args.repeats),
    }
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
