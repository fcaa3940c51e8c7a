"""A deactivated clinic is told nothing more: the callback of a case that finishes after the clinic was
deactivated is cancelled, never posted."""

from __future__ import annotations

import pytest

from core import clinics
from core.db import session_scope
from tests import support
from tests.api.test_callbacks import Receiver, deliveries
from tests.conftest import Tenant


@pytest.mark.usefixtures("database")
def test_a_deactivated_clinic_gets_no_callback(
    client, worker, callback_worker, tenant: Tenant, settings, store_case, publisher, jpeg_bytes: bytes
) -> None:  # type: ignore[no-untyped-def]
    server = Receiver([])
    try:
        registered = client.put("/v1/clinic/callback", headers=tenant.headers, json={"url": server.url})
        assert registered.status_code == 200, registered.text
        case_id = store_case(tenant, jpeg_bytes)  # accepted while the clinic was active, not yet run
        cancelled = callback_worker.metric("dermq_callback_deliveries_total", outcome="cancelled")
        with session_scope(settings) as session:
            clinics.set_active(session, tenant.clinic_id, False)
        support.publish_classify(publisher, case_id, "routine")
        row = support.wait_for(
            lambda: (d := deliveries(settings, case_id)[0]) is not None and d.status != "pending" and d,
            timeout=120,
            interval=0.2,
            what="the callback to be settled",
        )
        assert row.status == "cancelled" and row.attempts == 0
        assert server.calls == []
        support.wait_for(  # counted as what it is (it was a "skipped" message, like a copy with nothing to do)
            lambda: callback_worker.metric("dermq_callback_deliveries_total", outcome="cancelled") == cancelled + 1,
            timeout=30,
            what="the callback worker to count the cancellation",
        )
    finally:
        server.close()
