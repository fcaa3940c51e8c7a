"""A backup restored over a destroyed period brings back cases whose blobs no key opens: reading one
answers 410 ``period_key_destroyed`` (it answered 500), and no process keeps the destroyed key."""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import replace
from datetime import timedelta

import pytest
from sqlalchemy import null, select, update

from core import keyrotation, period_shredding, results
from core.crypto import decrypt_blob, load_keyring
from core.db import session_scope
from core.models import AuditEvent, Case, CaseBlob, Result
from tests.conftest import create_case_for
from tests.core.test_period_keys import NOW, Site, blob_rows, destroy_expired, erase, site  # noqa: F401  (site: the fixture)

pytestmark = pytest.mark.usefixtures("database")


def test_a_case_restored_after_its_period_key_was_destroyed_is_gone_not_an_error(site: Site) -> None:  # noqa: F811
    """A backup restored over a destroyed period brings back a case whose blobs no key opens: reading
    it answered 500. It answers 410 ``period_key_destroyed``, and no process keeps the key cached."""
    from fastapi.testclient import TestClient

    from api.app import create_app
    from core.errors import PeriodKeyDestroyed

    when = NOW - timedelta(days=150)
    legacy = replace(load_keyring(site.settings), periods=None)
    with session_scope(site.settings) as session:
        case, _ = create_case_for(session, legacy, site.tenant, client_ref="p-1")
        case_id = case.id
        session.execute(update(Case).where(Case.id == case_id).values(created_at=when, status="succeeded"))
    assert keyrotation.rewrap_all(site.settings).remaining == 0
    serving = load_keyring(site.settings)  # a process that read the period's key before its destruction
    with session_scope(site.settings) as session:
        backup = [
            dict(row._mapping) for row in session.execute(select(CaseBlob.__table__).where(CaseBlob.case_id == case_id))
        ]
        assert [
            decrypt_blob(serving, b.sealed, case_id=case_id, kind=b.kind)
            for b in session.scalars(select(CaseBlob).where(CaseBlob.kind == "client_ref"))
        ] == [b"p-1"]
    erase(site, case_id)
    assert destroy_expired(site.settings) == [site.period(when)]
    with session_scope(site.settings) as session:  # the restore: the case and its blobs as the backup had them
        session.execute(CaseBlob.__table__.insert(), backup)
        session.execute(update(Case).where(Case.id == case_id).values(status="succeeded", purged_at=None))
    sealed = next(row for row in blob_rows(site) if row[1] == "client_ref")[2]
    with pytest.raises(PeriodKeyDestroyed):
        decrypt_blob(serving, sealed, case_id=case_id, kind="client_ref")
    assert serving.periods is not None and not serving.periods._held.periods()  # forgotten where it was held
    with session_scope(site.settings) as session:  # and its result and heat map, sealed under the same key
        copies = [
            {**next(b for b in backup if b["kind"] == "client_ref"), "kind": kind} for kind in ("result", "heatmap")
        ]
        for copy in copies:
            copy.pop("id", None)
        session.execute(CaseBlob.__table__.insert(), copies)
        session.add(sealed_result(case_id))
    with TestClient(create_app(site.settings), raise_server_exceptions=False) as client:
        answer = client.get(f"/v1/cases/{case_id}", headers=site.tenant.headers)
        refused = [
            client.get(f"/v1/cases/{case_id}/fhir", headers=site.tenant.headers),
            client.get(f"/v1/cases/{case_id}/heatmap.png", headers=site.tenant.headers),
            client.post(
                f"/v1/cases/{case_id}/outcome", headers=site.tenant.headers, json={"diagnosis": "nv", "method": "histo"}
            ),
        ]
        listed = client.get("/v1/cases", headers=site.tenant.headers)
    for response in (answer, *refused):
        assert (response.status_code, response.json()["code"]) == (410, "period_key_destroyed"), response.text
    # each refusal is in the audit trail, under the key that asked: someone reached data a restored backup
    # brought back
    with session_scope(site.settings) as session:
        reason = AuditEvent.detail["reason"].astext
        events = session.execute(
            select(AuditEvent.action, AuditEvent.outcome, AuditEvent.actor_key_id)
            .where(AuditEvent.entity_id == str(case_id), reason == "period_key_destroyed")
            .order_by(AuditEvent.id)
        ).all()
    assert [tuple(event) for event in events] == [
        (action, "failure", site.tenant.key_id) for action in ("case.read", "case.read", "heatmap.read", "case.outcome")
    ]
    # one such case does not take the clinic's list down: it is listed without what no key opens
    assert listed.status_code == 200, listed.text
    row = next(item for item in listed.json()["items"] if item["id"] == str(case_id))
    assert (row["client_ref"], row["outcome"], row["label"]) == (None, None, None)
    with session_scope(site.settings) as session:  # nor a report that reads results (drift)
        assert results.read_results(session, serving, [case_id], skip_destroyed=True) == {}
        with pytest.raises(PeriodKeyDestroyed):
            results.read_results(session, serving, [case_id])


def sealed_result(case_id: uuid.UUID) -> Result:
    """A result row as this release stores it: every finding sealed (its columns NULL)."""
    return Result(
        case_id=case_id,
        outcome="diagnosis",
        ood_reasons=null(),  # SQL NULL: None would leave the columns to their '[]' default
        referral_reasons=null(),
        gradcam_status="ok",
        model_id="m",
        weights_sha256="0" * 64,
        device="cpu",
        timings={},
    )


def test_a_period_key_folder_that_is_not_there_is_a_keyring_error_not_a_lost_key(settings, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A worker whose key volume is not mounted read every case's key as missing (DecryptionError),
    and failed each case it took for good; a folder that is not there, or holds no key at all, is
    the worker's to mend (KeyringError: the case waits). One period's key missing from a folder
    holding others still does not decrypt."""
    from core.errors import DecryptionError, KeyringError
    from core.period_keys import PeriodKeys
    from core.periods import kek_id

    keyring = load_keyring(settings)
    for folder in (tmp_path / "not-mounted", tmp_path / "empty"):
        if folder.name == "empty":
            folder.mkdir()
        with pytest.raises(KeyringError, match="volume mounted"):
            PeriodKeys(folder, settings).key(keyring, kek_id("2026-11"))
    holding = PeriodKeys(tmp_path / "holding", settings)
    holding.create_folder()
    holding.ensure("2026-10")
    with pytest.raises(DecryptionError, match="no key for period 2026-11"):
        holding.key(keyring, kek_id("2026-11"))


def test_a_destroyed_period_leaves_no_copy_of_its_key_behind(settings, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A key file's write that a crash interrupted leaves its temporary file: the same key under
    another name (after the hard link, the very same file), which destruction left in place."""
    from core.period_keys import PeriodKeys

    keys = PeriodKeys(tmp_path / "keys", settings)
    keys.create_folder()
    keys.ensure("2026-09")
    key_file = keys.folder / "2026-09.json"
    leftover = keys.folder / ".2026-09.json.k3xq9z"
    os.link(key_file, leftover)  # as a crash between the link and the clean-up leaves it
    keys.destroy("2026-09", reason="retention")
    assert not key_file.exists() and not leftover.exists()
    assert sorted(p.name for p in keys.folder.iterdir() if "2026-09" in p.name) == ["2026-09.destroyed"]


def test_a_period_that_ended_moments_ago_is_not_destroyed(site: Site) -> None:  # noqa: F811
    """A request that chose the period before midnight may still be sealing under it (its upload
    arriving, its host's clock behind): destroyed at once, its accepted case could never be read."""
    from core.errors import Conflict

    current = site.period(NOW)
    load_keyring(site.settings).periods.ensure(current)  # type: ignore[union-attr]
    _, end = period_shredding.bounds(current)
    with pytest.raises(Conflict) as just_ended:
        period_shredding.destroy_period(site.settings, current, force=True, now=end + timedelta(minutes=5))
    assert just_ended.value.code == "period_not_ended"


def test_a_rewrap_leaves_no_copy_of_a_period_key_under_the_old_kek(settings, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A crash between the link and the clean-up of a key file's write leaves its temporary file, a hard
    link to the key file. A re-wrap replaced the key file and left that copy, still wrapped under the
    old KEK: once it was retired, an old copy of the key file still opened the period's key."""
    from core.crypto import Keyring, write_key_file
    from core.period_keys import PeriodKeys

    key_file = tmp_path / "keys.json"
    write_key_file(key_file, Keyring.generate())
    own = settings.model_copy(update={"key_file": key_file, "period_key_dir": tmp_path / "keys"})
    keys = PeriodKeys(tmp_path / "keys", own)
    keys.create_folder()
    keys.ensure("2026-09")
    leftover = keys.folder / ".2026-09.json.k3xq9z"
    os.link(keys.folder / "2026-09.json", leftover)  # as a crash between the link and the clean-up leaves it
    minutes_ago = time.time() - 600
    os.utime(leftover, (minutes_ago, minutes_ago))
    # another host's write under way, on a volume whose flock is local: its temporary file is new
    writing = keys.folder / ".2026-10.json.w8r1te"
    writing.write_bytes(b"{}")
    old = load_keyring(own)
    rotated = old.with_new_active_key()
    write_key_file(key_file, rotated, overwrite=True)
    assert keys.rewrap(load_keyring(own)) == 1
    assert not leftover.exists() and writing.exists()
    writing.unlink()
    assert sorted(p.name for p in keys.folder.iterdir()) == [".lock", "2026-09.json"]
    assert json.loads((keys.folder / "2026-09.json").read_text())["kek_id"] == rotated.active_id


def test_a_period_destroyed_by_another_process_leaves_no_copy_of_its_key_in_this_ones_memory(  # type: ignore[no-untyped-def]
    settings, tmp_path
) -> None:
    """Each API and worker process holds the keys it has opened; once retention (another process: beat's
    purge, the command) has destroyed a period, every case of it is purged and none is asked for again.
    The process's watcher (every FORGET_SECONDS; called here at once) forgets the destroyed period's key
    without being asked for any key, and overwrites it: the buffer it was used from holds zeros."""
    from core.period_keys import PeriodKeys
    from core.periods import kek_id

    keyring = load_keyring(settings)
    folder = tmp_path / "keys"
    retention = PeriodKeys(folder, settings)  # the process that destroys (beat's purge)
    retention.create_folder()
    api = PeriodKeys(folder, settings)  # a process that sealed and read the period's cases
    for period in ("2026-09", "2026-10"):
        retention.ensure(period)
        api.key(keyring, kek_id(period))
    held = api.key(keyring, kek_id("2026-09"))
    destroyed = bytes(held)
    retention.destroy("2026-09", reason="retention")
    assert api._held.forget_destroyed() == ["2026-09"]
    assert api._held.periods() == ["2026-10"]
    assert held == bytes(len(destroyed)) != destroyed  # overwritten, not merely dropped


def test_a_tombstone_that_cannot_be_looked_for_keeps_the_key_in_use(  # type: ignore[no-untyped-def]
    settings, tmp_path, monkeypatch
) -> None:
    """The shared volume failing a look (an I/O error, a stale network mount) says nothing of a
    destruction: the key stays whole. It was overwritten as if destroyed, under a thread that might be
    wrapping a new case's data key with it (a data key wrapped under zeros, readable by anyone with the
    database, and never shredded)."""
    import errno

    from core.period_keys import PeriodKeys
    from core.periods import kek_id

    keyring = load_keyring(settings)
    api = PeriodKeys(tmp_path / "keys", settings)
    api.create_folder()
    api.ensure("2026-10")
    held = api.key(keyring, kek_id("2026-10"))
    whole = bytes(held)
    real_stat = os.stat

    def failing(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        if str(path).endswith(".destroyed"):
            raise OSError(errno.EIO, "Input/output error")
        return real_stat(path, *args, **kwargs)

    with monkeypatch.context() as patched:
        patched.setattr(os, "stat", failing)
        assert api._held.forget_destroyed() == []
    assert held == whole and api._held.periods() == ["2026-10"]


def test_a_forked_child_starts_without_its_parents_period_keys(settings, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A forked child (a Celery worker child) gets a copy of its parent's memory but not its watcher
    thread: the keys it inherited would never be looked after. It overwrites them at once (and unwraps
    again what it needs, looked after by a watcher of its own); the parent keeps its own."""
    from core.periods import kek_id
    from tests.probes import probe

    folder = tmp_path / "keys"
    code = f"""
import json, os
from core.config import Settings
from core.crypto import load_keyring
from core.period_keys import PeriodKeys
settings = Settings(period_key_dir={str(folder)!r})
keyring = load_keyring(settings)
keys = keyring.periods
keys.create_folder()
keys.ensure("2026-09")
held = keys.key(keyring, {kek_id("2026-09")!r})
read, write = os.pipe()
if (pid := os.fork()) == 0:
    os.write(write, json.dumps([keys._held.periods(), any(held)]).encode())
    os._exit(0)
os.waitpid(pid, 0)
child = json.loads(os.read(read, 1000))
print(json.dumps({{"child": child, "parent": [keys._held.periods(), any(held)]}}))
"""
    env = {"DERMQ_KEY_FILE": str(settings.key_file)}
    assert probe(code, env) == {"child": [[], False], "parent": [["2026-09"], True]}
