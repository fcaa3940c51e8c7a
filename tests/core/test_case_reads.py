"""core.case_reads: a clinic's read shows the case as it is in Postgres, not as its Session last saw it."""

from __future__ import annotations

import pytest
from sqlalchemy import text, update

from core import audit, case_reads
from core.db import session_scope
from core.keys import Principal
from core.models import Case, CaseStatus, Role
from tests.conftest import Tenant

pytestmark = pytest.mark.usefixtures("database")


def test_a_read_in_the_session_that_created_the_case_sees_it_end(
    settings, keyring, tenant: Tenant, store_case, jpeg_bytes
) -> None:  # type: ignore[no-untyped-def]
    """A ``?wait=`` submission creates its case, waits for a worker to end it, then reads it in the
    same Session: the read must show the end the worker committed, not the queued copy it held."""
    case_id = store_case(tenant, jpeg_bytes)
    principal = Principal(tenant.key_id, Role.CLINIC, tenant.clinic_id)
    with session_scope(settings) as session:
        held = session.get(Case, case_id)  # what the request's Session holds, as it wrote it
        assert held is not None and held.status == CaseStatus.QUEUED.value
        with session_scope(settings) as worker:  # another transaction ends it meanwhile
            worker.execute(update(Case).where(Case.id == case_id).values(status=CaseStatus.FAILED.value))
        session.commit()  # the request's commit (the Session keeps its objects: expire_on_commit is off)
        read = case_reads.get_case(session, keyring=keyring, principal=principal, actor=audit.SYSTEM, case_id=case_id)
        assert read.case.status == CaseStatus.FAILED.value


def test_reads_on_one_connection_share_one_prepared_statement(
    settings, keyring, tenant: Tenant, store_case, jpeg_bytes
) -> None:  # type: ignore[no-untyped-def]
    """A read is Postgres's prepared statement, prepared once per connection: a second read on the
    same connection executes it again (a second PREPARE of the name would fail) and finds its case."""
    first, second = store_case(tenant, jpeg_bytes), store_case(tenant, jpeg_bytes)
    principal = Principal(tenant.key_id, Role.CLINIC, tenant.clinic_id)
    with session_scope(settings) as session:
        reads = [
            case_reads.get_case(session, keyring=keyring, principal=principal, actor=audit.SYSTEM, case_id=case_id)
            for case_id in (first, second)
        ]
        statement, _ = case_reads._read_statement(session.get_bind().dialect)
        held = session.scalar(
            text("SELECT count(*) FROM pg_prepared_statements WHERE name = :name"), {"name": statement.name}
        )
    assert [read.case.id for read in reads] == [first, second]
    assert all(read.case.status == CaseStatus.QUEUED.value and read.result is None for read in reads)
    assert held == 1
