"""What the command groups share: the audit actor of every change and the printing of one record."""

from __future__ import annotations

import json
from typing import Any

import click

from core import audit

#: Every change made through the CLI is audited as done by this actor (with the OS user and host).
CLI_ACTOR = audit.cli_actor()


def json_option(description: str = "print JSON instead of lines of text") -> Any:
    """``--json``, passed to the command as ``as_json``."""
    return click.option("--json", "as_json", is_flag=True, help=description)


def echo_record(data: dict[str, Any], as_json: bool) -> None:
    """One record as a JSON object, or as ``key: value`` lines."""
    if as_json:
        click.echo(json.dumps(data, default=str))
    else:
        for key, value in data.items():
            click.echo(f"{key}: {value}")
