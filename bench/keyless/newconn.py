#!/usr/bin/env python3
"""bench/keyless/newconn.py: the keyless edge's cost per NEW connection (issue 19, last two rows).

Each connection: TCP connect, TLS 1.3 handshake (full keyless, or resumed with the ticket of the
connection before), `GET /2k` with `Connection: close`, the 2 KB body read to EOF and checked
byte for byte, close. The response is a cache hit (the origin is asked once, at warm-up).

  newconn.py run --out DIR [--n 1000] [--modes full,resumed,keepalive] [--src A=PATH ...]
                 [--rounds 2] [--callgrind]

For each `--src` (a `src/` directory put first on PYTHONPATH: e.g. the branch and a `git archive`
of main, to compare in ONE run) and each round, it starts an edge (workers = 1, pinned to CPU 0)
and measures, over N sequential connections from one client process pinned to CPU 1:
- edge CPU us/conn: utime + stime of the master and its worker (/proc), before/after;
- key server CPU us/conn (full handshakes sign once each; resumed ones never ask);
- with --callgrind: the worker under `valgrind --tool=callgrind --instr-atstart=no`,
  instrumentation on only during the load: user-space instructions per connection (repeats
  within ~1%, unlike CPU time on this shared machine; kernel time is not counted).

Loopback only; every process it starts is stopped by its PID; each load is bounded by a count
and a time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

from bench.benchlib import Proc, cpu_s, http_get, metric  # noqa: E402

PY = sys.executable
SNI = "example.test"
BODY = bytes((i * 7 + 13) % 251 for i in range(2048))
# --profile: put first on the worker's PYTHONPATH; SIGUSR2 starts cProfile, the next one stops it
# and writes BF_NEWCONN_PROF.<k> (k = 0, 1, ...)
# and <...>.gc.<k>: the garbage collector's runs and time per generation while it ran, and how
# many objects a collection after the load found unreachable (reference cycles left behind)
SITECUSTOMIZE = """import gc, json, os, signal, sys, time
if "blindfold.edge.worker" in sys.orig_argv and os.environ.get("BF_NEWCONN_PROF"):
    import cProfile
    _p, _n, _gc, _t = [None], [0], {}, [0.0]
    def _gc_cb(phase, info):
        if phase == "start":
            _t[0] = time.perf_counter()
        elif _p[0] is not None:
            g = _gc.setdefault(str(info["generation"]), [0, 0.0])
            g[0] += 1
            g[1] += time.perf_counter() - _t[0]
    gc.callbacks.append(_gc_cb)
    def _name(o):
        return type(o).__qualname__

    def _cycles(garbage):
        # a shortest reference cycle through one object of each of a few per-connection types
        ids = {id(o): o for o in garbage}
        out = []
        for want in ("Conn", "TlsServerProtocol", "H1Connection", "KeylessHandler"):
            start = next((o for o in garbage if _name(o) == want), None)
            if start is None:
                continue
            prev = {id(start): None}
            queue = [start]
            found = None
            while queue and found is None:
                nxt = []
                for o in queue:
                    for r in gc.get_referents(o):
                        if r is start:
                            found = o
                            break
                        if id(r) in ids and id(r) not in prev:
                            prev[id(r)] = o
                            nxt.append(r)
                    if found is not None:
                        break
                queue = nxt
            path = []
            o = found
            while o is not None:
                path.append(_name(o))
                o = prev[id(o)]
            out.append(" <- ".join([want, *path]))
        return out

    def _toggle(sig, frm):
        if _p[0] is None:
            _gc.clear()
            gc.collect()  # so that what the load leaves behind can be counted at its end
            _p[0] = cProfile.Profile()
            _p[0].enable()
        else:
            _p[0].disable()
            base = f"{os.environ['BF_NEWCONN_PROF']}.{_n[0]}"
            _p[0].dump_stats(base)
            gc.set_debug(gc.DEBUG_SAVEALL)
            _gc["unreachable_after_load"] = gc.collect()  # objects only the collector frees
            gc.set_debug(0)
            kinds = {}
            for o in gc.garbage:
                k = type(o).__module__ + "." + type(o).__qualname__
                if k == "builtins.function":
                    k += ":" + o.__module__ + "." + o.__qualname__
                kinds[k] = kinds.get(k, 0) + 1
            _gc["cycles"] = _cycles(gc.garbage)
            gc.garbage.clear()
            _gc["unreachable_types"] = sorted(kinds.items(), key=lambda kv: -kv[1])[:25]
            with open(base + ".gc", "w") as f:
                json.dump(_gc, f)
            _p[0] = None
            _n[0] += 1
    signal.signal(signal.SIGUSR2, _toggle)
"""


# ============================================================================ origin
def origin_main(a: argparse.Namespace) -> int:
    """A TLS origin serving /2k (2 KB, cacheable for a day) with keep-alive; prints its port."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(a.cert, a.key)
    head = (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n"
        b"cache-control: public, max-age=86400\r\n"
        b"content-length: " + str(len(BODY)).encode() + b"\r\n\r\n"
    )

    async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while True:
                req = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 60)
                if not req:
                    break
                w.write(head + BODY)
                await w.drain()
        except (TimeoutError, OSError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            w.close()

    async def main() -> None:
        srv = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=ctx)
        print(srv.sockets[0].getsockname()[1], flush=True)
        await asyncio.sleep(a.seconds)

    asyncio.run(main())
    return 0


# ============================================================================ client
def keepalive_main(a: argparse.Namespace, ctx: ssl.SSLContext) -> int:
    """--mode keepalive: N requests (GET /2k, cache hits) one after the other on ONE
    keep-alive connection, each response read to its Content-Length and checked."""
    req = f"GET /2k HTTP/1.1\r\nHost: {SNI}\r\n\r\n".encode()
    want = hashlib.sha256(BODY).digest()
    ok = bad = 0
    errors: dict[str, int] = {}
    deadline = time.monotonic() + a.seconds
    t0 = time.monotonic()
    try:
        with socket.create_connection(("127.0.0.1", a.port), timeout=a.timeout) as raw:
            tls = ctx.wrap_socket(raw, server_hostname=SNI)
            buf = b""
            for _ in range(a.n):
                if time.monotonic() >= deadline:
                    break
                tls.sendall(req)
                while b"\r\n\r\n" not in buf:
                    b = tls.recv(65536)
                    if not b:
                        raise ConnectionError("closed")
                    buf += b
                head, _, buf = buf.partition(b"\r\n\r\n")
                m = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
                size = int(m.group(1)) if m else 0
                while len(buf) < size:
                    b = tls.recv(65536)
                    if not b:
                        raise ConnectionError("closed")
                    buf += b
                body, buf = buf[:size], buf[size:]
                good = head.startswith(b"HTTP/1.1 200") and hashlib.sha256(body).digest() == want
                ok += good
                bad += not good
    except (OSError, ssl.SSLError) as exc:
        k = type(exc).__name__
        errors[k] = errors.get(k, 0) + 1
    print(
        json.dumps(
            {
                "ok": ok,
                "bad": bad,
                "reused": 0,
                "errors": errors,
                "elapsed_s": time.monotonic() - t0,
            }
        ),
        flush=True,
    )
    return 0


def client_main(a: argparse.Namespace) -> int:
    """N sequential connections: handshake (resumed: with the previous connection's ticket),
    GET /2k, Connection: close, the body checked, close. (`keepalive`: keepalive_main.)"""
    ctx = ssl.create_default_context(cafile=a.cafile)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_alpn_protocols(["http/1.1"])
    if a.mode == "keepalive":
        return keepalive_main(a, ctx)
    req = f"GET /2k HTTP/1.1\r\nHost: {SNI}\r\nConnection: close\r\n\r\n".encode()
    want = hashlib.sha256(BODY).digest()
    session: ssl.SSLSession | None = None
    ok = reused = bad = 0
    errors: dict[str, int] = {}
    deadline = time.monotonic() + a.seconds
    t0 = time.monotonic()
    for _ in range(a.n):
        if time.monotonic() >= deadline:
            break
        try:
            with socket.create_connection(("127.0.0.1", a.port), timeout=a.timeout) as raw:
                tls = ctx.wrap_socket(
                    raw, server_hostname=SNI, session=session if a.mode == "resumed" else None
                )
                tls.sendall(req)
                chunks = []
                with contextlib.suppress(ssl.SSLEOFError):
                    while True:
                        b = tls.recv(65536)
                        if not b:
                            break
                        chunks.append(b)
                data = b"".join(chunks)
                head, _, body = data.partition(b"\r\n\r\n")
                good = head.startswith(b"HTTP/1.1 200") and hashlib.sha256(body).digest() == want
                ok += good
                bad += not good
                reused += tls.session_reused
                if a.mode == "resumed" and tls.session is not None:
                    session = tls.session
                with contextlib.suppress(OSError, ssl.SSLError):
                    tls.close()
        except (OSError, ssl.SSLError) as exc:
            k = type(exc).__name__
            errors[k] = errors.get(k, 0) + 1
    print(
        json.dumps(
            {
                "ok": ok,
                "bad": bad,
                "reused": reused,
                "errors": errors,
                "elapsed_s": time.monotonic() - t0,
            }
        ),
        flush=True,
    )
    return 0


# ============================================================================ the run
def children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            out += [int(p) for p in (task / "children").read_text().split()]
    return out


def edge_toml(p: dict[str, Any], ks_addr: str, log: Path, origin_port: int) -> str:
    d = p["dir"]
    tls = (
        f'client_cert = "{d / "edge1.pem"}", client_key = "{d / "edge1.key"}", '
        f'ca = "{d / "ca.pem"}"'
    )
    return f"""# written by bench/keyless/newconn.py
[edge]
listen = ["127.0.0.1:0"]
admin_listen = "127.0.0.1:0"
workers = 1
per_ip_rate_per_s = 0.0
per_ip_concurrent = 100000
max_connections = 100000
drain_timeout_s = 1.0
log_path = "{log}"
log_connections = false

[[edge.routes]]
sni = ["{SNI}", "*.{SNI}"]
mode = "keyless"
certificate = "{p["site_cert"]}"
origins = ["127.0.0.1:{origin_port}"]
origin_ca = "{p["site_ca"]}"
origin_server_name = "{SNI}"
proxy_protocol = "none"
keyserver = {{ addresses = ["{ks_addr}"], server_name = "keyserver.test", {tls} }}
"""


class Run:
    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.out: Path = a.out
        self.out.mkdir(parents=True, exist_ok=True)
        self.deadline = time.monotonic() + a.budget

    def client(self, tag: str, port: int, mode: str, n: int) -> dict[str, Any]:
        c = Proc(
            tag,
            [
                PY,
                str(HERE / "newconn.py"),
                "client",
                "--port",
                str(port),
                "--cafile",
                str(self.pki["site_ca"]),
                "--mode",
                mode,
                "--n",
                str(n),
                "--seconds",
                str(self.a.max_s),
            ],
            self.out,
            pin="1",
        )
        c.wait(self.a.max_s + 60)
        return c.last_json()

    def start_edge(self, tag: str, src: str, callgrind: bool) -> tuple[Proc, int, str, int]:
        log = self.out / f"{tag}.log"
        path = self.out / f"{tag}.toml"
        log.unlink(missing_ok=True)
        path.write_text(edge_toml(self.pki, self.ks_addr, log, self.origin_port))
        cmd = [PY, "-m", "blindfold", "edge", "--config", str(path)]
        if callgrind:
            cmd = [
                "valgrind",
                "--tool=callgrind",
                "--trace-children=yes",
                "--instr-atstart=no",
                f"--callgrind-out-file={self.out}/{tag}.cg.%p",
                *cmd,
            ]
        env = dict(os.environ, PYTHONPATH=src)
        if self.a.profile:
            prof = self.out / "prof"
            prof.mkdir(exist_ok=True)
            (prof / "sitecustomize.py").write_text(SITECUSTOMIZE)
            env["PYTHONPATH"] = f"{prof}:{src}"
            env["BF_NEWCONN_PROF"] = str(self.out / f"{tag}.prof")
        p = Proc(tag, cmd, self.out, pin="0", env=env)
        ready = p.wait_json(log, "edge_ready", timeout=300 if callgrind else 30)
        end = time.monotonic() + (120 if callgrind else 15)
        while not children(p.pid) and time.monotonic() < end:
            time.sleep(0.1)
        kids = children(p.pid)
        if len(kids) != 1:
            raise RuntimeError(f"{tag}: expected 1 worker, found {kids}")
        port = int(ready["listen"][0].rpartition(":")[2])
        return p, kids[0], ready["admin"], port

    def one(self, tag: str, src: str, modes: list[str]) -> dict[str, Any]:
        a = self.a
        cg = a.callgrind
        edge, worker, admin, port = self.start_edge(tag, src, cg)
        res: dict[str, Any] = {}
        try:
            for mode in modes:
                if time.monotonic() + a.max_s + 60 > self.deadline:
                    raise RuntimeError("time budget (--budget) would be exceeded")
                w = self.client(f"{tag}.{mode}.warm", port, mode, a.warmup)
                if w["ok"] != a.warmup:
                    raise RuntimeError(f"{tag} warm-up failed: {w}")
                n = a.cg_n if cg else a.n
                if cg:
                    for f in self.out.glob(f"{tag}.cg.{worker}.*"):  # anything before the load
                        if not f.name.endswith(".done"):
                            f.rename(f.with_suffix(f.suffix + ".before.done"))
                    subprocess.run(["callgrind_control", "-z", str(worker)], capture_output=True)
                    subprocess.run(
                        ["callgrind_control", "-i", "on", str(worker)], capture_output=True
                    )
                if a.profile:
                    os.kill(worker, signal.SIGUSR2)
                ks0 = cpu_s(self.ks.pid)
                e0 = cpu_s(edge.pid) + cpu_s(worker)
                r = self.client(f"{tag}.{mode}", port, mode, n)
                e1 = cpu_s(edge.pid) + cpu_s(worker)
                ks1 = cpu_s(self.ks.pid)
                if a.profile:  # written as <tag>.prof.<k>, k = the mode's index
                    os.kill(worker, signal.SIGUSR2)
                if cg:
                    subprocess.run(
                        ["callgrind_control", "-d", f"{mode}", str(worker)], capture_output=True
                    )
                    subprocess.run(
                        ["callgrind_control", "-i", "off", str(worker)], capture_output=True
                    )
                    r["instr_per_conn"] = self.cg_total(tag, worker, mode) / max(1, r["ok"])
                r["edge_us"] = (e1 - e0) / max(1, r["ok"]) * 1e6
                r["ks_us"] = (ks1 - ks0) / max(1, r["ok"]) * 1e6
                text = http_get(f"http://{admin}/metrics")
                r["full_total"] = metric(text, "blindfold_keyless_handshakes_total", result="full")
                res[mode] = r
                extra = f", {r['instr_per_conn'] / 1e3:.0f}k instr/conn" if cg else ""
                print(
                    f"{tag} {mode}: ok {r['ok']} bad {r['bad']} reused {r['reused']} "
                    f"errors {r['errors']}: edge {r['edge_us']:.0f} us/conn, key server "
                    f"{r['ks_us']:.0f} us/conn{extra}",
                    flush=True,
                )
        finally:
            edge.stop(timeout=60)
        return res

    def cg_total(self, tag: str, worker: int, mode: str) -> float:
        """Instructions counted since the load began: the dump named after the mode, plus any
        other dump callgrind wrote meanwhile (it sometimes dumps once more, unnamed)."""
        end = time.monotonic() + 60
        while time.monotonic() < end:
            files = [
                f for f in self.out.glob(f"{tag}.cg.{worker}.*") if not f.name.endswith(".done")
            ]
            texts = {f: f.read_text(errors="replace") for f in files}
            if any(re.search(rf"^desc: Trigger: .*\b{mode}$", t, re.M) for t in texts.values()):
                total = 0.0
                for f, text in texts.items():
                    m = re.search(r"^(?:summary|totals): (\d+)", text, re.M)
                    if m and "Trigger: Program termination" not in text:
                        total += float(m.group(1))
                    f.rename(f.with_suffix(f.suffix + f".{mode}.done"))
                return total
            time.sleep(0.2)
        raise RuntimeError("no callgrind dump")

    def main(self) -> int:
        from kbench import keyserver_toml, make_pki

        a = self.a
        self.pki = make_pki(self.out / "pki")
        path = self.out / "keyserver.toml"
        path.write_text(keyserver_toml(self.pki, self.out))
        for old in ("keyserver.log", "audit.log"):
            (self.out / old).unlink(missing_ok=True)
        self.ks = Proc(
            "keyserver",
            [PY, "-m", "blindfold", "keyserver", "--config", str(path)],
            self.out,
            pin="1",
        )
        self.ks_addr = self.ks.wait_json(self.out / "keyserver.log", "keyserver_ready")["listen"][0]
        origin = Proc(
            "origin",
            [
                PY,
                str(HERE / "newconn.py"),
                "origin",
                "--cert",
                str(self.pki["site_cert"]),
                "--key",
                str(self.pki["site_key"]),
                "--seconds",
                str(a.budget),
            ],
            self.out,
            pin="1",
        )
        self.origin_port = int(origin.wait_line())
        srcs = a.src or [f"this={REPO / 'src'}"]
        modes = a.modes.split(",")
        results: dict[str, list[dict[str, Any]]] = {}
        try:
            for rnd in range(a.rounds):
                for spec in srcs:
                    name, _, src = spec.partition("=")
                    results.setdefault(name, []).append(self.one(f"{name}.r{rnd}", src, modes))
        finally:
            origin.stop()
            self.ks.stop()
        (self.out / "results.json").write_text(json.dumps(results, indent=1))
        print("\nsummary (per connection; one value per round)")
        for name, rounds in results.items():
            for mode in modes:
                e = [f"{r[mode]['edge_us']:.0f}" for r in rounds if mode in r]
                k = [f"{r[mode]['ks_us']:.0f}" for r in rounds if mode in r]
                line = f"  {name:10} {mode:8} edge us {'/'.join(e):20} key server us {'/'.join(k)}"
                if a.callgrind:
                    i = [f"{r[mode]['instr_per_conn'] / 1e3:.1f}k" for r in rounds if mode in r]
                    line += f"  instr {'/'.join(i)}"
                print(line)
        return 0


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--n", type=int, default=1000, help="connections per mode and round")
    r.add_argument("--cg-n", type=int, default=200, help="connections per mode under callgrind")
    r.add_argument("--warmup", type=int, default=50)
    r.add_argument("--modes", default="full,resumed")
    r.add_argument("--rounds", type=int, default=2)
    r.add_argument("--src", action="append", default=[], help="NAME=PATH of a src/ (repeat)")
    r.add_argument("--callgrind", action="store_true")
    r.add_argument("--profile", action="store_true", help="cProfile the worker during each load")
    r.add_argument("--max-s", type=float, default=120.0, help="time cap per load")
    r.add_argument("--budget", type=float, default=1200.0, help="time budget of the run (s)")
    c = sub.add_parser("client")
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--cafile", required=True)
    c.add_argument("--mode", choices=("full", "resumed", "keepalive"), required=True)
    c.add_argument("--n", type=int, required=True)
    c.add_argument("--seconds", type=float, required=True)
    c.add_argument("--timeout", type=float, default=10.0)
    o = sub.add_parser("origin")
    o.add_argument("--cert", required=True)
    o.add_argument("--key", required=True)
    o.add_argument("--seconds", type=float, required=True)
    a = ap.parse_args(argv)
    if a.cmd == "run":
        try:
            return Run(a).main()
        finally:
            Proc.stop_all()
    if a.cmd == "client":
        return client_main(a)
    return origin_main(a)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
