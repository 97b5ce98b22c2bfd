"""Passthrough routes: TLS is forwarded at layer 4. The edge sees addresses, the SNI and the
cleartext ClientHello; admission forwards the hello bytes unchanged (after a PROXY header when
the route sends one) and the connection relays both ways (`edge.connection`).

With `quic = true` the route also takes QUIC on UDP. That is part of this plug-in, not a mode
of its own (it is a passthrough route's second transport, with the same routes and guards):
the sans-IO cores (`core.quic_flows`, `core.quic_visitor`) driven on the worker's reactor.

Each listen address also has a UDP group (SO_REUSEPORT, steered by source address like TCP:
`io.listeners`), so every datagram of one visitor address reaches one worker, which keeps its
own flow table. A flow's ClientHello is read from its Initial packets; then the same checks as
a TCP connection's run, in the same order: routing by SNI, lists and bans, the JA4 rules (`q`
fingerprints). The guards' connection slot (the global cap, the per-address limits, shared with
TCP) is taken only once the client has proven its address (its first Handshake packet to an ID
the origin chose, RFC 9000 §8.1; `core.quic_flows`): a forged source address never holds one.
Only an accepted flow's datagrams reach an origin: on one UDP socket per visitor path,
connected to the route's QUIC origin, which first carries the signed visitor announcement
(`core.quic_visitor`). A ban that arrives while a flow is open ends it after
`decisions.close_grace_s`, like a TCP connection. docs/quic.md says what survives a change of
the visitor's address.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from blindfold.config.common import parse_hostport
from blindfold.config.edge import EdgeConfig, EdgeQuicConfig, RouteConfig
from blindfold.core.iplist import parse_address
from blindfold.core.quic_flows import (
    OPEN,
    Dropped,
    Flow,
    FlowEnded,
    FlowLimits,
    Forward,
    HelloReceived,
    Path,
    QuicFlowTable,
    SendToClient,
)
from blindfold.core.quic_visitor import encode_announcement, load_key
from blindfold.edge.guards import Admission
from blindfold.edge.mode import Mode, ModeContext, RouteState
from blindfold.errors import ConfigError, ProtocolError
from blindfold.io.reactor import EPOLLIN
from blindfold.obs.metrics import MetricSpec, Snapshot

SLICE_FLOWS = 1024  # flows checked against new bans per turn of the loop (~1 ms)
RECV_BATCH = 64  # datagrams read per readiness event before other work runs
MAX_DATAGRAM = 65535

METRICS = (
    MetricSpec(
        "blindfold_quic_datagrams_dropped_total",
        "counter",
        "Visitor datagrams the edge did not forward, by reason (never sent to an origin).",
        ("reason",),
    ),
    MetricSpec(
        "blindfold_quic_flows_total",
        "counter",
        "QUIC flows: new, accepted, rejected:<reason>, ended:<reason>.",
        ("result",),
    ),
    MetricSpec(
        "blindfold_quic_version_negotiation_sent_total",
        "counter",
        "Version Negotiation packets sent (never larger than the datagram answered).",
    ),
    MetricSpec("blindfold_quic_flows_active", "gauge", "QUIC flows in the table (all states)."),
    MetricSpec("blindfold_quic_flows_pending", "gauge", "QUIC flows whose hello is undecided."),
    MetricSpec(
        "blindfold_quic_flows_unvalidated",
        "gauge",
        "Accepted QUIC flows whose client has not proven its address (they hold no slot).",
    ),
    MetricSpec(
        "blindfold_quic_bytes_total",
        "counter",
        "QUIC bytes relayed by route and direction (to_origin, to_client).",
        ("route", "direction"),
    ),
)


@dataclass(frozen=True, slots=True)
class QuicRoute:
    """`RouteState.state` of a passthrough route with quic = true: its QUIC origins, and the
    edge's QUIC settings as they were when the route was built."""

    origins: tuple[tuple[socket.AddressFamily, Any], ...]
    settings: EdgeQuicConfig
    key: bytes


@dataclass(slots=True)
class FlowInfo:
    """What the edge keeps with an accepted flow (`Flow.route`)."""

    route: RouteState
    adm: Admission | None  # the guards' slot, taken once the client proved its address
    origin: tuple[socket.AddressFamily, Any]
    listener: socket.socket  # the visitor's datagrams came to it; answers leave from it
    started: float
    released: bool = False
    bytes: list[int] = field(default_factory=lambda: [0, 0])


def check_quic(where: str, rc: RouteConfig, edge: EdgeConfig) -> None:
    if rc.quic and edge.quic is not None:
        load_key(edge.quic.announce_key_file, "edge.quic.announce_key_file")


def build_quic(where: str, rc: RouteConfig, edge: EdgeConfig) -> QuicRoute | None:
    if not rc.quic or edge.quic is None:
        return None
    origins = []
    key = "quic_origins" if rc.quic_origins else "origins"
    for j, text in enumerate(rc.quic_origins or rc.origins):
        host, port = parse_hostport(text)
        try:
            info = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
        except OSError as exc:
            raise ConfigError(f"{where}.{key}[{j}]", f"cannot resolve {text!r}: {exc}") from None
        origins.append((info[0], info[4]))
    secret = load_key(edge.quic.announce_key_file, "edge.quic.announce_key_file")
    return QuicRoute(tuple(origins), edge.quic, secret)


def limits(qc: EdgeQuicConfig) -> FlowLimits:
    return FlowLimits(
        max_flows=qc.max_flows,
        max_pending=qc.max_pending,
        max_pending_per_address=qc.max_pending_per_address,
        hello_timeout_s=qc.hello_timeout_s,
        validation_timeout_s=qc.hello_timeout_s,
        idle_timeout_s=qc.idle_timeout_s,
        max_paths=qc.max_paths,
        vn_rate_per_s=qc.vn_rate_per_s,
        vn_burst=max(1, int(qc.vn_rate_per_s)),
    )


class QuicService:
    """One worker's QUIC flows, on the worker's reactor."""

    def __init__(self, ctx: ModeContext) -> None:
        self.ctx = ctx
        self.key = b""
        self.table = QuicFlowTable(FlowLimits(), ctx.now)
        self.listeners: list[socket.socket] = []
        self.qconfig: EdgeQuicConfig | None = None
        self.route_bytes: dict[str, list[int]] = {}

    # ------------------------------------------------------------------ set-up
    def configure(self, route: QuicRoute) -> None:
        """A (re)loaded config's QUIC settings; open flows are kept."""
        self.key = route.key
        if route.settings != self.qconfig:
            self.table.limits = limits(route.settings)  # bounds what comes next
            self.qconfig = route.settings

    def listen(self, socks: Sequence[socket.socket]) -> None:
        reactor = self.ctx.reactor
        for sock in socks:
            sock.setblocking(False)
            self.listeners.append(sock)
            reactor.add(sock.fileno(), EPOLLIN, self._reader(sock))

    def close(self) -> None:
        """Drain: end every flow, stop listening (the next generation's sockets take over)."""
        for flow in list(self.table.flows()):
            self._ended(self.table.end(flow, "shutdown"))
        for sock in self.listeners:
            self.ctx.reactor.remove(sock.fileno())
            sock.close()
        self.listeners = []

    def _count(self, key: str) -> None:
        stats = self.table.stats
        stats[key] = stats.get(key, 0) + 1

    # ------------------------------------------------------------------ visitor side
    def _reader(self, sock: socket.socket):  # type: ignore[no-untyped-def]
        recvfrom = sock.recvfrom

        def on_readable(_mask: int) -> None:
            for _ in range(RECV_BATCH):
                try:
                    data, addr = recvfrom(MAX_DATAGRAM)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError:
                    continue  # an ICMP error queued on the socket: not the listener's fault
                self.from_client(sock, data, (addr[0], addr[1]))

        return on_readable

    def _refused_address(self, ip: str) -> str | None:
        """Lists and bans for an address, without taking a slot (a new path of an open flow;
        any datagram while bans or blocks exist: dropped unread)."""
        guards = self.ctx.guards
        try:
            version, addr = parse_address(ip)
        except ProtocolError:
            return "bad_address"
        if guards.allow.size and guards.allow.contains(addr, version):
            return None
        if guards.block.size and guards.block.contains(addr, version):
            return "blocklist"
        if guards.bans.size and guards.bans.contains(addr, version):
            return "banned"
        return None

    def from_client(self, sock: socket.socket, data: bytes, client: tuple[str, int]) -> None:
        now = self.ctx.now
        table = self.table
        guards = self.ctx.guards
        if guards.bans.size or guards.block.size:
            refused = self._refused_address(client[0])
            if refused is not None:
                self._count(f"drop:{refused}")
                return
        r = table.from_client(data, client, now)
        if isinstance(r, HelloReceived):
            fwd = self._decide(sock, r, now)
            if fwd is not None:
                self._forward(fwd, admitted=True)
        elif isinstance(r, Forward):
            self._forward(r, admitted=False)
        elif isinstance(r, SendToClient):
            try:
                sock.sendto(r.datagram, r.address)
            except OSError:
                self._count("drop:send_failed")

    def _decide(self, sock: socket.socket, r: HelloReceived, now: float) -> Forward | None:
        """The same checks as a TCP connection's, in the same order (edge.admission)."""
        ctx = self.ctx
        hello = r.hello
        route = ctx.router.lookup(hello.sni)
        if route is None or not isinstance(route.state, QuicRoute):
            reason = "no_sni" if hello.sni is None else "unknown_sni"
            self._rejected(self.table.reject(r.flow, reason, now), None)
            return None
        guards = ctx.guards
        try:
            version, addr = parse_address(r.flow.client_ip)
        except ProtocolError:
            self._rejected(self.table.reject(r.flow, "bad_address", now), route)
            return None
        refused = self._refused_address(r.flow.client_ip)
        if refused is None:
            refused = guards.check_fingerprint(hello.ja4, guards.standing(version, addr), now)
        if refused is not None:
            self._rejected(self.table.reject(r.flow, refused, now), route)
            return None
        # no guards slot yet: the source address may be forged (`_validated` takes it)
        origins = route.state.origins
        info = FlowInfo(route, None, origins[r.flow.id % len(origins)], sock, now)
        info.bytes = self.route_bytes.setdefault(route.name, [0, 0])
        return self.table.accept(r.flow, now, info)

    def _validated(self, flow: Flow, now: float) -> bool:
        """The client proved its address: take the guards' slot (global cap, per-address
        concurrency and rate, as a TCP connection at accept), or refuse the flow."""
        info: FlowInfo = flow.route
        guards = self.ctx.guards
        try:
            version, addr = parse_address(flow.client_ip)
            refused, adm = guards.admit(version, addr, now)
        except ProtocolError:
            refused, adm = "bad_address", None
        if refused is not None or adm is None:
            ended = self.table.refuse(flow, refused or "refused")
            for path in list(flow.paths.values()):
                self._close_path(path)
            info.released = True
            self._rejected(ended, info.route)
            return False
        info.adm = adm
        if flow.hello is not None:
            self.ctx.stats.count_ja4(flow.hello.ja4)
        return True

    def _forward(self, fwd: Forward, admitted: bool) -> None:
        """`admitted`: the flow was just accepted from this path (the guards ran for it)."""
        path = fwd.path
        info: FlowInfo = path.flow.route
        if fwd.validated and not self._validated(path.flow, self.ctx.now):
            if fwd.evicted is not None:
                self._close_path(fwd.evicted)
            return
        if fwd.evicted is not None:
            self._close_path(fwd.evicted)
        if fwd.new_path:
            if not admitted and self._refused_address(path.client[0]) is not None:
                self.table.drop_path(path)
                self._count("drop:path_refused")
                if not path.flow.paths:
                    self._ended(FlowEnded(path.flow, "no_path"))
                return
            try:
                sock = socket.socket(info.origin[0], socket.SOCK_DGRAM)
                sock.setblocking(False)
                sock.connect(info.origin[1])
            except OSError:
                self.table.drop_path(path)
                self._count("drop:origin_socket")
                if not path.flow.paths:
                    self._ended(FlowEnded(path.flow, "origin_socket"))
                return
            path.handle = sock
            self.ctx.reactor.add(sock.fileno(), EPOLLIN, self._origin_reader(path))
        sock = path.handle
        try:
            if fwd.announce:
                sock.send(
                    encode_announcement(
                        self.key, path.client, sock.getsockname()[1], time.time(), os.urandom(16)
                    )
                )
            for data in fwd.datagrams:
                sock.send(data)
                info.bytes[0] += len(data)
        except OSError:  # the origin's port is closed (ICMP): the visitor retransmits
            self._count("drop:origin_unreachable")

    # ------------------------------------------------------------------ origin side
    def _origin_reader(self, path: Path):  # type: ignore[no-untyped-def]
        def on_readable(_mask: int) -> None:
            sock = path.handle
            if sock is None:
                return
            for _ in range(RECV_BATCH):
                try:
                    data = sock.recv(MAX_DATAGRAM)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError:
                    continue  # ECONNREFUSED from an earlier send: the origin is not there
                r = self.table.from_origin(path, data, self.ctx.now)
                if isinstance(r, SendToClient):
                    self._to_client(path, r)
                elif isinstance(r, Dropped):
                    return

        return on_readable

    def _to_client(self, path: Path, r: SendToClient) -> None:
        info: FlowInfo = path.flow.route
        try:
            info.listener.sendto(r.datagram, r.address)
            info.bytes[1] += len(r.datagram)
        except OSError:
            self._count("drop:send_failed")

    # ------------------------------------------------------------------ ending
    def _close_path(self, path: Path) -> None:
        sock = path.handle
        if sock is not None:
            self.ctx.reactor.remove(sock.fileno())
            sock.close()
            path.handle = None

    def _ended(self, ended: FlowEnded) -> None:
        flow = ended.flow
        for path in list(flow.paths.values()):
            self._close_path(path)
        info = flow.route
        if isinstance(info, FlowInfo) and not info.released:
            info.released = True
            if info.adm is not None:
                self.ctx.guards.release(info.adm)
                self._log(flow, info.route, "closed", ended.reason, info.started)
            elif self.ctx.may_log_refusal():  # never validated: a refusal, rate-limited
                self._log(flow, info.route, "refused", ended.reason, info.started)

    def _rejected(self, ended: FlowEnded, route: RouteState | None) -> None:
        if self.ctx.may_log_refusal():
            self._log(ended.flow, route, "refused", ended.reason.removeprefix("rejected:"), None)

    def _log(
        self, flow: Flow, route: RouteState | None, outcome: str, reason: str, since: float | None
    ) -> None:
        if not self.ctx.config.log_connections:
            return
        fields = flow.log_fields()
        self.ctx.log.log(
            "quic_flow",
            **fields,
            route=route.name if route is not None else None,
            outcome=outcome,
            reason=reason,
            duration_s=round(self.ctx.now - since, 3) if since is not None else 0.0,
            worker=self.ctx.index,
        )

    def expire(self, now: float) -> None:
        for ended in self.table.expire(now):
            self._ended(ended)

    def find_banned(self, grace_s: float) -> None:
        """New bans are in: find the open flows with a path from an address the lists now
        refuse, SLICE_FLOWS per turn of the loop (like the worker's check of connections),
        and end them after `grace_s`."""
        flows = [f for f in self.table.flows() if isinstance(f.route, FlowInfo)]
        doomed: list[Flow] = []
        reactor = self.ctx.reactor

        def end() -> None:
            ended = self.end_banned(doomed)
            if ended:
                self.ctx.log.log("banned_flows_closed", closed=ended, worker=self.ctx.index)

        def step(start: int) -> None:
            for flow in flows[start : start + SLICE_FLOWS]:
                if any(self._refused_address(p.client[0]) for p in flow.paths.values()):
                    doomed.append(flow)
            if start + SLICE_FLOWS < len(flows):
                reactor.call_later(0.0, lambda: step(start + SLICE_FLOWS))
            elif doomed:
                reactor.call_later(grace_s, end)

        step(0)

    def end_banned(self, flows: list[Flow]) -> int:
        ended = 0
        for flow in flows:
            if flow.state == OPEN and any(
                self._refused_address(p.client[0]) is not None for p in flow.paths.values()
            ):
                self._ended(self.table.end(flow, "banned"))
                ended += 1
        return ended

    # ------------------------------------------------------------------ metrics
    def snapshot(self) -> Snapshot:
        stats = self.table.stats
        return {
            "blindfold_quic_datagrams_dropped_total": [
                [[k[5:]], v] for k, v in stats.items() if k.startswith("drop:")
            ],
            "blindfold_quic_flows_total": [
                [[k[6:]], v] for k, v in stats.items() if k.startswith("flows:")
            ],
            "blindfold_quic_version_negotiation_sent_total": [[[], stats.get("vn_sent", 0)]],
            "blindfold_quic_flows_active": [[[], len(self.table)]],
            "blindfold_quic_flows_pending": [[[], self.table.pending]],
            "blindfold_quic_flows_unvalidated": [[[], self.table.unvalidated]],
            "blindfold_quic_bytes_total": [
                item
                for route, (up, down) in self.route_bytes.items()
                for item in ([[route, "to_origin"], up], [[route, "to_client"], down])
            ],
        }


class PassthroughMode(Mode):
    name = "passthrough"  # TCP: the defaults, no state, every connection forwarded
    metrics = METRICS

    def __init__(self, ctx: ModeContext) -> None:
        super().__init__(ctx)
        self.quic: QuicService | None = None

    @classmethod
    def check_config(cls, where: str, rc: RouteConfig, edge: EdgeConfig) -> None:
        check_quic(where, rc, edge)

    def build(self, where: str, rc: RouteConfig, edge: EdgeConfig, old: Any) -> Any:
        return build_quic(where, rc, edge)

    def configured(self, routes: Sequence[RouteState]) -> None:
        for route in routes:
            if isinstance(route.state, QuicRoute):
                if self.quic is None:
                    self.quic = QuicService(self.ctx)
                self.quic.configure(route.state)
                break

    def listening(self, datagram_sockets: Sequence[socket.socket]) -> None:
        if self.quic is not None:
            self.quic.listen(datagram_sockets)

    def sweep(self, routes: Sequence[RouteState], now: float) -> None:
        if self.quic is not None:
            self.quic.expire(now)

    def bans_changed(self, grace_s: float) -> None:
        if self.quic is not None:
            self.quic.find_banned(grace_s)

    def drain(self) -> None:
        if self.quic is not None:
            self.quic.close()

    def snapshot(self, routes: Sequence[RouteState]) -> Snapshot:
        return self.quic.snapshot() if self.quic is not None else {}
