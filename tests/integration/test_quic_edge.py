"""The edge's QUIC pass-through (`[[edge.routes]] quic = true`) as a real process in front of
the origin agent's HTTP/3: aioquic's client completes HTTP/3 through it with the origin's
certificate, the origin learns the visitor from the edge's announcements, the same routing,
lists, bans and JA4 rules as for TCP apply before any datagram reaches the origin, a ban
earned over HTTP/3 refuses the visitor on TCP and UDP and ends its open flow, and whatever the
edge cannot read is dropped and counted, never forwarded or amplified."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.conftest import need
from tests.helpers.clients import curl, wait_until
from tests.helpers.edgeproc import EdgeProcess, OriginProcess, edge_config, route
from tests.helpers.h3client import H3Client, h3_get
from tests.helpers.topology import edge_decisions
from tests.integration.test_blindness import _traced_by, recorded_bytes
from tests.integration.test_h3_origin import SQLI, quic_origin
from tests.integration.test_keyless_browser import spki_pin


def quic_chain(
    start_edge: Any,
    start_origin: Any,
    app: Any,
    site: dict[str, Path],
    tmp_path: Path,
    *,
    edge_kw: dict[str, Any] | None = None,
    quic_kw: dict[str, Any] | None = None,
    decisions: bool = True,
) -> tuple[EdgeProcess, OriginProcess, int]:
    """origin agent (TCP + QUIC, PROXY/announcements required) <- edge (one passthrough route
    with quic = true). Returns the edge, the origin and the edge's UDP port."""
    origin, qport = quic_origin(start_origin, app, site, tmp_path, proxy_protocol="required")
    settings = {"announce_key_file": str(tmp_path / "quic-edge.key"), "idle_timeout_s": 2.0}
    settings.update(quic_kw or {})
    text = edge_config(
        route(
            ["example.test"],
            [f"127.0.0.1:{origin.port}"],
            proxy_protocol="v2",
            quic=True,
            quic_origins=[f"127.0.0.1:{qport}"],
        ),
        per_ip_rate_per_s=0,
        **(edge_kw or {}),
    )
    text += "[edge.quic]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in settings.items())
    if decisions:
        text += "\n" + edge_decisions(site, origin.decisions_port, tmp_path)
    edge = start_edge(text)
    if decisions:
        assert edge.wait_for(lambda r: r.get("event") == "decisions_source_up", 10)
    udp = edge.ready["quic_listen"]
    assert isinstance(udp, list) and len(udp) == 1
    uport = int(udp[0].rpartition(":")[2])
    assert uport == edge.port  # the route's port, on UDP
    return edge, origin, uport


def test_h3_through_the_edge_with_the_origins_certificate(
    start_edge: Any, start_origin: Any, app: Any, site: dict[str, Path], tmp_path: Path
) -> None:
    edge, origin, uport = quic_chain(start_edge, start_origin, app, site, tmp_path)

    async def run() -> tuple[int, dict[str, Any], x509.Certificate]:
        async with H3Client(uport, ca=site["ca"], source="127.0.0.40") as c:
            r = await c.get("/echo")
            return r.status, json.loads(r.body), c.peer_certificate

    status, seen, cert = asyncio.run(run())
    assert status == 200
    assert seen["x-forwarded-for"] == "127.0.0.40"  # the visitor, announced by the edge
    site_cert = x509.load_pem_x509_certificate(site["cert"].read_bytes())
    assert cert == site_cert  # the origin's: the edge holds no key
    line = origin.wait_for(lambda r: r.get("event") == "request" and r.get("path") == "/echo", 5)
    assert line is not None and line["http"] == "3"
    assert edge.metric("blindfold_quic_flows_total", result="accepted") == 1
    assert edge.metric("blindfold_quic_bytes_total", route="route0", direction="to_origin") > 1200
    assert edge.metric("blindfold_quic_bytes_total", route="route0", direction="to_client") > 1000
    # one JSON line per flow, when it ends (idle_timeout_s = 2)
    flow = edge.wait_for(lambda r: r.get("event") == "quic_flow", 10)
    assert flow is not None, edge.lines[-20:]
    assert flow["client"] == "127.0.0.40" and flow["sni"] == "example.test"
    assert flow["alpn"] == ["h3"] and flow["ja4"].startswith("q13")
    assert flow["route"] == "route0" and flow["outcome"] == "closed"
    assert flow["bytes_in"] > 1200 and flow["bytes_out"] > 1000
    assert edge.metric("blindfold_ja4_connections_total", ja4=flow["ja4"]) == 1  # as for TCP
    assert wait_until(lambda: edge.metric("blindfold_quic_flows_active") == 0, 5)


def test_sql_injection_over_h3_bans_the_visitor_on_tcp_and_udp(
    start_edge: Any, start_origin: Any, app: Any, site: dict[str, Path], tmp_path: Path
) -> None:
    edge, origin, uport = quic_chain(
        start_edge, start_origin, app, site, tmp_path, quic_kw={"idle_timeout_s": 30.0}
    )
    visitor = "127.0.0.41"
    assert curl(edge.port, "example.test", site["ca"], source=visitor).returncode == 0

    async def attack() -> tuple[int, int, str]:
        async with H3Client(uport, ca=site["ca"], source=visitor, timeout=3) as c:
            assert (await c.get("/echo")).status == 200
            blocked = (await c.get(SQLI)).status
            # the ban reaches the edge, which ends this open flow (close_grace_s)
            ended = await asyncio.to_thread(
                edge.wait_for, lambda r: r.get("event") == "banned_flows_closed", 10
            )
            assert ended is not None
            try:
                after = (await c.get("/echo")).status
            except TimeoutError:
                after = 0
            return blocked, after, visitor

    blocked, after, _ = asyncio.run(attack())
    assert blocked == 403
    assert after == 0  # nothing came back on the ended flow
    decision = origin.wait_for(lambda r: r.get("event") == "decision", 5)
    assert decision is not None and decision["value"] == visitor
    # refused at the edge: a new QUIC flow and a TCP connection
    with pytest.raises((TimeoutError, ConnectionError)):
        h3_get(uport, "/echo", ca=site["ca"], source=visitor, timeout=2)
    assert curl(edge.port, "example.test", site["ca"], source=visitor).returncode != 0
    assert edge.metric("blindfold_quic_datagrams_dropped_total", reason="banned") >= 1
    assert edge.metric("blindfold_connections_refused_total", reason="banned") >= 1
    flow = edge.wait_for(lambda r: r.get("event") == "quic_flow" and r["reason"] == "banned", 5)
    assert flow is not None and flow["client"] == visitor
    # another visitor still gets through
    assert h3_get(uport, "/echo", ca=site["ca"], source="127.0.0.42").status == 200


def test_lists_and_ja4_rules_refuse_flows_before_the_origin(
    start_edge: Any, start_origin: Any, app: Any, site: dict[str, Path], tmp_path: Path
) -> None:
    edge, origin, uport = quic_chain(
        start_edge,
        start_origin,
        app,
        site,
        tmp_path,
        decisions=False,
        edge_kw={"block": ["127.0.0.43/32"]},
    )
    with pytest.raises((TimeoutError, ConnectionError)):
        h3_get(uport, "/echo", ca=site["ca"], source="127.0.0.43", timeout=2)
    assert edge.metric("blindfold_quic_datagrams_dropped_total", reason="blocklist") >= 1
    with pytest.raises((TimeoutError, ConnectionError)):
        h3_get(uport, "/", ca=site["ca"], source="127.0.0.44", server_name="other.test", timeout=2)
    assert edge.metric("blindfold_quic_flows_total", result="rejected:unknown_sni") == 1
    refused = edge.wait_for(
        lambda r: r.get("event") == "quic_flow" and r.get("reason") == "unknown_sni", 5
    )
    assert refused is not None and refused["sni"] == "other.test"
    assert refused["outcome"] == "refused"
    assert origin.metric("blindfold_origin_quic_datagrams_total", result="ok") == 0


def test_ja4_rule_blocks_quic_clients(
    start_edge: Any, start_origin: Any, app: Any, site: dict[str, Path], tmp_path: Path
) -> None:
    rule = '\n[[edge.ja4_rules]]\naction = "block"\nprefix = "q13"\nname = "no_quic"\n'
    edge, origin, uport = quic_chain(
        start_edge,
        start_origin,
        app,
        site,
        tmp_path,
        decisions=False,
        edge_kw={},
    )
    edge.stop()
    text = edge.config_path.read_text()
    at = text.index("[edge.quic]")
    edge = start_edge(text[:at] + rule + text[at:])
    uport = int(edge.ready["quic_listen"][0].rpartition(":")[2])
    with pytest.raises((TimeoutError, ConnectionError)):
        h3_get(uport, "/echo", ca=site["ca"], source="127.0.0.45", timeout=2)
    assert edge.metric("blindfold_quic_flows_total", result="rejected:ja4_block") == 1
    assert edge.metric("blindfold_ja4_rule_matches_total", rule="no_quic", result="ja4_block") == 1
    assert origin.metric("blindfold_origin_quic_datagrams_total", result="ok") == 0


def test_what_the_edge_cannot_read_is_dropped_never_forwarded_or_amplified(
    start_edge: Any, start_origin: Any, app: Any, site: dict[str, Path], tmp_path: Path
) -> None:
    edge, origin, uport = quic_chain(start_edge, start_origin, app, site, tmp_path, decisions=False)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.46", 0))
    sock.settimeout(2)
    try:
        sock.sendto(b"GET / HTTP/1.1\r\n\r\n", ("127.0.0.1", uport))  # not QUIC
        # a v1 Initial (long header, fixed bit) shorter than 1200 bytes
        dcid = os.urandom(8)
        short = bytes([0xC0]) + (1).to_bytes(4, "big") + bytes([8]) + dcid + b"\x00" + b"\x00" * 50
        sock.sendto(short, ("127.0.0.1", uport))
        # an oversized datagram
        sock.sendto(bytes([0xC0]) + b"\x01" * 1999, ("127.0.0.1", uport))
        # an unknown version in a 1200-byte datagram: answered with Version Negotiation
        unknown = (
            bytes([0xC0]) + bytes.fromhex("1a2a3a4a") + bytes([8]) + dcid + bytes([4]) + b"abcd"
        )
        unknown += b"\x00" * (1200 - len(unknown))
        sock.sendto(unknown, ("127.0.0.1", uport))
        vn, _ = sock.recvfrom(4096)
        assert len(vn) <= 1200
        assert vn[1:5] == b"\x00\x00\x00\x00"  # RFC 9000 §17.2.1
        assert vn[6 : 6 + 4] == b"abcd" and vn[11 : 11 + 8] == dcid  # the IDs swapped
        # nothing else comes back
        with pytest.raises(TimeoutError):
            sock.recvfrom(4096)
    finally:
        sock.close()

    def dropped(reason: str) -> float:
        return edge.metric("blindfold_quic_datagrams_dropped_total", reason=reason)

    assert wait_until(lambda: dropped("oversized") == 1, 5)
    assert dropped("initial_too_small") == 1
    assert (
        sum(dropped(r) for r in ("not_quic", "fixed_bit", "short_header"))
        + dropped("unknown_connection")
        >= 1
    )
    assert edge.metric("blindfold_quic_version_negotiation_sent_total") == 1
    assert origin.metric("blindfold_origin_quic_datagrams_total", result="ok") == 0


def test_chromium_over_quic_through_the_edge_which_sees_no_plaintext(
    start_edge: Any, start_origin: Any, app: Any, site: dict[str, Path], tmp_path: Path
) -> None:
    """Headless Chromium forced to QUIC loads the page through the edge, trusting only the
    site's certificate (SPKI pin): it saw the origin's certificate. strace records every byte
    the edge's workers receive and send: the QUIC session is in it (the Initials' cleartext
    SNI, kilobytes both ways), the page's plaintext is not."""
    browser = shutil.which("chromium") or need("chromium")
    edge, origin, uport = quic_chain(start_edge, start_origin, app, site, tmp_path, decisions=False)
    trace = tmp_path / "edge.strace"
    cmd = [need("strace"), "-f", "-qq", "-xx", "-s", "100000000", "-o", str(trace)]
    cmd += ["-e", "trace=read,write,readv,writev,recvfrom,sendto,recvmsg,sendmsg,recvmmsg"]
    for pid in edge.worker_pids():
        cmd += ["-p", str(pid)]
    tracer = subprocess.Popen(cmd, stderr=subprocess.PIPE)
    try:
        assert wait_until(lambda: _traced_by(edge.worker_pids(), tracer.pid), 10)
        out = subprocess.run(
            [
                browser,
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                f"--user-data-dir={tmp_path / 'chromium-profile'}",
                "--host-resolver-rules=MAP example.test 127.0.0.1",
                f"--origin-to-force-quic-on=example.test:{uport}",
                f"--ignore-certificate-errors-spki-list={spki_pin(site['cert'])}",
                "--dump-dom",
                f"https://example.test:{uport}/",
            ],
            capture_output=True,
            text=True,
            timeout=90,
        )
        assert "Hello from the application" in out.stdout, out.stderr[-3000:]
        assert "The origin agent says the visitor is <b>127.0.0.1</b>" in out.stdout
        line = origin.wait_for(lambda r: r.get("event") == "request" and r.get("path") == "/", 5)
        assert line is not None and line["http"] == "3"  # HTTP/3, not TCP
        # the flow's line comes once it has ended (idle_timeout_s = 2): every datagram traced
        flow = edge.wait_for(lambda r: r.get("event") == "quic_flow", 15)
        assert flow is not None and flow["sni"] == "example.test"
        assert flow["ja4"].startswith("q13")
    finally:
        tracer.send_signal(signal.SIGINT)
        tracer.wait(10)
    seen = recorded_bytes(trace)
    assert len(seen) > 2 * 5000  # the encrypted session, both ways
    assert b"Hello from the application" not in seen
    assert b"The origin agent says" not in seen
    cert = x509.load_pem_x509_certificate(site["cert"].read_bytes())
    assert cert.public_bytes(serialization.Encoding.DER)[:200] not in seen


def test_a_quic_flow_holds_a_per_address_slot_until_it_ends(
    start_edge: Any, start_origin: Any, app: Any, site: dict[str, Path], tmp_path: Path
) -> None:
    edge, _origin, uport = quic_chain(
        start_edge,
        start_origin,
        app,
        site,
        tmp_path,
        decisions=False,
        edge_kw={"per_ip_concurrent": 1},
    )

    async def two() -> int:
        async with H3Client(uport, ca=site["ca"], source="127.0.0.47") as c:
            assert (await c.get("/echo")).status == 200
            try:  # a second flow from the same address while the first is open
                r = await asyncio.to_thread(
                    h3_get, uport, "/echo", ca=site["ca"], source="127.0.0.47", timeout=2
                )
                return r.status
            except (TimeoutError, ConnectionError):
                return 0

    assert asyncio.run(two()) == 0
    assert edge.metric("blindfold_quic_flows_total", result="rejected:per_ip_concurrent") == 1
    # the first flow ends (idle_timeout_s = 2) and gives its slot back
    assert wait_until(lambda: edge.metric("blindfold_quic_flows_active") == 0, 10)
    assert h3_get(uport, "/echo", ca=site["ca"], source="127.0.0.47").status == 200


def test_nat_rebinding_is_carried_and_an_address_change_to_another_worker_is_dropped(
    start_edge: Any, start_origin: Any, app: Any, site: dict[str, Path], tmp_path: Path
) -> None:
    """A visitor whose port changes (NAT rebinding) stays on its worker (the steering hashes
    the address only) and its flow carries on over a new path, announced to the origin for the
    same visitor. A visitor whose address changes to one another worker is steered to reaches
    a worker that does not know the flow: dropped (docs/quic.md)."""
    from blindfold.io.listeners import steer_index

    edge, _origin, uport = quic_chain(
        start_edge, start_origin, app, site, tmp_path, decisions=False
    )
    visitor = "127.0.0.48"
    other = next(
        f"127.0.0.{i}"
        for i in range(50, 250)
        if steer_index(f"127.0.0.{i}", 2) != steer_index(visitor, 2)
    )

    async def rebind(c: H3Client, source: str) -> socket.socket:
        assert c.protocol is not None
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((source, 0))
        loop = asyncio.get_running_loop()
        protocol = c.protocol
        await loop.create_datagram_endpoint(lambda: protocol, sock=sock)
        return sock

    async def run() -> tuple[int, dict[str, Any], int]:
        async with H3Client(uport, ca=site["ca"], source=visitor, timeout=3) as c:
            assert (await c.get("/echo")).status == 200
            await rebind(c, visitor)  # same address, new port
            r = await c.get("/echo")
            seen = json.loads(r.body)
            await rebind(c, other)  # another address, steered to the other worker
            try:
                after = (await c.get("/echo")).status
            except TimeoutError:
                after = 0
            return r.status, seen, after

    status, seen, after = asyncio.run(run())
    assert status == 200 and seen["x-forwarded-for"] == visitor
    assert after == 0
    assert edge.metric("blindfold_quic_datagrams_dropped_total", reason="unknown_connection") >= 1
    flow = edge.wait_for(lambda r: r.get("event") == "quic_flow" and r["client"] == visitor, 10)
    assert flow is not None and flow["paths"] == 2


def test_a_reload_keeps_open_flows(
    start_edge: Any, start_origin: Any, app: Any, site: dict[str, Path], tmp_path: Path
) -> None:
    """SIGHUP with the same listeners and changed [edge.quic] bounds: the open flow carries on
    in the same worker, new flows are served."""
    edge, _origin, uport = quic_chain(
        start_edge,
        start_origin,
        app,
        site,
        tmp_path,
        decisions=False,
        quic_kw={"idle_timeout_s": 30.0},
    )

    async def run() -> int:
        async with H3Client(uport, ca=site["ca"], source="127.0.0.51", timeout=3) as c:
            assert (await c.get("/echo")).status == 200
            text = edge.config_path.read_text()
            edge.write_config(text + "max_pending_per_address = 1\n")
            done = await asyncio.to_thread(edge.reload)
            assert done is not None and done["event"] == "reloaded", done
            return (await c.get("/echo")).status

    assert asyncio.run(run()) == 200
    assert edge.metric("blindfold_quic_flows_total", result="accepted") == 1
    assert h3_get(uport, "/echo", ca=site["ca"], source="127.0.0.52").status == 200


def forged_initial(uport: int) -> list[bytes]:
    """A fresh aioquic client's first datagram(s): a complete ClientHello for example.test."""
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.connection import QuicConnection

    cfg = QuicConfiguration(is_client=True, alpn_protocols=["h3"], server_name="example.test")
    q = QuicConnection(configuration=cfg)
    q.connect(("127.0.0.1", uport), now=0.0)
    return [d for d, _ in q.datagrams_to_send(now=0.0)]


def test_forged_initials_take_no_connection_slot(
    start_edge: Any, start_origin: Any, app: Any, site: dict[str, Path], tmp_path: Path
) -> None:
    """atk3 finding 2: complete Initials from forged source addresses (nobody there answers)
    must not hold the connection slots TCP shares. A flow takes its guards slot only when its
    client sends a Handshake packet to an ID the origin gave it (RFC 9000 §8.1: the client got
    the origin's Initial at that address); until then it sits in a bounded pool and ends
    after hello_timeout_s."""
    from blindfold.io.listeners import steer_index

    edge, _origin, uport = quic_chain(
        start_edge,
        start_origin,
        app,
        site,
        tmp_path,
        decisions=False,
        edge_kw={"max_connections": 2},  # one per worker
        quic_kw={"idle_timeout_s": 30.0, "hello_timeout_s": 1.5},
    )
    legit = "127.0.0.60"
    # two forged sources steered to each worker, so every worker's slot is aimed at
    forged = [f"127.0.3.{i}" for i in range(1, 60) if steer_index(f"127.0.3.{i}", 2) == 0][:2]
    forged += [f"127.0.3.{i}" for i in range(1, 60) if steer_index(f"127.0.3.{i}", 2) == 1][:2]
    socks = []
    try:
        for source in forged:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((source, 0))
            for d in forged_initial(uport):
                s.sendto(d, ("127.0.0.1", uport))
            socks.append(s)  # never read, never answered
        assert wait_until(
            lambda: edge.metric("blindfold_quic_flows_total", result="new") == len(forged), 5
        )
        # a TCP visitor is served while the forged flows are in the table
        assert curl(edge.port, "example.test", site["ca"], source=legit).returncode == 0
        assert edge.metric("blindfold_connections_refused_total", reason="global_cap") == 0
        assert edge.metric("blindfold_quic_flows_total", result="accepted") == len(forged)
        # the forged flows end unvalidated (hello_timeout_s), counted
        assert wait_until(
            lambda: (
                edge.metric("blindfold_quic_flows_total", result="ended:unvalidated") == len(forged)
            ),
            8,
        )
        assert edge.metric("blindfold_quic_flows_total", result="validated") == 0
    finally:
        for s in socks:
            s.close()
    # a real HTTP/3 visitor proves its address and is served
    assert h3_get(uport, "/echo", ca=site["ca"], source="127.0.0.61").status == 200
    assert edge.metric("blindfold_quic_flows_total", result="validated") == 1


def test_forged_initials_cannot_hold_the_origins_quic_connections(
    start_edge: Any,
    start_origin: Any,
    app: Any,
    site: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """atk4 #2b: the edge ends forged flows after hello_timeout_s, but the origin kept each as
    a half-open connection for its own idle timeout, counted against [origin.quic]
    max_connections: 30 forged Initials (here max_connections = 20) shut honest HTTP/3
    visitors out for the idle timeout. A half-open connection older than a second now makes
    room for a new client, and none lives beyond the handshake deadline."""
    import tests.integration.test_h3_origin as h3_origin
    import tests.integration.test_quic_edge as this

    make_origin = h3_origin.quic_origin

    def small(*a: Any, **kw: Any) -> Any:
        kw["max_connections"] = 20
        return make_origin(*a, **kw)

    monkeypatch.setattr(this, "quic_origin", small)
    _edge, origin, uport = quic_chain(
        start_edge,
        start_origin,
        app,
        site,
        tmp_path,
        decisions=False,
        quic_kw={"idle_timeout_s": 60.0, "hello_timeout_s": 2.0},
    )
    assert h3_get(uport, "/echo", ca=site["ca"], source="127.0.0.60").status == 200
    socks = []
    try:
        for i in range(1, 31):  # 30 forged sources, one Initial each, never read
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((f"127.0.6.{i}", 0))
            for d in forged_initial(uport):
                s.sendto(d, ("127.0.0.1", uport))
            socks.append(s)
        assert wait_until(
            lambda: origin.metric("blindfold_origin_quic_connections_active") >= 20, 5
        )
        statuses = []
        for k in range(2):
            wait_until(lambda: False, 1.2)  # older than the grace: the forged ones may go
            statuses.append(
                h3_get(uport, "/echo", ca=site["ca"], source=f"127.0.0.{70 + k}", timeout=5).status
            )
        assert statuses == [200, 200]
        assert (
            origin.metric("blindfold_origin_quic_datagrams_total", result="evicted_half_open") >= 1
        )
    finally:
        for s in socks:
            s.close()
