"""A real headless Chromium driven by Selenium, for the browser tests of the portal and the auditor console.

Debian's ``chromium`` and ``chromedriver`` (apt packages ``chromium``, ``chromium-driver``; ``make test``
installs them when it runs as root; elsewhere ``DERMQ_TEST_CHROMIUM`` and ``DERMQ_TEST_CHROMEDRIVER`` name
them): both paths are given to Selenium, so Selenium Manager never downloads a browser or a driver. The
browser's console is read through ``goog:loggingPrefs``, and every page gets a ``securitypolicyviolation``
listener before its own scripts run (CDP), so a test can assert that a page raised no error and no
Content-Security-Policy violation.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

CHROMIUM = Path(os.environ.get("DERMQ_TEST_CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("DERMQ_TEST_CHROMEDRIVER", "/usr/bin/chromedriver"))

#: registered in every new document before the page's scripts run
RECORD_VIOLATIONS = """
window.__cspViolations = [];
document.addEventListener("securitypolicyviolation", (event) => {
  window.__cspViolations.push(event.violatedDirective + " " + (event.blockedURI || "inline"));
});
"""


def missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (it is in the test extra: make install)"
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not (path.is_file() and os.access(path, os.X_OK)):
            return f"{path} is missing (apt-get install {package}; make test installs it as root)"
    return None


def start(downloads: Path, log: Path, *, width: int = 1280, height: int = 1000) -> Any:
    """A headless Chromium (webdriver.Chrome) whose downloads go to ``downloads``; chromedriver writes
    its log to ``log``."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new",
        "--no-sandbox",  # root in a container has no user namespaces for the sandbox
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--disable-extensions",
        "--no-first-run",
        f"--window-size={width},{height}",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    options.add_experimental_option(
        "prefs", {"download.default_directory": str(downloads), "download.prompt_for_download": False}
    )
    service = Service(executable_path=str(CHROMEDRIVER), log_output=str(log))
    driver = webdriver.Chrome(options=options, service=service)
    driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": RECORD_VIOLATIONS})
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    driver.set_script_timeout(30)
    return driver


def problems(driver: Any) -> list[str]:
    """The page's console errors and CSP violations since the last call (the console log is drained)."""
    errors = [f"console: {entry['message']}" for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
    violations = driver.execute_script("return window.__cspViolations || []")
    return errors + [f"CSP violation: {v}" for v in violations]


def wait_until(driver: Any, condition: Callable[[Any], Any], timeout: float = 60, what: str = "the page") -> Any:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    # a missing element (the default) or one replaced while it was read (the pages re-render) is "not yet"
    wait = WebDriverWait(driver, timeout, poll_frequency=0.1, ignored_exceptions=[StaleElementReferenceException])
    return wait.until(condition, message=f"waiting for {what}")


def screenshot(driver: Any, path: Path) -> Path:
    """Save the whole page as the PNG ``path`` (the window is resized to the page's height)."""
    size = driver.get_window_size()
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(size["width"], max(size["height"], min(int(height) + 120, 6000)))
    driver.execute_script("window.scrollTo(0, 0)")
    driver.save_screenshot(str(path))
    driver.set_window_size(size["width"], size["height"])
    return path


def clean_downloads(folder: Path) -> Path:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def ready(driver: Any) -> bool:
    """Whether the page's module ran to its end (it sets ``data-ready`` on the root element last)."""
    return bool(driver.execute_script("return document.documentElement.dataset.ready") == "true")


def open_page(driver: Any, url: str, token: str) -> None:
    """Open a dermq page (portal or console) once its module has run, and paste ``token`` as its key."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By

    driver.get(url)
    try:
        wait_until(driver, ready, timeout=30)
    except TimeoutException:  # say what the browser shows, then give the page one reload
        seen = f"{driver.current_url!r} titled {driver.title!r}; {problems(driver)}"
        driver.refresh()
        try:
            wait_until(driver, ready, timeout=30)
        except TimeoutException:
            raise AssertionError(f"{url} never ran its modules: the browser showed {seen}") from None
    driver.find_element(By.ID, "api-key").send_keys(token)
    driver.find_element(By.CSS_SELECTOR, "#key-form button[type=submit]").click()
    wait_until(driver, lambda d: d.find_element(By.ID, "key-state").get_attribute("data-state") == "set", 10)


def open_queued_case(driver: Any, base: str, token: str, case_id: str) -> Any:
    """Open the portal of the API at ``base`` with ``token``, open the queued case ``case_id`` from the
    case list and wait until the result section shows it queued; returns that section (the page then
    follows the case)."""
    from selenium.webdriver.common.by import By

    open_page(driver, f"{base}/portal/", token)
    row = f"#case-rows tr[data-case-id='{case_id}']"
    wait_until(driver, lambda d: d.find_element(By.CSS_SELECTOR, f"{row} button.secondary")).click()
    section = driver.find_element(By.ID, "result")
    wait_until(driver, lambda _: section.get_attribute("data-status") == "queued")
    return section


def submit_in_portal(driver: Any, image: Path, *, client_ref: str = "", urgent: bool = False) -> str:
    """Choose ``image`` in the portal's form, submit it, and wait until the case has ended; its id."""
    from selenium.webdriver.common.by import By

    driver.find_element(By.ID, "image").send_keys(str(image))
    if client_ref:
        driver.find_element(By.ID, "client-ref").send_keys(client_ref)
    if urgent:
        driver.find_element(By.ID, "urgent").click()
    driver.find_element(By.ID, "submit-button").click()
    wait_until(
        driver,
        lambda d: d.find_element(By.ID, "result").get_attribute("data-status") in ("succeeded", "failed"),
        what="the case to end",
    )
    return str(driver.find_element(By.ID, "result").get_attribute("data-case-id"))
