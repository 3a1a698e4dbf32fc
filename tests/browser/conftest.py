"""The session's `tsq dev`-style stack (dev server with Web UI, worker, database) and a headless
Debian chromium to drive it, through Playwright without Playwright's own browser downloads.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, Page, ViewportSize, async_playwright, expect

from tsq.devstack import TemporalDevServer

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Wide enough for the workflow list with tsq's columns, tall enough for the current details.
VIEWPORT: ViewportSize = {"width": 1920, "height": 1200}
# The UI is a single-page app on a shared, busy machine: be patient with every step.
UI_TIMEOUT_MS = 30_000
expect.set_options(timeout=UI_TIMEOUT_MS)


def _chromium() -> str:
    """Debian's chromium, or the build named by TSQ_CHROMIUM."""
    path = os.environ.get("TSQ_CHROMIUM") or shutil.which("chromium")
    if path is None:
        message = "no chromium: install Debian's `chromium` package or set TSQ_CHROMIUM"
        # In CI a missing browser is a broken setup, not a reason to skip.
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def ui_url(temporal_server: TemporalDevServer) -> str:
    """The Web UI of the session's dev server, as `tsq dev` serves it."""
    assert temporal_server.ui_url is not None
    return temporal_server.ui_url


@pytest.fixture(scope="session")
async def browser() -> AsyncIterator[Browser]:
    executable = _chromium()
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield browser
        await browser.close()


@pytest.fixture
async def page(browser: Browser) -> AsyncIterator[Page]:
    """A fresh browser context per test: no columns or views saved by an earlier test."""
    context = await browser.new_context(viewport=VIEWPORT)
    context.set_default_timeout(UI_TIMEOUT_MS)
    page = await context.new_page()
    yield page
    await context.close()


@pytest.fixture(scope="session")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the tests save what the operator saw. The README's operator guide shows them:
    `TSQ_UPDATE_SCREENSHOTS=1 pytest tests/browser` refreshes docs/images; other runs keep
    them in pytest's temporary folder, so a test run leaves the working tree clean."""
    if os.environ.get("TSQ_UPDATE_SCREENSHOTS"):
        path = Path(__file__).resolve().parents[2] / "docs" / "images"
        path.mkdir(parents=True, exist_ok=True)
        return path
    return tmp_path_factory.mktemp("screenshots")
