"""HTTP on a connection whose TLS the edge terminates (keyless, blind): the TLS engine runs in
`io.tls13_transport` on the asyncio loop, HTTP/2 or HTTP/1.1 by ALPN (the layer the origin
agent uses too), and the mode's handler answers the requests."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

from blindfold.config.edge import EdgeHttpConfig
from blindfold.core.routing import SniRouter
from blindfold.edge.mode import Connection, RouteState
from blindfold.io.tls13_transport import TlsEngine, TlsServerProtocol
from blindfold.web.http1 import ConnInfo, H1Connection
from blindfold.web.http2 import H2Connection
from blindfold.web.limits import HttpLimits
from blindfold.web.messages import BodyStream, Request, Responder
from blindfold.web.target import host_of

# HTTP-layer events worth a log line (the others are counted or are the connection's end)
LOGGED_EVENTS = frozenset({"h2_abuse", "bad_request", "handler_error", "send_timeout"})


class EdgeHandler(Protocol):
    """A mode's request handler on one visitor connection."""

    async def __call__(self, request: Request, body: BodyStream, respond: Responder) -> None: ...

    def http_event(self, name: str, fields: dict[str, object]) -> None:
        """What the HTTP layer reports: errors, abuse, and "closed" at the end."""


def serve(
    conn: Connection,
    engine: TlsEngine,
    make_handler: Callable[[], EdgeHandler],
    limits: HttpLimits,
    http: EdgeHttpConfig,
    *,
    tls_version: str = "",
    on_done: Callable[[str, int, int], None] | None = None,
    send_buffer_bytes: int = 0,
) -> None:
    """Move `conn` (taken, its ClientHello fed to `engine`) to asyncio and serve HTTP on it.
    The handler is made at the first request (a connection that never sends one costs no
    HTTP state); `on_done` (default: `conn.finished`) hears the end."""

    def app(alpn: str | None) -> asyncio.Protocol:
        handler = make_handler()
        tls = {"sni": engine.server_name or "", "alpn": alpn or ""}
        if tls_version:
            tls["version"] = tls_version
        info = ConnInfo((conn.ip, conn.client_port), conn.local or ("0.0.0.0", 0), b"https", tls)
        if alpn == "h2":
            return H2Connection(handler, limits, info, handler.http_event)
        return H1Connection(handler, limits, info, handler.http_event, protocol.loop)

    protocol = TlsServerProtocol(
        engine,
        app,
        on_done or conn.finished,
        http.tls_handshake_timeout_s,
        http.keepalive_timeout_s,
    )
    conn.hand_off(protocol, send_buffer_bytes)


def misdirected(host: str, sni: str, route: RouteState, router: SniRouter[RouteState]) -> bool:
    """RFC 9110 §15.5.20: a request for `host` on a connection whose TLS (its certificate,
    its route) is for `sni` is misdirected unless the host is that name or routes here: no
    fronting one hostname's requests through another's connection."""
    return host != sni and router.lookup(host) is not route


def request_host(request: Request) -> str:
    """The request's host (the authority the HTTP layer checked, web/target.py)."""
    return host_of(request.authority)
