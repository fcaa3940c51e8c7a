"""SQLAlchemy models of confirmed outcomes: a case's confirmed diagnosis as its clinic reports it, and
the case-free tally that field performance reads (:mod:`core.outcomes`). Like :mod:`core.models`,
these describe the schema that the Alembic migrations make."""

from __future__ import annotations

import enum
import uuid
from datetime import date, datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Date,
    DateTime,
    ForeignKey,
    Identity,
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
    #: the month of the tally cell that counts this report (:attr:`OutcomeTally.month`); NULL for a report
    #: counted before migration 0020, in an undated cell
    tally_month: Mapped[date | None] = mapped_column(Date)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class OutcomeTally(Base):
    """Field performance as a case-free aggregate: how many confirmed cases of a model, submitted in a
    month, had each (model's answer, referral, confirmed diagnosis). Kept when a case is erased or
    purged, which removes its confirmed outcome and shreds its result (see :mod:`core.outcomes`).
    One row per cell: a unique index on the five, the undated month (NULL) equal to itself."""

    __tablename__ = "outcome_tallies"
    __table_args__ = (
        Index(
            "uq_outcome_tallies_cell",
            "model_id",
            "predicted",
            "referral",
            "truth",
            "month",
            unique=True,
            postgresql_nulls_not_distinct=True,
        ),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(always=True), primary_key=True)
    model_id: Mapped[str] = mapped_column(String(128))
    #: the model's label, or ``out_of_distribution``
    predicted: Mapped[str] = mapped_column(String(24))
    referral: Mapped[bool] = mapped_column(Boolean)
    truth: Mapped[str] = mapped_column(String(16))
    #: the first day (UTC) of the month the cases were submitted in; NULL: counted before migration 0020,
    #: whose tally kept no time (these count in the figures over all time only)
    month: Mapped[date | None] = mapped_column(Date)
    count: Mapped[int] = mapped_column(Integer, server_default=sql("0"))
