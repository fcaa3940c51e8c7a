"""What a waiting submission whose case is stored answers when its database fails it: always the
case's id and Location (api.routes.cases), under a code that says why. A failure the classification did
not know (a constraint or internal error in the read's audit event) was re-raised and answered by the
generic handler, "nothing was stored", for a case that was stored and queued: a portal without an
Idempotency-Key sent the image again as a second case. A deadlock read as "could not be reached"."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from sqlalchemy.exc import DBAPIError, IntegrityError, InternalError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from api import problems
from core.errors import ServiceUnavailable


def _error(kind: type[DBAPIError], pgcode: str | None) -> DBAPIError:
    return kind("SELECT 1", {}, SimpleNamespace(pgcode=pgcode))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (PoolTimeout(), "database_busy"),
        (ServiceUnavailable("no lane", code="database_busy"), "database_busy"),
        (_error(OperationalError, "55P03"), "database_busy"),  # lock timeout
        (_error(OperationalError, "57014"), "database_busy"),  # statement timeout
        (_error(OperationalError, "40P01"), "database_busy"),  # deadlock
        (_error(OperationalError, "53300"), "database_busy"),  # too many connections
        (_error(OperationalError, None), "database_unavailable"),  # the connection lost or refused
        (_error(OperationalError, "08006"), "database_unavailable"),
        (_error(OperationalError, "57P01"), "database_unavailable"),  # the server shutting down
        (_error(IntegrityError, "23505"), "database_error"),
        (_error(InternalError, "XX000"), "database_error"),
    ],
)
def test_every_failure_once_the_case_is_stored_names_it(exc: Exception, code: str) -> None:
    assert problems.stored_case_failure(exc) == code
    detail = problems.unconfirmed_detail(code)
    assert "the case was stored" in detail and "nothing was stored" not in detail
