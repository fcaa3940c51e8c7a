"""Key rotation step by step: new active key, blobs readable throughout, resumable, old key removable."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import func, select

from core import case_images, keyrotation, periods
from core.config import Settings
from core.crypto import Keyring, load_keyring, write_key_file
from core.db import dispose_engines, session_scope
from core.errors import KeyringError
from core.models import CaseBlob
from tests import support
from tests.conftest import case_store

pytestmark = pytest.mark.usefixtures("database")


@pytest.fixture
def rotating(settings, tmp_path: Path) -> Iterator[Settings]:  # type: ignore[no-untyped-def]
    """Settings with a database and key file of their own: rotation re-wraps every blob it finds. The
    database is dropped afterwards."""
    copy = tmp_path / "keys.json"
    write_key_file(copy, Keyring.generate())
    (tmp_path / "period-keys").mkdir(mode=0o700)  # as `dermq keys init` creates it beside the key file
    url = settings.database_url.rsplit("/", 1)[0] + f"/{support.TEST_DATABASE}_rotation"
    support.recreate_database(url)
    try:
        support.migrate(url)
        yield settings.model_copy(update={"key_file": copy, "database_url": url})
    finally:
        dispose_engines()
        support.drop_database(url)


@pytest.fixture
def rotating_tenant(rotating: Settings):  # type: ignore[no-untyped-def]
    from core import clinics, keys
    from core.models import Role
    from tests.conftest import Tenant

    with session_scope(rotating) as session:
        clinic = clinics.create_clinic(session, "rotation clinic")
        key, token = keys.create_key(session, load_keyring(rotating), role=Role.CLINIC, clinic_id=clinic.id)
        return Tenant(clinic.id, clinic.name, token, key.id)


def _blob_count(settings: Settings, kek_id: str) -> int:
    with session_scope(settings) as session:
        return session.scalar(select(func.count()).select_from(CaseBlob).where(CaseBlob.kek_id == kek_id)) or 0


def _period_file(settings: Settings, period: str) -> dict:  # type: ignore[type-arg]
    assert settings.period_key_folder is not None
    return json.loads((settings.period_key_folder / f"{period}.json").read_text())


def test_rotation_end_to_end(rotating: Settings, rotating_tenant, jpeg_bytes: bytes) -> None:  # type: ignore[no-untyped-def]
    from fastapi.testclient import TestClient

    from api.app import create_app

    app = create_app(rotating)
    tenant = rotating_tenant
    before = load_keyring(rotating)
    old, period = before.active_id, before.periods.current(datetime.now(UTC))  # type: ignore[union-attr]
    # two cases stored before period keys existed: wrapped directly under the key file's KEK
    legacy = [case_store(rotating, replace(before, periods=None))(tenant, jpeg_bytes) for _ in range(2)]
    with TestClient(app) as http:
        ids = [
            http.post("/v1/cases", headers=tenant.headers, files={"image": ("x.jpg", jpeg_bytes, "image/jpeg")}).json()[
                "id"
            ]
            for _ in range(5)
        ]
        # new cases: under their period's key, which is itself wrapped under the key file's KEK
        assert _blob_count(rotating, periods.kek_id(period)) == 5 and _blob_count(rotating, old) == 2
        assert _period_file(rotating, period)["kek_id"] == old

        # A crash after the first batch: the key file has the new key, the period key is re-wrapped
        # under it, one legacy blob has moved under its period's key.
        partial = keyrotation.rotate(rotating, batch=1, max_batches=1)
        new = partial.active
        assert new != old and partial.remaining == 1 and _blob_count(rotating, old) == 1
        assert _period_file(rotating, period)["kek_id"] == new
        keys_now = json.loads(rotating.key_file.read_text())  # type: ignore[union-attr]
        assert keys_now["active"] == new and set(keys_now["keys"]) == {old, new}
        with pytest.raises(KeyringError, match="still wrapped"):
            keyrotation.retire(rotating, old)

        # Mid-rotation: everything still decrypts, and the running app seals new blobs under the period key.
        assert all(_heatless_read(http, tenant, i) for i in ids)
        fresh = http.post("/v1/cases", headers=tenant.headers, files={"image": ("x.jpg", jpeg_bytes, "image/jpeg")})
        with session_scope(rotating) as session:
            kek = session.scalar(select(CaseBlob.kek_id).where(CaseBlob.case_id == uuid.UUID(fresh.json()["id"])))
        assert kek == periods.kek_id(period)

        resumed = keyrotation.rewrap_all(rotating, batch=2)
        assert resumed.remaining == 0 and _blob_count(rotating, old) == 0
        keyrotation.retire(rotating, old)
        assert set(json.loads(rotating.key_file.read_text())["keys"]) == {new}  # type: ignore[union-attr]
        # With only the new key left, every image still decrypts (worker-side read of the stored blob),
        # the stale keyring's too: it re-reads the key file for a period key wrapped after it was loaded.
        assert all(_stored_image_decrypts(rotating, str(i), jpeg_bytes) for i in [*ids, *legacy])
        with session_scope(rotating) as session:
            images, unreadable = case_images.read_images(session, keyring=before, case_ids=[legacy[0]])
            assert not unreadable and images[legacy[0]].data == jpeg_bytes
    with pytest.raises(KeyringError, match="active key"):
        keyrotation.retire(rotating, new)


def _heatless_read(http, tenant, case_id: str) -> bool:  # type: ignore[no-untyped-def]
    return http.get(f"/v1/cases/{case_id}", headers=tenant.headers).status_code == 200


def _stored_image_decrypts(settings: Settings, case_id: str, expected: bytes) -> bool:

    with session_scope(settings) as session:
        images, _ = case_images.read_images(session, keyring=load_keyring(settings), case_ids=[uuid.UUID(case_id)])
        return uuid.UUID(case_id) in images and images[uuid.UUID(case_id)].data == expected


def test_rotation_needs_a_key_file(settings) -> None:  # type: ignore[no-untyped-def]
    inline = settings.model_copy(update={"keys_json": json.dumps(Keyring.generate().to_json())})
    with pytest.raises(KeyringError, match="secret store"):
        keyrotation.rotate(inline)


def test_a_retirement_waits_for_a_rotation_in_progress_and_keeps_its_new_key(rotating: Settings) -> None:
    # rotate and retire both read, change and write the key file: a retirement that read the file
    # before a rotation wrote it would write back its stale copy, dropping the key everything was
    # just re-wrapped under
    assert rotating.key_file is not None
    old = load_keyring(rotating)
    write_key_file(rotating.key_file, old.with_new_active_key(), overwrite=True)  # old.active_id is retirable
    retired: list[Keyring] = []
    with keyrotation.changing_key_file(rotating):  # a rotation holds the key file from here...
        retiring = threading.Thread(target=lambda: retired.append(keyrotation.retire(rotating, old.active_id)))
        retiring.start()
        retiring.join(0.5)
        assert retiring.is_alive()  # waiting for the rotation
        rotated = load_keyring(rotating).with_new_active_key()
        write_key_file(rotating.key_file, rotated, overwrite=True)  # ...to here
    retiring.join(30)
    assert retired and retired[0].active_id == rotated.active_id
    after = load_keyring(rotating)
    assert after.active_id == rotated.active_id and old.active_id not in after.keks
    assert set(after.keks) == set(rotated.keks) - {old.active_id}


def test_a_rotation_on_a_copy_of_a_mounted_key_file_leaves_the_running_services_able_to_read(  # type: ignore[no-untyped-def]
    rotating: Settings, rotating_tenant, jpeg_bytes: bytes, tmp_path: Path
) -> None:
    """deploy/README.md rotates a copy of the key file the services mount as a secret. Re-wrapping
    at once put the shared period keys under a KEK only the copy had: every running process failed
    to decrypt until the new secret reached it. ``rewrap=False`` changes only the copy; the re-wrap
    follows once the new file is deployed."""
    case_id = case_store(rotating, load_keyring(rotating))(rotating_tenant, jpeg_bytes)
    running = load_keyring(rotating)  # a service's keyring, from the mounted file
    period = running.periods.current(datetime.now(UTC))  # type: ignore[union-attr]
    copy = tmp_path / "copy" / "keys.json"
    copy.parent.mkdir()
    copy.write_bytes(rotating.key_file.read_bytes())  # type: ignore[union-attr]
    copy.chmod(0o600)
    on_copy = rotating.model_copy(update={"key_file": copy, "period_key_dir": rotating.period_key_folder})
    report = keyrotation.rotate(on_copy, rewrap=False)
    assert report.active != running.active_id and report.remaining == -1
    assert _period_file(rotating, period)["kek_id"] == running.active_id  # the shared folder is untouched
    assert _stored_image_decrypts(rotating, str(case_id), jpeg_bytes)  # with the mounted file, as before
    with session_scope(rotating) as session:
        images, unreadable = case_images.read_images(session, keyring=running, case_ids=[case_id])
        assert not unreadable and images[case_id].data == jpeg_bytes

    rotating.key_file.write_bytes(copy.read_bytes())  # type: ignore[union-attr]  # the new secret, deployed
    assert keyrotation.rewrap_all(rotating).remaining == 0
    assert _period_file(rotating, period)["kek_id"] == report.active
    assert _stored_image_decrypts(rotating, str(case_id), jpeg_bytes)


def test_a_rewrap_moves_what_it_can_and_leaves_what_a_missing_key_wraps(  # type: ignore[no-untyped-def]
    rotating: Settings, rotating_tenant, jpeg_bytes: bytes
) -> None:
    """One blob under a KEK the key file lacks (a key file restored from before a rotation) made
    every run fail at the same row, moving nothing: the rest is re-wrapped, it is left and counted."""
    legacy_keys = replace(load_keyring(rotating), periods=None)  # wrapped straight under the KEK
    stranded, movable = (case_store(rotating, legacy_keys)(rotating_tenant, jpeg_bytes) for _ in range(2))
    with session_scope(rotating) as session:
        session.execute(
            CaseBlob.__table__.update().where(CaseBlob.case_id == stranded).values(kek_id="kek-not-in-the-file")
        )
    report = keyrotation.rewrap_all(rotating)
    assert (report.rewrapped, report.remaining) == (1, 1)
    assert _stored_image_decrypts(rotating, str(movable), jpeg_bytes)
    assert _blob_count(rotating, "kek-not-in-the-file") == 1


def test_a_rewrap_skips_and_names_the_rows_it_cannot_rewrap_and_moves_everything_else(  # type: ignore[no-untyped-def]
    rotating: Settings, rotating_tenant, jpeg_bytes: bytes
) -> None:
    """A blob whose wrapped key does not open (tampered) and one of a case whose period key was destroyed
    (restored from an older backup) made every run fail at the same batch, naming neither, and the
    callback secrets waited for a batch without blobs that never came: they stayed under the old KEK and
    it could never be retired. Now each is left, named and counted; the rest moves."""
    from core import callback_secrets
    from core.models import Case, ClinicCallback
    from tests.cli.test_commands import run

    old = load_keyring(rotating)
    legacy_keys = replace(old, periods=None)  # wrapped straight under the key file's KEK
    tampered, expired, *movable = (case_store(rotating, legacy_keys)(rotating_tenant, jpeg_bytes) for _ in range(4))
    old.periods.destroy("2020-01", reason="retention")  # type: ignore[union-attr]
    with session_scope(rotating) as session:
        session.execute(
            CaseBlob.__table__.update().where(CaseBlob.case_id == tampered).values(wrapped_key=b"\x00" * 60)
        )
        session.execute(
            Case.__table__.update().where(Case.id == expired).values(created_at=datetime(2020, 1, 15, tzinfo=UTC))
        )
        values, _ = callback_secrets.sealed(
            old, rotating_tenant.clinic_id, "whsec_portal", replaced=None, at=datetime.now(UTC), overlap=0
        )
        session.add(ClinicCallback(clinic_id=rotating_tenant.clinic_id, url="https://portal.example/hook", **values))

    report = keyrotation.rotate(rotating, batch=1)  # one row a batch: whichever comes first, the rest go on
    assert sorted(row.row for row in report.skipped) == sorted([f"case {tampered} image", f"case {expired} image"])
    assert any("does not unwrap" in row.reason for row in report.skipped)
    assert any("2020-01 was destroyed" in row.reason for row in report.skipped)
    assert report.remaining == 2 and _blob_count(rotating, old.active_id) == 2
    assert all(_stored_image_decrypts(rotating, str(i), jpeg_bytes) for i in movable)
    with session_scope(rotating) as session:
        secret = session.get(ClinicCallback, rotating_tenant.clinic_id)
        assert secret is not None and secret.kek_id == report.active
        assert callback_secrets.current(load_keyring(rotating), secret) == "whsec_portal"
    with pytest.raises(KeyringError, match="2 blobs or period keys are still wrapped"):
        keyrotation.retire(rotating, old.active_id)

    again = run(rotating, "keys", "rewrap")
    assert again.returncode == 1, again.stderr
    assert "2 rows could not be re-wrapped" in again.stderr
    assert f"case {tampered} image" in again.stderr and f"case {expired} image" in again.stderr
