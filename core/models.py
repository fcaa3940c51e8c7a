"""SQLAlchemy 2.0 models: clinics, API keys, cases, encrypted blobs, results and the audit trail.

The schema is made by Alembic migrations (``migrations/``), never ``create_all``: these classes describe it.
"""

from __future__ import annotations

import enum
import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from core.crypto import SealedBlob

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Role(enum.StrEnum):
    CLINIC = "clinic"
    AUDITOR = "auditor"
    ADMIN = "admin"


class CaseStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    PURGED = "purged"

    @property
    def terminal(self) -> bool:
        return self in (CaseStatus.SUCCEEDED, CaseStatus.FAILED, CaseStatus.PURGED)


class Priority(enum.StrEnum):
    ROUTINE = "routine"
    URGENT = "urgent"


class BlobKind(enum.StrEnum):
    IMAGE = "image"
    HEATMAP = "heatmap"
    #: the clinic's reference for the case (often a medical record number), envelope-encrypted
    CLIENT_REF = "client_ref"
    #: the findings of the case's result (label, probabilities, referral...), one sealed JSON document
    RESULT = "result"
    #: the clinic's confirmed diagnosis of the case (core.outcomes), sealed like the findings
    OUTCOME = "outcome"
    #: a large upload's pixels at the size the worker needs (ml.working_copy), until the case ends
    WORKING = "working"


class Outcome(enum.StrEnum):
    """What a succeeded case's result is: a diagnosis, or the finding that the image is not one the
    model can judge (no label, probabilities or referral then: see :class:`Result`)."""

    DIAGNOSIS = "diagnosis"
    OUT_OF_DISTRIBUTION = "out_of_distribution"


def _values(enum_type: type[enum.Enum]) -> str:
    return ", ".join(f"'{member.value}'" for member in enum_type)


class Clinic(Base):
    __tablename__ = "clinics"
    __table_args__ = (Index("uq_clinics_lower_name", text("lower(name)"), unique=True),)  # migration 0012

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(200), unique=True)  # unique whatever its case, one spelling
    active: Mapped[bool] = mapped_column(Boolean, server_default=text("true"))
    callback_url: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    deactivated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class ApiKey(Base):
    __tablename__ = "api_keys"
    __table_args__ = (
        CheckConstraint(f"role IN ({_values(Role)})", name="role"),
        CheckConstraint("role <> 'clinic' OR clinic_id IS NOT NULL", name="clinic_key_has_clinic"),
    )

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=uuid.uuid4)
    prefix: Mapped[str] = mapped_column(String(32), unique=True)
    secret_hash: Mapped[bytes] = mapped_column(LargeBinary)
    role: Mapped[str] = mapped_column(String(16))
    clinic_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("clinics.id", ondelete="RESTRICT"), index=True)
    label: Mapped[str] = mapped_column(String(200), server_default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    clinic: Mapped[Clinic | None] = relationship(lazy="raise")


DIGESTED_KEY = "^hmac-sha256:[0-9a-f]{64}$"  # an idempotency key stored as its digest (core.idempotency)


class Case(Base):
    __tablename__ = "cases"
    __table_args__ = (
        CheckConstraint(f"status IN ({_values(CaseStatus)})", name="status"),
        CheckConstraint(f"priority IN ({_values(Priority)})", name="priority"),
        UniqueConstraint("clinic_id", "idempotency_key", name="uq_cases_clinic_idempotency_key"),
        Index("ix_cases_clinic_created", "clinic_id", "created_at", "id"),
        Index("ix_cases_status_updated", "status", "updated_at"),
        Index("ix_cases_queued", "updated_at", postgresql_where=text("status IN ('queued', 'running')")),
        Index("ix_cases_plain_client_ref", "id", postgresql_where=text("client_ref IS NOT NULL")),
        Index("ix_cases_plain_idempotency_key", "id", postgresql_where=text(f"idempotency_key !~ '{DIGESTED_KEY}'")),
        # migration 0022: the retention purge's oldest unpurged finished cases; a month's cases
        Index(
            "ix_cases_expiring",
            "created_at",
            postgresql_where=text("purged_at IS NULL AND status IN ('succeeded', 'failed')"),
        ),
        Index("ix_cases_created", "created_at"),
        # migration 0030: the queued first attempts in the order workers claim them (core.case_claims)
        Index(
            "ix_cases_queue_order",
            # written as Postgres reflects it, line breaks included (Alembic's comparison keeps them)
            text("(\nCASE\n    WHEN priority::text = 'urgent'::text THEN 0\n    ELSE 1\nEND)"),
            "created_at",
            postgresql_where=text("status = 'queued' AND attempts = 0"),
        ),
    )

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=uuid.uuid4)
    clinic_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("clinics.id", ondelete="RESTRICT"))
    status: Mapped[str] = mapped_column(String(16), server_default=CaseStatus.QUEUED.value)
    priority: Mapped[str] = mapped_column(String(16), server_default=Priority.ROUTINE.value)
    #: Plain client references of cases older than migration 0007 only, until sealed (core.phi).
    plain_client_ref: Mapped[str | None] = mapped_column("client_ref", String(256))
    idempotency_key: Mapped[str | None] = mapped_column(String(256))  # a keyed digest (core.idempotency)
    image_sha256: Mapped[str] = mapped_column(String(64))
    image_format: Mapped[str] = mapped_column(String(16))
    image_width: Mapped[int] = mapped_column(Integer)
    image_height: Mapped[int] = mapped_column(Integer)
    image_bytes: Mapped[int] = mapped_column(Integer)
    attempts: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    published_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    purged_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    failure_code: Mapped[str | None] = mapped_column(String(64))
    failure_message: Mapped[str | None] = mapped_column(Text)
    model_id: Mapped[str | None] = mapped_column(String(128))

    result: Mapped[Result | None] = relationship(lazy="raise", uselist=False)


class CaseBlob(Base):
    """An encrypted image or heat map. Purge deletes the row: ciphertext and wrapped key both go."""

    __tablename__ = "case_blobs"
    __table_args__ = (
        CheckConstraint(f"kind IN ({_values(BlobKind)})", name="kind"),
        UniqueConstraint("case_id", "kind", name="uq_case_blobs_case_kind"),
        Index("ix_case_blobs_kek_id", "kek_id"),
    )

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=uuid.uuid4)
    case_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("cases.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(16))
    ciphertext: Mapped[bytes] = mapped_column(LargeBinary)
    nonce: Mapped[bytes] = mapped_column(LargeBinary)
    wrapped_key: Mapped[bytes] = mapped_column(LargeBinary)
    kek_id: Mapped[str] = mapped_column(String(64))
    media_type: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    @property
    def sealed(self) -> SealedBlob:
        return SealedBlob(self.ciphertext, self.nonce, self.wrapped_key, self.kek_id)


#: A result's findings about the patient: sealed into the case's ``result`` blob (core.results), never plain.
SEALED_RESULT_FIELDS = (
    "label",
    "probabilities",
    "confidence",
    "uncertainty",
    "referral",
    "referral_reasons",
    "ood_reasons",
    "gradcam_class",
)

#: A result row is sealed (every finding NULL: in the ``result`` blob, or shredded with it) or, if stored
#: before migration 0009 and not yet sealed by the sweeper, plain: a diagnosis with every diagnostic
#: field and no out-of-distribution reasons, or an out-of-distribution result with reasons and none.
RESULT_OUTCOME_FIELDS = (
    "(ood_reasons IS NOT NULL AND referral_reasons IS NOT NULL AND ("
    "(outcome = 'diagnosis' AND label IS NOT NULL AND probabilities IS NOT NULL AND confidence IS NOT NULL"
    " AND uncertainty IS NOT NULL AND referral IS NOT NULL AND ood_reasons = '[]'::jsonb)"
    " OR (outcome = 'out_of_distribution' AND label IS NULL AND probabilities IS NULL AND confidence IS NULL"
    " AND uncertainty IS NULL AND referral IS NULL AND referral_reasons = '[]'::jsonb AND gradcam_class IS NULL"
    " AND jsonb_typeof(ood_reasons) = 'array' AND ood_reasons <> '[]'::jsonb)))"
    " OR (" + " AND ".join(f"{name} IS NULL" for name in SEALED_RESULT_FIELDS) + ")"
)


class Result(Base):
    """The one result of a case; the primary key makes a second one impossible.

    ``outcome`` says what it is: a ``diagnosis`` or ``out_of_distribution`` (the image is not one the
    model can judge). The findings about the patient (:data:`SEALED_RESULT_FIELDS`) are sealed in the
    case's ``result`` blob (:mod:`core.results`); their columns are NULL except in rows stored before
    migration 0009, until the sweeper seals them. The rest is operational and stays plain.
    """

    __tablename__ = "results"
    __table_args__ = (
        Index("ix_results_created_at", "created_at"),
        Index("ix_results_plain", "case_id", postgresql_where=text("ood_reasons IS NOT NULL")),
        CheckConstraint(f"outcome IN ({_values(Outcome)})", name="outcome"),
        CheckConstraint(RESULT_OUTCOME_FIELDS, name="outcome_fields"),
    )

    case_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("cases.id", ondelete="CASCADE"), primary_key=True)
    outcome: Mapped[str] = mapped_column(Text, server_default=Outcome.DIAGNOSIS.value)
    #: plain findings of rows stored before migration 0009 only (see the class docstring)
    ood_reasons: Mapped[list[str] | None] = mapped_column(JSONB(none_as_null=True), server_default=text("'[]'::jsonb"))
    label: Mapped[str | None] = mapped_column(String(16))
    probabilities: Mapped[dict[str, float] | None] = mapped_column(JSONB(none_as_null=True))
    confidence: Mapped[float | None] = mapped_column(Float)
    uncertainty: Mapped[float | None] = mapped_column(Float)
    referral: Mapped[bool | None] = mapped_column(Boolean)
    referral_reasons: Mapped[list[str] | None] = mapped_column(
        JSONB(none_as_null=True), server_default=text("'[]'::jsonb")
    )
    gradcam_status: Mapped[str] = mapped_column(String(16))
    gradcam_class: Mapped[str | None] = mapped_column(String(16))
    model_id: Mapped[str] = mapped_column(String(128))
    weights_sha256: Mapped[str] = mapped_column(String(64))
    device: Mapped[str] = mapped_column(String(32))
    timings: Mapped[dict[str, float]] = mapped_column(JSONB)
    #: brightness, contrast and megapixels of the input, for drift monitoring (no pixels)
    input_stats: Mapped[dict[str, float]] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


_LISTED: Any = {"postgresql_ops": {"detail": "jsonb_path_ops"}, "postgresql_where": text("action = 'case.list'")}


class AuditEvent(Base):
    """One append-only audit record (fields after FHIR AuditEvent), sealed into the Merkle log.

    The sealer gives it a position (``audit_leaves``, see :mod:`core.audit_log`) once its transaction
    is committed; ``txid`` (not mapped: the database fills it) is that transaction. ``prev_hash`` and
    ``hash`` are the old hash chain, set only on rows written before the log (:mod:`core.audit_chain`).
    A trigger in the database refuses UPDATE, DELETE and TRUNCATE.
    """

    __tablename__ = "audit_events"
    __table_args__ = (
        Index("ix_audit_events_occurred_at", "occurred_at"),
        Index("ix_audit_events_entity_id", "entity_type", "entity_id", "id"),  # migration 0031
        Index("ix_audit_events_clinic", "clinic_id", "id"),
        Index("ix_audit_events_actor", "actor_key_id", "id"),
        Index("ix_audit_events_action", "action", "id"),
        Index("ix_audit_events_listed_cases", "detail", postgresql_using="gin", **_LISTED),  # migration 0015
        Index("ix_audit_events_not_success", "outcome", "id", postgresql_where=text("outcome <> 'success'")),  # 0022
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    #: the database's clock at the insert: its insert guard sets it, whatever the insert says (migration 0021)
    occurred_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    action: Mapped[str] = mapped_column(String(64))
    outcome: Mapped[str] = mapped_column(String(16))
    actor_key_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    actor_role: Mapped[str | None] = mapped_column(String(16))
    actor_type: Mapped[str] = mapped_column(String(16))
    clinic_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    source_ip: Mapped[str | None] = mapped_column(String(64))
    user_agent: Mapped[str | None] = mapped_column(String(256))
    request_id: Mapped[str | None] = mapped_column(String(64))
    entity_type: Mapped[str | None] = mapped_column(String(32))
    entity_id: Mapped[str | None] = mapped_column(String(64))
    detail: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))
    prev_hash: Mapped[str | None] = mapped_column(String(64))
    hash: Mapped[str | None] = mapped_column(String(64), unique=True)


class CallbackStatus(enum.StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"
    CANCELLED = "cancelled"


class ClinicCallback(Base):
    """Where a clinic wants to hear that its cases finished, and the secret that signs those calls. The
    secret is sealed like a blob (envelope encryption, kind ``callback_secret``, associated data bound to
    the clinic): only its ciphertext and wrapped data key are stored; key rotation re-wraps it."""

    __tablename__ = "clinic_callbacks"
    __table_args__ = (Index("ix_clinic_callbacks_kek_id", "kek_id"),)

    clinic_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("clinics.id", ondelete="CASCADE"), primary_key=True)
    url: Mapped[str] = mapped_column(Text)
    secret_ciphertext: Mapped[bytes] = mapped_column(LargeBinary)
    secret_nonce: Mapped[bytes] = mapped_column(LargeBinary)
    secret_wrapped_key: Mapped[bytes] = mapped_column(LargeBinary)
    kek_id: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    #: the secret a registration replaced, sealed beside the current one under its data key
    #: (core.crypto.seal_beside), signing beside it until ``previous_secret_until``
    previous_secret_ciphertext: Mapped[bytes | None] = mapped_column(LargeBinary)
    previous_secret_nonce: Mapped[bytes | None] = mapped_column(LargeBinary)
    previous_secret_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    @property
    def sealed_secret(self) -> SealedBlob:
        return SealedBlob(self.secret_ciphertext, self.secret_nonce, self.secret_wrapped_key, self.kek_id)


class CallbackDelivery(Base):
    """The outbox of completion callbacks: one row per finished case of a clinic with a callback,
    written in the transaction that ends the case, so a lost broker message cannot lose the call."""

    __tablename__ = "callback_deliveries"
    __table_args__ = (
        CheckConstraint(f"status IN ({_values(CallbackStatus)})", name="status"),
        Index("ix_callback_deliveries_pending", "updated_at", postgresql_where=text("status = 'pending'")),
        # migration 0027: the settled ones retention deletes once they are old (core.retention)
        Index("ix_callback_deliveries_settled", "updated_at", postgresql_where=text("status <> 'pending'")),
        Index("ix_callback_deliveries_clinic", "clinic_id", "created_at"),
        Index(  # migration 0028: a clinic's attempts under way (core.callback_pacing)
            "ix_callback_deliveries_in_flight",
            "clinic_id",
            "leased_until",
            postgresql_where=text("status = 'pending' AND leased_until IS NOT NULL"),
        ),
        Index(  # migration 0028: a clinic's oldest waiting callback, handed a turn (core.callback_pacing)
            "ix_callback_deliveries_waiting",
            "clinic_id",
            "created_at",
            postgresql_where=text("status = 'pending'"),
        ),
        Index(  # migration 0022: a clinic's latest problems (GET /v1/callback)
            "ix_callback_deliveries_problems",
            "clinic_id",
            "updated_at",
            postgresql_where=text("status = 'failed' OR (status = 'pending' AND attempts > 0)"),
        ),
    )

    case_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("cases.id", ondelete="CASCADE"), primary_key=True)
    clinic_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("clinics.id", ondelete="CASCADE"))
    status: Mapped[str] = mapped_column(String(16), server_default=CallbackStatus.PENDING.value)
    attempts: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    last_http_status: Mapped[int | None] = mapped_column(Integer)
    #: why the last attempt got no good answer, when it did not (an error's type, ``url_refused``...)
    last_error: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    #: while set and in the future, a worker holds the current attempt (see core.callback_attempts.lease)
    leased_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    #: when the retry of an attempt that got no good answer is due (database clock): no lease before
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
