"""SQLAlchemy models of confirmed outcomes: a case's confirmed diagnosis as its clinic reports it, and
the case-free tally that field performance reads (:mod:`core.outcomes`). Like :mod:`core.models`,
these describe the schema that the Alembic migrations make."""

from __future__ import annotations

import enum
import uuid
from datetime import date, datetime

from sqlalchemy import (
    Boolean,
    CheckConstraint,
    Date,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    func,
)
from sqlalchemy import text as sql
from sqlalchemy.dialects.postgresql import UUID
from sqlalchemy.orm import Mapped, mapped_column

from core.models import Base


class ConfirmationMethod(enum.StrEnum):
    """How a case's true diagnosis was confirmed."""

    HISTO = "histo"  # histopathology
    FOLLOW_UP = "follow_up"  # unchanged at follow-up
    CONSENSUS = "consensus"  # expert consensus
    CONFOCAL = "confocal"  # in-vivo confocal microscopy


_METHODS = ", ".join(f"'{method.value}'" for method in ConfirmationMethod)


class ConfirmedOutcome(Base):
    """A case's confirmed outcome, reported by its clinic: one per case (a correction replaces it,
    ``revision`` counts the reports). The diagnosis itself is sealed (an ``outcome`` case blob); field
    performance (``dermq monitor report``) reads the case-free tally."""

    __tablename__ = "confirmed_outcomes"
    __table_args__ = (
        CheckConstraint(f"method IN ({_METHODS})", name="method"),
        CheckConstraint("diagnosis IN ('akiec', 'bcc', 'bkl', 'df', 'mel', 'nv', 'vasc')", name="diagnosis"),
        Index("ix_confirmed_outcomes_clinic", "clinic_id", "updated_at"),
        Index("ix_confirmed_outcomes_plain_diagnosis", "case_id", postgresql_where=sql("diagnosis IS NOT NULL")),
    )

    case_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("cases.id", ondelete="CASCADE"), primary_key=True)
    clinic_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("clinics.id", ondelete="CASCADE"))
    #: NULL once sealed (an ``outcome`` case blob, core.phi); plain only in rows from before migration 0010
    diagnosis: Mapped[str | None] = mapped_column(String(16))
    method: Mapped[str] = mapped_column(String(16))
    revision: Mapped[int] = mapped_column(Integer, server_default=sql("1"))
    reported_by: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    #: the month of the monthly tally's cell that counts this report (:class:`OutcomeMonthlyTally`); NULL
    #: for a report counted before migration 0020, in the lifetime tally alone
    tally_month: Mapped[date | None] = mapped_column(Date)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class OutcomeTally(Base):
    """Field performance as a case-free aggregate: how many confirmed cases of a model had each
    (model's answer, referral, confirmed diagnosis), over all time. Kept when a case is erased or
    purged, which removes its confirmed outcome and shreds its result (see :mod:`core.outcomes`)."""

    __tablename__ = "outcome_tallies"

    model_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    #: the model's label, or ``out_of_distribution``
    predicted: Mapped[str] = mapped_column(String(24), primary_key=True)
    referral: Mapped[bool] = mapped_column(Boolean, primary_key=True)
    truth: Mapped[str] = mapped_column(String(16), primary_key=True)
    count: Mapped[int] = mapped_column(Integer, server_default=sql("0"))


class OutcomeMonthlyTally(Base):
    """The same counts per month of submission, for field performance's recent window (migration
    0020): kept for the months of that window only (``dermq.purge`` deletes older ones). Reports
    counted before the migration are in :class:`OutcomeTally` alone."""

    __tablename__ = "outcome_monthly_tallies"

    model_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    #: the first day (UTC) of the month the cases were submitted in
    month: Mapped[date] = mapped_column(Date, primary_key=True)
    predicted: Mapped[str] = mapped_column(String(24), primary_key=True)
    referral: Mapped[bool] = mapped_column(Boolean, primary_key=True)
    truth: Mapped[str] = mapped_column(String(16), primary_key=True)
    count: Mapped[int] = mapped_column(Integer, server_default=sql("0"))
