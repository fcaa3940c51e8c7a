"""The auditor's checkpoint and proofs when the stored log does not hold what its signed notes say.

The checkpoint rows' size and root are the services' login's to write (it runs the sealer): a row
holding an older genuine note beside a size of its choosing was served as the latest checkpoint,
and a consistency proof up to that size answered 500. On a database of this module's own: the
forged row cannot be removed (the checkpoints are append-only).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import text

from core import audit, checkpoint
from core.db import session_scope
from tests import support
from tests.conftest import Tenant, new_tenant


@pytest.fixture(scope="module")
def auditor_client(own_database, redis_client, tmp_path_factory) -> Iterator[tuple[Any, Any]]:  # type: ignore[no-untyped-def]
    from fastapi.testclient import TestClient

    from api.app import create_app

    # a witness file of its own: this database's log is not the shared one, whose witness it would break
    settings = own_database.model_copy(
        update={"audit_witness_file": tmp_path_factory.mktemp("witness") / "witness.log"}
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client, settings


def test_a_checkpoint_row_its_note_does_not_vouch_for_is_refused_not_served(auditor_client, keyring) -> None:  # type: ignore[no-untyped-def]
    client, settings = auditor_client
    auditor: Tenant = new_tenant(settings, keyring, "auditor")
    for _ in range(2):
        with session_scope(settings) as session:
            audit.record(session, action="case.read", outcome=audit.SUCCESS, actor=audit.SYSTEM)
        support.seal_all(settings)
    genuine = client.get("/v1/audit/checkpoints/latest", headers=auditor.headers)
    assert genuine.status_code == 200, genuine.text
    says = checkpoint.unverified(genuine.json()["checkpoint"])
    assert genuine.json()["size"] == says.size >= 2
    proof = client.get("/v1/audit/proofs/consistency", headers=auditor.headers, params={"from": 1})
    assert proof.status_code == 200 and proof.json()["new_size"] == says.size, proof.text

    with session_scope(settings) as session:
        older = session.scalar(text("SELECT note FROM audit_checkpoints ORDER BY size LIMIT 1"))
        session.execute(
            text("INSERT INTO audit_checkpoints (size, root, signed_at, note) VALUES (99, :root, now(), :note)"),
            {"root": bytes(32), "note": older},
        )
    for path, params in (
        ("/v1/audit/checkpoints/latest", {}),
        ("/v1/audit/proofs/consistency", {"from": 0}),
        ("/v1/audit/proofs/inclusion", {"event": 1}),
    ):
        refused = client.get(path, headers=auditor.headers, params=params)
        assert refused.status_code == 409, (path, refused.status_code, refused.text)
        assert refused.json()["code"] == "log_inconsistent"
        assert "dermq audit verify" in refused.json()["detail"]
