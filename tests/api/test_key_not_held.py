"""A read of data sealed under a key the API process does not hold yet (a key rotation rolling out: an
API process with the new key file sealed it, this one's file is not updated yet) answers 503
``key_unavailable`` with a ``Retry-After``, returns nothing and records no read. It was a 500."""

from __future__ import annotations

import uuid

from sqlalchemy import func, select

from core.crypto import Keyring, encrypt_blob
from core.db import session_scope
from core.models import AuditEvent, BlobKind, CaseBlob
from tests.conftest import Tenant


def test_a_case_sealed_under_a_key_not_yet_here_is_a_503_to_retry(
    client, settings, keyring, tenant: Tenant, store_case
) -> None:  # type: ignore[no-untyped-def]
    case_id = store_case(tenant, b"queued")
    rotated = keyring.with_new_active_key()
    sealed = encrypt_blob(
        Keyring(rotated.active_id, rotated.keks, rotated.api_key_pepper),
        b"MRN-0042",
        case_id=case_id,
        kind="client_ref",
    )
    with session_scope(settings) as session:
        session.add(
            CaseBlob(
                id=uuid.uuid4(),
                case_id=case_id,
                kind=BlobKind.CLIENT_REF.value,
                ciphertext=sealed.ciphertext,
                nonce=sealed.nonce,
                wrapped_key=sealed.wrapped_key,
                kek_id=sealed.kek_id,
                media_type="text/plain",
            )
        )
    answer = client.get(f"/v1/cases/{case_id}", headers=tenant.headers)
    assert answer.status_code == 503, answer.text
    assert answer.json()["code"] == "key_unavailable" and answer.headers["Retry-After"] == "30"
    assert "MRN-0042" not in answer.text and sealed.kek_id not in answer.text
    with session_scope(settings) as session:
        reads = session.scalar(
            select(func.count()).where(AuditEvent.action == "case.read", AuditEvent.entity_id == str(case_id))
        )
    assert reads == 0
