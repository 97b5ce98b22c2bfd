"""QUIC through the edge vs nginx's `stream` UDP proxy, in one run (bench/quic/README.md).

Topology on loopback: aioquic's HTTP/3 client (from 127.0.0.3) -> {nothing | nginx stream UDP
proxy (libnginx-mod-stream, forwards by 4-tuple without reading SNI) | blindfold edge with a
passthrough route, quic = true} -> the origin agent's HTTP/3 (aioquic) -> the demo app.
Both proxies run one worker. Measured per target, in interleaved rounds:

- handshake: time for aioquic's client to complete the QUIC handshake (median, p90);
  "added" is the difference to the direct path;
- CPU per new flow: the proxy's CPU (all its processes, utime + stime from /proc) over
  `--flows` sequential connections that each make one small request, divided by the flows;
- CPU per GB: the proxy's CPU over `--bulk-mb` MiB downloaded on one connection, per GiB.

    .venv/bin/python bench/quic/qbench.py [--flows 100] [--bulk-mb 64] [--rounds 3]

Prints one JSON object per target and round, then a summary. The machine's 2 cores are shared
with other engineers' work: read the numbers as orders of magnitude and ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.benchlib import Proc, cpu_s
from blindfold import pki
from tests.helpers.h3client import H3Client

NGINX_STREAM = "/usr/lib/nginx/modules/ngx_stream_module.so"
CLIENT = "127.0.0.3"


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def tree_cpu(pid: int) -> float:
    return cpu_s(pid) + sum(cpu_s(c) for c in children(pid))


def setup(out: Path) -> dict[str, Path]:
    ca = pki.make_ca("qbench CA")
    ca.write(out / "ca.pem")
    pki.issue(ca, ["example.test"]).write(out / "site.pem", out / "site.key")
    (out / "quic.key").write_text(os.urandom(32).hex() + "\n")
    return {"ca": out / "ca.pem", "cert": out / "site.pem", "key": out / "site.key"}


def start_origin(out: Path, files: dict[str, Path], app_port: int) -> tuple[Proc, int, int]:
    log = out / "origin.log"
    (out / "origin.toml").write_text(f"""
[origin]
upstream = "http://127.0.0.1:{app_port}"
listen = ["127.0.0.1:0"]
admin_listen = "127.0.0.1:0"
trusted_edges = ["127.0.0.1/32"]
proxy_protocol = "optional"
log_path = "{log}"

[[origin.certificates]]
cert = "{files["cert"]}"
key = "{files["key"]}"

[origin.quic]
listen = ["127.0.0.1:0"]
edge_keys = ["{out / "quic.key"}"]
""")
    proc = Proc("origin", [sys.executable, "-m", "blindfold", "origin", "--config",
                           str(out / "origin.toml")], out)  # fmt: skip
    ready = proc.wait_json(log, "origin_ready")
    return (
        proc,
        int(ready["listen"][0].rpartition(":")[2]),
        int(ready["quic_listen"][0].rpartition(":")[2]),
    )


def start_edge(out: Path, tcp_port: int, quic_port: int) -> tuple[Proc, int]:
    log = out / "edge.log"
    (out / "edge.toml").write_text(f"""
[edge]
listen = ["127.0.0.1:0"]
admin_listen = "127.0.0.1:0"
workers = 1
per_ip_rate_per_s = 0
per_ip_concurrent = 100000
log_path = "{log}"

[[edge.routes]]
sni = ["example.test"]
origins = ["127.0.0.1:{tcp_port}"]
proxy_protocol = "v2"
quic = true
quic_origins = ["127.0.0.1:{quic_port}"]

[edge.quic]
announce_key_file = "{out / "quic.key"}"
""")
    proc = Proc("edge", [sys.executable, "-m", "blindfold", "edge", "--config",
                         str(out / "edge.toml")], out)  # fmt: skip
    ready = proc.wait_json(log, "edge_ready")
    return proc, int(ready["quic_listen"][0].rpartition(":")[2])


def start_nginx(out: Path, quic_port: int) -> tuple[Proc, int]:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    d = out / "nginx"
    (d / "logs").mkdir(parents=True, exist_ok=True)
    user = "user root;" if os.geteuid() == 0 else ""
    (d / "nginx.conf").write_text(f"""
load_module {NGINX_STREAM};
{user}
worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/logs/error.log warn;
events {{ worker_connections 4096; }}
stream {{
    server {{
        listen 127.0.0.1:{port} udp;
        proxy_pass 127.0.0.1:{quic_port};
        proxy_bind 127.0.0.2;        # not a trusted edge: the origin takes it as the visitor
        proxy_timeout 30s;
    }}
}}
""")
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    proc = Proc("nginx", [nginx, "-p", str(d), "-c", str(d / "nginx.conf")], out)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not (d / "nginx.pid").exists():
        time.sleep(0.05)
    if not (d / "nginx.pid").exists():
        raise RuntimeError("nginx did not start: " + (d / "logs" / "error.log").read_text())
    return proc, port


async def handshakes(port: int, ca: Path, n: int) -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        client = H3Client(port, ca=ca, source=CLIENT, timeout=10)
        async with client as c:
            times.append(time.perf_counter() - t0)
            r = await c.get("/echo")
            assert r.status == 200, r.status
    return times


async def bulk(port: int, ca: Path, mib: int) -> int:
    async with H3Client(port, ca=ca, source=CLIENT, timeout=120) as c:
        r = await c.get(f"/bytes?n={mib << 20}")
        assert r.status == 200 and len(r.body) == mib << 20, (r.status, len(r.body))
        return len(r.body)


def measure(name: str, port: int, pid: int | None, args: Any, ca: Path) -> dict[str, Any]:
    c0 = tree_cpu(pid) if pid else 0.0
    times = asyncio.run(handshakes(port, ca, args.flows))
    c1 = tree_cpu(pid) if pid else 0.0
    t0 = time.perf_counter()
    n = asyncio.run(bulk(port, ca, args.bulk_mb))
    wall = time.perf_counter() - t0
    c2 = tree_cpu(pid) if pid else 0.0
    return {
        "target": name,
        "handshake_ms_p50": round(1000 * statistics.median(times), 3),
        "handshake_ms_p90": round(1000 * sorted(times)[int(0.9 * len(times))], 3),
        "cpu_ms_per_flow": round(1000 * (c1 - c0) / args.flows, 3) if pid else None,
        "cpu_s_per_gib": round((c2 - c1) * (1 << 30) / n, 3) if pid else None,
        "bulk_mib_per_s": round(n / wall / (1 << 20), 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--flows", type=int, default=100)
    ap.add_argument("--bulk-mb", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    out = Path(tempfile.mkdtemp(prefix="qbench-"))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # still stop what we started
    try:
        files = setup(out)
        # the application in a process of its own (not competing with the client for the GIL)
        code = (
            "import time; from blindfold.demo.app import DemoApp; a = DemoApp(); "
            "print(a.port, flush=True); time.sleep(1e9)"
        )
        app = Proc("app", [sys.executable, "-c", code], out)
        _origin, tcp_port, quic_port = start_origin(out, files, int(app.wait_line()))
        edge, edge_port = start_edge(out, tcp_port, quic_port)
        nginx, nginx_port = start_nginx(out, quic_port)
        targets = [
            ("direct", quic_port, None),
            ("nginx_stream_udp", nginx_port, nginx.pid),
            ("blindfold", edge_port, edge.pid),
        ]
        results: dict[str, list[dict[str, Any]]] = {t[0]: [] for t in targets}
        for rnd in range(args.rounds):
            for name, port, pid in targets:
                r = measure(name, port, pid, args, files["ca"])
                r["round"] = rnd
                print(json.dumps(r), flush=True)
                results[name].append(r)
        direct = statistics.median(r["handshake_ms_p50"] for r in results["direct"])
        summary = {}
        for name, rs in results.items():
            s: dict[str, Any] = {}
            for key in ("handshake_ms_p50", "cpu_ms_per_flow", "cpu_s_per_gib", "bulk_mib_per_s"):
                vals = [r[key] for r in rs if r[key] is not None]
                s[key] = round(statistics.median(vals), 3) if vals else None
            s["added_handshake_ms"] = round(s["handshake_ms_p50"] - direct, 3)
            summary[name] = s
        print(json.dumps({"summary": summary, "flows": args.flows, "bulk_mib": args.bulk_mb,
                          "rounds": args.rounds, "cpus": os.cpu_count()}))  # fmt: skip
    finally:
        Proc.stop_all()


if __name__ == "__main__":
    main()
