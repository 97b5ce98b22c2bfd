"""The HTTP layer (h11/h2 driven from asyncio) on real loopback sockets, with real clients:
curl, and h11/h2 used as raw clients for what curl will not send."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import subprocess
import threading
import time
from collections.abc import Iterator

import h2.config
import h2.connection
import h2.errors
import h2.events
import h11
import pytest

from blindfold.web.http1 import ConnInfo, H1Connection
from blindfold.web.http2 import H2Connection
from blindfold.web.limits import HttpLimits
from blindfold.web.messages import BodyStream, BodyTimeout, BodyTooLarge, Request, Responder
from tests.conftest import need

LIMITS = HttpLimits(
    max_body_bytes=50 << 20,
    body_timeout_s=1.0,
    header_timeout_s=1.0,
    keepalive_timeout_s=5.0,
    max_headers=50,
    max_header_bytes=8192,
    h2_max_concurrent_streams=20,
    h2_max_resets_per_window=50,
    h2_max_control_frames_per_window=100,
)


async def app(request: Request, body: BodyStream, respond: Responder) -> None:
    """/echo-hash: sha256 of the body; /big?n=: n bytes; anything else: 'ok <path>'."""
    try:
        if request.path == b"/echo-hash":
            h = hashlib.sha256()
            n = 0
            while chunk := await body.read():
                h.update(chunk)
                n += len(chunk)
            out = f"{n} {h.hexdigest()}".encode()
        elif request.path == b"/big":
            n = int(request.target.split(b"n=")[1])
            await respond.start(200, [(b"content-length", str(n).encode())])
            block = b"z" * 65536
            while n:
                part = block[: min(n, len(block))]
                await respond.send(part)
                n -= len(part)
            await respond.end()
            return
        else:
            out = b"ok " + request.path
    except BodyTooLarge:
        out, status = b"too large", 413
    except BodyTimeout:
        out, status = b"too slow", 408
    else:
        status = 200
    await respond.start(status, [(b"content-length", str(len(out)).encode())])
    await respond.send(out)
    await respond.end()


class Server:
    """Our protocols on a loopback port, on an event loop thread."""

    def __init__(self, h2: bool) -> None:
        self.loop = asyncio.new_event_loop()
        self.events: list[tuple[str, dict[str, object]]] = []
        ready = threading.Event()

        def on_event(name: str, fields: dict[str, object]) -> None:
            self.events.append((name, fields))

        def factory() -> asyncio.Protocol:
            info = ConnInfo(("127.0.0.1", 1), ("127.0.0.1", 2), b"http", {})
            return (H2Connection if h2 else H1Connection)(app, LIMITS, info, on_event)

        async def main() -> None:
            self.server = await self.loop.create_server(factory, "127.0.0.1", 0)
            self.port = self.server.sockets[0].getsockname()[1]
            ready.set()

        self.thread = threading.Thread(target=self._run, args=(main,), daemon=True)
        self.thread.start()
        assert ready.wait(10)

    def _run(self, main) -> None:  # type: ignore[no-untyped-def]
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(main())
        self.loop.run_forever()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def h1() -> Iterator[Server]:
    s = Server(h2=False)
    yield s
    s.close()


@pytest.fixture
def h2s() -> Iterator[Server]:
    s = Server(h2=True)
    yield s
    s.close()


def raw(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except (ConnectionResetError, TimeoutError):
            pass
        return out


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [need("curl"), "-sS", "--max-time", "20", *args], capture_output=True, text=True, timeout=30
    )


# ---------------------------------------------------------------- HTTP/1.1


def test_keepalive_and_pipelining(h1: Server) -> None:
    reply = raw(
        h1.port,
        b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n"
        b"Connection: close\r\n\r\n",
    )
    assert reply.count(b"HTTP/1.1 200") == 2
    assert reply.index(b"ok /a") < reply.index(b"ok /b")


def test_streamed_upload_and_download_with_curl(h1: Server, tmp_path) -> None:  # type: ignore
    blob = tmp_path / "blob"
    data = bytes(range(256)) * (40 * 4096)  # 40 MiB
    blob.write_bytes(data)
    up = curl(
        "--data-binary",
        f"@{blob}",
        "-H",
        "Content-Type: application/octet-stream",
        f"http://127.0.0.1:{h1.port}/echo-hash",
    )
    assert up.stdout == f"{len(data)} {hashlib.sha256(data).hexdigest()}"
    chunked = curl(
        "-H",
        "Transfer-Encoding: chunked",
        "--data-binary",
        f"@{blob}",
        f"http://127.0.0.1:{h1.port}/echo-hash",
    )
    assert chunked.stdout == up.stdout
    down = subprocess.run(
        [need("curl"), "-sS", "--max-time", "20", f"http://127.0.0.1:{h1.port}/big?n=30000000"],
        capture_output=True,
        timeout=30,
    )
    assert len(down.stdout) == 30000000


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GARBAGE\r\n\r\n", 400),
        (
            b"GET / HTTP/1.1\r\n"
            + b"".join(b"X-%d: y\r\n" % i for i in range(60))
            + b"Host: x\r\n\r\n",
            431,
        ),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 10000 + b"\r\n\r\n", 431),
        (b"POST /echo-hash HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999999\r\n\r\n", 413),
        (b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
    ],
)
def test_malformed_and_oversized_requests(h1: Server, request_bytes: bytes, status: int) -> None:
    reply = raw(h1.port, request_bytes)
    assert reply.startswith(f"HTTP/1.1 {status}".encode()), reply[:80]
    assert b"connection: close" in reply.lower()
    assert raw(h1.port, b"GET /fine HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").startswith(
        b"HTTP/1.1 200"
    )


def test_chunked_body_over_the_limit(h1: Server) -> None:
    small = HttpLimits(max_body_bytes=1000)
    stream = BodyStream(small.max_body_bytes, lambda n: None)
    stream.feed(b"x" * 600)
    stream.feed(b"x" * 600)
    with pytest.raises(BodyTooLarge):
        asyncio.run(stream.read_all(10_000))


def test_slow_body_gets_408_and_slow_head_is_cut(h1: Server) -> None:
    with socket.create_connection(("127.0.0.1", h1.port), timeout=5) as s:
        s.sendall(b"POST /echo-hash HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc")
        t0 = time.monotonic()
        reply = s.recv(1000)
        assert reply.startswith(b"HTTP/1.1 408")
        assert 0.8 < time.monotonic() - t0 < 3
    with socket.create_connection(("127.0.0.1", h1.port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost")  # never finishes the head
        t0 = time.monotonic()
        assert s.recv(1000).startswith(b"HTTP/1.1 408")
        assert time.monotonic() - t0 < 3


def test_expect_100_continue(h1: Server) -> None:
    with socket.create_connection(("127.0.0.1", h1.port), timeout=5) as s:
        s.sendall(
            b"POST /echo-hash HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        assert s.recv(100).startswith(b"HTTP/1.1 100")
        s.sendall(b"hello")
        want = hashlib.sha256(b"hello").hexdigest().encode()
        reply = b""
        while want not in reply:
            chunk = s.recv(1000)
            if not chunk:
                break
            reply += chunk
        assert reply.startswith(b"HTTP/1.1 200") and want in reply


# ---------------------------------------------------------------- HTTP/2


def test_curl_http2(h2s: Server, tmp_path) -> None:  # type: ignore[no-untyped-def]
    # one URL per curl: Debian 12's curl 7.88.1 fails to reuse h2c connections (exit 16,
    # nginx too)
    out = curl(
        "--http2-prior-knowledge", "-w", " %{http_version}", f"http://127.0.0.1:{h2s.port}/x"
    )
    assert out.stdout == "ok /x 2", out.stderr
    blob = tmp_path / "blob"
    data = b"\x01\x02" * (5 << 20)
    blob.write_bytes(data)
    up = curl(
        "--http2-prior-knowledge",
        "--data-binary",
        f"@{blob}",
        f"http://127.0.0.1:{h2s.port}/echo-hash",
    )
    assert up.stdout == f"{len(data)} {hashlib.sha256(data).hexdigest()}"


class H2Client:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.conn.initiate_connection()
        self.flush()

    def flush(self) -> None:
        self.sock.sendall(self.conn.data_to_send())

    def events(self, until: type | tuple[type, ...], timeout: float = 5.0) -> list[h2.events.Event]:
        out: list[h2.events.Event] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                data = self.sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not data:
                break
            try:
                evs = self.conn.receive_data(data)
            except h2.exceptions.ProtocolError:
                break
            out += evs
            self.flush_quietly()
            if any(isinstance(e, until) for e in evs):
                break
        return out

    def flush_quietly(self) -> None:
        try:
            self.sock.sendall(self.conn.data_to_send())
        except OSError:
            pass

    def request(self, sid: int, path: str, end: bool = True) -> None:
        self.conn.send_headers(
            sid,
            [(":method", "GET"), (":path", path), (":scheme", "http"), (":authority", "x")],
            end_stream=end,
        )


def test_concurrent_streams(h2s: Server) -> None:
    c = H2Client(h2s.port)
    for sid in range(1, 20, 2):
        c.request(sid, f"/s{sid}")
    c.flush()
    done: set[int] = set()
    deadline = time.monotonic() + 5
    while len(done) < 10 and time.monotonic() < deadline:
        for e in c.events(h2.events.StreamEnded, 1):
            if isinstance(e, h2.events.StreamEnded):
                done.add(e.stream_id)
    assert done == set(range(1, 20, 2))


def _goaway(events: list[h2.events.Event]) -> int | None:
    for e in events:
        if isinstance(e, h2.events.ConnectionTerminated):
            return int(e.error_code or 0)
    return None


def test_rapid_reset_gets_enhance_your_calm(h2s: Server) -> None:
    c = H2Client(h2s.port)
    for sid in range(1, 2 * 80, 2):  # open and cancel at once, 80 times
        c.request(sid, "/slow", end=False)
        c.conn.reset_stream(sid)
    c.flush_quietly()
    assert _goaway(c.events(h2.events.ConnectionTerminated)) == 0xB  # ENHANCE_YOUR_CALM
    assert any(name == "h2_abuse" for name, _ in h2s.events)


def test_settings_and_ping_floods(h2s: Server) -> None:
    c = H2Client(h2s.port)
    for i in range(150):
        c.conn.ping(i.to_bytes(8, "big"))
    c.flush_quietly()
    assert _goaway(c.events(h2.events.ConnectionTerminated)) == 0xB
    c = H2Client(h2s.port)
    for _ in range(150):
        c.conn.update_settings({h2.settings.SettingCodes.MAX_FRAME_SIZE: 16384})
    c.flush_quietly()
    assert _goaway(c.events(h2.events.ConnectionTerminated)) == 0xB


def test_too_many_streams(h2s: Server) -> None:
    c = H2Client(h2s.port)
    for sid in range(1, 2 * 25, 2):  # 25 open streams over MAX_CONCURRENT_STREAMS 20
        c.request(sid, "/hold", end=False)
    c.flush_quietly()
    events = c.events(h2.events.ConnectionTerminated)
    refused = [e for e in events if isinstance(e, h2.events.StreamReset)]
    assert _goaway(events) is not None or refused


def test_huge_header_list_is_refused(h2s: Server) -> None:
    c = H2Client(h2s.port)
    c.conn.send_headers(
        1,
        [
            (":method", "GET"),
            (":path", "/"),
            (":scheme", "http"),
            (":authority", "x"),
            ("x-big", "v" * 20000),
        ],
        end_stream=True,
    )
    c.flush_quietly()
    events = c.events(h2.events.StreamEnded)
    status = [e.headers for e in events if isinstance(e, h2.events.ResponseReceived)]
    assert status and (b":status", b"431") in status[0]
    # and the server still serves a well-behaved client
    ok = curl("--http2-prior-knowledge", f"http://127.0.0.1:{h2s.port}/fine")
    assert ok.stdout == "ok /fine"


def test_h11_client_rejects_nothing_we_send(h1: Server) -> None:
    """Our responses are valid HTTP/1.1 as h11 (a strict peer) reads them."""
    c = h11.Connection(h11.CLIENT)
    with socket.create_connection(("127.0.0.1", h1.port), timeout=5) as s:
        s.sendall(c.send(h11.Request(method="GET", target="/z", headers=[("host", "x")])))
        s.sendall(c.send(h11.EndOfMessage()))
        events = []
        while True:
            e = c.next_event()
            if e is h11.NEED_DATA:
                c.receive_data(s.recv(65536))
                continue
            events.append(e)
            if isinstance(e, h11.EndOfMessage):
                break
    assert isinstance(events[0], h11.Response) and isinstance(events[1], h11.Data)
    assert events[0].status_code == 200 and bytes(events[1].data) == b"ok /z"


def test_both_framings_at_once_is_refused(h1: Server) -> None:
    reply = raw(
        h1.port,
        b"POST /echo-hash HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n0\r\n\r\n",
    )
    assert reply.startswith(b"HTTP/1.1 400")  # RFC 9112 §6.1: no smuggling room
    assert b"connection: close" in reply.lower()


def test_head_responses_have_no_body_and_keep_the_connection(h1: Server) -> None:
    reply = raw(
        h1.port,
        b"HEAD /x HTTP/1.1\r\nHost: x\r\n\r\nGET /y HTTP/1.1\r\nHost: x\r\n"
        b"Connection: close\r\n\r\n",
    )
    head, _, rest = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK") and b"content-length: 5" in head
    assert rest.startswith(b"HTTP/1.1 200 OK")  # no body bytes in between, connection kept
    assert rest.endswith(b"ok /y")


def test_empty_host_is_refused(h1: Server) -> None:
    assert raw(h1.port, b"GET / HTTP/1.1\r\nHost:\r\n\r\n").startswith(b"HTTP/1.1 400")
    assert raw(h1.port, b"GET / HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.1 200")  # 1.0: optional


# ---------------------------------------------------------------- targets and hosts
def test_the_handler_sees_the_canonical_path(h1: Server) -> None:
    reply = raw(
        h1.port,
        b"GET /x/..//%6cogin/./a%2fb?q=%2e HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b"ok /login/a%2Fb")


@pytest.mark.parametrize(
    "head",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n",
        b"GET / HTTP/1.1\r\nHost: x, for=6.6.6.6\r\n",
        b'GET / HTTP/1.1\r\nHost: x";for=6.6.6.6\r\n',
        b"GET / HTTP/1.1\r\nHost: u@x\r\n",
        b"GET https://internal.example/secret HTTP/1.1\r\nHost: x\r\n",
        b"GET https://u@x/ HTTP/1.1\r\nHost: x\r\n",
        b"GET /%zz HTTP/1.1\r\nHost: x\r\n",
        b"GET /a%00 HTTP/1.1\r\nHost: x\r\n",
        b"GET x.test:443 HTTP/1.1\r\nHost: x\r\n",
        b"GET * HTTP/1.1\r\nHost: x\r\n",
    ],
)
def test_bad_hosts_and_targets_are_400(h1: Server, head: bytes) -> None:
    reply = raw(h1.port, head + b"\r\n")
    assert reply.startswith(b"HTTP/1.1 400"), reply[:80]
    assert any(name == "bad_request" for name, _ in h1.events)


def test_absolute_form_is_served_as_origin_form(h1: Server) -> None:
    reply = raw(
        h1.port, b"GET http://X:80/a/../b?c HTTP/1.1\r\nHost: x:80\r\nConnection: close\r\n\r\n"
    )
    assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b"ok /b")


def _h2_status(port: int, headers: list[tuple[str, str]]) -> tuple[bytes, bytes]:
    c = H2Client(port)
    c.conn.config.validate_outbound_headers = False  # send what a hostile client would
    c.conn.send_headers(1, headers, end_stream=True)
    c.flush()
    status, body = b"", b""
    for e in c.events((h2.events.StreamEnded, h2.events.StreamReset)):
        if isinstance(e, h2.events.ResponseReceived):
            status = dict(e.headers)[b":status"]
        elif isinstance(e, h2.events.DataReceived):
            body += e.data
    return status, body


def test_h2_authority_and_path_are_checked(h2s: Server) -> None:
    base = [(":method", "GET"), (":scheme", "http")]
    ok = _h2_status(h2s.port, [*base, (":path", "/a/./../%62"), (":authority", "x")])
    assert ok == (b"200", b"ok /b")
    # RFC 9113 §8.3.1: h2's validator refuses a Host that differs from :authority, two Hosts,
    # or none (that stream is reset; our own checks stand behind it)
    for refused in (
        [(":path", "/"), (":authority", "x"), ("host", "y")],
        [(":path", "/"), ("host", "x"), ("host", "x")],
        [(":path", "/")],
    ):
        assert _h2_status(h2s.port, [*base, *refused])[0] == b"", refused
    for bad in (
        [(":path", "/"), (":authority", "x,for=6.6.6.6")],
        [(":path", "/"), ("host", 'x";for=6.6.6.6')],
        [(":path", "https://x/"), (":authority", "x")],  # :path is origin-form
        [(":path", "/%"), (":authority", "x")],
    ):
        assert _h2_status(h2s.port, [*base, *bad])[0] == b"400", bad


def _resets_and_status_until(c: H2Client, sid: int) -> tuple[dict[int, int], dict[int, bytes]]:
    """Stream resets (error codes) and response statuses, until stream `sid` is answered; a
    GOAWAY fails the test."""
    resets: dict[int, int] = {}
    status: dict[int, bytes] = {}
    deadline = time.monotonic() + 5
    while sid not in status and time.monotonic() < deadline:
        for e in c.events(h2.events.StreamEnded, 1):
            if isinstance(e, h2.events.StreamReset):
                resets[e.stream_id] = int(e.error_code)
            elif isinstance(e, h2.events.ResponseReceived):
                status[e.stream_id] = dict(e.headers)[b":status"]
            elif isinstance(e, h2.events.ConnectionTerminated):
                pytest.fail(f"the whole connection was closed: {e}")
    return resets, status


@pytest.mark.parametrize(
    "malformed",
    [
        [(":path", "/"), (":authority", "x"), ("host", "y")],
        [(":path", "/"), ("host", "x"), ("host", "x")],
        [(":path", "/")],
        [(":path", "/"), (":authority", "x"), ("connection", "keep-alive")],
    ],
)
def test_h2_a_malformed_request_resets_its_stream_only(
    h2s: Server, malformed: list[tuple[str, str]]
) -> None:
    """RFC 9113 §8.1.1: a malformed request is a stream error (PROTOCOL_ERROR), not a
    connection error: the connection and its other streams go on."""
    c = H2Client(h2s.port)
    c.conn.config.validate_outbound_headers = False  # send what a hostile client would
    c.conn.config.normalize_outbound_headers = False  # (h2 would drop a Connection field)
    c.conn.send_headers(1, [(":method", "GET"), (":scheme", "http"), *malformed], end_stream=True)
    c.request(3, "/after")
    c.flush()
    resets, status = _resets_and_status_until(c, 3)
    assert resets == {1: int(h2.errors.ErrorCodes.PROTOCOL_ERROR)}
    assert status == {3: b"200"}
    assert any(name == "bad_request" for name, _ in h2s.events)


def test_h2_malformed_trailers_reset_their_stream_only(h2s: Server) -> None:
    c = H2Client(h2s.port)
    c.conn.config.validate_outbound_headers = False
    c.conn.config.normalize_outbound_headers = False
    head = [(":method", "POST"), (":scheme", "http"), (":path", "/"), (":authority", "x")]
    c.conn.send_headers(1, head)
    c.conn.send_data(1, b"body")
    c.conn.send_headers(1, [(":path", "/smuggled")], end_stream=True)  # no pseudo-headers here
    c.request(3, "/after")
    c.flush()
    resets, status = _resets_and_status_until(c, 3)
    assert resets.get(1) == int(h2.errors.ErrorCodes.PROTOCOL_ERROR)
    assert status.get(3) == b"200"


def _request(client: str, authority: bytes, headers: list[tuple[bytes, bytes]]) -> Request:
    return Request(
        method=b"GET",
        target=b"/",
        authority=authority,
        scheme=b"https",
        headers=headers,
        http_version="1.1",
        client=(client, 1),
        server=("127.0.0.1", 443),
        request_id="r1",
    )


def test_forwarding_headers_are_ours_alone_and_quoted() -> None:
    from blindfold.web.proxy import upstream_headers

    sent = [
        (b"x_forwarded_for", b"6.6.6.6"),
        (b"x-forwarded-port", b"1"),
        (b"x_real_ip", b"6.6.6.6"),
        (b"forwarded", b"for=6.6.6.6"),
        (b"x-request_id", b"forged"),
        (b"accept", b"*/*"),
    ]
    out = upstream_headers(_request("2001:db8::1", b"[2001:db8::5]:443", sent))
    assert out == [
        (b"accept", b"*/*"),
        (b"x-forwarded-host", b"[2001:db8::5]:443"),
        (b"host", b"[2001:db8::5]:443"),
        (b"x-forwarded-for", b"2001:db8::1"),
        (b"x-forwarded-proto", b"https"),
        (b"forwarded", b'for="[2001:db8::1]";proto=https;host="[2001:db8::5]:443"'),  # RFC 7239
        (b"x-request-id", b"r1"),
    ]
