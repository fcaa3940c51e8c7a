"""An auditor's inclusion proof when the stored tree has lost what the latest signed checkpoint covers.

The tables' owner cut the log short (its newest leaves and the nodes above them deleted, the signed
checkpoints left): a proof that an older event is in the latest signed tree cannot be built. The
answer says the stored log no longer matches its checkpoint, as the consistency proof's does, not
that the event "is not sealed yet": it was sealed, and a signed checkpoint covers it. On a database
of this module's own (the tampering cannot be undone: the tables are append-only).
"""

from __future__ import annotations

from sqlalchemy import create_engine, text

from core import audit
from core.db import session_scope
from tests import support
from tests.api.test_audit_log_inconsistent import auditor_client  # noqa: F401  (the fixture: an app on this module's database)
from tests.conftest import Tenant, new_tenant


def test_a_proof_over_a_log_cut_short_says_the_log_is_inconsistent(auditor_client, keyring) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    client, settings = auditor_client
    auditor: Tenant = new_tenant(settings, keyring, "auditor")
    support.seal_all(settings)
    with session_scope(settings) as session:
        first = audit.record(session, action="case.read", outcome=audit.SUCCESS, actor=audit.SYSTEM)
    support.seal_all(settings)
    for _ in range(3):  # each sealed on its own: a signed checkpoint at each size
        with session_scope(settings) as session:
            audit.record(session, action="case.read", outcome=audit.SUCCESS, actor=audit.SYSTEM)
        support.seal_all(settings)
    proved = client.get("/v1/audit/proofs/inclusion", headers=auditor.headers, params={"event": first})
    assert proved.status_code == 200, proved.text
    size = proved.json()["tree_size"]

    # the owner's login (here the superuser the tests connect as) deletes the last two positions
    engine = create_engine(settings.database_url)
    try:
        with engine.begin() as connection:
            for table in ("audit_leaves", "audit_nodes"):
                connection.execute(text(f"ALTER TABLE {table} DISABLE TRIGGER {table}_append_only"))
            connection.execute(text("DELETE FROM audit_leaves WHERE seq >= :cut"), {"cut": size - 2})
            connection.execute(text("DELETE FROM audit_nodes WHERE (idx + 1) * (1 << level) > :cut"), {"cut": size - 2})
            for table in ("audit_leaves", "audit_nodes"):
                connection.execute(text(f"ALTER TABLE {table} ENABLE TRIGGER {table}_append_only"))
    finally:
        engine.dispose()

    refused = client.get("/v1/audit/proofs/inclusion", headers=auditor.headers, params={"event": first})
    assert refused.status_code == 409, refused.text
    assert refused.json()["code"] == "log_inconsistent"
    assert "dermq audit verify" in refused.json()["detail"]
