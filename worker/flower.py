"""``dermq-flower``: Flower, the operators' queue view, configured from Settings.

Basic auth comes from ``DERMQ_FLOWER_USER`` / ``DERMQ_FLOWER_PASSWORD`` (refused empty in
production) and Flower listens on ``DERMQ_FLOWER_HOST:DERMQ_FLOWER_PORT`` (127.0.0.1:5555 by
default). Task arguments are case ids only, so Flower never shows patient data. Note that Flower
exempts its own ``/metrics`` and ``/healthcheck`` from authentication: keep the port private.
"""

from __future__ import annotations

import sys

from core.config import get_settings


def flower_argv() -> list[str]:
    settings = get_settings()
    try:
        password = settings.require_flower_password()
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    argv = [
        "celery",
        "--app",
        "worker.celery_app",
        "flower",
        f"--address={settings.flower_host}",
        f"--port={settings.flower_port}",
        f"--basic-auth={settings.flower_user}:{password}",
        "--max-tasks=10000",
        "--purge-offline-workers=600",
    ]
    if settings.flower_state_file is not None:
        argv += ["--persistent=True", f"--db={settings.flower_state_file}", "--state-save-interval=60000"]
    return argv


def main() -> None:
    from celery.bin.celery import main as celery_main

    sys.argv = flower_argv()
    celery_main()


if __name__ == "__main__":
    main()
