"""What the HTTP layer hands to a handler: the request, its body as a flow-controlled stream, and
a responder. The same objects come from HTTP/1.1 and HTTP/2 connections."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

Headers = list[tuple[bytes, bytes]]  # names lower-case, as received (h11/h2 normalise them)


@dataclass(slots=True)
class Request:
    method: bytes
    target: bytes  # what is forwarded: the canonical path (web/target.py) and the query as sent
    authority: bytes  # checked Host header, :authority, or an absolute-form target's authority
    scheme: bytes
    headers: Headers
    http_version: str  # "1.0", "1.1" or "2"
    client: tuple[str, int]  # the verified visitor address (from PROXY when trusted)
    server: tuple[str, int]
    request_id: str
    tls: dict[str, str] = field(default_factory=dict)  # sni, alpn, version
    raw_target: bytes = b""  # the request target as the client sent it (for logs)
    # came through a blindfold edge that speaks HTTP itself (keyless, blind: the PROXY v2
    # TLV 0xEB mark from a trusted edge), which reads and strips edge-only headers (Cache-Tag)
    from_http_edge: bool = False

    def header(self, name: bytes) -> bytes | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None

    @property
    def path(self) -> bytes:
        """The canonical path: what every path rule matches (`web.target.path_has_prefix`)."""
        return self.target.split(b"?", 1)[0]


class BodyTooLarge(Exception):
    """The request body passed the configured limit."""


class BodyTimeout(Exception):
    """The peer stopped sending the body."""


class BodyStream:
    """A request body delivered in chunks. The connection feeds it; the handler reads it.

    Flow control: `on_consumed(n)` is called as the handler takes bytes, so the connection can
    resume reading (HTTP/1.1) or open the stream window (HTTP/2); the connection stops reading
    when `buffered` passes its high-water mark. Bounded by `limit` bytes in total.
    """

    __slots__ = (
        "_chunks",
        "_done",
        "_error",
        "_waiter",
        "buffered",
        "limit",
        "on_consumed",
        "on_wait",
        "received",
    )

    def __init__(
        self,
        limit: int,
        on_consumed: Callable[[int], None],
        on_wait: Callable[[], None] | None = None,
    ) -> None:
        self.on_wait = on_wait  # called when the reader waits (HTTP/1.1 sends 100 Continue)
        self._chunks: list[bytes] = []
        self._done = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self.buffered = 0
        self.received = 0
        self.limit = limit
        self.on_consumed = on_consumed

    def feed(self, data: bytes) -> None:
        if self._done:
            return
        self.received += len(data)
        if self.received > self.limit:
            self.fail(BodyTooLarge(f"body over {self.limit} bytes"))
            return
        self._chunks.append(data)
        self.buffered += len(data)
        self._wake()

    def end(self) -> None:
        self._done = True
        self._wake()

    def fail(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        self._done = True
        self._wake()

    @property
    def finished(self) -> bool:
        return self._done and not self._chunks

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def read(self) -> bytes:
        """The next chunk, or b'' at the end. Raises the connection's error (too large, timed
        out, reset)."""
        while True:
            if self._chunks:
                chunk = self._chunks.pop(0)
                self.buffered -= len(chunk)
                self.on_consumed(len(chunk))
                return chunk
            if self._error is not None:
                raise self._error
            if self._done:
                return b""
            if self.on_wait is not None:
                self.on_wait()
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    async def read_all(self, limit: int) -> bytes:
        out = bytearray()
        while chunk := await self.read():
            out += chunk
            if len(out) > limit:
                raise BodyTooLarge(f"body over {limit} bytes")
        return bytes(out)


class Responder(Protocol):
    """How a handler answers. `start` once, `send` any number of times, then `end`."""

    @property
    def started(self) -> bool: ...

    async def start(self, status: int, headers: Headers) -> None: ...

    async def send(self, data: bytes) -> None: ...

    async def end(self) -> None: ...

    def abort(self) -> None:
        """Give up on the response (the upstream failed mid-body): reset the stream or close
        the connection, never pretend the body was complete."""


class PreparedHead:
    """A response head checked once and sent many times (a cached response).

    `headers` are validated when the head is made (`FieldError` otherwise), so a responder that
    knows this class can send them without re-checking: it keeps its own encoding of them in
    `encoded` under its protocol's name ("h1", "h2"...) and, per response, encodes only the
    small `extra` fields given to `start_prepared`. Whatever is in `headers` must be final:
    the responder sends it as it is (no Content-Length fix-up, no hop-by-hop filtering)."""

    __slots__ = ("encoded", "headers", "status")

    def __init__(self, status: int, headers: Headers) -> None:
        if not 100 <= status <= 999:
            raise FieldError(f"status {status}")
        check_fields(headers)
        self.status = status
        self.headers = headers
        self.encoded: dict[str, object] = {}


class FieldError(ValueError):
    """A header field a response must not carry (RFC 9110 §5.1, §5.5)."""


_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9a-z]+\Z")  # lower-case token (RFC 9110 §5.6.2)
_VALUE = re.compile(rb"(?:[\x21-\x7e\x80-\xff](?:[\t\x20-\x7e\x80-\xff]*[\x21-\x7e\x80-\xff])?)?\Z")


def check_fields(headers: Headers) -> None:
    """Raise FieldError unless every name is a lower-case token and every value is a field
    value without surrounding whitespace, CR, LF or NUL (what h11 and h2 would refuse)."""
    for name, value in headers:
        if _TOKEN.match(name) is None:
            raise FieldError(f"field name {name[:40]!r}")
        if _VALUE.match(value) is None:
            raise FieldError(f"value of {name[:40]!r}")


async def start_prepared(respond: Responder, head: PreparedHead, extra: Headers) -> None:
    """Start a response with a prepared head plus `extra` fields (checked here, or by the
    responder's own `start_prepared`). Responders without one get the plain `start`."""
    fast = getattr(respond, "start_prepared", None)
    if fast is not None:
        await fast(head, extra)
        return
    await respond.start(head.status, [*head.headers, *extra])


class Handler(Protocol):
    async def __call__(self, request: Request, body: BodyStream, respond: Responder) -> None: ...


class StreamResponder(Responder, Protocol):
    """A responder of one HTTP/2 or HTTP/3 stream, which knows whether it has ended."""

    @property
    def ended(self) -> bool: ...


async def run_stream_handler(
    handler: Handler,
    request: Request,
    body: BodyStream,
    responder: StreamResponder,
    on_event: Callable[[str, dict[str, object]], None],
) -> None:
    """Run `handler` for one stream (HTTP/2, HTTP/3): a handler that returns without having
    answered gets a 500; one that raises is logged (`handler_error`) and answered 500, or its
    stream reset if it had started answering. Cancellation goes through."""
    try:
        await handler(request, body, responder)
        if not responder.ended:
            if not responder.started:
                await responder.start(500, [(b"content-length", b"0")])
            await responder.end()
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        on_event("handler_error", {"error": repr(exc), "request_id": request.request_id})
        if responder.started:
            responder.abort()
        else:
            with contextlib.suppress(Exception):
                await responder.start(500, [(b"content-length", b"0")])
                await responder.end()


HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"http2-settings",
    }
)


def strip_hop_by_hop(headers: Headers) -> Headers:
    """Drop hop-by-hop headers (RFC 9110 §7.6.1), including those named in Connection."""
    named: set[bytes] = set()
    for k, v in headers:
        if k == b"connection":
            named.update(t.strip().lower() for t in v.split(b","))
    return [(k, v) for k, v in headers if k not in HOP_BY_HOP and k not in named]


async def simple_response(
    respond: Responder, status: int, text: str, extra: Headers | None = None
) -> None:
    body = text.encode()
    headers = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode()),
        *(extra or []),
    ]
    await respond.start(status, headers)
    await respond.send(body)
    await respond.end()
