"""The web page in headless Chromium (Debian's /usr/bin/chromium through Playwright): submit a tiny
job, watch the progress bar, play the result. The screenshot lands in test-artifacts/."""

import shutil
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--disable-quic",
]  # fmt: skip


@pytest.fixture
def page(tmp_path):
    from playwright import sync_api

    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(chromium).exists():
        pytest.fail("chromium is not installed (make system-deps installs it)")
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=chromium, args=CHROMIUM_ARGS, headless=True,
            viewport={"width": 1400, "height": 900},
        )  # fmt: skip
        try:
            yield context.new_page()
        finally:
            context.close()


def test_submit_watch_progress_and_play(served_app, page):
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(served_app.url + "/")
    page.wait_for_selector("#param-num_steps")
    # Defaults come from the server's model card.
    assert page.input_value("#param-num_frames") == "81"
    assert page.is_enabled("#tab-i2v")
    page.fill("#prompt", "a tiny lighthouse in the fog")
    page.fill("#param-size", "128x128")
    page.fill("#param-num_frames", "5")
    page.select_option("#param-sampler", "euler")
    page.fill("#param-guidance_scale", "1")
    page.fill("#param-num_steps", "60")
    assert page.input_value("#param-attention_type") == "sagesla"
    page.click("#submit")

    progress_seen = set()
    deadline = time.monotonic() + 120
    while not page.is_visible("#player"):
        width = page.eval_on_selector("#progress-bar", "e => e.style.width")
        progress_seen.add(width)
        assert not page.inner_text("#form-error"), page.inner_text("#form-error")
        assert "failed" not in page.inner_text("#job-status"), page.inner_text("#job-status")
        assert time.monotonic() < deadline, page.inner_text("#job-status")
        time.sleep(0.05)
    assert len(progress_seen) >= 2, progress_seen  # the bar moved while the job ran
    page.wait_for_function("document.getElementById('player').readyState >= 2", timeout=30_000)
    duration = page.eval_on_selector("#player", "v => v.duration")
    size = page.eval_on_selector("#player", "v => [v.videoWidth, v.videoHeight]")
    assert size == [128, 128] and 0 < duration < 1.0
    assert "completed" in page.inner_text("#job-status") and "100%" in page.inner_text("#job-status")
    page.wait_for_function("document.querySelector('#deployments').innerText.includes('Denoiser-tiny-t2v')")
    assert "no GPU" in page.inner_text("#gpus")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "web_page.png"), full_page=True)
    assert not errors, errors
