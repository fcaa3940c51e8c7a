"""The local demo that ``make run`` (core.devstack, through ``dermq demo``) prepares: a demo clinic and
one clinic key, kept in a 0600 file so later runs reuse it, and a ready-to-paste ``curl`` example that
submits the demo image shipped in ``core/demo_data/``."""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from core import audit, clinics, keys
from core.config import ROOT, Settings
from core.crypto import load_keyring
from core.db import session_scope
from core.errors import DermqError, Unauthorized
from core.models import Role

DEMO_CLINIC = "Demo Clinic"
DEMO_KEY_FILE = ROOT / "var" / "demo-key"
#: A HAM10000 melanoma image, package data (core/demo_data/README.md has its source and licence).
DEMO_IMAGE = Path(__file__).resolve().parent / "demo_data" / "ISIC_0024313.jpg"


@dataclass(frozen=True)
class DemoKey:
    token: str
    created: bool  # False: read back from the key file of an earlier run


def ensure_demo_key(
    settings: Settings, *, clinic_name: str, key_file: Path, actor: audit.Actor = audit.SYSTEM
) -> DemoKey:
    """The demo clinic's key: read from key_file while the database still takes it, or (a first run, a
    database made anew, the key revoked) the clinic and a clinic key created and the key written there
    with mode 0600."""
    keyring = load_keyring(settings)
    if key_file.exists():
        token = key_file.read_text().strip()
        with session_scope(settings) as session:
            try:
                keys.authenticate(session, keyring, token)
            except Unauthorized as refused:  # printed, it would have answered 401
                if refused.code == "clinic_inactive":  # the developer's own doing: a new key would be refused too
                    return DemoKey(token, created=False)
            else:
                return DemoKey(token, created=False)
    with session_scope(settings) as session:
        try:
            clinic = clinics.get_clinic(session, clinic_name)
        except DermqError:
            clinic = clinics.create_clinic(session, clinic_name, actor=actor)
        _, token = keys.create_key(
            session, keyring, role=Role.CLINIC, clinic_id=clinic.id, label="make run demo", actor=actor
        )
    key_file.parent.mkdir(parents=True, exist_ok=True)
    key_file.touch(mode=0o600)
    key_file.write_text(token + "\n")
    return DemoKey(token, created=True)


def instructions(settings: Settings, demo: DemoKey, *, clinic_name: str, key_file: Path) -> list[str]:
    """What to print: the key, and how to submit the demo image and poll for its result."""
    base = f"http://{settings.api_host}:{settings.api_port}"
    auth = f"-H 'Authorization: Bearer {demo.token}'"
    return [
        f"{'created' if demo.created else 'reusing'} demo clinic '{clinic_name}' key (kept in {key_file}):",
        f"  {demo.token}",
        "submit an image and poll for the result:",
        f"  curl -s {auth} -F image=@{shlex.quote(str(DEMO_IMAGE))} {base}/v1/cases",
        f"  curl -s {auth} {base}/v1/cases/<id>",
        f"or paste the key into the clinic portal: {base}/portal/",
        f"the auditor console {base}/audit/ takes an auditor key instead: .venv/bin/dermq key create --role auditor",
    ]
