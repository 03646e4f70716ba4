"""Dashboard fixtures: the e2e coordinator (in this process, 2 s leases), our runner with its real
processors, tiny clips made by the real ffmpeg, and a page of Debian's Chromium driven by Playwright's async
API on the test's event loop (the coordinator and the runner keep running while the page is driven).

The browser tests are skipped, with the reason, when Chromium or Playwright is missing (`.ci/run` installs
Chromium; Playwright is a `dev` extra and drives the system browser: nothing is downloaded)."""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.e2e.conftest import admin, coordinator_config, database_url, new_registration_token, start_runner
from tests.support.servers import ADMIN_TOKEN
from tuberunner import __version__
from tuberunner.media.binaries import find_ffmpeg
from tuberunner.media.samples import make_sample_clip
from tuberunner.runner.config import InstanceConfig

if TYPE_CHECKING:
    from playwright.async_api import Page, ViewportSize

# Fixtures of tests/e2e, used here as they are.
__all__ = ["coordinator_config", "database_url", "start_runner"]

CHROMIUM = Path(os.environ.get("TUBERUNNER_CHROMIUM", "/usr/bin/chromium"))
# How long `expect` waits for the page to show something: a few polls (one every 2 s) on a busy machine.
PAGE_MS = 10_000
VIEWPORT: ViewportSize = {"width": 1280, "height": 860}
# Chromium logs every answered error status as a console error; the tests that cause one say so.
_LOADED_WITH_401 = re.compile(r"Failed to load resource: the server responded with a status of 401\b")


@dataclass(frozen=True)
class Clips:
    long: Path  # 160x90, 25 fps, 30 s: upscaled to 720p, ffmpeg runs for about 15 s on one thread
    upload: Path  # 320x180, 25 fps, 3 s: a whole upload pipeline (180p, 144p, audio) in a few seconds


@pytest.fixture(scope="session")
def clips(tmp_path_factory: pytest.TempPathFactory) -> Clips:
    folder = tmp_path_factory.mktemp("dashboard-media")
    ffmpeg = find_ffmpeg()

    async def make() -> Clips:
        long, upload = await asyncio.gather(
            make_sample_clip(ffmpeg, folder / "long.mp4", duration_s=30, width=160, height=90),
            make_sample_clip(ffmpeg, folder / "sample-clip.mp4", duration_s=3, width=320, height=180),
        )
        return Clips(long, upload)

    return asyncio.run(make())


async def register_runner(url: str, name: str) -> InstanceConfig:
    """Register through the runner API with our version, as `tuberunner register` does."""
    registration_token = await new_registration_token(url)
    async with admin(url) as http:
        answer = await http.post(
            "/api/v1/runners/register",
            json={"registrationToken": registration_token, "name": name, "version": __version__},
        )
        answer.raise_for_status()
    return InstanceConfig(url, answer.json()["runnerToken"], name)


@dataclass
class Dashboard:
    """A Chromium page, and what went wrong in it (console errors, uncaught exceptions, CSP violations)."""

    page: Page
    problems: list[str] = field(default_factory=list)

    async def sign_in(self, url: str, token: str = ADMIN_TOKEN) -> Page:
        """Open the coordinator's root (redirected to the dashboard) and enter the admin token."""
        from playwright.async_api import expect

        await self.page.goto(url + "/")
        await self.page.get_by_label("Admin token").fill(token)
        await self.page.get_by_role("button", name="Open").click()
        if token == ADMIN_TOKEN:
            await expect(self.page.locator("#board")).to_be_visible()
        return self.page

    def take_401s(self) -> list[str]:
        """Remove (and return) the console errors Chromium logs for requests answered 401."""
        taken = [p for p in self.problems if _LOADED_WITH_401.search(p)]
        self.problems[:] = [p for p in self.problems if p not in taken]
        return taken


@pytest.fixture
async def dashboard() -> AsyncIterator[Dashboard]:
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM}: `apt-get install chromium` (as .ci/run does) to run it")
    try:
        from playwright.async_api import async_playwright, expect
    except ImportError:
        pytest.skip("Playwright is not installed: `pip install -e '.[dev]'`")
    expect.set_options(timeout=PAGE_MS)
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=str(CHROMIUM))
        try:
            context = await browser.new_context(viewport=VIEWPORT)
            page = await context.new_page()
            found = Dashboard(page)
            page.on(
                "console",
                lambda message: (
                    found.problems.append(f"console: {message.text}") if message.type == "error" else None
                ),
            )
            page.on("pageerror", lambda error: found.problems.append(f"uncaught: {error}"))
            yield found
        finally:
            await browser.close()
    assert found.problems == [], "the page reported errors"
