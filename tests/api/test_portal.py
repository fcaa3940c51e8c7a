"""The clinic portal in a real headless Chromium, against the real stack (API process, Celery worker,
Postgres, Redis): a clinician submits a real image and sees the diagnosis and the heat map; an image that is
not a lesion says so; an API problem is shown in words; erasing asks first; nothing raises a console error
or a CSP violation, and the key never leaves the page's memory. Screenshots go to each test's
tmp_path."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from core.db import session_scope
from core.models import Case
from ml.labels import BY_CODE
from tests import support
from tests.api import browser

By = pytest.importorskip("selenium.webdriver.common.by", reason="selenium is in the test extra (make install)").By
Keys = pytest.importorskip("selenium.webdriver.common.keys").Keys
Select = pytest.importorskip("selenium.webdriver.support.select").Select
pytestmark = [pytest.mark.usefixtures("database", "worker"), pytest.mark.slow]


def api_case(base: str, token: str, case_id: str) -> dict[str, Any]:
    answer = httpx.get(f"{base}/v1/cases/{case_id}", headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def test_a_clinician_submits_an_image_and_sees_the_diagnosis_and_heat_map(  # type: ignore[no-untyped-def]
    page, live_api: str, make_key, fixture_images: dict[str, Path], settings, tmp_path: Path
) -> None:
    clinic = make_key()
    browser.open_page(page, f"{live_api}/portal/", clinic.token)
    assert clinic.token not in page.find_element(By.ID, "key-state").text  # only the prefix is shown
    assert page.find_element(By.ID, "api-key").get_attribute("value") == ""  # the field is emptied at once
    case_id = browser.submit_in_portal(page, fixture_images["ISIC_0024313"], client_ref="MRN-browser-1", urgent=True)

    stored = api_case(live_api, clinic.token, case_id)
    result = stored["result"]
    assert stored["status"] == "succeeded" and result["outcome"] == "diagnosis"
    assert stored["client_ref"] == "MRN-browser-1" and stored["priority"] == "urgent"
    section = page.find_element(By.ID, "result")
    assert section.get_attribute("data-state") == "diagnosis"
    assert page.find_element(By.ID, "diagnosis-name").text == BY_CODE[result["label"]].name
    assert "finished" in page.find_element(By.ID, "case-status").text
    facts = page.find_element(By.CSS_SELECTOR, "#result .facts").text
    assert case_id in facts and "MRN-browser-1" in facts and "urgent" in facts
    assert "[object" not in page.find_element(By.TAG_NAME, "body").text
    # the calibrated probabilities as bars, one per class, as the API gave them
    bars = {
        item.get_attribute("data-class"): float(item.find_element(By.TAG_NAME, "meter").get_attribute("value"))
        for item in page.find_elements(By.CSS_SELECTOR, "#result .probability")
    }
    assert bars == pytest.approx(result["probabilities"], abs=1e-9) and len(bars) == 7
    assert float(page.find_element(By.ID, "uncertainty").get_attribute("value")) == pytest.approx(result["uncertainty"])
    referral = page.find_element(By.ID, "referral")
    assert referral.get_attribute("data-referral") == str(result["referral"]).lower()
    shown_reasons = [li.get_attribute("data-reason") for li in referral.find_elements(By.TAG_NAME, "li")]
    assert shown_reasons == result["referral_reasons"]

    # the heat map, fetched with the key and shown through a blob: URL, over the submitted image
    browser.wait_until(page, lambda d: d.find_element(By.ID, "heatmap").get_attribute("data-loaded") == "true")
    heatmap = page.find_element(By.ID, "heatmap")
    assert heatmap.get_attribute("src").startswith("blob:")
    assert page.execute_script("return arguments[0].naturalWidth", heatmap) > 0
    assert page.find_element(By.CSS_SELECTOR, ".heatmap-original").get_attribute("src").startswith("blob:")
    slider = page.find_element(By.ID, "heatmap-opacity")
    slider.send_keys(Keys.HOME)  # by keyboard
    assert heatmap.value_of_css_property("opacity") == "0"
    slider.send_keys(Keys.END)
    assert heatmap.value_of_css_property("opacity") == "1"

    # the disclaimer and the model card stay in view; the case list shows the new case with its label
    disclaimer = page.find_element(By.ID, "disclaimer")
    assert disclaimer.is_displayed() and "Decision support, not a diagnosis." in disclaimer.text
    row = f"#case-rows tr[data-case-id='{case_id}']"
    browser.wait_until(page, lambda d: "finished" in d.find_element(By.CSS_SELECTOR, row).text)
    assert BY_CODE[result["label"]].name in page.find_element(By.CSS_SELECTOR, row).text
    assert "MRN-browser-1" in page.find_element(By.CSS_SELECTOR, row).text

    # the key lives in memory only; each submission carried an Idempotency-Key of its own
    assert page.execute_script("return localStorage.length + sessionStorage.length") == 0
    assert page.get_cookies() == [] and clinic.token not in page.page_source
    with session_scope(settings) as session:
        key = session.get(Case, stored["id"]).idempotency_key
    assert key and key.startswith("hmac-sha256:")  # stored as a keyed digest (core.idempotency)
    assert browser.problems(page) == []
    browser.screenshot(page, tmp_path / "portal-diagnosis.png")

    # the model cards behind the links (each opens in a tab of its own: followed here in this one)
    card_links = [page.find_element(By.ID, "model-card-link"), page.find_element(By.CSS_SELECTOR, "#result .model a")]
    targets = [link.get_attribute("href") for link in card_links]
    assert all(link.get_attribute("target") == "_blank" for link in card_links)
    assert targets == [f"{live_api}/model-card", f"{live_api}/model-card/{result['model']['id']}"]
    for target in targets:
        page.get(target)
        text = page.find_element(By.TAG_NAME, "body").text
        assert text.startswith(f"# Model card: {result['model']['id']}") and "not a diagnosis" in text


def test_an_image_that_is_not_a_lesion_says_so_at_phone_width(page, live_api: str, make_key, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    clinic = make_key()
    blank = tmp_path / "blank.jpg"
    buffer = io.BytesIO()
    Image.new("RGB", (400, 300), (128, 128, 128)).save(buffer, "JPEG")
    blank.write_bytes(buffer.getvalue())
    page.set_window_size(390, 844)  # a phone
    browser.open_page(page, f"{live_api}/portal/", clinic.token)
    case_id = browser.submit_in_portal(page, blank)

    assert api_case(live_api, clinic.token, case_id)["result"]["outcome"] == "out_of_distribution"
    assert page.find_element(By.ID, "result").get_attribute("data-state") == "out_of_distribution"
    assert page.find_element(By.ID, "ood-title").text == "Not a lesion: no answer"
    assert "no diagnosis was made" in page.find_element(By.ID, "ood").text
    assert not page.find_elements(By.ID, "diagnosis-name") and not page.find_elements(By.ID, "heatmap")
    row = f"#case-rows tr[data-case-id='{case_id}']"
    browser.wait_until(page, lambda d: "not a lesion" in d.find_element(By.CSS_SELECTOR, row).text)
    # nothing wider than the phone: no sideways scrolling of the page
    assert page.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
    assert page.find_element(By.ID, "disclaimer").is_displayed()
    assert browser.problems(page) == []
    browser.screenshot(page, tmp_path / "portal-not-a-lesion-phone.png")


def test_a_refused_upload_is_explained_in_words(page, live_api: str, make_key, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    clinic = make_key()
    text_file = tmp_path / "notes.jpg"
    text_file.write_text("not an image at all\n" * 20)
    browser.open_page(page, f"{live_api}/portal/", clinic.token)
    page.find_element(By.ID, "image").send_keys(str(text_file))
    page.find_element(By.ID, "submit-button").click()
    browser.wait_until(page, lambda d: d.find_element(By.ID, "submit-problem").is_displayed())
    problem = page.find_element(By.ID, "submit-problem")
    assert problem.get_attribute("role") == "alert"
    assert problem.get_attribute("data-code") == "unsupported_format"
    assert "(HTTP 415)" in problem.text and "code unsupported_format" in problem.text and "request id" in problem.text
    assert page.find_element(By.ID, "case-status").text == "Not submitted."
    # the browser logs the refused request itself; nothing else
    assert [p for p in browser.problems(page) if "status of 415" not in p] == []


def _open_with_a_finished_case(page, live_api: str, clinic, jpeg_bytes: bytes) -> str:  # type: ignore[no-untyped-def]
    """The portal, with ``clinic``'s key, once a case of its own has succeeded; that case's id."""
    answer = httpx.post(
        f"{live_api}/v1/cases?wait=20",
        headers={"Authorization": f"Bearer {clinic.token}"},
        files={"image": ("image.jpg", jpeg_bytes, "image/jpeg")},
        timeout=30,
    )
    case_id = answer.json()["id"]
    browser.wait_until(page, lambda _: api_case(live_api, clinic.token, case_id)["status"] == "succeeded")
    browser.open_page(page, f"{live_api}/portal/", clinic.token)
    return str(case_id)


def test_erasing_a_case_asks_first_and_then_erases_it(page, live_api: str, make_key, jpeg_bytes: bytes) -> None:  # type: ignore[no-untyped-def]
    clinic = make_key()
    case_id = _open_with_a_finished_case(page, live_api, clinic, jpeg_bytes)
    row = f"#case-rows tr[data-case-id='{case_id}']"
    erase = browser.wait_until(page, lambda d: d.find_element(By.CSS_SELECTOR, f"{row} button.danger"))
    dialog = page.find_element(By.ID, "erase-dialog")

    erase.click()
    assert dialog.get_attribute("open") is not None and case_id in dialog.text
    assert "result" in dialog.text and "cannot be recovered" in dialog.text  # what is lost, said before
    assert page.switch_to.active_element == page.find_element(By.ID, "erase-cancel")  # the safe choice
    page.switch_to.active_element.send_keys(Keys.ESCAPE)  # changed my mind
    browser.wait_until(page, lambda _: dialog.get_attribute("open") is None)
    erase.click()
    page.find_element(By.ID, "erase-cancel").click()  # and again
    browser.wait_until(page, lambda _: dialog.get_attribute("open") is None)
    browser.wait_until(page, lambda d: d.switch_to.active_element == erase, what="the focus back on the button")
    assert api_case(live_api, clinic.token, case_id)["status"] == "succeeded"

    page.find_element(By.CSS_SELECTOR, f"{row} button.danger").click()
    page.find_element(By.ID, "erase-confirm").click()
    browser.wait_until(page, lambda d: d.find_element(By.CSS_SELECTOR, row).get_attribute("data-status") == "purged")
    assert api_case(live_api, clinic.token, case_id)["status"] == "purged"
    assert "patient data erased" in page.find_element(By.ID, "case-status").text
    assert not page.find_elements(By.CSS_SELECTOR, f"{row} button.danger")  # nothing left to erase
    assert page.switch_to.active_element == page.find_element(By.ID, "cases-heading")  # not lost to the page's top
    assert browser.problems(page) == []


def test_an_erase_answered_after_the_key_was_forgotten_tells_the_next_user_nothing(  # type: ignore[no-untyped-def]
    page, live_api: str, make_key, jpeg_bytes: bytes
) -> None:
    """The erase's answer came after the key was forgotten (the clinician walked away, the next one
    sits down), and the page announced "Case ...: patient data erased." and reloaded the list for
    whoever came next, as no other answer of a forgotten key does."""
    clinic = make_key()
    case_id = _open_with_a_finished_case(page, live_api, clinic, jpeg_bytes)
    row = f"#case-rows tr[data-case-id='{case_id}']"
    browser.wait_until(page, lambda d: d.find_element(By.CSS_SELECTOR, f"{row} button.danger")).click()
    page.execute_cdp_cmd("Network.enable", {})
    slow = {"offline": False, "latency": 1500, "downloadThroughput": -1, "uploadThroughput": -1}
    page.execute_cdp_cmd("Network.emulateNetworkConditions", slow)
    try:
        page.execute_script("performance.clearResourceTimings()")
        page.find_element(By.ID, "erase-confirm").click()
        page.find_element(By.ID, "forget-key").click()  # while the erase is on its way
        answered = (
            "return performance.getEntriesByType('resource')"
            f".some(e => e.name.endsWith('/v1/cases/{case_id}') && e.responseEnd > 0)"
        )
        browser.wait_until(page, lambda d: d.execute_script(answered), what="the erase's answer")
    finally:
        page.execute_cdp_cmd("Network.emulateNetworkConditions", {**slow, "latency": 0})
    assert api_case(live_api, clinic.token, case_id)["status"] == "purged"  # it was erased
    assert "erased" not in page.find_element(By.ID, "case-status").text
    assert not page.find_elements(By.CSS_SELECTOR, "#case-rows tr")  # no list of the last key's cases
    assert browser.problems(page) == []


def test_an_open_case_follows_its_status_live_until_it_ends(  # type: ignore[no-untyped-def]
    page, live_api: str, make_key, store_case, publisher, jpeg_bytes: bytes
) -> None:
    clinic = make_key()
    case_id = str(store_case(clinic, jpeg_bytes))  # queued, and not sent to a worker yet
    section = browser.open_queued_case(page, live_api, clinic.token, case_id)
    assert "queued" in page.find_element(By.ID, "case-status").text

    support.publish_classify(publisher, case_id)  # the page is long-polling meanwhile: nobody clicks
    browser.wait_until(page, lambda _: section.get_attribute("data-state") == "diagnosis", what="the live update")
    browser.wait_until(page, lambda d: d.find_element(By.ID, "heatmap").get_attribute("data-loaded") == "true")
    assert "finished" in page.find_element(By.ID, "case-status").text
    assert not page.find_elements(By.CSS_SELECTOR, ".heatmap-original")  # the API never sends the image back
    assert browser.problems(page) == []


def test_the_case_list_pages_through_older_and_newer_cases(
    page, live_api: str, make_key, store_case, jpeg_bytes
) -> None:  # type: ignore[no-untyped-def]
    clinic = make_key()
    ids = [str(store_case(clinic, jpeg_bytes)) for _ in range(12)]  # queued: a page holds 10
    browser.open_page(page, f"{live_api}/portal/", clinic.token)

    def shown() -> list[str]:
        script = "return Array.from(document.querySelectorAll('#case-rows tr'), (row) => row.dataset.caseId)"
        return list(page.execute_script(script))  # at once: rows are replaced as a page loads

    browser.wait_until(page, lambda _: len(shown()) == 10, what="the first page")
    first = shown()
    assert first == ids[::-1][:10]  # newest first
    assert page.find_element(By.ID, "cases-newer").get_attribute("disabled") is not None
    page.execute_script("const older = document.getElementById('cases-older'); older.click(); older.click();")
    browser.wait_until(page, lambda _: shown() == ids[::-1][10:], what="the second page")
    assert page.find_element(By.ID, "cases-older").get_attribute("disabled") is not None
    assert page.find_element(By.ID, "cases-page").text == "Page 2"  # a double click steps one page
    page.find_element(By.ID, "cases-newer").click()
    browser.wait_until(page, lambda _: shown() == first, what="the first page again")
    newest = str(store_case(clinic, jpeg_bytes))  # submitted elsewhere meanwhile: Refresh shows it
    page.find_element(By.ID, "cases-refresh").click()
    browser.wait_until(page, lambda _: shown()[:1] == [newest], what="the refreshed list")
    Select(page.find_element(By.ID, "case-filter")).select_by_value("succeeded")
    browser.wait_until(page, lambda d: d.find_element(By.ID, "cases-status").text == "No cases to show.")
    assert browser.problems(page) == []


def test_a_key_refused_at_submission_says_the_case_may_be_stored_and_no_secret_is_shown(  # type: ignore[no-untyped-def]
    page, live_api: str, make_key, tmp_path: Path, jpeg_bytes: bytes
) -> None:
    """A key revoked while its `POST ?wait=` waited is refused after its case was stored: "Not
    submitted." sent the clinician to submit it again, a second case. And a key pasted without its
    `dq_` showed the part of its secret before the next `_` as its "prefix"."""
    clinic, admin = make_key(), make_key("admin")
    secret = clinic.token.split("_", 2)[2]
    browser.open_page(page, f"{live_api}/portal/", clinic.token.removeprefix("dq_"))
    assert "Using key a key" in page.find_element(By.ID, "key-state").text
    browser.open_page(page, f"{live_api}/portal/", clinic.token)
    assert page.find_element(By.ID, "key-state").text.startswith(f"Using key {clinic.token[:15]} ")
    assert secret[:10] not in page.find_element(By.TAG_NAME, "body").text
    revoked = httpx.post(f"{live_api}/v1/admin/keys/{clinic.key_id}/revoke", headers=admin.headers, timeout=10)
    assert revoked.status_code == 200
    image = tmp_path / "lesion.jpg"
    image.write_bytes(jpeg_bytes)
    page.find_element(By.ID, "image").send_keys(str(image))
    page.find_element(By.ID, "submit-button").click()
    browser.wait_until(page, lambda d: d.find_element(By.ID, "submit-problem").is_displayed())
    status = page.find_element(By.ID, "case-status").text
    assert "may have been stored" in status and "check the case list" in status and status != "Not submitted."


def test_a_key_pasted_with_an_invisible_character_is_refused_as_such(page, live_api: str, make_key) -> None:  # type: ignore[no-untyped-def]
    """A key copied from a message with a zero-width space in it: the browser refused the header before
    any request left, and the page said the API could not be reached ("submitting again is safe")."""
    clinic = make_key()
    browser.open_page(page, f"{live_api}/portal/", clinic.token)
    page.find_element(By.ID, "api-key").send_keys(clinic.token[:20] + "\u200b" + clinic.token[20:])
    page.find_element(By.CSS_SELECTOR, "#key-form button[type=submit]").click()
    state = page.find_element(By.ID, "key-state")
    browser.wait_until(page, lambda _: "never has" in state.text)
    assert f"Still using key {clinic.token[:15]}" in state.text and state.get_attribute("data-state") == "set"
    assert clinic.token[16:] not in page.find_element(By.TAG_NAME, "body").text
    assert browser.problems(page) == []
