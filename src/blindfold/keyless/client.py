"""The edge's client for the key server: mutual TLS, many requests in flight per connection,
failover across several key servers, a deadline on every signature.

Handshakes ask for signatures with `submit(request)`, which returns a future at once: no task
and no timeout context per handshake (each costs more than the frame itself). Requests made in
one turn of the event loop leave in one write. A request whose connection breaks moves to the
next key server while its deadline allows; a key server that misses a deadline is treated as
down for DOWN_S, and while every key server is down new requests fail at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import ssl
import time
from collections.abc import Callable
from typing import Any

from blindfold.config.common import parse_hostport
from blindfold.core import keyless_wire as w
from blindfold.errors import KeyServerError, ProtocolError

DOWN_S = 2.0  # a key server that failed is skipped this long (then tried again)


class _Call:
    """One signature request and where it stands."""

    __slots__ = (
        "attempts",
        "conn",
        "deadline",
        "failed",
        "frame_request",
        "outer",
        "rid",
        "timer",
    )

    def __init__(
        self, request: w.SignRequest | str, outer: asyncio.Future[Any], deadline: float
    ) -> None:
        self.frame_request = request
        self.outer = outer
        self.deadline = deadline
        self.attempts = 0
        self.conn: _Connection | None = None
        self.rid = 0
        self.timer: asyncio.TimerHandle | None = None
        self.failed = ""  # the key server whose connection broke under this call, last


class _Connection(asyncio.Protocol):
    """One mutual-TLS connection to a key server, as an asyncio protocol: each answer is
    decoded in `data_received` as it arrives (no stream buffer and no reading task to wake:
    that was a loop turn and a task step per signature)."""

    def __init__(self, client: KeyServerClient, address: str) -> None:
        self.client = client
        self.address = address
        self.transport: asyncio.Transport | None = None
        self.pending: dict[int, _Call] = {}
        self.closed = False
        self.error = KeyServerError("closed", "connection closed", retryable=True)
        self._out: list[bytes] = []
        self._loop = asyncio.get_running_loop()
        self._decoder = w.FrameDecoder()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        client = self.client
        try:
            for frame in self._decoder.feed(data):
                if frame.request_id == 0 and frame.type == w.ERROR:
                    # about the connection itself (this edge is not authorised): every
                    # request fails now with the key server's reason, none is retried
                    code, message = w.decode_error(frame.body)
                    self.close(
                        KeyServerError(
                            w.error_reason(code, message),
                            f"key server {self.address} refused this edge: {message}",
                        )
                    )
                    return
                call = self.pending.pop(frame.request_id, None)
                if call is None:
                    continue
                if frame.type == w.SIGN_RESPONSE:
                    client._succeeded(call, w.decode_sign_response(frame.body))
                elif frame.type == w.CHAIN_RESPONSE:
                    client._succeeded(call, w.decode_chain_response(frame.body))
                elif frame.type == w.ERROR:
                    code, message = w.decode_error(frame.body)
                    client._failed(
                        call,
                        KeyServerError(
                            w.error_reason(code, message),
                            f"{w.ERROR_NAMES.get(code, 'error')}: {message}",
                        ),
                    )
        except ProtocolError as exc:
            self.close(
                KeyServerError(
                    "connection_failed", f"key server connection failed: {exc}", retryable=True
                )
            )

    def eof_received(self) -> bool:
        self.close(KeyServerError("closed", "key server closed the connection", retryable=True))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is None:
            error = KeyServerError("closed", "key server closed the connection", retryable=True)
        else:
            error = KeyServerError(
                "connection_failed", f"key server connection failed: {exc}", retryable=True
            )
        self.close(error)

    def send(self, data: bytes) -> None:
        if not self._out:
            self._loop.call_soon(self._flush)
        self._out.append(data)

    def _flush(self) -> None:
        if self._out and not self.closed and self.transport is not None:
            self.transport.write(b"".join(self._out))
        self._out.clear()

    def close(self, error: KeyServerError | None = None) -> None:
        if self.closed:
            return
        self.closed = True
        if error is not None:
            self.error = error
        calls = list(self.pending.values())
        self.pending.clear()
        if self.transport is not None:
            with contextlib.suppress(Exception):
                self.transport.close()
        self.client._forget(self)
        for call in calls:
            self.client._retry(call, self.error)


class KeyServerClient:
    def __init__(
        self,
        addresses: tuple[str, ...],
        tls: ssl.SSLContext,
        *,
        server_name: str | None = None,
        sign_timeout_s: float = 2.0,
        connect_timeout_s: float = 2.0,
    ) -> None:
        self.addresses = addresses
        self.tls = tls
        self.server_name = server_name
        self.sign_timeout_s = sign_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self._conns: dict[str, _Connection] = {}
        self._connecting: dict[str, asyncio.Task[_Connection]] = {}
        self._down: dict[str, float] = {}
        self._ids = itertools.count(1)  # 0 never: it is the connection's own (an ERROR)
        self.results: dict[str, int] = {}

    def _count(self, result: str) -> None:
        self.results[result] = self.results.get(result, 0) + 1

    @property
    def up(self) -> bool:
        return any(not c.closed for c in self._conns.values())

    def all_down(self, now: float) -> bool:
        """Every key server failed within the last DOWN_S and none is connected: new handshakes
        fail at once instead of waiting (they are tried again after DOWN_S)."""
        return (
            not self.up
            and not self._connecting
            and all(self._down.get(a, 0.0) > now for a in self.addresses)
        )

    # ---------------------------------------------------------------- requests
    def submit(self, request: w.SignRequest) -> asyncio.Future[bytes]:
        """A future for the signature; it fails with KeyServerError (refused: the key server's
        reason; `unreachable`, `down`, or `timeout` over sign_timeout_s)."""
        loop = asyncio.get_running_loop()
        call = _Call(request, loop.create_future(), loop.time() + self.sign_timeout_s)
        call.timer = loop.call_at(call.deadline, self._timed_out, call)
        self._attempt(call)
        return call.outer

    async def sign(self, request: w.SignRequest) -> bytes:
        return await self.submit(request)

    def fetch_chain(self, hostname: str) -> asyncio.Future[tuple[bytes, ...]]:
        """A future for the current certificate chain (DER, leaf first) of `hostname`, as the
        key server holds it; it fails with KeyServerError (`unauthorized_sni`: this edge is not
        authorised for it, `no_certificate`, or the way's failure), like `submit`."""
        loop = asyncio.get_running_loop()
        call = _Call(hostname, loop.create_future(), loop.time() + self.sign_timeout_s)
        call.timer = loop.call_at(call.deadline, self._timed_out, call)
        self._attempt(call)
        return call.outer

    def _attempt(self, call: _Call) -> None:
        call.attempts += 1
        now = time.monotonic()
        # the usual case first: the first key server is connected and not marked down (what
        # the ordering below would pick, without sorting)
        first = self.addresses[0]
        conn = self._conns.get(first)
        if (
            conn is not None
            and not conn.closed
            and self._down.get(first, 0.0) <= now
            and first != call.failed
        ):
            self._send(conn, call)
            return
        if self.all_down(now):
            self._failed(call, KeyServerError("down", "every key server is down"))
            return
        # key servers not marked down first, and the one that just failed this call last
        failed = call.failed
        for address in sorted(
            self.addresses, key=lambda a: (self._down.get(a, 0.0) > now, a == failed)
        ):
            conn = self._conns.get(address)
            if conn is not None and not conn.closed:
                self._send(conn, call)
                return
            # not connected: connect (once per address, however many calls wait), then send
            task = self._connecting.get(address)
            if task is None:
                task = asyncio.get_running_loop().create_task(self._connect(address))
                self._connecting[address] = task
                task.add_done_callback(self._connected_cb(address))
            task.add_done_callback(lambda t, call=call: self._after_connect(call, t))  # type: ignore[misc]
            return

    def _after_connect(self, call: _Call, task: asyncio.Task[_Connection]) -> None:
        if call.outer.done():
            return
        exc = task.exception() if not task.cancelled() else KeyServerError("cancelled")
        if exc is None:
            conn = task.result()
            if conn.closed:  # ended before this call could use it (a refusal read at once)
                self._retry(call, conn.error)
            else:
                self._send(conn, call)
        elif isinstance(exc, KeyServerError):
            self._retry(call, exc)
        else:
            self._failed(call, KeyServerError("unreachable", str(exc)))

    def _send(self, conn: _Connection, call: _Call) -> None:
        call.rid = rid = next(self._ids) & 0xFFFFFFFF or next(self._ids)
        req = call.frame_request
        try:
            if isinstance(req, str):
                frame = w.encode_chain_request(rid, req)
            else:
                frame = w.encode_sign_request(rid, req)
        except ValueError as exc:  # over MAX_FRAME: a huge ClientHello and certificate chain
            self._failed(call, KeyServerError("too_large", f"cannot ask for this signature: {exc}"))
            return
        call.conn = conn
        conn.pending[rid] = call
        conn.send(frame)

    def _retry(self, call: _Call, exc: KeyServerError) -> None:
        """A connection failed under the call: the next key server, if time allows."""
        if call.outer.done():
            return
        if call.conn is not None:
            call.failed = call.conn.address
            call.conn = None
        if (
            exc.retryable
            and call.attempts < len(self.addresses) + 1
            and asyncio.get_running_loop().time() < call.deadline
        ):
            self._attempt(call)
        else:
            self._failed(call, exc)

    def _succeeded(self, call: _Call, signature: Any) -> None:
        if call.timer is not None:
            call.timer.cancel()
        if not call.outer.done():
            call.outer.set_result(signature)
            self._count("ok")

    def _failed(self, call: _Call, exc: KeyServerError) -> None:
        if call.timer is not None:
            call.timer.cancel()
        if not call.outer.done():
            call.outer.set_exception(exc)
            self._count("error")

    def _timed_out(self, call: _Call) -> None:
        call.timer = None
        if call.outer.done():
            return
        self._count("timeout")
        call.outer.set_exception(
            KeyServerError("timeout", f"no signature within {self.sign_timeout_s} s")
        )
        conn = call.conn
        if conn is not None and not conn.closed:
            conn.pending.pop(call.rid, None)
            # A key server that does not answer in time is treated as down: its other
            # requests move to the next key server now rather than time out one by one.
            self._down[conn.address] = time.monotonic() + DOWN_S
            conn.close(
                KeyServerError("timeout", f"key server {conn.address} timed out", retryable=True)
            )

    # ---------------------------------------------------------------- connections
    async def _connect(self, address: str) -> _Connection:
        host, port = parse_hostport(address)
        conn = _Connection(self, address)
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                await asyncio.get_running_loop().create_connection(
                    lambda: conn, host, port, ssl=self.tls, server_hostname=self.server_name or host
                )
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            self._down[address] = time.monotonic() + DOWN_S
            raise KeyServerError(
                "unreachable", f"cannot reach key server {address}: {exc}", retryable=True
            ) from None
        if not conn.closed:
            self._conns[address] = conn
        return conn

    def _forget(self, conn: _Connection) -> None:
        if self._conns.get(conn.address) is conn:
            del self._conns[conn.address]

    def _connected_cb(self, address: str) -> Callable[[asyncio.Task[_Connection]], None]:
        def done(task: asyncio.Task[_Connection]) -> None:
            self._connecting.pop(address, None)
            if not task.cancelled():
                task.exception()  # retrieved: the calls waiting on it handle it

        return done

    async def close(self) -> None:
        for task in list(self._connecting.values()):
            task.cancel()
        for conn in list(self._conns.values()):
            conn.close()
