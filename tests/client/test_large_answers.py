"""An answer far larger than any dermq sends (a base URL that points at a download, a proxy's error
page that never ends, a gzip bomb): the client reads it only up to what a dermq answer can hold and
says the base URL is wrong, instead of holding the whole of it in memory (or reading forever). A real
HTTP server of the test's own streams the answer (tests.local_site)."""

from __future__ import annotations

import asyncio
import gzip
import json
import threading
import tracemalloc
import zlib
from collections.abc import Callable

import pytest
from dermq_client import AsyncClient, Case, Client, RetryPolicy, ServerError, UnexpectedResponse
from dermq_client._core import MAX_HEATMAP_ANSWER, MAX_JSON_ANSWER, PNG_MAGIC

from tests.client.test_requests import CASE_ID, case_json
from tests.local_site import QuietHandler, serving

CHUNK = 1 << 20
#: what the server would send at most: far past the client's limit, yet finite, so that a client that
#: reads everything makes the test fail rather than hang
ENDLESS = 96 * CHUNK


def streaming(status: int, content_type: str, written: list[int]) -> type[QuietHandler]:
    """A handler that answers ``status`` with a chunked body of ``ENDLESS`` bytes, counting in
    ``written`` what it got out before the client hung up."""

    class Endless(QuietHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            block = b" " * CHUNK
            try:
                while written[0] < ENDLESS:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(block), block))
                    written[0] += len(block)
                self.wfile.write(b"0\r\n\r\n")
            except OSError:  # the client hung up: what it should do
                pass
            self.close_connection = True

    return Endless


def call(client_kind: str, url: str, method: Callable[..., object], *args: object) -> object:
    retry = RetryPolicy(attempts=2, backoff=0.01)
    name = method.__name__
    if client_kind == "blocking":
        with Client(url, "dq_key", retry=retry) as dermq:
            return getattr(dermq, name)(*args)

    async def flow() -> object:
        async with AsyncClient(url, "dq_key", retry=retry) as dermq:
            return await getattr(dermq, name)(*args)

    return asyncio.run(flow())


@pytest.mark.parametrize("client_kind", ["blocking", "asyncio"])
def test_an_endless_answer_is_read_only_up_to_what_dermq_could_send(client_kind: str) -> None:
    written = [0]
    with (
        serving(streaming(200, "application/json", written)) as url,
        pytest.raises(UnexpectedResponse, match="check the base URL") as raised,
    ):
        call(client_kind, url, Client.get, CASE_ID)
    # what the client read, and what the sockets' buffers held: nowhere near the whole of it
    assert written[0] < MAX_JSON_ANSWER + 32 * CHUNK < ENDLESS
    assert "larger than 4 MiB" in str(raised.value)


@pytest.mark.parametrize("client_kind", ["blocking", "asyncio"])
def test_an_endless_error_page_is_still_its_status_and_is_retried(client_kind: str) -> None:
    """A proxy's 502 whose page does not end: the status still says what to do (retried, then raised)."""
    written = [0]
    with serving(streaming(502, "text/html", written)) as url, pytest.raises(ServerError) as raised:
        call(client_kind, url, Client.get, CASE_ID)
    assert raised.value.status == 502
    assert written[0] < 2 * (MAX_JSON_ANSWER + 32 * CHUNK) < ENDLESS


@pytest.mark.parametrize("client_kind", ["blocking", "async"])
def test_a_gzip_bomb_is_not_unpacked_past_the_limit(client_kind: str) -> None:
    """A few dozen KiB on the wire that unpack to far more than any dermq answer. Each network chunk
    is unpacked only as far as the limit: the client never holds much more than the limit (httpx
    unpacked each chunk whole, up to some 1,000 times its size, before the limit was checked)."""
    bomb = gzip.compress(b" " * (MAX_JSON_ANSWER * 32), compresslevel=9)

    class Bomb(QuietHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", str(len(bomb)))
            self.end_headers()
            self.wfile.write(bomb)

    with serving(Bomb) as url:
        tracemalloc.start()
        try:
            with pytest.raises(UnexpectedResponse, match="larger than 4 MiB"):
                call(client_kind, url, Client.get, CASE_ID)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert peak < 3 * MAX_JSON_ANSWER


def packed(packing: str, body: bytes, pieces: int = 50) -> type[QuietHandler]:
    """A handler that answers 200 with ``body`` packed as ``packing``, in ``pieces`` network chunks."""

    class Packed(QuietHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Encoding", packing)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            step = max(1, len(body) // pieces)
            for at in range(0, len(body), step):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(body[at : at + step]), body[at : at + step]))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
            self.close_connection = True

    return Packed


@pytest.mark.parametrize(("packing", "pack"), [("gzip", gzip.compress), ("deflate", zlib.compress)])
@pytest.mark.parametrize("client_kind", ["blocking", "async"])
def test_a_packed_answer_in_many_chunks_is_unpacked_whole(
    client_kind: str, packing: str, pack: Callable[[bytes], bytes]
) -> None:
    """A proxy that compresses dermq's answers (gzip, what the client asks for, or zlib-wrapped
    deflate): the case comes whole, however the network splits it."""
    case = case_json("done") | {"padding": "x" * 20_000}
    with serving(packed(packing, pack(json.dumps(case).encode()))) as url:
        got = call(client_kind, url, Client.get, CASE_ID)
    assert isinstance(got, Case) and str(got.id) == CASE_ID and got.status == "done"


def test_a_packing_the_client_did_not_ask_for_is_not_dermqs() -> None:
    with (
        serving(packed("br", b"\x0b\x02\x80{}\x03")) as url,
        Client(url, "dq_key") as dermq,
        pytest.raises(UnexpectedResponse, match="packed as br"),
    ):
        dermq.get(CASE_ID)


def test_a_heat_map_larger_than_any_json_answer_still_comes_whole() -> None:
    """An operator's larger overlay (DERMQ_OVERLAY_MAX_SIDE) makes a heat map of several MiB: it is
    read whole; only past the heat map's own limit is it refused."""
    png = PNG_MAGIC + b"\0" * (MAX_JSON_ANSWER * 2)
    assert len(png) < MAX_HEATMAP_ANSWER
    served = threading.Event()

    class Heatmap(QuietHandler):
        def do_GET(self) -> None:
            served.set()
            self.answer(200, "image/png", png)

    with serving(Heatmap) as url, Client(url, "dq_key") as dermq:
        assert dermq.heatmap(CASE_ID) == png
    assert served.is_set()
