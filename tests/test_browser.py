"""The gateway's web page in a real browser: Debian's headless Chromium driven by Playwright, against
the real gateway and the real Triton server with the trained shapes model."""

from __future__ import annotations

import base64
import io
import os
import shutil
import time

import numpy as np
import pytest
from PIL import Image

from flux_triton.gateway.app import GatewaySettings
from tests.gateway_server import RunningGateway
from tests.reference import metric

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None and os.environ.get("CI"):  # CI installs it (make setup-browser): never skip there
    raise RuntimeError("chromium is missing: run `make setup-browser`")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs chromium (make setup-browser)")

# Every change of the preview image, recorded in the page as it happens.
WATCH_PREVIEWS = """
window.seenSteps = [];
new MutationObserver((records) => {
  for (const r of records) window.seenSteps.push(Number(r.target.dataset.step));
}).observe(document.getElementById("preview-image"), {attributes: true, attributeFilter: ["src"]});
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
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB"))


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
