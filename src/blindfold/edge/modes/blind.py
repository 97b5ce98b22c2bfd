"""Blind routes: a CDN hostname of the edge's own (its certificate and key)
that serves sealed blobs by id at `/b/<id>`, pulled from the origin agent over verified TLS and
cached in memory and on disk, both bounded, LRU.

What the edge holds is ciphertext and its size: the keys and the path -> id map are in the
manifest, which only the origin serves. The client checks every blob against the signed
manifest and falls back to the origin when a copy is bad. The edge checks what it holds too,
against the site's signed blob index (each blob's SHA-256 and size, no keys, no paths; verified
with the site's manifest public key): a pull that does not match is neither served whole nor
kept, a cached file is checked again whenever its inode, mtime or size is not the one it had
when last checked, and a copy a visitor reports (`POST /r/<id>`) is checked and dropped when
bad. The edge never serves a partial pull as a complete blob.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import ssl
import tempfile
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Coroutine, Hashable, Sequence
from pathlib import Path
from typing import IO, Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from blindfold.acme.challenge import ACME_TLS_ALPN, ChallengeDir
from blindfold.config.common import check_readable
from blindfold.config.edge import BlindRouteConfig, EdgeConfig, EdgeHttpConfig, RouteConfig
from blindfold.core import manifest
from blindfold.core.clienthello import ClientHello
from blindfold.core.iplist import parse_address
from blindfold.core.proxyproto import encode_v1, encode_v2
from blindfold.core.ratelimit import BucketMap, TokenBucket
from blindfold.core.tls13_server import ConnectionFailed
from blindfold.decisions.purge import Purge
from blindfold.edge.guards import client_key
from blindfold.edge.mode import Connection, Mode, ModeContext, RouteState
from blindfold.edge.serve import LOGGED_EVENTS, misdirected, request_host, serve
from blindfold.edge.upstream import open_verified_origin, origin_pins, origin_tls_context
from blindfold.errors import ConfigError, UpstreamError, VerificationError
from blindfold.io.openssl_engine import OpenSslServer
from blindfold.obs.metrics import (
    CERTIFICATE_METRICS,
    MetricSpec,
    Snapshot,
    certificate_first_name,
)
from blindfold.web.client import UpstreamPool, UpstreamResponse
from blindfold.web.messages import BodyStream, Headers, Request, Responder, simple_response

# /b/<id>: a sealed blob; /p/<id>.js|.css: a script or stylesheet published in plaintext for
# Subresource Integrity (`blindfold seal --sri`).
_PATH = re.compile(rb"/(?:b/([0-9a-f]{32})|p/([0-9a-f]{32}\.(?:js|css)))")
# POST /r/<id>: a visitor reports that the copy it got failed its checks.
_REPORT = re.compile(rb"/r/([0-9a-f]{32}(?:\.js|\.css)?)")
_ID = re.compile(r"[0-9a-f]{32}(?:\.js|\.css)?")
_TYPES = {"js": b"text/javascript; charset=utf-8", "css": b"text/css; charset=utf-8"}
SEND_CHUNK = 1 << 18
MEMORY_SEND_CHUNK = 1 << 20
DISK_RETRY_S = 30.0
SEND_BUFFER_BYTES = 1 << 20
# Blob ids name content (an HMAC of path and content digest): a blob never changes.
_CACHE_CONTROL = b"public, max-age=31536000, immutable"
INDEX_REFRESH_S = 5.0  # an unknown id fetches the index again at most this often
INDEX_FILE = "index.json"  # the last signed index fetched, beside the cached blobs
REPORTS_PER_S = 5.0  # visitors' reports per route and worker (each may hash a file)
REPORT_BURST = 20
# ... and per visitor address (IPv6: per ipv6_prefix_len prefix): one visitor cannot spend
# everyone's share
REPORTS_PER_ADDRESS_PER_S = 1.0
REPORT_ADDRESS_BURST = 5
MAX_REPORT_ADDRESSES = 10_000
RECHECK_COOLDOWN_S = 10.0  # a reported blob is checked at most this often
# bytes hashed for reports: so many reports of big blobs cannot keep the edge busy hashing
RECHECK_BYTES_PER_S = 32 << 20
RECHECK_BURST_BYTES = 1 << 30
MAX_RECHECKED = 10_000
# The temporary files of uncacheable blobs (no disk tier): each visitor address may keep open
# at most this share of disk_cache_bytes (files it pulls or reads, each counted once), and a
# reader of one whose pull is done must take the rest at this average rate at least (after a
# grace of send_timeout_s), or it is cut off: a slow reader cannot pin a file for long.
UNCACHED_SHARE_PER_ADDRESS = 4  # disk_cache_bytes / 4
UNCACHED_MIN_SEND_RATE = 64 << 10  # bytes per second

CERT_POLL_S = 1.0  # how often the route's certificate and key files are checked for renewal
METRICS = (
    *CERTIFICATE_METRICS,
    MetricSpec(
        "blindfold_blind_requests_total",
        "counter",
        "Requests on blind routes, by result (hit_memory, hit_disk, miss, uncached: a miss "
        "the cache cannot keep, joined: a miss or uncached served from another's pull, "
        "busy: refused, the visitor's pulls at their cap or the temporary files of "
        "uncacheable blobs at their bound (in all, or the visitor address's share), "
        "too_slow: a reader of such a file cut off below the minimum send rate, "
        "not_found, origin_error, "
        "error, bad_method, misdirected: another host than the route's), and the checks against "
        "the site's signed blob index (not_in_index, "
        "pull_rejected, cache_dropped, index_fetched, index_failed, report, report_refused).",
        ("route", "result"),
    ),
    MetricSpec(
        "blindfold_blind_cache_bytes",
        "gauge",
        "Bytes of sealed blobs cached, by tier.",
        ("route", "tier"),
    ),
    MetricSpec(
        "blindfold_blind_cache_blobs", "gauge", "Sealed blobs cached, by tier.", ("route", "tier")
    ),
    MetricSpec(
        "blindfold_blind_origin_bytes_total",
        "counter",
        "Blob bytes pulled from the origin.",
        ("route",),
    ),
    MetricSpec(
        "blindfold_blind_served_bytes_total",
        "counter",
        "Blob bytes served to visitors (bodies).",
        ("route",),
    ),
)


def _sha256_fd(fd: int, size: int) -> bytes:
    """In a worker thread: SHA-256 of the first `size` bytes of an open file (pread: the
    file's offset is left alone)."""
    h = hashlib.sha256()
    at = 0
    while at < size:
        data = os.pread(fd, min(1 << 20, size - at), at)
        if not data:
            break
        h.update(data)
        at += len(data)
    return h.digest()


def load_site_key(where: str, cfg: BlindRouteConfig) -> Ed25519PublicKey:
    try:
        with open(cfg.manifest_public_key, "rb") as f:
            key = load_pem_public_key(f.read())
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"{where}.blind.manifest_public_key", f"{cfg.manifest_public_key}: {exc}"
        ) from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{where}.blind.manifest_public_key", "not an Ed25519 public key")
    return key


def _server_tls(where: str, rc: RouteConfig) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    check_readable((f"{where}.certificate", rc.certificate), (f"{where}.key", rc.key))
    try:
        ctx.load_cert_chain(rc.certificate, rc.key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"{where}.certificate", f"cannot load {rc.certificate} with {rc.key}: {exc}"
        ) from None
    return ctx


def _leaf(
    where: str, rc: RouteConfig, now: float | None, previous: Sequence[str] = ()
) -> tuple[str, float, tuple[str, ...]]:
    """The certificate's first name, expiry and DNS names; with `now` (a renewed file) the
    chain must pass core.certchain's checks: each certificate signed by the next, the leaf
    valid then and covering every name in `previous` (the DNS names of the one in service)."""
    from cryptography import x509

    from blindfold.core.certchain import ChainError, check_replaced_pem, leaf_names

    try:
        with open(rc.certificate, "rb") as f:
            leaf = x509.load_pem_x509_certificate(f.read())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{where}.certificate", f"cannot load {rc.certificate}: {exc}") from None
    end = leaf.not_valid_after_utc.timestamp()
    if now is not None:
        try:
            check_replaced_pem(rc.certificate, previous, now)
        except ChainError as exc:
            raise ConfigError(f"{where}.certificate", f"{rc.certificate}: {exc}") from None
    return certificate_first_name(leaf), end, tuple(leaf_names(leaf))


def _stamp(rc: RouteConfig) -> tuple[object, ...]:
    out: list[object] = []
    for path in (rc.certificate, rc.key):
        try:
            st = os.stat(path)
            out.append((st.st_ino, st.st_size, st.st_mtime_ns))
        except OSError:
            out.append(None)
    return tuple(out)


def check_route(where: str, rc: RouteConfig) -> None:
    """What `blindfold check-config` checks of a blind route: its files load."""
    _server_tls(where, rc)
    origin_tls_context(where, rc)
    load_site_key(where, rc.blind or BlindRouteConfig())


def _origin_settings(rc: RouteConfig) -> tuple[object, ...]:
    return (
        rc.origins,
        rc.origin_ca,
        rc.origin_pin_sha256,
        rc.origin_server_name,
        rc.proxy_protocol,
        rc.http,
    )


class BlobStore:
    """Two bounded LRU tiers: small blobs in memory, every blob on disk (when a directory is
    configured). Files are written under a temporary name and renamed when complete, so a
    blob file is always whole; the index is rebuilt from the directory at start."""

    def __init__(self, cfg: BlindRouteConfig, worker_index: int) -> None:
        self.mem_max = cfg.memory_cache_bytes
        self.mem_obj_max = min(cfg.memory_max_object_bytes, cfg.memory_cache_bytes)
        self.disk_max = cfg.disk_cache_bytes if cfg.cache_dir else 0
        self.mem: OrderedDict[str, bytes] = OrderedDict()
        self.mem_used = 0
        self.disk: OrderedDict[str, int] = OrderedDict()
        self.disk_used = 0
        # blob -> (inode, mtime_ns, size) of its file when it last matched the signed index
        self.verified: dict[str, tuple[int, int, int]] = {}
        self.dir: Path | None = None
        self._disk_broken_until = 0.0
        self.disk_error = ""
        if cfg.cache_dir and self.disk_max:
            self.dir = Path(cfg.cache_dir) / f"w{worker_index}"
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
                self._scan()
            except OSError as exc:
                raise ConfigError("blind.cache_dir", f"{self.dir}: {exc.strerror}") from None

    def _scan(self) -> None:
        assert self.dir is not None
        found = []
        for entry in os.scandir(self.dir):
            if not entry.is_file():
                continue
            if _ID.fullmatch(entry.name):
                st = entry.stat()
                found.append((st.st_mtime, entry.name, st.st_size))
            elif entry.name != INDEX_FILE and f".{os.getpid()}." not in entry.name:
                # a pull that never finished
                with contextlib.suppress(OSError):  # (this process's may be running: kept)
                    os.unlink(entry.path)
        for _mtime, name, size in sorted(found):
            self.disk[name] = size
            self.disk_used += size
        self._evict_disk()

    def disk_ok(self) -> bool:
        return time.monotonic() >= self._disk_broken_until

    def disk_failed(self, detail: str) -> None:
        """A disk error (full, read-only): new pulls skip the disk for a while; memory and
        the origin keep serving."""
        self._disk_broken_until = time.monotonic() + DISK_RETRY_S
        self.disk_error = detail

    def memory(self, blob: str) -> bytes | None:
        data = self.mem.get(blob)
        if data is not None:
            self.mem.move_to_end(blob)
        return data

    def disk_path(self, blob: str) -> Path | None:
        if self.dir is None or blob not in self.disk:
            return None
        self.disk.move_to_end(blob)
        return self.dir / blob

    def forget_disk(self, blob: str) -> None:
        size = self.disk.pop(blob, None)
        self.verified.pop(blob, None)
        if size is not None:
            self.disk_used -= size

    def drop(self, blob: str) -> bool:
        """Remove every copy of `blob` (it failed its check); whether there was one."""
        data = self.mem.pop(blob, None)
        if data is not None:
            self.mem_used -= len(data)
        on_disk = blob in self.disk
        self.forget_disk(blob)
        if on_disk and self.dir is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.dir / blob)
        return data is not None or on_disk

    def put_memory(self, blob: str, data: bytes) -> None:
        if len(data) > self.mem_obj_max or blob in self.mem:
            return
        self.mem[blob] = data
        self.mem_used += len(data)
        while self.mem_used > self.mem_max and self.mem:
            _old, gone = self.mem.popitem(last=False)
            self.mem_used -= len(gone)

    def temp_file(self, blob: str) -> Path | None:
        if self.dir is None:
            return None
        return self.dir / f".{blob}.{os.getpid()}.{time.monotonic_ns()}.tmp"

    def commit_disk(self, blob: str, tmp: Path, size: int) -> None:
        assert self.dir is not None
        if size > self.disk_max:
            tmp.unlink(missing_ok=True)
            return
        os.replace(tmp, self.dir / blob)
        self.forget_disk(blob)
        self.disk[blob] = size
        self.disk_used += size
        with contextlib.suppress(OSError):  # checked while it was pulled
            st = os.stat(self.dir / blob)
            self.verified[blob] = (st.st_ino, st.st_mtime_ns, st.st_size)
        self._evict_disk()

    def _evict_disk(self) -> None:
        assert self.dir is not None
        while self.disk_used > self.disk_max and self.disk:
            name, size = self.disk.popitem(last=False)
            self.disk_used -= size
            self.verified.pop(name, None)
            with contextlib.suppress(OSError):
                os.unlink(self.dir / name)


def _raw(key: Ed25519PublicKey) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


class ByteBudget:
    """A token bucket counted in bytes: `take(n, now)` spends n when there are n."""

    def __init__(self, rate_per_s: float, burst: int, now: float) -> None:
        self.rate, self.burst, self.tokens, self.stamp = rate_per_s, float(burst), float(burst), now

    def take(self, n: int, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if n > self.tokens:
            return False
        self.tokens -= n
        return True


class SiteIndex:
    """The site's signed blob index as this worker last verified it: name -> (sha256, size).
    An id names one content forever, so any verified index vouches for the names it lists;
    only a `current` one (the last fetch from the origin succeeded) vouches that a name it
    does not list is not the site's. The signed bytes are kept in the cache directory, so a
    restarted worker checks its copies with them even while the origin is away."""

    def __init__(self, public: Ed25519PublicKey, keep: Path | None = None) -> None:
        self.public = public
        self.blobs: dict[str, tuple[bytes, int]] = {}
        self.issued_at = -1
        self.fetched_at = -INDEX_REFRESH_S
        self.task: asyncio.Task[None] | None = None
        self.current = False
        self.error = "not fetched yet"
        self.keep = keep
        if keep is not None:
            try:
                index = manifest.verify_index(keep.read_bytes(), public)
            except (OSError, VerificationError):
                return  # none yet, or another site's key: fetched on first need
            self.blobs, self.issued_at = index.blobs, index.issued_at

    def save(self, data: bytes) -> None:
        """In a worker thread: the verified bytes, atomically, beside the blobs."""
        if self.keep is None:
            return
        tmp = self.keep.with_name(f".{INDEX_FILE}.{os.getpid()}.tmp")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, self.keep)
        except OSError:
            tmp.unlink(missing_ok=True)


class BlindStats:
    def __init__(self) -> None:
        self.requests: dict[str, int] = {}  # hit_memory | hit_disk | miss | not_found | ...
        self.origin_bytes = 0
        self.served_bytes = 0

    def count(self, key: str) -> None:
        self.requests[key] = self.requests.get(key, 0) + 1


class BlindRoute:
    """What a worker keeps for one blind route; on reload the store and counters carry over
    when the cache settings are unchanged."""

    def __init__(
        self,
        where: str,
        rc: RouteConfig,
        worker_index: int,
        old: BlindRoute | None = None,
        ipv6_prefix_len: int = 64,
    ) -> None:
        self.config = rc
        self.ipv6_prefix_len = ipv6_prefix_len
        self.cfg = rc.blind or BlindRouteConfig()
        self.where = where
        self.cert_stamp = self.cert_seen = _stamp(rc)  # before loading: a later change is seen
        self.tls = _server_tls(where, rc)
        self.leaf = _leaf(where, rc, None)
        self.cert_results: dict[str, int] = old.cert_results if old is not None else {}
        self.cert_due = 0.0
        self.challenges: ChallengeDir | None = None  # [edge.acme] tls-alpn-01 (BlindMode.build)
        self.origin_tls = origin_tls_context(where, rc)
        self.pins = origin_pins(rc)
        self.http = rc.http or EdgeHttpConfig()
        self.limits = self.http.limits(max_body_bytes=0)  # GET, HEAD, OPTIONS only
        same_cache = old is not None and old.cfg == self.cfg
        # The store (and the pulls filling it) carry over a reload that keeps the cache
        # settings; a new store would rescan the directory under live pulls.
        self.store: BlobStore = (
            old.store if old is not None and same_cache else BlobStore(self.cfg, worker_index)
        )
        self.pulls: dict[str, Fill] = old.pulls if old is not None and same_cache else {}
        # pulls in flight started by one client address (the pulls carry over a reload)
        self.pull_caps = Slots(self.http.upstream_connections_per_ip)
        # bytes of the unnamed temporary files of blobs the cache cannot keep, open now
        self.uncached_bytes: int = old.uncached_bytes if old is not None and same_cache else 0
        # ... of them, those each client address keeps open (pulls or reads; per file once)
        self.uncached_by_key: dict[int, int] = (
            old.uncached_by_key if old is not None and same_cache else {}
        )
        if old is not None:
            old.pull_caps.limit = self.pull_caps.limit
            self.pull_caps = old.pull_caps
        self.stats: BlindStats = old.stats if old is not None else BlindStats()
        public = load_site_key(where, self.cfg)
        self.index: SiteIndex = (
            old.index
            if old is not None and same_cache and _raw(old.index.public) == _raw(public)
            else SiteIndex(public, self.store.dir / INDEX_FILE if self.store.dir else None)
        )
        self.checks: dict[tuple[str, tuple[int, int, int]], asyncio.Task[bool]] = (
            old.checks if old is not None and same_cache else {}
        )
        self.reports = TokenBucket(REPORTS_PER_S, REPORT_BURST, time.monotonic())
        self.address_reports: BucketMap = (
            old.address_reports
            if old is not None
            else BucketMap(REPORTS_PER_ADDRESS_PER_S, REPORT_ADDRESS_BURST, MAX_REPORT_ADDRESSES)
        )
        self.recheck_bytes = ByteBudget(RECHECK_BYTES_PER_S, RECHECK_BURST_BYTES, time.monotonic())
        self.rechecked: OrderedDict[str, float] = OrderedDict()
        self.pool: UpstreamPool | None = None
        if old is not None and old.pool is not None:
            if _origin_settings(old.config) == _origin_settings(rc):
                self.pool = old.pool  # its connections (in use or idle) stay valid
            else:
                old.pool.close()
        self.any_origin = "*" in self.cfg.allow_origins
        self.allowed_origins = frozenset(o.encode() for o in self.cfg.allow_origins)

    def cors(self, request: Request) -> Headers:
        """CORS for a page's service worker fetching blobs cross-origin (Fetch standard)."""
        if self.any_origin:
            return [(b"access-control-allow-origin", b"*")]
        origin = request.header(b"origin")
        if origin is not None and origin in self.allowed_origins:
            return [(b"access-control-allow-origin", origin), (b"vary", b"origin")]
        return [(b"vary", b"origin")]


class BlindMode(Mode):
    """The worker's blind side, on the asyncio loop the reactor is attached to."""

    name = "blind"
    needs_asyncio = True
    metrics = METRICS

    @classmethod
    def check_config(cls, where: str, rc: RouteConfig, edge: EdgeConfig) -> None:
        check_route(where, rc)

    def build(
        self, where: str, rc: RouteConfig, edge: EdgeConfig, old: BlindRoute | None
    ) -> BlindRoute:
        br = BlindRoute(where, rc, self.ctx.index, old, edge.ipv6_prefix_len)
        acme = edge.acme
        if acme is not None and acme.challenge == "tls-alpn-01" and acme.challenge_dir:
            br.challenges = ChallengeDir(acme.challenge_dir)
        return br

    def check(self, route: RouteState, hello: ClientHello) -> bool:
        return True  # the CDN hostname's own TLS: every hello is ours

    def sweep(self, routes: Sequence[RouteState], now: float) -> None:
        """Renewed certificate files: a pair that loads and is valid now serves new
        handshakes; open connections keep theirs; a broken one is logged and not used."""
        mono = time.monotonic()
        for route in routes:
            br: BlindRoute = route.state
            if mono < br.cert_due:
                continue
            br.cert_due = mono + CERT_POLL_S
            stamp = _stamp(br.config)
            if stamp == br.cert_stamp:
                continue
            if stamp != br.cert_seen:  # changed since the last poll: load once it settles
                br.cert_seen = stamp
                continue
            br.cert_stamp = stamp  # tried once per change
            try:
                tls = _server_tls(br.where, br.config)
                leaf = _leaf(br.where, br.config, time.time(), br.leaf[2])
            except ConfigError as exc:
                br.cert_results["invalid"] = br.cert_results.get("invalid", 0) + 1
                self.ctx.log.log(
                    "certificate_reload_failed", route=route.name, error=str(exc)[:300]
                )
                continue
            br.tls, br.leaf = tls, leaf
            br.cert_results["swapped"] = br.cert_results.get("swapped", 0) + 1
            self.ctx.log.log("certificate_reloaded", route=route.name, not_after=leaf[1])

    def begin(self, conn: Connection, route: RouteState, hello: ClientHello) -> bool:
        br: BlindRoute = route.state
        if br.challenges is not None and ACME_TLS_ALPN in hello.alpn:
            return self._acme_challenge(conn, br, hello)
        server = OpenSslServer(br.tls, hello.sni)
        events = server.receive(conn.hello_bytes, self.ctx.now)
        conn.take()
        failed = next((e for e in events if isinstance(e, ConnectionFailed)), None)
        if failed is not None:
            conn.send_now(server.data_to_send())  # OpenSSL's alert
            conn.close("refused", f"tls_{failed.reason}")
            return True
        sni = hello.sni or ""
        serve(
            conn,
            server,
            lambda: BlindHandler(self.ctx, conn, route, br, sni),
            br.limits,
            br.http,
            # Blob responses are hundreds of KiB: a send buffer that takes one whole spares
            # asyncio's partial-send path (Python 3.11 copies and shifts its buffer there).
            send_buffer_bytes=SEND_BUFFER_BYTES,
        )
        return True

    def _acme_challenge(self, conn: Connection, br: BlindRoute, hello: ClientHello) -> bool:
        """RFC 8737: the CDN hostname is the edge's own, so the edge answers its ACME
        tls-alpn-01 validation itself, with the challenge certificate its ACME client wrote
        (ALPN acme-tls/1 only; no request is ever answered but with 404)."""
        conn.take()
        ctx = br.challenges.context(hello.sni) if br.challenges is not None else None
        if ctx is None:
            conn.close("refused", "acme_no_challenge")
            return True
        server = OpenSslServer(ctx, hello.sni)
        events = server.receive(conn.hello_bytes, self.ctx.now)
        failed = next((e for e in events if isinstance(e, ConnectionFailed)), None)
        if failed is not None:
            conn.send_now(server.data_to_send())
            conn.close("refused", f"tls_{failed.reason}")
            return True
        self.ctx.log.log("acme_challenge_answered", sni=hello.sni, client=conn.ip)
        serve(conn, server, _ChallengeOnly, br.limits, br.http)
        return True

    def purge(self, routes: Sequence[RouteState], purge: Purge | None) -> int:
        """An operator's purge (decisions.purge): the named blobs (by id, or by a URL or
        prefix on /b/ or /p/) from memory and disk; None: every blob this worker holds."""
        removed = 0
        for route in routes:
            br: BlindRoute = route.state
            store = br.store
            if purge is None:
                names = set(store.mem) | set(store.disk)
            else:
                names = set(purge.blobs)
                for item in (*purge.urls, *purge.prefixes):
                    match = _PATH.fullmatch(("/" + item.partition("/")[2]).encode("latin-1"))
                    if match is not None:
                        names.add((match.group(1) or match.group(2)).decode("ascii"))
            for name in names:
                if store.drop(name):
                    removed += 1
                    br.stats.count("purged")
        return removed

    def snapshot(self, routes: Sequence[RouteState]) -> Snapshot:
        """Prometheus tables for the worker's blind routes."""
        tables: dict[str, list[list[Any]]] = {
            "blindfold_blind_requests_total": [],
            "blindfold_blind_cache_bytes": [],
            "blindfold_blind_cache_blobs": [],
            "blindfold_blind_origin_bytes_total": [],
            "blindfold_blind_served_bytes_total": [],
        }
        for route in routes:
            br: BlindRoute = route.state
            name = route.name
            tables["blindfold_blind_requests_total"].extend(
                [[name, k], v] for k, v in br.stats.requests.items()
            )
            tables["blindfold_blind_cache_bytes"].extend(
                [[[name, "memory"], br.store.mem_used], [[name, "disk"], br.store.disk_used]]
            )
            tables["blindfold_blind_cache_blobs"].extend(
                [[[name, "memory"], len(br.store.mem)], [[name, "disk"], len(br.store.disk)]]
            )
            tables["blindfold_blind_origin_bytes_total"].append([[name], br.stats.origin_bytes])
            tables["blindfold_blind_served_bytes_total"].append([[name], br.stats.served_bytes])
        wall = time.time()
        tables["blindfold_certificate_expiry_seconds"] = [
            [["edge", r.state.leaf[0], r.name], r.state.leaf[1] - wall] for r in routes
        ]
        tables["blindfold_certificate_reloads_total"] = [
            [["edge", r.name, k], v] for r in routes for k, v in r.state.cert_results.items()
        ]
        return tables


class _ChallengeOnly:
    """A connection negotiated for an ACME challenge (acme-tls/1) serves nothing."""

    async def __call__(self, request: Request, body: BodyStream, respond: Responder) -> None:
        await simple_response(respond, 404, "not found\n")

    def http_event(self, name: str, fields: dict[str, object]) -> None:
        pass


class BlindHandler:
    """Requests on one visitor connection of a blind route."""

    def __init__(
        self, ctx: ModeContext, conn: Connection, route: RouteState, br: BlindRoute, sni: str
    ) -> None:
        self.ctx = ctx
        self.conn = conn
        self.route = route
        self.br = br
        self.sni = sni
        self.cors: Headers = []
        self._conn_slots: Slots | None = None
        self._key: int | None = None

    def _client_key(self) -> int:
        """The visitor's address as the per-address limits count it."""
        if self._key is None:
            version, addr = parse_address(self.conn.ip)
            self._key = client_key(version, addr, self.br.ipv6_prefix_len)
        return self._key

    def http_event(self, name: str, fields: dict[str, object]) -> None:
        if name in LOGGED_EVENTS:
            self.ctx.log.log(name, route=self.route.name, **fields)

    async def __call__(self, request: Request, body: BodyStream, respond: Responder) -> None:
        br = self.br
        if misdirected(request_host(request), self.sni, self.route, self.ctx.router):
            # RFC 9110 §15.5.20, as on keyless routes
            br.stats.count("misdirected")
            await simple_response(respond, 421, "misdirected request\n")
            return
        method = request.method
        if method == b"OPTIONS":  # CORS preflight from a page's service worker
            await respond.start(
                204,
                [
                    *br.cors(request),
                    (b"access-control-allow-methods", b"GET, HEAD, POST"),
                    (b"access-control-max-age", b"86400"),
                    (b"content-length", b"0"),
                ],
            )
            await respond.end()
            return
        if method == b"POST" and (r := _REPORT.fullmatch(request.path)) is not None:
            await self._report(request, r.group(1).decode(), respond)
            return
        if method not in (b"GET", b"HEAD"):
            br.stats.count("bad_method")
            await simple_response(
                respond, 405, "only GET and HEAD\n", [(b"allow", b"GET, HEAD, OPTIONS")]
            )
            return
        m = _PATH.fullmatch(request.path)
        if m is None:
            br.stats.count("not_found")
            await simple_response(respond, 404, "not a blob\n", br.cors(request))
            return
        blob = (m.group(1) or m.group(2)).decode()
        head = method == b"HEAD"
        self.cors = br.cors(request)
        if await self._from_cache(blob, respond, head):
            return
        fill = br.pulls.get(blob)
        if fill is None:
            fill = await self._start_pull(blob)
            if fill is None:
                br.stats.count("busy")
                await simple_response(
                    respond, 503, "too many pulls\n", [(b"retry-after", b"1"), *self.cors]
                )
                return
        else:
            br.stats.count("joined")
        await self._from_fill(fill, respond, head)

    async def _start_pull(self, blob: str) -> Fill | None:
        """A pull of `blob` from the origin, or the one another visitor started meanwhile.
        Each pull holds a slot of its visitor's connection and of its visitor's address until
        it ends (it runs on when the visitor leaves): one visitor cannot take every origin
        request. A visitor at its caps waits, at most upstream_queue_timeout_s (None then)."""
        br = self.br
        if self._conn_slots is None:
            self._conn_slots = Slots(br.http.upstream_connections_per_client_conn)
        deadline = asyncio.get_running_loop().time() + br.http.upstream_queue_timeout_s
        held: list[tuple[Slots, Hashable]] = []
        try:
            conn_key: Hashable = 0
            for slots, key in ((self._conn_slots, conn_key), (br.pull_caps, self._client_key())):
                if not await slots.acquire(key, deadline):
                    return None
                held.append((slots, key))
            fill = br.pulls.get(blob)
            if fill is not None:  # started by another while we waited
                br.stats.count("joined")
                return fill
        finally:
            if len(held) < 2 or br.pulls.get(blob) is not None:
                for slots, key in held:
                    slots.release(key)
        fill = Fill(blob, self._fill_task, held)
        br.pulls[blob] = fill
        fill.start()
        return fill

    def _headers(self, blob: str, size: int, source: bytes) -> Headers:
        ext = blob.rpartition(".")[2] if "." in blob else ""
        ctype = _TYPES.get(ext, b"application/octet-stream")
        return [
            (b"content-type", ctype),
            (b"x-content-type-options", b"nosniff"),
            (b"content-length", str(size).encode()),
            (b"cache-control", _CACHE_CONTROL),
            (b"x-blindfold-cache", source),
            *self.cors,
        ]

    async def _from_cache(self, blob: str, respond: Responder, head: bool) -> bool:
        br = self.br
        data = br.store.memory(blob)
        if data is not None:
            br.stats.count("hit_memory")
            await respond.start(200, self._headers(blob, len(data), b"hit"))
            if not head:
                # one write up to 1 MiB; bigger blobs in slices, so that what waits in a slow
                # visitor's buffers stays bounded
                for at in range(0, len(data), MEMORY_SEND_CHUNK):
                    await respond.send(
                        data[at : at + MEMORY_SEND_CHUNK] if len(data) > MEMORY_SEND_CHUNK else data
                    )
                br.stats.served_bytes += len(data)
            await respond.end()
            return True
        path = br.store.disk_path(blob)
        if path is None:
            return False
        try:
            f = path.open("rb")
        except OSError:
            br.store.forget_disk(blob)
            return False
        with f:
            st = os.fstat(f.fileno())
            size = st.st_size
            mark = (st.st_ino, st.st_mtime_ns, st.st_size)
            # Not checked in this state yet (since the start, or the file changed): against
            # the signed index before a byte is served; a bad copy is dropped, then pulled.
            if br.store.verified.get(blob) != mark and not await self._check_disk(blob, mark):
                return False
            br.stats.count("hit_disk")
            await respond.start(200, self._headers(blob, size, b"hit"))
            sent = 0
            small = size <= br.store.mem_obj_max
            kept = bytearray() if small else None
            # Local, page-cached reads: synchronous, in large chunks (a thread hop per chunk
            # would cost more than the read).
            while not head and sent < size:
                data = f.read(min(SEND_CHUNK, size - sent))
                if not data:
                    respond.abort()  # the file was cut under us: never claim a whole blob
                    br.store.forget_disk(blob)
                    return True
                await respond.send(data)
                sent += len(data)
                if kept is not None:
                    kept += data
            br.stats.served_bytes += sent
            await respond.end()
            st = os.fstat(f.fileno())
            unchanged = (st.st_ino, st.st_mtime_ns, st.st_size) == mark
        if kept is not None and len(kept) == size and unchanged:
            br.store.put_memory(blob, bytes(kept))
        return True

    # ---------------------------------------------------------------- the signed blob index
    async def _expected(self, name: str) -> tuple[bytes, int] | None:
        """(sha256, size) of `name` by the site's signed blob index; an unknown name fetches
        the index again (one fetch at a time, at most every INDEX_REFRESH_S). None: the site
        does not list it; UpstreamError: no current index says so (the origin is away)."""
        idx = self.br.index
        hit = idx.blobs.get(name)
        if hit is not None:
            return hit
        now = time.monotonic()
        if idx.task is None and now - idx.fetched_at >= INDEX_REFRESH_S:
            idx.fetched_at = now
            idx.task = asyncio.get_running_loop().create_task(self._refresh_index())
        task = idx.task
        if task is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.br.http.upstream_timeout_s):
                    await asyncio.shield(task)  # a visitor who leaves does not stop it
        hit = idx.blobs.get(name)
        if hit is None and not idx.current:
            raise UpstreamError("no_index", f"no current signed blob index: {idx.error}")
        return hit

    async def _refresh_index(self) -> None:
        br = self.br
        idx = br.index
        resp: UpstreamResponse | None = None
        try:
            host = (br.config.origin_server_name or "origin").encode()
            resp = await self._pool().request(
                b"GET",
                br.cfg.origin_index_path.encode(),
                [(b"host", host), (b"user-agent", b"blindfold-edge")],
                None,
            )
            length = _content_length(resp.headers)
            if resp.status != 200 or length is None or length > manifest.MAX_INDEX_BYTES:
                raise UpstreamError(
                    "bad_response", f"origin answered {resp.status}, length {length}"
                )
            data = bytearray()
            async for chunk in resp.body():
                data += chunk
                if len(data) > length:
                    raise UpstreamError("bad_response", "origin sent more than its Content-Length")
            if len(data) != length:
                raise UpstreamError("truncated", f"origin sent {len(data)} of {length} bytes")
            index = await asyncio.to_thread(manifest.verify_index, bytes(data), idx.public)
            if index.issued_at >= idx.issued_at:  # never back to an older index
                idx.blobs, idx.issued_at = index.blobs, index.issued_at
                await asyncio.to_thread(idx.save, bytes(data))
            idx.current, idx.error = True, ""
            br.stats.count("index_fetched")
            self.ctx.log.log(
                "blind_index",
                route=self.route.name,
                blobs=len(index.blobs),
                issued_at=index.issued_at,
            )
        except (UpstreamError, VerificationError) as exc:
            idx.current, idx.error = False, str(exc)[:200]
            br.stats.count("index_failed")
            self.ctx.log.log("blind_index_failed", route=self.route.name, detail=str(exc)[:200])
        finally:
            if resp is not None:
                resp.close()
            idx.task = None

    async def _check_disk(self, blob: str, mark: tuple[int, int, int]) -> bool:
        """Whether the cached file of `blob`, in the state `mark` (inode, mtime, size), matches
        the signed index; one check per state however many visitors ask."""
        br = self.br
        key = (blob, mark)
        task = br.checks.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._check_disk_now(blob, mark))
            br.checks[key] = task
            task.add_done_callback(lambda _t: br.checks.pop(key, None))
        return await asyncio.shield(task)

    async def _check_disk_now(self, blob: str, mark: tuple[int, int, int]) -> bool:
        store = self.br.store
        if store.dir is None:
            return False
        try:
            want = await self._expected(blob)
        except UpstreamError:
            return False  # cannot tell: neither served nor dropped
        try:
            fd = os.open(store.dir / blob, os.O_RDONLY)
        except OSError:
            return False
        try:
            st = os.fstat(fd)
            if (st.st_ino, st.st_mtime_ns, st.st_size) != mark:
                return False  # changed again meanwhile: treated as a miss
            ok = (
                want is not None
                and want[1] == st.st_size
                and await asyncio.to_thread(_sha256_fd, fd, st.st_size) == want[0]
            )
        finally:
            os.close(fd)
        if ok:
            store.verified[blob] = mark
        else:
            self._dropped(blob, "digest" if want is not None else "not_in_index", mark)
        return ok

    def _dropped(self, blob: str, reason: str, mark: tuple[int, int, int] | None = None) -> None:
        """Drop the copies of `blob`; with `mark`, only if its file is still the one checked
        (a pull may have put a good one in its place meanwhile)."""
        store = self.br.store
        if mark is not None and store.dir is not None:
            try:
                st = os.stat(store.dir / blob)
            except OSError:
                return
            if (st.st_ino, st.st_mtime_ns, st.st_size) != mark:
                return
        if store.drop(blob):
            self.br.stats.count("cache_dropped")
            self.ctx.log.log("blind_cache_dropped", route=self.route.name, blob=blob, reason=reason)

    async def _recheck(self, name: str) -> str:
        """A visitor reported `name`: check every copy held against the index, drop them when
        one is bad. 'dropped', 'ok', 'not_cached', 'busy' (the byte budget for such checks is
        spent) or 'no_current_index'."""
        store = self.br.store
        try:
            want = await self._expected(name)
        except UpstreamError:
            return "no_current_index"  # cannot tell: nothing dropped
        held = bad = False
        size = len(store.mem.get(name) or b"") + (store.disk.get(name) or 0)
        if not self.br.recheck_bytes.take(size, time.monotonic()):
            return "busy"  # checked later, on another report
        data = store.mem.get(name)
        if data is not None:
            held = True
            digest = await asyncio.to_thread(lambda: hashlib.sha256(data).digest())
            bad = want is None or (digest, len(data)) != want
        if store.dir is not None and name in store.disk:
            try:
                fd = os.open(store.dir / name, os.O_RDONLY)
            except OSError:
                fd = -1
            if fd >= 0:
                held = True
                try:
                    st = os.fstat(fd)
                    ok = (
                        want is not None
                        and want[1] == st.st_size
                        and await asyncio.to_thread(_sha256_fd, fd, st.st_size) == want[0]
                    )
                finally:
                    os.close(fd)
                if ok:
                    store.verified[name] = (st.st_ino, st.st_mtime_ns, st.st_size)
                bad = bad or not ok
        if bad:
            self._dropped(name, "report")
            return "dropped"
        return "ok" if held else "not_cached"

    async def _report(self, request: Request, name: str, respond: Responder) -> None:
        """POST /r/<id>: a visitor's copy failed its checks. The edge checks its own copies
        (bounded: token buckets per visitor address and per route, one check per blob per
        RECHECK_COOLDOWN_S); a report never drops a copy that matches the signed index."""
        br = self.br
        now = time.monotonic()
        cors = br.cors(request)
        # the visitor's own share first: a refused report spends nothing of everyone's
        if br.address_reports.take(self._client_key(), now) or not br.reports.allow(now):
            br.stats.count("report_refused")
            await simple_response(
                respond, 429, "too many reports\n", [(b"retry-after", b"1"), *cors]
            )
            return
        br.stats.count("report")
        last = br.rechecked.get(name)
        if last is not None and now - last < RECHECK_COOLDOWN_S:
            result = "checked_recently"
        else:
            result = await self._recheck(name)
            if result != "busy":
                br.rechecked[name] = now
                br.rechecked.move_to_end(name)
                while len(br.rechecked) > MAX_RECHECKED:
                    br.rechecked.popitem(last=False)
        self.ctx.log.log(
            "blind_report", route=self.route.name, client=self.conn.ip, blob=name, result=result
        )
        await respond.start(
            202, [(b"content-length", b"0"), (b"cache-control", b"no-store"), *cors]
        )
        await respond.end()

    def _pool(self) -> UpstreamPool:
        br = self.br
        if br.pool is None:
            rc, route, ctx = br.config, self.route, self.ctx
            # The edge pulls on its own behalf: PROXY LOCAL (v2) / UNKNOWN (v1), so an origin
            # that requires a header from its edges accepts it and sees the edge's address.
            header = {"v2": encode_v2(None, None), "v1": encode_v1(None, None)}.get(
                rc.proxy_protocol, b""
            )

            async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
                return await open_verified_origin(
                    ctx,
                    route,
                    header,
                    br.origin_tls,
                    rc.origin_server_name,
                    br.pins,
                    br.http.upstream_connect_timeout_s,
                )

            br.pool = UpstreamPool(
                f"https://{route.pool.origins[0].text}",
                max_idle=br.http.upstream_connections,
                connect_timeout_s=br.http.upstream_connect_timeout_s,
                timeout_s=br.http.upstream_timeout_s,
                tls=br.origin_tls,
                server_hostname=rc.origin_server_name,
                connector=connect,
            )
        return br.pool

    async def _fill_task(self, fill: Fill) -> None:
        """Pull a blob from the origin into the cache. Its own task: visitors who leave do not
        stop it, and every visitor who asks meanwhile streams from it."""
        br = self.br
        store = br.store
        out: IO[bytes] | None = None
        resp: UpstreamResponse | None = None
        try:
            try:
                want = await self._expected(fill.blob)
            except UpstreamError as exc:
                fill.fail(502, str(exc))
                return
            if want is None:  # the site does not vouch for it: not pulled, not kept
                br.stats.count("not_in_index")
                fill.fail(404, "")
                return
            prefix = br.cfg.origin_public_path if "." in fill.blob else br.cfg.origin_blobs_path
            host = (br.config.origin_server_name or "origin").encode()
            try:
                resp = await self._pool().request(
                    b"GET",
                    (prefix + fill.blob).encode(),
                    [(b"host", host), (b"user-agent", b"blindfold-edge")],
                    None,
                )
            except UpstreamError as exc:
                fill.fail(502, f"origin: {exc}")
                return
            length = _content_length(resp.headers)
            if resp.status != 200 or length is None or length > br.cfg.max_blob_bytes:
                fill.fail(
                    404 if resp.status == 404 else 502,
                    f"origin answered {resp.status}, length {length}",
                )
                return
            if length != want[1]:
                fill.fail(502, f"origin's length {length} is not the signed blob index's {want[1]}")
                return
            digest = hashlib.sha256()
            if store.dir is not None and length <= store.disk_max and store.disk_ok():
                fill.tmp = store.temp_file(fill.blob)
                try:
                    assert fill.tmp is not None
                    out = fill.tmp.open("wb")
                except OSError as exc:
                    store.disk_failed(str(exc))
                    fill.tmp = None
            if fill.tmp is None:
                # their temporary files ($TMPDIR; on a tmpfs that is memory) take at most
                # disk_cache_bytes at once, per route and worker
                if length > store.mem_obj_max and (
                    br.uncached_bytes + length > br.cfg.disk_cache_bytes
                    or not fill.hold(br, self._client_key(), length)
                ):
                    fill.fail(503, "the temporary files of uncacheable blobs are at their bound")
                    return
                if length > store.mem_obj_max:
                    # Nowhere to keep it: an unnamed file (gone when its last reader closes
                    # it) that visitors read while it is pulled and while one of them reads;
                    # closed by `Fill.close_uncached`, not a with-block.
                    tmp = tempfile.TemporaryFile(prefix="blindfold-blob-")  # noqa: SIM115
                    fill.uncached = out = tmp
                    fill.uncached_size = length
                    br.uncached_bytes += length
                else:
                    fill.buf = bytearray()
            fill.begin(length)
            async for chunk in resp.body():
                if fill.got + len(chunk) > length:
                    raise UpstreamError("bad_response", "origin sent more than its Content-Length")
                digest.update(chunk)
                if out is not None:
                    out.write(chunk)
                    out.flush()  # visitors read the file as it grows
                else:
                    assert fill.buf is not None
                    fill.buf += chunk
                fill.advance(len(chunk))
            br.stats.origin_bytes += fill.got
            if fill.got != length:
                raise UpstreamError("truncated", f"origin sent {fill.got} of {length} bytes")
            if digest.digest() != want[0]:
                br.stats.count("pull_rejected")
                raise UpstreamError(
                    "digest_mismatch", "origin's blob does not match the site's signed blob index"
                )
            if fill.uncached is not None:
                out = None  # kept open for its readers
            elif out is not None:
                out.close()
                out = None
                assert fill.tmp is not None
                if length <= store.mem_obj_max:
                    store.put_memory(fill.blob, fill.tmp.read_bytes())
                store.commit_disk(fill.blob, fill.tmp, length)
                fill.path, fill.tmp = store.dir / fill.blob if store.dir else None, None
            elif fill.buf is not None:
                store.put_memory(fill.blob, bytes(fill.buf))
            fill.finish()
        except UpstreamError as exc:
            br.stats.count("origin_error")
            fill.fail(502, str(exc))
        except OSError as exc:  # the disk cache: this pull fails, the next ones skip the disk
            if fill.uncached is None:
                store.disk_failed(str(exc))
            fill.fail(502, f"cache: {exc}")
        finally:
            fill.release_slots()
            fill.unhold(br, self._client_key())  # its visitor's reader holds its own
            if out is not None:
                out.close()
            if fill.error or not fill.readers:
                br.uncached_bytes -= fill.close_uncached()
            if resp is not None:
                resp.close()  # a no-op once the body was read to its end (back in the pool)
            if fill.tmp is not None:
                fill.tmp.unlink(missing_ok=True)
            # an uncacheable blob stays joinable while a visitor reads it
            if br.pulls.get(fill.blob) is fill and fill.uncached is None:
                del br.pulls[fill.blob]
            if fill.error:
                self.ctx.log.log(
                    "blind_pull_failed",
                    route=self.route.name,
                    blob=fill.blob,
                    detail=fill.error[:200],
                )
            fill.finish()

    async def _from_fill(self, fill: Fill, respond: Responder, head: bool) -> None:
        fill.readers += 1
        try:
            await self._read_fill(fill, respond, head)
        finally:
            fill.readers -= 1
            if fill.done and not fill.readers:  # the last reader of an uncacheable blob
                self.br.uncached_bytes -= fill.close_uncached()
                if self.br.pulls.get(fill.blob) is fill:
                    del self.br.pulls[fill.blob]

    async def _read_fill(self, fill: Fill, respond: Responder, head: bool) -> None:
        """Answer from a pull in progress: the head once the origin's length is known, then
        the bytes as they land (from the temporary file, or memory), never more than pulled."""
        br = self.br
        idle = br.http.upstream_timeout_s
        while fill.length is None and not fill.done:
            if not await fill.wait(idle):
                break
        if fill.length is None:
            status = fill.status if fill.done and fill.status in (404, 503) else 502
            br.stats.count({404: "not_found", 503: "busy"}.get(status, "error"))
            await simple_response(
                respond,
                status,
                {404: "no such blob\n", 503: "too many pulls\n"}.get(status, "blob unavailable\n"),
                [(b"retry-after", b"1"), *self.cors] if status == 503 else self.cors,
            )
            return
        uncached = fill.uncached is not None
        key = self._client_key()
        if uncached and not head and not fill.hold(br, key, fill.length):
            # this address keeps its share of the temporary files open already
            br.stats.count("busy")
            await simple_response(
                respond, 503, "too many pulls\n", [(b"retry-after", b"1"), *self.cors]
            )
            return
        try:
            await self._send_fill(fill, respond, head, uncached)
        finally:
            if uncached and not head:
                fill.unhold(br, key)

    async def _send_fill(self, fill: Fill, respond: Responder, head: bool, uncached: bool) -> None:
        br = self.br
        length = fill.length
        assert length is not None
        idle = br.http.upstream_timeout_s
        br.stats.count("uncached" if uncached else "miss")
        await respond.start(
            200, self._headers(fill.blob, length, b"uncached" if uncached else b"miss")
        )
        if head:
            await respond.end()
            return
        fd = -1
        sent = 0
        loop = asyncio.get_running_loop()
        # A reader of an uncacheable blob's file keeps it open (and counted): once the pull is
        # done, it must take the rest within send_timeout_s + rest / UNCACHED_MIN_SEND_RATE, or
        # it is cut off (a trickle of window updates no longer holds the file for good).
        limit = asyncio.timeout(None)

        def pull_done() -> None:
            rest = length - sent
            limit.reschedule(loop.time() + br.http.send_timeout_s + rest / UNCACHED_MIN_SEND_RATE)

        unwatch: Callable[[], None] | None = None
        try:
            async with limit:
                if uncached:  # now, when the pull is done already
                    unwatch = fill.on_done(pull_done)
                try:
                    if fill.uncached is not None:
                        fd = os.dup(fill.uncached.fileno())
                    elif fill.buf is None:
                        where = fill.tmp or fill.path
                        if where is None:
                            respond.abort()
                            return
                        fd = os.open(where, os.O_RDONLY)  # stays valid through the rename
                    while sent < length:
                        if sent < fill.got:
                            n = min(SEND_CHUNK, fill.got - sent)
                            data = (
                                bytes(fill.buf[sent : sent + n])
                                if fill.buf is not None
                                else os.pread(fd, n, sent)
                            )
                            if not data:
                                break
                            await respond.send(data)
                            sent += len(data)
                        elif fill.error or fill.done or not await fill.wait(idle):
                            break
                except OSError:
                    pass
                finally:
                    if fd >= 0:
                        os.close(fd)
                    br.stats.served_bytes += sent
                while sent == length and not fill.done:  # the last check is the pull's digest
                    if not await fill.wait(idle):
                        break
        except TimeoutError:
            br.stats.count("too_slow")
            self.ctx.log.log(
                "blind_reader_too_slow",
                route=self.route.name,
                blob=fill.blob,
                client=self.conn.ip,
                sent=sent,
                size=length,
            )
            respond.abort()
            return
        finally:
            if unwatch is not None:
                unwatch()
        if sent == length and fill.done and not fill.error:
            await respond.end()
        else:
            respond.abort()  # never claim a whole blob, nor one that failed its check


class Slots:
    """At most `limit` slots held at once per key (a client address); who must wait is served
    in order, until a deadline."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held: dict[Hashable, int] = {}
        self.waiters: dict[Hashable, deque[asyncio.Future[None]]] = {}

    async def acquire(self, key: Hashable, deadline: float) -> bool:
        """One slot by the loop time `deadline`; False when none came free by then."""
        queue = self.waiters.get(key)
        if self.held.get(key, 0) < self.limit and not queue:
            self.held[key] = self.held.get(key, 0) + 1
            return True
        if queue is None:
            queue = self.waiters[key] = deque()
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue.append(fut)
        try:
            async with asyncio.timeout_at(deadline):
                await fut
            return True
        except TimeoutError:
            # handed a slot as the deadline came: it is ours
            return fut.done() and not fut.cancelled()
        except BaseException:
            if fut.done() and not fut.cancelled():
                self.release(key)  # handed a slot and cancelled: passed on
            raise
        finally:
            if not fut.done():
                fut.cancel()
            with contextlib.suppress(ValueError):
                queue.remove(fut)
            if not queue and self.waiters.get(key) is queue:
                del self.waiters[key]

    def release(self, key: Hashable) -> None:
        """A slot comes free: to the first waiter of its key, which then holds it."""
        queue = self.waiters.get(key)
        while queue:
            fut = queue.popleft()
            if not fut.done():
                fut.set_result(None)
                return
        n = self.held.get(key, 0) - 1
        if n > 0:
            self.held[key] = n
        else:
            self.held.pop(key, None)


class Fill:
    """A pull from the origin in progress, shared by the visitors who ask for its blob. A
    blob the cache cannot keep is pulled into an unnamed temporary file that stays open, and
    joinable, while a visitor reads it: N visitors of one big blob cost one origin request."""

    def __init__(
        self,
        blob: str,
        run: Callable[[Fill], Coroutine[Any, Any, None]],
        held: Sequence[tuple[Slots, Hashable]] = (),
    ) -> None:
        self.blob = blob
        self._run = run
        self.held = list(held)  # the visitor's pull slots, given back when the pull ends
        self.uncached: IO[bytes] | None = None
        self.uncached_size = 0
        self.held_size = 0
        self.readers = 0
        # client address -> how many of its pulls and readers hold the temporary file open
        self.holders: dict[int, int] = {}
        self._on_done: list[Callable[[], None]] = []
        self.length: int | None = None
        self.got = 0
        self.done = False
        self.status = 200
        self.error = ""
        self.tmp: Path | None = None
        self.path: Path | None = None
        self.buf: bytearray | None = None
        self.task: asyncio.Task[None] | None = None
        self._wake: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run(self))

    def _notify(self) -> None:
        if not self._wake.done():
            self._wake.set_result(None)
        self._wake = asyncio.get_running_loop().create_future()

    async def wait(self, timeout_s: float) -> bool:
        """Until the next progress; False when none came within `timeout_s`."""
        try:
            async with asyncio.timeout(timeout_s):
                await asyncio.shield(self._wake)
        except TimeoutError:
            return False
        return True

    def begin(self, length: int) -> None:
        self.length = length
        self._notify()

    def advance(self, n: int) -> None:
        self.got += n
        self._notify()

    def release_slots(self) -> None:
        held, self.held = self.held, []
        for slots, key in held:
            slots.release(key)

    def hold(self, br: BlindRoute, key: int, size: int) -> bool:
        """`key` (a client address) keeps this uncacheable blob's file open: charged `size`
        once, however many of its pulls and readers hold it; False (nothing charged) when
        that would take the address over its share of disk_cache_bytes."""
        n = self.holders.get(key, 0)
        if n == 0:
            have = br.uncached_by_key.get(key, 0)
            if have + size > br.cfg.disk_cache_bytes // UNCACHED_SHARE_PER_ADDRESS:
                return False
            br.uncached_by_key[key] = have + size
            self.held_size = size
        self.holders[key] = n + 1
        return True

    def unhold(self, br: BlindRoute, key: int) -> None:
        n = self.holders.get(key, 0)
        if n == 0:
            return
        if n > 1:
            self.holders[key] = n - 1
            return
        del self.holders[key]
        left = br.uncached_by_key.get(key, 0) - self.held_size
        if left > 0:
            br.uncached_by_key[key] = left
        else:
            br.uncached_by_key.pop(key, None)

    def on_done(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call `callback` when the pull ends (now, if it has); returns the way to unwatch."""
        if self.done:
            callback()
            return lambda: None
        self._on_done.append(callback)

        def unwatch() -> None:
            with contextlib.suppress(ValueError):
                self._on_done.remove(callback)

        return unwatch

    def _ended(self) -> None:
        self.done = True
        callbacks, self._on_done = self._on_done, []
        for callback in callbacks:
            callback()
        self._notify()

    def close_uncached(self) -> int:
        """Close the temporary file (readers hold their own descriptors); its size, or 0."""
        if self.uncached is None:
            return 0
        self.uncached.close()
        self.uncached = None
        return self.uncached_size

    def fail(self, status: int, error: str) -> None:
        self.status, self.error = status, error
        self._ended()

    def finish(self) -> None:
        self._ended()


def _content_length(headers: Headers) -> int | None:
    for k, v in headers:
        if k == b"content-length":
            try:
                n = int(v)
            except ValueError:
                return None
            return n if n >= 0 else None
    return None
