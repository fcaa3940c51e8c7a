"""Clinic names are what operators and auditors tell clinics apart by (listings, audit exports,
``dermq key create --clinic``): one spelling per name, no invisible characters, unique whatever their
case; migration 0012 adds the case-blind index and stops, naming them, at names that would clash."""

from __future__ import annotations

import uuid

import pytest
from alembic import command
from sqlalchemy import text

from core import clinics
from core.db import session_scope
from core.errors import Conflict, InvalidInput, NotFound
from tests.core.migration_rows import insert_clinic


@pytest.mark.parametrize(
    "raw,stored",
    [
        ("  North   Clinic ", "North Clinic"),
        ("North\u00a0Clinic", "North Clinic"),  # a non-breaking space
        ("North\u2028\tClinic", "North Clinic"),  # a line separator and a tab: white space
        ("\uff2e\uff4f\uff52\uff54\uff48 Clinic", "North Clinic"),  # full-width letters
        ("Clinique de l\u2019\u00cele", "Clinique de l\u2019\u00cele"),  # letters and punctuation stay
    ],
)
def test_a_name_has_one_spelling(raw: str, stored: str) -> None:
    assert clinics.clinic_name(raw) == stored


@pytest.mark.parametrize(
    "raw",
    [
        "North\u200bClinic",  # a zero-width space
        "North Clinic\u202e",  # a direction override
        "North\x07Clinic",
        "North\u2066Clinic",
        "North\u034f Clinic",  # the combining grapheme joiner: ignorable
        "a\ufe0fb",  # a variation selector
        "\u3164",  # a Hangul filler: looks empty
        "\u2800\u2800",  # braille blanks
        "\u0301",  # an accent on nothing
        "74dcca0a-a6a4-4b90-a468-4efb42f12987",  # reads as a clinic id
        "0123456789abcdef0123456789abcdef",
        "   ",
        "x" * 201,
    ],
)
def test_a_name_nobody_can_read_whole_is_refused(raw: str) -> None:
    with pytest.raises(InvalidInput) as refused:
        clinics.clinic_name(raw)
    assert refused.value.code == "invalid_clinic_name"


@pytest.mark.usefixtures("database")
def test_names_are_unique_and_found_whatever_their_case(settings) -> None:  # type: ignore[no-untyped-def]
    name = f"North Clinic {uuid.uuid4().hex[:8]}"
    with session_scope(settings) as session:
        created = clinics.create_clinic(session, name)
    with pytest.raises(Conflict), session_scope(settings) as session:
        clinics.create_clinic(session, name.upper())
    with session_scope(settings) as session:
        assert clinics.get_clinic(session, f" {name.lower()} ").id == created.id
        for unknown in (name + "\u200b", name + "\x00", str(uuid.uuid4())):
            with pytest.raises(NotFound):
                clinics.get_clinic(session, unknown)
        # a name in another spelling, as a release before this one could store it: found as given
        older = f"Older  Clinic {uuid.uuid4().hex[:8]} "
        insert_clinic(session, older)
        assert clinics.get_clinic(session, older).name == older


def test_the_migration_respells_old_names_and_stops_at_names_that_would_clash(scratch) -> None:  # type: ignore[no-untyped-def]
    config, engine = scratch
    command.upgrade(config, "0011")
    with engine.begin() as connection:
        legacy = insert_clinic(connection, "Legacy  Clinic ")  # as an older dermq stored it
        for name in ("North Clinic", "NORTH  CLINIC", "South Clinic"):
            insert_clinic(connection, name)
        for name in ("\ufdfa" * 12, "74dcca0a-a6a4-4b90-a468-4efb42f12987"):  # 216 characters in NFKC; an id
            insert_clinic(connection, name)
    with pytest.raises(RuntimeError) as stopped:
        command.upgrade(config, "head")
    assert "over 200 characters" in str(stopped.value) and "reads as a clinic id" in str(stopped.value)
    with engine.begin() as connection:
        listed = text("DELETE FROM clinics WHERE name LIKE '74dcca0a%' OR name = :long")
        connection.execute(listed, {"long": "\ufdfa" * 12})
    with pytest.raises(RuntimeError, match="'NORTH  CLINIC' / 'North Clinic'"):  # found by Postgres's lower()
        command.upgrade(config, "head")
    with engine.begin() as connection:  # the failed upgrade rewrote nothing
        assert connection.execute(text("SELECT count(*) FROM clinics WHERE name = 'Legacy  Clinic '")).scalar() == 1
        connection.execute(text("UPDATE clinics SET name = 'North Clinic (annex)' WHERE name = 'NORTH  CLINIC'"))
    command.upgrade(config, "head")
    with engine.begin() as connection:
        assert connection.execute(text("SELECT name FROM clinics WHERE id = :id"), {"id": legacy}).scalar() == (
            "Legacy Clinic"  # found by name again: lookups compare the one spelling
        )
    with engine.begin() as connection, pytest.raises(Exception, match="uq_clinics_lower_name"):
        insert_clinic(connection, "south clinic")
    command.downgrade(config, "0011")  # and back: the index goes
    with engine.begin() as connection:
        insert_clinic(connection, "south clinic")
