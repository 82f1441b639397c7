"""End-to-end test of the demo's Video tab in a real headless Chromium: start `visiontools demo`,
upload the example clip (a pan across a bundled photo), annotate it, and check that Chromium gets
back a clip it can play, with the plot and the numbers. Screenshot: artifacts/demo_browser_video.png."""
from __future__ import annotations

import pytest
from demo_server import ARTIFACTS, CHROMIUM, EXPECT_TIMEOUT_MS, DemoServer
from demo_server import CHROMIUM_ARGS as BASE_ARGS

# a fake camera (a test pattern) that the page may use without a permission prompt
CHROMIUM_ARGS = [*BASE_ARGS, "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"]

pytestmark = pytest.mark.browser  # no skip: a missing Chromium fails (scripts/setup.sh --dev installs it)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`visiontools demo` in a subprocess on a free port, its example clip cached in a fresh folder."""
    cache = tmp_path_factory.mktemp("xdg_cache")
    with DemoServer(ARTIFACTS / "demo_video_server.log", env={"XDG_CACHE_HOME": str(cache)},
                    drop_env=("GRADIO_ANALYTICS_ENABLED",)) as demo:
        clips = list((cache / "visiontools").glob("example_pan_*.webm"))
        assert len(clips) == 1, "the demo should have generated its example clip into the cache folder"
        yield demo.url, clips[0]


def _playable(page, selector: str) -> dict:
    """Wait until Chromium has decoded the <video>'s first frame; its size and duration."""
    page.wait_for_function(f"() => {{ const v = document.querySelector({selector!r}); "
                           "return v && v.readyState >= 2 && v.videoWidth > 0; }", timeout=30_000)
    return page.evaluate(f"() => {{ const v = document.querySelector({selector!r}); "
                         "return {w: v.videoWidth, h: v.videoHeight, d: v.duration, err: v.error && v.error.code}; }")


def test_upload_example_clip_and_get_an_annotated_clip(server):
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=EXPECT_TIMEOUT_MS)

    url, clip = server
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1400})
            page.set_default_timeout(30_000)
            page.goto(url)
            page.get_by_role("tab", name="Video").click()
            page.locator("#video-in input[type=file]").set_input_files(str(clip))
            # the uploaded example plays in the input's preview (WebM/VP8: Chromium decodes it)
            assert _playable(page, "#video-in video")["w"] == 320
            page.locator("#video-run").click()
            note = page.locator("#video-note")
            expect(note).to_contain_text("48 frames", timeout=90_000)
            expect(note).to_contain_text("tokens")
            expect(note).to_contain_text("FPS")
            out = _playable(page, "#video-out video")
            assert out["err"] is None and out["d"] == pytest.approx(4.0, abs=0.3)   # 48 frames at 12 fps
            assert out["w"] == 2 * 320 and out["h"] > 240                           # frame | map, text bar
            src = page.locator("#video-out video").get_attribute("src")
            assert src.endswith(".webm"), src
            expect(page.locator("#video-plot img").first).to_be_visible()
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "demo_browser_video.png"), full_page=True)
        finally:
            browser.close()


def test_webcam_stream_gets_merge_maps(server):
    """Chromium's fake camera (a moving test pattern) streams into the webcam section: annotated frames
    come back and keep changing."""
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=EXPECT_TIMEOUT_MS)

    url, _ = server
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 1400}, permissions=["camera"])
            page = context.new_page()
            page.set_default_timeout(30_000)
            page.goto(url)
            page.get_by_role("tab", name="Video").click()
            page.get_by_text("Webcam (live)").click()
            page.get_by_text("Click to Access Webcam").click()
            page.locator("#webcam button[aria-label='capture photo']").click()   # Record: start streaming
            out = page.locator("#webcam-out img")
            expect(out).to_have_count(1)
            first = out.get_attribute("src")
            expect(out).not_to_have_attribute("src", first)   # a later frame replaced it
            page.screenshot(path=str(ARTIFACTS / "demo_browser_webcam.png"), full_page=True)
        finally:
            browser.close()
