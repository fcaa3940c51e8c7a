"""API fixtures. The live uvicorn server (``live_api``) is in tests/conftest.py: tests/client uses it too."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from tests import support
from tests.api import browser


@pytest.fixture
def waiting_client(settings, database, private_broker) -> Iterator[TestClient]:  # type: ignore[no-untyped-def]
    """An API of its own whose tasks go to a broker no worker reads: its cases wait until a test ends them."""
    app = create_app(settings.model_copy(update={"redis_url": private_broker.url}))
    with TestClient(app, raise_server_exceptions=False) as http:
        http.get(f"/v1/cases/{uuid.uuid4()}?wait=0.1")  # starts the listener
        listener = app.state.dermq.listener
        support.wait_for(lambda: listener.listening, timeout=20, what="the API's listener to connect")
        yield http


@pytest.fixture(scope="module")
def browser_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The browser's folder for this test module, under pytest's temporary directory: its downloads
    (``downloads/``) and chromedriver's log."""
    return tmp_path_factory.mktemp("browser")


@pytest.fixture(scope="module")
def chromium(browser_files: Path) -> Iterator[Any]:
    """A headless Chromium (Selenium webdriver), one per test module (a browser left idle for minutes
    while other modules run, after another page's downloads, once failed to run the next page's
    modules); downloads go to ``browser_files``/downloads. Skipped, saying why, only where the browser
    or Selenium is absent."""
    reason = browser.missing()
    if reason is not None:
        pytest.skip(f"browser tests need Debian's chromium and chromedriver and selenium: {reason}")
    driver = browser.start(browser.clean_downloads(browser_files / "downloads"), browser_files / "chromedriver.log")
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
