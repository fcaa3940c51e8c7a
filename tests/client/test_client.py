"""The blocking client against the real stack: the live API process, Postgres, Redis and a Celery worker."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import httpx
import pytest
from dermq_client import (
    Case,
    Client,
    Conflict,
    Diagnosis,
    Gone,
    InvalidInput,
    NotFound,
    RetryPolicy,
    Unauthorized,
    UnsupportedMediaType,
    WaitTimeout,
)

from tests.conftest import Tenant

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_diagnosis(case: Case) -> Diagnosis:
    assert case.status == "succeeded", case
    assert isinstance(case.result, Diagnosis), case.result
    result = case.result
    assert result.label in result.probabilities and result.label_name
    assert len(result.probabilities) == 7
    assert sum(result.probabilities.values()) == pytest.approx(1.0, abs=1e-3)
    assert 0 <= result.uncertainty <= 1 and result.confidence == pytest.approx(result.probabilities[result.label])
    assert isinstance(result.referral, bool)
    return result


def test_submit_then_wait_gives_a_diagnosis(dermq: Client, worker, fixture_images: dict[str, Path]) -> None:  # type: ignore[no-untyped-def]
    image = next(iter(fixture_images.values()))
    case = dermq.submit(image, client_ref="MRN-0042", priority="urgent")
    assert case.status in ("queued", "running", "succeeded") and not case.replayed
    assert case.client_ref == "MRN-0042" and case.priority == "urgent"
    assert case.image is not None and case.image.format == "JPEG"

    finished = dermq.wait(case.id, timeout=60)
    assert finished.id == case.id and finished.attempts >= 1 and finished.finished_at is not None
    assert_diagnosis(finished)
    assert dermq.get(case.id).result == finished.result


def test_submit_with_wait_returns_the_finished_case(dermq: Client, worker, jpeg_bytes: bytes) -> None:  # type: ignore[no-untyped-def]
    case = dermq.submit(jpeg_bytes, wait=20)
    assert case.terminal
    assert_diagnosis(case)
    assert case.links["heatmap"] == f"/v1/cases/{case.id}/heatmap.png"


def test_the_same_idempotency_key_gives_the_same_case(dermq: Client, worker, jpeg_bytes: bytes) -> None:  # type: ignore[no-untyped-def]
    key = f"visit-{uuid.uuid4()}"
    first = dermq.submit(jpeg_bytes, idempotency_key=key)
    again = dermq.submit(jpeg_bytes, idempotency_key=key)
    assert again.id == first.id and again.replayed and not first.replayed
    assert [c.id for c in dermq.iter_cases()] == [first.id]

    with pytest.raises(Conflict) as reused:  # the same key for another image is refused, not retried
        dermq.submit(jpeg_bytes + b"\0", idempotency_key=key)
    assert reused.value.code == "idempotency_key_reused" and reused.value.status == 409


class LoseFirstAnswer(httpx.BaseTransport):
    """A real HTTP transport whose first answer is lost after the server has handled the request."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.keys: list[str | None] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        self.keys.append(request.headers.get("Idempotency-Key"))
        if len(self.keys) == 1:
            response.read()
            response.close()
            raise httpx.ReadError("connection reset before the answer arrived", request=request)
        return response

    def close(self) -> None:
        self.inner.close()


def test_a_lost_answer_is_retried_with_the_generated_key(live_api: str, tenant: Tenant, worker, jpeg_bytes) -> None:  # type: ignore[no-untyped-def]
    transport = LoseFirstAnswer()
    with Client(live_api, tenant.token, transport=transport, retry=RetryPolicy(backoff=0.05)) as dermq:
        case = dermq.submit(jpeg_bytes)
        assert case.replayed  # the server had stored it: the retry got that case back, not a second one
        assert len(transport.keys) == 2 and transport.keys[0] == transport.keys[1]
        uuid.UUID(str(transport.keys[0]))
        assert [c.id for c in dermq.iter_cases()] == [case.id]


def test_an_unknown_case_raises_not_found(dermq: Client) -> None:
    with pytest.raises(NotFound) as missing:
        dermq.get(uuid.uuid4())
    assert missing.value.status == 404 and missing.value.code == "case_not_found"
    assert missing.value.request_id and missing.value.request_id in str(missing.value)
    with pytest.raises(NotFound):
        dermq.wait(uuid.uuid4(), timeout=5)


def test_a_bad_key_and_a_bad_image_raise_typed_errors(live_api: str, dermq: Client, jpeg_bytes: bytes) -> None:
    with Client(live_api, "dq_000000000000_" + "x" * 40) as stranger, pytest.raises(Unauthorized) as denied:
        stranger.get(uuid.uuid4())
    assert denied.value.status == 401 and denied.value.code
    started = time.monotonic()
    with pytest.raises(InvalidInput) as invalid:
        dermq.submit(jpeg_bytes[: len(jpeg_bytes) // 2])
    assert invalid.value.status == 422 and invalid.value.code == "truncated" and invalid.value.detail
    with pytest.raises(UnsupportedMediaType) as unsupported:
        dermq.submit(b"this is not an image")
    assert unsupported.value.status == 415 and unsupported.value.code == "unsupported_format"
    assert time.monotonic() - started < 5  # a 4xx is not retried


def test_heatmap_is_a_png(dermq: Client, worker, jpeg_bytes: bytes) -> None:  # type: ignore[no-untyped-def]
    case = dermq.submit(jpeg_bytes, wait=20)
    assert_diagnosis(case)
    png = dermq.heatmap(case.id)
    assert png.startswith(PNG_MAGIC) and len(png) > 1000


def test_iter_cases_follows_the_cursor(dermq: Client, jpeg_bytes: bytes) -> None:
    submitted = [dermq.submit(jpeg_bytes + bytes([n])).id for n in range(3)]  # three images, three cases
    listed = list(dermq.iter_cases(page_size=1))
    assert [c.id for c in listed] == submitted[::-1]  # newest first, across three pages
    assert all(c.priority == "routine" and c.created_at is not None for c in listed)


def test_erase_purges_the_images_and_the_result(dermq: Client, worker, jpeg_bytes: bytes) -> None:  # type: ignore[no-untyped-def]
    case = dermq.submit(jpeg_bytes, client_ref="MRN-7", wait=20)
    assert_diagnosis(case)
    erased = dermq.erase(case.id)
    assert erased.id == case.id and erased.status == "purged" and erased.client_ref is None
    assert case.result is not None and erased.result is None  # the findings are shredded with the images
    with pytest.raises(Gone) as gone:
        dermq.heatmap(case.id)
    assert gone.value.code == "case_purged"
    assert dermq.erase(case.id).status == "purged"  # repeating changes nothing


def test_wait_gives_up_after_its_timeout(dermq: Client, tenant: Tenant, store_case) -> None:  # type: ignore[no-untyped-def]
    case_id = store_case(tenant, b"never published")  # stays queued: nothing sends it to a worker
    started = time.monotonic()
    with pytest.raises(WaitTimeout) as timed_out:
        dermq.wait(case_id, timeout=1.5)
    assert 1.4 <= time.monotonic() - started < 6
    assert isinstance(timed_out.value, TimeoutError)
    assert timed_out.value.case is not None and timed_out.value.case.status == "queued"


def test_a_confirmed_outcome_is_reported_and_corrected(dermq: Client, worker, jpeg_bytes: bytes) -> None:  # type: ignore[no-untyped-def]
    case = dermq.submit(jpeg_bytes, wait=30)
    if not case.terminal:
        case = dermq.wait(case.id, timeout=60)
    first = dermq.report_outcome(case.id, "nv", "follow_up")
    corrected = dermq.report_outcome(case.id, "mel", "histo")
    assert (first["diagnosis"], first["revision"]) == ("nv", 1)
    assert (corrected["diagnosis"], corrected["method"], corrected["revision"]) == ("mel", "histo", 2)
