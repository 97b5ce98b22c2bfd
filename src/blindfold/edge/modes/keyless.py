"""Keyless routes: TLS 1.3 ends at the edge with a certificate whose key stays on the site's
key server; HTTP is then served (per-path rate limits, the shared cache) and proxied to the
origins over verified TLS.

A connection arrives with its ClientHello read and the guards passed (`edge.connection`).
1. `check` (part of admission): a ClientHello our TLS engine cannot answer (TLS 1.2 only, or
   one that would need a HelloRetryRequest), or one without SNI (the key server authorises on
   the SNI in the ClientHello and refuses a handshake without one), goes on as passthrough:
   the origin terminates it with the real key.
2. `begin`: `core.tls13_server` processes it and asks for the CertificateVerify signature: the
   handshake messages it covers go to the key server, which checks and hashes them itself;
   its answer resumes the handshake. Nothing has been sent to the visitor until then, so a key
   server that cannot sign leaves the connection untouched: it fails with internal_error, or
   with `keyserver_down = "passthrough"` is forwarded to the origin like (1).
3. The socket moves to asyncio (`edge.serve`) and `KeylessHandler` answers its requests.

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
import ssl
import time
from collections.abc import Awaitable, Sequence
from pathlib import Path
from typing import Any

from blindfold.config.common import check_readable
from blindfold.config.edge import EdgeConfig, EdgeHttpConfig, KeyServerRef, RouteConfig
from blindfold.core import keyless_wire as w
from blindfold.core import tls13_server as ts
from blindfold.core.certchain import ChainError, check_chain
from blindfold.core.clienthello import ClientHello
from blindfold.core.httpcache import (
    STALE_IF_ERROR_STATUS,
    Entry,
    HttpCache,
    Lookup,
    StalePolicy,
    not_modified,
)
from blindfold.core.iplist import parse_address
from blindfold.core.proxyproto import BLINDFOLD_HTTP_MARK, PP2_TYPE_BLINDFOLD_HTTP, with_tlv
from blindfold.core.ratelimit import BucketMap
from blindfold.decisions.purge import CACHE_TAG_HEADER, Purge, PurgeMatcher, parse_cache_tags
from blindfold.edge.guards import client_key
from blindfold.edge.mode import Connection, Mode, ModeContext, RouteState
from blindfold.edge.serve import LOGGED_EVENTS, misdirected, request_host, serve
from blindfold.edge.upstream import open_verified_origin, origin_pins, origin_tls_context
from blindfold.errors import ConfigError, KeyServerError, ProtocolError, UpstreamError
from blindfold.keyless.client import KeyServerClient
from blindfold.obs.metrics import (
    CERTIFICATE_METRICS,
    Histogram,
    MetricSpec,
    Snapshot,
    certificate_first_name,
)
from blindfold.web.client import (
    READ_CHUNK,
    SharedCaps,
    UpstreamBusy,
    UpstreamPool,
    UpstreamResponse,
)
from blindfold.web.http1 import H1Responder
from blindfold.web.http2 import H2Responder
from blindfold.web.messages import (
    BodyStream,
    BodyTimeout,
    BodyTooLarge,
    FieldError,
    Headers,
    PreparedHead,
    Request,
    Responder,
    simple_response,
    start_prepared,
    strip_hop_by_hop,
)
from blindfold.web.proxy import (
    interim_sender,
    is_forwarding_header,
    iterate,
    request_has_body,
    upstream_headers,
)
from blindfold.web.target import path_has_prefix

MAX_RATE_KEYS = 100_000
MAX_REFRESHES = 64  # stale-while-revalidate refreshes under way at once, per route and worker
ACME_TLS_ALPN = b"acme-tls/1"  # RFC 8737 §6.2
CHAIN_RETRY_S = 30.0  # after a refused or failed chain request: the next one at most this often
PURGE_SLICE = 2_000  # cache keys a purge tests per turn of the loop


def _edge_set(name: bytes) -> bool:
    """A request header the edge sets or drops on the way to the origin (upstream_headers):
    a response varying on it is not cached. Host excepted: the edge forwards the visitor's."""
    return name != b"host" and is_forwarding_header(name)


SIGN_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
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

METRICS = (
    MetricSpec(
        "blindfold_keyless_handshakes_total",
        "counter",
        "Keyless TLS handshakes by result: full (signed by the key server), resumed "
        "(session ticket), or why it failed (tls_*, keyserver_<reason>: the key server's "
        "refusal or the way's failure).",
        ("route", "result"),
    ),
    MetricSpec(
        "blindfold_keyless_fallbacks_total",
        "counter",
        "Keyless-route connections forwarded as passthrough instead, by reason "
        "(tls12_only, needs_hello_retry, no_sni, acme_tls_alpn, keyserver_<reason>).",
        ("route", "reason"),
    ),
    MetricSpec(
        "blindfold_keyless_sign_seconds",
        "histogram",
        "Time from asking the key server to having the signature.",
        buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
    ),
    MetricSpec(
        "blindfold_keyless_requests_total",
        "counter",
        "HTTP requests answered on keyless routes, by status class.",
        ("route", "status"),
    ),
    MetricSpec(
        "blindfold_keyless_cache_total",
        "counter",
        "Cache outcomes per request: hit, revalidated, stale, miss, stored, bypass.",
        ("route", "result"),
    ),
    MetricSpec(
        "blindfold_keyless_cache_bytes", "gauge", "Bytes held by the response cache.", ("route",)
    ),
    MetricSpec(
        "blindfold_keyless_rate_limited_total",
        "counter",
        "Requests refused with 429, by rule.",
        ("route", "rule"),
    ),
    MetricSpec(
        "blindfold_keyless_sessions",
        "gauge",
        "Resumable TLS sessions held (tickets issued and not yet used or expired).",
        ("route",),
    ),
    MetricSpec(
        "blindfold_keyless_key_updates_total",
        "counter",
        "TLS 1.3 KeyUpdates on keyless connections (counted when they close), by direction.",
        ("route", "direction"),
    ),
    MetricSpec(
        "blindfold_keyless_connections_active", "gauge", "Open keyless TLS connections.", ("route",)
    ),
    *CERTIFICATE_METRICS,
)


def _client_tls(where: str, ref: KeyServerRef) -> ssl.SSLContext:
    ks = f"{where}.keyserver"
    check_readable(
        (f"{ks}.ca", ref.ca),
        (f"{ks}.client_cert", ref.client_cert),
        (f"{ks}.client_key", ref.client_key),
    )
    try:
        ctx = ssl.create_default_context(cafile=ref.ca)
        ctx.load_cert_chain(ref.client_cert, ref.client_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"{where}.keyserver", f"cannot load the key server TLS files: {exc}"
        ) from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    return ctx


class KeylessStats:
    def __init__(self) -> None:
        self.handshakes: dict[str, int] = {}  # full | resumed | failed reason
        self.fallbacks: dict[str, int] = {}  # reason -> passthrough connections
        self.requests: dict[str, int] = {}  # status class
        self.cache: dict[str, int] = {}  # hit | miss | revalidated | stale | stored | bypass
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
        self.origin_tls = origin_tls_context(where, rc)
        self.pins = origin_pins(rc)
        self.http = rc.http or EdgeHttpConfig()
        self.limits = self.http.limits()
        self.rate_rules = [
            (r.name or f"rate_limit{i}", r, BucketMap(r.rate_per_s, r.burst, MAX_RATE_KEYS))
            for i, r in enumerate(rc.rate_limits)
        ]
        self.ipv6_prefix_len = ipv6_prefix_len
        self.cache = HttpCache(rc.cache_max_bytes, rc.cache_max_object_bytes)
        self.cache.edge_set = _edge_set
        self.cache.prepare = prepare_head
        self.cache.stale = self.stale = StalePolicy(
            rc.cache_stale_while_revalidate,
            rc.cache_stale_if_error,
            rc.cache_max_stale,
            rc.cache_stale_max_s,
        )
        # origin connections per client address, across its visitor connections (KeylessHandler)
        self.origin_caps = SharedCaps(self.http.upstream_connections_per_ip)
        self.stats = KeylessStats()
        # stale-while-revalidate refreshes under way: their keys (one refresh per key) and
        # tasks (strong references: asyncio keeps tasks weakly)
        self.refreshing: set[tuple[bytes, bytes]] = set()
        self.refresh_tasks: set[asyncio.Task[None]] = set()
        self.fetched = False  # identity came from the key server (CHAIN_REQUEST), not the file
        self.chain_due = 0.0  # monotonic time of the next chain request
        self.chain_busy = False
        self.chain_results: dict[str, int] = {}  # swapped | <ChainError reason> | keyserver_*
        self.chain_problem = ""  # the last failure logged (a repeat is not logged again)

    def adopt(self, old: KeylessRoute) -> None:
        """Keep what a reload should not lose: live sessions, the cache, counters, a chain
        fetched from the key server if it is newer than the file."""
        if (
            old.fetched
            and old.config.sni == self.config.sni
            # the newer of the fetched chain and the file (which a renewal may also have
            # replaced)
            and old.identity.chain[0].not_valid_before_utc
            > self.identity.chain[0].not_valid_before_utc
        ):
            self.identity = old.identity
            self.fetched = True
        self.chain_results = old.chain_results
        if old.identity.certificate_sha256 == self.identity.certificate_sha256:
            old.sessions.lifetime_s = self.sessions.lifetime_s
            old.sessions.max_entries = self.sessions.max_entries
            self.sessions = old.sessions
        if (old.cache.max_bytes, old.cache.max_object_bytes) == (
            self.cache.max_bytes,
            self.cache.max_object_bytes,
        ):
            self.cache = old.cache
            self.cache.stale = self.stale
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


class KeylessMode(Mode):
    """The worker's keyless side: runs on the asyncio loop the worker's reactor is attached
    to."""

    name = "keyless"
    needs_asyncio = True
    metrics = METRICS

    def __init__(self, ctx: ModeContext) -> None:
        super().__init__(ctx)
        assert ctx.loop is not None
        self.loop = ctx.loop
        self.clients: dict[KeyServerRef, KeyServerClient] = {}
        self.tasks: set[asyncio.Task[Any]] = set()
        self.sign_latency = Histogram(SIGN_BUCKETS)

    @classmethod
    def check_config(cls, where: str, rc: RouteConfig, edge: EdgeConfig) -> None:
        # the certificate, the key server's and the origins' TLS files
        KeylessRoute(where, rc, {}, edge.ipv6_prefix_len)

    def build(
        self, where: str, rc: RouteConfig, edge: EdgeConfig, old: KeylessRoute | None
    ) -> KeylessRoute:
        route = KeylessRoute(where, rc, self.clients, edge.ipv6_prefix_len)
        if old is not None:
            route.adopt(old)
        return route

    def configured(self, routes: Sequence[RouteState]) -> None:
        """Close the key server clients no route uses any more."""
        in_use = {r.state.config.keyserver for r in routes}
        for ref in [r for r in self.clients if r not in in_use]:
            client = self.clients.pop(ref)
            self._spawn(client.close())

    def sweep(self, routes: Sequence[RouteState], now: float) -> None:
        mono = time.monotonic()
        for route in routes:
            kr: KeylessRoute = route.state
            kr.sessions.expire(now)
            assert kr.config.keyserver is not None
            every = kr.config.keyserver.chain_refresh_s
            if every > 0 and not kr.chain_busy and mono >= kr.chain_due:
                kr.chain_due = mono + every
                kr.chain_busy = True
                self._spawn(self._refresh_chain(route, kr))

    # ---------------------------------------------------------------- chain distribution
    async def _refresh_chain(self, route: RouteState, kr: KeylessRoute) -> None:
        """Ask the key server for the route's current chain; swap it in if it differs and
        passes core.certchain's checks (new handshakes take it, open connections keep theirs),
        keep the one in service otherwise."""
        try:
            try:
                ders = await kr.keyclient.fetch_chain(kr.config.sni[0])
            except KeyServerError as exc:
                self._chain_failed(route, kr, f"keyserver_{exc.reason}", str(exc))
                return
            if ders == kr.identity.ders:
                kr.chain_problem = ""
                return
            try:
                chain = check_chain(ders, kr.config.sni, time.time())
                identity = ts.ServerIdentity.from_chain(chain)
                if not identity.schemes:
                    raise ChainError("unsupported_key", "the leaf's key cannot sign TLS 1.3")
            except ChainError as exc:
                self._chain_failed(route, kr, exc.reason, str(exc))
                return
            old = kr.identity
            kr.identity = identity
            kr.fetched = True
            kr.chain_problem = ""
            kr.chain_results["swapped"] = kr.chain_results.get("swapped", 0) + 1
            self.ctx.log.log(
                "keyless_chain_updated",
                route=route.name,
                old_sha256=old.certificate_sha256.hex(),
                new_sha256=identity.certificate_sha256.hex(),
                not_after=chain[0].not_valid_after_utc.isoformat(),
            )
        finally:
            kr.chain_busy = False

    def _chain_failed(self, route: RouteState, kr: KeylessRoute, reason: str, detail: str) -> None:
        # a refusal is audited at the key server: not every chain_refresh_s
        assert kr.config.keyserver is not None
        every = kr.config.keyserver.chain_refresh_s
        kr.chain_due = time.monotonic() + max(every, CHAIN_RETRY_S)
        kr.chain_results[reason] = kr.chain_results.get(reason, 0) + 1
        if kr.chain_problem != reason:  # once per new problem, not every refresh
            kr.chain_problem = reason
            self.ctx.log.log(
                "keyless_chain_refused",
                route=route.name,
                reason=reason,
                detail=detail[:300],
                keeps=kr.identity.certificate_sha256.hex(),
            )

    def purge(self, routes: Sequence[RouteState], purge: Purge | None) -> int | Awaitable[int]:
        """An operator's purge (decisions.purge): the matching entries of every route's
        cache, by URL, path prefix or Cache-Tag, PURGE_SLICE keys per turn of the loop (a
        100,000-entry cache takes a second of CPU: visitors are served in between); None:
        all of them, at once."""
        if purge is None:
            return sum(int(route.state.cache.purge_all()) for route in routes)
        matcher = PurgeMatcher.of(purge)
        if matcher.empty:
            return 0
        return self._purge([route.state.cache for route in routes], matcher)

    async def _purge(self, caches: list[HttpCache], matcher: PurgeMatcher) -> int:
        removed = 0
        for cache in caches:
            keys = cache.stored_keys()
            for i in range(0, len(keys), PURGE_SLICE):
                removed += cache.purge(matcher.matches, keys[i : i + PURGE_SLICE])
                await asyncio.sleep(0)
        return removed

    def _spawn(self, coro: Any) -> None:
        task = self.loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # ---------------------------------------------------------------- a connection
    def check(self, route: RouteState, hello: ClientHello) -> bool:
        kr: KeylessRoute = route.state
        if hello.alpn == (ACME_TLS_ALPN,):
            # RFC 8737: an ACME server validating tls-alpn-01; the site side answers it (the
            # origin agent, docs/acme.md), not the edge: relay it at layer 4 like passthrough.
            # Only when it is the one protocol offered (RFC 8737 §3: the ACME server offers
            # only it): acme-tls/1 beside http/1.1 must not tunnel a visitor past this edge's
            # HTTP guards (attack review certs #5); such a hello is served here as any other.
            kr.stats.count(kr.stats.fallbacks, "acme_tls_alpn")
            return False
        try:
            reason = ts.fallback_reason(hello, kr.identity.schemes)
        except ProtocolError as exc:  # e.g. a malformed key_share the peek had not looked at
            kr.stats.count(kr.stats.handshakes, f"tls_{exc.reason}")
            raise
        if reason is None and hello.sni is None:
            reason = "no_sni"  # the key server would refuse: the origin has the key
        if reason is not None:
            kr.stats.count(kr.stats.fallbacks, reason)
            return False
        return True

    def begin(self, conn: Connection, route: RouteState, hello: ClientHello) -> bool:
        kr: KeylessRoute = route.state
        name = hello.sni
        assert name is not None  # check() passed
        server = ts.TlsServer(kr.identity, kr.settings, kr.sessions, name, hello)
        events = server.receive(conn.hello_bytes, self.ctx.now)
        conn.take()
        failed = next((e for e in events if isinstance(e, ts.ConnectionFailed)), None)
        if failed is not None:
            self._failed(conn, kr, server, failed)
            return True
        request = next((e for e in events if isinstance(e, ts.SignatureRequested)), None)
        if request is None:  # resumed: no signature needed
            kr.stats.count(kr.stats.handshakes, "resumed")
            self._open(conn, route, kr, server)
            return True
        if kr.keyclient.all_down(time.monotonic()):
            self._keyserver_failed(conn, kr, server, "keyserver_down", "every key server is down")
            return True
        t0 = time.perf_counter()
        future = kr.keyclient.submit(w.SignRequest(request.scheme, conn.ip, request.messages))
        future.add_done_callback(lambda f: self._signed(conn, route, kr, server, f, t0))
        return True

    def _signed(
        self,
        conn: Connection,
        route: RouteState,
        kr: KeylessRoute,
        server: ts.TlsServer,
        future: asyncio.Future[bytes],
        t0: float,
    ) -> None:
        exc = future.exception()
        if not conn.pending:  # closed meanwhile (banned, drained)
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
        self._open(conn, route, kr, server)

    def _keyserver_failed(
        self, conn: Connection, kr: KeylessRoute, server: ts.TlsServer, reason: str, detail: str
    ) -> None:
        if kr.config.keyserver_down == "passthrough":
            kr.stats.count(kr.stats.fallbacks, reason)
            server.signature_failed(reason, detail)  # its alert is never sent
            conn.forward()
            return
        kr.stats.count(kr.stats.handshakes, reason)
        events = server.signature_failed(reason, detail)
        failed = next((e for e in events if isinstance(e, ts.ConnectionFailed)), None)
        conn.send_now(server.data_to_send())
        if self.ctx.may_log_refusal():
            self.ctx.log.log(
                "keyless_handshake_failed", client=conn.ip, reason=reason, detail=detail[:200]
            )
        conn.close("refused", failed.reason if failed else reason)

    def _failed(
        self, conn: Connection, kr: KeylessRoute, server: ts.TlsServer, failed: ts.ConnectionFailed
    ) -> None:
        kr.stats.count(kr.stats.handshakes, f"tls_{failed.reason}")
        conn.send_now(server.data_to_send())
        conn.close("refused", f"tls_{failed.reason}")

    def _open(
        self, conn: Connection, route: RouteState, kr: KeylessRoute, server: ts.TlsServer
    ) -> None:
        def done(reason: str, bytes_in: int, bytes_out: int) -> None:
            if server.key_updates_received:
                kr.stats.key_updates["received"] = (
                    kr.stats.key_updates.get("received", 0) + server.key_updates_received
                )
            if server.key_updates_sent:
                kr.stats.key_updates["sent"] = (
                    kr.stats.key_updates.get("sent", 0) + server.key_updates_sent
                )
            conn.finished(reason, bytes_in, bytes_out)

        sni = server.server_name or ""
        serve(
            conn,
            server,
            lambda: KeylessHandler(self.ctx, conn, route, kr, sni),
            kr.limits,
            kr.http,
            tls_version="TLSv1.3",
            on_done=done,
        )

    # ---------------------------------------------------------------- metrics
    def snapshot(self, routes: Sequence[RouteState]) -> Snapshot:
        active: dict[str, int] = {}
        for conn in self.ctx.conns:
            route = conn.route
            if conn.taken and route is not None and route.mode is self:
                active[route.name] = active.get(route.name, 0) + 1
        tables: dict[str, list[list[Any]]] = {
            "blindfold_keyless_handshakes_total": [],
            "blindfold_keyless_fallbacks_total": [],
            "blindfold_keyless_requests_total": [],
            "blindfold_keyless_cache_total": [],
            "blindfold_keyless_cache_bytes": [],
            "blindfold_keyless_rate_limited_total": [],
            "blindfold_keyless_sessions": [],
            "blindfold_keyless_connections_active": [],
            "blindfold_keyless_key_updates_total": [],
        }
        for route in routes:
            kr: KeylessRoute = route.state
            name = route.name
            st = kr.stats
            for metric, table in (
                ("blindfold_keyless_handshakes_total", st.handshakes),
                ("blindfold_keyless_fallbacks_total", st.fallbacks),
                ("blindfold_keyless_requests_total", st.requests),
                ("blindfold_keyless_cache_total", st.cache),
                ("blindfold_keyless_rate_limited_total", st.rate_limited),
                ("blindfold_keyless_key_updates_total", st.key_updates),
            ):
                tables[metric].extend([[name, k], v] for k, v in table.items())
            tables["blindfold_keyless_cache_bytes"].append([[name], kr.cache.used])
            tables["blindfold_keyless_sessions"].append([[name], len(kr.sessions)])
            tables["blindfold_keyless_connections_active"].append([[name], active.get(name, 0)])
        tables["blindfold_keyless_sign_seconds"] = [[[], self.sign_latency.value()]]
        wall = time.time()
        tables["blindfold_certificate_expiry_seconds"] = [
            [
                ["edge", certificate_first_name(r.state.identity.chain[0]), r.name],
                r.state.identity.chain[0].not_valid_after_utc.timestamp() - wall,
            ]
            for r in routes
        ]
        tables["blindfold_certificate_reloads_total"] = [
            [["edge", r.name, k], v] for r in routes for k, v in r.state.chain_results.items()
        ]
        return tables


class KeylessHandler:
    """Requests on one visitor connection of a keyless route (HTTP/1.1 and HTTP/2 alike)."""

    def __init__(
        self, ctx: ModeContext, conn: Connection, route: RouteState, kr: KeylessRoute, sni: str
    ) -> None:
        self.ctx = ctx
        self.conn = conn
        self.route = route
        self.kr = kr
        self.sni = sni
        self._rate_key: int | None = None
        self._pool: UpstreamPool | None = None
        self.requests = 0
        # (request, lookup) of requests `answer_now` looked up but left to __call__, by
        # id(request): HTTP/2 may parse several before the first one's Task runs
        self._carried: dict[int, tuple[Request, Lookup | None]] = {}

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
        if name in LOGGED_EVENTS:
            self.ctx.log.log(name, route=self.route.name, **fields)

    # ---------------------------------------------------------------- origin connections
    async def _connect_origin(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        kr = self.kr
        return await open_verified_origin(
            self.ctx,
            self.route,
            with_tlv(self.conn.proxy_header(), PP2_TYPE_BLINDFOLD_HTTP, BLINDFOLD_HTTP_MARK),
            kr.origin_tls,
            kr.config.origin_server_name or self.sni,
            kr.pins,
            kr.http.upstream_connect_timeout_s,
        )

    # ---------------------------------------------------------------- requests
    def answer_now(self, request: Request, respond: H1Responder | H2Responder) -> bool:
        """HTTP/1.1 (web/http1.py) or HTTP/2 (web/http2.py), a whole request without a body: a
        fresh cache hit answered at once, without a Task, with the same bytes `_serve_entry`
        sends. False: `__call__` answers it (with the cache lookup made here, if one was)."""
        kr = self.kr
        cache = kr.cache
        if (
            kr.rate_rules
            or not cache.max_bytes
            or (request.method != b"GET" and request.method != b"HEAD")
            or not respond.can_answer_now
            or misdirected(request_host(request), self.sni, self.route, self.ctx.router)
        ):
            return False
        t0 = time.monotonic()
        key = cache.key(request.authority, request.target)
        lookup = cache.lookup(key, request.method, request.headers, time.time())
        if lookup is None or not lookup.fresh:
            self._carry(request, lookup)
            return False
        entry = lookup.entry
        head = entry.prepared
        body = entry.body
        if (
            not isinstance(head, PreparedHead)
            or len(body) > WHOLE_BODY_BYTES
            or (entry.status == 200 and not_modified(entry, request.headers))
        ):
            self._carry(request, lookup)
            return False
        self.requests += 1
        # plain fields (a lower-case name, digits; a constant), none framing the response
        extra = [(b"age", b"%d" % entry.age(time.time())), _HIT_FIELD]
        sent = 0
        try:
            respond.start_prepared_now(head, extra, True)
            if request.method != b"HEAD" and body:
                respond.send_now(body)
                sent = len(body)
            respond.end_now()
        except ConnectionError:
            pass
        self._finish(request, entry.status, "hit", sent, t0)
        return True

    def _carry(self, request: Request, lookup: Lookup | None) -> None:
        carried = self._carried
        if len(carried) >= 256:  # a stream reset before its Task ran leaves its entry
            carried.clear()
        carried[id(request)] = (request, lookup)

    async def __call__(self, request: Request, body: BodyStream, respond: Responder) -> None:
        t0 = time.monotonic()
        self.requests += 1
        status, outcome, sent = await self._handle(request, body, respond)
        self._finish(request, status, outcome, sent, t0)

    def _finish(self, request: Request, status: int, outcome: str, sent: int, t0: float) -> None:
        stats = self.kr.stats
        stats.count(stats.requests, _STATUS_CLASS.get(status // 100) or f"{status // 100}xx")
        if outcome:
            stats.count(stats.cache, outcome)
        if self.ctx.config.log_connections:
            self.ctx.log.log(
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
        if misdirected(request_host(request), self.sni, self.route, self.ctx.router):
            # RFC 9110 §15.5.20: this connection (its certificate, its route) is not for that
            # host; no fronting one hostname's requests through another's connection
            await simple_response(respond, 421, "misdirected request\n")
            return 421, "", 0
        rules = kr.rate_rules
        now = time.monotonic() if rules else 0.0
        path = request.path.decode("latin-1") if rules else ""
        for name, rule, buckets in rules:
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
        carried = self._carried.pop(id(request), None) if self._carried else None
        looked_up = carried is not None and carried[0] is request
        if looked_up or (cache.max_bytes and request.method in (b"GET", b"HEAD")):
            if carried is not None and looked_up:
                lookup = carried[1]  # answer_now looked it up (hits and misses counted once)
            else:
                lookup = cache.lookup(key, request.method, request.headers, time.time())
            if lookup is not None and lookup.fresh:
                return await self._serve_entry(request, respond, lookup.entry, "hit")
            if lookup is not None and lookup.revalidate_after:
                # RFC 5861 §3: the stale copy now, the origin in the background
                self._refresh_later(request, key, lookup)
                return await self._serve_entry(request, respond, lookup.entry, "stale")
        return await self._forward(request, body, respond, key, lookup)

    def _refresh_later(self, request: Request, key: tuple[bytes, bytes], lookup: Lookup) -> None:
        """Start the background refresh of an entry served stale, unless one is under way for
        that key or MAX_REFRESHES are (then a later visitor's request starts it). It outlives
        the visitor's connection: its own origin connection, its own deadline."""
        kr = self.kr
        if key in kr.refreshing or len(kr.refreshing) >= MAX_REFRESHES:
            return
        kr.refreshing.add(key)
        task = asyncio.get_running_loop().create_task(self._refresh(request, key, lookup))
        kr.refresh_tasks.add(task)
        task.add_done_callback(kr.refresh_tasks.discard)

    async def _refresh(self, request: Request, key: tuple[bytes, bytes], lookup: Lookup) -> None:
        kr, http = self.kr, self.kr.http
        pool = UpstreamPool(
            f"https://{self.route.pool.origins[0].text}",
            max_idle=0,
            connect_timeout_s=http.upstream_connect_timeout_s,
            timeout_s=http.upstream_timeout_s,
            tls=kr.origin_tls,
            server_hostname=kr.config.origin_server_name or self.sni,
            connector=self._connect_origin,
            max_open=1,
            queue_timeout_s=http.upstream_queue_timeout_s,
        )
        try:
            async with asyncio.timeout(http.upstream_connect_timeout_s + http.upstream_timeout_s):
                await self._revalidate(pool, request, key, lookup)
        except (TimeoutError, UpstreamError, ConnectionError, OSError):
            pass
        finally:
            pool.close()
            kr.refreshing.discard(key)

    async def _revalidate(
        self, pool: UpstreamPool, request: Request, key: tuple[bytes, bytes], lookup: Lookup
    ) -> None:
        """Refresh a stored response served stale: a 304 freshens it, a storable answer
        replaces it; nothing reaches the visitor, who already has its answer."""
        cache = self.kr.cache
        headers = upstream_headers(request, request.authority or self.sni.encode())
        headers = [(k, v) for k, v in headers if k not in _CONDITIONAL] + lookup.validators
        request_time = time.time()
        response = await pool.request(b"GET", request.target or b"/", headers, None)
        try:
            response_time = time.time()
            chunks: list[bytes] | None = []
            size = 0
            async for chunk in response.body():
                size += len(chunk)
                if chunks is None or size > cache.max_object_bytes:
                    chunks = None  # too big to store: the rest is not worth reading
                    break
                chunks.append(chunk)
            if response.status == 304 and lookup.validators:
                cache.freshen(
                    key,
                    lookup.entry,
                    response.headers,
                    request.headers,
                    request_time,
                    response_time,
                )
            elif chunks is not None and cache.storable(
                b"GET", request.headers, response.status, response.headers
            ):
                cache.store(
                    key,
                    request.headers,
                    response.status,
                    response.headers,
                    b"".join(chunks),
                    request_time,
                    response_time,
                )
            else:
                cache.forget(key, request.headers, response.status, response.headers)
        except (UpstreamError, ConnectionError):
            pass
        finally:
            response.close()

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
        revalidating = lookup is not None and bool(lookup.validators)
        if lookup is not None and revalidating:
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
            # 103 Early Hints and other 1xx pass through to the visitor, never into the cache
            response = await self.pool.request(
                method, request.target or b"/", headers, stream, interim_sender(respond)
            )
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
            if lookup is not None and cache.stale_on_error(
                lookup.entry, request.headers, time.time()
            ):
                return await self._serve_entry(request, respond, lookup.entry, "stale")
            status = exc.status
            await simple_response(
                respond,
                status,
                "origin unavailable\n",
                [(b"x-request-id", request.request_id.encode())],
            )
            self.ctx.log.log(
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
        if (
            lookup is not None
            and response.status in STALE_IF_ERROR_STATUS
            and cache.stale_on_error(lookup.entry, request.headers, response_time)
        ):
            response.close()  # RFC 5861 §4: the stored copy answers instead of the error
            return await self._serve_entry(request, respond, lookup.entry, "stale")
        if revalidating and lookup is not None and response.status == 304:
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
        if not storable and request.method == b"GET" and cache.max_bytes > 0:
            # no-store/private/Set-Cookie now: the stored copy is never served again, stale or not
            cache.forget(key, request.headers, response.status, response.headers)
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
        # Cache-Tag is for this cache (purges by tag), not for visitors: recorded, then dropped
        headers = [(k, v) for k, v in strip_hop_by_hop(response.headers) if k != CACHE_TAG_HEADER]
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
                [(k, v) for k, v in response.headers if k != CACHE_TAG_HEADER],
                b"".join(kept),
                request_time,
                response_time,
                tags=parse_cache_tags(response.headers),
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
        marker = _OUTCOME_BYTES.get(outcome) or outcome.encode()
        extra = [(b"age", age), (b"x-blindfold-cache", marker)]
        sent = 0
        body = entry.body
        try:
            head = entry.prepared
            if isinstance(head, PreparedHead):
                # fields checked and encoded when the entry was stored: only `extra` per hit
                await start_prepared(respond, head, extra)
            else:  # fields the prepared path refused (FieldError): the responder judges them
                await respond.start(entry.status, [*_head_fields(entry), *extra])
            if request.method != b"HEAD" and body:
                if len(body) <= WHOLE_BODY_BYTES:
                    await respond.send(body)  # one write, no copy
                    sent = len(body)
                else:  # the connection's buffer stays bounded: a slice at a time, no copies
                    view = memoryview(body)
                    for i in range(0, len(view), READ_CHUNK):
                        piece = view[i : i + READ_CHUNK]
                        await respond.send(piece)  # type: ignore[arg-type]
                        sent += len(piece)
            await respond.end()
        except ConnectionError:
            pass
        return entry.status, outcome, sent


# a cached body up to this size is handed to the responder in one piece (the TLS transport's
# write buffer, WRITE_BUFFER_HIGH, is as big): one write, one drain; bigger ones in slices
WHOLE_BODY_BYTES = 256 * 1024
_OUTCOME_BYTES = {o: o.encode() for o in ("hit", "stale", "revalidated", "miss")}
_STATUS_CLASS = {0: "aborted", **{c: f"{c}xx" for c in range(1, 10)}}
_HIT_FIELD = (b"x-blindfold-cache", b"hit")


def _head_fields(entry: Entry) -> Headers:
    """The header fields a stored response is served with: its stored fields (Cache-Tag is
    for this cache only) and a Content-Length of its body (none on 204 and 304)."""
    headers = [(k, v) for k, v in entry.headers if k != b"content-length" and k != CACHE_TAG_HEADER]
    if entry.status not in (204, 304):
        headers.append((b"content-length", str(len(entry.body)).encode()))
    return headers


def prepare_head(entry: Entry) -> PreparedHead | None:
    """`HttpCache.prepare`: an entry's head, checked once when stored or freshened (None when a
    field is one a response must not carry: such an entry is served through `start`, which
    refuses it as before)."""
    try:
        return PreparedHead(entry.status, _head_fields(entry))
    except FieldError:
        return None
