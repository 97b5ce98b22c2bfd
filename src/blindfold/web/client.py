"""HTTP/1.1 client for upstreams (h11), with a pool of keep-alive connections.

Upstreams are `http://host:port`, `https://host:port` (verified against the given TLS
context: never plaintext by accident, never unverified) or `unix:/path/to.sock`. Bodies are
streamed both ways; every wait has a deadline.

A pool may cap the connections it holds open (`max_open`: in use, idle or connecting) and
share a second cap with other pools (`SharedCap`, e.g. every pool of one client address).
A request that finds no free connection waits its turn (first come, first served) until
`queue_timeout_s`, then fails with `UpstreamBusy`; connections and free slots are handed
straight to the first waiter, and idle connections of the other pools sharing a cap are closed
when someone waits for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Literal, TypeVar
from urllib.parse import urlsplit

import h11
import httptools  # type: ignore[import-untyped]

from blindfold.errors import UpstreamError
from blindfold.web.messages import Headers

READ_CHUNK = 65536
T = TypeVar("T")


class UpstreamBusy(UpstreamError):
    """No upstream connection came free under the pool's caps within its queue deadline (the
    upstream itself was not tried): a 503 for the visitor, not a 502."""

    def __init__(self, reason: str = "busy", detail: str = "", *, status: int = 503) -> None:
        super().__init__(reason, detail, status=status)


@dataclass(frozen=True, slots=True)
class UpstreamTarget:
    scheme: str  # "http" | "https" | "unix"
    host: str
    port: int
    path: str  # unix socket path
    authority: bytes  # Host header value when the request has none

    @classmethod
    def parse(cls, url: str) -> UpstreamTarget:
        if url.startswith("unix:"):
            path = url[5:]
            if not path.startswith("/"):
                raise ValueError(f"{url!r}: write unix:/absolute/path.sock")
            return cls("unix", "", 0, path, b"localhost")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{url!r}: expected http://host:port, https://host:port or unix:/path")
        if parts.path not in ("", "/") or parts.query:
            raise ValueError(f"{url!r}: an upstream has no path or query")
        if "@" in parts.netloc:
            raise ValueError(f"{url!r}: no user name or password in an upstream URL")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return cls(parts.scheme, parts.hostname, port, "", parts.netloc.encode())


class _Conn:
    __slots__ = ("closed", "h11", "pool", "reader", "reusable", "writer")

    def __init__(
        self, pool: UpstreamPool, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.pool = pool
        self.reader = reader
        self.writer = writer
        # the httptools parser (pool.parser == "httptools") keeps no state across exchanges:
        # a response that ended cleanly, framed by its own length, sets `reusable`
        self.h11: h11.Connection | None = (
            h11.Connection(h11.CLIENT, max_incomplete_event_size=65536)
            if pool.parser == "h11"
            else None
        )
        self.reusable = False
        self.closed = False

    def usable(self) -> bool:
        return not self.reader.at_eof() and not self.writer.is_closing()

    def close(self, keep_slot: bool = False) -> None:
        """Close it; its slots (pool, shared cap) go to the next waiter, unless `keep_slot`:
        a replacement connection takes them over."""
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(Exception):
            self.writer.close()
        if not keep_slot:
            self.pool._conn_gone()


class SharedCap:
    """At most `limit` connections open at once across the pools that share this cap (the
    pools of one client address). Freed slots go to waiting pools in order; a pool that must
    wait first has an idle connection of another pool closed to make room."""

    __slots__ = ("_table", "_waiters", "key", "open", "pools")

    def __init__(self, table: SharedCaps, key: Hashable) -> None:
        self._table = table
        self.key = key
        self.open = 0
        self.pools: set[UpstreamPool] = set()
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def limit(self) -> int:
        return self._table.limit

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def acquire(self, deadline: float) -> None:
        """One slot, by the loop time `deadline` (TimeoutError otherwise)."""
        if self.open < self.limit and not self._waiters:
            self.open += 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        self._reclaim_idle()
        await _wait_turn(fut, self._waiters, deadline, lambda _: self.release())

    def release(self) -> None:
        """A slot comes free: to the first waiter, which then holds it."""
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return
        self.open -= 1
        self._table._forget_if_unused(self)

    def leave(self, pool: UpstreamPool) -> None:
        self.pools.discard(pool)
        self._table._forget_if_unused(self)

    def _reclaim_idle(self) -> None:
        for pool in self.pools:
            if pool._idle:
                pool._idle.pop(0).close()  # its slot goes to the first waiter
                return


class SharedCaps:
    """One `SharedCap` per key (a client address), made on first use and forgotten when no
    pool, connection or waiter uses it."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._caps: dict[Hashable, SharedCap] = {}

    def join(self, key: Hashable, pool: UpstreamPool) -> SharedCap:
        cap = self._caps.get(key)
        if cap is None:
            cap = self._caps[key] = SharedCap(self, key)
        cap.pools.add(pool)
        return cap

    def get(self, key: Hashable) -> SharedCap | None:
        return self._caps.get(key)

    def __len__(self) -> int:
        return len(self._caps)

    def _forget_if_unused(self, cap: SharedCap) -> None:
        if not cap.open and not cap.pools and not cap._waiters and self._caps.get(cap.key) is cap:
            del self._caps[cap.key]


async def _wait_turn(
    fut: asyncio.Future[T],
    waiters: deque[asyncio.Future[T]],
    deadline: float,
    give_back: Callable[[T], None],
) -> T:
    """Wait for `fut` (queued in `waiters`) until `deadline`. Whatever it was handed after we
    gave up (timeout, cancellation) is passed on with `give_back`."""
    try:
        async with asyncio.timeout_at(deadline):
            return await fut
    except BaseException:
        if fut.done() and not fut.cancelled() and fut.exception() is None:
            give_back(fut.result())
        else:
            fut.cancel()
            with contextlib.suppress(ValueError):
                waiters.remove(fut)
        raise


# interim responses passed on per request; an origin may send more, they are dropped
MAX_INTERIM = 8
InterimCallback = Callable[[int, Headers], Awaitable[None]]


# RFC 9110 §5.6.2 token, and what h11 accepts when it sends: a request target of visible ASCII,
# a field value of visible characters (and obs-text) with single spaces/tabs inside only
_TOKEN = re.compile(rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+")
_TARGET = re.compile(rb"[\x21-\x7e]+")
_VALUE = re.compile(rb"(?:[\x21-\x7e\x80-\xff]+(?:[ \t]+[\x21-\x7e\x80-\xff]+)*)?")


class _Bad(Exception):
    """A response the client refuses although llhttp takes it."""


class _Stop(Exception):
    """Stops the parser: at the end of a HEAD response's head (it has no body), or at the start
    of anything after the final response's end."""


class _H1Response:
    """httptools' callbacks for one exchange: interim heads, the final head, body chunks, the
    end. A fresh parser per exchange: nothing of one response can frame the next, and a byte
    after the end (a body longer than its Content-Length) retires the connection."""

    __slots__ = (
        "chunks",
        "complete",
        "eof_body",
        "extra",
        "head_done",
        "head_only",
        "headers",
        "interim",
        "keep_alive",
        "parser",
        "status",
        "version",
    )

    def __init__(self, head_only: bool) -> None:
        self.head_only = head_only
        self.parser = httptools.HttpResponseParser(self)
        self.headers: Headers = []
        self.interim: list[tuple[int, Headers]] = []
        self.chunks: list[bytes] = []
        self.status = 0
        self.version = b"1.1"
        self.head_done = False
        self.complete = False
        self.eof_body = False  # framed by the end of the connection (no length, not chunked)
        self.extra = False
        self.keep_alive = False

    # httptools callbacks
    def on_message_begin(self) -> None:
        if self.complete:
            raise _Stop()  # bytes past the end: never parsed, never the next response
        self.headers = []

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.head_done:  # trailer fields are dropped, as h11 does
            self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        p = self.parser
        status = p.get_status_code()
        if 100 <= status < 200:
            self.interim.append((status, self.headers))
            return
        codings = [v for n, v in self.headers if n == b"transfer-encoding"]
        if codings and (len(codings) > 1 or codings[0].lower() != b"chunked"):
            # as h11: a coding other than chunked would reach the client undone and unnamed
            # (Transfer-Encoding is hop-by-hop)
            raise _Bad("only Transfer-Encoding: chunked is supported")
        self.status = status
        self.version = p.get_http_version().encode()
        self.keep_alive = bool(p.should_keep_alive())  # read here: llhttp resets it at the end
        self.head_done = True
        if self.head_only:
            self.complete = True
            raise _Stop()
        if status not in (204, 304):
            names = {n for n, _ in self.headers}
            self.eof_body = b"content-length" not in names and b"transfer-encoding" not in names

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)

    def on_message_complete(self) -> None:
        if self.head_done:
            self.complete = True

    def feed(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            if self.complete and isinstance(exc.__context__, _Stop):
                # bytes past the end, or a HEAD response's head ended somewhere in `data`
                # (where is not known): either way the connection is retired
                self.extra = True
                return
            if isinstance(exc.__context__, _Bad):
                exc = exc.__context__
            raise UpstreamError("bad_response", f"upstream protocol error: {exc}") from None
        except httptools.HttpParserUpgrade:
            raise UpstreamError(
                "bad_response", "upstream protocol error: switching protocols unasked"
            ) from None
        except httptools.HttpParserError as exc:
            if self.complete:
                self.extra = True  # bytes after the end: never the next response
                return
            raise UpstreamError("bad_response", f"upstream protocol error: {exc}") from None

    def reusable(self) -> bool:
        return (
            self.complete
            and not self.extra
            and not self.eof_body
            and not self.head_only
            and self.keep_alive
        )


class UpstreamResponse:
    """Status and headers at once; the body as an async iterator of chunks. The connection goes
    back to the pool when the body has been read to the end, and is closed otherwise."""

    def __init__(
        self,
        pool: UpstreamPool,
        conn: _Conn,
        status: int,
        headers: Headers,
        http_version: bytes,
        fast: _H1Response | None = None,
    ) -> None:
        self._pool = pool
        self._conn: _Conn | None = conn
        self._fast = fast
        self.status = status
        self.headers = headers
        self.http_version = http_version

    async def _fast_body(self, conn: _Conn, rsp: _H1Response) -> AsyncIterator[bytes]:
        while True:
            if rsp.chunks:
                chunks, rsp.chunks = rsp.chunks, []
                for chunk in chunks:
                    yield chunk
            if rsp.complete:
                conn.reusable = rsp.reusable()
                self._release()
                return
            data = await self._pool._read(conn)
            if not data:
                if rsp.eof_body:
                    rsp.complete = True
                    continue
                raise UpstreamError(  # the reason h11's RemoteProtocolError gives
                    "bad_response",
                    "upstream response malformed: closed inside the response body",
                )
            rsp.feed(data)

    async def body(self) -> AsyncIterator[bytes]:
        conn = self._conn
        assert conn is not None
        if self._fast is not None:
            try:
                async for chunk in self._fast_body(conn, self._fast):
                    yield chunk
            finally:
                self.close()
            return
        assert conn.h11 is not None
        try:
            while True:
                event = conn.h11.next_event()
                if event is h11.NEED_DATA:
                    data = await self._pool._read(conn)
                    conn.h11.receive_data(data)
                    continue
                if isinstance(event, h11.Data):
                    yield bytes(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    self._release()
                    return
                elif isinstance(event, h11.ConnectionClosed):
                    raise UpstreamError("closed", "upstream closed inside the response body")
        except h11.RemoteProtocolError as exc:
            raise UpstreamError("bad_response", f"upstream response malformed: {exc}") from None
        finally:
            self.close()

    def _release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._pool._release(conn)

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


class UpstreamPool:
    def __init__(
        self,
        url: str,
        *,
        max_idle: int = 32,
        connect_timeout_s: float = 5.0,
        timeout_s: float = 60.0,
        tls: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        connector: Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]
        | None = None,
        max_open: int | None = None,
        shared: SharedCap | None = None,
        queue_timeout_s: float = 10.0,
        parser: Literal["h11", "httptools"] = "h11",
    ) -> None:
        """`connector`, when given, opens connections instead (an edge choosing among its
        origins, sending a PROXY header, checking a certificate pin); it raises UpstreamError.
        `max_open` caps this pool's open connections, `shared` (joined by the caller) caps
        them together with other pools'; a request waits at most `queue_timeout_s` for one.
        `parser`: "httptools" writes requests itself (checked as h11 checks them) and parses
        responses with llhttp, ~9x fewer instructions per exchange than h11; the same
        framing rules (tests/unit/test_upstream_pool.py runs both)."""
        self.parser = parser
        self.target = UpstreamTarget.parse(url)
        self.connector = connector
        if self.target.scheme == "https" and tls is None:
            raise ValueError("an https upstream needs a TLS context that verifies it")
        self.tls = tls
        self.server_hostname = server_hostname or self.target.host
        self.max_idle = max_idle if max_open is None else min(max_idle, max_open)
        self.connect_timeout_s = connect_timeout_s
        self.timeout_s = timeout_s
        self.max_open = max_open
        self.shared = shared
        self.queue_timeout_s = queue_timeout_s
        self._idle: list[_Conn] = []
        # each waiter is handed a connection, or None: a slot of this pool, to connect with
        self._waiters: deque[asyncio.Future[_Conn | None]] = deque()
        self.open = 0  # slots taken: connections in use, idle, opening or awaiting `shared`
        self.opened = 0
        self.closed = False

    async def _connect(self) -> _Conn:
        t = self.target
        if self.connector is not None:
            reader, writer = await self.connector()
            self.opened += 1
            return _Conn(self, reader, writer)
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                if t.scheme == "unix":
                    reader, writer = await asyncio.open_unix_connection(t.path, limit=READ_CHUNK)
                else:
                    reader, writer = await asyncio.open_connection(
                        t.host,
                        t.port,
                        ssl=self.tls if t.scheme == "https" else None,
                        server_hostname=self.server_hostname if t.scheme == "https" else None,
                        limit=READ_CHUNK,
                    )
        except TimeoutError:
            raise UpstreamError("connect_timeout", status=504) from None
        except ssl.SSLError as exc:
            raise UpstreamError("tls_failed", f"tls: {exc.reason or exc}") from None
        except OSError as exc:
            raise UpstreamError("connect_failed", f"connect: {exc.strerror or exc}") from None
        self.opened += 1
        return _Conn(self, reader, writer)

    async def _acquire(self) -> tuple[_Conn, bool]:
        """A connection: an idle one, one handed over by a request that finished, or a new
        one once this pool (and its shared cap) has a slot for it."""
        if self.closed:
            raise UpstreamError("pool_closed", "upstream pool closed")
        while self._idle:
            conn = self._idle.pop()
            if conn.usable():
                return conn, True
            conn.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.queue_timeout_s
        try:
            if self.max_open is None or (self.open < self.max_open and not self._waiters):
                self.open += 1
            else:
                fut: asyncio.Future[_Conn | None] = loop.create_future()
                self._waiters.append(fut)
                handed = await _wait_turn(fut, self._waiters, deadline, self._give_back)
                if handed is not None:
                    return handed, True
            # this pool's slot is ours; the shared one next
            if self.shared is not None:
                try:
                    await self.shared.acquire(deadline)
                except BaseException:
                    self._slot_free()
                    raise
        except TimeoutError:
            raise UpstreamBusy(
                "busy", f"no upstream connection free within {self.queue_timeout_s:g} s"
            ) from None
        try:
            return await self._connect(), False
        except BaseException:
            self._conn_gone()
            raise

    def _give_back(self, handed: _Conn | None) -> None:
        """A waiter that gave up had been handed this: to the next one."""
        if handed is None:
            self._slot_free()
        else:
            self._release(handed)

    def _release(self, conn: _Conn) -> None:
        """A request is done with `conn`: to the first waiter, else idle, else closed."""
        c = conn.h11
        if (
            self.closed
            or not conn.usable()
            or (c is None and not conn.reusable)
            or (
                c is not None
                and (
                    c.our_state is not h11.DONE
                    or c.their_state is not h11.DONE
                    # bytes past the end of the response (a body longer than its
                    # Content-Length): reused, they would be read as the next response
                    or c.trailing_data[0]
                )
            )
        ):
            conn.close()
            return
        if c is not None:
            c.start_next_cycle()
        conn.reusable = False
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(conn)
                return
        if len(self._idle) < self.max_idle and not (self.shared and self.shared.waiting):
            self._idle.append(conn)
        else:
            conn.close()  # another pool of the same cap waits for a slot: it gets this one

    def _conn_gone(self) -> None:
        """A connection (or an attempt) closed: its slots go to the next waiters."""
        if self.shared is not None:
            self.shared.release()
        self._slot_free()

    def _slot_free(self) -> None:
        while self._waiters and not self.closed:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return
        self.open -= 1

    async def _read(self, conn: _Conn, deadline: float | None = None) -> bytes:
        """One read, within `timeout_s`, and before `deadline` (loop time) when given."""
        loop = asyncio.get_running_loop()
        when = loop.time() + self.timeout_s
        if deadline is not None and deadline < when:
            when = deadline
        # asyncio.timeout_at, not wait_for: wait_for wraps every read in a new task
        try:
            async with asyncio.timeout_at(when):
                return await conn.reader.read(READ_CHUNK)
        except TimeoutError:
            if deadline is not None and when == deadline:
                raise UpstreamError(
                    "timeout", "no final response from the upstream in time", status=504
                ) from None
            raise UpstreamError(
                "timeout", "no bytes from the upstream in time", status=504
            ) from None
        except OSError as exc:
            raise UpstreamError("read_failed", f"read: {exc.strerror or exc}") from None

    async def _write(self, conn: _Conn, data: bytes | bytearray | None) -> None:
        if not data:
            return
        conn.writer.write(data)
        transport = conn.writer.transport
        if transport.get_write_buffer_size() <= transport.get_write_buffer_limits()[1]:
            return  # not paused: nothing to wait for
        try:
            async with asyncio.timeout(self.timeout_s):
                await conn.writer.drain()
        except TimeoutError:
            raise UpstreamError(
                "timeout", "the upstream took no bytes in time", status=504
            ) from None
        except OSError as exc:
            raise UpstreamError("write_failed", f"write: {exc.strerror or exc}") from None

    async def request(
        self,
        method: bytes,
        target: bytes,
        headers: Headers,
        body: AsyncIterator[bytes] | None,
        on_interim: InterimCallback | None = None,
    ) -> UpstreamResponse:
        """Send a request and return once the response head has arrived. A reused
        connection that turns out dead before anything was read is retried once on a fresh
        one, which is safe because the request never reached the application. Interim (1xx)
        responses before it go to `on_interim` (status, headers), at most MAX_INTERIM of them;
        101 is never passed on (this client does not switch protocols)."""
        conn, reused = await self._acquire()
        try:
            return await self._exchange(conn, method, target, headers, body, on_interim)
        except _Stale:
            if not reused:
                conn.close()
                raise UpstreamError("closed", "upstream closed the connection") from None
            conn.close(keep_slot=True)  # the new connection takes its place
            try:
                conn = await self._connect()
            except BaseException:
                self._conn_gone()
                raise
            try:
                return await self._exchange(conn, method, target, headers, body, on_interim)
            except _Stale:  # the fresh one closed without a byte too: the upstream's answer
                conn.close()
                raise UpstreamError("closed", "upstream closed the connection") from None

    async def _exchange(
        self,
        conn: _Conn,
        method: bytes,
        target: bytes,
        headers: Headers,
        body: AsyncIterator[bytes] | None,
        on_interim: InterimCallback | None = None,
    ) -> UpstreamResponse:
        if conn.h11 is None:
            return await self._exchange_fast(conn, method, target, headers, body, on_interim)
        assert conn.h11 is not None
        try:
            # the head, and the body as far as it is in hand, go out in one write
            out = bytearray(
                conn.h11.send(h11.Request(method=method, target=target, headers=headers)) or b""
            )
            if body is not None:
                async for chunk in body:
                    out += conn.h11.send(h11.Data(data=chunk)) or b""
                    if len(out) >= READ_CHUNK:
                        await self._write_or_stale(conn, out)
                        out = bytearray()
            out += conn.h11.send(h11.EndOfMessage()) or b""
            await self._write_or_stale(conn, out)
            got_bytes = False
            interim = 0
            # the final response's head within timeout_s in all: an origin that keeps sending
            # interim responses (or drips its head) does not hold the request open for ever
            head_deadline = asyncio.get_running_loop().time() + self.timeout_s
            while True:
                event = conn.h11.next_event()
                if event is h11.NEED_DATA:
                    data = await self._read(conn, head_deadline)
                    if not data and not got_bytes and body is None:
                        raise _Stale()
                    got_bytes = got_bytes or bool(data)
                    conn.h11.receive_data(data)
                    continue
                if isinstance(event, h11.InformationalResponse):
                    interim += 1
                    if (
                        on_interim is not None
                        and event.status_code != 101
                        and interim <= MAX_INTERIM
                    ):
                        await on_interim(event.status_code, list(event.headers))
                    continue
                if isinstance(event, h11.Response):
                    return UpstreamResponse(
                        self, conn, event.status_code, list(event.headers), event.http_version
                    )
                if isinstance(event, h11.ConnectionClosed):
                    raise UpstreamError("closed", "upstream closed without a response")
        except _Stale:
            raise  # the caller closes it, keeping its slot for the retry
        except (h11.RemoteProtocolError, h11.LocalProtocolError) as exc:
            conn.close()
            raise UpstreamError("bad_response", f"upstream protocol error: {exc}") from None
        except BaseException:
            conn.close()
            raise

    async def _exchange_fast(
        self,
        conn: _Conn,
        method: bytes,
        target: bytes,
        headers: Headers,
        body: AsyncIterator[bytes] | None,
        on_interim: InterimCallback | None = None,
    ) -> UpstreamResponse:
        try:
            out, framing, length = _encode_head(method, target, headers)
            sent = 0
            wrote = False
            if body is not None:
                async for chunk in body:
                    if not chunk:
                        continue
                    sent += len(chunk)
                    if framing == "chunked":
                        out += b"%x\r\n" % len(chunk)
                        out += chunk
                        out += b"\r\n"
                    elif sent > length:
                        raise UpstreamError(
                            "bad_response",
                            "upstream protocol error: Too much data for declared Content-Length",
                        )
                    else:
                        out += chunk
                    if len(out) >= READ_CHUNK:
                        await self._write_or_stale(conn, out, False)
                        out = bytearray()
                        wrote = True
            if framing == "chunked":
                out += b"0\r\n\r\n"
            elif sent < length:
                raise UpstreamError(
                    "bad_response",
                    "upstream protocol error: Too little data for declared Content-Length",
                )
            await self._write_or_stale(conn, out, not wrote)
            rsp = _H1Response(head_only=method == b"HEAD")
            got_bytes = False
            interim = 0
            head_deadline = asyncio.get_running_loop().time() + self.timeout_s
            while True:
                if rsp.interim:
                    pending, rsp.interim = rsp.interim, []
                    for status, head in pending:
                        interim += 1
                        if on_interim is not None and interim <= MAX_INTERIM:
                            await on_interim(status, head)
                if rsp.head_done:
                    return UpstreamResponse(
                        self, conn, rsp.status, rsp.headers, rsp.version, fast=rsp
                    )
                data = await self._read(conn, head_deadline)
                if not data:
                    if not got_bytes and body is None:
                        raise _Stale()
                    raise UpstreamError("closed", "upstream closed without a response")
                got_bytes = True
                rsp.feed(data)
        except _Stale:
            raise  # the caller closes it, keeping its slot for the retry
        except BaseException:
            conn.close()
            raise

    async def _write_or_stale(
        self, conn: _Conn, data: bytearray, whole: bool | None = None
    ) -> None:
        """`whole`: `data` is the whole request (h11 connections know it themselves)."""
        if whole is None:
            assert conn.h11 is not None
            whole = conn.h11.our_state is h11.DONE
        first = whole and conn.writer.transport.get_write_buffer_size() == 0
        try:
            await self._write(conn, data)
        except UpstreamError:
            if first:
                raise _Stale() from None
            raise

    def close(self) -> None:
        """Close the idle connections; those in use close when their requests end, and
        waiters fail."""
        self.closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_exception(UpstreamError("pool_closed", "upstream pool closed"))
        if self.shared is not None:
            self.shared.leave(self)


def _encode_head(method: bytes, target: bytes, headers: Headers) -> tuple[bytearray, str, int]:
    """A request head as h11 would write it, refusing what h11 refuses to send; and the body's
    framing ("chunked", "length" or "none") and declared length."""
    if not _TOKEN.fullmatch(method):
        raise UpstreamError("bad_response", f"upstream protocol error: bad method {method!r}")
    if not _TARGET.fullmatch(target):
        raise UpstreamError("bad_response", "upstream protocol error: bad request target")
    out = bytearray(method + b" " + target + b" HTTP/1.1\r\n")
    length: bytes | None = None
    chunked = False
    host = False
    for name, value in headers:
        if not _TOKEN.fullmatch(name) or not _VALUE.fullmatch(value):
            raise UpstreamError("bad_response", f"upstream protocol error: bad header {name!r}")
        low = name.lower()
        if low == b"content-length":
            if not value.isdigit() or (length is not None and value != length):
                raise UpstreamError("bad_response", "upstream protocol error: bad Content-Length")
            if length is not None:
                continue  # one copy, as h11 merges equal ones
            length = value
        elif low == b"transfer-encoding":
            if value.lower() != b"chunked" or chunked:
                raise UpstreamError(
                    "bad_response", "upstream protocol error: only Transfer-Encoding: chunked"
                )
            chunked = True
        elif low == b"host":
            host = True
        out += name + b": " + value + b"\r\n"
    if not host:
        raise UpstreamError("bad_response", "upstream protocol error: Missing mandatory Host")
    if chunked and length is not None:
        raise UpstreamError(
            "bad_response", "upstream protocol error: both Content-Length and Transfer-Encoding"
        )
    out += b"\r\n"
    if chunked:
        return out, "chunked", 0
    return out, ("length" if length is not None else "none"), int(length or b"0")


class _Stale(Exception):
    """A pooled connection was already closed by the upstream."""
