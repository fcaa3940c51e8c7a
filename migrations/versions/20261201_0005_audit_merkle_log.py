"""Audit Merkle log: lock-free appends sealed into an RFC 9162 tree with signed checkpoints.

`audit_events` gains `txid` (the inserting transaction, `pg_current_xact_id()`), which the sealer
compares with the oldest running transaction so that it sequences only committed events and skips
none (a transaction with a smaller id that commits later is sealed in a later run). `prev_hash` and
`hash` (the old hash chain) stay for the rows written before this revision, which remain checkable
with the chain's rule, and become NULL for new rows. Existing rows get this migration's txid, so the
first sealer run puts them at the front of the log in id order (their chain order).

New append-only tables: `audit_leaves` (sequence number -> event, RFC 9162 leaf hash),
`audit_nodes` (hashes of perfect subtrees, for proofs), `audit_checkpoints` (the signed notes) and
`audit_verifications` (the periodic check's results, formerly in Redis).
UPDATE, DELETE and TRUNCATE are refused on all of them by triggers and revoked from PUBLIC.

`ix_audit_events_txid` is built ``CONCURRENTLY`` (migrations/online_indexes.py): every audited request
inserts an event, and a plain ``CREATE INDEX`` would block them for the build. The build commits the
new column first, which is therefore added only where it is missing: an upgrade stopped in the build
runs again from the start.

Downgrade drops the log; the new events then have no chain hashes, so the downgrade refuses to run
once any exist.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01 14:10:00.000000+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from migrations import online_indexes

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

LOG_TABLES = ("audit_leaves", "audit_nodes", "audit_checkpoints", "audit_verifications")
APPEND_ONLY_FUNCTION = """
CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only: % is not allowed', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'the audit log is never changed or removed; dermq audit verify checks it';
END;
$$
"""


def upgrade() -> None:
    op.execute("ALTER TABLE audit_events ADD COLUMN IF NOT EXISTS txid xid8 NOT NULL DEFAULT pg_current_xact_id()")
    op.alter_column("audit_events", "prev_hash", existing_type=sa.String(64), nullable=True)
    op.alter_column("audit_events", "hash", existing_type=sa.String(64), nullable=True)
    online_indexes.build({"ix_audit_events_txid": "ON audit_events (txid, id)"})

    op.create_table(
        "audit_leaves",
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("event_id", sa.BigInteger(), nullable=False),
        sa.Column("leaf_hash", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_audit_leaves")),
        sa.UniqueConstraint("event_id", name=op.f("uq_audit_leaves_event_id")),
        sa.ForeignKeyConstraint(["event_id"], ["audit_events.id"], name=op.f("fk_audit_leaves_event_id_audit_events")),
    )
    op.create_table(
        "audit_nodes",
        sa.Column("level", sa.SmallInteger(), nullable=False),
        sa.Column("idx", sa.BigInteger(), nullable=False),
        sa.Column("hash", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("level", "idx", name=op.f("pk_audit_nodes")),
    )
    op.execute(
        """
        CREATE TABLE audit_checkpoints (
            size bigint NOT NULL CONSTRAINT pk_audit_checkpoints PRIMARY KEY,
            root bytea NOT NULL,
            signed_at timestamptz NOT NULL,
            note text NOT NULL
        )
        """
    )
    op.create_table(
        "audit_verifications",
        sa.Column("id", sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column("checked_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("ok", sa.Boolean(), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("root", sa.LargeBinary(), nullable=True),
        sa.Column("checked", sa.BigInteger(), nullable=False),
        sa.Column("first_bad_seq", sa.BigInteger(), nullable=True),
        sa.Column("first_bad_event_id", sa.BigInteger(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("frontier", postgresql.JSONB(), server_default=sa.text("'[]'::jsonb"), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_verifications")),
    )
    op.execute(APPEND_ONLY_FUNCTION)
    for table in LOG_TABLES:
        op.execute(
            f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} "
            "FOR EACH ROW EXECUTE FUNCTION audit_log_append_only()"
        )
        op.execute(
            f"CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} "
            "FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only()"
        )
        op.execute(f"REVOKE UPDATE, DELETE, TRUNCATE ON {table} FROM PUBLIC")


def downgrade() -> None:
    new_rows = op.get_bind().scalar(sa.text("SELECT count(*) FROM audit_events WHERE hash IS NULL"))
    if new_rows:
        raise RuntimeError(
            f"{new_rows} audit events were written without chain hashes (after revision 0005); "
            "the old schema cannot hold them, so this downgrade refuses to drop the log"
        )
    signed = op.get_bind().scalar(
        sa.text("SELECT (SELECT count(*) FROM audit_checkpoints) + (SELECT count(*) FROM audit_verifications)")
    )
    if signed:
        raise RuntimeError(
            f"{signed} signed checkpoints and verification results are in the log; the old schema has no place "
            "for them, so this downgrade refuses to drop them"
        )
    for table in reversed(LOG_TABLES):
        op.drop_table(table)
    op.execute("DROP FUNCTION IF EXISTS audit_log_append_only()")
    op.execute("DROP INDEX IF EXISTS ix_audit_events_txid")
    op.execute("ALTER TABLE audit_events DROP COLUMN txid")
    op.alter_column("audit_events", "hash", existing_type=sa.String(64), nullable=False)
    op.alter_column("audit_events", "prev_hash", existing_type=sa.String(64), nullable=False)
