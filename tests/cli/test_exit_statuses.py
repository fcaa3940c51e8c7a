"""The `dermq` command's exit statuses and error lines (docs/OPERATIONS.md, "What runs"): bad input,
settings or files 2, the database unreachable 69, a statement it gave up on 75, each one line and
never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest

from tests import support
from tests.cli.test_commands import run


@pytest.mark.usefixtures("database")
def test_bad_input_on_the_database_exits_2_with_one_error_line(settings) -> None:  # type: ignore[no-untyped-def]
    for args, message in [
        (["key", "create", "--clinic", "no-such-clinic", "--json"], "error: no such clinic (clinic_not_found)"),
        (["clinic", "deactivate", "no-such-clinic"], "error: no such clinic (clinic_not_found)"),
        (["key", "revoke", str(uuid.uuid4())], "error: no such API key (key_not_found)"),
        (["key", "revoke", "dq_000000000000_..."], "error: no such API key (key_not_found)"),
    ]:
        result = run(settings, *args)
        assert result.returncode == 2, (args, result.stderr)
        assert result.stderr.startswith(message) and len(result.stderr.splitlines()) == 1, result.stderr
        assert result.stdout == ""
    name = f"twice-{uuid.uuid4().hex[:6]}"
    assert run(settings, "clinic", "create", name).returncode == 0
    again = run(settings, "clinic", "create", name)
    assert again.returncode == 2 and again.stderr.startswith("error: ") and "Traceback" not in again.stderr


def test_an_unusable_key_file_exits_2(settings, tmp_path) -> None:  # type: ignore[no-untyped-def]
    broken = tmp_path / "keys.json"
    broken.write_text("{not json")
    broken.chmod(0o600)
    result = run(settings, "key", "create", "--role", "admin", DERMQ_KEY_FILE=str(broken))
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "Traceback" not in result.stderr


def test_a_key_file_whose_folder_is_missing_exits_2_naming_it(settings, tmp_path) -> None:  # type: ignore[no-untyped-def]
    missing = tmp_path / "no-such-folder" / "keys.json"
    result = run(settings, "keys", "retire", "kek-x", DERMQ_KEY_FILE=str(missing))
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    assert str(missing.parent) in result.stderr


def test_a_refused_setting_is_one_error_line_naming_it(settings) -> None:  # type: ignore[no-untyped-def]
    # pydantic's own report is several lines with a link to its documentation
    for variable, value in [
        ("DERMQ_API_PORT", "eighty"),
        ("DERMQ_DATABASE_URL", "mysql://dermq:hunter2-secret@db.example/dermq"),
        ("DERMQ_DATABASE_URL", "postgresql://dermq:hunter2-secret@db.example/dermq"),  # no TLS over a network
    ]:
        result = run(settings, "clinic", "list", DERMQ_ENVIRONMENT="production", **{variable: value})
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith("error: invalid settings: ") and len(result.stderr.splitlines()) == 1, (
            result.stderr
        )
        assert variable in result.stderr and "hunter2" not in result.stderr and "pydantic" not in result.stderr


def test_a_database_that_cannot_be_reached_is_one_error_line(settings) -> None:  # type: ignore[no-untyped-def]
    nobody = f"postgresql://dermq@127.0.0.1:{support.free_port()}/dermq"  # as psql writes it: no driver named
    result = run(settings, "clinic", "list", DERMQ_DATABASE_URL=nobody)
    assert result.returncode == 69, result.stderr
    assert result.stderr.startswith("error: the database cannot be reached (") and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("limit", "why"),
    [
        ({"DERMQ_DATABASE_LOCK_TIMEOUT_MS": "200"}, "lock timeout"),
        (
            {"DERMQ_DATABASE_STATEMENT_TIMEOUT_MS": "300", "DERMQ_DATABASE_LOCK_TIMEOUT_MS": "60000"},
            "statement timeout",
        ),
    ],
)
def test_a_statement_the_database_gives_up_on_is_one_error_line(settings, database, limit, why) -> None:  # type: ignore[no-untyped-def]
    # a table held by another session (a migration, a long export) past the command's limits: it was a
    # traceback, exit 1, which scripts read as the command's own failure; now one line, exit 75 (try again)
    from sqlalchemy import create_engine, text

    holder = create_engine(settings.database_url)
    try:
        with holder.begin() as connection:
            connection.execute(text("LOCK TABLE clinics IN ACCESS EXCLUSIVE MODE"))
            result = run(settings, "clinic", "list", **limit)
    finally:
        holder.dispose()
    assert result.returncode == 75, result.stderr
    assert result.stderr.startswith("error: the database gave up on a statement (") and "Traceback" not in result.stderr
    assert why in result.stderr and "rolled back" in result.stderr


@pytest.mark.parametrize(
    "command",
    [[str(support.VENV_BIN / "dermq-api")], [sys.executable, "-m", "core.devstack", "--state-dir", "{tmp}"]],
    ids=["dermq-api", "make run"],
)
def test_the_services_and_make_run_refuse_a_setting_in_one_line(command: list[str], tmp_path) -> None:  # type: ignore[no-untyped-def]
    """``dermq-api`` and ``make run`` read the settings first: a refused one was pydantic's traceback,
    its message at the end of some twenty lines."""
    env = {**os.environ, "DERMQ_API_PORT": "eighty", "DERMQ_REDIS_URL": "redis://:hunter2-secret@/0"}
    result = subprocess.run(
        [part.format(tmp=tmp_path) for part in command], capture_output=True, text=True, env=env, timeout=60
    )
    assert result.returncode == 2, result.stderr
    assert (
        result.stderr.startswith("error: invalid settings: DERMQ_API_PORT: ") and len(result.stderr.splitlines()) == 1
    ), result.stderr
    assert "hunter2" not in result.stderr and "Traceback" not in result.stderr and not any(tmp_path.iterdir())
