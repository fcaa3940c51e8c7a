"""``dermq case erase``: an operator erases one case for a patient whose clinic can no longer ask (its
keys revoked, the clinic deactivated; before, the only tools were reactivating the clinic or
destroying a whole month's key), after the case id is typed back; audited like a clinic's erasure.
And ``dermq case purge-expired``, retention run by hand.

A real purge acts on every case, period key and callback record of its database and period-key
folder: this module runs on a database and a period-key folder of its own (its ``tenant``,
``store_case`` and ``keyring`` are theirs), so that no purge here touches what another module keeps."""

from __future__ import annotations

import subprocess
import uuid

import pytest
from sqlalchemy import func, select

from core.config import Settings
from core.db import session_scope
from core.models import AuditEvent, Case, CaseBlob
from tests.cli.test_commands import run
from tests.conftest import own_database_fixtures, own_period_keys_fixtures

pytestmark = pytest.mark.usefixtures("database")

tenant, store_case = own_database_fixtures()
own, keyring = own_period_keys_fixtures()


def dermq(settings: Settings, *args: str, answer: str = "") -> subprocess.CompletedProcess[str]:
    """``dermq *args`` on the database and the period-key folder of ``settings``."""
    return run(settings, *args, answer=answer, DERMQ_PERIOD_KEY_DIR=str(settings.period_key_folder))


def test_an_operator_erases_a_case_once_its_id_is_typed_back(own, tenant, store_case, jpeg_bytes) -> None:  # type: ignore[no-untyped-def]
    case_id = store_case(tenant, jpeg_bytes)
    refused = dermq(own, "case", "erase", str(case_id), answer="yes\n")
    assert refused.returncode == 1 and "not confirmed" in refused.stderr and "cannot be undone" in refused.stderr
    with session_scope(own) as session:
        assert session.get(Case, case_id).status == "queued"  # type: ignore[union-attr]
    erased = dermq(own, "case", "erase", str(case_id), answer=f"{case_id}\n")
    assert erased.returncode == 0 and "erased" in erased.stdout, erased.stderr
    again = dermq(own, "case", "erase", str(case_id), "--yes")
    assert again.returncode == 0 and "already erased" in again.stdout
    with session_scope(own) as session:
        case = session.get(Case, case_id)
        assert case is not None and case.status == "purged" and case.image_sha256 == "0" * 64
        assert session.scalar(select(func.count()).select_from(CaseBlob).where(CaseBlob.case_id == case_id)) == 0
        events = session.scalars(
            select(AuditEvent)
            .where(AuditEvent.entity_id == str(case_id), AuditEvent.action == "case.delete")
            .order_by(AuditEvent.id)
        ).all()
    assert [(e.actor_type, e.detail.get("reason"), e.detail.get("already")) for e in events] == [
        ("cli", "operator_request", None),
        ("cli", "operator_request", True),
    ]
    unknown = dermq(own, "case", "erase", str(uuid.uuid4()), "--yes")
    assert unknown.returncode == 2 and "case_not_found" in unknown.stderr and "Traceback" not in unknown.stderr


def test_purging_by_hand_destroys_the_expired_periods_keys_as_beat_does(own, tenant, store_case) -> None:  # type: ignore[no-untyped-def]
    """An operator meeting an erasure deadline by hand: the cases purged, and the keys of the periods
    they leave empty destroyed, so no backup of them can be read (it stopped at the cases). A dry run
    first says what would go, and changes nothing."""
    from datetime import UTC, datetime

    from core.period_keys import PeriodKeys

    keys = PeriodKeys(own.period_key_folder, own)
    keys.ensure("2019-03")  # a month long past retention and its grace: its one case finished
    keys.ensure("2019-04")  # and one whose case is still queued: its key stays
    finished, waiting = store_case(tenant, b"finished"), store_case(tenant, b"waiting")
    with session_scope(own) as session:
        for case_id, status, day in ((finished, "succeeded", 10), (waiting, "queued", 11)):
            case = session.get(Case, case_id)
            case.status, case.created_at = status, datetime(2019, 3 if status == "succeeded" else 4, day, tzinfo=UTC)
    folder = sorted(p.name for p in own.period_key_folder.iterdir())
    # (what a purge records: the module's other tests record other events)
    purging = select(func.count()).where(AuditEvent.action.in_(["case.purge", "keys.destroy_period"]))
    with session_scope(own) as session:
        events = session.scalar(purging)
    preview = dermq(own, "case", "purge-expired", "--dry-run")
    assert preview.returncode == 0, preview.stderr
    lines = preview.stdout.splitlines()
    # the database is this module's: the finished case is its only expired one
    assert "would purge 1 expired case(s) (the oldest submitted 2019-03-10)" in lines, lines
    (would_destroy,) = [line for line in lines if line.startswith("would destroy the keys of ")]
    assert "2019-03" in would_destroy and "2019-04" not in would_destroy
    assert lines[-1] == "dry run: nothing was changed"
    with session_scope(own) as session:
        assert session.get(Case, finished).status == "succeeded"  # type: ignore[union-attr]
        assert session.scalar(select(func.count()).select_from(CaseBlob).where(CaseBlob.case_id == finished)) > 0
    assert not keys.destroyed("2019-03")
    assert sorted(p.name for p in own.period_key_folder.iterdir()) == folder  # no key file touched
    with session_scope(own) as session:
        assert session.scalar(purging) == events  # nothing recorded

    done = dermq(own, "case", "purge-expired")
    assert done.returncode == 0, done.stderr
    (destroyed,) = [line for line in done.stdout.splitlines() if line.startswith("destroyed the keys of ")]
    assert "2019-03" in destroyed
    assert keys.destroyed("2019-03")
    assert not keys.destroyed("2019-04")
    with session_scope(own) as session:
        assert session.get(Case, finished).status == "purged"  # type: ignore[union-attr]
    assert dermq(own, "case", "erase", str(waiting), "--yes").returncode == 0  # nothing live left behind


def test_retention_deletes_settled_callback_deliveries_once_their_history_has_passed(own, tenant, store_case) -> None:  # type: ignore[no-untyped-def]
    """The outbox kept a row per finished case for good; the audit trail keeps every attempt, and a
    clinic's status reads the last day."""
    from datetime import UTC, datetime, timedelta

    from core.models import CallbackDelivery

    old = datetime.now(UTC) - timedelta(days=own.callback_history_days + 1)
    rows = {
        "old delivered": ("delivered", old),
        "old cancelled": ("cancelled", old),
        "recent failed": ("failed", datetime.now(UTC) - timedelta(days=1)),
        "old pending": ("pending", old),  # still to be sent: never deleted
    }
    ids = {name: store_case(tenant, name.encode()) for name in rows}
    with session_scope(own) as session:
        for name, (status, updated) in rows.items():
            session.add(
                CallbackDelivery(case_id=ids[name], clinic_id=tenant.clinic_id, status=status, updated_at=updated)
            )
    preview = dermq(own, "case", "purge-expired", "--dry-run")
    (would,) = [line for line in preview.stdout.splitlines() if line.startswith("would delete ")]
    assert int(would.split()[2]) == 2, preview.stdout  # the old delivered and cancelled ones
    with session_scope(own) as session:
        assert (
            session.scalar(
                select(func.count()).select_from(CallbackDelivery).where(CallbackDelivery.case_id.in_(ids.values()))
            )
            == 4
        )
    done = dermq(own, "case", "purge-expired")
    assert done.returncode == 0, done.stderr
    (deleted,) = [line for line in done.stdout.splitlines() if line.startswith("deleted ")]
    assert int(deleted.split()[1]) == 2
    with session_scope(own) as session:
        left = set(
            session.scalars(select(CallbackDelivery.case_id).where(CallbackDelivery.case_id.in_(ids.values()))).all()
        )
        assert left == {ids["recent failed"], ids["old pending"]}
        session.query(CallbackDelivery).filter(CallbackDelivery.case_id.in_(left)).delete()  # nothing left behind


def test_retention_empties_replaced_callback_secrets_whose_overlap_has_ended(own, tenant, keyring) -> None:  # type: ignore[no-untyped-def]
    from datetime import UTC, datetime, timedelta

    from core import audit, callbacks
    from core.keys import Principal
    from core.models import ClinicCallback, Role

    principal = Principal(tenant.key_id, Role.CLINIC, tenant.clinic_id)
    for _ in range(2):  # registered, then rotated: the first secret signs beside the second for a while
        with session_scope(own) as session:
            callbacks.register(
                session, keyring=keyring, settings=own, principal=principal, actor=audit.SYSTEM, url="http://x/"
            )
    with session_scope(own) as session:
        row = session.get(ClinicCallback, tenant.clinic_id)
        assert row is not None and row.previous_secret_ciphertext is not None
        row.previous_secret_until = datetime.now(UTC) - timedelta(seconds=1)  # its overlap has ended
    assert dermq(own, "case", "purge-expired").returncode == 0
    with session_scope(own) as session:
        row = session.get(ClinicCallback, tenant.clinic_id)
        assert row is not None
        assert (row.previous_secret_ciphertext, row.previous_secret_nonce, row.previous_secret_until) == (None,) * 3
        session.delete(row)
