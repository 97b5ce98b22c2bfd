"""Keyless routes in an edge worker: TLS 1.3 ends here with a certificate whose key stays on the
site's key server; HTTP is then served (rate limits, cache) and proxied to the origins over
verified TLS.

A visitor connection arrives from the layer-4 path (`edge.passthrough.Conn`) with its ClientHello
read and the guards passed. Then:
1. A ClientHello our TLS engine cannot answer (TLS 1.2 only, or one that would need a
   HelloRetryRequest), or one without SNI (the key server authorises on the SNI in the
   ClientHello and refuses a handshake without one), goes on as passthrough: the origin
   terminates it with the real key.
2. Otherwise `core.tls13_server` processes it and asks for the CertificateVerify signature: the
   handshake messages it covers go to the key server, which checks and hashes them itself;
   its answer resumes the handshake. Nothing has been sent to the visitor until then, so a key
   server that cannot sign leaves the connection untouched: it fails with internal_error, or
   with `keyserver_down = "passthrough"` is forwarded to the origin like (1).
3. The socket moves to asyncio (`io.tls13_transport`), the HTTP layer shared with the origin
   agent (`web.http1`, `web.http2`) reads requests, and `edge.l7.EdgeHandler` answers them.
The socket stays out of the reactor from step 2 on; `Conn.close` remains the single exit that
releases the guards' slot and writes the connection's log line.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import ssl
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from blindfold.config.edge import EdgeHttpConfig, KeyServerRef, RouteConfig
from blindfold.core import keyless_wire as w
from blindfold.core import tls13_server as ts
from blindfold.core.clienthello import ClientHello
from blindfold.core.httpcache import HttpCache
from blindfold.core.ratelimit import BucketMap
from blindfold.errors import ConfigError, KeyServerError, ProtocolError
from blindfold.io.tls13_transport import TlsServerProtocol
from blindfold.keyless.client import KeyServerClient
from blindfold.obs.metrics import Histogram
from blindfold.web.client import SharedCaps
from blindfold.web.limits import HttpLimits

if TYPE_CHECKING:
    from blindfold.edge.passthrough import Conn
    from blindfold.edge.worker import RouteState, Worker

MAX_RATE_KEYS = 100_000
SIGN_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


def _client_tls(where: str, ref: KeyServerRef) -> ssl.SSLContext:
    try:
        ctx = ssl.create_default_context(cafile=ref.ca)
        ctx.load_cert_chain(ref.client_cert, ref.client_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"{where}.keyserver", f"cannot load the key server TLS files: {exc}"
        ) from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    return ctx


def origin_tls_context(where: str, rc: RouteConfig) -> ssl.SSLContext:
    """The context that verifies origins: the CA (with hostname check) when given; with pins
    only, chain checks are replaced by the pin, which `EdgeHandler` checks before any byte of
    a request is sent."""
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


def origin_and_http(
    where: str, rc: RouteConfig, max_body_bytes: int | None = None
) -> tuple[ssl.SSLContext, frozenset[bytes], EdgeHttpConfig, HttpLimits]:
    """What keyless and blind routes share: the context and pins that verify the origins, and
    the HTTP limits for visitors (`max_body_bytes` overrides the configured one)."""
    pins = frozenset(bytes.fromhex(p.replace(":", "").lower()) for p in rc.origin_pin_sha256)
    http = rc.http or EdgeHttpConfig()
    limits = HttpLimits(
        max_header_bytes=http.max_header_bytes,
        max_headers=http.max_headers,
        max_body_bytes=http.max_body_bytes if max_body_bytes is None else max_body_bytes,
        header_timeout_s=http.header_timeout_s,
        body_timeout_s=http.body_timeout_s,
        keepalive_timeout_s=http.keepalive_timeout_s,
        send_timeout_s=http.send_timeout_s,
        h2_max_concurrent_streams=http.h2_max_concurrent_streams,
        h2_max_header_list_size=http.max_header_bytes,
    )
    return origin_tls_context(where, rc), pins, http, limits


class KeylessStats:
    def __init__(self) -> None:
        self.handshakes: dict[str, int] = {}  # full | resumed | failed reason
        self.fallbacks: dict[str, int] = {}  # reason -> passthrough connections
        self.requests: dict[str, int] = {}  # status class
        self.cache: dict[str, int] = {}  # hit | miss | revalidated | stored | bypass
        self.rate_limited: dict[str, int] = {}  # rule name
        self.key_updates: dict[str, int] = {}  # received | sent

    def count(self, table: dict[str, int], key: str) -> None:
        table[key] = table.get(key, 0) + 1


class KeylessRoute:
    """What a worker keeps for one keyless route; rebuilt on reload, its sessions, cache and
    counters carried over (`adopt`)."""

    def __init__(
        self,
        where: str,
        rc: RouteConfig,
        clients: dict[KeyServerRef, KeyServerClient],
        ipv6_prefix_len: int,
    ) -> None:
        assert rc.keyserver is not None
        self.config = rc
        try:
            self.identity = ts.ServerIdentity.from_pem(Path(rc.certificate).read_bytes())
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"{where}.certificate", f"cannot use {rc.certificate}: {exc}"
            ) from None
        self.settings = ts.TlsSettings(issue_tickets=rc.session_ticket_lifetime_s > 0)
        self.sessions = ts.SessionStore(rc.session_ticket_lifetime_s, rc.max_sessions)
        client = clients.get(rc.keyserver)
        if client is None:
            client = KeyServerClient(
                rc.keyserver.addresses,
                _client_tls(where, rc.keyserver),
                server_name=rc.keyserver.server_name or None,
                sign_timeout_s=rc.keyserver.sign_timeout_s,
                connect_timeout_s=rc.keyserver.connect_timeout_s,
            )
            clients[rc.keyserver] = client
        self.keyclient = client
        self.origin_tls, self.pins, self.http, self.limits = origin_and_http(where, rc)
        self.rate_rules = [
            (r.name or f"rate_limit{i}", r, BucketMap(r.rate_per_s, r.burst, MAX_RATE_KEYS))
            for i, r in enumerate(rc.rate_limits)
        ]
        self.ipv6_prefix_len = ipv6_prefix_len
        self.cache = HttpCache(rc.cache_max_bytes, rc.cache_max_object_bytes)
        # origin connections per client address, across its visitor connections (edge.l7)
        self.origin_caps = SharedCaps(self.http.upstream_connections_per_ip)
        self.stats = KeylessStats()

    def adopt(self, old: KeylessRoute) -> None:
        """Keep what a reload should not lose: live sessions, the cache, counters."""
        if old.identity.certificate_sha256 == self.identity.certificate_sha256:
            old.sessions.lifetime_s = self.sessions.lifetime_s
            old.sessions.max_entries = self.sessions.max_entries
            self.sessions = old.sessions
        if (old.cache.max_bytes, old.cache.max_object_bytes) == (
            self.cache.max_bytes,
            self.cache.max_object_bytes,
        ):
            self.cache = old.cache
        self.stats = old.stats
        old.origin_caps.limit = self.origin_caps.limit  # live connections stay counted
        self.origin_caps = old.origin_caps
        old_rules = {name: buckets for name, rule, buckets in old.rate_rules}
        self.rate_rules = [
            (
                name,
                rule,
                old_rules.get(name, buckets)
                if name in old_rules
                and (old_rules[name].rate, old_rules[name].burst)
                == (rule.rate_per_s, float(rule.burst))
                else buckets,
            )
            for name, rule, buckets in self.rate_rules
        ]


class KeylessService:
    """The worker's keyless side: runs on the asyncio loop the worker's reactor is attached
    to."""

    def __init__(self, worker: Worker, loop: asyncio.AbstractEventLoop) -> None:
        self.worker = worker
        self.loop = loop
        self.clients: dict[KeyServerRef, KeyServerClient] = {}
        self.tasks: set[asyncio.Task[Any]] = set()
        self.sign_latency = Histogram(SIGN_BUCKETS)

    def build(
        self, where: str, rc: RouteConfig, old: KeylessRoute | None, ipv6_prefix_len: int
    ) -> KeylessRoute:
        route = KeylessRoute(where, rc, self.clients, ipv6_prefix_len)
        if old is not None:
            route.adopt(old)
        return route

    def retire_clients(self, in_use: set[KeyServerRef]) -> None:
        for ref in [r for r in self.clients if r not in in_use]:
            client = self.clients.pop(ref)
            self._spawn(client.close())

    def _spawn(self, coro: Any) -> None:
        task = self.loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # ---------------------------------------------------------------- a connection
    def begin(self, conn: Conn, route: RouteState, hello: ClientHello) -> bool:
        """Take the connection on as keyless; False means: forward it as passthrough."""
        kr = route.keyless
        assert kr is not None
        now = self.worker.reactor.now
        try:
            reason = ts.fallback_reason(hello, kr.identity.schemes)
        except ProtocolError as exc:  # e.g. a malformed key_share the peek had not looked at
            kr.stats.count(kr.stats.handshakes, f"tls_{exc.reason}")
            conn.refuse_with_alert(exc)
            return True
        if reason is None and hello.sni is None:
            reason = "no_sni"  # the key server would refuse: the origin has the key
        if reason is not None:
            kr.stats.count(kr.stats.fallbacks, reason)
            return False
        name = hello.sni
        assert name is not None
        server = ts.TlsServer(kr.identity, kr.settings, kr.sessions, name, hello)
        events = server.receive(conn.buf, now)
        conn.begin_keyless()
        failed = next((e for e in events if isinstance(e, ts.ConnectionFailed)), None)
        if failed is not None:
            return self._failed(conn, kr, server, failed)
        request = next((e for e in events if isinstance(e, ts.SignatureRequested)), None)
        if request is None:  # resumed: no signature needed
            kr.stats.count(kr.stats.handshakes, "resumed")
            self._open(conn, kr, server)
            return True
        if kr.keyclient.all_down(time.monotonic()):
            return self._keyserver_failed(
                conn, kr, server, "keyserver_down", "every key server is down"
            )
        t0 = time.perf_counter()
        future = kr.keyclient.submit(w.SignRequest(request.scheme, conn.ip, request.messages))
        future.add_done_callback(lambda f: self._signed(conn, kr, server, f, t0))
        return True

    def _signed(
        self,
        conn: Conn,
        kr: KeylessRoute,
        server: ts.TlsServer,
        future: asyncio.Future[bytes],
        t0: float,
    ) -> None:
        exc = future.exception()
        if not conn.keyless_waiting():  # closed meanwhile (banned, drained)
            server.signature_failed("closed")  # unwinds the suspended handshake now
            return
        if exc is not None:
            # the key server's own reason (unauthorized_sni, rate_limited...) or the way's
            # (timeout, down, unreachable...): a small fixed set, a metric label
            cause = exc.reason if isinstance(exc, KeyServerError) else "error"
            self._keyserver_failed(conn, kr, server, f"keyserver_{cause}", str(exc))
            return
        self.sign_latency.observe(time.perf_counter() - t0)
        events = server.signature_received(future.result(), time.monotonic())
        failed = next((e for e in events if isinstance(e, ts.ConnectionFailed)), None)
        if failed is not None:
            self._failed(conn, kr, server, failed)
            return
        kr.stats.count(kr.stats.handshakes, "full")
        self._open(conn, kr, server)

    def _keyserver_failed(
        self, conn: Conn, kr: KeylessRoute, server: ts.TlsServer, reason: str, detail: str
    ) -> bool:
        if kr.config.keyserver_down == "passthrough":
            kr.stats.count(kr.stats.fallbacks, reason)
            server.signature_failed(reason, detail)  # its alert is never sent
            conn.keyless_to_passthrough()
            return True
        kr.stats.count(kr.stats.handshakes, reason)
        events = server.signature_failed(reason, detail)
        failed = next((e for e in events if isinstance(e, ts.ConnectionFailed)), None)
        self._send_now(conn, server)
        if self.worker.may_log_refusal():
            self.worker.log.log(
                "keyless_handshake_failed", client=conn.ip, reason=reason, detail=detail[:200]
            )
        conn.close("refused", failed.reason if failed else reason)
        return True

    def _failed(
        self, conn: Conn, kr: KeylessRoute, server: ts.TlsServer, failed: ts.ConnectionFailed
    ) -> bool:
        kr.stats.count(kr.stats.handshakes, f"tls_{failed.reason}")
        self._send_now(conn, server)
        conn.close("refused", f"tls_{failed.reason}")
        return True

    @staticmethod
    def _send_now(conn: Conn, server: ts.TlsServer) -> None:
        data = server.data_to_send()
        if data:
            try:
                conn.client.send(data)  # an alert: small, the socket buffer takes it
            except OSError:
                pass

    def _open(self, conn: Conn, kr: KeylessRoute, server: ts.TlsServer) -> None:
        from blindfold.edge.l7 import EdgeHandler, make_http_protocol

        def app(alpn: str | None) -> asyncio.Protocol:  # at the first request, not before
            return make_http_protocol(EdgeHandler(self.worker, conn, kr, server), alpn)

        def done(reason: str, bytes_in: int, bytes_out: int) -> None:
            if server.key_updates_received:
                kr.stats.key_updates["received"] = (
                    kr.stats.key_updates.get("received", 0) + server.key_updates_received
                )
            if server.key_updates_sent:
                kr.stats.key_updates["sent"] = (
                    kr.stats.key_updates.get("sent", 0) + server.key_updates_sent
                )
            conn.keyless_done(reason, bytes_in, bytes_out)

        proto = TlsServerProtocol(
            server, app, done, kr.http.tls_handshake_timeout_s, kr.http.keepalive_timeout_s
        )
        sock = conn.adopt_socket_for_asyncio()
        conn.l7 = proto
        make = getattr(self.loop, "_make_socket_transport", None)
        if make is not None:
            # A selector loop's own factory (what connect_accepted_socket calls after a task,
            # a future and a wait): the transport exists at once and calls connection_made on
            # the next turn, which sends the server's flight.
            make(sock, proto)
        else:
            self._spawn(self._attach(conn, proto, sock))

    async def _attach(self, conn: Conn, proto: TlsServerProtocol, sock: socket.socket) -> None:
        try:
            await self.loop.connect_accepted_socket(lambda: proto, sock)
        except OSError:
            conn.close("reset", "attach_failed")


def cert_sha256(der: bytes) -> bytes:
    return hashlib.sha256(der).digest()
