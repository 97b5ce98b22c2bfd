"""`blindfold keyserver`: mutual-TLS service that signs TLS 1.3 CertificateVerify content for
authorised edges. Each edge is known by its client certificate's SHA-256. It sends the
handshake messages themselves; the key server parses and hashes them (core.keyless_handshake),
and signs only when the SNI of the visitor's ClientHello is one of that edge's hostnames and
the Certificate message carries the certificate of the key asked for. Every request is rate
limited per edge; every signature and refusal is appended to a keyed, hash-chained audit log
before the answer leaves."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any

from blindfold.config import Config, load_file
from blindfold.config.common import check_readable, load_admin_token, parse_hostport
from blindfold.config.keyserver import EdgeAccessConfig, KeyServerConfig
from blindfold.core import keyless_handshake as kh
from blindfold.core import keyless_wire as w
from blindfold.core.fairqueue import FairQueue
from blindfold.core.iplist import IPSet, parse_list, visitor_key
from blindfold.core.ratelimit import KeyedLimiter, TokenBucket
from blindfold.core.routing import SniRouter
from blindfold.errors import ConfigError, ProtocolError
from blindfold.io.accepted import (
    BACKOFF_MIN_S,
    RESOURCE_ERRNOS,
    Backoff,
    FdReserve,
    fd_limit,
    start_tls_server,
)
from blindfold.io.admin_http import AdminServer
from blindfold.io.limits import raise_fd_limit
from blindfold.io.service import run_service
from blindfold.keyserver.access import partial_grants, too_broad
from blindfold.keyserver.audit import AuditError, AuditLog, create_key, json_str
from blindfold.keyserver.audit import load_key as load_audit_key
from blindfold.keyserver.signer import (
    SignError,
    SiteKey,
    load_key,
    sign_certificate_verify,
    utc_now,
)
from blindfold.obs.log import JsonLog, peer_text
from blindfold.obs.metrics import CERTIFICATE_METRICS, Histogram, MetricSpec, render
from blindfold.obs.status import HTML_TYPE, JSON_TYPE, PAGE, status_json

READ_SIZE = 65536
NOT_AUTHORISED = (
    "edge_not_authorised: this key server does not know this edge's certificate (never "
    "authorised, or revoked)"
)
FEED_SIZE = 16384  # frames are decoded (and queued) this many read bytes at a time
SLICE_S = 0.005  # the longest the queue is served before the event loop runs its other work
COST_BYTES = 8192  # a request costs one token (and one in-flight unit) per started 8 KiB
FD_HEADROOM = 32  # descriptors kept for the logs, the audit log, the admin listener, reloads
# accept() errors about the one connection being accepted (it was reset, or a firewall hook
# refused it): accept the next at once
_ONE_CONNECTION_ERRNOS = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EINTR})
MAX_REPLAY_ENTRIES = 200_000  # ClientHello randoms remembered (about 200 B each)
LATENCY_BUCKETS = (5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 5e-3, 2e-2)
KEYSERVER_METRICS = [
    MetricSpec(
        "blindfold_keyserver_signatures_total",
        "counter",
        "Sign requests by edge and result.",
        ("edge", "result"),
    ),
    MetricSpec(
        "blindfold_keyserver_hostname_signatures_total",
        "counter",
        "Signatures made, by the certificate name that covers the SNI (bounded by the keys' "
        "certificates: a name covered by a wildcard counts under the wildcard).",
        ("hostname",),
    ),
    MetricSpec(
        "blindfold_keyserver_sign_seconds",
        "histogram",
        "Time to authorise, sign and log one request.",
        buckets=LATENCY_BUCKETS,
    ),
    MetricSpec(
        "blindfold_keyserver_connections_total",
        "counter",
        "Edge connections by result.",
        ("result",),
    ),
    MetricSpec("blindfold_keyserver_connections_active", "gauge", "Open edge connections."),
    MetricSpec(
        "blindfold_keyserver_chains_total",
        "counter",
        "Certificate chain requests (CHAIN_REQUEST) by edge and result: ok, or why refused.",
        ("edge", "result"),
    ),
    *CERTIFICATE_METRICS,
]


class _Edge:
    __slots__ = ("bucket", "cfg", "name_json", "router", "too_broad")

    def __init__(self, cfg: EdgeAccessConfig, ks: KeyServerConfig) -> None:
        self.cfg = cfg
        self.name_json = json_str(cfg.name)
        self.router: SniRouter[bool] = SniRouter([(h, True) for h in cfg.hostnames])
        # the keys it may not sign with: their certificates cover names it is not authorised for
        self.too_broad: dict[bytes, tuple[str, ...]] = {}
        self.bucket = TokenBucket(
            cfg.rate_per_s or ks.rate_per_s, cfg.burst or ks.burst, time.monotonic()
        )


def _cost(body_bytes: int) -> int:
    """What a request costs in tokens and in-flight units: one per started COST_BYTES of its
    body (an ordinary handshake's messages, 2 to 7 KiB, cost one)."""
    return 1 + (body_bytes - 1) // COST_BYTES if body_bytes > 0 else 1


def _frame_error(exc: ProtocolError) -> str:
    return "unsupported_version" if exc.reason == "unsupported_version" else "malformed"


class _Conn:
    """An edge connection, as the queue's server sees it."""

    __slots__ = ("closed", "fp", "writer")

    def __init__(self, fp: bytes, writer: asyncio.StreamWriter) -> None:
        self.fp = fp
        self.writer = writer
        self.closed = False  # nothing more is served; answers already made are still sent

    def send(self, data: bytes) -> None:
        writer = self.writer
        if writer.is_closing():
            return
        writer.write(data)
        if self.closed:
            writer.close()

    def finish(self, data: bytes) -> None:
        self.closed = True
        self.send(data)


class _EdgeState:
    """What lives as long as the process for an edge identity (across reloads)."""

    __slots__ = ("conns", "room")

    def __init__(self) -> None:
        self.conns = 0
        self.room = asyncio.Event()  # set while it has fewer than max_inflight_per_edge queued
        self.room.set()


class _Listener:
    """The edges' listening socket and the tasks that serve it; close() stops them."""

    def __init__(self, sock: socket.socket, task: asyncio.Task[None]) -> None:
        self.sock = sock
        self.tasks = [task]

    def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        self.sock.close()


def _bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1024)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


class KeyServer:
    def __init__(self, path: str, cfg: KeyServerConfig, log: JsonLog) -> None:
        self.path = path
        self.log = log
        self.audit = _open_audit(cfg)
        self.replays = kh.ReplayGuard(cfg.replay_window_s, MAX_REPLAY_ENTRIES)
        self.admin = AdminServer(
            self._admin,
            load_admin_token(cfg.admin_token_file, "keyserver.admin_token_file"),
            post_paths=frozenset({"/acme/renew"}),
        )
        self.counts: dict[tuple[str, str], int] = {}
        self.host_counts: dict[str, int] = {}
        self.conn_counts: dict[str, int] = {}
        self.latency = Histogram(LATENCY_BUCKETS)
        self.writers: dict[asyncio.StreamWriter, bytes] = {}  # connection -> edge fingerprint
        self.handlers: set[asyncio.Task[Any]] = set()
        self.stopping = asyncio.Event()
        self.queue: FairQueue[bytes, tuple[_Conn, w.Frame]] = FairQueue()
        self._work = asyncio.Event()
        self.edge_states: dict[bytes, _EdgeState] = {}
        self.open_conns = 0
        self.max_conns = cfg.max_connections
        self.per_source = KeyedLimiter(0.0, 1, cfg.max_connections_per_source, 65536)
        self.chain_counts: dict[tuple[str, str], int] = {}
        self.reload_counts: dict[tuple[str, str], int] = {}
        self.acme: Any = None  # acme.client.AcmeManager for [keyserver.acme]
        if cfg.acme is not None:
            self.acme = _acme_manager(cfg, log.emit, self._acme_installed)
        self._apply(cfg)

    def _apply(self, cfg: KeyServerConfig, *, first: bool = True) -> None:
        """Keys and edges change on reload; the listener's own TLS files at restart."""
        # validity is checked for replaced files (reload_files), not here: an ACME placeholder
        # that expired while the CA was away must not block a SIGHUP
        keys = [load_key(i, k) for i, k in enumerate(cfg.keys)]
        old = getattr(self, "edges", {})
        edges = {}
        for e in cfg.edges:
            kept = old.get(e.fingerprint)
            edge = _Edge(e, cfg)
            if kept is not None and kept.cfg == e:
                edge.bucket = kept.bucket
            edge.too_broad = too_broad(e.hostnames, keys)
            edges[e.fingerprint] = edge
        for grant in partial_grants(cfg.edges, keys):
            self.log.emit(
                "edge_key_partly_authorised",
                edge=grant.edge,
                key=grant.key,
                unauthorised=list(grant.unauthorised),
                problem=grant.text(),
            )
        self.cfg = cfg
        if not first:
            self.replays.window_s = cfg.replay_window_s
        self.allowed = (
            IPSet(parse_list("\n".join(cfg.allowed_sources))[0]) if cfg.allowed_sources else None
        )
        self.per_source.configure(0.0, 1, cfg.max_connections_per_source, 65536)
        if not first:
            self._set_conn_cap()
        self.key_list: list[SiteKey] = keys  # in configuration order
        self.key_stamps: list[tuple[Any, ...]] = [_stamp(k) for k in cfg.keys]
        # a change is loaded once it has stayed the same for one poll: an ACME client renames
        # the key and the certificate one after the other, never load between the two
        self.key_seen: list[tuple[Any, ...]] = list(self.key_stamps)
        # certificates replaced by a renewal (a replaced file, an ACME order), still signed
        # for during previous_certificate_grace_s: an edge serves the old chain until its next
        # chain request. A SIGHUP ends it (after replacing a compromised key).
        self.previous: list[tuple[SiteKey, float]] = []
        self.keys: dict[bytes, SiteKey] = {k.cert_sha256: k for k in keys}
        self.edges: dict[bytes, _Edge] = edges
        if first:
            self.tls = self._tls(cfg)

    @staticmethod
    def _tls(cfg: KeyServerConfig) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.verify_mode = ssl.CERT_REQUIRED
        check_readable(
            ("keyserver.cert", cfg.cert),
            ("keyserver.key", cfg.key),
            ("keyserver.client_ca", cfg.client_ca),
        )
        try:
            ctx.load_cert_chain(cfg.cert, cfg.key)
            ctx.load_verify_locations(cafile=cfg.client_ca)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError("keyserver", f"cannot load the TLS files: {exc}") from None
        return ctx

    # ------------------------------------------------------------------ serving
    # Connections are accepted here (not by asyncio.start_server) so that a stranger is turned
    # away before it costs a TLS handshake: the address filter, a cap on open connections and one
    # per source address, a short handshake deadline, and a pause instead of a traceback when
    # descriptors run out (a reserve descriptor lets the waiting client get a close). Each edge
    # connection's task only reads and decodes frames and queues them per edge; one task serves
    # the queue (core.fairqueue: edges in turn, weighted by cost) in slices of at most SLICE_S,
    # answering each connection once per slice, after the slice's audit lines are written.
    async def start(self) -> dict[str, Any]:
        """Listen (io.service.Service)."""
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(self._loop_exception)
        raise_fd_limit()  # the soft limit up to the hard one (the unit sets LimitNOFILE)
        self._set_conn_cap()
        host, port = parse_hostport(self.cfg.address)
        try:
            lsock = _bind(host, port)
            admin = await self.admin.start(*parse_hostport(self.cfg.admin_listen))
        except OSError as exc:
            raise ConfigError("keyserver.listen", f"cannot listen: {exc.strerror}") from None
        self.reserve = FdReserve()
        self.server = _Listener(lsock, loop.create_task(self._accept_loop(lsock)))
        self.server.tasks.append(loop.create_task(self._serve_queue()))
        self.server.tasks.append(loop.create_task(self._watch_files()))
        sock = lsock.getsockname()
        self._flusher = loop.create_task(self._flush_logs())
        if self.acme is not None:
            self.server.tasks.append(loop.create_task(self._run_acme()))
        if self.audit.recovered:
            self.log.emit(
                "audit_recovered",
                cut_bytes=self.audit.recovered,
                detail="a partial last line (a write cut short, never acknowledged) was cut; "
                "a 'recovered' entry records it",
            )
        return {
            "listen": [f"{sock[0]}:{sock[1]}"],
            "admin": f"{admin[0]}:{admin[1]}",
            "keys": [k.name for k in self.keys.values()],
            "edges": [e.cfg.name for e in self.edges.values()],
            **self._audit_state(),
        }

    def _set_conn_cap(self) -> None:
        """max_connections, lowered to what the open-files limit leaves room for."""
        cfg = self.cfg
        limit = fd_limit()
        self.max_conns = min(cfg.max_connections, max(1, limit - FD_HEADROOM))
        if self.max_conns < cfg.max_connections:
            self.log.emit(
                "fd_limit_low",
                limit=limit,
                max_connections=self.max_conns,
                problem="keyserver.max_connections cannot all be open: each takes a "
                "descriptor; raise `ulimit -n` (LimitNOFILE) or lower max_connections",
            )

    def _loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """asyncio's own server (the admin listener) reports EMFILE at accept with a traceback,
        then pauses by itself: one log line instead, as for the edges' listener."""
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in RESOURCE_ERRNOS:
            self.log.emit("accept_paused", listener="admin", error=str(exc), limit=fd_limit())
            return
        loop.default_exception_handler(context)

    def _audit_state(self) -> dict[str, Any]:
        """The chain's end, for a copy kept apart from the log (cutting lines off the end
        is visible only against one)."""
        return {"audit_entries": self.audit.seq, "audit_last_mac": self.audit.prev}

    def _count_conn(self, result: str) -> None:
        self.conn_counts[result] = self.conn_counts.get(result, 0) + 1

    async def _accept_loop(self, lsock: socket.socket) -> None:
        """Accept until closed. Running out of descriptors pauses accepting (doubling up to
        1 s) after the reserve descriptor has accepted and closed one waiting connection."""
        loop = asyncio.get_running_loop()
        backoff = Backoff()
        while True:
            try:
                sock, peer = await loop.sock_accept(lsock)
            except OSError as exc:
                if exc.errno in _ONE_CONNECTION_ERRNOS:
                    continue
                if exc.errno in RESOURCE_ERRNOS:
                    shed = self.reserve.shed_one(lsock)
                    self._count_conn("refused_fd_limit" if shed else "fd_limit")
                delay = backoff.failed()
                if delay == BACKOFF_MIN_S:  # once per episode
                    self.log.emit(
                        "accept_paused", listener="edges", error=str(exc), limit=fd_limit()
                    )
                await asyncio.sleep(delay)
                continue
            backoff.succeeded()
            try:
                self._accepted(sock, peer)
            except Exception as exc:  # never the accept loop's end
                sock.close()
                self.log.emit("accept_error", error=repr(exc))

    def _accepted(self, sock: socket.socket, peer: tuple[Any, ...]) -> None:
        ip = str(peer[0])
        if self.allowed is not None and not self.allowed.contains_text(ip):
            self._count_conn("refused_source")
            sock.close()
            return
        if self.open_conns >= self.max_conns:
            self._count_conn("refused_max_connections")
            sock.close()
            return
        source = visitor_key(ip)
        if self.per_source.try_open(source, time.monotonic()) is not None:
            self._count_conn("refused_per_source")
            sock.close()
            return
        self.open_conns += 1
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        task = asyncio.get_running_loop().create_task(self._connection(sock, source))
        self.handlers.add(task)
        task.add_done_callback(self.handlers.discard)

    async def _connection(self, sock: socket.socket, source: str) -> None:
        try:
            try:
                reader, writer = await start_tls_server(
                    sock, self.tls, self.cfg.tls_handshake_timeout_s, READ_SIZE
                )
            except (ssl.SSLError, OSError, TimeoutError) as exc:  # ConnectionError included
                timed_out = isinstance(exc, (TimeoutError, ConnectionAbortedError))
                self._count_conn("handshake_timeout" if timed_out else "tls_failed")
                sock.close()
                return
            await self._serve_edge(reader, writer)
        except asyncio.CancelledError:
            # Shutting down: returning (not re-raising) keeps the loop's exit quiet.
            pass
        finally:
            self.open_conns -= 1
            self.per_source.release(source)

    async def _serve_edge(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        obj = writer.get_extra_info("ssl_object")
        der = obj.getpeercert(binary_form=True) if obj is not None else None
        fp = hashlib.sha256(der).digest() if der else b""
        edge = self.edges.get(fp)
        if edge is None:
            # Unknown or revoked: say so at once, as a connection-level ERROR frame (request
            # id 0), so the edge fails its handshakes now with the reason rather than retry
            # until its deadline.
            self._count_conn("unknown_edge")
            self.log.log(
                "edge_refused",
                peer=peer_text(writer.get_extra_info("peername")),
                reason="unknown_edge",
                cert_sha256=fp.hex(),
            )
            writer.write(w.encode_error(0, w.E_UNAUTHORIZED, NOT_AUTHORISED))
            with contextlib.suppress(ConnectionError, ssl.SSLError, OSError, TimeoutError):
                async with asyncio.timeout(1.0):
                    await writer.drain()
            writer.close()
            return
        state = self._edge_state(fp)
        if state.conns >= self.cfg.max_connections_per_edge:
            self._count_conn("refused_per_edge")
            self.log.log(
                "edge_refused",
                edge=edge.cfg.name,
                reason="max_connections_per_edge",
                limit=self.cfg.max_connections_per_edge,
            )
            writer.close()
            return
        self._count_conn("ok")
        state.conns += 1
        self.writers[writer] = fp
        conn = _Conn(fp, writer)
        decoder = w.FrameDecoder()
        queue = self.queue
        try:
            while not conn.closed:
                try:
                    async with asyncio.timeout(self.cfg.idle_timeout_s):
                        data = await reader.read(READ_SIZE)
                except TimeoutError:
                    break
                if not data:
                    break
                # Fed in slices so that a read of tiny frames queues at most a slice's worth
                # beyond the edge's in-flight limit.
                for at in range(0, len(data), FEED_SIZE):
                    while queue.pending(fp) >= self.cfg.max_inflight_per_edge:
                        state.room.clear()
                        await state.room.wait()
                    if conn.closed:
                        break
                    try:
                        frames = decoder.feed(data[at : at + FEED_SIZE])
                    except ProtocolError as exc:
                        # answered in the peer's framing (an old edge can read why), then closed
                        conn.finish(w.refusal(decoder, exc))
                        self._count(edge.cfg.name, _frame_error(exc))
                        if exc.reason == "unsupported_version":
                            self.log.log(
                                "edge_refused",
                                edge=edge.cfg.name,
                                reason=exc.reason,
                                detail=exc.detail,
                            )
                        break
                    for frame in frames:
                        queue.push(fp, (conn, frame), _cost(len(frame.body)))
                    if frames:
                        self._work.set()
                await writer.drain()
        except (ConnectionError, ssl.SSLError, OSError):
            pass
        finally:
            conn.closed = True
            state.conns -= 1
            self.writers.pop(writer, None)
            with contextlib.suppress(Exception):
                writer.close()

    def _edge_state(self, fp: bytes) -> _EdgeState:
        state = self.edge_states.get(fp)
        if state is None:
            state = self.edge_states[fp] = _EdgeState()
        return state

    async def _serve_queue(self) -> None:
        """Serve the queued requests, edges in turn, in slices of at most SLICE_S of work with
        the event loop's other work (reads, accepts, writes) between them."""
        try:
            while True:
                await self._work.wait()
                self._work.clear()
                while self.queue:
                    self._serve_slice()
                    await asyncio.sleep(0)
        finally:  # stopped: let connections waiting for room see their writers closed
            for state in self.edge_states.values():
                state.room.set()

    def _serve_slice(self) -> None:
        queue = self.queue
        deadline = time.perf_counter() + SLICE_S
        answered: dict[_Conn, list[bytes]] = {}
        while (got := queue.pop()) is not None:
            fp, (conn, frame) = got
            if conn.closed:
                continue
            edge = self.edges.get(fp)  # re-read: SIGHUP may have revoked it
            if edge is None:
                out = w.encode_error(frame.request_id, w.E_UNAUTHORIZED, NOT_AUTHORISED)
                conn.closed = True
            else:
                try:
                    out = self._handle(edge, frame)
                except ProtocolError as exc:
                    # A malformed frame from an authenticated edge is a bug or an attack;
                    # either way the stream can no longer be trusted: answer and close.
                    self._count(edge.cfg.name, "malformed")
                    out = w.encode_error(frame.request_id, w.E_MALFORMED, exc.detail)
                    conn.closed = True
            parts = answered.get(conn)
            if parts is None:
                answered[conn] = [out]
            else:
                parts.append(out)
            if time.perf_counter() > deadline:
                break
        self.audit.flush()  # the audit lines before the answers they record
        for conn, parts in answered.items():
            conn.send(b"".join(parts))
        for fp, state in self.edge_states.items():
            if not state.room.is_set() and queue.pending(fp) < self.cfg.max_inflight_per_edge:
                state.room.set()

    def _count(self, edge: str, result: str) -> None:
        key = (edge, result)
        self.counts[key] = self.counts.get(key, 0) + 1

    def _handle(self, edge: _Edge, frame: w.Frame) -> bytes:
        rid = frame.request_id
        name = edge.cfg.name
        if frame.type == w.PING:
            return w.encode_frame(w.PONG, rid, b"")
        if frame.type == w.CHAIN_REQUEST:
            return self._chain(edge, frame)
        if frame.type != w.SIGN_REQUEST:
            raise ProtocolError(
                "bad_frame_type", "only sign requests, chain requests and pings are accepted"
            )
        t0 = time.perf_counter()
        req = w.decode_sign_request(frame.body)  # ProtocolError closes the connection
        now = time.monotonic()
        # The bucket first: it bounds all the work an edge can cause, refusals and their
        # audit lines included. A request costs a token per started COST_BYTES (hashing and
        # reading it is work too), never more than the burst (or it could never pass).
        if not edge.bucket.allow(now, min(_cost(len(frame.body)), edge.bucket.burst)):
            self._count(name, "rate_limited")
            return w.encode_error(rid, w.E_RATE_LIMITED, f"edge {name} is over its signature rate")
        hs: kh.Handshake | None = None
        try:
            hs = kh.parse_handshake(req.messages)
            site = kh.authorise(hs, req.scheme, edge.router.lookup, self.keys, edge.too_broad)
            repeat = self.replays.check(hs, name, now)
            signature = sign_certificate_verify(site, req.scheme, hs.transcript_hash)
        except (ProtocolError, SignError) as exc:
            reason = exc.reason if isinstance(exc, ProtocolError) else "sign_failed"
            detail = exc.detail if isinstance(exc, ProtocolError) else str(exc)
            self._count(name, reason)
            self.audit.append(
                event="refused",
                edge=name,
                reason=reason,
                detail=detail[:200],
                verified=_verified(hs) if hs is not None else {},
                claimed={"client": req.client, "scheme": f"0x{req.scheme:04x}"},
            )
            self.log.log(
                "sign_refused",
                edge=name,
                reason=reason,
                sni=hs.sni if hs is not None else None,
                client=req.client,
                detail=detail[:200],
            )
            code = (
                exc.code
                if isinstance(exc, SignError)
                else w.REFUSAL_CODES.get(reason, w.E_BAD_HANDSHAKE)
            )
            return w.encode_error(rid, code, f"{reason}: {detail}")
        self.replays.remember(hs, name, now)
        self.audit.append_json(
            signed_entry(edge.name_json, site.name, hs, req.scheme, req.client, repeat)
        )
        self._count(name, "ok")
        host = _hostname_label(hs.sni, site.names)
        self.host_counts[host] = self.host_counts.get(host, 0) + 1
        self.latency.observe(time.perf_counter() - t0)
        return w.encode_sign_response(rid, signature)

    def _chain(self, edge: _Edge, frame: w.Frame) -> bytes:
        """The current chain of a hostname this edge is authorised for (docs/keyless-protocol.md
        "Chain requests"): only a certificate it may have handshakes signed with, i.e. one whose
        every name the edge is authorised for. A refusal is audited."""
        rid = frame.request_id
        name = edge.cfg.name
        if not edge.bucket.allow(time.monotonic(), 1):
            self._count_chain(name, "rate_limited")
            return w.encode_error(rid, w.E_RATE_LIMITED, f"edge {name} is over its request rate")
        hostname = w.decode_chain_request(frame.body)  # ProtocolError closes the connection
        reason = ""
        site: SiteKey | None = None
        if kh.uncovered_names([hostname], edge.cfg.hostnames):
            reason = "unauthorized_sni"
        else:
            sites = [k for k in self.key_list if not kh.uncovered_names([hostname], k.names)]
            allowed = [k for k in sites if k.cert_sha256 not in edge.too_broad]
            if not sites:
                reason = "no_certificate"
            elif not allowed:
                reason = "certificate_too_broad"
            else:
                site = max(allowed, key=lambda k: k.not_after)
        if site is None:
            self._count_chain(name, reason)
            self.audit.append(
                event="chain_refused", edge=name, reason=reason, claimed={"hostname": hostname}
            )
            self.log.log("chain_refused", edge=name, reason=reason, hostname=hostname)
            code = w.E_UNKNOWN_KEY if reason == "no_certificate" else w.E_UNAUTHORIZED
            return w.encode_error(rid, code, f"{reason}: no chain for {hostname} for edge {name}")
        # a chain is larger than a request: charged like a request of its size (one token per
        # started COST_BYTES), so an edge cannot turn its rate into 64 KiB answers at no cost
        extra = _cost(sum(len(d) for d in site.chain)) - 1
        if extra > 0 and not edge.bucket.allow(time.monotonic(), min(extra, edge.bucket.burst)):
            self._count_chain(name, "rate_limited")
            return w.encode_error(rid, w.E_RATE_LIMITED, f"edge {name} is over its request rate")
        try:
            out = w.encode_chain_response(rid, site.chain)
        except ValueError:  # load_key bounds chains: not expected
            self._count_chain(name, "internal")
            return w.encode_error(rid, w.E_INTERNAL, "internal: the chain does not fit a frame")
        self._count_chain(name, "ok")
        return out

    def _count_chain(self, edge: str, result: str) -> None:
        key = (edge, result)
        self.chain_counts[key] = self.chain_counts.get(key, 0) + 1

    # ------------------------------------------------------------------ replaced files
    async def _watch_files(self) -> None:
        """Poll the keys' files (inode, size, mtime; no inotify needed) and swap in a replaced
        pair that fits; keep the old one otherwise."""
        while True:
            interval = self.cfg.reload_interval_s
            await asyncio.sleep(interval if interval > 0 else 5.0)
            if interval > 0:
                try:
                    self.reload_files()
                except Exception as exc:  # never the watcher's end
                    self.log.emit("key_reload_error", error=repr(exc))

    def reload_files(self, *, force: bool = False) -> None:
        cfg = self.cfg
        mono = time.monotonic()
        changed = False
        if any(until <= mono for _, until in self.previous):
            self.previous = [(k, until) for k, until in self.previous if until > mono]
            changed = True
        keys = list(self.key_list)
        for i, kc in enumerate(cfg.keys):
            stamp = _stamp(kc)
            if stamp == self.key_stamps[i]:
                continue
            if stamp != self.key_seen[i] and not force:
                self.key_seen[i] = stamp  # changed since the last poll: wait until it settles
                continue
            self.key_stamps[i] = stamp  # tried once per change: a broken file is not retried
            old = keys[i]
            try:
                new = load_key(i, kc, now=utc_now(), previous=old.names)
            except ConfigError as exc:
                self.reload_counts[(old.name, "invalid")] = (
                    self.reload_counts.get((old.name, "invalid"), 0) + 1
                )
                self.log.emit(
                    "key_reload_failed",
                    key=old.name,
                    error=str(exc),
                    detail="the certificate in service stays",
                )
                continue
            if new.cert_sha256 == old.cert_sha256 and new.key is old.key:
                continue
            keys[i] = new
            changed = True
            if cfg.previous_certificate_grace_s > 0:
                self.previous.append((old, mono + cfg.previous_certificate_grace_s))
            self.reload_counts[(new.name, "swapped")] = (
                self.reload_counts.get((new.name, "swapped"), 0) + 1
            )
            self.log.emit(
                "key_reloaded",
                key=new.name,
                certificate_sha256=new.cert_sha256.hex(),
                not_after=new.not_after,
            )
        if changed:
            self.key_list = keys
            signing = [k for k, _ in self.previous] + keys  # the current one wins a tie
            self.keys = {k.cert_sha256: k for k in signing}
            for edge in self.edges.values():
                edge.too_broad = too_broad(edge.cfg.hostnames, signing)

    # ------------------------------------------------------------------ admin, lifecycle
    async def _admin(self, method: str, path: str) -> tuple[int, str, bytes]:
        if path == "/healthz":
            return 200, "application/json", b'{"status":"ok"}\n'
        if path == "/metrics":
            text = render(self.snapshot(), self._metric_specs())
            return 200, "text/plain; version=0.0.4", text.encode()
        if path == "/":
            return 200, HTML_TYPE, PAGE
        if path == "/status.json":
            now = time.time()
            info = {
                "audit": {
                    "entries": self.audit.seq,
                    "last MAC": self.audit.prev,
                    "file": self.cfg.audit_log,
                },
                "certificates": [
                    {
                        "name": name,
                        "not_after": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t)),
                        "seconds_left": round(t - now),
                    }
                    for name, t in ((k.name, k.not_after) for k in self.key_list)
                ],
            }
            body = status_json(
                "keyserver", socket.gethostname(), self.snapshot(), self._metric_specs(), info, now
            )
            return 200, JSON_TYPE, body
        if path == "/acme/renew" and self.acme is not None:
            if method != "POST":
                return 405, "text/plain", b"POST renews every ACME certificate now\n"
            if not self.acme.force():
                return 429, "text/plain", b"a forced renewal is already under way\n"
            return 202, "application/json", b'{"status":"renewing"}\n'
        return 404, "text/plain", b"not found\n"

    def _metric_specs(self) -> list[MetricSpec]:
        if self.acme is None:
            return KEYSERVER_METRICS
        from blindfold.acme.client import METRICS as ACME_METRICS

        return KEYSERVER_METRICS + list(ACME_METRICS)

    def snapshot(self) -> dict[str, list[list[Any]]]:
        snap = self._snapshot()
        if self.acme is not None:
            snap.update(self.acme.snapshot())
        return snap

    def _snapshot(self) -> dict[str, list[list[Any]]]:
        now = utc_now()
        return {
            "blindfold_keyserver_signatures_total": [
                [[e, r], n] for (e, r), n in self.counts.items()
            ],
            "blindfold_keyserver_hostname_signatures_total": [
                [[h], n] for h, n in self.host_counts.items()
            ],
            "blindfold_keyserver_sign_seconds": [[[], self.latency.value()]],
            "blindfold_keyserver_connections_total": [
                [[r], n] for r, n in self.conn_counts.items()
            ],
            "blindfold_keyserver_connections_active": [[[], len(self.writers)]],
            "blindfold_keyserver_chains_total": [
                [[e, r], n] for (e, r), n in self.chain_counts.items()
            ],
            "blindfold_certificate_expiry_seconds": [
                [["keyserver", k.names[0] if k.names else "", k.name], k.not_after - now]
                for k in self.key_list
            ],
            "blindfold_certificate_reloads_total": [
                [["keyserver", k, r], n] for (k, r), n in self.reload_counts.items()
            ],
        }

    # ------------------------------------------------------------------ ACME
    def _acme_installed(self, order: Any) -> None:
        """A renewed chain is on disk, checked against the key kept here: sign for it now
        (no wait for the files to settle), and for the chain it replaced during
        previous_certificate_grace_s, which the edges present until their next chain request."""
        self.reload_files(force=True)

    async def _run_acme(self) -> None:
        try:
            await self.acme.run()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug here must not end the key server: log it
            self.log.emit("acme_stopped", error=f"{type(exc).__name__}: {exc}"[:300])

    def reload(self) -> None:
        try:
            config, _ = load_file(self.path)
            if config.keyserver is None:
                raise ConfigError("keyserver", "the config has no [keyserver] section")
            self._apply(config.keyserver, first=False)
        except ConfigError as exc:
            self.log.emit("reload_failed", error=str(exc))
            return
        revoked = [wr for wr, fp in self.writers.items() if fp not in self.edges]
        for writer in revoked:
            writer.close()
        self.log.emit(
            "reloaded", edges=[e.cfg.name for e in self.edges.values()], closed=len(revoked)
        )

    def stop(self) -> None:
        self.stopping.set()

    async def serve(self) -> int:
        await self.stopping.wait()
        self._flusher.cancel()
        self.server.close()
        for writer in list(self.writers):
            writer.close()
        if self.handlers:  # let them finish (their audit lines included) before the log closes
            await asyncio.wait(list(self.handlers), timeout=2.0)
        self.audit.close()
        await self.admin.close()
        self.log.emit("keyserver_stopped", **self._audit_state())
        return 0

    async def _flush_logs(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            self.log.flush()
            self.audit.flush()


def _stamp(kc: Any) -> tuple[Any, ...]:
    """What changes when a file is replaced (a rename gives a new inode) or rewritten."""
    out: list[Any] = []
    for path in (kc.certificate, kc.key):
        if not path:
            continue
        try:
            st = os.stat(path)
            out.append((st.st_ino, st.st_size, st.st_mtime_ns))
        except OSError:
            out.append(None)
    return tuple(out)


def _verified(hs: kh.Handshake) -> dict[str, str]:
    """What the key server read in the handshake messages itself (the audit's "verified")."""
    return {
        "sni": hs.sni,
        "client_random": hs.client_random.hex(),
        "cipher_suite": f"0x{hs.cipher_suite:04x}",
        "certificate_sha256": hs.certificate_sha256.hex(),
        "transcript_hash": hs.transcript_hash.hex(),
    }


def signed_entry(
    edge_json: str, key: str, hs: kh.Handshake, scheme: int, client: str, repeat: bool
) -> str:
    """The audit entry of a signature, as JSON members: what `AuditLog.append(event="signed",
    edge=..., key=..., verified={**_verified(hs), "scheme": ...}, claimed={"client": ...})`
    writes, formatted here because json.dumps of nested dicts was a tenth of a request's cost.
    `edge_json` is the edge's name already encoded."""
    return (
        f'"event":"signed","edge":{edge_json},"key":{json_str(key)},'
        f'"verified":{{"sni":{json_str(hs.sni)},"client_random":"{hs.client_random.hex()}",'
        f'"cipher_suite":"0x{hs.cipher_suite:04x}",'
        f'"certificate_sha256":"{hs.certificate_sha256.hex()}",'
        f'"transcript_hash":"{hs.transcript_hash.hex()}","scheme":"0x{scheme:04x}"}},'
        f'"claimed":{{"client":{json_str(client)}}}' + (',"repeat":true' if repeat else "")
    )


def _hostname_label(sni: str | None, names: tuple[str, ...]) -> str:
    """The certificate name a signed SNI is counted under: itself, or its wildcard."""
    if sni in names:
        return sni
    wildcard = "*." + (sni or "").partition(".")[2]
    return wildcard if wildcard in names else "other"


def _open_audit(cfg: KeyServerConfig) -> AuditLog:
    """The audit log, its whole chain verified; the key created at the first start only."""
    log_has_entries = os.path.exists(cfg.audit_log) and os.path.getsize(cfg.audit_log) > 0
    try:
        if os.path.exists(cfg.audit_key):
            key = load_audit_key(cfg.audit_key)
        elif log_has_entries:
            raise AuditError(
                f"{cfg.audit_key} is missing, but the audit log {cfg.audit_log} has entries "
                "made with a key: restore the key file (or move the log aside)"
            )
        else:
            key = create_key(cfg.audit_key)
    except AuditError as exc:
        raise ConfigError("keyserver.audit_key", str(exc)) from None
    try:
        return AuditLog(cfg.audit_log, key)
    except AuditError as exc:
        raise ConfigError("keyserver.audit_log", str(exc)) from None


def _acme_manager(
    cfg: KeyServerConfig, log: Callable[..., None], installed: Callable[[Any], None]
) -> Any:
    """[keyserver.acme]: the keys (made here) and placeholders before the keys load."""
    from blindfold.acme.client import AcmeManager
    from blindfold.errors import VerificationError

    assert cfg.acme is not None
    manager = AcmeManager(cfg.acme, log, installed)
    try:
        manager.prepare()
    except (OSError, ValueError, VerificationError) as exc:
        raise ConfigError("keyserver.acme", f"cannot prepare the key files: {exc}") from None
    return manager


def run_keyserver(path: str) -> int:
    """`blindfold keyserver --config FILE`. Returns the exit code (2 for configuration errors,
    an audit log that does not verify included)."""

    def make(config: Config, _text: str, path: str, log: JsonLog) -> KeyServer:
        assert config.keyserver is not None
        return KeyServer(path, config.keyserver, log)

    return run_service("keyserver", path, "keyserver", "keyserver", make)
