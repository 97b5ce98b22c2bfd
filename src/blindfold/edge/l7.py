"""HTTP on a keyless route: per-path rate limits, the shared cache (RFC 9111), and the proxy to
the route's origins over TLS that is always verified (CA and/or pinned certificate).

Each visitor connection has its own small pool of origin connections, each opened with the
visitor's PROXY header when the route sends one, so the origin agent sees the real visitor
address exactly as in passthrough mode (its WAF bans and decisions apply unchanged). The pool
holds at most `upstream_connections_per_client_conn` connections, and the pools of one client
address at most `upstream_connections_per_ip` together: one visitor's HTTP/2 streams cannot
take the origin's connections from everyone else (issue 15 #2). Requests beyond wait their
turn, at most `upstream_queue_timeout_s`, then get 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
import ssl
import time
from typing import TYPE_CHECKING

from blindfold.core import tls13_server as ts
from blindfold.core.httpcache import Entry, Lookup, not_modified
from blindfold.core.iplist import parse_address
from blindfold.edge.guards import client_key
from blindfold.errors import UpstreamError
from blindfold.web.client import READ_CHUNK, UpstreamBusy, UpstreamPool, UpstreamResponse
from blindfold.web.http1 import ConnInfo, H1Connection
from blindfold.web.http2 import H2Connection
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
from blindfold.web.proxy import iterate, request_has_body, upstream_headers
from blindfold.web.target import host_of, path_has_prefix

if TYPE_CHECKING:
    from blindfold.edge.keyless import KeylessRoute
    from blindfold.edge.origins import Origin
    from blindfold.edge.passthrough import Conn
    from blindfold.edge.worker import RouteState, Worker

_CONDITIONAL = frozenset(
    {b"if-none-match", b"if-modified-since", b"if-match", b"if-unmodified-since", b"if-range"}
)
# RFC 9110 §15.4.5: what a 304 carries; plus Set-Cookie, which only a response answering this
# visitor alone can hold (a shared entry never stores one)
_NOT_MODIFIED_KEEP = frozenset(
    {
        b"cache-control",
        b"content-location",
        b"date",
        b"etag",
        b"expires",
        b"vary",
        b"last-modified",
        b"set-cookie",
    }
)


def make_http_protocol(handler: EdgeHandler, alpn: str | None) -> asyncio.Protocol:
    kr = handler.kr
    conn = handler.conn
    info = ConnInfo(
        (conn.ip, conn.client_port),
        handler.local,
        b"https",
        {"sni": handler.sni, "alpn": alpn or "", "version": "TLSv1.3"},
    )
    if alpn == "h2":
        return H2Connection(handler, kr.limits, info, handler.http_event)
    return H1Connection(handler, kr.limits, info, handler.http_event)


async def open_verified_origin(
    worker: Worker,
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
    alone (the origin closes connections beyond its share, issue 10) and is only counted.
    Either way the next origin is tried; UpstreamError when none is left."""
    loop = asyncio.get_running_loop()
    failure, reason, status = "no origin", "no_origin", 502
    for origin in route.pool.order(worker.reactor.now):
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
            _origin_failed(worker, route, origin, "connect", failure)
            continue
        try:
            async with asyncio.timeout_at(deadline):
                if header:
                    await loop.sock_sendall(sock, header)
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
            _origin_failed(worker, route, origin, reason, failure)
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
                _origin_failed(worker, route, origin, reason, failure)
                continue
        if origin.down_until:
            route.pool.mark_up(origin)
        return reader, writer
    raise UpstreamError(reason, failure, status=status)


def _origin_failed(
    worker: Worker, route: RouteState, origin: Origin, reason: str, detail: str
) -> None:
    was_up = origin.is_up(worker.reactor.now)
    route.pool.mark_down(origin, reason, worker.reactor.now)
    if was_up:
        worker.log.log(
            "origin_down",
            route=route.name,
            origin=origin.text,
            reason=reason,
            detail=detail[:200],
            down_s=route.pool.down_s,
        )


class EdgeHandler:
    """One visitor connection's request handler (HTTP/1.1 and HTTP/2 alike)."""

    def __init__(self, worker: Worker, conn: Conn, kr: KeylessRoute, server: ts.TlsServer) -> None:
        self.worker = worker
        self.conn = conn
        self.kr = kr
        self.sni = server.server_name
        route = conn.route
        assert route is not None
        self.route = route
        local = conn.local
        if local is None:
            try:
                name = conn.client.getsockname()
                local = (name[0], name[1])
            except OSError:
                local = ("0.0.0.0", 0)
        self.local = local
        self._rate_key: int | None = None
        self._pool: UpstreamPool | None = None
        self.requests = 0

    @property
    def rate_key(self) -> int:
        if self._rate_key is None:
            version, addr = parse_address(self.conn.ip)
            self._rate_key = client_key(version, addr, self.kr.ipv6_prefix_len)
        return self._rate_key

    @property
    def pool(self) -> UpstreamPool:
        """Made on the first request that needs the origin (cache hits never do)."""
        if self._pool is None:
            kr, http = self.kr, self.kr.http
            pool = UpstreamPool(
                f"https://{self.route.pool.origins[0].text}",
                max_idle=http.upstream_connections,
                connect_timeout_s=http.upstream_connect_timeout_s,
                timeout_s=http.upstream_timeout_s,
                tls=kr.origin_tls,
                server_hostname=kr.config.origin_server_name or self.sni,
                connector=self._connect_origin,
                max_open=http.upstream_connections_per_client_conn,
                queue_timeout_s=http.upstream_queue_timeout_s,
            )
            pool.shared = kr.origin_caps.join(self.rate_key, pool)
            self._pool = pool
        return self._pool

    def http_event(self, name: str, fields: dict[str, object]) -> None:
        if name == "closed":
            if self._pool is not None:
                self._pool.close()
            return
        if name in ("h2_abuse", "bad_request", "handler_error", "send_timeout"):
            self.worker.log.log(name, route=self.route.name, **fields)

    # ---------------------------------------------------------------- origin connections
    async def _connect_origin(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        kr = self.kr
        return await open_verified_origin(
            self.worker,
            self.route,
            self.conn.proxy_header_for(self.route),
            kr.origin_tls,
            kr.config.origin_server_name or self.sni,
            kr.pins,
            kr.http.upstream_connect_timeout_s,
        )

    # ---------------------------------------------------------------- requests
    async def __call__(self, request: Request, body: BodyStream, respond: Responder) -> None:
        t0 = time.monotonic()
        self.requests += 1
        status, outcome, sent = await self._handle(request, body, respond)
        stats = self.kr.stats
        stats.count(stats.requests, f"{status // 100}xx" if status else "aborted")
        if outcome:
            stats.count(stats.cache, outcome)
        if self.worker.config.log_connections:
            self.worker.log.log(
                "request",
                route=self.route.name,
                client=self.conn.ip,
                request_id=request.request_id,
                method=request.method.decode("latin-1"),
                host=request.authority.decode("latin-1")[:255],
                path=request.path.decode("latin-1")[:512],
                http_version=request.http_version,
                status=status,
                cache=outcome or None,
                bytes_out=sent,
                duration_s=round(time.monotonic() - t0, 6),
            )

    async def _handle(
        self, request: Request, body: BodyStream, respond: Responder
    ) -> tuple[int, str, int]:
        """Answer one request: (status sent, cache outcome, body bytes sent)."""
        kr = self.kr
        # the authority was checked by the HTTP layer (web/target.py), and for an absolute-form
        # target it is the target's (which must equal Host): what the application will see
        host = host_of(request.authority)
        if host != self.sni and self.worker.router.lookup(host) is not self.route:
            # RFC 9110 §15.5.20: this connection (its certificate, its route) is not for that
            # host; no fronting one hostname's requests through another's connection
            await simple_response(respond, 421, "misdirected request\n")
            return 421, "", 0
        now = time.monotonic()
        path = request.path.decode("latin-1")
        for name, rule, buckets in kr.rate_rules:
            if not path_has_prefix(path, rule.path_prefix):  # canonical path, by segment
                continue
            wait = buckets.take(self.rate_key if rule.per == "ip" else 0, now)
            if wait > 0:
                kr.stats.count(kr.stats.rate_limited, name)
                await simple_response(
                    respond,
                    429,
                    "too many requests\n",
                    [(b"retry-after", str(max(1, int(wait + 0.999))).encode())],
                )
                return 429, "", 0
        cache = kr.cache
        key = cache.key(request.authority, request.target)
        lookup: Lookup | None = None
        if cache.max_bytes and request.method in (b"GET", b"HEAD"):
            lookup = cache.lookup(key, request.method, request.headers, time.time())
            if lookup is not None and lookup.fresh:
                return await self._serve_entry(request, respond, lookup.entry, "hit")
        return await self._forward(request, body, respond, key, lookup)

    async def _forward(
        self,
        request: Request,
        body: BodyStream,
        respond: Responder,
        key: tuple[bytes, bytes],
        lookup: Lookup | None,
    ) -> tuple[int, str, int]:
        cache = self.kr.cache
        headers = upstream_headers(request, request.authority or self.sni.encode())
        method = request.method
        if lookup is not None:
            # revalidate our copy with its validators; the visitor's own conditions are
            # evaluated against the result
            headers = [(k, v) for k, v in headers if k not in _CONDITIONAL]
            headers += lookup.validators
            method = b"GET"
        has_body, declared = request_has_body(request, body)
        if has_body and not declared:
            headers.append((b"transfer-encoding", b"chunked"))
        stream = iterate([], body) if has_body else None
        request_time = time.time()
        try:
            response = await self.pool.request(method, request.target or b"/", headers, stream)
        except BodyTooLarge:
            await simple_response(respond, 413, "request body too large\n")
            return 413, "", 0
        except BodyTimeout:
            await simple_response(respond, 408, "request body not received in time\n")
            return 408, "", 0
        except UpstreamBusy:
            # this visitor (connection or address) holds all the origin connections it may
            await simple_response(
                respond,
                503,
                "origin busy\n",
                [(b"retry-after", b"1"), (b"x-request-id", request.request_id.encode())],
            )
            return 503, "", 0
        except UpstreamError as exc:
            status = exc.status
            await simple_response(
                respond,
                status,
                "origin unavailable\n",
                [(b"x-request-id", request.request_id.encode())],
            )
            self.worker.log.log(
                "upstream_error",
                route=self.route.name,
                client=self.conn.ip,
                request_id=request.request_id,
                error=str(exc)[:200],
            )
            return status, "", 0
        except ConnectionError:
            return 0, "", 0
        response_time = time.time()
        if lookup is not None and response.status == 304:
            with contextlib.suppress(UpstreamError):
                async for _ in response.body():
                    pass
            # the freshened shared entry, or a copy for this visitor alone (issue 15 #1)
            entry = cache.freshen(
                key, lookup.entry, response.headers, request.headers, request_time, response_time
            )
            return await self._serve_entry(request, respond, entry, "revalidated")
        cache.invalidate(request.method, key, response.status)
        storable = (
            cache.max_bytes > 0
            and request.method == b"GET"
            and cache.storable(request.method, request.headers, response.status, response.headers)
        )
        sent, stored = await self._relay(
            request, respond, response, key, storable, request_time, response_time
        )
        if request.method not in (b"GET", b"HEAD"):
            return response.status, "bypass", sent
        return response.status, "stored" if stored else "miss", sent

    async def _relay(
        self,
        request: Request,
        respond: Responder,
        response: UpstreamResponse,
        key: tuple[bytes, bytes],
        storable: bool,
        request_time: float,
        response_time: float,
    ) -> tuple[int, bool]:
        cache = self.kr.cache
        headers = strip_hop_by_hop(response.headers)
        headers.append((b"x-blindfold-cache", b"miss"))
        kept: list[bytes] | None = [] if storable else None
        sent = 0
        complete = False
        try:
            await respond.start(response.status, headers)
            async for chunk in response.body():
                await respond.send(chunk)
                sent += len(chunk)
                if kept is not None:
                    if sent > cache.max_object_bytes:
                        kept = None
                    else:
                        kept.append(chunk)
            await respond.end()
            complete = True
        except UpstreamError:
            respond.abort()  # a truncated body must look truncated, not complete
        except ConnectionError:
            pass
        finally:
            response.close()
        if complete and kept is not None:
            cache.store(
                key,
                request.headers,
                response.status,
                response.headers,
                b"".join(kept),
                request_time,
                response_time,
            )
            return sent, True
        return sent, False

    async def _serve_entry(
        self, request: Request, respond: Responder, entry: Entry, outcome: str
    ) -> tuple[int, str, int]:
        age = str(int(entry.age(time.time()))).encode()
        if not_modified(entry, request.headers) and entry.status == 200:
            headers: Headers = [(k, v) for k, v in entry.headers if k in _NOT_MODIFIED_KEEP]
            headers += [(b"age", age), (b"x-blindfold-cache", outcome.encode())]
            try:
                await respond.start(304, headers)
                await respond.end()
            except ConnectionError:
                pass
            return 304, outcome, 0
        headers = [(k, v) for k, v in entry.headers if k != b"content-length"]
        if entry.status not in (204, 304):
            headers.append((b"content-length", str(len(entry.body)).encode()))
        headers += [(b"age", age), (b"x-blindfold-cache", outcome.encode())]
        sent = 0
        try:
            await respond.start(entry.status, headers)
            if request.method != b"HEAD" and entry.body:
                view = memoryview(entry.body)
                for i in range(0, len(view), READ_CHUNK):
                    await respond.send(bytes(view[i : i + READ_CHUNK]))
                    sent += min(READ_CHUNK, len(view) - i)
            await respond.end()
        except ConnectionError:
            pass
        return entry.status, outcome, sent
