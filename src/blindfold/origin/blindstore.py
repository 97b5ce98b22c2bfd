"""The origin's part in blind delivery. Over its own TLS it serves:
- the signed manifest (it holds the content keys: `no-store`, never through a blind edge),
- the sealed blobs by id, for edges to pull and cache,
- the service worker (with the manifest URL, the edge and the site's manifest key filled in)
  and its registration snippet,
- the source tree: pages (files left unsealed) and, as the visitors' fallback when an edge
  copy fails verification, the plaintext of sealed files (whole or from a byte offset),
- a small report endpoint where clients tell the site that an edge copy failed.
Anything else goes to the next handler (the WAF and the application)."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import re
import time
import urllib.parse
from collections.abc import Callable
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
    BLOBS_DIR,
    MANIFEST_NAME,
    PUBLIC_DIR,
    PUBLIC_KEY_NAME,
    SRI_NAME,
    SRI_TYPES,
)
from blindfold.config.origin import BlindStoreConfig
from blindfold.core import manifest, msgsig, sri
from blindfold.core.ratelimit import TokenBucket
from blindfold.errors import ConfigError, VerificationError
from blindfold.web.messages import (
    BodyStream,
    BodyTimeout,
    BodyTooLarge,
    Handler,
    Headers,
    Request,
    Responder,
    simple_response,
)

_ID = re.compile(rb"[0-9a-f]{32}")
_PUBLIC = re.compile(rb"[0-9a-f]{32}\.(js|css)")
_RANGE = re.compile(rb"bytes=(\d{1,15})-(\d{0,15})")
CHUNK = 1 << 16
MAX_REPORT_BYTES = 4096
REPORTS_PER_S = 50.0
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


def _service_worker(cfg: BlindStoreConfig, public: Ed25519PublicKey) -> bytes:
    template = resources.files("blindfold.blind").joinpath("static/sw.js").read_text()
    config = {
        "manifest": cfg.manifest_path,
        "edge": cfg.edge_url,
        "report": cfg.report_path,
        "keyId": manifest.key_id(public),
        "publicKey": manifest.b64u(public.public_bytes(Encoding.Raw, PublicFormat.Raw)),
    }
    return template.replace("/*BLINDFOLD_CONFIG*/ {}", json.dumps(config)).encode()


class BlindStore:
    def __init__(
        self, cfg: BlindStoreConfig, inner: Handler, stats: dict[str, Any], log: Callable[..., None]
    ) -> None:
        self.cfg = cfg
        self.inner = inner
        self.stats = stats
        self.log = log
        self.dir = Path(cfg.dir)
        self.blobs = self.dir / BLOBS_DIR
        self.manifest_path = cfg.manifest_path.encode()
        self.blobs_path = cfg.blobs_path.encode()
        self.public_path = cfg.public_path.encode()
        self._sri: dict[str, sri.Published] = {}
        self._sri_mtime = -1.0
        if cfg.rewrite_html and not cfg.edge_url:
            raise ConfigError("blind.rewrite_html", "needs edge_url (where the copies are)")
        self.source = Path(cfg.source_dir).resolve() if cfg.source_dir else None
        self._sealed: dict[str, manifest.Entry] = {}
        # Reports are logged: bounded, so a client cannot flood the log through them.
        self.reports = TokenBucket(REPORTS_PER_S, int(REPORTS_PER_S * 2), time.monotonic())
        self._sealed_mtime = -1.0
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
        """The manifest's entries (re-read when the sealer rewrote it). Read without a time
        check: an expired manifest still names what was sealed; visitors check expiry."""
        try:
            mtime = (self.dir / MANIFEST_NAME).stat().st_mtime
        except OSError:
            return {}
        if mtime != self._sealed_mtime:
            try:
                self._sealed = _entries((self.dir / MANIFEST_NAME).read_bytes())
            except (OSError, VerificationError):
                self._sealed = {}
            self._sealed_mtime = mtime
        return self._sealed

    def _count(self, key: str, n: int = 1) -> None:
        self.stats[key] = self.stats.get(key, 0) + n

    async def __call__(self, request: Request, body: BodyStream, respond: Responder) -> None:
        path, cfg = request.path, self.cfg
        if request.method == b"POST" and path == cfg.report_path.encode():
            await self._report(request, body, respond)
            return
        if request.method not in (b"GET", b"HEAD"):
            await self.inner(request, body, respond)
            return
        head = request.method == b"HEAD"
        if path == self.manifest_path:
            await self._file(
                request,
                respond,
                self.dir / MANIFEST_NAME,
                b"application/json",
                b"no-store",
                head,
                "manifest",
            )
        elif path.startswith(self.blobs_path):
            blob = path[len(self.blobs_path) :]
            if not _ID.fullmatch(blob):
                self._count("blind_requests:not_found")
                await simple_response(respond, 404, "no such blob\n")
                return
            await self._file(
                request,
                respond,
                self.blobs / blob.decode(),
                b"application/octet-stream",
                _BLOB_CACHE,
                head,
                "blob",
            )
        elif path.startswith(self.public_path):
            public = path[len(self.public_path) :]
            if not _PUBLIC.fullmatch(public):
                self._count("blind_requests:not_found")
                await simple_response(respond, 404, "not published\n")
                return
            public_type = SRI_TYPES["." + public.decode().rpartition(".")[2]]
            await self._file(
                request,
                respond,
                self.dir / PUBLIC_DIR / public.decode(),
                f"{public_type}; charset=utf-8".encode(),
                _BLOB_CACHE,
                head,
                "public",
            )
        elif self.sw is not None and path == cfg.service_worker_path.encode():
            await self._bytes(request, respond, self.sw, b"text/javascript; charset=utf-8", head)
        elif self.sw is not None and path == cfg.register_path.encode():
            await self._bytes(
                request, respond, self.register, b"text/javascript; charset=utf-8", head
            )
        elif (found := self._source_file(path)) is not None:
            file, name = found
            entry = self._sealed_paths().get(name)
            if entry is None and cfg.rewrite_html and file.suffix == ".html":
                await self._page(request, respond, file, head)
                return
            ctype = (
                entry.type.encode()
                if entry
                else _TYPES.get(file.suffix, b"application/octet-stream")
            )
            # A sealed file's ETag is its plaintext digest (the manifest's), so a client that
            # resumes one with Range + If-Range never splices two versions.
            etag = f'"{entry.sha256}"'.encode() if entry else None
            await self._file(
                request,
                respond,
                file,
                ctype,
                b"no-cache",
                head,
                "plaintext" if entry else "page",
                etag,
            )
        else:
            await self.inner(request, body, respond)

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

    def _published(self) -> dict[str, sri.Published]:
        """sri.json (re-read when the sealer rewrote it): path -> the edge copy."""
        try:
            mtime = (self.dir / SRI_NAME).stat().st_mtime
        except OSError:
            return {}
        if mtime != self._sri_mtime:
            try:
                files = json.loads((self.dir / SRI_NAME).read_bytes())["files"]
                self._sri = {
                    p: sri.Published(self.cfg.edge_url + e["url_path"], e["integrity"])
                    for p, e in files.items()
                }
            except (OSError, ValueError, KeyError, TypeError):
                self._sri = {}
            self._sri_mtime = mtime
        return self._sri

    async def _page(self, request: Request, respond: Responder, file: Path, head: bool) -> None:
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            await simple_response(respond, 404, "not found\n")
            return
        page, count = sri.rewrite(text, request.path.decode(), self._published())
        data = page.encode()
        self._count("blind_requests:page")
        self._count("blind_bytes:page", 0 if head else len(data))
        # A page that uses SRI gets the policy: then no script without integrity runs on it
        # (pages that load their scripts through the service worker are left alone).
        await self._bytes(
            request,
            respond,
            data,
            b"text/html; charset=utf-8",
            head,
            [(b"integrity-policy", sri.INTEGRITY_POLICY)] if count else [],
        )

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

    async def _bytes(
        self,
        request: Request,
        respond: Responder,
        data: bytes,
        ctype: bytes,
        head: bool,
        extra: Headers | None = None,
    ) -> None:
        await respond.start(
            200,
            [
                (b"content-type", ctype),
                (b"cache-control", b"no-cache"),
                (b"content-length", str(len(data)).encode()),
                *(extra or []),
                *self._signed(request, ctype, hashlib.sha256(data).digest()),
            ],
        )
        if not head:
            await respond.send(data)
        await respond.end()

    async def _report(self, request: Request, body: BodyStream, respond: Responder) -> None:
        if not self.reports.allow(time.monotonic()):
            self._count("blind_requests:report_refused")
            await simple_response(respond, 429, "too many reports\n", [(b"retry-after", b"1")])
            return
        try:
            data = await body.read_all(MAX_REPORT_BYTES)
            report = json.loads(data)
            if not isinstance(report, dict):
                raise ValueError("not an object")
        except (BodyTooLarge, BodyTimeout, ValueError, UnicodeDecodeError, RecursionError):
            await simple_response(respond, 400, "a JSON object of at most 4 KiB\n")
            return
        self._count("blind_requests:report")
        fields = {
            k: str(v)[:500]
            for k, v in list(report.items())[:8]
            if k in ("path", "id", "error", "result")
        }
        self.log("blind_client_report", client=request.client[0], **fields)
        await respond.start(204, [(b"content-length", b"0")])
        await respond.end()

    async def _file(
        self,
        request: Request,
        respond: Responder,
        file: Path,
        ctype: bytes,
        cache: bytes,
        head: bool,
        kind: str,
        etag: bytes | None = None,
    ) -> None:
        try:
            f = file.open("rb")
        except OSError:
            self._count("blind_requests:not_found")
            await simple_response(respond, 404, "not found\n")
            return
        self._count(f"blind_requests:{kind}")
        loop = asyncio.get_running_loop()
        with f:
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
                    await simple_response(
                        respond,
                        416,
                        "range not satisfiable\n",
                        [(b"content-range", f"bytes */{size}".encode())],
                    )
                    return
                start = int(m.group(1))
                end = min(size, int(m.group(2)) + 1) if m.group(2) else size
                status = 206
                headers.append((b"content-range", f"bytes {start}-{end - 1}/{size}".encode()))
            headers.append((b"content-length", str(end - start).encode()))
            if status == 200 and self.signer is not None:
                headers += self._signed(request, ctype, await self._file_digest(f))
            await respond.start(status, headers)
            f.seek(start)
            sent = 0
            while not head and sent < end - start:
                data = await loop.run_in_executor(None, f.read, min(CHUNK, end - start - sent))
                if not data:  # the file shrank under us: do not pretend it is complete
                    respond.abort()
                    return
                await respond.send(data)
                sent += len(data)
            self._count(f"blind_bytes:{kind}", sent)
            await respond.end()


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
