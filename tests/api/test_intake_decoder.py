"""api.intake_limits.Decoder: a camera image's database work runs while its pixels decode; nothing
is written for an upload refused before its pixels; and the request learns of a bad image first,
whatever that work did.

No database here: ``alongside`` stands for the request's database work (``db.run(store)``), which
tests/worker/test_working_copy.py drives end to end (a damaged camera image leaves nothing behind).
"""

from __future__ import annotations

import asyncio
import io
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pytest
from PIL import Image

from api import intake_limits
from api.intake_limits import Decoder
from bench.common import camera_jpegs
from core.errors import InvalidImageError, RateLimited, ServiceUnavailable
from ml import images
from ml.images import DEFAULT_LIMITS, ImageHeader, InvalidImage

SIDE = 512


async def until(condition: Callable[[], object], what: str, timeout: float = 10) -> None:
    """Let the event loop run (the uploads' tasks, the decoder's threads) until ``condition()`` holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.005)


@pytest.fixture(scope="module")
def camera() -> bytes:
    """A 12-megapixel camera JPEG: its decode lasts tens of milliseconds."""
    return camera_jpegs(1)[0]


def decode(decoder: Decoder, data: bytes, alongside: Callable[[ImageHeader], Awaitable[Any]]) -> Any:
    async def run() -> Any:
        return await decoder.decode_upload(data, DEFAULT_LIMITS, working_side=SIDE, alongside=alongside)

    return asyncio.run(run())


def test_a_camera_images_work_runs_while_its_pixels_decode(camera: bytes) -> None:
    decoder = Decoder(256 * 2**20)

    async def alongside(header: ImageHeader) -> tuple[ImageHeader, bool]:
        return header, decoder.budget.in_use > 0  # the decode holds its reservation until it ends

    decoded, copy, (header, overlapped) = decode(decoder, camera, alongside)
    assert overlapped, "the work ran only after the decode"
    assert header == decoded.header == ImageHeader("JPEG", 4000, 3000) and copy is not None
    assert decoder.budget.in_use == 0
    decoder.close()


def test_other_uploads_decode_before_their_work(jpeg_bytes: bytes) -> None:
    """A lossless upload may take seconds to decode: its transaction is not held open meanwhile."""
    out = io.BytesIO()
    Image.open(io.BytesIO(jpeg_bytes)).resize((2400, 1800)).save(out, "PNG")
    decoder = Decoder(256 * 2**20)

    async def alongside(header: ImageHeader) -> bool:
        return decoder.budget.in_use == 0

    for data in (jpeg_bytes, out.getvalue()):
        decoded, _, after = decode(decoder, data, alongside)
        assert after, f"the work of a {decoded.format} upload began before its decode had ended"
    decoder.close()


def test_an_upload_refused_before_its_pixels_starts_no_work(camera: bytes, jpeg_bytes: bytes) -> None:
    decoder = Decoder(2**20)  # a camera image can never fit: 413
    began: list[ImageHeader] = []

    async def alongside(header: ImageHeader) -> None:
        began.append(header)

    with pytest.raises(InvalidImageError) as too_large:
        decode(decoder, camera, alongside)
    assert too_large.value.code == "too_large_to_decode"
    with pytest.raises(InvalidImage):
        decode(decoder, b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4, alongside)
    assert began == []
    decoder.close()


def test_a_bad_image_is_the_answer_whatever_the_work_did(camera: bytes) -> None:
    """The decode's refusal comes first: the client must hear that its image is damaged, not that
    the database failed; and the caller's transaction rolls back what the work wrote."""
    decoder = Decoder(256 * 2**20)
    began: list[ImageHeader] = []

    async def failing(header: ImageHeader) -> None:
        began.append(header)
        raise RuntimeError("the database went away")

    with pytest.raises(InvalidImage) as refused:
        decode(decoder, camera[: len(camera) * 9 // 10], failing)
    assert refused.value.code == "truncated" and began == [ImageHeader("JPEG", 4000, 3000)]
    decoder.close()


def test_a_failed_work_is_raised_once_the_decode_has_ended(camera: bytes) -> None:
    """Nothing of the upload stays in flight behind the answer: its decoded pixels are released."""
    decoder = Decoder(256 * 2**20)

    async def failing(header: ImageHeader) -> None:
        raise RuntimeError("the database went away")

    with pytest.raises(RuntimeError, match="went away"):
        decode(decoder, camera, failing)
    assert decoder.budget.in_use == 0
    decoder.close()


def test_an_upload_waiting_for_a_decoder_starts_no_database_work(
    camera: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With one decoder thread busy, the second upload's work (which holds a database connection)
    begins only once its own decode has begun, after the first one's."""
    events: list[str] = []
    real = intake_limits.working_copy.decode_upload

    def recorded(data: bytes, *args: Any, **kwargs: Any) -> Any:
        name = "a" if data is camera else "b"
        events.append(f"decode {name} begins")
        try:
            return real(data, *args, **kwargs)
        finally:
            events.append(f"decode {name} ends")

    monkeypatch.setattr(intake_limits.working_copy, "decode_upload", recorded)
    decoder = Decoder(256 * 2**20, threads=1)
    second = bytes(bytearray(camera))  # equal bytes, another object

    async def both() -> None:
        async def work(name: str) -> None:
            events.append(f"work {name}")

        await asyncio.gather(
            decoder.decode_upload(camera, DEFAULT_LIMITS, working_side=SIDE, alongside=lambda _: work("a")),
            decoder.decode_upload(second, DEFAULT_LIMITS, working_side=SIDE, alongside=lambda _: work("b")),
        )

    asyncio.run(both())
    assert events.index("work b") > events.index("decode b begins") > events.index("decode a ends"), events
    decoder.close()


def test_memory_this_process_lacks_is_a_503_to_retry_not_a_bad_image(
    camera: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Out of memory in the middle of a decode, the upload is answered 503 with a delay to retry
    after (the caller's transaction rolls back whatever its work wrote), not 422 for a damaged image."""

    def no_memory(*args: object) -> None:
        raise MemoryError

    monkeypatch.setattr(images, "_load_rgb", no_memory)
    decoder = Decoder(256 * 2**20)

    async def work(header: ImageHeader) -> None:
        pass

    with pytest.raises(ServiceUnavailable) as refused:
        decode(decoder, camera, work)
    assert (refused.value.status, refused.value.code) == (503, "out_of_memory")
    assert refused.value.headers["Retry-After"] and decoder.budget.in_use == 0
    decoder.close()


def test_an_upload_that_waits_too_long_for_a_decoder_thread_is_answered_429(
    jpeg_bytes: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Uploads slow to decode held every thread, and the others queued behind them without a limit:
    an upload now waits for a thread as long as for the decode budget, then is told to retry."""
    release = threading.Event()
    blocker = bytes(bytearray(jpeg_bytes))  # equal bytes, another object
    real = intake_limits.working_copy.decode_upload

    holding = threading.Event()

    def slow_for_the_blocker(data: bytes, *args: Any, **kwargs: Any) -> Any:
        if data is blocker:
            holding.set()
            release.wait(30)
        return real(data, *args, **kwargs)

    monkeypatch.setattr(intake_limits.working_copy, "decode_upload", slow_for_the_blocker)
    decoder = Decoder(256 * 2**20, threads=1)
    decoder.budget.wait_seconds = 0.3
    worked: list[str] = []

    async def work(header: ImageHeader) -> None:
        worked.append(header.format)

    async def both() -> Any:
        first = asyncio.ensure_future(decoder.decode_upload(blocker, DEFAULT_LIMITS, working_side=SIDE, alongside=work))
        await until(holding.is_set, "the blocker to hold the only thread")
        started = time.monotonic()
        with pytest.raises(RateLimited) as refused:
            await decoder.decode_upload(jpeg_bytes, DEFAULT_LIMITS, working_side=SIDE, alongside=work)
        waited = time.monotonic() - started
        release.set()
        return await first, waited, refused.value

    (decoded, _, _), waited, refused = asyncio.run(both())
    assert 0.25 < waited < 5 and refused.status == 429 and refused.retry_after >= 1
    assert decoded.header.format == "JPEG" and worked == ["JPEG"]  # the refused upload's work never ran
    assert decode(decoder, jpeg_bytes, work)[0].header.format == "JPEG"  # the thread is free again
    decoder.close()


def test_an_upload_cancelled_or_stopped_while_it_waits_for_a_thread_is_never_decoded(
    jpeg_bytes: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request cancelled while its upload waited for a thread left the decode queued, to run for
    nobody; and the threads stopped under a waiting upload (the app's shutdown) answered it 500. Now
    the first never runs and the second is told to retry (429). (Found by a review.)"""
    release = threading.Event()
    blockers = [bytes(bytearray(jpeg_bytes)) for _ in range(2)]  # equal bytes, other objects
    real = intake_limits.working_copy.decode_upload
    ran: list[str] = []

    def slow_for_the_blocker(data: bytes, *args: Any, **kwargs: Any) -> Any:
        blocking = any(data is blocker for blocker in blockers)
        ran.append("blocker" if blocking else "other")
        if blocking:
            release.wait(30)
        return real(data, *args, **kwargs)

    monkeypatch.setattr(intake_limits.working_copy, "decode_upload", slow_for_the_blocker)
    handed: list[object] = []  # the decodes handed to the decoder's threads: running, or queued for one

    class CountedPool(ThreadPoolExecutor):
        def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
            handed.append(fn)
            return super().submit(fn, *args, **kwargs)

    monkeypatch.setattr(intake_limits, "ThreadPoolExecutor", CountedPool)
    decoder = Decoder(256 * 2**20, threads=1)
    decoder.budget.wait_seconds = 60  # no upload gives up waiting for the thread on its own meanwhile

    async def nothing(header: ImageHeader) -> None:
        return None

    def upload(data: bytes) -> asyncio.Future[Any]:
        return asyncio.ensure_future(decoder.decode_upload(data, DEFAULT_LIMITS, working_side=SIDE, alongside=nothing))

    async def holding_the_thread(blocker: bytes) -> asyncio.Future[Any]:
        """An upload of ``blocker``, decoding on the only thread until ``release`` is set."""
        release.clear()
        held = ran.count("blocker") + 1
        future = upload(blocker)
        await until(lambda: ran.count("blocker") == held, "the blocker to hold the only thread")
        return future

    async def waiting_for_the_thread(data: bytes) -> asyncio.Future[Any]:
        queued = len(handed) + 1
        future = upload(data)
        await until(lambda: len(handed) == queued, "the upload to wait for the thread")
        return future

    async def scenario() -> tuple[list[str], BaseException | None]:
        first = await holding_the_thread(blockers[0])
        cancelled = await waiting_for_the_thread(jpeg_bytes)
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        release.set()
        await first
        await upload(jpeg_bytes)  # decoded on the only thread after the cancelled upload's turn there
        after_cancelling = list(ran)

        second = await holding_the_thread(blockers[1])
        stopped = await waiting_for_the_thread(jpeg_bytes)
        decoder.close()  # the app's shutdown: the queued decode is dropped
        try:
            await asyncio.wait_for(stopped, 10)  # answered at once, not when the thread is free
        except BaseException as exc:  # what the request would answer is the point
            outcome: BaseException | None = exc
        else:
            outcome = None
        release.set()
        await second
        return after_cancelling, outcome

    after_cancelling, outcome = asyncio.run(scenario())
    assert after_cancelling == ["blocker", "other"]  # the cancelled upload never decoded, the next one did
    assert isinstance(outcome, RateLimited) and outcome.status == 429, repr(outcome)
    assert ran == ["blocker", "other", "blocker"]  # nor did the stopped one
