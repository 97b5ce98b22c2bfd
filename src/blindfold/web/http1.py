"""HTTP/1.1 server connection: llhttp (httptools) parses requests, this module frames responses
and drives both from asyncio.

llhttp runs with every leniency off; what h11 (the parser this replaced) refused and llhttp lets
through is refused here too (HTTP/0.9, runs of spaces in the request line, transfer codings
other than a lone `chunked`, oversized heads, header counts and trailers), and values lose their
trailing whitespace as with h11. tests/unit/test_http1_differential.py holds the two to the same
answers, and lists where llhttp is stricter. Responses are serialized here, as h11 wrote them:
fields checked, framing from Content-Length / chunked / close-delimited (HTTP/1.0), no body for
HEAD, 204 and 304, and a Content-Length that the body over- or under-runs closes the connection.
`start_prepared` sends a PreparedHead encoded once.

One request at a time: llhttp may parse a little ahead (a slice of a read), but what it parsed
waits in a queue, and the rest of the read as bytes, with reading paused, until the response
before them is complete. The body is handed to
the handler as a BodyStream; reading from the transport pauses while too much of it is
buffered. Every phase has a deadline: the request head, each body piece, idle keep-alive, and a
client that does not read the response.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections import deque
from collections.abc import Callable
from http import HTTPStatus
from typing import Any, cast

import httptools  # type: ignore[import-untyped]

from blindfold.errors import ProtocolError
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
)
from blindfold.web.target import check_authority, parse_target, same_authority

IDLE, HEAD, BODY, HANDLING = range(4)
_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}
_STATUS_LINES = {s: b"HTTP/1.1 %d %s\r\n" % (s, _REASONS.get(s, b"")) for s in range(100, 1000)}

# RFC 9112 §3: method SP request-target SP HTTP-version (h11's regular expression)
_REQUEST_LINE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+ [\x21-\x7e]+ HTTP/[0-9]\.[0-9]\Z")

# the request fields the connection itself reads
_SPECIAL = frozenset((b"host", b"content-length", b"transfer-encoding", b"connection", b"expect"))

# bytes parsed at once in a head (or between requests), and in a chunked body: what a read may
# turn into at once is bounded by these (a read of a Content-Length body is taken whole)
_HEAD_SLICE = 4096
_CHUNKED_SLICE = 65536

# queued parser events (kind, payload)
_REQ, _DATA, _END, _ERR, _EOF = range(5)


class _Refused(Exception):
    """Raised inside a parser callback: the request is answered with `status` and closed."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text


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


class _Head:
    """A request head as the parser callbacks collect it, with what its fields say."""

    __slots__ = (
        "chunked",
        "expect",
        "headers",
        "hosts",
        "keep_alive",
        "length",
        "method",
        "target",
        "version",
    )

    def __init__(self, method: bytes, target: bytes, version: str, headers: Headers) -> None:
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers
        self.hosts: list[bytes] = []
        self.length: int | None = None
        self.chunked = False
        self.keep_alive = version == "1.1"  # h11: never for HTTP/1.0, even with keep-alive
        self.expect = False  # 100-continue (HTTP/1.1 only)


class H1Connection(asyncio.Protocol):
    def __init__(
        self,
        handler: Handler,
        limits: HttpLimits,
        info: ConnInfo,
        on_event: Callable[[str, dict[str, Any]], None] | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.handler = handler
        # a handler's synchronous answer to a request without a body (`answer_now`: a cache
        # hit), tried when the whole request is in; a Task per request otherwise
        self.answer_now: Callable[[Request, H1Responder], bool] | None = getattr(
            handler, "answer_now", None
        )
        # a request without a body whose end is next in the queue: offered to answer_now
        # there, its (ended, empty) BodyStream made only if answer_now declines
        self.deferred: tuple[Request, H1Responder] | None = None
        self.limits = limits
        self.info = info
        self.on_event = on_event or (lambda _e, _f: None)
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.loop = loop or asyncio.get_event_loop()  # (given: no getpid(2) to find it)
        self.phase = IDLE
        self.body: BodyStream | None = None
        self.task: asyncio.Task[None] | None = None
        self.responder: H1Responder | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.expiry: float | None = None  # when the current phase's deadline passes
        self.expiry_reason = ""
        self.paused_reading = False
        self.write_paused = False
        self.drain_waiter: asyncio.Future[None] | None = None
        self.closed = False
        self.requests = 0
        self.events: deque[tuple[int, Any]] = deque()
        self.failed = False  # the parser stopped on an error: nothing more is fed to it
        self.eof = False  # the parser has seen the end of the client's bytes
        self.eof_held = False  # the client half-closed (its last bytes may still be held)
        self.held = b""  # bytes not parsed yet: they follow a whole request still waiting
        self.ends_queued = 0  # whole requests parsed, not yet taken from the queue
        self._body_left: int | None = None  # of a Content-Length body being parsed
        self.waiting_100 = False  # the client asked for 100 Continue and sent no body yet
        self.keep_alive = True  # of the request being answered (h11's rules: 1.1, no close)
        # parser state (ahead of `phase` when requests are pipelined)
        self._in_head = False
        self._in_message = False
        self._head_bytes = 0
        self._stall_bytes = 0  # bytes fed since the parser last made progress (trailers...)
        self._progress = False
        self._began_in_feed = self._ended_in_feed = False
        self._url = b""
        self._chunk = b""  # the read being parsed
        self._line_src = b""  # the reads a head in progress began in
        self._fields: Headers = []
        self._field_bytes = 0
        self._te = False

    # ------------------------------------------------------------------ asyncio
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # an asyncio.Transport (uvloop's transports are not its subclasses)
        self.transport = cast(asyncio.Transport, transport)
        self._deadline(self.limits.header_timeout_s, "header_timeout")

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        began = self.phase == IDLE
        if began:
            self.phase = HEAD
        if self.held:
            self.held += data  # reading is paused; a read already under way still lands
        else:
            self._feed(data)
        self._process()
        if began and self.phase == HEAD and not self.closed:
            # the head is not whole yet: timed from now (set after the parse, not before: a
            # whole request in this read, most of them, moved on and never needed it)
            self._deadline(self.limits.header_timeout_s, "header_timeout")

    def eof_received(self) -> bool | None:
        self.eof_held = True
        if not self.held:
            self._parse_eof()
        self._process()
        return True  # keep our side open: a response may still be going out

    def _parse_eof(self) -> None:
        if not self.failed and not self.eof:
            self.eof = True
            if self._in_message:
                # h11: "peer closed connection without sending complete message"
                self.events.append((_ERR, (400, "peer closed inside the request")))
            else:
                self.events.append((_EOF, None))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.on_event("closed", {})
        self._drop_timer()
        if self.body is not None and not self.body.finished:
            self.body.fail(ConnectionError("client went away"))
        self.body = None  # its callbacks refer to us: free both without the cyclic GC
        # likewise the responder (it refers back to us) and the parser (it holds our bound
        # callbacks): left here, each connection's objects waited for the cyclic collector
        self.responder = None
        self.parser = _CLOSED_PARSER
        task, self.task = self.task, None  # the task's coroutine refers to us
        if task is not None and not task.done():
            task.cancel()
        if self.drain_waiter is not None and not self.drain_waiter.done():
            self.drain_waiter.set_exception(ConnectionError("client went away"))

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.drain_waiter is not None and not self.drain_waiter.done():
            self.drain_waiter.set_result(None)

    # ------------------------------------------------------------------ parsing
    def _feed(self, data: bytes) -> None:
        """Parse `data` in slices, and stop (holding the rest in `held`) once a whole request
        waits in the queue: a read full of small pipelined requests must not become thousands
        of parsed heads at once. Inside a body of known length the slice is the rest of it."""
        n = len(data)
        offset = 0
        while offset < n and not self.failed and not self.eof:
            if self.ends_queued:
                self.held = data[offset:]
                return
            if self._in_head or not self._in_message:
                step = _HEAD_SLICE
            elif self._body_left is not None:
                step = max(self._body_left, 1)
            else:
                step = _CHUNKED_SLICE
            piece = data if offset == 0 and n <= step else data[offset : offset + step]
            offset += len(piece)
            self._parse(piece)

    def _pump(self) -> None:
        """Process the queue, then parse held bytes while no whole request is waiting."""
        while True:
            self._process()
            if self.closed or self.ends_queued or self.phase == HANDLING:
                return
            if self.held:
                data, self.held = self.held, b""
                self._feed(data)
            elif self.eof_held and not self.eof:
                self._parse_eof()
            else:
                return

    def _parse(self, data: bytes) -> None:
        if self.failed or self.eof:
            return  # bytes after an error or after a half-close are not parsed
        limits = self.limits
        size = len(data)
        fresh = not self._in_message  # a message (if any) begins at this read's first byte
        self._progress = False
        self._began_in_feed = self._ended_in_feed = False
        while data:
            try:
                if self._in_head:  # the head goes on from an earlier read
                    self._line_src += data
                self._chunk = data
                self.parser.feed_data(data)
                data = b""
            except httptools.HttpParserUpgrade as exc:
                # Upgrade (h2c, websocket) or CONNECT: we never switch protocols, so the
                # request is answered as any other and what follows is parsed as HTTP (h11
                # does the same once the response declines the switch).
                offset = int(exc.args[0])
                data = data[offset:]
                self.parser = httptools.HttpRequestParser(self)
                self._in_head = self._in_message = False
            except httptools.HttpParserCallbackError as exc:
                self._fail(exc.__context__)
                return
            except httptools.HttpParserInvalidMethodError:
                # llhttp knows a fixed list of methods. A well-formed request line with another
                # one (methods are case-sensitive): RFC 9110 §9.1, 501; anything else: 400
                line = data.lstrip(b"\r\n").split(b"\r\n", 1)[0] if fresh else b""
                if fresh and not self._ended_in_feed and _REQUEST_LINE.match(line):
                    self._fail(_Refused(501, "unknown request method"))
                else:
                    self._fail(_Refused(400, "bad request line"))
                return
            except httptools.HttpParserError as exc:
                text = str(exc)
                if "Transfer-Encoding" in text and "Content-Length" not in text:
                    status = 501  # RFC 9112 §6.1, as h11: only a lone `chunked` is known
                elif text == "Invalid HTTP version":
                    status = 505  # RFC 9110 §15.6.6
                else:
                    status = 400
                self._fail(_Refused(status, text[:200]))
                return
        if self._in_head:
            # h11 refuses a head still incomplete past max_header_bytes (431); a head that began
            # after another request in this same read is counted from the next read on
            if not self._began_in_feed or not self._ended_in_feed:
                self._head_bytes += size
            if self._head_bytes > limits.max_header_bytes:
                self._fail(_Refused(431, "request head too large"))
        elif self._in_message:
            # framing bytes (chunk sizes, extensions, trailers) are bounded like a head
            self._stall_bytes = 0 if self._progress else self._stall_bytes + size
            if self._stall_bytes > limits.max_header_bytes:
                self._fail(_Refused(431, "chunk framing or trailers too large"))

    def _fail(self, exc: BaseException | None) -> None:
        self.failed = True
        if isinstance(exc, _Refused):
            self.events.append((_ERR, (exc.status, exc.text)))
        else:
            self.events.append((_ERR, (400, f"bad request: {exc!r}"[:200])))

    # httptools callbacks: errors raised here stop the parser (HttpParserCallbackError)
    def on_message_begin(self) -> None:
        self._line_src = self._chunk  # the request line is in here (or in the reads after it)
        self._in_head = self._in_message = self._began_in_feed = True
        self._head_bytes = 0
        self._url = b""
        self._fields = []
        self._field_bytes = 0
        self._te = False
        self._hosts: list[bytes] = []
        self._length: int | None = None
        self._asks_close = self._expect = False

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_head:  # a trailer field: checked by llhttp, bounded by _feed, dropped
            return
        name = name.lower()
        value = value.rstrip(b" \t")  # RFC 9112 §5: OWS around the value is not part of it
        if name in _SPECIAL:
            if name == b"host":
                self._hosts.append(value)
            elif name == b"content-length":
                if not value.isdigit():  # llhttp checked it; never trust int() with more
                    raise _Refused(400, "bad Content-Length")
                self._length = int(value)
            elif name == b"transfer-encoding":
                value = value.lower()  # as h11 hands it on
                if self._te or value != b"chunked":
                    raise _Refused(501, "only Transfer-Encoding: chunked is supported")
                self._te = True
            elif name == b"connection":
                self._asks_close = self._asks_close or b"close" in _tokens(value)
            else:  # expect
                self._expect = self._expect or b"100-continue" in _tokens(value)
        fields = self._fields
        fields.append((name, value))
        self._field_bytes += len(name) + len(value) + 4
        if len(fields) > self.limits.max_headers:
            raise _Refused(431, "too many header fields")

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._progress = True
        parser = self.parser
        version = parser.get_http_version()
        if version != "1.1" and version != "1.0":
            raise _Refused(400, f"HTTP/{version} is not served")  # HTTP/0.9: as h11
        method = parser.get_method()
        line = b"%s %s HTTP/" % (method, self._url)
        src = self._line_src
        # (find, not `in`: CPython 3.11's bytes.__contains__ first tries the operand as an
        # int, and raising and clearing that TypeError costs more than the search itself)
        if src.find(line) < 0 or (src.find(b"  ") >= 0 and _spaced_line(method, self._url, src)):
            # llhttp takes any run of spaces between the parts of the request line; h11 (and
            # RFC 9112 §3's grammar) one SP each. The well-formed line must be in what was
            # read, and not the same line with a run of spaces: a header such as
            # `X: GET /x HTTP/1.1` proves nothing (atk-h1 #3).
            raise _Refused(400, "malformed request line")
        if (self._te or self._length) and parser.should_upgrade():
            # llhttp hands over the bytes after the head of an Upgrade request as the new
            # protocol's: its body would be parsed as the next request. We never switch
            # protocols and a front that passes Upgrade on sends the body as a body: a request
            # smuggled inside it (attack review atk-h1 #1). h11 read the body; we refuse.
            raise _Refused(400, "Upgrade with a request body")
        self._line_src = b""
        if len(self._url) + self._field_bytes > self.limits.max_header_bytes:
            raise _Refused(431, "request head too large")
        head = _Head(method, self._url, version, self._fields)
        head.hosts = self._hosts
        head.length = self._length
        head.chunked = self._te
        if self._asks_close:
            head.keep_alive = False
        head.expect = self._expect and version == "1.1"
        self._body_left = None if self._te else self._length
        self.events.append((_REQ, head))

    def on_body(self, body: bytes) -> None:
        self._progress = True
        if self._body_left is not None:
            self._body_left -= len(body)
        self.events.append((_DATA, body))

    def on_message_complete(self) -> None:
        self._in_message = self._in_head = False
        self._progress = True
        self._ended_in_feed = True
        self.ends_queued += 1
        self._stall_bytes = 0
        self.events.append((_END, None))

    # ------------------------------------------------------------------ events
    def _process(self) -> None:
        events = self.events
        while events and not self.closed and self.phase != HANDLING:
            kind, payload = events.popleft()
            if kind == _REQ:
                self._on_request(payload)
            elif kind == _DATA:
                self.waiting_100 = False
                if self.body is not None:
                    self.body.feed(payload)
                    if self.body.buffered > self.limits.body_high_water:
                        self._pause_reading()
                self._deadline(self.limits.body_timeout_s, "body_timeout")
            elif kind == _END:
                self.ends_queued -= 1
                self.waiting_100 = False
                if self.body is not None:
                    self.body.end()
                self.phase = HANDLING
                self._cancel_timer()
                deferred = self.deferred
                if deferred is not None:
                    self.deferred = None
                    self._answer(*deferred)
            elif kind == _ERR:
                self._bad(*payload)
                return
            else:  # _EOF between requests
                if self.body is not None and not self.body.finished:
                    self.body.fail(ConnectionError("client closed inside the body"))
                if self.task is None or self.task.done():
                    self._close()
                return
        if (events or self.held) and not self.closed:
            self._pause_reading()  # pipelined bytes wait until this response is complete

    def _on_request(self, event: _Head) -> None:
        limits = self.limits
        length = event.length
        hosts = event.hosts
        if event.chunked and length is not None:
            # RFC 9112 §6.1: both framings at once is how requests are smuggled; refuse
            self._bad(400, "both Content-Length and Transfer-Encoding")
            return
        host = hosts[0] if hosts else b""
        if len(hosts) > 1:
            self._bad(400, "more than one Host header")  # RFC 9112 §3.2
            return
        if not host and event.version == "1.1":
            # an empty Host names no site (RFC 9112 §3.2 allows it only for targets without an
            # authority, which no origin serves); answer as nginx does rather than guess
            self._bad(400, "empty Host header")
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
            self._bad(413, "request body too large")
            return
        self.requests += 1
        self.phase = BODY
        self.keep_alive = event.keep_alive
        self.waiting_100 = event.expect
        info = self.info
        request = Request(  # positional: keywords through type() cost a dict per request
            event.method,  # method
            target.origin_form,  # target
            host,  # authority
            info.scheme,  # scheme
            event.headers,  # headers
            event.version,  # http_version
            info.client,  # client
            info.server,  # server
            request_id_for(event.headers, info.edge_request_ids),  # request_id
            info.tls,  # tls
            event.target,  # raw_target
            info.edge_request_ids,  # from_http_edge
        )
        responder = self.responder = H1Responder(
            self, head=event.method == b"HEAD", http10=event.version == "1.0"
        )
        if (
            self.answer_now is not None
            and not length
            and not event.chunked
            and self.events
            and self.events[0][0] == _END
        ):
            self.body = None
            self.deferred = (request, responder)  # its end is next: answered there (_answer)
            return  # (no body deadline: the end, next, would cancel it)
        self._deadline(limits.body_timeout_s, "body_timeout")
        body = self.body = BodyStream(limits.max_body_bytes, self._consumed, self._body_wait)
        self.task = self.loop.create_task(self._run(request, body, responder))

    def _answer(self, request: Request, responder: H1Responder) -> None:
        """A whole request without a body: the handler's `answer_now` may answer it at once
        (no Task, no await: what it writes is what the Task would have written); if it
        declines, the handler runs in a Task as any other request, with an ended body."""
        assert self.answer_now is not None
        try:
            answered = self.answer_now(request, responder)
        except Exception as exc:  # as _run: a handler bug must not leave the client hanging
            self.on_event("handler_error", {"error": repr(exc), "request_id": request.request_id})
            if responder.started:
                responder.abort()
            else:
                with contextlib.suppress(Exception):
                    responder.start_now(500, [(b"content-length", b"0"), (b"connection", b"close")])
                    responder.end_now()
            answered = True
        if not answered:
            body = self.body = BodyStream(self.limits.max_body_bytes, self._consumed)
            body.end()
            self.task = self.loop.create_task(self._run(request, body, responder))
        elif self.events or self.held:
            # pipelined requests wait: carried on from the loop, not from inside this parse
            # (a read of many small requests must not recurse once per request)
            self.loop.call_soon(self._after_response)
        else:
            self._after_response()

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
        responder = self.responder
        if (
            responder is not None
            and responder.done
            and responder.keep_alive
            and not responder.failed
            and self.phase == HANDLING
        ):
            self.body = None
            self.task = None
            self.responder = None
            self.phase = IDLE  # a pipelined head, whole or not, is timed as keep-alive (h11)
            self._deadline(self.limits.keepalive_timeout_s, "keepalive_timeout")
            self._pump()  # a pipelined request may be waiting already
            if not self.events and not self.held:
                self._resume_reading()
        else:
            self._close()

    # ------------------------------------------------------------------ flow control
    def _consumed(self, _n: int) -> None:
        if (
            self.paused_reading
            and self.body is not None
            and (self.body.buffered <= self.limits.body_high_water // 2)
            and not self.events
            and not self.held
        ):
            self._resume_reading()

    def _body_wait(self) -> None:
        if self.waiting_100 and self.transport is not None:
            self.waiting_100 = False
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

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
        # One timer per connection, moved lazily: a later deadline only updates `expiry` (the
        # timer, when it fires early, re-arms itself), an earlier one re-arms it. Three
        # call_later a request (head, body, keep-alive) cost more than parsing the request.
        when = self.loop.time() + seconds
        self.expiry = when
        self.expiry_reason = reason
        timer = self.timer
        if timer is None or timer.when() > when:
            if timer is not None:
                timer.cancel()
            self.timer = self.loop.call_at(when, self._fire)

    def _cancel_timer(self) -> None:
        self.expiry = None

    def _drop_timer(self) -> None:
        self.expiry = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _fire(self) -> None:
        self.timer = None
        expiry = self.expiry
        if expiry is None or self.closed:
            return
        if self.loop.time() < expiry:
            self.timer = self.loop.call_at(expiry, self._fire)
            return
        self.expiry = None
        self._expired(self.expiry_reason)

    def _expired(self, reason: str) -> None:
        self.timer = None
        if self.closed:
            return
        self.on_event(reason, {"client": self.info.client[0], "phase": self.phase})
        if self.phase == BODY and self.body is not None:
            self.body.fail(BodyTimeout(reason))  # the handler answers 408 or gives up
            return
        if self.phase == HEAD and self.responder is None:
            self._error_response(408, "request head not received in time")
            return
        self._close()

    def _bad(self, status: int, text: str) -> None:
        self.on_event(
            "bad_request", {"client": self.info.client[0], "status": status, "error": text}
        )
        self._error_response(status, text)

    def _error_response(self, status: int, text: str) -> None:
        """Answer with an error and close; the answer is written only if no response has
        started."""
        if self.task is not None and not self.task.done():
            self.task.cancel()
        responder = self.responder
        if (responder is None or not responder.started) and self.transport is not None:
            body = f"{status} {text}\n".encode()
            self.transport.write(
                b"%scontent-type: text/plain\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s"
                % (_STATUS_LINES.get(status, b"HTTP/1.1 %d \r\n" % status), len(body), body)
            )
        self._close()

    def _close(self, abort: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        self._drop_timer()
        if self.transport is not None:
            if abort:
                self.transport.abort()
            else:
                self.transport.close()


def _tokens(value: bytes) -> list[bytes]:
    """A comma-separated list header's elements, lower-cased (as h11's get_comma_header)."""
    return [t.strip() for t in value.lower().split(b",")]


BIG_WRITE = 1 << 14  # body chunks this big are not joined with the held head

# body framing of a response
_LENGTH, _CHUNKED, _UNTIL_CLOSE = range(3)


class H1Responder:
    """Writes the response. The head is held until the first body bytes or the end, so a
    small response leaves in one write (one syscall, one TCP segment)."""

    __slots__ = (
        "_c",
        "_framing",
        "_held",
        "_http10",
        "_left",
        "done",
        "ended",
        "failed",
        "head",
        "keep_alive",
        "started",
    )

    def __init__(self, connection: H1Connection, head: bool = False, http10: bool = False) -> None:
        self._c = connection
        self.head = head  # a HEAD request: the response has no body, whatever is sent
        self._http10 = http10
        self.started = False
        self.ended = False
        self.done = False  # the whole response was written
        self.failed = False  # the response broke its own framing: the connection must close
        self.keep_alive = connection.keep_alive
        self._held = b""
        self._framing = _LENGTH
        self._left = 0

    def _check(self) -> H1Connection:
        c = self._c
        if c.closed:
            raise ConnectionError("client went away")
        if self.started:
            raise ConnectionError("invalid response: already started")
        self.started = True  # as with h11: a head refused below is not replaced by a 500
        # ... and nothing was written: the connection must close, not wait for the next request
        # (atk-h1 #2); cleared when _head has framed the head
        self.failed = True
        return c

    @property
    def can_answer_now(self) -> bool:
        """Whether a response written without waiting would not grow an already full write
        buffer (`answer_now`; a response that fills it is the last one before a drain)."""
        c = self._c
        return not c.closed and not c.write_paused

    async def start(self, status: int, headers: Headers) -> None:
        self.start_now(status, headers)

    def start_now(self, status: int, headers: Headers) -> None:
        c = self._check()
        try:
            check_fields(headers)
        except FieldError:
            try:  # h11 takes names in any case (and sends them as given)
                check_fields([(name.lower(), value) for name, value in headers])
            except FieldError as exc:
                raise ConnectionError(f"invalid response: {exc}") from None
        self._head(c, status, headers, None)

    async def start_prepared(self, head: PreparedHead, extra: Headers) -> None:
        """A prepared head: its status line and fields encoded once (in `head.encoded["h1"]`),
        only `extra` checked and encoded per response."""
        self.start_prepared_now(head, extra)

    def start_prepared_now(self, head: PreparedHead, extra: Headers, plain: bool = False) -> None:
        """`plain`: the caller vouches that every field of `extra` is valid (what check_fields
        checks) and that none frames the message (Connection, Content-Length,
        Transfer-Encoding): neither is looked at again per response (a cache hit's Age)."""
        c = self._check()
        if not plain:
            try:
                check_fields(extra)
            except FieldError as exc:
                raise ConnectionError(f"invalid response: {exc}") from None
        cached = head.encoded.get("h1")
        if cached is None:
            cached = head.encoded["h1"] = _encode_prepared(head)
        self._head(c, head.status, extra, cached, plain)  # type: ignore[arg-type]

    def _head(
        self,
        c: H1Connection,
        status: int,
        headers: Headers,
        prepared: tuple[bytes, Headers, _Frame] | None,
        plain: bool = False,
    ) -> None:
        """Frame and encode the response head (h11's rules, RFC 9112 §6.3, §9.6) into _held.
        `plain`: `headers` holds no framing field (start_prepared_now)."""
        if not 200 <= status <= 999:
            raise ConnectionError(f"invalid response: status {status}")
        if c.phase != HANDLING:
            # answering before the whole request arrived: the connection cannot be reused
            headers = [*headers, (b"connection", b"close")]
            plain = False
        frame = _NO_FRAME if plain else _frame(headers)
        if prepared is not None:
            block, fields, pframe = prepared
            if frame.any:
                merged = pframe.merge(frame)
                if merged is None:
                    raise ConnectionError("invalid response: conflicting Content-Length")
                frame = merged
            else:
                frame = pframe
        else:
            block, fields = b"", []
        if frame.bad:
            raise ConnectionError(f"invalid response: {frame.bad}")
        need_close = False
        rewrite: list[tuple[bytes, bytes | None]] = []
        if (frame.chunked or frame.length is None) and status not in (204, 304):
            if self._http10:
                # HTTP/1.0 knows no chunked: the body ends when the connection closes
                rewrite += [(b"content-length", None), (b"transfer-encoding", None)]
                self._framing = _UNTIL_CLOSE
                need_close = not self.head
            else:
                rewrite += [(b"content-length", None), (b"transfer-encoding", b"chunked")]
                self._framing = _CHUNKED
        else:
            self._framing, self._left = _LENGTH, frame.length or 0
        if self.head or status in (204, 304):
            self._framing, self._left = _LENGTH, 0  # RFC 9112 §6.3: no body, whatever it says
        if not self.keep_alive or need_close:
            # h11's rule: Connection: close is written when the request or the framing ends
            # the connection; a handler's own "close" is sent as it gave it
            tokens = sorted((set(frame.connection) - {b"keep-alive"}) | {b"close"})
            rewrite.append((b"connection", b", ".join(tokens)))
        if frame.close or need_close:
            self.keep_alive = False
        self.failed = False  # the head is framed: it will be written
        c.waiting_100 = False
        if not rewrite and frame.cl_fix is None and prepared is not None:
            self._held = block + _encode(headers) + b"\r\n"
            return
        everything = [*fields, *headers]
        if frame.cl_fix is not None:  # "5, 5" (or a repeated field) is sent once as "5"
            kept: Headers = []
            seen = False
            for n, v in everything:
                if n.lower() == b"content-length":
                    if seen:
                        continue
                    seen, v = True, frame.cl_fix
                kept.append((n, v))
            everything = kept
        for name, value in rewrite:
            everything = [(n, v) for n, v in everything if n.lower() != name]
            if value is not None:
                everything.append((name.title(), value))
        self._held = _STATUS_LINES[status] + _encode(everything) + b"\r\n"

    async def interim(self, status: int, headers: Headers) -> None:
        """An interim (1xx) response before the final one, written at once; never to an
        HTTP/1.0 client (RFC 9110 §15.2), never 101 (no protocol switch here)."""
        c = self._c
        if c.closed or self.started or not 102 <= status <= 199 or self._http10:
            return
        try:
            check_fields(headers)
        except FieldError:
            try:
                check_fields([(name.lower(), value) for name, value in headers])
            except FieldError:
                return  # it is only a hint
        c.waiting_100 = False
        assert c.transport is not None
        c.transport.write(_STATUS_LINES[status] + _encode(headers) + b"\r\n")
        await c.drain()

    async def send(self, data: bytes) -> None:
        if self.send_now(data):
            await self._c.drain()

    def send_now(self, data: bytes) -> bool:
        """`send` without waiting for the write buffer to drain: whether bytes were written."""
        c = self._c
        if c.closed:
            raise ConnectionError("client went away")
        if data and not self.head:
            if not self.started or self.ended:
                raise ConnectionError("invalid response: send outside start/end")
            assert c.transport is not None
            framing = self._framing
            if framing == _LENGTH:
                if len(data) > self._left:
                    self.failed = True
                    raise ConnectionError("invalid response: too much data for Content-Length")
                self._left -= len(data)
                pieces = [data]
            elif framing == _CHUNKED:
                pieces = [b"%x\r\n" % len(data), data, b"\r\n"]
            else:
                pieces = [data]
            if self._held:
                pieces.insert(0, self._held)
                self._held = b""
            if len(data) < BIG_WRITE:
                c.transport.write(b"".join(pieces))
            else:  # a big body chunk is written as it is: no copy to prepend the head
                c.transport.writelines(pieces)
            return True
        return False

    async def end(self) -> None:
        self.end_now()

    def end_now(self) -> None:
        c = self._c
        self.ended = True
        if c.closed:
            return
        if not self.started:
            raise ConnectionError("invalid response: end before start")
        payload = self._held
        self._held = b""
        if self._framing == _LENGTH:
            if self._left:
                self.failed = True
                raise ConnectionError("invalid response: too little data for Content-Length")
        elif self._framing == _CHUNKED:
            payload += b"0\r\n\r\n"
        self.done = True
        assert c.transport is not None
        if payload:
            c.transport.write(payload)

    def abort(self) -> None:
        self.ended = True
        self.failed = True
        self._c._close(abort=True)


def _spaced_line(method: bytes, url: bytes, src: bytes) -> bool:
    """Whether `src` holds this request line with a run of spaces in it (llhttp's leniency)."""
    m, u = re.escape(method), re.escape(url)
    return re.search(rb"%s(?:  +%s +| +%s  +)HTTP/" % (m, u, u), src) is not None


def _encode(headers: Headers) -> bytes:
    return b"".join([b"%s: %s\r\n" % (name, value) for name, value in headers])


class _Frame:
    """What a response's fields say about its framing (h11's normalize_and_validate)."""

    __slots__ = ("any", "bad", "chunked", "cl_fix", "close", "connection", "length")

    def __init__(self) -> None:
        self.any = False  # any of Content-Length, Transfer-Encoding, Connection present
        self.length: int | None = None
        self.cl_fix: bytes | None = None  # "5, 5" is sent as "5"
        self.chunked = False
        self.connection: list[bytes] = []
        self.close = False
        self.bad = ""

    def merge(self, other: _Frame) -> _Frame | None:
        out = _Frame()
        out.any = True
        if self.length is not None and other.length is not None and self.length != other.length:
            return None
        out.length = self.length if self.length is not None else other.length
        out.cl_fix = self.cl_fix or other.cl_fix
        if self.length is not None and other.length is not None:
            out.cl_fix = b"%d" % self.length  # the field twice: sent once
        if self.chunked and other.chunked:
            out.bad = "multiple Transfer-Encoding headers"
        out.chunked = self.chunked or other.chunked
        out.connection = self.connection + other.connection
        out.close = self.close or other.close
        out.bad = out.bad or self.bad or other.bad
        return out


def _frame(headers: Headers) -> _Frame:
    frame = _Frame()
    for name, value in headers:
        if len(name) not in (10, 14, 17):  # connection, content-length, transfer-encoding
            continue
        name = name.lower()
        if name == b"content-length":
            frame.any = True
            lengths = {v.strip() for v in value.split(b",")}
            if len(lengths) != 1:
                frame.bad = "conflicting Content-Length headers"
                continue
            text = lengths.pop()
            if not text.isdigit() or len(text) > 20:
                frame.bad = "bad Content-Length"
                continue
            if frame.length is not None and frame.length != int(text):
                frame.bad = "conflicting Content-Length headers"
            if text != value or frame.length is not None:  # sent once, as h11 does
                frame.cl_fix = text
            frame.length = int(text)
        elif name == b"transfer-encoding":
            frame.any = True
            if frame.chunked:
                frame.bad = "multiple Transfer-Encoding headers"
            elif value.lower() != b"chunked":
                frame.bad = "only Transfer-Encoding: chunked is supported"
            frame.chunked = True
        elif name == b"connection":
            frame.any = True
            tokens = [t for t in _tokens(value) if t]
            frame.connection += tokens
            if b"close" in tokens:
                frame.close = True
    return frame


# what a closed connection keeps as its parser: one with no callbacks (never fed: a closed
# connection parses nothing), so that the parser of its own is freed with it
_CLOSED_PARSER = httptools.HttpRequestParser(object())
_NO_FRAME = _Frame()  # the framing of fields that hold no framing field (never modified)


def _encode_prepared(head: PreparedHead) -> tuple[bytes, Headers, _Frame]:
    """A PreparedHead's HTTP/1.1 encoding: the status line and fields, and their framing."""
    if head.status < 200:
        raise ConnectionError(f"invalid response: status {head.status}")
    return (_STATUS_LINES[head.status] + _encode(head.headers), head.headers, _frame(head.headers))
