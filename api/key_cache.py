"""Verified API keys, remembered by one API process so that a poll costs no keyed hash and no query.

A key is remembered only while the process's :class:`~api.listener.Listener` is connected: every
revocation and clinic (de)activation announces itself when it commits (:mod:`core.announcements`),
and the listener then forgets every key at once, so revocation still takes effect at once: a key is
not taken from memory while the listener's connection holds a notification its thread has not yet
taken, which leaves only Postgres's own hand-over of the notification between the revoking commit and
the refusal. That moment is closed too where the change comes through this process (the admin API):
the request forgets every key itself once it has committed (``AppState.committed``), before it answers.
While the listener is not connected nothing is remembered and every request is checked in the
database. An entry is also dropped after ``max_age`` seconds, whatever happens.

Entries are keyed by the SHA-256 of the token, never the token itself. A key verified while a change
was being announced is not remembered (the generation it was read in has passed).
"""

from __future__ import annotations

import hashlib
import threading
import time

from api.listener import Listener
from core.keys import Principal


class KeyCache:
    def __init__(self, listener: Listener, *, max_age: float = 300.0, max_entries: int = 10_000) -> None:
        self.listener = listener
        self.max_age = max_age
        self.max_entries = max_entries
        self._entries: dict[bytes, tuple[Principal, float]] = {}
        self._generation = 0
        self._lock = threading.Lock()
        listener.on_keys_changed.append(self.forget_all)

    @staticmethod
    def _key(token: str) -> bytes:
        return hashlib.sha256(token.encode()).digest()

    def generation(self) -> int:
        """Read before a key is verified in the database; hand it back to :meth:`remember`."""
        with self._lock:
            return self._generation

    def unchanged_since(self, generation: int) -> bool:
        """No key change was announced, or can have been missed, since :meth:`generation` gave
        ``generation``: a key valid then is valid now (for a request that outlives its authentication)."""
        if not self.listener.listening or self.listener.unheard():
            return False
        with self._lock:
            return self._generation == generation

    def remembering(self) -> bool:
        """Whether a key verified now would be remembered (the cache is on and its listener connected)."""
        return self.max_age > 0 and self.listener.listening and not self.listener.unheard()

    def get(self, token: str | None) -> Principal | None:
        if not token or not self.remembering():
            return None
        with self._lock:
            entry = self._entries.get(self._key(token))
        if entry is None or time.monotonic() - entry[1] > self.max_age:
            return None
        return entry[0]

    def remember(self, token: str, principal: Principal, generation: int) -> None:
        if not self.listener.listening:
            return
        with self._lock:
            if generation != self._generation:
                return  # a change was announced while this key was being verified
            if len(self._entries) >= self.max_entries:
                self._entries.clear()
            self._entries[self._key(token)] = (principal, time.monotonic())

    def forget_all(self) -> None:
        with self._lock:
            self._generation += 1
            self._entries.clear()
