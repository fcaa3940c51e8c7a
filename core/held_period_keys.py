"""The period keys a process holds in memory, and how it lets go of a destroyed one within seconds.

A process that seals or reads cases (an API process, a worker child) keeps each period key it has
unwrapped (:class:`core.period_keys.PeriodKeys`), so that a case costs no unwrap. Retention destroys a
period's key in another process (beat's purge, ``dermq keys destroy-period``), and only once every case
of the period is purged: none is asked for again, so a process that dropped the key when its period was
next asked for kept it for as long as it ran (an idle API overnight, a worker child between cases), and
a dump of its memory opened every backup of the period. Every process that holds a key therefore runs
one thread that, every :data:`FORGET_SECONDS`, looks for the tombstone of each period it holds (a
``stat`` each) and forgets the keys of those destroyed, whatever its traffic.

Forgetting overwrites the key. Each is held in a ``bytearray``, unwrapped straight into it
(``AESGCM.decrypt_into``: no ``bytes`` copy is made) and zeroed when it is forgotten: destroyed, or
dropped with its folder object (a keyring re-read after a rotation), or inherited by a forked child
(which unwraps again what it needs). What Python cannot reach stays as it is: an ``AESGCM`` object
copies its key into OpenSSL's cipher contexts when it is made (changing the ``bytearray`` afterwards
changes nothing it does), out of reach of any Python object. dermq makes one per operation and keeps
none, and OpenSSL clears a context's memory when it frees it. Data keys and plaintexts that passed
through the process are ordinary ``bytes``, freed but not cleared.
"""

from __future__ import annotations

import hmac
import logging
import os
import threading
import time
import weakref
from pathlib import Path

log = logging.getLogger("dermq.keys")

#: how often a process looks for the destroyed periods among the keys it holds
FORGET_SECONDS = 10.0


def new_key(size: int) -> bytearray:
    """``size`` fresh random bytes, read straight into a buffer that can be zeroed: ``secrets.token_bytes``
    returns ``bytes``, which would leave a period's new key in the freed memory of the process that made
    it. ``/dev/urandom`` is the kernel generator that ``secrets`` reads too (through ``getrandom``)."""
    key = bytearray(size)
    with open("/dev/urandom", "rb", buffering=0) as source:
        if source.readinto(key) != size:
            raise OSError("/dev/urandom gave fewer bytes than asked for")
    return key


def zero(key: bytearray) -> None:
    key[:] = bytes(len(key))


class HeldKeys:
    """The unwrapped keys of one period-key folder, by period, each with the (inode, mtime) of the key
    file it came from: a file rewritten since (a re-wrap) is read again."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._keys: dict[str, tuple[tuple[int, int], bytearray]] = {}
        self._lock = threading.Lock()
        # zeroed when this object goes (a keyring replaced after a rotation), not when the process exits
        weakref.finalize(self, _zero_all, self._keys)

    def get(self, period: str, stamp: tuple[int, int]) -> bytearray | None:
        with self._lock:
            held = self._keys.get(period)
        return held[1] if held is not None and held[0] == stamp else None

    def put(self, period: str, stamp: tuple[int, int], key: bytearray) -> bytearray:
        """Hold ``key`` (read from a file with ``stamp``); returns the key to use. A period's key never
        changes: the one already held stays (another thread may be using it) and ``key`` is zeroed."""
        with self._lock:
            held = self._keys.get(period)
            if held is not None and hmac.compare_digest(held[1], key):
                self._keys[period] = (stamp, held[1])
                zero(key)
                key = held[1]
            else:
                self._keys[period] = (stamp, key)
        _watch(self)
        return key

    def periods(self) -> list[str]:
        with self._lock:
            return list(self._keys)

    def forget(self, period: str) -> None:
        with self._lock:
            held = self._keys.pop(period, None)
        if held is not None:
            zero(held[1])

    def forget_all(self) -> None:
        with self._lock:
            _zero_all(self._keys)

    def forget_destroyed(self) -> list[str]:
        """Forget the keys of the periods whose tombstone ``<period>.destroyed`` exists; the periods
        forgotten. One that cannot be looked for (the volume's error) is looked for next time: a key in
        use must not be overwritten (a data key wrapped meanwhile would be wrapped under zeros), and only
        a destroyed period's is never in use (destruction waits for every transaction sealing under it)."""
        gone = []
        for period in self.periods():
            try:
                os.stat(self.folder / f"{period}.destroyed")
            except OSError:  # no tombstone (FileNotFoundError), or none to be seen now
                continue
            self.forget(period)
            gone.append(period)
        return gone

    def _after_fork(self) -> None:
        self._lock = threading.Lock()  # another thread of the parent may have held it
        _zero_all(self._keys)


def _zero_all(keys: dict[str, tuple[tuple[int, int], bytearray]]) -> None:
    for _, key in keys.values():
        zero(key)
    keys.clear()


# --------------------------------------------------------------------------- the process's watcher

_holders: weakref.WeakSet[HeldKeys] = weakref.WeakSet()
_watcher: threading.Thread | None = None
_watcher_lock = threading.Lock()


def _watch(holder: HeldKeys) -> None:
    """Have the process's watcher thread look after ``holder`` (started with the first key held)."""
    global _watcher
    with _watcher_lock:
        _holders.add(holder)
        if _watcher is None or not _watcher.is_alive():
            _watcher = threading.Thread(target=_forget_destroyed_periodically, name="dermq-period-keys", daemon=True)
            _watcher.start()


def _forget_destroyed_periodically() -> None:
    while True:
        time.sleep(FORGET_SECONDS)
        with _watcher_lock:
            holders = list(_holders)
        for holder in holders:
            try:
                holder.forget_destroyed()
            except Exception as exc:  # the thread must outlive anything one folder does
                log.warning("could not look for destroyed period keys", extra={"error": type(exc).__name__})


def _after_fork_in_child() -> None:
    """A forked child (a Celery worker child) starts with a copy of its parent's keys and no watcher:
    it forgets them (it unwraps again what it needs) and starts its own watcher with its first key."""
    global _watcher, _watcher_lock
    _watcher, _watcher_lock = None, threading.Lock()
    for holder in list(_holders):
        holder._after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)
