"""HTTP/2 server connection: web.h2core drives the protocol (framing, HPACK, flow control, stream
states); this module drives it from asyncio, answers a fresh cache hit at once (`answer_now`) or
runs one handler task per stream, and defends the connection against the known HTTP/2 abuses:

- rapid reset (CVE-2023-44487): more than `h2_max_resets_per_window` streams reset by the client
  in a window ends the connection with ENHANCE_YOUR_CALM;
- control-frame floods (SETTINGS, PING, WINDOW_UPDATE, PRIORITY, empty DATA): likewise;
- too many streams: MAX_CONCURRENT_STREAMS is advertised and enforced by the core; a connection
  that has opened `h2_max_streams_per_connection` streams is asked to go away (GOAWAY NO_ERROR);
- huge header blocks and HPACK tables: the core bounds CONTINUATION frames and the decoded list
  (ENHANCE_YOUR_CALM), HEADER_TABLE_SIZE is advertised and enforced by its HPACK decoder; a list
  over MAX_HEADER_LIST_SIZE is answered 431.

A malformed request (RFC 9113 §8.1.1: bad pseudo-headers, connection-specific fields, a Host
that differs from :authority...) is a stream error: its stream is reset with PROTOCOL_ERROR and
the connection's other streams go on (h2core.field_error, per stream).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from hpack.table import HeaderTable

from blindfold.errors import ProtocolError
from blindfold.web import h2core
from blindfold.web.h2core import ConnectionFailed, H2Server, StreamGone, field_error, join_cookies
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
_REQUEST, _DATA, _TRAILERS, _RESET = h2core.REQUEST, h2core.DATA, h2core.TRAILERS, h2core.RESET
_WINDOW, _SETTINGS, _GOAWAY = h2core.WINDOW, h2core.SETTINGS, h2core.GOAWAY


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
        # a handler's synchronous answer to a whole request without a body (`answer_now`: a
        # cache hit), tried as the request is parsed; a Task per stream otherwise
        self.answer_now: Callable[[Request, H2Responder], bool] | None = getattr(
            handler, "answer_now", None
        )
        self.limits = limits
        self.info = info
        self.on_event = on_event or (lambda _e, _f: None)
        self.conn = H2Server(
            max_concurrent_streams=limits.h2_max_concurrent_streams,
            initial_window=limits.h2_initial_window,
            max_header_list_size=limits.h2_max_header_list_size,
            header_table_size=limits.h2_header_table_size,
        )
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
        # the last request parsed (`_on_request`): its decoded list, and the parse
        self._parsed: (
            tuple[list[tuple[bytes, bytes]], tuple[bytes, bytes, bytes, bytes, Headers]] | None
        ) = None

    # ------------------------------------------------------------------ asyncio
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        # open the connection window as far as the streams may go
        self.conn.initiate(connection_window=self.limits.h2_initial_window * 4)
        self._flush()
        self._tick()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            events = self.conn.receive(data)
        except ConnectionFailed as exc:
            self.on_event(
                "h2_protocol_error", {"client": self.info.client[0], "error": str(exc)[:200]}
            )
            self._flush()
            self._close()
            return
        for event in events:
            kind = event[0]
            if kind == _REQUEST:
                self._on_request(event[1], event[2], event[3])  # type: ignore[arg-type]
            elif kind == _DATA:
                self._on_data(event[1], event[2], event[3], event[4])  # type: ignore[arg-type]
            elif kind == _RESET:
                self._on_reset(event[1], event[3])  # type: ignore[arg-type]
            elif kind == _TRAILERS:
                self._on_trailers(event[1], event[2])  # type: ignore[arg-type]
            elif kind == _GOAWAY:
                self._close()
            else:  # WINDOW_UPDATE, SETTINGS, PING, PRIORITY
                self._count_control()
                if kind == _WINDOW:
                    self._wake_windows(event[1])  # type: ignore[arg-type]
                elif kind == _SETTINGS:
                    self._wake_windows(0)  # INITIAL_WINDOW_SIZE may have grown
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
        # and stop reading: a client that sends but never reads would make us buffer what
        # its frames cost us (RST_STREAM, PING and SETTINGS acks) without bound (atk-h2)
        self.write_paused = True
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()
        waiters, self.drain_waiters = self.drain_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    # ------------------------------------------------------------------ events
    def _malformed(self, sid: int, error: str) -> None:
        """RFC 9113 §8.1.1: a malformed request or trailer section resets its stream with
        PROTOCOL_ERROR (a stream error)."""
        self.on_event(
            "bad_request",
            {"client": self.info.client[0], "reset": "PROTOCOL_ERROR", "error": error},
        )
        self.conn.reset_stream(sid, h2core.PROTOCOL_ERROR)
        self._count_reset()

    def _on_trailers(self, sid: int, headers: list[tuple[bytes, bytes]]) -> None:
        error = field_error(join_cookies(headers), True)
        stream = self.streams.get(sid)
        if error is not None:
            self._malformed(sid, error)
            stream = self.streams.pop(sid, None)
            if stream is not None:
                if stream.body is not None:
                    stream.body.fail(ConnectionError("malformed trailers"))
                if stream.task is not None and not stream.task.done():
                    stream.task.cancel()
            return
        if stream is not None and stream.body is not None:
            stream.body.end()

    def _on_request(self, sid: int, fields: list[tuple[bytes, bytes]], ended: bool) -> None:
        self.opened += 1
        self.idle_since = 0.0
        limits = self.limits
        if self.opened > limits.h2_max_streams_per_connection and not self.going_away:
            self.going_away = True  # finish what is open, then the client reconnects
            self.conn.close_connection(h2core.NO_ERROR, last_stream_id=sid)
        # a request whose header list is the very list decoded before (h2core's cache of
        # blocks that left the HPACK table alone: a client's repeated request) is the same
        # request: its checks and parse are kept, only its id and objects are new
        parsed = self._parsed
        pre: tuple[bytes, bytes, bytes, bytes, Headers] | int | None
        if parsed is not None and parsed[0] is fields:
            pre = parsed[1]
        else:
            pre = self._parse(sid, fields)
            if pre is None:
                return  # malformed: the stream was reset
            if not isinstance(pre, int):
                self._parsed = (fields, pre)
        stream = _Stream()
        self.streams[sid] = stream
        if isinstance(pre, int):
            head = any(k == b":method" and v == b"HEAD" for k, v in fields)
            responder = H2Responder(self, sid, head)
            stream.responder = responder
            stream.task = self.loop.create_task(self._refuse(responder, pre))
            return
        method, target, authority, raw_path, headers = pre
        headers = headers.copy()
        responder = H2Responder(self, sid, method == b"HEAD")
        stream.responder = responder
        info = self.info
        request = Request(
            method,
            target,
            authority,
            info.scheme,
            headers,
            "2",
            info.client,
            info.server,
            request_id_for(headers, info.edge_request_ids),
            info.tls,
            raw_path,
            info.edge_request_ids,
        )
        if ended and self.answer_now is not None and self._answer(request, responder):
            return
        stream.body = body = BodyStream(limits.max_body_bytes, self._acker(stream, sid))
        stream.last_data = self.loop.time()
        if ended:
            body.end()
        stream.task = self.loop.create_task(self._run(request, stream, responder))

    def _parse(
        self, sid: int, fields: list[tuple[bytes, bytes]]
    ) -> tuple[bytes, bytes, bytes, bytes, Headers] | int | None:
        """A request's header list checked and parsed: (method, target, authority, raw path,
        headers with Host), or the status to refuse it with, or None when it is malformed
        (RFC 9113 §8.1.1: its stream is reset here)."""
        fields = join_cookies(fields)
        error = field_error(fields, False)
        if error is not None:
            self._malformed(sid, error)
            return None
        limits = self.limits
        # one pass: pseudo-header fields (each at most once: field_error checked that), the
        # rest, the list's size (RFC 9113 §6.5.2), Host and the first Content-Length
        pseudo: dict[bytes, bytes] = {}
        headers: Headers = []
        size = 0
        has_host = False
        length: bytes | None = None
        for name, value in fields:
            size += len(name) + len(value) + 32
            if name[0] == 0x3A:  # ":"
                pseudo[name] = value
                continue
            headers.append((name, value))
            if name == b"host":
                has_host = True
            elif name == b"content-length" and length is None:
                length = value
        if len(headers) > limits.max_headers or size > limits.h2_max_header_list_size:
            # the HPACK decoder allows up to 64 KiB (as h2 did): a list over our
            # MAX_HEADER_LIST_SIZE below that is refused here
            return 431
        method = pseudo.get(b":method", b"")
        try:
            target, authority = _target_and_authority(method, pseudo, headers)
        except ProtocolError as exc:
            self.on_event(
                "bad_request", {"client": self.info.client[0], "status": 400, "error": str(exc)}
            )
            return 400
        scheme = pseudo.get(b":scheme", self.info.scheme)
        if scheme != self.info.scheme:
            # RFC 9113 §8.3.1: the scheme of the target. Ours is the connection's (https on
            # TLS); anything else would be forwarded into Forwarded/X-Forwarded-Proto.
            self.on_event(
                "bad_request",
                {"client": self.info.client[0], "status": 400, "error": "unexpected :scheme"},
            )
            return 400
        if not has_host:
            headers.insert(0, (b"host", authority))
        if length is not None and length.isdigit() and int(length) > limits.max_body_bytes:
            return 413
        return method, target.origin_form, authority, pseudo.get(b":path", b""), headers

    def _answer(self, request: Request, responder: H2Responder) -> bool:
        """A whole request without a body: the handler's `answer_now` may answer it at once
        (no Task, no await: what it writes is what the Task would have written). False: it
        declined, and the handler runs in a Task as for any other request."""
        assert self.answer_now is not None
        try:
            answered = self.answer_now(request, responder)
        except Exception as exc:  # as run_stream_handler: a handler bug is a 500 or a reset
            self.on_event("handler_error", {"error": repr(exc), "request_id": request.request_id})
            if responder.started:
                responder.abort()
            else:
                try:
                    responder.start_now(500, [(b"content-length", b"0")])
                    responder.end_now()
                except ConnectionError:
                    pass
            answered = True
        if answered:
            if not responder.ended:
                responder.abort()
            self._stream_done(responder.stream_id)
        return answered

    def _on_data(self, sid: int, data: bytes, fc: int, ended: bool) -> None:
        stream = self.streams.get(sid)
        if not data:
            self._count_control()  # empty DATA frames cost us and carry nothing
            if self.closed:
                return
        if stream is None or stream.body is None or stream.body.finished or not data:
            self.conn.acknowledge_received_data(fc, sid)
        else:
            stream.acks.append(fc)
            stream.last_data = self.loop.time()
            stream.body.feed(data)
        if ended and stream is not None and stream.body is not None:
            stream.body.end()

    def _acker(self, stream: _Stream, sid: int) -> Callable[[int], None]:
        return lambda _n: self._ack(stream, sid)

    def _ack(self, stream: _Stream, sid: int) -> None:
        """The handler took one chunk: open the windows by what it cost."""
        if stream.acks and not self.closed:
            fc = stream.acks.pop(0)
            self.conn.acknowledge_received_data(fc, sid)
            self._flush()

    def _on_reset(self, sid: int, by_peer: bool) -> None:
        stream = self.streams.pop(sid, None)
        if by_peer or stream is not None:
            # the client's RST_STREAM, or a stream with a handler that the core reset for the
            # client's frames (WINDOW_UPDATE 0, DATA past Content-Length...): rapid reset
            # either way (CVE-2023-44487; atk-h2)
            self._count_reset()
        else:
            self._count_control()  # an RST_STREAM the core answered a frame with by itself
        if stream is not None:
            if stream.body is not None:
                stream.body.fail(ConnectionError("stream reset by the client"))
            if stream.task is not None and not stream.task.done():
                stream.task.cancel()

    def _count_reset(self) -> None:
        now = self.loop.time()
        self.resets.append(now)
        self.resets = [t for t in self.resets if now - t < self.limits.h2_abuse_window_s]
        if len(self.resets) > self.limits.h2_max_resets_per_window:
            self._calm("rapid_reset")

    def _count_control(self) -> None:
        now = self.loop.time()
        self.control.append(now)
        if len(self.control) > self.limits.h2_max_control_frames_per_window:
            self.control = [t for t in self.control if now - t < self.limits.h2_abuse_window_s]
            if len(self.control) > self.limits.h2_max_control_frames_per_window:
                self._calm("control_flood")

    def _calm(self, reason: str) -> None:
        self.on_event("h2_abuse", {"client": self.info.client[0], "reason": reason})
        self.conn.close_connection(h2core.ENHANCE_YOUR_CALM)
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
        except ConnectionError:
            pass  # the connection or the stream went first: nobody to answer
        finally:
            self._stream_done(responder.stream_id)

    def _stream_done(self, sid: int) -> None:
        stream = self.streams.pop(sid, None)
        if stream is not None and stream.body is not None and not stream.body.finished:
            # answered before the request body ended: tell the client to stop sending
            self.conn.reset_stream(sid, h2core.NO_ERROR)
            self._flush()
        if not self.streams:
            self.idle_since = self.loop.time()
            if self.going_away:
                self._close()

    # ------------------------------------------------------------------ writing
    def _flush(self) -> None:
        out = self.conn.out
        if out and self.transport is not None and not self.closed:
            self.transport.write(bytes(out))
        out.clear()

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
            self.conn.reset_stream(sid, h2core.CANCEL)
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
            self.conn.close_connection(h2core.NO_ERROR)
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

    @property
    def can_answer_now(self) -> bool:
        """Whether a response of up to WHOLE_BODY_BYTES can be written at once (`answer_now`):
        the write buffer is not full and both flow-control windows hold it."""
        c = self._c
        if c.closed or c.write_paused:
            return False
        try:
            return c.conn.window(self.stream_id) >= _ANSWER_NOW_BYTES
        except StreamGone:
            return False

    async def start_prepared(self, head: PreparedHead, extra: Headers) -> None:
        self.start_prepared_now(head, extra)

    def start_prepared_now(self, head: PreparedHead, extra: Headers, plain: bool = False) -> None:
        """Start a response with a prepared head (web.messages.start_prepared): its header
        block is encoded once per head, `extra` per response; the HEADERS frame leaves with
        the first DATA frame (or the end). A response with no body to come (HEAD, 204, 304,
        Content-Length: 0) ends the stream on HEADERS; with a Content-Length, the DATA frame
        that completes it carries END_STREAM. `plain` (as HTTP/1.1's): the caller vouches that
        every field of `extra` is valid (what check_fields checks)."""
        c = self._c
        if c.closed:
            raise ConnectionError("connection closed")
        conn = c.conn
        parts = [b""]
        for field in extra:
            # a field found here was checked when it was encoded
            literal = _EXTRA_LITERALS.get(field)
            if literal is None:
                if not plain:
                    try:
                        check_fields([field])
                    except FieldError as exc:
                        raise ConnectionError(f"invalid response: {exc}") from None
                if field[0] in _FORBIDDEN_RESPONSE_HEADERS:
                    continue
                literal = _hpack_literal(*field)
                if len(field[1]) <= 64:  # Age, X-Blindfold-Cache: a few values, over and over
                    if len(_EXTRA_LITERALS) >= 4096:
                        _EXTRA_LITERALS.clear()
                    _EXTRA_LITERALS[field] = literal
            parts.append(literal)
        if conn.encoder_resized:
            # RFC 7541 §4.2: a table size update is due at the start of the next header
            # block, which the HPACK encoder writes
            self.start_now(head.status, [*head.headers, *extra])
            return
        h2head = head.encoded.get("h2")
        if not isinstance(h2head, _H2Head):
            h2head = head.encoded["h2"] = _H2Head(head)
        parts[0] = h2head.block
        no_body = self.head or head.status in (204, 304) or h2head.length == 0
        self.started = True
        try:
            conn.send_header_block(self.stream_id, b"".join(parts), no_body)
        except StreamGone as exc:
            raise ConnectionError(f"stream gone: {exc}") from None
        self._stream_ended = no_body
        self._left = h2head.length

    async def start(self, status: int, headers: Headers) -> None:
        self.start_now(status, headers)
        self._c._flush()
        await self._c.drain()

    def start_now(self, status: int, headers: Headers) -> None:
        c = self._c
        if c.closed:
            raise ConnectionError("connection closed")
        out = [(k.lower(), v) for k, v in headers if k.lower() not in _FORBIDDEN_RESPONSE_HEADERS]
        try:
            check_fields(out)
        except FieldError as exc:
            raise ConnectionError(f"invalid response: {exc}") from None
        self.started = True
        try:
            c.conn.send_headers(self.stream_id, [(b":status", str(status).encode()), *out], False)
        except StreamGone as exc:
            raise ConnectionError(f"stream gone: {exc}") from None

    async def interim(self, status: int, headers: Headers) -> None:
        """An interim (1xx) response before the final one: a HEADERS frame without END_STREAM
        (RFC 9113 §8.1); never 101 (RFC 9113 §8.6)."""
        c = self._c
        if c.closed or self.started or not 102 <= status <= 199:
            return
        out = [(k.lower(), v) for k, v in headers if k.lower() not in _FORBIDDEN_RESPONSE_HEADERS]
        try:
            check_fields(out)
            c.conn.send_headers(self.stream_id, [(b":status", str(status).encode()), *out], False)
        except (FieldError, StreamGone):
            return
        c._flush()
        await c.drain()

    def send_now(self, data: bytes) -> bool:
        """`send` when the windows hold `data` (`can_answer_now`): whether bytes were sent."""
        if self.head or not data:
            return False
        c = self._c
        if c.closed:
            raise ConnectionError("connection closed")
        size = len(data)
        last = self._left is not None and self._left == size
        try:
            c.conn.send_data(self.stream_id, data, last)
        except StreamGone as exc:
            raise ConnectionError(f"stream gone: {exc}") from None
        if self._left is not None:
            self._left -= size
            self._stream_ended = last
        return True

    async def send(self, data: bytes) -> None:
        c = self._c
        view = memoryview(b"" if self.head else data)
        while view:
            if c.closed:
                raise ConnectionError("connection closed")
            try:
                window = c.conn.window(self.stream_id)
            except StreamGone:
                raise ConnectionError("stream gone") from None
            if window <= 0:
                await c.wait_window(self.stream_id)
                continue
            size = min(window, len(view))
            # the DATA frame that completes a prepared head's Content-Length ends the stream
            last = self._left is not None and self._left == size
            piece = data if size == len(data) and isinstance(data, bytes) else view[:size].tobytes()
            try:
                c.conn.send_data(self.stream_id, piece, last)
            except StreamGone as exc:
                raise ConnectionError(f"stream gone: {exc}") from None
            if self._left is not None:
                self._left -= size
                self._stream_ended = last
            view = view[size:]
            c._flush()
            await c.drain()

    def end_now(self) -> None:
        c = self._c
        self.ended = True
        if c.closed:
            return
        if not self._stream_ended:
            try:
                c.conn.end_stream(self.stream_id)
            except StreamGone:
                pass
        c._flush()

    async def end(self) -> None:
        self.end_now()

    def abort(self) -> None:
        c = self._c
        self.ended = True
        c.conn.reset_stream(self.stream_id, h2core.INTERNAL_ERROR)
        c._flush()


# what `can_answer_now` wants the windows to hold: the largest body keyless answers at once
# (edge.modes.keyless WHOLE_BODY_BYTES) with room for its HEADERS
_ANSWER_NOW_BYTES = 256 * 1024
