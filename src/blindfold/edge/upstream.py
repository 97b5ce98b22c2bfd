"""The edge's own connections to a route's origins, for the modes that terminate TLS (keyless,
blind): always TLS, always verified (the CA with a hostname check, and/or a certificate pin),
never plaintext."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import ssl
import time

from blindfold.config.edge import RouteConfig
from blindfold.edge.admission import authenticated
from blindfold.edge.mode import ModeContext, RouteState
from blindfold.edge.origins import Origin
from blindfold.errors import ConfigError, UpstreamError
from blindfold.web.client import READ_CHUNK


def origin_tls_context(where: str, rc: RouteConfig) -> ssl.SSLContext:
    """The context that verifies origins: the CA (with hostname check) when given; with pins
    only, chain checks are replaced by the pin, which `open_verified_origin` checks before
    any byte of a request is sent."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["http/1.1"])
    if rc.origin_ca:
        try:
            ctx.load_verify_locations(cafile=rc.origin_ca)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"{where}.origin_ca", f"cannot load {rc.origin_ca}: {exc}") from None
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def origin_pins(rc: RouteConfig) -> frozenset[bytes]:
    """The SHA-256 digests of the origin certificates the route accepts (none: any the CA
    verifies)."""
    return frozenset(bytes.fromhex(p.replace(":", "").lower()) for p in rc.origin_pin_sha256)


async def open_verified_origin(
    ctx: ModeContext,
    route: RouteState,
    header: bytes,
    tls: ssl.SSLContext,
    server_name: str | None,
    pins: frozenset[bytes],
    timeout_s: float,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TLS connection to one of the route's origins, verified by `tls` (CA and hostname)
    and/or a certificate pin, with `header` (PROXY) sent first, within `timeout_s` in all.
    Failures that hold for every visitor (the TCP connect, the certificate) mark the origin
    down for the route; a handshake the origin ends after the connect may be this visitor's
    alone (the origin closes connections beyond its share) and is only counted. Either way
    the next origin is tried; UpstreamError when none is left."""
    loop = asyncio.get_running_loop()
    failure, reason, status = "no origin", "no_origin", 502
    for origin in route.pool.order(ctx.now):
        sock = socket.socket(origin.family, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        deadline = loop.time() + timeout_s
        try:
            async with asyncio.timeout_at(deadline):
                await loop.sock_connect(sock, origin.sockaddr)
        except (OSError, TimeoutError) as exc:
            sock.close()
            timeout = isinstance(exc, TimeoutError)
            failure = "connect_timeout" if timeout else str(exc)
            reason, status = ("connect_timeout", 504) if timeout else ("connect_failed", 502)
            origin_failed(ctx, route, origin, "connect", failure)
            continue
        try:
            async with asyncio.timeout_at(deadline):
                if header:
                    # each connection its own authenticated header (when the route has a key)
                    header_out = authenticated(
                        route, header, sock.getsockname()[:2], sock.getpeername()[:2], time.time()
                    )
                    await loop.sock_sendall(sock, header_out)
                reader, writer = await asyncio.open_connection(
                    sock=sock,
                    ssl=tls,
                    server_hostname=server_name,
                    limit=READ_CHUNK,
                    ssl_handshake_timeout=timeout_s,
                )
        except ssl.SSLCertVerificationError as exc:
            sock.close()
            failure = f"origin certificate not verified: {exc.verify_message}"
            reason, status = "tls_verify", 502
            origin_failed(ctx, route, origin, reason, failure)
            continue
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            sock.close()
            timeout = isinstance(exc, TimeoutError)
            failure = "TLS handshake timed out" if timeout else f"TLS handshake failed: {exc}"
            reason, status = ("tls_timeout", 504) if timeout else ("tls_failed", 502)
            route.pool.count_failure(origin, reason)
            continue
        if pins:
            obj = writer.get_extra_info("ssl_object")
            der = obj.getpeercert(binary_form=True) if obj is not None else None
            if der is None or hashlib.sha256(der).digest() not in pins:
                writer.close()
                failure = "origin certificate does not match origin_pin_sha256"
                reason, status = "pin_mismatch", 502
                origin_failed(ctx, route, origin, reason, failure)
                continue
        if origin.down_until:
            route.pool.mark_up(origin)
        return reader, writer
    raise UpstreamError(reason, failure, status=status)


def origin_failed(
    ctx: ModeContext, route: RouteState, origin: Origin, reason: str, detail: str
) -> None:
    """Mark `origin` down for the route; one log line when it was up."""
    was_up = origin.is_up(ctx.now)
    route.pool.mark_down(origin, reason, ctx.now)
    if was_up:
        ctx.log.log(
            "origin_down",
            route=route.name,
            origin=origin.text,
            reason=reason,
            detail=detail[:200],
            down_s=route.pool.down_s,
        )
