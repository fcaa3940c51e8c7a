"""The image a worker reads for a case it claimed, and the working copies dropped once cases end.

A large upload has two image blobs: the original as sent (``image``, kept as long as the case) and
the working copy the intake made from its own decode (``working``, :mod:`ml.working_copy`): the pixels
at the size the worker needs. The worker reads the working copy where there is one and the original
otherwise, in one statement for a whole batch; the working copy is deleted in the transaction that
ends its case (it is only ever needed to classify it).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import delete
from sqlalchemy.orm import Session

from core import pgbinary
from core.crypto import Keyring, SealedBlob, decrypt_blob
from core.errors import DecryptionError, KeyringError, NotFound
from core.models import BlobKind, CaseBlob


@dataclass(frozen=True, slots=True)
class StoredImage:
    """A case's image as the worker reads it."""

    data: bytes
    #: True for a working copy (``ml.working_copy.read`` opens it), False for the upload as sent
    working_copy: bool


def read_images(
    session: Session, *, keyring: Keyring, case_ids: Sequence[uuid.UUID]
) -> tuple[dict[uuid.UUID, StoredImage], dict[uuid.UUID, Exception]]:
    """The decrypted image of each of ``case_ids`` that can be read, its working copy where it has one,
    in one statement; and, for each of the others, why not: no stored image (:class:`NotFound`), one
    that does not decrypt under its case and key (:class:`DecryptionError`), or a key that cannot be
    loaded (:class:`KeyringError`, an ``OSError``: its period's key file unreadable, say). One
    unreadable case never stops, or fails, the others of a batch."""
    rows = pgbinary.copy_out(  # raw bytes, not hex: see core.pgbinary
        session,
        "SELECT DISTINCT ON (case_id) case_id, kind, ciphertext, nonce, wrapped_key, kek_id FROM case_blobs"
        " WHERE case_id = ANY(%(ids)s::uuid[]) AND kind IN (%(image)s, %(working)s)"
        " ORDER BY case_id, kind = %(working)s DESC",
        {
            "ids": [str(case_id) for case_id in case_ids],
            "image": BlobKind.IMAGE.value,
            "working": BlobKind.WORKING.value,
        },
        ("uuid", "text", "bytea", "bytea", "bytea", "text"),
    )
    found = {
        case_id: (kind, SealedBlob(ciphertext, nonce, wrapped, kek))
        for case_id, kind, ciphertext, nonce, wrapped, kek in rows
    }
    images: dict[uuid.UUID, StoredImage] = {}
    unreadable: dict[uuid.UUID, Exception] = {}
    for case_id in case_ids:
        if case_id not in found:
            unreadable[case_id] = NotFound("the case has no stored image", code="image_missing")
            continue
        kind, blob = found[case_id]
        try:
            images[case_id] = StoredImage(
                decrypt_blob(keyring, blob, case_id=case_id, kind=kind), kind == BlobKind.WORKING.value
            )
        except (DecryptionError, KeyringError, OSError) as exc:
            unreadable[case_id] = exc
    return images, unreadable


def drop_working_copies(session: Session, case_ids: Sequence[uuid.UUID]) -> None:
    """Delete the working copies of ``case_ids`` (cases that have just ended)."""
    if case_ids:
        session.execute(
            delete(CaseBlob)
            .where(CaseBlob.case_id.in_(case_ids), CaseBlob.kind == BlobKind.WORKING.value)
            .execution_options(synchronize_session=False)
        )
