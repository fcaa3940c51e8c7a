"""api.intake_limits.Decoder: the intake's database work runs while the upload's pixels decode, and
the request learns of a bad image first, whatever that work did.

No database here: ``alongside`` stands for the request's database work (``db.run(store)``), which
tests/api/test_cases.py drives end to end (a damaged camera image leaves nothing behind).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from api import intake_limits
from api.intake_limits import Decoder
from bench.common import camera_jpegs
from ml.images import DEFAULT_LIMITS, InvalidImage

SIDE = 512


@pytest.fixture(scope="module")
def camera() -> bytes:
    """A 12-megapixel camera JPEG: its decode lasts tens of milliseconds."""
    return camera_jpegs(1)[0]


def decode(decoder: Decoder, data: bytes, alongside: Callable[[], Awaitable[Any]]) -> Any:
    async def run() -> Any:
        return await decoder.decode_upload(data, DEFAULT_LIMITS, working_side=SIDE, alongside=alongside)

    return asyncio.run(run())


def test_the_work_runs_while_the_pixels_decode(camera: bytes) -> None:
    decoder = Decoder(256 * 2**20)

    async def alongside() -> bool:
        for _ in range(2000):  # the decode holds its reservation while it decodes the pixels
            if decoder.budget.in_use:
                return True
            await asyncio.sleep(0.001)
        return False

    decoded, copy, overlapped = decode(decoder, camera, alongside)
    assert overlapped, "the work ran only after the decode"
    assert decoded.format == "JPEG" and (decoded.width, decoded.height) == (4000, 3000) and copy is not None
    assert decoder.budget.in_use == 0
    decoder.close()


def test_a_bad_image_is_the_answer_whatever_the_work_did(camera: bytes) -> None:
    """The decode's refusal comes first: the client must hear that its image is damaged, not that
    the database failed; and the caller's transaction rolls back what the work wrote."""
    decoder = Decoder(256 * 2**20)

    async def failing() -> None:
        raise RuntimeError("the database went away")

    with pytest.raises(InvalidImage) as refused:
        decode(decoder, camera[: len(camera) * 9 // 10], failing)
    assert refused.value.code == "truncated"
    decoder.close()


def test_a_failed_work_is_raised_once_the_decode_has_ended(camera: bytes) -> None:
    """Nothing of the upload stays in flight behind the answer: its decoded pixels are released."""
    decoder = Decoder(256 * 2**20)

    async def failing() -> None:
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
            decoder.decode_upload(camera, DEFAULT_LIMITS, working_side=SIDE, alongside=lambda: work("a")),
            decoder.decode_upload(second, DEFAULT_LIMITS, working_side=SIDE, alongside=lambda: work("b")),
        )

    asyncio.run(both())
    assert events.index("work b") > events.index("decode b begins") > events.index("decode a ends"), events
    decoder.close()


def test_a_small_image_decoded_before_the_work_began_still_gets_its_work(jpeg_bytes: bytes) -> None:
    decoder = Decoder(256 * 2**20)

    async def alongside() -> str:
        return "stored"

    for _ in range(20):  # a 300x225 JPEG often decodes before the event loop gets back to the request
        decoded, copy, stored = decode(decoder, jpeg_bytes, alongside)
        assert (decoded.width, decoded.height, copy, stored) == (300, 225, None, "stored")
    decoder.close()
