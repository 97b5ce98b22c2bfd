"""`blindfold origin`: the agent beside the site's application.

Edges connect with a PROXY header (believed only from `trusted_edges`), TLS ends here with the
site's own certificates, HTTP/1.1 and HTTP/2 requests pass the WAF and go to the application
over pooled keep-alive connections. WAF blocks and per-path rate rules become decisions, served
to every edge as a CrowdSec-shaped stream (and published to Redis when configured).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import ipaddress
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any

from blindfold.config import Config, load_file
from blindfold.config.common import load_admin_token, parse_hostport
from blindfold.config.origin import OriginConfig, fds_needed, listen_warnings
from blindfold.config.schema import changes
from blindfold.core.iplist import IPSet, parse_address, visitor_key
from blindfold.core.proxyproto import (
    BLINDFOLD_HTTP_MARK,
    PP2_TYPE_BLINDFOLD_HTTP,
    V1_PREFIX,
    V2_SIGNATURE,
)
from blindfold.core.ratelimit import TokenBucket
from blindfold.decisions.api import DecisionApi, load_api_keys
from blindfold.decisions.core import (
    Decision,
    DecisionRules,
    DecisionStore,
    RateRule,
    scope_of,
)
from blindfold.decisions.journal import DecisionJournal
from blindfold.decisions.operator import OperatorApi, load_operator_keys
from blindfold.decisions.purge import Purge, PurgeLog
from blindfold.errors import ConfigError, ProtocolError
from blindfold.io import compat
from blindfold.io.accepted import (
    BACKOFF_MIN_S,
    RESOURCE_ERRNOS,
    Backoff,
    FdReserve,
    fd_limit,
    peek,
    read_proxy_header,
)
from blindfold.io.admin_http import AdminServer
from blindfold.io.service import run_service
from blindfold.obs.log import JsonLog
from blindfold.obs.metrics import (
    CERTIFICATE_METRICS,
    Histogram,
    MetricSpec,
    TopLabels,
    render,
)
from blindfold.obs.status import HTML_TYPE, JSON_TYPE, PAGE, status_json
from blindfold.origin.acme_tls import (
    answer_challenge,
    challenge_dir,
    peek_hello,
    site_certificates,
    wants_challenge,
)
from blindfold.origin.edges import DecisionBudget, Reporter, TrustedEdges
from blindfold.origin.gate import OriginGate, edge_fields
from blindfold.origin.tls import SiteTls, decisions_tls, file_stamps
from blindfold.waf.engine import (
    CrsSettings,
    Exclusion,
    ModSecurityEngine,
    PathMode,
    WafEngine,
)
from blindfold.waf.modsecurity import ModSecurityError
from blindfold.web.client import UpstreamPool
from blindfold.web.http1 import ConnInfo, H1Connection
from blindfold.web.http2 import H2Connection
from blindfold.web.limits import HttpLimits
from blindfold.web.messages import BodyStream, Handler, Request, Responder, simple_response
from blindfold.web.proxy import ReverseProxy

UPSTREAM_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)
WAF_PATHS = 30  # path label values (a visitor chooses paths)
ORIGIN_METRICS = [
    *CERTIFICATE_METRICS,
    MetricSpec(
        "blindfold_origin_requests_total", "counter", "Requests by status class.", ("status",)
    ),
    MetricSpec(
        "blindfold_origin_config_reloads_total",
        "counter",
        "Configuration reloads (SIGHUP) by result: ok, invalid.",
        ("result",),
    ),
    MetricSpec(
        "blindfold_origin_connections_total",
        "counter",
        "Client connections by result.",
        ("result",),
    ),
    MetricSpec("blindfold_origin_connections_active", "gauge", "Open client connections."),
    MetricSpec(
        "blindfold_origin_decisions_connections_active",
        "gauge",
        "Open connections to the decision stream.",
    ),
    MetricSpec("blindfold_waf_blocks_total", "counter", "Requests the WAF blocked."),
    MetricSpec(
        "blindfold_waf_rule_blocks_total",
        "counter",
        "Blocked requests by the rule ids in the blocking verdict.",
        ("rule",),
    ),
    MetricSpec(
        "blindfold_waf_path_blocks_total",
        "counter",
        f"Blocked requests by the first segment of their path: the {WAF_PATHS} busiest of the "
        "last minutes (decaying counts, half-life 5 min) per origin process, the rest as "
        "'other'. A path that leaves the top loses its series; if it returns, its counter "
        "starts again from 0 (a counter reset to rate()).",
        ("path",),
    ),
    MetricSpec("blindfold_decisions_active", "gauge", "Active decisions (bans)."),
    MetricSpec(
        "blindfold_decisions_created_total", "counter", "Decisions created, by cause.", ("cause",)
    ),
    MetricSpec(
        "blindfold_origin_decisions_refused_total",
        "counter",
        "Decisions not made, by reason (edge_budget: over the reporting edge's "
        "per_edge_decisions; too_many_decisions).",
        ("reason",),
    ),
    MetricSpec(
        "blindfold_origin_decisions_full_builds_total",
        "counter",
        "Whole decision sets built for the stream (at most one per 5 s, however many ask).",
    ),
    MetricSpec(
        "blindfold_decision_stream_requests_total",
        "counter",
        "Decision stream requests by edge (or 'unauthorized').",
        ("bouncer",),
    ),
    MetricSpec(
        "blindfold_origin_operator_requests_total",
        "counter",
        "Operator API requests by result: list, add, delete, purge; refused_<why> (missing, "
        "malformed, wrong_key, edge_key: answered 401); bad_<reason> (answered 400).",
        ("result",),
    ),
    MetricSpec(
        "blindfold_http_events_total",
        "counter",
        "HTTP-layer events: timeouts, bad requests, HTTP/2 abuse.",
        ("event",),
    ),
    MetricSpec(
        "blindfold_origin_upstream_errors_total",
        "counter",
        "Requests the application did not answer, by reason (connect_failed, timeout, ...).",
        ("reason",),
    ),
    MetricSpec(
        "blindfold_origin_upstream_seconds",
        "histogram",
        "Time from sending a request to the application to having its response head.",
        buckets=UPSTREAM_BUCKETS,
    ),
    MetricSpec(
        "blindfold_origin_blind_bytes_total",
        "counter",
        "Body bytes served by the blind store: manifest, blob and public (edge pulls), "
        "plaintext (visitors' fallbacks), page.",
        ("kind",),
    ),
    MetricSpec(
        "blindfold_origin_blind_requests_total",
        "counter",
        "Blind store requests by kind (manifest, blob, plaintext, not_found).",
        ("kind",),
    ),
]


def build_waf(cfg: OriginConfig) -> WafEngine | None:
    w = cfg.waf
    if not w.enabled:
        return None
    settings = CrsSettings(
        paranoia_level=w.paranoia_level,
        mode=w.mode,
        anomaly_threshold=w.anomaly_threshold,
        body_limit_bytes=w.body_limit_bytes,
        body_no_files_limit_bytes=w.body_no_files_limit_bytes,
        body_limit_action=w.body_limit_action,
        allowed_methods=w.allowed_methods,
        allowed_content_types=w.allowed_content_types,
        exclusions=tuple(Exclusion(e.path_prefix, e.rule_ids, e.args) for e in w.exclusions),
        modes=tuple(PathMode(m.path_prefix, m.mode, m.hostnames) for m in w.modes),
        extra_rules_files=w.extra_rules_files,
        crs_rules_dir=w.crs_rules_dir,
        crs_setup_dir=w.crs_setup_dir,
        unicode_map_file=w.unicode_map_file,
    )
    try:
        return ModSecurityEngine(settings)
    except ModSecurityError as exc:
        raise ConfigError("origin.waf", str(exc)) from None


class _AlpnDispatch:
    """Protocol factory target: once TLS is up, hand the transport to HTTP/2 or HTTP/1.1."""

    def __init__(
        self,
        info: ConnInfo,
        handler: Handler,
        tls: SiteTls,
        limits: HttpLimits,
        on_event: Callable[[str, dict[str, Any]], None],
    ) -> None:
        self.info = info
        self.handler = handler
        self.tls = tls
        self.limits = limits
        self.on_event = on_event

    def __call__(self) -> Any:
        return self

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        obj = transport.get_extra_info("ssl_object")
        alpn = obj.selected_alpn_protocol() if obj is not None else None
        info = self.info
        if obj is not None:
            info.tls = {
                "alpn": alpn or "",
                "version": obj.version() or "",
                "sni": self.tls.sni.get(obj, ""),
            }
        proto: asyncio.Protocol
        if alpn == "h2":
            proto = H2Connection(self.handler, self.limits, info, self.on_event)
        else:
            proto = H1Connection(self.handler, self.limits, info, self.on_event)
        transport.set_protocol(proto)
        proto.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.on_event("closed", {})

    def data_received(self, data: bytes) -> None:  # not reached: the protocol is swapped
        pass

    def eof_received(self) -> None:
        pass


# accept() errors about the one connection being accepted (it was reset, or a firewall hook
# refused it): accept the next at once
_ONE_CONNECTION_ERRNOS = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EINTR})


class _Slots:
    """Open connections of one listener group (the site's, the decision stream's)."""

    __slots__ = ("limit", "open")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0

    def take(self) -> bool:
        if self.open >= self.limit:
            return False
        self.open += 1
        return True


class _Claim:
    """What one accepted connection holds: a slot of its group and, once its visitor is known,
    a place in that address's count. Released exactly once, on whichever path the connection
    ends (refused, handshake failed or timed out, or closed after serving)."""

    __slots__ = ("client", "counts", "released", "slots")

    def __init__(self, slots: _Slots, counts: dict[str, int]) -> None:
        self.slots = slots
        self.counts = counts
        self.client: str | None = None
        self.released = False

    def count_client(self, key: str) -> int:
        """Count this connection against `key`; returns how many it had before."""
        before = self.counts.get(key, 0)
        self.counts[key] = before + 1
        self.client = key
        return before

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        self.slots.open -= 1
        if self.client is not None:
            left = self.counts[self.client] - 1
            if left:
                self.counts[self.client] = left
            else:
                del self.counts[self.client]


class _PerClientRequests:
    """Bounds the requests one visitor address has in flight; more are answered 429."""

    def __init__(self, agent: OriginAgent, handler: OriginGate) -> None:
        self.agent = agent
        self.handler = handler

    async def __call__(
        self,
        request: Request,
        body: BodyStream,
        respond: Responder,
        reporter: Reporter | None = None,
    ) -> None:
        agent = self.agent
        key = visitor_key(request.client[0])
        counts = agent.client_requests
        n = counts.get(key, 0)
        if n >= agent.cfg.per_client_requests:
            agent.count("requests:4xx")
            agent.count("http:per_client_requests")
            await simple_response(
                respond, 429, "too many requests in flight\n", [(b"retry-after", b"1")]
            )
            return
        counts[key] = n + 1
        try:
            await self.handler(request, body, respond, reporter)
        finally:
            left = counts[key] - 1
            if left:
                counts[key] = left
            else:
                del counts[key]


class _ViaEdge:
    """The handler of a connection whose visitor a trusted edge named (or the edge's own, PROXY
    LOCAL): the gate learns which edge, for its log lines, decisions and budget."""

    __slots__ = ("handler", "reporter")

    def __init__(self, handler: OriginGate | _PerClientRequests, reporter: Reporter) -> None:
        self.handler = handler
        self.reporter = reporter

    async def __call__(self, request: Request, body: BodyStream, respond: Responder) -> None:
        await self.handler(request, body, respond, self.reporter)


class _ApiDeadline:
    """A decision-stream connection's handler: until a request with a valid API key arrives
    the connection lives on a deadline; then it is an edge's, kept alive between polls."""

    __slots__ = ("api", "on_expired", "timer", "transport", "trusted")

    def __init__(self, api: DecisionApi, on_expired: Callable[[], None]) -> None:
        self.api = api
        self.on_expired = on_expired
        self.timer: asyncio.TimerHandle | None = None
        self.transport: asyncio.BaseTransport | None = None
        self.trusted = False

    def arm(
        self, loop: asyncio.AbstractEventLoop, delay_s: float, transport: asyncio.BaseTransport
    ) -> None:
        if not self.trusted:
            self.transport = transport
            self.timer = loop.call_later(delay_s, self._expired)

    def _expired(self) -> None:
        self.timer = None
        if not self.trusted and self.transport is not None and not self.transport.is_closing():
            self.on_expired()
            self.transport.close()

    def _authorized(self) -> None:
        self.trusted = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    async def __call__(self, request: Request, body: BodyStream, respond: Responder) -> None:
        await self.api(request, body, respond, on_authorized=self._authorized)


async def _too_many_connections(request: Request, body: BodyStream, respond: Responder) -> None:
    """The handler of a connection over its address's share: one 429, then the connection
    closes (HTTP/1.1: Connection: close; HTTP/2: one stream, short idle timeout)."""
    await simple_response(
        respond,
        429,
        "too many connections from your address\n",
        [(b"retry-after", b"1"), (b"connection", b"close")],
    )


class OriginAgent:
    """One origin process. `role`: "single" (everything in one process), "master" (decisions,
    admin, HTTP/3; the site's TCP listeners are the workers', origin.master) or "worker"
    (serves `inherited` listening sockets, [(address, tls, fd)]; its gate reports to the
    master through `remote`, origin.worker)."""

    def __init__(
        self,
        path: str,
        cfg: OriginConfig,
        log: JsonLog,
        *,
        role: str = "single",
        inherited: list[tuple[str, bool, int]] | None = None,
        remote: Any = None,
    ) -> None:
        self.path = path
        self.cfg = cfg
        self.log = log
        self.role = role
        self.on_certificates: Callable[[], None] | None = None  # set by an origin master
        self.inherited = inherited or []
        self.remote = remote
        # master: the workers' counters, asked for at each /metrics (origin.master)
        self.collect: Callable[[], Awaitable[list[dict[str, Any]]]] | None = None
        # worker: the master's HTTP/3 port, for Alt-Svc (the master serves HTTP/3)
        self.quic_port = 0
        self.audit = (
            JsonLog.open(cfg.waf.audit_log, process="origin") if (cfg.waf.audit_log) else self.log
        )
        if self.audit is not self.log:
            with contextlib.suppress(RuntimeError):  # no loop: flushed by the tick and at stop
                self.audit.flush_soon(asyncio.get_running_loop().call_soon)
        if self.audit is not self.log:  # written at once too (io.service does the main log)
            self.audit.flush_soon(asyncio.get_running_loop().call_soon)
        self.limits = cfg.http.limits()
        self.stats: dict[str, Any] = {}
        self.site_slots = _Slots(cfg.max_connections)
        self.api_slots = _Slots(cfg.decisions.max_connections)
        self.client_conns: dict[str, int] = {}
        self.client_requests: dict[str, int] = {}
        self.api_peer_conns: dict[str, int] = {}  # decision-stream connections per address
        self.reserve = FdReserve()
        self.edges = TrustedEdges(cfg)
        self.store = DecisionStore()
        self.tls: SiteTls | None = None
        self.servers: list[asyncio.Task[None]] = []
        self.sockets: list[socket.socket] = []
        self.tls_sockets: dict[socket.socket, bool] = {}
        self.stopping = asyncio.Event()
        self.admin = AdminServer(
            self._admin,
            load_admin_token(cfg.admin_token_file, "origin.admin_token_file"),
            post_paths=frozenset({"/acme/renew"}),
        )
        self.upstream_latency = Histogram(UPSTREAM_BUCKETS)
        self.waf_paths = TopLabels(WAF_PATHS)  # kept across reloads: one bound in all
        self.api: DecisionApi | None = None
        self.publisher: Any = None
        self.quic: Any = None  # origin.h3.QuicShared once HTTP/3 listens
        self._refusal_log = TokenBucket(1.0, 20, time.monotonic())
        self.journal: DecisionJournal | None = None
        self.cert_reloads: dict[str, int] = {}  # swapped | invalid
        self.acme: Any = None  # acme.client.AcmeManager for [origin.acme]
        if cfg.acme is not None and role != "worker":  # one ACME client: the master's
            self.acme = _acme_manager(cfg, self.log.emit, self._acme_installed)
        self.purges = PurgeLog()
        self.operator_peers: IPSet | None = None
        self._build(cfg)

    # ------------------------------------------------------------------ build / reload
    def _build(self, cfg: OriginConfig) -> None:
        # validity is checked for replaced files (reload_certificates), not here: an ACME
        # placeholder that expired while the CA was away must not block a SIGHUP
        certificates = site_certificates(cfg)
        stamps = file_stamps(certificates)  # before loading: a later change is seen
        tls = SiteTls(certificates) if certificates else None
        self.challenges = challenge_dir(cfg)
        # the master inspects only HTTP/3 requests (its own listener); workers the rest
        waf = build_waf(cfg) if self.role != "master" or cfg.quic.listen else None
        # the edges' keys load on a reload too; headers seen stay seen (no replay across it)
        edges = TrustedEdges(cfg, self.edges.replay)
        d = cfg.decisions
        budget = DecisionBudget(d.per_edge_decisions, d.per_edge_decisions_window_s)
        rules = DecisionRules(
            ban_after_blocks=d.ban_after_blocks,
            block_window_s=d.block_window_s,
            ban_duration_s=d.ban_duration_s,
            ipv6_prefix_len=d.ipv6_prefix_len,
            rate_rules=tuple(
                RateRule(
                    r.path_prefix, r.rate_per_s, r.burst, r.ban_duration_s, r.name or r.path_prefix
                )
                for r in d.rate_rules
            ),
        )
        h = cfg.http
        pool = UpstreamPool(
            cfg.upstream,
            max_idle=h.upstream_pool_size,
            connect_timeout_s=h.upstream_connect_timeout_s,
            timeout_s=h.upstream_timeout_s,
            tls=ssl.create_default_context() if cfg.upstream.startswith("https:") else None,
            parser="httptools",  # llhttp: ~9x fewer instructions per exchange than h11
        )
        proxy = ReverseProxy(pool)
        if cfg.blind is not None:
            # The store answers its own paths as the gate's last step: after the WAF, the
            # decision rules and with an access-log line, like any request.
            from blindfold.origin.blindstore import BlindStore, StoreProxy

            proxy = StoreProxy(BlindStore(cfg.blind, self.stats, self._log_event), pool)
        gate = OriginGate(
            proxy,
            waf,
            rules,
            self.ban,
            self._log_event,
            inspect_limit=cfg.waf.body_limit_bytes,
            reject_over_limit=cfg.waf.body_limit_action == "reject",
            detect_only=cfg.waf.mode == "detect",
            stats=self.stats,
            access_log=cfg.access_log,
            remote=self.remote,
        )
        gate.waf_paths = self.waf_paths
        proxy.on_upstream = self._upstream
        # Visitors' requests are bounded per address; an edge's own connections (PROXY LOCAL:
        # its blind pulls, health checks) are not a visitor's and are not counted as one: a
        # visitor's share must not be where one edge's pulls for everyone queue up.
        self.edge_handler = gate
        self.handler = _PerClientRequests(self, gate)
        # HTTP/3 is advertised (Alt-Svc) on the HTTP/1.1 and HTTP/2 responses (origin/h3.py)
        self.alt_svc: Callable[[Handler], Handler] | None = None
        if cfg.quic.listen and cfg.quic.advertise:
            from blindfold.origin.h3 import AltSvc, advertised_port

            max_age_s = cfg.quic.alt_svc_max_age_s
            self.alt_svc = lambda inner: AltSvc(
                inner, lambda: advertised_port(self.cfg, self.quic) or self.quic_port, max_age_s
            )
        self.tls, self.waf, self.rules, self.pool = tls, waf, rules, pool
        self.cert_stamps = self.cert_seen = stamps
        self.edges, self.budget = edges, budget
        self.limits = cfg.http.limits()
        # a connection over its address's share: short deadlines, one HTTP/2 stream
        self.over_limits = dataclasses.replace(
            self.limits,
            header_timeout_s=min(self.limits.header_timeout_s, 2.0),
            keepalive_timeout_s=min(self.limits.keepalive_timeout_s, 1.0),
            h2_max_streams_per_connection=1,
        )
        self.cfg = cfg
        # on a reload the new limits apply to the next connections
        self.site_slots.limit = cfg.max_connections
        self.api_slots.limit = cfg.decisions.max_connections

    @property
    def trusted(self) -> IPSet:
        """Every address whose PROXY header (or QUIC announcement) may name a visitor."""
        return self.edges.trusted

    def _log_event(self, event: str, **fields: Any) -> None:
        target = self.audit if fields.pop("audit", False) else self.log
        target.log(event, **fields)

    def count(self, key: str) -> None:
        self.stats[key] = self.stats.get(key, 0) + 1

    def _upstream(self, result: str, seconds: float) -> None:
        if result == "ok":
            self.upstream_latency.observe(seconds)
        else:
            self.count(f"upstream_errors:{result}")

    def event(self, name: str, fields: dict[str, Any]) -> None:
        self.count(f"http:{name}")
        if name in ("h2_abuse", "bad_request", "handler_error", "send_timeout") or name.startswith(
            ("quic_", "h3_")
        ):
            self.log.log(name, **fields)

    def _events(self, claim: _Claim) -> Callable[[str, dict[str, Any]], None]:
        """A connection's event sink: its close releases its claim."""

        def on_event(name: str, fields: dict[str, Any]) -> None:
            if name == "closed":
                claim.release()
            else:
                self.event(name, fields)

        return on_event

    def ban(
        self, ip: str, duration_s: float, reason: str, reporter: Reporter | None = None
    ) -> None:
        """`ip`: an address, or the IPv6 prefix the decision rules chose (`ban_target`).
        `reporter`: the trusted edge whose PROXY claim named the visitor; the decisions its
        claims cause are bounded per window (atk-trust #4: a compromised edge could have any
        address banned everywhere, again and again, without a trace)."""
        now = time.time()
        edge = edge_fields(reporter)
        if reporter is not None and not self.budget.allow(reporter, time.monotonic()):
            self._refused_decision("edge_budget", ip, reason, edge)
            return
        try:
            decision = self.store.add(
                scope_of(ip),
                ip,
                duration_s,
                reason,
                now,
                edge=reporter.name if reporter else "",
                edge_address=reporter.address if reporter else "",
            )
        except ProtocolError as exc:
            self._refused_decision(exc.reason, ip, reason, edge)
            return
        cause = reason.split(":", 1)[0]
        self.stats[f"decisions:{cause}"] = self.stats.get(f"decisions:{cause}", 0) + 1
        self.log.emit(
            "decision",
            id=decision.id,
            scope=decision.scope,
            value=decision.value,
            type=decision.type,
            duration_s=duration_s,
            reason=reason,
            **edge,
        )
        if self.publisher is not None:
            self.publisher.publish(decision, now)

    # ------------------------------------------------------------------ operator actions
    def _operator_peer(self, peer: str) -> bool:
        """An address allowed to reach the operator API (origin.decisions.operator_addresses)."""
        if self.operator_peers is None:
            return False
        try:
            version, addr = parse_address(peer)
        except ProtocolError:
            return False
        return self.operator_peers.contains(addr, version)

    def operator_list(self, now: float) -> list[Decision]:
        return self.store.active(now)  # (expiry stays the housekeeping's, with its log line)

    def operator_add(
        self, scope: str, value: str, duration_s: float, reason: str, operator: str
    ) -> Decision:
        """A ban by an operator: the store (journal, stream) and Redis, as the origin's own."""
        now = time.time()
        decision = self.store.add(
            scope, value, duration_s, reason, now, origin=f"operator:{operator}"
        )
        self.count("decisions:operator")
        if self.publisher is not None:
            self.publisher.publish(decision, now)
        return decision

    def operator_delete(self, scope: str, value: str, operator: str) -> Decision | None:
        """The end of a ban now: a deletion in the stream, a signed lift on Redis."""
        now = time.time()
        gone = self.store.remove(scope, value)
        if gone is not None and self.publisher is not None:
            self.publisher.publish_lift(gone, now, operator)
        return gone

    def operator_purge(self, purge: Purge) -> None:
        """To every edge: the stream's purge log and a signed message on Redis."""
        self.purges.add(purge)
        self.count("purges")
        if self.publisher is not None:
            self.publisher.publish_purge(purge)

    def _refused_decision(self, why: str, ip: str, reason: str, edge: dict[str, Any]) -> None:
        self.count(f"decisions_refused:{why}")
        if self._refusal_log.allow(time.monotonic()):
            self.log.emit("decision_refused", value=ip, reason=why, cause=reason, **edge)

    # ------------------------------------------------------------------ serving
    def _loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """asyncio's own servers (the admin listener) report EMFILE at accept with a traceback,
        then pause a second by themselves: log it as one line like our listeners do."""
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in RESOURCE_ERRNOS:
            self.log.emit("accept_paused", listener="admin", error=str(exc), limit=fd_limit())
            return
        loop.default_exception_handler(context)

    async def start(self) -> dict[str, Any]:
        """Listen, load the WAF, start the decision stream (io.service.Service)."""
        cfg = self.cfg
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(self._loop_exception)
        if self.role == "worker":
            return self._start_worker()
        if cfg.decisions.journal:  # before anything can ban or follow the stream
            self.journal = DecisionJournal(cfg.decisions.journal, self.log)
            restored, problems = self.journal.open(self.store, time.time())
            self.log.emit("decisions_restored", decisions=restored, problems=problems[:10])
        if self.role == "single":
            for i, address in enumerate(cfg.listen):
                self._listen(address, True, f"origin.listen[{i}]")
            for i, address in enumerate(cfg.http_listen):
                self._listen(address, False, f"origin.http_listen[{i}]")
        # renewed files: each process that serves the site's TLS (and the master, whose
        # metrics show the expiry) polls them itself
        self.servers.append(loop.create_task(self._watch_certificates()))
        if cfg.quic.listen:  # HTTP/3: its own listeners and admission (origin/h3.py)
            from blindfold.origin.h3 import start_quic

            self.quic = await start_quic(self)
        host, port = parse_hostport(cfg.admin_listen)
        try:
            admin = await self.admin.start(host, port)
        except OSError as exc:
            raise ConfigError("origin.admin_listen", f"cannot listen: {exc.strerror}") from None
        d = cfg.decisions
        api_address = None
        if d.listen:
            keys = load_api_keys(d.api_keys_file)
            self.api = DecisionApi(self.store, keys, full_per_minute=d.full_answers_per_minute)
            self.api.purges = self.purges
            if d.operator_keys_file:
                operator_keys = load_operator_keys(d.operator_keys_file, d.api_keys_file, keys)
                self.api.operator = OperatorApi(operator_keys, keys, self, self.log)
                self.operator_peers = IPSet(
                    ipaddress.ip_network(a, strict=False) for a in d.operator_addresses
                )
            api_tls = decisions_tls(cfg)
            host, port = parse_hostport(d.listen)
            sock = self._bind(host, port, "origin.decisions.listen")
            api_address = sock.getsockname()[:2]
            self.sockets.append(sock)
            self.servers.append(loop.create_task(self._accept_loop(sock, "decisions", api_tls)))
        if d.redis_url:
            from blindfold.decisions.redis_bus import RedisPublisher
            from blindfold.decisions.signed import DecisionSigner, load_private_key

            signer = DecisionSigner(load_private_key(d.signing_key, "origin.decisions.signing_key"))
            self.publisher = RedisPublisher(d.redis_url, d.redis_ca, signer, self.log, self.store)
            await self.publisher.start()
        self.servers.append(loop.create_task(self._housekeeping()))
        if self.acme is not None:
            self.servers.append(loop.create_task(self._run_acme()))
        for problem in listen_warnings(cfg):
            self.log.emit("config_warning", problem=problem)
        self._check_fd_limit()
        return {
            "listen": [_addr(s) for s, tls in self.tls_sockets.items() if tls],
            "http_listen": [_addr(s) for s, tls in self.tls_sockets.items() if not tls],
            "quic_listen": self.quic.ports() if self.quic else [],
            "admin": f"{admin[0]}:{admin[1]}",
            "decisions": f"{api_address[0]}:{api_address[1]}" if api_address else None,
            "waf": getattr(self.waf, "version", None),
        }

    def _check_fd_limit(self) -> None:
        """Where the site's connections are served (not in a master)."""
        if self.role == "master":
            return
        limit = fd_limit()
        needed = fds_needed(self.cfg)
        if needed > limit:
            self.log.emit(
                "fd_limit_low",
                limit=limit,
                needed=needed,
                problem="max_connections cannot all be open: each takes a descriptor for "
                "the client and one for the application; raise `ulimit -n` or lower "
                "max_connections",
            )

    def _start_worker(self) -> dict[str, Any]:
        """A worker: accept on the listening sockets the master passed; no admin, decision
        stream, journal, Redis or HTTP/3 (the master's)."""
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(self._loop_exception)
        for _address, tls, fd in self.inherited:
            sock = socket.socket(fileno=fd)
            sock.setblocking(False)
            self.sockets.append(sock)
            self.tls_sockets[sock] = tls
            kind = "tls" if tls else "http"
            self.servers.append(loop.create_task(self._accept_loop(sock, kind)))
        self.servers.append(loop.create_task(self._housekeeping()))
        self.servers.append(loop.create_task(self._watch_certificates()))
        self._check_fd_limit()
        return {
            "listen": [_addr(s) for s, tls in self.tls_sockets.items() if tls],
            "http_listen": [_addr(s) for s, tls in self.tls_sockets.items() if not tls],
            "waf": getattr(self.waf, "version", None),
        }

    def _bind(self, host: str, port: int, key: str) -> socket.socket:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            raise ConfigError(key, f"cannot listen on {host}:{port}: {exc.strerror}") from None
        sock.listen(1024)
        sock.setblocking(False)
        return sock

    def _listen(self, address: str, tls: bool, key: str) -> None:
        host, port = parse_hostport(address)
        sock = self._bind(host, port, key)
        self.sockets.append(sock)
        self.tls_sockets[sock] = tls
        kind = "tls" if tls else "http"
        self.servers.append(asyncio.get_running_loop().create_task(self._accept_loop(sock, kind)))

    async def _accept_loop(
        self, lsock: socket.socket, kind: str, api_tls: SiteTls | None = None
    ) -> None:
        """Accept until stopped. Nothing ends this loop: a connection's failure stays in its
        task, and running out of descriptors pauses accepting (doubling up to 1 s) after the
        reserve descriptor has accepted and closed one waiting connection."""
        loop = asyncio.get_running_loop()
        backoff = Backoff()
        prefix = "decisions_" if kind == "decisions" else ""
        while not self.stopping.is_set():
            try:
                sock, peer = await loop.sock_accept(lsock)
            except OSError as exc:
                if exc.errno in _ONE_CONNECTION_ERRNOS:
                    continue  # that one connection went wrong, not the listener
                if exc.errno in RESOURCE_ERRNOS:
                    shed = self.reserve.shed_one(lsock)
                    self._count_conn(f"{prefix}refused_fd_limit" if shed else f"{prefix}fd_limit")
                delay = backoff.failed()
                if delay == BACKOFF_MIN_S:  # once per episode
                    self.log.emit(
                        "accept_paused", listener=_addr(lsock), error=str(exc), limit=fd_limit()
                    )
                await asyncio.sleep(delay)
                continue
            backoff.succeeded()
            try:
                if kind == "decisions":
                    assert api_tls is not None
                    self._accepted_api(sock, peer, lsock, api_tls)
                else:
                    self._accepted(sock, peer, lsock, kind == "tls")
            except Exception as exc:  # never the accept loop's end
                sock.close()
                self.log.emit("accept_error", error=repr(exc))

    def _accepted(
        self, sock: socket.socket, peer: tuple[str, int], lsock: socket.socket, tls: bool
    ) -> None:
        if not self.site_slots.take():
            self._count_conn("refused_max_connections")
            sock.close()
            return
        claim = _Claim(self.site_slots, self.client_conns)
        sock.setblocking(False)
        # asyncio sets TCP_NODELAY only for sockets it knows are TCP (proto 6); ours come
        # from accept() with proto 0, and Nagle would hold every small response ~40 ms
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        local = lsock.getsockname()
        task = asyncio.get_running_loop().create_task(
            self._connection(sock, (peer[0], peer[1]), (local[0], local[1]), tls, claim)
        )
        task.add_done_callback(_consume)

    def _count_conn(self, result: str) -> None:
        self.count(f"conn:{result}")

    async def _connection(
        self,
        sock: socket.socket,
        peer: tuple[str, int],
        local: tuple[str, int],
        tls: bool,
        claim: _Claim,
    ) -> None:
        cfg = self.cfg
        loop = asyncio.get_running_loop()
        handed_over = False
        try:
            client: tuple[str, int] | None = peer
            is_visitor = True
            reporter: Reporter | None = None
            edge_http = False
            if tls and cfg.proxy_protocol != "off":
                resolved = await self._proxy(sock, peer)
                if resolved is None:
                    return
                client, is_visitor, reporter, edge_http = resolved
            assert client is not None
            gate = self.handler if is_visitor else self.edge_handler
            handler: Handler = gate if reporter is None else _ViaEdge(gate, reporter)
            if self.alt_svc is not None:
                handler = self.alt_svc(handler)
            limits = self.limits
            if is_visitor:
                # issue 15 finding 2: one visitor must not hold the origin's capacity
                before = claim.count_client(visitor_key(client[0]))
                share = cfg.per_client_connections
                if before >= 2 * share:
                    self._refuse("per_client_connections", client[0])
                    return
                if before >= share:
                    self._count_conn("over_per_client_connections")
                    handler, limits = _too_many_connections, self.over_limits
            if tls:
                # every TLS hello is looked at: one offering acme-tls/1 is answered as an
                # ACME challenge or closed, never served HTTP (a keyless edge relays such
                # hellos at layer 4, past its HTTP guards: attack review certs #5)
                hello = await peek_hello(sock, cfg.http.tls_handshake_timeout_s)
                if wants_challenge(hello):  # RFC 8737: ACME's tls-alpn-01 validation
                    assert hello is not None
                    ctx = (
                        self.challenges.context(hello.sni) if self.challenges is not None else None
                    )
                    if ctx is None:
                        self._count_conn("acme_no_challenge")
                        return
                    await answer_challenge(sock, ctx, cfg.http.tls_handshake_timeout_s)
                    self._count_conn("acme_challenge")
                    self.log.emit("acme_challenge_answered", sni=hello.sni, client=client[0])
                    handed_over = True
                    claim.release()
                    return
            info = ConnInfo(client, local, b"https" if tls else b"http", {}, edge_http)
            on_event = self._events(claim)
            if tls:
                assert self.tls is not None
                await loop.connect_accepted_socket(
                    _AlpnDispatch(info, handler, self.tls, limits, on_event),
                    sock,
                    ssl=self.tls.default,
                    ssl_handshake_timeout=cfg.http.tls_handshake_timeout_s,
                )
            else:
                await loop.connect_accepted_socket(
                    lambda: H1Connection(handler, limits, info, on_event), sock
                )
            handed_over = True
            self._count_conn("ok")
        except (ssl.SSLError, OSError, TimeoutError, ConnectionError) as exc:
            self._count_conn("tls_failed" if isinstance(exc, ssl.SSLError) else "io_error")
        finally:
            if not handed_over:
                claim.release()
                sock.close()

    async def _proxy(
        self, sock: socket.socket, peer: tuple[str, int]
    ) -> tuple[tuple[str, int], bool, Reporter | None, bool] | None:
        """Apply the PROXY policy: (client address, whether it is a visitor's, the trusted
        edge that named it, whether that edge speaks HTTP itself on this connection: its
        request ids are kept), or None when refused. An edge's own connection (PROXY LOCAL) is
        not a visitor's. An edge with a key ([[origin.edges]]) must prove each header is its
        own, made for this connection (atk-trust #10: a header rewritten on the path)."""
        cfg = self.cfg
        edges = self.edges
        trusted = edges.is_trusted(peer[0])
        try:
            if cfg.proxy_protocol == "required":
                if not trusted:
                    self._refuse("untrusted_peer", peer[0])
                    return None
                header = await read_proxy_header(sock, cfg.proxy_header_timeout_s)
            else:  # optional: a header only from trusted edges, direct connections otherwise
                first = await peek(sock, 1, cfg.proxy_header_timeout_s)
                looks_proxy = first[:1] in (V2_SIGNATURE[:1], V1_PREFIX[:1])
                if not looks_proxy:
                    if trusted and edges.must_authenticate(peer[0]):
                        # stripping the header would make the edge itself the visitor
                        self._refuse("proxy_auth_missing", peer[0])
                        return None
                    return peer, True, None, False
                if not trusted:
                    self._refuse("untrusted_proxy_header", peer[0])
                    return None
                header = await read_proxy_header(sock, cfg.proxy_header_timeout_s)
        except ProtocolError as exc:
            self._refuse(exc.reason, peer[0])
            return None
        except TimeoutError:
            self._refuse("proxy_header_timeout", peer[0])
            return None
        try:
            own = sock.getsockname()  # the address this connection reached (not the listener's)
            reporter = edges.admit(header, peer, (own[0], own[1]), time.time())
        except ProtocolError as exc:
            self._refuse(exc.reason, peer[0])
            return None
        except OSError:
            return None
        edge_http = header.tlv(PP2_TYPE_BLINDFOLD_HTTP) == BLINDFOLD_HTTP_MARK
        if header.src is None:
            return peer, False, reporter, edge_http  # LOCAL: the edge's own check or pull
        return header.src, True, reporter, edge_http

    def _refuse(self, reason: str, peer: str) -> None:
        self._count_conn(f"refused_{reason}")
        self.log.log("conn_refused", client=peer, reason=reason)

    def _accepted_api(
        self, sock: socket.socket, peer: tuple[str, int], lsock: socket.socket, tls: SiteTls
    ) -> None:
        """A connection to the decision stream: from a trusted edge only, checked before TLS
        (no handshake, so no certificate, for anyone else), within its own limit and its
        address's share of it (atk-trust #5: one trusted address held every slot with bare
        TCP connections, and edges that (re)started could not get in)."""
        if not self.edges.is_trusted(peer[0]) and not self._operator_peer(peer[0]):
            self._count_conn("decisions_refused_untrusted_peer")
            sock.close()
            return
        if not self.api_slots.take():
            self._count_conn("decisions_refused_max_connections")
            sock.close()
            return
        claim = _Claim(self.api_slots, self.api_peer_conns)
        if claim.count_client(visitor_key(peer[0])) >= self.cfg.decisions.per_edge_connections:
            claim.release()
            self._count_conn("decisions_refused_per_edge_connections")
            sock.close()
            return
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        info = ConnInfo((peer[0], peer[1]), lsock.getsockname()[:2], b"https", {})
        assert self.api is not None
        task = asyncio.get_running_loop().create_task(self._api_connection(sock, info, tls, claim))
        task.add_done_callback(_consume)

    async def _api_connection(
        self, sock: socket.socket, info: ConnInfo, tls: SiteTls, claim: _Claim
    ) -> None:
        """TLS, then HTTP: the handshake and a first request with a valid API key must both
        be done within `request_timeout_s` of the accept, or the connection is closed."""
        assert self.api is not None
        loop = asyncio.get_running_loop()
        deadline_s = self.cfg.decisions.request_timeout_s
        ends = loop.time() + deadline_s
        handler = _ApiDeadline(self.api, lambda: self._count_conn("decisions_request_timeout"))
        handed_over = False
        try:
            transport, _ = await loop.connect_accepted_socket(
                _AlpnDispatch(info, handler, tls, self.limits, self._events(claim)),
                sock,
                ssl=tls.default,
                ssl_handshake_timeout=min(self.cfg.http.tls_handshake_timeout_s, deadline_s),
            )
            handed_over = True
            self._count_conn("decisions_ok")
            handler.arm(loop, max(0.0, ends - loop.time()), transport)
        except (ssl.SSLError, OSError, TimeoutError, ConnectionError) as exc:
            failed = "tls_failed" if isinstance(exc, ssl.SSLError) else "io_error"
            self._count_conn(f"decisions_{failed}")
        finally:
            if not handed_over:
                claim.release()
                sock.close()

    async def _housekeeping(self) -> None:
        while not self.stopping.is_set():
            await asyncio.sleep(1.0)
            now = time.time()
            for gone in self.store.expire(now):
                self.log.log("decision_expired", id=gone.id, value=gone.value)
            self.rules.sweep(now)
            self.edges.replay.sweep(now)
            if self.journal is not None:
                self.journal.tick(self.store)
            self.log.flush()
            if self.audit is not self.log:
                self.audit.flush()

    # ------------------------------------------------------------------ renewed files
    async def _watch_certificates(self) -> None:
        """Poll the certificates' files; swap in a replaced set that loads and is valid."""
        while True:
            interval = self.cfg.certificate_reload_interval_s
            await asyncio.sleep(interval if interval > 0 else 5.0)
            if interval > 0:
                try:
                    self._poll_certificates()
                except Exception as exc:  # never the watcher's end
                    self.log.emit("certificate_reload_error", error=repr(exc))

    def _poll_certificates(self) -> None:
        certificates = site_certificates(self.cfg)  # the configured ones and ACME's
        stamps = file_stamps(certificates)
        if not certificates or stamps == self.cert_stamps:
            return
        if stamps != self.cert_seen:
            # changed since the last poll: load once it has settled (an ACME client renames
            # the key and the certificate one after the other)
            self.cert_seen = stamps
            return
        changed = {
            i
            for i in range(len(certificates))
            if stamps[2 * i : 2 * i + 2] != self.cert_stamps[2 * i : 2 * i + 2]
        }
        self.cert_stamps = stamps  # tried once per change: a broken file is not retried
        try:
            # the replaced ones must be valid now; the others are as they were
            tls = SiteTls(
                certificates,
                now=time.time(),
                check=changed,
                previous=self.tls.names if self.tls is not None else (),
            )
        except ConfigError as exc:
            self.cert_reloads["invalid"] = self.cert_reloads.get("invalid", 0) + 1
            self.log.emit(
                "certificate_reload_failed",
                error=str(exc),
                detail="the certificates in service stay",
            )
            return
        self.tls = tls  # new connections; open ones keep their context
        self.cert_reloads["swapped"] = self.cert_reloads.get("swapped", 0) + 1
        self.log.emit("certificates_reloaded", expiry=[e for _, e in tls.expiry])

    # ------------------------------------------------------------------ admin
    async def _admin(self, method: str, path: str) -> tuple[int, str, bytes]:
        if path == "/healthz":
            return 200, "application/json", b'{"status":"ok"}\n'
        if path == "/metrics":
            workers = await self.collect() if self.collect is not None else []
            return (
                200,
                "text/plain; version=0.0.4",
                render(self.snapshot(workers), self._metric_specs()).encode(),
            )
        if path == "/acme/renew" and self.acme is not None:
            if method != "POST":
                return 405, "text/plain", b"POST renews every ACME certificate now\n"
            if not self.acme.force():
                return 429, "text/plain", b"a forced renewal is already under way\n"
            return 202, "application/json", b'{"status":"renewing"}\n'
        if path == "/":
            return 200, HTML_TYPE, PAGE
        if path == "/status.json":  # the same sum as /metrics (a master asks its workers)
            workers = await self.collect() if self.collect is not None else []
            body = status_json(
                "origin", socket.gethostname(), self.snapshot(workers), self._metric_specs()
            )
            return 200, JSON_TYPE, body
        return 404, "text/plain", b"not found\n"

    # ------------------------------------------------------------------ ACME
    def _acme_installed(self, order: Any) -> None:
        """A renewed chain is on disk (checked against its key): new connections get it,
        open ones keep the certificate they were made with. The master's workers serve the
        site's TCP listeners: `on_certificates` (the master's) tells them to re-read it."""
        self.reload_certificates()
        if self.on_certificates is not None:
            self.on_certificates()

    def reload_certificates(self) -> None:
        """Re-read the site's certificate files (a worker, told by its master after a
        renewal); a pair that does not load keeps the one in service."""
        try:
            certificates = site_certificates(self.cfg)
            stamps = file_stamps(certificates)
            self.tls = SiteTls(certificates)
            self.cert_stamps = self.cert_seen = stamps  # not loaded again by the file poll
        except ConfigError as exc:
            self.log.emit("certificate_reload_failed", error=str(exc))

    async def _run_acme(self) -> None:
        try:
            await self.acme.run()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug here must not end the agent: log it, TLS goes on
            self.log.emit("acme_stopped", error=f"{type(exc).__name__}: {exc}"[:300])

    def _metric_specs(self) -> list[MetricSpec]:
        specs = ORIGIN_METRICS
        if self.acme is not None:
            from blindfold.acme.client import METRICS as ACME_METRICS

            specs = specs + list(ACME_METRICS)
        if self.quic is None:
            return specs
        from blindfold.origin.h3 import QUIC_METRICS

        return specs + QUIC_METRICS

    def worker_stats(self) -> dict[str, Any]:
        """A worker's counters, for the master's sum: `stats`, the gauges, the histogram."""
        return {
            "stats": self.stats,
            "site_open": self.site_slots.open,
            "upstream": self.upstream_latency.value(),
        }

    def snapshot(self, workers: list[dict[str, Any]] | None = None) -> dict[str, list[list[Any]]]:
        """`workers`: their `worker_stats`, added to this process's own."""
        s = self.stats
        site_open = self.site_slots.open
        upstream = self.upstream_latency.value()
        if workers:
            s = dict(s)
            for w in workers:
                for k, v in w.get("stats", {}).items():
                    s[k] = s.get(k, 0) + v
                site_open += int(w.get("site_open", 0))
                theirs = w.get("upstream") or []
                if len(theirs) == len(upstream):
                    upstream = [a + float(b) for a, b in zip(upstream, theirs, strict=True)]
        snap = self._snapshot(s, site_open, upstream)
        if self.acme is not None:
            snap.update(self.acme.snapshot())
        if self.quic is not None:
            snap.update(self.quic.snapshot())
        return snap

    def _snapshot(
        self, s: dict[str, Any], site_open: int, upstream: list[float]
    ) -> dict[str, list[list[Any]]]:

        def pick(prefix: str) -> list[list[Any]]:
            return [[[k[len(prefix) :]], v] for k, v in s.items() if k.startswith(prefix)]

        now = time.time()
        certs = self.tls.expiry if self.tls is not None else []
        operator: Any = self.api.operator if self.api is not None else None
        return {
            "blindfold_certificate_expiry_seconds": [
                [["origin", host, f"certificates[{i}]"], end - now]
                for i, (host, end) in enumerate(certs)
            ],
            "blindfold_certificate_reloads_total": [
                [["origin", "certificates", r], n] for r, n in self.cert_reloads.items()
            ],
            "blindfold_origin_requests_total": pick("requests:"),
            "blindfold_origin_connections_total": pick("conn:"),
            "blindfold_origin_connections_active": [[[], site_open]],
            "blindfold_origin_decisions_connections_active": [[[], self.api_slots.open]],
            "blindfold_waf_blocks_total": [[[], s.get("waf_blocks", 0)]],
            "blindfold_waf_rule_blocks_total": pick("waf_rule:"),
            "blindfold_waf_path_blocks_total": pick("waf_path:"),
            "blindfold_origin_upstream_errors_total": pick("upstream_errors:"),
            "blindfold_origin_upstream_seconds": [[[], upstream]],
            "blindfold_decisions_active": [[[], len(self.store.decisions)]],
            "blindfold_decisions_created_total": pick("decisions:"),
            "blindfold_origin_decisions_refused_total": pick("decisions_refused:"),
            "blindfold_origin_decisions_full_builds_total": [
                [[], self.api.full_builds if self.api else 0]
            ],
            "blindfold_decision_stream_requests_total": [
                [[k], v] for k, v in (self.api.requests.items() if self.api else [])
            ],
            "blindfold_origin_operator_requests_total": [
                [[k], v] for k, v in (operator.requests.items() if operator is not None else [])
            ],
            "blindfold_http_events_total": pick("http:"),
            "blindfold_origin_blind_bytes_total": pick("blind_bytes:"),
            "blindfold_origin_blind_requests_total": pick("blind_requests:"),
            "blindfold_origin_config_reloads_total": pick("config_reloads:"),
        }

    # ------------------------------------------------------------------ lifecycle
    def _operator_keys(self, cfg: OriginConfig) -> tuple[dict[str, bytes], IPSet | None] | None:
        """SIGHUP: the operator keys and operator_addresses as the file now says (a removed
        key is refused from now on: attack review G); None: no decisions API runs."""
        d = cfg.decisions
        if self.api is None or not d.listen:
            return None
        if not d.operator_keys_file:
            return {}, None
        keys = load_operator_keys(d.operator_keys_file, d.api_keys_file, self.api.keys)
        peers = IPSet(ipaddress.ip_network(a, strict=False) for a in d.operator_addresses)
        return keys, peers

    def reload(self) -> None:
        """SIGHUP: the new config applies to the next connections."""
        try:
            config, _ = load_file(self.path)
            if config.origin is None:
                raise ConfigError("origin", "the config has no [origin] section")
            old = self.cfg
            operator = self._operator_keys(config.origin)  # read before anything changes
            self._build(config.origin)
            if operator is not None and self.api is not None:
                keys, peers = operator
                self.api.operator = (
                    OperatorApi(keys, self.api.keys, self, self.log) if keys else None
                )
                self.operator_peers = peers
        except ConfigError as exc:
            self.count("config_reloads:invalid")
            self.log.emit("reload_failed", error=str(exc))
            return
        self.count("config_reloads:ok")
        self.log.emit("reloaded", changed=changes(old, config.origin))

    def stop(self) -> None:
        self.stopping.set()

    async def serve(self) -> int:
        await self.stopping.wait()
        for sock in self.sockets:
            sock.close()
        if self.quic is not None:
            self.quic.close()
        for task in self.servers:
            task.cancel()
        deadline = time.monotonic() + 10
        while self.site_slots.open + self.api_slots.open > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.publisher is not None:
            await self.publisher.close()
        if self.journal is not None:
            await self.journal.close()
        await self.admin.close()
        self.log.emit("origin_stopped")
        if self.audit is not self.log:
            self.audit.flush()  # the last second's WAF lines (the tick flushes it otherwise)
        return 0


def _acme_manager(
    cfg: OriginConfig, log: Callable[..., None], installed: Callable[[Any], None]
) -> Any:
    """[origin.acme]: placeholders and the account key before the site's TLS loads."""
    from blindfold.acme.client import AcmeManager
    from blindfold.errors import VerificationError

    assert cfg.acme is not None
    manager = AcmeManager(cfg.acme, log, installed)
    try:
        manager.prepare()
    except (OSError, ValueError, VerificationError) as exc:
        raise ConfigError("origin.acme", f"cannot prepare the key files: {exc}") from None
    return manager


def _addr(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _consume(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()  # retrieved: a failed connection never reaches the accept loop


def run_origin(path: str) -> int:
    """The whole origin in one process (no workers; `blindfold origin` runs
    origin.master.run_origin_master). Returns the exit code (2 for configuration errors)."""

    def make(config: Config, _text: str, path: str, log: JsonLog) -> OriginAgent:
        assert config.origin is not None
        compat.install_ssl_alerts()  # a failed handshake answers with OpenSSL's alert
        return OriginAgent(path, config.origin, log)

    return run_service("origin", path, "origin", "origin", make)
