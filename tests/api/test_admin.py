"""The admin API and CLI: clinics and keys, every change audited, deactivation effective at once."""

from __future__ import annotations

import json
import os
import subprocess
import uuid

import pytest
from sqlalchemy import func, select

from core.db import session_scope
from core.models import ApiKey, AuditEvent
from tests import support

pytestmark = pytest.mark.usefixtures("database")


def test_admin_manages_clinics_and_keys(client, make_key, settings) -> None:  # type: ignore[no-untyped-def]
    admin = make_key("admin")
    name = f"north-{uuid.uuid4().hex[:6]}"
    clinic = client.post("/v1/admin/clinics", headers=admin.headers, json={"name": name})
    assert clinic.status_code == 201, clinic.text
    clinic_id = clinic.json()["id"]
    assert (
        client.post("/v1/admin/clinics", headers=admin.headers, json={"name": name}).json()["code"] == "clinic_exists"
    )
    created = client.post("/v1/admin/keys", headers=admin.headers, json={"role": "clinic", "clinic_id": clinic_id})
    assert created.status_code == 201 and created.headers["cache-control"] == "no-store"
    token, key_id = created.json()["key"], created.json()["id"]
    scoped_admin = client.post("/v1/admin/keys", headers=admin.headers, json={"role": "admin", "clinic_id": clinic_id})
    assert scoped_admin.status_code == 400 and scoped_admin.json()["code"] == "clinic_not_allowed"  # it limits nothing
    portal = {"Authorization": f"Bearer {token}"}
    assert client.get("/v1/cases", headers=portal).status_code == 200
    misspelt = client.get("/v1/admin/keys", headers=admin.headers, params={"clinic": clinic_id})
    assert (misspelt.status_code, misspelt.json()["code"]) == (422, "unknown_parameter")  # not every clinic's keys
    listed = client.get("/v1/admin/keys", headers=admin.headers, params={"clinic_id": clinic_id}).json()
    assert [k["id"] for k in listed] == [key_id] and "key" not in listed[0] and token not in json.dumps(listed)

    deactivated = client.post(f"/v1/admin/clinics/{clinic_id}/deactivate", headers=admin.headers)
    assert deactivated.json()["active"] is False
    again = client.post(f"/v1/admin/clinics/{clinic_id}/deactivate", headers=admin.headers)
    assert again.json()["deactivated_at"] == deactivated.json()["deactivated_at"]  # when it first was
    refused = client.get("/v1/cases", headers=portal)
    assert refused.status_code == 401 and refused.json()["code"] == "clinic_inactive"
    assert (
        client.post("/v1/admin/keys", headers=admin.headers, json={"role": "clinic", "clinic_id": clinic_id}).json()[
            "code"
        ]
        == "clinic_inactive"
    )
    client.post(f"/v1/admin/clinics/{clinic_id}/activate", headers=admin.headers)
    assert client.get("/v1/cases", headers=portal).status_code == 200

    revoked = client.post(f"/v1/admin/keys/{key_id}/revoke", headers=admin.headers)
    assert revoked.json()["revoked_at"]
    again = client.post(f"/v1/admin/keys/{key_id}/revoke", headers=admin.headers)
    assert again.json()["revoked_at"] == revoked.json()["revoked_at"]
    assert client.get("/v1/cases", headers=portal).json()["code"] == "revoked_credentials"
    with session_scope(settings) as session:
        actions = set(session.scalars(select(AuditEvent.action).where(AuditEvent.actor_key_id == admin.key_id)))
    assert {"clinic.create", "key.create", "key.list", "clinic.deactivate", "clinic.activate", "key.revoke"} <= actions


def test_a_clinic_name_is_judged_in_its_one_spelling(client, make_key) -> None:  # type: ignore[no-untyped-def]
    admin = make_key("admin")
    tag = uuid.uuid4().hex[:6]
    spaced = client.post("/v1/admin/clinics", headers=admin.headers, json={"name": f"West\t{' ' * 300}Clinic {tag}"})
    assert spaced.status_code == 201 and spaced.json()["name"] == f"West Clinic {tag}", spaced.text
    for name in (f"West\x07Clinic {tag}", f"West\u200bClinic {tag}"):
        refused = client.post("/v1/admin/clinics", headers=admin.headers, json={"name": name})
        assert (refused.status_code, refused.json()["code"]) == (422, "invalid_clinic_name"), refused.text


def test_a_key_label_shows_what_it_says(client, make_key) -> None:  # type: ignore[no-untyped-def]
    """`dermq key list` and the audit trail show a label as it is: a direction override would make one
    read as another (U+202E), a C1 control can move a terminal's cursor (U+009B)."""
    admin = make_key("admin")
    for label in ("east \u202egnissecorp", "laptop\u009b2J", "ward\u200b3"):
        refused = client.post("/v1/admin/keys", headers=admin.headers, json={"role": "auditor", "label": label})
        assert (refused.status_code, refused.json()["code"]) == (422, "invalid_key_label"), refused.text
    kept = client.post("/v1/admin/keys", headers=admin.headers, json={"role": "auditor", "label": "Ward 3 — Zürich"})
    assert kept.status_code == 201 and kept.json()["label"] == "Ward 3 — Zürich", kept.text


def test_a_misspelt_field_is_refused_not_dropped(client, make_key, tenant) -> None:  # type: ignore[no-untyped-def]
    """An auditor key asked with "clinic" for "clinic_id" used to be issued, scoped to every clinic."""
    admin = make_key("admin")
    keys_before = len(client.get("/v1/admin/keys", headers=admin.headers).json())
    misspelt = {"role": "auditor", "clinic": str(tenant.clinic_id)}
    for path, body in (("/v1/admin/keys", misspelt), ("/v1/admin/clinics", {"name": "x", "nmae": "y"})):
        refused = client.post(path, headers=admin.headers, json=body)
        assert (refused.status_code, refused.json()["code"]) == (422, "invalid_input"), refused.text
    assert len(client.get("/v1/admin/keys", headers=admin.headers).json()) == keys_before  # nothing issued
    callback = {"url": "https://portal.example.org/dermq", "secret": "mine"}
    refused = client.put("/v1/clinic/callback", headers=tenant.headers, json=callback)
    assert (refused.status_code, refused.json()["code"]) == (422, "invalid_input"), refused.text


def test_only_admins(client, make_key) -> None:  # type: ignore[no-untyped-def]
    for role in ("clinic", "auditor"):
        key = make_key(role)
        response = client.post("/v1/admin/clinics", headers=key.headers, json={"name": "x"})
        assert response.status_code == 403 and response.json()["code"] == "role_not_allowed"
        assert client.get("/v1/admin/keys", headers=key.headers).status_code == 403
    admin = make_key("admin")
    bad = client.post("/v1/admin/keys", headers=admin.headers, json={"role": "clinic"})
    assert bad.status_code == 400 and bad.json()["code"] == "clinic_required"
    assert client.post("/v1/admin/keys", headers=admin.headers, json={"role": "root"}).status_code == 422


def test_cli_matches_the_api(settings) -> None:  # type: ignore[no-untyped-def]
    env = {**os.environ, "DERMQ_DATABASE_URL": settings.database_url, "DERMQ_KEY_FILE": str(settings.key_file)}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*support.DERMQ, *args], capture_output=True, text=True, env=env, cwd=support.ROOT)

    name = f"cli-{uuid.uuid4().hex[:6]}"
    assert run("clinic", "create", name).returncode == 0
    made = run("key", "create", "--clinic", name, "--role", "clinic", "--json")
    key = json.loads(made.stdout)
    assert key["key"].startswith("dq_") and uuid.UUID(key["id"])
    listed = run("key", "list", "--clinic", name)
    assert key["id"] in listed.stdout and key["key"] not in listed.stdout
    assert run("key", "revoke", key["id"]).returncode == 0
    assert "revoked" in run("key", "list", "--clinic", name).stdout
    assert run("clinic", "deactivate", name).returncode == 0
    assert "inactive" in run("clinic", "list").stdout
    hidden = run("key", "create", "--role", "auditor", "--label", "ops\u202e")
    assert hidden.returncode == 2 and "invalid_key_label" in hidden.stderr
    # as the API answers it (422): a label past 200 characters was stored cut short, without a word
    long = run("key", "create", "--role", "auditor", "--label", "night shift " * 20)
    assert long.returncode == 2 and "invalid_key_label" in long.stderr and not long.stdout
    failed = run("key", "create", "--clinic", "no-such-clinic")
    assert failed.returncode == 2 and "no such clinic" in failed.stderr


def test_a_revoked_key_still_in_use_is_seen_by_its_clinics_auditors(client, make_key, settings) -> None:  # type: ignore[no-untyped-def]
    """A leaked key, revoked, that the thief keeps using (or a wrong secret on its prefix): each
    attempt was recorded with no key and no clinic, so the clinic's own auditors never saw them."""
    clinic, admin = make_key(), make_key("admin")
    assert client.post(f"/v1/admin/keys/{clinic.key_id}/revoke", headers=admin.headers).status_code == 200
    wrong_secret = clinic.token[: -len("x" * 10)] + "x" * 10
    for token in (clinic.token, wrong_secret):
        assert client.get("/v1/cases", headers={"Authorization": f"Bearer {token}"}).status_code == 401
    with session_scope(settings) as session:
        filed = session.scalars(
            select(AuditEvent).where(AuditEvent.action == "auth.denied", AuditEvent.clinic_id == clinic.clinic_id)
        ).all()
    assert sorted(e.detail["reason"] for e in filed) == ["invalid_credentials", "revoked_credentials"]
    assert all(e.detail["key_id"] == str(clinic.key_id) and e.entity_id == str(clinic.key_id) for e in filed)
    assert all(e.detail["key_prefix"] == "dq_" + clinic.token.split("_")[1] for e in filed)


def test_an_empty_clinic_on_the_cli_is_no_clinic_found_not_every_clinic(settings) -> None:  # type: ignore[no-untyped-def]
    """`dermq key create --role auditor --clinic "$CLINIC"` with the variable empty issued an auditor key
    that sees every clinic's records, and `dermq key list --clinic ""` listed every clinic's keys (and
    was audited as such): an empty --clinic was taken for no --clinic."""
    env = {**os.environ, "DERMQ_DATABASE_URL": settings.database_url, "DERMQ_KEY_FILE": str(settings.key_file)}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*support.DERMQ, *args], capture_output=True, text=True, env=env, cwd=support.ROOT)

    with session_scope(settings) as session:
        before = session.scalar(select(func.count()).select_from(ApiKey))
    for blank in ("", "  "):
        issued = run("key", "create", "--role", "auditor", "--clinic", blank, "--json")
        assert issued.returncode == 2 and "clinic_not_found" in issued.stderr, issued.stdout + issued.stderr
        listed = run("key", "list", "--clinic", blank, "--json")
        assert listed.returncode == 2 and "clinic_not_found" in listed.stderr and not listed.stdout
    with session_scope(settings) as session:
        assert session.scalar(select(func.count()).select_from(ApiKey)) == before  # nothing issued
