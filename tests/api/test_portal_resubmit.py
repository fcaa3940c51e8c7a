"""The portal's resubmission after an answer that never came, in a real headless Chromium against a
real API process on a broker of its own (no worker takes its cases: a submission waits for its case,
stored, until the page gives up on it; the suite's worker, once started, serves the shared broker): a
changed reference or priority goes with the same Idempotency-Key, so dermq refuses it (409) rather
than store the lesion a second time, and the page says where the first case is."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from core.db import session_scope
from core.models import Case
from tests import processes, support
from tests.api import browser

By = pytest.importorskip("selenium.webdriver.common.by", reason="selenium is in the test extra (make install)").By
Keys = pytest.importorskip("selenium.webdriver.common.keys").Keys
pytestmark = [pytest.mark.usefixtures("database"), pytest.mark.slow]


@pytest.fixture(scope="module")
def unworked_api(stack_env: dict[str, str], stack_dir: Path, database, private_broker: Any) -> Iterator[str]:  # type: ignore[no-untyped-def]
    env = {
        **stack_env,
        "DERMQ_API_PORT": str(support.free_port()),
        "DERMQ_REDIS_URL": private_broker.url,
        "DERMQ_METRICS_PORT": str(support.free_port()),
    }
    with processes.api_process(env, stack_dir / "unworked-api.log") as (base, _):
        yield base


def _cases(settings, clinic_id) -> int:  # type: ignore[no-untyped-def]
    with session_scope(settings) as session:
        return int(session.scalar(select(func.count()).select_from(Case).where(Case.clinic_id == clinic_id)) or 0)


def test_a_reference_changed_after_an_unanswered_submission_stores_no_second_case(  # type: ignore[no-untyped-def]
    page, unworked_api: str, make_key, store_case, settings, jpeg_bytes: bytes, fixture_images: dict[str, Path]
) -> None:
    clinic = make_key()
    other = str(store_case(clinic, jpeg_bytes))  # a case in the list to open
    browser.open_page(page, f"{unworked_api}/portal/", clinic.token)
    row = f"#case-rows tr[data-case-id='{other}'] button.secondary"
    browser.wait_until(page, lambda d: d.find_element(By.CSS_SELECTOR, row), what="the case list")
    page.find_element(By.ID, "image").send_keys(str(fixture_images["ISIC_0024313"]))
    page.find_element(By.ID, "client-ref").send_keys("MRN-first")
    page.find_element(By.ID, "submit-button").click()
    # stored, and its answer still waiting for the case to end: the clinician opens another case
    browser.wait_until(page, lambda _: _cases(settings, clinic.clinic_id) == 2, what="the submission to be stored")
    # found and clicked at once: the list redraws its rows when it reloads (a row found before is stale)
    browser.wait_until(page, lambda d: d.find_element(By.CSS_SELECTOR, row).click() or True, what="the other case")
    # opening it gave the submission up (its request aborted; the page then shows the opened case's status)
    section = page.find_element(By.ID, "result")
    browser.wait_until(page, lambda _: section.get_attribute("data-case-id") == other, what="the other case")
    status = page.find_element(By.ID, "case-status")
    reference = page.find_element(By.ID, "client-ref")
    reference.clear()
    reference.send_keys("MRN-second", Keys.TAB)  # changed: the unconfirmed submission takes the new value
    page.find_element(By.ID, "submit-button").click()
    browser.wait_until(page, lambda _: "reached dermq" in status.text, timeout=40, what="the refusal in words")
    assert "its case is in the list" in status.text
    assert _cases(settings, clinic.clinic_id) == 2  # a new key stored the lesion a second time
    assert page.find_element(By.ID, "submit-problem").get_attribute("data-code") == "idempotency_key_reused"
    # the browser logs the refused request itself; nothing else
    assert [p for p in browser.problems(page) if "status of 409" not in p] == []
