"""``dermq-flower``: Flower, the operators' queue view, configured from Settings.

Basic auth comes from ``DERMQ_FLOWER_USER`` / ``DERMQ_FLOWER_PASSWORD`` (refused empty anywhere,
and an example or placeholder in production). It reaches Flower through its ``FLOWER_BASIC_AUTH``
environment variable, never the command line, which every local user can read in ``ps``. Flower
listens on ``DERMQ_FLOWER_HOST:DERMQ_FLOWER_PORT`` (127.0.0.1:5555 by
default). Task arguments are case ids only, so Flower never shows patient data. Note that Flower
exempts its own ``/metrics`` and ``/healthcheck`` from authentication: keep the port private.
"""

from __future__ import annotations

import os
import sys

from core.config import Settings, get_settings
from core.logs import configure_logging


def basic_auth(settings: Settings) -> str:
    """Flower's ``user:password`` credential; exits with the reason when the password is refused."""
    try:
        password = settings.require_flower_password()
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    if "," in password or "," in settings.flower_user:
        raise SystemExit("DERMQ_FLOWER_PASSWORD and DERMQ_FLOWER_USER must not contain ',' (Flower splits on it)")
    return f"{settings.flower_user}:{password}"


def flower_argv(settings: Settings) -> list[str]:
    """Flower's command line: everything but the credential."""
    argv = [
        "celery",
        "--app",
        "worker.celery_app",
        "flower",
        f"--address={settings.flower_host}",
        f"--port={settings.flower_port}",
        "--max-tasks=10000",
        "--purge-offline-workers=600",
        # dermq's JSON lines (core.logs), set up before Flower starts: without this, tornado adds its
        # own handler and format to the root logger, and sets its level
        "--logging=none",
    ]
    if settings.flower_state_file is not None:
        argv += ["--persistent=True", f"--db={settings.flower_state_file}", "--state-save-interval=60000"]
    return argv


def main() -> None:
    from celery.bin.celery import main as celery_main

    from worker.celery_app import app

    settings = get_settings()
    configure_logging(settings.log_level, json_lines=settings.log_json, component="flower")
    os.environ["FLOWER_BASIC_AUTH"] = basic_auth(settings)
    # Flower picks the client of its Broker page and queue lengths by the broker URL's scheme, which
    # the transport the other processes name (core.redis_transport) turns into its module's name:
    # the page answered 404. Flower publishes nothing that transport speeds up: kombu's own serves it.
    app.conf.broker_transport = None
    sys.argv = flower_argv(settings)
    celery_main()


if __name__ == "__main__":
    main()
