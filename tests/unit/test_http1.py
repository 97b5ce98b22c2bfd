"""web.http1's response side, over an in-memory transport: the bytes of every response are the
ones h11 (tests/helpers/h11_reference.py) wrote, a Content-Length the body breaks closes the
connection, and start_prepared sends a cached head with the body in one write."""

from __future__ import annotations

import asyncio
import gc
import weakref
from typing import Any

import pytest

from blindfold.web.http1 import ConnInfo, H1Connection, H1Responder
from blindfold.web.limits import HttpLimits
from blindfold.web.messages import (
    BodyStream,
    Handler,
    Headers,
    PreparedHead,
    Request,
    Responder,
    start_prepared,
)
from tests.helpers import h11_reference

LIMITS = HttpLimits(header_timeout_s=5, body_timeout_s=5, keepalive_timeout_s=5)


class MemoryTransport(asyncio.Transport):
    """Records what the connection writes; closing is recorded, not performed."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = ""
        self.reading = True

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.closed, "write after close"
        self.writes.append(bytes(data))

    def writelines(self, lines: Any) -> None:
        self.write(b"".join(lines))

    def close(self) -> None:
        self.closed = self.closed or "close"

    def abort(self) -> None:
        self.closed = self.closed or "abort"

    def is_closing(self) -> bool:
        return bool(self.closed)

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


Answer = Handler


def run(
    connection: type[Any], request: bytes, answer: Answer, eof: bool = False
) -> tuple[MemoryTransport, list[tuple[str, dict[str, Any]]]]:
    async def main() -> tuple[MemoryTransport, list[tuple[str, dict[str, Any]]]]:
        events: list[tuple[str, dict[str, Any]]] = []
        info = ConnInfo(("127.0.0.1", 1), ("127.0.0.1", 2), b"http", {})
        conn = connection(answer, LIMITS, info, lambda n, f: events.append((n, f)))
        transport = MemoryTransport()
        conn.connection_made(transport)
        conn.data_received(request)
        if eof:
            conn.eof_received()
        for _ in range(50):
            await asyncio.sleep(0)
        conn._close()
        return transport, events

    return asyncio.run(main())


def answering(
    status: int, headers: Headers, pieces: list[bytes], interim: int | None = None
) -> Answer:
    async def answer(request: Request, body: BodyStream, respond: Responder) -> None:
        await body.read_all(1 << 20)
        if interim is not None:
            await respond.interim(interim, [(b"link", b"</a.css>; rel=preload")])  # type: ignore[attr-defined]
        await respond.start(status, headers)
        for piece in pieces:
            await respond.send(piece)
        await respond.end()

    return answer


GET = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
GET10 = b"GET / HTTP/1.0\r\n\r\n"
HEAD = b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n"
CLOSE = b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
POST_EARLY = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc"

CASES = [
    (GET, 200, [(b"content-length", b"5")], [b"hello"]),
    (GET, 200, [(b"Content-Length", b"5"), (b"X-Up", b"A")], [b"he", b"llo"]),
    (GET, 200, [(b"content-length", b"5, 5")], [b"hello"]),
    (GET, 200, [(b"content-type", b"text/plain")], [b"hello", b"", b"world"]),
    (GET, 200, [(b"transfer-encoding", b"chunked")], [b"hello"]),
    (GET, 200, [(b"content-length", b"5"), (b"transfer-encoding", b"chunked")], [b"hello"]),
    (GET, 200, [(b"connection", b"close"), (b"content-length", b"2")], [b"ok"]),
    (GET, 200, [(b"connection", b"keep-alive, Upgrade"), (b"content-length", b"0")], []),
    (GET, 204, [], []),
    (GET, 304, [(b"etag", b'"x"')], []),
    (GET, 404, [(b"content-length", b"0")], []),
    (GET, 599, [(b"content-length", b"0")], []),
    (GET, 200, [(b"content-length", b"0")], []),
    (GET10, 200, [(b"content-length", b"5")], [b"hello"]),
    (GET10, 200, [], [b"hello", b"world"]),
    (GET10, 200, [(b"transfer-encoding", b"chunked")], [b"hello"]),
    (GET10, 200, [(b"connection", b"keep-alive")], [b"x"]),
    (HEAD, 200, [(b"content-length", b"5")], [b"hello"]),
    (HEAD, 200, [], [b"hello"]),
    (HEAD, 200, [(b"transfer-encoding", b"chunked")], []),
    (CLOSE, 200, [(b"content-length", b"5")], [b"hello"]),
    (CLOSE, 200, [], [b"hello"]),
    (POST_EARLY, 413, [(b"content-length", b"0")], []),
    (GET, 200, [(b"content-length", b"100000")], [b"z" * 100000]),
    (GET, 200, [], [b"z" * 100000]),
]


@pytest.mark.parametrize(("request_bytes", "status", "headers", "body"), CASES)
def test_response_bytes_are_h11s(
    request_bytes: bytes, status: int, headers: Headers, body: list[bytes]
) -> None:
    answer = answering(status, headers, body)
    if request_bytes is POST_EARLY:

        async def early(request: Request, body: BodyStream, respond: Responder) -> None:
            await respond.start(status, headers)
            await respond.end()

        answer = early
    old, _ = run(h11_reference.H1Connection, request_bytes, answer)
    new, _ = run(H1Connection, request_bytes, answer)
    assert b"".join(new.writes) == b"".join(old.writes)
    assert new.closed == old.closed


@pytest.mark.parametrize(
    ("headers", "body"),
    [
        ([(b"content-length", b"5")], [b"hello!"]),  # over-run in one piece
        ([(b"content-length", b"5")], [b"hel", b"lo!"]),  # over-run on the second
        ([(b"content-length", b"5")], [b"hell"]),  # under-run
        ([(b"content-length", b"5")], []),
    ],
)
def test_content_length_broken_by_the_body_closes(headers: Headers, body: list[bytes]) -> None:
    for connection in (h11_reference.H1Connection, H1Connection):
        transport, events = run(connection, GET + GET, answering(200, headers, body))
        assert transport.closed == "abort", connection
        assert [n for n, _ in events if n == "handler_error"] == ["handler_error"]
        sent = b"".join(transport.writes)
        assert sent.count(b"HTTP/1.1") <= 1  # the second request is never answered
        assert len(sent.partition(b"\r\n\r\n")[2]) <= 5  # never more than declared


@pytest.mark.parametrize(
    "headers",
    [
        [(b"x", b"a\r\nInjected: yes")],
        [(b"x", b"a\nb")],
        [(b"x", b"\x00")],
        [(b"bad name", b"v")],
        [(b"", b"v")],
        [(b"x", b" padded")],
        [(b"content-length", b"-1")],
        [(b"content-length", b"1, 2")],
        [(b"transfer-encoding", b"gzip")],
        [(b"transfer-encoding", b"chunked"), (b"transfer-encoding", b"chunked")],
    ],
)
def test_bad_response_fields_are_refused_like_h11(headers: Headers) -> None:
    for connection in (h11_reference.H1Connection, H1Connection):
        transport, events = run(connection, GET, answering(200, headers, [b"x"]))
        # nothing of the head leaves; the connection is reset (no 500: the head had started)
        assert transport.writes == [], connection
        assert transport.closed == "abort"
        assert [n for n, _ in events][:1] == ["handler_error"]


def test_interim_responses_as_h11() -> None:
    for request_bytes in (GET, GET10):
        answer = answering(200, [(b"content-length", b"2")], [b"ok"], interim=103)
        old, _ = run(h11_reference.H1Connection, request_bytes, answer)
        new, _ = run(H1Connection, request_bytes, answer)
        assert b"".join(new.writes) == b"".join(old.writes)
    assert b"".join(new.writes).startswith(b"HTTP/1.1 200 ")  # none to HTTP/1.0
    assert b"".join(old.writes).startswith(b"HTTP/1.1 200 ")


def test_100_continue_once_the_handler_waits_for_the_body() -> None:
    request = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n"

    async def main() -> list[bytes]:
        info = ConnInfo(("127.0.0.1", 1), ("127.0.0.1", 2), b"http", {})
        conn = H1Connection(answering(200, [(b"content-length", b"2")], [b"ok"]), LIMITS, info)
        transport = MemoryTransport()
        conn.connection_made(transport)
        conn.data_received(request)
        for _ in range(10):
            await asyncio.sleep(0)
        assert transport.writes == [b"HTTP/1.1 100 Continue\r\n\r\n"]
        conn.data_received(b"hi")
        for _ in range(10):
            await asyncio.sleep(0)
        conn._close()
        return transport.writes

    writes = asyncio.run(main())
    assert writes[1].startswith(b"HTTP/1.1 200 OK\r\n") and writes[1].endswith(b"ok")


def test_start_prepared_encodes_once_and_writes_once() -> None:
    head = PreparedHead(
        200, [(b"content-type", b"text/plain"), (b"content-length", b"5"), (b"etag", b'"1"')]
    )
    count = 0

    async def answer(request: Request, body: BodyStream, respond: Responder) -> None:
        nonlocal count
        count += 1
        await start_prepared(respond, head, [(b"age", b"%d" % count)])
        await respond.send(b"hello")
        await respond.end()

    transport, _ = run(H1Connection, GET + GET + HEAD, answer)
    assert head.encoded["h1"] is not None
    assert transport.writes == [
        b'HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 5\r\netag: "1"\r\n'
        b"age: 1\r\n\r\nhello",
        b'HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 5\r\netag: "1"\r\n'
        b"age: 2\r\n\r\nhello",
        b'HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 5\r\netag: "1"\r\n'
        b"age: 3\r\n\r\n",  # HEAD: the same head, no body
    ]


def test_start_prepared_matches_start_for_what_h11_rewrites() -> None:
    """A prepared head still gets Connection: close (HTTP/1.0, a close request) and chunked
    framing when it has no length: the same bytes as start() with the same fields."""
    for request_bytes in (GET, GET10, CLOSE, HEAD):
        for fields, extra in (
            ([(b"content-length", b"5")], []),
            ([(b"content-type", b"x")], []),
            ([(b"content-type", b"x")], [(b"content-length", b"5")]),
            ([(b"content-length", b"5")], [(b"connection", b"close")]),
        ):
            head = PreparedHead(200, fields)

            async def prepared(request: Request, body: BodyStream, respond: Responder) -> None:
                await start_prepared(respond, head, extra)  # noqa: B023
                await respond.send(b"hello")
                await respond.end()

            async def plain(request: Request, body: BodyStream, respond: Responder) -> None:
                await respond.start(200, [*fields, *extra])  # noqa: B023
                await respond.send(b"hello")
                await respond.end()

            a, _ = run(H1Connection, request_bytes, prepared)
            b, _ = run(H1Connection, request_bytes, plain)
            c, _ = run(h11_reference.H1Connection, request_bytes, plain)
            assert b"".join(a.writes) == b"".join(b.writes) == b"".join(c.writes)
            assert a.closed == b.closed == c.closed


@pytest.mark.parametrize(
    "extra", [[(b"x", b"a\r\nb: c")], [(b"Bad Name", b"c")], [(b"content-length", b"7")]]
)
def test_start_prepared_refuses_bad_extra_fields(extra: Headers) -> None:
    head = PreparedHead(200, [(b"content-length", b"0")])
    raised: list[BaseException] = []

    async def answer(request: Request, body: BodyStream, respond: Responder) -> None:
        assert isinstance(respond, H1Responder)
        try:
            await respond.start_prepared(head, extra)
        except ConnectionError as exc:
            raised.append(exc)
            raise

    transport, events = run(H1Connection, GET, answer)
    assert transport.writes == []
    assert transport.closed == "abort"
    assert len(raised) == 1 and [n for n, _ in events][:1] == ["handler_error"]


def test_pipelined_requests_wait_for_the_response_before_them() -> None:
    order: list[str] = []
    gate = asyncio.Event

    async def main() -> list[str]:
        release = gate()

        async def answer(request: Request, body: BodyStream, respond: Responder) -> None:
            order.append(f"start {request.target.decode()}")
            if request.target == b"/1":
                await release.wait()
            await respond.start(200, [(b"content-length", b"0")])
            await respond.end()
            order.append(f"end {request.target.decode()}")

        info = ConnInfo(("127.0.0.1", 1), ("127.0.0.1", 2), b"http", {})
        conn = H1Connection(answer, LIMITS, info)
        transport = MemoryTransport()
        conn.connection_made(transport)
        two = b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\n"
        conn.data_received(two)
        for _ in range(10):
            await asyncio.sleep(0)
        assert order == ["start /1"]
        assert not transport.reading  # the pipelined request waits: no more is read
        release.set()
        for _ in range(20):
            await asyncio.sleep(0)
        assert transport.reading
        conn._close()
        return order

    assert asyncio.run(main()) == ["start /1", "end /1", "start /2", "end /2"]


def test_llhttp_leniencies_stay_off() -> None:
    """llhttp's lenient flags reopen smuggling holes (bare LF, data after close, chunk
    lengths...): web.http1 never turns one on."""
    from pathlib import Path

    import blindfold.web.http1 as http1

    assert "set_dangerous_leniencies" not in Path(http1.__file__).read_text()


@pytest.mark.parametrize("eof", [False, True])
def test_a_read_of_many_pipelined_requests_is_parsed_a_slice_at_a_time(eof: bool) -> None:
    """2000 small pipelined requests in one read, the first answered slowly: what waits is
    bytes (`held`), not 2000 parsed heads; then every one is answered, in order (and a
    half-close after them ends the connection only after the last)."""
    n = 2000
    seen: list[bytes] = []
    queued: list[int] = []

    async def main() -> MemoryTransport:
        release = asyncio.Event()

        async def answer(request: Request, body: BodyStream, respond: Responder) -> None:
            seen.append(request.target)
            if request.target == b"/0":
                await release.wait()
            await respond.start(200, [(b"content-length", b"1")])
            await respond.send(b"k")
            await respond.end()

        info = ConnInfo(("127.0.0.1", 1), ("127.0.0.1", 2), b"http", {})
        conn = H1Connection(answer, LIMITS, info)
        transport = MemoryTransport()
        conn.connection_made(transport)
        conn.data_received(b"".join(b"GET /%d HTTP/1.1\r\nHost: a\r\n\r\n" % i for i in range(n)))
        if eof:
            conn.eof_received()
        for _ in range(10):
            await asyncio.sleep(0)
        queued.append(len(conn.events))
        assert not transport.reading and len(conn.held) > 40000
        release.set()
        for _ in range(20 * n):
            await asyncio.sleep(0)
            if len(seen) == n and (transport.closed or not eof):
                break
        return transport

    transport = asyncio.run(main())
    assert queued[0] < 4096 // 28 * 3  # at most a slice of heads, as events
    assert seen == [b"/%d" % i for i in range(n)]
    assert b"".join(transport.writes).count(b"HTTP/1.1 200 OK") == n
    assert transport.closed == ("close" if eof else "")


@pytest.mark.parametrize(
    "bad",
    [
        "field",  # a value with DEL, which h11's client accepted from an upstream
        "prepared-extra",
        "status",
    ],
)
def test_a_refused_head_closes_the_connection(bad: str) -> None:
    """atk-h1 #2: a handler whose start() is refused and that returns (as the proxies do on
    ConnectionError) must not leave the connection waiting for the next request with nothing
    written, nor answer a pipelined request in its place."""
    seen: list[bytes] = []

    async def answer(request: Request, body: BodyStream, respond: Responder) -> None:
        seen.append(request.target)
        if request.target == b"/second":
            await respond.start(200, [(b"content-length", b"6")])
            await respond.send(b"second")
            await respond.end()
            return
        try:
            if bad == "field":
                await respond.start(200, [(b"x-reflected", b"a\x7fb")])
            elif bad == "prepared-extra":
                head = PreparedHead(200, [(b"content-length", b"0")])
                await start_prepared(respond, head, [(b"age", b"1\r\nx: y")])
            else:
                await respond.start(101, [])
        except ConnectionError:
            return

    transport, _ = run(
        H1Connection,
        b"GET /first HTTP/1.1\r\nHost: a\r\n\r\nGET /second HTTP/1.1\r\nHost: a\r\n\r\n",
        answer,
    )
    assert transport.closed
    assert b"second" not in b"".join(transport.writes)
    assert seen == [b"/first"]


class _NowHandler:
    """Answers requests for /now* at once (`answer_now`, as the keyless cache hit does), the
    others in a Task; `plain` is the same handler without `answer_now` (the reference)."""

    def __init__(self) -> None:
        self.head = PreparedHead(200, [(b"content-type", b"text/plain")])
        self.tasks = 0
        self.now = 0
        self.fail = False

    async def __call__(self, request: Request, body: BodyStream, respond: Responder) -> None:
        self.tasks += 1
        await start_prepared(respond, self.head, [(b"x-t", request.target)])
        await respond.send(b"body " + request.target)
        await respond.end()

    def answer_now(self, request: Request, respond: H1Responder) -> bool:
        if self.fail:
            raise RuntimeError("bug")
        if not request.target.startswith(b"/now") or not respond.can_answer_now:
            return False
        self.now += 1
        respond.start_prepared_now(self.head, [(b"x-t", request.target)])
        respond.send_now(b"body " + request.target)
        respond.end_now()
        return True


def _serve_pipelined(handler: Any, data: bytes, eof: bool, n: int) -> MemoryTransport:
    async def main() -> MemoryTransport:
        info = ConnInfo(("127.0.0.1", 1), ("127.0.0.1", 2), b"http", {})
        conn = H1Connection(handler, LIMITS, info)
        transport = MemoryTransport()
        conn.connection_made(transport)
        conn.data_received(data)
        if eof:
            conn.eof_received()
        for _ in range(20 * n):
            await asyncio.sleep(0)
            if b"".join(transport.writes).count(b"HTTP/1.1 200") == n and (
                transport.closed or not eof
            ):
                break
        closed = transport.closed  # by the connection itself
        conn._close()
        transport.closed = closed
        return transport

    return asyncio.run(main())


@pytest.mark.parametrize("every", [3, 0])
@pytest.mark.parametrize("eof", [False, True])
def test_answer_now_writes_what_the_task_writes_and_never_recurses(eof: bool, every: int) -> None:
    """A handler's `answer_now` answers whole bodiless requests without a Task (issue 19):
    2000 pipelined requests in one read (every third declined and run in a Task, or none)
    are answered in order with the bytes the same handler writes without `answer_now`;
    pipelined answers go through the loop (no recursion per request: 2000 overflow it)."""
    n = 2000
    data = b"".join(
        b"GET /%s%d HTTP/1.1\r\nHost: a\r\n\r\n"
        % (b"task" if every and i % every == 0 else b"now", i)
        for i in range(n)
    )
    fast = _NowHandler()
    got = _serve_pipelined(fast, data, eof, n)
    plain = _NowHandler()
    want = _serve_pipelined(plain.__call__, data, eof, n)
    assert b"".join(got.writes) == b"".join(want.writes)
    assert b"".join(got.writes).count(b"HTTP/1.1 200 OK") == n
    tasks = (n + every - 1) // every if every else 0
    assert (fast.now, fast.tasks) == (n - tasks, tasks)
    assert got.closed == want.closed == ("close" if eof else "")


def test_answer_now_answers_before_the_loop_runs_again() -> None:
    async def main() -> tuple[H1Connection, MemoryTransport, _NowHandler]:
        handler = _NowHandler()
        info = ConnInfo(("127.0.0.1", 1), ("127.0.0.1", 2), b"http", {})
        conn = H1Connection(handler, LIMITS, info)
        transport = MemoryTransport()
        conn.connection_made(transport)
        conn.data_received(b"GET /now HTTP/1.1\r\nHost: a\r\n\r\n")
        assert conn.task is None and transport.writes  # written, no Task, no loop turn
        assert conn.phase == 0  # IDLE: ready for the next request
        conn.write_paused = True  # a full write buffer: the next one waits in a Task
        conn.data_received(b"GET /now2 HTTP/1.1\r\nHost: a\r\n\r\n")
        assert conn.task is not None and handler.now == 1
        conn.resume_writing()
        for _ in range(10):
            await asyncio.sleep(0)
        conn._close()
        return conn, transport, handler

    _conn, transport, handler = asyncio.run(main())
    assert (handler.now, handler.tasks) == (1, 1)
    assert b"".join(transport.writes).count(b"HTTP/1.1 200 OK") == 2


def test_answer_now_raising_is_a_500_and_a_close() -> None:
    handler = _NowHandler()
    handler.fail = True
    transport, events = run(H1Connection, b"GET /now HTTP/1.1\r\nHost: a\r\n\r\n", handler)
    out = b"".join(transport.writes)
    assert out.startswith(b"HTTP/1.1 500 ") and b"content-length: 0" in out.lower()
    assert transport.closed == "close" and [n for n, _ in events][:1] == ["handler_error"]


def test_start_prepared_plain_extra_writes_what_checked_extra_writes() -> None:
    """`plain` (the caller vouches for its extra fields: a cache hit's Age) skips the checks,
    not the framing rules: the same bytes, also where h11 rewrites the head (HTTP/1.0, a close
    request, HEAD, an answer before the whole request arrived)."""
    extra = [(b"age", b"7"), (b"x-blindfold-cache", b"hit")]
    for request_bytes in (GET, GET10, CLOSE, HEAD, POST_EARLY):
        for fields in ([(b"content-length", b"5")], [(b"content-type", b"x")]):
            head = PreparedHead(200, fields)
            written = []
            for plain in (False, True):

                async def answer(request: Request, body: BodyStream, respond: Responder) -> None:
                    assert isinstance(respond, H1Responder)
                    respond.start_prepared_now(head, extra, plain)  # noqa: B023
                    await respond.send(b"hello")
                    await respond.end()

                transport, _ = run(H1Connection, request_bytes, answer)
                written.append((b"".join(transport.writes), transport.closed))
            assert written[0] == written[1]
            assert written[0][0].startswith(b"HTTP/1.1 200 ")


@pytest.mark.parametrize("path", [b"/now", b"/task"])
def test_a_closed_connection_is_freed_without_the_cyclic_collector(path: bytes) -> None:
    """A connection's objects (protocol, responder, parser, task) hold no reference cycle
    once it is closed: reference counting frees them, the cyclic collector need not walk
    every closed connection (issue 19: ~70 objects per connection waited for it)."""

    async def main() -> weakref.ref[H1Connection]:
        info = ConnInfo(("127.0.0.1", 1), ("127.0.0.1", 2), b"http", {})
        conn = H1Connection(_NowHandler(), LIMITS, info)
        transport = MemoryTransport()
        conn.connection_made(transport)
        conn.data_received(b"GET %s HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n" % path)
        for _ in range(10):
            await asyncio.sleep(0)
        assert transport.closed == "close"
        conn.connection_lost(None)  # what the transport does once it has closed
        for _ in range(3):
            await asyncio.sleep(0)
        return weakref.ref(conn)

    gc.collect()
    gc.disable()
    try:
        ref = asyncio.run(main())
        assert ref() is None
    finally:
        gc.enable()
