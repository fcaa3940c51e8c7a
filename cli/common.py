"""What the command groups share: the audit actor of every change and the printing of one record."""

from __future__ import annotations

import json
import sys
from typing import Any

import click
from click.termui import progressbar

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


class Progress:
    """A progress bar on stderr for a long command, fed ``(done, total)`` by the work as it goes
    (click hides it when stderr is not a terminal, so scripts see only the command's output)."""

    def __init__(self, label: str) -> None:
        self.label = label
        self._bar: Any = None
        self._done = 0

    def __call__(self, done: int, total: int) -> None:
        if self._bar is None:
            stderr = sys.stderr
            length = max(total, 1)
            bar: Any = progressbar(length=length, label=self.label, file=stderr)
            self._bar = bar.__enter__()
        self._bar.update(done - self._done)
        self._done = done

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
