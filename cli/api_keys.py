"""``dermq key``: API keys for clinics, auditors and admins (created, listed, revoked; each change audited).
A key's secret is printed once, when it is created, and never stored or listed."""

from __future__ import annotations

import json
from typing import Any

import click

from cli.common import CLI_ACTOR, json_option
from core import audit, clinics, keys
from core.config import get_settings
from core.crypto import load_keyring
from core.db import session_scope
from core.models import Role


@click.group(help="API keys")
def key() -> None:
    pass


@key.command("create", help="create an API key (printed once)")
@click.option("--clinic", help="clinic name or id (required for role clinic)")
@click.option("--role", type=click.Choice([r.value for r in Role]), default=Role.CLINIC.value, show_default=True)
@click.option("--label", default="")
@json_option('print {"key": ..., "id": ..., "role": ...}')
def create(clinic: str | None, role: str, label: str, as_json: bool) -> int:
    settings = get_settings()
    keyring = load_keyring(settings)
    chosen = Role(role)
    with session_scope(settings) as session:
        # `--clinic ""` (a script's empty variable) finds no clinic: never an auditor key of every clinic
        clinic_id = clinics.get_clinic(session, clinic).id if clinic is not None else None
        created, token = keys.create_key(
            session, keyring, role=chosen, clinic_id=clinic_id, label=label or "", actor=CLI_ACTOR
        )
        key_id = str(created.id)
    if as_json:
        click.echo(json.dumps({"key": token, "id": key_id, "role": chosen.value}))
    else:
        click.echo(token)
        keeper = "the portal's secrets" if chosen is Role.CLINIC else f"the {chosen.value}'s secret store"
        click.echo(f"(id {key_id}, role {chosen.value}; the key is shown only now: store it in {keeper})", err=True)
    return 0


@key.command("list", help="list API keys (never their secrets)")
@click.option("--clinic", help="only this clinic's keys (name or id)")
@json_option()
def list_keys(clinic: str | None, as_json: bool) -> int:
    with session_scope(get_settings()) as session:
        clinic_id = clinics.get_clinic(session, clinic).id if clinic is not None else None  # "" is no clinic's
        # as GET /v1/admin/keys records it: who listed which clinic's keys
        audit.record(
            session,
            action="key.list",
            outcome=audit.SUCCESS,
            actor=CLI_ACTOR,
            entity_type="api_key",
            clinic_id=clinic_id,
        )
        known = {c.id: c for c in clinics.list_clinics(session)}
        rows: list[dict[str, Any]] = [
            {
                "id": str(k.id),
                "prefix": k.prefix,
                "role": k.role,
                "clinic_id": str(k.clinic_id) if k.clinic_id else None,
                "clinic": known[k.clinic_id].name if k.clinic_id in known else None,
                # a deactivated clinic's keys are refused, and work again once it is reactivated
                "clinic_active": known[k.clinic_id].active if k.clinic_id in known else None,
                "label": k.label,
                "created_at": k.created_at.isoformat(),
                "revoked_at": k.revoked_at.isoformat() if k.revoked_at else None,
            }
            for k in keys.list_keys(session, clinic_id=clinic_id)
        ]
    if as_json:
        click.echo(json.dumps(rows))
    else:
        # the clinic's whole name: two clinics whose names begin alike were one name cut short
        width = max([24, *(len(row["clinic"] or "") for row in rows)])
        click.echo(f"{'ID':<36}  {'KEY':<19}  {'ROLE':<8}  {'CLINIC':<{width}}  {'STATE':<16}  LABEL")
        for row in rows:
            state = "revoked" if row["revoked_at"] else "clinic inactive" if row["clinic_active"] is False else "active"
            click.echo(
                f"{row['id']}  dq_{row['prefix']}_...  {row['role']:<8}  {row['clinic'] or '-':<{width}}  "
                f"{state:<16}  {row['label']}"
            )
    return 0


@key.command("revoke", help="revoke an API key at once (by its id, or its prefix as `key list` prints it)")
@click.argument("key_ref", metavar="ID_OR_PREFIX")
def revoke(key_ref: str) -> int:
    with session_scope(get_settings()) as session:
        revoked = keys.revoke_key(session, keys.find_key(session, key_ref), actor=CLI_ACTOR)
        said = f"revoked key {revoked.id} (dq_{revoked.prefix}_...)"
    click.echo(said)  # once committed: a commit that fails must not read as a revoked key
    return 0
