"""Blind delivery end to end with real processes: `blindfold seal` -> origin agent serving the
sealed store -> edge with a passthrough route for the site (manifest, HTML, fallbacks: TLS
end to end to the origin) and a blind route for the CDN hostname (its own certificate) ->
`blindfold fetch` as the visitor."""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from blindfold import pki
from tests.conftest import need
from tests.helpers.clients import wait_until
from tests.helpers.edgeproc import EdgeProcess, OriginProcess, edge_config, route
from tests.helpers.topology import origin_config

CDN = "cdn.example.test"


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "blindfold", *args], capture_output=True, text=True, timeout=timeout
    )


class Site:
    """A sealed tree, the origin serving it and an edge in front (both routes)."""

    def __init__(
        self,
        tmp: Path,
        ca: pki.Issued,
        site: dict[str, Path],
        app_port: int,
        start_edge: Callable[..., EdgeProcess],
        start_origin: Callable[..., OriginProcess],
        origin_blind: dict[str, Any] | None = None,
        extra_routes: Callable[[int], str] | None = None,
        origin_kw: dict[str, Any] | None = None,
        origin_tail: str = "",
        route_kw: dict[str, Any] | None = None,
        **blind: Any,
    ) -> None:
        """`origin_kw`: origin settings; `origin_tail`: TOML appended to the origin's config;
        `route_kw`: settings of both edge routes."""
        self.tmp = tmp
        self.marker = "SECRET-PLAINTEXT-" + secrets.token_hex(8)
        src = tmp / "site"
        (src / "js").mkdir(parents=True)
        (src / "img").mkdir()
        self.files = {
            "/index.html": f"<html><body>{self.marker}</body></html>\n".encode(),
            "/js/app.js": f"console.log('{self.marker}');\n".encode() * 300,
            "/img/photo.bin": os.urandom(700_000) + self.marker.encode(),
            "/big.bin": (self.marker.encode() + os.urandom(4000)) * 1200,  # ~4.8 MB
        }
        for path, data in self.files.items():
            (src / path.lstrip("/")).write_bytes(data)
        self.src, self.out = src, tmp / "sealed"
        seal = _run(
            "seal",
            str(src),
            str(self.out),
            "--signing-key",
            str(tmp / "manifest.pem"),
            "--id-secret",
            str(tmp / "id-secret"),
            "--create-keys",
            "--record-size",
            "16384",
        )
        assert seal.returncode == 0, seal.stderr
        self.seal_output = seal.stdout
        self.public_key = self.out / "manifest-public.pem"
        cdn = pki.issue(ca, [CDN])
        cdn.write(tmp / "cdn.pem", tmp / "cdn.key")
        signing = Ed25519PrivateKey.generate()
        (tmp / "responses.pem").write_bytes(
            signing.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
        )
        self.response_key = tmp / "responses.pub.pem"
        self.response_key.write_bytes(
            signing.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
        )
        text = origin_config(site, app_port, tmp, **(origin_kw or {})) + "\n[origin.blind]\n"
        for key, value in {
            "dir": str(self.out),
            "source_dir": str(src),
            "response_signing_key": str(tmp / "responses.pem"),
            "pages_prefix": "/",
            "site_names": ["example.test"],
            **(origin_blind or {}),
        }.items():
            text += f"{key} = {json.dumps(value)}\n"
        self.origin = start_origin(text + origin_tail)
        self.cache = tmp / "edge-cache"
        blind_cfg = {
            "cache_dir": str(self.cache),
            "manifest_public_key": str(self.public_key),
            **blind,
        }
        if not blind_cfg["cache_dir"]:
            del blind_cfg["cache_dir"]
        routes = route(
            ["example.test"],
            [f"127.0.0.1:{self.origin.port}"],
            proxy_protocol="v2",
            **(route_kw or {}),
        ) + route(
            [CDN],
            [f"127.0.0.1:{self.origin.port}"],
            mode="blind",
            certificate=str(tmp / "cdn.pem"),
            key=str(tmp / "cdn.key"),
            origin_ca=str(site["ca"]),
            origin_server_name="example.test",
            proxy_protocol="v2",
            blind=blind_cfg,
            **(route_kw or {}),
        )
        if extra_routes is not None:
            routes += extra_routes(self.origin.port)
        self.edge = start_edge(edge_config(routes, per_ip_rate_per_s=0))
        self.ca = site["ca"]
        self.site_pin = site["fingerprint"].read_text().strip()

    def fetch(
        self, path: str, *extra: str, edge_port: int = 0
    ) -> tuple[subprocess.CompletedProcess[str], bytes]:
        port = self.edge.port
        edge_port = edge_port or port
        out = self.tmp / f"out-{secrets.token_hex(4)}"
        r = _run(
            "fetch",
            f"https://example.test:{port}{path}",
            "--edge",
            f"https://{CDN}:{edge_port}",
            "--manifest-key",
            str(self.public_key),
            "--cacert",
            str(self.ca),
            "--connect-to",
            f"example.test:{port}:127.0.0.1:{port}",
            "--connect-to",
            f"{CDN}:{edge_port}:127.0.0.1:{edge_port}",
            "-o",
            str(out),
            *extra,
        )
        data = out.read_bytes() if out.exists() else b""
        return r, data

    def verify(self, *extra: str) -> subprocess.CompletedProcess[str]:
        port = self.edge.port
        return _run(
            "verify",
            f"https://example.test:{port}/index.html",
            "--cacert",
            str(self.ca),
            "--connect-to",
            f"example.test:{port}:127.0.0.1:{port}",
            "--connect-to",
            f"{CDN}:{port}:127.0.0.1:{port}",
            *extra,
        )

    def ids(self) -> dict[str, str]:
        doc = json.loads((self.out / "manifest.json").read_text())
        files = json.loads(doc["payload"])["files"]
        return {p: e["id"] for p, e in files.items()}

    def curl_blob(self, path: str, *extra: str) -> subprocess.CompletedProcess[bytes]:
        port = self.edge.port
        return subprocess.run(
            [
                need("curl"),
                "-sS",
                "--max-time",
                "20",
                "--cacert",
                str(self.ca),
                "--resolve",
                f"{CDN}:{port}:127.0.0.1",
                f"https://{CDN}:{port}{path}",
                *extra,
            ],
            capture_output=True,
            timeout=30,
        )


@pytest.fixture
def blind_site(
    tmp_path: Path,
    ca: pki.Issued,
    site: dict[str, Path],
    app: Any,
    start_edge: Callable[..., EdgeProcess],
    start_origin: Callable[..., OriginProcess],
) -> Callable[..., Site]:
    def make(
        origin_blind: dict[str, Any] | None = None,
        extra_routes: Callable[[int], str] | None = None,
        origin_kw: dict[str, Any] | None = None,
        origin_tail: str = "",
        route_kw: dict[str, Any] | None = None,
        **blind: Any,
    ) -> Site:
        return Site(
            tmp_path,
            ca,
            site,
            app.port,
            start_edge,
            start_origin,
            origin_blind,
            extra_routes,
            origin_kw,
            origin_tail,
            route_kw,
            **blind,
        )

    return make


def _edge_count(s: Site, result: str) -> float:
    return s.edge.metric("blindfold_blind_requests_total", route="route1", result=result)


def _origin_bytes(origin: OriginProcess, kind: str) -> float:
    return origin.metric("blindfold_origin_blind_bytes_total", kind=kind)


def test_fetch_through_a_blind_edge_verifies_and_caches(blind_site: Callable[..., Site]) -> None:
    s = blind_site()
    assert "4 files: 4 sealed" in s.seal_output
    for path, data in s.files.items():
        r, got = s.fetch(path)
        assert r.returncode == 0, r.stderr
        assert "from the edge" in r.stdout and not r.stderr, (r.stdout, r.stderr)
        assert got == data, path
    assert _edge_count(s, "miss") == 4
    pulled = _origin_bytes(s.origin, "blob")
    assert pulled > sum(len(d) for d in s.files.values())  # sealed: tags and padding
    # Warm cache: the bulk comes from the edge; the origin serves the manifest only.
    manifest_before = _origin_bytes(s.origin, "manifest")
    for path, data in s.files.items():
        r, got = s.fetch(path)
        assert r.returncode == 0 and got == data, r.stderr
    hits = _edge_count(s, "hit_memory") + _edge_count(s, "hit_disk")
    assert hits == 4
    assert _origin_bytes(s.origin, "blob") == pulled  # nothing pulled again
    origin_share = _origin_bytes(s.origin, "manifest") - manifest_before
    # this round only: half of what the edge served in both rounds
    edge_share = s.edge.metric("blindfold_blind_served_bytes_total", route="route1") / 2
    assert edge_share / (edge_share + origin_share) >= 0.95, (edge_share, origin_share)


def test_the_edge_holds_no_plaintext(blind_site: Callable[..., Site]) -> None:
    s = blind_site()
    for path in s.files:
        r, _ = s.fetch(path)
        assert r.returncode == 0, r.stderr
    marker = s.marker.encode()
    cached = [p for p in s.cache.rglob("*") if p.is_file()]
    # the four blobs, and the signed index the edge checks them with (no keys, no paths)
    assert sorted(p.name for p in cached) == sorted([*s.ids().values(), "index.json"])
    for p in cached:
        data = p.read_bytes()
        assert marker not in data, p
        assert not any(path.encode() in data for path in s.files), p
    # What the edge serves (its decrypted view of its own TLS) is the sealed blob, nothing else.
    for path, blob in s.ids().items():
        got = s.curl_blob(f"/b/{blob}")
        assert got.returncode == 0 and len(got.stdout) > len(s.files[path])
        assert marker not in got.stdout
    # And the key/manifest never pass through the blind edge: it has no route to them.
    got = s.curl_blob("/.well-known/blindfold/manifest.json", "-w", "%{http_code}")
    assert got.stdout.endswith(b"404")


def _tamper(path: Path, at: int, keep_times: bool) -> None:
    """Flip one bit of a file in place (same size); with `keep_times`, leave its times as they
    were too, as a fault of the disk would (the edge cannot see the change by stat)."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))
    if keep_times:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _edge_event(s: Site, event: str, **match: Any) -> dict[str, Any] | None:
    def found() -> dict[str, Any] | None:
        return next(
            (r for r in s.edge.records(event) if all(r.get(k) == v for k, v in match.items())),
            None,
        )

    wait_until(lambda: found() is not None, timeout=10)
    return found()


def test_a_blob_altered_at_the_edge_is_detected_and_fetched_from_the_origin(
    blind_site: Callable[..., Site],
) -> None:
    s = blind_site(memory_cache_bytes=0)  # disk only: the altered file is what is served
    path = "/img/photo.bin"
    r, got = s.fetch(path)
    assert r.returncode == 0 and got == s.files[path]
    blob = s.ids()[path]
    [cached] = [p for p in s.cache.rglob(blob)]
    _tamper(cached, cached.stat().st_size // 2, keep_times=True)  # unseen by the edge
    r, got = s.fetch(path)
    assert r.returncode == 0, r.stderr
    assert "from the origin" in r.stdout
    assert re.search(r"edge copy not used: .*(authenticate|digest)", r.stderr), r.stderr
    assert got == s.files[path]  # the right bytes, never the altered ones
    # from the origin's copy of the blob (checked the same way), not the plaintext: whoever
    # relays the site's TLS sees the bucket size, not the exact size (atk-private A6)
    assert _origin_bytes(s.origin, "plaintext") == 0
    assert _origin_bytes(s.origin, "blob") >= len(s.files[path])
    # Issue 15 finding 17: the visitor told the edge, which checked its copy against the
    # origin's signed blob index and dropped it; the next visitor gets a good copy from it.
    assert "reported to the edge" in r.stderr, r.stderr
    dropped = _edge_event(s, "blind_cache_dropped", blob=blob)
    assert dropped is not None and dropped["reason"] == "report", s.edge.records("blind_report")
    r, got = s.fetch(path)
    assert r.returncode == 0 and "from the edge" in r.stdout and got == s.files[path], r.stderr
    assert cached.read_bytes() == (s.out / "blobs" / blob).read_bytes()


def test_the_edge_drops_a_corrupted_copy_from_its_disk_cache(
    blind_site: Callable[..., Site],
) -> None:
    """Issue 15 finding 17: a blob corrupted in the edge's cache was served forever."""
    s = blind_site(memory_cache_bytes=0)
    path = "/img/photo.bin"
    blob = s.ids()[path]
    r, got = s.fetch(path)
    assert r.returncode == 0 and "from the edge" in r.stdout
    pulled = _origin_bytes(s.origin, "blob")
    [cached] = [p for p in s.cache.rglob(blob)]
    _tamper(cached, cached.stat().st_size // 3, keep_times=False)
    # The edge sees the file changed, checks it against the signed index, drops it and pulls
    # it again: the visitor never gets the bad copy.
    r, got = s.fetch(path)
    assert r.returncode == 0 and "from the edge" in r.stdout and not r.stderr, r.stderr
    assert got == s.files[path]
    dropped = _edge_event(s, "blind_cache_dropped", blob=blob)
    assert dropped is not None and dropped["reason"] == "digest", dropped
    assert _origin_bytes(s.origin, "blob") == 2 * pulled
    assert cached.read_bytes() == (s.out / "blobs" / blob).read_bytes()
    assert _edge_count(s, "cache_dropped") == 1


def test_the_edge_refuses_a_blob_the_origin_index_does_not_vouch_for(
    blind_site: Callable[..., Site],
) -> None:
    """A blob corrupted at the origin after sealing: the edge neither serves nor keeps it."""
    s = blind_site(memory_cache_bytes=0)
    path = "/img/photo.bin"
    blob = s.ids()[path]
    _tamper(s.out / "blobs" / blob, 1000, keep_times=False)
    r, got = s.fetch(path)
    assert r.returncode == 0 and "from the origin" in r.stdout and got == s.files[path], r.stderr
    failed = _edge_event(s, "blind_pull_failed", blob=blob)
    assert failed is not None and "index" in failed["detail"], failed
    assert not list(s.cache.rglob(blob))
    # And an id the index does not list is not pulled at all.
    unknown = s.curl_blob("/b/" + "7" * 32, "-o", "/dev/null", "-w", "%{http_code}")
    assert unknown.stdout == b"404"


def test_a_truncated_blob_from_a_lying_edge_is_detected(
    blind_site: Callable[..., Site], tmp_path: Path
) -> None:
    from tests.helpers.hostile_edge import HostileEdge

    s = blind_site()
    path = "/big.bin"
    blob = s.ids()[path]
    sealed = (s.out / "blobs" / blob).read_bytes()
    lying = HostileEdge(
        tmp_path / "cdn.pem",
        tmp_path / "cdn.key",
        {f"/b/{blob}": sealed[: 16384 * 3 + 21]},  # whole records, the last one missing
    )
    try:
        r, got = s.fetch(path, "--no-fallback", edge_port=lying.port)
    finally:
        lying.close()
    assert r.returncode == 1 and got == b""
    assert "truncated" in r.stderr or "digest" in r.stderr, r.stderr


def test_wrong_manifest_key_is_refused(blind_site: Callable[..., Site], tmp_path: Path) -> None:
    s = blind_site()
    other = _run(
        "seal",
        str(s.src),
        str(tmp_path / "other"),
        "--signing-key",
        str(tmp_path / "other.pem"),
        "--id-secret",
        str(tmp_path / "other-secret"),
        "--create-keys",
    )
    assert other.returncode == 0
    s.public_key = tmp_path / "other" / "manifest-public.pem"
    r, got = s.fetch("/index.html")
    assert r.returncode == 1 and got == b""
    assert "manifest: signed by key" in r.stderr


def test_blind_route_answers_bad_requests(blind_site: Callable[..., Site]) -> None:
    s = blind_site()
    codes = {}
    for name, args in {
        "bad id": ("/b/xyz",),
        "other path": ("/index.html",),
        "unknown blob": ("/b/" + "0" * 32,),
        "post": ("/b/" + "1" * 32, "-X", "POST"),
        "post with a body": ("/b/" + "1" * 32, "-d", "x"),
    }.items():
        got = s.curl_blob(args[0], *args[1:], "-o", "/dev/null", "-w", "%{http_code}")
        codes[name] = got.stdout.decode()
    assert codes == {
        "bad id": "404",
        "other path": "404",
        "unknown blob": "404",
        "post": "405",
        "post with a body": "413",
    }
    # The origin serves pages from the source tree, never its dotfiles.
    (s.src / ".env").write_text("DB_PASSWORD=hunter2\n")
    port = s.edge.port
    got = subprocess.run(
        [
            need("curl"),
            "-sS",
            "--cacert",
            str(s.ca),
            "--resolve",
            f"example.test:{port}:127.0.0.1",
            f"https://example.test:{port}/.env",
            f"https://example.test:{port}/js/../.env",
        ],
        capture_output=True,
        timeout=30,
    )
    assert got.returncode == 0 and b"hunter2" not in got.stdout
    # A preflight from a page's service worker gets CORS headers.
    got = s.curl_blob(
        "/b/" + "0" * 32,
        "-X",
        "OPTIONS",
        "-H",
        "Origin: https://example.test",
        "-D",
        "-",
        "-o",
        "/dev/null",
    )
    assert b"access-control-allow-origin: *" in got.stdout.lower()


def test_a_host_outside_the_blind_route_is_misdirected(blind_site: Callable[..., Site]) -> None:
    """RFC 9110 §15.5.20, as on keyless routes: the CDN connection (its certificate, its
    route) answers only for its own name; a request naming another host gets 421 and pulls
    nothing."""
    s = blind_site()
    blob = "/b/" + s.ids()["/js/app.js"]
    for version in ("--http1.1", "--http2"):
        for host in ("example.test", "other.test"):
            got = s.curl_blob(
                blob, version, "-H", f"Host: {host}", "-o", "/dev/null", "-w", "%{http_code}"
            )
            assert got.stdout.decode() == "421", (version, host, got.stderr)
    assert _origin_bytes(s.origin, "blob") == 0
    ok = s.curl_blob(blob, "-o", "/dev/null", "-w", "%{http_code}")
    assert ok.stdout.decode() == "200"


def test_reseal_keeps_unchanged_ids(blind_site: Callable[..., Site]) -> None:
    s = blind_site()
    before = s.ids()
    (s.src / "js" / "app.js").write_bytes(b"console.log('changed');\n")
    r = _run(
        "seal",
        str(s.src),
        str(s.out),
        "--signing-key",
        str(s.tmp / "manifest.pem"),
        "--id-secret",
        str(s.tmp / "id-secret"),
        "--record-size",
        "16384",
    )
    assert r.returncode == 0 and "1 sealed, 3 unchanged" in r.stdout, r.stdout
    after = s.ids()
    assert {p for p in before if before[p] == after[p]} == {
        "/index.html",
        "/img/photo.bin",
        "/big.bin",
    }
    r, got = s.fetch("/js/app.js")
    assert r.returncode == 0 and got == b"console.log('changed');\n"


def test_verify_checks_certificate_signature_manifest_and_blobs(
    blind_site: Callable[..., Site],
) -> None:
    s = blind_site(memory_cache_bytes=0)
    full = (
        "--pin",
        s.site_pin,
        "--signature-key",
        str(s.response_key),
        "--manifest-key",
        str(s.public_key),
        "--edge",
        f"https://{CDN}:{s.edge.port}",
    )
    r = s.verify(*full)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == [
        "ok   fetch",
        "ok   certificate",
        "ok   signature",
        "ok   manifest",
        "ok   blobs",
    ], lines
    assert "4 blobs from the edge match the manifest" in r.stdout
    # Through the passthrough route the certificate is the origin's own: another pin fails.
    r = s.verify("--pin", "ab" * 32)
    assert r.returncode == 1 and "FAIL certificate" in r.stdout
    # Another key did not sign the responses.
    other = s.tmp / "other.pub.pem"
    other.write_bytes(
        Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    )
    r = s.verify("--signature-key", str(other))
    assert r.returncode == 1 and "FAIL signature" in r.stdout
    # A blob altered in the edge's cache is found.
    blob = s.ids()["/big.bin"]
    [cached] = list(s.cache.rglob(blob))
    _tamper(cached, 100, keep_times=True)  # a fault the edge's own check cannot see by stat
    r = s.verify(*full)
    assert r.returncode == 1 and "FAIL blobs: 1 of 4 bad: /big.bin: digest differs" in r.stdout


def test_one_pull_serves_every_visitor_and_survives_one_leaving(
    blind_site: Callable[..., Site],
) -> None:
    s = blind_site()
    blob = s.ids()["/big.bin"]
    size = len((s.out / "blobs" / blob).read_bytes())
    port = s.edge.port
    url = f"https://{CDN}:{port}/b/{blob}"
    base = [need("curl"), "-sS", "--cacert", str(s.ca), "--resolve", f"{CDN}:{port}:127.0.0.1"]
    # A visitor who leaves early (reads slowly, gives up after 1 s) starts the pull...
    quitter = subprocess.Popen(
        [*base, "--limit-rate", "200k", "--max-time", "1", "-o", "/dev/null", url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    # ...a HEAD meanwhile answers as soon as the length is known...
    head = subprocess.run([*base, "-I", url], capture_output=True, text=True, timeout=30)
    assert head.returncode == 0 and f"content-length: {size}" in head.stdout.lower()
    # ...and three more visitors at once all get the whole blob.
    outs = [s.tmp / f"copy{i}" for i in range(3)]
    procs = [subprocess.Popen([*base, "-o", str(o), url]) for o in outs]
    assert all(p.wait(timeout=60) == 0 for p in procs)
    quitter.wait(timeout=30)
    want = (s.out / "blobs" / blob).read_bytes()
    assert all(o.read_bytes() == want for o in outs)
    # The pull went on to the end without the first visitor, into the cache.
    assert wait_until(lambda: any(s.cache.rglob(blob)), timeout=20)
    [cached] = list(s.cache.rglob(blob))
    assert cached.read_bytes() == want
    # One worker pulls each blob once whoever asks (the BPF steering sends one client address
    # to one worker, and all these come from 127.0.0.1).
    assert _origin_bytes(s.origin, "blob") == size
    got = subprocess.run(
        [*base, "-o", str(s.tmp / "again"), "-w", "%{http_code}", url],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert got.stdout == "200" and (s.tmp / "again").read_bytes() == want
    assert _edge_count(s, "hit_memory") + _edge_count(s, "hit_disk") >= 1


def test_blobs_the_cache_cannot_keep_are_streamed_through(blind_site: Callable[..., Site]) -> None:
    s = blind_site(cache_dir="", memory_max_object_bytes=1 << 20)  # memory only, 1 MiB max
    for _ in range(2):
        r, got = s.fetch("/big.bin")  # ~4.8 MB: too big for the memory tier, no disk tier
        assert r.returncode == 0 and "from the edge" in r.stdout, r.stderr
        assert got == s.files["/big.bin"]
    assert _edge_count(s, "uncached") >= 1
    assert _edge_count(s, "hit_memory") + _edge_count(s, "hit_disk") == 0
    r, got = s.fetch("/index.html")  # small files are still cached
    r, got = s.fetch("/index.html")
    assert got == s.files["/index.html"] and _edge_count(s, "hit_memory") == 1


def test_fetch_never_writes_through_a_planted_symlink(
    blind_site: Callable[..., Site], tmp_path: Path
) -> None:
    """Issue 15 finding 12: the temporary file had a predictable name (.NAME.PID.part) and
    was opened following symlinks, so anyone who can write to the output directory could
    make `blindfold fetch` overwrite a file of their choice."""
    from blindfold.blind.fetch import FetchOptions, fetch, load_public_key
    from blindfold.errors import ConfigError

    s = blind_site()
    port = s.edge.port
    opts = FetchOptions(
        edge=f"https://{CDN}:{port}",
        public_key=load_public_key(str(s.public_key)),
        ca_file=str(s.ca),
        connect_to={
            f"example.test:{port}": f"127.0.0.1:{port}",
            f"{CDN}:{port}": f"127.0.0.1:{port}",
        },
    )
    url = f"https://example.test:{port}/js/app.js"
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious\n")
    shared = tmp_path / "shared"
    shared.mkdir()
    out = shared / "app.js"
    # the attacker plants links at the names the old code would have used
    for pid in {os.getpid(), os.getpid() + 1}:
        (shared / f".{out.name}.{pid}.part").symlink_to(victim)
    result = fetch(url, str(out), opts)
    assert result.source == "edge"
    assert victim.read_bytes() == b"precious\n"
    assert out.read_bytes() == s.files["/js/app.js"] and not out.is_symlink()
    leftovers = {p.name for p in shared.iterdir()} - {out.name}
    assert all((shared / n).is_symlink() for n in leftovers), leftovers  # only the planted ones
    # A link at the destination itself is refused, never followed nor replaced.
    link = shared / "link.js"
    link.symlink_to(victim)
    with pytest.raises(ConfigError, match="symbolic link"):
        fetch(url, str(link), opts)
    assert link.is_symlink() and victim.read_bytes() == b"precious\n"


class SwappingEdge:
    """A lying edge: it ends the visitor's TLS with the site's certificate (as a keyless edge
    does) and answers each request with the origin's response to another request, relayed
    byte for byte (signature headers included)."""

    def __init__(self, site: dict[str, Path], edge_port: int, swap: Callable[[str], str]) -> None:
        import socket
        import ssl
        import threading

        self.server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.server_ctx.load_cert_chain(site["cert"], site["key"])
        self.client_ctx = ssl.create_default_context(cafile=str(site["ca"]))
        self.edge_port = edge_port
        self.swap = swap
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(30)
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        import socket

        while True:
            try:
                raw, _ = self.listener.accept()
            except OSError:
                return
            try:
                raw.settimeout(20)
                with self.server_ctx.wrap_socket(raw, server_side=True) as visitor:
                    head = b""
                    while b"\r\n\r\n" not in head:
                        data = visitor.recv(4096)
                        if not data:
                            break
                        head += data
                    method, target, _ = head.split(b"\r\n", 1)[0].decode().split(" ", 2)
                    upstream = socket.create_connection(("127.0.0.1", self.edge_port), 20)
                    with self.client_ctx.wrap_socket(upstream, server_hostname="example.test") as o:
                        o.sendall(
                            f"{method} {self.swap(target)} HTTP/1.1\r\n"
                            f"Host: example.test:{self.port}\r\nConnection: close\r\n\r\n".encode()
                        )
                        while data := o.recv(65536):
                            visitor.sendall(data)
            except OSError:
                continue

    def close(self) -> None:
        self.listener.close()
        self.thread.join(5)


def test_verify_refuses_a_signed_response_served_for_another_request(
    blind_site: Callable[..., Site], site: dict[str, Path]
) -> None:
    """Issue 8 finding 7: response signatures did not cover the request, so an edge could
    answer one URL with the origin's signed response to another and `blindfold verify`
    passed."""
    s = blind_site()

    def verify(edge: SwappingEdge, path: str) -> subprocess.CompletedProcess[str]:
        return _run(
            "verify",
            f"https://example.test:{edge.port}{path}",
            "--cacert",
            str(s.ca),
            "--connect-to",
            f"example.test:{edge.port}:127.0.0.1:{edge.port}",
            "--signature-key",
            str(s.response_key),
        )

    honest = SwappingEdge(site, s.edge.port, lambda target: target)
    lying = SwappingEdge(site, s.edge.port, lambda target: "/js/app.js")
    try:
        r = verify(honest, "/index.html")  # the relay itself changes nothing that is signed
        assert r.returncode == 0 and "ok   signature" in r.stdout, r.stdout
        r = verify(lying, "/index.html")  # the body of /js/app.js, signed, for /index.html
        assert r.returncode == 1 and "FAIL signature" in r.stdout, r.stdout
        r = verify(lying, "/js/app.js?v=2")  # the same path, another query
        assert r.returncode == 1 and "FAIL signature" in r.stdout, r.stdout
    finally:
        honest.close()
        lying.close()


SQLI_QUERY = "?id=1%27%20OR%20%271%27=%271"


def _site_get(s: Site, path: str, source: str) -> tuple[int, bytes]:
    port = s.edge.port
    got = subprocess.run(
        [
            need("curl"),
            "-sS",
            "--max-time",
            "20",
            "--cacert",
            str(s.ca),
            "--interface",
            source,
            "--resolve",
            f"example.test:{port}:127.0.0.1",
            "-w",
            "\n%{http_code}",
            f"https://example.test:{port}{path}",
        ],
        capture_output=True,
        timeout=30,
    )
    body, _, code = got.stdout.rpartition(b"\n")
    return int(code or 0), body


def test_the_store_answers_only_after_the_waf(blind_site: Callable[..., Site]) -> None:
    """Issue 15 finding 4: the blind store answered before the WAF, the bans, the rate rules
    and the access log: an injection in the query of a file it serves got 200 and no ban."""
    s = blind_site()
    blob = s.ids()["/img/photo.bin"]
    paths = {
        "page": "/index.html",
        "manifest": "/.well-known/blindfold/manifest.json",
        "blob": f"/.blindfold/blobs/{blob}",
    }
    for i, (kind, path) in enumerate(paths.items()):
        source = f"127.0.0.{60 + i}"
        assert _site_get(s, path, "127.0.0.59")[0] == 200, kind  # the clean request is served
        code, body = _site_get(s, path + SQLI_QUERY, source)
        assert code == 403 and b"request id:" in body, (kind, code, body[:200])
        decision = s.origin.wait_for(
            lambda r, ip=source: r.get("event") == "decision" and r.get("value") == ip, 5
        )
        assert decision is not None, kind
    # Every request, the store's included, has its access-log line.
    want = {(path, status) for path in paths.values() for status in (200, 403)}

    def logged() -> set[tuple[str, int]]:
        return {(r["path"], r["status"]) for r in s.origin.records("request")}

    assert wait_until(lambda: want <= logged(), timeout=5), (want, logged())


def test_the_store_does_not_shadow_the_application(blind_site: Callable[..., Site]) -> None:
    """Issue 15 finding 4: a file in source_dir hid the application's own path."""
    s = blind_site(origin_blind={"pages_prefix": "/js/"})
    (s.src / "echo").write_text("a stale file named like an application path\n")
    code, body = _site_get(s, "/echo", "127.0.0.70")
    assert code == 200 and b'"path": "/echo"' in body, body[:200]  # the application's answer
    # Under pages_prefix the store serves what is a file, the application everything else.
    assert _site_get(s, "/js/app.js", "127.0.0.70") == (200, s.files["/js/app.js"])
    code, body = _site_get(s, "/js/nothing-here", "127.0.0.70")
    assert code == 200 and b"Hello from the application" in body
    # The plaintext of sealed files stays under the store's own prefix, whatever the pages.
    plain = "/.well-known/blindfold/plain/img/photo.bin"
    assert _site_get(s, plain, "127.0.0.70") == (200, s.files["/img/photo.bin"])
    assert _site_get(s, "/.well-known/blindfold/plain/echo", "127.0.0.70")[0] == 404


def test_the_manifest_is_refused_where_the_edge_ends_tls(
    blind_site: Callable[..., Site], ca: pki.Issued, site: dict[str, Path], tmp_path: Path
) -> None:
    """Issue 15 finding 5: through a keyless route (the edge ends TLS and reads the HTTP) the
    origin served the manifest, the content keys, to the edge."""
    from tests.helpers.keyless import KeyServerProcess, add_site, keyserver_config, make_pki
    from tests.integration.test_keyless import keyless_route

    kpki = make_pki(tmp_path, ca)
    add_site(kpki, ca, "own", ["keyless.example.test"])  # the keyless name's own certificate
    ks = KeyServerProcess(
        keyserver_config(kpki, {"edge1": ["keyless.example.test"]}), tmp_path, name="ks"
    )
    try:
        s = blind_site(
            extra_routes=lambda origin_port: keyless_route(
                kpki, site, [ks.port], origin_port, sni=["keyless.example.test"], cert="own"
            )
        )

        def get(host: str, path: str) -> tuple[int, bytes]:
            port = s.edge.port
            got = subprocess.run(
                [
                    need("curl"),
                    "-sS",
                    "--max-time",
                    "20",
                    "--cacert",
                    str(s.ca),
                    "--resolve",
                    f"{host}:{port}:127.0.0.1",
                    "-w",
                    "\n%{http_code}",
                    f"https://{host}:{port}{path}",
                ],
                capture_output=True,
                timeout=30,
            )
            body, _, code = got.stdout.rpartition(b"\n")
            return int(code or 0), body

        manifest = "/.well-known/blindfold/manifest.json"
        plain = "/.well-known/blindfold/plain/img/photo.bin"
        key = json.loads(json.loads((s.out / "manifest.json").read_text())["payload"])
        some_key = next(iter(key["files"].values()))["key"].encode()
        # End to end (the passthrough route): served.
        code, body = get("example.test", manifest)
        assert code == 200 and some_key in body
        assert get("example.test", plain) == (200, s.files["/img/photo.bin"])
        # Through the keyless route the edge would read it: refused, no key in the answer.
        for path in (manifest, plain):
            code, body = get("keyless.example.test", path)
            assert code == 403 and some_key not in body and b"end-to-end" in body, (code, body)
        # ... and a sealed file's plaintext at its own path (a page under pages_prefix) too
        assert get("example.test", "/img/photo.bin") == (200, s.files["/img/photo.bin"])
        code, body = get("keyless.example.test", "/img/photo.bin")
        assert code == 403 and body != s.files["/img/photo.bin"], code
        # The keyless route itself works (the application answers).
        code, body = get("keyless.example.test", "/echo")
        assert code == 200 and b'"path": "/echo"' in body
    finally:
        ks.stop()
        assert not ks.tracebacks(), "".join(ks.stderr_lines)


def test_an_edge_restarted_while_the_origin_is_down_keeps_serving_its_cache(
    blind_site: Callable[..., Site], start_edge: Callable[..., EdgeProcess]
) -> None:
    """The edge's own check must never cost its cache: without a current index (the origin
    down) it neither drops a copy nor serves one unchecked; the last signed index it fetched
    is kept in its cache directory and checks the copies after a restart."""
    s = blind_site(memory_cache_bytes=0)
    path = "/img/photo.bin"
    blob = s.ids()[path]
    r, _ = s.fetch(path)
    assert r.returncode == 0 and "from the edge" in r.stdout
    [cached] = list(s.cache.rglob(blob))
    text = s.edge.config_path.read_text()
    s.edge.stop()
    s.origin.stop()
    s.edge = start_edge(text)
    got = s.curl_blob(f"/b/{blob}", "-o", str(s.tmp / "again"), "-w", "%{http_code}")
    assert got.stdout == b"200", got
    assert (s.tmp / "again").read_bytes() == (s.out / "blobs" / blob).read_bytes()
    assert cached.exists() and not s.edge.records("blind_cache_dropped")
    # An id it cannot vouch for while no current index can be had: 502, nothing dropped.
    unknown = s.curl_blob("/b/" + "7" * 32, "-o", "/dev/null", "-w", "%{http_code}")
    assert unknown.stdout == b"502"


def test_without_source_dir_the_fallback_is_the_files_own_url(
    blind_site: Callable[..., Site], app: Any
) -> None:
    """No source_dir: the store serves no plaintext, the application serves sealed files at
    their own paths, and that is where `blindfold fetch` falls back to."""
    s = blind_site(memory_cache_bytes=0, origin_blind={"source_dir": "", "pages_prefix": ""})
    path = "/img/photo.bin"
    assert s.fetch(path)[0].returncode == 0
    [cached] = list(s.cache.rglob(s.ids()[path]))
    _tamper(cached, 100, keep_times=True)
    # and the origin's own copy of the blob (the first fallback) gone too
    (s.out / "blobs" / s.ids()[path]).rename(s.tmp / "moved-blob")
    seen = len(app.seen)
    r, got = s.fetch(path)
    # The demo application answers with a page of its own, which the manifest refuses.
    assert r.returncode == 1 and got == b"" and "differ from its own manifest" in r.stderr
    assert path in [req["path"] for req in app.seen[seen:]]


def test_the_sri_rewrite_runs_once_per_page_however_its_url_is_spelt(
    blind_site: Callable[..., Site],
) -> None:
    """The rewrite cache was keyed by the request's directory as spelt: /docs%2F/page.html,
    /docs%2F%2F/page.html... each forced a fresh rewrite of the same file (attack review)."""
    s = blind_site(origin_blind={"rewrite_html": True, "edge_url": "https://cdn.example.test"})
    docs = s.src / "docs"
    docs.mkdir()
    (docs / "page.html").write_text("<html><body><p>" + "x" * 4000 + "</p></body></html>\n")
    port = s.edge.port
    for i in range(6):
        path = "/docs" + "%2F" * i + "/page.html"
        got = subprocess.run(
            [
                need("curl"),
                "-sS",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--path-as-is",
                "--cacert",
                str(s.ca),
                "--resolve",
                f"example.test:{port}:127.0.0.1",
                f"https://example.test:{port}{path}",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert got.stdout == "200", (path, got.stdout, got.stderr)
    rewrites = s.origin.metric("blindfold_origin_blind_requests_total", kind="page_rewrite")
    assert rewrites == 1


def test_one_visitor_cannot_use_up_everyones_failure_reports(
    blind_site: Callable[..., Site],
) -> None:
    """The report endpoint had one bucket for every visitor: 200 reports from one address
    made the next visitor's report 429 (a hostile edge operator, as a visitor, could hide
    that its copies fail; attack review). Each address now has its own share."""
    from tests.helpers.clients import h2_exchange

    s = blind_site()
    report = b'{"path": "/img/photo.bin", "id": "x", "error": "bad copy"}'
    headers = [
        (b":method", b"POST"),
        (b":scheme", b"https"),
        (b":authority", b"example.test"),
        (b":path", b"/.well-known/blindfold/report"),
        (b"content-type", b"application/json"),
    ]
    codes = []
    for _ in range(2):  # 2 x 100 at once (100: the origin's concurrent stream limit)
        flood = h2_exchange(
            s.edge.port, "example.test", s.ca, [(headers, report)] * 100, source="127.0.0.51"
        )
        codes += [code for code, _ in flood]
    assert codes.count(429) >= 180, codes  # its own share: a burst of 10, then 1/s
    [(code, _)] = h2_exchange(
        s.edge.port, "example.test", s.ca, [(headers, report)], source="127.0.0.52"
    )
    assert code in (200, 204), code
