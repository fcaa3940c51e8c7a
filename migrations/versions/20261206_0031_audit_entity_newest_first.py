"""The audit events of an entity, newest first, from an index: an auditor's search for a key's refused
requests.

An auditor who searches by key (``actor=``) is shown what the key did and every request refused that
presented it (``auth.denied``, the key named as the entity: ``core.audit.AuditFilter.alternatives``),
newest first, a page at a time. ``ix_audit_events_entity`` held ``(entity_type, entity_id)`` without the
event's id, so each page of a leaked key's refusals sorted every one of them (or walked every
``auth.denied`` of every key backwards). This index adds the id: a page reads its own rows from the
index, in order, and stops. It replaces the old one, of which it is an extension (a case's events,
``case=``, read it as they read the old one).

Both are built and dropped ``CONCURRENTLY``, outside the migration's transaction
(``migrations.online_indexes``): the audit log takes an insert with every request. Downgrade builds the
old one again and drops this one, the same way.

Revision ID: 0031
Revises: 0030
Create Date: 2026-12-06 21:10:00.000000+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

from migrations import online_indexes

revision: str = "0031"
down_revision: str | None = "0030"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEX = "ix_audit_events_entity_id"
OLD = "ix_audit_events_entity"


def upgrade() -> None:
    online_indexes.build({INDEX: "ON audit_events (entity_type, entity_id, id)"}, then_drop=[OLD])


def downgrade() -> None:
    online_indexes.build({OLD: "ON audit_events (entity_type, entity_id)"}, then_drop=[INDEX])
