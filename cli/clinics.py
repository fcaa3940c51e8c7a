"""``dermq clinic``: create, list, deactivate and activate clinics (each change audited)."""

from __future__ import annotations

import json

import click

from cli.common import CLI_ACTOR, echo_record, json_option
from core import clinics
from core.config import get_settings
from core.db import session_scope


@click.group(help="clinics")
def clinic() -> None:
    pass


@clinic.command("create", help="create a clinic")
@click.argument("name")
@json_option()
def create(name: str, as_json: bool) -> int:
    with session_scope(get_settings()) as session:
        created = clinics.create_clinic(session, name, actor=CLI_ACTOR)
        record = {"id": str(created.id), "name": created.name}
    echo_record(record, as_json)  # once committed
    return 0


@clinic.command("list", help="list clinics")
@json_option()
def list_clinics(as_json: bool) -> int:
    with session_scope(get_settings()) as session:
        rows = [
            {"id": str(c.id), "name": c.name, "active": c.active, "created_at": c.created_at.isoformat()}
            for c in clinics.list_clinics(session)
        ]
    if as_json:
        click.echo(json.dumps(rows))
    else:
        for row in rows:
            click.echo(f"{row['id']}  {'active  ' if row['active'] else 'inactive'}  {row['name']}")
    return 0


def _set_active(name_or_id: str, active: bool) -> int:
    with session_scope(get_settings()) as session:
        found = clinics.get_clinic(session, name_or_id)
        clinics.set_active(session, found.id, active, actor=CLI_ACTOR)
        said = f"clinic {found.name} {'activated' if active else 'deactivated'}"
    click.echo(said)  # once committed: a commit that fails must not read as a deactivated clinic
    return 0


@clinic.command("deactivate", help="deactivate a clinic (by name or id): its keys stop working at once")
@click.argument("clinic_name", metavar="CLINIC")
def deactivate(clinic_name: str) -> int:
    return _set_active(clinic_name, False)


@clinic.command("activate", help="activate a clinic (by name or id)")
@click.argument("clinic_name", metavar="CLINIC")
def activate(clinic_name: str) -> int:
    return _set_active(clinic_name, True)
