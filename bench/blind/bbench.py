#!/usr/bin/env python3
"""bench/blind: blind delivery's costs, each beside a baseline measured in the same run (see
README.md beside this file).

  bbench.py run [options]     the whole benchmark (what run.sh calls); prints the table
  bbench.py client ...        a load process: threads, each one keep-alive HTTPS connection
  bbench.py seal ...          seal_tree on a tree: first seal, then a re-seal (nothing changed)
  bbench.py decrypt ...       ece.open_all / ece.Opener vs raw AES-128-GCM on one blob
  bbench.py report DIR        print the table again from DIR/results.json

Runs with the project's venv python (it imports blindfold). Loopback only; every process it
starts is stopped by its PID; every load is bounded by a count and a time.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import json
import os
import random
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

from bench.benchlib import (  # noqa: E402
    TICK,
    Proc,
    cpu_s,
    free_port,
    git_rev,
    http_get,
    pct,
    sys_s,
)

PY = sys.executable
CDN = "cdn.example.test"
SITE = "example.test"
NGINX = "/usr/sbin/nginx"
ROUTE = "cdn"
READ_CHUNK = 1 << 20


# ============================================================================ small helpers
def descendants(pid: int) -> list[int]:
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{p}/task").iterdir():
                with contextlib.suppress(OSError):
                    kids = [int(k) for k in (task / "children").read_text().split()]
                    out += kids
                    todo += kids
    return out


def machine() -> dict[str, float]:
    """CPU-seconds from /proc/stat: busy (all but idle and iowait) and irq + softirq (kernel
    work that no process is charged for: on loopback, delivering the bytes)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal ...
    return {
        "busy": (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / TICK,
        "irq": (v[5] + v[6]) / TICK,
        "steal": v[7] / TICK,
    }


def labelled(text: str, name: str, label: str, **labels: str) -> dict[str, float]:
    """{value of `label`: sample} for the samples of `name` matching `labels`."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name + "{"):
            continue
        key, _, value = line.rpartition(" ")
        have = dict(re.findall(r'(\w+)="([^"]*)"', key))
        if all(have.get(k) == v for k, v in labels.items()) and label in have:
            out[have[label]] = out.get(have[label], 0.0) + float(value)
    return out


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)i?B?\s*", text.upper())
    if m is None:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 64K, 1M, 50M)")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def parse_mix(text: str) -> tuple[int, int, int]:
    """'COUNT:MIN-MAX', e.g. '200:64K-1M' -> (200, 65536, 1048576)."""
    m = re.fullmatch(r"(\d+):([^-]+)-(.+)", text.strip())
    if m is None:
        raise argparse.ArgumentTypeError(f"not COUNT:MIN-MAX: {text!r} (e.g. 200:64K-1M)")
    n, lo, hi = int(m.group(1)), parse_size(m.group(2)), parse_size(m.group(3))
    if lo < 1 or hi < lo:
        raise argparse.ArgumentTypeError(f"bad size range in {text!r}")
    return n, lo, hi


def fmt_size(n: float) -> str:
    for unit, div in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= div:
            return f"{n / div:.3g} {unit}"
    return f"{n:.0f} B"


# ============================================================================ inputs
def make_pki(d: Path) -> dict[str, Path]:
    """Throwaway certificates: one CA; cdn.example.test (served by the edge's blind route and
    by nginx: the same P-256 certificate and key) and example.test (the origin agent)."""
    from blindfold import pki

    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    ca = pki.make_ca("blindfold bench/blind CA")
    ca.write(d / "ca.pem")
    pki.issue(ca, [CDN]).write(d / "cdn.pem", d / "cdn.key")
    pki.issue(ca, [SITE, "127.0.0.1"]).write(d / "site.pem", d / "site.key")
    return {
        "ca": d / "ca.pem",
        "cdn_cert": d / "cdn.pem",
        "cdn_key": d / "cdn.key",
        "site_cert": d / "site.pem",
        "site_key": d / "site.key",
    }


def make_tree(src: Path, mixes: dict[str, tuple[int, int, int]], seed: int) -> dict[str, Any]:
    """Files of random bytes (incompressible, like media), sizes log-uniform in each range
    (stratified, so a few files still span it): src/<kind>/<n>.bin."""
    rng = random.Random(seed)
    if src.exists():
        shutil.rmtree(src)
    files: dict[str, str] = {}
    total = 0
    for kind, (n, lo, hi) in mixes.items():
        (src / kind).mkdir(parents=True)
        for i in range(n):
            u = (i + rng.random()) / n  # stratified: the whole range is covered
            size = round(lo * (hi / lo) ** u) if hi > lo else lo
            (src / kind / f"{i:04d}.bin").write_bytes(rng.randbytes(size))
            files[f"/{kind}/{i:04d}.bin"] = kind
            total += size
    return {"files": files, "bytes": total}


def origin_toml(p: dict[str, Path], out: Path, sealed: Path, src: Path) -> str:
    return f"""# written by bench/blind/bbench.py: the origin agent, serving the sealed store
[origin]
upstream = "http://127.0.0.1:{free_port()}"   # the application: never used here
listen = ["127.0.0.1:0"]
admin_listen = "127.0.0.1:0"
trusted_edges = ["127.0.0.0/8"]
proxy_protocol = "required"
access_log = false
log_path = "{out / "origin.log"}"

[[origin.certificates]]
cert = "{p["site_cert"]}"
key = "{p["site_key"]}"

[origin.blind]
dir = "{sealed}"
source_dir = "{src}"
site_names = ["{SITE}"]
"""


def edge_toml(
    p: dict[str, Path], out: Path, origin_port: int, a: argparse.Namespace, sealed: Path
) -> str:
    return f"""# written by bench/blind/bbench.py: one blind route for {CDN}
[edge]
listen = ["127.0.0.1:0"]
admin_listen = "127.0.0.1:0"
workers = {a.workers}
per_ip_rate_per_s = 0.0      # the load comes from a few loopback addresses
per_ip_concurrent = 100000
max_connections = 100000
drain_timeout_s = 1.0
log_path = "{out / "edge.log"}"
log_connections = false

[[edge.routes]]
name = "{ROUTE}"
sni = ["{CDN}"]
mode = "blind"
certificate = "{p["cdn_cert"]}"
key = "{p["cdn_key"]}"
origins = ["127.0.0.1:{origin_port}"]
origin_ca = "{p["ca"]}"
origin_server_name = "{SITE}"
proxy_protocol = "v2"

[edge.routes.blind]
cache_dir = "{out / "edge-cache"}"
manifest_public_key = "{sealed / "manifest-public.pem"}"
memory_cache_bytes = {a.memory_cache_bytes}
memory_max_object_bytes = {a.memory_max_object_bytes}
"""


def nginx_conf(p: dict[str, Path], out: Path, port: int, blobs: Path, workers: int) -> str:
    tmp = out / "nginx-tmp"
    return f"""# written by bench/blind/bbench.py: the same blobs, served statically
user root;                       # the results directory is private (0700)
worker_processes {workers};
daemon off;                      # a child of the benchmark, stopped by its PID
master_process on;
pid {out / "nginx.pid"};
error_log {out / "nginx.error.log"} warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;                 # (not used under TLS without kTLS: nginx reads + SSL_write)
    tcp_nopush on;
    keepalive_timeout 75s;
    keepalive_requests 1000000;  # the edge has no per-connection request cap either
    default_type application/octet-stream;
    types {{ }}
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{
        listen 127.0.0.1:{port} ssl http2;   # nginx 1.22: http2 on the listen line
        server_name {CDN};
        ssl_certificate {p["cdn_cert"]};
        ssl_certificate_key {p["cdn_key"]};
        ssl_protocols TLSv1.2 TLSv1.3;
        location /b/ {{
            alias {blobs}/;
            add_header cache-control "public, max-age=31536000, immutable";
        }}
    }}
}}
"""


# ============================================================================ client load
def client_main(a: argparse.Namespace) -> int:
    """--threads threads, each with one keep-alive HTTPS connection (HTTP/1.1, blocking `ssl`
    with certificate verification, SNI cdn.example.test) from its own source address, fetching
    GET /b/<id> over its own shuffled order of the ids, round and round, until --max-requests or
    --seconds. Connections are made before the clock starts. --once: the ids are split between
    the threads and each fetched exactly once (--verify: check each body's SHA-256)."""
    items: list[list[Any]] = json.loads(Path(a.ids).read_text())  # [id, size, blob_sha256]
    ctx = ssl.create_default_context(cafile=a.cafile)
    ctx.set_alpn_protocols(["http/1.1"])
    sources = a.sources.split(",")
    n = a.threads
    barrier = threading.Barrier(n + 1)
    go = threading.Event()
    lock = threading.Lock()
    state: dict[str, Any] = {
        "ok": 0,
        "bytes": 0,
        "errors": {},
        "lat": [],
        "tls": set(),
        "end": 0.0,
        "finished": [],
    }

    class Conn(http.client.HTTPSConnection):
        source = "127.0.0.1"

        def connect(self) -> None:
            raw = socket.create_connection((a.host, a.port), a.timeout, (self.source, 0))
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sock = ctx.wrap_socket(raw, server_hostname=CDN)

    def error(kind: str) -> None:
        with lock:
            state["errors"][kind] = state["errors"].get(kind, 0) + 1

    def worker(idx: int) -> None:
        if a.once:
            order = items[idx::n]
        else:
            order = list(items)
            random.Random(a.seed * 7919 + idx).shuffle(order)
        conn = Conn(CDN, a.port, timeout=a.timeout, context=ctx)
        conn.source = sources[idx % len(sources)]
        buf = bytearray(READ_CHUNK)
        view = memoryview(buf)
        lat: list[float] = []
        ok = nbytes = 0
        try:
            conn.connect()
            assert isinstance(conn.sock, ssl.SSLSocket)
            with lock:
                state["tls"].add(f"{conn.sock.version()} {conn.sock.cipher()[0]}")
        except (OSError, ssl.SSLError) as exc:
            error(f"connect:{type(exc).__name__}")
        try:
            barrier.wait(a.timeout + 30)
        except threading.BrokenBarrierError:
            return
        go.wait(a.timeout + 30)
        end = state["end"]
        i = 0
        while (i < len(order) if a.once else ok < a.max_requests) and time.monotonic() < end:
            blob, size, digest = order[i % len(order)]
            i += 1
            t0 = time.perf_counter()
            try:
                conn.request("GET", f"/b/{blob}")
                resp = conn.getresponse()
                length = resp.length
                if resp.status != 200 or length is None:
                    resp.read()
                    error(f"status:{resp.status}")
                    continue
                h = hashlib.sha256() if a.verify else None
                got = 0
                while got < length:
                    k = resp.readinto(view[: min(READ_CHUNK, length - got)])
                    if not k:
                        break
                    if h is not None:
                        h.update(view[:k])
                    got += k
                dt = time.perf_counter() - t0
                if got != length or length != size:
                    error("short_or_wrong_size")
                    conn.close()
                    continue
                if h is not None and h.hexdigest() != digest:
                    error("digest_mismatch")
                    continue
                lat.append(dt)
                ok += 1
                nbytes += got
            except (OSError, ssl.SSLError, http.client.HTTPException) as exc:
                error(type(exc).__name__)
                conn.close()  # the next request reconnects
        conn.close()
        with lock:
            state["ok"] += ok
            state["bytes"] += nbytes
            state["lat"].extend(lat)
            state["finished"].append(time.monotonic())

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    try:
        barrier.wait(a.timeout + 30)  # every connection is set up (or failed)
    except threading.BrokenBarrierError:
        pass
    cpu0 = time.process_time()
    t0 = time.monotonic()
    state["end"] = t0 + a.seconds
    go.set()
    for t in threads:
        t.join(a.seconds + a.timeout + 10)
    elapsed = (max(state["finished"]) if state["finished"] else time.monotonic()) - t0
    lat = state["lat"]
    print(
        json.dumps(
            {
                "ok": state["ok"],
                "bytes": state["bytes"],
                "errors": state["errors"],
                "elapsed_s": elapsed,
                "cpu_s": time.process_time() - cpu0,
                "total_cpu_s": time.process_time(),
                "tls": sorted(state["tls"]),
                "lat_ms": [round(x * 1e3, 3) for x in lat],
            }
        ),
        flush=True,
    )
    return 0


# ============================================================================ seal / decrypt
def seal_main(a: argparse.Namespace) -> int:
    """blindfold.blind.sealer.seal_tree: a first seal into an empty OUT, then a re-seal of the
    unchanged tree (every file read and hashed, every blob's digest checked, nothing written but
    the manifest). Wall and CPU time of each."""
    from blindfold.blind import sealer

    key = sealer.load_signing_key(a.signing_key, create=True)
    secret = sealer.load_id_secret(a.id_secret, create=True)
    opts = sealer.SealOptions(record_size=a.record_size)
    res: dict[str, Any] = {}
    for label in ("first", "reseal"):
        c0, t0 = time.process_time(), time.perf_counter()
        rep = sealer.seal_tree(a.src, a.out, key, secret, opts)
        res[label] = {
            "wall_s": time.perf_counter() - t0,
            "cpu_s": time.process_time() - c0,
            "files": rep.files,
            "sealed": rep.sealed,
            "reused": rep.reused,
            "plain_bytes": rep.plain_bytes,
            "sealed_bytes": rep.sealed_bytes,
            "line": rep.line(),
        }
    print(json.dumps(res), flush=True)
    return 0


def decrypt_main(a: argparse.Namespace) -> int:
    """On one sealed blob of --mb MB (random plaintext, rs = --record-size, Padmé padding like
    `blindfold seal`): ece.open_all on the whole blob, ece.Opener fed --chunk bytes at a time
    (as from a socket), and the baseline: AESGCM.decrypt of the same plaintext encrypted in
    64 KiB records (cryptography, no framing). Best of --repeat, plaintext MB/s (wall, one
    thread); raw AESGCM encrypt and ece.seal for reference."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from blindfold.core import ece

    size = int(a.mb * 1e6)
    plain = os.urandom(size)
    key = os.urandom(ece.KEY_BYTES)
    pad_to = ece.padme(ece.sealed_size(size, a.record_size))
    res: dict[str, Any] = {"plain_bytes": size, "rs": a.record_size, "chunk": a.chunk}

    def best(fn: Any) -> tuple[float, Any]:
        times = []
        out = None
        for _ in range(a.repeat):
            t0 = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t0)
        return min(times), out

    t, blob = best(lambda: ece.seal(plain, key, rs=a.record_size, pad_to=pad_to))
    res["sealed_bytes"] = len(blob)
    res["seal_s"] = t

    t, got = best(lambda: ece.open_all(blob, key))
    assert got == plain
    res["open_all_s"] = t

    def stream() -> int:
        op = ece.Opener(key)
        view = memoryview(blob)
        n = 0
        for i in range(0, len(blob), a.chunk):
            for part in op.feed(view[i : i + a.chunk]):
                n += len(part)
        n += len(op.finish())
        return n

    t, n = best(stream)
    assert n == size
    res["opener_s"] = t

    rec = 65536 - 16  # 64 KiB ciphertext records, like rs = 65536
    aead = AESGCM(key)
    nonce = os.urandom(12)

    def enc() -> list[bytes]:
        pv = memoryview(plain)
        return [
            aead.encrypt(nonce[:4] + i.to_bytes(8, "big"), pv[i : i + rec], None)
            for i in range(0, size, rec)
        ]

    t, chunks = best(enc)
    res["raw_encrypt_s"] = t

    def dec() -> int:
        return sum(
            len(aead.decrypt(nonce[:4] + (i * rec).to_bytes(8, "big"), c, None))
            for i, c in enumerate(chunks)
        )

    t, n = best(dec)
    assert n == size
    res["raw_decrypt_s"] = t
    print(json.dumps(res), flush=True)
    return 0


# ============================================================================ the run
class Bench:
    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.out: Path = a.out
        self.deadline = time.monotonic() + a.budget
        self.r: dict[str, Any] = {}
        self.t_start = time.monotonic()

    def check_time(self, need: float, what: str) -> None:
        if time.monotonic() + need > self.deadline:
            raise BudgetError(
                f"time budget (--budget {self.a.budget:g} s) would be exceeded "
                f"by {what} (~{need:.0f} s); results so far are kept"
            )

    def note(self, msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)
        with open(self.out / "progress.txt", "a") as f:
            f.write(msg + "\n")

    def py(self, name: str, *args: str, pin: str = "") -> Proc:
        return Proc(name, [PY, str(HERE / "bbench.py"), *args], self.out, pin=pin)

    # ---------------------------------------------------------------- inputs, part 2
    def prepare(self) -> None:
        a = self.a
        self.pki = make_pki(self.out / "pki")
        self.src = self.out / "tree" / "src"
        self.sealed = self.out / "tree" / "sealed"
        mixes = {"small": a.small, "large": a.large}
        mixes = {k: v for k, v in mixes.items() if v[0] > 0}
        desc = ", ".join(
            f"{v[0]} {k} files {fmt_size(v[1])}-{fmt_size(v[2])}" for k, v in mixes.items()
        )
        self.note(f"[0] tree: {desc}")
        self.tree = make_tree(self.src, mixes, a.seed)
        if self.sealed.exists():
            shutil.rmtree(self.sealed)
        self.check_time(10 + self.tree["bytes"] / 100e6, "sealing")
        self.note(
            f"[2] seal_tree: {fmt_size(self.tree['bytes'])} in "
            f"{len(self.tree['files'])} files, rs = {a.record_size}"
        )
        p = self.py(
            "seal",
            "seal",
            "--src",
            str(self.src),
            "--out",
            str(self.sealed),
            "--signing-key",
            str(self.out / "tree" / "manifest.pem"),
            "--id-secret",
            str(self.out / "tree" / "id-secret"),
            "--record-size",
            str(a.record_size),
        )
        p.wait(max(60.0, self.deadline - time.monotonic()))
        self.r["seal"] = p.last_json()
        for label in ("first", "reseal"):
            self.note(f"    {label}: {self.r['seal'][label]['line']}")
        doc = json.loads((self.sealed / "manifest.json").read_text())
        files = json.loads(doc["payload"])["files"]
        self.ids: dict[str, list[list[Any]]] = {}
        for path, e in files.items():
            kind = self.tree["files"][path]
            self.ids.setdefault(kind, []).append([e["id"], e["sealed_size"], e["blob_sha256"]])
        for kind, items in self.ids.items():
            (self.out / f"ids-{kind}.json").write_text(json.dumps(items))
        (self.out / "ids-all.json").write_text(
            json.dumps([x for items in self.ids.values() for x in items])
        )

    # ---------------------------------------------------------------- part 3
    def part_decrypt(self) -> None:
        a = self.a
        self.check_time(10 + a.decrypt_mb * a.decrypt_repeat * 0.05, "the decrypt measurement")
        self.note(
            f"[3] decrypt: one {a.decrypt_mb:g} MB blob, rs = {a.record_size}, best of "
            f"{a.decrypt_repeat}"
        )
        m0, t0 = machine(), time.monotonic()
        p = self.py(
            "decrypt",
            "decrypt",
            "--mb",
            str(a.decrypt_mb),
            "--record-size",
            str(a.record_size),
            "--repeat",
            str(a.decrypt_repeat),
        )
        p.wait(max(60.0, self.deadline - time.monotonic()))
        r = p.last_json()
        m1, wall = machine(), time.monotonic() - t0
        # one thread: anything beyond one core (less the kernel's irq work) is someone else
        r["other_cores"] = max(
            0.0, (m1["busy"] - m0["busy"] - (m1["irq"] - m0["irq"])) / wall - 1.0
        )
        self.r["decrypt"] = r
        mb = r["plain_bytes"] / 1e6
        self.note(
            f"    open_all {mb / r['open_all_s']:.0f} MB/s, Opener {mb / r['opener_s']:.0f}"
            f" MB/s, raw AESGCM {mb / r['raw_decrypt_s']:.0f} MB/s"
        )

    # ---------------------------------------------------------------- part 1: servers
    def start_servers(self) -> None:
        a = self.a
        out = self.out
        (out / "origin.toml").write_text(origin_toml(self.pki, out, self.sealed, self.src))
        (out / "origin.log").unlink(missing_ok=True)
        self.origin = Proc(
            "origin", [PY, "-m", "blindfold", "origin", "--config", str(out / "origin.toml")], out
        )
        ready = self.origin.wait_json(out / "origin.log", "origin_ready")
        origin_port = int(ready["listen"][0].rpartition(":")[2])

        (out / "edge.toml").write_text(edge_toml(self.pki, out, origin_port, a, self.sealed))
        (out / "edge.log").unlink(missing_ok=True)
        if (out / "edge-cache").exists():
            shutil.rmtree(out / "edge-cache")
        self.edge = Proc(
            "edge",
            [PY, "-m", "blindfold", "edge", "--config", str(out / "edge.toml")],
            out,
            pin=a.pin_servers,
        )
        ready = self.edge.wait_json(out / "edge.log", "edge_ready")
        self.edge_port = int(ready["listen"][0].rpartition(":")[2])
        self.edge_admin = ready["admin"]
        end = time.monotonic() + 15
        while len(descendants(self.edge.pid)) < a.workers and time.monotonic() < end:
            time.sleep(0.05)
        self.edge_workers = descendants(self.edge.pid)
        if len(self.edge_workers) != a.workers:
            raise RuntimeError(f"edge: expected {a.workers} workers, found {self.edge_workers}")

        self.nginx_port = free_port()
        (out / "nginx-tmp").mkdir(exist_ok=True)
        (out / "nginx.conf").write_text(
            nginx_conf(self.pki, out, self.nginx_port, self.sealed / "blobs", a.workers)
        )
        self.nginx = Proc(
            "nginx",
            [
                NGINX,
                "-p",
                str(out),
                "-c",
                str(out / "nginx.conf"),
                "-e",
                str(out / "nginx.error.log"),
            ],
            out,
            pin=a.pin_servers,
        )
        end = time.monotonic() + 15
        while time.monotonic() < end:
            kids = descendants(self.nginx.pid)
            if len(kids) >= a.workers and self._port_open(self.nginx_port):
                break
            if not self.nginx.alive():
                raise RuntimeError("nginx exited:\n" + (out / "nginx.error.log").read_text())
            time.sleep(0.05)
        self.nginx_workers = descendants(self.nginx.pid)
        self.r["pids"] = {
            "edge": {
                str(self.edge.pid): "master",
                **{str(p): worker_name(p, i) for i, p in enumerate(self.edge_workers)},
            },
            "nginx": {
                str(self.nginx.pid): "master",
                **{str(p): f"w{i}" for i, p in enumerate(self.nginx_workers)},
            },
            "origin": self.origin.pid,
        }
        self.note(
            f"    origin pid {self.origin.pid}; edge pid {self.edge.pid} workers "
            f"{self.edge_workers} port {self.edge_port}; nginx pid {self.nginx.pid} "
            f"workers {self.nginx_workers} port {self.nginx_port}"
        )

    @staticmethod
    def _port_open(port: int) -> bool:
        with socket.socket() as s:
            s.settimeout(0.5)
            return s.connect_ex(("127.0.0.1", port)) == 0

    def sources(self, n: int) -> list[str]:
        """`n` loopback client addresses, the i-th steered by the edge's BPF program (by client
        address) to worker i % workers: each worker gets the same number of clients. nginx
        gets the same addresses (its kernel accept queue is shared by its workers)."""
        from blindfold.io.listeners import steer_index

        w = self.a.workers
        per: dict[int, list[str]] = {i: [] for i in range(w)}
        for i in range(1, 60000):
            ip = f"127.0.{20 + i // 250}.{i % 250 + 1}"
            k = steer_index(ip, w)
            if len(per[k]) < -(-n // w):
                per[k].append(ip)
            if all(len(v) >= -(-n // w) for v in per.values()):
                break
        return [per[i % w][i // w] for i in range(n)]

    def edge_metrics(self) -> str:
        return http_get(f"http://{self.edge_admin}/metrics")

    def edge_results(self) -> dict[str, float]:
        return labelled(
            self.edge_metrics(), "blindfold_blind_requests_total", "result", route=ROUTE
        )

    def clients(
        self,
        tag: str,
        port: int,
        ids_file: Path,
        *,
        procs: int,
        threads: int,
        seconds: float,
        sources: list[str],
        once: bool = False,
        verify: bool = False,
        seed: int = 1,
    ) -> dict[str, Any]:
        ps = []
        for i in range(procs):
            src = sources[i * threads : (i + 1) * threads] or sources[:1]
            args = [
                "client",
                "--port",
                str(port),
                "--cafile",
                str(self.pki["ca"]),
                "--ids",
                str(ids_file),
                "--threads",
                str(threads),
                "--seconds",
                str(seconds),
                "--max-requests",
                str(self.a.max_requests),
                "--sources",
                ",".join(src),
                "--seed",
                str(seed * 100 + i),
            ]
            if once:
                args.append("--once")
            if verify:
                args.append("--verify")
            ps.append(self.py(f"{tag}.client{i}", *args, pin=self.a.pin_clients))
        t0 = time.monotonic()
        results = []
        for p in ps:
            p.wait(seconds + 60 - (time.monotonic() - t0))
            results.append(p.last_json())
        errors: dict[str, int] = {}
        for r in results:
            for k, v in r["errors"].items():
                errors[k] = errors.get(k, 0) + v
        lat = [x for r in results for x in r["lat_ms"]]
        return {
            "ok": sum(r["ok"] for r in results),
            "bytes": sum(r["bytes"] for r in results),
            "errors": errors,
            "elapsed_s": max(r["elapsed_s"] for r in results),
            "client_cpu_s": sum(r["cpu_s"] for r in results),
            "client_total_cpu_s": sum(r["total_cpu_s"] for r in results),
            "tls": sorted({t for r in results for t in r["tls"]}),
            "lat_ms": lat,
        }

    def warm(self) -> None:
        """Every blob fetched once from each edge worker (its own cache: the first pull is a
        miss, written to memory and disk), bodies checked against the manifest; the same pass
        against nginx (its files into the page cache, its answers checked too)."""
        a = self.a
        sealed = sum(x[1] for items in self.ids.values() for x in items)
        self.check_time(15 + sealed * (a.workers + 1) / 100e6, "the warm-up")
        ids = self.out / "ids-all.json"
        self.note(
            f"[1] warm-up: every blob once per edge worker ({a.workers}), checked; once from nginx"
        )
        before = self.edge_results()
        srcs = self.sources(a.workers)
        res = {}
        for w in range(a.workers):
            res[f"edge_w{w}"] = self.clients(
                f"warm.edge.w{w}",
                self.edge_port,
                ids,
                procs=1,
                threads=2,
                seconds=120,
                sources=[srcs[w]] * 2,
                once=True,
                verify=True,
            )
        res["nginx"] = self.clients(
            "warm.nginx",
            self.nginx_port,
            ids,
            procs=1,
            threads=2,
            seconds=120,
            sources=srcs[:1] * 2,
            once=True,
            verify=True,
        )
        after = self.edge_results()
        n = sum(len(v) for v in self.ids.values())
        text = self.edge_metrics()
        cache = {
            f"{tier}_{what}": v
            for what, name in (
                ("blobs", "blindfold_blind_cache_blobs"),
                ("bytes", "blindfold_blind_cache_bytes"),
            )
            for tier, v in labelled(text, name, "tier", route=ROUTE).items()
        }
        self.r["warm"] = {
            "blobs": n,
            "edge_results": {k: after.get(k, 0) - before.get(k, 0) for k in after},
            "cache": cache,
            "ok": {k: v["ok"] for k, v in res.items()},
            "errors": {k: v["errors"] for k, v in res.items() if v["errors"]},
        }
        self.note(f"    {self.r['warm']}")
        bad = {k: v for k, v in self.r["warm"]["ok"].items() if v != n}
        if bad or self.r["warm"]["errors"]:
            raise RuntimeError(
                f"warm-up incomplete: {bad} of {n}; errors {self.r['warm']['errors']}"
            )

    def load(self, server: str, kind: str, rnd: int) -> dict[str, Any]:
        a = self.a
        port = self.edge_port if server == "edge" else self.nginx_port
        proc = self.edge if server == "edge" else self.nginx
        pids = [proc.pid, *(self.edge_workers if server == "edge" else self.nginx_workers)]
        ours = [p.pid for p in Proc.registry if p.alive()]
        ours = sorted(set(ours + [d for p in ours for d in descendants(p)]))
        sources = self.sources(a.clients)
        threads = -(-a.clients // a.client_procs)
        time.sleep(0.5)  # let the previous load's connections close
        res0 = self.edge_results() if server == "edge" else {}
        c0 = {p: cpu_s(p) for p in pids}
        k0 = sum(sys_s(p) for p in pids)
        o0 = sum(cpu_s(p) for p in ours)
        me0 = time.process_time()
        m0, t0 = machine(), time.monotonic()
        r = self.clients(
            f"r{rnd}.{kind}.{server}",
            port,
            self.out / f"ids-{kind}.json",
            procs=a.client_procs,
            threads=threads,
            seconds=a.seconds,
            sources=sources,
            seed=rnd,
        )
        time.sleep(0.2)
        c1 = {p: cpu_s(p) for p in pids}
        r["server_sys_s"] = sum(sys_s(p) for p in pids) - k0
        wall = time.monotonic() - t0
        m1 = machine()
        o1 = sum(cpu_s(p) for p in ours)
        r["server_cpu_s"] = sum(c1.values()) - sum(c0.values())
        r["cpu_by_pid"] = {str(p): round(c1[p] - c0[p], 3) for p in pids}
        r["measure_wall_s"] = wall
        mine = (o1 - o0) + (time.process_time() - me0) + r["client_total_cpu_s"]
        r["irq_cores"] = (m1["irq"] - m0["irq"]) / wall
        r["steal_cores"] = (m1["steal"] - m0["steal"]) / wall
        r["other_cores"] = max(0.0, m1["busy"] - m0["busy"] - (m1["irq"] - m0["irq"]) - mine) / wall
        if server == "edge":
            res1 = self.edge_results()
            r["edge_results"] = {k: res1.get(k, 0) - res0.get(k, 0) for k in res1}
        lat = r.pop("lat_ms")
        r["lat_p50_ms"], r["lat_p99_ms"] = pct(lat, 0.5), pct(lat, 0.99)
        r["lat_n"] = len(lat)
        r["lat_file"] = f"r{rnd}.{kind}.{server}.lat.json"
        (self.out / r["lat_file"]).write_text(json.dumps(lat))
        self.note(
            f"    round {rnd} {kind:<5} {server:<5}: {r['ok']} requests "
            f"{r['bytes'] / 1e6:.0f} MB in {r['elapsed_s']:.1f} s = "
            f"{r['bytes'] / 1e6 / r['elapsed_s']:.0f} MB/s; server cpu "
            f"{r['server_cpu_s']:.2f} s {r['cpu_by_pid']}; errors {r['errors'] or 0}"
        )
        return r

    def part_serve(self) -> None:
        a = self.a
        self.check_time(20, "starting the servers")
        self.note(
            f"[1] serving: origin agent, blindfold edge (workers = {a.workers}), nginx "
            f"(worker_processes = {a.workers})"
        )
        self.start_servers()
        self.warm()
        kinds = [k for k in ("small", "large") if k in self.ids]
        res: dict[str, Any] = {k: {"nginx": [], "edge": []} for k in kinds}
        self.r["serve"] = res
        self.note(
            f"[1] load: {a.clients} keep-alive HTTP/1.1 clients ({a.client_procs} "
            f"processes), {a.seconds:g} s per run, {a.rounds} round(s), nginx then edge"
        )
        for rnd in range(1, a.rounds + 1):
            for kind in kinds:
                for server in ("nginx", "edge"):
                    self.check_time(a.seconds + 20, f"round {rnd} {kind} {server}")
                    res[kind][server].append(self.load(server, kind, rnd))
        if a.profile_seconds > 0:
            for kind in kinds:
                self.profile(kind)

    def profile(self, kind: str) -> None:
        """py-spy on one edge worker (its Python stacks while it holds the GIL) during the same
        load; not part of the measurements (py-spy itself takes CPU)."""
        a = self.a
        spy = REPO / ".venv" / "bin" / "py-spy"
        if not spy.exists():
            self.note("    (no .venv/bin/py-spy: profile skipped)")
            return
        self.check_time(a.profile_seconds + 30, "the profile")
        self.note(
            f"[1] profile: py-spy on edge worker {self.edge_workers[0]} during a {kind} "
            f"load, {a.profile_seconds:g} s"
        )
        raw = self.out / f"profile-{kind}-edge-w0.txt"
        spy_p = Proc(
            f"py-spy.{kind}",
            [
                str(spy),
                "record",
                "--nonblocking",
                "-r",
                "200",
                "--format",
                "raw",
                "-o",
                str(raw),
                "-p",
                str(self.edge_workers[0]),
                "-d",
                str(int(a.profile_seconds)),
            ],
            self.out,
        )
        time.sleep(0.5)
        threads = -(-a.clients // a.client_procs)
        self.clients(
            f"profile.{kind}",
            self.edge_port,
            self.out / f"ids-{kind}.json",
            procs=a.client_procs,
            threads=threads,
            seconds=a.profile_seconds,
            sources=self.sources(a.clients),
        )
        spy_p.wait(a.profile_seconds + 20)
        if raw.exists():
            self.r.setdefault("profile", {})[kind] = {"file": str(raw), **summarize_profile(raw)}
        else:
            self.note("    py-spy wrote nothing: " + spy_p.stderr_path.read_text()[-500:])

    # ---------------------------------------------------------------- all
    def run(self) -> int:
        a = self.a
        self.note(f"results: {self.out}")
        self.r["env"] = environment()
        if not Path(NGINX).exists():
            raise RuntimeError(f"{NGINX} not found (Debian's nginx package)")
        failure = None
        try:
            self.prepare()
            if "3" in a.parts:
                self.part_decrypt()
            if "1" in a.parts:
                self.part_serve()
        except BudgetError as exc:
            failure = str(exc)
            self.note(f"STOPPED: {exc}")
        finally:
            Proc.stop_all()
            self.r["args"] = {k: v for k, v in vars(a).items()}
            self.r["wall_s"] = time.monotonic() - self.t_start
            self.r["failure"] = failure
            (self.out / "results.json").write_text(json.dumps(self.r, indent=1, default=str))
        report = self.report()
        (self.out / "report.txt").write_text(report)
        print(report)
        return 0 if failure is None else 3

    # ---------------------------------------------------------------- the table
    def report(self) -> str:
        a = self.a
        L: list[str] = []
        env = self.r.get("env") or environment()
        L.append(f"# bench/blind  ({env})")
        L.append(f"command: {' '.join(a.argv)}")
        t = self.r.get("seal", {}).get("first")
        if t:
            L.append(
                f"tree: {t['files']} files, {t['plain_bytes'] / 1e6:.1f} MB "
                f"(small {a.small[0]} x {fmt_size(a.small[1])}-{fmt_size(a.small[2])}, "
                f"large {a.large[0]} x {fmt_size(a.large[1])}-{fmt_size(a.large[2])}, "
                f"random bytes), sealed {t['sealed_bytes'] / 1e6:.1f} MB, rs = "
                f"{a.record_size}"
            )
        L.append("")
        others: list[float] = []
        if "serve" in self.r:
            self._report_serve(L, others)
        if "seal" in self.r:
            s = self.r["seal"]
            d = self.r.get("decrypt")
            raw_enc = d["plain_bytes"] / 1e6 / d["raw_encrypt_s"] if d else None
            L.append(
                "2. Sealing: blindfold.blind.sealer.seal_tree on the tree above (source "
                "files in the page cache; each blob written with fsync)"
            )
            L.append(
                f"   {'':<40} {'MB':>7} {'wall s':>7} {'MB/s':>7} {'CPU s':>6} "
                f"{'MB/CPU-s':>8} {'vs raw AES-GCM encrypt':>22}"
            )
            for label, name in (
                ("first", "first seal (everything sealed)"),
                ("reseal", "re-seal, nothing changed"),
            ):
                r = s[label]
                mb = r["plain_bytes"] / 1e6
                ratio = f"{mb / r['wall_s'] / raw_enc:.2f}x" if raw_enc else "-"
                L.append(
                    f"   {name:<40} {mb:>7.1f} {r['wall_s']:>7.2f} "
                    f"{mb / r['wall_s']:>7.0f} {r['cpu_s']:>6.2f} "
                    f"{mb / max(r['cpu_s'], 1e-9):>8.0f} {ratio:>22}"
                )
                L.append(f"     ({r['sealed']} sealed, {r['reused']} unchanged)")
            if raw_enc:
                L.append(
                    f"   (raw AES-GCM encrypt, 64 KiB records, one thread, from part 3: "
                    f"{raw_enc:.0f} MB/s)"
                )
            L.append("")
        if "decrypt" in self.r:
            d = self.r["decrypt"]
            mb = d["plain_bytes"] / 1e6
            base = mb / d["raw_decrypt_s"]
            L.append(
                f"3. Decrypt in Python, one {mb:.0f} MB blob ({d['sealed_bytes'] / 1e6:.1f} "
                f"MB sealed, rs = {d['rs']}), one thread, best of {a.decrypt_repeat}, "
                "plaintext MB/s"
            )
            L.append(f"   {'':<58} {'s':>6} {'MB/s':>7} {'ratio':>6}")
            rows = [
                ("baseline: AESGCM.decrypt, 64 KiB records (cryptography)", "raw_decrypt_s"),
                ("ece.open_all (whole blob)", "open_all_s"),
                (f"ece.Opener, fed {d['chunk'] // 1024} KiB at a time (streaming)", "opener_s"),
                ("(reference) ece.seal", "seal_s"),
                ("(reference) AESGCM.encrypt, 64 KiB records", "raw_encrypt_s"),
            ]
            for name, key in rows:
                L.append(
                    f"   {name:<58} {d[key]:>6.3f} {mb / d[key]:>7.0f} {mb / d[key] / base:>5.2f}x"
                )
            others.append(d.get("other_cores", 0.0))
            L.append("")
        if others and max(others) > 0.15:
            L.append(
                f"WARNING: other processes used up to {max(others):.2f} cores during a "
                "measurement ('other' columns): the machine was not quiet, numbers are "
                "disturbed."
            )
        L.append(
            "'other' = cores busy on the machine beyond the processes this benchmark "
            "started (and beyond irq/softirq time)."
        )
        if self.r.get("failure"):
            L.append(f"INCOMPLETE: {self.r['failure']}")
        L.append(f"wall time {self.r.get('wall_s', 0):.0f} s; raw outputs: {self.out}")
        return "\n".join(L) + "\n"

    def _report_serve(self, L: list[str], others: list[float]) -> None:
        a = self.a
        s = self.r["serve"]
        L.append(
            f"1. Serving the sealed blobs over TLS on loopback: {a.clients} keep-alive "
            f"HTTP/1.1 clients (Python http.client + ssl, {a.client_procs} processes), each "
            f"a shuffled id list, {a.seconds:g} s x {a.rounds} round(s)"
        )
        L.append(
            f"   edge: warm cache (memory <= {fmt_size(a.memory_max_object_bytes)} per "
            f"blob, else disk), workers = {a.workers}; nginx: alias of the sealed blobs/, "
            f"worker_processes = {a.workers}, sendfile on, access_log off"
        )
        L.append(
            f"   {'row':<6} {'server':<6} {'req/s':>7} {'MB/s':>7} {'ratio':>6} "
            f"{'CPU s/GB':>8} {'ratio':>6} {'sys%':>4} {'p50 ms':>7} {'p99 ms':>8} "
            f"{'hit %':>6} "
            f"{'srv cores':>9} {'cli cores':>9} {'irq':>5} {'other':>5} {'err':>4}"
        )
        verdicts = []
        for kind in ("small", "large"):
            if kind not in s:
                continue
            agg = {srv: aggregate(s[kind][srv], self.out) for srv in ("nginx", "edge")}
            n, e = agg["nginx"], agg["edge"]

            def ratio(g: dict[str, Any], key: str, n: dict[str, Any] | None = n) -> str:
                return f"{g[key] / n[key]:>5.2f}x" if n else f"{'-':>6}"

            for srv in ("nginx", "edge"):
                g = agg[srv]
                if g is None:
                    L.append(f"   {kind:<6} {srv:<6} (not run)")
                    continue
                hit = "-"
                if srv == "edge":
                    res = g["edge_results"]
                    total = sum(res.values())
                    hits = res.get("hit_memory", 0) + res.get("hit_disk", 0)
                    hit = f"{hits / total * 100:.1f}" if total else "-"
                L.append(
                    f"   {kind:<6} {srv:<6} {g['rps']:>7.0f} {g['mbps']:>7.0f} "
                    f"{ratio(g, 'mbps')} {g['cpu_per_gb']:>8.2f} "
                    f"{ratio(g, 'cpu_per_gb')} {g['sys_share'] * 100:>4.0f} {g['p50']:>7.1f} "
                    f"{g['p99']:>8.1f} {hit:>6} {g['srv_cores']:>9.2f} "
                    f"{g['cli_cores']:>9.2f} {g['irq']:>5.2f} {g['other']:>5.2f} "
                    f"{g['errors']:>4}"
                )
                others.append(g["other_max"])
            sizes = [x[1] for x in self.ids.get(kind, [])]
            if sizes:
                L.append(
                    f"     {kind}: {len(sizes)} blobs, {fmt_size(min(sizes))}-"
                    f"{fmt_size(max(sizes))} (mean {fmt_size(sum(sizes) / len(sizes))})"
                )
            if e is not None:
                split = ", ".join(f"{k} {v:.0f}" for k, v in sorted(e["edge_results"].items()) if v)
                L.append(f"     edge requests by result: {split}")
            if n is not None and e is not None:
                ratios = ", ".join(
                    f"{mbps(x) / mbps(y):.2f} (other {y['other_cores']:.2f}/{x['other_cores']:.2f})"
                    for x, y in zip(s[kind]["edge"], s[kind]["nginx"], strict=False)
                )
                L.append(f"     edge/nginx MB/s per round: {ratios}")
                verdicts.append(
                    f"{kind} {e['mbps'] / n['mbps']:.2f}x "
                    f"({'MET' if e['mbps'] / n['mbps'] >= 0.8 else 'NOT MET'})"
                )
            split = "; ".join(
                f"{srv} {share(s[kind][srv], names)}"
                for srv, names in (("nginx", self.nginx_pids()), ("edge", self.edge_pids()))
                if s[kind][srv]
            )
            L.append(f"     server CPU split: {split}")
        tls = sorted(
            {t for kind in s.values() for rows in kind.values() for r in rows for t in r["tls"]}
        )
        L.append(f"   goal edge >= 0.8x nginx (MB/s): {'; '.join(verdicts) or 'not measured'}")
        L.append(f"   TLS negotiated: {', '.join(tls)}")
        w = self.r.get("warm", {})
        if w:
            L.append(
                f"   warm-up: {w['blobs']} blobs per edge worker, all bodies checked "
                f"against the manifest; edge {w['edge_results']}; cache {w['cache']}"
            )
        pin = f"servers pinned to CPU {a.pin_servers}" if a.pin_servers else "nothing pinned"
        pin += f", clients pinned to CPU {a.pin_clients}" if a.pin_clients else ""
        L.append(
            f"   cores: {os.cpu_count()} CPUs, {pin}: the client processes, the server "
            "under test (master + workers) and the idle one, the origin agent (idle "
            "after the warm-up) share them."
        )
        L.append(
            "   srv cores / cli cores = CPU-seconds per wall second of the server's "
            "processes / the clients'; irq = irq + softirq cores (loopback delivery, "
            "charged to no process); CPU s/GB = server CPU-seconds per GB sent (bodies), "
            "sys% = its kernel share; "
            "p50/p99 = client time per request (request to last byte); ratio = edge / "
            "nginx (for CPU s/GB: higher is worse)."
        )
        for kind, p in self.r.get("profile", {}).items():
            L.append(
                f"   py-spy, one edge worker while not idle, {kind} load, {p['samples']} "
                "samples; self: " + ", ".join(f"{name} {v:.0f}%" for name, v in p["self"][:8])
            )
            L.append(
                "     inclusive: " + ", ".join(f"{name} {v:.0f}%" for name, v in p["inclusive"][:8])
            )
        L.append("")

    def edge_pids(self) -> dict[int, str]:
        r = self.r.get("pids", {})
        return {int(k): v for k, v in r.get("edge", {}).items()}

    def nginx_pids(self) -> dict[int, str]:
        r = self.r.get("pids", {})
        return {int(k): v for k, v in r.get("nginx", {}).items()}


class BudgetError(RuntimeError):
    pass


def aggregate(rows: list[dict[str, Any]], out: Path) -> dict[str, Any] | None:
    if not rows:
        return None
    ok = sum(r["ok"] for r in rows)
    nbytes = sum(r["bytes"] for r in rows)
    el = sum(r["elapsed_s"] for r in rows)
    wall = sum(r["measure_wall_s"] for r in rows)
    cpu = sum(r["server_cpu_s"] for r in rows)
    lat: list[float] = []
    for r in rows:
        with contextlib.suppress(OSError, ValueError):
            lat += json.loads((out / r["lat_file"]).read_text())
    res: dict[str, float] = {}
    for r in rows:
        for k, v in r.get("edge_results", {}).items():
            res[k] = res.get(k, 0) + v
    return {
        "rps": ok / el,
        "mbps": nbytes / 1e6 / el,
        "cpu_per_gb": cpu / max(nbytes / 1e9, 1e-12),
        "p50": pct(lat, 0.5) if lat else max(r["lat_p50_ms"] for r in rows),
        "p99": pct(lat, 0.99) if lat else max(r["lat_p99_ms"] for r in rows),
        "srv_cores": cpu / wall,
        "sys_share": sum(r.get("server_sys_s", 0.0) for r in rows) / max(cpu, 1e-9),
        "cli_cores": sum(r["client_cpu_s"] for r in rows) / el,
        "irq": sum(r["irq_cores"] * r["measure_wall_s"] for r in rows) / wall,
        "other": sum(r["other_cores"] * r["measure_wall_s"] for r in rows) / wall,
        "other_max": max(r["other_cores"] for r in rows),
        "errors": sum(sum(r["errors"].values()) for r in rows),
        "edge_results": res,
    }


def mbps(r: dict[str, Any]) -> float:
    return float(r["bytes"]) / 1e6 / max(float(r["elapsed_s"]), 1e-9)


def share(rows: list[dict[str, Any]], names: dict[int, str]) -> str:
    tot: dict[str, float] = {}
    for r in rows:
        for pid, v in r["cpu_by_pid"].items():
            key = names.get(int(pid), pid)
            tot[key] = tot.get(key, 0.0) + v
    allc = sum(tot.values()) or 1.0
    return " / ".join(f"{k} {v / allc * 100:.0f}%" for k, v in tot.items())


def summarize_profile(raw: Path) -> dict[str, Any]:
    """py-spy --format raw (collapsed stacks 'a;b;c N'): top self-time frames and top
    inclusive frames, as % of samples."""
    self_t: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        count = int(n)
        total += count
        frames = [short_frame(f) for f in stack.split(";") if f]
        if frames:
            self_t[frames[-1]] = self_t.get(frames[-1], 0) + count
        for f in set(frames):
            incl[f] = incl.get(f, 0) + count
    top_self = sorted(self_t.items(), key=lambda kv: -kv[1])[:15]
    # frames on (nearly) every stack say nothing: the loop, runpy, main
    top_incl = [(k, v) for k, v in sorted(incl.items(), key=lambda kv: -kv[1]) if v < 0.9 * total][
        :15
    ]
    pc = 100.0 / max(total, 1)
    return {
        "samples": total,
        "self": [(k, v * pc) for k, v in top_self],
        "inclusive": [(k, v * pc) for k, v in top_incl],
    }


def short_frame(frame: str) -> str:
    """'send (blindfold/web/http1.py:123)' -> 'http1.send'."""
    m = re.match(r"\s*(.+?) \((.+?)(?::\d+)?\)\s*$", frame)
    if not m:
        return frame.strip()
    func, path = m.group(1), m.group(2)
    mod = Path(path).stem
    return f"{mod}.{func}"


def worker_name(pid: int, i: int) -> str:
    """'w<index>' of an edge worker (from its command line), else by position."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        return f"w{int(argv[argv.index(b'--index') + 1])}"
    return f"w{i}"


def environment() -> str:
    return (
        f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}, {ssl.OPENSSL_VERSION}, "
        f"nginx {nginx_version()}, blindfold at {git_rev()}"
    )


def nginx_version() -> str:
    try:
        out = subprocess.run([NGINX, "-v"], capture_output=True, text=True, timeout=10).stderr
        return out.strip().rpartition("/")[2]
    except (OSError, subprocess.SubprocessError):
        return "?"


# ============================================================================ arguments
def main(argv: list[str]) -> int:
    from blindfold.core import ece

    ap = argparse.ArgumentParser(prog="bbench.py")
    sub = ap.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser(
        "run", help="the whole benchmark", formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    r.add_argument(
        "--out",
        type=Path,
        required=True,
        help="results directory (run.sh: a new /tmp/blindfold-blind-bench.XXXXXX)",
    )
    r.add_argument(
        "--parts",
        default="123",
        help="1 = serving (edge vs nginx), 2 = sealing (always run: part 1 serves "
        "its output), 3 = decrypt in Python",
    )
    r.add_argument(
        "--small",
        type=parse_mix,
        default="200:64K-1M",
        help="small files COUNT:MIN-MAX (log-uniform sizes); COUNT 0: none",
    )
    r.add_argument(
        "--large",
        type=parse_mix,
        default="3:10M-50M",
        help="large files COUNT:MIN-MAX; COUNT 0: none",
    )
    r.add_argument("--seed", type=int, default=1, help="sizes, contents and client orders")
    r.add_argument(
        "--record-size",
        type=int,
        default=ece.DEFAULT_RS,
        help="RFC 8188 record size for sealing (and the part-3 blob)",
    )
    r.add_argument("--workers", type=int, default=2, help="edge workers = nginx worker_processes")
    r.add_argument("--clients", type=int, default=8, help="concurrent keep-alive connections")
    r.add_argument(
        "--client-procs",
        type=int,
        default=2,
        help="client processes the connections are split over (threads in each)",
    )
    r.add_argument("--seconds", type=float, default=15.0, help="length of each load run")
    r.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="load runs per server and row (nginx and edge alternate)",
    )
    r.add_argument(
        "--max-requests", type=int, default=100000, help="request cap per client connection and run"
    )
    r.add_argument(
        "--memory-cache-bytes",
        type=parse_size,
        default="256M",
        help="edge: blind.memory_cache_bytes (per worker)",
    )
    r.add_argument(
        "--memory-max-object-bytes",
        type=parse_size,
        default="8M",
        help="edge: blind.memory_max_object_bytes (bigger blobs: from disk)",
    )
    r.add_argument(
        "--pin-servers",
        default="",
        metavar="CPUS",
        help="taskset -c CPUS for nginx and the edge (workers inherit); '' = none",
    )
    r.add_argument(
        "--pin-clients",
        default="",
        metavar="CPUS",
        help="taskset -c CPUS for the client processes; '' = none",
    )
    r.add_argument("--decrypt-mb", type=float, default=50.0, help="part 3: blob size (MB)")
    r.add_argument("--decrypt-repeat", type=int, default=3, help="part 3: best of N")
    r.add_argument(
        "--profile-seconds",
        type=float,
        default=0.0,
        help="after part 1: py-spy (.venv/bin/py-spy) on one edge worker during a "
        "load of this length per row, summarised in the table; 0: off",
    )
    r.add_argument(
        "--budget",
        type=float,
        default=600.0,
        help="time budget of the whole run (s); what would overrun is skipped",
    )

    c = sub.add_parser("client")
    c.add_argument("--host", default="127.0.0.1")
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--cafile", required=True)
    c.add_argument("--ids", required=True, help="JSON [[id, sealed_size, blob_sha256], ...]")
    c.add_argument("--threads", type=int, default=4)
    c.add_argument("--seconds", type=float, required=True)
    c.add_argument("--max-requests", type=int, default=100000)
    c.add_argument("--sources", default="127.0.0.1")
    c.add_argument("--seed", type=int, default=1)
    c.add_argument("--timeout", type=float, default=30.0)
    c.add_argument("--once", action="store_true")
    c.add_argument("--verify", action="store_true")

    s = sub.add_parser("seal")
    s.add_argument("--src", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--signing-key", required=True)
    s.add_argument("--id-secret", required=True)
    s.add_argument("--record-size", type=int, default=ece.DEFAULT_RS)

    d = sub.add_parser("decrypt")
    d.add_argument("--mb", type=float, default=50.0)
    d.add_argument("--record-size", type=int, default=ece.DEFAULT_RS)
    d.add_argument("--chunk", type=int, default=65536)
    d.add_argument("--repeat", type=int, default=3)

    rp = sub.add_parser("report", help="print the table again from a results directory")
    rp.add_argument("dir", type=Path)

    a = ap.parse_args(argv)
    if a.cmd == "run":
        a.argv = ["bench/blind/run.sh", *argv[1:]]
        a.out.mkdir(parents=True, exist_ok=True)
        a.out = a.out.resolve()

        def on_term(*_: Any) -> None:
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGHUP, on_term)
        try:
            return Bench(a).run()
        except KeyboardInterrupt:
            Proc.stop_all()
            print(
                f"interrupted: every process started was stopped; partial results in {a.out}",
                file=sys.stderr,
            )
            return 130
        finally:
            Proc.stop_all()
    if a.cmd == "report":
        res = json.loads((a.dir / "results.json").read_text())
        b = Bench.__new__(Bench)
        args = res["args"]
        for k in ("small", "large"):
            args[k] = tuple(args[k])
        b.a = argparse.Namespace(**args)
        b.out, b.r = a.dir, res
        b.ids = {}
        for k in ("small", "large"):
            with contextlib.suppress(OSError):
                b.ids[k] = json.loads((a.dir / f"ids-{k}.json").read_text())
        print(b.report(), end="")
        return 0
    return {"client": client_main, "seal": seal_main, "decrypt": decrypt_main}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
