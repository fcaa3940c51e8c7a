"""A callback attempt ends within three timeouts, however its receiver answers: one that sends its
answer a byte at a time never lets a single read time out, and held the worker child until Celery's
time limit (60 s), which then kept the attempt from being recorded. A real socket server stands in
for the clinic's portal; the POST is the worker's own (worker.callbacks.post)."""

from __future__ import annotations

import re
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from core import callback_urls as callbacks_urls
from core.config import Settings
from tests import support
from worker import callbacks
from worker.callbacks import DEADLINE_EXCEEDED, post

TIMEOUT = 0.5  # callback_timeout_seconds: the attempt's deadline is three of these


class Receiver:
    """A portal on this machine that reads the request (over TLS with ``tls``), then answers
    ``answer`` with ``pause`` seconds between bytes (over TLS, a record for each byte)."""

    def __init__(self, answer: bytes, pause: float, *, tls: ssl.SSLContext | None = None) -> None:
        self.answer, self.pause, self.tls = answer, pause, tls
        dual = socket.has_dualstack_ipv6()  # "localhost" may resolve to either family
        self.listener = socket.create_server(
            ("", 0), family=socket.AF_INET6 if dual else socket.AF_INET, dualstack_ipv6=dual
        )
        self.port = self.listener.getsockname()[1]
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        connection, _ = self.listener.accept()
        if self.tls is not None:
            connection.settimeout(5)
            connection = self.tls.wrap_socket(connection, server_side=True)
        with connection:
            connection.settimeout(5)
            # the whole request, its body too: closing with the body unread would send a reset, which
            # can reach the client before it has read the answer (http.client sends the body apart)
            request = b""
            while b"\r\n\r\n" not in request or len(request) < self._length(request):
                chunk = connection.recv(4096)
                if not chunk:
                    break
                request += chunk
            try:
                for byte in self.answer:
                    if self.stopped.wait(self.pause):
                        return
                    connection.sendall(bytes([byte]))
            except OSError:  # the worker cut the exchange
                return

    @staticmethod
    def _length(request: bytes) -> int:
        """The length of the whole request, once its head has come: head plus Content-Length."""
        head, _, _ = request.partition(b"\r\n\r\n")
        found = re.search(rb"(?im)^content-length:\s*(\d+)", head)
        return len(head) + 4 + (int(found.group(1)) if found else 0)

    def close(self) -> None:
        self.stopped.set()
        self.listener.close()
        self.thread.join(timeout=5)


@pytest.fixture
def config(settings: Settings) -> Settings:
    return settings.model_copy(update={"callback_timeout_seconds": TIMEOUT, "callback_allow_private_urls": True})


@pytest.fixture
def trickling() -> Iterator[Receiver]:
    # a byte every 0.1 s: each read gets one well within the socket's timeout (0.5 s), even on a loaded
    # machine (at 0.2 s, a receiver thread held up by a parallel run let one read time out first); the
    # deadline (1.5 s) then falls in the status line's last bytes, where what is left of it parses
    # as "HTTP/1.1 200 OK" once the socket is shut: that was counted as delivered
    receiver = Receiver(b"HTTP/1.1 200 OK\r\n" + b"X-Slow: " + b"a" * 2000 + b"\r\n\r\n", pause=0.1)
    yield receiver
    receiver.close()


def test_a_receiver_that_answers_a_byte_at_a_time_is_cut_off_at_the_deadline(config: Settings, trickling) -> None:  # type: ignore[no-untyped-def]
    started = time.monotonic()
    status, error = post(f"http://localhost:{trickling.port}/hook", b"{}", "whsec_test", config, event_id="e1")
    took = time.monotonic() - started
    assert (status, error) == (None, DEADLINE_EXCEEDED)
    assert 3 * TIMEOUT <= took < 3 * TIMEOUT + 2


def test_an_https_receiver_that_answers_a_record_at_a_time_is_cut_off_too(
    config: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Production takes https only. Wrapping the connection in TLS moves its descriptor to the TLS
    socket: the deadline must follow it there (it once watched the emptied plain socket, and a
    receiver answering one TLS record a byte at a time held the attempt until Celery's time limit)."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    support.self_signed_certificate(cert, key)  # for localhost, trusted by this process's TLS clients
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert, key)
    # a byte every 0.1 s, well within the socket's timeout under load, as in the plain test above
    receiver = Receiver(b"HTTP/1.1 200 OK\r\n" + b"X-Slow: " + b"a" * 2000 + b"\r\n\r\n", pause=0.1, tls=server)
    started = time.monotonic()
    try:
        status, error = post(f"https://localhost:{receiver.port}/hook", b"{}", "whsec_test", config, event_id="e3")
    finally:
        receiver.close()
    took = time.monotonic() - started
    assert (status, error) == (None, DEADLINE_EXCEEDED)
    assert 3 * TIMEOUT <= took < 3 * TIMEOUT + 2


def test_a_prompt_receiver_is_delivered_to(config: Settings) -> None:
    receiver = Receiver(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n", pause=0)
    try:
        status, error = post(f"http://localhost:{receiver.port}/hook", b"{}", "whsec_test", config, event_id="e2")
    finally:
        receiver.close()
    assert (status, error) == (204, None)


@pytest.mark.parametrize("https", [False, True], ids=["http", "https"])
def test_a_callback_sends_its_body_without_waiting_for_the_head_to_be_acknowledged(
    https: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """http.client writes a request's head and body in two writes; with Nagle's algorithm on, the
    body waits for the receiver's delayed acknowledgement of the head (40 ms on Linux, up to 200 ms
    elsewhere), and a receiver that answers on the head alone resets a body it never read. Loopback
    acknowledges at once, so the socket's option is what is checked: the connection dermq's POST uses,
    pinned to its checked address, must have it set as http.client's own connections do."""
    tls = None
    if https:
        cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
        support.self_signed_certificate(cert, key)
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(cert, key)
    receiver = Receiver(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n", pause=0, tls=tls)
    kind = callbacks._PinnedHTTPSConnection if https else callbacks._PinnedHTTPConnection
    connection = kind("localhost", receiver.port, "127.0.0.1", TIMEOUT, callbacks._Deadline(3 * TIMEOUT))
    try:
        connection.connect()
        assert connection.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        connection.request("POST", "/hook", body=b"{}")
        assert connection.getresponse().status == 204
    finally:
        connection.close()
        receiver.close()


def test_a_name_server_that_does_not_answer_is_cut_off_within_the_deadline_too(
    config: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The clinic's name server drops the lookup: ``getaddrinfo`` has no timeout of its own (glibc waits
    out its retries, 30 s and more) and used to run before the attempt's deadline started. A resolver
    that takes 5 s stands in for it (there is no name server here to make silent)."""
    released = threading.Event()

    def silent(*args, **kwargs):  # type: ignore[no-untyped-def]
        released.wait(5)
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(callbacks_urls.socket, "getaddrinfo", silent)
    started = time.monotonic()
    try:
        status, error = post("https://portal.example/hook", b"{}", "secret", config, event_id="e")
    finally:
        released.set()
    assert (status, error) == (None, DEADLINE_EXCEEDED)
    assert time.monotonic() - started < 3 * TIMEOUT + 0.5
