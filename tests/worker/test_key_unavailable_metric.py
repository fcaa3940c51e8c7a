"""A case whose image's key cannot be loaded is put back in the queue, its attempt given back, and
comes round again after ``requeue_grace_seconds``: it neither fails nor stays queued long at a time,
so neither the failure rate nor the queue's age saw it, and a worker node whose period-key volume
had gone left every case unanswered without a word. The workers count each such case
(``dermq_image_key_unavailable_total``), which the DermqImageKeyUnavailable alert reads."""

from __future__ import annotations

import httpx
from sqlalchemy import update

from core import case_states
from core.db import session_scope
from core.models import Case, CaseBlob
from core.publisher import make_publisher
from tests import support
from tests.api.test_metrics import scrape, total
from tests.conftest import Tenant

PERIOD = "2024-11"  # a period of this test's own: no other case's key is touched


def test_a_case_put_back_because_its_key_cannot_be_loaded_is_counted(  # type: ignore[no-untyped-def]
    worker, settings, stack_env, keyring, tenant: Tenant, store_case, jpeg_bytes
) -> None:
    metrics = f"http://127.0.0.1:{stack_env['DERMQ_WORKER_METRICS_PORT']}/metrics"
    support.wait_for(lambda: httpx.get(metrics, timeout=5).status_code == 200, timeout=30, what="worker metrics")
    before = scrape(metrics)
    # there from the start: Prometheus's increase() skips a series' first sample
    assert ("dermq_image_key_unavailable_total", ()) in before
    case_id = store_case(tenant, jpeg_bytes)
    folder = keyring.periods
    assert folder is not None
    exposed = folder.ensure(PERIOD)
    key_file = folder._key_file(PERIOD)
    key_file.chmod(0o644)  # readable by others: loading it raises KeyringError, not the case's doing
    try:
        with session_scope(settings) as session:
            session.execute(update(CaseBlob).where(CaseBlob.case_id == case_id).values(kek_id=exposed))
        support.publish_classify(make_publisher(settings), case_id)
        support.wait_for(
            lambda: (
                total(scrape(metrics), "dermq_image_key_unavailable_total")
                > total(before, "dermq_image_key_unavailable_total")
            ),
            timeout=60,
            what="the worker's count of a case put back for its key",
        )
        with session_scope(settings) as session:
            case = session.get(Case, case_id)
            assert case is not None and (case.status, case.attempts) == ("queued", 0)  # waiting, nothing spent
    finally:
        with session_scope(settings) as session:  # not taken again by the suite's worker after this test
            case_states.fail_case(session, case_id=case_id, attempt=None, code="invalid_image", message="test over")
        key_file.unlink()
