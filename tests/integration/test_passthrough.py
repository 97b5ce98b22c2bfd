"""Real clients (Python ssl, curl, openssl s_client) through the edge to a real TLS origin."""

from __future__ import annotations

import ssl
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from tests.helpers.clients import curl, get, http_get, s_client, tls_connect
from tests.helpers.edgeproc import EdgeProcess, edge_config, route
from tests.helpers.origin import TlsOrigin

Start = Callable[..., EdgeProcess]


def cfg(origin: TlsOrigin, **edge: object) -> str:
    return edge_config(
        route(["example.test", "*.example.test"], [f"127.0.0.1:{origin.port}"], name="site"), **edge
    )


def test_python_ssl_sees_the_origin_certificate(
    start_edge: Start, origin: TlsOrigin, site: dict[str, Path], marker: str
) -> None:
    edge = start_edge(cfg(origin))
    with tls_connect(edge.port, "www.example.test", site["ca"], alpn=["http/1.1"]) as tls:
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        seen = x509.load_der_x509_certificate(der).fingerprint(hashes.SHA256()).hex()
        assert seen == site["fingerprint"].read_text()  # the origin's own certificate
        assert tls.version() == "TLSv1.3"
        reply = http_get(tls, host="www.example.test")
    assert b"HTTP/1.1 200 " in reply and marker.encode() in reply
    line = edge.wait_conn(outcome="closed", sni="www.example.test")
    assert line is not None
    assert line["route"] == "site" and line["origin"] == f"127.0.0.1:{origin.port}"
    assert line["alpn"] == ["http/1.1"] and line["ja4"].startswith("t13d")
    assert line["bytes_in"] > 0 and line["bytes_out"] > len(marker)
    assert origin.seen.sni[-1] == "www.example.test"


def test_curl_and_openssl(
    start_edge: Start, origin: TlsOrigin, site: dict[str, Path], marker: str
) -> None:
    edge = start_edge(cfg(origin))
    result = curl(edge.port, "example.test", site["ca"])
    assert result.returncode == 0, result.stderr
    assert marker in result.stdout
    brief = s_client(edge.port, "example.test", site["ca"])
    assert brief.returncode == 0, brief.stderr
    text = brief.stdout + brief.stderr
    assert "Verification: OK" in text
    assert "Protocol version: TLSv1.3" in text


def test_unknown_and_missing_sni_are_refused(
    start_edge: Start, origin: TlsOrigin, site: dict[str, Path]
) -> None:
    edge = start_edge(cfg(origin))
    with pytest.raises((ssl.SSLError, OSError)):
        get(edge.port, "other.test", site["ca"], source="127.0.0.7")
    with pytest.raises((ssl.SSLError, OSError)):
        get(edge.port, None, None, source="127.0.0.8")  # type: ignore[arg-type]
    unknown = edge.wait_conn(outcome="refused", reason="unknown_sni")
    assert unknown is not None and unknown["client"] == "127.0.0.7"
    assert unknown["sni"] == "other.test"
    assert edge.wait_conn(outcome="refused", reason="no_sni", client="127.0.0.8") is not None
    assert edge.metric("blindfold_connections_refused_total", reason="unknown_sni") == 1
    assert edge.metric("blindfold_connections_refused_total", reason="no_sni") == 1
    assert origin.seen.requests == 0  # nothing reached the origin


def test_default_route_takes_unknown_names(
    start_edge: Start, origin: TlsOrigin, site: dict[str, Path]
) -> None:
    text = edge_config(route(["example.test"], [f"127.0.0.1:{origin.port}"], default=True))
    edge = start_edge(text)
    assert b"HTTP/1.1 200 " in get(edge.port, "other.test", site["ca"])
    assert b"HTTP/1.1 200 " in get(edge.port, None, None)  # type: ignore[arg-type]


def test_non_tls_bytes_never_reach_the_origin(start_edge: Start, origin: TlsOrigin) -> None:
    edge = start_edge(cfg(origin))
    out = subprocess.run(
        ["curl", "-sS", "--max-time", "5", f"http://127.0.0.1:{edge.port}/"],
        capture_output=True,
        text=True,
        timeout=15,
    )
    assert out.returncode != 0
    assert edge.wait_conn(outcome="refused", reason="not_tls") is not None
    assert origin.seen.peers == []


def test_with_tcp_defer_accept(
    start_edge: Start, origin: TlsOrigin, site: dict[str, Path], marker: str
) -> None:
    edge = start_edge(cfg(origin, defer_accept=True, hello_timeout_s=2))
    for i in range(3):
        assert marker.encode() in get(
            edge.port, "example.test", site["ca"], source=f"127.0.0.{20 + i}"
        )
    # a client that connects and says nothing is still cut (the kernel hands it over late)
    import socket
    import time

    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", edge.port), timeout=15) as s:
        assert s.recv(10) == b""
    assert time.monotonic() - t0 < 12
