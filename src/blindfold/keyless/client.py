"""The edge's client for the key server: mutual TLS, many requests in flight per connection,
failover across several key servers, a deadline on every signature."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import ssl
import time
from collections.abc import Callable

from blindfold.config.common import parse_hostport
from blindfold.core import keyless_wire as w
from blindfold.errors import KeyServerError, ProtocolError

DOWN_S = 2.0  # a key server that failed is skipped this long (then tried again)


class _Connection:
    def __init__(self, address: str, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, on_closed: Callable[[_Connection], None]) -> None:
        self.address = address
        self.reader = reader
        self.writer = writer
        self.pending: dict[int, asyncio.Future[bytes]] = {}
        self.closed = False
        self._on_closed = on_closed
        self.task = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        decoder = w.FrameDecoder()
        error: Exception = KeyServerError("key server closed the connection", retryable=True)
        try:
            while True:
                data = await self.reader.read(65536)
                if not data:
                    break
                for frame in decoder.feed(data):
                    fut = self.pending.pop(frame.request_id, None)
                    if fut is None or fut.done():
                        continue
                    if frame.type == w.SIGN_RESPONSE:
                        fut.set_result(w.decode_sign_response(frame.body))
                    elif frame.type == w.ERROR:
                        code, message = w.decode_error(frame.body)
                        fut.set_exception(KeyServerError(
                            f"{w.ERROR_NAMES.get(code, 'error')}: {message}"))
                    elif frame.type == w.PONG:
                        fut.set_result(b"")
        except (ProtocolError, OSError, ssl.SSLError) as exc:
            error = KeyServerError(f"key server connection failed: {exc}", retryable=True)
        finally:
            self.close(error)

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    def close(self, error: Exception | None = None) -> None:
        if self.closed:
            return
        self.closed = True
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(error or KeyServerError("connection closed", retryable=True))
        self.pending.clear()
        with contextlib.suppress(Exception):
            self.writer.close()
        self._on_closed(self)


class KeyServerClient:
    def __init__(self, addresses: tuple[str, ...], tls: ssl.SSLContext, *,
                 server_name: str | None = None, sign_timeout_s: float = 2.0,
                 connect_timeout_s: float = 2.0) -> None:
        self.addresses = addresses
        self.tls = tls
        self.server_name = server_name
        self.sign_timeout_s = sign_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self._conns: dict[str, _Connection] = {}
        self._connecting: dict[str, asyncio.Task[_Connection]] = {}
        self._down: dict[str, float] = {}
        self._ids = itertools.count(1)
        self.results: dict[str, int] = {}

    def _count(self, result: str) -> None:
        self.results[result] = self.results.get(result, 0) + 1

    @property
    def up(self) -> bool:
        return any(not c.closed for c in self._conns.values())

    async def _connect(self, address: str) -> _Connection:
        host, port = parse_hostport(address)
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                reader, writer = await asyncio.open_connection(
                    host, port, ssl=self.tls, server_hostname=self.server_name or host,
                    limit=65536)
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            self._down[address] = time.monotonic() + DOWN_S
            raise KeyServerError(f"cannot reach key server {address}: {exc}",
                                 retryable=True) from None
        conn = _Connection(address, reader, writer, self._forget)
        self._conns[address] = conn
        return conn

    def _forget(self, conn: _Connection) -> None:
        if self._conns.get(conn.address) is conn:
            del self._conns[conn.address]

    def all_down(self, now: float) -> bool:
        """Every key server failed within the last DOWN_S and none is connected: new handshakes
        fail at once instead of waiting (they are tried again after DOWN_S)."""
        return (not self.up and not self._connecting
                and all(self._down.get(a, 0.0) > now for a in self.addresses))

    async def _connection(self) -> _Connection:
        now = time.monotonic()
        if self.all_down(now):
            raise KeyServerError("every key server is down", retryable=False)
        order = sorted(self.addresses, key=lambda a: self._down.get(a, 0.0) > now)
        last = KeyServerError("no key server configured")
        for address in order:
            conn = self._conns.get(address)
            if conn is not None and not conn.closed:
                return conn
            task = self._connecting.get(address)
            if task is None:  # one connect per address, however many handshakes wait
                task = asyncio.get_running_loop().create_task(self._connect(address))
                self._connecting[address] = task
                task.add_done_callback(self._connected_cb(address))
            try:
                return await asyncio.shield(task)
            except KeyServerError as exc:
                last = exc
        raise last

    def _connected_cb(self, address: str) -> Callable[[asyncio.Task[_Connection]], None]:
        def done(_task: asyncio.Task[_Connection]) -> None:
            self._connecting.pop(address, None)

        return done

    async def sign(self, request: w.SignRequest) -> bytes:
        """The signature, or KeyServerError (refused, unreachable, or over sign_timeout_s)."""
        deadline = time.monotonic() + self.sign_timeout_s
        attempts = 0
        while True:
            attempts += 1
            conn: _Connection | None = None
            try:
                async with asyncio.timeout(max(0.001, deadline - time.monotonic())):
                    conn = await self._connection()
                    rid = next(self._ids) & 0xFFFFFFFF
                    fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
                    conn.pending[rid] = fut
                    conn.send(w.encode_sign_request(rid, request))
                    signature = await fut
                    self._count("ok")
                    return signature
            except TimeoutError:
                self._count("timeout")
                if conn is not None and not conn.closed:
                    # A key server that does not answer in time is treated as down: its other
                    # requests move to the next key server now rather than time out one by one.
                    self._down[conn.address] = time.monotonic() + DOWN_S
                    conn.close(KeyServerError(f"key server {conn.address} timed out",
                                              retryable=True))
                raise KeyServerError(f"no signature within {self.sign_timeout_s} s") from None
            except KeyServerError as exc:
                # a refusal is final; a broken connection is retried on the next key server
                if not exc.retryable or attempts >= len(self.addresses) + 1:
                    self._count("error")
                    raise

    async def close(self) -> None:
        for conn in list(self._conns.values()):
            conn.close()
