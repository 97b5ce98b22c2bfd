"""The h11-based HTTP/1.1 server connection that web/http1.py replaced, kept as the reference
for the differential test (tests/unit/test_http1_differential.py) only; not in src."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from http import HTTPStatus
from typing import Any, cast

import h11

from blindfold.errors import ProtocolError
from blindfold.web.limits import HttpLimits, request_id_for
from blindfold.web.messages import BodyStream, BodyTimeout, Handler, Headers, Request
from blindfold.web.target import check_authority, parse_target, same_authority

IDLE, HEAD, BODY, HANDLING = range(4)
_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}


class ConnInfo:
    __slots__ = ("client", "edge_request_ids", "scheme", "server", "tls")

    def __init__(
        self,
        client: tuple[str, int],
        server: tuple[str, int],
        scheme: bytes,
        tls: dict[str, str],
        edge_request_ids: bool = False,
    ) -> None:
        self.client = client
        self.server = server
        self.scheme = scheme
        self.tls = tls
        # the requests come from an edge that speaks HTTP itself (keyless, blind): keep its
        # X-Request-Id (web.limits.request_id_for)
        self.edge_request_ids = edge_request_ids


class H1Connection(asyncio.Protocol):
    def __init__(
        self,
        handler: Handler,
        limits: HttpLimits,
        info: ConnInfo,
        on_event: Callable[[str, dict[str, Any]], None] | None = None,
    ) -> None:
        self.handler = handler
        self.limits = limits
        self.info = info
        self.on_event = on_event or (lambda _e, _f: None)
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_header_bytes)
        self.transport: asyncio.Transport | None = None
        self.loop = asyncio.get_event_loop()
        self.phase = IDLE
        self.body: BodyStream | None = None
        self.task: asyncio.Task[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.paused_reading = False
        self.write_paused = False
        self.drain_waiter: asyncio.Future[None] | None = None
        self.closed = False
        self.requests = 0

    # ------------------------------------------------------------------ asyncio
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # an asyncio.Transport (uvloop's transports are not its subclasses)
        self.transport = cast(asyncio.Transport, transport)
        self._deadline(self.limits.header_timeout_s, "header_timeout")

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        if self.phase == IDLE:
            self.phase = HEAD
            self._deadline(self.limits.header_timeout_s, "header_timeout")
        try:
            self.conn.receive_data(data)
        except h11.RemoteProtocolError as exc:
            self._protocol_error(exc)
            return
        self._process()

    def eof_received(self) -> bool | None:
        try:
            self.conn.receive_data(b"")
        except h11.RemoteProtocolError as exc:
            self._protocol_error(exc)
            return None
        self._process()
        return True  # keep our side open: a response may still be going out

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.on_event("closed", {})
        self._cancel_timer()
        if self.body is not None and not self.body.finished:
            self.body.fail(ConnectionError("client went away"))
        if self.task is not None and not self.task.done():
            self.task.cancel()
        if self.drain_waiter is not None and not self.drain_waiter.done():
            self.drain_waiter.set_exception(ConnectionError("client went away"))

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.drain_waiter is not None and not self.drain_waiter.done():
            self.drain_waiter.set_result(None)

    # ------------------------------------------------------------------ events
    def _process(self) -> None:
        while not self.closed:
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError as exc:
                self._protocol_error(exc)
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.Request):
                self._on_request(event)
            elif isinstance(event, h11.Data):
                if self.body is not None:
                    self.body.feed(bytes(event.data))
                    if self.body.buffered > self.limits.body_high_water:
                        self._pause_reading()
                self._deadline(self.limits.body_timeout_s, "body_timeout")
            elif isinstance(event, h11.EndOfMessage):
                if self.body is not None:
                    self.body.end()
                self.phase = HANDLING
                self._cancel_timer()
            elif isinstance(event, h11.ConnectionClosed):
                if self.body is not None and not self.body.finished:
                    self.body.fail(ConnectionError("client closed inside the body"))
                if self.task is None or self.task.done():
                    self._close()
                return

    def _on_request(self, event: h11.Request) -> None:
        limits = self.limits
        if len(event.headers) > limits.max_headers:
            self._error_response(431, "too many header fields")
            return
        # h11 bounds *incomplete* heads; a whole head that arrived in one read is bounded here
        size = len(event.target) + sum(len(k) + len(v) + 4 for k, v in event.headers)
        if size > limits.max_header_bytes:
            self._error_response(431, "request head too large")
            return
        length = None
        hosts: list[bytes] = []
        chunked = False
        for name, value in event.headers:
            if name == b"content-length":
                length = int(value)
            elif name == b"host":
                hosts.append(value)
            elif name == b"transfer-encoding":
                chunked = True
        if chunked and length is not None:
            # RFC 9112 §6.1: both framings at once is how requests are smuggled; refuse
            self._error_response(400, "both Content-Length and Transfer-Encoding")
            return
        host = hosts[0] if hosts else b""
        if len(hosts) > 1:
            self._error_response(400, "more than one Host header")  # RFC 9112 §3.2
            return
        if not host and event.http_version == b"1.1":
            # an empty Host names no site (RFC 9112 §3.2 allows it only for targets without an
            # authority, which no origin serves); answer as nginx does rather than guess
            self._error_response(400, "empty Host header")
            return
        try:
            target = parse_target(event.method, event.target)
            if host:
                check_authority(host)
            if target.authority is not None:
                # RFC 9112 §3.2.2: the target's authority replaces Host; they must agree, so
                # that the route check and the application see one and the same host
                if host and not same_authority(host, target.authority):
                    raise ProtocolError("bad_host", "absolute-form authority differs from Host")
                host = target.authority
        except ProtocolError as exc:
            self.on_event(
                "bad_request", {"client": self.info.client[0], "status": 400, "error": str(exc)}
            )
            self._error_response(400, exc.detail or exc.reason)
            return
        if length is not None and length > limits.max_body_bytes:
            self._error_response(413, "request body too large")
            return
        self.requests += 1
        self.phase = BODY
        self._deadline(limits.body_timeout_s, "body_timeout")
        request = Request(
            method=event.method,
            target=target.origin_form,
            authority=host,
            scheme=self.info.scheme,
            headers=list(event.headers),
            http_version=event.http_version.decode(),
            client=self.info.client,
            server=self.info.server,
            request_id=request_id_for(event.headers, self.info.edge_request_ids),
            tls=self.info.tls,
            raw_target=event.target,
        )
        self.body = BodyStream(limits.max_body_bytes, self._consumed, self._body_wait)
        responder = H1Responder(self, head=event.method == b"HEAD")
        self.task = self.loop.create_task(self._run(request, self.body, responder))

    async def _run(self, request: Request, body: BodyStream, responder: H1Responder) -> None:
        try:
            await self.handler(request, body, responder)
            if not responder.ended:
                if not responder.started:
                    await responder.start(500, [(b"content-length", b"0")])
                await responder.end()
        except asyncio.CancelledError:
            self._close()
            raise
        except Exception as exc:  # a handler bug must not leave the client hanging
            self.on_event("handler_error", {"error": repr(exc), "request_id": request.request_id})
            if responder.started:
                responder.abort()
            else:
                with contextlib.suppress(Exception):
                    await responder.start(
                        500, [(b"content-length", b"0"), (b"connection", b"close")]
                    )
                    await responder.end()
        finally:
            self._after_response()

    def _after_response(self) -> None:
        if self.closed:
            return
        conn = self.conn
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
            self.body = None
            self.task = None
            self.phase = IDLE
            self._resume_reading()
            self._deadline(self.limits.keepalive_timeout_s, "keepalive_timeout")
            self._process()  # a pipelined request may be waiting already
        elif conn.our_state is h11.MUST_CLOSE or conn.our_state is h11.DONE:
            self._close()

    # ------------------------------------------------------------------ flow control
    def _consumed(self, _n: int) -> None:
        if (
            self.paused_reading
            and self.body is not None
            and (self.body.buffered <= self.limits.body_high_water // 2)
        ):
            self._resume_reading()

    def _body_wait(self) -> None:
        if self.conn.they_are_waiting_for_100_continue and self.transport is not None:
            self.transport.write(
                self.conn.send(h11.InformationalResponse(status_code=100, headers=[]))
            )

    def _pause_reading(self) -> None:
        if not self.paused_reading and self.transport is not None:
            self.paused_reading = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self.paused_reading and self.transport is not None and not self.closed:
            self.paused_reading = False
            self.transport.resume_reading()

    async def drain(self) -> None:
        if self.closed:
            raise ConnectionError("client went away")
        if not self.write_paused:
            return
        self.drain_waiter = self.loop.create_future()
        try:
            async with asyncio.timeout(self.limits.send_timeout_s):  # no task, unlike wait_for
                await self.drain_waiter
        except TimeoutError:
            self.on_event("send_timeout", {"client": self.info.client[0]})
            self._close(abort=True)
            raise ConnectionError("client stopped reading") from None
        finally:
            self.drain_waiter = None

    # ------------------------------------------------------------------ timers and errors
    def _deadline(self, seconds: float, reason: str) -> None:
        self._cancel_timer()
        self.timer = self.loop.call_later(seconds, self._expired, reason)

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _expired(self, reason: str) -> None:
        self.timer = None
        if self.closed:
            return
        self.on_event(reason, {"client": self.info.client[0], "phase": self.phase})
        if self.phase == BODY and self.body is not None:
            self.body.fail(BodyTimeout(reason))  # the handler answers 408 or gives up
            return
        if self.phase == HEAD and self.conn.our_state is h11.IDLE:
            self._error_response(408, "request head not received in time")
            return
        self._close()

    def _protocol_error(self, exc: h11.RemoteProtocolError) -> None:
        status = getattr(exc, "error_status_hint", 400) or 400
        self.on_event(
            "bad_request",
            {"client": self.info.client[0], "status": status, "error": str(exc)[:200]},
        )
        self._error_response(status, str(exc)[:200])

    def _error_response(self, status: int, text: str) -> None:
        """Answer with an error and close; used before a handler has started."""
        if self.task is not None and not self.task.done():
            self.task.cancel()
        conn = self.conn
        if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE) and self.transport is not None:
            body = f"{status} {text}\n".encode()
            try:
                self.transport.write(
                    conn.send(
                        h11.Response(
                            status_code=status,
                            headers=[
                                (b"content-type", b"text/plain"),
                                (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close"),
                            ],
                        )
                    )
                    or b""
                )
                self.transport.write(conn.send(h11.Data(data=body)) or b"")
                self.transport.write(conn.send(h11.EndOfMessage()) or b"")
            except h11.LocalProtocolError:
                pass
        self._close()

    def _close(self, abort: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        self._cancel_timer()
        if self.transport is not None:
            if abort:
                self.transport.abort()
            else:
                self.transport.close()


BIG_WRITE = 1 << 14  # body chunks this big are not joined with the held head


class H1Responder:
    """Writes the response. The head is held until the first body bytes or the end, so a
    small response leaves in one write (one syscall, one TCP segment)."""

    __slots__ = ("_c", "_held", "ended", "head", "started")

    def __init__(self, connection: H1Connection, head: bool = False) -> None:
        self._c = connection
        self.head = head  # a HEAD request: the response has no body, whatever is sent
        self.started = False
        self.ended = False
        self._held = b""

    async def start(self, status: int, headers: Headers) -> None:
        c = self._c
        if c.closed:
            raise ConnectionError("client went away")
        if c.conn.their_state is not h11.DONE and c.phase != HANDLING:
            # answering before the whole request arrived: the connection cannot be reused
            headers = [*headers, (b"connection", b"close")]
        self.started = True
        try:
            data = c.conn.send(
                h11.Response(status_code=status, headers=headers, reason=_REASONS.get(status, b""))
            )
        except h11.LocalProtocolError as exc:
            raise ConnectionError(f"invalid response: {exc}") from None
        self._held = data or b""

    async def interim(self, status: int, headers: Headers) -> None:
        """An interim (1xx) response before the final one, written at once; never to an
        HTTP/1.0 client (RFC 9110 §15.2), never 101 (no protocol switch here)."""
        c = self._c
        if (
            c.closed
            or self.started
            or not 102 <= status <= 199
            or c.conn.their_http_version == b"1.0"
        ):
            return
        try:
            data = c.conn.send(
                h11.InformationalResponse(
                    status_code=status, headers=headers, reason=_REASONS.get(status, b"")
                )
            )
        except h11.LocalProtocolError:
            return  # not in a state to send one: it is only a hint
        assert c.transport is not None
        c.transport.write(data or b"")
        await c.drain()

    async def send(self, data: bytes) -> None:
        c = self._c
        if c.closed:
            raise ConnectionError("client went away")
        if data and not self.head:
            assert c.transport is not None
            if len(data) < BIG_WRITE:
                payload = c.conn.send(h11.Data(data=data)) or b""
                if self._held:
                    payload, self._held = self._held + payload, b""
                c.transport.write(payload)
            else:  # a big body chunk is written as it is: no copy to prepend the head
                pieces = c.conn.send_with_data_passthrough(h11.Data(data=data)) or []
                if self._held:
                    pieces, self._held = [self._held, *pieces], b""
                c.transport.writelines(pieces)
            await c.drain()

    async def end(self) -> None:
        c = self._c
        self.ended = True
        if c.closed:
            return
        payload = c.conn.send(h11.EndOfMessage()) or b""
        if self._held:
            payload, self._held = self._held + payload, b""
        assert c.transport is not None
        c.transport.write(payload)

    def abort(self) -> None:
        self.ended = True
        self._c._close(abort=True)
