"""`blindfold origin`: the agent beside the site's application.

Edges connect with a PROXY header (believed only from `trusted_edges`), TLS ends here with the
site's own certificates, HTTP/1.1 and HTTP/2 requests pass the WAF and go to the application
over pooled keep-alive connections. WAF blocks and per-path rate rules become decisions, served
to every edge as a CrowdSec-shaped stream (and published to Redis when configured).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import ssl
import sys
import time
from typing import Any

from blindfold.config import load_file
from blindfold.config.common import parse_hostport
from blindfold.config.origin import OriginConfig
from blindfold.core.iplist import IPSet, parse_address, parse_list
from blindfold.core.proxyproto import V1_PREFIX, V2_SIGNATURE
from blindfold.decisions.api import DecisionApi, load_api_keys
from blindfold.decisions.core import DecisionRules, DecisionStore, RateRule
from blindfold.errors import ConfigError, ProtocolError
from blindfold.io.accepted import peek, read_proxy_header
from blindfold.io.admin_http import AdminServer
from blindfold.io.limits import raise_fd_limit
from blindfold.obs.log import JsonLog
from blindfold.obs.metrics import MetricSpec, render
from blindfold.origin.gate import OriginGate
from blindfold.origin.tls import SiteTls
from blindfold.waf.engine import CrsSettings, Exclusion, ModSecurityEngine, WafEngine
from blindfold.waf.modsecurity import ModSecurityError
from blindfold.web.client import UpstreamPool
from blindfold.web.http1 import ConnInfo, H1Connection
from blindfold.web.http2 import H2Connection
from blindfold.web.limits import HttpLimits
from blindfold.web.messages import Handler
from blindfold.web.proxy import ReverseProxy

ORIGIN_METRICS = [
    MetricSpec(
        "blindfold_origin_requests_total", "counter", "Requests by status class.", ("status",)
    ),
    MetricSpec(
        "blindfold_origin_connections_total",
        "counter",
        "Client connections by result.",
        ("result",),
    ),
    MetricSpec("blindfold_origin_connections_active", "gauge", "Open client connections."),
    MetricSpec("blindfold_waf_blocks_total", "counter", "Requests the WAF blocked."),
    MetricSpec(
        "blindfold_waf_rule_blocks_total",
        "counter",
        "Blocked requests by the rule ids in the blocking verdict.",
        ("rule",),
    ),
    MetricSpec("blindfold_decisions_active", "gauge", "Active decisions (bans)."),
    MetricSpec(
        "blindfold_decisions_created_total", "counter", "Decisions created, by cause.", ("cause",)
    ),
    MetricSpec(
        "blindfold_decision_stream_requests_total",
        "counter",
        "Decision stream requests by edge (or 'unauthorized').",
        ("bouncer",),
    ),
    MetricSpec(
        "blindfold_http_events_total",
        "counter",
        "HTTP-layer events: timeouts, bad requests, HTTP/2 abuse.",
        ("event",),
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


def _limits(cfg: OriginConfig) -> HttpLimits:
    h = cfg.http
    return HttpLimits(
        max_header_bytes=h.max_header_bytes,
        max_headers=h.max_headers,
        max_body_bytes=h.max_body_bytes,
        header_timeout_s=h.header_timeout_s,
        body_timeout_s=h.body_timeout_s,
        keepalive_timeout_s=h.keepalive_timeout_s,
        send_timeout_s=h.send_timeout_s,
        h2_max_concurrent_streams=h.h2_max_concurrent_streams,
        h2_max_header_list_size=h.max_header_bytes,
        h2_max_resets_per_window=h.h2_max_resets_per_window,
        h2_max_control_frames_per_window=h.h2_max_control_frames_per_window,
    )


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
        exclusions=tuple(Exclusion(e.path_prefix, e.rule_ids) for e in w.exclusions),
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

    def __init__(self, agent: OriginAgent, info: ConnInfo, handler: Handler, tls: SiteTls) -> None:
        self.agent = agent
        self.info = info
        self.handler = handler
        self.tls = tls

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
            proto = H2Connection(self.handler, self.agent.limits, info, self.agent.event)
        else:
            proto = H1Connection(self.handler, self.agent.limits, info, self.agent.event)
        transport.set_protocol(proto)
        proto.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.agent.event("closed", {})

    def data_received(self, data: bytes) -> None:  # not reached: the protocol is swapped
        pass

    def eof_received(self) -> None:
        pass


class OriginAgent:
    def __init__(self, path: str, cfg: OriginConfig) -> None:
        self.path = path
        self.cfg = cfg
        self.log = JsonLog.open(cfg.log_path, process="origin")
        self.audit = (
            JsonLog.open(cfg.waf.audit_log, process="origin") if (cfg.waf.audit_log) else self.log
        )
        self.limits = _limits(cfg)
        self.stats: dict[str, Any] = {}
        self.open = 0
        self.trusted = IPSet(parse_list("\n".join(cfg.trusted_edges))[0])
        self.store = DecisionStore()
        self.tls: SiteTls | None = None
        self.servers: list[asyncio.Task[None]] = []
        self.sockets: list[socket.socket] = []
        self.tls_sockets: dict[socket.socket, bool] = {}
        self.stopping = asyncio.Event()
        self.admin = AdminServer(self._admin)
        self.api: DecisionApi | None = None
        self.publisher: Any = None
        self._build(cfg)

    # ------------------------------------------------------------------ build / reload
    def _build(self, cfg: OriginConfig) -> None:
        tls = SiteTls(cfg.certificates) if cfg.certificates else None
        waf = build_waf(cfg)
        d = cfg.decisions
        rules = DecisionRules(
            ban_after_blocks=d.ban_after_blocks,
            block_window_s=d.block_window_s,
            ban_duration_s=d.ban_duration_s,
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
        )
        handler: Handler = gate
        self.tls, self.waf, self.rules, self.pool, self.handler = tls, waf, rules, pool, handler
        self.cfg = cfg

    def _log_event(self, event: str, **fields: Any) -> None:
        target = self.audit if fields.pop("audit", False) else self.log
        target.log(event, **fields)

    def event(self, name: str, fields: dict[str, Any]) -> None:
        if name == "closed":
            self.open -= 1
            return
        key = f"http:{name}"
        self.stats[key] = self.stats.get(key, 0) + 1
        if name in ("h2_abuse", "bad_request", "handler_error", "send_timeout"):
            self.log.log(name, **fields)

    def ban(self, ip: str, duration_s: float, reason: str) -> None:
        now = time.time()
        try:
            decision = self.store.add("ip", ip, duration_s, reason, now)
        except ProtocolError as exc:
            self.log.emit("decision_refused", value=ip, error=str(exc))
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
        )
        if self.publisher is not None:
            self.publisher.publish(decision, now)

    # ------------------------------------------------------------------ serving
    async def start(self) -> None:
        cfg = self.cfg
        loop = asyncio.get_running_loop()
        for i, address in enumerate(cfg.listen):
            self._listen(address, True, f"origin.listen[{i}]")
        for i, address in enumerate(cfg.http_listen):
            self._listen(address, False, f"origin.http_listen[{i}]")
        host, port = parse_hostport(cfg.admin_listen)
        try:
            admin = await self.admin.start(host, port)
        except OSError as exc:
            raise ConfigError("origin.admin_listen", f"cannot listen: {exc.strerror}") from None
        d = cfg.decisions
        api_address = None
        if d.listen:
            keys = load_api_keys(d.api_keys_file)
            self.api = DecisionApi(self.store, keys)
            api_tls = SiteTls(
                (type(cfg.certificates[0])(d.cert, d.key),) if d.cert else cfg.certificates[:1]
            )
            host, port = parse_hostport(d.listen)
            sock = self._bind(host, port, "origin.decisions.listen")
            api_address = sock.getsockname()[:2]
            self.servers.append(loop.create_task(self._accept_api(sock, api_tls)))
        if d.redis_url:
            from blindfold.decisions.redis_bus import RedisPublisher

            self.publisher = RedisPublisher(d.redis_url, self.log)
            await self.publisher.start(self.store)
        self.servers.append(loop.create_task(self._housekeeping()))
        self.log.emit(
            "origin_ready",
            listen=[_addr(s) for s, tls in self.tls_sockets.items() if tls],
            http_listen=[_addr(s) for s, tls in self.tls_sockets.items() if not tls],
            admin=f"{admin[0]}:{admin[1]}",
            decisions=f"{api_address[0]}:{api_address[1]}" if api_address else None,
            waf=getattr(self.waf, "version", None),
            pid=os.getpid(),
        )

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
        self.servers.append(asyncio.get_running_loop().create_task(self._accept(sock, tls)))

    async def _accept(self, lsock: socket.socket, tls: bool) -> None:
        loop = asyncio.get_running_loop()
        while not self.stopping.is_set():
            try:
                sock, peer = await loop.sock_accept(lsock)
            except OSError as exc:
                self.log.emit("accept_error", error=str(exc))
                await asyncio.sleep(0.1)
                continue
            if self.open >= self.cfg.max_connections:
                self._count_conn("refused_max_connections")
                sock.close()
                continue
            sock.setblocking(False)
            # asyncio sets TCP_NODELAY only for sockets it knows are TCP (proto 6); ours come
            # from accept() with proto 0, and Nagle would hold every small response ~40 ms
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.open += 1
            task = loop.create_task(self._connection(sock, peer, lsock.getsockname(), tls))
            task.add_done_callback(_consume)

    def _count_conn(self, result: str) -> None:
        key = f"conn:{result}"
        self.stats[key] = self.stats.get(key, 0) + 1

    async def _connection(
        self, sock: socket.socket, peer: tuple[str, int], local: tuple[str, int], tls: bool
    ) -> None:
        cfg = self.cfg
        loop = asyncio.get_running_loop()
        client: tuple[str, int] | None = (peer[0], peer[1])
        handed_over = False
        try:
            if tls and cfg.proxy_protocol != "off":
                client = await self._proxy(sock, (peer[0], peer[1]))
                if client is None:
                    return
            assert client is not None
            info = ConnInfo(client, (local[0], local[1]), b"https" if tls else b"http", {})
            if tls:
                assert self.tls is not None
                await loop.connect_accepted_socket(
                    _AlpnDispatch(self, info, self.handler, self.tls),
                    sock,
                    ssl=self.tls.default,
                    ssl_handshake_timeout=cfg.http.tls_handshake_timeout_s,
                )
            else:
                await loop.connect_accepted_socket(
                    lambda: H1Connection(self.handler, self.limits, info, self.event), sock
                )
            handed_over = True
            self._count_conn("ok")
        except (ssl.SSLError, OSError, TimeoutError, ConnectionError) as exc:
            self._count_conn("tls_failed" if isinstance(exc, ssl.SSLError) else "io_error")
        finally:
            if not handed_over:
                self.open -= 1
                sock.close()

    async def _proxy(self, sock: socket.socket, peer: tuple[str, int]) -> tuple[str, int] | None:
        """Apply the PROXY policy; the visitor address, or None when refused."""
        cfg = self.cfg
        version, addr = parse_address(peer[0])
        trusted = self.trusted.contains(addr, version)
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
                    return peer
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
        if header.src is None:
            return peer  # LOCAL: the edge's own health check
        return header.src

    def _refuse(self, reason: str, peer: str) -> None:
        self._count_conn(f"refused_{reason}")
        self.log.log("conn_refused", client=peer, reason=reason)

    async def _accept_api(self, lsock: socket.socket, tls: SiteTls) -> None:
        loop = asyncio.get_running_loop()
        assert self.api is not None
        api = self.api
        while not self.stopping.is_set():
            sock, peer = await loop.sock_accept(lsock)
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            info = ConnInfo((peer[0], peer[1]), lsock.getsockname()[:2], b"https", {})
            self.open += 1
            task = loop.create_task(
                loop.connect_accepted_socket(
                    _AlpnDispatch(self, info, api, tls),
                    sock,
                    ssl=tls.default,
                    ssl_handshake_timeout=10,
                )
            )
            task.add_done_callback(_consume)

    async def _housekeeping(self) -> None:
        while not self.stopping.is_set():
            await asyncio.sleep(1.0)
            now = time.time()
            for gone in self.store.expire(now):
                self.log.log("decision_expired", id=gone.id, value=gone.value)
            self.rules.sweep(now)
            self.log.flush()
            if self.audit is not self.log:
                self.audit.flush()

    # ------------------------------------------------------------------ admin
    async def _admin(self, method: str, path: str) -> tuple[int, str, bytes]:
        if path == "/healthz":
            return 200, "application/json", b'{"status":"ok"}\n'
        if path == "/metrics":
            return (
                200,
                "text/plain; version=0.0.4",
                render(self.snapshot(), ORIGIN_METRICS).encode(),
            )
        return 404, "text/plain", b"not found\n"

    def snapshot(self) -> dict[str, list[list[Any]]]:
        s = self.stats

        def pick(prefix: str) -> list[list[Any]]:
            return [[[k[len(prefix) :]], v] for k, v in s.items() if k.startswith(prefix)]

        return {
            "blindfold_origin_requests_total": pick("requests:"),
            "blindfold_origin_connections_total": pick("conn:"),
            "blindfold_origin_connections_active": [[[], self.open]],
            "blindfold_waf_blocks_total": [[[], s.get("waf_blocks", 0)]],
            "blindfold_waf_rule_blocks_total": pick("waf_rule:"),
            "blindfold_decisions_active": [[[], len(self.store.decisions)]],
            "blindfold_decisions_created_total": pick("decisions:"),
            "blindfold_decision_stream_requests_total": [
                [[k], v] for k, v in (self.api.requests.items() if self.api else [])
            ],
            "blindfold_http_events_total": pick("http:"),
            "blindfold_origin_blind_bytes_total": pick("blind_bytes:"),
            "blindfold_origin_blind_requests_total": pick("blind_requests:"),
        }

    # ------------------------------------------------------------------ lifecycle
    async def reload(self) -> None:
        try:
            config, _ = load_file(self.path)
            if config.origin is None:
                raise ConfigError("origin", "the config has no [origin] section")
            self._build(config.origin)
        except ConfigError as exc:
            self.log.emit("reload_failed", error=str(exc))
            return
        self.log.emit("reloaded")

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stopping.set)
        loop.add_signal_handler(signal.SIGINT, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self.reload()))
        await self.stopping.wait()
        for sock in self.sockets:
            sock.close()
        for task in self.servers:
            task.cancel()
        deadline = time.monotonic() + 10
        while self.open > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.publisher is not None:
            await self.publisher.close()
        await self.admin.close()
        self.log.emit("origin_stopped")
        return 0


def _addr(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _consume(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()  # retrieved: a failed connection never reaches the accept loop


def run_origin(path: str) -> int:
    from blindfold.io import ssl_alerts

    ssl_alerts.install()  # handshake failures answer with OpenSSL's alert, not a bare reset
    try:
        config, _ = load_file(path)
        if config.origin is None:
            raise ConfigError("origin", f"{path} has no [origin] section")
    except ConfigError as exc:
        print(f"blindfold origin: {exc}", file=sys.stderr)
        return 2
    raise_fd_limit()

    async def main() -> int:
        try:
            assert config.origin is not None
            agent = OriginAgent(path, config.origin)
            await agent.start()
        except ConfigError as exc:
            print(f"blindfold origin: {exc}", file=sys.stderr)
            return 2
        return await agent.run()

    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(main())
    return 0
