"""Worker fixtures: submitting cases straight through the services (bypassing the intake)."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable

import pytest
from celery import Celery

from core import audit, cases
from core.db import session_scope
from core.keys import Principal
from core.models import Priority, Role
from core.publisher import make_publisher
from tests.conftest import Tenant


@pytest.fixture(scope="session")
def publisher(settings) -> Celery:  # type: ignore[no-untyped-def]
    return make_publisher(settings)


@pytest.fixture
def store_case(settings, keyring) -> Callable[..., uuid.UUID]:  # type: ignore[no-untyped-def]
    """Store a queued case with arbitrary bytes as its image, as if the intake had accepted them."""

    def store(tenant: Tenant, data: bytes, priority: Priority = Priority.ROUTINE) -> uuid.UUID:
        image = cases.NewImage(
            data=data,
            format="JPEG",
            media_type="image/jpeg",
            width=300,
            height=225,
            sha256=hashlib.sha256(data).hexdigest(),
        )
        with session_scope(settings) as session:
            case, _ = cases.create_case(
                session,
                keyring=keyring,
                principal=Principal(tenant.key_id, Role.CLINIC, tenant.clinic_id),
                actor=audit.SYSTEM,
                image=image,
                client_ref=None,
                priority=priority,
            )
            return case.id

    return store
