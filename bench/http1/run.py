"""HTTP/1.1 server CPU per request: web.http1 (llhttp) against the h11 connection it replaced
(tests/helpers/h11_reference.py), under `wrk -c32` keep-alive, wrk pinned to CPU 0 and the
server to CPU 1, both alternated in one run; with asyncio's loop and with uvloop.

Prints server CPU (utime+stime from /proc) per request, per variant, each round, and the
median ratio old/new. Usage: bench/http1/run.py [--rounds 3] [--seconds 4]"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from benchlib import cpu_s  # noqa: E402

PY = os.environ.get("PYTHON", sys.executable)


def one(impl: str, path: str, uv: bool, seconds: int, conns: int) -> tuple[float, float]:
    """(server CPU microseconds per request, requests per second) of one wrk run."""
    cmd = ["taskset", "-c", "1", PY, str(HERE / "server.py"), impl, *(["--uvloop"] if uv else [])]
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        url = f"http://127.0.0.1:{port}{path}"
        wrk = ["taskset", "-c", "0", "wrk", "-t1", f"-c{conns}"]
        subprocess.run([*wrk, "-d1s", url], capture_output=True, timeout=30, check=True)  # warm
        before = cpu_s(server.pid)
        out = subprocess.run(
            [*wrk, f"-d{seconds}s", url], capture_output=True, text=True, timeout=seconds + 30
        ).stdout
        used = cpu_s(server.pid) - before
        m = re.search(r"(\d+) requests in ([\d.]+)s", out)
        assert m, out
        if "Non-2xx" in out or "Socket errors" in out:
            raise SystemExit(f"errors in wrk output:\n{out}")
        n = int(m.group(1))
        return used / n * 1e6, n / float(m.group(2))
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(10)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=4)
    ap.add_argument("--conns", type=int, default=32)
    args = ap.parse_args()
    for tool in ("wrk", "taskset"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is needed (apt-get install wrk util-linux)")
    variants = [
        (impl, path, uv)
        for uv in (False, True)
        for path in ("/start", "/prepared")
        for impl in ("old", "new")
    ]
    cpu: dict[tuple[str, str, bool], list[float]] = {v: [] for v in variants}
    for r in range(args.rounds):
        for v in variants if r % 2 == 0 else variants[::-1]:
            us, rps = one(*v, args.seconds, args.conns)
            cpu[v].append(us)
            loop = "uvloop" if v[2] else "asyncio"
            print(f"round {r} {v[0]:3} {v[1]:9} {loop:7} {us:7.1f} us/req  {rps:8.0f} req/s")
    print("\nmedian server CPU per request (min-max), and old/new:")
    for uv in (False, True):
        for path in ("/start", "/prepared"):
            old, new = cpu[("old", path, uv)], cpu[("new", path, uv)]
            loop = "uvloop" if uv else "asyncio"
            ratio = statistics.median(old) / statistics.median(new)
            print(
                f"  {loop:7} {path:9} old {statistics.median(old):6.1f} "
                f"({min(old):.1f}-{max(old):.1f})  new {statistics.median(new):6.1f} "
                f"({min(new):.1f}-{max(new):.1f})  ratio {ratio:.2f}"
            )
    base = statistics.median(cpu[("old", "/start", False)])
    best = statistics.median(cpu[("new", "/prepared", True)])
    print(f"\nold+asyncio+start -> new+uvloop+prepared: {base / best:.2f}x less CPU per request")


if __name__ == "__main__":
    main()
