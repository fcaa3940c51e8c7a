"""Fault injection exists for tests only: Settings refuses it elsewhere and the hook ignores it anyway.
And a key rotation re-wraps the clinics' sealed callback secrets along with the case blobs."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from core import audit, callbacks, keyrotation
from core.config import FaultInjection, Settings
from core.crypto import Keyring, SealedBlob, decrypt_blob, load_keyring, write_key_file
from core.db import dispose_engines, session_scope
from core.keys import Principal
from core.models import ClinicCallback, Role
from tests import support
from worker import faults


@pytest.mark.parametrize("environment", ["development", "production"])
def test_fault_injection_is_refused_outside_tests(monkeypatch: pytest.MonkeyPatch, environment: str) -> None:
    monkeypatch.setenv("DERMQ_ENVIRONMENT", environment)
    monkeypatch.setenv("DERMQ_FAULT_INJECTION", '{"exit_during_inference": true}')
    with pytest.raises(ValidationError, match="only with DERMQ_ENVIRONMENT=test"):
        Settings()


def test_fault_injection_is_parsed_strictly_in_tests(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DERMQ_ENVIRONMENT", "test")
    monkeypatch.setenv("DERMQ_FAULT_INJECTION", '{"sleep_before_inference": 2.5, "attempts": [1]}')
    assert Settings().fault_injection == FaultInjection(sleep_before_inference=2.5, attempts=[1])
    monkeypatch.setenv("DERMQ_FAULT_INJECTION", '{"sleep_before_inferense": 2.5}')  # a typo is an error
    with pytest.raises(ValidationError, match="sleep_before_inferense"):
        Settings()
    monkeypatch.delenv("DERMQ_FAULT_INJECTION")
    assert Settings().fault_injection is None


def test_the_hook_acts_only_in_tests_and_on_the_attempts_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(faults, "_ooms_raised", 0)
    armed = FaultInjection(cuda_oom_times=1, attempts=[2])
    # Even settings that skipped validation cannot arm it outside tests.
    faults.before_inference(Settings.model_construct(environment="production", fault_injection=armed), 2)
    test = Settings(environment="test", fault_injection=armed)
    faults.before_inference(test, 1)  # not an attempt it names
    with pytest.raises(torch.OutOfMemoryError):
        faults.before_inference(test, 2)
    faults.before_inference(test, 2)  # once per process


@pytest.mark.usefixtures("database")
def test_key_rotation_rewraps_callback_secrets(settings: Settings, tmp_path: Path) -> None:
    copy = tmp_path / "keys.json"
    write_key_file(copy, Keyring.generate())
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
            plain = decrypt_blob(keyring, sealed, case_id=clinic.id, kind=callbacks.SECRET_KIND)
        assert plain.decode() == secret
    finally:
        dispose_engines()
        support.drop_database(url)
