"""The operators' ``dermq`` command: database, clinics, API keys, encryption keys and the audit trail.

    dermq db create | upgrade | roles --owner NAME --runtime NAME | grant --runtime NAME
    dermq keys init [--file PATH] | rotate | rewrap | status | retire KEK_ID
    dermq clinic create NAME | list | deactivate NAME | activate NAME
    dermq key create --clinic NAME --role clinic|auditor|admin [--label TEXT] [--json]
    dermq key list [--clinic NAME] | revoke ID
    dermq audit verify [--against FILE] [--json] | checkpoint [--json]
    dermq demo                     # the local demo clinic and key (make run)

Every change made here is audited with the actor ``cli``. Model commands (``dermq model ...``) are
added by :mod:`worker.cli`, the installed entry point.
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from core import audit, clinics, db_roles, keys
from core.config import Settings, get_settings
from core.crypto import Keyring, load_keyring, write_key_file
from core.db import session_scope
from core.errors import DermqError, KeyringError
from core.models import Role

CLI_ACTOR = audit.cli_actor()  # records the OS user and host
Handler = Callable[[argparse.Namespace, Settings], int]


def _print(data: Any, as_json: bool) -> None:
    if as_json:
        print(json.dumps(data, default=str))
    else:
        for key, value in data.items() if isinstance(data, dict) else enumerate(data):
            print(f"{key}: {value}")


# ------------------------------------------------------------------ database


def db_create(_args: argparse.Namespace, settings: Settings) -> int:
    """Create the database named in DERMQ_DATABASE_URL if it does not exist."""
    url = make_url(settings.database_url)
    name = url.database
    if not name:
        print("error: DERMQ_DATABASE_URL names no database", file=sys.stderr)
        return 2
    admin = create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        exists = connection.scalar(text("SELECT 1 FROM pg_database WHERE datname = :name"), {"name": name})
        if not exists:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
            print(f"created database {name}")
        else:
            print(f"database {name} exists")
    admin.dispose()
    return 0


def alembic_config(database_url: str) -> Any:
    """Alembic's configuration for the installed migrations package (no alembic.ini needed)."""
    from alembic.config import Config

    import migrations

    config = Config()
    config.set_main_option("script_location", str(Path(migrations.__file__).resolve().parent))
    config.attributes["url"] = database_url
    return config


def db_upgrade(_args: argparse.Namespace, settings: Settings) -> int:
    from alembic import command

    command.upgrade(alembic_config(settings.database_url), "head")
    if settings.database_runtime_role:  # least privilege for the services (core/db_roles.py)
        return db_roles.grant_command(settings.database_runtime_role, settings)
    return 0


# ------------------------------------------------------------------ encryption keys


def keys_init(args: argparse.Namespace, settings: Settings) -> int:
    path = Path(args.file) if args.file else settings.key_file
    if path is None:
        print("error: no key file path (set DERMQ_KEY_FILE or pass --file)", file=sys.stderr)
        return 2
    from core import audit_commands

    if path.exists():
        print(f"key file {path} exists; leaving it alone")
    else:
        write_key_file(path, Keyring.generate())
        print(f"created key file {path} (mode 0600); back it up: without it, stored images cannot be decrypted")
    print(audit_commands.ensure_signing_key(settings.model_copy(update={"key_file": path})))
    return 0


def keys_rotate(args: argparse.Namespace, settings: Settings) -> int:
    from core import keyrotation

    report = keyrotation.rotate(settings, batch=args.batch, actor=CLI_ACTOR)
    print(f"active key is now {report.active}; re-wrapped {report.rewrapped} data keys, {report.remaining} remain")
    return 0 if report.remaining == 0 else 1


def keys_rewrap(args: argparse.Namespace, settings: Settings) -> int:
    from core import keyrotation

    report = keyrotation.rewrap_all(settings, batch=args.batch, actor=CLI_ACTOR)
    print(f"re-wrapped {report.rewrapped} data keys under {report.active}; {report.remaining} remain")
    return 0 if report.remaining == 0 else 1


def keys_status(args: argparse.Namespace, settings: Settings) -> int:
    from core import keyrotation

    keyring = load_keyring(settings)
    with session_scope(settings) as session:
        counts = keyrotation.usage(session)
    rows = [
        {"kek_id": k, "active": k == keyring.active_id, "in_key_file": True, "blobs": counts.get(k, 0)}
        for k in keyring.keks
    ]
    rows += [
        {"kek_id": k, "active": False, "in_key_file": False, "blobs": n}
        for k, n in counts.items()
        if k not in keyring.keks
    ]
    if args.json:
        print(json.dumps(rows))
    else:
        for row in rows:
            flags = "active " if row["active"] else ("MISSING" if not row["in_key_file"] else "       ")
            print(f"{row['kek_id']}  {flags}  {row['blobs']} blobs")
    return 0 if all(r["in_key_file"] for r in rows) else 1


def keys_retire(args: argparse.Namespace, settings: Settings) -> int:
    from core import keyrotation

    keyrotation.retire(settings, args.kek_id, actor=CLI_ACTOR)
    print(f"removed {args.kek_id} from the key file")
    return 0


# ------------------------------------------------------------------ clinics


def clinic_create(args: argparse.Namespace, settings: Settings) -> int:
    with session_scope(settings) as session:
        clinic = clinics.create_clinic(session, args.name, actor=CLI_ACTOR)
        _print({"id": str(clinic.id), "name": clinic.name}, args.json)
    return 0


def clinic_list(args: argparse.Namespace, settings: Settings) -> int:
    with session_scope(settings) as session:
        rows = [
            {"id": str(c.id), "name": c.name, "active": c.active, "created_at": c.created_at.isoformat()}
            for c in clinics.list_clinics(session)
        ]
    if args.json:
        print(json.dumps(rows))
    else:
        for row in rows:
            print(f"{row['id']}  {'active  ' if row['active'] else 'inactive'}  {row['name']}")
    return 0


def clinic_set_active(active: bool) -> Handler:
    def handler(args: argparse.Namespace, settings: Settings) -> int:
        with session_scope(settings) as session:
            clinic = clinics.get_clinic(session, args.clinic)
            clinics.set_active(session, clinic.id, active, actor=CLI_ACTOR)
            print(f"clinic {clinic.name} {'activated' if active else 'deactivated'}")
        return 0

    return handler


# ------------------------------------------------------------------ API keys


def key_create(args: argparse.Namespace, settings: Settings) -> int:
    keyring = load_keyring(settings)
    role = Role(args.role)
    with session_scope(settings) as session:
        clinic_id = clinics.get_clinic(session, args.clinic).id if args.clinic else None
        key, token = keys.create_key(
            session, keyring, role=role, clinic_id=clinic_id, label=args.label or "", actor=CLI_ACTOR
        )
        key_id = str(key.id)
    if args.json:
        print(json.dumps({"key": token, "id": key_id, "role": role.value}))
    else:
        print(token)
        print(
            f"(id {key_id}, role {role.value}; the key is shown only now: store it in the portal's secrets)",
            file=sys.stderr,
        )
    return 0


def key_list(args: argparse.Namespace, settings: Settings) -> int:
    with session_scope(settings) as session:
        clinic_id = clinics.get_clinic(session, args.clinic).id if args.clinic else None
        rows = [
            {
                "id": str(k.id),
                "prefix": k.prefix,
                "role": k.role,
                "clinic_id": str(k.clinic_id) if k.clinic_id else None,
                "label": k.label,
                "created_at": k.created_at.isoformat(),
                "revoked_at": k.revoked_at.isoformat() if k.revoked_at else None,
            }
            for k in keys.list_keys(session, clinic_id=clinic_id)
        ]
    if args.json:
        print(json.dumps(rows))
    else:
        for row in rows:
            state = f"revoked {row['revoked_at']}" if row["revoked_at"] else "active"
            print(f"{row['id']}  dq_{row['prefix']}_...  {row['role']:<8} {state}  {row['label']}")
    return 0


def key_revoke(args: argparse.Namespace, settings: Settings) -> int:
    with session_scope(settings) as session:
        key = keys.revoke_key(session, uuid.UUID(args.id), actor=CLI_ACTOR)
        print(f"revoked key {key.id} (dq_{key.prefix}_...)")
    return 0


# ------------------------------------------------------------------ audit


def audit_verify(args: argparse.Namespace, settings: Settings) -> int:
    from core import audit_commands

    code, answer, message = audit_commands.verify(
        settings, Path(args.against) if args.against else None, every=args.all
    )
    print(json.dumps(answer) if args.json else message)
    return code


def audit_checkpoint(args: argparse.Namespace, settings: Settings) -> int:
    from core import audit_commands

    latest = audit_commands.latest_checkpoint(settings)
    if latest is None:
        print("no checkpoint yet: the sealer has not sealed any event", file=sys.stderr)
        return 1
    print(json.dumps(latest) if args.json else latest["checkpoint"], end="\n" if args.json else "")
    return 0


# ------------------------------------------------------------------ local demo


def demo(args: argparse.Namespace, settings: Settings) -> int:
    """Create the demo clinic and a clinic key once; keep the key in a 0600 file for later runs."""
    key_path = Path(args.key_file)
    if key_path.exists():
        token = key_path.read_text().strip()
        created = False
    else:
        keyring = load_keyring(settings)
        with session_scope(settings) as session:
            try:
                clinic = clinics.get_clinic(session, args.clinic)
            except DermqError:
                clinic = clinics.create_clinic(session, args.clinic, actor=CLI_ACTOR)
            _, token = keys.create_key(
                session, keyring, role=Role.CLINIC, clinic_id=clinic.id, label="make run demo", actor=CLI_ACTOR
            )
        key_path.parent.mkdir(parents=True, exist_ok=True)
        key_path.touch(mode=0o600)
        key_path.write_text(token + "\n")
        created = True
    base = f"http://{settings.api_host}:{settings.api_port}"
    image = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "images" / "ISIC_0024313.jpg"
    print(f"{'created' if created else 'reusing'} demo clinic '{args.clinic}' key (kept in {key_path}):")
    print(f"  {token}")
    print("submit an image and poll for the result:")
    print(f"  curl -s -H 'Authorization: Bearer {token}' -F image=@{image} {base}/v1/cases")
    print(f"  curl -s -H 'Authorization: Bearer {token}' {base}/v1/cases/<id>")
    return 0


# ------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dermq", description="dermq operator commands")
    sub = parser.add_subparsers(dest="command", required=True)

    db = sub.add_parser("db", help="database").add_subparsers(dest="action", required=True)
    db.add_parser("create", help="create the database if missing").set_defaults(handler=db_create)
    db.add_parser("upgrade", help="run the migrations").set_defaults(handler=db_upgrade)
    db_roles.add_commands(db)  # roles | grant: least privilege for the audit trail

    keys_cmd = sub.add_parser("keys", help="encryption keys").add_subparsers(dest="action", required=True)
    init = keys_cmd.add_parser("init", help="create the key file (mode 0600) if missing")
    init.add_argument("--file", help="path (default: DERMQ_KEY_FILE)")
    init.set_defaults(handler=keys_init)
    for name, handler, description in (
        ("rotate", keys_rotate, "add a new active key and re-wrap every data key"),
        ("rewrap", keys_rewrap, "resume re-wrapping under the active key"),
    ):
        command = keys_cmd.add_parser(name, help=description)
        command.add_argument("--batch", type=int, default=500, help="data keys per committed batch")
        command.set_defaults(handler=handler)
    status = keys_cmd.add_parser("status", help="blobs per key-encryption key")
    status.add_argument("--json", action="store_true")
    status.set_defaults(handler=keys_status)
    retire = keys_cmd.add_parser("retire", help="remove an old key from the key file once nothing needs it")
    retire.add_argument("kek_id")
    retire.set_defaults(handler=keys_retire)

    clinic = sub.add_parser("clinic", help="clinics").add_subparsers(dest="action", required=True)
    create = clinic.add_parser("create", help="create a clinic")
    create.add_argument("name")
    create.add_argument("--json", action="store_true")
    create.set_defaults(handler=clinic_create)
    listing = clinic.add_parser("list", help="list clinics")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(handler=clinic_list)
    for name, active in (("deactivate", False), ("activate", True)):
        toggle = clinic.add_parser(name, help=f"{name} a clinic (by name or id)")
        toggle.add_argument("clinic")
        toggle.set_defaults(handler=clinic_set_active(active))

    key = sub.add_parser("key", help="API keys").add_subparsers(dest="action", required=True)
    key_new = key.add_parser("create", help="create an API key (printed once)")
    key_new.add_argument("--clinic", help="clinic name or id (required for role clinic)")
    key_new.add_argument("--role", choices=[r.value for r in Role], default=Role.CLINIC.value)
    key_new.add_argument("--label", default="")
    key_new.add_argument("--json", action="store_true", help='print {"key": ..., "id": ...}')
    key_new.set_defaults(handler=key_create)
    key_ls = key.add_parser("list", help="list API keys (never their secrets)")
    key_ls.add_argument("--clinic")
    key_ls.add_argument("--json", action="store_true")
    key_ls.set_defaults(handler=key_list)
    key_rm = key.add_parser("revoke", help="revoke an API key at once")
    key_rm.add_argument("id")
    key_rm.set_defaults(handler=key_revoke)

    audit_cmd = sub.add_parser("audit", help="audit trail").add_subparsers(dest="action", required=True)
    verify = audit_cmd.add_parser("verify", help="recompute the log, check signed checkpoints; exit 1 if broken")
    verify.add_argument("--against", help="a checkpoint pinned earlier: prove the log still extends it")
    verify.add_argument("--all", action="store_true", help="go on past the first problem and list every one")
    verify.add_argument("--json", action="store_true")
    verify.set_defaults(handler=audit_verify)
    latest = audit_cmd.add_parser("checkpoint", help="print the latest signed checkpoint")
    latest.add_argument("--json", action="store_true")
    latest.set_defaults(handler=audit_checkpoint)

    demo_cmd = sub.add_parser("demo", help="create the local demo clinic and key (make run)")
    demo_cmd.add_argument("--clinic", default="Demo Clinic")
    demo_cmd.add_argument("--key-file", default=str(Path(__file__).resolve().parents[1] / "var" / "demo-key"))
    demo_cmd.set_defaults(handler=demo)
    return parser


def run(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args, get_settings()))
    except DermqError as exc:
        print(f"error: {exc.message} ({exc.code})", file=sys.stderr)
        return 2
    except (KeyringError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), argv)


if __name__ == "__main__":
    raise SystemExit(main())
