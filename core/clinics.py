"""Clinics: the tenants whose portals submit cases. A deactivated clinic's keys stop working at once."""

from __future__ import annotations

import unicodedata
import uuid
from datetime import UTC, datetime

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core import announcements, audit
from core.errors import Conflict, InvalidInput, NotFound
from core.models import Clinic

#: Unicode categories a clinic's name never holds: controls, format characters (zero-width joiners
#: and spaces, bidirectional overrides), private use, surrogates, unassigned, line and paragraph separators
_INVISIBLE = frozenset({"Cc", "Cf", "Co", "Cs", "Cn", "Zl", "Zp"})


def clinic_name(raw: str) -> str:
    """A clinic's name as dermq stores and looks it up: NFKC (compatibility forms as their plain
    letters: full-width, ligatures, non-breaking spaces), each run of white space one space, trimmed.
    A name is what operators and auditors tell clinics apart by, in listings and audit exports:
    :class:`InvalidInput` for one that is empty, longer than 200 characters or holds characters
    nobody can see. Names are unique whatever their case (migration 0012)."""
    name = " ".join(unicodedata.normalize("NFKC", raw).split())
    if not name or len(name) > 200:
        raise InvalidInput("a clinic name is 1 to 200 characters", code="invalid_clinic_name")
    if any(unicodedata.category(c) in _INVISIBLE for c in name):
        raise InvalidInput(
            "a clinic name holds visible characters only: no control, zero-width or direction characters",
            code="invalid_clinic_name",
        )
    return name


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
            try:
                name = clinic_name(clinic)
            except InvalidInput:
                raise NotFound("no such clinic", code="clinic_not_found") from None
            found = session.scalar(select(Clinic).where(func.lower(Clinic.name) == func.lower(name)))
    if found is None:
        raise NotFound("no such clinic", code="clinic_not_found")
    return found


def set_active(session: Session, clinic_id: uuid.UUID, active: bool, *, actor: audit.Actor = audit.SYSTEM) -> Clinic:
    clinic = session.get(Clinic, clinic_id, with_for_update=True)
    if clinic is None:
        raise NotFound("no such clinic", code="clinic_not_found")
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
    )
    return clinic


def list_clinics(session: Session) -> list[Clinic]:
    return list(session.scalars(select(Clinic).order_by(Clinic.created_at, Clinic.id)))
