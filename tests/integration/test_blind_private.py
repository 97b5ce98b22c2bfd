"""Blind delivery of private content (issue 18), with real processes: `blindfold seal
--private` -> the origin agent, which serves the private manifest and the plaintext of private
files only after its application (the demo app, `/auth/private`) admitted the visitor ->
an edge (passthrough route for the site, blind route for the CDN name) -> `blindfold fetch`
and curl as visitors, and curl as the edge operator."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from blindfold import pki
from blindfold.core import ece, manifest
from tests.conftest import need
from tests.helpers.clients import wait_until
from tests.helpers.edgeproc import EdgeProcess, OriginProcess, edge_config, route
from tests.helpers.topology import origin_config
from tests.integration.test_blind import CDN, _run

MARKER = b"PRIVATE-PLAINTEXT-" + os.urandom(8).hex().encode()


class PrivateSite:
    def __init__(
        self,
        tmp: Path,
        ca: pki.Issued,
        site: dict[str, Path],
        app: Any,
        start_edge: Callable[..., EdgeProcess],
        start_origin: Callable[..., OriginProcess],
        blind: dict[str, Any] | None = None,
        files: dict[str, bytes] | None = None,
    ) -> None:
        self.tmp, self.app = tmp, app
        self.src, self.out = tmp / "site", tmp / "sealed"
        self.files = files or {
            "/index.html": b"<p>public page</p>\n",
            "/img/logo.bin": os.urandom(5000),
            "/members/report.txt": MARKER + b" quarterly numbers\n" + os.urandom(3000),
            "/members/video.bin": MARKER + os.urandom(300_000),
        }
        for path, data in self.files.items():
            (self.src / path.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
            (self.src / path.lstrip("/")).write_bytes(data)
        self.seal()
        cdn = pki.issue(ca, [CDN])
        cdn.write(tmp / "cdn.pem", tmp / "cdn.key")
        text = origin_config(site, app.port, tmp) + "\n[origin.blind]\n"
        for key, value in {
            "dir": str(self.out),
            "source_dir": str(self.src),
            "pages_prefix": "/",
            "site_names": ["example.test"],
            "private_auth_path": "/auth/private",
            **(blind or {}),
        }.items():
            text += f"{key} = {json.dumps(value)}\n"
        self.origin = start_origin(text)
        routes = route(
            ["example.test"], [f"127.0.0.1:{self.origin.port}"], proxy_protocol="v2"
        ) + route(
            [CDN],
            [f"127.0.0.1:{self.origin.port}"],
            mode="blind",
            certificate=str(tmp / "cdn.pem"),
            key=str(tmp / "cdn.key"),
            origin_ca=str(site["ca"]),
            origin_server_name="example.test",
            proxy_protocol="v2",
            blind={
                "cache_dir": str(tmp / "edge-cache"),
                "manifest_public_key": str(self.out / "manifest-public.pem"),
            },
        )
        self.edge = start_edge(edge_config(routes, per_ip_rate_per_s=0))
        self.ca = site["ca"]
        self.cookie = f"Cookie: session={app.session}"

    def seal(self, *extra: str) -> str:
        r = _run(
            "seal",
            str(self.src),
            str(self.out),
            "--signing-key",
            str(self.tmp / "manifest.pem"),
            "--id-secret",
            str(self.tmp / "id-secret"),
            "--create-keys",
            "--skip",
            "*.html",
            "--private",
            "/members/*",
            "--record-size",
            "16384",
            *extra,
        )
        assert r.returncode == 0, r.stderr
        return r.stdout

    def entries(self, name: str) -> dict[str, manifest.Entry]:
        public = manifest.verify(
            (self.out / "manifest.json").read_bytes(),
            manifest_public_key(self.out),
            time.time(),
        )
        if name == "public":
            return public.files
        return manifest.verify(
            (self.out / name).read_bytes(), manifest_public_key(self.out), time.time()
        ).files

    def fetch(self, path: str, *extra: str) -> tuple[subprocess.CompletedProcess[str], bytes]:
        port = self.edge.port
        out = self.tmp / f"out-{os.urandom(4).hex()}"
        r = _run(
            "fetch",
            f"https://example.test:{port}{path}",
            "--edge",
            f"https://{CDN}:{port}",
            "--manifest-key",
            str(self.out / "manifest-public.pem"),
            "--cacert",
            str(self.ca),
            "--connect-to",
            f"example.test:{port}:127.0.0.1:{port}",
            "--connect-to",
            f"{CDN}:{port}:127.0.0.1:{port}",
            "-o",
            str(out),
            *extra,
        )
        return r, out.read_bytes() if out.exists() else b""

    def curl(self, host: str, path: str, *extra: str) -> tuple[int, dict[str, str], bytes]:
        """GET through the edge: `host` example.test (passthrough to the origin) or the CDN
        name (the blind route). Status, headers (lower-case names), body."""
        port = self.edge.port
        r = subprocess.run(
            [
                need("curl"),
                "-sS",
                "--max-time",
                "20",
                "--cacert",
                str(self.ca),
                "--resolve",
                f"{host}:{port}:127.0.0.1",
                "-D",
                str(self.tmp / "headers.txt"),
                f"https://{host}:{port}{path}",
                *extra,
            ],
            capture_output=True,
            timeout=30,
        )
        assert r.returncode == 0, r.stderr
        lines = (self.tmp / "headers.txt").read_text(errors="replace").splitlines()
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        return status, headers, r.stdout

    def auth_requests(self) -> list[dict[str, str]]:
        return [r for r in self.app.seen if r["path"].startswith("/auth/")]

    def set_blind(self, **settings: Any) -> None:
        """Change [origin.blind] settings and reload the origin."""
        text = self.origin.config_path.read_text()
        for key, value in settings.items():
            text, n = re.subn(rf"(?m)^{key} = .*$", f"{key} = {json.dumps(value)}", text)
            if n == 0:
                text = text.replace(
                    "\n[origin.blind]\n", f"\n[origin.blind]\n{key} = {json.dumps(value)}\n"
                )
        self.origin.write_config(text)
        assert self.origin.reload() is not None


def manifest_public_key(out: Path) -> Any:
    from blindfold.blind.fetch import load_public_key

    return load_public_key(str(out / "manifest-public.pem"))


@pytest.fixture
def private_site(
    tmp_path: Path,
    ca: pki.Issued,
    site: dict[str, Path],
    app: Any,
    start_edge: Callable[..., EdgeProcess],
    start_origin: Callable[..., OriginProcess],
) -> PrivateSite:
    return PrivateSite(tmp_path, ca, site, app, start_edge, start_origin)


MANIFEST = "/.well-known/blindfold/manifest.json"
PRIVATE = "/.well-known/blindfold/manifest-private.json"
PLAIN = "/.well-known/blindfold/plain"


def test_admitted_visitors_fetch_private_files_from_the_edge_others_are_refused(
    private_site: PrivateSite,
) -> None:
    s = private_site
    for path in ("/members/report.txt", "/members/video.bin"):
        r, got = s.fetch(path, "--header", s.cookie)
        assert r.returncode == 0, r.stderr
        assert "from the edge" in r.stdout and not r.stderr, (r.stdout, r.stderr)
        assert got == s.files[path]
    # The application was asked with the visitor's cookie, for each private manifest.
    asked = s.auth_requests()
    assert asked and all(a["cookie"] == f"session={s.app.session}" for a in asked)
    assert all(a["x-original-uri"] == PRIVATE for a in asked)
    # A bearer token works too (Authorization is passed on).
    r, got = s.fetch("/members/report.txt", "-H", f"Authorization: Bearer {s.app.session}")
    assert r.returncode == 0 and got == s.files["/members/report.txt"], r.stderr
    # Without credentials, or with wrong ones: refused, nothing written, no fallback.
    plain_before = s.origin.metric("blindfold_origin_blind_bytes_total", kind="plaintext")
    for extra in ((), ("--header", "Cookie: session=stolen")):
        r, got = s.fetch("/members/report.txt", *extra)
        assert r.returncode == 1 and "HTTP 401" in r.stderr and "refused" in r.stderr, r.stderr
        assert got == b""
    assert s.origin.metric("blindfold_origin_blind_bytes_total", kind="plaintext") == plain_before
    # Public files need no credentials, sealed or not (a page the public manifest lacks is
    # asked of the origin once the private manifest is refused).
    r, got = s.fetch("/img/logo.bin")
    assert r.returncode == 0 and got == s.files["/img/logo.bin"], r.stderr
    r, got = s.fetch("/index.html")
    assert r.returncode == 0 and got == s.files["/index.html"], r.stderr
    # A --header that is not "Name: value" is refused before anything is sent.
    r, _ = s.fetch("/img/logo.bin", "--header", "no colon here")
    assert r.returncode == 2 and "header: 'no colon here'" in r.stderr, r.stderr


def test_the_origin_serves_private_content_only_to_admitted_visitors(
    private_site: PrivateSite,
) -> None:
    s = private_site
    cookie = ("-H", s.cookie)
    status, headers, body = s.curl("example.test", PRIVATE, *cookie)
    assert status == 200 and headers["cache-control"] == "private, no-store"
    assert body == (s.out / "manifest-private.json").read_bytes()
    # Refused: the application's 401, its WWW-Authenticate and body, and never stored.
    status, headers, body = s.curl("example.test", PRIVATE)
    assert status == 401 and body == b"login required\n", (status, body)
    assert headers["www-authenticate"] == 'Bearer realm="private"'
    assert headers["cache-control"] == "no-store"
    # The plaintext fallback and the file's own path (pages_prefix) ask the application too.
    for path in (f"{PLAIN}/members/report.txt", "/members/report.txt"):
        status, headers, body = s.curl("example.test", path)
        assert status == 401 and MARKER not in body, (path, status)
        status, headers, body = s.curl("example.test", path, *cookie)
        assert status == 200 and body == s.files["/members/report.txt"], (path, status)
        assert headers["cache-control"] == "private, no-store"
    # Nor is another spelling of its path, or a link to it (made after sealing: unsealed).
    (s.src / "alias.txt").symlink_to(s.src / "members" / "report.txt")
    for path in ("/members%2F%2Freport.txt", "/members/%2E/report.txt", "/alias.txt"):
        status, _, body = s.curl("example.test", path, "--path-as-is")
        assert status in (401, 404) and MARKER not in body, (path, status)
    status, _, body = s.curl("example.test", "/alias.txt", *cookie)
    assert status == 200 and body == s.files["/members/report.txt"]
    # A range of the plaintext (the service worker's resume) is no way around it.
    status, _, body = s.curl("example.test", f"{PLAIN}/members/video.bin", "-H", "Range: bytes=0-")
    assert status == 401 and MARKER not in body
    # Public files stay public.
    status, _, body = s.curl("example.test", f"{PLAIN}/img/logo.bin")
    assert status == 200 and body == s.files["/img/logo.bin"]


@pytest.mark.parametrize(
    ("auth_path", "timeout_s", "expected"),
    [
        ("/auth/forbidden", 5.0, 403),
        ("/auth/broken", 5.0, 503),
        ("/auth/redirect", 5.0, 503),
        ("/auth/slow", 1.0, 503),
    ],
)
def test_the_applications_other_answers(
    private_site: PrivateSite, auth_path: str, timeout_s: float, expected: int
) -> None:
    s = private_site
    s.set_blind(private_auth_path=auth_path, private_auth_timeout_s=timeout_s)
    started = time.monotonic()
    status, _, body = s.curl("example.test", PRIVATE, "-H", s.cookie)
    took = time.monotonic() - started
    assert status == expected, (status, body)
    assert b"keyid" not in body and b'"payload"' not in body
    if auth_path == "/auth/slow":
        assert took < 5.0, took  # the deadline, not the application's 10 s
    if expected == 403:
        assert body == b"not for you\n"
    status, _, body = s.curl("example.test", f"{PLAIN}/members/report.txt", "-H", s.cookie)
    assert status == expected and MARKER not in body


def test_the_waf_comes_before_the_application_is_asked(private_site: PrivateSite) -> None:
    """The private manifest is behind the same request gate as every path (WAF, decision
    rules, access log): an attack is refused there, and the application is never asked."""
    s = private_site
    before = len(s.auth_requests())
    status, _, body = s.curl(
        "example.test", PRIVATE + "?q=%3Cscript%3Ealert(1)%3C%2Fscript%3E", "-H", s.cookie
    )
    assert status == 403 and b'"payload"' not in body, (status, body)
    assert len(s.auth_requests()) == before
    assert s.origin.metric("blindfold_waf_blocks_total") == 1


def test_what_the_edge_operator_gets_holds_no_private_key_or_path(
    private_site: PrivateSite,
) -> None:
    """The edge operator: its own blind route (what it caches, what it pulls with the edge's
    identity) and curl to the site without credentials, like any visitor."""
    s = private_site
    # A member fetches everything once: the edge pulls and caches the private blobs too.
    for path in s.files:
        if path != "/index.html":
            r, _ = s.fetch(path, "--header", s.cookie)
            assert r.returncode == 0, r.stderr
    private = s.entries("manifest-private.json")
    public = s.entries("public")
    assert set(private) == {"/members/report.txt", "/members/video.bin"}
    secrets_of = {
        p: [p.encode(), e.id.encode(), manifest.b64u(e.key).encode(), e.sha256.encode()]
        for p, e in private.items()
    }
    # Everything the operator can get without credentials, through the site and its edge.
    got: dict[str, bytes] = {}
    for path in (
        MANIFEST,
        PRIVATE,
        f"{PLAIN}/members/report.txt",
        "/members/report.txt",
        "/.blindfold/blob-index.json",
        "/index.html",
        "/",
    ):
        got[path] = s.curl("example.test", path)[2]
    for path in ("/.blindfold/blob-index.json", PRIVATE, MANIFEST):  # the blind route
        got["cdn" + path] = s.curl(CDN, path)[2]
    blobs = {}
    for e in [*private.values(), *public.values()]:
        status, _, blobs[e.id] = s.curl(CDN, f"/b/{e.id}")
        assert status == 200
    cache = b"".join(p.read_bytes() for p in (s.tmp / "edge-cache").rglob("*") if p.is_file())
    index = got["/.blindfold/blob-index.json"]
    for path, secrets in secrets_of.items():
        # the public manifest: no path, id, key or digest of a private file
        assert not any(x in got[MANIFEST] for x in secrets), path
        for where, data in [*got.items(), ("blobs", b"".join(blobs.values())), ("cache", cache)]:
            # no key, no path, no plaintext digest anywhere; ids only in the index (opaque:
            # an id and a size, nothing that names the file)
            ids_allowed = where.endswith("blob-index.json") or where in ("blobs", "cache")
            for x in secrets if not ids_allowed else [secrets[0], *secrets[2:]]:
                assert x not in data, (path, where)
            assert MARKER not in data, where
    for e in private.values():
        assert e.id.encode() in index  # what lets the edge serve it, and all it learns
    # The edge has no route to the manifests.
    assert not got["cdn" + PRIVATE].startswith(b"{") and not got["cdn" + MANIFEST].startswith(b"{")


def test_rotate_private_gives_new_keys_the_old_ones_do_not_open(
    private_site: PrivateSite,
) -> None:
    s = private_site
    path = "/members/report.txt"
    r, _ = s.fetch(path, "--header", s.cookie)
    assert r.returncode == 0, r.stderr
    old = s.entries("manifest-private.json")
    public_before = s.entries("public")
    assert "2 private (2 old private blobs removed)" in s.seal("--rotate-private")
    new = s.entries("manifest-private.json")
    assert s.entries("public") == public_before
    for p in old:
        assert new[p].id != old[p].id and new[p].key != old[p].key
    # A member fetches the new version from the edge (once the edge has the new index: it
    # asks for it at most every 5 s)...
    assert wait_until(lambda: s.curl(CDN, f"/b/{new[path].id}")[0] == 200, 15, 0.5)
    r, got = s.fetch(path, "--header", s.cookie)
    assert r.returncode == 0 and "from the edge" in r.stdout and got == s.files[path], r.stderr
    # ...and a former member with the old key cannot open the new blob the edge serves.
    status, _, blob = s.curl(CDN, f"/b/{new[path].id}")
    assert status == 200 and len(blob) == new[path].sealed_size
    assert ece.open_all(blob, new[path].key) == s.files[path]
    with pytest.raises(Exception):  # noqa: B017 - any failure to open is the point
        ece.open_all(blob, old[path].key)
    # The origin no longer serves the old blob (the edge pulls it no more).
    status, _, _ = s.curl("example.test", f"/.blindfold/blobs/{old[path].id}")
    assert status == 404


def test_check_config_refuses_private_files_without_an_authorisation_path(
    private_site: PrivateSite,
) -> None:
    s = private_site
    text = re.sub(r"(?m)^private_auth_path = .*\n", "", s.origin.config_path.read_text())
    cfg = s.tmp / "no-auth.toml"
    cfg.write_text(text)
    r = _run("check-config", str(cfg))
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "origin.blind.private_auth_path" in r.stderr or "blind.private_auth_path" in r.stderr
    assert "manifest-private.json" in r.stderr
    r = _run("check-config", str(s.origin.config_path))
    assert r.returncode == 0, r.stderr


# ------------------------------------------------------- the store in process, a real app
def _store_request(path: str, sni: str, cookie: str = "") -> Any:
    from blindfold.web.messages import Request

    return Request(
        method=b"GET",
        target=path.encode(),
        authority=sni.encode(),
        scheme=b"https",
        headers=[(b"cookie", cookie.encode())] if cookie else [],
        http_version="1.1",
        client=("127.0.0.1", 40000),
        server=("127.0.0.1", 443),
        request_id="t",
        tls={"sni": sni},
    )


async def _store_get(store: Any, path: str, sni: str, cookie: str = "") -> tuple[int, bytes]:
    from blindfold.origin.blindstore import LocalResponse
    from blindfold.web.messages import BodyStream

    body = BodyStream(1 << 20, lambda n: None)
    body.end()
    resp = await store.answer(_store_request(path, sni, cookie), body, [])
    assert isinstance(resp, LocalResponse)
    data = b"".join([c async for c in resp.body()])
    resp.close()
    return resp.status, data


def test_the_store_never_serves_private_content_where_an_edge_ends_tls_or_unchecked(
    tmp_path: Path, app: Any
) -> None:
    """In process, against the real demo app: (1) a request for the private manifest whose
    TLS name is not one of site_names (a keyless edge's) is refused before the application is
    asked, even with a valid session; (2) a damaged private manifest makes every file of
    source_dir private (the application is asked) rather than any of them a public page."""
    import asyncio

    from blindfold.blind.sealer import SealOptions, load_id_secret, load_signing_key, seal_tree
    from blindfold.config.origin import BlindStoreConfig
    from blindfold.origin.blindstore import BlindStore
    from blindfold.web.client import UpstreamPool

    src, out = tmp_path / "www", tmp_path / "sealed"
    (src / "members").mkdir(parents=True)
    (src / "index.html").write_bytes(b"<p>public</p>")
    (src / "members" / "report.txt").write_bytes(MARKER)
    key = load_signing_key(str(tmp_path / "m.pem"), create=True)
    secret = load_id_secret(str(tmp_path / "id"), create=True)
    seal_tree(str(src), str(out), key, secret, SealOptions(private=("/members/*",)))
    cfg = BlindStoreConfig(
        dir=str(out),
        site_names=("example.test",),
        source_dir=str(src),
        pages_prefix="/",
        private_auth_path="/auth/private",
    )
    cookie = f"session={app.session}"

    async def run() -> None:
        store = BlindStore(cfg, {}, lambda *a, **k: None)
        store.pool = UpstreamPool(f"http://127.0.0.1:{app.port}")
        try:
            asked = len([r for r in app.seen if r["path"].startswith("/auth/")])
            for path in (PRIVATE, f"{PLAIN}/members/report.txt", "/members/report.txt"):
                status, body = await _store_get(store, path, "keyless.example.test", cookie)
                assert status == 403 and MARKER not in body and b"payload" not in body, path
            assert len([r for r in app.seen if r["path"].startswith("/auth/")]) == asked
            status, body = await _store_get(store, PRIVATE, "example.test", cookie)
            assert status == 200 and b"payload" in body
            # Damaged: every page asks the application.
            (out / "manifest-private.json").write_bytes(b"{not json")
            for path in ("/members/report.txt", "/index.html"):
                status, body = await _store_get(store, path, "example.test")
                assert status == 401 and MARKER not in body, path
            status, body = await _store_get(store, "/members/report.txt", "example.test", cookie)
            assert status == 200 and body == MARKER
        finally:
            assert store.pool is not None
            store.pool.close()

    asyncio.run(run())
