"""The review page in a real browser: Debian's chromium driven by Playwright, real bottle images, a real model.

Skips (with the reason) when chromium, Playwright, the serve extra or the bottle data are missing; with
ANOMNET_BROWSER_TEST=required (set by .ci/run) a missing browser, Playwright or serve extra fails instead.
ANOMNET_REVIEW_SCREENSHOT=PATH also writes a compact copy of the screenshot there (docs/images/review.png).
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
IMAGES = [  # (folder, file) below bottle/test: three defects and two good bottles
    ("broken_large", "000.png"),
    ("good", "000.png"),
    ("contamination", "001.png"),
    ("good", "001.png"),
    ("broken_small", "002.png"),
]


def _need(ok: bool, reason: str) -> None:
    if ok:
        return
    if os.environ.get("ANOMNET_BROWSER_TEST") == "required":
        pytest.fail(f"ANOMNET_BROWSER_TEST=required but {reason}")
    pytest.skip(reason, allow_module_level=True)


_need(CHROMIUM.is_file(), f"{CHROMIUM} not found (apt-get install chromium)")
_need(importlib.util.find_spec("playwright") is not None, "playwright is not installed (pip install playwright)")
_need(
    all(importlib.util.find_spec(m) is not None for m in ("fastapi", "uvicorn", "multipart", "httpx")),
    "the serve extra is not installed (pip install 'anomnet[serve]')",
)

import httpx  # noqa: E402
from playwright.sync_api import Page, expect, sync_playwright  # noqa: E402

from anomnet import api  # noqa: E402
from anomnet.serve.app import background_server, create_app  # noqa: E402
from anomnet.serve.limits import Limits  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bottle_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from conftest import BOTTLE

    if not BOTTLE.is_dir():
        pytest.skip("shared MVTec bottle data not present")
    out = tmp_path_factory.mktemp("browser") / "bottle-model"
    # 40 training images keep the fit short; the 21 held-out good images give the p-value grid 1/22 (the README's
    # screenshot; PatchCore's default calibration, leave-one-out, would give 1/41)
    api.fit("patchcore", BOTTLE, out=out, max_train=40, calibration="holdout", progress=False)
    return out


def _cards(page: Page) -> list[dict[str, Any]]:
    return page.eval_on_selector_all(
        "#cards .card",
        """cards => cards.map(c => ({
            name: c.dataset.name,
            decision: c.dataset.decision || null,
            shown: c.querySelector('.decision').textContent,
            flipped: c.classList.contains('flipped'),
            score: Number(c.dataset.score),
            overlay: c.querySelector('img.overlay').src,
            overlayWidth: c.querySelector('img.overlay').naturalWidth,
            wrong: c.querySelector('.mark-wrong').textContent,
            marked: c.querySelector('.marked').textContent,
        }))""",
    )


def test_review_page_in_chromium(bottle_model: Path, tmp_path: Path) -> None:
    from conftest import BOTTLE

    files = []
    for folder, name in IMAGES:  # unique names, as a camera station would give them
        files.append(tmp_path / "upload" / f"{folder}_{name}")
        files[-1].parent.mkdir(exist_ok=True)
        files[-1].write_bytes((BOTTLE / "test" / folder / name).read_bytes())
    review = tmp_path / "review"
    app = create_app({"bottle": bottle_model}, review_dir=review)
    with background_server(app) as url:
        # what the service says about each image: the page must show exactly this
        expected: dict[str, dict[str, Any]] = {}
        for path in files:
            r = httpx.post(
                f"{url}/v1/models/bottle/predict?overlay=true",
                files={"file": (path.name, path.read_bytes(), "image/png")},
                timeout=120,
            )
            assert r.status_code == 200, r.text
            expected[path.name] = r.json()["results"][0]
        n = httpx.get(f"{url}/v1/models").json()["models"][0]["validation_images"]
        flagged_by_model = sum(e["defective"] for e in expected.values())
        passed = [name for name, e in expected.items() if not e["defective"]]
        assert flagged_by_model and passed, "the test needs flagged and passed bottles"

        requests: list[str] = []
        problems: list[str] = []
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1440, "height": 700})
                page.on("request", lambda req: requests.append(req.url))
                page.on("pageerror", lambda err: problems.append(f"page error: {err}"))
                page.on("console", lambda msg: problems.append(msg.text) if msg.type == "error" else None)
                page.goto(url + "/")
                page.wait_for_selector("#model option", state="attached")
                assert page.locator("#model").input_value() == "bottle"

                # choose the files: every card gets its result, as the service gave it
                page.set_input_files("#files", [str(p) for p in files])
                expect(page.locator("#cards .card[data-decision]")).to_have_count(len(files), timeout=180_000)
                _wait_until(page, "img.overlay", "imgs => imgs.every(i => i.complete && i.naturalWidth > 0)")
                cards = _cards(page)
                assert sorted(c["name"] for c in cards) == sorted(expected)
                for card in cards:
                    row = expected[card["name"]]
                    assert card["score"] == pytest.approx(row["score"], rel=1e-12)
                    # at the model's own rate the page shows the model's decision, and nothing flips
                    assert card["decision"] == row["decision"] and card["shown"] == row["decision"]
                    assert not card["flipped"]
                    assert card["overlay"] == "data:image/png;base64," + row["overlay_png"]
                    assert card["overlayWidth"] == 900  # the overlay at the image's own resolution
                assert [c["score"] for c in cards] == sorted((c["score"] for c in cards), reverse=True)
                summary = page.locator("#summary")
                assert summary.get_attribute("data-flagged") == str(flagged_by_model)
                assert summary.get_attribute("data-flips") == "0"
                shot = tmp_path / "review.png"
                page.screenshot(path=str(shot), full_page=True)
                _keep_screenshot(shot)
                page.select_option("#sort", "order")
                assert [c["name"] for c in _cards(page)] == [p.name for p in files]
                page.select_option("#sort", "score-desc")

                # the slider: at the top rate every image is flagged, so the model's passes flip
                page.locator("#rate").focus()
                page.keyboard.press("End")
                assert page.locator("#rate").input_value() == str(n + 1)
                assert "100 %" in page.locator("#rate-value").inner_text()
                assert summary.get_attribute("data-flagged") == str(len(files))
                assert summary.get_attribute("data-flips") == str(len(passed))
                assert sorted(c["name"] for c in _cards(page) if c["flipped"]) == sorted(passed)
                page.keyboard.press("Home")  # the finest rate the validation images support, 1 / (n + 1)
                finest = 1 / (n + 1)
                flips = sum((r["p_value"] <= finest + 1e-12) != r["defective"] for r in expected.values())
                assert summary.get_attribute("data-flips") == str(flips)
                page.keyboard.press("End")

                # a good bottle that the top rate flags is marked a false alarm
                target = next(name for name in passed if name.startswith("good_"))
                card = page.locator("#cards .card", has=page.get_by_text(target, exact=True))
                wrong = card.locator(".mark-wrong")
                assert wrong.inner_text() == "False alarm"
                wrong.click()
                expect(card.locator(".marked")).to_contain_text("saved as good/")
                expect(card.locator(".mark-wrong")).to_have_class("mark-wrong active")
                index = json.loads((review / "bottle" / "review.json").read_text())
                (entry,) = index["marks"].values()
                assert entry["mark"] == "false_alarm" and entry["label"] == "good" and entry["name"] == target
                saved = review / "bottle" / entry["file"]
                assert saved.parent == review / "bottle" / "good"
                assert saved.read_bytes() == (tmp_path / "upload" / target).read_bytes()
                page.screenshot(path=str(tmp_path / "review-marked.png"), full_page=True)
            finally:
                browser.close()
    assert not problems, problems
    foreign = [u for u in requests if not (u.startswith(url) or u.startswith("data:") or u.startswith("blob:"))]
    assert not foreign, f"the page fetched from elsewhere: {foreign}"


def _wait_until(page: Page, selector: str, predicate: str, timeout_s: float = 30.0) -> None:
    """Poll ``predicate`` over the elements matching ``selector`` (the page's CSP forbids string evaluation)."""
    deadline = time.monotonic() + timeout_s
    while not page.eval_on_selector_all(selector, predicate):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {predicate} on {selector}")
        time.sleep(0.1)


def _keep_screenshot(shot: Path) -> None:
    """With ANOMNET_REVIEW_SCREENSHOT=PATH: a compact copy (at most 1000 px wide, 256 colours) for the README."""
    target = os.environ.get("ANOMNET_REVIEW_SCREENSHOT")
    if not target:
        return
    from PIL import Image

    with Image.open(shot) as im:
        im = im.convert("RGB")
        if im.width > 1000:
            im = im.resize((1000, round(im.height * 1000 / im.width)), Image.Resampling.LANCZOS)
        im.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(target, optimize=True)


def test_review_page_asks_for_the_api_key(tmp_path: Path) -> None:
    """No bottle data needed: a fake model behind an API key; the page asks for the key, then scores an image."""
    from test_serve import FakeScorer, png

    image = tmp_path / "bright.png"
    image.write_bytes(png(240, (40, 60)))
    app = create_app({"fake": FakeScorer()}, Limits(api_key="s3cret-key-123"), review_dir=tmp_path / "review")
    with background_server(app) as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(url + "/")
            key = page.locator("#api-key")
            expect(key).to_be_visible()  # /v1/models answered 401
            expect(page.locator("#status")).to_contain_text("401")
            key.fill("s3cret-key-123")
            key.press("Enter")
            page.wait_for_selector("#model option[value=fake]", state="attached")
            page.set_input_files("#files", [str(image)])
            card = page.locator("#cards .card[data-decision]")
            expect(card).to_have_count(1)
            assert card.get_attribute("data-decision") == "defective"  # mean brightness 240/255 >= 0.5
            card.locator(".mark-wrong").click()
            expect(card.locator(".marked")).to_contain_text("saved as good/bright-")
        finally:
            browser.close()
    assert len(list((tmp_path / "review" / "fake" / "good").iterdir())) == 1


def test_review_page_opens_with_the_models_own_decisions_and_shows_the_threshold(tmp_path: Path) -> None:
    """A mean-std threshold: the page starts from the service's decisions, never its own p-value rule."""
    from test_serve import FakeScorer, png

    scorer = FakeScorer()
    scorer.calibration.image_method = "mean-std"  # threshold 0.5 on validation scores 0.1, 0.2, 0.3
    image = tmp_path / "dim.png"
    image.write_bytes(png(90, (40, 60)))  # score 90/255 = 0.35: good by the threshold, p-value 1/4
    app = create_app({"fake": scorer})
    with background_server(app) as url, sync_playwright() as pw:
        expected = httpx.post(
            f"{url}/v1/models/fake/predict", files={"file": (image.name, image.read_bytes(), "image/png")}
        ).json()["results"][0]
        assert expected["decision"] == "good" and expected["p_value"] == 0.25 and expected["threshold"] == 0.5
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(url + "/")
            page.wait_for_selector("#model option[value=fake]", state="attached")
            expect(page.locator("#model-info")).to_contain_text("score threshold 0.50000 (mean-std")
            page.set_input_files("#files", [str(image)])
            card = page.locator("#cards .card[data-decision]")
            expect(card).to_have_count(1)
            assert card.get_attribute("data-decision") == "good"  # the service's decision
            assert not _cards(page)[0]["flipped"]
            assert "threshold 0.50000" in card.locator(".numbers").inner_text()
            assert page.locator("#rate-value").inner_text() == "the model's threshold"
            page.locator("#rate").focus()
            page.keyboard.press("End")  # the slider: a conformal rule at 100 % flags it, a flip
            assert card.get_attribute("data-decision") == "defective" and _cards(page)[0]["flipped"]
            page.locator("#at-model").click()  # and back to the model's own threshold
            assert card.get_attribute("data-decision") == "good"
            assert page.locator("#summary").get_attribute("data-flips") == "0"
        finally:
            browser.close()


def test_review_page_shows_the_models_colour_scale_and_the_heat_map(tmp_path: Path) -> None:
    """The legend's numbers are the model's map_low / map_high / top / pixel threshold, its colours the heat maps'."""
    import io

    import numpy as np
    from PIL import Image

    from anomnet.predict.visualize import heatmap, scale_range
    from test_serve import FakeScorer, png

    scorer = FakeScorer()  # map = the red channel
    cal = scorer.calibration
    cal.map_low, cal.map_high, cal.pixel_threshold = 0.1, 0.4, 0.55
    low, top = scale_range(cal)
    image = tmp_path / "bright.png"
    image.write_bytes(png(240, (40, 60)))
    app = create_app({"fake": scorer})
    with background_server(app) as url, sync_playwright() as pw:
        info = httpx.get(f"{url}/v1/models").json()["models"][0]
        assert info["map_low"] == 0.1 and info["map_high"] == 0.4 and info["pixel_threshold"] == 0.55
        expected = httpx.post(
            f"{url}/v1/models/fake/predict?heatmap=true",
            files={"file": (image.name, image.read_bytes(), "image/png")},
        ).json()["results"][0]
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 700})
            page.goto(url + "/")
            page.wait_for_selector("#model option[value=fake]", state="attached")
            expect(page.locator("#legend")).to_be_visible()
            marks = page.eval_on_selector_all(
                "#legend .tick, #legend .mark",
                "els => els.map(e => ({kind: e.dataset.kind, value: Number(e.dataset.value),"
                " at: Number(e.dataset.at), text: e.textContent}))",
            )
            shown = {m["kind"]: m for m in marks}
            assert set(shown) == {"low", "high", "top", "pixel threshold"}
            for kind, value in (("low", low), ("high", 0.4), ("top", top), ("pixel threshold", 0.55)):
                assert shown[kind]["value"] == pytest.approx(value, rel=1e-12), kind
                number = next(w for w in shown[kind]["text"].replace(":", " ").split() if w[0].isdigit())
                assert float(number) == pytest.approx(value, rel=1e-3), (kind, shown[kind]["text"])
                assert shown[kind]["at"] == pytest.approx((value - low) / (top - low), abs=1e-12)
            assert "pixel threshold" in shown["pixel threshold"]["text"]
            # the ramp as drawn: at each tick its colour is the heat maps' colour of that value
            ramp = np.asarray(Image.open(io.BytesIO(page.locator("#legend-ramp").screenshot())).convert("RGB"))
            inner = ramp[ramp.shape[0] // 2, 1:-1].astype(int)  # inside the 1-pixel border
            for kind in ("low", "high", "top"):
                x = min(round(shown[kind]["at"] * (len(inner) - 1)), len(inner) - 1)
                want = heatmap(np.array([[shown[kind]["value"]]]), cal)[0, 0].astype(int)
                assert np.abs(inner[x] - want).max() <= 12, (kind, inner[x], want)
            # the picture choice: the card shows the service's heat map instead of the overlay
            page.set_input_files("#files", [str(image)])
            expect(page.locator("#cards .card[data-decision]")).to_have_count(1)
            expect(page.locator("#cards img.overlay")).to_be_visible()
            expect(page.locator("#cards img.heatmap")).to_be_hidden()
            page.select_option("#picture", "heatmap")
            heat = page.locator("#cards img.heatmap")
            expect(heat).to_be_visible()
            expect(page.locator("#cards img.overlay")).to_be_hidden()
            assert heat.get_attribute("src") == "data:image/png;base64," + expected["heatmap_png"]
            page.screenshot(path=str(tmp_path / "legend.png"), full_page=True)
        finally:
            browser.close()
