"""The portal keeps following a case through what a busy or restarting server does:

- every `?wait=` answer comes back at once (an API whose waiting requests are all taken, here one
  that holds none): the page pauses between polls instead of asking in a loop;
- the API goes away for a while (a deploy): the page pauses and asks again instead of giving up.

Either way it still shows the result once the case ends."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from PIL import Image
from sqlalchemy import func, select

from core.db import session_scope
from core.models import AuditEvent, Case
from tests import processes, support
from tests.api import browser

By = pytest.importorskip("selenium.webdriver.common.by", reason="selenium is in the test extra (make install)").By

pytestmark = [pytest.mark.usefixtures("database", "worker"), pytest.mark.slow]


@pytest.fixture(scope="module")
def full_api(stack_env: dict[str, str], stack_dir: Path) -> Iterator[str]:
    env = {**stack_env, "DERMQ_API_PORT": str(support.free_port()), "DERMQ_LONG_POLL_MAX_WAITERS": "0"}
    with processes.api_process(env, stack_dir / "full-api.log") as (base, _):
        yield base


def reads_of(settings, case_id: str) -> int:  # type: ignore[no-untyped-def]
    with session_scope(settings) as session:
        return session.scalar(
            select(func.count())
            .select_from(AuditEvent)
            .where(AuditEvent.action == "case.read", AuditEvent.entity_id == case_id)
        )


def test_a_case_is_followed_to_its_result_with_pauses_when_polls_come_back_at_once(  # type: ignore[no-untyped-def]
    page, full_api: str, make_key, store_case, publisher, jpeg_bytes: bytes, settings
) -> None:
    clinic = make_key()
    case_id = str(store_case(clinic, jpeg_bytes))  # queued, and not sent to a worker yet
    section = browser.open_queued_case(page, full_api, clinic.token, case_id)
    browser.wait_until(page, lambda _: reads_of(settings, case_id) >= 3, what="a few early answers")
    before = reads_of(settings, case_id)
    time.sleep(3)  # paused 2 s, then 4 s: at most two more reads (asking in a loop makes dozens)
    assert reads_of(settings, case_id) - before <= 2

    support.publish_classify(publisher, case_id)
    browser.wait_until(page, lambda _: section.get_attribute("data-state") == "diagnosis", what="the live update")
    assert "finished" in page.find_element(By.ID, "case-status").text
    assert reads_of(settings, case_id) < 10
    assert browser.problems(page) == []


def test_a_case_is_followed_to_its_result_across_a_restart_of_the_api(  # type: ignore[no-untyped-def]
    page, stack_env: dict[str, str], stack_dir: Path, make_key, store_case, publisher, jpeg_bytes: bytes
) -> None:
    env = {**stack_env, "DERMQ_API_PORT": str(support.free_port())}
    clinic = make_key()
    case_id = str(store_case(clinic, jpeg_bytes))  # queued, and not sent to a worker yet
    with processes.api_process(env, stack_dir / "restarted-api.log") as (base, _):
        section = browser.open_queued_case(page, base, clinic.token, case_id)
    status = page.find_element(By.ID, "case-status")
    browser.wait_until(page, lambda _: "could not be reached" in status.text, what="the page noticing")
    with processes.api_process(env, stack_dir / "restarted-api.log"):
        support.publish_classify(publisher, case_id)
        browser.wait_until(page, lambda _: section.get_attribute("data-state") == "diagnosis", what="the result")
        assert "finished" in status.text


def test_a_result_is_shown_over_the_image_it_was_submitted_with_and_a_new_key_clears_the_page(  # type: ignore[no-untyped-def]
    page, stack_env: dict[str, str], stack_dir: Path, make_key, publisher, fixture_images, tmp_path, settings
) -> None:
    """A clinician chooses the next patient's image while a case is under way: the result of the case
    must be laid over the image it was submitted with (it was laid over whatever was chosen when it
    came). Its API process publishes where no worker listens, so the case waits until the test sends
    it on. Then a key pasted in place of this one clears what the last one showed and entered."""
    nowhere = "redis://127.0.0.1:6379/1"  # no worker consumes this Redis database
    env = {**stack_env, "DERMQ_API_PORT": str(support.free_port()), "DERMQ_REDIS_URL": nowhere}
    next_patient = tmp_path / "next.png"
    Image.new("RGB", (320, 200), (30, 140, 60)).save(next_patient)
    clinic, other = make_key(), make_key()
    try:
        with processes.api_process(env, stack_dir / "unconsumed-api.log") as (base, _):
            browser.open_page(page, f"{base}/portal/", clinic.token)
            submitted = fixture_images["ISIC_0024313"]
            page.find_element(By.ID, "image").send_keys(str(submitted))
            page.find_element(By.ID, "client-ref").send_keys("MRN-first")
            page.find_element(By.ID, "submit-button").click()
            case_id = browser.wait_until(page, lambda _: clinic_case(settings, clinic.clinic_id), what="the case")
            page.find_element(By.ID, "image").send_keys(str(next_patient))  # chosen while it is under way
            support.publish_classify(publisher, case_id)
            section = page.find_element(By.ID, "result")
            browser.wait_until(page, lambda _: section.get_attribute("data-state") == "diagnosis", what="the result")
            width = "return document.querySelector('#result .heatmap-original')?.naturalWidth ?? 0"
            assert browser.wait_until(page, lambda d: d.execute_script(width), what="the image under the heat map")
            # the submitted image's width, not the next patient's (320)
            assert page.execute_script(width) == Image.open(submitted).width != 320

            page.find_element(By.ID, "api-key").send_keys(other.token)
            page.find_element(By.CSS_SELECTOR, "#key-form button[type=submit]").click()
            browser.wait_until(page, lambda _: not section.is_displayed(), what="the result to go")
            assert page.find_element(By.ID, "client-ref").get_attribute("value") == ""
            assert page.find_element(By.ID, "image").get_attribute("value") == ""
            assert browser.problems(page) == []
    finally:
        redis.Redis.from_url(nowhere).flushdb()


def clinic_case(settings, clinic_id) -> object:  # type: ignore[no-untyped-def]
    """The id of the clinic's one case, once the intake has stored it (None until then)."""
    with session_scope(settings) as session:
        return session.scalar(select(Case.id).where(Case.clinic_id == clinic_id))
