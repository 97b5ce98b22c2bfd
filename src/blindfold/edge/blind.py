"""Blind routes in an edge worker: a CDN hostname of the edge's own (its certificate and key)
that serves sealed blobs by id at `/b/<id>`, pulled from the origin agent over verified TLS and
cached in memory and on disk, both bounded, LRU.

What the edge holds is ciphertext and its size: the keys and the path -> id map are in the
manifest, which only the origin serves. The edge does not (cannot) check a blob; the client
does, against the signed manifest, and falls back to the origin when a copy is bad. So the
edge's job is to be fast and bounded, and to never serve a partial pull as a complete blob.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import re
import socket
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

from blindfold.config.edge import BlindRouteConfig, RouteConfig
from blindfold.core.clienthello import ClientHello
from blindfold.core.proxyproto import encode_v1, encode_v2
from blindfold.core.tls13_server import ConnectionFailed
from blindfold.edge.keyless import origin_and_http, origin_tls_context
from blindfold.errors import ConfigError, UpstreamError
from blindfold.io.openssl_engine import OpenSslServer
from blindfold.io.tls13_transport import TlsServerProtocol
from blindfold.web.client import UpstreamPool, UpstreamResponse
from blindfold.web.http1 import ConnInfo, H1Connection
from blindfold.web.http2 import H2Connection
from blindfold.web.messages import BodyStream, Headers, Request, Responder, simple_response

if TYPE_CHECKING:
    from blindfold.edge.passthrough import Conn
    from blindfold.edge.worker import RouteState, Worker

# /b/<id>: a sealed blob; /p/<id>.js|.css: a script or stylesheet published in plaintext for
# Subresource Integrity (`blindfold seal --sri`).
_PATH = re.compile(rb"/(?:b/([0-9a-f]{32})|p/([0-9a-f]{32}\.(?:js|css)))")
_ID = re.compile(r"[0-9a-f]{32}(?:\.js|\.css)?")
_TYPES = {"js": b"text/javascript; charset=utf-8", "css": b"text/css; charset=utf-8"}
SEND_CHUNK = 1 << 18
MEMORY_SEND_CHUNK = 1 << 20
DISK_RETRY_S = 30.0
MAX_UNCACHEABLE = 10_000
SEND_BUFFER_BYTES = 1 << 20
# Blob ids name content (an HMAC of path and content digest): a blob never changes.
_CACHE_CONTROL = b"public, max-age=31536000, immutable"


def _server_tls(where: str, rc: RouteConfig) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    try:
        ctx.load_cert_chain(rc.certificate, rc.key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"{where}.certificate", f"cannot load {rc.certificate} with {rc.key}: {exc}"
        ) from None
    return ctx


def check_route(where: str, rc: RouteConfig) -> None:
    """What `blindfold check-config` checks of a blind route: its files load."""
    _server_tls(where, rc)
    origin_tls_context(where, rc)


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
            elif f".{os.getpid()}." not in entry.name:  # a pull that never finished
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
        if size is not None:
            self.disk_used -= size

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
        self._evict_disk()

    def _evict_disk(self) -> None:
        assert self.dir is not None
        while self.disk_used > self.disk_max and self.disk:
            name, size = self.disk.popitem(last=False)
            self.disk_used -= size
            with contextlib.suppress(OSError):
                os.unlink(self.dir / name)


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
        self, where: str, rc: RouteConfig, worker_index: int, old: BlindRoute | None = None
    ) -> None:
        self.config = rc
        self.cfg = rc.blind or BlindRouteConfig()
        self.tls = _server_tls(where, rc)
        # visitors send no bodies: GET, HEAD and OPTIONS only
        self.origin_tls, self.pins, self.http, self.limits = origin_and_http(
            where, rc, max_body_bytes=0
        )
        same_cache = old is not None and old.cfg == self.cfg
        # The store (and the pulls filling it) carry over a reload that keeps the cache
        # settings; a new store would rescan the directory under live pulls.
        self.store: BlobStore = (
            old.store if old is not None and same_cache else BlobStore(self.cfg, worker_index)
        )
        self.pulls: dict[str, Fill] = old.pulls if old is not None and same_cache else {}
        self.uncacheable: OrderedDict[str, None] = (
            old.uncacheable if old is not None and same_cache else OrderedDict()
        )
        self.stats: BlindStats = old.stats if old is not None else BlindStats()
        self.pool: UpstreamPool | None = None
        if old is not None and old.pool is not None:
            if _origin_settings(old.config) == _origin_settings(rc):
                self.pool = old.pool  # its connections (in use or idle) stay valid
            else:
                old.pool.close()
        self.any_origin = "*" in self.cfg.allow_origins
        self.allowed_origins = frozenset(o.encode() for o in self.cfg.allow_origins)

    def remember_uncacheable(self, blob: str) -> None:
        """Blobs the cache cannot keep (bigger than memory allows, no disk): later requests
        stream them straight from the origin without asking for them twice."""
        self.uncacheable[blob] = None
        if len(self.uncacheable) > MAX_UNCACHEABLE:
            self.uncacheable.popitem(last=False)

    def cors(self, request: Request) -> Headers:
        """CORS for a page's service worker fetching blobs cross-origin (Fetch standard)."""
        if self.any_origin:
            return [(b"access-control-allow-origin", b"*")]
        origin = request.header(b"origin")
        if origin is not None and origin in self.allowed_origins:
            return [(b"access-control-allow-origin", origin), (b"vary", b"origin")]
        return [(b"vary", b"origin")]


class BlindService:
    """The worker's blind side, on the asyncio loop the reactor is attached to."""

    def __init__(self, worker: Worker, loop: asyncio.AbstractEventLoop) -> None:
        self.worker = worker
        self.loop = loop

    def build(self, where: str, rc: RouteConfig, old: BlindRoute | None) -> BlindRoute:
        return BlindRoute(where, rc, self.worker.index, old)

    def begin(self, conn: Conn, route: RouteState, hello: ClientHello) -> None:
        br = route.blind
        assert br is not None
        server = OpenSslServer(br.tls, hello.sni)
        events = server.receive(bytes(conn.buf), self.worker.reactor.now)
        conn.begin_keyless()
        failed = next((e for e in events if isinstance(e, ConnectionFailed)), None)
        if failed is not None:
            with contextlib.suppress(OSError):
                conn.client.send(server.data_to_send())  # OpenSSL's alert
            conn.close("refused", f"tls_{failed.reason}")
            return

        def app(alpn: str | None) -> asyncio.Protocol:
            handler = BlindHandler(self.worker, conn, route, br)
            local = conn.local or ("0.0.0.0", 0)
            info = ConnInfo(
                (conn.ip, conn.client_port),
                local,
                b"https",
                {"sni": hello.sni or "", "alpn": alpn or ""},
            )
            if alpn == "h2":
                return H2Connection(handler, br.limits, info, handler.http_event)
            return H1Connection(handler, br.limits, info, handler.http_event)

        proto = TlsServerProtocol(
            server,
            app,
            conn.keyless_done,
            br.http.tls_handshake_timeout_s,
            br.http.keepalive_timeout_s,
        )
        sock: socket.socket = conn.adopt_socket_for_asyncio()
        try:
            # Blob responses are hundreds of KiB: a send buffer that takes one whole spares
            # asyncio's partial-send path (Python 3.11 copies and shifts its buffer there).
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
        except OSError:
            pass
        conn.l7 = proto
        make = getattr(self.loop, "_make_socket_transport", None)
        if make is not None:  # see KeylessService._open
            make(sock, proto)
        else:
            self.loop.create_task(self._attach(conn, proto, sock))

    async def _attach(self, conn: Conn, proto: TlsServerProtocol, sock: socket.socket) -> None:
        try:
            await self.loop.connect_accepted_socket(lambda: proto, sock)
        except OSError:
            conn.close("reset", "attach_failed")


class BlindHandler:
    """Requests on one visitor connection of a blind route."""

    def __init__(self, worker: Worker, conn: Conn, route: RouteState, br: BlindRoute) -> None:
        self.worker = worker
        self.conn = conn
        self.route = route
        self.br = br
        self.cors: Headers = []

    def http_event(self, name: str, fields: dict[str, object]) -> None:
        if name in ("h2_abuse", "bad_request", "handler_error", "send_timeout"):
            self.worker.log.log(name, route=self.route.name, **fields)

    async def __call__(self, request: Request, body: BodyStream, respond: Responder) -> None:
        br = self.br
        method = request.method
        if method == b"OPTIONS":  # CORS preflight from a page's service worker
            await respond.start(
                204,
                [
                    *br.cors(request),
                    (b"access-control-allow-methods", b"GET, HEAD"),
                    (b"access-control-max-age", b"86400"),
                    (b"content-length", b"0"),
                ],
            )
            await respond.end()
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
        if blob in br.uncacheable:
            await self._direct(blob, respond, head)
            return
        fill = br.pulls.get(blob)
        if fill is None:
            fill = Fill(blob, self._fill_task)
            br.pulls[blob] = fill
            fill.start()
        else:
            br.stats.count("joined")
        await self._from_fill(fill, respond, head)

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
            size = os.fstat(f.fileno()).st_size
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
        if kept is not None and len(kept) == size:
            br.store.put_memory(blob, bytes(kept))
        return True

    def _pool(self) -> UpstreamPool:
        br = self.br
        if br.pool is None:
            from blindfold.edge.l7 import open_verified_origin

            rc, route, worker = br.config, self.route, self.worker
            # The edge pulls on its own behalf: PROXY LOCAL (v2) / UNKNOWN (v1), so an origin
            # that requires a header from its edges accepts it and sees the edge's address.
            header = {"v2": encode_v2(None, None), "v1": encode_v1(None, None)}.get(
                rc.proxy_protocol, b""
            )

            async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
                return await open_verified_origin(
                    worker,
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
        out: io.BufferedWriter | None = None
        resp: UpstreamResponse | None = None
        try:
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
            if store.dir is not None and length <= store.disk_max and store.disk_ok():
                fill.tmp = store.temp_file(fill.blob)
                try:
                    assert fill.tmp is not None
                    out = fill.tmp.open("wb")
                except OSError as exc:
                    store.disk_failed(str(exc))
                    fill.tmp = None
            if fill.tmp is None:
                if length > store.mem_obj_max:  # nowhere to keep it: each visitor pulls
                    if store.dir is None or length > store.disk_max:  # (not a disk hiccup)
                        br.remember_uncacheable(fill.blob)
                    fill.fail(0, "")
                    return
                fill.buf = bytearray()
            fill.begin(length)
            async for chunk in resp.body():
                if fill.got + len(chunk) > length:
                    raise UpstreamError("origin sent more than its Content-Length")
                if out is not None:
                    out.write(chunk)
                    out.flush()  # visitors read the file as it grows
                else:
                    assert fill.buf is not None
                    fill.buf += chunk
                fill.advance(len(chunk))
            br.stats.origin_bytes += fill.got
            if fill.got != length:
                raise UpstreamError(f"origin sent {fill.got} of {length} bytes")
            if out is not None:
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
            store.disk_failed(str(exc))
            fill.fail(502, f"cache: {exc}")
        finally:
            if out is not None:
                out.close()
            if resp is not None:
                resp.close()  # a no-op once the body was read to its end (back in the pool)
            if fill.tmp is not None:
                fill.tmp.unlink(missing_ok=True)
            if br.pulls.get(fill.blob) is fill:
                del br.pulls[fill.blob]
            if fill.error:
                self.worker.log.log(
                    "blind_pull_failed",
                    route=self.route.name,
                    blob=fill.blob,
                    detail=fill.error[:200],
                )
            fill.finish()

    async def _from_fill(self, fill: Fill, respond: Responder, head: bool) -> None:
        """Answer from a pull in progress: the head once the origin's length is known, then
        the bytes as they land (from the temporary file, or memory), never more than pulled."""
        br = self.br
        idle = br.http.upstream_timeout_s
        while fill.length is None and not fill.done:
            if not await fill.wait(idle):
                break
        if fill.length is None:
            if fill.done and fill.status == 0:  # not cacheable here: a pull for this visitor
                await self._direct(fill.blob, respond, head)
                return
            status = fill.status if fill.done and fill.status == 404 else 502
            br.stats.count("not_found" if status == 404 else "error")
            await simple_response(
                respond,
                status,
                "no such blob\n" if status == 404 else "blob unavailable\n",
                self.cors,
            )
            return
        br.stats.count("miss")
        await respond.start(200, self._headers(fill.blob, fill.length, b"miss"))
        if head:
            await respond.end()
            return
        fd = -1
        sent = 0
        try:
            if fill.buf is None:
                where = fill.tmp or fill.path
                if where is None:
                    respond.abort()
                    return
                fd = os.open(where, os.O_RDONLY)  # stays valid through the rename
            while sent < fill.length:
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
        if sent == fill.length:
            await respond.end()
        else:
            respond.abort()  # never claim a whole blob

    async def _direct(self, blob: str, respond: Responder, head: bool) -> None:
        """A blob the cache cannot keep (too big for memory, no disk): streamed through."""
        br = self.br
        prefix = br.cfg.origin_public_path if "." in blob else br.cfg.origin_blobs_path
        host = (br.config.origin_server_name or "origin").encode()
        try:
            resp = await self._pool().request(
                b"GET",
                (prefix + blob).encode(),
                [(b"host", host), (b"user-agent", b"blindfold-edge")],
                None,
            )
        except UpstreamError:
            br.stats.count("origin_error")
            await simple_response(respond, 502, "origin unavailable\n", self.cors)
            return
        try:
            length = _content_length(resp.headers)
            if resp.status != 200 or length is None or length > br.cfg.max_blob_bytes:
                await simple_response(
                    respond, 404 if resp.status == 404 else 502, "no such blob\n", self.cors
                )
                return
            br.stats.count("uncached")
            await respond.start(200, self._headers(blob, length, b"uncached"))
            if head:
                await respond.end()
                return
            sent = 0
            try:
                async for chunk in resp.body():
                    sent += len(chunk)
                    if sent > length:
                        break
                    await respond.send(chunk)
            except UpstreamError:
                pass
            br.stats.origin_bytes += sent
            br.stats.served_bytes += min(sent, length)
            if sent == length:
                await respond.end()
            else:
                respond.abort()
        finally:
            resp.close()


class Fill:
    """A pull from the origin in progress, shared by the visitors who ask for its blob."""

    def __init__(self, blob: str, run: Callable[[Fill], Coroutine[Any, Any, None]]) -> None:
        self.blob = blob
        self._run = run
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

    def fail(self, status: int, error: str) -> None:
        self.status, self.error = status, error
        self.done = True
        self._notify()

    def finish(self) -> None:
        self.done = True
        self._notify()


def _content_length(headers: Headers) -> int | None:
    for k, v in headers:
        if k == b"content-length":
            try:
                n = int(v)
            except ValueError:
                return None
            return n if n >= 0 else None
    return None


def snapshot(routes: list[Any]) -> dict[str, list[list[Any]]]:
    """Prometheus tables for the worker's blind routes."""
    tables: dict[str, list[list[Any]]] = {
        "blindfold_blind_requests_total": [],
        "blindfold_blind_cache_bytes": [],
        "blindfold_blind_cache_blobs": [],
        "blindfold_blind_origin_bytes_total": [],
        "blindfold_blind_served_bytes_total": [],
    }
    for route in routes:
        br = route.blind
        if br is None:
            continue
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
    return tables
