"""Reverse proxy handler: forwards a request to the upstream pool, streaming both bodies.

The visitor's address is the verified one (from a trusted edge's PROXY header): client-supplied
X-Forwarded-*/Forwarded headers are dropped and replaced, never trusted or appended to.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from blindfold.errors import UpstreamError
from blindfold.web.client import UpstreamPool, UpstreamResponse
from blindfold.web.messages import (
    BodyStream,
    BodyTimeout,
    BodyTooLarge,
    Headers,
    Request,
    Responder,
    simple_response,
    strip_hop_by_hop,
)

# Headers the proxy sets itself; a client's copy is dropped, never trusted or appended to.
_CLIENT_SUPPLIED = frozenset(
    {
        b"host",
        b"forwarded",
        b"x-real-ip",
        b"x-request-id",
        # read as the client's address by some frameworks (PHP, Rails): never the visitor's
        b"client-ip",
        b"true-client-ip",
        b"x-client-ip",
    }
)


def is_forwarding_header(name: bytes) -> bool:
    """`name` is one of the headers we set, or spells one with `_` for `-` or in another case
    (`X_Forwarded_For`): WSGI/CGI servers map both to HTTP_X_FORWARDED_FOR, so the look-alike
    would reach the application as the real header. Any X-Forwarded-* counts (-Port, -Prefix,
    -Server... are believed by proxy-aware frameworks as much as -For)."""
    norm = name.lower().replace(b"_", b"-")
    return norm in _CLIENT_SUPPLIED or norm.startswith(b"x-forwarded-")


def _quoted(text: str) -> str:
    # RFC 7239 §4: a value that is not a token is a quoted-string (RFC 9110 §5.6.4)
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _forwarded_for(ip: str) -> str:
    # RFC 7239 §6: an IPv6 node is bracketed, and then must be quoted
    return _quoted(f"[{ip}]") if ":" in ip else ip


def upstream_headers(request: Request, default_authority: bytes = b"localhost") -> Headers:
    headers = [(k, v) for k, v in strip_hop_by_hop(request.headers) if not is_forwarding_header(k)]
    ip = request.client[0]
    scheme = request.scheme.decode()
    # HTTP/1.0 may come without Host: name the site by its TLS server name, else the upstream
    authority = request.authority or request.tls.get("sni", "").encode() or default_authority
    forwarded = f"for={_forwarded_for(ip)};proto={scheme}"
    if request.authority:  # checked by the HTTP layer (web/target.py): one host, no list
        forwarded += f";host={_quoted(request.authority.decode('latin-1'))}"
        headers.append((b"x-forwarded-host", request.authority))
    headers += [
        (b"host", authority),
        (b"x-forwarded-for", ip.encode()),
        (b"x-forwarded-proto", request.scheme),
        (b"forwarded", forwarded.encode()),
        (b"x-request-id", request.request_id.encode()),
    ]
    return headers


def request_has_body(request: Request, body: BodyStream) -> tuple[bool, bool]:
    """(has a body, its length is declared by Content-Length)."""
    length = request.header(b"content-length")
    if length is not None:
        return length != b"0", True
    if request.header(b"transfer-encoding") is not None:
        return True, False
    if request.http_version in ("2", "3"):
        # h2/h3: a body unless the HEADERS ended the stream; bytes already read (the WAF's
        # inspection) are a body even when the stream has ended since
        return not body.finished or body.received > 0, False
    return False, False


async def iterate(first: list[bytes], body: BodyStream) -> AsyncIterator[bytes]:
    """Chunks already read (e.g. for WAF inspection), then the rest of the stream."""
    for chunk in first:
        yield chunk
    while chunk := await body.read():
        yield chunk


_CACHE_TAG = b"cache-tag"  # decisions.purge.CACHE_TAG_HEADER (web does not import decisions)


def interim_sender(respond: Responder) -> Callable[[int, Headers], Awaitable[None]]:
    """Passes an upstream's interim (1xx: 103 Early Hints, 102) responses on to the client,
    hop-by-hop fields removed, and `Cache-Tag` (the origin's purge tags are for the edges'
    caches, never for visitors: stripped from the final response too), where the client's
    protocol can carry them (HTTP/1.1, HTTP/2 responders have `interim`); nothing is kept of
    them. Every proxy path (the origin agent's, the keyless edge's) sends interims here."""

    async def send(status: int, headers: Headers) -> None:
        forward = getattr(respond, "interim", None)
        if forward is not None:
            kept = [(k, v) for k, v in strip_hop_by_hop(headers) if k.lower() != _CACHE_TAG]
            with contextlib.suppress(ConnectionError):
                await forward(status, kept)

    return send


class ReverseProxy:
    def __init__(
        self, pool: UpstreamPool, on_response: Callable[[Request, int, int], None] | None = None
    ) -> None:
        self.pool = pool
        self.on_response = on_response
        # (result, seconds to the response head): "ok" or the UpstreamError's reason
        self.on_upstream: Callable[[str, float], None] | None = None

    async def forward(
        self,
        request: Request,
        body: BodyStream,
        respond: Responder,
        prefix: list[bytes] | None = None,
    ) -> UpstreamResponse | None:
        """Send the request upstream; return the response (head read) or None after having
        answered an error to the client."""
        headers = upstream_headers(request, self.pool.target.authority)
        has_body, declared = request_has_body(request, body)
        if has_body and not declared:
            headers.append((b"transfer-encoding", b"chunked"))
        stream = iterate(prefix or [], body) if has_body else None
        t0 = time.monotonic()
        try:
            response = await self.pool.request(
                request.method, request.target or b"/", headers, stream, interim_sender(respond)
            )
            if self.on_upstream is not None:
                self.on_upstream("ok", time.monotonic() - t0)
            return response
        except BodyTooLarge:
            await simple_response(respond, 413, "request body too large\n")
        except BodyTimeout:
            await simple_response(respond, 408, "request body not received in time\n")
        except UpstreamError as exc:
            if self.on_upstream is not None:
                self.on_upstream(exc.reason, time.monotonic() - t0)
            await simple_response(
                respond,
                exc.status,
                f"upstream unavailable ({exc})\n",
                [(b"x-request-id", request.request_id.encode())],
            )
        except ConnectionError:
            pass  # the client went away while we were sending its body
        return None

    async def relay(self, request: Request, response: UpstreamResponse, respond: Responder) -> int:
        """Stream the upstream response to the client; returns the body bytes sent."""
        sent = 0
        headers = strip_hop_by_hop(response.headers)
        try:
            await respond.start(response.status, headers)
            async for chunk in response.body():
                await respond.send(chunk)
                sent += len(chunk)
            await respond.end()
        except UpstreamError:
            respond.abort()  # a truncated body must look truncated, not complete
        except ConnectionError:
            response.close()
        finally:
            response.close()
        if self.on_response is not None:
            self.on_response(request, response.status, sent)
        return sent

    async def __call__(self, request: Request, body: BodyStream, respond: Responder) -> None:
        response = await self.forward(request, body, respond)
        if response is not None:
            await self.relay(request, response, respond)
