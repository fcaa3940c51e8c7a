"""``dermq audit``: check the audit log against its signed checkpoints; print the latest checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import click

from cli.common import json_option
from core.config import get_settings


@click.group(help="audit trail")
def audit() -> None:
    pass


@audit.command("verify", help="recompute the log, check signed checkpoints; exit 1 if broken")
@click.option(
    "--against",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="a checkpoint pinned earlier: prove the log still extends it",
)
@click.option("--all", "every", is_flag=True, help="go on past the first problem and list every one")
@json_option()
def verify(against: Path | None, every: bool, as_json: bool) -> int:
    from core import audit_commands

    code, answer, message = audit_commands.verify(get_settings(), against, every=every)
    click.echo(json.dumps(answer) if as_json else message)
    return code


@audit.command("checkpoint", help="print the latest signed checkpoint")
@json_option()
def checkpoint(as_json: bool) -> int:
    from core import audit_commands

    latest = audit_commands.latest_checkpoint(get_settings())
    if latest is None:
        click.echo("no checkpoint yet: the sealer has not sealed any event", err=True)
        return 1
    click.echo(json.dumps(latest) if as_json else latest["checkpoint"], nl=as_json)
    return 0
