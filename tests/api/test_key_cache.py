"""A poll's key check: remembered by the API process once verified, forgotten the moment any key is
revoked or a clinic deactivated (announced by the committing transaction)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from api.key_cache import KeyCache
from api.listener import Listener
from core import clinics, keys
from core.db import session_scope
from core.keys import Principal
from core.models import Role
from tests import support
from tests.conftest import Tenant


@contextlib.contextmanager
def connected(listener: Listener) -> Iterator[Listener]:
    """``listener`` connected and listening, but with no thread taking its notifications."""
    connection = listener._connect()
    listener._fd = connection.fileno()
    listener._listening.set()
    try:
        yield listener
    finally:
        connection.close()


def admin() -> Principal:
    return Principal(key_id=None, role=Role.ADMIN, clinic_id=None)  # type: ignore[arg-type]


def listening(client) -> bool:  # type: ignore[no-untyped-def]
    return client.app.state.dermq.listener.listening


def test_a_verified_key_is_not_looked_up_again(client, settings, tenant: Tenant) -> None:  # type: ignore[no-untyped-def]
    support.wait_for(lambda: listening(client), timeout=20, what="the API's listener")
    assert client.get("/v1/cases", headers=tenant.headers).status_code == 200
    with support.statements_sent(settings) as sent:
        for _ in range(3):
            assert client.get("/v1/cases", headers=tenant.headers).status_code == 200
    assert [statement for statement in sent if "api_keys" in statement] == []


def test_a_revoked_key_is_refused_at_once_though_it_was_remembered(client, settings, tenant: Tenant) -> None:  # type: ignore[no-untyped-def]
    support.wait_for(lambda: listening(client), timeout=20, what="the API's listener")
    assert client.get("/v1/cases", headers=tenant.headers).status_code == 200  # remembered now
    with session_scope(settings) as session:  # another process (the CLI) revokes it
        keys.revoke_key(session, tenant.key_id)
    answer = support.wait_for(
        lambda: (r := client.get("/v1/cases", headers=tenant.headers)).status_code == 401 and r,
        timeout=2,
        what="the refusal",
    )
    assert answer.json()["code"] == "revoked_credentials"


def test_a_deactivated_clinics_remembered_key_is_refused_at_once(client, settings, tenant: Tenant) -> None:  # type: ignore[no-untyped-def]
    support.wait_for(lambda: listening(client), timeout=20, what="the API's listener")
    assert client.get("/v1/cases", headers=tenant.headers).status_code == 200
    with session_scope(settings) as session:
        clinics.set_active(session, tenant.clinic_id, False)
    try:
        assert support.wait_for(
            lambda: client.get("/v1/cases", headers=tenant.headers).status_code == 401, timeout=2, what="the refusal"
        )
    finally:
        with session_scope(settings) as session:
            clinics.set_active(session, tenant.clinic_id, True)


def test_nothing_is_remembered_while_nobody_listens(settings) -> None:  # type: ignore[no-untyped-def]
    cache = KeyCache(Listener(settings.database_url))  # never started: not listening
    principal = admin()
    cache.remember("dq_token", principal, cache.generation())
    assert cache.get("dq_token") is None


def test_a_key_verified_while_a_change_was_announced_is_not_remembered(settings) -> None:  # type: ignore[no-untyped-def]
    with connected(Listener(settings.database_url)) as listener:
        cache = KeyCache(listener)
        principal = admin()
        generation = cache.generation()
        cache.forget_all()  # a revocation announced meanwhile
        cache.remember("dq_token", principal, generation)
        assert cache.get("dq_token") is None
        cache.remember("dq_token", principal, cache.generation())
        assert cache.get("dq_token") == principal


def test_a_zero_lifetime_turns_the_cache_off(settings) -> None:  # type: ignore[no-untyped-def]
    with connected(Listener(settings.database_url)) as listener:
        cache = KeyCache(listener, max_age=0)
        principal = admin()
        cache.remember("dq_token", principal, cache.generation())
        assert cache.get("dq_token") is None


def test_a_remembered_key_is_not_trusted_while_a_notification_waits_unheard(settings) -> None:  # type: ignore[no-untyped-def]
    from core import announcements

    with connected(Listener(settings.database_url)) as listener:
        cache = KeyCache(listener)
        principal = admin()
        cache.remember("dq_token", principal, cache.generation())
        assert cache.get("dq_token") == principal
        with session_scope(settings) as session:  # a revocation commits elsewhere
            announcements.announce_keys_changed(session)
        assert support.wait_for(listener.unheard, timeout=10, what="the notification on the socket")
        assert cache.get("dq_token") is None


def test_a_change_made_through_this_api_takes_effect_before_it_answers(client, make_key) -> None:  # type: ignore[no-untyped-def]
    """Deactivating a clinic, or revoking a key, through the admin API: the next request with the key
    is refused even where the notification, once heard, forgets nothing (the request that made the
    change has already forgotten every key after its commit)."""
    listener = client.app.state.dermq.listener
    support.wait_for(lambda: listener.listening, timeout=20, what="the API's listener")
    key_cache, admin_key, tenant = client.app.state.dermq.key_cache, make_key("admin"), make_key()
    heard: list[None] = []
    listener.on_keys_changed.remove(key_cache.forget_all)  # the notification no longer empties the cache
    listener.on_keys_changed.append(lambda: heard.append(None))
    try:
        assert client.get("/v1/cases", headers=tenant.headers).status_code == 200  # remembered now
        for change, code in (
            (f"/v1/admin/clinics/{tenant.clinic_id}/deactivate", "clinic_inactive"),
            (f"/v1/admin/clinics/{tenant.clinic_id}/activate", None),  # remembered again
            (f"/v1/admin/keys/{tenant.key_id}/revoke", "revoked_credentials"),
        ):
            before = len(heard)
            assert client.post(change, headers=admin_key.headers).status_code == 200
            support.wait_for(lambda: len(heard) > before, timeout=10, what="the notification")  # noqa: B023
            answer = client.get("/v1/cases", headers=tenant.headers)
            assert (answer.status_code, answer.json().get("code")) == ((200, None) if code is None else (401, code))
    finally:
        listener.on_keys_changed.remove(listener.on_keys_changed[-1])
        listener.on_keys_changed.append(key_cache.forget_all)
