"""``dermq audit``: check the audit log against its signed checkpoints; print the latest checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import click

from cli.common import json_option
from core.checkpoint import CheckpointError, Verifier
from core.config import get_settings


@click.group(help="audit trail")
def audit() -> None:
    pass


def _verifier_keys(_: click.Context, __: click.Parameter, values: tuple[str, ...]) -> tuple[Verifier, ...]:
    try:
        return tuple(Verifier.decode(value.strip()) for value in values)
    except CheckpointError as exc:
        raise click.BadParameter(str(exc)) from None


verifier_option = click.option(
    "--verifier",
    "verifiers",
    multiple=True,
    callback=_verifier_keys,
    metavar="KEY",
    help="check signatures with this verifier key (repeatable) instead of the signing key file's: "
    "what an auditor, who holds no signing key, runs",
)


@audit.command(
    "verify",
    help="recompute the log, check signed checkpoints; exit 1 if broken, 2 if the --against file is not a checkpoint",
)
@click.option(
    "--against",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="a checkpoint pinned earlier: prove the log still extends it",
)
@click.option("--all", "every", is_flag=True, help="go on past the first problem and list every one")
@verifier_option
@json_option()
def verify(against: Path | None, every: bool, verifiers: tuple[Verifier, ...], as_json: bool) -> int:
    from core import audit_commands

    code, answer, message = audit_commands.verify(get_settings(), against, every=every, verifiers=verifiers)
    if code == 2:  # bad input: nothing was checked
        click.echo(f"error: {message}", err=True)
        return code
    click.echo(json.dumps(answer) if as_json else message)
    return code


@audit.command("checkpoint", help="print the latest signed checkpoint, its signature checked")
@verifier_option
@json_option()
def checkpoint(verifiers: tuple[Verifier, ...], as_json: bool) -> int:
    from core import audit_commands

    try:
        latest = audit_commands.latest_checkpoint(get_settings(), verifiers)
    except CheckpointError as exc:
        click.echo(f"CHECKPOINT REJECTED: {exc}", err=True)
        return 1
    if latest is None:
        click.echo("no checkpoint yet: the sealer has not sealed any event", err=True)
        return 1
    click.echo(json.dumps(latest) if as_json else latest["checkpoint"], nl=as_json)
    return 0
