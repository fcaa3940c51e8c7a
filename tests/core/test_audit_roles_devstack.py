"""`make run`'s preparation (core.devstack.prepare) creates the owner and runtime roles, migrates as
the owner and hands the services a login that cannot rewrite the audit trail."""

from __future__ import annotations

import os
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from core import db_roles, devstack
from core.config import Settings
from tests import support


def test_make_run_services_log_in_as_the_runtime_role(settings: Settings, tmp_path: Path) -> None:
    name = f"{support.TEST_DATABASE}_devstack"
    url = make_url(settings.database_url).set(database=name).render_as_string(False)
    support.drop_database(url)
    local = settings.model_copy(update={"database_url": url})
    env = {
        **os.environ,
        "DERMQ_DATABASE_URL": url,
        "DERMQ_KEY_FILE": str(tmp_path / "keys.json"),
        "DERMQ_AUDIT_WITNESS_FILE": str(tmp_path / "witness.log"),
        "DERMQ_ENVIRONMENT": "development",
    }
    roles = devstack.database_roles(local, tmp_path)
    try:
        services = devstack.prepare(local, tmp_path, env)
        assert services["DERMQ_DATABASE_URL"] == roles["runtime_url"]
        assert (tmp_path / "audit-signing-key.json").stat().st_mode & 0o777 == 0o600
        for kind, problem in (("runtime", None), ("owner", "owns the audit table")):
            engine = create_engine(roles[f"{kind}_url"])
            try:
                with engine.connect() as connection:
                    found = db_roles.login_problem(connection)
                    assert (found is None) if problem is None else (problem in (found or "")), found
                    if kind == "runtime":  # the demo clinic and key were created (and audited) as the runtime
                        assert connection.scalar(text("SELECT count(*) FROM audit_events")) > 0
            finally:
                engine.dispose()
        # A second `make run` finds everything in place.
        assert devstack.prepare(local, tmp_path, env)["DERMQ_DATABASE_URL"] == roles["runtime_url"]
    finally:
        support.drop_database(url)
        admin = create_engine(make_url(url).set(database="postgres"), isolation_level="AUTOCOMMIT")
        with admin.connect() as connection:
            for role in (roles["owner"], roles["runtime"]):
                connection.execute(text(f'DROP ROLE IF EXISTS "{role}"'))
        admin.dispose()
