#!/usr/bin/env python3
"""bench/cachetests: the keyless edge's shared cache on the public HTTP cache test suite
(http-tests/cache-tests, the suite behind cache-tests.fyi), with nginx's proxy_cache measured in
the same run against the same origin (see README.md beside this file).

  visitor (the suite's client, Node fetch) -> edge (keyless route, TLS 1.3, the key server signs)
      -> the suite's own server over verified TLS (it is the origin: headers pass unchanged)
  the suite's client -> nginx proxy_cache (HTTP) -> the same server over TLS

The suite is fetched at run time into the output directory (never into the repository): a
`git clone` of $CACHE_TESTS_REPO at a pinned commit, its Node dependencies from the npm registry.
Loopback only; every process it starts is stopped by PID; every wait has a deadline.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO))

from bench.benchlib import Proc, free_port, git_rev  # noqa: E402
from bench.keyless.kbench import SNI, keyserver_toml, make_pki  # noqa: E402

PY = sys.executable
PINNED = "b55b8bd"  # the suite commit issue 17 was measured at


def fetch_suite(out: Path, repo: str, commit: str) -> Path:
    suite = out / "cache-tests"
    if not (suite / ".git").exists():
        subprocess.run(["git", "clone", "-q", repo, str(suite)], check=True, timeout=300)
    subprocess.run(["git", "-C", str(suite), "checkout", "-q", commit], check=True, timeout=60)
    if not (suite / "node_modules" / "undici").exists():
        subprocess.run(
            ["npm", "install", "--omit=dev", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=suite,
            check=True,
            timeout=600,
        )
    return suite


def edge_toml(p: dict[str, object], ks_addr: str, log: Path, origin_port: int, extra: str) -> str:
    d = p["dir"]
    assert isinstance(d, Path)
    tls = (
        f'client_cert = "{d / "edge1.pem"}", client_key = "{d / "edge1.key"}", '
        f'ca = "{d / "ca.pem"}"'
    )
    return f"""# written by bench/cachetests/cachetests.py
[edge]
listen = ["127.0.0.1:0"]
admin_listen = "127.0.0.1:0"
workers = 1                  # one worker: one cache, as a single proxy would have
per_ip_rate_per_s = 0.0      # the whole suite comes from one loopback address
per_ip_concurrent = 100000
max_connections = 100000
drain_timeout_s = 1.0
log_path = "{log}"

[[edge.routes]]
sni = ["{SNI}", "*.{SNI}"]
mode = "keyless"
certificate = "{p["site_cert"]}"
origins = ["127.0.0.1:{origin_port}"]
origin_ca = "{p["site_ca"]}"
keyserver = {{ addresses = ["{ks_addr}"], server_name = "keyserver.test", {tls} }}
{extra}
[edge.routes.http]
upstream_connections_per_ip = 1000
"""


def nginx_conf(out: Path, port: int, origin_port: int, site_ca: Path) -> str:
    # the suite's docker/nginx/nginx.conf, over TLS to the same origin, paths in `out`
    n = out / "nginx"
    return f"""# written by bench/cachetests/cachetests.py
daemon off;
master_process off;
worker_processes 1;
pid {n / "nginx.pid"};
error_log {n / "error.log"} warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {n / "body"};
    fastcgi_temp_path {n / "fastcgi"};
    uwsgi_temp_path {n / "uwsgi"};
    scgi_temp_path {n / "scgi"};
    proxy_cache_path {n / "cache"} levels=1:2 keys_zone=my-cache:8m max_size=1000m
                     inactive=600m;
    proxy_temp_path {n / "tmp"};
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass https://127.0.0.1:{origin_port};
            proxy_ssl_server_name on;
            proxy_ssl_name {SNI};
            proxy_ssl_verify on;
            proxy_ssl_trusted_certificate {site_ca};
            proxy_cache my-cache;
            proxy_cache_revalidate on;
            proxy_http_version 1.1;
        }}
    }}
}}
"""


def wait_port(port: int, proc: Proc, timeout: float = 30.0) -> None:
    import socket

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        if not proc.alive():
            break
        time.sleep(0.05)
    raise RuntimeError(f"{proc.name} is not listening on {port}: {proc.stderr_path}")


def run_client(suite: Path, out: Path, name: str, base: str, env: dict[str, str]) -> Proc:
    return Proc(
        name,
        ["npm", "run", "--silent", "cli", f"--base={base}", "--prefix", str(suite)],
        out,
        env=env,
    )


def summarise(suite: Path, results: Path) -> dict[str, object]:
    done = subprocess.run(
        ["node", str(HERE / "summary.mjs"), str(suite), str(results)],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return dict(json.loads(done.stdout))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--repo", default="https://github.com/http-tests/cache-tests")
    ap.add_argument("--commit", default=PINNED)
    ap.add_argument("--no-nginx", action="store_true", help="measure the edge alone")
    ap.add_argument("--route-extra", default="", help="TOML lines added to the edge route")
    ap.add_argument("--timeout", type=float, default=900.0, help="for each client run")
    a = ap.parse_args()
    out: Path = a.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        return run(a, out)
    finally:
        Proc.stop_all()


def run(a: argparse.Namespace, out: Path) -> int:
    suite = fetch_suite(out, a.repo, a.commit)
    rev = subprocess.run(
        ["git", "-C", str(suite), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    p = make_pki(out / "pki")
    node_env = {
        **os.environ,
        "NODE_OPTIONS": f"--import={(HERE / 'loopback.mjs').as_uri()}",
        "NODE_EXTRA_CA_CERTS": str(p["site_ca"]),
    }
    # the origin: the suite's server over TLS with the site's certificate
    origin_port = free_port()
    server = Proc(
        "suite-server",
        ["node", str(suite / "test-engine" / "server" / "server.mjs")],
        out,
        env={
            **node_env,
            "npm_config_protocol": "https",
            "npm_config_port": str(origin_port),
            "npm_config_keyfile": str(p["site_key"]),
            "npm_config_certfile": str(p["site_cert"]),
            "npm_config_pidfile": str(out / "suite-server.pid"),
        },
    )
    wait_port(origin_port, server)
    # the key server and the edge
    (out / "keyserver.toml").write_text(keyserver_toml(p, out))
    for old in ("keyserver.log", "audit.log", "edge.log"):
        (out / old).unlink(missing_ok=True)
    ks = Proc(
        "keyserver",
        [PY, "-m", "blindfold", "keyserver", "--config", str(out / "keyserver.toml")],
        out,
    )
    ks_addr = ks.wait_json(out / "keyserver.log", "keyserver_ready")["listen"][0]
    (out / "edge.toml").write_text(
        edge_toml(p, ks_addr, out / "edge.log", origin_port, a.route_extra)
    )
    edge = Proc("edge", [PY, "-m", "blindfold", "edge", "--config", str(out / "edge.toml")], out)
    edge_addr = edge.wait_json(out / "edge.log", "edge_ready")["listen"][0]
    edge_port = int(str(edge_addr).rpartition(":")[2])
    clients = [
        (
            "blindfold",
            run_client(suite, out, "client-blindfold", f"https://{SNI}:{edge_port}", node_env),
        )
    ]
    if not a.no_nginx:
        nport = free_port()
        for sub in ("body", "fastcgi", "uwsgi", "scgi", "cache", "tmp"):
            (out / "nginx" / sub).mkdir(parents=True, exist_ok=True)
        (out / "nginx" / "nginx.conf").write_text(nginx_conf(out, nport, origin_port, p["site_ca"]))
        ngx = Proc(
            "nginx",
            [
                "nginx",
                "-p",
                str(out / "nginx"),
                "-c",
                str(out / "nginx" / "nginx.conf"),
                "-e",
                str(out / "nginx" / "error.log"),
            ],
            out,
        )
        wait_port(nport, ngx)
        clients.append(
            (
                "nginx proxy_cache",
                run_client(suite, out, "client-nginx", f"http://127.0.0.1:{nport}", node_env),
            )
        )
    rows = []
    for label, c in clients:
        c.wait(a.timeout)
        res = summarise(suite, c.stdout_path)
        counts = res["counts"]
        assert isinstance(counts, dict)
        rows.append((label, counts, res["failed"]))
        (out / f"{c.name}.summary.json").write_text(json.dumps(res, indent=1))
    ver = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip()
    print(
        f"\ncache-tests {rev} (shared-cache tests), blindfold {git_rev()}, {ver}; results in {out}"
    )
    cols = [
        "pass",
        "fail",
        "optional_fail",
        "setup_fail",
        "harness_fail",
        "dependency_fail",
        "retry",
        "yes",
        "no",
    ]
    print(
        "| cache | pass | required fail | optional fail | setup fail | harness fail "
        "| dependency fail | retry | check yes/no |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for label, counts, _ in rows:
        v = [counts.get(k, 0) for k in cols]
        print(f"| {label} | " + " | ".join(str(x) for x in v[:7]) + f" | {v[7]}/{v[8]} |")
    base = rows[-1][1].get("pass", 0) if len(rows) > 1 else 0
    if base:
        print(f"passes, blindfold / nginx: {rows[0][1].get('pass', 0) / base:.2f}")
    for label, _, failed in rows[:1]:
        print(f"\n{label}: what does not pass")
        assert isinstance(failed, dict)
        for tid, (kind, why) in sorted(failed.items()):
            print(f"  {kind:16} {tid}: {why}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
