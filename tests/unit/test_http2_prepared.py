"""HTTP/2 responses from a prepared head (web.messages.PreparedHead, the cache-hit path): the
same header fields and body as `start` gives, in header blocks that leave HPACK's dynamic table
alone, with flow control, HEAD and table-size updates as RFC 9113 and RFC 7541 want them. On
a real loopback socket, with the `h2` library as the client."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import h2.events
import h2.settings
import hpack
import pytest
from hyperframe.frame import Frame, HeadersFrame

from blindfold.web.http1 import ConnInfo
from blindfold.web.http2 import H2Connection, _hpack_literal, _hpack_status
from blindfold.web.limits import HttpLimits
from blindfold.web.messages import (
    BodyStream,
    FieldError,
    PreparedHead,
    Request,
    Responder,
    start_prepared,
)
from tests.unit.test_web import H2Client

BODY = bytes(range(256)) * 8  # 2,048 bytes
HEAD = PreparedHead(
    200,
    [
        (b"content-type", b"application/octet-stream"),
        (b"cache-control", b"public, max-age=60"),  # a static-table name
        (b"www-authenticate", b"x" * 130),  # static index 61 (> 4-bit prefix), value > 127
        (b"x-long-field-name-" + b"n" * 140, b"v" * 300),  # a new name, both over 127 bytes
        (b"link", b"</a>; rel=preload"),
        (b"link", b"</b>; rel=preload"),  # repeated fields stay two fields, in order
        (b"content-length", str(len(BODY)).encode()),
    ],
)
EXTRA = [(b"age", b"7"), (b"x-blindfold-cache", b"hit")]


async def app(request: Request, body: BodyStream, respond: Responder) -> None:
    """/prepared: HEAD + EXTRA through start_prepared; /plain: the same through start;
    /bad-extra: an extra field a response must not carry."""
    if request.path == b"/prepared":
        await start_prepared(respond, HEAD, EXTRA)
    elif request.path == b"/bad-extra":
        try:
            await start_prepared(respond, HEAD, [(b"x-bad", b"a\r\nb")])
        except ConnectionError:
            await respond.start(500, [(b"content-length", b"0")])
            await respond.end()
            return
    else:
        await respond.start(200, [*HEAD.headers, *EXTRA])
    await respond.send(BODY)
    await respond.end()


class Server:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()

        def factory() -> asyncio.Protocol:
            info = ConnInfo(("127.0.0.1", 1), ("127.0.0.1", 2), b"http", {})
            return H2Connection(app, HttpLimits(), info)

        async def main() -> None:
            self.server = await self.loop.create_server(factory, "127.0.0.1", 0)
            self.port = self.server.sockets[0].getsockname()[1]
            ready.set()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(main())
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert ready.wait(10)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server()
    yield s
    s.close()


class RawClient(H2Client):
    """H2Client that also keeps every byte it received (to read the frames themselves) and
    opens the flow-control windows as it consumes DATA."""

    def __init__(self, port: int) -> None:
        super().__init__(port)
        self.received = bytearray()

    def exchange(
        self, sid: int, path: str, method: str = "GET"
    ) -> tuple[list[tuple[bytes, bytes]], bytes, list[h2.events.Event]]:
        self.conn.send_headers(
            sid,
            [(":method", method), (":path", path), (":scheme", "http"), (":authority", "x")],
            end_stream=True,
        )
        self.flush()
        headers: list[tuple[bytes, bytes]] = []
        body = bytearray()
        seen: list[h2.events.Event] = []
        for _ in range(200):
            data = self.sock.recv(65536)
            assert data, "connection closed"
            self.received += data
            events = self.conn.receive_data(data)
            for e in events:
                if getattr(e, "stream_id", sid) != sid:
                    continue
                seen.append(e)
                if isinstance(e, h2.events.ResponseReceived):
                    headers = list(e.headers)
                elif isinstance(e, h2.events.DataReceived):
                    body += e.data
                    self.conn.acknowledge_received_data(e.flow_controlled_length, sid)
            self.flush_quietly()
            if any(isinstance(e, h2.events.StreamEnded) for e in seen):
                return headers, bytes(body), seen
        raise AssertionError(f"stream {sid} did not end: {seen}")

    def headers_frames(self) -> list[HeadersFrame]:
        out: list[HeadersFrame] = []
        buf = bytes(self.received)
        pos = 0
        while len(buf) - pos >= 9:
            frame, length = Frame.parse_frame_header(memoryview(buf[pos : pos + 9]))
            if len(buf) - pos - 9 < length:
                break
            frame.parse_body(memoryview(buf[pos + 9 : pos + 9 + length]))
            if isinstance(frame, HeadersFrame):
                out.append(frame)
            pos += 9 + length
        return out


def test_prepared_responses_equal_plain_ones_and_leave_hpack_state_alone(server: Server) -> None:
    c = RawClient(server.port)
    plain = c.exchange(1, "/plain")
    results = [
        c.exchange(sid, "/prepared" if sid % 4 == 3 else "/plain") for sid in range(3, 23, 2)
    ]
    want = [(b":status", b"200"), *HEAD.headers, *EXTRA]
    assert plain[0] == want and plain[1] == BODY
    for headers, body, _ in results:  # interleaved: the client's decoder stays in step
        assert headers == want and body == BODY
    # the prepared blocks: indexed static :status (0x88), then literals without indexing only
    prepared = [f.data for f in c.headers_frames() if f.stream_id % 4 == 3]
    assert len(prepared) == 5 and all(b[:1] == b"\x88" for b in prepared)
    for block in prepared:
        decoder = hpack.Decoder()
        assert [tuple(h) for h in decoder.decode(block, raw=True)] == want
        assert not decoder.header_table.dynamic_entries


def test_prepared_body_ends_the_stream_on_its_last_data_frame(server: Server) -> None:
    c = RawClient(server.port)
    _, body, events = c.exchange(1, "/prepared")
    data = [e for e in events if isinstance(e, h2.events.DataReceived)]
    assert body == BODY and data[-1].stream_ended is not None
    assert all(e.data for e in data)  # no empty DATA frame to end the stream
    assert sum(len(e.data) for e in data) == len(BODY)


def test_prepared_head_request_ends_on_headers(server: Server) -> None:
    c = RawClient(server.port)
    headers, body, events = c.exchange(1, "/prepared", method="HEAD")
    assert headers == [(b":status", b"200"), *HEAD.headers, *EXTRA]  # Content-Length kept
    assert body == b"" and not any(isinstance(e, h2.events.DataReceived) for e in events)
    response = next(e for e in events if isinstance(e, h2.events.ResponseReceived))
    assert response.stream_ended is not None


def test_prepared_body_obeys_a_small_flow_control_window(server: Server) -> None:
    c = RawClient(server.port)
    c.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 300})
    c.flush()
    c.exchange(1, "/plain")  # by now the server has our SETTINGS
    _headers, body, events = c.exchange(3, "/prepared")
    data = [e for e in events if isinstance(e, h2.events.DataReceived)]
    assert body == BODY and len(data) >= len(BODY) // 300
    assert all(len(e.data) <= 300 for e in data) and data[-1].stream_ended is not None


def test_a_table_size_change_is_signalled_before_any_prepared_block(server: Server) -> None:
    """RFC 7541 §4.2: after the client lowers SETTINGS_HEADER_TABLE_SIZE, the next header
    block must start with a dynamic table size update; a prepared block has none, so that
    response goes through h2's own encoder."""
    c = RawClient(server.port)
    c.exchange(1, "/plain")  # the server's encoder now holds entries
    c.conn.update_settings({h2.settings.SettingCodes.HEADER_TABLE_SIZE: 0})
    c.flush()
    before = len(c.headers_frames())
    headers, body, _ = c.exchange(3, "/prepared")
    assert headers == [(b":status", b"200"), *HEAD.headers, *EXTRA] and body == BODY
    first = c.headers_frames()[before].data
    assert first[0] & 0xE0 == 0x20, first[:4].hex()  # §6.3: 001xxxxx
    headers, body, _ = c.exchange(5, "/prepared")  # then the prepared block again
    assert headers == [(b":status", b"200"), *HEAD.headers, *EXTRA] and body == BODY
    assert c.headers_frames()[-1].data[:1] == b"\x88"


def test_bad_extra_fields_are_refused(server: Server) -> None:
    c = RawClient(server.port)
    headers, _, _ = c.exchange(1, "/bad-extra")
    assert headers[0] == (b":status", b"500")
    with pytest.raises(FieldError):
        PreparedHead(200, [(b"X-Upper", b"v")])


@pytest.mark.parametrize("status", [200, 204, 304, 404, 203, 999])
def test_status_and_literals_decode_with_hpack(status: int) -> None:
    fields = [
        (b"age", b"0"),
        (b"x" * 200, b""),
        (b"set-cookie", b"a" * 5000),
        (b"server", b"\x80\xff obs-text"),
    ]
    block = _hpack_status(status) + b"".join(_hpack_literal(k, v) for k, v in fields)
    decoder = hpack.Decoder()
    decoder.max_header_list_size = 1 << 20
    got = [tuple(h) for h in decoder.decode(block, raw=True)]
    assert got == [(b":status", str(status).encode()), *fields]
    assert not decoder.header_table.dynamic_entries
