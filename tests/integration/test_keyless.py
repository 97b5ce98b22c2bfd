"""Keyless routes end to end on loopback: visitor -> edge (TLS 1.3 ends here; the signature
comes from the key server) -> origin agent (verified TLS, PROXY header) -> application.

Real clients: curl, openssl s_client and Python ssl; Chromium is in test_keyless_browser.py."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from blindfold import pki
from tests.conftest import need
from tests.helpers.clients import curl, wait_until
from tests.helpers.edgeproc import EdgeProcess, OriginProcess, edge_config, route
from tests.helpers.keyless import KeylessPki, KeyServerProcess, keyserver_config, make_pki
from tests.helpers.topology import origin_config


@pytest.fixture
def kpki(tmp_path: Path, ca: pki.Issued) -> KeylessPki:
    return make_pki(tmp_path, ca)


@pytest.fixture
def keyserver(kpki: KeylessPki, tmp_path: Path) -> Iterator[KeyServerProcess]:
    ks = KeyServerProcess(keyserver_config(kpki, {
        "edge1": ["example.test", "*.example.test", "rsa.test", "ed.test", "p384.test"]}),
        tmp_path, name="ks")
    yield ks
    ks.stop()
    assert not ks.tracebacks(), "".join(ks.stderr_lines)


def keyless_route(kpki: KeylessPki, site: dict[str, Path], ks_ports: list[int],
                  origin_port: int, sni: list[str] | None = None, cert: str = "p256",
                  **extra: Any) -> str:
    text = route(sni or ["example.test", "*.example.test"], [f"127.0.0.1:{origin_port}"],
                 mode="keyless", certificate=str(kpki.sites[cert][0]), proxy_protocol="v2",
                 origin_ca=str(site["ca"]), **extra)
    ks = {"addresses": [f"127.0.0.1:{p}" for p in ks_ports],
          "client_cert": str(kpki.dir / "edge1.pem"), "client_key": str(kpki.dir / "edge1.key"),
          "ca": str(kpki.edge_ca), "server_name": "keyserver.test"}
    ks_text = "keyserver = { " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in ks.items()) + " }"
    return text.rstrip("\n") + "\n" + ks_text + "\n\n"


@pytest.fixture
def chain(start_edge: Callable[..., EdgeProcess], start_origin: Callable[..., OriginProcess],
          app: Any, site: dict[str, Path], tmp_path: Path, kpki: KeylessPki,
          keyserver: KeyServerProcess) -> Callable[..., tuple[EdgeProcess, OriginProcess]]:
    def make(edge_kw: dict[str, Any] | None = None, **route_kw: Any
             ) -> tuple[EdgeProcess, OriginProcess]:
        origin = start_origin(origin_config(site, app.port, tmp_path))
        text = edge_config(keyless_route(kpki, site, [keyserver.port], origin.port, **route_kw),
                           per_ip_rate_per_s=0, **(edge_kw or {}))
        return start_edge(text), origin
    return make


def fetch(edge: EdgeProcess, kpki: KeylessPki, path: str = "/echo", *extra: str,
          host: str = "example.test", source: str = "127.0.0.1") -> tuple[int, str, str]:
    out = curl(edge.port, host, kpki.site_ca, "-w", "\n%{http_code} %{http_version}", *extra,
               source=source, path=path, timeout=30)
    body, _, tail = out.stdout.rpartition("\n")
    code, _, version = tail.partition(" ")
    return int(code or 0), version, body + out.stderr


def test_curl_http1_and_http2_through_a_keyless_route(
        chain: Any, kpki: KeylessPki, keyserver: KeyServerProcess, app: Any) -> None:
    edge, origin = chain()
    for flags, version in ((("--http1.1",), "1.1"), (("--http2",), "2")):
        code, got_version, body = fetch(edge, kpki, "/echo", *flags, source="127.0.0.7")
        assert (code, got_version) == (200, version), body
        seen = json.loads(body)
        assert seen["x-forwarded-for"] == "127.0.0.7"  # the visitor, through edge and origin
    audit = (kpki.dir / "audit.log")
    assert wait_until(lambda: audit.exists() and len(audit.read_text().splitlines()) >= 2, 5)
    entries = [json.loads(line) for line in audit.read_text().splitlines()]
    assert {e["client"] for e in entries} == {"127.0.0.7"}
    assert all(e["hostname"] == "example.test" and e["edge"] == "edge1" for e in entries)
    assert edge.metric("blindfold_keyless_handshakes_total", route="route0", result="full") == 2
    assert edge.metric("blindfold_keyless_requests_total", route="route0", status="2xx") == 2


def test_openssl_s_client_sees_the_site_certificate_and_tls13(
        chain: Any, kpki: KeylessPki) -> None:
    edge, _ = chain()
    out = subprocess.run(
        [need("openssl"), "s_client", "-connect", f"127.0.0.1:{edge.port}", "-servername",
         "www.example.test", "-CAfile", str(kpki.site_ca), "-verify_return_error",
         "-alpn", "http/1.1", "-quiet"],
        input="GET /echo HTTP/1.1\r\nHost: www.example.test\r\nConnection: close\r\n\r\n",
        capture_output=True, text=True, timeout=20)
    assert out.returncode == 0, out.stderr
    assert "HTTP/1.1 200" in out.stdout
    brief = subprocess.run(
        [need("openssl"), "s_client", "-connect", f"127.0.0.1:{edge.port}", "-servername",
         "example.test", "-CAfile", str(kpki.site_ca), "-verify_return_error", "-brief"],
        input="", capture_output=True, text=True, timeout=20)
    assert "Protocol version: TLSv1.3" in brief.stderr, brief.stderr
    assert "Verification: OK" in brief.stderr


@pytest.mark.parametrize("suite", ["TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384",
                                   "TLS_CHACHA20_POLY1305_SHA256"])
@pytest.mark.parametrize("group", ["X25519", "P-256"])
def test_cipher_suites_and_groups(chain: Any, kpki: KeylessPki, suite: str,
                                  group: str) -> None:
    edge, _ = chain()
    out = subprocess.run(
        [need("openssl"), "s_client", "-connect", f"127.0.0.1:{edge.port}", "-servername",
         "example.test", "-CAfile", str(kpki.site_ca), "-verify_return_error", "-brief",
         "-ciphersuites", suite, "-groups", group],
        input="", capture_output=True, text=True, timeout=20)
    assert f"Ciphersuite: {suite}" in out.stderr, out.stderr
    expected = {"X25519": "Server Temp Key: X25519", "P-256": "prime256v1"}[group]
    assert expected in out.stderr, out.stderr


def test_python_ssl_resumes_without_the_key_server(
        chain: Any, kpki: KeylessPki, keyserver: KeyServerProcess) -> None:
    edge, _ = chain()
    ctx = ssl.create_default_context(cafile=str(kpki.site_ca))

    def one(session: ssl.SSLSession | None) -> tuple[ssl.SSLSession | None, bool]:
        with socket.create_connection(("127.0.0.1", edge.port), timeout=10) as raw, \
                ctx.wrap_socket(raw, server_hostname="example.test", session=session) as tls:
            tls.sendall(b"GET /echo HTTP/1.1\r\nHost: example.test\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
            assert data.startswith(b"HTTP/1.1 200"), data[:200]
            return tls.session, tls.session_reused

    session, reused = one(None)
    assert not reused and session is not None and session.has_ticket
    signed = edge.metric("blindfold_keyless_handshakes_total", route="route0", result="full")
    session2, reused = one(session)
    assert reused
    assert edge.metric("blindfold_keyless_handshakes_total", route="route0",
                       result="resumed") == 1
    assert edge.metric("blindfold_keyless_handshakes_total", route="route0",
                       result="full") == signed  # no new signature
    # tickets are single use: the first one again means a full handshake
    _, reused = one(session)
    assert not reused


@pytest.mark.parametrize("cert,host", [("rsa", "rsa.test"), ("ed", "ed.test"),
                                       ("p384", "p384.test")])
def test_every_key_type(chain: Any, kpki: KeylessPki, cert: str, host: str) -> None:
    edge, _ = chain(sni=[host], cert=cert, origin_server_name="example.test")
    ctx = ssl.create_default_context(cafile=str(kpki.site_ca))
    with socket.create_connection(("127.0.0.1", edge.port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname=host) as tls:
        assert tls.version() == "TLSv1.3"
        tls.sendall(f"GET /echo HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        assert tls.recv(100).startswith(b"HTTP/1.1 200")
