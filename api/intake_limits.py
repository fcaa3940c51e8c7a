"""Bounds on the intake's memory: uploads in flight per clinic, and the decoding they share.

Rate limits (``core.ratelimit``) bound how many uploads a key starts per minute; they do not bound
how many are in flight at once, and each in-flight upload holds its body (up to the byte cap) and,
while it is validated, its decoded pixels. :class:`UploadSlots` caps the uploads one clinic has in
flight in this process, and the body bytes all uploads in flight hold in it. :class:`Decoder`
validates uploads on a small pool of its own threads under a
:class:`ml.decode_budget.DecodeBudget` that caps the decoded bytes held at once: few threads, so
that the allocator's per-thread arenas do not each keep a freed canvas (with the 40 threads of the
default pool, 16 concurrent 20-megapixel PNGs left the process 1.3 GiB larger), and
:func:`release_large_allocations` makes the C allocator hand freed canvases back to the system
instead of keeping them in its heaps. Overflows answer 429 with ``Retry-After``; an image that could
never fit answers 413.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import threading
import uuid
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from typing import Any, TypeVar

from core.errors import InvalidImageError, RateLimited, ServiceUnavailable
from ml import working_copy
from ml.decode_budget import DecodeBudget, DecodeBusy, TooLargeToDecode
from ml.images import DecodedImage, ImageHeader, ImageLimits

log = logging.getLogger("dermq.api")

T = TypeVar("T")


class BodyAllowance:
    """The body bytes one upload holds against its process's :class:`UploadSlots` budget."""

    def __init__(self, slots: UploadSlots) -> None:
        self._slots = slots
        self.held = 0

    def reserve(self, size: int) -> None:
        """Hold ``size`` more bytes, arrived; 429 when the uploads in flight in this process already
        hold so much that they would pass the budget (nothing more is held then)."""
        self._slots._take(size)
        self.held += size


class UploadSlots:
    """At most ``per_clinic`` uploads of one clinic in flight in this process, and at most
    ``body_bytes`` of their bodies held in memory at once, whichever clinics send them (the per-clinic
    cap alone let ten clinics' slow 25 MiB uploads hold a gigabyte).

    A body counts what has arrived of it, not what it declares: an upload that declared 25 MiB and
    sends slowly holds what it sent, so a few clinics' idle connections cannot shut every other
    clinic's large uploads out. A declared length that does not fit beside what is held now is
    refused before the body is read and before the key's rate is charged (:meth:`hold`)."""

    def __init__(self, per_clinic: int, body_bytes: int) -> None:
        self.per_clinic = per_clinic
        self.body_bytes = body_bytes
        self._lock = threading.Lock()
        self._in_flight: dict[uuid.UUID | None, int] = {}
        self._body_held = 0

    def body_held(self) -> int:
        with self._lock:
            return self._body_held

    def _take(self, size: int) -> None:
        with self._lock:
            self._fits(size)
            self._body_held += size

    def _fits(self, size: int) -> None:
        if self._body_held + size > self.body_bytes:
            raise RateLimited(
                "the service is receiving many large uploads at once; send this one again shortly", retry_after=2
            )

    def _give_back(self, size: int) -> None:
        with self._lock:
            self._body_held -= size

    def _refused(self, held: int) -> None:
        if held >= self.per_clinic:
            raise RateLimited(
                f"this clinic already has {held} uploads in progress; wait for one to finish", retry_after=1
            )

    @contextmanager
    def hold(self, clinic_id: uuid.UUID | None, declared: int | None = None) -> Iterator[BodyAllowance]:
        """One of the clinic's slots, and an allowance its body's bytes are reserved from, both given
        back when the upload's request is done with its body. 429 when the clinic's slots are all
        taken, or when a body of ``declared`` bytes would not fit beside the bodies held now (its bytes
        are counted as they arrive): taken before the key's submission rate is charged, with no wait
        between, so a portal queueing behind its uploads does not spend it on refusals."""
        with self._lock:
            held = self._in_flight.get(clinic_id, 0)
            self._refused(held)
            if declared is not None and 0 <= declared <= self.body_bytes:  # larger: the intake's 413
                self._fits(declared)
            self._in_flight[clinic_id] = held + 1
        allowance = BodyAllowance(self)
        try:
            yield allowance
        finally:
            self._give_back(allowance.held)
            with self._lock:
                left = self._in_flight[clinic_id] - 1
                if left:
                    self._in_flight[clinic_id] = left
                else:
                    del self._in_flight[clinic_id]


@contextmanager
def decode_errors() -> Iterator[None]:
    """Turn the decode budget's refusals into problem answers (429 busy, 413 too large), and memory
    this process could not allocate into 503 (not the image's fault: it may well decode on a retry)."""
    try:
        yield
    except MemoryError:
        log.error("out of memory decoding an upload", extra={"event": "decode_out_of_memory"})
        raise ServiceUnavailable(
            "the service ran out of memory decoding this image; nothing was stored. Retry after the delay given.",
            code="out_of_memory",
        ) from None
    except DecodeBusy as exc:
        raise RateLimited(
            "the service is decoding other large images; retry shortly", retry_after=exc.retry_after
        ) from None
    except TooLargeToDecode as exc:
        raise InvalidImageError(
            "too_large_to_decode",
            f"decoding this image would need about {exc.needed / 2**20:.0f} MiB of memory; the limit is "
            f"{exc.capacity / 2**20:.0f} MiB: send a smaller or JPEG-compressed image",
        ) from None


class Decoder:
    """Decodes uploads on ``threads`` threads of its own under a budget of ``budget_bytes``."""

    def __init__(self, budget_bytes: int, threads: int = 2) -> None:
        self.budget = DecodeBudget(budget_bytes)
        self.threads = threads
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="dermq-decode")
            return self._pool

    async def decode_upload(
        self,
        data: bytes,
        limits: ImageLimits,
        *,
        working_side: int,
        alongside: Callable[[ImageHeader], Awaitable[T]],
    ) -> tuple[DecodedImage, bytes | None, T]:
        """An upload decoded once, at the size the worker needs (at most ``working_side`` on the longer
        side, draft mode for a JPEG), its working copy when it is large enough to want one
        (:mod:`ml.working_copy`: the worker then reads that instead of decoding the upload again), and
        what ``alongside(header)`` returned.

        ``alongside`` is the request's database work, given what the upload's header declares. For a
        camera JPEG (:func:`ml.working_copy.drafted`) it runs while the pixels decode: each is about
        half of such an intake, and they use different cores. It starts only once the header has
        passed its checks and the decode's memory is reserved, so neither an upload that waits for a
        decoder thread nor one refused before its pixels (413, 429, most 422s) holds a database
        connection or writes anything. Smaller or other uploads decode first, as overlapping would
        save them little and hold their transaction open for the decode. Both have ended when this
        returns or raises; the decode's error comes first (``InvalidImage``, or a problem: 429, 413):
        bad input is answered as such, whatever ``alongside`` did, and the caller's transaction rolls
        that back. Then ``alongside``'s."""
        loop = asyncio.get_running_loop()
        declared: asyncio.Future[ImageHeader] = loop.create_future()

        def on_header(header: ImageHeader) -> None:  # on the decoder's thread
            with suppress(RuntimeError):  # the loop has closed (shutdown): nobody waits for it
                loop.call_soon_threadsafe(_settle, declared, header)

        turn = _Turn()

        def job() -> tuple[DecodedImage, bytes | None]:
            if not turn.take():
                raise DecodeBusy(self.budget.retry_after)  # given up on just now: nobody waits for it
            return working_copy.decode_upload(data, limits, fit=working_side, budget=self.budget, on_header=on_header)

        decoding = loop.run_in_executor(self._executor(), job)
        decoding.add_done_callback(_retrieve)  # a request cancelled meanwhile must not leave it unheard
        # An upload waits for a decoder thread as long as for the decode budget, then is answered 429:
        # uploads slow to decode (a lossless canvas, a progressive JPEG's scans) would otherwise queue
        # every other clinic's behind them for as long as they take
        deadline = loop.call_later(self.budget.wait_seconds, turn.give_up, decoding)
        try:
            await asyncio.wait((decoding, declared), return_when=asyncio.FIRST_COMPLETED)
        finally:
            declared.cancel()  # no-op once it holds the header
            deadline.cancel()
            turn.give_up(decoding)  # a no-op once a thread took it; else (the request cancelled) it never runs
        outcome: list[T] = []
        error: Exception | None = None
        overlap = declared.done() and not declared.cancelled() and not decoding.done()
        if overlap and working_copy.drafted(declared.result(), working_side):
            try:
                outcome.append(await alongside(declared.result()))
            except Exception as exc:
                error = exc
        with decode_errors():
            try:
                decoded, copy = await decoding
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # the request itself was cancelled
                # given up on for want of a thread, or the threads were stopped (shutdown): retry
                raise DecodeBusy(self.budget.retry_after) from None
        if error is not None:
            raise error
        if not outcome:
            outcome.append(await alongside(decoded.header))
        return decoded, copy, outcome[0]

    def close(self) -> None:
        """Stop the threads (the app's shutdown); a later decode starts new ones."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


class _Turn:
    """One upload's turn on a decoder thread, which either the thread takes or the request gives up,
    never both: a decode given up on never starts, and one started is waited for."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.taken = self.given_up = False

    def take(self) -> bool:
        """On the decoder thread: whether the decode may start."""
        with self._lock:
            self.taken = not self.given_up
            return self.taken

    def give_up(self, decoding: asyncio.Future[Any]) -> None:
        """On the event loop, when the wait for a thread is over: cancel the decode unless it started."""
        with self._lock:
            if self.taken:
                return
            self.given_up = True
        decoding.cancel()


def _settle(future: asyncio.Future[ImageHeader], header: ImageHeader) -> None:
    if not future.done():
        future.set_result(header)


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Mark a finished future's error as heard (asyncio logs unheard ones)."""
    if not future.cancelled():
        future.exception()


#: glibc's mallopt parameter for the size from which allocations are mmapped (and unmapped on free).
_M_MMAP_THRESHOLD = -3


def release_large_allocations(threshold: int = 1024 * 1024) -> bool:
    """Serve allocations of ``threshold`` bytes or more with mmap, so freeing returns them to the system.

    glibc raises this threshold dynamically (up to 32 MiB) after the first large free, after which
    decoded canvases come from the heap and stay in the process once freed. Fixing it keeps resident
    memory near what the decode budget allows. Returns False where the C library is not glibc.
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, threshold))
