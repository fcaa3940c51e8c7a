"""The asyncio client against the real stack: the same flow as the blocking one."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from dermq_client import AsyncClient, Diagnosis, NotFound

from tests.conftest import Tenant


def test_async_submit_wait_heatmap_list_and_erase(live_api: str, tenant: Tenant, worker, jpeg_bytes: bytes) -> None:  # type: ignore[no-untyped-def]
    async def flow() -> None:
        async with AsyncClient(live_api, tenant.token) as dermq:
            queued = await dermq.submit(jpeg_bytes, client_ref="MRN-async")
            finished = await dermq.wait(queued.id, timeout=60)
            assert finished.id == queued.id and finished.status == "succeeded"
            assert isinstance(finished.result, Diagnosis)
            assert sum(finished.result.probabilities.values()) == pytest.approx(1.0, abs=1e-3)

            at_once = await dermq.submit(jpeg_bytes + b"\0", wait=20)
            assert at_once.status == "succeeded" and isinstance(at_once.result, Diagnosis)
            assert (await dermq.heatmap(at_once.id)).startswith(b"\x89PNG\r\n\x1a\n")

            assert [c.id async for c in dermq.iter_cases(page_size=1)] == [at_once.id, queued.id]
            assert (await dermq.get(queued.id)).client_ref == "MRN-async"
            assert (await dermq.erase(queued.id)).status == "purged"
            with pytest.raises(NotFound) as missing:
                await dermq.get(uuid.uuid4())
            assert missing.value.code == "case_not_found"

    asyncio.run(flow())
