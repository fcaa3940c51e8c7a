"""Leaving a page keeps nothing for the back button, in a real headless Chromium: a page left for another
(a link followed in the same tab, another address) may be kept whole in the browser's back/forward cache,
and the back button (the next user's of a shared clinic computer, say) would bring it back with the pasted
key and the patient data it showed. Each page forgets both as it is left, as a reload does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api import browser
from tests.support import seal_all

By = pytest.importorskip("selenium.webdriver.common.by", reason="selenium is in the test extra (make install)").By
pytestmark = [pytest.mark.usefixtures("database", "worker"), pytest.mark.slow]


def leave_and_come_back(page: Any, base: str) -> None:
    """Follow the footer's link to /docs in this tab, then press the back button. The page must come back
    from the back/forward cache (the same document, its scripts' state kept), or nothing here is tested."""
    page.execute_script("window.__sameDocument = true")
    page.find_element(By.CSS_SELECTOR, "footer a[href='/docs']").click()
    browser.wait_until(page, lambda d: d.current_url == f"{base}/docs", what="the docs page")
    browser.problems(page)  # the docs page's own (its favicon's 404): not the page under test's
    page.back()
    browser.wait_until(page, lambda d: d.execute_script("return document.readyState") == "complete")
    assert page.execute_script("return window.__sameDocument === true"), "the back/forward cache was not used"


def test_the_back_button_brings_the_portal_back_without_the_key_or_the_patients(  # type: ignore[no-untyped-def]
    page, live_api: str, make_key, fixture_images: dict[str, Path]
) -> None:
    clinic = make_key()
    answer = httpx.post(
        f"{live_api}/v1/cases?wait=20",
        headers=clinic.headers,
        files={"image": ("image.jpg", fixture_images["ISIC_0024313"].read_bytes(), "image/jpeg")},
        data={"client_ref": "MRN-left-behind"},
        timeout=30,
    )
    assert answer.status_code in (201, 202), answer.text
    case_id = answer.json()["id"]
    browser.open_page(page, f"{live_api}/portal/", clinic.token)
    row = f"#case-rows tr[data-case-id='{case_id}']"
    browser.wait_until(page, lambda d: d.find_element(By.CSS_SELECTOR, f"{row} button.secondary")).click()
    browser.wait_until(page, lambda d: d.find_element(By.ID, "result").get_attribute("data-case-id") == case_id)
    page.find_element(By.ID, "client-ref").send_keys("MRN-typed-next")  # the next patient's, not yet sent
    body = page.find_element(By.TAG_NAME, "body")
    assert "MRN-left-behind" in body.text and case_id in body.text

    leave_and_come_back(page, live_api)
    state = page.find_element(By.ID, "key-state")
    assert state.get_attribute("data-state") == "none" and "forgotten" in state.text
    assert page.find_element(By.ID, "forget-key").is_displayed() is False
    text = page.find_element(By.TAG_NAME, "body").text
    assert "MRN-left-behind" not in text and case_id not in text and clinic.token[:15] not in text
    assert page.find_elements(By.CSS_SELECTOR, "#case-rows tr") == []
    assert page.find_element(By.ID, "result").is_displayed() is False
    assert page.find_element(By.ID, "client-ref").get_attribute("value") == ""
    # nothing can be asked with the key any more: the list's refresh asks for one
    page.find_element(By.ID, "cases-refresh").click()
    problem = page.find_element(By.ID, "cases-problem")
    browser.wait_until(page, lambda _: problem.get_attribute("data-code") == "missing_key", what="the missing key")
    assert page.find_elements(By.CSS_SELECTOR, "#case-rows tr") == []
    assert browser.problems(page) == []


def test_the_back_button_brings_the_console_back_without_the_key_or_the_events(  # type: ignore[no-untyped-def]
    page, live_api: str, make_key, settings
) -> None:
    clinic, auditor = make_key(), make_key("auditor")
    httpx.get(f"{live_api}/v1/cases", headers=clinic.headers, timeout=10)  # an event of this clinic's
    seal_all(settings)
    browser.open_page(page, f"{live_api}/audit/", auditor.token)
    verify = page.find_element(By.ID, "verify-status")
    browser.wait_until(page, lambda _: verify.text != "Loading…", what="the verification")
    page.find_element(By.ID, "clinic").send_keys(str(clinic.clinic_id))
    page.find_element(By.ID, "search-button").click()
    browser.wait_until(page, lambda d: d.find_elements(By.CSS_SELECTOR, "#event-rows tr"), what="the events")

    leave_and_come_back(page, live_api)
    state = page.find_element(By.ID, "key-state")
    assert state.get_attribute("data-state") == "none" and "forgotten" in state.text
    assert page.find_elements(By.CSS_SELECTOR, "#event-rows tr") == []
    assert str(clinic.clinic_id) not in page.find_element(By.TAG_NAME, "body").text
    assert page.find_element(By.ID, "clinic").get_attribute("value") == ""  # nor what was searched for
    assert page.find_element(By.ID, "checkpoint-note").is_displayed() is False
    assert browser.problems(page) == []
