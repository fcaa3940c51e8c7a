"""Patient data at rest: client references and results' findings are sealed like the images, never in a
database dump, read back unchanged, and shredded with the images."""

from __future__ import annotations

import subprocess
import threading
import uuid
from typing import Any

from sqlalchemy import select, text, update
from sqlalchemy.engine import make_url

from core import phi, results
from core.db import session_scope
from core.models import SEALED_RESULT_FIELDS, BlobKind, Case, CaseBlob, CaseStatus, Result
from tests import support
from tests.api.test_cases import submit, wait_done
from tests.conftest import Tenant
from worker.tasks import sweep_once


def dump(settings) -> str:  # type: ignore[no-untyped-def]
    """What a backup holds: ``pg_dump --data-only`` of the whole database."""
    name = make_url(settings.database_url).database
    found = subprocess.run(
        ["pg_dump", "--data-only", "--no-owner", name], capture_output=True, text=True, check=True, timeout=120
    )
    return found.stdout


def dumped_rows(dumped: str, table: str) -> list[dict[str, str]]:
    """The rows of ``table`` in a plain-format dump, as text (``\\N`` is NULL)."""
    lines = dumped.splitlines()
    head = f"COPY public.{table} ("
    start = next(i for i, line in enumerate(lines) if line.startswith(head))
    columns = [c.strip('"') for c in lines[start][len(head) : lines[start].index(")")].split(", ")]
    rows = []
    for line in lines[start + 1 :]:
        if line == "\\.":
            break
        rows.append(dict(zip(columns, line.split("\t"), strict=True)))
    return rows


def assert_no_findings_in(dumped: str, case_id: str, result: dict[str, Any]) -> None:
    """The case's result row holds no finding, and no finding is anywhere else in the dump."""
    (row,) = [r for r in dumped_rows(dumped, "results") if r["case_id"] == case_id]
    assert {name: row[name] for name in SEALED_RESULT_FIELDS} == dict.fromkeys(SEALED_RESULT_FIELDS, "\\N")
    for label, probability in (result.get("probabilities") or {}).items():
        assert f'"{label}": {probability}' not in dumped  # how a plain JSONB column would print it
    for reason in result.get("referral_reasons", []) + result.get("ood_reasons", []):
        assert not any(f'"{reason}"' in value for value in row.values())


def test_a_client_reference_is_in_no_dump_and_reads_back(client, settings, tenant: Tenant, jpeg_bytes) -> None:  # type: ignore[no-untyped-def]
    marker = f"MRN-{uuid.uuid4().hex[:12]}"
    created = client.post(
        "/v1/cases",
        headers=tenant.headers,
        files={"image": ("lesion.jpg", jpeg_bytes, "image/jpeg")},
        data={"client_ref": marker},
    )
    assert created.status_code == 202 and created.json()["client_ref"] == marker
    case_id = created.json()["id"]
    assert client.get(f"/v1/cases/{case_id}", headers=tenant.headers).json()["client_ref"] == marker
    listed = client.get("/v1/cases", headers=tenant.headers).json()["items"]
    assert next(c for c in listed if c["id"] == case_id)["client_ref"] == marker
    assert marker not in dump(settings)
    # erasure shreds it with the images
    erased = client.delete(f"/v1/cases/{case_id}", headers=tenant.headers)
    assert erased.status_code == 200 and erased.json()["client_ref"] is None
    assert client.get(f"/v1/cases/{case_id}", headers=tenant.headers).json()["client_ref"] is None


def test_a_classified_case_leaves_no_finding_in_a_dump_and_erasure_leaves_none_to_decrypt(  # type: ignore[no-untyped-def]
    client, worker, settings, keyring, tenant: Tenant, fixture_images
) -> None:
    marker = f"MRN-{uuid.uuid4().hex[:12]}"
    case_id = submit(client, tenant, fixture_images["ISIC_0024313"].read_bytes(), client_ref=marker).json()["id"]
    done = wait_done(client, tenant, case_id)
    assert done["status"] == "succeeded" and done["result"]["outcome"] == "diagnosis", done
    result = done["result"]
    listed = next(c for c in client.get("/v1/cases", headers=tenant.headers).json()["items"] if c["id"] == case_id)
    assert (listed["outcome"], listed["label"], listed["referral"]) == (
        "diagnosis",
        result["label"],
        result["referral"],
    )

    confirmed = client.post(
        f"/v1/cases/{case_id}/outcome", headers=tenant.headers, json={"diagnosis": "bkl", "method": "histo"}
    )
    assert confirmed.status_code == 201, confirmed.text

    dumped = dump(settings)
    assert marker not in dumped
    assert_no_findings_in(dumped, case_id, result)
    (row,) = [r for r in dumped_rows(dumped, "results") if r["case_id"] == case_id]
    assert row["outcome"] == "diagnosis" and row["model_id"] == result["model"]["id"]  # operational: plain
    (report,) = [r for r in dumped_rows(dumped, "confirmed_outcomes") if r["case_id"] == case_id]
    assert report["diagnosis"] == "\\N" and report["method"] == "histo"  # the confirmed diagnosis is sealed

    assert client.delete(f"/v1/cases/{case_id}", headers=tenant.headers).status_code == 200
    with session_scope(settings) as session:
        # nothing left that any key could open: no blob of the case, no finding in its row
        assert session.scalars(select(CaseBlob).where(CaseBlob.case_id == uuid.UUID(case_id))).all() == []
        assert results.read_result(session, keyring, uuid.UUID(case_id)) is None
        row_after = session.get(Result, uuid.UUID(case_id))
        assert row_after is not None and all(getattr(row_after, name) is None for name in SEALED_RESULT_FIELDS)


def test_the_sweeper_seals_references_stored_before_they_were_sealed(  # type: ignore[no-untyped-def]
    client, settings, keyring, tenant: Tenant, store_case, publisher
) -> None:
    marker = f"LEGACY-{uuid.uuid4().hex[:12]}"
    case_id = store_case(tenant, b"an old case")
    with session_scope(settings) as session:  # as a release before migration 0007 stored it
        session.execute(update(Case).where(Case.id == case_id).values(plain_client_ref=marker))
    assert client.get(f"/v1/cases/{case_id}", headers=tenant.headers).json()["client_ref"] == marker
    report = sweep_once(settings, publisher, None)
    assert report["client_refs_sealed"] >= 1
    with session_scope(settings) as session:
        assert session.scalar(select(Case.plain_client_ref).where(Case.id == case_id)) is None
        kinds = set(session.scalars(select(CaseBlob.kind).where(CaseBlob.case_id == case_id)).all())
        assert kinds == {BlobKind.IMAGE.value, BlobKind.CLIENT_REF.value}
        assert phi.client_refs(session, keyring, [session.get(Case, case_id)]) == {case_id: marker}
    assert client.get(f"/v1/cases/{case_id}", headers=tenant.headers).json()["client_ref"] == marker
    assert marker not in dump(settings)


LEGACY_DIAGNOSIS = {
    "outcome": "diagnosis",
    "label": "mel",
    "probabilities": {
        "akiec": 0.0125,
        "bcc": 0.0375,
        "bkl": 0.05,
        "df": 0.0125,
        "mel": 0.7123456789,
        "nv": 0.1,
        "vasc": 0.0751543211,
    },
    "confidence": 0.7123456789,
    "uncertainty": 0.4187654321,
    "referral": True,
    "referral_reasons": ["concerning_class", "uncertain"],
    "ood_reasons": [],
    "gradcam_status": "ok",
    "gradcam_class": "mel",
}
LEGACY_OUT_OF_DISTRIBUTION = {
    "outcome": "out_of_distribution",
    "ood_reasons": ["blank"],
    "gradcam_status": "not_applicable",
}


def legacy_result(settings, case_id: uuid.UUID, fields: dict[str, Any]) -> None:  # type: ignore[no-untyped-def]
    """A result as a release before migration 0009 stored it: findings in plain columns, no blob."""
    common = {"model_id": "legacy-model", "weights_sha256": "c" * 64, "device": "cpu", "timings": {"total": 0.25}}
    with session_scope(settings) as session:
        session.add(Result(case_id=case_id, **common, **fields))
        session.get(Case, case_id).status = CaseStatus.SUCCEEDED.value


def sweep_until_sealed(settings, publisher, case_ids: list[uuid.UUID]) -> None:  # type: ignore[no-untyped-def]
    """Sweep until these rows are sealed (a sweep seals a batch; other tests leave plain rows too)."""
    for _ in range(100):
        assert sweep_once(settings, publisher, None)["results_sealed"] >= 0
        with session_scope(settings) as session:
            plain = session.scalars(
                select(Result.case_id).where(Result.case_id.in_(case_ids), Result.ood_reasons.is_not(None))
            ).all()
        if not plain:
            return
    raise AssertionError(f"{len(plain)} results still plain after 100 sweeps")


def test_the_sweeper_seals_results_stored_before_they_were_sealed_and_they_read_back_the_same(  # type: ignore[no-untyped-def]
    client, settings, keyring, tenant: Tenant, store_case, publisher
) -> None:
    diagnosis, out_of_distribution = store_case(tenant, b"an old diagnosis"), store_case(tenant, b"an old ood")
    legacy_result(settings, diagnosis, LEGACY_DIAGNOSIS)
    legacy_result(settings, out_of_distribution, LEGACY_OUT_OF_DISTRIBUTION)
    ids = [diagnosis, out_of_distribution]

    def answers() -> list[Any]:
        read = [client.get(f"/v1/cases/{i}", headers=tenant.headers).json() for i in ids]
        fhir = [client.get(f"/v1/cases/{i}/fhir", headers=tenant.headers).json() for i in ids]
        for bundle in fhir:
            bundle.pop("timestamp")
        page = client.get("/v1/cases", headers=tenant.headers).json()["items"]
        listed = [(c["outcome"], c["label"], c["referral"]) for i in ids for c in page if c["id"] == str(i)]
        return [read, fhir, listed]

    before = answers()
    assert before[0][0]["result"]["probabilities"]["mel"] == 0.7123456789
    assert before[2] == [("diagnosis", "mel", True), ("out_of_distribution", None, None)]

    sweep_until_sealed(settings, publisher, ids)
    assert answers() == before
    with session_scope(settings) as session:
        kinds = set(session.scalars(select(CaseBlob.kind).where(CaseBlob.case_id == diagnosis)).all())
        assert kinds == {BlobKind.IMAGE.value, BlobKind.RESULT.value}
    dumped = dump(settings)
    assert_no_findings_in(dumped, str(diagnosis), before[0][0]["result"])
    assert_no_findings_in(dumped, str(out_of_distribution), before[0][1]["result"])


def test_erasing_a_result_stored_before_sealing_empties_its_findings(  # type: ignore[no-untyped-def]
    client, settings, keyring, tenant: Tenant, store_case
) -> None:
    case_id = store_case(tenant, b"an old diagnosis, never swept")
    legacy_result(settings, case_id, LEGACY_DIAGNOSIS)
    assert client.get(f"/v1/cases/{case_id}", headers=tenant.headers).json()["result"]["label"] == "mel"
    erased = client.delete(f"/v1/cases/{case_id}", headers=tenant.headers).json()
    assert erased["status"] == "purged" and erased["result"] is None
    with session_scope(settings) as session:
        row = session.get(Result, case_id)
        assert row is not None and all(getattr(row, name) is None for name in SEALED_RESULT_FIELDS)
        assert results.read_result(session, keyring, case_id) is None
    assert_no_findings_in(dump(settings), str(case_id), LEGACY_DIAGNOSIS)


def test_an_erasure_waits_for_the_sealing_of_its_old_result_and_leaves_no_sealed_findings(  # type: ignore[no-untyped-def]
    settings, keyring, tenant: Tenant, store_case
) -> None:
    case_id = store_case(tenant, b"an old diagnosis, being sealed")
    legacy_result(settings, case_id, LEGACY_DIAGNOSIS)
    erasing = threading.Thread(target=_erase, args=(settings, case_id))
    with session_scope(settings) as sealing:  # the sweeper's sealing, its new blob not committed yet
        assert results.seal_plain_results(sealing, keyring) >= 1
        erasing.start()
        support.wait_for(lambda: _waiting_for_a_lock(settings), timeout=30, what="the erasure to wait for the sealing")
    erasing.join(30)
    with session_scope(settings) as session:
        left = session.scalars(select(CaseBlob.kind).where(CaseBlob.case_id == case_id)).all()
        assert session.get(Case, case_id).status == CaseStatus.PURGED.value
    assert left == [], f"erased, yet {left} remain"


def test_a_sealing_passes_over_a_case_being_erased_instead_of_deadlocking_with_it(  # type: ignore[no-untyped-def]
    settings, keyring, tenant: Tenant, store_case
) -> None:
    from core import audit, retention

    case_id = store_case(tenant, b"an old diagnosis, being erased")
    legacy_result(settings, case_id, LEGACY_DIAGNOSIS)
    sealed, finish = threading.Event(), threading.Event()
    with session_scope(settings) as erasing:
        case = erasing.get(Case, case_id, with_for_update=True)  # what the erasure route locks first
        failures: list[BaseException] = []
        sealer = threading.Thread(target=_seal_results, args=(settings, keyring, failures, sealed, finish))
        sealer.start()
        # waiting on the case while holding its result, the sealing would deadlock with the purge below
        # (or, first, run out of its lock_timeout)
        assert sealed.wait(20) and not failures, f"the sealing waited for the case the erasure holds: {failures}"
        try:  # the sealing's transaction still open: it holds no lock on this case's rows either
            retention.purge_case(erasing, case, actor=audit.SYSTEM, reason="erasure")
        finally:
            finish.set()
            sealer.join(20)
    with session_scope(settings) as session:
        assert session.get(Case, case_id).status == CaseStatus.PURGED.value
        assert session.scalars(select(CaseBlob.kind).where(CaseBlob.case_id == case_id)).all() == []


def _seal_results(settings, keyring, failures: list[BaseException], sealed, finish) -> None:  # type: ignore[no-untyped-def]
    try:
        with session_scope(settings) as session:
            results.seal_plain_results(session, keyring)
            sealed.set()
            finish.wait(30)  # commits only once told
    except Exception as exc:
        failures.append(exc)
        sealed.set()


def _erase(settings, case_id: uuid.UUID) -> None:  # type: ignore[no-untyped-def]
    from core import audit, retention

    with session_scope(settings) as session:
        retention.purge_case(session, session.get(Case, case_id), actor=audit.SYSTEM, reason="retention")


def _waiting_for_a_lock(settings) -> bool:  # type: ignore[no-untyped-def]
    """Whether a backend of this database waits for a lock (the erasure, on the sealing's row lock)."""
    waiting = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
    with session_scope(settings) as session:
        return bool(session.scalar(text(waiting)))
