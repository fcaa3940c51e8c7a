"""`dermq db roles` and the production login check (core.db_roles): passwords stored as given, an
older setup's functions handed over whole, and a login that could make itself the owner refused."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import subprocess
from collections.abc import Iterator

import pytest
from alembic import command
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL, make_url

from cli.db import alembic_config
from core import db_roles
from core.config import Settings
from tests import support
from tests.core.audit_roles import admin_engine

NAME = f"{support.TEST_DATABASE}_roles"


@pytest.fixture
def role_names(settings: Settings) -> Iterator[tuple[str, str]]:
    owner, runtime = f"{NAME}_owner", f"{NAME}_rt"
    admin = admin_engine(settings)
    yield owner, runtime
    support.drop_database(make_url(settings.database_url).set(database=NAME).render_as_string(False))
    with admin.connect() as connection:
        for role in (owner, runtime):
            connection.execute(text(f'DROP ROLE IF EXISTS "{role}"'))
    admin.dispose()


def _dermq(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*support.DERMQ, *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        cwd=support.ROOT,
        timeout=300,
    )


def _scram_matches(stored: str, password: str) -> bool:
    """Whether a SCRAM-SHA-256 verifier (``pg_authid.rolpassword``) is that of ``password`` (RFC 5802)."""
    method, rest = stored.split("$", 1)
    assert method == "SCRAM-SHA-256", method
    iterations_salt, keys = rest.split("$")
    iterations, salt = iterations_salt.split(":")
    stored_key = base64.b64decode(keys.split(":")[0])
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(salt), int(iterations))
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    return hashlib.sha256(client_key).digest() == stored_key


def test_passwords_are_stored_exactly_as_given(settings: Settings, role_names: tuple[str, str]) -> None:
    # ":ss" after a non-word character was read as a bind parameter: the roles were not created
    owner, runtime = role_names
    passwords = {owner: "pa-:ss%(x)s", runtime: "it's \\:a;b"}
    admin = admin_engine(settings)
    try:
        with admin.connect() as connection:
            connection.execute(text("SET password_encryption = 'scram-sha-256'"))
            for _ in range(2):  # created, then altered
                db_roles.create_roles(
                    connection,
                    owner=owner,
                    runtime=runtime,
                    owner_password=passwords[owner],
                    runtime_password=passwords[runtime],
                )
                for role, password in passwords.items():
                    query = text("SELECT rolpassword FROM pg_authid WHERE rolname = :r")
                    stored = connection.scalar(query, {"r": role})
                    assert _scram_matches(stored, password), role
    finally:
        admin.dispose()


def _database_with_roles(settings: Settings, owner: str, runtime: str, *, migrated: bool = False) -> URL:
    """The module's database made anew (``migrated``: by the superuser first, as an older setup was)
    and given to ``owner`` by ``dermq db roles``; its URL, as the superuser."""
    url = make_url(settings.database_url).set(database=NAME)
    support.recreate_database(url.render_as_string(False))
    if migrated:
        command.upgrade(alembic_config(url.render_as_string(False)), "head")
    superuser = settings.model_copy(update={"database_url": url.render_as_string(False)})
    db_roles.set_up_roles(superuser, owner=owner, runtime=runtime, owner_password=None, runtime_password=None)
    return url


def test_an_older_setup_is_handed_over_whole_and_the_owner_can_downgrade(
    settings: Settings, role_names: tuple[str, str]
) -> None:
    # A database the superuser migrated: the insert guards' functions stayed the superuser's, and the
    # owner's later migrations (and downgrades) that replace them failed with "must be owner".
    owner, runtime = role_names
    url = _database_with_roles(settings, owner, runtime, migrated=True)
    engine = create_engine(url)
    try:
        with engine.begin() as connection:
            others = connection.scalars(
                text(
                    "SELECT p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
                    "WHERE n.nspname = 'public' AND pg_get_userbyid(p.proowner) <> :o"
                ),
                {"o": owner},
            ).all()
        assert others == []
    finally:
        engine.dispose()
    as_owner = url.set(username=owner).render_as_string(False)
    command.downgrade(alembic_config(as_owner), "0013")  # drops the events' insert guard and its function
    command.upgrade(alembic_config(as_owner), "head")


def test_roles_and_grants_leave_another_applications_tables_alone(
    settings: Settings, role_names: tuple[str, str]
) -> None:
    # In a database shared with another application, `dermq db roles` gave that application's tables to
    # dermq's owner (their own role lost its access to them), and `dermq db grant` then opened them to
    # dermq's runtime login
    owner, runtime = role_names
    url = make_url(settings.database_url).set(database=NAME)
    support.recreate_database(url.render_as_string(False))
    admin = admin_engine(settings)
    with admin.connect() as connection:
        connection.execute(text(f'CREATE ROLE "{NAME}_their"'))
    engine = create_engine(url)
    try:
        with engine.begin() as connection:
            connection.execute(text(f'CREATE TABLE ledger (id serial) ; ALTER TABLE ledger OWNER TO "{NAME}_their"'))
        command.upgrade(alembic_config(url.render_as_string(False)), "head")  # an older setup: the superuser's
        superuser = settings.model_copy(update={"database_url": url.render_as_string(False)})
        db_roles.set_up_roles(superuser, owner=owner, runtime=runtime, owner_password=None, runtime_password=None)
        with engine.begin() as connection:
            owners = dict(
                connection.execute(
                    text("SELECT tablename, tableowner FROM pg_tables WHERE schemaname = 'public'")
                ).all()
            )
        assert owners.pop("ledger") == f"{NAME}_their"
        assert owners == dict.fromkeys(db_roles.dermq_tables(), owner)  # dermq's tables: all of them, the owner's
        granted = _dermq("db", "grant", "--runtime", runtime, DERMQ_DATABASE_URL=url.render_as_string(False))
        assert granted.returncode == 0, granted.stderr
        with engine.begin() as connection:
            held = connection.execute(
                text(
                    "SELECT has_table_privilege(:r, 'audit_nodes', 'INSERT'), has_table_privilege(:r, 'ledger', "
                    "'SELECT, INSERT, UPDATE, DELETE'), has_sequence_privilege(:r, 'ledger_id_seq', 'USAGE, SELECT')"
                ),
                {"r": runtime},
            ).one()
        assert tuple(held) == (True, False, False)
    finally:
        engine.dispose()
        support.drop_database(url.render_as_string(False))
        with admin.connect() as connection:
            connection.execute(text(f'DROP ROLE IF EXISTS "{NAME}_their"'))
        admin.dispose()


def test_a_login_with_createrole_may_not_run_a_service(settings: Settings, role_names: tuple[str, str]) -> None:
    # CREATEROLE can grant itself the owner's role, then disable the audit triggers
    login = role_names[1]
    admin = admin_engine(settings)
    with admin.connect() as connection:
        connection.execute(text(f'CREATE ROLE "{login}" LOGIN CREATEROLE'))
    admin.dispose()
    engine = create_engine(make_url(settings.database_url).set(username=login, database="postgres"))
    try:
        with engine.connect() as connection:
            assert db_roles.login_problem(connection) == f"the database login {login!r} has CREATEROLE"
    finally:
        engine.dispose()


def test_a_superuser_upgrade_leaves_everything_to_the_owner(settings: Settings, role_names: tuple[str, str]) -> None:
    # `dermq db upgrade` with a superuser's URL left the tables its migrations created the superuser's:
    # the owner's next upgrade and `dermq db grant` failed with "permission denied" a release later
    owner, runtime = role_names
    url = _database_with_roles(settings, owner, runtime)
    as_owner = url.set(username=owner).render_as_string(False)
    command.upgrade(alembic_config(as_owner), "0019")  # an older release, migrated as the documentation says
    engine = create_engine(url)
    with engine.begin() as connection:  # and tables a superuser's run of an earlier release left its own
        connection.execute(text("ALTER TABLE clinic_callbacks OWNER TO CURRENT_USER"))
        # (an audit table the migrations create outside the models' metadata stayed the superuser's)
        connection.execute(text("ALTER TABLE audit_leaves OWNER TO CURRENT_USER"))
        # and a table and a sequence that are not dermq's (another application's): neither the upgrade's
        # to give away nor the grant's to open to dermq's runtime role
        connection.execute(text('CREATE TABLE "their ""ledger""" (id int)'))
        connection.execute(text("CREATE SEQUENCE their_ids"))
    engine.dispose()
    done = _dermq("db", "upgrade", DERMQ_DATABASE_URL=url.render_as_string(False), DERMQ_DATABASE_RUNTIME_ROLE=runtime)
    assert done.returncode == 0, done.stderr
    assert f"as {owner}, the database's owner" in done.stdout
    engine = create_engine(url)
    try:
        with engine.begin() as connection:  # the superuser's grant reached dermq's tables, and no others
            held = connection.execute(
                text(
                    "SELECT has_table_privilege(:r, 'cases', 'INSERT'), has_sequence_privilege(:r, "
                    "'audit_leaves_seq_seq', 'USAGE'), has_table_privilege(:r, 'public.\"their \"\"ledger\"\"\"', "
                    "'SELECT, INSERT, UPDATE, DELETE'), has_sequence_privilege(:r, 'their_ids', 'USAGE, SELECT')"
                ),
                {"r": runtime},
            ).one()
        assert tuple(held) == (True, True, False, False)
    finally:
        engine.dispose()
    engine = create_engine(url)
    try:
        with engine.begin() as connection:
            others = connection.execute(
                text(
                    "SELECT tablename, tableowner FROM pg_tables WHERE schemaname = 'public' AND tableowner <> :o "
                    "UNION ALL SELECT p.proname, pg_get_userbyid(p.proowner) FROM pg_proc p "
                    "JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = 'public' "
                    "AND pg_get_userbyid(p.proowner) <> :o"
                ),
                {"o": owner},
            ).all()
        assert others == [('their "ledger"', make_url(settings.database_url).username or "root")]
    finally:
        engine.dispose()
    # the next release, migrated and granted by the owner again
    command.downgrade(alembic_config(as_owner), "0019")
    command.upgrade(alembic_config(as_owner), "head")
    granted = _dermq("db", "grant", "--runtime", runtime, DERMQ_DATABASE_URL=as_owner)
    assert granted.returncode == 0, granted.stderr
    runtime_engine = create_engine(url.set(username=runtime))
    try:
        with runtime_engine.begin() as connection:
            assert db_roles.login_problem(connection) is None
            assert connection.scalar(text("SELECT count(*) FROM outcome_monthly_tallies")) == 0
    finally:
        runtime_engine.dispose()


def test_a_login_that_may_not_migrate_or_grant_is_told_so_in_one_line(
    settings: Settings, role_names: tuple[str, str]
) -> None:
    # A service's login (the runtime role) running the owner's commands: `dermq db upgrade` ended in a
    # traceback, and `dermq db grant` printed "granted" while Postgres granted nothing (a warning only).
    owner, runtime = role_names
    url = _database_with_roles(settings, owner, runtime)
    as_runtime = url.set(username=runtime).render_as_string(False)
    refused = _dermq("db", "upgrade", DERMQ_DATABASE_URL=as_runtime)  # nothing migrated, nothing granted yet
    assert refused.returncode == 77, refused.stderr
    assert "Traceback" not in refused.stderr
    assert refused.stderr.startswith("error: the database refused this login (permission denied")
    as_owner = url.set(username=owner).render_as_string(False)
    command.upgrade(alembic_config(as_owner), "head")
    refused = _dermq("db", "grant", "--runtime", runtime, DERMQ_DATABASE_URL=as_runtime)
    assert refused.returncode == 2 and "granted" not in refused.stdout, refused.stdout
    assert f"the tables are {owner}'s" in refused.stderr and "(not_owner)" in refused.stderr
    runtime_engine = create_engine(url.set(username=runtime))
    try:
        with runtime_engine.begin() as connection:  # it still has no privileges on them
            assert not connection.scalar(text("SELECT has_table_privilege(current_user, 'audit_events', 'SELECT')"))
    finally:
        runtime_engine.dispose()
    granted = _dermq("db", "grant", "--runtime", runtime, DERMQ_DATABASE_URL=as_owner)
    assert granted.returncode == 0 and "granted" in granted.stdout, granted.stderr


def test_a_grant_to_a_role_that_does_not_exist_is_one_error_line(
    settings: Settings, role_names: tuple[str, str]
) -> None:
    # A misspelt --runtime (or DERMQ_DATABASE_RUNTIME_ROLE) ended `dermq db grant` and `dermq db upgrade`
    # in a traceback of Postgres's UndefinedObject
    owner, runtime = role_names
    url = _database_with_roles(settings, owner, runtime)
    as_owner = url.set(username=owner).render_as_string(False)
    command.upgrade(alembic_config(as_owner), "head")
    for args, env in (
        (("db", "grant", "--runtime", f"{runtime}_typo"), {}),
        (("db", "upgrade"), {"DERMQ_DATABASE_RUNTIME_ROLE": f"{runtime}_typo"}),
    ):
        refused = _dermq(*args, DERMQ_DATABASE_URL=as_owner, **env)
        assert refused.returncode == 2, refused.stderr
        assert "Traceback" not in refused.stderr and "granted" not in refused.stdout
        assert refused.stderr.splitlines() == [
            f"error: there is no role {runtime}_typo: create it with `dermq db roles` (role_not_found)"
        ]


def test_the_owner_named_as_the_runtime_role_is_refused(settings: Settings, role_names: tuple[str, str]) -> None:
    # `dermq db grant --runtime <the owner>` (the login that runs it) reported success while it took the
    # owner's own UPDATE on alembic_version and the audit tables away: its next `dermq db upgrade` failed
    # with "permission denied"; and `dermq db roles` made one role both owner and runtime login
    owner, runtime = role_names
    url = _database_with_roles(settings, owner, runtime)
    as_owner = url.set(username=owner).render_as_string(False)
    command.upgrade(alembic_config(as_owner), "head")
    for login in (as_owner, url.render_as_string(False)):  # the owner's login, and a superuser's
        refused = _dermq("db", "grant", "--runtime", owner, DERMQ_DATABASE_URL=login)
        assert refused.returncode == 2 and "granted" not in refused.stdout, refused.stderr
        assert refused.stderr.splitlines() == [
            f"error: {owner} owns dermq's tables: the runtime role must be a role of its own, which the "
            "services log in as (runtime_is_owner)"
        ]
    engine = create_engine(url)
    try:
        with engine.begin() as connection:
            query = "SELECT has_table_privilege(:o, 'alembic_version', 'UPDATE')"
            assert connection.scalar(text(query), {"o": owner})
    finally:
        engine.dispose()
    command.downgrade(alembic_config(as_owner), "0030")  # the owner still migrates
    command.upgrade(alembic_config(as_owner), "head")
    same = _dermq("db", "roles", "--owner", owner, "--runtime", owner, DERMQ_DATABASE_URL=url.render_as_string(False))
    assert same.returncode == 2 and "ready" not in same.stdout, same.stderr
    assert same.stderr.splitlines() == [
        f"error: {owner} cannot be both the owner and the runtime role: name two roles (runtime_is_owner)"
    ]
