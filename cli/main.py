"""The ``dermq`` root command: assembles the command groups and maps errors to exit codes.

Each command returns its exit code (0 done, 1 the check it runs found a problem). Bad input exits 2
with one ``error: ...`` line or click's usage message on stderr, never a traceback: usage errors, a
domain error (an unknown clinic or key: ``error: <message> (<code>)``), an unusable key file or an
invalid setting. A database that cannot be reached exits 69 (``EX_UNAVAILABLE``), and one that refuses
the login a privilege the command needs (a service's login running ``dermq db upgrade``) 77
(``EX_NOPERM``), with one line too."""

from __future__ import annotations

import sys

import click
from pydantic import ValidationError
from sqlalchemy.exc import OperationalError, ProgrammingError

from cli.api_keys import key
from cli.audit import audit
from cli.cases import case
from cli.clinics import clinic
from cli.db import db
from cli.demo import demo
from cli.drift import drift
from cli.encryption_keys import keys
from cli.models import model
from cli.monitor import monitor
from core.errors import DecryptionError, DermqError, KeyNotHeld, KeyringError
from core.settings_problems import settings_problem

BAD_INPUT = 2
UNAVAILABLE = 69  # EX_UNAVAILABLE (sysexits.h): a service the command needs is down
NO_PERMISSION = 77  # EX_NOPERM (sysexits.h): the database login lacks a privilege the command needs
INSUFFICIENT_PRIVILEGE = "42501"  # SQLSTATE
TEMPORARY_FAILURE = 75  # EX_TEMPFAIL (sysexits.h): try again later
#: SQLSTATEs of a statement the server gave up on: query_canceled (the statement timeout),
#: lock_not_available (the lock timeout), deadlock_detected, serialization_failure
TRY_AGAIN = frozenset({"57014", "55P03", "40P01", "40001"})


@click.group(name="dermq", context_settings={"help_option_names": ["-h", "--help"]})
def dermq() -> None:
    """dermq operator commands"""


for command in (db, keys, clinic, key, case, audit, model, drift, demo, monitor):
    dermq.add_command(command)


#: what the worker's image holds and the API's does not (deploy/docker/pyproject_deps.py)
_WORKER_ONLY = frozenset(
    {"numpy", "torch", "torchvision", "timm", "safetensors", "onnxruntime", "isal", "matplotlib", "threadpoolctl"}
)


def main(argv: list[str] | None = None) -> int:
    """Run ``dermq`` on argv (default: the process's arguments) and return its exit code."""
    try:
        result = dermq.main(args=argv, prog_name="dermq", standalone_mode=False)
    except click.ClickException as exc:  # usage errors (exit 2), as click would show them
        exc.show()
        return exc.exit_code
    except click.Abort:
        click.echo("Aborted!", err=True)
        return 1
    except DermqError as exc:
        click.echo(f"error: {exc.message} ({exc.code})", err=True)
        return BAD_INPUT
    except KeyNotHeld as exc:  # a key the data need is missing from the key file (`dermq keys status`)
        click.echo(f"error: {exc}; see `dermq keys status`", err=True)
        return 1
    except ValidationError as exc:  # invalid settings (a ValueError, whose str() is pydantic's several lines)
        click.echo(f"error: {settings_problem(exc)}", err=True)
        return BAD_INPUT
    except (KeyringError, ValueError) as exc:  # a bad key file; invalid settings (pydantic's errors)
        click.echo(f"error: {exc}", err=True)
        return BAD_INPUT
    except DecryptionError as exc:  # a key the data need is missing from the key file (`dermq keys status`)
        click.echo(f"error: {exc}; see `dermq keys status`", err=True)
        return 1
    except RuntimeError as exc:
        # a model entry that lacks what the command needs (its message says what to run); ml.registry
        # is loaded only by the commands that read the registry: `dermq --help` stays light
        registry = sys.modules.get("ml.registry")
        if registry is None or not isinstance(exc, registry.RegistryError):
            raise
        click.echo(f"error: {exc}", err=True)
        return BAD_INPUT
    except ModuleNotFoundError as exc:
        # a command that needs the worker image's libraries (NumPy, PyTorch), run in the API's image
        missing = (exc.name or "").partition(".")[0]
        if missing not in _WORKER_ONLY:
            raise
        click.echo(
            f"error: this command needs {missing}, which this image does not hold; run it in a worker container",
            err=True,
        )
        return BAD_INPUT
    except OSError as exc:  # a key, lock or signing file that cannot be read or written (a folder missing, read-only)
        where = f": {exc.filename}" if exc.filename else ""
        click.echo(f"error: {exc.strerror or type(exc).__name__}{where}", err=True)
        return BAD_INPUT
    except ProgrammingError as exc:
        if getattr(exc.orig, "pgcode", None) != INSUFFICIENT_PRIVILEGE:
            raise
        # the login lacks a privilege: a service's login running `dermq db upgrade`, say. Postgres's own
        # line names the object (a table, a schema), never a row's data
        reason = (str(exc.orig).strip().splitlines() or ["permission denied"])[0]
        click.echo(
            f"error: the database refused this login ({reason}); migrations and grants run as the owner role, "
            'services as the runtime role (docs/SECURITY.md, "Database roles")',
            err=True,
        )
        return NO_PERMISSION
    except OperationalError as exc:
        code = getattr(exc.orig, "pgcode", None)
        if code in TRY_AGAIN:
            # the server gave up on a statement (its time or lock limit, a deadlock): its transaction was
            # rolled back, and the command may pass later or with a larger limit (one that commits as it
            # goes keeps what it committed, and goes on from there). Postgres's line names no row's data
            reason = (str(exc.orig).strip().splitlines() or [type(exc.orig).__name__])[0]
            click.echo(
                f"error: the database gave up on a statement ({reason}); its transaction was rolled back. "
                "Run it again, later or with a larger DERMQ_DATABASE_STATEMENT_TIMEOUT_MS or "
                "DERMQ_DATABASE_LOCK_TIMEOUT_MS (milliseconds) for this command alone",
                err=True,
            )
            return TEMPORARY_FAILURE
        if code is not None:  # the server answered with another error
            raise
        # no SQLSTATE: the connection itself failed (the server is down, unreachable or refused the login)
        reason = (str(exc.orig).strip().splitlines() or [type(exc.orig).__name__])[0]
        click.echo(f"error: the database cannot be reached ({reason}); check DERMQ_DATABASE_URL", err=True)
        return UNAVAILABLE
    return int(result or 0)
