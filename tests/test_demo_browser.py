"""End-to-end test of the Gradio demo in a real headless Chromium: start `visiontools demo` on a free
local port, pick a bundled example, move the r slider, and check that the merge picture and the token
counts update. A screenshot is saved to artifacts/demo_browser.png."""
from __future__ import annotations

import os
import re

import pytest
from demo_server import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, EXPECT_TIMEOUT_MS, HOLDING_LAUNCHER, DemoServer

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def server():
    """`visiontools demo` in a subprocess on a free port (environment as a user would have it, minus
    threads); yields its URL and start-up time."""
    # merge requests are held 1 s while the test holds the file hold_merge_requests
    env = {"VT_HOLD_SECONDS": "1", "VT_HOLD_FILE": str(ARTIFACTS / "hold_merge_requests")}
    with DemoServer(ARTIFACTS / "demo_server.log", launcher=HOLDING_LAUNCHER, env=env,
                    drop_env=("GRADIO_ANALYTICS_ENABLED", "HF_HUB_OFFLINE"), timeout=60) as demo:
        yield demo.url, demo.startup_seconds


def _token_rows(page) -> list[list[str]]:
    rows = page.locator("#token-table [role=row].virtual-row")  # Gradio's data grid: one div per row
    return [[c.strip() for c in rows.nth(i).locator("[role=gridcell]").all_text_contents()]
            for i in range(rows.count())]


def _first_view(page) -> str:
    """The page opens on a bundled photo of the shipped checkpoint, already analysed; the picture's src."""
    from playwright.sync_api import expect

    vis = page.locator("#merge-vis img")
    # the server runs the shipped checkpoint (no fallback to random weights)
    expect(page.locator("#model-info")).to_contain_text("shipped CIFAR-10 checkpoint")
    expect(page.locator("#model-info")).not_to_contain_text("random weights")
    expect(vis).to_have_count(1)
    expect(page.locator("#token-summary")).to_contain_text("patch groups")
    # the first view (issue 47): a 16x16 picture of the default model (8x8 patches at 32x32, run on
    # a 64x64 copy) after a middle block, with many groups; the classes it knows, named
    summary = page.locator("#token-summary")
    expect(summary).to_contain_text(re.compile(r"\d+ of 256 patch groups after block [1-6] of 7"))
    expect(summary).to_contain_text("merged on a 64x64 copy of the image (16x16 patches")
    groups, block = re.search(r"(\d+) of 256 patch groups after block (\d) ", summary.inner_text()).groups()
    assert int(groups) >= 256 // 3, groups  # many groups, not "2 of 64"
    expect(page.locator("#layer-slider input[type=number]")).to_have_value(block)
    expect(page.locator("#classes-note")).to_contain_text(
        "knows only the 10 CIFAR-10 classes: airplane, automobile, bird, cat, deer, dog, frog, horse, ship, truck")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "demo_browser_first_view.png"), full_page=True)
    return vis.get_attribute("src")


def _pick_example_and_move_r(page, first_src: str) -> tuple[str, str]:
    """Another bundled example, then r + 4 with the slider's keyboard: (r before, r after)."""
    from playwright.sync_api import expect

    vis = page.locator("#merge-vis img")
    summary_before = page.locator("#token-summary").inner_text()
    page.locator("#examples button.gallery-item").nth(0).click()   # astronaut.jpg (sorted first)
    expect(vis).not_to_have_attribute("src", first_src)
    example_src = vis.get_attribute("src")
    # move the r slider's thumb with the keyboard (as a user dragging it would change it)
    r_before = page.locator("#r-slider input[type=number]").input_value()
    merged_cell = page.locator("#token-table [data-testid='cell-0-2']")
    expect(merged_cell).to_have_text(r_before)
    new_r = str(int(r_before) + 4)
    thumb = page.locator("#r-slider input[type=range]")
    thumb.focus()
    for _ in range(4):
        page.keyboard.press("ArrowRight")
    expect(thumb).to_have_value(new_r)
    expect(page.locator("#r-slider input[type=number]")).to_have_value(new_r)
    expect(merged_cell).to_have_text(new_r)
    expect(vis).not_to_have_attribute("src", example_src)
    rows = _token_rows(page)
    assert len(rows) >= 2, rows
    ins = [int(r[1]) for r in rows]
    outs = [int(r[3]) for r in rows]
    assert all(int(r[2]) == int(new_r) for r in rows if int(r[1]) > 2 * int(new_r) + 1)
    assert outs[:-1] == ins[1:] and outs[-1] < ins[0]
    assert page.locator("#token-summary").inner_text() != summary_before
    expect(page.locator("#top5-after")).to_contain_text("%")
    page.screenshot(path=str(ARTIFACTS / "demo_browser.png"), full_page=True)
    return r_before, new_r


def _bad_upload(page, bad_upload) -> None:
    """A file that is not an image: a clear message, and the app keeps working."""
    from playwright.sync_api import expect

    status = page.locator("#status")
    page.locator("#input-image input[type=file]").set_input_files(str(bad_upload))
    expect(status).to_contain_text("Could not use this upload")
    expect(status).to_contain_text("not an image file")
    page.screenshot(path=str(ARTIFACTS / "demo_browser_bad_upload.png"))
    page.locator("#examples button.gallery-item").nth(1).click()
    expect(status).not_to_contain_text("Could not use this upload")
    expect(page.locator("#merge-vis img")).to_have_count(1)


def _two_users_at_once(browser, page, url: str, r_before: str, new_r: str) -> None:
    """A second user at the same time gets their own result: both change r at once, and the server
    runs both requests together (each held 1 s while the hold file exists, so they overlap)."""
    from playwright.sync_api import expect

    hold = ARTIFACTS / "hold_merge_requests"
    other = browser.new_page(viewport={"width": 1280, "height": 1000})
    other.goto(url)
    other.locator("#examples button.gallery-item").nth(2).click()
    expect(other.locator("#merge-vis img")).to_have_count(1)
    other_cell = other.locator("#token-table [data-testid='cell-0-2']")
    expect(other_cell).to_have_text(r_before)
    hold.touch()
    try:
        for user, value in ((page, new_r), (other, "1")):
            user.locator("#r-slider input[type=number]").fill(value)
        for user in (page, other):
            user.locator("#r-slider input[type=number]").press("Enter")
        expect(page.locator("#token-table [data-testid='cell-0-2']")).to_have_text(new_r)
        expect(other_cell).to_have_text("1")
    finally:
        hold.unlink()
    assert "ACTIVE 2" in (ARTIFACTS / "demo_server.log").read_text()
    other.close()


def _other_tabs(page, r: str) -> None:
    """Measured speed (chart and table), then the Stable Diffusion and Hyena tabs (part of the dev
    install: a missing tab fails)."""
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Measured speed").click()
    page.locator("#measure").click()
    expect(page.locator("#speed-table [data-testid='cell-0-0']")).to_have_text("unpatched", timeout=45_000)
    expect(page.locator("#speed-table [data-testid='cell-1-0']")).to_contain_text(f"ToMe r={r}")
    expect(page.locator("#speed-chart img").first).to_be_visible()
    expect(page.locator("#speed-note")).to_contain_text("measured speedup")
    page.screenshot(path=str(ARTIFACTS / "demo_browser_speed.png"), full_page=True)
    sd_tab = page.get_by_role("tab", name="Stable Diffusion (ToMe-SD)")
    expect(sd_tab).to_have_count(1)
    sd_tab.click()
    page.locator("#sd-show").click()
    expect(page.locator("#sd-note")).to_contain_text("tokens merged", timeout=45_000)
    expect(page.locator("#sd-gallery img").first).to_be_visible()
    page.screenshot(path=str(ARTIFACTS / "demo_browser_sd.png"), full_page=True)
    hyena_tab = page.get_by_role("tab", name="Hyena")
    expect(hyena_tab).to_have_count(1)
    hyena_tab.click()  # selecting the tab draws the filters
    expect(page.locator("#hyena-note")).to_contain_text("Red = positive")
    expect(page.locator("#hyena-filters img").first).to_be_visible()
    page.screenshot(path=str(ARTIFACTS / "demo_browser_hyena.png"), full_page=True)


def test_pick_example_and_move_r_slider(server, tmp_path):
    """The first view, another example and r moved, a bad upload, two users at once, then every tab."""
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=EXPECT_TIMEOUT_MS)

    assert os.path.exists(CHROMIUM), f"{CHROMIUM} is missing: `bash scripts/setup.sh --dev` installs it"
    url, _ = server
    bad_upload = tmp_path / "holiday.jpg"
    bad_upload.write_text("not a photo: a text file with an image name\n")
    external: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1500})
            page.set_default_timeout(30_000)
            page.on("request", lambda req: external.append(req.url)
                    if not req.url.startswith(("http://127.0.0.1", "http://localhost", "data:", "blob:")) else None)
            page.goto(url)
            first_src = _first_view(page)
            r_before, new_r = _pick_example_and_move_r(page, first_src)
            _bad_upload(page, bad_upload)
            new_r = str(int(new_r) - 1)
            _two_users_at_once(browser, page, url, r_before, new_r)
            _other_tabs(page, new_r)
        finally:
            browser.close()
    assert not external, f"the page tried to reach the internet: {external}"
    server_log = (ARTIFACTS / "demo_server.log").read_text()
    assert "NETWORK ACCESS" not in server_log, server_log
