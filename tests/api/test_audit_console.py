"""The auditor console in a real headless Chromium, against the real stack: an image uploaded through the
portal is found in the audit trail by its case, its clinic and its action; the log's verification and latest
signed checkpoint are shown; CSV and NDJSON exports download and hold the event; no console error or CSP
violation."""

from __future__ import annotations

import csv
import json
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from tests.api import browser
from tests.support import seal_all, wait_for
from worker.sealing import check

By = pytest.importorskip("selenium.webdriver.common.by", reason="selenium is in the test extra (make install)").By
Select = pytest.importorskip("selenium.webdriver.support.select").Select
pytestmark = [pytest.mark.usefixtures("database", "worker"), pytest.mark.slow]


def set_time(page, field: str, moment: datetime) -> None:  # type: ignore[no-untyped-def]
    """Fill a datetime-local field (its typing order depends on the locale; the value's form does not). The
    browser runs in this machine's time zone, as this process does."""
    value = moment.astimezone().strftime("%Y-%m-%dT%H:%M:%S")
    page.execute_script("arguments[0].value = arguments[1]", page.find_element(By.ID, field), value)


def downloaded(folder: Path, name: str) -> Path:
    path = folder / name
    wait_for(lambda: path.is_file() and not (folder / f"{name}.crdownload").exists(), timeout=30, what=name)
    return path


def test_the_auditor_finds_the_upload_and_exports_it(  # type: ignore[no-untyped-def]
    page, browser_files: Path, live_api: str, make_key, fixture_images: dict[str, Path], settings, tmp_path: Path
) -> None:
    from core.checkpoint import load_signing_keys

    clinic, auditor = make_key(), make_key("auditor")
    started = datetime.now().astimezone() - timedelta(minutes=1)
    browser.open_page(page, f"{live_api}/portal/", clinic.token)
    case_id = browser.submit_in_portal(page, fixture_images["ISIC_0024311"])
    seal_all(settings)
    assert check(settings, load_signing_keys(settings)).ok  # what the periodic dermq.audit_check does

    browser.open_page(page, f"{live_api}/audit/", auditor.token)
    verify = page.find_element(By.ID, "verify-status")
    browser.wait_until(page, lambda _: verify.get_attribute("data-ok") == "true", what="the verification")
    assert verify.text.startswith("Verified")
    checkpoint = page.find_element(By.ID, "checkpoint-status")
    browser.wait_until(page, lambda _: checkpoint.get_attribute("data-size"), what="the checkpoint")
    assert int(checkpoint.get_attribute("data-size")) > 0
    assert page.find_element(By.ID, "checkpoint-note").text.startswith("dermq.local/audit")

    # search by the upload's case, its clinic (by name) and its action, within a time range
    page.find_element(By.ID, "case").send_keys(case_id)
    page.find_element(By.ID, "clinic").send_keys(clinic.name)
    Select(page.find_element(By.ID, "action")).select_by_value("case.create")
    Select(page.find_element(By.ID, "outcome")).select_by_value("success")
    set_time(page, "since", started)
    set_time(page, "until", datetime.now() + timedelta(minutes=5))
    page.find_element(By.ID, "search-button").click()
    browser.wait_until(page, lambda d: d.find_element(By.ID, "search-status").get_attribute("data-state") == "loaded")
    rows = page.find_elements(By.CSS_SELECTOR, "#event-rows tr")
    assert [(r.get_attribute("data-action"), r.get_attribute("data-entity-id")) for r in rows] == [
        ("case.create", case_id)
    ]
    assert str(clinic.clinic_id) in rows[0].text and "success" in rows[0].text
    browser.screenshot(page, tmp_path / "audit-console.png")

    # the same filters exported: the browser saves the files (fetched with the key, through blob: URLs)
    downloads = browser.clean_downloads(browser_files / "downloads")
    status = page.find_element(By.ID, "export-status")
    page.find_element(By.ID, "export-csv").click()
    browser.wait_until(page, lambda _: status.get_attribute("data-format") == "csv", what="the CSV export")
    assert status.get_attribute("data-records") == "1" and "dermq-audit.csv" in status.text
    with downloaded(downloads, "dermq-audit.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert [(r["action"], r["entity_id"], r["clinic_id"]) for r in table] == [
        ("case.create", case_id, str(clinic.clinic_id))
    ]
    page.find_element(By.ID, "export-ndjson").click()
    browser.wait_until(page, lambda _: status.get_attribute("data-format") == "ndjson", what="the NDJSON export")
    lines = downloaded(downloads, "dermq-audit.ndjson").read_text().splitlines()
    assert [(e["action"], e["entity_id"]) for e in map(json.loads, lines)] == [("case.create", case_id)]
    assert browser.problems(page) == []

    # forgetting the key takes what it found and exported off the page: no link saves it again
    page.find_element(By.ID, "forget-key").click()
    browser.wait_until(page, lambda d: not d.find_elements(By.CSS_SELECTOR, ".export-link"), what="the link to go")
    assert page.find_elements(By.CSS_SELECTOR, "#event-rows tr") == [] and status.get_attribute("data-records") is None


def test_an_export_without_a_time_range_is_explained(page, live_api: str, make_key, settings) -> None:  # type: ignore[no-untyped-def]
    auditor = make_key("auditor")
    seal_all(settings)  # a checkpoint to show, whatever ran before
    browser.open_page(page, f"{live_api}/audit/", auditor.token)
    page.find_element(By.ID, "export-csv").click()
    problem = page.find_element(By.ID, "export-problem")
    browser.wait_until(page, lambda _: problem.is_displayed(), what="the problem")
    assert problem.get_attribute("data-code") == "invalid_time_range"
    assert "needs 'since' and 'until'" in problem.text and "(HTTP 400)" in problem.text
    assert [p for p in browser.problems(page) if "status of 400" not in p] == []
