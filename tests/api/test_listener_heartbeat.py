"""The API's Postgres listener when its connection dies without a word (a database host gone, a NAT
that dropped an idle connection, a proxy that hangs): nothing arrives, which looks like nothing
happening, and a revoked key would have stayed trusted by the key cache for minutes. A proxy on this
machine stands between the listener and the real Postgres and, when silenced, goes on accepting and
acknowledging bytes but passes none either way."""

from __future__ import annotations

import asyncio
import socket
import threading
import uuid

from sqlalchemy.engine import make_url

from api.listener import Listener
from core import announcements
from core.config import Settings
from core.db import session_scope
from tests.api.test_listener import until

#: Postgres over TCP, trusted without a password on this machine and CI's (the tests' settings name
#: its socket, which a proxy cannot stand in front of)
POSTGRES = ("127.0.0.1", 5432)


class SilenceableProxy:
    """Forwards TCP connections to ``upstream`` until :meth:`silence`, then swallows
    everything; :meth:`resume` passes bytes again (on the connections opened from then on)."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.silent = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:  # closed
                return
            server = socket.create_connection(self.upstream)
            with self.lock:
                self.sockets += [client, server]
            silent_from_start = self.silent.is_set()
            for source, target in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, target, silent_from_start), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket, silent_from_start: bool) -> None:
        try:
            while chunk := source.recv(65536):
                if not (silent_from_start or self.silent.is_set()):
                    target.sendall(chunk)
        except OSError:
            return

    def silence(self) -> None:
        self.silent.set()

    def resume(self) -> None:
        self.silent.clear()

    def close(self) -> None:
        self.listener.close()
        with self.lock:
            for sock in self.sockets:
                sock.close()


def test_a_connection_gone_silent_is_counted_lost_and_opened_again(settings: Settings, database: str) -> None:
    proxy = SilenceableProxy(POSTGRES)
    url = make_url(settings.database_url).set(host="127.0.0.1", port=proxy.port)
    case_id = uuid.uuid4()

    async def scenario() -> tuple[int, list[list[uuid.UUID]]]:
        listener = Listener(url.render_as_string(hide_password=False), heartbeat_seconds=0.5, answer_seconds=1.0)
        ended: list[list[uuid.UUID]] = []
        key_changes: list[None] = []
        listener.on_cases.append(ended.append)
        listener.on_keys_changed.append(lambda: key_changes.append(None))
        listener.start()
        try:
            await until(lambda: listener.listening, "the listener to connect through the proxy")
            await asyncio.sleep(1.2)  # heartbeats answered meanwhile (every 0.5 s of quiet)
            # and each, once handled, lets the key cache be trusted again
            await until(lambda: not listener.unheard(), "nothing unheard after the heartbeats")
            before = len(key_changes)
            proxy.silence()
            # no notification comes, and none is missed: the heartbeat goes unanswered
            await until(lambda: not listener.listening, "the silent connection to be counted lost", timeout=10)
            forgotten = len(key_changes) - before  # the key cache is told to forget what it trusted
            proxy.resume()
            await until(lambda: listener.listening, "the listener to connect again", timeout=20)
            with session_scope(settings) as session:
                announcements.announce_finished(session, [case_id])
            await until(lambda: any(case_id in ids for ids in ended), "the case's end to be heard again")
            return forgotten, ended
        finally:
            listener.close()
            proxy.close()

    forgotten, ended = asyncio.run(scenario())
    assert forgotten >= 1
    assert ended.count([]) >= 2  # on reconnecting too, waiting requests were told they may have missed an end


def test_nothing_read_during_a_heartbeat_is_trusted_before_it_is_handled_and_close_does_not_wait_for_it(
    settings: Settings, database: str
) -> None:
    """A notification that comes while a heartbeat waits for its answer is read into the connection,
    off the socket, and handled only once the answer has come: until then the key cache must not
    trust what it remembers (``unheard``). And closing must not wait out the heartbeat's deadline."""
    proxy = SilenceableProxy(POSTGRES)
    url = make_url(settings.database_url).set(host="127.0.0.1", port=proxy.port)

    async def scenario() -> tuple[bool, bool]:
        listener = Listener(url.render_as_string(hide_password=False), heartbeat_seconds=0.3, answer_seconds=30)
        listener.start()
        thread = listener._thread
        assert thread is not None
        try:
            await until(lambda: listener.listening and not listener.unheard(), "the listener to connect")
            proxy.silence()  # the next heartbeat's answer never comes
            await until(lambda: listener._exchanging.is_set(), "a heartbeat to be under way")
            distrusted = listener.unheard()
        finally:
            listener.close()  # waits up to 5 s for the thread: not the heartbeat's 30 s deadline
            still_running = thread.is_alive()  # before the proxy's close ends the connection anyway
            proxy.close()
        return distrusted, still_running

    distrusted, still_running = asyncio.run(scenario())
    assert distrusted
    assert not still_running
