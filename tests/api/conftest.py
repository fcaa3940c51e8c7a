"""API fixtures. The live uvicorn server (``live_api``) is in tests/conftest.py: tests/client uses it too."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.api import browser


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    """A headless Chromium (Selenium webdriver), one per test module (a browser left idle for minutes
    while other modules run, after another page's downloads, once failed to run the next page's
    modules); downloads go to tests/artifacts/downloads/<xdist worker>. Skipped, saying why, only where the browser
    or Selenium is absent."""
    reason = browser.missing()
    if reason is not None:
        pytest.skip(f"browser tests need Debian's chromium and chromedriver and selenium: {reason}")
    driver = browser.start(browser.clean_downloads(browser.DOWNLOADS))
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def page(chromium: Any) -> Iterator[Any]:
    """The shared browser, its console drained and its window at desktop size; each test asserts on the
    errors and CSP violations of its own pages (browser.problems)."""
    chromium.set_window_size(1280, 1000)
    chromium.get("about:blank")
    chromium.get_log("browser")
    yield chromium
