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
from tests.helpers.h3client import H3Client, H3Response, h3_get
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
    origin_kw: dict[str, Any] | None = None,
    extra_toml: str = "",
    **quic: Any,
) -> tuple[OriginProcess, int]:
    keyfile = tmp_path / "quic-edge.key"
    keyfile.write_text(EDGE_KEY.hex() + "\n")
    text = origin_config(
        site,
        app.port,
        tmp_path,
        proxy_protocol=proxy_protocol,
        trusted_edges=[trusted],
        **(origin_kw or {}),
    )
    settings = {"listen": ["127.0.0.1:0"], "edge_keys": [str(keyfile)], **quic}
    text += "\n[origin.quic]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in settings.items())
    text += "\n" + extra_toml
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
    start_origin: Any, app: Any, site: dict[str, Path], tmp_path: Path, ca: Any
) -> None:
    """The ClientHello is read before the connection is made (the Chromium hello spans two
    Initials): the certificate follows the SNI like over TCP, in v1 and v2."""
    from aioquic.quic.packet import QuicProtocolVersion

    from blindfold import pki

    other = pki.issue(ca, ["elsewhere.test"])  # a name the site's certificate does not have
    cert, key = tmp_path / "other.pem", tmp_path / "other.key"
    other.write(cert, key)
    extra = f'[[origin.certificates]]\ncert = "{cert}"\nkey = "{key}"\n'
    _origin, qport = quic_origin(start_origin, app, site, tmp_path, extra_toml=extra)

    def der(cert: x509.Certificate) -> bytes:
        return cert.public_bytes(serialization.Encoding.DER)

    async def seen(name: str, version: int) -> bytes:
        async with H3Client(
            qport, ca=site["ca"], source="127.0.0.6", server_name=name, version=version
        ) as client:
            assert (await client.get("/echo")).status == 200
            return der(client.peer_certificate)

    v1, v2 = QuicProtocolVersion.VERSION_1, QuicProtocolVersion.VERSION_2
    site_der = der(x509.load_pem_x509_certificate(site["cert"].read_bytes()))
    assert asyncio.run(seen("elsewhere.test", v2)) == der(other.cert)
    assert asyncio.run(seen("elsewhere.test", v1)) == der(other.cert)
    assert asyncio.run(seen("example.test", v2)) == site_der


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


# ----------------------------------------------------------------------------- hostile clients


def _terminated(client: Any) -> Any:
    """The ConnectionTerminated event, once the origin has closed the connection."""
    from aioquic.quic import events as qe

    proto = client.protocol
    assert proto is not None
    return next((e for e in proto.terminated if isinstance(e, qe.ConnectionTerminated)), None)


def test_a_stalled_request_body_times_out(
    start_origin: Any, app: Any, site: dict[str, Path], tmp_path: Path
) -> None:
    """A client that sends part of a body and stops, while keeping the connection alive,
    gets 408 after body_timeout_s (as over HTTP/1.1 and HTTP/2)."""
    text_kw = {"http": {"body_timeout_s": 1.0}}
    origin, qport = quic_origin(start_origin, app, site, tmp_path, origin_kw=text_kw)

    async def run() -> H3Response:
        async with H3Client(qport, ca=site["ca"], source="127.0.0.9", timeout=8) as client:
            proto = client.protocol
            assert proto is not None
            sid = proto._quic.get_next_available_stream_id()
            proto.h3.send_headers(
                sid,
                [
                    (b":method", b"POST"),
                    (b":scheme", b"https"),
                    (b":authority", b"example.test"),
                    (b":path", b"/echo"),
                    (b"content-length", b"100"),
                ],
            )
            proto.h3.send_data(sid, b"abc", end_stream=False)
            proto.responses[sid] = H3Response()
            waiter = proto.waiters[sid] = asyncio.get_running_loop().create_future()
            proto.transmit()
            return await asyncio.wait_for(waiter, 8)

    assert asyncio.run(run()).status == 408
    line = origin.wait_for(lambda r: r.get("event") == "request", 5)
    assert line is not None and line["status"] == 408


def test_an_endless_headers_frame_is_refused(
    start_origin: Any, app: Any, site: dict[str, Path], tmp_path: Path
) -> None:
    """aioquic buffers a HEADERS frame until it is complete and opens windows as data comes:
    a frame announcing gigabytes would grow the origin's memory without end."""
    origin, qport = quic_origin(start_origin, app, site, tmp_path)

    async def run() -> tuple[int, int]:
        async with H3Client(qport, ca=site["ca"], source="127.0.0.10", timeout=8) as client:
            proto = client.protocol
            assert proto is not None
            sid = proto._quic.get_next_available_stream_id()
            # HEADERS (type 0x01), length 2^30 - 1 as a 4-byte varint, then filler
            length = 0x80000000 | ((1 << 30) - 1)
            proto._quic.send_stream_data(sid, b"\x01" + length.to_bytes(4, "big"))
            sent = 0
            for _ in range(200):
                if _terminated(client) is not None or proto.stopped:
                    break
                proto._quic.send_stream_data(sid, b"\x00" * 16384)
                sent += 16384
                proto.transmit()
                await asyncio.sleep(0.005)
            # what the origin accepted: the stream's bytes it acknowledged
            acked = proto._quic._streams[sid].sender._buffer_start
            return acked, len(proto.stopped) + len(proto.terminated)

    acked, refused = asyncio.run(run())
    assert refused, f"the origin kept taking the frame ({acked} bytes)"
    assert acked < 1_000_000  # refused well before the window could run away
    assert origin.metric("blindfold_http_events_total", event="h3_abuse") >= 1


def test_rapid_reset_closes_the_connection(
    start_origin: Any, app: Any, site: dict[str, Path], tmp_path: Path
) -> None:
    """CVE-2023-44487 over HTTP/3: requests opened and reset at once, many times."""
    origin, qport = quic_origin(
        start_origin, app, site, tmp_path, origin_kw={"http": {"h2_max_resets_per_window": 20}}
    )

    async def run() -> Any:
        async with H3Client(qport, ca=site["ca"], source="127.0.0.11", timeout=8) as client:
            proto = client.protocol
            assert proto is not None
            for _ in range(60):
                if _terminated(client) is not None:
                    break
                sid = proto._quic.get_next_available_stream_id()
                proto.h3.send_headers(
                    sid,
                    [
                        (b":method", b"GET"),
                        (b":scheme", b"https"),
                        (b":authority", b"example.test"),
                        (b":path", b"/echo"),
                    ],
                )
                proto._quic.reset_stream(sid, 0x10C)  # H3_REQUEST_CANCELLED
                proto.transmit()
                await asyncio.sleep(0.01)
            for _ in range(100):
                if _terminated(client) is not None:
                    break
                await asyncio.sleep(0.02)
            return _terminated(client)

    closed = asyncio.run(run())
    assert closed is not None and closed.error_code == 0x107  # H3_EXCESSIVE_LOAD
    assert origin.metric("blindfold_http_events_total", event="h3_abuse") >= 1


class SlowApp:
    """An application that starts reading a request body only after 2 s (longer than the
    kernel's socket buffers take to fill) and answers with the byte count and digest: the
    origin must hold the client back meanwhile, not buffer the body."""

    def __init__(self) -> None:
        import socket
        import threading

        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        import hashlib
        import time

        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                head = b""
                while b"\r\n\r\n" not in head:
                    head += conn.recv(4096)
                head, _, rest = head.partition(b"\r\n\r\n")
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                h = hashlib.sha256(rest)
                got = len(rest)
                time.sleep(2.0)
                while got < length:
                    piece = conn.recv(min(262144, length - got))
                    if not piece:
                        break
                    h.update(piece)
                    got += len(piece)
                out = json.dumps({"bytes": got, "sha256": h.hexdigest()}).encode()
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                    + f"content-length: {len(out)}\r\nconnection: close\r\n\r\n".encode()
                    + out
                )

    def close(self) -> None:
        self.sock.close()


def test_a_large_upload_to_a_slow_application_is_held_back(
    start_origin: Any, site: dict[str, Path], tmp_path: Path
) -> None:
    """Past the WAF's inspection limit the body streams to the application at its pace: the
    origin gives the client more credit only as the handler reads (aioquic alone would open
    its windows as fast as the client sends), and nothing stalls or is lost."""
    import hashlib

    slow = SlowApp()
    waf = {"body_limit_bytes": 65536, "allowed_content_types": "application/octet-stream"}
    origin, qport = quic_origin(start_origin, slow, site, tmp_path, origin_kw={"waf": waf})
    body = os.urandom(12_000_000)

    async def run() -> H3Response:
        async with H3Client(qport, ca=site["ca"], source="127.0.0.12", timeout=40) as client:
            return await client.request(
                "POST",
                "/upload",
                body,
                [("content-type", "application/octet-stream"), ("content-length", str(len(body)))],
            )

    try:
        r = asyncio.run(run())
    finally:
        slow.close()
    assert r.status == 200, r
    assert json.loads(r.body) == {"bytes": len(body), "sha256": hashlib.sha256(body).hexdigest()}
    assert origin.metric("blindfold_origin_quic_datagrams_total", result="window_held") >= 1
