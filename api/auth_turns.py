"""One key check at a time for each address and key prefix, in each API process.

A key the cache has not verified is checked in the database (a keyed hash and a query). The failed
logins of an address with a key prefix are limited (``rate_limit_failed_auth_per_minute``), but a
failure is counted only once its check has failed: before any had, every guess of a burst sent at
once passed the look at the limit, and all were checked (500 of 500 in a simulation; then again once
the bucket had recovered, a minute later). Counting each attempt before its check would refuse a
burst of valid logins on a cold cache instead. So the checks of one bucket take turns: the first is
checked; a failure is counted before the next begins (which then counts itself first, as after any
failure), and a success is cached, so the rest of a burst of valid logins costs no check at all.

Turns are per process (a deployment of P API processes checks at most P at once), and held on the
event loop: no thread waits for one. They are taken only while the key cache remembers keys
(``api.key_cache``: on, and its listener connected); with it off, or while the listener is away,
every valid login of a burst would wait for the one before, and the checks run at once as before
(a burst of guesses into a quiet bucket is then checked whole, as before turns).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class Turns:
    """Named turns: :meth:`turn` lets one holder of a name in at a time, the rest in the order they came."""

    def __init__(self) -> None:
        #: name -> its lock and how many hold or wait for it (an entry lives while one does)
        self._names: dict[str, tuple[asyncio.Lock, list[int]]] = {}

    @contextlib.asynccontextmanager
    async def turn(self, name: str) -> AsyncIterator[None]:
        entry = self._names.get(name)
        if entry is None:
            entry = self._names[name] = (asyncio.Lock(), [0])
        lock, users = entry
        users[0] += 1
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if not users[0]:
                del self._names[name]
