#!/usr/bin/env python3
"""bench/soak: the whole deployment under mixed traffic for N minutes (see README.md beside
it). Samples every process's RSS, open descriptors and CPU; at the end checks the key server's
audit log, the edge's blind cache, the processes' logs for tracebacks and error lines, and
prints one table per process and one per visitor kind, with the pass/fail verdict:

- after warm-up, RSS grows less than 20% (warm-up RSS -> RSS at the end),
- open descriptors stay flat (the spread after warm-up is at most a few),
- zero unexpected visitor errors, zero error lines, zero tracebacks.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))

from bench.soak.topology import Topology, build, proc_sample, processes  # noqa: E402
from bench.soak.visitors import (  # noqa: E402
    Recorder,
    Visitors,
    audit_verify,
    cache_files_whole,
    log_events,
)

RATES = {"page": 6.0, "upload": 0.5, "keyless": 3.0, "attack": 0.3, "blind": 3.0}
# log lines that mean something went wrong inside a process (beside tracebacks on stderr)
ERROR_EVENTS = frozenset({
    "handler_error", "accept_error", "supervise_error", "respawn_failed", "worker_exited",
    "worker_respawn_suppressed", "decisions_task_failed", "decisions_source_down",
    "redis_publish_failed", "redis_down", "decision_journal_failed", "decision_refused",
    "reload_failed", "accept_paused", "fd_limit_low", "keyserver_unreachable", "blind_disk_error",
    "send_timeout", "loop_exception", "unparsed",
})  # fmt: skip


def sample_all(topo: Topology, t0: float) -> dict[str, Any]:
    row: dict[str, Any] = {"t": round(time.time() - t0, 1), "procs": {}}
    for name, pid in processes(topo).items():
        s = proc_sample(pid)
        if s is not None:
            row["procs"][name] = {"pid": pid, **s}
    return row


def summarise(samples: list[dict[str, Any]], warm_t: float) -> dict[str, dict[str, Any]]:
    """Per process: RSS at the end of warm-up and at the end, fds min/max after warm-up, CPU."""
    names: list[str] = []
    for row in samples:
        for name in row["procs"]:
            if name not in names:
                names.append(name)
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        rows = [(r["t"], r["procs"][name]) for r in samples if name in r["procs"]]
        after = [(t, p) for t, p in rows if t >= warm_t] or rows[-1:]
        warm, end = after[0][1], rows[-1][1]
        pids = sorted({p["pid"] for _t, p in rows})
        out[name] = {
            "pids": pids,
            "rss_warm_mb": round(warm["rss_mb"], 1),
            "rss_end_mb": round(end["rss_mb"], 1),
            "rss_max_mb": round(max(p["rss_mb"] for _t, p in after), 1),
            "growth_pct": round((end["rss_mb"] / warm["rss_mb"] - 1) * 100, 1),
            "fds_min": min(p["fds"] for _t, p in after),
            "fds_max": max(p["fds"] for _t, p in after),
            "cpu_s": round(end["cpu_s"], 1),
        }
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--warmup-minutes", type=float, default=None,
                    help="default: a fifth of the run, at most 5")  # fmt: skip
    ap.add_argument("--sample-s", type=float, default=5.0)
    ap.add_argument("--out", required=True)
    ap.add_argument("--ban-s", type=int, default=60, help="ban duration (they expire in the run)")
    for kind, rate in RATES.items():
        ap.add_argument(f"--{kind}-rate", type=float, default=rate, help=f"per second ({rate})")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    warm_min = (
        args.warmup_minutes if args.warmup_minutes is not None else min(5.0, args.minutes / 5)
    )
    rates = {k: getattr(args, f"{k}_rate") for k in RATES}

    stop = {"now": False}

    def on_signal(signum: int, _frame: Any) -> None:
        stop["now"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    topo = build(out / "topo", ban_s=args.ban_s)
    rec = Recorder()
    samples: list[dict[str, Any]] = []
    visitors: Visitors | None = None
    result: dict[str, Any] = {"minutes": args.minutes, "warmup_minutes": warm_min, "rates": rates}
    try:
        topo.start()
        t0 = time.time()
        end = time.monotonic() + args.minutes * 60
        visitors = Visitors(topo, rec, rates, end + 5)
        visitors.start()
        print(f"soak: {args.minutes} min, warm-up {warm_min} min, files in {topo.base}", flush=True)
        next_print = time.monotonic() + 60
        while time.monotonic() < end and not stop["now"]:
            samples.append(sample_all(topo, t0))
            if time.monotonic() >= next_print:
                next_print += 60
                errs = sum(rec.errors().values())
                print(f"  {samples[-1]['t'] / 60:5.1f} min: {len(rec.events)} visits, "
                      f"{errs} unexpected", flush=True)  # fmt: skip
            dead = [n for n in topo.order() if not topo.parts[n].alive()]
            if dead:
                result["died"] = dead
                print(f"soak: {dead} died", flush=True)
                break
            time.sleep(args.sample_s)
        visitors.stop()
        samples.append(sample_all(topo, t0))
        result["audit_verify"] = audit_verify(topo)
        result["cache"] = cache_files_whole(topo)
    finally:
        if visitors is not None:
            visitors.stop()
        topo.stop()

    result["processes"] = summarise(samples, warm_min * 60)
    logs = {name: log_events(topo.parts[name].log_path) for name in topo.order()}
    result["error_lines"] = {
        name: {e: n for e, n in c.items() if e in ERROR_EVENTS} for name, c in logs.items()
    }
    result["events"] = {name: dict(c.most_common()) for name, c in logs.items()}
    result["tracebacks"] = {name: topo.parts[name].tracebacks() for name in topo.order()}
    result["visits"] = {f"{k}:{w}": n for (k, w), n in sorted(rec.counts().items())}
    result["unexpected"] = {f"{k}:{w}": n for (k, w), n in sorted(rec.errors().items())}
    result["unexpected_examples"] = rec.samples
    result["samples"] = samples
    (out / "results.json").write_text(json.dumps(result, indent=1))
    return report(result)


def report(r: dict[str, Any]) -> int:
    procs = r["processes"]
    print(f"\nsoak: {r['minutes']} min (warm-up {r['warmup_minutes']} min), rates/s {r['rates']}")
    head = "process | RSS warm-up MB | RSS end MB | growth % | fds min/max | CPU-s | errors | tbs"
    print(f"\n| {head} |\n|---|---|---|---|---|---|---|---|")
    failed = []
    for name, p in procs.items():
        part = name.split("-")[0] if name.startswith("edge") else name
        errs = r["error_lines"].get(part, {}) if name in ("edge-master", part) else {}
        tb = r["tracebacks"].get(part, 0) if name in ("edge-master", part) else 0
        print(f"| {name} | {p['rss_warm_mb']} | {p['rss_end_mb']} | {p['growth_pct']} | "
              f"{p['fds_min']}/{p['fds_max']} | {p['cpu_s']} | "
              f"{sum(errs.values()) if errs else 0} | {tb} |")  # fmt: skip
        if p["growth_pct"] >= 20:
            failed.append(f"{name} RSS +{p['growth_pct']}%")
        if p["fds_max"] - p["fds_min"] > 8:
            failed.append(f"{name} fds {p['fds_min']}..{p['fds_max']}")
        if len(p["pids"]) > 1:
            failed.append(f"{name} restarted ({p['pids']})")
    print("\n| visitors | outcome | count |")
    print("|---|---|---|")
    for key, n in r["visits"].items():
        kind, _, what = key.partition(":")
        print(f"| {kind} | {what} | {n} |")
    for name, errs in r["error_lines"].items():
        if errs:
            failed.append(f"{name} logged {errs}")
    for name, n in r["tracebacks"].items():
        if n:
            failed.append(f"{name} wrote {n} tracebacks")
    if r["unexpected"]:
        failed.append(f"visitors saw {r['unexpected']}")
        for key, ex in r["unexpected_examples"].items():
            print(f"  e.g. {key}: {ex[0]}")
    code, text = r.get("audit_verify", (1, "not run"))
    print(f"\naudit verify: exit {code}: {text.splitlines()[-1] if text else ''}")
    if code != 0:
        failed.append("audit log does not verify")
    checked, problems = r.get("cache", (0, ["not run"]))
    print(f"blind cache: {checked} blob files whole; problems: {problems or 'none'}")
    if problems:
        failed.append(f"cache: {problems}")
    if r.get("died"):
        failed.append(f"died: {r['died']}")
    print("\nverdict:", "PASS" if not failed else "FAIL: " + "; ".join(failed))
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
