"""The origin's part in blind delivery. Over its own TLS, and only after the request gate (WAF,
decision rules, access log: `StoreProxy` is the gate's last step), it answers its reserved paths:
- the signed manifest (it holds the content keys: `no-store`, never through a blind edge),
- the signed private manifest (the keys of private files), only to visitors the application
  admits (`private_auth_path`, asked like nginx's auth_request), `private, no-store`,
- the sealed blobs by id, the plaintext SRI copies, and the signed blob index (their
  digests) that edges check their copies against, for edges to pull and cache,
- the service worker (with the manifest URL, the edge and the site's manifest key filled in)
  and its registration snippet,
- the plaintext of sealed files under its own prefix (whole or from a byte offset): the
  visitors' fallback when an edge copy fails verification,
- a small report endpoint where clients tell the site that an edge copy failed,
- with `pages_prefix`, the files of source_dir under that prefix (the pages), rewritten for
  Subresource Integrity when asked.
Anything else goes to the application: the store never hides one of its paths unless
`pages_prefix` says it serves files there, and then only paths that are files."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import os
import re
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from importlib import resources
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_pem_public_key,
)

from blindfold.blind.sealer import (
    BLOB_INDEX_NAME,
    BLOBS_DIR,
    MANIFEST_NAME,
    PRIVATE_MANIFEST_NAME,
    PUBLIC_DIR,
    PUBLIC_KEY_NAME,
    SRI_NAME,
    SRI_TYPES,
)
from blindfold.config.origin import BlindStoreConfig
from blindfold.core import manifest, msgsig, sri
from blindfold.core.iplist import visitor_key
from blindfold.core.ratelimit import BucketMap, TokenBucket
from blindfold.errors import ConfigError, UpstreamError, VerificationError
from blindfold.web.client import UpstreamPool, UpstreamResponse
from blindfold.web.messages import (
    BodyStream,
    BodyTimeout,
    BodyTooLarge,
    Headers,
    Request,
    Responder,
)
from blindfold.web.proxy import ReverseProxy, iterate

_ID = re.compile(rb"[0-9a-f]{32}")
_PUBLIC = re.compile(rb"[0-9a-f]{32}\.(js|css)")
_RANGE = re.compile(rb"bytes=(\d{1,15})-(\d{0,15})")
CHUNK = 1 << 16
MAX_REPORT_BYTES = 4096
REPORTS_PER_S = 50.0
REPORTS_PER_CLIENT_PER_S = 1.0
REPORTS_PER_CLIENT_BURST = 10
MAX_REPORT_CLIENTS = 10_000
# The application's answer to an authorisation request: a refusal's body is passed on up to
# this size (a larger one is dropped), an admission's body is read and discarded.
MAX_AUTH_BODY_BYTES = 16 << 10
_PRIVATE_CACHE = b"private, no-store"
# Blobs are named by content: an id never changes meaning.
_BLOB_CACHE = b"public, max-age=31536000, immutable"
_TYPES = {
    ".html": b"text/html; charset=utf-8",
    ".js": b"text/javascript; charset=utf-8",
    ".css": b"text/css; charset=utf-8",
    ".json": b"application/json",
    ".png": b"image/png",
    ".svg": b"image/svg+xml",
    ".txt": b"text/plain; charset=utf-8",
}
_JS = b"text/javascript; charset=utf-8"
# The SRI rewrite parses HTML in Python (~0.2-0.4 s per MiB): it runs in a thread, at most
# this many at once, once per version of a page (cached, bounded), and not at all for pages
# bigger than MAX_REWRITE_BYTES (served as they are).
MAX_CONCURRENT_REWRITES = 2
MAX_REWRITE_BYTES = 16 << 20
_PageKey = tuple[str, int, int, int, tuple[int, int, int], bytes]


def _rewrite_file(
    file: Path, page_path: str, published: dict[str, sri.Published]
) -> tuple[bytes, int, bytes]:
    """In a worker thread: the page rewritten for SRI, its tag count and its SHA-256."""
    page, count = sri.rewrite(file.read_text(encoding="utf-8"), page_path, published)
    data = page.encode()
    return data, count, hashlib.sha256(data).digest()


def _service_worker(cfg: BlindStoreConfig, public: Ed25519PublicKey) -> bytes:
    template = resources.files("blindfold.blind").joinpath("static/sw.js").read_text()
    config = {
        "manifest": cfg.manifest_path,
        # "": no private content is served (no authorisation configured)
        "privateManifest": cfg.private_manifest_path if cfg.private_auth_path else "",
        "plain": cfg.plaintext_path if cfg.source_dir else "",  # "": the file's own URL
        "edge": cfg.edge_url,
        "report": cfg.report_path,
        "keyId": manifest.key_id(public),
        "publicKey": manifest.b64u(public.public_bytes(Encoding.Raw, PublicFormat.Raw)),
    }
    return template.replace("/*BLINDFOLD_CONFIG*/ {}", json.dumps(config)).encode()


class LocalResponse(UpstreamResponse):
    """A response the store makes itself, shaped like the application's (status, headers, a
    body iterator) so the gate treats both alike: the WAF sees its head, the access log its
    status and size. No pool connection stands behind it."""

    def __init__(
        self,
        status: int,
        headers: Headers,
        chunks: AsyncIterator[bytes] | None = None,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self.status = status
        self.headers = headers
        self.http_version = b"1.1"
        self._chunks = chunks
        self._on_close = on_close

    async def body(self) -> AsyncIterator[bytes]:
        if self._chunks is not None:
            async for chunk in self._chunks:
                yield chunk

    def close(self) -> None:
        on_close, self._on_close = self._on_close, None
        if on_close is not None:
            on_close()


def _simple(status: int, text: str, extra: Headers | None = None) -> LocalResponse:
    data = text.encode()

    async def one() -> AsyncIterator[bytes]:
        yield data

    return LocalResponse(
        status,
        [
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", str(len(data)).encode()),
            *(extra or []),
        ],
        one(),
    )


class StoreProxy(ReverseProxy):
    """The request gate's last step when blind delivery is on: the store's own paths are
    answered here (after the WAF and the decision rules ran), every other request goes to the
    application."""

    def __init__(self, store: BlindStore, pool: UpstreamPool) -> None:
        super().__init__(pool)
        self.store = store
        store.pool = pool  # the application's: asked before private content is served

    async def forward(
        self,
        request: Request,
        body: BodyStream,
        respond: Responder,
        prefix: list[bytes] | None = None,
    ) -> UpstreamResponse | None:
        local = await self.store.answer(request, body, prefix or [])
        if local is not None:
            return local
        return await super().forward(request, body, respond, prefix)

    async def relay(self, request: Request, response: UpstreamResponse, respond: Responder) -> int:
        if not isinstance(response, LocalResponse):
            return await super().relay(request, response, respond)
        sent = 0
        try:
            await respond.start(response.status, response.headers)
            async for chunk in response.body():
                await respond.send(chunk)
                sent += len(chunk)
            await respond.end()
        except UpstreamError:
            respond.abort()  # the file shrank under us: never pretend it is complete
        except ConnectionError:
            pass
        finally:
            response.close()
        return sent


class BlindStore:
    REWRITE_CACHE_BYTES = 32 << 20  # rewritten pages kept (LRU); a page over a quarter is not

    def __init__(
        self, cfg: BlindStoreConfig, stats: dict[str, Any], log: Callable[..., None]
    ) -> None:
        self.cfg = cfg
        self.stats = stats
        self.log = log
        self.dir = Path(cfg.dir)
        self.blobs = self.dir / BLOBS_DIR
        self.manifest_path = cfg.manifest_path.encode()
        self.private_manifest_path = cfg.private_manifest_path.encode()
        self.pool: UpstreamPool | None = None  # the application's: StoreProxy sets it
        self.blob_index_path = cfg.blob_index_path.encode()
        self.blobs_path = cfg.blobs_path.encode()
        self.public_path = cfg.public_path.encode()
        self.plaintext_path = cfg.plaintext_path.encode()
        self.report_path = cfg.report_path.encode()
        self.pages_prefix = cfg.pages_prefix.encode()
        self.site_names = frozenset(cfg.site_names)
        self._sri: dict[str, sri.Published] = {}
        self._sri_version = (-1, -1, -1)
        self._pages: OrderedDict[_PageKey, tuple[bytes, int, bytes]] = OrderedDict()
        self.rewrite_cache_bytes = 0
        self._rewrites: dict[_PageKey, asyncio.Task[tuple[bytes, int, bytes]]] = {}
        self._rewrite_slots = asyncio.Semaphore(MAX_CONCURRENT_REWRITES)
        if cfg.rewrite_html and not cfg.edge_url:
            raise ConfigError("blind.rewrite_html", "needs edge_url (where the copies are)")
        if cfg.pages_prefix and not cfg.source_dir:
            raise ConfigError("blind.pages_prefix", "needs source_dir (where the pages are)")
        self.source = Path(cfg.source_dir).resolve() if cfg.source_dir else None
        if self.source is not None and self.dir.resolve().is_relative_to(self.source):
            raise ConfigError(
                "blind.dir",
                f"{cfg.dir} is inside source_dir: its manifest (the content keys) would be "
                "served like a page",
            )
        self._sealed: dict[str, manifest.Entry] = {}
        self._private: frozenset[str] = frozenset()  # the private paths among them
        self._private_unreadable = False  # then every file of source_dir counts as private
        if (self.dir / PRIVATE_MANIFEST_NAME).exists() and not cfg.private_auth_path:
            raise ConfigError(
                "blind.private_auth_path",
                f"{self.dir / PRIVATE_MANIFEST_NAME} holds private files (`seal --private`): "
                "name the application's path that admits visitors to them",
            )
        # Reports are logged: bounded, so a client cannot flood the log through them.
        self.reports = TokenBucket(REPORTS_PER_S, int(REPORTS_PER_S * 2), time.monotonic())
        # ... and per visitor address, so that one visitor cannot use up everyone's reports
        self.reports_by_client = BucketMap(
            REPORTS_PER_CLIENT_PER_S, REPORTS_PER_CLIENT_BURST, MAX_REPORT_CLIENTS
        )
        self._sealed_mtime: tuple[float, float] = (-1.0, -1.0)
        self.signer: msgsig.ResponseSigner | None = None
        self._digests: dict[tuple[int, int, int, int], bytes] = {}
        if cfg.response_signing_key:
            from blindfold.blind.sealer import load_signing_key

            try:
                key = load_signing_key(cfg.response_signing_key)
            except ConfigError as exc:
                raise ConfigError("blind.response_signing_key", exc.message) from None
            self.signer = msgsig.ResponseSigner(key, cfg.response_signature_lifetime_s)
        self.sw: bytes | None = None
        self.register = b""
        if cfg.edge_url:
            try:
                public = load_pem_public_key((self.dir / PUBLIC_KEY_NAME).read_bytes())
            except (OSError, ValueError) as exc:
                raise ConfigError(
                    "blind.dir", f"{self.dir / PUBLIC_KEY_NAME}: {exc} (run `blindfold seal` first)"
                ) from None
            if not isinstance(public, Ed25519PublicKey):
                raise ConfigError("blind.dir", f"{PUBLIC_KEY_NAME} is not an Ed25519 key")
            self.sw = _service_worker(cfg, public)
            self.register = (
                f"if ('serviceWorker' in navigator) navigator.serviceWorker"
                f".register({json.dumps(cfg.service_worker_path)}, "
                "{scope: '/'});\n"
            ).encode()

    def _sealed_paths(self) -> dict[str, manifest.Entry]:
        """The manifests' entries, public and private (re-read when the sealer rewrote
        them; `self._private` names the private ones). Read without a time check: an expired
        manifest still names what was sealed; visitors check expiry."""
        mtimes = []
        for name in (MANIFEST_NAME, PRIVATE_MANIFEST_NAME):
            try:
                mtimes.append((self.dir / name).stat().st_mtime)
            except OSError:
                mtimes.append(0.0)
        mtime = (mtimes[0], mtimes[1])
        if mtime != self._sealed_mtime:
            sealed: dict[str, manifest.Entry] = {}
            private: dict[str, manifest.Entry] = {}
            with contextlib.suppress(OSError, VerificationError):
                sealed = _entries((self.dir / MANIFEST_NAME).read_bytes())
            self._private_unreadable = False
            if mtime[1]:
                try:
                    private = _entries((self.dir / PRIVATE_MANIFEST_NAME).read_bytes())
                except (OSError, VerificationError):
                    # damaged (the sealer replaces it atomically): which files it names is
                    # unknown, so every file of source_dir is treated as private (served only
                    # to admitted visitors) rather than any of them as a public page
                    self._private_unreadable = True
                    self.log("blind_private_manifest_unreadable", file=PRIVATE_MANIFEST_NAME)
            self._private = frozenset(private)
            self._sealed = {**sealed, **private}
            self._sealed_mtime = mtime
        return self._sealed

    def _count(self, key: str, n: int = 1) -> None:
        self.stats[key] = self.stats.get(key, 0) + n

    def _reserved(self, path: bytes) -> bool:
        cfg = self.cfg
        return (
            path
            in (
                self.manifest_path,
                self.private_manifest_path,
                self.blob_index_path,
                self.report_path,
            )
            or path.startswith((self.blobs_path, self.public_path, self.plaintext_path))
            or (
                self.sw is not None
                and path in (cfg.service_worker_path.encode(), cfg.register_path.encode())
            )
        )

    async def answer(
        self, request: Request, body: BodyStream, prefix: list[bytes]
    ) -> LocalResponse | None:
        """The store's response to a request for one of its paths; None for anything else
        (the application's)."""
        path, cfg = request.path, self.cfg
        if self._reserved(path):
            if path == self.report_path and request.method == b"POST":
                return await self._report(request, body, prefix)
            allowed = b"POST" if path == self.report_path else b"GET, HEAD"
            if request.method not in allowed.split(b", "):
                return _simple(405, "method not allowed\n", [(b"allow", allowed)])
        elif request.method not in (b"GET", b"HEAD") or not (
            self.pages_prefix and path.startswith(self.pages_prefix)
        ):
            return None
        head = request.method == b"HEAD"
        secret = path in (self.manifest_path, self.private_manifest_path) or path.startswith(
            self.plaintext_path
        )
        if secret and not self._end_to_end(request):
            self._count("blind_requests:refused_not_end_to_end")
            return _simple(
                403,
                "served only over end-to-end TLS to this site's own names "
                "([origin.blind] site_names), never where an edge ends TLS\n",
            )
        if path == self.manifest_path:
            return await self._file(
                request,
                self.dir / MANIFEST_NAME,
                b"application/json",
                b"no-store",
                head,
                "manifest",
            )
        if path == self.private_manifest_path:
            refused = await self._admit(request)
            if refused is not None:
                return refused
            return await self._file(
                request,
                self.dir / PRIVATE_MANIFEST_NAME,
                b"application/json",
                _PRIVATE_CACHE,
                head,
                "private_manifest",
            )
        if path == self.blob_index_path:
            return await self._file(
                request,
                self.dir / BLOB_INDEX_NAME,
                b"application/json",
                b"no-cache",
                head,
                "blob_index",
            )
        if path.startswith(self.blobs_path):
            blob = path[len(self.blobs_path) :]
            if not _ID.fullmatch(blob):
                self._count("blind_requests:not_found")
                return _simple(404, "no such blob\n")
            return await self._file(
                request,
                self.blobs / blob.decode(),
                b"application/octet-stream",
                _BLOB_CACHE,
                head,
                "blob",
            )
        if path.startswith(self.public_path):
            public = path[len(self.public_path) :]
            if not _PUBLIC.fullmatch(public):
                self._count("blind_requests:not_found")
                return _simple(404, "not published\n")
            public_type = SRI_TYPES["." + public.decode().rpartition(".")[2]]
            return await self._file(
                request,
                self.dir / PUBLIC_DIR / public.decode(),
                f"{public_type}; charset=utf-8".encode(),
                _BLOB_CACHE,
                head,
                "public",
            )
        if self.sw is not None and path == cfg.service_worker_path.encode():
            return self._bytes(request, self.sw, _JS, head)
        if self.sw is not None and path == cfg.register_path.encode():
            return self._bytes(request, self.register, _JS, head)
        if path.startswith(self.plaintext_path):
            # The plaintext of a sealed file (and of nothing else), at its manifest path.
            found = self._source_file(b"/" + path[len(self.plaintext_path) :])
            entry = self._sealed_paths().get(found[1]) if found is not None else None
            if found is None or entry is None:
                self._count("blind_requests:not_found")
                return _simple(404, "not a sealed file\n")
            private = self._is_private(found[1], found[0])
            if private and (refused := await self._admit(request)) is not None:
                return refused
            # Its ETag is its plaintext digest (the manifest's), so a client that resumes it
            # with Range + If-Range never splices two versions.
            return await self._file(
                request,
                found[0],
                entry.type.encode(),
                _PRIVATE_CACHE if private else b"no-cache",
                head,
                "plaintext",
                f'"{entry.sha256}"'.encode(),
            )
        # A page: a file of source_dir under pages_prefix; other paths are the application's.
        found = self._source_file(path)
        if found is None:
            return None
        file, name = found
        entry = self._sealed_paths().get(name)
        if self._is_private(name, file):
            # a private file's plaintext at its own path (however spelt: %2F%2F, a link to
            # it): only end to end, and only to whom the application admits
            if not self._end_to_end(request):
                self._count("blind_requests:refused_not_end_to_end")
                return _simple(403, "a sealed file is served in plaintext only end to end\n")
            if (refused := await self._admit(request)) is not None:
                return refused
            ctype = entry.type.encode() if entry else b"application/octet-stream"
            return await self._file(request, file, ctype, _PRIVATE_CACHE, head, "page")
        if entry is not None and not self._end_to_end(request):
            # a sealed file's plaintext, at its own path: the same rule as the fallback prefix
            self._count("blind_requests:refused_not_end_to_end")
            return _simple(403, "a sealed file is served in plaintext only end to end\n")
        if entry is None and cfg.rewrite_html and file.suffix == ".html":
            return await self._page(request, file, head)
        ctype = (
            entry.type.encode() if entry else _TYPES.get(file.suffix, b"application/octet-stream")
        )
        return await self._file(request, file, ctype, b"no-cache", head, "page")

    def _is_private(self, name: str, file: Path) -> bool:
        """Whether a file of source_dir is private: by the name asked for, or by where it
        really is (another spelling of its path, a symbolic link to it). `_sealed_paths`
        must have been read first."""
        if self._private_unreadable:
            return True
        if not self._private:
            return False
        assert self.source is not None
        return name in self._private or (
            "/" + file.relative_to(self.source).as_posix() in self._private
        )

    async def _admit(self, request: Request) -> LocalResponse | None:
        """Ask the application whether this visitor may have private content (nginx's
        auth_request): a GET of private_auth_path carrying the visitor's Cookie and
        Authorization. None: admitted (a 2xx). Otherwise the answer for the visitor: the
        application's own 401 or 403, or 503 for anything else (a redirect, an error, no
        answer within private_auth_timeout_s). Without private_auth_path nothing private is
        ever served (404)."""
        cfg = self.cfg
        if not cfg.private_auth_path or self.pool is None:
            self._count("blind_requests:private_unconfigured")
            return _simple(404, "not found\n")
        # RFC 9113 §8.2.3: HTTP/2 may split Cookie into several fields; HTTP/1.1 wants one
        cookies = [v for k, v in request.headers if k == b"cookie"]
        authority = request.authority or request.tls.get("sni", "").encode() or b"localhost"
        headers: Headers = [(b"host", authority)]
        if cookies:
            headers.append((b"cookie", b"; ".join(cookies)))
        if (auth := request.header(b"authorization")) is not None:
            headers.append((b"authorization", auth))
        headers += [
            (b"x-original-uri", request.target or b"/"),
            (b"x-original-method", request.method),
            (b"x-forwarded-for", request.client[0].encode()),
            (b"x-forwarded-proto", request.scheme),
            (b"x-request-id", request.request_id.encode()),
        ]
        status, body = 0, bytearray()
        answer: Headers = []
        try:
            async with asyncio.timeout(cfg.private_auth_timeout_s):
                response = await self.pool.request(
                    b"GET", cfg.private_auth_path.encode(), headers, None
                )
                try:
                    status, answer = response.status, response.headers
                    async for chunk in response.body():
                        body += chunk
                        if len(body) > MAX_AUTH_BODY_BYTES:
                            body.clear()
                            break  # not read to its end: the connection is closed
                finally:
                    response.close()
        except (UpstreamError, TimeoutError, OSError) as exc:
            body.clear()  # a refusal whose body broke off is passed on without it
            if status == 0:  # no answer (a broken body after one: the status decides)
                reason = "timeout" if isinstance(exc, TimeoutError) else str(exc)[:200]
                self.log("blind_private_auth_failed", reason=reason)
                self._count("blind_requests:private_auth_failed")
                return _simple(503, "authorisation unavailable\n", [(b"retry-after", b"5")])
        if 200 <= status < 300:
            self._count("blind_requests:private_admitted")
            return None
        if status in (401, 403):
            self._count("blind_requests:private_refused")
            keep = [
                (k, v)
                for k, v in answer
                if k in (b"content-type", b"www-authenticate", b"set-cookie")
            ]
            data = bytes(body)

            async def one() -> AsyncIterator[bytes]:
                yield data

            return LocalResponse(
                status,
                [
                    *keep,
                    (b"cache-control", b"no-store"),
                    (b"content-length", str(len(data)).encode()),
                ],
                one(),
            )
        self.log("blind_private_auth_failed", reason=f"status {status}")
        self._count("blind_requests:private_auth_failed")
        return _simple(503, "authorisation unavailable\n", [(b"retry-after", b"5")])

    def _end_to_end(self, request: Request) -> bool:
        """Whether the request came over TLS that ends here, from the visitor: the name its
        TLS handshake asked for and the Host it names are both the site's own (site_names),
        names no edge ends TLS for. A keyless edge relays its visitors' requests for its own
        names (their Host), over a handshake with its own SNI (the route's origin_server_name
        or the visitor's): neither is a site name. Plain-HTTP listeners have no TLS at all.
        What this cannot tell: an edge the key server lets sign for a site name, or an edge
        that lies in its requests (docs/blind.md)."""
        sni = request.tls.get("sni", "")
        host = request.authority.decode("latin-1").lower()
        if host.startswith("["):
            return False
        host = host.rpartition(":")[0] if ":" in host else host
        return sni in self.site_names and host.rstrip(".") in self.site_names

    def _source_file(self, path: bytes) -> tuple[Path, str] | None:
        """The file under source_dir for a URL path (percent-decoded, as the manifest names
        files), and that name; None for anything outside it, dotfiles included."""
        if self.source is None:
            return None
        try:
            name = urllib.parse.unquote(path.decode(), errors="strict")
        except UnicodeDecodeError:
            return None
        text = name + "index.html" if name.endswith("/") else name
        if "\x00" in text or any(part.startswith(".") for part in text.split("/")):
            return None  # .git, .env and the like are never served
        file = (self.source / text.lstrip("/")).resolve()
        if not file.is_relative_to(self.source) or not file.is_file():
            return None
        return file, name

    def _published(self) -> tuple[tuple[int, int, int], dict[str, sri.Published]]:
        """sri.json (re-read when the sealer rewrote it): its version (inode, mtime, size) and
        path -> the edge copy."""
        try:
            st = (self.dir / SRI_NAME).stat()
        except OSError:
            return (0, 0, 0), {}
        version = (st.st_ino, st.st_mtime_ns, st.st_size)
        if version != self._sri_version:
            try:
                files = json.loads((self.dir / SRI_NAME).read_bytes())["files"]
                self._sri = {
                    p: sri.Published(self.cfg.edge_url + e["url_path"], e["integrity"])
                    for p, e in files.items()
                }
            except (OSError, ValueError, KeyError, TypeError):
                self._sri = {}
            self._sri_version = version
        return self._sri_version, self._sri

    async def _page(self, request: Request, file: Path, head: bool) -> LocalResponse:
        """An HTML page rewritten for Subresource Integrity: computed in a thread once per
        version of the page and of the published copies, then served from a bounded cache."""
        try:
            st = file.stat()
        except OSError:
            return _simple(404, "not found\n")
        if st.st_size > MAX_REWRITE_BYTES:
            return await self._file(request, file, _TYPES[".html"], b"no-cache", head, "page")
        version, published = self._published()
        # The page's directory is what relative references resolve against: the file's own
        # (one rewrite per page version however its URL is spelt, e.g. with %2F or //).
        assert self.source is not None
        parent = file.parent.relative_to(self.source).as_posix()
        where = b"/" if parent == "." else f"/{parent}/".encode()
        key = (str(file), st.st_ino, st.st_mtime_ns, st.st_size, version, where)
        done = self._pages.get(key)
        if done is not None:
            self._pages.move_to_end(key)
        else:
            job = self._rewrites.get(key)
            if job is None:
                job = asyncio.get_running_loop().create_task(
                    self._rewrite(key, file, where.decode("latin-1"), published)
                )
                self._rewrites[key] = job
                job.add_done_callback(lambda _t: self._rewrites.pop(key, None))
            try:
                # shielded: a visitor who leaves does not cancel the others' rewrite
                done = await asyncio.shield(job)
            except (OSError, UnicodeDecodeError):
                return _simple(404, "not found\n")
        data, count, digest = done
        self._count("blind_requests:page")
        self._count("blind_bytes:page", 0 if head else len(data))
        # A page that uses SRI gets the policy: then no script without integrity runs on it
        # (pages that load their scripts through the service worker are left alone).
        return self._bytes(
            request,
            data,
            _TYPES[".html"],
            head,
            [(b"integrity-policy", sri.INTEGRITY_POLICY)] if count else [],
            digest,
        )

    async def _rewrite(
        self, key: _PageKey, file: Path, where: str, published: dict[str, sri.Published]
    ) -> tuple[bytes, int, bytes]:
        async with self._rewrite_slots:
            done = await asyncio.to_thread(_rewrite_file, file, where, published)
        self._count("blind_requests:page_rewrite")
        size = len(done[0])
        if size <= self.REWRITE_CACHE_BYTES // 4:
            self._pages[key] = done
            self.rewrite_cache_bytes += size
            while self.rewrite_cache_bytes > self.REWRITE_CACHE_BYTES:
                _old, gone = self._pages.popitem(last=False)
                self.rewrite_cache_bytes -= len(gone[0])
        return done

    def _signed(self, request: Request, ctype: bytes, digest: bytes) -> Headers:
        """RFC 9421 signature headers for a 200 response to `request` (bound to its method,
        authority, path and query); none without a signing key or a Host to name."""
        if self.signer is None or not request.authority:
            return []
        url = "https://" + request.authority.decode("latin-1") + request.target.decode("latin-1")
        ref = msgsig.RequestRef(request.method.decode("latin-1"), url)
        return self.signer.headers(200, ctype.decode("latin-1"), digest, time.time(), ref)

    async def _file_digest(self, f: io.BufferedReader) -> bytes:
        """SHA-256 of the open file (what is sent) for its Content-Digest, cached by device,
        inode, mtime and size."""
        st = os.fstat(f.fileno())
        key = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
        digest = self._digests.get(key)
        if digest is None:

            def compute() -> bytes:
                f.seek(0)
                return hashlib.file_digest(f, "sha256").digest()

            digest = await asyncio.get_running_loop().run_in_executor(None, compute)
            if len(self._digests) >= 10000:
                self._digests.clear()
            self._digests[key] = digest
        return digest

    def _bytes(
        self,
        request: Request,
        data: bytes,
        ctype: bytes,
        head: bool,
        extra: Headers | None = None,
        digest: bytes | None = None,
    ) -> LocalResponse:
        async def one() -> AsyncIterator[bytes]:
            if not head:
                yield data

        return LocalResponse(
            200,
            [
                (b"content-type", ctype),
                (b"cache-control", b"no-cache"),
                (b"content-length", str(len(data)).encode()),
                *(extra or []),
                *self._signed(request, ctype, digest or hashlib.sha256(data).digest()),
            ],
            one(),
        )

    async def _report(
        self, request: Request, body: BodyStream, prefix: list[bytes]
    ) -> LocalResponse:
        now = time.monotonic()
        if self.reports_by_client.take(visitor_key(request.client[0]), now) or (
            not self.reports.allow(now)
        ):
            self._count("blind_requests:report_refused")
            return _simple(429, "too many reports\n", [(b"retry-after", b"1")])
        try:
            data = bytearray()
            async for chunk in iterate(prefix, body):  # what the WAF read, then the rest
                data += chunk
                if len(data) > MAX_REPORT_BYTES:
                    raise BodyTooLarge("report too large")
            report = json.loads(data)
            if not isinstance(report, dict):
                raise ValueError("not an object")
        except (BodyTooLarge, BodyTimeout, ValueError, UnicodeDecodeError, RecursionError):
            return _simple(400, "a JSON object of at most 4 KiB\n")
        self._count("blind_requests:report")
        fields = {
            k: str(v)[:500]
            for k, v in list(report.items())[:8]
            if k in ("path", "id", "error", "result")
        }
        self.log("blind_client_report", client=request.client[0], **fields)
        return LocalResponse(204, [(b"content-length", b"0")])

    async def _file(
        self,
        request: Request,
        file: Path,
        ctype: bytes,
        cache: bytes,
        head: bool,
        kind: str,
        etag: bytes | None = None,
    ) -> LocalResponse:
        """A file's response: whole or the byte range asked for; its body read in the default
        executor chunk by chunk, so a slow disk never stalls the loop."""
        try:
            f = file.open("rb")
        except OSError:
            self._count("blind_requests:not_found")
            return _simple(404, "not found\n")
        try:
            size = f.seek(0, 2)
            start, end = 0, size
            status = 200
            headers: Headers = [
                (b"content-type", ctype),
                (b"cache-control", cache),
                (b"x-content-type-options", b"nosniff"),
                (b"accept-ranges", b"bytes"),
            ]
            if etag is not None:
                headers.append((b"etag", etag))
            rng = request.header(b"range")
            if_range = request.header(b"if-range")
            if rng is not None and if_range is not None and if_range != etag:
                rng = None  # RFC 9110 §13.1.5: another version, so the whole of this one
            if rng is not None and kind in ("plaintext", "page", "blob", "public"):
                m = _RANGE.fullmatch(rng.strip())
                if (
                    m is None
                    or int(m.group(1)) >= size
                    or (m.group(2) and int(m.group(2)) < int(m.group(1)))
                ):
                    f.close()
                    return _simple(
                        416,
                        "range not satisfiable\n",
                        [(b"content-range", f"bytes */{size}".encode())],
                    )
                start = int(m.group(1))
                end = min(size, int(m.group(2)) + 1) if m.group(2) else size
                status = 206
                headers.append((b"content-range", f"bytes {start}-{end - 1}/{size}".encode()))
            headers.append((b"content-length", str(end - start).encode()))
            if status == 200 and self.signer is not None:
                headers += self._signed(request, ctype, await self._file_digest(f))
        except BaseException:
            f.close()
            raise
        self._count(f"blind_requests:{kind}")

        async def chunks() -> AsyncIterator[bytes]:
            loop = asyncio.get_running_loop()
            f.seek(start)
            sent = 0
            try:
                while not head and sent < end - start:
                    data = await loop.run_in_executor(None, f.read, min(CHUNK, end - start - sent))
                    if not data:  # the file shrank under us
                        raise UpstreamError("truncated", f"{file.name}: shorter than it was")
                    sent += len(data)
                    yield data
            finally:
                self._count(f"blind_bytes:{kind}", sent)

        return LocalResponse(status, headers, chunks(), f.close)


def _entries(data: bytes) -> dict[str, manifest.Entry]:
    """The origin reads its own manifest (written by its own sealer) for its paths."""
    try:
        doc = json.loads(data)
        files = json.loads(doc["payload"])["files"]
    except (ValueError, KeyError, TypeError, RecursionError):
        raise VerificationError("manifest: unreadable") from None
    out = {}
    for p, raw in files.items():
        try:
            out[p] = manifest.parse_entry(p, raw)
        except VerificationError:
            continue
    return out
