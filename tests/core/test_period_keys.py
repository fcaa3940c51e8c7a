"""Period keys: crypto-shredding that reaches backups. A copy of the blob rows taken before an erasure
cannot be decrypted once the period's key is destroyed, while other periods still decrypt; a period
with live cases, or one still taking cases, is not destroyed; sealing and destruction never overlap;
a request holding a keyring from before a rotation (its KEK retired meanwhile) still seals under a
live key."""

from __future__ import annotations

import hashlib
import json
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, literal_column, select, text, update

from core import audit, cases, keyrotation, period_shredding, retention
from core.config import Settings
from core.crypto import Keyring, decrypt_blob, encrypt_blob, load_keyring, write_key_file
from core.db import dispose_engines, session_scope
from core.errors import Conflict, DecryptionError
from core.keys import Principal
from core.models import AuditEvent, BlobKind, Case, CaseBlob, CaseStatus, Role
from core.periods import kek_id
from tests import support
from tests.cli.test_commands import run
from tests.conftest import Tenant, case_store, new_tenant

pytestmark = pytest.mark.usefixtures("database")
NOW = datetime.now(UTC)


@dataclass(frozen=True)
class Site:
    settings: Settings
    tenant: Tenant

    def period(self, when: datetime) -> str:
        folder = load_keyring(self.settings).periods
        assert folder is not None
        return folder.current(when)


@pytest.fixture
def site(settings: Settings, tmp_path: Path) -> Iterator[Site]:
    """A database (a copy of the migrated template), a key file and a period-key folder of their own."""
    write_key_file(tmp_path / "keys.json", Keyring.generate())
    (tmp_path / "period-keys").mkdir(mode=0o700)  # as `dermq keys init` creates it beside the key file
    url = settings.database_url.rsplit("/", 1)[0] + f"/{support.TEST_DATABASE}_periods"
    support.recreate_database(url, template=f"{settings.database_url}_template")
    own = settings.model_copy(update={"key_file": tmp_path / "keys.json", "database_url": url})
    try:
        yield Site(own, new_tenant(own, load_keyring(own)))
    finally:
        dispose_engines()
        support.drop_database(url)


def case_created(site: Site, when: datetime, image: bytes) -> uuid.UUID:
    """A finished case created at ``when``, stored as before period keys (under the key file's KEK);
    ``dermq keys rewrap`` (the migration path) moves it under its period's key."""
    legacy = replace(load_keyring(site.settings), periods=None)
    case_id = case_store(site.settings, legacy)(site.tenant, image)
    with session_scope(site.settings) as session:
        session.execute(
            update(Case).where(Case.id == case_id).values(created_at=when, status=CaseStatus.SUCCEEDED.value)
        )
    return case_id


def blob_rows(site: Site) -> list[tuple[uuid.UUID, str, Any]]:
    """What a backup holds of the blobs: a copy of every row."""
    with session_scope(site.settings) as session:
        return [(b.case_id, b.kind, b.sealed) for b in session.scalars(select(CaseBlob))]


def destroy_expired(settings: Settings) -> list[str]:
    """Retention's destruction of the expired periods (none may fail here): the periods destroyed."""
    return period_shredding.destroy_expired(settings, failed=lambda period, exc: pytest.fail(f"{period}: {exc!r}"))


def erase(site: Site, case_id: uuid.UUID) -> None:
    principal = Principal(site.tenant.key_id, Role.CLINIC, site.tenant.clinic_id)
    with session_scope(site.settings) as session:
        retention.erase_case(session, principal=principal, actor=audit.SYSTEM, case_id=case_id)


def test_a_backup_from_before_an_erasure_is_unreadable_once_the_period_key_is_destroyed(site: Site) -> None:
    erased_at, kept_at = NOW - timedelta(days=150), NOW - timedelta(days=100)
    erased, kept = case_created(site, erased_at, b"erased image"), case_created(site, kept_at, b"kept image")
    assert keyrotation.rewrap_all(site.settings).remaining == 0  # the migration path: under their periods' keys
    gone, other = site.period(erased_at), site.period(kept_at)
    assert gone != other

    backup = blob_rows(site)  # taken before the erasure
    assert {sealed.kek_id for _, _, sealed in backup} == {kek_id(gone), kek_id(other)}
    erase(site, erased)
    # retention: every case of the period purged, its end long past retention and grace
    assert destroy_expired(site.settings) == [gone]

    keyring = load_keyring(site.settings)  # the key file itself is intact
    for case_id, kind, sealed in backup:
        if case_id == erased:
            with pytest.raises(DecryptionError, match="destroyed"):
                decrypt_blob(keyring, sealed, case_id=case_id, kind=kind)
        else:
            assert case_id == kept and decrypt_blob(keyring, sealed, case_id=case_id, kind=kind) == b"kept image"
    with session_scope(site.settings) as session:
        listed = {p.period: p for p in period_shredding.periods(session, site.settings)}
        destroyed = session.scalars(select(AuditEvent).where(AuditEvent.action == "keys.destroy_period")).all()
    assert listed[gone].state == "destroyed" and listed[other].live == 1  # kept: still live, so still keyed
    assert [(e.outcome, e.entity_id, e.detail["reason"]) for e in destroyed] == [("success", kek_id(gone), "retention")]


def test_a_period_with_live_cases_or_still_taking_cases_is_not_destroyed(site: Site, jpeg_bytes: bytes) -> None:
    when = NOW - timedelta(days=120)
    live = case_created(site, when, b"still needed")
    keyrotation.rewrap_all(site.settings)
    period = site.period(when)
    with pytest.raises(Conflict, match="1 case") as refused:
        period_shredding.destroy_period(site.settings, period)
    assert refused.value.code == "period_has_live_cases"
    with session_scope(site.settings) as session:
        (row,) = session.scalars(select(CaseBlob).where(CaseBlob.case_id == live))
        assert decrypt_blob(load_keyring(site.settings), row.sealed, case_id=live, kind=row.kind) == b"still needed"

    current = site.period(NOW)
    load_keyring(site.settings).periods.ensure(current)  # type: ignore[union-attr]
    with pytest.raises(Conflict) as taking:
        period_shredding.destroy_period(site.settings, current, force=True)
    assert taking.value.code == "period_not_ended"

    done = period_shredding.destroy_period(site.settings, period, force=True)  # purges the live case first
    assert done["purged"] == 1
    with session_scope(site.settings) as session:
        assert session.get(Case, live).status == CaseStatus.PURGED.value  # type: ignore[union-attr]
        assert session.scalar(select(func.count()).select_from(CaseBlob).where(CaseBlob.case_id == live)) == 0
        events = session.scalars(
            select(AuditEvent).where(AuditEvent.action == "keys.destroy_period").order_by(AuditEvent.id)
        ).all()
    assert [(e.outcome, e.detail.get("reason")) for e in events] == [
        ("denied", "live_cases"),
        ("denied", "not_ended"),
        ("success", "operator"),
    ]


def _waiting_for_a_period_lock(settings: Settings) -> bool:
    with session_scope(settings) as session:
        return bool(
            session.scalar(
                text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted AND classid = :c"),
                {"c": period_shredding.LOCK_CLASS},
            )
        )


@pytest.mark.parametrize("force", [False, True])
def test_destruction_waits_for_a_transaction_sealing_under_the_period_and_then_sees_its_case(
    site: Site, force: bool
) -> None:
    when = NOW - timedelta(days=200)
    period = site.period(when)
    keyring = load_keyring(site.settings)
    outcome: dict[str, Any] = {}

    def destroy() -> None:
        try:
            outcome["done"] = period_shredding.destroy_period(site.settings, period, force=force)
        except Conflict as exc:
            outcome["refused"] = exc.code

    case_id = uuid.uuid4()
    with session_scope(site.settings) as session:  # a request sealing a case of that period, not yet committed
        wrap = period_shredding.wrapping_key(session, keyring, when)
        session.add(
            Case(
                id=case_id,
                clinic_id=site.tenant.clinic_id,
                status=CaseStatus.SUCCEEDED.value,
                image_sha256=hashlib.sha256(b"x").hexdigest(),
                image_format="JPEG",
                image_width=1,
                image_height=1,
                image_bytes=1,
                created_at=when,
            )
        )
        sealed = encrypt_blob(keyring, b"sealed meanwhile", case_id=case_id, kind="image", kek_id=wrap)
        cases.insert_blobs(session, [(case_id, BlobKind.IMAGE, sealed, "image/jpeg")])
        destroyer = threading.Thread(target=destroy)
        destroyer.start()
        support.wait_for(lambda: _waiting_for_a_period_lock(site.settings), timeout=30, what="destroy to wait")
    destroyer.join(timeout=60)

    with session_scope(site.settings) as session:
        left = session.scalars(select(CaseBlob).where(CaseBlob.kek_id == kek_id(period))).all()
        status = session.get(Case, case_id).status  # type: ignore[union-attr]
    if force:  # the case it waited for was purged first: nothing of it is left under the destroyed key
        assert outcome["done"]["purged"] == 1 and status == CaseStatus.PURGED.value and left == []
    else:  # refused: the case sealed meanwhile stays readable
        assert outcome == {"refused": "period_has_live_cases"} and status == CaseStatus.SUCCEEDED.value
        assert decrypt_blob(load_keyring(site.settings), left[0].sealed, case_id=case_id, kind="image") == (
            b"sealed meanwhile"
        )


def test_a_request_holding_a_keyring_from_before_a_rotation_seals_under_a_live_key(site: Site) -> None:
    """The key file's KEK is rotated and the old one retired while a request still holds the keyring it
    loaded before: a new period's key is wrapped under the KEK the file holds now, never the retired
    one, and what the request seals decrypts afterwards."""
    stale = load_keyring(site.settings)
    keyrotation.rotate(site.settings)
    keyrotation.retire(site.settings, stale.active_id)
    when = NOW - timedelta(days=400)  # a period with no key yet: the request creates it
    case_id = uuid.uuid4()
    with session_scope(site.settings) as session:
        wrap = period_shredding.wrapping_key(session, stale, when)
        sealed = encrypt_blob(stale, b"sealed late", case_id=case_id, kind="image", kek_id=wrap)
    now_keys = load_keyring(site.settings)
    assert now_keys.active_id != stale.active_id and stale.active_id not in now_keys.keks
    folder = now_keys.periods
    assert folder is not None
    record = json.loads((folder.folder / f"{site.period(when)}.json").read_text())
    assert record["kek_id"] == now_keys.active_id
    assert decrypt_blob(now_keys, sealed, case_id=case_id, kind="image") == b"sealed late"


def test_the_cli_lists_periods_and_destroys_one_only_when_its_cases_are_gone(site: Site) -> None:
    when = NOW - timedelta(days=300)
    live = case_created(site, when, b"cli case")
    keyrotation.rewrap_all(site.settings)
    period = site.period(when)

    listed = run(site.settings, "keys", "periods", "--json")
    assert listed.returncode == 0, listed.stderr
    (row,) = [r for r in json.loads(listed.stdout) if r["period"] == period]
    assert (row["state"], row["cases"], row["live"], row["blobs"]) == ("ended", 1, 1, 1)

    status = run(site.settings, "keys", "status", "--json")
    assert status.returncode == 0, status.stdout + status.stderr  # every key the blobs need is there
    by_id = {r["kek_id"]: r for r in json.loads(status.stdout)}
    assert by_id[kek_id(period)]["blobs"] == 1 and by_id[kek_id(period)]["in_key_file"]
    assert by_id[load_keyring(site.settings).active_id]["period_keys"] == 1
    # a key file restored from before a rotation: the period key is wrapped under a KEK it lacks
    key_file = site.settings.period_key_folder / f"{period}.json"  # type: ignore[operator]
    saved = key_file.read_text()
    key_file.write_text(json.dumps(json.loads(saved) | {"kek_id": "kek-not-in-the-file"}))
    lacking = run(site.settings, "keys", "status", "--json")
    key_file.write_text(saved)
    assert lacking.returncode == 1, lacking.stdout + lacking.stderr
    missing = {r["kek_id"]: r for r in json.loads(lacking.stdout)}["kek-not-in-the-file"]
    assert (missing["in_key_file"], missing["period_keys"]) == (False, 1)

    refused = run(site.settings, "keys", "destroy-period", period)
    assert refused.returncode == 2 and "not purged yet" in refused.stderr and "period_has_live_cases" in refused.stderr
    erase(site, live)
    for answer in ("", "2020-01\n"):  # no answer, or not the period's name: nothing is destroyed
        declined = run(site.settings, "keys", "destroy-period", period, answer=answer)
        assert declined.returncode == 1 and "not confirmed" in declined.stderr, declined.stdout + declined.stderr
        assert "cannot be undone" in declined.stderr
        assert {r["period"]: r["state"] for r in json.loads(run(site.settings, "keys", "periods", "--json").stdout)}[
            period
        ] == "ended"
    done = run(site.settings, "keys", "destroy-period", period, answer=f"{period}\n")
    assert done.returncode == 0, done.stderr
    assert "no copy of its cases can be decrypted" in done.stdout
    text_list = run(site.settings, "keys", "periods")
    assert any(line.startswith(period) and "destroyed" in line for line in text_list.stdout.splitlines())
    assert run(site.settings, "keys", "destroy-period", "last-month").returncode == 2  # not a period: one error line


def test_a_forced_destruction_purges_a_period_a_batch_per_transaction(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    when = NOW - timedelta(days=120)
    live = [case_created(site, when, b"case %d" % n) for n in range(5)]
    keyrotation.rewrap_all(site.settings)
    monkeypatch.setattr(period_shredding, "PURGE_BATCH", 2)
    assert period_shredding.destroy_period(site.settings, site.period(when), force=True)["purged"] == 5
    with session_scope(site.settings) as session:
        rows = session.execute(select(Case.status, literal_column("cases.xmin::text")).where(Case.id.in_(live))).all()
    assert {status for status, _ in rows} == {CaseStatus.PURGED.value}
    assert sorted(Counter(xmin for _, xmin in rows).values()) == [1, 2, 2]  # the transactions that purged them


def test_a_case_submitted_while_its_period_is_being_destroyed_is_accepted(site: Site, jpeg_bytes: bytes) -> None:
    """The period a request seals under is the current one, which is never destroyed: the submission
    succeeds and decrypts; the destruction is refused with a 409, not a 5xx."""
    from fastapi.testclient import TestClient

    from api.app import create_app

    with TestClient(create_app(site.settings)) as http:
        files = {"image": ("x.jpg", jpeg_bytes, "image/jpeg")}
        first = http.post("/v1/cases", headers=site.tenant.headers, files=files)
        assert first.status_code == 202, first.text
        with pytest.raises(Conflict) as refused:
            period_shredding.destroy_period(site.settings, site.period(NOW), force=True)
        assert refused.value.status == 409
        second = http.post("/v1/cases", headers=site.tenant.headers, files=files)
        assert second.status_code == 202, second.text
    with session_scope(site.settings) as session:
        blob = session.scalar(
            select(CaseBlob).where(CaseBlob.case_id == uuid.UUID(second.json()["id"]), CaseBlob.kind == "image")
        )
        assert blob is not None and blob.kek_id == kek_id(site.period(NOW))
        assert decrypt_blob(load_keyring(site.settings), blob.sealed, case_id=blob.case_id, kind="image") == jpeg_bytes


def test_an_unusable_period_key_folder_is_a_503_that_names_the_setting(settings: Settings, tmp_path: Path) -> None:
    from core.errors import ServiceUnavailable
    from core.period_keys import PeriodKeys

    blocker = tmp_path / "a-file"
    blocker.write_text("")  # the folder's parent is a file: nothing can be created there
    with pytest.raises(ServiceUnavailable, match="DERMQ_PERIOD_KEY_DIR") as refused:
        PeriodKeys(blocker / "period-keys", settings).ensure("2026-01")
    assert refused.value.status == 503 and refused.value.code == "period_keys_unavailable"


def _someone_waits_for_a_row(settings: Settings) -> bool:
    with session_scope(settings) as session:
        return bool(
            session.scalar(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
                )
            )
        )


def test_a_forced_destruction_and_a_worker_storing_a_result_of_that_period_never_deadlock(site: Site) -> None:
    """The worker's order: the fenced UPDATE of the case row first, then the period's lock to seal the
    result. A forced destruction waiting for that row meanwhile must not hold the period."""
    when = NOW - timedelta(days=250)
    case_id = case_created(site, when, b"being classified")
    keyrotation.rewrap_all(site.settings)
    period = site.period(when)
    outcome: dict[str, Any] = {}

    def destroy() -> None:
        try:
            outcome["done"] = period_shredding.destroy_period(site.settings, period, force=True)
        except Exception as exc:  # a deadlock would surface here
            outcome["error"] = type(exc).__name__

    with session_scope(site.settings) as session:  # the worker storing the case's result
        session.execute(update(Case).where(Case.id == case_id).values(status=CaseStatus.SUCCEEDED.value))
        destroyer = threading.Thread(target=destroy)
        destroyer.start()
        support.wait_for(lambda: _someone_waits_for_a_row(site.settings), timeout=30, what="the purge to wait")
        period_shredding.wrapping_key(session, load_keyring(site.settings), when)  # not blocked by the destroyer
    destroyer.join(timeout=60)
    assert outcome.get("done", {}).get("purged") == 1, outcome
    with session_scope(site.settings) as session:
        assert session.get(Case, case_id).status == CaseStatus.PURGED.value  # type: ignore[union-attr]


def test_a_destruction_interrupted_before_its_event_is_completed_and_recorded_once(site: Site) -> None:
    # the key's tombstone is written, then the process dies before its audit event commits (or a
    # re-wrap that read the key writes it back beside the tombstone): the key must stay dead, and the
    # next retention run must record the destruction, once
    when = NOW - timedelta(days=150)
    erased = case_created(site, when, b"erased image")
    keyrotation.rewrap_all(site.settings)
    period = site.period(when)
    backup = blob_rows(site)
    erase(site, erased)
    keys = load_keyring(site.settings).periods
    assert keys is not None
    leftover = (keys.folder / f"{period}.json").read_bytes()
    keys.destroy(period, reason="retention")  # the file change, without its event
    left = keys.folder / f"{period}.json"
    left.touch(mode=0o600)
    left.write_bytes(leftover)

    keyring = load_keyring(site.settings)
    for case_id, kind, sealed in backup:
        with pytest.raises(DecryptionError, match="destroyed"):  # the tombstone wins
            decrypt_blob(keyring, sealed, case_id=case_id, kind=kind)
    assert destroy_expired(site.settings) == [period]
    assert not (keys.folder / f"{period}.json").exists()
    assert destroy_expired(site.settings) == []
    left.touch(mode=0o600)
    left.write_bytes(leftover)  # left again (an old re-wrap's write): an operator's destroy-period deletes it
    assert period_shredding.destroy_period(site.settings, period)["already"]
    assert not left.exists()
    with session_scope(site.settings) as session:
        events = session.scalars(select(AuditEvent).where(AuditEvent.action == "keys.destroy_period")).all()
    assert [(e.outcome, e.entity_id, e.detail.get("completes_interrupted")) for e in events] == [
        ("success", kek_id(period), True)
    ]
