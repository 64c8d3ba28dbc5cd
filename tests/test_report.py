"""The HTML test report: one self-contained file with the metrics, curves and worst cases."""

from __future__ import annotations

import base64
import io
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomnet import api
from anomnet.cli import EXIT_INPUT, EXIT_OK, main
from anomnet.errors import ConfigError
from anomnet.evaluation import evaluate, report

SMALL = {"image_size": 64, "batch_size": 4}
PNG_SRC = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


def _embedded_pngs(text: str) -> list[Image.Image]:
    images = []
    for b64 in PNG_SRC.findall(text):
        img = Image.open(io.BytesIO(base64.b64decode(b64)))
        img.load()
        images.append(img)
    return images


def _assert_self_contained(text: str) -> None:
    assert "http://" not in text and "https://" not in text
    assert "<script" not in text and "<link" not in text and "url(" not in text and "<iframe" not in text
    srcs = re.findall(r'(?:src|href)="([^"]*)"', text)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)


@pytest.fixture
def model(folder_dataset, tmp_path):
    return api.fit("patchcore", folder_dataset, tmp_path / "model", settings=SMALL, progress=False)


def test_report_has_metrics_curves_and_worst_cases(folder_dataset, model, tmp_path) -> None:
    out = tmp_path / "out" / "sub" / "report.html"  # missing folders are created
    res = api.test(tmp_path / "model", folder_dataset, report=out, progress=False)
    assert [p.name for p in out.parent.iterdir()] == ["report.html"]  # one file, no leftovers
    text = out.read_text(encoding="utf-8")
    _assert_self_contained(text)
    # 3 curves + 1 histogram + the worst good and defective images (4 + 4 of 4 good, 4 defective).
    pngs = _embedded_pngs(text)
    assert len(pngs) == 4 + 2 * report.WORST_CASES
    assert all(img.format == "PNG" and img.size[0] > 100 for img in pngs)
    assert "PRO curve" in text and "image-level curves only" not in text
    for key, value in res.metrics.items():  # every metric shown with its meaning
        row = re.search(
            rf"<td>{re.escape(key)}</td><td class=\"num\">{re.escape(report.format_metric(value))}</td>"
            r"<td>([^<]*)</td>",
            text,
        )
        assert row and len(row.group(1)) > 20, key
    assert "pixel_auroc" in res.metrics and "au_pro@0.3" in res.metrics
    assert f"{model.calibration.threshold:.6g}" in text and "folder:data" in text and "coreset_ratio" in text
    # the worst cases are the highest-scoring good and lowest-scoring defective images, in order
    good = sorted((s, p) for s, p, y in zip(res.scores, res.paths, res.labels) if y == 0)[::-1]
    bad = sorted((s, p) for s, p, y in zip(res.scores, res.paths, res.labels) if y == 1)
    assert [str(k.sample.path) for k in res.worst_good] == [p for _, p in good[: report.WORST_CASES]]
    assert [str(k.sample.path) for k in res.worst_defective] == [p for _, p in bad[: report.WORST_CASES]]
    assert text.index(Path(good[0][1]).name) < text.index(Path(good[1][1]).name)
    assert all(k.mask is not None and k.mask.any() for k in res.worst_defective)
    assert res.pixel_curves is not None and len(res.pixel_curves.fpr) <= 4 * report.CURVE_POINTS + 3


def test_worst_cases_are_shrunk_and_bounded(folder_dataset, model, monkeypatch) -> None:
    from anomnet.data import load_dataset

    monkeypatch.setattr(evaluate, "KEEP_SIDE", 32)
    test = load_dataset(folder_dataset).test
    res = evaluate.evaluate(model, test, 4, progress=False, keep_worst=2)
    assert len(res.worst_good) == 2 and len(res.worst_defective) == 2 and res.pixel_curves is None
    for k in res.worst_good + res.worst_defective:
        assert k.image.shape == (32, 32, 3) and k.image.dtype == np.uint8
        assert k.anomaly_map.shape == (32, 32) and k.mask is not None and k.mask.shape == (32, 32)
    assert res.worst_good[0].score == max(s for s, y in zip(res.scores, res.labels) if y == 0)
    plain = evaluate.evaluate(model, test, 4, progress=False)
    assert plain.worst_good == [] and plain.metrics == res.metrics


def test_report_without_masks_is_image_level(folder_dataset, model, tmp_path) -> None:
    shutil.rmtree(folder_dataset / "masks")
    out = tmp_path / "r.html"
    res = api.test(model, folder_dataset, report=out, progress=False)
    assert "pixel_auroc" not in res.metrics and res.pixel_curves is None
    text = out.read_text(encoding="utf-8")
    _assert_self_contained(text)
    assert "image-level curves only" in text and 'alt="PRO curve"' not in text
    assert len(_embedded_pngs(text)) == 3 + 2 * report.WORST_CASES
    assert all(k.mask is None for k in res.worst_defective)
    assert f'<td>image_auroc</td><td class="num">{report.format_metric(res.metrics["image_auroc"])}</td>' in text


def test_cli_report_and_bad_report_paths(folder_dataset, model, tmp_path, capsys) -> None:
    out = tmp_path / "cli.html"
    args = ["test", "--model-dir", str(tmp_path / "model"), "--data", str(folder_dataset), "--quiet"]
    assert main([*args, "--report", str(out)]) == EXIT_OK
    assert f"report written to {out}" in capsys.readouterr().out and out.stat().st_size > 10_000

    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    for bad, words in ((blocker / "r.html", "is not a folder"), (tmp_path, "is a folder")):
        assert main([*args, "--report", str(bad)]) == EXIT_INPUT
        err = capsys.readouterr().err
        assert str(bad) in err and words in err and "Traceback" not in err
    with pytest.raises(ConfigError, match="empty"):
        report.check_report_path("")
    with pytest.raises(ConfigError, match="is not a folder"):
        api.test(model, folder_dataset, report=blocker / "deeper" / "r.html", progress=False)


def test_demo_writes_an_image_level_report(folder_dataset, tmp_path, monkeypatch, capsys) -> None:
    """The demo's ELPV set has image labels only; a mask-less folder set stands in for it here."""
    import anomnet.data

    shutil.rmtree(folder_dataset / "masks")
    real = anomnet.data.load_dataset
    monkeypatch.setattr(anomnet.data, "load_dataset", lambda *a, **k: real(folder_dataset))
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quiet", "--max-train", "6"]) == EXIT_OK
    assert str(out / "report.html") in capsys.readouterr().out
    text = (out / "report.html").read_text(encoding="utf-8")
    _assert_self_contained(text)
    assert "image-level curves only" in text and "image_auroc" in text


def test_report_of_good_images_only_and_no_threshold(model) -> None:
    """Curves that need both classes are named as missing; an infinite threshold draws no line."""
    model.calibration.threshold = float("inf")
    res = evaluate.EvaluationResult(
        {"image_auroc": float("nan")}, ["a.png", "b.png"], np.array([0, 0]), np.array([0.5, 0.7])
    )
    text = report.render_report(res, model, "only-good")
    _assert_self_contained(text)
    assert "ROC curve: not available (needs good and defective test images)" in text
    assert '<td class="num">n/a</td>' in text and "0 of 0 defective" in text and "2 of 2 good" not in text
    assert len(_embedded_pngs(text)) == 1  # the histogram


def test_every_number_of_the_calibration_table_has_its_meaning(model) -> None:
    res = evaluate.EvaluationResult({"image_auroc": 1.0}, ["a.png", "b.png"], np.array([0, 1]), np.array([0.1, 0.9]))
    text = report.render_report(res, model)
    table = text[text.index("<h2>Calibration</h2>") :]
    rows = re.findall(r"<tr><td>([^<]*)</td><td>[^<]*</td><td>([^<]*)</td></tr>", table)
    shown = [k for k, v in model.calibration.to_dict().items() if not isinstance(v, (list, tuple, dict))]
    assert [k for k, _ in rows] == shown
    assert all(meaning for _, meaning in rows), [k for k, m in rows if not m]


def test_worst_cases_are_titled_and_carry_the_models_colour_bar(folder_dataset, model) -> None:
    from anomnet.data import load_dataset
    from anomnet.predict.visualize import colour_bar, format_value

    res = evaluate.evaluate(model, load_dataset(folder_dataset).test, 4, progress=False, keep_worst=1)
    cal = model.calibration
    for kept in res.worst_good + res.worst_defective:
        picture = np.asarray(Image.open(io.BytesIO(report._case_png(kept, model))).convert("RGB"))
        h, w = kept.image.shape[:2]
        title_h = picture.shape[0] - h
        assert title_h > 8 and picture.shape[1] > 3 * w
        assert (picture[:title_h, :w] != 255).any()  # the first panel's title
        # the right end is the model's colour bar, its numbers the calibration's map_low / map_high / pixel threshold
        strip, layout = colour_bar(cal, picture.shape[0], top_margin=title_h)
        assert np.array_equal(picture[title_h:, -strip.shape[1] :], strip[title_h:])  # (its title above it)
        labels = {t.kind: t.label for t in layout.ticks}
        assert labels["low"] == format_value(cal.map_low) and labels["high"] == format_value(cal.map_high)
        assert labels["pixel threshold"] == format_value(cal.pixel_threshold)
    text = report.render_report(res, model)
    assert "fixed colour scale" in text and "purple line is the pixel threshold" in text
    assert "p-value: the conformal p-value" in text  # the caption's numbers explained
