"""``dermq audit``: check the audit trail's hash chain."""

from __future__ import annotations

import json

import click

from cli.common import json_option
from core import audit as audit_trail
from core.config import get_settings
from core.db import session_scope


@click.group(help="audit trail")
def audit() -> None:
    pass


@audit.command("verify", help="walk the hash chain; exit 1 at the first broken row")
@json_option()
def verify(as_json: bool) -> int:
    with session_scope(get_settings()) as session:
        report = audit_trail.verify_chain(session)
    if as_json:
        click.echo(json.dumps(report.to_dict()))
    elif report.ok:
        click.echo(f"audit chain intact: {report.checked} events verified")
    else:
        click.echo(
            f"AUDIT CHAIN BROKEN at event {report.first_bad_id}: {report.reason} "
            f"({report.checked} events before it verified)"
        )
    return 0 if report.ok else 1
