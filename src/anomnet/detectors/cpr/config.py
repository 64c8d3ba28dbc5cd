"""CPR's settings: Literal choices and RANGES are checked once by :class:`DetectorConfig`.

Fit-time settings shape the saved model (backbone, layers, head, codebook, training); the
scoring-time ones (``k_images``, ``windows``, ``foreground``, ``blur_sigma``, ``top_share``) are
read at every prediction, so a fitted model can be re-scored with other values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from anomnet.backbones import DEFAULT_BACKBONE
from anomnet.detectors.base import DetectorConfig
from anomnet.errors import ConfigError
from anomnet.synthesis.defects import DEFECT_KINDS

Foreground = Literal["auto", "on", "off"]
BankDtype = Literal["float16", "float32"]
NegativeShift = Literal["outside_window", "window"]


@dataclass
class CPRConfig(DetectorConfig):
    backbone: str = DEFAULT_BACKBONE
    layers: tuple[str, ...] | None = None  # None: strides 4 and 8; 2 and 4 for images upsampled to the input
    weights: str | None = None  # backbone weights file (ResNet family); stored inside the model
    # global retrieval: block-wise histograms of codewords of the finest level, KL divergence
    k_images: int = 10  # training images retrieved per test image (scoring time)
    clusters: int = 12  # codewords (k-means on the finest level's features)
    blocks: int = 5  # histograms on a blocks x blocks grid
    block_share: float = 0.8  # share of the best-matching blocks that counts in the image distance
    # local retrieval: window side (in cells of its level) per level (scoring time)
    windows: tuple[int, ...] = (3, 1)
    # local retrieval head (trained on the frozen backbone levels); the reference code's widths are
    # head_width=192, head_block=256, head_dim=384 (docs/cpr.md, "Deviations")
    head_width: int = 96  # channels after the head's input convolution
    head_block: int = 0  # channels out of its four-branch block (0: head_width)
    head_dim: int = 128  # retrieval feature dimension
    bank_dtype: BankDtype = "float16"  # the stored training features (float16 halves the model)
    # training inputs (images or tiles) kept as references, a greedy k-center choice on their block
    # histograms (0: every input); the head still trains on every input. 600 bounds tiled bottle's
    # bank to 750 MB at 0.4 AU-PRO@0.05 points (docs/cpr.md, "Bounded banks")
    bank_inputs: int = 600
    # foreground estimation: "auto" (on where the fit finds an object on a background), "on", "off"
    foreground: Foreground = "auto"
    # training of the head on pseudo-anomalies (real-looking defects, anomnet.synthesis.defects)
    steps: int = 50  # training steps of train_batch_size (query, retrieved neighbour) pairs
    time_budget_s: float = 0.0  # > 0: the training stops after that many seconds (fewer steps)
    train_batch_size: int = 8
    train_crop: int = 128  # pairs train on aligned crops of this side in px (0: the whole input)
    lr: float = 1e-3  # AdamW, as the paper
    weight_decay: float = 1e-2
    points: int = 300  # sampled points per image of each kind (positive, negative, anomalous)
    pos_margin: float = 0.8  # positive pairs: loss while cosine similarity < pos_margin
    neg_margin: float = -0.2  # negative / anomalous pairs: loss while cosine similarity > neg_margin
    loss_power: int = 3
    anomaly_prob: float = 0.9  # share of query images that get a synthetic defect
    defects: str | None = None  # folder of real defect crops to paste (None: drawn spots, cracks, scratches)
    defect_kinds: tuple[str, ...] = DEFECT_KINDS
    # the reference code's salt-and-pepper and lightness augmentations of queries and references (augment.py)
    augment: bool = False
    # negative pairs (objects) are further apart than: "outside_window", the finest level's window half-side
    # plus one cell (stride x (window // 2 + 1) x sqrt 2); "window", the reference code's stride x (window // 2)
    # x sqrt 2 (half of it with the default window 3)
    negative_shift: NegativeShift = "outside_window"
    # scoring
    blur_sigma: float = 4.0
    top_share: float = 0.0  # image score: 0 = map maximum; else mean of this share of the highest map pixels

    RANGES: ClassVar[dict[str, tuple[float | None, float | None]]] = {
        "k_images": (1, 4096),
        "clusters": (2, 4096),
        "bank_inputs": (0, None),
        "blocks": (1, 64),
        "block_share": (1e-6, 1.0),
        "head_width": (4, 4096),
        "head_block": (0, 4096),
        "head_dim": (1, 4096),
        "steps": (0, 10_000_000),
        "time_budget_s": (0.0, None),
        "train_batch_size": (2, 4096),
        "train_crop": (0, 16384),
        "lr": (0.0, None),
        "weight_decay": (0.0, None),
        "points": (1, 100_000),
        "pos_margin": (-1.0, 1.0),
        "neg_margin": (-1.0, 1.0),
        "loss_power": (1, 8),
        "anomaly_prob": (0.0, 1.0),
        "blur_sigma": (0.0, 64.0),
        "top_share": (0.0, 1.0),
    }

    def validate(self) -> None:
        super().validate()
        if not self.windows or any(w < 1 or w % 2 == 0 or w > 31 for w in self.windows):
            raise ConfigError(f"setting windows={self.windows!r} must be odd sizes from 1 to 31, one per level")
        if self.layers is not None and len(self.layers) != len(self.windows):
            raise ConfigError(
                f"settings layers={self.layers!r} and windows={self.windows!r} must have one window per layer"
            )
        if self.head_width % 4:
            raise ConfigError(f"setting head_width={self.head_width} must be a multiple of 4")
        if self.head_block % 4:
            raise ConfigError(f"setting head_block={self.head_block} must be 0 or a multiple of 4")
        unknown = [k for k in self.defect_kinds if k not in DEFECT_KINDS]
        if unknown or not self.defect_kinds:
            raise ConfigError(f"setting defect_kinds={self.defect_kinds!r}: choose from {', '.join(DEFECT_KINDS)}")
