"""One self-contained HTML report of a test run (``anomnet test --report PATH.html``).

Everything comes from one :func:`anomnet.evaluation.evaluate.evaluate` call made with ``keep_worst`` and
``curve_points`` (as ``api.test(..., report=PATH)`` does): the metrics table, the image ROC / PR curves
(from the image scores, :func:`anomnet.evaluation.metrics.roc_curve`), the pixel ROC / PR / PRO curves
(recorded by the same pass that computes pixel AUROC and AU-PRO), score histograms with the
threshold, and the highest-scoring good / lowest-scoring defective images with their heat maps
(:mod:`anomnet.predict.visualize`). Plots are drawn with matplotlib's Agg renderer and embedded as
base64 PNG; the file references nothing outside itself. Without masks (e.g. ELPV) the pixel
parts are left out.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as _dt
import html
import io
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from anomnet import __version__, imageio
from anomnet.detectors.base import Detector
from anomnet.errors import AnomnetError, ConfigError
from anomnet.evaluation.evaluate import EvaluationResult, KeptImage
from anomnet.evaluation.metrics import precision_recall_curve, roc_curve
from anomnet.predict.visualize import draw_contour, heatmap, labelled_panels, overlay

#: Good and defective images shown in the report's "worst cases" sections (each).
WORST_CASES = 4
#: Resolution of the pixel curves (at most 4 n + 3 points each; see PixelCurves).
CURVE_POINTS = 1000
#: Outline colour of the model's own defect mask in the worst-case images (ground truth: white).
MODEL_MASK_COLOUR = (255, 220, 0)
#: Titles of the worst cases' panels.
PANEL_TITLES = ("image", "overlay", "heat map")
#: FPR limit of the PRO curve plot (the MVTec AD AU-PRO limit).
PRO_PLOT_LIMIT = 0.3

METRIC_NOTES = {
    "image_auroc": "image-level area under the ROC curve",
    "image_f1_max": "best image-level F1 over all thresholds (uses test labels; for comparison only)",
    "precision": "image precision at the model's calibrated threshold",
    "recall": "image recall at the model's calibrated threshold",
    "f1": "image F1 at the model's calibrated threshold",
    "false_alarm_rate": "share of the good test images the model calls defective at its threshold (false alarms); "
    "compare it with the rate asked for and the rate the calibration supports below",
    "seg_f1": "pixel F1 of the defect masks the model itself draws (pooled over the test images): its verdict, "
    "so an image called good counts with no mask and a defective one with its pixel-threshold mask",
    "pixel_auroc": "pixel-level area under the ROC curve",
    "pixel_f1_max": "best pixel-level F1 over all thresholds (uses test masks; for comparison only)",
    "au_pro@0.3": "area under the per-region-overlap curve up to FPR 0.3, normalised (MVTec AD)",
    "au_pro@0.05": "area under the per-region-overlap curve up to FPR 0.05, normalised (MVTec AD 2)",
}

#: The meaning of each number of the report's calibration table (Calibration's fields, lists left out).
CALIBRATION_NOTES = {
    "max_false_alarm": "false-alarm rate asked for when the image threshold was chosen",
    "threshold": "image threshold: a score at or above it is called defective",
    "achieved_false_alarm": "false-alarm rate the good calibration images support for that threshold",
    "note": "remark of the image-threshold choice",
    "map_low": "median anomaly-map value of the good calibration images: the bottom (blue) of the heat maps' "
    "colour scale",
    "map_high": "highest anomaly-map value seen on them: the middle of the colour scale (its top is twice as far)",
    "image_method": "how the image threshold was chosen (conformal, mean-std, fixed, f1)",
    "std_k": "k of the mean-std image threshold (mean + k std of the calibration scores)",
    "image_value": "the image threshold given by hand (fixed method)",
    "score_mean": "mean of the good calibration images' scores",
    "score_std": "standard deviation of the good calibration images' scores",
    "pixel_method": "how the pixel threshold was chosen (quantile, mean-std, f1, segf1, fixed)",
    "pixel_false_alarm": "share of good calibration pixels allowed at or above the pixel threshold (quantile method)",
    "pixel_value": "the pixel threshold given by hand (fixed method)",
    "pixel_threshold": "anomaly-map value where a defective image's mask begins (purple line on the colour bar)",
    "pixel_achieved_false_alarm": "share of the sampled good calibration pixels at or above the pixel threshold",
    "pixel_note": "remark of the pixel-threshold choice",
    "pixel_std_k": "k of the mean-std pixel threshold (mean + k std of the good calibration pixels)",
    "pixel_mean": "mean of the sampled good calibration pixels' map values",
    "pixel_std": "standard deviation of those values",
    "pixel_count": "good calibration pixels sampled for the pixel statistics",
    "labelled": "what a labelled validation set told the thresholds (none when not given)",
    "source": "where the calibration scores came from: holdout, loo (leave-one-out) or crossfit",
    "source_note": "the calibration set in words",
}


def check_report_path(path: str | Path) -> Path:
    """The report path, or a :class:`ConfigError` saying why it cannot be written.

    Missing parent folders are fine (they are created when the report is written) as long as the
    nearest existing one is a writable folder. Called before the evaluation, so a bad path is
    reported at once rather than after minutes of scoring.
    """
    if path is None or str(path).strip() == "":
        raise ConfigError("report path is empty: give a file name such as report.html")
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"report path {p} is a folder; give a file name such as {p / 'report.html'}")
    parent = p.parent
    while not parent.exists():
        if parent == parent.parent:
            break
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"cannot write report {p}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write report {p}: folder {parent} is not writable")
    if p.exists() and not os.access(p, os.W_OK):
        raise ConfigError(f"cannot write report {p}: the file exists and is not writable")
    return p


def write_report(
    result: EvaluationResult,
    detector: Detector,
    path: str | Path,
    dataset: str = "",
    model_dir: str | Path | None = None,
) -> Path:
    """Write the HTML report of ``result`` to ``path``; returns the path.

    ``result`` should come from :func:`~anomnet.evaluation.evaluate.evaluate` with ``keep_worst`` (e.g.
    :data:`WORST_CASES`) and ``curve_points`` (e.g. :data:`CURVE_POINTS`); without them the
    pixel curves and the worst-case images are left out.
    """
    return _write_page(path, render_report(result, detector, dataset, model_dir))


def _write_page(path: str | Path, text: str) -> Path:
    """Write one HTML page atomically to a checked report path; a failed write is a clear error."""
    target = check_report_path(path)
    try:
        imageio.atomic_write_text(target, text)
    except OSError as exc:
        raise ConfigError(f"cannot write report {target}: {exc.strerror or exc}") from None
    return target


def write_pooled_report(
    path: str | Path, title: str, metrics: dict[str, float], note: str, parts: Sequence[tuple[str, str, int]]
) -> Path:
    """Write a one-page report of test images scored by several models: the pooled metrics and a link to each
    model's own report (``parts``: name, report path relative to ``path``'s folder, test images)."""
    links = [
        f'<tr><td>{_e(name)}</td><td class="num">{n}</td><td><a href="{_e(href)}">{_e(href)}</a></td></tr>'
        for name, href, n in parts
    ]
    text = "\n".join(
        [
            *_page_head(title),
            f'<p class="note">{_e(note)}</p>',
            _table([("date", _now()), ("anomnet", __version__)]),
            "<h2>Metrics of all test images</h2>",
            _metrics_table(metrics),
            "<h2>Each model's report</h2>",
            "<table><tr><th>model</th><th>test images</th><th>report</th></tr>",
            *links,
            "</table>",
            "</body></html>",
        ]
    )
    return _write_page(path, text + "\n")


# --------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.8em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.5em 0; }
td, th { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.plots img { width: 48%; min-width: 320px; }
figure.case img { max-width: 100%; height: auto; }
figure { margin: 1em 0; } figcaption { font-size: 0.9em; color: #444; }
.note { color: #555; font-size: 0.9em; }
"""


def render_report(
    result: EvaluationResult, detector: Detector, dataset: str = "", model_dir: str | Path | None = None
) -> str:
    """The report as one HTML string (images inline as base64 PNG, no external references)."""
    cal = detector.calibration
    y = np.asarray(result.labels, dtype=np.int64)
    s = np.asarray(result.scores, dtype=np.float64)
    title = f"anomnet test report: {detector.name}" + (f" on {dataset}" if dataset else "")
    parts = [
        *_page_head(title),
        _table(
            [
                ("dataset", dataset or "-"),
                ("detector", detector.name),
                ("model folder", str(model_dir) if model_dir is not None else "none (a model in memory, not saved)"),
                ("test images", f"{len(s)} ({int(np.sum(y == 0))} good, {int(np.sum(y == 1))} defective)"),
                (
                    "pixel metrics",
                    "yes (masks)"
                    if result.pixel_curves is not None or "pixel_auroc" in result.metrics
                    else "no (image labels only)",
                ),
                ("time per image", f"{1000 * result.seconds_per_image:.1f} ms (prediction only)"),
                ("date", _now()),
                ("anomnet", __version__),
            ]
        ),
        "<h2>Metrics</h2>",
        _metrics_table(result.metrics),
        "<h2>Decisions at the model's threshold</h2>",
        _decision_table(s, y, cal),
        "<h2>Operating points</h2>",
        _operating_points(s, y, cal),
        "<h2>Curves</h2>",
        _curves_section(result),
        "<h2>Score distributions</h2>",
        _img(_histogram_png(s, y, cal), "histogram of image scores"),
        _worst_section(
            "Highest-scoring good images (false alarms when at or above the threshold)", result.worst_good, detector
        ),
        _worst_section(
            "Lowest-scoring defective images (misses when below the threshold)", result.worst_defective, detector
        ),
        _suspects_section(detector),
        "<h2>Model settings</h2>",
        _table([(k, _fmt_setting(v)) for k, v in detector.config.to_dict().items()]),
        "<h2>Calibration</h2>",
        _table(
            [
                (k, _fmt_setting(v), CALIBRATION_NOTES.get(k, ""))
                for k, v in cal.to_dict().items()
                if not isinstance(v, (list, tuple, dict))
            ],
            ["field", "value", "meaning"],
        ),
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


_SCALE_NOTE = (
    "The bar on the right is the model's fixed colour scale, the same for every image, in anomaly-map units: "
    "bottom (blue) the median map value of the good calibration images, middle the highest value seen on them, "
    "top (red) twice as far; the purple line is the pixel threshold, where a defective image's mask begins."
)


def _page_head(title: str) -> list[str]:
    """The opening lines of a report page: doctype, inline style, title and heading."""
    return [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
    ]


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _fmt_setting(value: Any) -> str:
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.6g}"
    return str(value)


def format_metric(value: float | None) -> str:
    """A metric as the report (and the CLI) shows it: percent with two decimals, or n/a."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{100 * value:.2f}"


def _table(rows: Sequence[Sequence[str]], header: Sequence[str] | None = None) -> str:
    out = ["<table>"]
    if header:
        out.append("<tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>")
    for row in rows:
        out.append("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _metrics_table(metrics: dict[str, float]) -> str:
    rows = ["<table>", "<tr><th>metric</th><th>value (%)</th><th>meaning</th></tr>"]
    for key, value in metrics.items():
        note = _e(METRIC_NOTES.get(key, ""))
        rows.append(f'<tr><td>{_e(key)}</td><td class="num">{_e(format_metric(value))}</td><td>{note}</td></tr>')
    rows.append("</table>")
    return "\n".join(rows)


def _decision_table(s: np.ndarray, y: np.ndarray, cal: Any) -> str:
    thr = float(cal.threshold)
    flagged = s >= thr
    good, bad = y == 0, y == 1
    tn, fp = int(np.sum(good & ~flagged)), int(np.sum(good & flagged))
    fn, tp = int(np.sum(bad & ~flagged)), int(np.sum(bad & flagged))
    n_val = len(cal.validation_scores)
    rows = [
        ("image threshold", _fmt_setting(thr) + " (score at or above it: defective; it alone decides)"),
        (
            "pixel threshold",
            _fmt_setting(float(cal.pixel_threshold))
            + " (draws the defect mask of a defective image only; a good image has no mask)",
        ),
        ("false-alarm rate asked for", f"{cal.max_false_alarm:.3g}"),
        (
            "false-alarm rate the calibration supports",
            f"{cal.achieved_false_alarm:.3g} ({n_val} good calibration images)",
        ),
        (
            "false alarms on the test set",
            f"{fp} of {tn + fp} good images" + (f" ({fp / (tn + fp):.3g})" if tn + fp else ""),
        ),
        (
            "misses on the test set",
            f"{fn} of {fn + tp} defective images" + (f" ({fn / (fn + tp):.3g})" if fn + tp else ""),
        ),
        ("confusion (TP / FP / FN / TN)", f"{tp} / {fp} / {fn} / {tn}"),
    ]
    if cal.note:
        rows.append(("calibration note", cal.note))
    if cal.source_note:
        rows.append(("calibration set", cal.source_note))
    return _table(rows)


def _operating_points(s: np.ndarray, y: np.ndarray, cal: Any) -> str:
    from anomnet.decisions.operating_points import cells, describe, operating_points

    rows = cells(operating_points(cal, s, y), cal, "test")
    return f'<p class="note">{_e(describe(cal, "test"))}.</p>' + _table(rows[1:], rows[0])


def _img(png: bytes | None, alt: str, missing: str = "") -> str:
    if png is None:
        return f'<p class="note">{_e(alt)}: not available{_e(missing)}</p>'
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, metadata={"Software": None})
    return buf.getvalue()


# --------------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------------


def _curves_section(result: EvaluationResult) -> str:
    s, y, m = result.scores, result.labels, result.metrics
    both = bool(np.any(y == 0) and np.any(y == 1))
    px = result.pixel_curves
    imgs = [_img(_roc_png(s, y, m, px) if both else None, "ROC curve", " (needs good and defective test images)")]
    imgs.append(
        _img(
            _pr_png(s, y, m, px) if np.any(y == 1) else None, "precision-recall curve", " (needs defective test images)"
        )
    )
    if px is not None:
        imgs.append(_img(_pro_png(px, m), "PRO curve"))
    note = "" if px is not None else '<p class="note">No ground-truth masks: image-level curves only.</p>'
    return '<div class="plots">' + "\n".join(imgs) + "</div>" + note


def _roc_png(s: np.ndarray, y: np.ndarray, m: dict[str, float], px: Any) -> bytes:
    fig = Figure(figsize=(5, 4.2))
    ax = fig.add_subplot()
    fpr, tpr, _ = roc_curve(s, y)
    ax.plot(fpr, tpr, drawstyle="default", label=f"image (AUROC {format_metric(m.get('image_auroc'))} %)")
    if px is not None:
        ax.plot(px.fpr, px.tpr, label=f"pixel (AUROC {format_metric(m.get('pixel_auroc'))} %)")
    ax.plot([0, 1], [0, 1], ls=":", color="gray", lw=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right")
    fig.subplots_adjust(left=0.13, right=0.97, bottom=0.13, top=0.92)
    return _png(fig)


def _pr_png(s: np.ndarray, y: np.ndarray, m: dict[str, float], px: Any) -> bytes:
    fig = Figure(figsize=(5, 4.2))
    ax = fig.add_subplot()
    precision, recall, _ = precision_recall_curve(s, y)
    ax.plot(
        np.concatenate(([0.0], recall)),
        np.concatenate(([precision[0]], precision)),
        label=f"image (F1-max {format_metric(m.get('image_f1_max'))} %)",
    )
    if "precision" in m and "recall" in m:
        ax.plot([m["recall"]], [m["precision"]], "o", color="C3", label="image, at the model's threshold")
    if px is not None:
        ax.plot(px.tpr[1:], px.precision[1:], label=f"pixel (F1-max {format_metric(m.get('pixel_f1_max'))} %)")
    ax.set(xlabel="recall", ylabel="precision", title="Precision-recall", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="best")
    fig.subplots_adjust(left=0.13, right=0.97, bottom=0.13, top=0.92)
    return _png(fig)


def _pro_png(px: Any, m: dict[str, float]) -> bytes:
    fig = Figure(figsize=(5, 4.2))
    ax = fig.add_subplot()
    lim = PRO_PLOT_LIMIT
    inside = px.fpr <= lim
    x, yv = px.fpr[inside], px.pro[inside]
    if x[-1] < lim:  # close the curve at the limit as AU-PRO does (linear interpolation)
        x, yv = np.append(x, lim), np.append(yv, np.interp(lim, px.fpr, px.pro))
    ax.plot(x, yv, label=f"AU-PRO@0.3 {format_metric(m.get('au_pro@0.3'))} %")
    ax.axvline(
        0.05, ls=":", color="gray", lw=1, label=f"FPR 0.05 (AU-PRO@0.05 {format_metric(m.get('au_pro@0.05'))} %)"
    )
    ax.set(
        xlabel="false positive rate (pixels)",
        ylabel="per-region overlap",
        title="PRO curve",
        xlim=(0, lim),
        ylim=(0, 1.01),
    )
    ax.legend(loc="lower right")
    fig.subplots_adjust(left=0.13, right=0.97, bottom=0.13, top=0.92)
    return _png(fig)


def _histogram_png(s: np.ndarray, y: np.ndarray, cal: Any) -> bytes | None:
    if s.size == 0:
        return None
    val = np.asarray(cal.validation_scores, dtype=np.float64)
    thr = float(cal.threshold)
    pool = np.concatenate([s, val])
    lo, hi = float(pool.min()), float(pool.max())
    if math.isfinite(thr):
        lo, hi = min(lo, thr), max(hi, thr)
    if hi <= lo:
        hi = lo + 1.0
    bins = np.linspace(lo, hi, 31).tolist()
    fig = Figure(figsize=(9, 3.6))
    ax = fig.add_subplot()
    if np.any(y == 0):
        ax.hist(s[y == 0], bins=bins, alpha=0.6, color="C0", label=f"good test images ({int(np.sum(y == 0))})")
    if np.any(y == 1):
        ax.hist(s[y == 1], bins=bins, alpha=0.6, color="C3", label=f"defective test images ({int(np.sum(y == 1))})")
    if val.size:
        ax.hist(val, bins=bins, histtype="step", color="k", lw=1.2, label=f"good validation images ({val.size})")
    if math.isfinite(thr):
        ax.axvline(
            thr,
            color="k",
            ls="--",
            lw=1.5,
            label=f"threshold {thr:.4g} (false-alarm rate {cal.achieved_false_alarm:.3g})",
        )
    ax.set(xlabel="image anomaly score", ylabel="images", title="Image scores")
    ax.legend(loc="best", fontsize="small")
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.14, top=0.91)
    return _png(fig)


def _worst_section(heading: str, kept: Sequence[KeptImage], detector: Detector) -> str:
    if not kept:
        return ""
    cal = detector.calibration
    out = [
        f"<h2>{_e(heading)}</h2>",
        '<p class="note">image | overlay (heat map over the image) | heat map'
        + ("; white outline: ground truth" if any(k.mask is not None for k in kept) else "")
        + "; yellow outline: the model's defect mask (an image called good has none). "
        + "Score: the image's anomaly score, defective at or above the threshold; p-value: the conformal p-value, "
        + f"(1 + good calibration images scoring at least as high) / ({len(cal.validation_scores)} + 1), small when "
        + "the image is unlike every good one. "
        + _SCALE_NOTE
        + "</p>",
    ]
    for k in kept:
        p_value = float(cal.p_values(np.array([k.score]))[0])
        decision = "DEFECTIVE" if k.defective else "good"
        truth = "good" if k.sample.label == 0 else f"defective ({k.sample.defect_type})"
        caption = (
            f"{k.sample.path} — truth: {truth}; score {k.score:.5g} (threshold {cal.threshold:.5g}), "
            f"p-value {p_value:.3g}, called {decision}"
        )
        figure = _img(_case_png(k, detector), k.sample.path.name)
        out.append(f'<figure class="case">{figure}<figcaption>{_e(caption)}</figcaption></figure>')
    return "\n".join(out)


def _suspects_section(detector: Detector) -> str:
    """The suspect training images of the calibration, each with its left-out heat map."""
    cal = detector.calibration
    if not cal.suspects:
        return ""
    median = float(np.median(cal.validation_scores)) if cal.validation_scores else math.nan
    out = [
        "<h2>Suspect training images</h2>",
        '<p class="note">Training images whose own left-out score stands far above the other training images\' '
        f"(robust z &gt; 5; median calibration score {median:.5g}): a defective part among the good ones, another "
        "product or a camera fault would show here. Check them; <code>anomnet fit --exclude-suspects</code> refits "
        "without them. image | overlay | heat map, scored without the image's own contribution. "
        + _SCALE_NOTE
        + "</p>",
    ]
    for suspect in cal.suspects:
        path = Path(suspect["image"])
        caption = f"{suspect['rank']}. {path} — left-out score {suspect['score']:.5g} (robust z {suspect['z']:.1f})"
        kept = _left_out_case(detector, path)
        figure = "" if kept is None else _img(_case_png(kept, detector), path.name)
        if kept is None:
            caption += " (the image cannot be read here: no heat map)"
        out.append(f'<figure class="case">{figure}<figcaption>{_e(caption)}</figcaption></figure>')
    return "\n".join(out)


def _left_out_case(detector: Detector, path: Path) -> KeptImage | None:
    """A training image as the calibration scored it (its own contribution left out where the model can)."""
    from anomnet.data import Sample, iter_batches
    from anomnet.decisions.calibrate import content_hash
    from anomnet.evaluation.evaluate import KEEP_SIDE, _WorstKeeper

    try:
        digest = content_hash(path)
        batch = next(iter(iter_batches([Sample(path, 0)], 1, size=None)))
    except (AnomnetError, OSError, StopIteration):
        return None
    owners = [i for i, h in enumerate(detector.calibration.training_hashes) if h == digest]
    context = detector.leave_out(owners) if owners and detector.supports_leave_out else contextlib.nullcontext()
    with context:
        pred = detector.predict(batch.images)
    return _WorstKeeper(1, KEEP_SIDE, detector.calibration)._keep(batch, pred, 0, float(pred.scores[0]))


def _case_png(k: KeptImage, detector: Detector) -> bytes:
    """image | overlay | heat map under their titles with the model's colour bar (numpy + Pillow, no plotting);
    ground truth outlined in white, the model's mask in yellow on the overlay."""
    image = k.image.astype(np.float32) / 255.0
    panels = [
        k.image,
        overlay(image, k.anomaly_map, detector.calibration),
        heatmap(k.anomaly_map, detector.calibration),
    ]
    if k.mask is not None:
        panels = [draw_contour(p, k.mask) for p in panels]
    if k.predicted is not None and k.predicted.any():
        panels[1] = draw_contour(panels[1], k.predicted, MODEL_MASK_COLOUR)
    row, _ = labelled_panels(list(zip(PANEL_TITLES, panels)), detector.calibration)
    buf = io.BytesIO()
    Image.fromarray(row).save(buf, format="PNG")
    return buf.getvalue()


__all__ = ["CURVE_POINTS", "WORST_CASES", "check_report_path", "format_metric", "render_report", "write_report"]
