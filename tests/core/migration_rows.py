"""Rows for the migration tests, written in SQL as the schema stands at the test's revision: never through
the ORM models, which describe head. Each writes only columns that every revision it is used at has
(0003 to head), with stand-in values for those the tests do not look at; a test that needs a column of
its revision alone sets it itself (``UPDATE``) or passes it (``insert_result``)."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import Connection, text
from sqlalchemy.orm import Session

#: the results columns of type jsonb, which a text parameter must be cast to
JSON_COLUMNS = {"probabilities", "timings", "ood_reasons"}
#: a diagnosis's findings in plain columns, as results held them before 0009 sealed them
DIAGNOSIS = {"label": "nv", "probabilities": '{"nv": 1.0}', "confidence": 1.0, "uncertainty": 0.0, "referral": False}


def insert_clinic(connection: Connection | Session, name: str = "migration clinic") -> uuid.UUID:
    """A clinic named ``name`` as given (not respelled: as a release before 0012 stored names); its id."""
    clinic_id = uuid.uuid4()
    connection.execute(text("INSERT INTO clinics (id, name) VALUES (:id, :name)"), {"id": clinic_id, "name": name})
    return clinic_id


def insert_case(connection: Connection, clinic_id: uuid.UUID, status: str = "succeeded") -> uuid.UUID:
    """A case of the clinic in ``status``, its image a 300 x 225 JPEG of 1000 bytes with a digest of
    zeros; its id."""
    case_id = uuid.uuid4()
    connection.execute(
        text(
            "INSERT INTO cases (id, clinic_id, status, image_sha256, image_format, image_width, image_height,"
            " image_bytes) VALUES (:id, :clinic, :status, :sha, 'JPEG', 300, 225, 1000)"
        ),
        {"id": case_id, "clinic": clinic_id, "status": status, "sha": "0" * 64},
    )
    return case_id


def insert_result(connection: Connection, case_id: uuid.UUID, **columns: Any) -> None:
    """The case's result from model ``m`` on the CPU, with ``columns`` (its findings, say: ``DIAGNOSIS``)."""
    values = {
        "case_id": case_id,
        "gradcam_status": "ok",
        "model_id": "m",
        "weights_sha256": "0" * 64,
        "device": "cpu",
        "timings": "{}",
    } | columns
    names = ", ".join(values)
    params = ", ".join(f"CAST(:{k} AS jsonb)" if k in JSON_COLUMNS else f":{k}" for k in values)
    connection.execute(text(f"INSERT INTO results ({names}) VALUES ({params})"), values)


def insert_confirmed_outcome(
    connection: Connection, case_id: uuid.UUID, clinic_id: uuid.UUID, diagnosis: str | None
) -> None:
    """The clinic's diagnosis of the case, confirmed by histology (from 0008); ``None`` from 0010 on: the
    diagnosis is sealed in an ``outcome`` blob."""
    connection.execute(
        text("INSERT INTO confirmed_outcomes (case_id, clinic_id, diagnosis, method) VALUES (:c, :k, :d, 'histo')"),
        {"c": case_id, "k": clinic_id, "d": diagnosis},
    )


def insert_blob(connection: Connection, case_id: uuid.UUID, kind: str) -> None:
    """A sealed blob of the case of ``kind`` (the kinds its revision's check allows), with stand-in bytes."""
    connection.execute(
        text(
            "INSERT INTO case_blobs (id, case_id, kind, ciphertext, nonce, wrapped_key, kek_id, media_type) "
            "VALUES (:id, :case, :kind, 'x', 'n', 'k', 'period-2026-10', 'application/octet-stream')"
        ),
        {"id": uuid.uuid4(), "case": case_id, "kind": kind},
    )
