"""Client fixtures: a :class:`dermq_client.Client` for a fresh clinic, on the live API (tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from dermq_client import Client

from tests.conftest import Tenant


@pytest.fixture
def dermq(live_api: str, tenant: Tenant) -> Iterator[Client]:
    with Client(live_api, tenant.token, timeout=30) as client:
        yield client
