"""Decisions from other sources: Redis shared by several edges and origins, and a real CrowdSec
Local API (Debian's crowdsec) followed as a bouncer."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import need
from tests.helpers.clients import curl, wait_until
from tests.helpers.edgeproc import EdgeProcess, edge_config, route
from tests.helpers.nginx import free_port
from tests.helpers.origin import TlsOrigin
from tests.helpers.topology import origin_config

SQLI = "/?id=1%27%20OR%201=1--"


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        [
            need("redis-server"),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                if s.recv(10).startswith(b"+PONG"):
                    break
        except OSError:
            time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("redis-server did not start")
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(10)


def code(edge: EdgeProcess, site: dict[str, Path], path: str, source: str) -> int:
    out = curl(
        edge.port,
        "example.test",
        site["ca"],
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        source=source,
        path=path,
    )
    return int(out.stdout or 0)


def test_two_edges_share_bans_and_rates_through_redis(
    start_edge: Any,
    start_origin: Any,
    app: Any,
    site: dict[str, Path],
    tmp_path: Path,
    redis_url: str,
) -> None:
    origin = start_origin(
        origin_config(site, app.port, tmp_path, decisions={"redis_url": redis_url})
    )
    r = route(["example.test"], [f"127.0.0.1:{origin.port}"], proxy_protocol="v2")
    dec = f'[edge.decisions]\nredis_url = "{redis_url}"\n'
    edges = [
        start_edge(edge_config(r, per_ip_rate_per_s=0.1, per_ip_burst=12) + dec) for _ in range(2)
    ]
    for e in edges:
        assert e.wait_for(lambda rec: rec.get("event") == "decisions_source_up", 10)
    a, b = edges
    assert code(b, site, "/echo", "127.0.0.60") == 200
    assert code(a, site, SQLI, "127.0.0.60") == 403  # the attack goes through edge A
    t0 = time.monotonic()
    assert wait_until(lambda: code(b, site, "/echo", "127.0.0.60") == 0, 5)
    assert time.monotonic() - t0 < 2.0  # edge B never saw it, and refuses within 2 s
    assert code(a, site, "/echo", "127.0.0.60") == 0
    assert code(b, site, "/echo", "127.0.0.62") == 200

    # shared per-address rate: 7 connections on each edge stay under each edge's own burst
    # of 12, but 14 pass the shared budget (0.1/s * 10 s + 12 = 13)
    # keep the burst inside one 10 s window: the shared counters are keyed by wall-clock
    # 10 s windows in every edge (redis_bus.RATE_WINDOW_S), a clock this test cannot move,
    # so the event to wait for is the start of a window
    while time.time() % 10 > 4:
        time.sleep(0.2)
    results = [code(e, site, "/echo", "127.0.0.61") for _ in range(7) for e in (a, b)]
    assert results.count(200) >= 13  # the shared budget, at least, was served
    assert wait_until(lambda: code(b, site, "/echo", "127.0.0.61") == 0, 3, 0.3)
    assert code(a, site, "/echo", "127.0.0.61") == 0
    assert code(b, site, "/echo", "127.0.0.63") == 200
    # edge B refused because of the shared count, never because of its own bucket
    assert b.metric("blindfold_connections_refused_total", reason="per_ip_rate") == 0
    assert b.metric("blindfold_connections_refused_total", reason="banned") >= 1
    assert any(r.get("event") == "shared_rate_exceeded" for e in (a, b) for r in e.records())


def test_real_crowdsec_lapi(
    start_edge: Any, origin: TlsOrigin, site: dict[str, Path], tmp_path: Path
) -> None:
    from tests.helpers.crowdsec import CrowdSecLapi

    lapi = CrowdSecLapi(tmp_path / "crowdsec")
    try:
        key = lapi.add_bouncer("blindfold-edge")
        keyfile = tmp_path / "cs.key"
        keyfile.write_text(key)
        text = edge_config(route(["example.test"], [f"127.0.0.1:{origin.port}"]))
        text += (
            f'[edge.decisions]\nurl = "{lapi.url}"\napi_key_file = "{keyfile}"\n'
            "poll_interval_s = 0.5\n"
        )
        edge = start_edge(text)
        assert edge.wait_for(lambda r: r.get("event") == "decisions_source_up", 10)
        assert code(edge, site, "/hello", "127.0.0.7") == 200
        lapi.add_decision("127.0.0.7", duration="5m", reason="crowdsec test")
        lapi.add_decision("127.0.9.0/24", duration="5m", reason="range test")
        assert wait_until(lambda: code(edge, site, "/hello", "127.0.0.7") == 0, 3)
        assert code(edge, site, "/hello", "127.0.9.77") == 0
        assert code(edge, site, "/hello", "127.0.0.8") == 200
        assert edge.metric("blindfold_decisions_active") == 2
        lapi.delete_decision("127.0.0.7")
        assert wait_until(lambda: code(edge, site, "/hello", "127.0.0.7") == 200, 5)
        assert code(edge, site, "/hello", "127.0.9.77") == 0
    finally:
        lapi.stop()
