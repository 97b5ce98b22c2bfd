"""HTTP/3 at the origin agent with real clients on 127.0.0.1: aioquic's HTTP/3 client and
headless Chromium forced to QUIC. The same gate as HTTP/1.1 and HTTP/2 (WAF, bans, proxy), the
site's certificate, Alt-Svc on the TCP side, and visitor addresses believed from trusted edges
only with an authenticated announcement."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from blindfold.core.quic_visitor import encode_announcement
from tests.conftest import need
from tests.helpers.clients import curl
from tests.helpers.edgeproc import OriginProcess
from tests.helpers.h3client import H3Client, h3_get
from tests.helpers.topology import origin_config
from tests.integration.test_keyless_browser import spki_pin

SQLI = "/?id=1%27%20OR%201=1--"
EDGE_KEY = bytes(range(32))


def quic_origin(
    start_origin: Callable[..., OriginProcess],
    app: Any,
    site: dict[str, Path],
    tmp_path: Path,
    *,
    proxy_protocol: str = "optional",
    trusted: str = "127.0.0.1/32",
    **quic: Any,
) -> tuple[OriginProcess, int]:
    keyfile = tmp_path / "quic-edge.key"
    keyfile.write_text(EDGE_KEY.hex() + "\n")
    text = origin_config(
        site, app.port, tmp_path, proxy_protocol=proxy_protocol, trusted_edges=[trusted]
    )
    settings = {"listen": ["127.0.0.1:0"], "edge_keys": [str(keyfile)], **quic}
    text += "\n[origin.quic]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in settings.items())
    origin = start_origin(text)
    listen = origin.ready["quic_listen"]
    assert isinstance(listen, list) and listen
    return origin, int(listen[0].rpartition(":")[2])


def announce_for(visitor: tuple[str, int], key: bytes = EDGE_KEY) -> Callable[[int], bytes]:
    import time

    return lambda port: encode_announcement(key, visitor, port, time.time(), os.urandom(16))


def test_h3_request_passes_the_gate_and_reaches_the_application(
    start_origin: Any, app: Any, site: dict[str, Path], tmp_path: Path
) -> None:
    origin, qport = quic_origin(start_origin, app, site, tmp_path)

    async def run() -> None:
        async with H3Client(qport, ca=site["ca"], source="127.0.0.2") as client:
            r = await client.get("/echo")
            assert r.status == 200, r
            seen = json.loads(r.body)
            assert seen["x-forwarded-for"] == "127.0.0.2"  # a direct visitor (not an edge)
            # the certificate the client saw is the origin's own
            site_cert = x509.load_pem_x509_certificate(site["cert"].read_bytes())
            assert client.peer_certificate.public_bytes(
                serialization.Encoding.DER
            ) == site_cert.public_bytes(serialization.Encoding.DER)
            # a POST body through the WAF to the application
            r = await client.request(
                "POST", "/echo", b"a=1&b=2", [("content-type", "application/x-www-form-urlencoded")]
            )
            assert r.status == 200 and json.loads(r.body)["body"] == "a=1&b=2"
            # a large response (flow control, the send buffer bound)
            r = await client.get("/bytes?n=3000000")
            assert r.status == 200 and len(r.body) == 3_000_000

    asyncio.run(run())
    line = origin.wait_for(lambda r: r.get("event") == "request" and r.get("path") == "/echo", 5)
    assert line is not None and line["http"] == "3" and line["client"] == "127.0.0.2"
    assert line["waf"] is None and line["status"] == 200


def test_sql_injection_over_h3_is_blocked_and_bans_the_visitor(
    start_origin: Any, app: Any, site: dict[str, Path], tmp_path: Path
) -> None:
    origin, qport = quic_origin(start_origin, app, site, tmp_path)
    r = h3_get(qport, SQLI, ca=site["ca"], source="127.0.0.3")
    assert r.status == 403 and b"request id:" in r.body
    audit = origin.wait_for(lambda r: r.get("event") == "waf", 5)
    assert audit is not None and audit["client"] == "127.0.0.3"
    assert 942100 in audit["rule_ids"]
    decision = origin.wait_for(lambda r: r.get("event") == "decision", 5)
    assert decision is not None and decision["value"] == "127.0.0.3"
    assert origin.metric("blindfold_decisions_active") == 1


def test_alt_svc_on_tcp_responses(
    start_origin: Any, app: Any, site: dict[str, Path], tmp_path: Path
) -> None:
    origin, qport = quic_origin(start_origin, app, site, tmp_path)
    out = curl(origin.port, "example.test", site["ca"], "-D", "-", source="127.0.0.4", path="/")
    assert f'alt-svc: h3=":{qport}"; ma=86400' in out.stdout.lower()
    origin2, _ = quic_origin(start_origin, app, site, tmp_path / "..", advertise_port=443)
    out = curl(origin2.port, "example.test", site["ca"], "-D", "-", source="127.0.0.4", path="/")
    assert 'alt-svc: h3=":443"' in out.stdout.lower()


def test_edges_name_the_visitor_only_with_a_valid_announcement(
    start_origin: Any, app: Any, site: dict[str, Path], tmp_path: Path
) -> None:
    origin, qport = quic_origin(start_origin, app, site, tmp_path, proxy_protocol="required")
    visitor = ("198.51.100.7", 51000)
    # an edge (trusted address) that announces the visitor for its socket
    r = h3_get(qport, "/echo", ca=site["ca"], source="127.0.0.1", announce=announce_for(visitor))
    assert r.status == 200 and json.loads(r.body)["x-forwarded-for"] == "198.51.100.7"
    assert origin.metric("blindfold_origin_quic_announcements_total", result="ok") == 1

    def refused(**kw: Any) -> None:
        with pytest.raises((TimeoutError, ConnectionError)):
            h3_get(qport, "/echo", ca=site["ca"], timeout=1.5, **kw)

    # a trusted address without an announcement: nothing is served
    refused(source="127.0.0.1")
    assert origin.metric("blindfold_origin_quic_datagrams_total", result="unbound_source") >= 1
    # a wrong key, and a valid announcement from an address that is not an edge's
    refused(source="127.0.0.1", announce=announce_for(visitor, key=bytes(32)))
    assert origin.metric("blindfold_origin_quic_announcements_total", result="unknown_key") == 1
    refused(source="127.0.0.5", announce=announce_for(visitor))
    assert origin.metric("blindfold_origin_quic_announcements_total", result="untrusted_peer") == 1
    lines = [r for r in origin.records("request")]
    assert [r["client"] for r in lines] == ["198.51.100.7"]


def test_v2_and_sni_choose_the_certificate(
    start_origin: Any, app: Any, site: dict[str, Path], tmp_path: Path
) -> None:
    from aioquic.quic.packet import QuicProtocolVersion

    _origin, qport = quic_origin(start_origin, app, site, tmp_path)
    r = h3_get(
        qport,
        "/echo",
        ca=site["ca"],
        source="127.0.0.6",
        version=QuicProtocolVersion.VERSION_2,
        server_name="other.test",
    )
    assert r.status == 200


def test_chromium_loads_a_page_over_h3(
    start_origin: Any, app: Any, site: dict[str, Path], tmp_path: Path
) -> None:
    browser = shutil.which("chromium") or need("chromium")
    # Chromium connects from 127.0.0.1: not an edge here
    origin, qport = quic_origin(start_origin, app, site, tmp_path, trusted="127.0.0.9/32")
    profile = tmp_path / "chromium-profile"
    out = subprocess.run(
        [
            browser,
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            f"--user-data-dir={profile}",
            "--host-resolver-rules=MAP example.test 127.0.0.1",
            f"--origin-to-force-quic-on=example.test:{qport}",
            f"--ignore-certificate-errors-spki-list={spki_pin(site['cert'])}",
            "--dump-dom",
            f"https://example.test:{qport}/",
        ],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert "Hello from the application" in out.stdout, out.stderr[-3000:]
    assert "The origin agent says the visitor is <b>127.0.0.1</b>" in out.stdout
    line = origin.wait_for(lambda r: r.get("event") == "request" and r.get("path") == "/", 5)
    assert line is not None and line["http"] == "3" and line["status"] == 200


def test_h2_body_without_content_length_reaches_the_application(
    start_origin: Any, app: Any, site: dict[str, Path], tmp_path: Path
) -> None:
    """HTTP/2 (like HTTP/3) may send a body without Content-Length; once the WAF had read it
    the proxy took the ended stream for a body-less request and dropped it."""
    origin, _ = quic_origin(start_origin, app, site, tmp_path)
    out = curl(
        origin.port,
        "example.test",
        site["ca"],
        "--http2",
        "--data-binary",
        "a=1&b=2",
        "-H",
        "Content-Length:",
        "-H",
        "Content-Type: application/x-www-form-urlencoded",
        source="127.0.0.7",
        path="/echo",
    )
    assert json.loads(out.stdout)["body"] == "a=1&b=2", out.stderr
    line = origin.wait_for(lambda r: r.get("event") == "request", 5)
    assert line is not None and line["http"] == "2"


def test_origin_never_answers_small_unknown_version_datagrams(
    start_origin: Any, app: Any, site: dict[str, Path], tmp_path: Path
) -> None:
    """RFC 9000 §5.2.2: Version Negotiation only for datagrams of at least 1200 bytes (aioquic's
    server answers any size, so a spoofed 60-byte datagram drew a larger answer)."""
    import socket

    origin, qport = quic_origin(start_origin, app, site, tmp_path)
    head = b"\xc0\x1a\x2a\x3a\x4a\x08" + b"D" * 8 + b"\x08" + b"S" * 8
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.8", 0))
        sock.settimeout(1.0)
        sock.sendto(head + b"\x00" * 30, ("127.0.0.1", qport))
        with pytest.raises(TimeoutError):
            sock.recvfrom(2048)
        sock.sendto(head + b"\x00" * (1200 - len(head)), ("127.0.0.1", qport))
        answer, _ = sock.recvfrom(2048)
    assert answer[1:5] == b"\x00\x00\x00\x00" and len(answer) < 1200  # Version Negotiation
    assert origin.metric("blindfold_origin_quic_datagrams_total", result="unsupported_version") == 1
