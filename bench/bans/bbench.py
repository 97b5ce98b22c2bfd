#!/usr/bin/env python3
"""bench/bans: visitor latency while an edge takes in a million bans (see README.md beside it).

  bbench.py run [options]   the whole benchmark (what run.sh calls); prints the table
  bbench.py source ...      a decision stream (CrowdSec bouncer API shape) that delivers the
                            ban load in chunks once it gets SIGUSR1
  bbench.py origin ...      a TLS origin (asyncio + ssl) that answers every handshake
  bbench.py probe ...       one new TCP + TLS connection through the edge every few ms;
                            prints the latencies as JSON

Loopback only; ports picked by the kernel; every process it starts is stopped by its PID;
every phase is bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import ssl
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO))

from bench.benchlib import Proc, cpu_s, git_rev, http_get, metric, pct  # noqa: E402

PY = sys.executable
SNI = "example.test"
PROBE_SOURCE = "127.0.0.50"
CHECK_BANNED = "127.0.1.7"  # in the load: refused at the end
KEY = "bench-source-key-0123456789abcdef"


# ============================================================================ decision source
def source_main(args: argparse.Namespace) -> int:
    """Answers `startup=true` with nothing until SIGUSR1; then every poll with the next chunk
    of the load (the first chunk with a short duration, so that it expires during the run),
    then one new ban per poll."""
    n, per_poll = args.n, args.per_poll
    chunks: list[bytes] = []

    def item(value: str, duration: str) -> str:
        return (
            f'{{"duration":"{duration}","origin":"bench","scenario":"bench","scope":"Ip",'
            f'"type":"ban","value":"{value}"}}'
        )

    values = [f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}" for i in range(n - 1)]
    values.append(CHECK_BANNED)
    for start in range(0, n, per_poll):
        duration = f"{args.short_s}s" if start == 0 else "3600s"
        items = ",".join(item(v, duration) for v in values[start : start + per_poll])
        chunks.append(f'{{"new":[{items}],"deleted":null}}'.encode())
    state = {"armed": False, "next": 0, "extra": 0, "polls": 0}

    def arm(*_: Any) -> None:
        state["armed"] = True

    signal.signal(signal.SIGUSR1, arm)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            if self.headers.get("x-api-key") != KEY:
                body = b'{"message":"access forbidden"}'
                self.send_response(403)
            else:
                state["polls"] += 1
                self.send_response(200)
                if "startup=true" in self.path or not state["armed"]:
                    body = b'{"new":null,"deleted":null}'
                elif state["next"] < len(chunks):
                    body = chunks[state["next"]]
                    state["next"] += 1
                else:
                    state["extra"] += 1
                    x = state["extra"]
                    body = f'{{"new":[{item(f"127.0.2.{x & 255}", "3600s")}]}}'.encode()
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    print(json.dumps({"event": "source_ready", "port": server.server_address[1]}), flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server.serve_forever()
    return 0


# ============================================================================ origin
def origin_main(args: argparse.Namespace) -> int:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(args.cert, args.key)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(reader.read(1), 10)
        writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx, backlog=1024)
        port = server.sockets[0].getsockname()[1]
        print(json.dumps({"event": "origin_ready", "port": port}), flush=True)
        async with server:
            await server.serve_forever()

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    asyncio.run(main())
    return 0


# ============================================================================ probe
def probe_main(args: argparse.Namespace) -> int:
    """New TCP + TLS handshakes through the edge, one at a time, `interval_ms` apart, for
    `seconds`; prints [[t, latency_ms or -1], ...]."""
    ctx = ssl.create_default_context(cafile=args.ca)
    out: list[list[float]] = []
    end = time.monotonic() + args.seconds
    while time.monotonic() < end:
        t0 = time.monotonic()
        try:
            raw = socket.create_connection(
                ("127.0.0.1", args.port), timeout=10, source_address=(args.source, 0)
            )
            with ctx.wrap_socket(raw, server_hostname=SNI):
                pass
            out.append([t0, (time.monotonic() - t0) * 1000])
        except OSError:
            out.append([t0, -1.0])
        time.sleep(max(0.0, args.interval_ms / 1000 - (time.monotonic() - t0)))
    print(json.dumps(out))
    return 0


def refused(port: int, source: str, ca: str) -> bool:
    ctx = ssl.create_default_context(cafile=ca)
    try:
        raw = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
        with ctx.wrap_socket(raw, server_hostname=SNI):
            return False
    except OSError:
        return True


# ============================================================================ run
def edge_toml(out: Path, origin_port: int, source_port: int, workers: int) -> str:
    return f"""# written by bench/bans/bbench.py
[edge]
listen = ["127.0.0.1:0"]
admin_listen = "127.0.0.1:0"
workers = {workers}
per_ip_rate_per_s = 0
log_connections = false
drain_timeout_s = 2

[[edge.routes]]
sni = ["{SNI}"]
origins = ["127.0.0.1:{origin_port}"]
proxy_protocol = "none"

[edge.decisions]
url = "http://127.0.0.1:{source_port}"
api_key_file = "{out / "source.key"}"
poll_interval_s = 0.5
timeout_s = 30
"""


def summary(samples: list[list[float]]) -> dict[str, float]:
    ok = [ms for _t, ms in samples if ms >= 0]
    return {
        "probes": len(samples),
        "failed": len(samples) - len(ok),
        "p50_ms": round(pct(ok, 0.50), 2),
        "p99_ms": round(pct(ok, 0.99), 2),
        "max_ms": round(max(ok), 2) if ok else float("nan"),
    }


def run_main(args: argparse.Namespace) -> int:
    from blindfold import pki

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ca = pki.make_ca("blindfold bench CA")
    ca.write(out / "ca.pem")
    pki.issue(ca, [SNI]).write(out / "site.pem", out / "site.key")
    keyfile = out / "source.key"
    fd = os.open(keyfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(KEY)
    deadline = time.monotonic() + args.budget

    def left() -> float:
        return max(1.0, deadline - time.monotonic())

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # the finally below stops our PIDs
    results: dict[str, Any] = {"git": git_rev(), "n": args.n, "workers": args.workers}
    try:
        print(f"generating {args.n} bans ...", flush=True)
        source = Proc(
            "source",
            [
                PY,
                str(HERE / "bbench.py"),
                "source",
                "--n",
                str(args.n),
                "--per-poll",
                str(args.per_poll),
                "--short-s",
                str(args.short_s),
            ],
            out,
        )
        source_port = json.loads(source.wait_line(min(120.0, left())))["port"]
        origin = Proc(
            "origin",
            [
                PY,
                str(HERE / "bbench.py"),
                "origin",
                "--cert",
                str(out / "site.pem"),
                "--key",
                str(out / "site.key"),
            ],
            out,
        )
        origin_port = json.loads(origin.wait_line(30))["port"]
        (out / "edge.toml").write_text(edge_toml(out, origin_port, source_port, args.workers))
        edge = Proc(
            "edge", [PY, "-m", "blindfold", "edge", "--config", str(out / "edge.toml")], out
        )
        ready = edge.wait_json(edge.stdout_path, "edge_ready", 30)
        port = int(ready["listen"][0].rpartition(":")[2])
        admin = f"http://{ready['admin']}/metrics"
        edge.wait_json(edge.stdout_path, "decisions_source_up", 30)

        def probe(name: str, seconds: float) -> Proc:
            return Proc(
                name,
                [
                    PY,
                    str(HERE / "bbench.py"),
                    "probe",
                    "--port",
                    str(port),
                    "--ca",
                    str(out / "ca.pem"),
                    "--source",
                    PROBE_SOURCE,
                    "--seconds",
                    str(seconds),
                    "--interval-ms",
                    str(args.interval_ms),
                ],
                out,
            )

        print(f"baseline: {args.baseline_s:.0f} s of probes, no ban load", flush=True)
        base = probe("probe-baseline", args.baseline_s)
        base.wait(args.baseline_s + 60)
        baseline = last_line_json(base)
        master_cpu0 = cpu_s(edge.pid)
        load_s = min(args.load_s, left() - 30)
        print(
            f"load: {args.n} bans delivered in chunks of {args.per_poll}, "
            f"{args.load_s:.0f} s of probes",
            flush=True,
        )
        loaded = probe("probe-load", load_s)
        t_load = time.monotonic()
        os.kill(source.pid, signal.SIGUSR1)
        applied_after = None
        peak_rss = 0
        while loaded.alive():
            text = http_get(admin, 20)
            active = metric(text, "blindfold_decisions_active")
            pending = metric(text, "blindfold_ban_updates_pending")
            peak_rss = max(peak_rss, rss_kb(edge.pid))
            if applied_after is None and active >= args.n and pending == 0:
                applied_after = time.monotonic() - t_load
            time.sleep(0.5)
        loaded.wait(30)
        during = last_line_json(loaded)
        text = http_get(admin, 20)
        results.update(
            baseline=summary(baseline),
            load=summary(during),
            all_applied_after_s=round(applied_after, 2) if applied_after else None,
            active_at_end=metric(text, "blindfold_decisions_active"),
            refused=metric(text, "blindfold_decisions_refused_total"),
            resyncs=metric(text, "blindfold_ban_resyncs_total"),
            master_cpu_s=round(cpu_s(edge.pid) - master_cpu0, 2),
            master_peak_rss_mb=round(peak_rss / 1024, 1),
            banned_refused=refused(port, CHECK_BANNED, str(out / "ca.pem")),
        )
        t0 = time.monotonic()
        edge.stop(60)
        results["sigterm_exit_s"] = round(time.monotonic() - t0, 2)
    finally:
        Proc.stop_all()
    (out / "results.json").write_text(json.dumps(results, indent=2))
    b, ld = results.get("baseline", {}), results.get("load", {})
    lines = [
        f"bench/bans  git {results['git']}  {args.n} bans, {args.workers} workers, "
        f"probe every {args.interval_ms} ms from {PROBE_SOURCE}",
        f"{'':24}{'probes':>8}{'failed':>8}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}",
    ]
    for name, s in (("baseline (no bans)", b), ("during the ban load", ld)):
        if s:
            lines.append(
                f"{name:24}{s['probes']:>8}{s['failed']:>8}{s['p50_ms']:>9}{s['p99_ms']:>9}"
                f"{s['max_ms']:>9}"
            )
    if b and ld:
        lines.append(
            f"p99 difference: {ld['p99_ms'] - b['p99_ms']:+.2f} ms "
            f"(ratio {ld['p99_ms'] / b['p99_ms']:.2f}); target: within 10 ms"
        )
    for key in (
        "all_applied_after_s",
        "active_at_end",
        "refused",
        "resyncs",
        "master_cpu_s",
        "master_peak_rss_mb",
        "banned_refused",
        "sigterm_exit_s",
    ):
        if key in results:
            lines.append(f"{key}: {results[key]}")
    lines.append(f"raw outputs: {out}")
    report = "\n".join(lines)
    (out / "report.txt").write_text(report + "\n")
    print(report)
    return 0


def last_line_json(proc: Proc) -> Any:
    lines = proc.stdout_path.read_text(errors="replace").strip().splitlines()
    if not lines:
        raise RuntimeError(f"{proc.name} printed nothing: " + proc.stderr_path.read_text()[-2000:])
    return json.loads(lines[-1])


def rss_kb(pid: int) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(prog="bbench.py")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--out", required=True)
    r.add_argument("--n", type=int, default=1_000_000, help="bans delivered (default 1M)")
    r.add_argument("--per-poll", type=int, default=100_000, help="bans per stream answer")
    r.add_argument("--short-s", type=int, default=25, help="duration of the first chunk")
    r.add_argument("--workers", type=int, default=2)
    r.add_argument("--interval-ms", type=float, default=5.0)
    r.add_argument("--baseline-s", type=float, default=15.0)
    r.add_argument("--load-s", type=float, default=45.0)
    r.add_argument("--budget", type=float, default=300.0)
    s = sub.add_parser("source")
    s.add_argument("--n", type=int, required=True)
    s.add_argument("--per-poll", type=int, required=True)
    s.add_argument("--short-s", type=int, required=True)
    o = sub.add_parser("origin")
    o.add_argument("--cert", required=True)
    o.add_argument("--key", required=True)
    p = sub.add_parser("probe")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--ca", required=True)
    p.add_argument("--source", default=PROBE_SOURCE)
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--interval-ms", type=float, default=5.0)
    args = ap.parse_args()
    return {"run": run_main, "source": source_main, "origin": origin_main, "probe": probe_main}[
        args.cmd
    ](args)


if __name__ == "__main__":
    sys.exit(main())
