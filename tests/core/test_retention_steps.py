"""Retention's steps each run on their own. A period key file with a mode open to others (a
KeyringError) or a tombstone that is not JSON made the period-key listing raise, and with it beat's
whole purge after the cases: no period key was destroyed, and no replaced callback secret, old
callback delivery or field month was dropped, run after run. Such a file is now listed with its
problem, and a step that does fail (here, a period "key file" that is a folder) is logged, named and
counted while the others still run."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from core import audit, callbacks, keyrotation, retention
from core.crypto import load_keyring, write_key_file
from core.db import session_scope
from core.errors import KeyringError
from core.keys import Principal
from core.logs import JsonFormatter
from core.models import CallbackDelivery, ClinicCallback, Role
from core.retention_steps import StepFailure
from tests import support
from tests.cli.test_commands import run
from tests.conftest import case_store
from tests.core.test_period_keys import Site, site  # noqa: F401  (site: the fixture)

pytestmark = pytest.mark.usefixtures("database")


def test_a_bad_period_file_or_a_failing_step_stops_no_other_retention_step(site: Site) -> None:  # noqa: F811
    settings, tenant = site.settings, site.tenant
    keyring = load_keyring(settings)
    keys = keyring.periods
    assert keys is not None and settings.period_key_folder is not None
    keys.ensure("2019-05")
    (keys.folder / "2019-05.json").chmod(0o644)  # readable by others: listing it raised KeyringError
    (keys.folder / "2019-06.destroyed").write_text("{ not json")  # listing it raised a JSON error
    (keys.folder / "2019-07.json").mkdir()  # not a file: destroying it fails, on its own
    principal = Principal(tenant.key_id, Role.CLINIC, tenant.clinic_id)
    for _ in range(2):  # registered, then rotated: the first secret signs beside the second for a while
        with session_scope(settings) as session:
            callbacks.register(
                session, keyring=keyring, settings=settings, principal=principal, actor=audit.SYSTEM, url="http://x/"
            )
    old = datetime.now(UTC) - timedelta(days=settings.callback_history_days + 1)
    delivered = case_store(settings, keyring)(tenant, b"delivered long ago")
    with session_scope(settings) as session:
        session.get(ClinicCallback, tenant.clinic_id).previous_secret_until = old  # type: ignore[union-attr]
        session.add(CallbackDelivery(case_id=delivered, clinic_id=tenant.clinic_id, status="delivered", updated_at=old))

    listed = {entry.period: entry for entry in keys.list()}
    assert "mode 644" in str(listed["2019-05"].problem) and listed["2019-05"].wrapped_by is None
    assert listed["2019-06"].destroyed_at == "unknown" and "not one dermq wrote" in str(listed["2019-06"].problem)
    assert [entry.period for entry in keyrotation.unreadable_period_keys(keyring)] == ["2019-05", "2019-07"]
    # which key wraps an unreadable period key cannot be told: no key is retired while one is left
    assert settings.key_file is not None
    write_key_file(settings.key_file, keyring.with_new_active_key(), overwrite=True)
    with pytest.raises(KeyringError, match="2 period key files cannot be read"):
        keyrotation.retire(settings, keyring.active_id)

    report = retention.run(settings)
    assert report.failed == ["destroy_periods"]  # the folder named like a key file
    assert keys.destroyed("2019-05") and not (keys.folder / "2019-05.json").exists()  # due, and destroyed
    with session_scope(settings) as session:
        secret = session.get(ClinicCallback, tenant.clinic_id)
        assert secret is not None and secret.previous_secret_ciphertext is None  # the steps after it ran
        assert session.scalar(select(CallbackDelivery.case_id).where(CallbackDelivery.case_id == delivered)) is None
    by_hand = run(settings, "case", "purge-expired")
    assert (
        by_hand.returncode == 1 and "failed: destroy_periods, period 2019-07 (IsADirectoryError)" in by_hand.stderr
    ), by_hand.stderr
    # a database that cannot be reached is no failed step: nothing ran, and the command says so
    nobody = f"postgresql://dermq@127.0.0.1:{support.free_port()}/dermq"
    unreachable = run(settings, "case", "purge-expired", DERMQ_DATABASE_URL=nobody)
    assert unreachable.returncode == 69 and "the database cannot be reached" in unreachable.stderr
    assert "purged" not in unreachable.stdout


def test_a_failure_is_reported_at_once_though_a_later_step_loses_the_database(site: Site) -> None:  # noqa: F811
    """A lost database connection ends the run where it happens (no later step could run): the failures
    before it were reported only in what the run returned, which it then never did. They are handed on
    as they happen: beat's purge counts them (tests/worker/test_retention_metrics.py), the command names
    them."""
    keys = load_keyring(site.settings).periods
    assert keys is not None
    (keys.folder / "2019-07.json").mkdir()  # destroy_periods fails
    seen: list[StepFailure] = []
    # forget_callback_secrets, two steps after it, loses its connection
    with support.connection_lost_on(site.settings, "clinic_callbacks", "UPDATE"):
        with pytest.raises(OperationalError) as lost:
            retention.run(site.settings, on_failure=seen.append)
        assert lost.value.connection_invalidated  # a real lost connection, not a refused statement
        by_hand = run(site.settings, "case", "purge-expired")
    assert [str(failure) for failure in seen] == ["destroy_periods, period 2019-07 (IsADirectoryError)"]
    assert "failed: destroy_periods, period 2019-07 (IsADirectoryError)" in by_hand.stderr, by_hand.stderr
    assert by_hand.returncode == 69 and "the database cannot be reached" in by_hand.stderr, by_hand.stderr


def test_a_period_whose_key_cannot_be_destroyed_stops_no_other_period(site: Site, caplog) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    """The destruction of expired periods stopped at the first that failed: every later expired period
    kept its key (and every backup of its cases stayed readable) until that one was mended. Each that
    fails is now reported, in the log, to ``on_failure`` (the metric) and by the command, and the
    others are destroyed."""
    keys = load_keyring(site.settings).periods
    assert keys is not None
    for period in ("2019-08", "2019-10"):
        keys.ensure(period)  # expired, no case: due for destruction
    for period in ("2019-07", "2019-09"):
        (keys.folder / f"{period}.json").mkdir()  # not a file: destroying it fails
    seen: list[StepFailure] = []
    with caplog.at_level(logging.ERROR, logger="dermq.retention"):
        report = retention.run(site.settings, on_failure=seen.append)
    assert report.periods_destroyed == ["2019-08", "2019-10"]
    assert keys.destroyed("2019-08") and keys.destroyed("2019-10")
    assert not (keys.folder / "2019-10.json").exists()
    assert report.failed == ["destroy_periods"] and report.failures == seen
    assert [str(failure) for failure in seen] == [
        "destroy_periods, period 2019-07 (IsADirectoryError)",
        "destroy_periods, period 2019-09 (IsADirectoryError)",
    ]
    lines = [json.loads(JsonFormatter("worker").format(r)) for r in caplog.records]
    assert [(line["event"], line["step"], line["period"], line["error"]) for line in lines] == [
        ("retention_step_failed", "destroy_periods", period, "IsADirectoryError") for period in ("2019-07", "2019-09")
    ]
    keys.ensure("2019-11")  # one more, due now
    by_hand = run(site.settings, "case", "purge-expired")
    assert by_hand.returncode == 1, by_hand.stderr
    assert "destroyed the keys of 1 period(s): 2019-11" in by_hand.stdout
    for period in ("2019-07", "2019-09"):
        assert f"failed: destroy_periods, period {period} (IsADirectoryError)" in by_hand.stderr, by_hand.stderr
