"""atk-trust finding 1: HTTP/2 connection reuse must not give a keyless edge another name's
plaintext. A browser sends requests for any name the certificate covers over a connection it
opened for another name (RFC 9113 §9.1.1, connection coalescing: same address, certificate
valid for both), so the key server signs only with a certificate whose every name the edge is
authorised for.

The edge is the real `blindfold edge`, its route edited by its operator to list a name the key
server does not authorise it for; the visitor is headless Chromium loading a page of the
authorised name that pulls a resource of the other name."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from blindfold import pki
from tests.conftest import need
from tests.helpers.clients import wait_until
from tests.helpers.edgeproc import EdgeProcess, OriginProcess, edge_config
from tests.helpers.keyless import KeylessPki, KeyServerProcess, add_site, keyserver_config
from tests.helpers.keyless import make_pki as make_keyless_pki
from tests.helpers.topology import origin_config
from tests.integration.test_keyless import keyless_route
from tests.integration.test_keyless_browser import spki_pin

AUTHORISED = "keyless.example.test"
OTHER = "example.test"  # the site certificate covers both; the edge may sign for AUTHORISED only


class PageApp:
    """'/' is a page that loads OTHER's '/account' (an image and a frame); '/account' answers a
    per-host secret. Records (host, path) of every request it gets."""

    def __init__(self) -> None:
        self.other_url = ""
        self.seen: list[tuple[str, str]] = []
        app = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                host = self.headers.get("host", "")
                app.seen.append((host, self.path))
                if self.path.startswith("/account"):
                    body, ctype = f"SECRET-ACCOUNT-PAGE-OF {host}".encode(), "text/plain"
                else:
                    body = (
                        "<html><body><p>keyless page</p>"
                        f'<img src="{app.other_url}/account?via=img">'
                        f'<iframe src="{app.other_url}/account?via=iframe"></iframe>'
                        "</body></html>"
                    ).encode()
                    ctype = "text/html"
                self.send_response(200)
                self.send_header("content-type", ctype)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def page_app() -> Iterator[PageApp]:
    app = PageApp()
    yield app
    app.close()


@pytest.fixture
def kpki(tmp_path: Path, ca: pki.Issued) -> KeylessPki:
    kpki = make_keyless_pki(tmp_path, ca)
    # what the docs ask for: the keyless name with a certificate of its own
    add_site(kpki, ca, "own", [AUTHORISED])
    return kpki


@pytest.fixture
def keyserver(kpki: KeylessPki, tmp_path: Path) -> Iterator[KeyServerProcess]:
    ks = KeyServerProcess(keyserver_config(kpki, {"edge1": [AUTHORISED]}), tmp_path, name="ks")
    yield ks
    ks.stop()
    assert not ks.tracebacks(), "".join(ks.stderr_lines)


def chromium(profile: Path, port: int, pins: list[Path]) -> subprocess.CompletedProcess[str]:
    browser = shutil.which("chromium") or need("chromium")
    return subprocess.run(
        [
            browser,
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            f"--user-data-dir={profile}",
            f"--host-resolver-rules=MAP {AUTHORISED} 127.0.0.1, MAP {OTHER} 127.0.0.1",
            # the throwaway CA is not trusted by Chromium: trust exactly these keys
            f"--ignore-certificate-errors-spki-list={','.join(spki_pin(p) for p in pins)}",
            "--virtual-time-budget=8000",
            "--dump-dom",
            f"https://{AUTHORISED}:{port}/",
        ],
        capture_output=True,
        text=True,
        timeout=90,
    )


def audit_entries(kpki: KeylessPki) -> list[dict[str, Any]]:
    audit = kpki.dir / "audit.log"
    return [json.loads(line) for line in audit.read_text().splitlines()] if audit.exists() else []


def lying_edge(
    start_edge: Callable[..., EdgeProcess],
    start_origin: Callable[..., OriginProcess],
    site: dict[str, Path],
    tmp_path: Path,
    kpki: KeylessPki,
    ks: KeyServerProcess,
    app: PageApp,
    cert: str,
) -> EdgeProcess:
    """The edge whose operator added OTHER to the keyless route."""
    origin = start_origin(origin_config(site, app.port, tmp_path))
    edge = start_edge(
        edge_config(
            keyless_route(kpki, site, [ks.port], origin.port, sni=[AUTHORISED, OTHER], cert=cert),
            per_ip_rate_per_s=0,
        )
    )
    app.other_url = f"https://{OTHER}:{edge.port}"
    return edge


def test_a_shared_certificate_is_never_signed_for_an_edge_authorised_for_one_of_its_names(
    start_edge: Callable[..., EdgeProcess],
    start_origin: Callable[..., OriginProcess],
    site: dict[str, Path],
    tmp_path: Path,
    kpki: KeylessPki,
    keyserver: KeyServerProcess,
    page_app: PageApp,
) -> None:
    edge = lying_edge(
        start_edge, start_origin, site, tmp_path, kpki, keyserver, page_app, cert="p256"
    )
    res = chromium(tmp_path / "profile", edge.port, [kpki.sites["p256"][0]])
    # Before the fix Chromium showed the page and sent GET /account for OTHER over the same
    # connection, which the edge decrypted and forwarded.
    assert "keyless page" not in res.stdout
    assert wait_until(
        lambda: any(e.get("reason") == "certificate_too_broad" for e in audit_entries(kpki)), 10
    ), audit_entries(kpki)
    entries = audit_entries(kpki)
    assert not [e for e in entries if e["event"] == "signed"], entries
    refused = [e for e in entries if e["event"] == "refused"]
    assert {e["verified"]["sni"] for e in refused} == {AUTHORISED}
    assert page_app.seen == []  # no request of either name reached the application
    assert not [r for r in edge.records() if r.get("event") == "request"]
    # the key server says at start that edge1's names cover the site certificate only partly
    warned = keyserver.wait_for(
        lambda r: r.get("event") == "edge_key_partly_authorised" and r.get("key") == "p256", 5
    )
    assert warned is not None and OTHER in warned["unauthorised"], keyserver.lines


def test_with_a_certificate_of_its_own_the_other_name_gets_no_handshake(
    start_edge: Callable[..., EdgeProcess],
    start_origin: Callable[..., OriginProcess],
    site: dict[str, Path],
    tmp_path: Path,
    kpki: KeylessPki,
    keyserver: KeyServerProcess,
    page_app: PageApp,
) -> None:
    """The layout the docs ask for: Chromium cannot reuse the keyless connection for OTHER (the
    certificate does not cover it), and a handshake for OTHER is not signed."""
    edge = lying_edge(
        start_edge, start_origin, site, tmp_path, kpki, keyserver, page_app, cert="own"
    )
    res = chromium(tmp_path / "profile", edge.port, [kpki.sites["own"][0]])
    assert "keyless page" in res.stdout, res.stderr[-3000:]
    assert wait_until(
        lambda: any(e.get("reason") == "unauthorized_sni" for e in audit_entries(kpki)), 10
    ), audit_entries(kpki)
    entries = audit_entries(kpki)
    assert {e["verified"]["sni"] for e in entries if e["event"] == "signed"} == {AUTHORISED}
    assert {e["verified"]["sni"] for e in entries if e["event"] == "refused"} == {OTHER}
    assert page_app.seen and all(host.startswith(AUTHORISED + ":") for host, _ in page_app.seen)
    hosts = {str(r.get("host")) for r in edge.records() if r.get("event") == "request"}
    assert hosts and all(h.startswith(AUTHORISED) for h in hosts), hosts
