"""A key rotation rolling out: an API process with the rotation's new key file seals an image under the
new key before a worker's mounted key file has it (Kubernetes updates a mounted Secret within about
a minute). That used to read as an image that can never be decrypted, and the case failed for good.
It is a key this worker does not hold yet: the case waits in the queue, its attempt given back, and
is classified once the worker's key file has the key. On a database of this module's own."""

from __future__ import annotations

import pytest
from sqlalchemy import update

from core.crypto import Keyring, encrypt_blob, load_keyring, write_key_file
from core.db import session_scope
from core.models import BlobKind, Case, CaseBlob
from tests.conftest import own_database_fixtures
from worker.batching import run_batch

pytestmark = pytest.mark.usefixtures("database", "empty_queue")  # empty_queue: tests/conftest.py

tenant, store_case = own_database_fixtures()


def test_an_image_sealed_under_a_key_this_worker_does_not_hold_yet_waits_for_it(  # type: ignore[no-untyped-def]
    own_database, tenant, store_case, jpeg_bytes, tmp_path
) -> None:
    stack = load_keyring(own_database)
    key_file = tmp_path / "keys.json"  # the worker's mounted key file, before the rotation reaches it
    write_key_file(key_file, stack)
    config = own_database.model_copy(
        update={
            "key_file": key_file,
            "period_key_dir": own_database.period_key_folder,
            "batching": "on",
            "batch_max_size": 4,
            "batch_max_wait_ms": 0,
        }
    )
    case_id = store_case(tenant, jpeg_bytes)
    rotated = stack.with_new_active_key()  # the API process's key file, after the rotation
    sealed = encrypt_blob(
        Keyring(rotated.active_id, rotated.keks, rotated.api_key_pepper), jpeg_bytes, case_id=case_id, kind="image"
    )
    with session_scope(config) as session:
        session.execute(
            update(CaseBlob)
            .where(CaseBlob.case_id == case_id, CaseBlob.kind == BlobKind.IMAGE.value)
            .values(
                ciphertext=sealed.ciphertext, nonce=sealed.nonce, wrapped_key=sealed.wrapped_key, kek_id=sealed.kek_id
            )
        )

    for _ in range(3):  # each worker that takes it before its key file is updated puts it back, spending nothing
        assert run_batch(config, case_id) == "requeued"
    with session_scope(config) as session:
        case = session.get(Case, case_id)
        assert case is not None and (case.status, case.attempts, case.failure_code) == ("queued", 0, None)

    write_key_file(key_file, rotated, overwrite=True)  # the kubelet updates the mounted file
    assert run_batch(config, case_id) == "succeeded"
