"""The h2-based HTTP/2 server connection (src/blindfold/web/http2.py as it was on h2, before
our own HTTP/2 core replaced the library, issue 19), kept as the reference for the differential
test (tests/unit/test_http2_differential.py) only; not in src. What a client observes of the
code under test must equal what this gives, frame for frame (modulo the normalisations that
test documents), so that hostile bytes are refused exactly as before. Do not fix bugs here:
a fix belongs in src, and the differential test lists the case as a deliberate change.

The original module docstring follows.

HTTP/2 server connection: h2 drives the protocol (framing, HPACK, flow control, stream
states); this module drives h2 from asyncio, runs one handler task per stream, and defends the
connection against the known HTTP/2 abuses:

- rapid reset (CVE-2023-44487): more than `h2_max_resets_per_window` streams reset by the client
  in a window ends the connection with ENHANCE_YOUR_CALM;
- control-frame floods (SETTINGS, PING, WINDOW_UPDATE, PRIORITY, empty DATA): likewise;
- too many streams: MAX_CONCURRENT_STREAMS is advertised and enforced by h2; a connection that
  has opened `h2_max_streams_per_connection` streams is asked to go away (GOAWAY NO_ERROR);
- huge header blocks and HPACK tables: MAX_HEADER_LIST_SIZE and HEADER_TABLE_SIZE are
  advertised and enforced by h2's HPACK decoder (COMPRESSION_ERROR / connection error).

A malformed request (RFC 9113 §8.1.1: bad pseudo-headers, connection-specific fields, a Host
that differs from :authority...) is a stream error: its stream is reset with PROTOCOL_ERROR and
the connection's other streams go on. h2 checks the header fields (its own validator, run
here per stream: run inside h2 it would end the whole connection).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from h2.errors import ErrorCodes
from h2.utilities import HeaderValidationFlags, validate_headers
from hpack.table import HeaderTable

from blindfold.errors import ProtocolError
from blindfold.web.http1 import ConnInfo
from blindfold.web.limits import HttpLimits, request_id_for
from blindfold.web.messages import (
    BodyStream,
    BodyTimeout,
    FieldError,
    Handler,
    Headers,
    PreparedHead,
    Request,
    check_fields,
    run_stream_handler,
)
from blindfold.web.target import Target, check_authority, parse_target, same_authority

_FORBIDDEN_RESPONSE_HEADERS = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade", b"te"}
)
_REQUEST = HeaderValidationFlags(
    is_client=False, is_trailer=False, is_response_header=False, is_push_promise=False
)
_TRAILERS = _REQUEST._replace(is_trailer=True)


class _Stream:
    __slots__ = ("acks", "body", "ended", "last_data", "responder", "task", "window_waiter")

    def __init__(self) -> None:
        self.body: BodyStream | None = None
        self.task: asyncio.Task[None] | None = None
        self.responder: H2Responder | None = None
        self.acks: list[int] = []  # flow-controlled lengths of unconsumed chunks
        self.window_waiter: asyncio.Future[None] | None = None
        self.last_data = 0.0
        self.ended = False


class H2Connection(asyncio.Protocol):
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
        # inbound header fields are validated per stream (`_malformed`), not by h2 for the
        # whole connection
        config = h2.config.H2Configuration(
            client_side=False, header_encoding=None, validate_inbound_headers=False
        )
        self.conn = h2.connection.H2Connection(config=config)
        self.transport: asyncio.Transport | None = None
        self.loop = asyncio.get_event_loop()
        self.streams: dict[int, _Stream] = {}
        self.opened = 0
        self.resets: list[float] = []
        self.control: list[float] = []
        self.closed = False
        self.going_away = False
        self.write_paused = False
        self.drain_waiters: list[asyncio.Future[None]] = []
        self.timer: asyncio.TimerHandle | None = None
        self.idle_since = self.loop.time()

    # ------------------------------------------------------------------ asyncio
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        limits = self.limits
        S = h2.settings.SettingCodes
        self.conn.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                S.MAX_CONCURRENT_STREAMS: limits.h2_max_concurrent_streams,
                S.INITIAL_WINDOW_SIZE: limits.h2_initial_window,
                S.MAX_HEADER_LIST_SIZE: limits.h2_max_header_list_size,
                S.HEADER_TABLE_SIZE: limits.h2_header_table_size,
            },
        )
        self.conn.initiate_connection()
        # open the connection window as far as the streams may go
        extra = limits.h2_initial_window * 4 - 65535
        if extra > 0:
            self.conn.increment_flow_control_window(extra)
        self._flush()
        self._tick()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self.on_event(
                "h2_protocol_error", {"client": self.info.client[0], "error": str(exc)[:200]}
            )
            self._flush()
            self._close()
            return
        for event in events:
            self._on_event(event)
            if self.closed:
                return
        self._flush()

    def eof_received(self) -> bool | None:
        self._close()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.on_event("closed", {})
        if self.timer is not None:
            self.timer.cancel()
        for stream in self.streams.values():
            if stream.body is not None:
                stream.body.fail(ConnectionError("connection closed"))
            if stream.task is not None and not stream.task.done():
                stream.task.cancel()
            if stream.window_waiter is not None and not stream.window_waiter.done():
                stream.window_waiter.set_exception(ConnectionError("connection closed"))
        for waiter in self.drain_waiters:
            if not waiter.done():
                waiter.set_exception(ConnectionError("connection closed"))

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        waiters, self.drain_waiters = self.drain_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    # ------------------------------------------------------------------ events
    def _on_event(self, event: h2.events.Event) -> None:
        E = h2.events
        if isinstance(event, E.RequestReceived):
            self._on_request(event)
        elif isinstance(event, E.DataReceived):
            self._on_data(event)
        elif isinstance(event, E.StreamEnded):
            stream = self.streams.get(event.stream_id)
            if stream is not None and stream.body is not None:
                stream.body.end()
        elif isinstance(event, E.StreamReset):
            self._on_reset(event)
        elif isinstance(event, E.WindowUpdated):
            self._count_control()
            self._wake_windows(event.stream_id)
        elif isinstance(event, (E.RemoteSettingsChanged, E.PingReceived, E.PriorityUpdated)):
            self._count_control()
            if isinstance(event, E.RemoteSettingsChanged):
                self._wake_windows(0)  # INITIAL_WINDOW_SIZE may have grown
        elif isinstance(event, E.ConnectionTerminated):
            self._close()
        elif isinstance(event, E.TrailersReceived):
            if self._malformed(event.stream_id, event.headers, _TRAILERS):
                self._on_reset_by_us(event.stream_id)
                return
            stream = self.streams.get(event.stream_id)
            if stream is not None and stream.body is not None and event.stream_ended:
                stream.body.end()

    def _malformed(self, sid: int, headers: Any, flags: HeaderValidationFlags) -> bool:
        """RFC 9113 §8.1.1: a malformed request or trailer section resets its stream with
        PROTOCOL_ERROR (a stream error); h2's validator says what is malformed."""
        try:
            for _ in validate_headers(headers or (), flags):
                pass
        except h2.exceptions.ProtocolError as exc:
            self.on_event(
                "bad_request",
                {"client": self.info.client[0], "reset": "PROTOCOL_ERROR", "error": str(exc)},
            )
            with contextlib.suppress(h2.exceptions.ProtocolError, KeyError):
                self.conn.reset_stream(sid, ErrorCodes.PROTOCOL_ERROR)
            return True
        return False

    def _on_reset_by_us(self, sid: int) -> None:
        stream = self.streams.pop(sid, None)
        if stream is not None:
            if stream.body is not None:
                stream.body.fail(ConnectionError("malformed trailers"))
            if stream.task is not None and not stream.task.done():
                stream.task.cancel()

    def _on_request(self, event: h2.events.RequestReceived) -> None:
        sid = event.stream_id
        self.opened += 1
        self.idle_since = 0.0
        limits = self.limits
        if self.opened > limits.h2_max_streams_per_connection and not self.going_away:
            self.going_away = True  # finish what is open, then the client reconnects
            self.conn.close_connection(ErrorCodes.NO_ERROR, last_stream_id=sid)
        if self._malformed(sid, event.headers, _REQUEST):
            return
        # one pass: pseudo-header fields (each at most once: _malformed checked that), the
        # rest, the list's size (RFC 9113 §6.5.2), Host and the first Content-Length
        pseudo: dict[bytes, bytes] = {}
        headers: Headers = []
        size = 0
        has_host = False
        length: bytes | None = None
        for name, value in event.headers or ():
            size += len(name) + len(value) + 32
            if name.startswith(b":"):
                pseudo[name] = value
                continue
            headers.append((name, value))
            if name == b"host":
                has_host = True
            elif name == b"content-length" and length is None:
                length = value
        stream = _Stream()
        self.streams[sid] = stream
        method = pseudo.get(b":method", b"")
        responder = H2Responder(self, sid, head=method == b"HEAD")
        stream.responder = responder
        if len(headers) > limits.max_headers or size > limits.h2_max_header_list_size:
            # until the client acknowledges our SETTINGS the HPACK decoder has no limit: the
            # list is bounded by h2's frame and CONTINUATION limits, and refused here
            stream.task = self.loop.create_task(self._refuse(responder, 431))
            return
        try:
            target, authority = _target_and_authority(method, pseudo, headers)
        except ProtocolError as exc:
            self.on_event(
                "bad_request", {"client": self.info.client[0], "status": 400, "error": str(exc)}
            )
            stream.task = self.loop.create_task(self._refuse(responder, 400))
            return
        scheme = pseudo.get(b":scheme", self.info.scheme)
        if scheme != self.info.scheme:
            # RFC 9113 §8.3.1: the scheme of the target. Ours is the connection's (https on
            # TLS); anything else would be forwarded into Forwarded/X-Forwarded-Proto.
            self.on_event(
                "bad_request",
                {"client": self.info.client[0], "status": 400, "error": "unexpected :scheme"},
            )
            stream.task = self.loop.create_task(self._refuse(responder, 400))
            return
        if not has_host:
            headers.insert(0, (b"host", authority))
        if length is not None and length.isdigit() and int(length) > limits.max_body_bytes:
            stream.task = self.loop.create_task(self._refuse(responder, 413))
            return
        request = Request(
            method=method,
            target=target.origin_form,
            authority=authority,
            scheme=self.info.scheme,
            headers=headers,
            http_version="2",
            client=self.info.client,
            server=self.info.server,
            request_id=request_id_for(headers, self.info.edge_request_ids),
            tls=self.info.tls,
            raw_target=pseudo.get(b":path", b""),
            from_http_edge=self.info.edge_request_ids,
        )
        stream.body = BodyStream(limits.max_body_bytes, self._acker(stream, sid))
        stream.last_data = self.loop.time()
        if event.stream_ended is not None:
            stream.body.end()
        stream.task = self.loop.create_task(self._run(request, stream, responder))

    def _on_data(self, event: h2.events.DataReceived) -> None:
        sid = event.stream_id
        stream = self.streams.get(sid)
        fc = event.flow_controlled_length or 0
        if not event.data:
            self._count_control()  # empty DATA frames cost us and carry nothing
        if stream is None or stream.body is None or stream.body.finished:
            if fc:
                with contextlib.suppress(h2.exceptions.ProtocolError):
                    self.conn.acknowledge_received_data(fc, sid)
            return
        if not event.data:
            if fc:
                self.conn.acknowledge_received_data(fc, sid)
            return
        stream.acks.append(fc)
        stream.last_data = self.loop.time()
        stream.body.feed(bytes(event.data))

    def _acker(self, stream: _Stream, sid: int) -> Callable[[int], None]:
        return lambda _n: self._ack(stream, sid)

    def _ack(self, stream: _Stream, sid: int) -> None:
        """The handler took one chunk: open the windows by what it cost."""
        if stream.acks and not self.closed:
            fc = stream.acks.pop(0)
            with contextlib.suppress(h2.exceptions.ProtocolError, KeyError):
                self.conn.acknowledge_received_data(fc, sid)
            self._flush()

    def _on_reset(self, event: h2.events.StreamReset) -> None:
        stream = self.streams.pop(event.stream_id, None)
        if event.remote_reset:
            now = self.loop.time()
            self.resets.append(now)
            self.resets = [t for t in self.resets if now - t < self.limits.h2_abuse_window_s]
            if len(self.resets) > self.limits.h2_max_resets_per_window:
                self._calm("rapid_reset")
        if stream is not None:
            if stream.body is not None:
                stream.body.fail(ConnectionError("stream reset by the client"))
            if stream.task is not None and not stream.task.done():
                stream.task.cancel()

    def _count_control(self) -> None:
        now = self.loop.time()
        self.control.append(now)
        if len(self.control) > self.limits.h2_max_control_frames_per_window:
            self.control = [t for t in self.control if now - t < self.limits.h2_abuse_window_s]
            if len(self.control) > self.limits.h2_max_control_frames_per_window:
                self._calm("control_flood")

    def _calm(self, reason: str) -> None:
        self.on_event("h2_abuse", {"client": self.info.client[0], "reason": reason})
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.conn.close_connection(ErrorCodes.ENHANCE_YOUR_CALM)
        self._flush()
        self._close()

    # ------------------------------------------------------------------ handlers
    async def _run(self, request: Request, stream: _Stream, responder: H2Responder) -> None:
        assert stream.body is not None
        try:
            await run_stream_handler(self.handler, request, stream.body, responder, self.on_event)
        finally:
            self._stream_done(responder.stream_id)

    async def _refuse(self, responder: H2Responder, status: int) -> None:
        try:
            await responder.start(status, [(b"content-length", b"0")])
            await responder.end()
        finally:
            self._stream_done(responder.stream_id)

    def _stream_done(self, sid: int) -> None:
        stream = self.streams.pop(sid, None)
        if stream is not None and stream.body is not None and not stream.body.finished:
            # answered before the request body ended: tell the client to stop sending
            with contextlib.suppress(h2.exceptions.ProtocolError, KeyError):
                self.conn.reset_stream(sid, ErrorCodes.NO_ERROR)
            self._flush()
        if not self.streams:
            self.idle_since = self.loop.time()
            if self.going_away:
                self._close()

    # ------------------------------------------------------------------ writing
    def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data and self.transport is not None and not self.closed:
            self.transport.write(data)

    async def drain(self) -> None:
        if self.closed:
            raise ConnectionError("connection closed")
        if not self.write_paused:
            return
        waiter = self.loop.create_future()
        self.drain_waiters.append(waiter)
        try:
            await asyncio.wait_for(waiter, self.limits.send_timeout_s)
        except TimeoutError:
            self.on_event("send_timeout", {"client": self.info.client[0]})
            self._close(abort=True)
            raise ConnectionError("client stopped reading") from None

    async def wait_window(self, sid: int) -> None:
        stream = self.streams.get(sid)
        if stream is None or self.closed:
            raise ConnectionError("stream closed")
        waiter = self.loop.create_future()
        stream.window_waiter = waiter
        try:
            await asyncio.wait_for(waiter, self.limits.send_timeout_s)
        except TimeoutError:
            self.on_event("send_timeout", {"client": self.info.client[0], "stream": sid})
            with contextlib.suppress(h2.exceptions.ProtocolError, KeyError):
                self.conn.reset_stream(sid, ErrorCodes.CANCEL)
            self._flush()
            raise ConnectionError("client stopped reading the stream") from None
        finally:
            stream.window_waiter = None

    def _wake_windows(self, sid: int) -> None:
        targets = (
            self.streams.values()
            if sid == 0
            else [self.streams[sid]]
            if (sid in self.streams)
            else []
        )
        for stream in targets:
            waiter = stream.window_waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    # ------------------------------------------------------------------ timers
    def _tick(self) -> None:
        """Once a second: idle connection, and request bodies that stopped coming."""
        if self.closed:
            return
        now = self.loop.time()
        limits = self.limits
        if (
            not self.streams
            and self.idle_since
            and now - self.idle_since > (limits.keepalive_timeout_s)
        ):
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.conn.close_connection(ErrorCodes.NO_ERROR)
            self._flush()
            self._close()
            return
        for stream in list(self.streams.values()):
            body = stream.body
            if (
                body is not None
                and not body._done
                and now - stream.last_data > (limits.body_timeout_s)
            ):
                body.fail(BodyTimeout("body_timeout"))
        self.timer = self.loop.call_later(1.0, self._tick)

    def _close(self, abort: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        if self.transport is not None:
            if abort:
                self.transport.abort()
            else:
                self.transport.close()


def _target_and_authority(
    method: bytes, pseudo: dict[bytes, bytes], headers: Headers
) -> tuple[Target, bytes]:
    """RFC 9113 §8.3.1: `:path` is origin-form (or `*`); the host is `:authority` or a single
    Host header, and both, when present, must name the same host. Raises ProtocolError."""
    target = parse_target(method, pseudo.get(b":path", b""))
    if target.authority is not None:
        raise ProtocolError("bad_target", ":path must be origin-form", status=400)
    hosts = [v for k, v in headers if k == b"host"]
    if len(hosts) > 1:
        raise ProtocolError("bad_host", "more than one Host header", status=400)
    authority = pseudo.get(b":authority")
    if authority is not None and hosts and not same_authority(authority, hosts[0]):
        raise ProtocolError("bad_host", "Host differs from :authority", status=400)
    authority = authority if authority is not None else (hosts[0] if hosts else b"")
    return target, check_authority(authority)


# ---------------------------------------------------------------------- prepared heads
# A prepared head (web.messages.PreparedHead: a cached response) is HPACK-encoded once, with
# representations that leave the dynamic table alone (RFC 7541 §6.1 indexed static entries,
# §6.2.2 literals without indexing): the same bytes are valid in any connection's compression
# context, so they are kept in the head and only the per-response fields are encoded per use.
_STATIC_NAME: dict[bytes, int] = {}
_STATIC_STATUS: dict[bytes, int] = {}
for _i, (_name, _value) in enumerate(HeaderTable.STATIC_TABLE, 1):
    _STATIC_NAME.setdefault(_name, _i)
    if _name == b":status":
        _STATIC_STATUS[_value] = _i


def _hpack_int(value: int, prefix_bits: int, flags: int) -> bytes:
    """RFC 7541 §5.1: an integer with an N-bit prefix, `flags` in the first byte's high bits."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((flags | value,))
    out = bytearray((flags | limit,))
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _hpack_literal(name: bytes, value: bytes) -> bytes:
    """RFC 7541 §6.2.2: a literal header field without indexing (the name by its static-table
    index when it has one), strings not Huffman-coded (§5.2, H = 0)."""
    index = _STATIC_NAME.get(name)
    first = _hpack_int(index, 4, 0x00) if index else b"\x00" + _hpack_int(len(name), 7, 0) + name
    return first + _hpack_int(len(value), 7, 0) + value


def _hpack_status(status: int) -> bytes:
    code = str(status).encode()
    index = _STATIC_STATUS.get(code)
    if index is not None:
        return bytes((0x80 | index,))  # §6.1: indexed, from the static table
    return _hpack_literal(b":status", code)


# the encodings of recent short per-response fields (bounded: cleared when full)
_EXTRA_LITERALS: dict[tuple[bytes, bytes], bytes] = {}


class _Encoded:
    """Stands in for h2's HPACK encoder while a prepared header block is sent: h2 runs its
    stream state machine, frames the block (CONTINUATION included) and counts the stream as
    usual; only the encoding is ours."""

    __slots__ = ("block",)

    def __init__(self, block: bytes) -> None:
        self.block = block

    def encode(self, _headers: object) -> bytes:
        return self.block


class _H2Head:
    """What a PreparedHead keeps for HTTP/2 (`encoded["h2"]`): its header block and the
    Content-Length it declares."""

    __slots__ = ("block", "length", "status")

    def __init__(self, head: PreparedHead) -> None:
        self.status = str(head.status).encode()
        self.block = _hpack_status(head.status) + b"".join(
            _hpack_literal(k, v) for k, v in head.headers if k not in _FORBIDDEN_RESPONSE_HEADERS
        )
        length = [v for k, v in head.headers if k == b"content-length"]
        self.length = int(length[0]) if len(length) == 1 and length[0].isdigit() else None


class H2Responder:
    __slots__ = ("_c", "_left", "_stream_ended", "ended", "head", "started", "stream_id")

    def __init__(self, connection: H2Connection, stream_id: int, head: bool = False) -> None:
        self._c = connection
        self.head = head
        self.stream_id = stream_id
        self.started = False
        self.ended = False
        self._left: int | None = None  # body bytes still due (a prepared head's length)
        self._stream_ended = False  # END_STREAM sent on HEADERS or the last DATA

    async def start_prepared(self, head: PreparedHead, extra: Headers) -> None:
        """Start a response with a prepared head (web.messages.start_prepared): its header
        block is encoded once per head, `extra` per response; the HEADERS frame leaves with
        the first DATA frame (or the end). A response with no body to come (HEAD, 204, 304,
        Content-Length: 0) ends the stream on HEADERS; with a Content-Length, the DATA frame
        that completes it carries END_STREAM."""
        c = self._c
        if c.closed:
            raise ConnectionError("connection closed")
        try:
            check_fields(extra)
        except FieldError as exc:
            raise ConnectionError(f"invalid response: {exc}") from None
        conn = c.conn
        encoder = conn.encoder
        if encoder.header_table.resized:
            # RFC 7541 §4.2: a table size update is due at the start of the next header
            # block, which h2's own encoder writes
            await self.start(head.status, [*head.headers, *extra])
            return
        h2head = head.encoded.get("h2")
        if not isinstance(h2head, _H2Head):
            h2head = head.encoded["h2"] = _H2Head(head)
        parts = [h2head.block]
        for field in extra:
            literal = _EXTRA_LITERALS.get(field)
            if literal is None:
                if field[0] in _FORBIDDEN_RESPONSE_HEADERS:
                    continue
                literal = _hpack_literal(*field)
                if len(field[1]) <= 64:  # Age, X-Blindfold-Cache: a few values, over and over
                    if len(_EXTRA_LITERALS) >= 4096:
                        _EXTRA_LITERALS.clear()
                    _EXTRA_LITERALS[field] = literal
            parts.append(literal)
        block = b"".join(parts)
        no_body = self.head or head.status in (204, 304) or h2head.length == 0
        self.started = True
        # h2 sees only `:status` (its state machine tells informational from final by it);
        # the fields were checked by check_fields, so its outbound checks are skipped here
        config = conn.config
        checks = (config.validate_outbound_headers, config.normalize_outbound_headers)
        conn.encoder = _Encoded(block)  # type: ignore[assignment]
        config.validate_outbound_headers = config.normalize_outbound_headers = False
        try:
            conn.send_headers(self.stream_id, [(b":status", h2head.status)], end_stream=no_body)
        except (h2.exceptions.ProtocolError, KeyError) as exc:
            raise ConnectionError(f"stream gone: {exc}") from None
        finally:
            conn.encoder = encoder
            config.validate_outbound_headers, config.normalize_outbound_headers = checks
        self._stream_ended = no_body
        self._left = h2head.length

    async def start(self, status: int, headers: Headers) -> None:
        c = self._c
        if c.closed:
            raise ConnectionError("connection closed")
        out = [(b":status", str(status).encode())]
        out += [(k.lower(), v) for k, v in headers if k.lower() not in _FORBIDDEN_RESPONSE_HEADERS]
        self.started = True
        try:
            c.conn.send_headers(self.stream_id, out)
        except (h2.exceptions.ProtocolError, KeyError) as exc:
            raise ConnectionError(f"stream gone: {exc}") from None
        c._flush()
        await c.drain()

    async def interim(self, status: int, headers: Headers) -> None:
        """An interim (1xx) response before the final one: a HEADERS frame without END_STREAM
        (RFC 9113 §8.1); never 101 (RFC 9113 §8.6)."""
        c = self._c
        if c.closed or self.started or not 102 <= status <= 199:
            return
        out = [(b":status", str(status).encode())]
        out += [(k.lower(), v) for k, v in headers if k.lower() not in _FORBIDDEN_RESPONSE_HEADERS]
        try:
            c.conn.send_headers(self.stream_id, out)
        except (h2.exceptions.ProtocolError, KeyError):
            return
        c._flush()
        await c.drain()

    async def send(self, data: bytes) -> None:
        c = self._c
        view = memoryview(b"" if self.head else data)
        while view:
            if c.closed:
                raise ConnectionError("connection closed")
            try:
                window = c.conn.local_flow_control_window(self.stream_id)
            except (h2.exceptions.ProtocolError, KeyError):
                raise ConnectionError("stream gone") from None
            if window <= 0:
                await c.wait_window(self.stream_id)
                continue
            size = min(window, c.conn.max_outbound_frame_size, len(view))
            # the DATA frame that completes a prepared head's Content-Length ends the stream
            last = self._left is not None and self._left == size
            piece = data if size == len(data) and isinstance(data, bytes) else view[:size].tobytes()
            try:
                c.conn.send_data(self.stream_id, piece, end_stream=last)
            except (h2.exceptions.ProtocolError, KeyError) as exc:
                raise ConnectionError(f"stream gone: {exc}") from None
            if self._left is not None:
                self._left -= size
                self._stream_ended = last
            view = view[size:]
            c._flush()
            await c.drain()

    async def end(self) -> None:
        c = self._c
        self.ended = True
        if c.closed:
            return
        if not self._stream_ended:
            with contextlib.suppress(h2.exceptions.ProtocolError, KeyError):
                c.conn.end_stream(self.stream_id)
        c._flush()

    def abort(self) -> None:
        c = self._c
        self.ended = True
        with contextlib.suppress(h2.exceptions.ProtocolError, KeyError):
            c.conn.reset_stream(self.stream_id, ErrorCodes.INTERNAL_ERROR)
        c._flush()
