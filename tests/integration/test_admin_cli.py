"""Admin endpoints, the command line's exit codes, and the README's demo command."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.helpers.clients import get
from tests.helpers.demo import CHECKS, run_demo_self_check
from tests.helpers.edgeproc import EdgeProcess, edge_config, route
from tests.helpers.origin import TlsOrigin

Start = Callable[..., EdgeProcess]

FAMILIES = [
    "blindfold_connections_accepted_total",
    "blindfold_connections_refused_total",
    "blindfold_connections_closed_total",
    "blindfold_connections_active",
    "blindfold_route_connections_active",
    "blindfold_bytes_relayed_total",
    "blindfold_origin_up",
    "blindfold_origin_connections_active",
    "blindfold_hello_parse_seconds",
    "blindfold_ja4_connections_total",
    "blindfold_list_entries",
    "blindfold_tracked_addresses",
    "blindfold_workers",
]


def test_metrics_and_health(start_edge: Start, origin: TlsOrigin, site: dict[str, Path]) -> None:
    edge = start_edge(
        edge_config(route(["example.test"], [f"127.0.0.1:{origin.port}"], name="web"))
    )
    for i in range(4):
        get(edge.port, "example.test", site["ca"], source=f"127.0.0.{2 + i}")
    text = edge.metrics()
    for family in FAMILIES:
        assert f"# TYPE {family} " in text, family
    assert edge.metric("blindfold_connections_closed_total", route="web", outcome="closed") == 4
    assert edge.metric("blindfold_bytes_relayed_total", route="web", direction="to_client") > 0
    assert edge.metric("blindfold_hello_parse_seconds_count") >= 4
    assert edge.metric("blindfold_workers", state="ready") == 2
    assert 'blindfold_ja4_connections_total{ja4="t13d' in text
    with urllib.request.urlopen(f"http://{edge.admin}/healthz", timeout=5) as resp:
        assert resp.status == 200 and json.load(resp)["status"] == "ok"
    try:
        urllib.request.urlopen(f"http://{edge.admin}/nope", timeout=5)
    except urllib.error.HTTPError as exc:
        assert exc.code == 404
    # garbage to the admin port: 400 and the server carries on
    host, port = edge.admin.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(b"\x00\x01garbage\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 400")
    assert edge.metric("blindfold_connections_active") == 0


def test_edge_exits_2_on_bad_config(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(edge_config(route(["example.test"], ["127.0.0.1:1"]), hello_timeout_s="x"))
    out = subprocess.run(
        [sys.executable, "-m", "blindfold", "edge", "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2
    assert "edge.hello_timeout_s" in out.stderr and "number" in out.stderr


def test_edge_exits_2_when_the_port_is_taken(tmp_path: Path) -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    conf = tmp_path / "c.toml"
    conf.write_text(
        edge_config(route(["example.test"], ["127.0.0.1:1"]), listen=[f"127.0.0.1:{port}"])
    )
    try:
        out = subprocess.run(
            [sys.executable, "-m", "blindfold", "edge", "--config", str(conf)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    finally:
        holder.close()
    assert out.returncode == 2
    assert "edge.listen[0]" in out.stderr


def test_every_daemon_exits_2_on_a_config_it_cannot_use(
    tmp_path: Path, site: dict[str, Path], app: Any
) -> None:
    """The one start-up shell: an invalid key, a missing section or a port already taken is
    exit code 2 and a line naming the key, for the origin agent and the key server as for the
    edge."""
    from tests.helpers.topology import origin_config

    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    taken = holder.getsockname()[1]
    good = origin_config(site, app.port, tmp_path)
    cases = {
        "origin": [
            (good.replace("proxy_protocol", "proxy_protcol", 1), "origin.proxy_protcol"),
            (good.replace('"127.0.0.1:0"', f'"127.0.0.1:{taken}"', 1), "origin.listen[0]"),
        ],
        "keyserver": [(good, "[keyserver]")],  # no such section in an origin's file
        "edge": [(good, "[edge]")],
    }
    try:
        for kind, configs in cases.items():
            for i, (text, key) in enumerate(configs):
                conf = tmp_path / f"{kind}{i}.toml"
                conf.write_text(text)
                out = subprocess.run(
                    [sys.executable, "-m", "blindfold", kind, "--config", str(conf)],
                    capture_output=True,
                    text=True,
                    timeout=30,
                )
                assert out.returncode == 2, (kind, key, out.stderr)
                assert f"blindfold {kind}: " in out.stderr and key in out.stderr, out.stderr
                assert "Traceback" not in out.stderr
    finally:
        holder.close()


def test_demo_self_check() -> None:
    """`blindfold demo --self-check` (no --duration) runs its checks, then exits by itself."""
    out = run_demo_self_check([sys.executable, "-m", "blindfold"])
    assert out.returncode == 0, out.stdout + out.stderr
    for check in CHECKS:
        assert f"self-check: {check}: OK" in out.stdout
    assert "curl --cacert" in out.stdout and "--interface 127.0.0.66" in out.stdout
