"""The API's Postgres listener in a process that holds many files: a busy API process's sockets are
numbered past 1023, where ``select`` refuses them."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import uuid
from collections.abc import Callable, Iterator

import pytest

from api.listener import Listener
from core import announcements
from core.config import Settings
from core.db import dispose_engines, session_scope

#: descriptors are numbered from the lowest free one: all up to this one are taken during the test
HIGH = 1100


@contextlib.contextmanager
def low_descriptors_taken() -> Iterator[None]:
    """Every file descriptor below :data:`HIGH` taken, so that the next socket opened is numbered at
    least that high (as in an API process serving a thousand connections); all given back after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= HIGH + 64:
        pytest.skip(f"this machine allows {hard} open files per process, too few to number one past {HIGH}")
    if soft != resource.RLIM_INFINITY and soft < HIGH + 64:
        resource.setrlimit(resource.RLIMIT_NOFILE, (HIGH + 64, hard))
    taken: list[int] = []
    try:
        while not taken or taken[-1] < HIGH:
            taken.append(os.open(os.devnull, os.O_RDONLY))
        os.close(taken.pop())  # the one numbered HIGH: now the lowest free
        yield
    finally:
        for fd in taken:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_listener_whose_socket_is_numbered_past_1023_hears_ended_cases_and_key_changes(
    settings: Settings, database: str
) -> None:
    case_id = uuid.uuid4()

    async def scenario() -> tuple[int, list[list[uuid.UUID]], int, bool]:
        listener = Listener(settings.database_url)
        ended: list[list[uuid.UUID]] = []
        key_changes: list[None] = []
        listener.on_cases.append(ended.append)
        listener.on_keys_changed.append(lambda: key_changes.append(None))
        with low_descriptors_taken():
            listener.start()
            try:
                await until(lambda: listener.listening, "the listener to connect")
                fd = listener._fd
                assert fd is not None
                # with nothing waiting on its socket, the key cache may be trusted
                await until(lambda: not listener.unheard(), "nothing left unheard after connecting")
                before = len(key_changes)
                with session_scope(settings) as session:
                    announcements.announce_finished(session, [case_id])
                    announcements.announce_keys_changed(session)
                # what one wake-up reads comes as one list: another case may share it
                await until(lambda: any(case_id in ids for ids in ended), "the case's end to be heard")
                await until(lambda: len(key_changes) > before, "the key change to be heard")
                return fd, ended, len(key_changes) - before, listener.listening
            finally:
                listener.close()

    fd, ended, key_changes, listening = asyncio.run(scenario())
    dispose_engines()  # the pooled connection opened past HIGH goes too
    assert fd >= 1024
    assert listening  # never fell back to looking every second
    assert any(case_id in ids for ids in ended)
    assert key_changes >= 1


async def until(condition: Callable[[], bool], what: str, timeout: float = 20) -> None:
    """Wait on the event loop (the listener hands ended cases to it) until ``condition()`` holds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)
