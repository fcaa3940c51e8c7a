"""Binary COPY for encrypted blobs: what goes in comes out byte for byte, inside the caller's
transaction, and driver errors surface as SQLAlchemy's like any other statement's."""

from __future__ import annotations

import os
import uuid

import pytest
from sqlalchemy import select, text, update
from sqlalchemy.exc import IntegrityError, OperationalError

from core import pgbinary
from core.db import session_scope
from core.models import Case, CaseBlob

pytestmark = pytest.mark.usefixtures("database")

QUERY = "SELECT case_id, ciphertext, kek_id FROM case_blobs WHERE case_id = ANY(%(ids)s::uuid[]) AND kind = %(kind)s"


def test_the_stream_round_trips_every_kind_of_value() -> None:
    rows = [(uuid.uuid4(), b"\x00\xff" * 3, "kek-1", None), (uuid.uuid4(), b"", "é", b"x")]
    data = pgbinary.encode_rows(rows)
    assert data.startswith(pgbinary.SIGNATURE)
    assert pgbinary.decode_rows(data, ("uuid", "bytea", "text", "bytea")) == rows
    with pytest.raises(ValueError):
        pgbinary.decode_rows(b"not a copy stream", ("bytea",))


def test_blobs_go_in_and_come_out_byte_for_byte(settings, tenant, store_case, jpeg_bytes) -> None:  # type: ignore[no-untyped-def]
    case_id = store_case(tenant, jpeg_bytes)
    payload = (
        os.urandom(1_600_000) + b"\x00\\x00'\"\n"
    )  # as large as a 12 MP upload, with bytes that need escaping as text
    with session_scope(settings) as session:
        pgbinary.copy_in(
            session,
            "case_blobs",
            ("id", "case_id", "kind", "ciphertext", "nonce", "wrapped_key", "kek_id", "media_type"),
            [(uuid.uuid4(), case_id, "heatmap", payload, b"n" * 12, b"w" * 40, "k1", "image/png")],
        )
    with session_scope(settings) as session:
        stored = session.scalar(select(CaseBlob).where(CaseBlob.case_id == case_id, CaseBlob.kind == "heatmap"))
        assert stored is not None and bytes(stored.ciphertext) == payload and stored.created_at is not None
        rows = pgbinary.copy_out(
            session,
            QUERY,
            {"ids": [str(case_id)], "kind": "heatmap'; DROP TABLE cases; --"},  # bound by the driver, not spliced
            ("uuid", "bytea", "text"),
        )
        assert rows == []
        rows = pgbinary.copy_out(
            session,
            QUERY,
            {"ids": [str(case_id)], "kind": "heatmap"},
            ("uuid", "bytea", "text"),
        )
    assert rows == [(case_id, payload, "k1")]


def test_a_refused_copy_raises_sqlalchemys_error_and_the_transaction_rolls_back(
    settings, tenant, store_case, jpeg_bytes
) -> None:  # type: ignore[no-untyped-def]
    case_id = store_case(tenant, jpeg_bytes)  # it has its image blob: a second one breaks the unique key
    with pytest.raises(IntegrityError), session_scope(settings) as session:
        session.execute(
            update(Case).where(Case.id == case_id).values(plain_client_ref="changed in the same transaction")
        )
        pgbinary.copy_in(
            session,
            "case_blobs",
            ("id", "case_id", "kind", "ciphertext", "nonce", "wrapped_key", "kek_id", "media_type"),
            [(uuid.uuid4(), case_id, "image", b"c", b"n", b"w", "k1", "image/jpeg")],
        )
    with session_scope(settings) as session:
        assert len(session.scalars(select(CaseBlob.id).where(CaseBlob.case_id == case_id)).all()) == 1
        assert session.scalar(select(Case.plain_client_ref).where(Case.id == case_id)) is None


def test_a_lost_connection_is_an_operational_error_that_the_worker_retries(
    settings, tenant, store_case, jpeg_bytes
) -> None:  # type: ignore[no-untyped-def]
    """The database going away mid-COPY surfaces as SQLAlchemy's OperationalError with the connection
    invalidated, which the worker treats as transient (requeue and retry), and the pool recovers."""
    from worker.retries import is_transient

    case_id = store_case(tenant, jpeg_bytes)
    with pytest.raises(OperationalError) as raised, session_scope(settings) as session:
        pid = session.scalar(text("SELECT pg_backend_pid()"))
        with session_scope(settings) as other:
            other.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        pgbinary.copy_out(session, QUERY, {"ids": [str(case_id)], "kind": "image"}, ("uuid", "bytea", "text"))
    assert raised.value.connection_invalidated and is_transient(raised.value)
    with session_scope(settings) as session:
        rows = pgbinary.copy_out(session, QUERY, {"ids": [str(case_id)], "kind": "image"}, ("uuid", "bytea", "text"))
    assert [row[0] for row in rows] == [case_id]
