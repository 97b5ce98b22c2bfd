"""The upstream client's two response parsers side by side (UpstreamPool(parser="h11") and
"httptools"), on well-formed and malformed responses from a real loopback server: the same
status, headers and body, the same refusals, and a connection reused only when both would.
Where llhttp is stricter than h11 (it refuses what h11 takes), the case is listed below."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from blindfold.errors import UpstreamError
from blindfold.web.client import UpstreamPool

OK_NEXT = b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nnext"

CASES: dict[str, bytes] = {
    "content-length": b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-a: b\r\n\r\nok",
    "chunked": (
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n1\r\n!\r\n0\r\n\r\n"
    ),
    "two TE chunked": (
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntransfer-encoding: chunked\r\n\r\n"
        b"2\r\nok\r\n0\r\n\r\n"
    ),
    "chunked with trailers": (
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nx-t: 1\r\n\r\n"
    ),
    "chunk extension": (
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2;a=b\r\nok\r\n0\r\n\r\n"
    ),
    "CL and TE chunked": (
        b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n"
        b"2\r\nok\r\n0\r\n\r\n"
    ),
    "TE gzip, chunked": (
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
    ),
    "TE identity": b"HTTP/1.1 200 OK\r\ntransfer-encoding: identity\r\n\r\nok",
    "invalid CL": b"HTTP/1.1 200 OK\r\ncontent-length: 2x\r\n\r\nok",
    "negative CL": b"HTTP/1.1 200 OK\r\ncontent-length: -2\r\n\r\nok",
    "two different CLs": b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nok",
    "CL list": b"HTTP/1.1 200 OK\r\ncontent-length: 2, 2\r\n\r\nok",
    "body past CL": b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n\r\n",
    "short body then close": b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nok",
    "no length, until close": b"HTTP/1.1 200 OK\r\nx-a: b\r\n\r\nuntil close",
    "HTTP/1.0 with CL": b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok",
    "connection: close": b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok",
    "204 with CL": b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n",
    "304": b"HTTP/1.1 304 Not Modified\r\netag: x\r\n\r\n",
    "interim then final": b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n"
    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
    "101 unasked": b"HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\nconnection: upgrade\r\n\r\n",
    "status 2000": b"HTTP/1.1 2000 OK\r\ncontent-length: 2\r\n\r\nok",
    "no reason": b"HTTP/1.1 200\r\ncontent-length: 2\r\n\r\nok",
    "HTTP/2.0 version": b"HTTP/2.0 200 OK\r\ncontent-length: 2\r\n\r\nok",
    "garbage line": b"HELLO\r\n\r\n",
    "header without colon": b"HTTP/1.1 200 OK\r\nbroken\r\ncontent-length: 2\r\n\r\nok",
    "space before colon": b"HTTP/1.1 200 OK\r\ncontent-length : 2\r\n\r\nok",
    "obs-fold": b"HTTP/1.1 200 OK\r\nx-a: b\r\n c\r\ncontent-length: 2\r\n\r\nok",
    "NUL in a value": b"HTTP/1.1 200 OK\r\nx-a: b\x00c\r\ncontent-length: 2\r\n\r\nok",
    "bare LF": b"HTTP/1.1 200 OK\ncontent-length: 2\n\nok",
    "bad chunk size": b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nok\r\n0\r\n\r\n",
    "closed before a byte": b"",
}

# the server closes the connection after these
CLOSES = {"short body then close", "no length, until close", "HTTP/1.0 with CL"}
# llhttp refuses, h11 takes: stricter framing is what an origin agent wants
STRICTER = {"CL and TE chunked", "obs-fold", "CL list", "bare LF"}
# both answer the same, but llhttp keeps no connection alive for a version it does not know
NOT_REUSED = {"HTTP/2.0 version"}
# h11 refuses, llhttp takes (a response h11 would have failed on, passed on unchanged)
LAXER: set[str] = set()


async def _outcome(
    parser: str, answer: bytes, method: bytes = b"GET", close: bool = False
) -> tuple[Any, ...]:
    """(first exchange's result, a second request's result, the connection number each
    request came on): the server answers `answer`, then OK_NEXT; `close`: it closes the
    connection after `answer`."""
    conns: list[int] = []
    answers = [answer, OK_NEXT]
    writers: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        me = len(writers)
        try:
            while answers:
                await reader.readuntil(b"\r\n\r\n")
                conns.append(me)
                data = answers.pop(0)
                writer.write(data)
                await writer.drain()
                if data is answer and (close or not data):
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pool = UpstreamPool(f"http://127.0.0.1:{port}", timeout_s=2, parser=parser)  # type: ignore[arg-type]
    interim: list[int] = []

    async def on_interim(status: int, headers: list[tuple[bytes, bytes]]) -> None:
        interim.append(status)

    try:
        try:
            r = await pool.request(method, b"/", [(b"host", b"x")], None, on_interim)
            body = b"".join([c async for c in r.body()])
            first: tuple[Any, ...] = ("ok", r.status, r.headers, body, interim)
        except UpstreamError as exc:
            first = ("error", exc.reason)
        try:
            r = await pool.request(b"GET", b"/", [(b"host", b"x")], None)
            second: tuple[Any, ...] = ("ok", b"".join([c async for c in r.body()]))
        except UpstreamError as exc:
            second = ("error", exc.reason)
        return first, second, conns
    finally:
        pool.close()
        server.close()
        for w in writers:
            w.close()


@pytest.mark.parametrize("name", sorted(CASES))
def test_both_parsers_agree(name: str) -> None:
    answer = CASES[name]

    async def main() -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        close = name in CLOSES
        a = await asyncio.wait_for(_outcome("h11", answer, close=close), 20)
        b = await asyncio.wait_for(_outcome("httptools", answer, close=close), 20)
        return a, b

    h11_result, fast_result = asyncio.run(main())
    if name in STRICTER:
        assert h11_result[0][0] == "ok" and fast_result[0] == ("error", "bad_response")
        return
    if name in LAXER:
        assert h11_result[0][0] == "error" and fast_result[0][0] == "ok"
        return
    if name in NOT_REUSED:
        assert fast_result[:2] == h11_result[:2] and fast_result[2] == [1, 2]
        return
    assert fast_result == h11_result


def test_a_head_response_has_no_body_and_is_not_read_past() -> None:
    answer = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"

    async def main() -> None:
        for parser in ("h11", "httptools"):
            first, second, _ = await asyncio.wait_for(_outcome(parser, answer, b"HEAD"), 20)
            assert first == ("ok", 200, [(b"content-length", b"5")], b"", [])
            assert second == ("ok", b"next")

    asyncio.run(main())
