#!/usr/bin/env python3
"""bench/edgecache: what a cached response costs the keyless edge, beside nginx `proxy_cache`
in front of the same origin, in ONE run (see README.md beside this file).

  ebench.py run [options]     the whole benchmark (what run.sh calls); prints the table
  ebench.py newconn ...       a load of new TLS connections, one HTTP/1.1 request each
                              (blocking `ssl` in threads; resumed or full handshakes)

  origin: nginx over TLS serving fixed 2 KB and 100 KB files, Cache-Control: public, max-age=3600
  front (a): blindfold edge, keyless route + key server, workers = 1, cache on (one or more
             source trees: --edge LABEL=SRC, e.g. main's baseline and a branch)
  front (b): nginx proxy_cache, one worker
Both fronts serve TLS 1.3 with the same throwaway ECDSA P-256 certificate, pinned to CPU 0
(`taskset`); the load generators and the key server run on CPU 1. The metric is server
CPU-seconds (utime + stime from /proc: edge master + worker; nginx master + worker; the key
server apart) per 1,000 responses. Every load is bounded in time; every process started here
is stopped by its PID; loopback only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO))

from bench.benchlib import Proc, cpu_s, free_port, http_get, metric  # noqa: E402

PY = sys.executable
HOST = "localhost"  # resolves to 127.0.0.1 only; wrk and h2load send it as SNI
FILES = {"2k": 2048, "100k": 102400}
SERVER_CPU = "0"
LOAD_CPU = "1"
LOADS = ("h1-2k", "h1-100k", "h2-2k", "new-resumed", "new-full")
LOAD_TITLES = {
    "h1-2k": "keep-alive HTTP/1.1, 2 KB",
    "h1-100k": "keep-alive HTTP/1.1, 100 KB",
    "h2-2k": "keep-alive HTTP/2, 2 KB",
    "new-resumed": "new connections, 2 KB, resumed",
    "new-full": "new connections, full handshakes",
}


# ============================================================================ processes
def children(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                out += [int(p) for p in (task / "children").read_text().split()]
    return out


def tree_cpu(pid: int) -> float:
    return cpu_s(pid) + sum(cpu_s(c) for c in children(pid))


def wait_port(port: int, proc: Proc, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        if not proc.alive():
            break
        time.sleep(0.05)
    raise RuntimeError(f"{proc.name} is not listening on {port}: see {proc.stderr_path}")


def make_pki(d: Path) -> dict[str, Any]:
    """The mTLS set (`blindfold pki`) and the site's P-256 leaf for localhost."""
    from cryptography import x509

    from blindfold import pki

    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    bf = [PY, "-m", "blindfold", "pki"]
    for args in (
        ["ca", str(d)],
        ["server", "keyserver", str(d), "--host", "keyserver.test", "--host", "127.0.0.1"],
        ["edge", "edge1", str(d)],
    ):
        subprocess.run(bf + args, check=True, capture_output=True, timeout=60, cwd=str(REPO))
    edge_fp = pki.fingerprint_sha256(x509.load_pem_x509_certificate((d / "edge1.pem").read_bytes()))
    site_ca = pki.make_ca("blindfold edgecache bench site CA")
    site_ca.write(d / "site-ca.pem")
    leaf = pki.issue(site_ca, [HOST], kind="ec256")
    leaf.write(d / "site.pem", d / "site.key")
    return {
        "dir": d,
        "edge_fp": edge_fp,
        "site_ca": d / "site-ca.pem",
        "site_cert": d / "site.pem",
        "site_key": d / "site.key",
    }


def keyserver_toml(p: dict[str, Any], out: Path) -> str:
    d = p["dir"]
    return f"""# written by bench/edgecache/ebench.py
[keyserver]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
cert = "{d / "keyserver.pem"}"
key = "{d / "keyserver.key"}"
client_ca = "{d / "ca.pem"}"
audit_log = "{out / "audit.log"}"
audit_key = "{out / "audit.key"}"
log_path = "{out / "keyserver.log"}"
rate_per_s = 1000000.0
burst = 1000000

[[keyserver.keys]]
name = "site"
key = "{p["site_key"]}"
certificate = "{p["site_cert"]}"

[[keyserver.edges]]
name = "edge1"
cert_sha256 = "{p["edge_fp"]}"
hostnames = ["{HOST}"]
"""


def edge_toml(p: dict[str, Any], ks_addr: str, log: Path, origin_port: int) -> str:
    d = p["dir"]
    tls = (
        f'client_cert = "{d / "edge1.pem"}", client_key = "{d / "edge1.key"}", '
        f'ca = "{d / "ca.pem"}"'
    )
    return f"""# written by bench/edgecache/ebench.py
[edge]
listen = ["127.0.0.1:0"]
admin_listen = "127.0.0.1:0"
workers = 1
per_ip_rate_per_s = 0.0      # the load comes from one loopback address
per_ip_concurrent = 100000
max_connections = 100000
drain_timeout_s = 1.0
log_path = "{log}"
log_connections = false

[[edge.routes]]
sni = ["{HOST}"]
mode = "keyless"
certificate = "{p["site_cert"]}"
origins = ["127.0.0.1:{origin_port}"]
origin_ca = "{p["site_ca"]}"
proxy_protocol = "none"      # the origin is a plain nginx
keyserver = {{ addresses = ["{ks_addr}"], server_name = "keyserver.test", {tls} }}

[edge.routes.http]
upstream_connections_per_ip = 1000
"""


def nginx_common(n: Path) -> str:
    return f"""daemon off;
pid {n / "nginx.pid"};
error_log {n / "error.log"} warn;
"""


def nginx_temp(n: Path) -> str:
    return f"""    client_body_temp_path {n / "body"};
    fastcgi_temp_path {n / "fastcgi"};
    uwsgi_temp_path {n / "uwsgi"};
    scgi_temp_path {n / "scgi"};
    proxy_temp_path {n / "tmp"};
"""


def origin_conf(n: Path, port: int, p: dict[str, Any], www: Path) -> str:
    return f"""# written by bench/edgecache/ebench.py: the origin
{nginx_common(n)}master_process off;
worker_processes 1;
events {{ worker_connections 1024; }}
http {{
{nginx_temp(n)}    access_log {n / "access.log"};
    keepalive_requests 1000000;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {p["site_cert"]};
        ssl_certificate_key {p["site_key"]};
        ssl_protocols TLSv1.3;
        root {www};
        location / {{ add_header Cache-Control "public, max-age=3600"; }}
    }}
}}
"""


def front_conf(n: Path, port: int, origin_port: int, p: dict[str, Any]) -> str:
    return f"""# written by bench/edgecache/ebench.py: nginx proxy_cache, the baseline
{nginx_common(n)}master_process on;
worker_processes 1;
events {{ worker_connections 4096; }}
http {{
{nginx_temp(n)}    access_log off;
    keepalive_requests 100000000;
    keepalive_timeout 60s;
    proxy_cache_path {n / "cache"} levels=1:2 keys_zone=edgecache:8m max_size=1000m
                     inactive=600m;
    server {{
        listen 127.0.0.1:{port} ssl http2;
        ssl_certificate {p["site_cert"]};
        ssl_certificate_key {p["site_key"]};
        ssl_protocols TLSv1.3;
        ssl_session_cache shared:SSL:10m;
        ssl_session_tickets on;
        location / {{
            proxy_pass https://127.0.0.1:{origin_port};
            proxy_ssl_server_name on;
            proxy_ssl_name {HOST};
            proxy_ssl_protocols TLSv1.2 TLSv1.3;
            proxy_ssl_verify on;
            proxy_ssl_trusted_certificate {p["site_ca"]};
            proxy_http_version 1.1;
            proxy_cache edgecache;
            proxy_cache_revalidate on;
            add_header X-Cache-Status $upstream_cache_status always;
        }}
    }}
}}
"""


def start_nginx(out: Path, name: str, conf: str, pin: str = "") -> Proc:
    n = out / name
    for sub in ("body", "fastcgi", "uwsgi", "scgi", "cache", "tmp"):
        (n / sub).mkdir(parents=True, exist_ok=True)
    (n / "nginx.conf").write_text(conf)
    return Proc(
        name,
        ["nginx", "-p", str(n), "-c", str(n / "nginx.conf"), "-e", str(n / "error.log")],
        out,
        pin=pin,
    )


# ============================================================================ checks
def curl_get(url: str, cafile: Path, h2: bool, out: Path, tag: str) -> tuple[dict[str, str], bytes]:
    """Headers (lower-case names) and body of one GET made by curl."""
    out.mkdir(parents=True, exist_ok=True)
    hdr, body = out / f"{tag}.headers", out / f"{tag}.body"
    cmd = ["curl", "-sS", "--max-time", "20", "--cacert", str(cafile), "-D", str(hdr)]
    cmd += ["-o", str(body), "--http2" if h2 else "--http1.1", url]
    subprocess.run(cmd, check=True, timeout=30)
    heads: dict[str, str] = {}
    for line in hdr.read_text(errors="replace").splitlines():
        if line.startswith("HTTP/"):
            heads[":status"] = line.split()[1]
            heads[":version"] = line.split()[0]
        elif ":" in line:
            k, _, v = line.partition(":")
            heads[k.strip().lower()] = v.strip()
    return heads, body.read_bytes()


def check_front(
    name: str, port: int, www: Path, cafile: Path, out: Path, hit_header: str, hit_value: str
) -> list[str]:
    """Warm the cache, then every file over HTTP/1.1 and HTTP/2 must be a hit, byte for byte."""
    problems = []
    for path in FILES:
        want = (www / f"{path}.bin").read_bytes()
        url = f"https://{HOST}:{port}/{path}.bin"
        curl_get(url, cafile, False, out / "checks", f"{name}.{path}.warm")
        for h2 in (False, True):
            tag = f"{name}.{path}.{'h2' if h2 else 'h1'}"
            heads, body = curl_get(url, cafile, h2, out / "checks", tag)
            if heads.get(":status") != "200":
                problems.append(f"{tag}: status {heads.get(':status')}")
            if heads.get(":version", "").startswith("HTTP/2") != h2:
                problems.append(f"{tag}: version {heads.get(':version')}")
            if body != want:
                problems.append(f"{tag}: body differs ({len(body)} bytes, want {len(want)})")
            if heads.get(hit_header, "").lower() != hit_value:
                problems.append(f"{tag}: {hit_header}: {heads.get(hit_header)!r}, not a hit")
    return problems


def origin_requests(out: Path) -> int:
    with contextlib.suppress(OSError):
        return len((out / "origin" / "access.log").read_bytes().splitlines())
    return 0


# ============================================================================ loads
def run_wrk(out: Path, tag: str, port: int, path: str, a: argparse.Namespace) -> dict[str, Any]:
    url = f"https://{HOST}:{port}/{path}.bin"
    cmd = [
        "wrk",
        "-t1",
        f"-c{a.connections}",
        f"-d{max(1, round(a.seconds))}s",
        "--timeout",
        "10s",
        url,
    ]
    p = Proc(tag, cmd, out, pin=LOAD_CPU)
    p.wait(a.seconds + 30)
    text = p.stdout_path.read_text(errors="replace")
    m = re.search(r"(\d+) requests in ([\d.]+)(\w+)", text)
    if m is None:
        raise RuntimeError(f"{tag}: no wrk summary:\n{text}\n{p.stderr_path.read_text()}")
    errors = 0
    if e := re.search(r"Non-2xx or 3xx responses: (\d+)", text):
        errors += int(e.group(1))
    if e := re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text
    ):
        errors += sum(int(x) for x in e.groups())
    return {"responses": int(m.group(1)), "errors": errors}


def run_h2load(out: Path, tag: str, port: int, path: str, a: argparse.Namespace) -> dict[str, Any]:
    url = f"https://{HOST}:{port}/{path}.bin"
    cmd = [
        "h2load",
        "-t1",
        f"-c{a.connections}",
        f"-m{a.h2_streams}",
        "-D",
        str(max(1, round(a.seconds))),
        url,
    ]
    p = Proc(tag, cmd, out, pin=LOAD_CPU)
    p.wait(a.seconds + 30)
    text = p.stdout_path.read_text(errors="replace")
    m = re.search(
        r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
        r"(\d+) failed, (\d+) errored, (\d+) timeout",
        text,
    )
    s = re.search(r"status codes: (\d+) 2xx", text)
    if m is None or s is None:
        raise RuntimeError(f"{tag}: no h2load summary:\n{text}\n{p.stderr_path.read_text()}")
    if "h2" not in (re.search(r"Application protocol: (\S+)", text) or [""])[0]:
        raise RuntimeError(f"{tag}: h2load did not speak h2:\n{text}")
    ok = int(s.group(1))
    return {"responses": ok, "errors": int(m.group(3)) - ok + int(m.group(5))}


def run_newconn(
    out: Path, tag: str, port: int, path: str, resume: bool, cafile: Path, a: argparse.Namespace
) -> dict[str, Any]:
    ps = [
        Proc(
            f"{tag}.client{i}",
            [
                PY,
                str(HERE / "ebench.py"),
                "newconn",
                "--port",
                str(port),
                "--path",
                f"/{path}.bin",
                "--size",
                str(FILES[path]),
                "--cafile",
                str(cafile),
                "--seconds",
                str(a.seconds),
                "--threads",
                str(a.threads),
                *(["--resume"] if resume else []),
            ],
            out,
            pin=LOAD_CPU,
        )
        for i in range(a.procs)
    ]
    results = []
    for p in ps:
        p.wait(a.seconds + 60)
        results.append(p.last_json())
    return {
        "responses": sum(r["ok"] for r in results),
        "reused": sum(r["reused"] for r in results),
        "errors": sum(r["errors"] for r in results),
        "first_error": next((r["first_error"] for r in results if r["first_error"]), ""),
    }


def newconn_main(a: argparse.Namespace) -> int:
    """New connections, each one `GET path` with Connection: close, read to the end and checked
    (status, body length). --resume: each thread offers the session of its previous connection
    (TLS 1.3 tickets may be single use), else no session is ever offered (full handshakes)."""
    ctx = ssl.create_default_context(cafile=a.cafile)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_alpn_protocols(["http/1.1"])
    # Host as wrk, h2load and curl send it (with the port): the same cache key as the warm-up
    request = f"GET {a.path} HTTP/1.1\r\nHost: {HOST}:{a.port}\r\nConnection: close\r\n\r\n"
    lock = threading.Lock()
    state: dict[str, Any] = {"ok": 0, "reused": 0, "errors": 0, "first_error": ""}
    deadline = time.monotonic() + a.seconds

    def worker() -> None:
        session = None
        while time.monotonic() < deadline:
            try:
                with (
                    socket.create_connection(("127.0.0.1", a.port), timeout=10) as raw,
                    ctx.wrap_socket(raw, server_hostname=HOST, session=session) as s,
                ):
                    s.sendall(request.encode())
                    data = bytearray()
                    while chunk := s.recv(65536):
                        data += chunk
                    reused = s.session_reused
                    if a.resume:
                        session = s.session
                head, _, body = bytes(data).partition(b"\r\n\r\n")
                if not head.startswith(b"HTTP/1.1 200 ") or len(body) != a.size:
                    raise ValueError(f"bad response: {head[:60]!r}, {len(body)} bytes")
                with lock:
                    state["ok"] += 1
                    state["reused"] += int(reused)
            except (OSError, ValueError, ssl.SSLError) as exc:
                session = None
                with lock:
                    state["errors"] += 1
                    state["first_error"] = state["first_error"] or repr(exc)[:200]

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(a.threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(a.seconds + 30)
    print(json.dumps(state))
    return 0


# ============================================================================ the run
class Front:
    def __init__(self, label: str, proc: Proc, port: int, admin: str = "") -> None:
        self.label = label
        self.proc = proc
        self.port = port
        self.admin = admin  # blindfold's admin listener (metrics)
        self.results: dict[str, list[dict[str, Any]]] = {}


def measure(bench: Bench, front: Front, load: str) -> dict[str, Any]:
    a, out = bench.a, bench.out
    tag = f"{load}.{front.label.replace(' ', '_')}.{len(front.results.get(load, []))}"
    before_origin = origin_requests(out)
    hits0 = front_hits(front)
    ks0 = cpu_s(bench.ks.pid)
    c0 = tree_cpu(front.proc.pid)
    t0 = time.monotonic()
    if load.startswith("h1-"):
        res = run_wrk(out, tag, front.port, load[3:], a)
    elif load.startswith("h2-"):
        res = run_h2load(out, tag, front.port, load[3:], a)
    else:
        res = run_newconn(
            out, tag, front.port, "2k", load == "new-resumed", bench.pki["site_ca"], a
        )
    wall = time.monotonic() - t0
    res["cpu_s"] = tree_cpu(front.proc.pid) - c0
    res["ks_cpu_s"] = cpu_s(bench.ks.pid) - ks0
    res["wall_s"] = wall
    res["origin_requests"] = origin_requests(out) - before_origin
    if front.admin:
        res["hits"] = front_hits(front) - hits0
    front.results.setdefault(load, []).append(res)
    n = max(1, res["responses"])
    bench.note(
        f"{load:12} {front.label:24} {res['responses'] / wall:9.0f} resp/s "
        f"{1000 * res['cpu_s'] / n:7.3f} CPU-s/1k (+ks {1000 * res['ks_cpu_s'] / n:.3f}) "
        f"errors {res['errors']} origin {res['origin_requests']}"
        + (f" reused {res['reused']}" if "reused" in res else "")
    )
    return res


def front_hits(front: Front) -> float:
    if not front.admin:
        return 0.0
    return metric(
        http_get(f"http://{front.admin}/metrics"), "blindfold_keyless_cache_total", result="hit"
    )


class Bench:
    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.out: Path = a.out
        self.fronts: list[Front] = []

    def note(self, msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)
        with open(self.out / "progress.txt", "a") as f:
            f.write(msg + "\n")

    def run(self) -> int:
        a, out = self.a, self.out
        for tool in ("wrk", "h2load", "nginx", "curl", "taskset"):
            if shutil.which(tool) is None:
                raise RuntimeError(f"{tool} is missing: run bench/edgecache/run.sh (installs it)")
        self.pki = p = make_pki(out / "pki")
        www = out / "www"
        www.mkdir(exist_ok=True)
        for name, size in FILES.items():
            # fixed content (the same every run), not compressible by accident
            (www / f"{name}.bin").write_bytes(bytes((i * 7 + i // 251) & 0xFF for i in range(size)))
        origin_port = free_port()
        origin = start_nginx(
            out, "origin", origin_conf(out / "origin", origin_port, p, www), pin=LOAD_CPU
        )
        wait_port(origin_port, origin)
        (out / "keyserver.toml").write_text(keyserver_toml(p, out))
        for old in ("keyserver.log", "audit.log"):
            (out / old).unlink(missing_ok=True)
        self.ks = Proc(
            "keyserver",
            [PY, "-m", "blindfold", "keyserver", "--config", str(out / "keyserver.toml")],
            out,
            pin=LOAD_CPU,
        )
        ks_addr = self.ks.wait_json(out / "keyserver.log", "keyserver_ready")["listen"][0]
        for spec in a.edge or [f"blindfold={REPO / 'src'}"]:
            label, _, src = spec.partition("=")
            src_path = Path(src).resolve()
            if not (src_path / "blindfold" / "__init__.py").exists():
                raise RuntimeError(f"--edge {spec}: no blindfold package in {src_path}")
            tag = f"edge-{len(self.fronts)}"
            log = out / f"{tag}.log"
            log.unlink(missing_ok=True)
            (out / f"{tag}.toml").write_text(edge_toml(p, ks_addr, log, origin_port))
            env = {**os.environ, "PYTHONPATH": str(src_path)}
            if a.profile:  # cProfile in the worker (profhook/sitecustomize.py)
                (out / f"{tag}.prof").mkdir(exist_ok=True)
                env["PYTHONPATH"] += os.pathsep + str(HERE / "profhook")
                env["EDGECACHE_PROFILE"] = str(out / f"{tag}.prof")
            proc = Proc(
                tag,
                [PY, "-m", "blindfold", "edge", "--config", str(out / f"{tag}.toml")],
                out,
                pin=SERVER_CPU,
                env=env,
            )
            ready = proc.wait_json(log, "edge_ready")
            port = int(str(ready["listen"][0]).rpartition(":")[2])
            front = Front(label, proc, port, str(ready["admin"]))
            front.rev = git_rev_of(src_path)  # type: ignore[attr-defined]
            self.fronts.append(front)
        nport = free_port()
        ngx = start_nginx(
            out,
            "front-nginx",
            front_conf(out / "front-nginx", nport, origin_port, p),
            pin=SERVER_CPU,
        )
        wait_port(nport, ngx)
        self.fronts.append(Front("nginx proxy_cache", ngx, nport))
        problems: list[str] = []
        for f in self.fronts:
            header, value = (
                ("x-cache-status", "hit") if not f.admin else ("x-blindfold-cache", "hit")
            )
            problems += check_front(f.label, f.port, www, p["site_ca"], out, header, value)
        if problems:
            raise RuntimeError(
                "responses are not what the origin serves, or not hits:\n" + "\n".join(problems)
            )
        self.note("checked: every front serves both files byte for byte as cache hits, h1 and h2")
        loads = [x for x in a.loads.split(",") if x]
        for load in loads:
            if load not in LOADS:
                raise RuntimeError(f"unknown load {load!r}: one of {', '.join(LOADS)}")
        for _round in range(a.repeat):
            for load in loads:
                for f in self.fronts:  # alternated, same run
                    measure(self, f, load)
        self.report(loads)
        return 0

    def report(self, loads: list[str]) -> None:
        a = self.a
        ngx = self.fronts[-1]
        edges = self.fronts[:-1]
        ver = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip()
        lines = [
            "",
            f"bench/edgecache: {a.seconds} s per load, {a.repeat} round(s), wrk/h2load "
            f"-c{a.connections} (h2 -m{a.h2_streams}), new connections: {a.procs} x "
            f"{a.threads} Python ssl threads; server on CPU {SERVER_CPU}, load on CPU {LOAD_CPU}; "
            f"{ver}; results in {self.out}",
            "edges: " + ", ".join(f"{e.label} = {getattr(e, 'rev', '?')}" for e in edges),
            "CPU = server CPU-seconds per 1,000 responses (median of rounds; min-max if > 1)",
            "",
        ]
        head = "| load | nginx resp/s | nginx CPU |"
        rule = "|---|---:|---:|"
        for e in edges:
            head += f" {e.label} resp/s | {e.label} CPU | {e.label} / nginx |"
            rule += "---:|---:|---:|"
        lines += [head, rule]
        summary: dict[str, Any] = {"loads": {}}
        for load in loads:
            nres = ngx.results.get(load, [])
            ncpu = [1000 * r["cpu_s"] / max(1, r["responses"]) for r in nres]
            nrate = [r["responses"] / r["wall_s"] for r in nres]
            row = f"| {LOAD_TITLES[load]} | {med(nrate):,.0f} | {fmt(ncpu)} |"
            summary["loads"][load] = {"nginx": nres}
            for e in edges:
                res = e.results.get(load, [])
                cpu = [1000 * r["cpu_s"] / max(1, r["responses"]) for r in res]
                ks = [1000 * (r["cpu_s"] + r["ks_cpu_s"]) / max(1, r["responses"]) for r in res]
                rate = [r["responses"] / r["wall_s"] for r in res]
                ratio = [c / med(ncpu) for c in cpu] if ncpu and med(ncpu) > 0 else []
                cell = f"{med(ratio):.2f}x" if ratio else "?"
                if len(ratio) > 1:
                    cell += f" ({min(ratio):.2f}-{max(ratio):.2f})"
                if load == "new-full":
                    cell += f" ({med(ks) / med(ncpu):.2f}x with key server)"
                row += f" {med(rate):,.0f} | {fmt(cpu)} | {cell} |"
                summary["loads"][load][e.label] = res
            lines.append(row)
        bad = []
        for f in self.fronts:
            for load, res in f.results.items():
                for r in res:
                    if r["errors"]:
                        bad.append(
                            f"{f.label} {load}: {r['errors']} errors {r.get('first_error', '')}"
                        )
                    if r["origin_requests"]:
                        bad.append(f"{f.label} {load}: {r['origin_requests']} origin requests")
                    if load == "new-resumed" and r.get("reused", 0) < 0.9 * r["responses"]:
                        bad.append(
                            f"{f.label} {load}: only {r['reused']} of {r['responses']} resumed"
                        )
                    if load == "new-full" and r.get("reused", 0):
                        bad.append(f"{f.label} {load}: {r['reused']} resumed")
                    if f.admin and r.get("hits", r["responses"]) < r["responses"]:
                        bad.append(
                            f"{f.label} {load}: {r['hits']} hits for {r['responses']} responses"
                        )
        total_origin = sum(
            r["origin_requests"] for f in self.fronts for res in f.results.values() for r in res
        )
        lines.append("")
        lines.append(
            f"origin requests during the loads (0 = every response a cache hit): {total_origin}"
        )
        lines += [f"WARNING: {b}" for b in bad]
        text = "\n".join(lines)
        print(text)
        (self.out / "report.txt").write_text(text + "\n")
        (self.out / "results.json").write_text(json.dumps(summary, indent=1, default=str))


def med(values: list[float]) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[len(s) // 2] if len(s) % 2 else (s[len(s) // 2 - 1] + s[len(s) // 2]) / 2


def fmt(values: list[float]) -> str:
    if not values:
        return "?"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{med(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def git_rev_of(src: Path) -> str:
    try:
        top = subprocess.run(
            ["git", "-C", str(src), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(src), "diff", "--quiet", "HEAD", "--", "."], timeout=10
        ).returncode
        return (top or "?") + (" + uncommitted changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "?"


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="the whole benchmark")
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--seconds", type=float, default=5.0, help="per load and server")
    r.add_argument("--loads", default=",".join(LOADS), help="comma-separated: " + ", ".join(LOADS))
    r.add_argument(
        "--edge",
        action="append",
        metavar="LABEL=SRC",
        help="a blindfold source tree to measure (repeatable; default: this repo's src)",
    )
    r.add_argument("--repeat", type=int, default=1, help="rounds, fronts alternated in each")
    r.add_argument("--connections", type=int, default=32, help="wrk/h2load connections")
    r.add_argument("--h2-streams", type=int, default=1, help="h2load -m")
    r.add_argument("--procs", type=int, default=2, help="new-connection client processes")
    r.add_argument("--threads", type=int, default=8, help="threads per client process")
    r.add_argument("--budget", type=float, default=900.0)
    r.add_argument(
        "--profile",
        action="store_true",
        help="cProfile the edge workers (stats in the results directory, edge-N.prof/); "
        "slows them: CPU figures of such a run are not comparable",
    )
    n = sub.add_parser("newconn", help="new-connection load (internal)")
    n.add_argument("--port", type=int, required=True)
    n.add_argument("--path", required=True)
    n.add_argument("--size", type=int, required=True)
    n.add_argument("--cafile", required=True)
    n.add_argument("--seconds", type=float, default=5.0)
    n.add_argument("--threads", type=int, default=8)
    n.add_argument("--resume", action="store_true")
    a = ap.parse_args(argv)
    if a.cmd == "newconn":
        return newconn_main(a)
    a.out = a.out.resolve()
    a.out.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        return Bench(a).run()
    finally:
        Proc.stop_all()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
