"""Shared fixtures: the fixture images, and the integration stack (real Postgres, Redis, Celery worker)."""

from __future__ import annotations

import csv
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests import processes, support

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
FIXTURE_IMAGES = FIXTURES / "images"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under pytest-xdist (``make test``: ``--dist loadfile --no-loadscope-reorder``) a test module
    is the unit a worker takes, so that module-scoped fixtures (``own_database``, ``private_broker``)
    are built once. Modules holding a ``slow`` test are handed out first, so that a long one does not
    start last while the other workers run out of work."""
    if not support.XDIST_WORKER:
        return
    modules: dict[str, list[pytest.Item]] = {}
    for item in items:
        modules.setdefault(item.nodeid.split("::", 1)[0], []).append(item)
    units = sorted(modules.values(), key=lambda unit: not any(item.get_closest_marker("slow") for item in unit))
    items[:] = [item for unit in units for item in unit]


@pytest.fixture(scope="session")
def fixture_images() -> dict[str, Path]:
    """Image id -> path of the real HAM10000 fixture images."""
    return {p.stem: p for p in sorted(FIXTURE_IMAGES.glob("*.jpg"))}


@pytest.fixture(scope="session")
def fixture_labels() -> dict[str, str]:
    with (FIXTURE_IMAGES / "metadata.csv").open() as handle:
        return {row["image_id"]: row["dx"] for row in csv.DictReader(handle)}


@pytest.fixture(scope="session")
def jpeg_bytes(fixture_images: dict[str, Path]) -> bytes:
    return next(iter(fixture_images.values())).read_bytes()


# --------------------------------------------------------------------------- integration stack


@pytest.fixture(scope="session")
def stack_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("stack")


@pytest.fixture(scope="session")
def stack_env(stack_dir: Path) -> dict[str, str]:
    from core import checkpoint
    from core.crypto import Keyring, write_key_file

    env = support.test_env(stack_dir)
    write_key_file(Path(env["DERMQ_KEY_FILE"]), Keyring.generate())
    (stack_dir / "period-keys").mkdir(mode=0o700)  # beside the key file, as `dermq keys init` creates it
    # the audit checkpoint signing key, beside the key file (what `dermq keys init` creates)
    checkpoint.write_signing_keys(stack_dir / "audit-signing-key.json", checkpoint.generate("dermq.local/audit"))
    return env


@pytest.fixture(scope="session")
def settings(stack_env: dict[str, str]):  # type: ignore[no-untyped-def]
    from core.config import Settings

    with support.environment(stack_env):
        return Settings()


@pytest.fixture(scope="session")
def database(settings) -> Iterator[str]:  # type: ignore[no-untyped-def]
    """The test database, built once per run by the Alembic migrations; and a copy of it as freshly
    migrated, the template of the modules' own databases (``own_database``), dropped at the end."""
    support.recreate_database(settings.database_url)
    support.migrate(settings.database_url)
    template = _template_url(settings)
    support.recreate_database(template, template=settings.database_url)  # nothing is connected yet
    try:
        yield settings.database_url
    finally:
        support.drop_database(template)


def _template_url(settings) -> str:  # type: ignore[no-untyped-def]
    return f"{settings.database_url}_template"


@pytest.fixture(scope="session")
def redis_client(settings):  # type: ignore[no-untyped-def]
    import redis

    client = redis.Redis.from_url(settings.redis_url)
    client.flushdb()
    yield client
    client.close()


@pytest.fixture(scope="session")
def keyring(settings):  # type: ignore[no-untyped-def]
    from core.crypto import load_keyring

    return load_keyring(settings)


@pytest.fixture(scope="session")
def api_app(settings, database, redis_client):  # type: ignore[no-untyped-def]
    from api.app import create_app

    return create_app(settings)


@pytest.fixture(scope="session")
def client(api_app):  # type: ignore[no-untyped-def]
    from fastapi.testclient import TestClient

    with TestClient(api_app, raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.fixture(scope="session")
def worker(stack_env: dict[str, str], stack_dir: Path, database, redis_client) -> Iterator[processes.Worker]:  # type: ignore[no-untyped-def]
    """A real Celery worker process (prefork, one child) on the test database and Redis.

    One case per task (``DERMQ_BATCHING=off``): many tests store queued cases that nothing publishes
    (``store_case``) and expect them to wait; a batching worker would claim them with the next case
    it takes. Batching is tested on databases and brokers of its own (``own_database``:
    tests/worker/test_batching.py, tests/worker/test_priorities.py; tests/faults)."""
    env = {**stack_env, "DERMQ_BATCHING": "off"}
    process = processes.start_worker(env, stack_dir / "worker.log", name="main")
    yield process
    process.stop()


@pytest.fixture(scope="session")
def callback_worker(stack_env: dict[str, str], stack_dir: Path, database, redis_client) -> Iterator[processes.Worker]:  # type: ignore[no-untyped-def]
    """The callback worker (worker.callbacks_app: completion callbacks only, on threads), as deployed
    beside the classification ``worker``."""
    env = {**stack_env, "DERMQ_WORKER_METRICS_PORT": "0"}  # a port of its own: start_worker picks one
    process = processes.start_worker(
        env, stack_dir / "callback-worker.log", name="callbacks", app="worker.callbacks_app", queues="callbacks"
    )
    yield process
    process.stop()


#: the live API processes started by ``live_api`` (tests/api/test_metrics.py scrapes the last one's metrics)
live_api_process: list[processes.Process] = []


@pytest.fixture(scope="session")
def live_api(stack_env: dict[str, str], stack_dir: Path, database, redis_client) -> Iterator[str]:  # type: ignore[no-untyped-def]
    """The API in its own process (uvicorn), with a 1 MiB upload cap; yields its base URL. Shared by
    tests/api and tests/client (the Python client talks to it over real sockets)."""
    port = support.free_port()
    env = {
        **stack_env,
        "DERMQ_API_PORT": str(port),
        "DERMQ_MAX_UPLOAD_BYTES": str(1024 * 1024),
        "DERMQ_METRICS_PORT": str(support.free_port()),
    }
    with processes.api_process(env, stack_dir / "live-api.log") as (base, server):
        server.metrics_url = f"http://127.0.0.1:{env['DERMQ_METRICS_PORT']}/metrics"  # type: ignore[attr-defined]
        live_api_process.append(server)
        yield base


@dataclass(frozen=True)
class Tenant:
    clinic_id: uuid.UUID
    name: str
    token: str
    key_id: uuid.UUID

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def new_tenant(settings, keyring, role: str = "clinic", clinic_id: uuid.UUID | None = None) -> Tenant:  # type: ignore[no-untyped-def]
    """A fresh clinic (unless ``clinic_id`` names one) and a key for it, in the database of ``settings``."""
    from core import clinics, keys
    from core.db import session_scope
    from core.models import Role

    with session_scope(settings) as session:
        if clinic_id is None:
            clinic = clinics.create_clinic(session, f"clinic-{uuid.uuid4().hex[:10]}")
            clinic_id, name = clinic.id, clinic.name
        else:
            name = clinics.get_clinic(session, clinic_id).name
        key, token = keys.create_key(
            session, keyring, role=Role(role), clinic_id=clinic_id if role == "clinic" else None
        )
        return Tenant(clinic_id, name, token, key.id)


def own_database_fixtures() -> tuple[Any, Any]:
    """The ``tenant`` and ``store_case`` fixtures of a test module that runs on a database of its own
    (:func:`own_database`), in place of the shared database's. At the module's top level::

        tenant, store_case = own_database_fixtures()
    """

    @pytest.fixture
    def tenant(own_database, keyring) -> Tenant:  # type: ignore[no-untyped-def]
        return new_tenant(own_database, keyring)

    @pytest.fixture
    def store_case(own_database, keyring) -> Callable[..., uuid.UUID]:  # type: ignore[no-untyped-def]
        return case_store(own_database, keyring)

    return tenant, store_case


def own_period_keys_fixtures() -> tuple[Any, Any]:
    """The ``own`` fixture (settings on this module's own database, :func:`own_database`, and a
    period-key folder of its own) and the ``keyring`` fixture (the stack's keys with that folder: the
    cases stored here are sealed there), for a module whose retention or key work acts on every key of
    its folder and must not touch the shared one. At the module's top level::

        own, keyring = own_period_keys_fixtures()
    """

    @pytest.fixture(scope="module")
    def own(own_database, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
        folder = tmp_path_factory.mktemp("period-keys")  # mode 0700, as `dermq keys init` makes it
        return own_database.model_copy(update={"period_key_dir": folder})

    @pytest.fixture(scope="module")
    def keyring(own):  # type: ignore[no-untyped-def]
        from core.crypto import load_keyring

        return load_keyring(own)

    return own, keyring


def create_case_for(  # type: ignore[no-untyped-def]
    session, keyring, tenant: Tenant, data: bytes = b"an image", fmt: str = "JPEG", **options
) -> tuple[Any, bool]:
    """``core.cases.create_case`` of ``data`` (declared a ``fmt`` image of 300 x 225 pixels unless
    ``width`` or ``height`` say otherwise) as the intake calls it with ``tenant``'s key: (case, created).
    ``options``: ``client_ref``, ``priority``, ``idempotency_key``."""
    import hashlib

    from core import audit, cases
    from core.keys import Principal
    from core.models import Priority, Role

    size = {"width": options.pop("width", 300), "height": options.pop("height", 225)}
    image = cases.NewImage(data, fmt, f"image/{fmt.lower()}", **size, sha256=hashlib.sha256(data).hexdigest())
    return cases.create_case(
        session,
        keyring=keyring,
        principal=Principal(tenant.key_id, Role.CLINIC, tenant.clinic_id),
        actor=audit.SYSTEM,
        image=image,
        client_ref=options.pop("client_ref", None),
        priority=Priority(options.pop("priority", "routine")),
        **options,
    )


def case_store(settings, keyring) -> Callable[..., uuid.UUID]:  # type: ignore[no-untyped-def]
    """A function that stores a queued case with arbitrary bytes as its image in the database of
    ``settings``, as if the intake had accepted them (nothing is published: the case waits until a
    test publishes it or the sweeper finds it)."""
    from core import cases
    from core.db import session_scope
    from ml.working_copy import MEDIA_TYPE

    def store(
        tenant: Tenant,
        data: bytes,
        priority: str = "routine",
        *,
        fmt: str = "JPEG",
        width: int = 300,
        height: int = 225,
        working_copy: bytes | None = None,
    ) -> uuid.UUID:
        """``data`` declared as a ``fmt`` image of ``width`` x ``height`` pixels (as the intake records),
        with ``working_copy`` as the intake's working copy of it (``ml.working_copy``) if given."""
        with session_scope(settings) as session:
            case, _ = create_case_for(
                session, keyring, tenant, data, fmt, priority=priority, width=width, height=height
            )
            if working_copy is not None:
                cases.add_working_copy(
                    session, keyring=keyring, case=case, copy=cases.WorkingCopy(working_copy, MEDIA_TYPE)
                )
            return case.id

    return store


@pytest.fixture
def make_key(settings, database, keyring) -> Callable[..., Tenant]:  # type: ignore[no-untyped-def]
    """Create a fresh clinic (so tests never see each other's rows) and a key for it."""
    return lambda role="clinic", clinic_id=None: new_tenant(settings, keyring, role, clinic_id)


@pytest.fixture
def tenant(make_key: Callable[..., Tenant]) -> Tenant:
    return make_key("clinic")


@pytest.fixture
def store_case(settings, keyring, database) -> Callable[..., uuid.UUID]:  # type: ignore[no-untyped-def]
    """Store a queued case in the shared test database (see :func:`case_store`)."""
    return case_store(settings, keyring)


@pytest.fixture(scope="module")
def own_database(settings, database, request: pytest.FixtureRequest) -> Iterator[Any]:
    """Settings on a database of this test module's own, migrated, and dropped after the module.

    For tests that need an empty queue: a batch claims the oldest queued cases of its whole database,
    and the shared one holds cases that other tests left queued on purpose. The module gets its
    own clinics and cases with :func:`new_tenant` and :func:`case_store` on these settings."""
    from core.db import dispose_engines

    module = request.module.__name__.rsplit(".", 1)[-1]
    url = f"{settings.database_url.rsplit('/', 1)[0]}/{support.TEST_DATABASE}_{module}"
    support.recreate_database(url, template=_template_url(settings))  # migrated: a copy of the template
    try:
        yield settings.model_copy(update={"database_url": url})
    finally:
        dispose_engines()
        support.drop_database(url)


@pytest.fixture
def empty_queue(own_database):  # type: ignore[no-untyped-def]
    """The test ends with an empty queue in the module's own database: the cases it leaves queued (all
    of them this module's) are failed after it, so that the next test's batches find none of them."""
    yield
    from sqlalchemy import update

    from core.db import session_scope
    from core.models import Case

    with session_scope(own_database) as session:
        session.execute(
            update(Case)
            .where(Case.status == "queued")
            .values(status="failed", failure_code="abandoned", failure_message="left queued by the test")
        )


@pytest.fixture(scope="session")
def publisher(settings):  # type: ignore[no-untyped-def]
    from core.publisher import make_publisher

    return make_publisher(settings)


@pytest.fixture(scope="module")
def private_broker() -> Iterator[Any]:
    """A redis-server of this module's own as broker, in a folder of its own: what the code under test
    publishes reaches no worker and can be inspected. Skips the test where the machine has none."""
    from tests.faults.servers import own_redis

    with own_redis("dermq-broker-") as server:
        yield server
