"""A callback attempt ends within three timeouts, however its receiver answers: one that sends its
answer a byte at a time never lets a single read time out, and held the worker child until Celery's
time limit (60 s), which then kept the attempt from being recorded. A real socket server stands in
for the clinic's portal; the POST is the worker's own (worker.callbacks.post)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from core.config import Settings
from worker.callbacks import DEADLINE_EXCEEDED, post

TIMEOUT = 0.5  # callback_timeout_seconds: the attempt's deadline is three of these


class Receiver:
    """A portal on 127.0.0.1 that reads the request, then answers ``answer`` with ``pause`` seconds
    between bytes."""

    def __init__(self, answer: bytes, pause: float) -> None:
        self.answer, self.pause = answer, pause
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        connection, _ = self.listener.accept()
        with connection:
            connection.settimeout(5)
            request = b""
            while b"\r\n\r\n" not in request:
                request += connection.recv(4096)
            try:
                for byte in self.answer:
                    if self.stopped.wait(self.pause):
                        return
                    connection.sendall(bytes([byte]))
            except OSError:  # the worker cut the exchange
                return

    def close(self) -> None:
        self.stopped.set()
        self.listener.close()
        self.thread.join(timeout=5)


@pytest.fixture
def config(settings: Settings) -> Settings:
    return settings.model_copy(update={"callback_timeout_seconds": TIMEOUT, "callback_allow_private_urls": True})


@pytest.fixture
def trickling() -> Iterator[Receiver]:
    receiver = Receiver(b"HTTP/1.1 200 OK\r\n" + b"X-Slow: " + b"a" * 2000 + b"\r\n\r\n", pause=0.2)
    yield receiver
    receiver.close()


def test_a_receiver_that_answers_a_byte_at_a_time_is_cut_off_at_the_deadline(config: Settings, trickling) -> None:  # type: ignore[no-untyped-def]
    started = time.monotonic()
    status, error = post(f"http://127.0.0.1:{trickling.port}/hook", b"{}", "whsec_test", config, event_id="e1")
    took = time.monotonic() - started
    assert (status, error) == (None, DEADLINE_EXCEEDED)
    assert 3 * TIMEOUT <= took < 3 * TIMEOUT + 2


def test_a_prompt_receiver_is_delivered_to(config: Settings) -> None:
    receiver = Receiver(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n", pause=0)
    try:
        status, error = post(f"http://127.0.0.1:{receiver.port}/hook", b"{}", "whsec_test", config, event_id="e2")
    finally:
        receiver.close()
    assert (status, error) == (204, None)
