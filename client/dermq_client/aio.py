"""The asyncio client: the same methods as :class:`dermq_client.Client`, awaited."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import httpx

from dermq_client import _core, errors
from dermq_client.models import Case, CaseSummary


class AsyncClient:
    """A dermq API client for one API key, for asyncio. Use it as ``async with`` (or await :meth:`aclose`).

    Requests that fail on the network, with a 5xx, 429 or 408 are sent again as ``retry`` says,
    honouring ``Retry-After``; a submission is resent with the same ``Idempotency-Key``, so the
    server answers with the case it already stored rather than a second one.

    Each waiting call (``wait``, ``submit(wait=...)``) holds a connection for up to 30 s: ``limits``
    (``httpx.Limits``; default 100 connections) bounds how many calls run at once; past it, a call
    waits for a connection up to the timeout's pool part, and is retried like a network failure
    (``ConnectionFailed``, ``PoolTimeout``) before it fails. An error from ``submit`` carries the
    ``idempotency_key`` it sent: submit again with it, and the server answers with the case it stored."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float | httpx.Timeout = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
        retry: _core.RetryPolicy | None = None,
        limits: httpx.Limits | None = None,
    ) -> None:
        self.retry = retry or _core.RetryPolicy()
        self._timeout = timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout)
        self._http = httpx.AsyncClient(
            base_url=_core.base_url(base_url),
            headers=_core.headers(api_key),
            timeout=self._timeout,
            transport=transport,
            limits=limits or _core.DEFAULT_LIMITS,
            follow_redirects=False,
        )

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # ------------------------------------------------------------------ transport

    async def _send(
        self, method: str, path: str, *, limit: int = _core.MAX_JSON_ANSWER, **kwargs: Any
    ) -> httpx.Response:
        """One request; its answer read up to ``limit`` bytes (:class:`dermq_client._core.Body`)."""
        try:
            async with self._http.stream(method, path, **kwargs) as response:
                body = _core.Body(response, limit)
                if not (body.over or body.whole):
                    async for chunk in response.aiter_raw():
                        if not body.add(chunk):
                            break
        except httpx.RequestError as exc:
            raise _core.request_failed(exc) from exc
        return _core.checked(body.response())

    async def _request(
        self, method: str, path: str, *, busy_until: float | None = None, **kwargs: Any
    ) -> httpx.Response:
        retry = 0
        while True:
            try:
                return await self._send(method, path, **kwargs)
            except errors.DermqError as exc:
                delay = self.retry.delay(retry, exc, busy_until=busy_until)
                if delay is None:
                    raise
            await asyncio.sleep(delay)
            retry += 1

    # ------------------------------------------------------------------ cases

    async def submit(
        self,
        image: _core.ImageInput,
        client_ref: str | None = None,
        priority: str = "routine",
        idempotency_key: str | None = None,
        wait: float | None = None,
    ) -> Case:
        """Submit one image (a path or its bytes) as a new case.

        Without ``idempotency_key`` a random one is made; every retry of this call sends the same
        one. With ``wait`` (seconds), the answer comes when the case has ended or ``wait`` has
        passed (server long polls): the case is returned as it is then, finished or not."""
        started = time.monotonic()
        key = _core.new_idempotency_key() if idempotency_key is None else idempotency_key
        request = _core.submit_request(
            await asyncio.to_thread(_core.load_image, image),
            client_ref=client_ref,
            priority=priority,
            idempotency_key=key,
            wait=wait,
        )
        timeout = _core.timeout_for(self._timeout, min(wait or 0, _core.MAX_SERVER_WAIT))
        try:
            busy_until = started + self.retry.busy_for
            answer = await self._request("POST", "/v1/cases", timeout=timeout, busy_until=busy_until, **request)
            case = _core.case_of(answer)
            remaining = (wait or 0) - (time.monotonic() - started)
            if case.terminal or remaining <= 0:
                return case
            try:
                return _core.followed(case, await self._follow(case.id, remaining, seen=case))
            except errors.WaitTimeout as exc:
                return _core.followed(case, exc.case)
        except errors.DermqError as exc:
            exc.idempotency_key = key  # to submit again with, after this call gave up
            raise

    async def get(self, case_id: str | uuid.UUID, *, wait: float | None = None) -> Case:
        """The case now; with ``wait`` (at most 30 s) as soon as it has ended, or after ``wait``."""
        params = {"wait": _core.wait_param(wait)} if wait else None
        timeout = _core.timeout_for(self._timeout, min(wait or 0, _core.MAX_SERVER_WAIT))
        answer = await self._request("GET", _core.case_path(case_id), params=params, timeout=timeout)
        return _core.case_of(answer)

    async def wait(self, case_id: str | uuid.UUID, timeout: float = 60.0) -> Case:
        """The case once it has ended (``succeeded``, ``failed`` or ``purged``), by long polls of up
        to 30 s each; :class:`~dermq_client.errors.WaitTimeout` after ``timeout`` seconds, or at most
        5 s more where the API does not answer a poll (its ``__cause__`` the last poll's error, when
        that poll got no answer). Until the first answer,
        failures are retried as ``retry`` says and then raised; after it, until ``timeout``."""
        return await self._follow(case_id, timeout, seen=None)

    async def _follow(self, case_id: str | uuid.UUID, timeout: float, *, seen: Case | None) -> Case:
        """:meth:`wait`, having ``seen`` the case already (a submission's answer: then it exists, and a
        failure is waited out until ``timeout`` from the first)."""
        deadline = time.monotonic() + timeout
        last: Case | None = seen
        failure: errors.DermqError | None = None  # the last poll's, when it got no answer
        retry = 0
        while (remaining := deadline - time.monotonic()) > 0:
            poll = min(_core.MAX_SERVER_WAIT, remaining)
            asked = time.monotonic()
            try:
                last = _core.case_of(
                    await self._send(
                        "GET",
                        _core.case_path(case_id),
                        params={"wait": _core.wait_param(poll)},
                        timeout=_core.timeout_for(self._timeout, poll, within=remaining),
                    )
                )
            except errors.DermqError as exc:
                # before any answer, as any request: a wrong address or CA bundle is said, not waited out
                if not _core.retryable(exc) or (last is None and retry + 1 >= self.retry.attempts):
                    raise
                failure = exc
                pause = exc.retry_after if exc.retry_after is not None else self.retry.backoff_delay(retry)
                retry += 1
                await asyncio.sleep(max(0.0, min(pause, deadline - time.monotonic())))
                continue
            failure = None
            if last.terminal:
                return last
            if time.monotonic() - asked < poll / 2:  # answered early (the server's waiters are full)
                await asyncio.sleep(max(0.0, min(self.retry.backoff_delay(retry), deadline - time.monotonic())))
                retry += 1
            else:
                retry = 0
        raise errors.WaitTimeout(f"case {case_id} did not end within {timeout:g} s", case=last) from failure

    async def heatmap(self, case_id: str | uuid.UUID) -> bytes:
        """The Grad-CAM heat map over the image, as PNG bytes."""
        return _core.png_of(
            await self._request("GET", _core.case_path(case_id, "/heatmap.png"), limit=_core.MAX_HEATMAP_ANSWER)
        )

    async def iter_cases(
        self,
        status: str | None = None,
        page_size: int | None = None,
        *,
        priority: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> AsyncIterator[CaseSummary]:
        """The clinic's cases, newest first, page after page (following ``next_cursor``); only those
        in ``status``, of ``priority``, created at or after ``since`` and before ``until`` if given."""
        params = _core.list_params(status, priority, since, until, page_size)
        while True:
            rows, cursor = _core.page_of(await self._request("GET", "/v1/cases", params=params))
            for row in rows:
                yield row
            if cursor is None:
                return
            params["cursor"] = cursor

    async def erase(self, case_id: str | uuid.UUID) -> Case:
        """Crypto-shred the case's patient data now (image, heat map, client reference, result); the
        case remains, ``purged``, with no result."""
        return _core.case_of(await self._request("DELETE", _core.case_path(case_id)))

    async def report_outcome(self, case_id: str | uuid.UUID, diagnosis: str, method: str) -> dict[str, Any]:
        """Record the confirmed diagnosis of a case (a class code; ``method``: histo, follow_up,
        consensus or confocal). A later report replaces it. Returns the server's answer."""
        path = _core.case_path(case_id, "/outcome")
        answer = await self._request("POST", path, json={"diagnosis": diagnosis, "method": method})
        return _core.outcome_of(answer)
