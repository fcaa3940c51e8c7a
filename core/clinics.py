"""Clinics: the tenants whose portals submit cases. A deactivated clinic's keys stop working at once."""

from __future__ import annotations

import unicodedata
import uuid
from datetime import UTC, datetime

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core import announcements, audit, credential_locks
from core.errors import Conflict, InvalidInput, NotFound
from core.models import Clinic

#: Unicode categories a clinic's name never holds: controls, format characters (zero-width joiners
#: and spaces, bidirectional overrides), private use, surrogates, unassigned, line and paragraph separators
_INVISIBLE = frozenset({"Cc", "Cf", "Co", "Cs", "Cn", "Zl", "Zp"})
#: characters of other categories that show nothing: Unicode's default-ignorable ones (the combining
#: grapheme joiner, variation selectors, Mongolian and Khmer fillers) and the blank look-alikes
#: (Hangul fillers, the braille blank)
_BLANK = frozenset(
    [
        *(0x034F, 0x115F, 0x1160, 0x17B4, 0x17B5, 0x2800, 0x3164, 0xFFA0),
        *range(0x180B, 0x1810),
        *range(0xFE00, 0xFE10),
        *range(0xE0100, 0xE01F0),
    ]
)


def hides_characters(text: str) -> bool:
    """Whether ``text`` holds a character nobody can see: a control, zero-width, filler or direction
    character (a name or label shown to operators and auditors must read as what it is)."""
    return any(unicodedata.category(c) in _INVISIBLE or ord(c) in _BLANK for c in text)


def _spelling(raw: str) -> str:
    """A name's one spelling: NFKC, each run of white space one space, trimmed."""
    return " ".join(unicodedata.normalize("NFKC", raw).split())


def clinic_name(raw: str) -> str:
    """A clinic's name as dermq stores and looks it up: NFKC (compatibility forms as their plain
    letters: full-width, ligatures, non-breaking spaces), each run of white space one space, trimmed.
    A name is what operators and auditors tell clinics apart by, in listings and audit exports:
    :class:`InvalidInput` for one that is empty, longer than 200 characters, holds characters nobody
    can see or starts with an accent mark, or that reads as a clinic id (a UUID: lookups take those
    as ids). Names are unique whatever their case (migration 0012)."""
    name = _spelling(raw)
    if not name or len(name) > 200:
        raise InvalidInput("a clinic name is 1 to 200 characters", code="invalid_clinic_name")
    if hides_characters(name):
        raise InvalidInput(
            "a clinic name holds visible characters only: no control, zero-width, filler or direction characters",
            code="invalid_clinic_name",
        )
    if unicodedata.category(name[0]).startswith("M"):
        raise InvalidInput(
            "a clinic name starts with a letter, digit or sign, not an accent mark", code="invalid_clinic_name"
        )
    try:
        uuid.UUID(name)
    except ValueError:
        return name
    raise InvalidInput("a clinic name must not read as a clinic id (a UUID)", code="invalid_clinic_name")


def create_clinic(session: Session, name: str, *, actor: audit.Actor = audit.SYSTEM) -> Clinic:
    name = clinic_name(name)
    clinic = Clinic(id=uuid.uuid4(), name=name)
    try:
        with session.begin_nested():
            session.add(clinic)
            session.flush()
    except IntegrityError:
        raise Conflict(
            f"a clinic named {name!r} already exists (names are compared whatever their case)", code="clinic_exists"
        ) from None
    audit.record(
        session,
        action="clinic.create",
        outcome=audit.SUCCESS,
        actor=actor,
        entity_type="clinic",
        entity_id=clinic.id,
        clinic_id=clinic.id,
    )
    return clinic


def get_clinic(session: Session, clinic: str | uuid.UUID) -> Clinic:
    """A clinic by id or by name."""
    found: Clinic | None
    if isinstance(clinic, uuid.UUID):
        found = session.get(Clinic, clinic)
    else:
        try:
            found = session.get(Clinic, uuid.UUID(clinic))
        except ValueError:
            found = None
        if found is None and "\x00" not in clinic:  # a name
            found = session.scalar(select(Clinic).where(func.lower(Clinic.name) == func.lower(_spelling(clinic))))
            if found is None:  # as given: one an older release stored beside this one, say, in another spelling
                found = session.scalar(select(Clinic).where(Clinic.name == clinic))
    if found is None:
        raise NotFound("no such clinic", code="clinic_not_found")
    return found


def set_active(session: Session, clinic_id: uuid.UUID, active: bool, *, actor: audit.Actor = audit.SYSTEM) -> Clinic:
    # once the cases being stored for it are (core.credential_locks); read again under the lock (a
    # caller may have loaded the clinic before another change committed)
    credential_locks.hold_clinic_for_a_change(session, clinic_id)
    clinic = session.get(Clinic, clinic_id, with_for_update=True, populate_existing=True)
    if clinic is None:
        raise NotFound("no such clinic", code="clinic_not_found")
    unchanged = clinic.active == active  # deactivating twice keeps when it was first deactivated
    if not unchanged:
        clinic.active = active
        clinic.deactivated_at = None if active else datetime.now(UTC)
        session.flush()
        announcements.announce_keys_changed(session)  # its keys stop (or start) working
    audit.record(
        session,
        action="clinic.activate" if active else "clinic.deactivate",
        outcome=audit.SUCCESS,
        actor=actor,
        entity_type="clinic",
        entity_id=clinic.id,
        clinic_id=clinic.id,
        detail={"unchanged": True} if unchanged else None,
    )
    return clinic


def list_clinics(session: Session) -> list[Clinic]:
    return list(session.scalars(select(Clinic).order_by(Clinic.created_at, Clinic.id)))
