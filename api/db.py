"""A request's database work: one Session, one transaction, one thread.

A Session must not move between threads, and FastAPI runs each sync dependency and sync route on
whichever thread-pool thread is free. So the request's Session lives on a thread of its own: the
routes and the authentication dependency hand it their database work with ``await db.run(work)``,
and the request's dependency (:func:`api.deps.request_db`) commits on that same thread once the route
has returned (or the route's last work does, in the same hop), before the response is sent ("no
audit, no access": if the commit of a read's audit event fails, the client gets 503 and no data), or
rolls back if the route raised. Tasks enqueued on the Session (:mod:`core.enqueue`) are sent by that
commit.

CPU work without the database (decoding, hashing) may use any thread; the event loop itself never
waits on Postgres or Redis.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import threading
from collections.abc import AsyncIterator, Callable, Generator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import anyio
from sqlalchemy.orm import Session, sessionmaker

from core.errors import ServiceUnavailable

T = TypeVar("T")


class Lanes:
    """Threads for requests' database work, kept for the next request: a request takes one for its
    whole life (its Session never moves between threads) and gives it back when it has closed its
    Session. Starting a thread for every request instead cost about 0.2 ms of CPU and 0.5 ms of wall
    time on this project's 2-core VM. At most ``keep`` idle threads are kept; more are let go. At most
    ``most`` are out at once: a request beyond them (a flood; each waits up to the pool's timeout for
    a connection) is answered 503 ``database_busy`` at once rather than given a thread of its own."""

    def __init__(self, keep: int = 64, most: int = 1024) -> None:
        self._idle: list[ThreadPoolExecutor] = []
        self._lock = threading.Lock()
        self._keep, self._most = keep, most
        self._out = 0

    def take(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._out >= self._most:
                raise ServiceUnavailable(
                    "the service is too busy to take this request now; nothing was stored. Retry after the "
                    "delay given.",
                    code="database_busy",
                    retry_after=1,
                )
            self._out += 1
            if self._idle:
                return self._idle.pop()
        return ThreadPoolExecutor(max_workers=1, thread_name_prefix="dermq-request")

    def give_back(self, lane: ThreadPoolExecutor) -> None:
        with self._lock:
            self._out -= 1
            if len(self._idle) < self._keep:
                self._idle.append(lane)
                return
        lane.shutdown(wait=False)

    def discard(self, lane: ThreadPoolExecutor) -> None:
        """A lane taken and not to be reused (its Session did not close): let it go."""
        with self._lock:
            self._out -= 1
        lane.shutdown(wait=False)

    def close(self) -> None:
        """Let every idle thread go (the app's shutdown)."""
        with self._lock:
            idle, self._idle = self._idle, []
        for lane in idle:
            lane.shutdown(wait=False)


class RequestDb:
    """The request's Session and the one thread it is used on (taken from ``lanes`` on first use).
    ``committed(session)`` runs on that thread after each commit of the Session that succeeded."""

    def __init__(
        self, sessions: sessionmaker[Session], lanes: Lanes, committed: Callable[[Session], None] | None = None
    ) -> None:
        self._sessions = sessions
        self._lanes = lanes
        self._committed = committed
        self._session: Session | None = None
        self._thread: ThreadPoolExecutor | None = None

    async def run(self, work: Callable[[Session], T], *, last: bool = False) -> T:
        """``work(session)`` on the request's thread, in the request's transaction.

        ``last``: the request's last database work. The commit (or, if ``work`` raised, the rollback)
        and the Session's close follow it on the thread in the same hop, and the thread goes back: the
        request's end then has nothing left to send there: one hand-off between threads less, which
        made idle reads 0.4-0.8 ms faster (docs/PERFORMANCE.md). ``work``'s result, or the commit's
        error, comes back only after the commit."""
        if self._thread is None:
            self._thread = self._lanes.take()
        if not last:
            return await self._on_thread(self._thread, work)
        outcome: list[T] = []
        await self._close_on_thread(lambda session: self._work_and_commit(session, work, outcome))
        return outcome[0]

    async def commit(self) -> None:
        """Commit the work so far now (its enqueued tasks are sent); the Session stays for more."""
        if self._session is not None:
            await self.run(self._commit)

    async def release(self) -> None:
        """Commit the work so far, close the Session and give the thread back, in one hop: for a
        request about to wait without the database (a long poll), which then holds no thread, Session
        or connection. A later :meth:`run` takes a thread and starts a Session again."""
        await self.finish(commit=True)

    async def _on_thread(self, thread: ThreadPoolExecutor, work: Callable[[Session], T]) -> T:
        """``work(session)`` on ``thread``, in a copy of the caller's context (its log fields)."""
        call = functools.partial(contextvars.copy_context().run, self._call, work)
        return await asyncio.get_running_loop().run_in_executor(thread, call)

    def _call(self, work: Callable[[Session], T]) -> T:
        if self._session is None:
            self._session = self._sessions()
        return work(self._session)

    async def finish(self, *, commit: bool) -> None:
        """Commit (or roll back) and close the Session on its thread, then give the thread back. Runs
        to the end even if the request is cancelled meanwhile (the connection must go back to the
        pool); the thread goes back only once the Session is closed, so it has nothing left to run.
        Nothing to do when the last :meth:`run` has done it already."""
        if self._thread is None:
            return
        if self._session is None:  # nothing ran there
            self._lanes.give_back(self._thread)
            self._thread = None
            return
        await self._close_on_thread(self._commit_and_close if commit else _rollback_and_close)

    async def _close_on_thread(self, end: Callable[[Session], BaseException | None]) -> None:
        """``end(session)`` (which closes the Session and returns the error to raise, if any) on the
        request's thread, shielded from cancellation; then the thread goes back."""
        thread = self._thread
        assert thread is not None
        with anyio.CancelScope(shield=True):
            error: BaseException | None = None
            try:  # one hop to the thread for the work, the commit and the close
                error = await self._on_thread(thread, end)
            except BaseException:
                self._lanes.discard(thread)  # a thread whose Session did not close is not reused
                self._thread = None
                raise
            self._thread, self._session = None, None
            self._lanes.give_back(thread)
            if error is not None:
                raise error

    def _commit(self, session: Session) -> None:
        session.commit()
        if self._committed is not None:
            self._committed(session)

    def _commit_and_close(self, session: Session) -> BaseException | None:
        """Commit, then close the Session whatever the commit did; returns the commit's error, if any
        (a failed close raises: that thread is not reused)."""
        return _end(session, lambda: self._commit(session))

    def _work_and_commit(
        self, session: Session, work: Callable[[Session], T], outcome: list[T]
    ) -> BaseException | None:
        """``work``, then the commit, then the close; or the rollback and the close if ``work`` raised."""
        try:
            outcome.append(work(session))
        except BaseException as exc:
            _rollback_and_close(session)  # the work's error is the one to raise
            return exc
        return self._commit_and_close(session)


def _rollback_and_close(session: Session) -> BaseException | None:
    return _end(session, session.rollback)


def _end(session: Session, finish: Callable[[], None]) -> BaseException | None:
    error: BaseException | None = None
    try:
        finish()
    except BaseException as exc:
        error = exc
    session.close()
    return error


async def iterate_on_one_thread(produce: Callable[[], Generator[bytes]]) -> AsyncIterator[bytes]:
    """The chunks of the sync generator ``produce()``, every step of it (and its end) run on one
    thread of its own: for a streamed response whose generator holds its own Session."""
    thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dermq-stream")
    loop = asyncio.get_running_loop()
    context = contextvars.copy_context()

    def step(chunks: Generator[bytes]) -> bytes | None:
        return context.run(next, chunks, None)

    try:
        chunks = await loop.run_in_executor(thread, context.run, produce)
        try:
            while (chunk := await loop.run_in_executor(thread, step, chunks)) is not None:
                yield chunk
        finally:
            with anyio.CancelScope(shield=True):
                await loop.run_in_executor(thread, context.run, chunks.close)
    finally:
        thread.shutdown(wait=False)
