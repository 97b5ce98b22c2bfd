"""HTTP/3 at the origin agent: aioquic's QUIC and HTTP/3 with the site's certificates, in front
of the same handler as HTTP/1.1 and HTTP/2 (WAF, decisions, rate rules, access log, proxy).

- `OriginQuicServer` is aioquic's `QuicServer` (connection IDs, Version Negotiation, timers)
  with blindfold's admission in front of it: visitor announcements from trusted edges
  (`core.quic_visitor`), the `proxy_protocol` policy applied to datagrams, connection limits,
  and the ClientHello read before a connection is made (`core.quic_initial`, the edge's own
  reader) so the certificate is chosen by SNI and the SNI reaches `Request.tls`.
- `H3Protocol` is one QUIC connection: aioquic's `H3Connection` turns QUIC events into
  requests; each request runs the `web.messages.Handler` in its own task, like
  `web.http2.H2Connection`, with HTTP/2's defences: receive credit only as handlers read
  (aioquic alone opens windows as data arrives), frames aioquic buffers whole bounded by
  `max_header_bytes`, rapid reset and stalled bodies; responses wait while a stream has more
  than `body_high_water` bytes unacknowledged, up to `send_timeout_s`.
- `AltSvc` adds `Alt-Svc: h3=":PORT"` to HTTP/1.1 and HTTP/2 responses over TLS.

No session tickets are issued, so there is no resumption and no 0-RTT (early data can be
replayed, and the WAF would see it twice).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections import OrderedDict
from collections.abc import Callable
from functools import partial
from typing import Any, Protocol

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import QuicServer
from aioquic.h3 import events as h3e
from aioquic.h3.connection import H3_ALPN, ErrorCode, H3Connection
from aioquic.quic import events as qe
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import QuicErrorCode

from blindfold.config.origin import OriginConfig
from blindfold.core.aioquic_compat import network_paths
from blindfold.core.iplist import IPSet, parse_address, visitor_key
from blindfold.core.quic_initial import (
    INITIAL,
    MIN_INITIAL_DATAGRAM,
    InitialReader,
    parse_datagram,
)
from blindfold.core.quic_visitor import VisitorBindings, is_announcement, key_id, load_key
from blindfold.errors import ConfigError, ProtocolError
from blindfold.obs.metrics import MetricSpec
from blindfold.web.http2 import _target_and_authority
from blindfold.web.limits import HttpLimits, new_request_id
from blindfold.web.messages import (
    BodyStream,
    BodyTimeout,
    Handler,
    Headers,
    Request,
    run_stream_handler,
)

Address = tuple[str, int]

QUIC_METRICS = [
    MetricSpec(
        "blindfold_origin_quic_datagrams_total",
        "counter",
        "QUIC datagrams by result (ok, or why they were dropped).",
        ("result",),
    ),
    MetricSpec(
        "blindfold_origin_quic_announcements_total",
        "counter",
        "Visitor announcements from edges by result.",
        ("result",),
    ),
    MetricSpec("blindfold_origin_quic_connections_active", "gauge", "Open QUIC connections."),
    MetricSpec("blindfold_origin_quic_bindings", "gauge", "Edge sockets bound to a visitor."),
]

_FORBIDDEN_RESPONSE_HEADERS = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade", b"te"}
)
MAX_PENDING_HELLOS = 4096
MAX_HELD_DATAGRAMS = 8
HELLO_TIMEOUT_S = 5.0
# A connection whose handshake has not completed (the client may be a forged source that never
# answers): ended after this, and, when the connections are at quic.max_connections, the
# oldest such one older than HALF_OPEN_GRACE_S makes room for a new client (an honest
# handshake takes a round trip or two), so forged Initials cannot hold every slot for the
# idle timeout.
HANDSHAKE_TIMEOUT_S = 10.0
HALF_OPEN_GRACE_S = 1.0


class QuicHost(Protocol):
    """What HTTP/3 needs of the origin agent (a narrow view of `OriginAgent`)."""

    @property
    def cfg(self) -> OriginConfig: ...

    @property
    def handler(self) -> Handler: ...

    @property
    def limits(self) -> HttpLimits: ...

    @property
    def trusted(self) -> IPSet: ...

    @property
    def stats(self) -> dict[str, Any]: ...

    def count(self, key: str) -> None: ...

    def event(self, name: str, fields: dict[str, Any]) -> None: ...


def quic_configurations(
    cfg: OriginConfig,
) -> tuple[QuicConfiguration, dict[str, QuicConfiguration]]:
    """One aioquic configuration per certificate: (default, by DNS name)."""
    from blindfold.origin.tls import _names

    default: QuicConfiguration | None = None
    by_name: dict[str, QuicConfiguration] = {}
    for i, c in enumerate(cfg.certificates):
        qc = QuicConfiguration(
            is_client=False,
            alpn_protocols=list(H3_ALPN),
            idle_timeout=cfg.quic.idle_timeout_s,
            max_datagram_frame_size=None,
            # initial credit like HTTP/2's windows; it grows only as handlers read
            max_stream_data=cfg.http.max_header_bytes + (256 << 10),
            max_data=1 << 20,
        )
        try:
            qc.load_cert_chain(c.cert, c.key)
            names = _names(c.cert)
        except (OSError, ValueError, TypeError) as exc:
            raise ConfigError(f"origin.certificates[{i}]", f"cannot load for QUIC: {exc}") from None
        default = default or qc
        for name in names:
            by_name.setdefault(name, qc)
    if default is None:
        raise ConfigError("origin.quic.listen", "HTTP/3 needs [[origin.certificates]]")
    return default, by_name


class _Pending:
    """A new connection's datagrams, held until its ClientHello is read."""

    __slots__ = ("created", "held", "reader")

    def __init__(self, reader: InitialReader, now: float) -> None:
        self.reader = reader
        self.held: list[tuple[bytes, Address]] = []
        self.created = now


class QuicShared:
    """What every HTTP/3 listener of the agent shares: visitor bindings, open connections
    (counted against quic.max_connections and per visitor) and the certificates."""

    def __init__(self, host: QuicHost, bindings: VisitorBindings) -> None:
        self.host = host
        self.bindings = bindings
        self.default_config, self.by_name = quic_configurations(host.cfg)
        self.connections: set[H3Protocol] = set()
        self.half_open: OrderedDict[H3Protocol, float] = OrderedDict()  # oldest first
        self.per_visitor: dict[str, int] = {}
        self.servers: list[OriginQuicServer] = []

    def evict_half_open(self, now: float) -> bool:
        """Make room: end the oldest connection whose handshake has not completed, if it is
        older than HALF_OPEN_GRACE_S (monotonic `now`). False when there is none."""
        if not self.half_open:
            return False
        proto, created = next(iter(self.half_open.items()))
        if now - created < HALF_OPEN_GRACE_S:
            return False
        proto.end_half_open("evicted_half_open")
        return True

    def ports(self) -> list[str]:
        out = []
        for server in self.servers:
            if server._transport is not None:
                h, p = server._transport.get_extra_info("sockname")[:2]
                out.append(f"[{h}]:{p}" if ":" in h else f"{h}:{p}")
        return out

    def close(self) -> None:
        for server in self.servers:
            with contextlib.suppress(Exception):
                server.close()

    def snapshot(self) -> dict[str, list[list[Any]]]:
        s = self.host.stats

        def pick(prefix: str) -> list[list[Any]]:
            return [[[k[len(prefix) :]], v] for k, v in s.items() if k.startswith(prefix)]

        return {
            "blindfold_origin_quic_datagrams_total": pick("quic:"),
            "blindfold_origin_quic_announcements_total": pick("quic_announce:"),
            "blindfold_origin_quic_connections_active": [[[], len(self.connections)]],
            "blindfold_origin_quic_bindings": [[[], len(self.bindings)]],
        }


class OriginQuicServer(QuicServer):
    def __init__(self, shared: QuicShared) -> None:
        super().__init__(configuration=shared.default_config, create_protocol=self._new_protocol)
        self.shared = shared
        self.host = shared.host
        self.bindings = shared.bindings
        self.pending: OrderedDict[bytes, _Pending] = OrderedDict()  # oldest first
        self._hello_sni = ""
        self._from_edge = False

    # ------------------------------------------------------------------ admission
    def _count(self, result: str) -> None:
        self.host.count(f"quic:{result}")

    def resolve(self, addr: Address, now: float) -> Address | None:
        """The visitor a datagram from `addr` belongs to, by the `proxy_protocol` policy:
        trusted edges must have announced the socket; others are visitors themselves unless
        every connection must come through an edge."""
        mode = self.host.cfg.proxy_protocol
        if mode == "off":
            return addr
        try:
            version, value = parse_address(addr[0])
        except ProtocolError:
            return None
        if self.host.trusted.contains(value, version):
            return self.bindings.visitor(addr, now)
        return None if mode == "required" else addr

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        if not isinstance(data, bytes):
            return
        addr = (addr[0], addr[1])
        now = time.time()
        if is_announcement(data):
            self._announcement(data, addr, now)
            return
        visitor = self.resolve(addr, now)
        if visitor is None:
            self._count("unbound_source")
            return
        try:
            dgram = parse_datagram(data)
        except ProtocolError as exc:
            self._count(exc.reason)
            return
        first = dgram.packets[0] if dgram.packets else None
        if first is not None and first.kind is None and len(data) < MIN_INITIAL_DATAGRAM:
            # RFC 9000 §5.2.2: servers MUST drop smaller packets of unsupported versions
            # (aioquic's server would answer them with Version Negotiation)
            self._count("unsupported_version")
            return
        if dgram.packets and dgram.packets[0].kind == INITIAL:
            dcid = dgram.packets[0].dcid
            if dcid not in self._protocols:
                self._new_connection(data, addr, dgram.packets[0].version, dcid, visitor, now)
                return
        self._count("ok")
        super().datagram_received(data, addr)

    def _announcement(self, data: bytes, addr: Address, now: float) -> None:
        cfg = self.host.cfg
        version, value = parse_address(addr[0])
        if cfg.proxy_protocol == "off" or not self.host.trusted.contains(value, version):
            self.host.count("quic_announce:untrusted_peer")
            return
        try:
            visitor = self.bindings.announce(data, addr, now)
        except ProtocolError as exc:
            self.host.count(f"quic_announce:{exc.reason}")
            self.host.event("quic_announce_refused", {"edge": addr[0], "reason": exc.reason})
            return
        self.host.count("quic_announce:ok")
        del visitor

    def _new_connection(
        self, data: bytes, addr: Address, version: int, dcid: bytes, visitor: Address, now: float
    ) -> None:
        """An Initial for no connection yet: hold it until the ClientHello is complete, then
        make the connection with the certificate its SNI names."""
        pend = self.pending.get(dcid)
        if pend is None:
            if len(data) < MIN_INITIAL_DATAGRAM:
                self._count("initial_too_small")
                return
            self._expire_pending(now)
            if len(self.pending) >= MAX_PENDING_HELLOS:
                self._count("pending_full")
                return
            if len(
                self.shared.connections
            ) >= self.host.cfg.quic.max_connections and not self.shared.evict_half_open(
                time.monotonic()
            ):
                self._count("refused_max_connections")
                return
            key = visitor_key(visitor[0])
            if self.shared.per_visitor.get(key, 0) >= self.host.cfg.per_client_connections:
                self._count("refused_per_client_connections")
                return
            try:
                pend = _Pending(InitialReader(version, dcid), now)
            except ProtocolError as exc:
                self._count(exc.reason)
                return
            self.pending[dcid] = pend
        if len(pend.held) >= MAX_HELD_DATAGRAMS:
            self._count("held_full")
            return
        try:
            hello = None
            for header in parse_datagram(data).packets:
                if header.kind == INITIAL:
                    hello = pend.reader.feed(data, header) or hello
        except ProtocolError as exc:
            self._count(exc.reason)
            if pend.reader.hello is None and not pend.held:
                self.pending.pop(dcid, None)
            return
        pend.held.append((data, addr))
        if hello is None:
            return
        del self.pending[dcid]
        sni = hello.sni or ""
        by_name = self.shared.by_name
        config = by_name.get(sni)
        if config is None and "." in sni:
            config = by_name.get("*." + sni.split(".", 1)[1])
        self._configuration = config or self.shared.default_config
        self._hello_sni = sni
        self._from_edge = visitor != addr
        try:
            for held, source in pend.held:
                self._count("ok")
                super().datagram_received(held, source)
        finally:
            self._configuration = self.shared.default_config
            self._hello_sni = ""
            self._from_edge = False

    def _expire_pending(self, now: float) -> None:
        self.bindings.expire(now)
        pending = self.pending
        while pending:
            dcid, pend = next(iter(pending.items()))
            if now - pend.created <= HELLO_TIMEOUT_S:
                break
            del pending[dcid]
            self._count("hello_timeout")

    def _new_protocol(self, connection: QuicConnection, stream_handler: Any = None) -> H3Protocol:
        if self._from_edge:
            # NEW_CONNECTION_ID frames are encrypted: an edge never learns the IDs they carry,
            # and drops a client that switches to one (RFC 9000 §5.1.1 lets it, any time).
            # A flow from an edge keeps its handshake ID alone; without a spare ID a client
            # does not migrate on purpose (§9.5), and NAT rebinding keeps working.
            setattr(connection, "_replenish_connection_ids", lambda: None)  # noqa: B010
        proto = H3Protocol(connection, self, self._hello_sni)
        self.shared.connections.add(proto)
        self.shared.half_open[proto] = time.monotonic()
        return proto

    def _connection_terminated(self, protocol: QuicConnectionProtocol) -> None:
        super()._connection_terminated(protocol)
        if isinstance(protocol, H3Protocol):
            protocol.release()


class _Endpoint(asyncio.DatagramProtocol):
    """The socket's protocol: one bad datagram never ends the listener."""

    def __init__(self, server: OriginQuicServer) -> None:
        self.server = server

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.server.connection_made(transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        try:
            self.server.datagram_received(data, addr)
        except Exception as exc:
            self.server.host.count("quic:error")
            self.server.host.event("quic_error", {"error": repr(exc)[:300]})

    def error_received(self, exc: Exception) -> None:
        self.server.host.count("quic:socket_error")


# ----------------------------------------------------------------------------- connection


class _Stream:
    __slots__ = ("body", "last_data", "responder", "task")

    def __init__(self, now: float) -> None:
        self.body: BodyStream | None = None
        self.task: asyncio.Task[None] | None = None
        self.responder: H3Responder | None = None
        self.last_data = now


class H3Protocol(QuicConnectionProtocol):
    """One QUIC connection serving HTTP/3 requests to the agent's handler."""

    def __init__(self, quic: QuicConnection, server: OriginQuicServer, sni: str) -> None:
        super().__init__(quic)
        self.server = server
        self.host = server.host
        self.sni = sni
        self.h3: H3Connection | None = None
        self.streams: dict[int, _Stream] = {}
        self.progress = asyncio.Event()
        self.closed = False
        self.released = False
        self.visitor_key: str | None = None
        # which addresses the client has shown it receives at (see visitor())
        self.proven_peer: Address | None = None
        self.proven_visitor: Address | None = None  # the visitor of proven_peer when proven
        self.handshake_done = False
        self._handshake_sources: set[Address] = set()
        # proven path -> its visitor, resolved when it was proven: an edge socket's binding may
        # later name another visitor (the edge closed that path and the kernel gave its port to
        # a new one), and what was proven is who received at that path then
        self._proven: dict[Address, Address | None] = {}
        self._unproven: set[Address] = set()
        self.buffered = 0  # request body bytes received and not yet read by handlers
        self.resets: list[float] = []
        self._hook_flow_control(quic)
        self._tick_handle = self._loop.call_later(1.0, self._tick)

    def _hook_flow_control(self, quic: QuicConnection) -> None:
        """aioquic doubles a receive window whenever the peer has used half of it, whether or
        not the application read anything: no back-pressure, and a frame aioquic buffers
        whole (HEADERS) could grow without end. Credit is given here only while the handlers
        keep up: a request stream's MAX_STREAM_DATA waits while its unread body is over
        body_high_water, and MAX_DATA/MAX_STREAMS wait while the connection's unread bodies
        are over four times that. (aioquic is pinned; tests/integration/test_h3_origin.py
        covers both.)"""
        write_stream = quic._write_stream_limits
        write_connection = quic._write_connection_limits
        limits = self.host.limits

        held: set[int] = set()

        def stream_limits(**kw: Any) -> None:
            sid = kw["stream"].stream_id
            entry = self.streams.get(sid)
            body = entry.body if entry is not None else None
            if body is not None and body.buffered > limits.body_high_water:
                if sid not in held:
                    held.add(sid)
                    self.host.count("quic:window_held")  # the application is behind
                return
            held.discard(sid)
            write_stream(**kw)

        def connection_limits(**kw: Any) -> None:
            if self.buffered > 4 * limits.body_high_water:
                return
            write_connection(**kw)

        setattr(quic, "_write_stream_limits", stream_limits)  # noqa: B010
        setattr(quic, "_write_connection_limits", connection_limits)  # noqa: B010

    # ------------------------------------------------------------------ events
    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        if not self.handshake_done and len(self._handshake_sources) < 4:
            self._handshake_sources.add((addr[0], addr[1]))
        super().datagram_received(data, addr)
        self._note_paths()
        self.progress.set()  # acknowledgements may have freed send buffers
        self.progress = asyncio.Event()

    def quic_event_received(self, event: qe.QuicEvent) -> None:
        if isinstance(event, qe.ProtocolNegotiated):
            if event.alpn_protocol in H3_ALPN:
                self.h3 = H3Connection(self._quic)
            self._claim_visitor()
        elif isinstance(event, qe.HandshakeCompleted):
            self._handshake_completed()
        elif isinstance(event, qe.ConnectionTerminated):
            self._terminated()
            return
        elif isinstance(event, qe.StreamReset):
            self._reset_by_client(event.stream_id)
            if self.closed:
                return
        if self.h3 is None:
            return
        for h3_event in self.h3.handle_event(event):
            if isinstance(h3_event, h3e.HeadersReceived):
                self._headers(h3_event)
            elif isinstance(h3_event, h3e.DataReceived):
                self._data(h3_event)
        if isinstance(event, qe.StreamDataReceived):
            # a frame aioquic holds until it is complete (HEADERS, SETTINGS, ...): no longer
            # than a request head may be
            pending = self.h3._stream.get(event.stream_id)
            if (
                pending is not None
                and len(pending.buffer) > self.host.limits.max_header_bytes + 1024
            ):
                self._calm("frame_too_large")

    def visitor(self) -> Address | None:
        """The visitor of the connection's last proven path, the address requests (and the
        bans they earn) are attributed to. aioquic makes a path current on the first
        non-probing packet from a new address, before it is validated (RFC 9000 §9.3), and
        anyone holding the connection's keys can send that packet with another address as
        source (a one-way spoof), which the edge then announces as the new path's visitor.
        A path is proven when the client has shown it receives there: the handshake's
        address if the handshake saw only one (§8.1: the client read our Initial), or a
        path validated after the handshake, which only a PATH_RESPONSE to our challenge can
        do (§8.2; Handshake keys are gone by then, RFC 9001 §4.9.2). aioquic's own
        `is_validated` is not enough: it also trusts a Handshake packet from any address.
        The visitor is the one the edge had announced for the path when it was proven, not
        whoever the edge's socket address names now."""
        self._note_paths()
        return self.proven_visitor

    def _note_paths(self) -> None:
        """Called after every datagram and before every attribution (a request's datagram
        may have moved the path): follows which paths are proven (see `visitor`)."""
        if not self.handshake_done:
            return
        paths = [((a[0], a[1]), ok) for a, ok in network_paths(self._quic)]
        if not paths:
            return
        present = {a for a, _ in paths}
        proven = {a: v for a, v in self._proven.items() if a in present}
        newly = [a for a, ok in paths if ok and a in self._unproven and a not in proven]
        if newly:
            t = time.time()
            for a in newly:
                proven[a] = self.server.resolve(a, t)
        self._unproven = {a for a, ok in paths if not ok} | (self._unproven & present)
        self._proven = proven
        current = paths[0][0]
        if current in proven:
            self.proven_peer, self.proven_visitor = current, proven[current]

    def _handshake_completed(self) -> None:
        self.handshake_done = True
        self.server.shared.half_open.pop(self, None)
        if len(self._handshake_sources) == 1:
            peer = next(iter(self._handshake_sources))
            self.proven_peer = peer
            self.proven_visitor = self._proven[peer] = self.server.resolve(peer, time.time())
        else:  # the client's address changed during the handshake: wait for PATH_RESPONSE
            self.host.event("h3_unproven_handshake", {"sources": len(self._handshake_sources)})
        self._handshake_sources.clear()
        self._note_paths()

    def _claim_visitor(self) -> None:
        """Count the connection against its visitor, once, when the ClientHello has been read
        (the handshake's address: a count of open connections, not an attribution)."""
        peer = self._quic.get_peer_address()
        if peer is None:
            return
        visitor = self.server.resolve((peer[0], peer[1]), time.time())
        if visitor is not None and self.visitor_key is None:
            self.visitor_key = visitor_key(visitor[0])
            counts = self.server.shared.per_visitor
            counts[self.visitor_key] = counts.get(self.visitor_key, 0) + 1

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        self.server.shared.connections.discard(self)
        self.server.shared.half_open.pop(self, None)
        if self.visitor_key is not None:
            counts = self.server.shared.per_visitor
            left = counts.get(self.visitor_key, 1) - 1
            if left > 0:
                counts[self.visitor_key] = left
            else:
                counts.pop(self.visitor_key, None)

    def _terminated(self) -> None:
        self.closed = True
        self._tick_handle.cancel()
        for stream in self.streams.values():
            if stream.body is not None:
                stream.body.fail(ConnectionError("connection closed"))
            if stream.task is not None and not stream.task.done():
                stream.task.cancel()
        self.progress.set()
        self.release()

    def _calm(self, reason: str) -> None:
        """Abuse: close the connection with H3_EXCESSIVE_LOAD (RFC 9114 §8.1)."""
        visitor = self.visitor()
        self.host.event("h3_abuse", {"client": visitor[0] if visitor else "", "reason": reason})
        self._quic.close(error_code=ErrorCode.H3_EXCESSIVE_LOAD, reason_phrase=reason)
        self.transmit()
        self._terminated()

    def end_half_open(self, reason: str) -> None:
        """End a connection whose handshake did not complete, and free its slot now."""
        self.server._count(reason)
        self._quic.close(error_code=QuicErrorCode.CONNECTION_REFUSED, reason_phrase=reason)
        self.transmit()
        self._terminated()

    def _tick(self) -> None:
        """Once a second: request bodies that stopped coming fail (408), as over HTTP/2."""
        if self.closed:
            return
        if not self.handshake_done:
            created = self.server.shared.half_open.get(self)
            if created is not None and time.monotonic() - created > HANDSHAKE_TIMEOUT_S:
                self.end_half_open("handshake_timeout")
                return
        now = self._loop.time()
        timeout = self.host.limits.body_timeout_s
        for stream in self.streams.values():
            body = stream.body
            if body is not None and not body._done and now - stream.last_data > timeout:
                body.fail(BodyTimeout("body_timeout"))
        self._tick_handle = self._loop.call_later(1.0, self._tick)

    def _reset_by_client(self, sid: int) -> None:
        now = self._loop.time()
        limits = self.host.limits
        self.resets.append(now)
        if len(self.resets) > limits.h2_max_resets_per_window:
            self.resets = [t for t in self.resets if now - t < limits.h2_abuse_window_s]
            if len(self.resets) > limits.h2_max_resets_per_window:
                self._calm("rapid_reset")  # CVE-2023-44487, over HTTP/3
                return
        stream = self.streams.pop(sid, None)
        if stream is None:
            return
        if stream.body is not None:
            stream.body.fail(ConnectionError("stream reset by the client"))
        if stream.task is not None and not stream.task.done():
            stream.task.cancel()

    def _headers(self, event: h3e.HeadersReceived) -> None:
        sid = event.stream_id
        stream = self.streams.get(sid)
        if stream is not None:  # trailers
            if event.stream_ended and stream.body is not None:
                stream.body.end()
            return
        limits = self.host.limits
        stream = self.streams[sid] = _Stream(self._loop.time())
        pseudo: dict[bytes, bytes] = {}
        headers: Headers = []
        for name, value in event.headers:
            if name.startswith(b":"):
                pseudo[name] = value
            else:
                headers.append((name, value))
        method = pseudo.get(b":method", b"")
        responder = stream.responder = H3Responder(self, sid, head=method == b"HEAD")
        size = sum(len(k) + len(v) + 32 for k, v in event.headers)  # RFC 9114 §4.2.2
        if len(headers) > limits.max_headers or size > limits.max_header_bytes:
            stream.task = self._loop.create_task(self._refuse(responder, 431))
            return
        visitor = self.visitor()
        if visitor is None:
            stream.task = self._loop.create_task(self._refuse(responder, 503))
            return
        try:
            target, authority = _target_and_authority(method, pseudo, headers)
        except ProtocolError as exc:
            self.host.event("bad_request", {"client": visitor[0], "status": 400, "error": str(exc)})
            stream.task = self._loop.create_task(self._refuse(responder, 400))
            return
        if not any(k == b"host" for k, _ in headers):
            headers.insert(0, (b"host", authority))
        length = next((v for k, v in headers if k == b"content-length"), None)
        if length is not None and length.isdigit() and int(length) > limits.max_body_bytes:
            stream.task = self._loop.create_task(self._refuse(responder, 413))
            return
        local = self._transport.get_extra_info("sockname") if self._transport else None
        request = Request(
            method=method,
            target=target.origin_form,
            authority=authority,
            scheme=pseudo.get(b":scheme", b"https"),
            headers=headers,
            http_version="3",
            client=visitor,
            server=(local[0], local[1]) if local else ("", 0),
            request_id=new_request_id(),
            tls={"alpn": "h3", "version": "TLSv1.3", "sni": self.sni},
            raw_target=pseudo.get(b":path", b""),
        )
        body = stream.body = BodyStream(limits.max_body_bytes, partial(self._consumed, sid))
        if event.stream_ended:
            body.end()
        stream.task = self._loop.create_task(self._run(request, stream, responder))

    def _data(self, event: h3e.DataReceived) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is None or stream.body is None:
            return
        if event.data:
            stream.last_data = self._loop.time()
            self.buffered += len(event.data)
            if self.buffered > self.host.cfg.quic.max_buffered_body_bytes:
                # aioquic opens receive windows as data arrives: bound what we hold
                self.host.event("h3_body_overflow", {"stream": event.stream_id})
                stream.body.fail(BodyTimeout("body arrives faster than it is read"))
                with contextlib.suppress(Exception):
                    self._quic.stop_stream(event.stream_id, ErrorCode.H3_EXCESSIVE_LOAD)
                self.transmit()
                return
            stream.body.feed(bytes(event.data))
        if event.stream_ended:
            stream.body.end()

    def _consumed(self, _sid: int, n: int) -> None:
        self.buffered = max(0, self.buffered - n)
        if not self.closed:
            self.transmit()  # window updates held back while the handler was behind

    # ------------------------------------------------------------------ handlers
    async def _run(self, request: Request, stream: _Stream, responder: H3Responder) -> None:
        assert stream.body is not None
        try:
            await run_stream_handler(
                self.host.handler, request, stream.body, responder, self.host.event
            )
        finally:
            self._stream_done(responder.stream_id)

    async def _refuse(self, responder: H3Responder, status: int) -> None:
        try:
            await responder.start(status, [(b"content-length", b"0")])
            await responder.end()
        finally:
            self._stream_done(responder.stream_id)

    def _stream_done(self, sid: int) -> None:
        stream = self.streams.pop(sid, None)
        if stream is not None and stream.body is not None and not stream.body.finished:
            # answered before the request body ended: tell the client to stop sending
            with contextlib.suppress(Exception):
                self._quic.stop_stream(sid, ErrorCode.H3_NO_ERROR)
            self.transmit()

    # ------------------------------------------------------------------ writing
    def unacked(self, sid: int) -> int:
        """Bytes of the stream's send buffer not yet acknowledged. aioquic has no send
        back-pressure API; this reads its stream sender (aioquic is pinned, see
        tests/integration/test_h3_origin.py's large-response test)."""
        stream = self._quic._streams.get(sid)
        if stream is None:
            return 0
        sender = stream.sender
        return int(sender._buffer_stop - sender._buffer_start)

    async def drain(self, sid: int) -> None:
        limits = self.host.limits
        deadline = self._loop.time() + limits.send_timeout_s
        while self.unacked(sid) > limits.body_high_water:
            if self.closed:
                raise ConnectionError("connection closed")
            left = deadline - self._loop.time()
            if left <= 0:
                self.host.event("send_timeout", {"stream": sid})
                with contextlib.suppress(Exception):
                    self._quic.reset_stream(sid, ErrorCode.H3_REQUEST_CANCELLED)
                self.transmit()
                raise ConnectionError("client stopped reading the stream")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.progress.wait(), min(left, 1.0))


class H3Responder:
    __slots__ = ("_c", "ended", "head", "started", "stream_id")

    def __init__(self, connection: H3Protocol, stream_id: int, head: bool = False) -> None:
        self._c = connection
        self.head = head
        self.stream_id = stream_id
        self.started = False
        self.ended = False

    def _h3(self) -> H3Connection:
        c = self._c
        if c.closed or c.h3 is None:
            raise ConnectionError("connection closed")
        return c.h3

    async def start(self, status: int, headers: Headers) -> None:
        h3 = self._h3()
        out = [(b":status", str(status).encode())]
        out += [(k.lower(), v) for k, v in headers if k.lower() not in _FORBIDDEN_RESPONSE_HEADERS]
        self.started = True
        try:
            h3.send_headers(self.stream_id, out)
        except Exception as exc:  # the stream was reset or the connection is closing
            raise ConnectionError(f"stream gone: {exc!r}") from None
        self._c.transmit()

    async def send(self, data: bytes) -> None:
        if self.head or not data:
            return
        h3 = self._h3()
        view = memoryview(data)
        step = 64 << 10
        while view:
            try:
                h3.send_data(self.stream_id, view[:step].tobytes(), False)
            except Exception as exc:
                raise ConnectionError(f"stream gone: {exc!r}") from None
            view = view[step:]
            self._c.transmit()
            await self._c.drain(self.stream_id)

    async def end(self) -> None:
        self.ended = True
        c = self._c
        if c.closed or c.h3 is None:
            return
        with contextlib.suppress(Exception):
            c.h3.send_data(self.stream_id, b"", True)
        c.transmit()

    def abort(self) -> None:
        self.ended = True
        c = self._c
        with contextlib.suppress(Exception):
            c._quic.reset_stream(self.stream_id, ErrorCode.H3_INTERNAL_ERROR)
        c.transmit()


# ----------------------------------------------------------------------------- Alt-Svc


class _AltSvcResponder:
    __slots__ = ("_inner", "_value")

    def __init__(self, inner: Any, value: bytes) -> None:
        self._inner = inner
        self._value = value

    @property
    def started(self) -> bool:
        return bool(self._inner.started)

    async def start(self, status: int, headers: Headers) -> None:
        if not any(k.lower() == b"alt-svc" for k, _ in headers):
            headers = [*headers, (b"alt-svc", self._value)]
        await self._inner.start(status, headers)

    async def send(self, data: bytes) -> None:
        await self._inner.send(data)

    async def end(self) -> None:
        await self._inner.end()

    def abort(self) -> None:
        self._inner.abort()


class AltSvc:
    """Advertise HTTP/3 (RFC 7838, RFC 9114 §3.1.1) on HTTP/1.1 and HTTP/2 responses over TLS
    (the application's own Alt-Svc, if any, is kept). `port()` is read per request: the
    listener's port is known once it is bound."""

    def __init__(self, handler: Handler, port: Callable[[], int], max_age_s: int) -> None:
        self.handler = handler
        self.port = port
        self.max_age_s = max_age_s

    async def __call__(self, request: Request, body: BodyStream, respond: Any) -> None:
        port = self.port()
        if port and request.http_version != "3" and request.scheme == b"https":
            value = f'h3=":{port}"; ma={self.max_age_s}'.encode()
            respond = _AltSvcResponder(respond, value)
        await self.handler(request, body, respond)


def advertised_port(cfg: OriginConfig, shared: QuicShared | None) -> int:
    if cfg.quic.advertise_port:
        return cfg.quic.advertise_port
    if shared is None or not shared.servers or shared.servers[0]._transport is None:
        return 0
    return int(shared.servers[0]._transport.get_extra_info("sockname")[1])


# ----------------------------------------------------------------------------- start


def load_bindings(cfg: OriginConfig) -> VisitorBindings:
    keys = {}
    for i, path in enumerate(cfg.quic.edge_keys):
        key = load_key(path, f"origin.quic.edge_keys[{i}]")
        keys[key_id(key)] = key
    return VisitorBindings(
        keys,
        window_s=cfg.quic.announcement_window_s,
        idle_s=cfg.quic.idle_timeout_s * 2,
        max_bindings=cfg.quic.max_connections * 4,
    )


def bind_udp(host: str, port: int, key: str) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(key, f"cannot listen on UDP {host}:{port}: {exc.strerror}") from None
    sock.setblocking(False)
    return sock


async def start_quic(host: QuicHost) -> QuicShared:
    """Open the HTTP/3 listeners of `host.cfg.quic.listen` (one aioquic server each)."""
    from blindfold.config.common import parse_hostport

    shared = QuicShared(host, load_bindings(host.cfg))
    loop = asyncio.get_running_loop()
    for i, address in enumerate(host.cfg.quic.listen):
        h, p = parse_hostport(address)
        sock = bind_udp(h, p, f"origin.quic.listen[{i}]")
        server = OriginQuicServer(shared)
        await loop.create_datagram_endpoint(partial(_Endpoint, server), sock=sock)
        shared.servers.append(server)
    return shared
