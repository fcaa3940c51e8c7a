"""A long poll already waiting when its API process's listener loses its connection, and the listener
cannot open another (Postgres refuses new connections: ``max_connections`` reached, say) while the
connections already open still work: the case ends meanwhile, in another process, unheard.

The request looks a second after the loss and every second after that, as it would have had it begun
waiting then. Before, it slept out the ten seconds it had begun with (``RECHECK_SECONDS``): a case
ended during the outage was answered up to ten seconds late.

The API runs in its own process on a database of this module's own, which is closed to new
connections for the test (``ALLOW_CONNECTIONS false``; the shared database is never touched).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Connection, make_url

from core import case_states
from core.db import session_scope
from tests import processes, support
from tests.conftest import Tenant, case_store, new_tenant

WAIT = 30


@pytest.fixture(scope="module")
def own_api(own_database, stack_env: dict[str, str], stack_dir: Path) -> Iterator[str]:  # type: ignore[no-untyped-def]
    env = {
        **stack_env,
        "DERMQ_DATABASE_URL": own_database.database_url,
        "DERMQ_API_PORT": str(support.free_port()),
        "DERMQ_API_PROCESSES": "1",
    }
    with processes.api_process(env, stack_dir / "listener-lost-api.log") as (base, _):
        yield base


@contextmanager
def server(settings: Any) -> Iterator[Connection]:
    """A connection to the server's ``postgres`` database (outside the one the test closes)."""
    engine = create_engine(make_url(settings.database_url).set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            yield connection
    finally:
        engine.dispose()


def listener_pid(connection: Connection, database: str) -> int | None:
    return connection.scalar(
        text("SELECT pid FROM pg_stat_activity WHERE datname = :db AND application_name = 'dermq-listener'"),
        {"db": database},
    )


def test_a_waiting_long_poll_looks_every_second_once_its_listener_is_lost(own_api, own_database, keyring) -> None:  # type: ignore[no-untyped-def]
    tenant: Tenant = new_tenant(own_database, keyring)
    case_id = case_store(own_database, keyring)(tenant, b"\xff\xd8 not decoded here")
    database = make_url(own_database.database_url).database
    with httpx.Client(base_url=own_api, headers=tenant.headers, timeout=WAIT + 10) as http:
        for _ in range(3):  # connections in the API's pool, for its looks while no new one can be opened
            assert http.get(f"/v1/cases/{case_id}").json()["status"] == "queued"
        answered: list[tuple[float, dict[str, Any]]] = []

        def long_poll() -> None:
            response = http.get(f"/v1/cases/{case_id}", params={"wait": WAIT})
            answered.append((time.monotonic(), response.json()))

        with server(own_database) as postgres:
            listener = support.wait_for(lambda: listener_pid(postgres, database), timeout=20, what="the listener")
            poll = threading.Thread(target=long_poll)
            poll.start()
            time.sleep(1)  # the request waits, its listener connected: its next look ten seconds away
            assert not answered
            postgres.execute(text(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false'))
            try:
                postgres.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": listener})
                time.sleep(0.3)
                # another process ends the case, on a connection it already holds: nobody hears it
                with session_scope(own_database) as session:
                    assert case_states.fail_case(session, case_id=case_id, attempt=None, code="x", message="ended")
                ended = time.monotonic()
                poll.join(timeout=WAIT + 10)
            finally:
                postgres.execute(text(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true'))
    [(at, case)] = answered
    assert case["status"] == "failed"
    assert at - ended < 6  # a look a second after the loss (about 1 s); not the ten seconds the wait began with
