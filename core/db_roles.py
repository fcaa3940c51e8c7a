"""Least privilege for the audit trail: an owner role that runs migrations, a runtime role for services.

The owner owns every table (it creates them in the migrations). The API, workers, beat, the sealer
and Flower log in as the runtime role, which may read and write the operational tables but only
INSERT and SELECT on the audit tables: no UPDATE, DELETE or TRUNCATE, and, not owning them, no
``ALTER TABLE ... DISABLE TRIGGER`` either. ``idle_in_transaction_session_timeout`` is set for it
so that no client, however slow, holds a transaction open for long.

    dermq db roles --owner dermq_owner --runtime dermq_app      # once, as a superuser (make run, compose)
    dermq db upgrade                                            # as the owner
    dermq db grant --runtime dermq_app                          # as the owner, after every upgrade

A superuser (or another member of the owner role) that runs ``dermq db upgrade`` migrates as the
owner role (:func:`migration_role`), so that what it creates is the owner's (a superuser first
hands it what other logins own).

In production :func:`check_login` refuses to start a service whose login owns the audit table (or
is a member of its owner), is a superuser, has CREATEROLE (it could make itself a member), or may set
``session_replication_role`` (a replica's session skips triggers not enabled ALWAYS).
"""

from __future__ import annotations

import re

from sqlalchemy import Connection, create_engine, text
from sqlalchemy.orm import Session

from core.config import Settings
from core.errors import BadRequest, Conflict, Forbidden, NotFound

AUDIT_TABLES = ("audit_events", "audit_leaves", "audit_nodes", "audit_checkpoints", "audit_verifications")
READ_ONLY_TABLES = ("alembic_version",)
IDLE_IN_TRANSACTION_TIMEOUT = "60s"
_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


class InsecureLoginError(RuntimeError):
    """A service would run with a database login that can rewrite the audit trail."""


def _ident(name: str) -> str:
    if not _NAME.match(name):
        raise ValueError(f"role name {name!r}: use lower-case letters, digits and underscores")
    return f'"{name}"'


def _quoted(name: str) -> str:
    """Any role's name as an SQL identifier (a database's owner need not be named as dermq names roles)."""
    return '"' + name.replace('"', '""') + '"'


def create_roles(
    connection: Connection, *, owner: str, runtime: str, owner_password: str | None, runtime_password: str | None
) -> None:
    """Create (or update) both login roles; run as a superuser or a role with CREATEROLE."""
    for name, password in ((owner, owner_password), (runtime, runtime_password)):
        exists = connection.scalar(text("SELECT 1 FROM pg_roles WHERE rolname = :n"), {"n": name})
        verb = "ALTER" if exists else "CREATE"
        clause = " PASSWORD :p" if password else ""
        statement = f"{verb} ROLE {_ident(name)} LOGIN NOSUPERUSER NOCREATEROLE NOBYPASSRLS{clause}"
        # DDL takes no bind parameters: the password is quoted by Postgres itself, its colons escaped (a
        # ":word" in it was read as a bind parameter, and the roles were not created)
        if password:
            literal = connection.scalar(text("SELECT quote_literal(:p)"), {"p": password})
            statement = statement.replace(":p", str(literal).replace(":", "\\:"))
        connection.execute(text(statement))
    connection.execute(
        text(f"ALTER ROLE {_ident(runtime)} SET idle_in_transaction_session_timeout = '{IDLE_IN_TRANSACTION_TIMEOUT}'")
    )


def dermq_tables() -> frozenset[str]:
    """dermq's own tables: the models' and those the migrations create beside them (the audit log's
    Merkle tables, Alembic's). A database may hold other applications' tables too: dermq hands over
    and grants on these alone."""
    import core.outcome_models  # noqa: F401  (its tables join Base.metadata)
    from core.models import Base

    return frozenset({*Base.metadata.tables, *AUDIT_TABLES, *READ_ONLY_TABLES})


def hand_over(connection: Connection, owner: str) -> None:
    """Make ``owner`` own dermq's tables (:func:`dermq_tables`: not another application's, in a database
    they share) and audit functions already created by another login (an older setup that migrated as
    the superuser), so that it can run the next migrations."""
    only = dermq_tables()
    tables = connection.scalars(
        text("SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND tableowner <> :o"), {"o": owner}
    ).all()
    for table in tables:
        if table in only:
            connection.execute(text(f"ALTER TABLE public.{_quoted(table)} OWNER TO {_quoted(owner)}"))
    functions = connection.scalars(
        text(
            "SELECT p.oid::regprocedure::text FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
            "WHERE n.nspname = 'public' AND p.proname LIKE 'audit%' AND pg_get_userbyid(p.proowner) <> :o"
        ),
        {"o": owner},
    ).all()
    for function in functions:
        connection.execute(text(f"ALTER FUNCTION {function} OWNER TO {_quoted(owner)}"))


def migration_role(connection: Connection) -> str | None:
    """The role the migrations take (``SET ROLE``) on this connection, or None to run as its login.

    What a migration creates belongs to the role that runs it, and only that role may alter it in
    a later migration or grant on it. ``dermq db roles`` gives the database to the owner role, so a
    login that is not that owner but may act as it (a superuser, or a member of the owner role) takes
    the owner's role: the tables it creates stay the owner's, and the owner's next upgrade and
    ``dermq db grant`` do not fail on them. A database owned by its login, or by a superuser (no
    owner role set up), is migrated as the login."""
    row = connection.execute(
        text(
            """
            SELECT pg_get_userbyid(d.datdba) AS owner, o.rolsuper AS owner_superuser,
                   pg_get_userbyid(d.datdba) = current_user AS own,
                   -- may SET ROLE to it: a privilege of its own from Postgres 16 on, which a member need
                   -- not have (a CREATEROLE login is made an ADMIN-only member of the roles it creates)
                   pg_has_role(current_user, d.datdba, CASE WHEN current_setting('server_version_num')::int
                                                            >= 160000 THEN 'SET' ELSE 'MEMBER' END) AS member
            FROM pg_database d JOIN pg_roles o ON o.oid = d.datdba
            WHERE d.datname = current_database()
            """
        )
    ).one()
    if row.own or row.owner_superuser or not row.member:
        return None
    return str(row.owner)


def take_migration_role(connection: Connection) -> str | None:
    """Take :func:`migration_role` for the rest of this session (committed); the role taken, or None.
    A superuser first hands the owner dermq's tables that its earlier runs created (:func:`hand_over`):
    else the first migration that alters one of those tables would fail, as the owner's would."""
    role = migration_role(connection)
    if role is not None:
        if connection.scalar(text("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")):
            hand_over(connection, role)
        connection.execute(text("SELECT set_config('role', :r, false)"), {"r": role})
    connection.commit()
    return role


def grant_runtime(connection: Connection, runtime: str) -> None:
    """Give ``runtime`` what the services need on the migrated schema; run as the owner after upgrades.
    Only on dermq's tables and their sequences: not on another application's in the same database."""
    role = _ident(runtime)
    database = connection.scalar(text("SELECT current_database()"))
    connection.execute(text(f'GRANT CONNECT ON DATABASE "{database}" TO {role}'))
    # PUBLIC may create temporary tables by default, and a temporary object is found before public's
    # by an unqualified name: no service needs one (the audit guards name public's objects since 0024)
    connection.execute(text(f'REVOKE TEMPORARY ON DATABASE "{database}" FROM PUBLIC'))
    connection.execute(text(f'REVOKE TEMPORARY ON DATABASE "{database}" FROM {role}'))
    connection.execute(text(f"GRANT USAGE ON SCHEMA public TO {role}"))
    ours = sorted(dermq_tables())
    tables = connection.scalars(
        text("SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND tablename = ANY(:t) ORDER BY 1"),
        {"t": ours},
    ).all()
    if tables:
        listed = ", ".join(f"public.{_quoted(table)}" for table in tables)
        connection.execute(text(f"GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE {listed} TO {role}"))
    sequences = connection.scalars(  # those of dermq's tables' serial and identity columns
        text(
            "SELECT s.relname FROM pg_class s JOIN pg_depend d ON d.classid = 'pg_class'::regclass "
            "AND d.objid = s.oid AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i') "
            "JOIN pg_class t ON t.oid = d.refobjid JOIN pg_namespace n ON n.oid = s.relnamespace "
            "WHERE s.relkind = 'S' AND n.nspname = 'public' AND t.relname = ANY(:t) ORDER BY 1"
        ),
        {"t": ours},
    ).all()
    if sequences:
        listed = ", ".join(f"public.{_quoted(sequence)}" for sequence in sequences)
        connection.execute(text(f"GRANT USAGE, SELECT ON SEQUENCE {listed} TO {role}"))
    locked = ", ".join(AUDIT_TABLES)
    connection.execute(text(f"REVOKE UPDATE, DELETE, TRUNCATE, REFERENCES, TRIGGER ON {locked} FROM {role}"))
    connection.execute(text(f"REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON {', '.join(READ_ONLY_TABLES)} FROM {role}"))


def login_problem(session: Session | Connection) -> str | None:
    """Why this login must not run a service (superuser, CREATEROLE, owner or member of the owner, or
    allowed to set ``session_replication_role``), or None."""
    row = session.execute(
        text(
            """
            SELECT current_user AS login, r.rolsuper AS superuser, r.rolcreaterole AS createrole, t.tableowner AS owner,
                   pg_has_role(current_user, t.tableowner, 'MEMBER') AS member
            FROM pg_roles r LEFT JOIN pg_tables t ON t.schemaname = 'public' AND t.tablename = 'audit_events'
            WHERE r.rolname = current_user
            """
        )
    ).one()
    if row.superuser:
        return f"the database login {row.login!r} is a superuser"
    if row.createrole:  # it can grant itself the owner's role, then disable the triggers
        return f"the database login {row.login!r} has CREATEROLE"
    if row.owner is not None and row.member:
        return f"the database login {row.login!r} owns the audit table (its owner is {row.owner!r})"
    version = int(session.execute(text("SHOW server_version_num")).scalar_one())
    if (
        version >= 150000
        and session.execute(text("SELECT has_parameter_privilege('session_replication_role', 'SET')")).scalar_one()
    ):  # a replica's session skips triggers not enabled ALWAYS: those of a later schema change
        return f"the database login {row.login!r} may set session_replication_role"
    return None


def check_login(session: Session | Connection, settings: Settings) -> None:
    """In production, refuse a login that could rewrite the audit trail (see the module docstring)."""
    if settings.environment != "production" or not settings.audit_require_runtime_role:
        return
    problem = login_problem(session)
    if problem:
        raise InsecureLoginError(
            f"refusing to start: {problem}. Such a login can disable the audit trail's triggers and rewrite "
            "it. Connect the services as the runtime role (INSERT and SELECT only on the audit tables; "
            "see `dermq db roles` and `dermq db grant`), and run migrations as the owner."
        )


# --------------------------------------------------------------------------- set-up steps (dermq db roles | grant)


def set_up_roles(
    settings: Settings, *, owner: str, runtime: str, owner_password: str | None, runtime_password: str | None
) -> str:
    """Create both roles and give the database and dermq's tables in it to the owner (as a superuser);
    another application's tables in the same database stay its own."""
    if owner == runtime:  # the services would log in as the owner, which production refuses
        raise BadRequest(
            f"{owner} cannot be both the owner and the runtime role: name two roles", code="runtime_is_owner"
        )
    engine = create_engine(settings.database_url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            create_roles(
                connection,
                owner=owner,
                runtime=runtime,
                owner_password=owner_password,
                runtime_password=runtime_password,
            )
            database = connection.scalar(text("SELECT current_database()"))
            connection.execute(text(f'ALTER DATABASE "{database}" OWNER TO {_ident(owner)}'))
            hand_over(connection, owner)
    finally:
        engine.dispose()
    return f"roles {owner} (owner of database {database}) and {runtime} (runtime) are ready"


def grant(settings: Settings, runtime: str) -> str:
    """Grant the runtime role its privileges (as the owner, after every upgrade). :class:`Forbidden`
    for a login that neither owns the tables nor may act as their owner: Postgres grants nothing for
    it, with a warning only, and the runtime role would be left without its privileges unnoticed.
    :class:`NotFound` for a runtime role that does not exist (a misspelt name), :class:`Conflict` for
    the owner named instead (or a role that may act as it, a superuser): the revokes would take the
    owner's own UPDATE on ``alembic_version`` and the audit tables, and its next upgrade would fail."""
    _ident(runtime)
    engine = create_engine(settings.database_url)
    try:
        with engine.begin() as connection:
            owner = _may_grant(connection)
            acts_as_owner = connection.scalar(
                text("SELECT pg_has_role(rolname, :o, 'MEMBER') FROM pg_roles WHERE rolname = :n"),
                {"n": runtime, "o": owner},
            )
            if acts_as_owner is None:
                raise NotFound(f"there is no role {runtime}: create it with `dermq db roles`", code="role_not_found")
            if acts_as_owner:
                what = "owns dermq's tables" if runtime == owner else f"may act as {owner}, the tables' owner"
                raise Conflict(
                    f"{runtime} {what}: the runtime role must be a role of its own, which the services log in as",
                    code="runtime_is_owner",
                )
            grant_runtime(connection, runtime)
    finally:
        engine.dispose()
    return f"granted {runtime} its privileges: INSERT and SELECT only on {', '.join(AUDIT_TABLES)}"


def _may_grant(connection: Connection) -> str:
    """Refuse (:class:`Conflict`, :class:`Forbidden`) a grant that would grant nothing; the tables' owner."""
    found = connection.execute(
        text(
            "SELECT t.tableowner, current_user, pg_has_role(current_user, t.tableowner, 'USAGE') FROM pg_tables t "
            "WHERE t.schemaname = 'public' AND t.tablename = 'audit_events'"
        )
    ).one_or_none()
    if found is None:
        raise Conflict("the database holds no dermq tables yet: run `dermq db upgrade` first", code="not_migrated")
    owner, login, member = found
    if not member:
        raise Forbidden(
            f"the tables are {owner}'s: only that role, or a login that may act as it, grants on them "
            f'(this login is {login}; see docs/SECURITY.md, "Database roles")',
            code="not_owner",
        )
    return str(owner)


def refuse_insecure_login(settings: Settings) -> None:
    """The start-up check of every service: in production, connect once and :func:`check_login`."""
    if settings.environment != "production" or not settings.audit_require_runtime_role:
        return
    engine = create_engine(settings.database_url)
    try:
        with engine.connect() as connection:
            check_login(connection, settings)
    finally:
        engine.dispose()
