"""An auditor who looks up a key (`actor=`) sees what it did and every request refused that presented
it: once a leaked key is revoked, its holder's further attempts are what the investigation needs, and
they were filed with the key as the entity, not the actor, so the filter left them out. Each was also
filed twice (under the key's clinic, and under none for a caller without one): an auditor counted
every refused attempt twice."""

from __future__ import annotations

import pytest

from tests.conftest import Tenant

pytestmark = pytest.mark.usefixtures("database")


def test_the_actor_filter_finds_the_refused_attempts_of_a_revoked_key(client, make_key) -> None:  # type: ignore[no-untyped-def]
    portal, other, admin, auditor = make_key("clinic"), make_key("clinic"), make_key("admin"), make_key("auditor")
    assert client.get("/v1/cases", headers=portal.headers).status_code == 200  # what the key did
    assert client.get("/v1/cases", headers=other.headers).status_code == 200  # another key's doing
    assert client.post(f"/v1/admin/keys/{portal.key_id}/revoke", headers=admin.headers).status_code == 200
    for _ in range(2):  # the leaked key, used after its revocation
        assert client.get("/v1/cases", headers=portal.headers).json()["code"] == "revoked_credentials"
    wrong = Tenant(portal.clinic_id, portal.name, portal.token[:-4] + "AAAA", portal.key_id)  # its prefix, guessed
    assert client.get("/v1/cases", headers=wrong.headers).status_code == 401

    prefix = portal.token.split("_")[1]
    for actor in (str(portal.key_id), f"dq_{prefix}"):
        events, cursor = [], None
        while True:  # a page at a time: the two ways an event names the key, merged newest first
            page = client.get(
                "/v1/audit-events",
                headers=auditor.headers,
                params={"actor": actor, "limit": 2} | ({"cursor": cursor} if cursor else {}),
            ).json()
            events += page["items"]
            cursor = page.get("next_cursor")
            if not cursor:
                break
        ids = [e["id"] for e in events]
        assert ids == sorted(ids, reverse=True) and len(set(ids)) == len(ids)
        done = [e for e in events if e["actor_key_id"] == str(portal.key_id)]
        refused = [e for e in events if e["action"] == "auth.denied"]
        assert [e["action"] for e in done] == ["case.list"]
        # newest first: the guess with its prefix, then the two uses after the revocation
        assert [e["detail"]["reason"] for e in refused] == ["invalid_credentials"] + ["revoked_credentials"] * 2
        assert {e["entity_id"] for e in refused} == {str(portal.key_id)}
        assert len(events) == len(done) + len(refused)  # nothing of the other key's, nor the admin's revocation
