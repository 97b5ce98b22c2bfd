"""What happens to a visitor connection once its ClientHello is read, sans-IO.

`admit(hello, peer, router, guards, now)` chooses the route by SNI, applies the JA4 rules and
asks the route's mode whether it takes the connection; the verdict is `Refuse(reason)`,
`Forward(origins, PROXY header)` or `Terminate` (the mode's `begin` takes over). The socket
code (`edge.connection`) only carries the verdict out. The guards that need no ClientHello
(lists, bans, per-address limits, the connection cap) ran at accept (`Guards.admit`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from blindfold.core.clienthello import ClientHello
from blindfold.core.proxyproto import (
    PP2_TYPE_ALPN,
    PP2_TYPE_AUTHORITY,
    authenticate_v2,
    encode_v1,
    encode_v2,
)
from blindfold.core.routing import SniRouter
from blindfold.edge.guards import Admission, Guards
from blindfold.edge.mode import RouteState
from blindfold.edge.origins import Origin
from blindfold.errors import ProtocolError


@dataclass(frozen=True, slots=True)
class Refuse:
    """Close the connection. `alert`: the TLS alert to answer a malformed hello with."""

    reason: str
    route: RouteState | None = None
    alert: int | None = None


@dataclass(frozen=True, slots=True)
class Forward:
    """Send `proxy_header` and the hello to the first of `origins` that accepts, then relay."""

    route: RouteState
    origins: list[Origin]
    proxy_header: bytes


@dataclass(frozen=True, slots=True)
class Terminate:
    """The route's mode takes the connection (`Mode.begin`)."""

    route: RouteState


Verdict = Refuse | Forward | Terminate


class Peer(Protocol):
    """The visitor as admission needs it: its address, the address it connected to (None if
    unknown), and its standing with the guards from accept."""

    @property
    def ip(self) -> str: ...

    @property
    def client_port(self) -> int: ...

    @property
    def local(self) -> tuple[str, int] | None: ...

    @property
    def adm(self) -> Admission: ...


def admit(
    hello: ClientHello,
    peer: Peer,
    router: SniRouter[RouteState],
    guards: Guards,
    now: float,
) -> Verdict:
    route = router.lookup(hello.sni)
    if route is None:
        return Refuse("no_sni" if hello.sni is None else "unknown_sni")
    refused = guards.check_fingerprint(hello.ja4, peer.adm, now)
    if refused is not None:
        return Refuse(refused, route)
    try:
        if route.mode.check(route, hello):
            return Terminate(route)
    except ProtocolError as exc:
        return Refuse(exc.reason, route, exc.alert)
    return forward(route, hello, peer, now)


def forward(route: RouteState, hello: ClientHello, peer: Peer, now: float) -> Forward:
    """Passthrough to the route's origins (also a mode's fallback once it has taken a
    connection: nothing was sent to the visitor)."""
    header = proxy_header(route, hello, (peer.ip, peer.client_port), peer.local)
    return Forward(route, route.pool.order(now), header)


def proxy_header(
    route: RouteState,
    hello: ClientHello,
    src: tuple[str, int],
    local: tuple[str, int] | None,
) -> bytes:
    """The PROXY header the route sends before the visitor's bytes (b"" for none)."""
    if route.proxy_protocol == "none":
        return b""
    if route.proxy_protocol == "v1":
        return encode_v1(src, local)
    tlvs: tuple[tuple[int, bytes], ...] = ()
    if route.proxy_tlvs:  # PROXY protocol v2 §2.2.1, §2.2.2
        if hello.sni and hello.alpn:
            tlvs = ((PP2_TYPE_AUTHORITY, hello.sni.encode()), (PP2_TYPE_ALPN, hello.alpn[0]))
        elif hello.sni:
            tlvs = ((PP2_TYPE_AUTHORITY, hello.sni.encode()),)
        elif hello.alpn:
            tlvs = ((PP2_TYPE_ALPN, hello.alpn[0]),)
    return encode_v2(src, local, tlvs)


def authenticated(
    route: RouteState,
    header: bytes,
    local: tuple[str, int],
    origin: tuple[str, int],
    wall: float,
) -> bytes:
    """`header` as sent on one connection to an origin: with the route's key, a v2 header
    gets the authentication TLV (docs/decisions.md "authenticated PROXY headers") over
    itself, this connection's two ends (`local`: the edge's, getsockname(); `origin`: the
    origin's) and the time `wall` (time.time()); so each connect attempt needs its own. One
    HMAC-SHA256 per connection."""
    if route.proxy_auth is None or not header:
        return header
    name, key = route.proxy_auth
    return authenticate_v2(header, name, key, (local, origin), wall)
