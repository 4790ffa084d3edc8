"""The live page in a real browser: Debian's chromium driven by Playwright (never ``playwright install``)."""

from __future__ import annotations

import os
import subprocess
import shutil
from pathlib import Path

import pytest
from playwright.sync_api import sync_playwright

import refstream
from test_live_server import Server

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def playwright():
    if not Path(CHROMIUM).exists():
        pytest.fail("chromium is not installed: apt-get install chromium (.ci/run does)")
    with sync_playwright() as p:  # one Playwright per module: its sync API cannot nest
        yield p


def launch(playwright, profile, extra_flags=(), **options):
    """Debian's chromium with the project's flags and a fresh profile folder (never ``playwright install``)."""
    return playwright.chromium.launch_persistent_context(str(profile), executable_path=CHROMIUM,
                                                         args=FLAGS + list(extra_flags), headless=True, **options)


@pytest.fixture(scope="module")
def browser(playwright, tmp_path_factory):
    context = launch(playwright, tmp_path_factory.mktemp("chromium-profile"), viewport={"width": 1100, "height": 760})
    yield context
    context.close()


def stats(page) -> dict:
    return page.evaluate("() => ({...window.refstreamStats})")


def track(page, expression: str) -> dict:
    """Type ``expression`` + Enter; wait for prompt 1 with 30 painted frames carrying mask pixels; the stats."""
    page.fill("#expression", expression)
    page.press("#expression", "Enter")
    page.wait_for_function("() => window.refstreamStats.prompt_id === 1 && "
                           "window.refstreamStats.painted_frames >= 30 && window.refstreamStats.mask_pixels > 0",
                           timeout=120_000)
    return stats(page)


def test_page_tracks_typed_expressions_and_reprompts(browser, bedroom_mp4, tmp_path):
    pipeline = refstream.load("tiny", device="cpu").pipeline
    with Server(pipeline, bedroom_mp4) as server:
        pages = [browser.new_page(), browser.new_page()]  # two pages at once, each its own session
        for page in pages:
            page.goto(f"http://127.0.0.1:{server.port}/")
        page = pages[0]
        first = track(page, "the bed")
        assert first["state"] == "tracking" and first["display_fps"] > 0 and first["latency_ms_p95"] > 0
        page.fill("#expression", "the girl; the bed")
        page.press("#expression", "Enter")
        page.wait_for_function("() => window.refstreamStats.prompt_id === 2", timeout=120_000)
        assert page.locator("#legend span").count() == 2
        assert page.locator("#tokens").is_visible()  # the kept tokens of the grounding, as tokens.png
        assert page.evaluate("() => document.getElementById('tokens').naturalWidth") == 336
        assert page.locator("#banner").is_visible()  # tiny: random weights
        other = stats(pages[1])
        assert other["prompt_id"] == 0 and other["painted_frames"] > 0  # the second page shows the video untouched
        assert len(server.app.sessions) == 2
        shot = tmp_path / "live.png"
        page.screenshot(path=str(shot))
        assert shot.stat().st_size > 10_000
        if os.environ.get("REFSTREAM_WRITE_DOCS"):
            shutil.copy(shot, REPO / "docs" / "live.png")
        for p in pages:
            p.close()


def test_page_with_source_browser_sends_its_fake_camera(playwright, bedroom_mp4, tmp_path):
    """SOURCE browser: Chromium's fake camera plays a .y4m made from the example; the page sends its frames as
    JPEG over the websocket and paints the masks that come back on its own frames."""
    camera = tmp_path / "camera.y4m"
    subprocess.run(["ffmpeg", "-loglevel", "error", "-i", str(bedroom_mp4), "-t", "4", "-vf", "scale=320:180",
                    "-pix_fmt", "yuv420p", str(camera)], check=True)
    pipeline = refstream.load("tiny", device="cpu").pipeline
    camera_flags = ["--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
                    f"--use-file-for-fake-video-capture={camera}"]
    with Server(pipeline, "browser") as server:
        context = launch(playwright, tmp_path / "profile", camera_flags)
        try:
            page = context.new_page()
            page.goto(f"http://127.0.0.1:{server.port}/")
            page.wait_for_function("() => window.refstreamStats.painted_frames >= 5", timeout=120_000)
            seen = track(page, "the bed")
            assert seen["state"] == "tracking" and seen["source_fps"] > 0 and seen["latency_ms_p95"] > 0
            (session,) = server.app.sessions
            source = session.engine.source
            assert type(source).__name__ == "BrowserSource" and source.frames_pushed >= 30
            assert (source.width, source.height) == (320, 180)
            page.screenshot(path=str(tmp_path / "camera.png"))
            assert (tmp_path / "camera.png").stat().st_size > 10_000
        finally:
            context.close()
