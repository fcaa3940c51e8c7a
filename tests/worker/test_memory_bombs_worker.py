"""Memory attacks on the worker: sixteen lossless images just under the pixel cap (70 KB PNGs that
decode to 20 megapixels each), queued at once. A batch is bounded by declared pixels
(``DERMQ_BATCH_MAX_PIXELS``), so a worker child never holds sixteen decoded canvases: its peak resident
memory stays bounded, and every case ends (here: out of distribution, a uniform canvas is no lesion)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy import select

from core.db import session_scope
from core.models import Case
from core.publisher import make_publisher
from tests import processes, support
from tests.api.test_memory_bombs import peak_rss_mib
from tests.conftest import case_store, new_tenant

pytestmark = [pytest.mark.usefixtures("database"), pytest.mark.slow]

SIDE = 4500  # 20.25 megapixels, under the 25-megapixel cap for lossless formats
#: a child with the model loaded is about 400 MiB; one batch's canvases and their copies must fit beside it
#: (before batches were bounded by decoded pixels, eight of these in one batch took the child to 1.6 GiB)
PEAK_MIB = 1024


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except FileNotFoundError:  # a thread that ended since the listing
            continue
    return found


def test_sixteen_lossless_bombs_keep_a_worker_child_bounded(  # type: ignore[no-untyped-def]
    own_database, keyring, stack_env, stack_dir: Path, private_broker
) -> None:
    settings, tenant = own_database, new_tenant(own_database, keyring)
    out = io.BytesIO()
    Image.new("RGB", (SIDE, SIDE), (150, 100, 80)).save(out, "PNG")
    bomb = out.getvalue()
    assert len(bomb) < 200_000
    store = case_store(settings, keyring)
    ids = [store(tenant, bomb, fmt="PNG", width=SIDE, height=SIDE) for _ in range(16)]
    broker = private_broker  # a redis-server of this module's own: no other worker takes these messages
    worker = None
    try:
        publisher = make_publisher(settings.model_copy(update={"redis_url": broker.url}))
        env = {  # a metrics port of its own: on the shared worker's, its readiness read that worker's metrics
            **stack_env,
            "DERMQ_DATABASE_URL": settings.database_url,
            "DERMQ_REDIS_URL": broker.url,
            "DERMQ_WORKER_METRICS_PORT": "0",
        }
        worker = processes.start_worker(env, stack_dir / "bombs-worker.log", name="bombs")
        (child,) = children(worker.proc.pid)
        for case_id in ids:
            assert support.publish_classify(publisher, case_id, "routine")

        def ended() -> list[str] | None:
            with session_scope(settings) as session:
                statuses = list(session.scalars(select(Case.status).where(Case.id.in_(ids))))
            return statuses if all(s in ("succeeded", "failed") for s in statuses) else None

        statuses = support.wait_for(ended, timeout=300, interval=0.5, what="the sixteen cases to end")
        _, peak = peak_rss_mib(child)
        assert worker.alive() and children(worker.proc.pid) == [child], worker.output()[-2000:]  # never killed
        assert statuses == ["succeeded"] * 16, statuses
        assert peak < PEAK_MIB, f"a worker child peaked at {peak:.0f} MiB"
    finally:
        if worker is not None:
            worker.stop()
