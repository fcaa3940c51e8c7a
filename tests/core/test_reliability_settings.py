"""A key rotation re-wraps the clinics' sealed callback secrets along with the case blobs. (Fault
injection lives in the tests' own worker app, tests/faults/worker_app.py; tests/worker/test_layout.py
checks that no production module carries it.)"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from core import audit, callback_secrets, callbacks, keyrotation
from core.config import Settings
from core.crypto import Keyring, SealedBlob, decrypt_blob, load_keyring, write_key_file
from core.db import dispose_engines, session_scope
from core.keys import Principal
from core.models import ClinicCallback, Role
from tests import support


@pytest.mark.usefixtures("database")
def test_key_rotation_rewraps_callback_secrets(settings: Settings, tmp_path: Path) -> None:
    copy = tmp_path / "keys.json"
    write_key_file(copy, Keyring.generate())
    (tmp_path / "period-keys").mkdir(mode=0o700)  # as `dermq keys init` creates it beside the key file
    url = settings.database_url.rsplit("/", 1)[0] + f"/{support.TEST_DATABASE}_cbkeys"
    support.recreate_database(url)
    try:
        support.migrate(url)
        rotating = settings.model_copy(update={"key_file": copy, "database_url": url})
        from core import clinics

        with session_scope(rotating) as session:
            clinic = clinics.create_clinic(session, "callback rotation clinic")
            principal = Principal(uuid.uuid4(), Role.CLINIC, clinic.id)
            _, secret = callbacks.register(
                session,
                keyring=load_keyring(rotating),
                settings=rotating,
                principal=principal,
                actor=audit.SYSTEM,
                url="http://127.0.0.1:9/hook",
            )
        old = load_keyring(rotating).active_id
        with session_scope(rotating) as session:
            assert keyrotation.usage(session) == {old: 1}
        report = keyrotation.rotate(rotating)
        assert (report.rewrapped, report.remaining) == (1, 0)
        keyrotation.retire(rotating, old)  # nothing needs the old key any more
        keyring = load_keyring(rotating)
        with session_scope(rotating) as session:
            row = session.get(ClinicCallback, clinic.id)
            sealed = SealedBlob(row.secret_ciphertext, row.secret_nonce, row.secret_wrapped_key, row.kek_id)
            assert row.kek_id == keyring.active_id != old
            plain = decrypt_blob(keyring, sealed, case_id=clinic.id, kind=callback_secrets.SECRET_KIND)
        assert plain.decode() == secret
    finally:
        dispose_engines()
        support.drop_database(url)
