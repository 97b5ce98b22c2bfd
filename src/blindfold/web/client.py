"""HTTP/1.1 client for upstreams (h11), with a pool of keep-alive connections.

Upstreams are `http://host:port`, `https://host:port` (verified against the given TLS
context: never plaintext by accident, never unverified) or `unix:/path/to.sock`. Bodies are
streamed both ways; every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import h11

from blindfold.errors import UpstreamError
from blindfold.web.messages import Headers

READ_CHUNK = 65536


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
    __slots__ = ("h11", "reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=65536)

    def usable(self) -> bool:
        return not self.reader.at_eof() and not self.writer.is_closing()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


class UpstreamResponse:
    """Status and headers at once; the body as an async iterator of chunks. The connection goes
    back to the pool when the body has been read to the end, and is closed otherwise."""

    def __init__(
        self, pool: UpstreamPool, conn: _Conn, status: int, headers: Headers, http_version: bytes
    ) -> None:
        self._pool = pool
        self._conn: _Conn | None = conn
        self.status = status
        self.headers = headers
        self.http_version = http_version

    async def body(self) -> AsyncIterator[bytes]:
        conn = self._conn
        assert conn is not None
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
                    raise UpstreamError("upstream closed inside the response body")
        except h11.RemoteProtocolError as exc:
            raise UpstreamError(f"upstream response malformed: {exc}") from None
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
    ) -> None:
        """`connector`, when given, opens connections instead (an edge choosing among its
        origins, sending a PROXY header, checking a certificate pin); it raises UpstreamError."""
        self.target = UpstreamTarget.parse(url)
        self.connector = connector
        if self.target.scheme == "https" and tls is None:
            raise ValueError("an https upstream needs a TLS context that verifies it")
        self.tls = tls
        self.server_hostname = server_hostname or self.target.host
        self.max_idle = max_idle
        self.connect_timeout_s = connect_timeout_s
        self.timeout_s = timeout_s
        self._idle: list[_Conn] = []
        self.opened = 0

    async def _connect(self) -> _Conn:
        t = self.target
        if self.connector is not None:
            reader, writer = await self.connector()
            self.opened += 1
            return _Conn(reader, writer)
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
            raise UpstreamError("connect_timeout") from None
        except ssl.SSLError as exc:
            raise UpstreamError(f"tls: {exc.reason or exc}") from None
        except OSError as exc:
            raise UpstreamError(f"connect: {exc.strerror or exc}") from None
        self.opened += 1
        return _Conn(reader, writer)

    async def _acquire(self) -> tuple[_Conn, bool]:
        while self._idle:
            conn = self._idle.pop()
            if conn.usable():
                return conn, True
            conn.close()
        return await self._connect(), False

    def _release(self, conn: _Conn) -> None:
        if (
            conn.h11.our_state is h11.DONE
            and conn.h11.their_state is h11.DONE
            and len(self._idle) < self.max_idle
            and conn.usable()
        ):
            conn.h11.start_next_cycle()
            self._idle.append(conn)
        else:
            conn.close()

    async def _read(self, conn: _Conn) -> bytes:
        # asyncio.timeout, not wait_for: wait_for wraps every read in a new task
        try:
            async with asyncio.timeout(self.timeout_s):
                return await conn.reader.read(READ_CHUNK)
        except TimeoutError:
            raise UpstreamError("timeout") from None
        except OSError as exc:
            raise UpstreamError(f"read: {exc.strerror or exc}") from None

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
            raise UpstreamError("timeout") from None
        except OSError as exc:
            raise UpstreamError(f"write: {exc.strerror or exc}") from None

    async def request(
        self, method: bytes, target: bytes, headers: Headers, body: AsyncIterator[bytes] | None
    ) -> UpstreamResponse:
        """Send a request and return once the response head has arrived. A reused
        connection that turns out dead before anything was read is retried once on a fresh
        one, which is safe because the request never reached the application."""
        conn, reused = await self._acquire()
        try:
            return await self._exchange(conn, method, target, headers, body)
        except _Stale:
            conn.close()
            if not reused:
                raise UpstreamError("upstream closed the connection") from None
            conn = await self._connect()
            return await self._exchange(conn, method, target, headers, body)

    async def _exchange(
        self,
        conn: _Conn,
        method: bytes,
        target: bytes,
        headers: Headers,
        body: AsyncIterator[bytes] | None,
    ) -> UpstreamResponse:
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
            while True:
                event = conn.h11.next_event()
                if event is h11.NEED_DATA:
                    data = await self._read(conn)
                    if not data and not got_bytes and body is None:
                        raise _Stale()
                    got_bytes = got_bytes or bool(data)
                    conn.h11.receive_data(data)
                    continue
                if isinstance(event, h11.InformationalResponse):
                    continue
                if isinstance(event, h11.Response):
                    return UpstreamResponse(
                        self, conn, event.status_code, list(event.headers), event.http_version
                    )
                if isinstance(event, h11.ConnectionClosed):
                    raise UpstreamError("upstream closed without a response")
        except (h11.RemoteProtocolError, h11.LocalProtocolError) as exc:
            conn.close()
            raise UpstreamError(f"upstream protocol error: {exc}") from None
        except BaseException:
            conn.close()
            raise

    async def _write_or_stale(self, conn: _Conn, data: bytearray) -> None:
        first = (
            conn.h11.our_state is h11.DONE and conn.writer.transport.get_write_buffer_size() == 0
        )
        try:
            await self._write(conn, data)
        except UpstreamError:
            if first:
                raise _Stale() from None
            raise

    def close(self) -> None:
        for conn in self._idle:
            conn.close()
        self._idle.clear()


class _Stale(Exception):
    """A pooled connection was already closed by the upstream."""
