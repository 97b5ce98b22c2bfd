"""`blindfold fetch URL`: what the service worker does, from Python. The signed manifest comes
from the origin (its own TLS), the sealed blob from the edge; the blob's digest, every
record's tag and the plaintext digest are checked before a byte is kept. On any failure the
file is fetched from the origin instead (its plaintext prefix), checked against the manifest
too; the failure is printed and reported to the edge, which checks its copy and drops it when
bad.

A path the public manifest does not list may be private: the private manifest is asked for
with the credentials given (`--header`, sent to the origin only, never to the edge). Refused
(401, 403), the path is asked of the origin as it is (an unsealed page is anyone's; a private
file gets the application's refusal there too), and a refusal ends the fetch."""

from __future__ import annotations

import hashlib
import http.client
import os
import socket
import ssl
import tempfile
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from blindfold.core import ece, manifest
from blindfold.errors import ConfigError, UpstreamError, VerificationError

MANIFEST_PATH = "/.well-known/blindfold/manifest.json"
PRIVATE_MANIFEST_PATH = "/.well-known/blindfold/manifest-private.json"
PLAINTEXT_PATH = "/.well-known/blindfold/plain/"  # [origin.blind] plaintext_path
BLOB_PREFIX = "/b/"
CHUNK = 1 << 16


@dataclass(frozen=True, slots=True)
class FetchOptions:
    edge: str  # https://cdn.example.test:8443 (blobs at /b/<id>)
    public_key: Ed25519PublicKey | None  # the site's manifest key
    manifest_url: str = ""  # default: the URL's origin + MANIFEST_PATH
    ca_file: str | None = None  # trust for the origin and the edge (default: system)
    connect_to: dict[str, str] | None = None  # "host:port" -> "addr:port" (like curl's)
    timeout_s: float = 30.0
    fallback: bool = True
    plaintext_path: str = PLAINTEXT_PATH  # the origin's prefix for the plaintext of sealed files
    # Extra request headers (credentials: Cookie, Authorization) for the origin's requests
    # (the manifests, the plaintext fallback); never sent to the edge.
    headers: tuple[tuple[str, str], ...] = ()
    private_manifest_url: str = ""  # default: the URL's origin + PRIVATE_MANIFEST_PATH


@dataclass(slots=True)
class FetchResult:
    source: str  # "edge" or "origin"
    size: int
    sha256: str
    edge_error: str = ""  # why the edge copy was not used
    seconds: float = 0.0
    reported: bool = False  # the edge took the report of its bad copy


def load_public_key(path: str) -> Ed25519PublicKey:
    try:
        key = load_pem_public_key(Path(path).read_bytes())
    except OSError as exc:
        raise ConfigError("manifest_key", f"{path}: {exc.strerror}") from None
    except ValueError as exc:
        raise ConfigError("manifest_key", f"{path}: not a PEM public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError("manifest_key", f"{path}: must be an Ed25519 public key")
    return key


class _Connection(http.client.HTTPSConnection):
    """HTTPS to `host:port` (SNI, certificate name, Host header) over a TCP connection to
    `address` (what curl's --connect-to does)."""

    def __init__(
        self,
        host: str,
        port: int,
        address: tuple[str, int],
        timeout: float,
        context: ssl.SSLContext,
    ) -> None:
        super().__init__(host, port, timeout=timeout, context=context)
        self._address = address
        self._tls = context

    def connect(self) -> None:
        sock = socket.create_connection(self._address, self.timeout)
        try:
            self.sock = self._tls.wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise


class _Get:
    """One verified-TLS GET, the body read in chunks. Errors become UpstreamError."""

    def __init__(
        self,
        url: str,
        opts: FetchOptions,
        headers: tuple[tuple[str, str], ...] = (),
        ok: tuple[int, ...] = (200,),
    ) -> None:
        u = urllib.parse.urlsplit(url)
        if u.scheme != "https" or not u.hostname:
            raise ConfigError(
                "url", f"{url}: only https:// URLs (blind delivery never trusts plaintext)"
            )
        port = u.port or 443
        addr_port = f"{u.hostname}:{port}"
        if opts.connect_to and addr_port in opts.connect_to:
            addr_port = opts.connect_to[addr_port]
        addr, _, p = addr_port.rpartition(":")
        ctx = ssl.create_default_context(cafile=opts.ca_file)
        self.conn = _Connection(u.hostname, port, (addr.strip("[]"), int(p)), opts.timeout_s, ctx)
        self.url = url
        self.total = 0
        path = (u.path or "/") + (f"?{u.query}" if u.query else "")
        try:
            self.conn.request(
                "GET", path, headers={"User-Agent": "blindfold-fetch", **dict(headers)}
            )
            self.resp = self.conn.getresponse()
            sock = self.conn.sock
            self.peer_cert = sock.getpeercert(binary_form=True) if sock is not None else None
        except (OSError, http.client.HTTPException) as exc:
            self.conn.close()
            raise UpstreamError("fetch_failed", f"GET {url}: {exc}") from None
        self.status = self.resp.status
        if self.resp.status not in ok:
            self.conn.close()
            raise UpstreamError("bad_status", f"GET {url}: HTTP {self.resp.status}")

    def chunk(self, limit: int) -> bytes:
        """The next bytes of the body, b"" at its end; more than `limit` in all: error."""
        try:
            data = self.resp.read1(CHUNK)
        except (OSError, http.client.HTTPException) as exc:
            raise UpstreamError("fetch_failed", f"GET {self.url}: {exc}") from None
        self.total += len(data)
        if self.total > limit:
            raise UpstreamError("too_large", f"GET {self.url}: more than {limit} bytes")
        return data

    def read_all(self, limit: int) -> bytes:
        out = bytearray()
        while data := self.chunk(limit):
            out += data
        return bytes(out)

    def close(self) -> None:
        self.conn.close()


def _origin_of(url: str) -> str:
    u = urllib.parse.urlsplit(url)
    return f"{u.scheme}://{u.netloc}"


def get_manifest(url: str, opts: FetchOptions) -> manifest.Manifest:
    if opts.public_key is None:
        raise ConfigError("manifest_key", "the site's manifest public key is needed")
    murl = opts.manifest_url or _origin_of(url) + MANIFEST_PATH
    if urllib.parse.urlsplit(murl).netloc != urllib.parse.urlsplit(url).netloc:
        raise ConfigError("manifest_url", "the manifest must come from the origin itself")
    req = _Get(murl, opts, opts.headers)
    try:
        data = req.read_all(manifest.MAX_MANIFEST_BYTES)
    finally:
        req.close()
    return manifest.verify(data, opts.public_key, time.time())


def get_private_manifest(url: str, opts: FetchOptions) -> tuple[manifest.Manifest | None, int]:
    """The private manifest, asked for with the credentials of `opts.headers`, and the HTTP
    status: (None, 404) when the site has none, (None, 401 or 403) when the site's
    application refused these credentials."""
    if opts.public_key is None:
        raise ConfigError("manifest_key", "the site's manifest public key is needed")
    murl = opts.private_manifest_url or _origin_of(url) + PRIVATE_MANIFEST_PATH
    if urllib.parse.urlsplit(murl).netloc != urllib.parse.urlsplit(url).netloc:
        raise ConfigError("private_manifest_url", "the manifest must come from the origin itself")
    req = _Get(murl, opts, opts.headers, ok=(200, 401, 403, 404))
    try:
        if req.status != 200:
            return None, req.status
        data = req.read_all(manifest.MAX_MANIFEST_BYTES)
    finally:
        req.close()
    return manifest.verify(data, opts.public_key, time.time()), 200


def _from_edge(entry: manifest.Entry, opts: FetchOptions, sink: Callable[[bytes], object]) -> None:
    """Stream the blob through the opener into `sink`; raise on any mismatch."""
    req = _Get(opts.edge.rstrip("/") + BLOB_PREFIX + entry.id, opts)
    try:
        opener = ece.Opener(entry.key, max_rs=entry.rs)
        blob_hash, plain_hash = hashlib.sha256(), hashlib.sha256()
        got = size = 0
        while data := req.chunk(entry.sealed_size):
            got += len(data)
            blob_hash.update(data)
            for plain in opener.feed(data):
                size += len(plain)
                if size > entry.size:
                    raise VerificationError("more plaintext than the manifest says")
                plain_hash.update(plain)
                sink(plain)
        last = opener.finish()
        plain_hash.update(last)
        sink(last)
        size += len(last)
    finally:
        req.close()
    if got != entry.sealed_size or blob_hash.hexdigest() != entry.blob_sha256:
        raise VerificationError(f"blob {entry.id}: digest or size differs from the manifest")
    if size != entry.size or plain_hash.hexdigest() != entry.sha256:
        raise VerificationError(f"blob {entry.id}: plaintext digest differs from the manifest")


def report_to_edge(entry: manifest.Entry, opts: FetchOptions) -> bool:
    """Tell the edge its copy of the blob failed our checks (`POST EDGE/r/<id>`, no body): it
    checks the copy against the site's signed blob index and drops it when bad. Best effort."""
    u = urllib.parse.urlsplit(opts.edge.rstrip("/") + "/r/" + entry.id)
    port = u.port or 443
    addr_port = f"{u.hostname}:{port}"
    if opts.connect_to and addr_port in opts.connect_to:
        addr_port = opts.connect_to[addr_port]
    addr, _, p = addr_port.rpartition(":")
    ctx = ssl.create_default_context(cafile=opts.ca_file)
    conn = _Connection(u.hostname or "", port, (addr.strip("[]"), int(p)), opts.timeout_s, ctx)
    try:
        conn.request("POST", u.path, headers={"User-Agent": "blindfold-fetch"})
        return conn.getresponse().status == 202
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def _from_origin(
    url: str, entry: manifest.Entry | None, opts: FetchOptions, sink: Callable[[bytes], object]
) -> tuple[int, str]:
    """A sealed file's plaintext from the origin's own prefix (checked against the manifest;
    from its URL when the prefix is empty or the origin serves none, 404: a store without
    source_dir leaves sealed files to the application); anything else from its URL."""
    req: _Get | None = None
    if entry is not None and opts.plaintext_path:
        u = urllib.parse.urlsplit(url)
        plain = _origin_of(url) + opts.plaintext_path + (u.path or "/").lstrip("/")
        try:
            req = _Get(plain, opts, opts.headers)
            url = plain
        except UpstreamError as exc:
            if not str(exc).endswith("HTTP 404"):
                raise
    if req is None:
        req = _Get(url, opts, opts.headers)
    h = hashlib.sha256()
    size = 0
    limit = entry.size if entry is not None else 1 << 34
    try:
        while data := req.chunk(limit):
            size += len(data)
            h.update(data)
            sink(data)
    finally:
        req.close()
    if entry is not None and (size != entry.size or h.hexdigest() != entry.sha256):
        raise VerificationError(f"{url}: the origin's bytes differ from its own manifest")
    return size, h.hexdigest()


def _temp_file(out: Path) -> tuple[int, Path]:
    """A new file beside `out` for the download: a random name created with O_CREAT|O_EXCL|
    O_NOFOLLOW (tempfile.mkstemp), so nothing planted in the directory (a symlink, a file
    under a guessable name) is opened or followed; the mode the umask allows."""
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".part", dir=out.parent)
    umask = os.umask(0o022)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)
    return fd, Path(name)


def fetch(url: str, out_path: str, opts: FetchOptions) -> FetchResult:
    """Fetch `url` into `out_path`, written through a temporary file beside it that is renamed
    over `out_path` only when everything was verified. The rename replaces the name itself and
    never follows a link; a symbolic link at `out_path` is refused outright (ConfigError)."""
    started = time.perf_counter()
    path = urllib.parse.urlsplit(url).path or "/"
    out = Path(out_path)
    if out.is_symlink():
        raise ConfigError("output", f"{out_path} is a symbolic link: refusing to replace it")
    m = get_manifest(url, opts)
    entry = m.files.get(urllib.parse.unquote(path))
    refused = 0
    if entry is None:  # perhaps private
        private, status = get_private_manifest(url, opts)
        if private is not None:
            entry = private.files.get(urllib.parse.unquote(path))
        refused = status if status in (401, 403) else 0
    fd, tmp = _temp_file(out)
    edge_error = ""
    reported = renamed = False
    try:
        with os.fdopen(fd, "wb") as f:
            if entry is not None:
                try:
                    _from_edge(entry, opts, f.write)
                    f.flush()
                    os.replace(tmp, out)
                    renamed = True
                    return FetchResult(
                        "edge", entry.size, entry.sha256, seconds=time.perf_counter() - started
                    )
                except (VerificationError, UpstreamError) as exc:
                    edge_error = str(exc)
                    reported = report_to_edge(entry, opts)
                    if not opts.fallback:
                        raise
                f.seek(0)
                f.truncate()
            else:
                edge_error = "not in the manifest (not sealed)"
            try:
                size, digest = _from_origin(url, entry, opts, f.write)
            except UpstreamError as exc:
                if not refused:
                    raise
                raise UpstreamError(
                    "refused",
                    f"{exc}; the private manifest was refused too (HTTP {refused}): the site "
                    "refused these credentials",
                ) from None
            f.flush()
            os.replace(tmp, out)
            renamed = True
        return FetchResult(
            "origin", size, digest, edge_error, time.perf_counter() - started, reported
        )
    finally:
        if not renamed:
            tmp.unlink(missing_ok=True)
