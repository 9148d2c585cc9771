"""The gateway's web page in a real browser: Debian's headless Chromium driven by Playwright, against
the real gateway and the real Triton server with the trained shapes model."""

from __future__ import annotations

import base64
import os
import shutil
import time

import numpy as np
import pytest
from PIL import Image

from flux_triton.gateway.app import GatewaySettings
from tests.gateway_server import RunningGateway, b64_image
from tests.reference import metric

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None and os.environ.get("CI"):  # CI installs it (make setup-browser): never skip there
    raise RuntimeError("chromium is missing: run `make setup-browser`")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs chromium (make setup-browser)")

# Every preview the page shows, recorded as it happens: the page sets the preview's `data-step`
# with each image. Several events can arrive in one task, before the observer runs, so each
# record's new value is the next record's old one (the last one's: the value now).
WATCH_PREVIEWS = """
window.seenSteps = [];
new MutationObserver((records) => {
  records.forEach((r, i) => window.seenSteps.push(Number(
    i + 1 < records.length ? records[i + 1].oldValue : r.target.dataset.step)));
}).observe(document.getElementById("preview-image"),
           {attributes: true, attributeFilter: ["data-step"], attributeOldValue: true});
"""


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                             args=["--no-sandbox", "--disable-gpu"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def page(browser, served_shapes):
    with RunningGateway(GatewaySettings(triton_url=served_shapes.url)) as gateway:
        page = browser.new_page(viewport={"width": 900, "height": 760})
        page.goto(gateway.url + "/")
        yield page


def _data_url_image(src: str) -> np.ndarray:
    return b64_image(src.split(",", 1)[1])


def test_page_streams_previews_then_the_image(page, tmp_path):
    page.evaluate(WATCH_PREVIEWS)
    page.fill("#prompt", "a red circle on a blue background")
    page.select_option("#size", "128x128")
    page.fill("#seed", "0")
    page.click("#generate")
    page.wait_for_function("window.seenSteps.length >= 6", timeout=60_000)
    screenshot = os.environ.get("FLUX_PAGE_SCREENSHOT") or str(tmp_path / "page.png")
    page.screenshot(path=screenshot)  # mid-generation: the README's picture comes from here
    page.wait_for_function("document.getElementById('final-image').src.startsWith('data:')",
                           timeout=60_000)
    steps = page.evaluate("window.seenSteps")
    total = page.evaluate("Number(document.getElementById('progress').max)")
    assert steps == list(range(1, total + 1)), steps  # one preview per step, each replacing the last
    assert page.text_content("#status") == "done"
    image = _data_url_image(page.get_attribute("#final-image", "src"))
    assert image.shape == (128, 128, 3)
    pixels = image.reshape(-1, 3).astype(int)
    blue = np.mean((pixels[:, 2] > 150) & (pixels[:, 0] < 100))
    red = np.mean((pixels[:, 0] > 150) & (pixels[:, 2] < 100))
    print(f"\npage: {len(steps)} previews, then the image: {blue:.0%} blue, {red:.0%} red pixels")
    assert blue > 0.5 and 0.05 < red < 0.45


def test_page_fast_tier_reports_the_skipped_calls(page, served_shapes):
    """The fast-tier field reaches the server: the image is the gRPC one at that threshold, the
    status says how many DiT calls were skipped, and the step log lists every step."""
    from tests.reference import served_generate

    page.fill("#prompt", "a red circle on a blue background")
    page.select_option("#size", "128x128")
    page.fill("#seed", "1")
    page.fill("#cache-threshold", "0.2")
    page.click("#generate")
    page.wait_for_function("document.getElementById('status').textContent.startsWith('done')",
                           timeout=60_000)
    status = page.text_content("#status")
    expected = served_generate(served_shapes, dict(
        prompt="a red circle on a blue background", height=128, width=128, seed=1,
        cache_threshold=0.2, preview_kind="none"))
    report = expected.timings["first_block_cache"]
    assert report["dit_calls_skipped"] > 0
    assert status == (f"done; fast tier skipped {report['dit_calls_skipped']} of "
                      f"{report['dit_calls']} DiT calls"), status
    image = _data_url_image(page.get_attribute("#final-image", "src"))
    assert np.array_equal(image, expected.image[0])
    assert page.locator("#step-log div").count() == report["dit_calls"]
    print(f"\npage fast tier: {status}")
    page.fill("#cache-threshold", "")
    page.fill("#seed", "0")


def test_cancel_stops_the_stream(page, served_shapes):
    page.evaluate(WATCH_PREVIEWS)
    page.fill("#steps", "100")
    cancelled_before = metric(served_shapes, "flux_requests_total", outcome="cancelled")
    page.click("#generate")
    page.wait_for_function("window.seenSteps.length >= 2", timeout=60_000)
    page.click("#cancel")
    page.wait_for_function("document.getElementById('status').textContent === 'cancelled'",
                           timeout=10_000)
    seen = len(page.evaluate("window.seenSteps"))
    deadline = time.time() + 30
    while metric(served_shapes, "flux_requests_total", outcome="cancelled") == cancelled_before:
        assert time.time() < deadline, "the server never noticed the cancel"
        time.sleep(0.1)
    time.sleep(1.0)
    assert len(page.evaluate("window.seenSteps")) == seen  # nothing more arrives
    assert not page.is_disabled("#generate") and page.is_disabled("#cancel")
    assert page.get_attribute("#final-image", "src") is None
    print(f"\ncancelled from the page after {seen} previews")
    page.fill("#steps", "")


def test_page_offers_the_adapters_and_applies_the_chosen_ones(browser, served):
    """On a server with LoRA adapters (the tiny schnell model's), the page lists them; the image
    made with one chosen equals the gRPC request with that adapter."""
    from tests.reference import served_generate

    srv = served["schnell"]
    with RunningGateway(GatewaySettings(triton_url=srv.url)) as gateway:
        page = browser.new_page()
        page.goto(gateway.url + "/")
        page.wait_for_selector("#loras input[value=style]", timeout=30_000)
        offered = page.eval_on_selector_all("#loras input[type=checkbox]", "boxes => boxes.map(b => b.value)")
        assert offered == ["style", "texture"]
        page.fill("#prompt", "a red circle")
        page.select_option("#size", "128x128")
        page.fill("#steps", "3")
        page.fill("#seed", "7")
        page.check("#loras input[value=style]")
        page.fill("#scale-style", "0.75")
        page.click("#generate")
        page.wait_for_function("document.getElementById('final-image').src.startsWith('data:')",
                               timeout=60_000)
        image = _data_url_image(page.get_attribute("#final-image", "src"))
        page.close()
    expected = served_generate(srv, dict(prompt="a red circle", height=128, width=128, seed=7,
                                         num_inference_steps=3, lora=["style"], lora_scale=[0.75]))
    assert np.array_equal(image, expected.image[0])


# Every form the page sends, recorded in the page (Playwright hands no body made of Blobs):
# text fields as they are, files as data: URLs.
RECORD_FORMS = """
window.sentForms = [];
const realFetch = window.fetch;
window.fetch = async (url, init) => {
  if (init && init.body instanceof FormData) {
    const parts = {};
    for (const [name, value] of init.body.entries()) {
      parts[name] = typeof value === "string" ? value : await new Promise((done) => {
        const reader = new FileReader();
        reader.onload = () => done(reader.result);
        reader.readAsDataURL(value);
      });
    }
    window.sentForms.push(parts);
  }
  return realFetch(url, init);
};
"""


def test_page_edits_an_image_with_a_painted_mask(page, served_shapes, tmp_path):
    """Upload a picture, paint a stroke on it with the mouse, edit: previews stream, and the
    image shown equals the gRPC request with the image and the mask the page sent (a PNG of the
    image's size, white where the stroke went)."""
    from flux_triton.clients.image_files import decode_image, decode_mask
    from tests.reference import REPO_ROOT, served_generate

    picture = Image.new("RGB", (128, 128), (230, 210, 40))
    picture.paste((30, 160, 60), (32, 32, 96, 96))  # a green square on yellow
    picture.save(tmp_path / "square.png")
    page.evaluate(WATCH_PREVIEWS)
    page.fill("#prompt", "a red circle on a blue background")
    page.fill("#seed", "6")
    page.fill("#steps", "24")
    page.fill("#strength", "0.9")
    page.fill("#brush", "60")
    page.set_input_files("#edit-file", str(tmp_path / "square.png"))
    page.wait_for_function("!document.getElementById('edit').disabled", timeout=10_000)
    page.locator("#mask-canvas").scroll_into_view_if_needed()  # the mouse paints what is in view
    box = page.locator("#mask-canvas").bounding_box()
    assert round(box["width"]) == 256 and round(box["height"]) == 256  # shown at twice its size
    page.mouse.move(box["x"] + 40, box["y"] + 128)  # a horizontal stroke across the middle
    page.mouse.down()
    for x in range(40, 220, 10):
        page.mouse.move(box["x"] + x, box["y"] + 128)
    page.mouse.up()
    page.evaluate(RECORD_FORMS)
    page.click("#edit")
    page.wait_for_function("window.seenSteps.length >= 8", timeout=60_000)
    (REPO_ROOT / "out").mkdir(exist_ok=True)
    screenshot = REPO_ROOT / "out" / "page-edit.png"
    page.screenshot(path=str(screenshot), full_page=True)  # mid-edit: docs/images/page-edit.png
    page.wait_for_function("document.getElementById('final-image').src.startsWith('data:')",
                           timeout=60_000)
    assert page.text_content("#status") == "done"
    steps = sorted(set(page.evaluate("window.seenSteps")))  # earlier tests' observers see them too
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 20, steps

    parts = page.evaluate("window.sentForms")[-1]
    assert parts["image_role"] == "init" and parts["strength"] == "0.9" and parts["stream"] == "true"
    mask = decode_mask(base64.b64decode(parts["mask"].split(",", 1)[1]))
    sent_image = decode_image(base64.b64decode(parts["image"].split(",", 1)[1]))
    assert mask.shape == (128, 128) and set(np.unique(mask)) <= {0, 255}
    # the stroke: brush 60 screen pixels = 30 image pixels wide, x 20..110 at y 64
    assert mask[52:76, 25:105].min() == 255 and mask[:45].max() == 0 and mask[84:].max() == 0
    image = _data_url_image(page.get_attribute("#final-image", "src"))
    expected = served_generate(served_shapes, dict(
        prompt="a red circle on a blue background", seed=6, num_inference_steps=24, strength=0.9,
        image=sent_image, mask=mask))
    assert np.array_equal(sent_image, np.asarray(picture))
    assert np.array_equal(image, expected.image[0])
    changed = np.abs(image.astype(int) - np.asarray(picture)).mean(-1) > 40
    print(f"\npage edit: {len(steps)} previews; {changed[mask == 255].mean():.0%} of the painted "
          f"stroke repainted, {changed[mask == 0].mean():.0%} elsewhere; screenshot {screenshot}")
    assert changed[mask == 0].mean() < 0.1
    page.fill("#steps", "")
