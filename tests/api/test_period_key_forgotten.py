"""An API process forgets a destroyed period's key within seconds, whatever its traffic.

Retention destroys a period's key only once every case of the period is purged, so no request asks for
the key again. An API process that had read the period's cases kept the key in memory until it opened
another period key (overnight, for an idle API): a dump of its memory opened every backup of the
period. Its watcher looks for the destroyed periods among the keys it holds every FORGET_SECONDS and
overwrites their keys."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from core.config import Settings
from core.crypto import Keyring
from core.db import session_scope
from core.held_period_keys import FORGET_SECONDS
from core.models import Case
from core.period_keys import PeriodKeys
from core.periods import kek_id
from tests import processes, support
from tests.conftest import Tenant, create_case_for, new_tenant, own_period_keys_fixtures

pytestmark = pytest.mark.usefixtures("database")

own, keyring = own_period_keys_fixtures()


@pytest.fixture(scope="module")
def api(own: Settings, stack_env: dict[str, str], stack_dir: Path) -> Iterator[tuple[str, processes.Process]]:
    """A ``dermq-api`` process on this module's database and period-key folder."""
    env = {
        **stack_env,
        "DERMQ_API_PORT": str(support.free_port()),
        "DERMQ_DATABASE_URL": own.database_url,
        "DERMQ_PERIOD_KEY_DIR": str(own.period_key_folder),
    }
    with processes.api_process(env, stack_dir / "period-key-forgotten-api.log") as running:
        yield running


def case_with_client_ref(settings: Settings, keyring: Keyring, tenant: Tenant) -> uuid.UUID:
    """A case whose client reference is sealed under its period's key (reading the case opens it)."""
    with session_scope(settings) as session:
        case, _ = create_case_for(session, keyring, tenant, client_ref="MRN-0042")
        return case.id


def period_key_of(settings: Settings, keyring: Keyring, case_id: uuid.UUID) -> tuple[PeriodKeys, str, bytes]:
    """The period-key folder, the period of ``case_id`` and (a copy of) that period's key."""
    folder = keyring.periods
    assert folder is not None
    with session_scope(settings) as session:
        case = session.get(Case, case_id)
        assert case is not None
        period = folder.current(case.created_at)
    return folder, period, bytes(folder.key(keyring, kek_id(period)))


def test_an_idle_api_process_forgets_a_destroyed_period_key_without_another_request(  # type: ignore[no-untyped-def]
    own: Settings, keyring: Keyring, api
) -> None:
    base, server = api
    tenant = new_tenant(own, keyring)
    case_id = case_with_client_ref(own, keyring, tenant)
    answer = httpx.get(f"{base}/v1/cases/{case_id}", headers=tenant.headers, timeout=30)
    assert answer.status_code == 200 and answer.json()["client_ref"] == "MRN-0042"
    folder, period, key = period_key_of(own, keyring, case_id)
    assert processes.memory_holds(server.proc.pid, key)  # the key it read the case with
    folder.destroy(period, reason="retention")  # as retention does, in another process
    support.wait_for(  # no request meanwhile: nothing asks the process for a key
        lambda: not processes.memory_holds(server.proc.pid, key),
        timeout=3 * FORGET_SECONDS,
        interval=1,
        what="the API process to forget the destroyed period's key",
    )
    assert server.alive()
