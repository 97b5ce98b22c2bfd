"""Reverse proxy handler: forwards a request to the upstream pool, streaming both bodies.

The visitor's address is the verified one (from a trusted edge's PROXY header): client-supplied
X-Forwarded-*/Forwarded headers are dropped and replaced, never trusted or appended to.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

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

_CLIENT_SUPPLIED = frozenset(
    {
        b"host",
        b"forwarded",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"x-real-ip",
        b"x-request-id",
    }
)


def _quote_for(ip: str) -> str:
    # RFC 7239 §6: IPv6 addresses are bracketed and the node quoted
    return f'"[{ip}]"' if ":" in ip else ip


def upstream_headers(request: Request, default_authority: bytes = b"localhost") -> Headers:
    headers = [(k, v) for k, v in strip_hop_by_hop(request.headers) if k not in _CLIENT_SUPPLIED]
    ip = request.client[0]
    scheme = request.scheme.decode()
    # HTTP/1.0 may come without Host: name the site by its TLS server name, else the upstream
    authority = request.authority or request.tls.get("sni", "").encode() or default_authority
    forwarded = f"for={_quote_for(ip)};proto={scheme}"
    if request.authority:
        forwarded += f';host="{request.authority.decode("latin-1")}"'
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
    if request.http_version == "2":
        return not body.finished, False  # h2: a body unless the HEADERS ended the stream
    return False, False


async def iterate(first: list[bytes], body: BodyStream) -> AsyncIterator[bytes]:
    """Chunks already read (e.g. for WAF inspection), then the rest of the stream."""
    for chunk in first:
        yield chunk
    while chunk := await body.read():
        yield chunk


class ReverseProxy:
    def __init__(
        self, pool: UpstreamPool, on_response: Callable[[Request, int, int], None] | None = None
    ) -> None:
        self.pool = pool
        self.on_response = on_response

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
        try:
            return await self.pool.request(request.method, request.target or b"/", headers, stream)
        except BodyTooLarge:
            await simple_response(respond, 413, "request body too large\n")
        except BodyTimeout:
            await simple_response(respond, 408, "request body not received in time\n")
        except UpstreamError as exc:
            status = 504 if "timeout" in str(exc) else 502
            await simple_response(
                respond,
                status,
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
