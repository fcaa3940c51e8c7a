"""Refused settings told in one line, for the commands that read them first: ``dermq``, ``dermq-api``
and ``make run`` (``python -m core.devstack``). Pydantic's own report is several lines with a link to
its documentation, under a traceback; this one names each variable and why, and never its value
(:class:`core.config.Settings` keeps the values out of its errors: one may hold a password)."""

from __future__ import annotations

import sys

from pydantic import ValidationError

from core.config import Settings, get_settings

#: the exit status of refused settings (sysexits.h's EX_USAGE is 64; dermq's commands say 2 for bad input)
BAD_SETTINGS = 2


def settings_problem(exc: ValidationError) -> str:
    """Pydantic's report of refused settings as one line: each setting by its variable's name and why."""
    problems = []
    for error in exc.errors(include_url=False, include_input=False):
        message = " ".join(str(error["msg"]).removeprefix("Value error, ").split())
        location = error.get("loc") or ()
        name = f"DERMQ_{str(location[0]).upper()}" if location else ""
        problems.append(f"{name}: {message}" if name and name not in message else message)
    return f"invalid {'settings' if exc.title == 'Settings' else exc.title}: {'; '.join(problems)}"


def settings_or_exit() -> Settings:
    """The settings; refused ones end the process with one ``error:`` line on stderr (exit status 2)."""
    try:
        return get_settings()
    except ValidationError as exc:
        print(f"error: {settings_problem(exc)}", file=sys.stderr)
        raise SystemExit(BAD_SETTINGS) from None
