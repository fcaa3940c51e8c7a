"""The callback worker (worker.callbacks_app): completion callbacks on a queue and worker of their own,
so that a clinic's slow receiver holds no classifying child, and the callback messages an earlier
release sent to the maintenance queue still reach a portal, through the callback workers."""

from __future__ import annotations

import pytest

from core.queueing import QUEUE_CALLBACKS, QUEUE_MAINTENANCE, TASK_CALLBACK
from tests import support
from tests.api.test_callbacks import Receiver, deliveries
from tests.conftest import Tenant
from tests.core.test_callback_outbox import pending_delivery


@pytest.mark.usefixtures("database")
def test_a_clinics_slow_receiver_delays_no_classification(
    client, worker, callback_worker, tenant: Tenant, settings, store_case, publisher, jpeg_bytes: bytes
) -> None:  # type: ignore[no-untyped-def]
    # Callbacks run on a worker of their own. On the classification worker (one child here) an attempt
    # waiting on a slow receiver held the child, and every clinic's next case waited behind it.
    server = Receiver([], hold=True)
    try:
        client.put("/v1/clinic/callback", headers=tenant.headers, json={"url": server.url}).raise_for_status()
        first = store_case(tenant, jpeg_bytes)
        support.publish_classify(publisher, first, "routine")
        support.wait_for(lambda: server.calls, timeout=120, what="the first case's callback to reach the receiver")
        second = store_case(tenant, jpeg_bytes)
        support.publish_classify(publisher, second, "routine")
        support.wait_for(
            lambda: client.get(f"/v1/cases/{second}", headers=tenant.headers).json()["status"] == "succeeded",
            timeout=60,
            interval=0.1,
            what="the second case to be classified",
        )
        # ...while the first case's attempt still waits on the receiver (it ends at three callback
        # timeouts, 15 s here, recording a DeadlineExceeded): the second case did not wait for it
        row = deliveries(settings, first)[0]
        assert row is not None and (row.status, row.attempts, row.last_error) == ("pending", 1, None)
        assert row.leased_until is not None
        server.release()
    finally:
        server.close()


@pytest.mark.usefixtures("database")
def test_a_callback_an_earlier_release_sent_to_the_maintenance_queue_is_delivered_by_the_callback_worker(
    client, worker, callback_worker, tenant: Tenant, settings, keyring, store_case, publisher, private_broker
) -> None:  # type: ignore[no-untyped-def]
    # The classification worker takes the maintenance queue but has no route out any more: it passes
    # the message on, unattempted, and the callback worker delivers it.
    server = Receiver([])
    try:
        case_id = pending_delivery(settings, private_broker, keyring, tenant, store_case)  # its own message: lost
        client.put("/v1/clinic/callback", headers=tenant.headers, json={"url": server.url}).raise_for_status()
        tried_here = worker.metric("dermq_callback_deliveries_total")
        delivered_there = callback_worker.metric("dermq_callback_deliveries_total", outcome="delivered")
        publisher.send_task(TASK_CALLBACK, args=[str(case_id)], queue=QUEUE_MAINTENANCE, priority=6)  # as it sent
        row = support.wait_for(
            lambda: (d := deliveries(settings, case_id)[0]) is not None and d.status != "pending" and d,
            timeout=120,
            interval=0.2,
            what="the callback to be delivered",
        )
        assert (row.status, row.attempts, len(server.calls)) == ("delivered", 1, 1)
        support.wait_for(
            lambda: callback_worker.metric("dermq_callback_deliveries_total", outcome="delivered") > delivered_there,
            timeout=30,
            what="the callback worker to count the delivery",
        )
        assert worker.metric("dermq_callback_deliveries_total") == tried_here  # no attempt from a classifying child
    finally:
        server.close()


@pytest.mark.usefixtures("database")
def test_a_clinics_slow_receiver_holds_no_other_clinics_callbacks(
    client, callback_worker, make_key, settings, keyring, store_case, publisher, private_broker
) -> None:  # type: ignore[no-untyped-def]
    # One clinic's finished cases, more than the callback worker has threads, reach a receiver that
    # answers nothing; another clinic's one callback comes after them. Without a limit per clinic,
    # all eight threads waited on the slow receiver (an attempt gives up after one callback timeout
    # without an answer, 5 s here) and the other clinic's news waited for them (5.3 s here, and
    # longer the more the slow clinic has finished); now at most DERMQ_CALLBACK_CLINIC_CONCURRENCY
    # (2) attempts go to one clinic at once.
    slow, fast = Receiver([], hold=True), Receiver([])
    busy, other = make_key("clinic"), make_key("clinic")
    try:
        waiting = [pending_delivery(settings, private_broker, keyring, busy, store_case) for _ in range(10)]
        news = pending_delivery(settings, private_broker, keyring, other, store_case)
        for tenant, server in ((busy, slow), (other, fast)):
            client.put("/v1/clinic/callback", headers=tenant.headers, json={"url": server.url}).raise_for_status()
        for case_id in [*waiting, news]:  # the slow clinic's first, in the order their cases finished
            publisher.send_task(TASK_CALLBACK, args=[str(case_id)], queue=QUEUE_CALLBACKS, priority=6)
        support.wait_for(lambda: fast.calls, timeout=60, interval=0.1, what="the other clinic's callback")
        # ...while the slow clinic's attempts still wait on its receiver: two of them, none answered
        assert 1 <= slow.most_open <= settings.callback_clinic_concurrency
        slow.release()
        # the deferred ones take their turn once the receiver answers, each in one attempt
        support.wait_for(
            lambda: all((r := deliveries(settings, case_id)[0]) and r.status == "delivered" for case_id in waiting),
            timeout=90,
            interval=0.5,
            what="the slow clinic's callbacks to be delivered",
        )
        # a turn waited for is no attempt: every attempt counted reached the receiver
        assert sum(deliveries(settings, case_id)[0].attempts for case_id in waiting) == len(slow.calls)  # type: ignore[union-attr,misc]
        assert slow.most_open <= settings.callback_clinic_concurrency
    finally:
        slow.close()
        fast.close()
