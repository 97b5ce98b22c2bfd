"""The whole chain on loopback: curl -> edge (passthrough) -> origin agent -> application.

The origin ends TLS with the site's key, runs ModSecurity + CRS, proxies to the application
and turns WAF blocks into bans that the edge enforces at layer 4."""

from __future__ import annotations

import hashlib
import json
import socket
import ssl
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from blindfold.core.proxyproto import encode_v2
from tests.conftest import need
from tests.helpers.clients import curl, http_get, tls_connect, wait_until
from tests.helpers.edgeproc import EdgeProcess, OriginProcess, edge_config, route
from tests.helpers.topology import edge_decisions, origin_config

SQLI = "/?id=1%27%20OR%201=1--"
CONTENT_TYPES = (
    "application/x-www-form-urlencoded multipart/form-data application/json "
    "application/octet-stream"
)


def chain(
    start_edge: Callable[..., EdgeProcess],
    start_origin: Callable[..., OriginProcess],
    app: Any,
    site: dict[str, Path],
    tmp_path: Path,
    *,
    origin_kw: dict[str, Any] | None = None,
    edge_kw: dict[str, Any] | None = None,
) -> tuple[EdgeProcess, OriginProcess]:
    origin = start_origin(origin_config(site, app.port, tmp_path, **(origin_kw or {})))
    text = edge_config(
        route(["example.test"], [f"127.0.0.1:{origin.port}"], proxy_protocol="v2"),
        per_ip_rate_per_s=0,
        **(edge_kw or {}),
    )
    edge = start_edge(text + edge_decisions(site, origin.decisions_port, tmp_path))
    assert edge.wait_for(lambda r: r.get("event") == "decisions_source_up", 10)
    return edge, origin


def fetch(
    edge: EdgeProcess, site: dict[str, Path], path: str, source: str, *extra: str
) -> tuple[int, str]:
    out = curl(
        edge.port,
        "example.test",
        site["ca"],
        "-w",
        "\n%{http_code}",
        *extra,
        source=source,
        path=path,
        timeout=60,
    )
    body, _, code = out.stdout.rpartition("\n")
    return int(code or 0), body


def test_sql_injection_is_blocked_and_the_ban_reaches_the_edge(
    start_edge: Any, start_origin: Any, app: Any, site: dict[str, Path], tmp_path: Path
) -> None:
    edge, origin = chain(start_edge, start_origin, app, site, tmp_path)
    code, body = fetch(edge, site, "/echo", "127.0.0.5")
    assert code == 200
    seen = json.loads(body)
    assert seen["x-forwarded-for"] == "127.0.0.5"  # the application sees the visitor
    assert "for=127.0.0.5;proto=https" in seen["forwarded"]
    # a keep-alive connection opened before the attack
    held = tls_connect(edge.port, "example.test", site["ca"], source="127.0.0.5")
    assert http_get(held, "/echo", keep_alive=True).startswith(b"HTTP/1.1 200")

    code, body = fetch(edge, site, SQLI, "127.0.0.5")
    assert code == 403 and "request id:" in body
    t0 = time.monotonic()
    assert wait_until(lambda: fetch(edge, site, "/echo", "127.0.0.5")[0] == 0, 5, 0.05)
    assert time.monotonic() - t0 < 2.0  # refused at layer 4 within 2 s
    held.settimeout(5)
    try:
        assert held.recv(100) == b""  # the open connection was closed too
    except (ConnectionResetError, ssl.SSLError):
        pass
    assert fetch(edge, site, "/echo", "127.0.0.6")[0] == 200  # others still get through
    assert fetch(edge, site, "/echo", "127.0.0.5")[0] == 0
    assert edge.metric("blindfold_connections_refused_total", reason="banned") >= 1
    assert edge.metric("blindfold_connections_closed_by_ban_total") >= 1
    refused = edge.wait_conn(client="127.0.0.5", outcome="refused", reason="banned")
    assert refused is not None and refused["bytes_in"] == 0  # nothing reached the origin
    audit = origin.wait_for(lambda r: r.get("event") == "waf", 5)
    assert audit is not None and audit["client"] == "127.0.0.5"
    assert 942100 in audit["rule_ids"] and 949110 in audit["rule_ids"]
    assert origin.metric("blindfold_decisions_active") == 1


def test_ban_expires(
    start_edge: Any, start_origin: Any, app: Any, site: dict[str, Path], tmp_path: Path
) -> None:
    edge, _origin = chain(
        start_edge,
        start_origin,
        app,
        site,
        tmp_path,
        origin_kw={"decisions": {"ban_duration_s": 3}},
    )
    assert fetch(edge, site, SQLI, "127.0.0.30")[0] == 403
    assert wait_until(lambda: fetch(edge, site, "/echo", "127.0.0.30")[0] == 0, 3)
    assert wait_until(lambda: fetch(edge, site, "/echo", "127.0.0.30")[0] == 200, 8)  # lifted
    assert edge.metric("blindfold_decisions_active") == 0


def test_source_outage_keeps_enforcing(
    start_edge: Any, start_origin: Any, app: Any, site: dict[str, Path], tmp_path: Path
) -> None:
    edge, origin = chain(start_edge, start_origin, app, site, tmp_path)
    assert fetch(edge, site, SQLI, "127.0.0.31")[0] == 403
    assert wait_until(lambda: fetch(edge, site, "/echo", "127.0.0.31")[0] == 0, 3)
    origin.stop()  # the decision source goes away
    assert edge.wait_for(lambda r: r.get("event") == "decisions_source_down", 5)
    assert edge.metric("blindfold_decisions_source_up", source="stream") == 0
    assert fetch(edge, site, "/echo", "127.0.0.31")[0] == 0  # still enforced
    assert edge.metric("blindfold_decisions_active") == 1


def test_proxy_header_trust(
    start_origin: Any, app: Any, site: dict[str, Path], tmp_path: Path
) -> None:
    origin = start_origin(origin_config(site, app.port, tmp_path, trusted_edges=["127.0.0.1/32"]))
    ctx = ssl.create_default_context(cafile=str(site["ca"]))

    def attempt(source: str, header: bytes | None) -> bytes:
        raw = socket.create_connection(
            ("127.0.0.1", origin.port), timeout=5, source_address=(source, 0)
        )
        try:
            if header is not None:
                raw.sendall(header)
            with ctx.wrap_socket(raw, server_hostname="example.test") as tls:
                tls.sendall(
                    b"GET /echo HTTP/1.1\r\nHost: example.test\r\nConnection: close\r\n\r\n"
                )
                data = b""
                while chunk := tls.recv(65536):
                    data += chunk
                return data
        except (ssl.SSLError, OSError):
            return b""

    visitor = encode_v2(("203.0.113.9", 4444), ("127.0.0.1", 443))
    ok = attempt("127.0.0.1", visitor)
    assert b'"x-forwarded-for": "203.0.113.9"' in ok  # the application sees the visitor
    assert attempt("127.0.0.9", visitor) == b""  # a header from an untrusted address
    assert attempt("127.0.0.1", None) == b""  # required, and missing
    assert attempt("127.0.0.9", None) == b""  # not an edge at all
    assert origin.metric("blindfold_origin_connections_total", result="refused_untrusted_peer") == 2
    assert (
        origin.metric("blindfold_origin_connections_total", result="refused_bad_proxy_header") == 1
    )
    assert [s["x-forwarded-for"] for s in app.seen] == ["203.0.113.9"]


def test_http2_through_the_edge(
    start_edge: Any, start_origin: Any, app: Any, site: dict[str, Path], tmp_path: Path
) -> None:
    edge, _origin = chain(start_edge, start_origin, app, site, tmp_path)
    out = curl(
        edge.port,
        "example.test",
        site["ca"],
        "--http2",
        "-w",
        " %{http_version}",
        "--url",
        f"https://example.test:{edge.port}/echo?2",
        source="127.0.0.40",
        path="/echo",
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.count('"x-forwarded-for": "127.0.0.40"') == 2
    assert out.stdout.count(" 2") >= 2

    import h2.config
    import h2.connection
    import h2.events

    tls = tls_connect(edge.port, "example.test", site["ca"], source="127.0.0.41", alpn=["h2"])
    assert tls.selected_alpn_protocol() == "h2"
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    for sid in range(1, 12, 2):
        conn.send_headers(
            sid,
            [
                (":method", "GET"),
                (":path", f"/echo?s={sid}"),
                (":scheme", "https"),
                (":authority", "example.test"),
            ],
            end_stream=True,
        )
    tls.sendall(conn.data_to_send())
    bodies: dict[int, bytes] = {}
    ended: set[int] = set()
    deadline = time.monotonic() + 10
    while len(ended) < 6 and time.monotonic() < deadline:
        for e in conn.receive_data(tls.recv(65536)):
            if isinstance(e, h2.events.DataReceived):
                bodies[e.stream_id] = bodies.get(e.stream_id, b"") + e.data
                conn.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
            elif isinstance(e, h2.events.StreamEnded):
                ended.add(e.stream_id)
        tls.sendall(conn.data_to_send())
    tls.close()
    assert ended == set(range(1, 12, 2))
    assert all(f"/echo?s={sid}".encode() in bodies[sid] for sid in ended)


def test_large_upload_and_download_stream(
    start_edge: Any, start_origin: Any, app: Any, site: dict[str, Path], tmp_path: Path
) -> None:
    edge, origin = chain(
        start_edge,
        start_origin,
        app,
        site,
        tmp_path,
        origin_kw={
            "waf": {"body_limit_bytes": 131072, "allowed_content_types": CONTENT_TYPES},
            "http": {"max_body_bytes": 200 << 20},
        },
    )
    blob = tmp_path / "upload.bin"
    size = 150 << 20
    h = hashlib.sha256()
    with blob.open("wb") as fh:
        chunk = hashlib.sha256(b"seed").digest() * 32768  # 1 MiB
        for _ in range(size >> 20):
            fh.write(chunk)
            h.update(chunk)
    rss0 = _rss(origin.proc.pid)
    code, body = fetch(
        edge,
        site,
        "/upload",
        "127.0.0.50",
        "--data-binary",
        f"@{blob}",
        "-H",
        "Content-Type: application/octet-stream",
    )
    assert code == 200, (body, origin.records("waf"))
    assert json.loads(body) == {"bytes": size, "sha256": h.hexdigest()}
    out = curl(
        edge.port,
        "example.test",
        site["ca"],
        "-o",
        str(tmp_path / "down.bin"),
        "-w",
        "%{size_download}",
        source="127.0.0.50",
        path=f"/bytes?n={size}",
        timeout=60,
    )
    assert out.stdout == str(size)
    assert _rss(origin.proc.pid) - rss0 < 40 << 20  # streamed, not buffered


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


@pytest.mark.parametrize("mode", ["block", "detect"])
def test_waf_modes_and_form_bodies(
    start_origin: Any, app: Any, site: dict[str, Path], tmp_path: Path, mode: str
) -> None:
    origin = start_origin(
        origin_config(
            site,
            app.port,
            tmp_path,
            proxy_protocol="optional",
            waf={"mode": mode},
            decisions={"ban_after_blocks": 100},
        )
    )
    args = [
        "--resolve",
        f"example.test:{origin.port}:127.0.0.1",
        "--cacert",
        str(site["ca"]),
        "-sS",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
    ]
    import subprocess

    def code(*extra: str) -> str:
        return subprocess.run(
            ["curl", *args, *extra], capture_output=True, text=True, timeout=20
        ).stdout

    url = f"https://example.test:{origin.port}"
    attack_form = [
        "-d",
        "user=admin&comment=<script>alert(document.cookie)</script>",
        f"{url}/echo",
    ]
    assert code(f"{url}/echo") == "200"
    assert code(*attack_form) == ("403" if mode == "block" else "200")
    assert code(f"{url}{SQLI}") == ("403" if mode == "block" else "200")
    audit = [r for r in origin.records("waf")]
    assert wait_until(lambda: len(origin.records("waf")) == 2, 5), audit
    assert {r["result"] for r in origin.records("waf")} == (
        {"blocked"} if mode == "block" else {"matched"}
    )


def test_rate_rule_bans_at_the_edge(
    start_edge: Any, start_origin: Any, app: Any, site: dict[str, Path], tmp_path: Path
) -> None:
    rule = {
        "rate_rules": [
            {
                "path_prefix": "/signin",
                "rate_per_s": 0.5,
                "burst": 3,
                "ban_duration_s": 60,
                "name": "login",
            }
        ]
    }
    edge, origin = chain(
        start_edge, start_origin, app, site, tmp_path, origin_kw={"decisions": rule}
    )
    codes = [fetch(edge, site, "/signin", "127.0.0.70")[0] for _ in range(4)]
    assert codes[:3] == [200, 200, 200]  # the burst; the 4th crossed the rule
    assert wait_until(lambda: fetch(edge, site, "/echo", "127.0.0.70")[0] == 0, 3)
    assert fetch(edge, site, "/signin", "127.0.0.71")[0] == 200
    decision = origin.wait_for(lambda r: r.get("event") == "decision", 5)
    assert decision is not None and decision["reason"] == "rate: login"


def test_http2_abuse_does_not_touch_other_visitors(
    start_origin: Any, app: Any, site: dict[str, Path], tmp_path: Path
) -> None:
    import threading

    import h2.config
    import h2.connection
    import h2.events

    origin = start_origin(
        origin_config(
            site,
            app.port,
            tmp_path,
            proxy_protocol="optional",
            http={"h2_max_resets_per_window": 50},
        )
    )
    stop = threading.Event()
    served: list[bool] = []

    def legit() -> None:
        while not stop.is_set():
            with tls_connect(origin.port, "example.test", site["ca"], source="127.0.0.81") as t:
                served.append(http_get(t, "/echo", "example.test").startswith(b"HTTP/1.1 200"))

    worker = threading.Thread(target=legit)
    worker.start()
    goaways = 0
    try:
        for _attack in range(5):
            tls = tls_connect(
                origin.port, "example.test", site["ca"], source="127.0.0.80", alpn=["h2"]
            )
            conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
            conn.initiate_connection()
            for sid in range(1, 2 * 200, 2):  # rapid reset: open, cancel, repeat
                conn.send_headers(
                    sid,
                    [
                        (":method", "GET"),
                        (":path", "/echo"),
                        (":scheme", "https"),
                        (":authority", "example.test"),
                    ],
                )
                conn.reset_stream(sid)
            try:
                tls.sendall(conn.data_to_send())
                tls.settimeout(5)
                while data := tls.recv(65536):
                    for e in conn.receive_data(data):
                        if isinstance(e, h2.events.ConnectionTerminated):
                            goaways += int(e.error_code == 0xB)
            except (OSError, ssl.SSLError, h2.exceptions.ProtocolError):
                pass
            tls.close()
    finally:
        stop.set()
        worker.join(30)
    assert goaways == 5  # each abusive connection told ENHANCE_YOUR_CALM and closed
    assert served and all(served)  # the other visitor never failed meanwhile
    assert origin.metric("blindfold_http_events_total", event="h2_abuse") == 5


def test_http10_without_host_reaches_the_application_named(
    start_origin: Any, app: Any, site: dict[str, Path], tmp_path: Path
) -> None:
    origin = start_origin(origin_config(site, app.port, tmp_path, proxy_protocol="optional"))
    with tls_connect(origin.port, "example.test", site["ca"]) as tls:
        tls.sendall(b"GET /echo HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 200")
    seen = json.loads(data.partition(b"\r\n\r\n")[2])
    assert seen["host"] == "example.test"  # named by the TLS server name, never empty


def test_a_failed_handshake_gets_openssls_alert(
    start_origin: Any, app: Any, site: dict[str, Path], tmp_path: Path
) -> None:
    """No shared TLS 1.3 cipher suite (OpenSSL does not enable CCM for servers): the client
    must get the handshake_failure alert, not a reset (asyncio alone drops it)."""
    origin = start_origin(origin_config(site, app.port, tmp_path, proxy_protocol="optional"))
    out = subprocess.run(
        [
            need("openssl"),
            "s_client",
            "-connect",
            f"127.0.0.1:{origin.port}",
            "-servername",
            "example.test",
            "-tls1_3",
            "-ciphersuites",
            "TLS_AES_128_CCM_SHA256",
        ],
        input="",
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert "alert handshake failure" in out.stderr, out.stderr[-2000:]
    # and the agent goes on serving
    ok = subprocess.run(
        [
            need("curl"),
            "-sS",
            "--cacert",
            str(site["ca"]),
            "--resolve",
            f"example.test:{origin.port}:127.0.0.1",
            f"https://example.test:{origin.port}/hello",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert ok.returncode == 0, ok.stderr


def poll_stream(port: int, site: dict[str, Path], key: str, startup: bool) -> dict[str, Any]:
    """Poll the origin's decision stream as a CrowdSec bouncer would (no position token),
    verifying the stream's own certificate (decisions.internal)."""
    from tests.conftest import DECISIONS_NAME, need

    url = f"https://{DECISIONS_NAME}:{port}/v1/decisions/stream?startup={str(startup).lower()}"
    got = subprocess.run(
        [
            need("curl"),
            "-sS",
            "--fail",
            "--max-time",
            "10",
            "--cacert",
            str(site["ca"]),
            "--resolve",
            f"{DECISIONS_NAME}:{port}:127.0.0.1",
            "-H",
            f"X-Api-Key: {key}",
            "-A",
            "blindfold-edge",
            url,
        ],
        capture_output=True,
        timeout=20,
    )
    assert got.returncode == 0, got.stderr
    data: dict[str, Any] = json.loads(got.stdout)
    return data


def test_pollers_sharing_a_key_do_not_steal_each_others_bans(
    start_edge: Any, start_origin: Any, app: Any, site: dict[str, Path], tmp_path: Path
) -> None:
    """A second poller with the edge's API key (another edge, an operator's script) used to
    receive a new ban in the edge's place: one stream position per key."""
    from tests.helpers.topology import API_KEY

    edge, origin = chain(start_edge, start_origin, app, site, tmp_path)
    poll_stream(origin.decisions_port, site, API_KEY, startup=True)
    assert fetch(edge, site, SQLI, "127.0.0.33")[0] == 403
    other = poll_stream(origin.decisions_port, site, API_KEY, startup=False)
    assert [d["value"] for d in other["new"] or []] == ["127.0.0.33"]
    assert wait_until(lambda: fetch(edge, site, "/echo", "127.0.0.33")[0] == 0, 5, 0.1)
    assert fetch(edge, site, "/echo", "127.0.0.34")[0] == 200


def test_ipv6_visitors_are_banned_by_the_limit_prefix(
    start_origin: Any, app: Any, site: dict[str, Path], tmp_path: Path
) -> None:
    """An attacker rotating through the addresses of its /64 is counted and banned as one."""
    from tests.helpers.topology import API_KEY

    origin = start_origin(
        origin_config(site, app.port, tmp_path, decisions={"ban_after_blocks": 3})
    )
    ctx = ssl.create_default_context(cafile=str(site["ca"]))

    def attack(visitor: str) -> bytes:
        with socket.create_connection(("127.0.0.1", origin.port), timeout=5) as raw:
            raw.sendall(encode_v2((visitor, 4444), ("::1", 443)))
            with ctx.wrap_socket(raw, server_hostname="example.test") as tls:
                head = f"GET {SQLI} HTTP/1.1\r\nHost: example.test\r\nConnection: close\r\n\r\n"
                tls.sendall(head.encode())
                data = b""
                while chunk := tls.recv(65536):
                    data += chunk
                return data

    for n in (1, 2, 3):  # one block per address, three addresses of one /64
        assert attack(f"2001:db8:1:2::{n:x}").startswith(b"HTTP/1.1 403")
    stream = poll_stream(origin.decisions_port, site, API_KEY, startup=True)
    bans = [(d["scope"], d["value"]) for d in stream["new"] or []]
    assert bans == [("Range", "2001:db8:1:2::/64")]
