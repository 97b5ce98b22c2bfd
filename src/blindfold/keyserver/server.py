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
import hashlib
import os
import ssl
import time
from typing import Any

from blindfold.config import Config, load_file
from blindfold.config.common import parse_hostport
from blindfold.config.keyserver import EdgeAccessConfig, KeyServerConfig
from blindfold.core import keyless_handshake as kh
from blindfold.core import keyless_wire as w
from blindfold.core.ratelimit import TokenBucket
from blindfold.core.routing import SniRouter
from blindfold.errors import ConfigError, ProtocolError
from blindfold.io.admin_http import AdminServer
from blindfold.io.service import run_service
from blindfold.keyserver.audit import AuditError, AuditLog, create_key, json_str
from blindfold.keyserver.audit import load_key as load_audit_key
from blindfold.keyserver.signer import SignError, SiteKey, load_key, sign_certificate_verify
from blindfold.obs.log import JsonLog
from blindfold.obs.metrics import Histogram, MetricSpec, render

READ_SIZE = 65536
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
]


class _Edge:
    __slots__ = ("bucket", "cfg", "name_json", "router")

    def __init__(self, cfg: EdgeAccessConfig, ks: KeyServerConfig) -> None:
        self.cfg = cfg
        self.name_json = json_str(cfg.name)
        self.router: SniRouter[bool] = SniRouter([(h, True) for h in cfg.hostnames])
        self.bucket = TokenBucket(
            cfg.rate_per_s or ks.rate_per_s, cfg.burst or ks.burst, time.monotonic()
        )


class KeyServer:
    def __init__(self, path: str, cfg: KeyServerConfig, log: JsonLog) -> None:
        self.path = path
        self.log = log
        self.audit = _open_audit(cfg)
        self.replays = kh.ReplayGuard(cfg.replay_window_s, MAX_REPLAY_ENTRIES)
        self.admin = AdminServer(self._admin)
        self.counts: dict[tuple[str, str], int] = {}
        self.conn_counts: dict[str, int] = {}
        self.latency = Histogram(LATENCY_BUCKETS)
        self.writers: dict[asyncio.StreamWriter, bytes] = {}  # connection -> edge fingerprint
        self.handlers: set[asyncio.Task[Any]] = set()
        self.stopping = asyncio.Event()
        self._apply(cfg)

    def _apply(self, cfg: KeyServerConfig, *, first: bool = True) -> None:
        """Keys and edges change on reload; the listener's own TLS files at restart."""
        keys = [load_key(i, k) for i, k in enumerate(cfg.keys)]
        old = getattr(self, "edges", {})
        edges = {}
        for e in cfg.edges:
            kept = old.get(e.fingerprint)
            edge = _Edge(e, cfg)
            if kept is not None and kept.cfg == e:
                edge.bucket = kept.bucket
            edges[e.fingerprint] = edge
        self.cfg = cfg
        if not first:
            self.replays.window_s = cfg.replay_window_s
        self.keys: dict[bytes, SiteKey] = {k.cert_sha256: k for k in keys}
        self.edges: dict[bytes, _Edge] = edges
        if first:
            self.tls = self._tls(cfg)

    @staticmethod
    def _tls(cfg: KeyServerConfig) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.verify_mode = ssl.CERT_REQUIRED
        try:
            ctx.load_cert_chain(cfg.cert, cfg.key)
            ctx.load_verify_locations(cafile=cfg.client_ca)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError("keyserver", f"cannot load the TLS files: {exc}") from None
        return ctx

    # ------------------------------------------------------------------ serving
    async def start(self) -> dict[str, Any]:
        """Listen (io.service.Service)."""
        host, port = parse_hostport(self.cfg.listen)
        try:
            self.server = await asyncio.start_server(
                self._serve, host, port, ssl=self.tls, ssl_handshake_timeout=10, limit=READ_SIZE
            )
            admin = await self.admin.start(*parse_hostport(self.cfg.admin_listen))
        except OSError as exc:
            raise ConfigError("keyserver.listen", f"cannot listen: {exc.strerror}") from None
        sock = self.server.sockets[0].getsockname()
        self._flusher = asyncio.get_running_loop().create_task(self._flush_logs())
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

    def _audit_state(self) -> dict[str, Any]:
        """The chain's end, for a copy kept apart from the log (cutting lines off the end
        is visible only against one)."""
        return {"audit_entries": self.audit.seq, "audit_last_mac": self.audit.prev}

    def _count_conn(self, result: str) -> None:
        self.conn_counts[result] = self.conn_counts.get(result, 0) + 1

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.handlers.add(task)
        try:
            await self._serve_edge(reader, writer)
        except asyncio.CancelledError:
            # Shutting down. Returning (not re-raising) keeps asyncio.start_server's done
            # callback quiet (Python 3.11 logs a cancelled handler task as an error).
            pass
        finally:
            self.handlers.discard(task)

    async def _serve_edge(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        obj = writer.get_extra_info("ssl_object")
        der = obj.getpeercert(binary_form=True) if obj is not None else None
        fp = hashlib.sha256(der).digest() if der else b""
        edge = self.edges.get(fp)
        if edge is None:
            self._count_conn("unknown_edge")
            self.log.log(
                "edge_refused", peer=str(writer.get_extra_info("peername")), cert_sha256=fp.hex()
            )
            writer.close()
            return
        self._count_conn("ok")
        self.writers[writer] = fp
        name = edge.cfg.name
        decoder = w.FrameDecoder()
        try:
            while True:
                try:
                    async with asyncio.timeout(self.cfg.idle_timeout_s):
                        data = await reader.read(READ_SIZE)
                except TimeoutError:
                    break
                if not data:
                    break
                try:
                    frames = decoder.feed(data)
                except ProtocolError as exc:
                    # answered in the peer's framing (an old edge can read why), then closed
                    writer.write(w.refusal(decoder, exc))
                    if exc.reason == "unsupported_version":
                        self._count(name, "unsupported_version")
                        self.log.log(
                            "edge_refused", edge=name, reason=exc.reason, detail=exc.detail
                        )
                    else:
                        self._count(name, "malformed")
                    break
                out = bytearray()
                close = False
                for frame in frames:
                    edge = self.edges.get(fp)  # re-read: SIGHUP may have revoked it
                    if edge is None:
                        out += w.encode_error(
                            frame.request_id, w.E_UNAUTHORIZED, "this edge is no longer authorised"
                        )
                        close = True
                        break
                    try:
                        out += self._handle(edge, frame)
                    except ProtocolError as exc:
                        # A malformed frame from an authenticated edge is a bug or an attack;
                        # either way the stream can no longer be trusted: answer and close.
                        self._count(edge.cfg.name, "malformed")
                        out += w.encode_error(frame.request_id, w.E_MALFORMED, exc.detail)
                        close = True
                        break
                self.audit.flush()
                writer.write(bytes(out))
                await writer.drain()
                if close:
                    break
        except (ConnectionError, ssl.SSLError, OSError):
            pass
        finally:
            self.writers.pop(writer, None)
            with contextlib.suppress(Exception):
                writer.close()

    def _count(self, edge: str, result: str) -> None:
        key = (edge, result)
        self.counts[key] = self.counts.get(key, 0) + 1

    def _handle(self, edge: _Edge, frame: w.Frame) -> bytes:
        rid = frame.request_id
        name = edge.cfg.name
        if frame.type == w.PING:
            return w.encode_frame(w.PONG, rid, b"")
        if frame.type != w.SIGN_REQUEST:
            raise ProtocolError("bad_frame_type", "only sign requests and pings are accepted")
        t0 = time.perf_counter()
        req = w.decode_sign_request(frame.body)  # ProtocolError closes the connection
        now = time.monotonic()
        # The bucket first: it bounds all the work an edge can cause, refusals and their
        # audit lines included.
        if not edge.bucket.allow(now):
            self._count(name, "rate_limited")
            return w.encode_error(rid, w.E_RATE_LIMITED, f"edge {name} is over its signature rate")
        hs: kh.Handshake | None = None
        try:
            hs = kh.parse_handshake(req.messages)
            site = kh.authorise(hs, req.scheme, edge.router.lookup, self.keys)
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
        self.latency.observe(time.perf_counter() - t0)
        return w.encode_sign_response(rid, signature)

    # ------------------------------------------------------------------ admin, lifecycle
    async def _admin(self, method: str, path: str) -> tuple[int, str, bytes]:
        if path == "/healthz":
            return 200, "application/json", b'{"status":"ok"}\n'
        if path == "/metrics":
            snap: dict[str, list[list[Any]]] = {
                "blindfold_keyserver_signatures_total": [
                    [[e, r], n] for (e, r), n in self.counts.items()
                ],
                "blindfold_keyserver_sign_seconds": [[[], self.latency.value()]],
                "blindfold_keyserver_connections_total": [
                    [[r], n] for r, n in self.conn_counts.items()
                ],
                "blindfold_keyserver_connections_active": [[[], len(self.writers)]],
            }
            return 200, "text/plain; version=0.0.4", render(snap, KEYSERVER_METRICS).encode()
        return 404, "text/plain", b"not found\n"

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


def run_keyserver(path: str) -> int:
    """`blindfold keyserver --config FILE`. Returns the exit code (2 for configuration errors,
    an audit log that does not verify included)."""

    def make(config: Config, _text: str, path: str, log: JsonLog) -> KeyServer:
        assert config.keyserver is not None
        return KeyServer(path, config.keyserver, log)

    return run_service("keyserver", path, "keyserver", "keyserver", make)
