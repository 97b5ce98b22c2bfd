#!/usr/bin/env python3
"""bench/keyless: the keyless edge's handshake cost and throughput, and the key server's signing
rate, each beside a baseline measured in the same run (see README.md beside this file).

  kbench.py run [options]        the whole benchmark (what run.sh calls); prints the table
  kbench.py client ...           a handshake load process (threads, blocking `ssl`)
  kbench.py baseline ...         the OpenSSL baselines: asyncio + ssl, or threads + ssl
  kbench.py relay ...            a TCP relay that holds each chunk N ms (the slow key server)
  kbench.py signload ...         pipelined sign requests over one mTLS connection
  kbench.py rawsign ...          `cryptography` ECDSA P-256 sign() in a loop
  kbench.py core ...             the sans-IO TLS core alone, in-process (optionally cProfiled)

Runs with the project's venv python (it imports blindfold for the wire format and the PKI).
Loopback only; every process it starts is stopped by PID; every load is bounded in count and
time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import statistics
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
    metric,
    pct,
    sys_s,
)

PY = sys.executable
SNI = "example.test"


# ============================================================================ small helpers
def children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            out += [int(p) for p in (task / "children").read_text().split()]
    return out


def group_cpu(pids: list[int]) -> dict[int, float]:
    return {p: cpu_s(p) for p in pids}


def busy_s() -> float:
    """CPU-seconds the whole machine has been busy (all CPUs), from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal ...
    return (fields[0] + fields[1] + fields[2] + fields[5] + fields[6] + fields[7]) / TICK


# ============================================================================ PKI and configs
def make_pki(d: Path) -> dict[str, Any]:
    """Throwaway certificates: the site's P-256 leaf (edge and baseline serve the same one; the
    key server and the baseline hold its key) and the mTLS set made by `blindfold pki`."""
    from blindfold import pki

    if d.exists():  # our own results directory's pki/, from an earlier run
        shutil.rmtree(d)
    d.mkdir(parents=True)
    bf = [PY, "-m", "blindfold", "pki"]
    for args in (
        ["ca", str(d)],
        ["server", "keyserver", str(d), "--host", "keyserver.test", "--host", "127.0.0.1"],
        ["edge", "edge1", str(d)],
    ):
        subprocess.run(bf + args, check=True, capture_output=True, timeout=60, cwd=str(REPO))
    from cryptography import x509

    edge_fp = pki.fingerprint_sha256(x509.load_pem_x509_certificate((d / "edge1.pem").read_bytes()))
    site_ca = pki.make_ca("blindfold bench site CA")
    site_ca.write(d / "site-ca.pem")
    leaf = pki.issue(site_ca, [SNI, f"*.{SNI}"], kind="ec256")
    leaf.write(d / "site.pem", d / "site.key")
    return {
        "dir": d,
        "edge_fp": edge_fp,
        "site_ca": d / "site-ca.pem",
        "site_cert": d / "site.pem",
        "site_key": d / "site.key",
        "cert_sha256": bytes.fromhex(pki.fingerprint_sha256(leaf.cert).replace(":", "")),
    }


def keyserver_toml(p: dict[str, Any], out: Path) -> str:
    d = p["dir"]
    return f"""# written by bench/keyless/kbench.py
[keyserver]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
cert = "{d / "keyserver.pem"}"
key = "{d / "keyserver.key"}"
client_ca = "{d / "ca.pem"}"
audit_log = "{out / "audit.log"}"
audit_key = "{out / "audit.key"}"
log_path = "{out / "keyserver.log"}"
# the default (2000/s, burst 4000 per edge) would cap part 3: lifted for the benchmark
rate_per_s = 1000000.0
burst = 1000000

[[keyserver.keys]]
name = "site"
key = "{p["site_key"]}"
certificate = "{p["site_cert"]}"

[[keyserver.edges]]
name = "edge1"
cert_sha256 = "{p["edge_fp"]}"
hostnames = ["{SNI}", "*.{SNI}"]
"""


def edge_toml(
    p: dict[str, Any],
    ks_addr: str,
    workers: int,
    log: Path,
    origin_port: int,
    log_connections: bool,
) -> str:
    d = p["dir"]
    tls = (
        f'client_cert = "{d / "edge1.pem"}", client_key = "{d / "edge1.key"}", '
        f'ca = "{d / "ca.pem"}"'
    )
    return f"""# written by bench/keyless/kbench.py
[edge]
listen = ["127.0.0.1:0"]
admin_listen = "127.0.0.1:0"
workers = {workers}
per_ip_rate_per_s = 0.0      # the load comes from a few loopback addresses
per_ip_concurrent = 100000
max_connections = 100000
drain_timeout_s = 1.0
log_path = "{log}"
log_connections = {str(log_connections).lower()}

[[edge.routes]]
sni = ["{SNI}", "*.{SNI}"]
mode = "keyless"
certificate = "{p["site_cert"]}"
origins = ["127.0.0.1:{origin_port}"]   # never contacted: no request is sent
origin_ca = "{p["site_ca"]}"
keyserver = {{ addresses = ["{ks_addr}"], server_name = "keyserver.test", {tls} }}
"""


# ============================================================================ client load
def client_main(a: argparse.Namespace) -> int:
    """Full TLS 1.3 handshakes with blocking `ssl` in threads; no session is ever reused (no
    `session=`, so no PSK is offered). After the handshake: close_notify and wait for the
    server's (so the server has processed our Finished before the next connection), close."""
    ctx = ssl.create_default_context(cafile=a.cafile)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    if a.alpn:
        ctx.set_alpn_protocols(a.alpn.split(","))
    sources = a.sources.split(",")
    lock = threading.Lock()
    state = {"left": a.n, "ok": 0, "reused": 0, "errors": {}, "lat": []}
    deadline = time.monotonic() + a.seconds
    t_start = time.monotonic()
    cpu_start = time.process_time()

    def take() -> bool:
        with lock:
            if state["left"] <= 0 or time.monotonic() >= deadline:
                return False
            state["left"] -= 1
            return True

    def worker(idx: int) -> None:
        i = idx
        lat: list[float] = []
        while take():
            src = sources[i % len(sources)]
            i += a.threads
            t0 = time.perf_counter()
            try:
                raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                raw.settimeout(a.timeout)
                raw.bind((src, 0))
                raw.connect((a.host, a.port))
                tls = ctx.wrap_socket(raw, server_hostname=a.sni or None)
                ok = tls.version() == "TLSv1.3"
                reused = tls.session_reused
                with contextlib.suppress(OSError, ssl.SSLError, ValueError):
                    tls.unwrap()
                tls.close()
                raw.close()
                lat.append(time.perf_counter() - t0)
                with lock:
                    state["ok"] += ok
                    state["reused"] += bool(reused)
            except (OSError, ssl.SSLError) as exc:
                key = type(exc).__name__ + (
                    f":{exc.reason}" if getattr(exc, "reason", None) else ""
                )
                with contextlib.suppress(Exception):
                    raw.close()
                with lock:
                    state["errors"][key] = state["errors"].get(key, 0) + 1
        with lock:
            state["lat"].extend(lat)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(a.threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(a.seconds + a.timeout + 5)
    elapsed = time.monotonic() - t_start
    lat = state["lat"]
    print(
        json.dumps(
            {
                "ok": state["ok"],
                "reused": state["reused"],
                "errors": state["errors"],
                "elapsed_s": elapsed,
                "cpu_s": time.process_time() - cpu_start,
                "total_cpu_s": time.process_time(),  # with the interpreter's start-up
                "lat_p50_ms": pct(lat, 0.5) * 1e3,
                "lat_p99_ms": pct(lat, 0.99) * 1e3,
            }
        ),
        flush=True,
    )
    return 0


def run_clients(
    out: Path,
    tag: str,
    port: int,
    cafile: Path,
    *,
    n: int,
    seconds: float,
    procs: int,
    threads: int,
    sources: list[str],
    alpn: str = "http/1.1",
) -> dict[str, Any]:
    """`procs` client processes x `threads` threads; the N handshakes are split between them."""
    ps = []
    for i in range(procs):
        share = n // procs + (1 if i < n % procs else 0)
        src = ",".join(sources[i::procs]) or sources[0]
        ps.append(
            Proc(
                f"{tag}.client{i}",
                [
                    PY,
                    str(HERE / "kbench.py"),
                    "client",
                    "--port",
                    str(port),
                    "--cafile",
                    str(cafile),
                    "--sni",
                    SNI,
                    "--n",
                    str(share),
                    "--seconds",
                    str(seconds),
                    "--threads",
                    str(threads),
                    "--sources",
                    src,
                    "--alpn",
                    alpn,
                ],
                out,
            )
        )
    t0 = time.monotonic()
    results = []
    for p in ps:
        p.proc.wait(seconds + 60)
        p.stop()
        results.append(json.loads(p.stdout_path.read_text().splitlines()[-1]))
    wall = time.monotonic() - t0
    errors: dict[str, int] = {}
    for r in results:
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
    return {
        "ok": sum(r["ok"] for r in results),
        "reused": sum(r["reused"] for r in results),
        "errors": errors,
        "wall_s": wall,
        "client_cpu_s": sum(r["cpu_s"] for r in results),
        "client_total_cpu_s": sum(r["total_cpu_s"] for r in results),
        "elapsed_s": max(r["elapsed_s"] for r in results),
        "lat_p50_ms": statistics.median(r["lat_p50_ms"] for r in results),
        "lat_p99_ms": max(r["lat_p99_ms"] for r in results),
    }


# ============================================================================ baselines
def baseline_main(a: argparse.Namespace) -> int:
    """The OpenSSL baseline: TLS 1.3 with the same certificate and its key, one ticket per
    connection like the edge, ALPN h2/http1.1 like the edge; each connection is closed as soon
    as its handshake is done."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(a.cert, a.key)
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    ctx.num_tickets = 1  # the edge issues one ticket per full handshake
    count = [0]
    if a.kind == "asyncio":

        async def handle(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            count[0] += 1
            w.close()
            with contextlib.suppress(Exception):
                await w.wait_closed()

        async def main() -> None:
            server = await asyncio.start_server(
                handle, "127.0.0.1", 0, ssl=ctx, backlog=1024, ssl_handshake_timeout=10
            )
            print(server.sockets[0].getsockname()[1], flush=True)
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            loop.add_signal_handler(signal.SIGTERM, stop.set)
            await stop.wait()
            server.close()

        asyncio.run(main())
    else:  # threads: blocking accept + handshake in each of a.threads threads
        lsock = socket.create_server(("127.0.0.1", 0), backlog=1024)
        lock = threading.Lock()

        def serve() -> None:
            while True:
                try:
                    conn, _ = lsock.accept()
                except OSError:
                    return
                conn.settimeout(10)
                try:
                    tls = ctx.wrap_socket(conn, server_side=True)
                    with lock:
                        count[0] += 1
                    with contextlib.suppress(OSError, ssl.SSLError, ValueError):
                        tls.unwrap()
                    tls.close()
                except (OSError, ssl.SSLError):
                    pass
                finally:
                    conn.close()

        for _ in range(a.threads):
            threading.Thread(target=serve, daemon=True).start()
        print(lsock.getsockname()[1], flush=True)
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        while not stop.wait(0.2):  # a timed wait lets the signal handler run
            pass
    print(json.dumps({"handshakes": count[0]}), file=sys.stderr, flush=True)
    return 0


# ============================================================================ delay relay
def relay_main(a: argparse.Namespace) -> int:
    """Forwards TCP to --target; every chunk going towards the target is held --delay-ms
    (with --both, the answers too). Bytes are untouched (the mTLS session is end to end)."""
    delay = a.delay_ms / 1000.0
    th, tp = a.target.rsplit(":", 1)

    async def pump(r: asyncio.StreamReader, w: asyncio.StreamWriter, hold: float) -> None:
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def writer() -> None:
            while True:
                due, data = await q.get()
                if not data:
                    break
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                w.write(data)
                await w.drain()
            w.close()

        wt = loop.create_task(writer())
        try:
            while data := await r.read(65536):
                if hold:
                    q.put_nowait((loop.time() + hold, data))
                else:
                    w.write(data)
                    await w.drain()
        except OSError:
            pass
        q.put_nowait((loop.time() + hold, b""))
        with contextlib.suppress(Exception):
            await wt

    async def handle(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        try:
            ur, uw = await asyncio.open_connection(th, int(tp))
        except OSError:
            cw.close()
            return
        for w in (cw, uw):
            sock = w.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await asyncio.gather(
            pump(cr, uw, delay), pump(ur, cw, delay if a.both else 0.0), return_exceptions=True
        )

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        print(server.sockets[0].getsockname()[1], flush=True)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        server.close()

    asyncio.run(main())
    return 0


# ============================================================================ key server load
def handshake_messages(site_cert: str, site_ca: str) -> bytes:
    """What an edge sends the key server for one handshake (ClientHello .. Certificate): a
    real one, our TlsServer answering an OpenSSL client over memory BIOs, as the load's
    clients do it (SNI example.test, ALPN http/1.1)."""
    from blindfold.core import tls13_server as ts

    ctx = ssl.create_default_context(cafile=site_ca)
    ctx.set_alpn_protocols(["http/1.1"])
    inb, outb = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = ctx.wrap_bio(inb, outb, server_hostname=SNI)
    with contextlib.suppress(ssl.SSLWantReadError):
        client.do_handshake()
    identity = ts.ServerIdentity.from_pem(Path(site_cert).read_bytes())
    server = ts.TlsServer(identity, ts.TlsSettings(), ts.SessionStore(10, 10), SNI)
    event = server.receive(outb.read(), 0.0)[-1]
    assert isinstance(event, ts.SignatureRequested), event
    return event.messages


def signload_main(a: argparse.Namespace) -> int:
    """Keeps --inflight sign requests in flight over one mTLS connection (raw frames with
    blindfold's keyless_wire codec) for --seconds; prints counts as JSON. Each request is a
    real handshake's messages with its own ClientHello random (the key server refuses a
    random it signed for another transcript)."""
    from blindfold.core import keyless_wire as w

    messages = handshake_messages(a.site_cert, a.site_ca)
    ctx = ssl.create_default_context(cafile=a.ca)
    ctx.load_cert_chain(a.cert, a.key)
    sock = ctx.wrap_socket(
        socket.create_connection(("127.0.0.1", a.port), timeout=10),
        server_hostname="keyserver.test",
    )
    base = int.from_bytes(os.urandom(32), "big")
    head, tail = messages[:6], messages[38:]  # the ClientHello random is bytes 6..38
    rid = 0

    def frames(k: int) -> bytes:
        nonlocal rid
        out = bytearray()
        for _ in range(k):
            rid += 1
            # a different visitor per request (as real handshakes are)
            msgs = head + (base ^ rid).to_bytes(32, "big") + tail
            out += w.encode_sign_request(
                rid, w.SignRequest(w.ECDSA_SECP256R1_SHA256, "127.0.0.1", msgs)
            )
        return bytes(out)

    dec = w.FrameDecoder()
    ok = errors = 0
    err_kinds: dict[str, int] = {}
    sock.sendall(frames(a.inflight))
    inflight = a.inflight
    t0 = time.monotonic()
    end = t0 + a.seconds
    hard_end = end + 10
    while inflight and time.monotonic() < hard_end:
        data = sock.recv(65536)
        if not data:
            break
        got = 0
        for f in dec.feed(data):
            got += 1
            if f.type == w.SIGN_RESPONSE:
                ok += 1
            else:
                errors += 1
                code, _msg = w.decode_error(f.body)
                key = w.ERROR_NAMES.get(code, str(code))
                err_kinds[key] = err_kinds.get(key, 0) + 1
        inflight -= got
        if got and time.monotonic() < end:
            sock.sendall(frames(got))
            inflight += got
    elapsed = time.monotonic() - t0
    sock.close()
    print(
        json.dumps(
            {
                "ok": ok,
                "errors": errors,
                "error_kinds": err_kinds,
                "elapsed_s": elapsed,
                "left_inflight": inflight,
                "cpu_s": time.process_time(),
            }
        ),
        flush=True,
    )
    return 0


def rawsign_main(a: argparse.Namespace) -> int:
    """The baseline: `cryptography` ECDSA P-256 (SHA-256) sign() of CertificateVerify-sized
    content, single thread, for --seconds; per CPU-second and per wall second."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = serialization.load_pem_private_key(Path(a.key).read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    content = b" " * 64 + b"TLS 1.3, server CertificateVerify\x00" + os.urandom(32)
    algo = ec.ECDSA(hashes.SHA256())
    n = 0
    c0, t0 = time.process_time(), time.monotonic()
    end = t0 + a.seconds
    while time.monotonic() < end and n < 10_000_000:
        for _ in range(200):
            key.sign(content, algo)
        n += 200
    cpu, wall = time.process_time() - c0, time.monotonic() - t0
    print(json.dumps({"n": n, "cpu_s": cpu, "wall_s": wall}), flush=True)
    return 0


# ============================================================================ the sans-IO core
def core_main(a: argparse.Namespace) -> int:
    """`core.tls13_server.TlsServer` alone, in this process, against an OpenSSL client on memory
    BIOs; the signature is made here (what the key server returns). Only the server's calls are
    timed (CPU): what the edge pays for TLS before any socket, reactor or asyncio work.
    --profile adds a cProfile listing of those calls."""
    import cProfile
    import pstats

    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from blindfold.core import keyless_wire as w
    from blindfold.core import tls13_server as ts
    from blindfold.core.clienthello import peek_client_hello

    identity = ts.ServerIdentity.from_pem(Path(a.cert).read_bytes())
    key = serialization.load_pem_private_key(Path(a.key).read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    sessions = ts.SessionStore(7200.0, 100_000)
    settings = ts.TlsSettings()
    cctx = ssl.create_default_context(cafile=a.cafile)
    cctx.minimum_version = ssl.TLSVersion.TLSv1_3
    cctx.set_alpn_protocols(["http/1.1"])
    prof = cProfile.Profile() if a.profile else None
    # ClientHello -> signature request | flight | Finished + ticket | the key share used,
    # made again for the pool (off the handshake's path, but CPU all the same)
    phases = [0.0, 0.0, 0.0, 0.0]
    warm = min(100, a.n // 10)
    pool = getattr(ts, "KEY_SHARES", None)
    if pool is not None:
        pool.fill(pool.size)

    def timed(i: int, phase: int, fn: Any) -> Any:
        if prof is not None and i >= warm:
            prof.enable()
        t0 = time.process_time()
        try:
            return fn()
        finally:
            if i >= warm:
                phases[phase] += time.process_time() - t0
            if prof is not None:
                prof.disable()

    for i in range(a.n):
        inb, outb = ssl.MemoryBIO(), ssl.MemoryBIO()
        cli = cctx.wrap_bio(inb, outb, server_hostname=SNI)
        with contextlib.suppress(ssl.SSLWantReadError):
            cli.do_handshake()
        hello = outb.read()

        def first(hello: bytes = hello) -> tuple[Any, list[Any]]:
            # the edge's reactor parses it first (SNI, JA4, route) and hands it over
            srv = ts.TlsServer(identity, settings, sessions, SNI, peek_client_hello(hello))
            return srv, srv.receive(hello, 0.0)

        srv, events = timed(i, 0, first)
        req = events[0]
        assert isinstance(req, ts.SignatureRequested), events
        sig = key.sign(w.certificate_verify_content(req.transcript_hash), ec.ECDSA(hashes.SHA256()))

        def middle(sig: bytes = sig, srv: Any = srv) -> bytes:
            srv.signature_received(sig, 0.0)
            return bytes(srv.data_to_send())

        flight = timed(i, 1, middle)
        inb.write(flight)
        cli.do_handshake()
        fin = outb.read()

        def last(fin: bytes = fin, srv: Any = srv) -> list[Any]:
            ev = srv.receive(fin, 0.0)
            srv.data_to_send()
            srv.close()
            srv.data_to_send()
            return list(ev)

        events = timed(i, 2, last)
        assert any(isinstance(e, ts.HandshakeCompleted) for e in events), events
        if pool is not None:
            timed(i, 3, lambda: pool.fill(pool.wanted))
    n = a.n - warm
    print(
        json.dumps(
            {
                "n": n,
                "us": sum(phases) / n * 1e6,
                "path_us": sum(phases[:3]) / n * 1e6,
                "phases_us": [round(p / n * 1e6) for p in phases],
            }
        ),
        flush=True,
    )
    if prof is not None:
        pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(a.profile)
    return 0


# ============================================================================ the run
class Bench:
    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.out: Path = a.out
        self.deadline = time.monotonic() + a.budget
        self.r: dict[str, Any] = {}

    def check_time(self, need: float) -> None:
        if time.monotonic() + need > self.deadline:
            raise RuntimeError(f"time budget (--budget {self.a.budget} s) would be exceeded")

    def note(self, msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)
        with open(self.out / "progress.txt", "a") as f:
            f.write(msg + "\n")

    # ---------------------------------------------------------------- processes
    def start_keyserver(self) -> None:
        path = self.out / "keyserver.toml"
        path.write_text(keyserver_toml(self.pki, self.out))
        for old in ("keyserver.log", "audit.log"):  # a reused --out: no stale ready line
            (self.out / old).unlink(missing_ok=True)
        self.ks = Proc(
            "keyserver", [PY, "-m", "blindfold", "keyserver", "--config", str(path)], self.out
        )
        ready = self.ks.wait_json(self.out / "keyserver.log", "keyserver_ready")
        assert ready["pid"] == self.ks.pid, (ready, self.ks.pid)
        self.ks_addr = ready["listen"][0]
        self.ks_admin = ready["admin"]

    def ks_signed(self) -> float:
        return metric(
            http_get(f"http://{self.ks_admin}/metrics"),
            "blindfold_keyserver_signatures_total",
            result="ok",
        )

    def start_edge(self, tag: str, ks_addr: str, workers: int) -> tuple[Proc, dict[str, Any]]:
        log = self.out / f"{tag}.log"
        path = self.out / f"{tag}.toml"
        log.unlink(missing_ok=True)
        path.write_text(
            edge_toml(self.pki, ks_addr, workers, log, self.dead_port, self.a.log_connections)
        )
        p = Proc(tag, [PY, "-m", "blindfold", "edge", "--config", str(path)], self.out)
        ready = p.wait_json(log, "edge_ready")
        assert ready["pid"] == p.pid, (ready, p.pid)
        end = time.monotonic() + 15
        while len(children(p.pid)) < workers and time.monotonic() < end:
            time.sleep(0.05)
        kids = children(p.pid)
        if len(kids) != workers:
            raise RuntimeError(f"{tag}: expected {workers} workers, found {kids}")
        ready["port"] = int(ready["listen"][0].rpartition(":")[2])
        ready["workers_pids"] = kids
        return p, ready

    def edge_full(self, admin: str) -> float:
        return metric(
            http_get(f"http://{admin}/metrics"), "blindfold_keyless_handshakes_total", result="full"
        )

    def clients(
        self,
        tag: str,
        port: int,
        *,
        n: int,
        seconds: float,
        procs: int,
        threads: int,
        sources: list[str],
        alpn: str = "http/1.1",
    ) -> dict[str, Any]:
        return run_clients(
            self.out,
            tag,
            port,
            self.pki["site_ca"],
            n=n,
            seconds=seconds,
            procs=procs,
            threads=threads,
            sources=sources,
            alpn=alpn,
        )

    def measured_load(
        self,
        tag: str,
        port: int,
        pids: list[int],
        *,
        n: int,
        seconds: float,
        procs: int,
        threads: int,
        sources: list[str],
        alpn: str = "http/1.1",
        admin: str = "",
        extra_pids: tuple[int, ...] = (),
    ) -> dict[str, Any]:
        """Warm-up, then the load with the CPU of `pids` (and the key server's) read around
        it."""
        self.clients(
            f"{tag}.warmup",
            port,
            n=self.a.warmup,
            seconds=30,
            procs=1,
            threads=min(threads, 4),
            sources=sources,
            alpn=alpn,
        )
        time.sleep(0.3)
        sign0 = self.sign_latency(admin)
        ks0 = cpu_s(self.ks.pid)
        sig0 = self.ks_signed()
        c0 = group_cpu(pids)
        sy0 = sum(sys_s(p) for p in pids)
        x0 = sum(cpu_s(p) for p in extra_pids)
        m0 = busy_s()
        t0 = time.monotonic()
        res = self.clients(
            tag,
            port,
            n=n,
            seconds=seconds,
            procs=procs,
            threads=threads,
            sources=sources,
            alpn=alpn,
        )
        time.sleep(0.2)  # the last connections' close is processed
        c1 = group_cpu(pids)
        res["sys_s"] = sum(sys_s(p) for p in pids) - sy0
        wall = time.monotonic() - t0
        ks1 = cpu_s(self.ks.pid)
        sig1 = self.ks_signed()
        res["cpu_s"] = sum(c1.values()) - sum(c0.values())
        res["cpu_by_pid"] = {str(p): round(c1[p] - c0[p], 3) for p in pids}
        res["measure_wall_s"] = wall
        res["ks_cpu_s"] = ks1 - ks0
        res["extra_cpu_s"] = sum(cpu_s(p) for p in extra_pids) - x0
        ours = res["cpu_s"] + res["ks_cpu_s"] + res["client_total_cpu_s"] + res["extra_cpu_s"]
        res["other_cores"] = max(0.0, busy_s() - m0 - ours) / wall
        res["ks_signatures"] = sig1 - sig0
        sign1 = self.sign_latency(admin)
        n_sign = sign1[1] - sign0[1]
        res["sign_mean_ms"] = (sign1[0] - sign0[0]) / n_sign * 1e3 if n_sign else None
        return res

    def sign_latency(self, admin: str) -> tuple[float, float]:
        """The edge's blindfold_keyless_sign_seconds sum and count (0, 0 without an edge)."""
        if not admin:
            return 0.0, 0.0
        text = http_get(f"http://{admin}/metrics")
        return (
            metric(text, "blindfold_keyless_sign_seconds_sum"),
            metric(text, "blindfold_keyless_sign_seconds_count"),
        )

    # ---------------------------------------------------------------- part 1
    def part1(self) -> None:
        a = self.a
        self.check_time(90)
        sources = ["127.0.0.1"]
        res: dict[str, Any] = {}
        self.note(
            f"[1] CPU per full handshake: N={a.n}, {a.procs} client processes x {a.threads} threads"
        )
        kinds = ["asyncio"] + (["threads"] if a.threaded_baseline else [])
        for kind in kinds:
            b = Proc(
                f"baseline-{kind}",
                [
                    PY,
                    str(HERE / "kbench.py"),
                    "baseline",
                    "--kind",
                    kind,
                    "--cert",
                    str(self.pki["site_cert"]),
                    "--key",
                    str(self.pki["site_key"]),
                    "--threads",
                    str(a.procs * a.threads),
                ],
                self.out,
            )
            port = int(b.wait_line())
            r = self.measured_load(
                f"p1.baseline-{kind}",
                port,
                [b.pid],
                n=a.n,
                seconds=a.max_s,
                procs=a.procs,
                threads=a.threads,
                sources=sources,
            )
            b.stop()
            r["server_count"] = b.stderr_path.read_text().strip().splitlines()[-1:]
            res[f"baseline_{kind}"] = r
            self.note(
                f"    baseline {kind}: {r['ok']} ok, cpu {r['cpu_s']:.3f} s, errors {r['errors']}"
            )
        edge, ready = self.start_edge("p1.edge", self.ks_addr, 1)
        pids = [edge.pid, *ready["workers_pids"]]
        for key, alpn in (("edge", "http/1.1"), ("edge_h2", "h2,http/1.1")):
            if key == "edge_h2" and not a.h2_row:
                continue
            full0 = self.edge_full(ready["admin"])
            r = self.measured_load(
                f"p1.{key}",
                ready["port"],
                pids,
                n=a.n,
                seconds=a.max_s,
                procs=a.procs,
                threads=a.threads,
                sources=sources,
                alpn=alpn,
                admin=ready["admin"],
            )
            r["edge_full_handshakes"] = self.edge_full(ready["admin"]) - full0 - a.warmup
            r["pids"] = {"master": edge.pid, "workers": ready["workers_pids"]}
            res[key] = r
            self.note(
                f"    keyless edge (ALPN {alpn}): {r['ok']} ok, cpu {r['cpu_s']:.3f} s "
                f"({r['cpu_by_pid']}), key server {r['ks_cpu_s']:.3f} s for "
                f"{r['ks_signatures']:.0f} signatures, errors {r['errors']}"
            )
        edge.stop()
        core = Proc(
            "p1.core",
            [
                PY,
                str(HERE / "kbench.py"),
                "core",
                "--n",
                str(a.n),
                "--cert",
                str(self.pki["site_cert"]),
                "--key",
                str(self.pki["site_key"]),
                "--cafile",
                str(self.pki["site_ca"]),
            ],
            self.out,
        )
        core.proc.wait(120)
        core.stop()
        res["core"] = json.loads(core.stdout_path.read_text().splitlines()[-1])
        self.note(f"    sans-IO core alone: {res['core']['us']:.0f} µs per handshake")
        self.r["part1"] = res

    # ---------------------------------------------------------------- part 2
    def part2(self) -> None:
        a = self.a
        from blindfold.io.listeners import steer_index

        # spread the clients over loopback addresses that the edge's BPF steering sends to
        # every worker in equal numbers (it picks a worker by client address)
        per: dict[int, list[str]] = {i: [] for i in range(a.workers)}
        for i in range(1, 4000):
            ip = str(ipaddress.ip_address("127.0.10.0") + i)
            w = steer_index(ip, a.workers)
            if len(per[w]) < a.concurrency // a.workers + 1:
                per[w].append(ip)
            if all(len(v) >= a.concurrency // a.workers + 1 for v in per.values()):
                break
        sources = [ip for grp in zip(*per.values(), strict=True) for ip in grp]
        res: dict[str, Any] = {"sources": len(sources), "workers": a.workers}
        for label, delay in (("no_delay", 0.0), ("delay", a.delay_ms)):
            self.check_time(a.seconds + 60)
            ks_addr = self.ks_addr
            relay = None
            if delay:
                relay = Proc(
                    "relay",
                    [
                        PY,
                        str(HERE / "kbench.py"),
                        "relay",
                        "--target",
                        self.ks_addr,
                        "--delay-ms",
                        str(delay),
                    ]
                    + (["--both"] if a.delay_both else []),
                    self.out,
                )
                ks_addr = f"127.0.0.1:{int(relay.wait_line())}"
            self.note(
                f"[2] handshakes/s, key server delay {delay:g} ms"
                f"{' each way' if delay and a.delay_both else ''}: {a.concurrency} "
                f"clients, {a.seconds:g} s, workers = {a.workers}"
            )
            edge, ready = self.start_edge(f"p2.edge-{label}", ks_addr, a.workers)
            pids = [edge.pid, *ready["workers_pids"]]
            procs = max(1, min(a.concurrency, a.procs2))
            threads = max(1, a.concurrency // procs)
            r = self.measured_load(
                f"p2.{label}",
                ready["port"],
                pids,
                n=1_000_000,
                seconds=a.seconds,
                procs=procs,
                threads=threads,
                sources=sources,
                admin=ready["admin"],
                extra_pids=(relay.pid,) if relay else (),
            )
            r["delay_ms"] = delay
            r["rate"] = r["ok"] / r["elapsed_s"]
            r["clients"] = procs * threads
            edge.stop()
            if relay is not None:
                relay.stop()
            res[label] = r
            self.note(
                f"    {r['ok']} ok in {r['elapsed_s']:.1f} s = {r['rate']:.0f}/s, "
                f"p50 {r['lat_p50_ms']:.1f} ms p99 {r['lat_p99_ms']:.1f} ms, edge cpu "
                f"{r['cpu_by_pid']}, errors {r['errors']}"
            )
        self.r["part2"] = res

    # ---------------------------------------------------------------- part 3
    def part3(self) -> None:
        a = self.a
        self.check_time(a.sign_seconds + a.raw_seconds + 40)
        self.note(f"[3] key server: {a.inflight} sign requests in flight, {a.sign_seconds:g} s")
        d = self.pki["dir"]
        cmd = [
            PY,
            str(HERE / "kbench.py"),
            "signload",
            "--port",
            self.ks_addr.rpartition(":")[2],
            "--ca",
            str(d / "ca.pem"),
            "--cert",
            str(d / "edge1.pem"),
            "--key",
            str(d / "edge1.key"),
            "--site-cert",
            str(self.pki["site_cert"]),
            "--site-ca",
            str(self.pki["site_ca"]),
            "--inflight",
            str(a.inflight),
            "--seconds",
            "1",
        ]
        warm = Proc("p3.warmup", cmd, self.out)  # 1 s warm-up
        warm.proc.wait(30)
        warm.stop()
        time.sleep(0.3)
        k0, s0 = cpu_s(self.ks.pid), self.ks_signed()
        m0, t0 = busy_s(), time.monotonic()
        cmd[-1] = str(a.sign_seconds)
        load = Proc("p3.signload", cmd, self.out)
        load.proc.wait(a.sign_seconds + 30)
        time.sleep(0.1)
        k1, s1 = cpu_s(self.ks.pid), self.ks_signed()
        m1, wall = busy_s(), time.monotonic() - t0
        load.stop()
        r = json.loads(load.stdout_path.read_text().splitlines()[-1])
        r["ks_cpu_s"] = k1 - k0
        r["ks_signatures"] = s1 - s0
        r["other_cores"] = max(0.0, m1 - m0 - r["ks_cpu_s"] - r["cpu_s"]) / wall
        self.note(
            f"    {r['ok']} signatures in {r['elapsed_s']:.2f} s, key server cpu "
            f"{r['ks_cpu_s']:.2f} s, errors {r['error_kinds']}"
        )
        m0, t0 = busy_s(), time.monotonic()
        raw = Proc(
            "p3.rawsign",
            [
                PY,
                str(HERE / "kbench.py"),
                "rawsign",
                "--key",
                str(self.pki["site_key"]),
                "--seconds",
                str(a.raw_seconds),
            ],
            self.out,
        )
        raw.proc.wait(a.raw_seconds + 30)
        raw.stop()
        r["raw"] = json.loads(raw.stdout_path.read_text().splitlines()[-1])
        r["raw"]["other_cores"] = max(0.0, busy_s() - m0 - r["raw"]["cpu_s"] - 0.1) / (
            time.monotonic() - t0
        )  # 0.1 s: the interpreter's start
        self.note(f"    raw cryptography sign(): {r['raw']['n']} in {r['raw']['cpu_s']:.2f} CPU-s")
        self.r["part3"] = r

    # ---------------------------------------------------------------- all
    def run(self) -> int:
        a = self.a
        self.note(f"results: {self.out}")
        self.pki = make_pki(self.out / "pki")
        self.dead_port = free_port()  # the route's origin: nothing listens (never used)
        try:
            self.start_keyserver()
            if "1" in a.parts:
                self.part1()
            if "2" in a.parts:
                self.part2()
            if "3" in a.parts:
                self.part3()
        finally:
            Proc.stop_all()
            self.r["args"] = dict(vars(a))
            (self.out / "results.json").write_text(json.dumps(self.r, indent=1, default=str))
        report = self.report()
        (self.out / "report.txt").write_text(report)
        print(report)
        return 0

    def report(self) -> str:
        a = self.a
        L: list[str] = []
        env = (
            f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}, "
            f"{ssl.OPENSSL_VERSION}, blindfold at {git_rev()}"
        )
        L.append(f"# bench/keyless  ({env})")
        L.append(f"command: {' '.join(a.argv)}")
        L.append("")

        def us(r: dict[str, Any], key: str = "cpu_s") -> float:
            return float(r[key]) / max(1, r["ok"]) * 1e6

        if "part1" in self.r:
            p = self.r["part1"]
            e = p["edge"]
            base = us(p["baseline_asyncio"])
            L.append(
                f"1. CPU per full TLS 1.3 handshake: N={a.n} per server, {a.procs}x"
                f"{a.threads} client threads (blocking ssl) from 127.0.0.1, SNI "
                f"{SNI}, ALPN http/1.1,"
            )
            L.append(
                "   handshake then close_notify both ways, no HTTP request, no "
                "resumption (no session reused; one ticket issued by every server)"
            )
            L.append(
                f"   {'server (CPU of its processes)':<46} {'ok':>5} {'CPU s':>6} "
                f"{'µs/hs':>6} {'ratio':>6} {'client µs/hs':>12} {'other':>5}"
            )
            rows = [("baseline: asyncio + ssl (OpenSSL)", p["baseline_asyncio"])]
            if "baseline_threads" in p:
                rows.append(("baseline: threads + ssl (OpenSSL)", p["baseline_threads"]))
            rows.append(("keyless edge, workers=1 (master + worker)", e))
            if "edge_h2" in p:
                rows.append(("  same, clients offer h2 (edge sends SETTINGS)", p["edge_h2"]))
            for name, r in rows:
                L.append(
                    f"   {name:<46} {r['ok']:>5} {r['cpu_s']:>6.2f} {us(r):>6.0f} "
                    f"{us(r) / base:>5.2f}x {us(r, 'client_cpu_s'):>12.0f} "
                    f"{r['other_cores']:>5.2f}"
                )
            if "core" in p:
                c = p["core"]
                ph = "/".join(str(x) for x in c["phases_us"])
                L.append(
                    f"   {'  of which TlsServer core, no I/O (in-process)':<46} "
                    f"{c['n']:>5} {'':>6} {c['us']:>6.0f} {c['us'] / base:>5.2f}x  "
                    f"(hello/flight/finished/key refill {ph} µs)"
                )
            ks_us = e["ks_cpu_s"] / max(1, e["ks_signatures"]) * 1e6
            L.append(
                f"   {'key server, per signature (edge run)':<46} "
                f"{e['ks_signatures']:>5.0f} {e['ks_cpu_s']:>6.2f} {ks_us:>6.0f}"
            )
            ratio = us(e) / base
            L.append(
                f"   goal keyless edge <= 1.2x asyncio baseline: {ratio:.2f}x -> "
                f"{'MET' if ratio <= 1.2 else 'NOT MET'};  edge + key server: "
                f"{(us(e) + ks_us) / base:.2f}x"
            )
            loads = {k: r for k, r in p.items() if "errors" in r}
            errs = {k: r["errors"] for k, r in loads.items() if r["errors"]}
            L.append(
                f"   edge counted {e['edge_full_handshakes']:.0f} full handshakes; client "
                f"resumptions {sum(r['reused'] for r in loads.values())}; errors "
                f"{errs or 0}"
            )
            L.append(
                "   (clients send SNI example.test; a ClientHello without SNI would be passed "
                "through to the origin)"
            )
            L.append("")
        if "part2" in self.r:
            p = self.r["part2"]
            L.append(
                f"2. Full handshakes/s: {a.concurrency} concurrent clients "
                f"({p['sources']} loopback source addresses, spread over the workers), "
                f"{a.seconds:g} s, edge workers = {p['workers']}"
            )
            L.append(
                f"   {'key server':<24} {'hs/s':>6} {'p50 ms':>7} {'p99 ms':>7} "
                f"{'sign ms':>7} {'edge cores':>10} {'hs/edge-CPU-s':>13} "
                f"{'client cores':>12} {'other':>5} {'errors':>6}"
            )
            for label in ("no_delay", "delay"):
                if label not in p:
                    continue
                r = p[label]
                name = (
                    f"+{r['delay_ms']:g} ms {'each way' if a.delay_both else 'towards it'}"
                    if r["delay_ms"]
                    else "direct (loopback)"
                )
                cores = r["cpu_s"] / r["measure_wall_s"]
                L.append(
                    f"   {name:<24} {r['rate']:>6.0f} {r['lat_p50_ms']:>7.1f} "
                    f"{r['lat_p99_ms']:>7.1f} {r['sign_mean_ms'] or 0:>7.1f} {cores:>10.2f} "
                    f"{r['ok'] / r['cpu_s']:>13.0f} "
                    f"{r['client_cpu_s'] / r['elapsed_s']:>12.2f} "
                    f"{r['other_cores']:>5.2f} {sum(r['errors'].values()):>6}"
                )
            if "delay" in p:
                rate = p["delay"]["rate"]
                L.append(
                    f"   goal >= 700/s with the delay: {rate:.0f}/s -> "
                    f"{'MET' if rate >= 700 else 'NOT MET'}"
                    + (
                        f" (delayed / direct = {rate / p['no_delay']['rate']:.2f})"
                        if "no_delay" in p
                        else ""
                    )
                )
            L.append(
                f"   (clients, edge, key server and relay share the {os.cpu_count()} "
                "CPUs; p50/p99: client handshake time; sign ms: the edge's mean wait for a "
                "signature;"
            )
            L.append(
                "    hs/edge-CPU-s: handshakes per CPU-second of the edge = what one fully "
                "used edge core would do)"
            )
            L.append("")
        if "part3" in self.r:
            r = self.r["part3"]
            raw = r["raw"]
            raw_rate = raw["n"] / raw["cpu_s"]
            per_core = r["ks_signatures"] / r["ks_cpu_s"] if r["ks_cpu_s"] else 0.0
            L.append(
                f"3. ECDSA P-256 signatures: {a.inflight} requests in flight on one mTLS "
                f"connection, {a.sign_seconds:g} s"
            )
            L.append(f"   {'':<46} {'sig/s':>8} {'per core':>9} {'ratio':>6}")
            L.append(
                f"   {'raw cryptography sign(), 1 thread (baseline)':<46} "
                f"{raw['n'] / raw['wall_s']:>8.0f} {raw_rate:>9.0f} {1:>5.2f}x"
            )
            L.append(
                f"   {'key server (parse, authorise, sign, audit)':<46} "
                f"{r['ok'] / r['elapsed_s']:>8.0f} {per_core:>9.0f} "
                f"{per_core / raw_rate:>5.2f}x"
            )
            L.append(
                f"   key server CPU {r['ks_cpu_s']:.2f} s for {r['ks_signatures']:.0f} "
                f"signatures = {r['ks_cpu_s'] / max(1, r['ks_signatures']) * 1e6:.0f} "
                f"µs each (raw sign {1e6 / raw_rate:.0f} µs); errors "
                f"{r['error_kinds'] or 0}"
            )
            L.append(
                f"   goal >= 10,000/s per core: {per_core:.0f} -> "
                f"{'MET' if per_core >= 10000 else 'NOT MET'};  other load: "
                f"{r['other_cores']:.2f} cores (key server run), "
                f"{raw.get('other_cores', 0):.2f} (raw sign run)"
            )
            L.append("")
        others = [
            r.get("other_cores", 0.0)
            for part in ("part1", "part2")
            for r in self.r.get(part, {}).values()
            if isinstance(r, dict)
        ]
        if "part3" in self.r:
            others += [self.r["part3"]["other_cores"], self.r["part3"]["raw"]["other_cores"]]
        if others and max(others) > 0.15:
            L.append(
                f"WARNING: other processes used up to {max(others):.2f} cores during a "
                "measurement ('other' columns): the machine was not quiet, numbers are "
                "disturbed."
            )
        L.append(
            "'other' = cores busy on the machine beyond the processes this benchmark "
            "measured (another workload, or unaccounted kernel work)."
        )
        L.append(f"raw outputs: {self.out}")
        return "\n".join(L) + "\n"


# ============================================================================ arguments
def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="kbench.py")
    sub = ap.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("run", help="the whole benchmark")
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--parts", default="123", help="which parts: any of 1 2 3 (default 123)")
    r.add_argument("--n", type=int, default=2000, help="part 1: handshakes per server")
    r.add_argument("--max-s", type=float, default=60.0, help="part 1: time cap per server")
    r.add_argument("--procs", type=int, default=2, help="part 1: client processes")
    r.add_argument("--threads", type=int, default=8, help="part 1: threads per client process")
    r.add_argument("--warmup", type=int, default=100, help="handshakes before each measurement")
    r.add_argument("--no-threaded-baseline", dest="threaded_baseline", action="store_false")
    r.add_argument(
        "--no-h2-row",
        dest="h2_row",
        action="store_false",
        help="part 1: skip the extra edge run whose clients offer h2",
    )
    r.add_argument(
        "--log-connections",
        action="store_true",
        help="keep the edge's per-connection log line (off: measure TLS only)",
    )
    r.add_argument("--seconds", type=float, default=10.0, help="part 2: load duration")
    r.add_argument("--concurrency", type=int, default=32, help="part 2: concurrent clients")
    r.add_argument("--procs2", type=int, default=4, help="part 2: client processes")
    r.add_argument("--workers", type=int, default=2, help="part 2: edge workers")
    r.add_argument("--delay-ms", type=float, default=20.0, help="part 2: key server delay")
    r.add_argument(
        "--delay-both", action="store_true", help="part 2: delay the answers too (RTT = 2x delay)"
    )
    r.add_argument("--inflight", type=int, default=256, help="part 3: requests in flight")
    r.add_argument("--sign-seconds", type=float, default=8.0, help="part 3: load duration")
    r.add_argument("--raw-seconds", type=float, default=3.0, help="part 3: raw sign() loop")
    r.add_argument("--budget", type=float, default=600.0, help="time budget of the run (s)")

    c = sub.add_parser("client")
    c.add_argument("--host", default="127.0.0.1")
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--cafile", required=True)
    c.add_argument("--sni", default=SNI)
    c.add_argument("--n", type=int, required=True)
    c.add_argument("--seconds", type=float, required=True)
    c.add_argument("--threads", type=int, default=8)
    c.add_argument("--sources", default="127.0.0.1")
    c.add_argument("--timeout", type=float, default=10.0)
    c.add_argument("--alpn", default="http/1.1", help="comma-separated ALPN offer; '' = none")

    b = sub.add_parser("baseline")
    b.add_argument("--kind", choices=("asyncio", "threads"), default="asyncio")
    b.add_argument("--cert", required=True)
    b.add_argument("--key", required=True)
    b.add_argument("--threads", type=int, default=16)

    rl = sub.add_parser("relay")
    rl.add_argument("--target", required=True)
    rl.add_argument("--delay-ms", type=float, default=20.0)
    rl.add_argument("--both", action="store_true")

    s = sub.add_parser("signload")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--ca", required=True)
    s.add_argument("--cert", required=True)
    s.add_argument("--key", required=True)
    s.add_argument("--site-cert", required=True, help="the site's certificate (chain)")
    s.add_argument("--site-ca", required=True, help="the CA that signed it")
    s.add_argument("--inflight", type=int, default=256)
    s.add_argument("--seconds", type=float, default=8.0)

    rp = sub.add_parser("report", help="print the table again from a results directory")
    rp.add_argument("dir", type=Path)

    co = sub.add_parser("core")
    co.add_argument("--n", type=int, default=2000)
    co.add_argument("--cert", required=True)
    co.add_argument("--key", required=True)
    co.add_argument("--cafile", required=True)
    co.add_argument("--profile", type=int, default=0, help="print the top N of a cProfile")

    w = sub.add_parser("rawsign")
    w.add_argument("--key", required=True)
    w.add_argument("--seconds", type=float, default=3.0)

    a = ap.parse_args(argv)
    if a.cmd == "run":
        a.argv = ["bench/keyless/run.sh", *argv[1:]]
        a.out.mkdir(parents=True, exist_ok=True)
        a.out = a.out.resolve()

        def on_term(*_: Any) -> None:
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, on_term)
        try:
            return Bench(a).run()
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        finally:
            Proc.stop_all()
    if a.cmd == "report":
        r = json.loads((a.dir / "results.json").read_text())
        b = Bench.__new__(Bench)
        b.a = argparse.Namespace(**r.pop("args"))
        b.out, b.r = a.dir, r
        print(b.report(), end="")
        return 0
    return {
        "client": client_main,
        "baseline": baseline_main,
        "relay": relay_main,
        "signload": signload_main,
        "rawsign": rawsign_main,
        "core": core_main,
    }[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
