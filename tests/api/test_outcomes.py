"""Confirmed outcomes: reported over the real API (one per case, corrections replace and are audited)
and scored by ``dermq monitor report`` (run as a real process) against the model's labels."""

from __future__ import annotations

import json
import uuid

import pytest
from sqlalchemy import delete, select

from core import outcomes, retention
from core.crypto import decrypt_blob
from core.db import session_scope
from core.models import AuditEvent, Case, CaseBlob, CaseStatus, Result
from core.outcome_models import ConfirmedOutcome, OutcomeMonthlyTally, OutcomeTally
from tests.api.test_cases import submit, wait_done
from tests.cli.test_commands import run
from tests.conftest import Tenant

pytestmark = pytest.mark.usefixtures("database")


def post(client, tenant: Tenant, case_id, **body: str):  # type: ignore[no-untyped-def]
    return client.post(f"/v1/cases/{case_id}/outcome", headers=tenant.headers, json=body)


def outcome_events(settings, case_id) -> list[AuditEvent]:  # type: ignore[no-untyped-def]
    with session_scope(settings) as session:
        return list(
            session.scalars(
                select(AuditEvent)
                .where(AuditEvent.entity_id == str(case_id), AuditEvent.action == "case.outcome")
                .order_by(AuditEvent.id)
            )
        )


def sealed_diagnoses(session, keyring, case_id: uuid.UUID) -> list[str]:  # type: ignore[no-untyped-def]
    blobs = session.scalars(select(CaseBlob).where(CaseBlob.case_id == case_id, CaseBlob.kind == "outcome")).all()
    return [decrypt_blob(keyring, b.sealed, case_id=case_id, kind="outcome").decode() for b in blobs]


def test_an_outcome_is_recorded_then_corrected_and_both_are_audited(  # type: ignore[no-untyped-def]
    client, worker, tenant: Tenant, fixture_images, settings, keyring
) -> None:
    response = submit(client, tenant, fixture_images["ISIC_0024313"].read_bytes())
    case_id = response.json()["id"]
    assert wait_done(client, tenant, case_id)["status"] == "succeeded"

    first = post(client, tenant, case_id, diagnosis="nv", method="follow_up")
    assert first.status_code == 201, first.text
    assert first.json() | {"created_at": None, "updated_at": None} == {
        "case_id": case_id,
        "diagnosis": "nv",
        "method": "follow_up",
        "revision": 1,
        "created_at": None,
        "updated_at": None,
    }
    second = post(client, tenant, case_id, diagnosis="mel", method="histo")
    assert second.status_code == 200, second.text
    assert (second.json()["diagnosis"], second.json()["method"], second.json()["revision"]) == ("mel", "histo", 2)
    # the same report again (a retry whose answer was lost) makes no third revision
    again = post(client, tenant, case_id, diagnosis="mel", method="histo")
    assert again.status_code == 200 and again.json() == second.json(), again.text

    with session_scope(settings) as session:
        rows = session.scalars(select(ConfirmedOutcome).where(ConfirmedOutcome.case_id == uuid.UUID(case_id))).all()
        assert [(r.diagnosis, r.method, r.revision, r.reported_by) for r in rows] == [
            (None, "histo", 2, tenant.key_id)  # the diagnosis is about the patient: sealed, never a plain column
        ]
        assert sealed_diagnoses(session, keyring, uuid.UUID(case_id)) == ["mel"]  # the correction replaced it
    events = outcome_events(settings, case_id)
    assert [(e.outcome, e.detail, e.actor_key_id) for e in events] == [
        ("success", {"method": "follow_up", "revision": 1, "correction": False}, tenant.key_id),
        ("success", {"method": "histo", "revision": 2, "correction": True}, tenant.key_id),
        ("success", {"method": "histo", "revision": 2, "unchanged": True}, tenant.key_id),
    ]
    assert all("mel" not in json.dumps(e.detail) and "nv" not in json.dumps(e.detail) for e in events)


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"diagnosis": "melanoma", "method": "histo"}, "unknown_diagnosis"),
        ({"diagnosis": "mel", "method": "biopsy"}, "unknown_method"),
        # over a length the schema once capped: answered a plain 422, with no audit event
        ({"diagnosis": "melanoma in situ, Clark level II", "method": "histo"}, "unknown_diagnosis"),
        ({"diagnosis": "mel", "method": "excision biopsy, histopathology"}, "unknown_method"),
    ],
    ids=["diagnosis", "method", "long_diagnosis", "long_method"],
)
def test_unknown_codes_are_422(client, tenant: Tenant, store_case, settings, body, code) -> None:  # type: ignore[no-untyped-def]
    case_id = store_case(tenant, b"x")
    with session_scope(settings) as session:
        session.get(Case, case_id).status = CaseStatus.SUCCEEDED.value
    response = post(client, tenant, case_id, **body)
    assert response.status_code == 422, response.text
    assert response.json()["code"] == code
    assert body["diagnosis"] not in response.text  # a confirmed diagnosis in free text is the patient's
    assert response.headers["content-type"].startswith("application/problem+json")
    events = outcome_events(settings, case_id)
    assert [(e.outcome, e.detail, e.actor_key_id) for e in events] == [("failure", {"reason": code}, tenant.key_id)]
    with session_scope(settings) as session:  # what was sent is nowhere in the trail
        rows = session.execute(select(AuditEvent.__table__).where(AuditEvent.entity_id == str(case_id))).all()
    assert rows and body["diagnosis"] not in json.dumps([list(r) for r in rows], default=str)


def test_a_malformed_body_is_422(client, tenant: Tenant, store_case) -> None:  # type: ignore[no-untyped-def]
    case_id = store_case(tenant, b"x")
    for body in ({"diagnosis": "mel"}, {"diagnosis": "mel", "method": "histo", "note": "extra"}):
        response = client.post(f"/v1/cases/{case_id}/outcome", headers=tenant.headers, json=body)
        assert response.status_code == 422, response.text


def test_an_unfinished_case_is_409_and_another_clinics_is_404(  # type: ignore[no-untyped-def]
    client, tenant: Tenant, make_key, store_case, settings
) -> None:
    case_id = store_case(tenant, b"still queued")
    response = post(client, tenant, case_id, diagnosis="mel", method="histo")
    assert response.status_code == 409 and response.json()["code"] == "case_not_finished"
    assert [(e.outcome, e.detail) for e in outcome_events(settings, case_id)] == [
        ("failure", {"reason": "not_finished"})
    ]
    other = make_key("clinic")
    assert post(client, other, case_id, diagnosis="mel", method="histo").status_code == 404
    with session_scope(settings) as session:
        assert session.get(ConfirmedOutcome, case_id) is None


def test_wilson_interval_matches_the_formula() -> None:
    # 8 of 10: p=0.8, z=1.96 -> (0.4902, 0.9433) (Wilson 1927; e.g. Newcombe 1998, method 3)
    low, high = outcomes.wilson(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)
    assert outcomes.wilson(0, 0) is None
    assert outcomes.wilson(0, 5)[0] == 0.0 and outcomes.wilson(5, 5)[1] == 1.0


def test_the_recent_window_counts_whole_months_back_across_a_new_year() -> None:
    from datetime import date

    assert outcomes.window_start(6, date(2026, 2, 15)) == date(2025, 9, 1)  # Sep..Feb: six months
    assert outcomes.window_start(12, date(2026, 12, 31)) == date(2026, 1, 1)
    assert outcomes.window_start(1, date(2026, 1, 1)) == date(2026, 1, 1)  # this month alone


def test_monitor_report_scores_confirmed_cases(  # type: ignore[no-untyped-def]
    client, tenant: Tenant, store_case, settings
) -> None:
    model = f"field-test-{uuid.uuid4().hex[:8]}"
    # (model's label, referral, confirmed truth); None: out of distribution
    cases = [
        ("mel", True, "mel"),  # mel found, referred
        ("nv", False, "mel"),  # mel missed, not referred
        ("nv", True, "mel"),  # mel missed, but referred
        ("mel", True, "nv"),  # false mel
        ("nv", False, "nv"),
        ("bcc", True, "bcc"),
        (None, None, "mel"),  # out of distribution: no answer, so a missed melanoma, not referred
    ]
    for label, referral, truth in cases:
        case_id = answered_case(settings, tenant, store_case, model, label, referral)
        response = post(client, tenant, case_id, diagnosis=truth, method="histo")
        assert response.status_code == 201, response.text

    done = run(settings, "monitor", "report", "--model", model, "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["alerts"] == []  # a model with no card: no floor, no alert
    figures = json.loads(done.stdout)["models"][model]
    assert (figures["confirmed"], figures["out_of_distribution"]) == (7, 1)
    mel = figures["classes"]["mel"]
    # by hand: 4 melanomas, 1 labelled mel (one the gate turned away: missed) -> sensitivity 1/4; 2 labelled
    # mel, 1 right -> PPV 1/2
    assert (mel["sensitivity"]["successes"], mel["sensitivity"]["trials"]) == (1, 4)
    assert mel["sensitivity"]["value"] == pytest.approx(1 / 4)
    assert mel["sensitivity"]["ci95"] == pytest.approx(list(outcomes.wilson(1, 4)))
    assert mel["out_of_distribution"] == 1  # of the three misses, the gate's: an image the model never judged
    assert (mel["ppv"]["successes"], mel["ppv"]["trials"]) == (1, 2)
    nv = figures["classes"]["nv"]
    assert (nv["sensitivity"]["successes"], nv["sensitivity"]["trials"]) == (1, 2)  # one nv called mel
    assert (nv["ppv"]["successes"], nv["ppv"]["trials"]) == (1, 3)  # two mel called nv
    assert figures["classes"]["df"]["sensitivity"] == {"value": None, "successes": 0, "trials": 0, "ci95": None}
    # referral: concerning truths = 4 mel + 1 bcc; referred: mel#1, mel#3, bcc (the gated one was not) -> 3/5
    referral = figures["referral_sensitivity"]
    assert (referral["successes"], referral["trials"]) == (3, 5)

    text = run(settings, "monitor", "report", "--model", model)
    assert text.returncode == 0, text.stderr
    assert f"{model}: 7 confirmed cases (1 out of distribution: no diagnosis, counted as missed)" in text.stdout
    assert "0.250" in text.stdout and "(3/5)" in text.stdout
    assert "floor: none in the model card (not checked" in text.stdout  # no model card: nothing alerted on
    mistyped = run(settings, "monitor", "report", "--model", model + "-typo")
    assert mistyped.returncode == 2 and "nothing was checked" in mistyped.stderr, mistyped.stdout

    # melanoma sensitivity 1/4 [0.046, 0.699] on 4 confirmed melanomas: an alert (exit 1) only when the
    # whole interval is below the floor, and only with enough confirmed melanomas
    alerted = run(settings, "monitor", "report", "--model", model, "--mel-floor", "0.8", "--min-melanomas", "3")
    assert alerted.returncode == 1, alerted.stdout + alerted.stderr
    assert (
        f"ALERT {model}: melanoma sensitivity 0.250 [0.046, 0.699] on 4 confirmed melanomas: "
        "the whole 95% interval is below 0.800" in alerted.stdout
    )
    quiet = run(settings, "monitor", "report", "--model", model, "--mel-floor", "0.4", "--min-melanomas", "3")
    assert quiet.returncode == 0, quiet.stdout  # 1/4 is below 0.4, but well within noise of it
    too_few = run(settings, "monitor", "report", "--model", model, "--mel-floor", "0.8", "--json")
    assert too_few.returncode == 0 and json.loads(too_few.stdout)["alerts"] == []  # 4 < MIN_CONFIRMED_MELANOMAS


def test_erasure_removes_the_confirmed_diagnosis_and_the_report_still_counts_it(  # type: ignore[no-untyped-def]
    client, tenant: Tenant, store_case, settings
) -> None:
    model = f"field-test-{uuid.uuid4().hex[:8]}"
    case_id = answered_case(settings, tenant, store_case, model, "mel", True)
    assert post(client, tenant, case_id, diagnosis="nv", method="histo").status_code == 201
    assert post(client, tenant, case_id, diagnosis="mel", method="histo").status_code == 200  # moves its count

    def mel() -> dict:
        done = run(settings, "monitor", "report", "--model", model, "--json")
        assert done.returncode == 0, done.stderr
        figures = json.loads(done.stdout)["models"][model]
        assert figures["confirmed"] == 1
        return figures["classes"]["mel"]["sensitivity"]

    assert mel()["successes"] == 1
    assert client.delete(f"/v1/cases/{case_id}", headers=tenant.headers).status_code == 200
    with session_scope(settings) as session:
        assert session.get(ConfirmedOutcome, case_id) is None  # a diagnosis of the case: erased with it
    assert mel()["successes"] == 1  # the case-free tally kept the count
    again = post(client, tenant, case_id, diagnosis="mel", method="histo")
    assert again.status_code == 410 and again.json()["code"] == "case_purged"


def test_the_floor_is_the_model_cards_lower_bound(settings, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from ml.registry import mel_sensitivity_floor

    # ml/registry/effnet-lite0-ham10000-v3/model_card.md: melanoma sensitivity 0.676 (0.589-0.765)
    assert mel_sensitivity_floor("effnet-lite0-ham10000-v3") == pytest.approx(0.5890, abs=1e-4)
    assert mel_sensitivity_floor("no-such-model") is None and mel_sensitivity_floor("../etc") is None
    # the served entry (DERMQ_MODEL, a folder) is looked up by its manifest's model id
    assert mel_sensitivity_floor("effnet-lite0-ham10000-v3", configured=tmp_path) == pytest.approx(0.5890, abs=1e-4)
    assert mel_sensitivity_floor("effnet-lite0-ham10000-v3", configured=settings.model) == pytest.approx(
        0.5890, abs=1e-4
    )


def answered_case(
    settings, tenant: Tenant, store_case, model: str, label: str | None, referral: bool | None
) -> uuid.UUID:  # type: ignore[no-untyped-def]
    """A case of ``tenant``'s that ``model`` answered ``label`` (``referral``): succeeded, with its result."""
    case_id = store_case(tenant, uuid.uuid4().bytes)
    with session_scope(settings) as session:
        session.add(result_row(case_id, model, label, referral))
        session.get(Case, case_id).status = CaseStatus.SUCCEEDED.value
    return case_id  # type: ignore[no-any-return]


def result_row(case_id: uuid.UUID, model: str, label: str | None, referral: bool | None) -> Result:
    common = {"case_id": case_id, "model_id": model, "weights_sha256": "0" * 64, "device": "cpu", "timings": {}}
    if label is None:
        return Result(outcome="out_of_distribution", ood_reasons=["blank"], gradcam_status="not_applicable", **common)
    return Result(
        label=label,
        probabilities={label: 0.9},
        confidence=0.9,
        uncertainty=0.1,
        referral=referral,
        referral_reasons=[],
        gradcam_status="ok",
        **common,
    )


def test_a_diagnosis_stored_in_plain_text_is_sealed_by_the_sweep_and_still_corrects(  # type: ignore[no-untyped-def]
    client, tenant: Tenant, store_case, settings, keyring
) -> None:
    """A report from before migration 0010 kept its diagnosis in a plain column: the sweeper seals it,
    and a later correction still moves its count in the tally."""
    model = f"field-test-{uuid.uuid4().hex[:8]}"
    case_id = answered_case(settings, tenant, store_case, model, "mel", True)
    assert post(client, tenant, case_id, diagnosis="nv", method="histo").status_code == 201
    with session_scope(settings) as session:  # as a report stored before sealing would be
        session.execute(delete(CaseBlob).where(CaseBlob.case_id == case_id, CaseBlob.kind == "outcome"))
        session.get(ConfirmedOutcome, case_id).diagnosis = "nv"
    with session_scope(settings) as session:
        while outcomes.seal_plain_diagnoses(session, keyring):
            pass
    with session_scope(settings) as session:
        assert session.get(ConfirmedOutcome, case_id).diagnosis is None
        assert sealed_diagnoses(session, keyring, case_id) == ["nv"]
    assert post(client, tenant, case_id, diagnosis="mel", method="histo").status_code == 200
    done = run(settings, "monitor", "report", "--model", model, "--json")
    figures = json.loads(done.stdout)["models"][model]
    assert figures["confirmed"] == 1 and figures["classes"]["mel"]["sensitivity"]["successes"] == 1
    assert figures["classes"]["nv"]["sensitivity"]["trials"] == 0  # the count moved with the correction


def test_a_correction_takes_the_count_back_from_the_cells_that_counted_it(  # type: ignore[no-untyped-def]
    client, tenant: Tenant, store_case, settings
) -> None:
    """A report counts over all time and in the month its case was submitted; a correction of a report
    counted before the monthly tally (migration 0020), or by the release before it, takes its count
    back from the lifetime tally alone: no monthly cell goes negative and none keeps a count twice.
    `dermq monitor report --months` reads the monthly counts, and retention drops the months before
    the recent window."""
    model = f"field-test-{uuid.uuid4().hex[:8]}"
    case_id = store_case(tenant, uuid.uuid4().bytes)
    with session_scope(settings) as session:
        session.add(result_row(case_id, model, "mel", True))
        case = session.get(Case, case_id)
        case.status = CaseStatus.SUCCEEDED.value
        month = outcomes.month_of(case.created_at)
    assert post(client, tenant, case_id, diagnosis="nv", method="histo").status_code == 201

    def cells() -> tuple[set[tuple[str, int]], set[tuple[str, object, int]]]:
        with session_scope(settings) as session:
            lifetime = session.scalars(select(OutcomeTally).where(OutcomeTally.model_id == model))
            monthly = session.scalars(select(OutcomeMonthlyTally).where(OutcomeMonthlyTally.model_id == model))
            return {(r.truth, r.count) for r in lifetime}, {(r.truth, r.month, r.count) for r in monthly}

    assert cells() == ({("nv", 1)}, {("nv", month, 1)})
    with session_scope(settings) as session:  # as if the release before 0020 had counted it
        session.execute(delete(OutcomeMonthlyTally).where(OutcomeMonthlyTally.model_id == model))
        session.get(ConfirmedOutcome, case_id).tally_month = None
    undated = run(settings, "monitor", "report", "--model", model, "--months", "1")
    assert undated.returncode == 2 and "no confirmed outcomes of cases submitted since" in undated.stderr

    assert post(client, tenant, case_id, diagnosis="mel", method="histo").status_code == 200
    assert cells() == ({("nv", 0), ("mel", 1)}, {("mel", month, 1)})
    with session_scope(settings) as session:
        assert session.get(ConfirmedOutcome, case_id).tally_month == month
    recent = run(settings, "monitor", "report", "--model", model, "--months", "1", "--json")
    assert recent.returncode == 0, recent.stderr
    assert json.loads(recent.stdout)["since"] == month.isoformat()
    assert json.loads(recent.stdout)["models"][model]["classes"]["mel"]["sensitivity"]["successes"] == 1

    # retention keeps the window's months only; the lifetime tally keeps every count
    before = outcomes.window_start(settings.field_window_months + 1, month)
    with session_scope(settings) as session:
        session.add(
            OutcomeMonthlyTally(model_id=model, month=before, predicted="nv", referral=False, truth="nv", count=4)
        )
    with session_scope(settings) as session:
        assert retention.prune_field_months(session, settings) >= 1
    assert cells() == ({("nv", 0), ("mel", 1)}, {("mel", month, 1)})


def test_monitor_report_refuses_months_the_monthly_tally_no_longer_keeps(  # type: ignore[no-untyped-def]
    client, tenant: Tenant, store_case, settings
) -> None:
    """The purge keeps the monthly tally's last DERMQ_FIELD_WINDOW_MONTHS months only: ``--months``
    beyond them printed the window's figures under a longer window's name ("since" a year ago, six of
    its months counted), and its exit status said all was well on cases it never read."""
    model = f"field-test-{uuid.uuid4().hex[:8]}"
    case_id = answered_case(settings, tenant, store_case, model, "nv", False)
    assert post(client, tenant, case_id, diagnosis="mel", method="histo").status_code == 201
    with session_scope(settings) as session:  # melanomas of cases submitted before the window, once counted
        dropped = outcomes.window_start(settings.field_window_months + 2)
        cell = {"model_id": model, "predicted": "nv", "referral": False, "truth": "mel"}
        session.add(OutcomeMonthlyTally(**cell, month=dropped, count=3))
        session.get(OutcomeTally, cell).count += 3
    with session_scope(settings) as session:
        assert retention.prune_field_months(session, settings) >= 1

    window = str(settings.field_window_months)
    longer = run(settings, "monitor", "report", "--model", model, "--months", str(settings.field_window_months + 6))
    assert longer.returncode == 2, longer.stdout + longer.stderr
    assert f"keeps the last {window} months" in longer.stderr and "DERMQ_FIELD_WINDOW_MONTHS" in longer.stderr
    assert longer.stdout == ""
    recent = run(settings, "monitor", "report", "--model", model, "--months", window, "--json")
    assert recent.returncode == 0, recent.stderr
    assert json.loads(recent.stdout)["models"][model]["classes"]["mel"]["sensitivity"]["trials"] == 1
    lifetime = run(settings, "monitor", "report", "--model", model, "--json")
    assert json.loads(lifetime.stdout)["models"][model]["classes"]["mel"]["sensitivity"]["trials"] == 4
    # the window is the CLI's own setting, as the purge's is beat's: a longer one is accepted there
    wider = run(settings, "monitor", "report", "--model", model, "--months", "12", DERMQ_FIELD_WINDOW_MONTHS="12")
    assert wider.returncode == 0, wider.stderr
