#!/usr/bin/env python3
"""Same-run A/B of the origin agent's CPU time per WAF-inspected request, split by process
(master / workers) and by kind (user / system), loopback only.

Every VARIANT runs at once (one `blindfold origin`, `workers = 1`, each on its own port, all
pinned to --cpu like bench/waf/run.sh, the kit's stand-in origin pinned there too); the load
(wrk, pinned to --wrk-cpu) goes to one variant at a time, alternated --reps times, so every
variant sees the same machine noise; with --concurrent every variant is loaded at the same
time (they share --cpu), which resolved ~1% differences on a loaded machine where alternated
runs did not. CPU per request = (utime + stime) of the master and its workers from /proc over
the run / requests answered; also context switches, read/write calls and minor faults.

    bench/origin/abcpu.py [--reps 5] [--seconds 3] [--pl 1] VARIANT...
    VARIANT = SRC[::VAR=VALUE]...     a source tree (its src/ first on PYTHONPATH) and
                                      environment variables for its master (workers inherit);
                                      ::@key=value adds an [origin] line to its config
    e.g. bench/origin/abcpu.py ../main . .::PYTHONMALLOC=malloc

Runs this checkout's .venv/bin/python (as bench/waf/run.sh). Prints one line per run and,
per variant and script, the median and spread of every column and the median of its per-rep
ratio to the first variant.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
TICK = os.sysconf("SC_CLK_TCK")
COUNTS = ("vol", "invol", "rd", "wr", "flt")  # per request: context switches, I/O calls, faults
sys.path.insert(0, os.path.join(REPO, "bench", "waf"))
import wafcmp  # noqa: E402


def stat(pid: int) -> tuple[int, int, int]:
    """utime, stime (clock ticks) and minor page faults of `pid`."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]), int(fields[12]), int(fields[7])
    except (OSError, IndexError, ValueError):
        return 0, 0, 0


def sample(master: int) -> dict[str, int]:
    mu, ms, flt = stat(master)
    wu = ws = 0
    for p in wafcmp._pids_with_children(master)[1:]:
        u, s, f = stat(p)
        wu += u
        ws += s
        flt += f
    vol = invol = 0
    for p in wafcmp._pids_with_children(master):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches"):
                        vol += int(line.split()[1])
                    elif line.startswith("nonvoluntary_ctxt_switches"):
                        invol += int(line.split()[1])
        except OSError:
            pass
    rd = wr = 0
    for p in wafcmp._pids_with_children(master):
        try:
            with open(f"/proc/{p}/io") as f:
                for line in f:
                    if line.startswith("syscr:"):
                        rd += int(line.split()[1])
                    elif line.startswith("syscw:"):
                        wr += int(line.split()[1])
        except OSError:
            pass
    return {
        **{"mu": mu, "ms": ms, "wu": wu, "ws": ws},
        **{"vol": vol, "invol": invol, "rd": rd, "wr": wr, "flt": flt},
    }


def wrk(port: int, script: str, seconds: int, conns: int, wrk_cpu: str) -> int:
    cmd = ["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "-s", script, f"http://127.0.0.1:{port}"]
    if wrk_cpu:
        cmd = ["taskset", "-c", wrk_cpu, *cmd]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30).stdout
    m = re.search(r"(\d+) requests in", out)
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if bad and int(bad.group(1)):
        print(f"  warning: {bad.group(1)} non-2xx answers", file=sys.stderr)
    return int(m.group(1)) if m else 0


def both(procs: list, script: str, seconds: int, a: argparse.Namespace) -> list[int]:
    """wrk against every variant at the same time; the requests each answered."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(procs)) as pool:
        futs = [
            pool.submit(wrk, port, script, seconds, a.connections, a.wrk_cpu)
            for _, _, port, _ in procs
        ]
        return [f.result() for f in futs]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--seconds", type=int, default=3)
    ap.add_argument("--pl", type=int, default=1)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--cpu", default="0")
    ap.add_argument("--wrk-cpu", default="1")
    ap.add_argument("--scripts", default="get_page,post_form")
    ap.add_argument(
        "--concurrent",
        action="store_true",
        help="load every variant at once (they share --cpu: the same noise for all)",
    )
    ap.add_argument(
        "--kit", default=os.environ.get("WAF_KIT", os.path.join(REPO, "..", "shared", "waf"))
    )
    ap.add_argument("variants", nargs="+")
    a = ap.parse_args()
    if not (1 <= a.reps <= 30 and 1 <= a.seconds <= 30):
        sys.exit("--reps 1-30, --seconds 1-30")
    py = os.path.join(REPO, ".venv", "bin", "python")
    out = tempfile.mkdtemp(prefix="blindfold-abcpu.")
    os.chmod(out, 0o755)
    started: list[subprocess.Popen[bytes]] = []
    anchor_pid = 0
    try:
        aport, _, _ = (
            int(x)
            for x in subprocess.check_output(
                [sys.executable, os.path.join(REPO, "bench/waf/wafcmp.py"), "ports"], text=True
            ).split()
        )
        subprocess.run(
            ["sh", f"{a.kit}/anchor/nginx_anchor.sh", "start", str(a.pl), str(aport)],
            env={**os.environ, "WAF_RUN_DIR": out, "CPU": a.cpu},
            check=True,
            stdout=subprocess.DEVNULL,
        )
        with open(f"{out}/nginx-pl{a.pl}/nginx.pid") as f:
            anchor_pid = int(f.read())
        standin = aport + 1000
        wafcmp.cmd_wait_http(f"127.0.0.1:{standin}", "15")
        procs = []
        for i, variant in enumerate(a.variants):
            src, *assigns = variant.split("::")
            env = dict(os.environ)
            env.update(x.split("=", 1) for x in assigns if not x.startswith("@"))
            extra = "".join(x[1:] + "\n" for x in assigns if x.startswith("@"))
            env["PYTHONPATH"] = os.path.join(os.path.abspath(src), "src")
            bport, admin, _ = (
                int(x)
                for x in subprocess.check_output(
                    [sys.executable, os.path.join(REPO, "bench/waf/wafcmp.py"), "ports"], text=True
                ).split()
            )
            d = f"{out}/v{i}"
            os.mkdir(d)
            with open(f"{d}/origin.toml", "w") as f:
                f.write(f"""[origin]
upstream = "http://127.0.0.1:{standin}"
listen = []
http_listen = ["127.0.0.1:{bport}"]
proxy_protocol = "off"
admin_listen = "127.0.0.1:{admin}"
access_log = false
log_path = "{d}/origin.log"
workers = 1
{extra}[origin.waf]
paranoia_level = {a.pl}
mode = "block"
body_limit_action = "reject"
[origin.decisions]
ban_after_blocks = 1000000
""")
            open(f"{d}/origin.log", "w").close()
            out_file = open(f"{d}/stdout", "w")  # noqa: SIM115 (closed with the process)
            p = subprocess.Popen(
                [
                    "taskset",
                    "-c",
                    a.cpu,
                    py,
                    "-m",
                    "blindfold",
                    "origin",
                    "--config",
                    f"{d}/origin.toml",
                ],
                env=env,
                stdout=out_file,
                stderr=subprocess.STDOUT,
            )
            started.append(p)
            procs.append((variant, p, bport, d))
            # wait for ready before starting the next (they share one CPU)
            deadline = time.time() + 60
            while time.time() < deadline:
                with open(f"{d}/origin.log") as f:
                    if '"origin_ready"' in f.read():
                        break
                if p.poll() is not None:
                    sys.exit(f"{variant} exited; see {d}/stdout")
                time.sleep(0.2)
            else:
                sys.exit(f"{variant} not ready")
        scripts = a.scripts.split(",")
        rows: dict[tuple[int, str], list[dict[str, float]]] = {}
        for rep in range(1, a.reps + 1):
            for script in scripts:
                lua = f"{a.kit}/anchor/{script}.lua"
                if a.concurrent:  # every variant loaded at once: the same noise for all
                    both(procs, lua, 1, a)
                    c0s = [sample(p.pid) for _, p, _, _ in procs]
                    ns = both(procs, lua, a.seconds, a)
                    c1s = [sample(p.pid) for _, p, _, _ in procs]
                for i, (variant, p, bport, _d) in enumerate(procs):
                    if a.concurrent:
                        c0, n, c1 = c0s[i], ns[i], c1s[i]
                    else:
                        wrk(bport, lua, 1, a.connections, a.wrk_cpu)  # warm-up
                        c0 = sample(p.pid)
                        n = wrk(bport, lua, a.seconds, a.connections, a.wrk_cpu)
                        c1 = sample(p.pid)
                    us = {
                        k: 1e6 * (c1[k] - c0[k]) / TICK / max(n, 1)
                        for k in ("mu", "ms", "wu", "ws")
                    }
                    sw = {k: (c1[k] - c0[k]) / max(n, 1) for k in COUNTS}
                    row = {
                        "n": n,
                        "total": sum(us.values()),
                        "user": us["mu"] + us["wu"],
                        "sys": us["ms"] + us["ws"],
                        "master": us["mu"] + us["ms"],
                        **us,
                    }
                    rows.setdefault((i, script), []).append(row)
                    print(
                        f"rep {rep} {script:9} v{i} {n:6d} req  {row['total']:6.0f} us/req"
                        f"  user {row['user']:5.0f} sys {row['sys']:5.0f}"
                        f"  master {row['master']:4.0f}"
                        f"  cs/req {sw['vol']:.2f}+{sw['invol']:.2f}"
                        f"  rd/wr {sw['rd']:.2f}/{sw['wr']:.2f}  faults {sw['flt']:.1f}"
                        f"  [{variant}]",
                        flush=True,
                    )
        print("\nmedian (min-max) us CPU per request; ratio = median of per-rep total / v0's")
        for script in scripts:
            for i, (variant, *_rest) in enumerate(procs):
                r = rows[(i, script)]
                cols = []
                for k in ("total", "user", "sys", "master"):
                    vals = [x[k] for x in r]
                    cols.append(
                        f"{k} {statistics.median(vals):5.0f} ({min(vals):.0f}-{max(vals):.0f})"
                    )
                ratio = statistics.median(
                    x["total"] / y["total"] for x, y in zip(r, rows[(0, script)], strict=True)
                )
                print(f"{script:9} v{i} {'  '.join(cols)}  ratio {ratio:.3f}  [{variant}]")
        print(f"(raw outputs in {out})")
    finally:
        for p in started:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in started:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
        if anchor_pid:
            try:
                os.kill(anchor_pid, signal.SIGTERM)
            except OSError:
                pass

    return 0


if __name__ == "__main__":
    sys.exit(main())
