"""web.http2's `answer_now` path (issue 19): a whole bodiless request answered while its read
is parsed, without a Task, with what the handler's Task would have sent; declined (a Task) when
the flow-control windows or the write buffer cannot take the answer at once. Driven with the
`h2` library as the client, on an in-memory transport."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings

from blindfold.web.http1 import ConnInfo
from blindfold.web.http2 import H2Connection, H2Responder
from blindfold.web.limits import HttpLimits
from blindfold.web.messages import BodyStream, PreparedHead, Request, Responder, start_prepared


class Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.out = bytearray()
        self.closed = False

    def write(self, data: Any) -> None:
        self.out += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    abort = close


class NowHandler:
    """Answers /now* at once when it may; the others (and declined ones) in a Task."""

    def __init__(self) -> None:
        self.head = PreparedHead(200, [(b"content-type", b"text/plain"), (b"content-length", b"9")])
        self.tasks = 0
        self.now = 0
        self.fail = False

    async def __call__(self, request: Request, body: BodyStream, respond: Responder) -> None:
        self.tasks += 1
        await start_prepared(respond, self.head, [(b"x-t", request.target)])
        await respond.send(b"body " + request.target[:4])
        await respond.end()

    def answer_now(self, request: Request, respond: H2Responder) -> bool:
        if self.fail:
            raise RuntimeError("bug")
        if not request.target.startswith(b"/now") or not respond.can_answer_now:
            return False
        self.now += 1
        # plain: the caller vouches for the extra fields (keyless's hit does, as for HTTP/1.1)
        respond.start_prepared_now(self.head, [(b"x-t", request.target)], True)
        respond.send_now(b"body " + request.target[:4])
        respond.end_now()
        return True


def _client(big_windows: bool) -> h2.connection.H2Connection:
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    if big_windows:
        client.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1 << 20})
        client.increment_flow_control_window(1 << 20)
    return client


def _request(client: h2.connection.H2Connection, sid: int, path: str, method: str = "GET") -> None:
    head = [(":method", method), (":scheme", "https"), (":authority", "a"), (":path", path)]
    client.send_headers(sid, head, end_stream=method != "POST")
    if method == "POST":
        client.send_data(sid, b"xyz", end_stream=True)


def _answers(client: h2.connection.H2Connection, data: bytes) -> dict[int, tuple[Any, ...]]:
    got: dict[int, list[Any]] = {}
    for e in client.receive_data(data):
        if isinstance(e, h2.events.ResponseReceived):
            got.setdefault(e.stream_id, [None, b"", False])[0] = e.headers
        elif isinstance(e, h2.events.DataReceived):
            got[e.stream_id][1] += e.data
        elif isinstance(e, h2.events.StreamEnded):
            got[e.stream_id][2] = True
    return {k: tuple(v) for k, v in got.items()}


def _serve(handler: Any, big_windows: bool, paths: list[tuple[str, str]]) -> tuple[Any, ...]:
    async def main() -> tuple[Any, ...]:
        info = ConnInfo(("127.0.0.1", 1), ("127.0.0.1", 2), b"https", {})
        conn = H2Connection(handler, HttpLimits(), info)
        transport = Transport()
        conn.connection_made(transport)
        client = _client(big_windows)
        conn.data_received(client.data_to_send())
        client.receive_data(bytes(transport.out))
        transport.out.clear()
        for i, (method, path) in enumerate(paths):
            _request(client, 2 * i + 1, path, method)
        conn.data_received(client.data_to_send())
        mark = len(transport.out)
        at_once = _answers(client, bytes(transport.out))  # before the loop runs
        for _ in range(20):
            await asyncio.sleep(0)
        later = _answers(client, bytes(transport.out[mark:]))
        everything = {**at_once, **later}
        conn._close()
        return at_once, everything

    return asyncio.run(main())


PATHS = [("GET", "/now1"), ("GET", "/task"), ("HEAD", "/now2"), ("POST", "/now3"), ("GET", "/now4")]


def test_answer_now_sends_what_the_task_sends_without_a_task() -> None:
    fast = NowHandler()
    at_once, _ = _serve(fast, True, PATHS)
    plain = NowHandler()
    _, want = _serve(plain.__call__, True, PATHS)
    assert sorted(at_once) == [1, 5, 9]  # /now1, HEAD /now2, /now4: answered in the read
    for sid in (1, 5, 9):
        assert at_once[sid] == want[sid]
        assert at_once[sid][2]  # ended
    assert at_once[1][1] == b"body /now" and at_once[5][1] == b""  # HEAD: no body
    assert (fast.now, fast.tasks) == (3, 2)  # /task and the POST (a body) run in Tasks


def test_answer_now_declines_when_the_windows_are_small() -> None:
    fast = NowHandler()
    at_once, everything = _serve(fast, False, [("GET", "/now1")])
    assert at_once == {} and (fast.now, fast.tasks) == (0, 1)
    assert everything[1][1:] == (b"body /now", True)


def test_answer_now_raising_is_a_500() -> None:
    handler = NowHandler()
    handler.fail = True
    at_once, _ = _serve(handler, True, [("GET", "/now1")])
    headers, body, ended = at_once[1]
    assert dict(headers)[b":status"] == b"500" and body == b"" and ended


def test_a_repeated_request_is_parsed_once_but_gets_its_own_headers_and_id() -> None:
    """The same header block again (HPACK-indexed: the very list h2core decoded before) reuses
    the connection's parse; each request still gets its own header list and request id."""
    seen: list[Request] = []

    async def handler(request: Request, body: BodyStream, respond: Responder) -> None:
        seen.append(request)
        request.headers.append((b"x-added", b"1"))  # a handler may change its own request
        await respond.start(204, [])
        await respond.end()

    async def main() -> H2Connection:
        info = ConnInfo(("127.0.0.1", 1), ("127.0.0.1", 2), b"https", {})
        conn = H2Connection(handler, HttpLimits(), info)
        conn.connection_made(Transport())
        client = _client(False)
        for sid in (1, 3, 5):
            _request(client, sid, "/same?q=1")
        conn.data_received(client.data_to_send())
        for _ in range(10):
            await asyncio.sleep(0)
        conn._close()
        return conn

    conn = asyncio.run(main())
    assert conn._parsed is not None  # the cache was used
    assert [r.target for r in seen] == [b"/same?q=1"] * 3
    assert len({r.request_id for r in seen}) == 3
    assert all(r.headers == [(b"host", b"a"), (b"x-added", b"1")] for r in seen)


def test_a_refusal_after_the_connection_closed_leaves_no_task_error() -> None:
    """A request refused (400: a bad :path) in the read that also carries the client's GOAWAY:
    the refusal Task runs after the connection closed; its ConnectionError must not reach the
    loop ('Task exception was never retrieved')."""
    errors: list[dict[str, Any]] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _loop, context: errors.append(context))
        info = ConnInfo(("127.0.0.1", 1), ("127.0.0.1", 2), b"https", {})
        conn = H2Connection(NowHandler(), HttpLimits(), info)
        conn.connection_made(Transport())
        client = _client(False)
        _request(client, 1, "abc")  # not origin-form: refused 400
        client.close_connection()
        conn.data_received(client.data_to_send())
        for _ in range(10):
            await asyncio.sleep(0)
        conn.connection_lost(None)
        for _ in range(10):
            await asyncio.sleep(0)

    asyncio.run(main())
    gc.collect()  # a Task whose exception nobody retrieved reports when it is freed
    assert errors == []
