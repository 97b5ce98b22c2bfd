#!/usr/bin/env python3
"""bench/faults: faults injected one at a time into the whole deployment while visitors keep
coming (see README.md beside it). For each: what the visitors saw (errors by kind), how long
until they were served again, and what was checked afterwards (the audit log verifies, no ban
was forgotten, no blob in the edge's cache is anything but whole and right).

A supervisor is emulated as systemd would act (Restart=on-failure, RestartSec=2): a part that
dies is started again 2 s after it died and, for the edge, after every process of the old one
(its draining workers) is gone, as systemd stops a unit's whole control group before a
restart.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))

from bench.soak.topology import (  # noqa: E402
    DECISIONS_HOST,
    HOST,
    Part,
    Topology,
    build,
    edge_config_text,
)
from bench.soak.visitors import (  # noqa: E402
    API_KEY_HEADER,
    Recorder,
    Visitors,
    audit_verify,
    cache_files_whole,
    classify,
    manifest_entries,
    request,
)

RESTART_SEC = 2.0  # the units' RestartSec
RATES = {"page": 5.0, "upload": 0.4, "keyless": 3.0, "attack": 0.25, "blind": 4.0}
QUIET_S = 5.0  # recovered: this long with no visitor error


def metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return str(resp.read().decode())


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        key, _, value = line.rpartition(" ")
        base, _, lab = key.partition("{")
        if base == name and all(f'{k}="{v}"' in lab for k, v in labels.items()):
            total += float(value)
    return total


class Run:
    def __init__(self, topo: Topology, rec: Recorder, visitors: Visitors) -> None:
        self.topo = topo
        self.rec = rec
        self.visitors = visitors
        self.rows: list[dict[str, Any]] = []
        self.checks: list[tuple[str, bool, str]] = []
        self.base = topo.base

    # ---------------------------------------------------------------- helpers
    def active_bans(self) -> dict[str, float]:
        """Every active decision of the origin ({value: until}), from its own API."""
        status, body, c = request(
            DECISIONS_HOST, self.topo.ports["decisions"], "127.0.0.1", self.visitors.ctx, "GET",
            "/v1/decisions", headers=API_KEY_HEADER,
        )  # fmt: skip
        c.close()
        if status != 200:
            raise RuntimeError(f"decisions API answered {status}")
        from blindfold.decisions.core import parse_duration

        now = time.time()
        return {d["value"]: now + parse_duration(d["duration"]) for d in json.loads(body) or []}

    def refused(self, source: str) -> bool:
        """Does the edge refuse `source` (a new TLS connection fails before any answer)?"""
        try:
            _s, _b, c = request(HOST, self.topo.edge_port, source, self.visitors.ctx, "GET", "/",
                                timeout=5)  # fmt: skip
            c.close()
            return False
        except OSError:
            return True

    def redis_decision_keys(self) -> int:
        import redis

        r = redis.Redis(port=self.topo.ports["redis"], socket_timeout=5)
        try:
            return sum(1 for _ in r.scan_iter(match="blindfold:decision:*", count=1000))
        finally:
            r.close()

    def edge_metric(self, name: str, **labels: str) -> float:
        return metric(metrics(self.topo.ports["edge_admin"]), name, **labels)

    def wait(self, pred: Callable[[], bool], timeout: float, step: float = 0.1) -> float | None:
        """Seconds until `pred()` held, or None at the deadline."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            try:
                if pred():
                    return time.monotonic() - t0
            except Exception:
                pass
            time.sleep(step)
        return None

    def recovery(self, t_fault: float, settle_s: float) -> tuple[float | None, dict[str, int]]:
        """Wait until visitors have seen no error for QUIET_S (at most `settle_s`); returns
        (seconds from the fault to the last error, 0 with none, None if never quiet that
        long) and the errors by kind and class since the fault."""
        deadline = time.time() + settle_s
        while time.time() < deadline:
            last = self.rec.last_error(t_fault)
            if time.time() - (last or t_fault) >= QUIET_S:
                break
            time.sleep(0.5)
        last = self.rec.last_error(t_fault)
        quiet = time.time() - (last or t_fault) >= QUIET_S
        rec_s = round(last - t_fault, 2) if last else 0.0
        errors = {f"{k}:{w}": n for (k, w), n in sorted(self.rec.errors(t_fault).items())}
        return (rec_s if quiet else None), errors

    def row(self, fault: str, t_fault: float, settle_s: float, **extra: Any) -> None:
        """Close the fault's window: wait for the visitors to be served again, then record
        what they saw and the checks made (self.checks)."""
        rec_s, errors = self.recovery(t_fault, settle_s)
        served = self.rec.counts(t_fault)
        ok = sum(n for (_k, w), n in served.items() if w in ("ok", "blocked", "banned"))
        checks, self.checks = self.checks, []
        self.rows.append(
            {
                "fault": fault,
                "recovery_s": rec_s,
                "errors": errors,
                "last_error_s": self.rec.last_error_by_kind(t_fault),
                "ok_visits": ok,
                "checks": [{"check": c, "ok": good, "detail": d} for c, good, d in checks],
                **extra,
            }
        )
        fine = all(good for _c, good, _d in checks) and rec_s is not None
        print(f"[{'ok' if fine else 'PROBLEM'}] {fault}: recovery {rec_s} s, errors {errors}")
        for c, good, d in checks:
            print(f"     {'ok ' if good else 'BAD'} {c}{': ' + d if d else ''}", flush=True)
        time.sleep(2)  # a gap between faults, outside every window

    def check(self, what: str, good: bool, detail: str = "") -> None:
        self.checks.append((what, bool(good), detail))

    def banned_sample(self) -> str | None:
        """An attacker address the origin has banned and that stays banned a while."""
        bans = self.active_bans()
        now = time.time()
        good = [v for v, until in bans.items() if until - now > 60 and v.startswith("127.3.")]
        return good[-1] if good else None

    def restart_after_death(self, name: str) -> float:
        """The supervisor: start `name` again RestartSec after it died; returns how long its
        start took (to ready)."""
        time.sleep(RESTART_SEC)
        return round(self.topo.parts[name].start(), 2)

    def audit_ok(self) -> None:
        code, text = audit_verify(self.topo)
        entries = re.search(r"ok: \d+ entries", text)
        self.check("audit log verifies", code == 0, entries[0] if entries else text[-200:])

    def victim_refused(self, victim: str | None, who: str = "the edge") -> None:
        refused = victim is not None and self.refused(victim)
        self.check(f"a banned attacker ({victim}) refused by {who}", refused)

    # ---------------------------------------------------------------- faults
    def kill_keyserver(self) -> None:
        t = time.time()
        self.topo.parts["keyserver"].kill9()
        took = self.restart_after_death("keyserver")
        self.audit_ok()
        self.row("kill -9 key server (restarted 2 s later)", t, 60, restart_s=took)

    def kill_origin(self) -> None:
        before = self.active_bans()
        victim = self.banned_sample()
        t = time.time()
        self.topo.parts["origin"].kill9()
        took = self.restart_after_death("origin")
        after = self.active_bans()
        now = time.time()
        lost = [v for v, until in before.items() if until > now + 1 and v not in after]
        n = f"{len(before)} before, {len(after)} after"
        self.check(f"no decision forgotten ({n})", not lost, f"lost {lost[:5]}" if lost else "")
        # the edge resyncs from the restarted origin (a new epoch: the whole set)
        up = self.wait(lambda: self.edge_metric(SOURCE_UP, source="stream") == 1, 20)
        self.check("the edge follows the restarted origin", up is not None)
        time.sleep(1)
        self.victim_refused(victim)
        self.row("kill -9 origin agent (restarted 2 s later)", t, 60, restart_s=took)

    def kill_redis(self) -> None:
        keys_before = self.redis_decision_keys()
        victim = self.banned_sample()
        t = time.time()
        self.topo.parts["redis"].kill9()
        took = self.restart_after_death("redis")
        up = self.wait(lambda: self.edge_metric(SOURCE_UP, source="redis") == 1, 30)
        self.check(f"the edge follows Redis again ({up and round(up, 1)} s after)", up is not None)
        active = set(self.active_bans())
        back = self.wait(lambda: self.redis_decision_keys() >= len(active), 10)
        keys_after = self.redis_decision_keys()
        self.check(
            f"every active decision back on Redis ({keys_before} keys before, {keys_after} "
            f"{back and round(back, 1)} s after the restart; the origin holds {len(active)})",
            back is not None,
        )
        self.victim_refused(victim)
        self.row("kill -9 Redis (restarted empty 2 s later)", t, 60, restart_s=took)

    def kill_worker(self) -> None:
        edge = self.topo.parts["edge"]
        workers = sorted(edge.children())
        victim = self.banned_sample()
        t = time.time()
        os.kill(workers[0], signal.SIGKILL)
        back = self.wait(
            lambda: len(edge.children()) == 2 and workers[0] not in edge.children(), 30
        )
        self.check(f"respawned by the master in {back and round(back, 2)} s", back is not None)
        time.sleep(1)
        self.victim_refused(victim, "the edge (and its new worker)")
        self.row("kill -9 one edge worker (the master respawns it)", t, 60)

    def kill_master_during_download(self) -> None:
        """The same with a visitor's long download in flight: the worker holding it drains
        (up to edge.drain_timeout_s), and systemd restarts nothing before it has exited."""
        done: dict[str, Any] = {}
        thread = threading.Thread(target=self._slow_download, args=(done,), daemon=True)
        thread.start()
        time.sleep(3)
        self.kill_master(" with a slow download in flight", done)
        thread.join(60)
        self.rows[-1]["download"] = done

    def _slow_download(self, done: dict[str, Any]) -> None:
        """GET 64 MB through the passthrough route, read at 2 MB/s."""
        from bench.soak.visitors import _Conn

        n = 64 << 20
        t0 = time.monotonic()
        got = 0
        try:
            c = _Conn(HOST, self.topo.edge_port, "127.7.0.1", self.visitors.ctx, 30)
            c.request("GET", f"/bytes?n={n}")
            resp = c.getresponse()
            while chunk := resp.read(1 << 18):
                got += len(chunk)
                time.sleep(len(chunk) / (2 << 20))
            c.close()
            done["result"] = "complete" if got == n else f"short: {got} of {n} bytes"
        except Exception as exc:
            done["result"] = f"{got} of {n} bytes, then {classify(exc)}"
        done["seconds"] = round(time.monotonic() - t0, 1)

    def kill_master(self, what: str = "", download: dict[str, Any] | None = None) -> None:
        edge = self.topo.parts["edge"]
        workers = edge.children()
        victim = self.banned_sample()
        t = time.time()
        edge.kill9()
        # PR_SET_PDEATHSIG: the workers get SIGTERM, drain and exit; systemd restarts the unit
        # once its control group is empty, RestartSec later
        gone = self.wait(lambda: not any(_running(w) for w in workers), 60)
        self.check(
            f"workers drained and exited {gone and round(gone, 2)} s after", gone is not None
        )
        took = self.restart_after_death("edge")
        gap = round(time.time() - t, 2)
        self.check(f"no edge for {gap} s (workers' exit + RestartSec 2 s + start {took} s)", True)
        up = self.wait(lambda: self.edge_metric(SOURCE_UP, source="stream") == 1, 20)
        self.check("the new edge has the origin's decisions", up is not None)
        time.sleep(1)
        self.victim_refused(victim, "the new edge")
        if download is not None:
            self.check(f"the download: {download.get('result', 'still running')}", True)
        fault = f"kill -9 edge master{what} (supervisor restarts it)"
        self.row(fault, t, 60, gap_s=gap, start_s=took)

    def full_disk(self) -> None:
        if not self.topo.tmpfs:
            self.rows.append({"fault": "full disk under the blind cache", "skipped": "no tmpfs"})
            return
        filler = self.topo.cache_dir / "filler"
        t = time.time()
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:  # fill it to the last block (unbuffered: the error comes here, not at close)
            while True:
                os.write(fd, b"\0" * (1 << 16))
        except OSError:
            pass
        finally:
            os.close(fd)
        st = os.statvfs(self.topo.cache_dir)
        self.check(f"free space while full: {st.f_bavail * st.f_frsize} bytes", True)
        self.visitors.extra_files = list(self.topo.cold_files)  # blobs the edge has not cached
        time.sleep(25)
        filler.unlink()
        time.sleep(10)
        checked, problems = cache_files_whole(self.topo)
        self.check(
            f"cache files whole, no temp file left ({checked} checked)",
            not problems,
            "; ".join(problems[:3]),
        )
        blind = self.rec.counts(t)
        bad = sum(n for (k, w), n in blind.items() if k == "blind" and w.startswith("verify:"))
        self.check(f"verified blind visits since: {blind[('blind', 'ok')]}; bad: {bad}", bad == 0)
        self.row("full disk under the blind cache (tmpfs filled for 25 s)", t, 60)

    def corrupt_cache_file(self, keep_mtime: bool) -> None:
        # a hot blob (over the memory tier's per-object limit: served from the disk copy)
        entries = manifest_entries(self.topo)
        hot = {entries[p].id for p in self.topo.blind_files if "hot-" in p}
        workers = sorted(self.topo.cache_dir.glob("w*"))
        files = [f for w in workers for f in w.iterdir() if f.name in hot]
        how = "same size and mtime: bit rot" if keep_mtime else "same size, new mtime"
        if not files:
            self.rows.append({"fault": f"corrupt cache file ({how})", "skipped": "none cached"})
            return
        target = files[0]
        st = target.stat()
        t = time.time()
        with target.open("r+b") as fh:  # one byte in the middle, changed in place
            fh.seek(st.st_size // 2)
            b = fh.read(1)
            fh.seek(st.st_size // 2)
            fh.write(bytes([b[0] ^ 0x55]))
        if keep_mtime:
            os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
        time.sleep(20)
        seen = self.rec.counts(t)
        bad = sum(n for (k, w), n in seen.items() if k == "blind" and w.startswith("verify:"))
        reports = seen[("blind", "reported")]
        checked, problems = cache_files_whole(self.topo)
        if keep_mtime:  # nothing on disk tells: the first visitor's report has it checked
            seen_by = f"visitors given the bad copy: {bad}, each reported it ({reports})"
            self.check(seen_by, bad <= 2 and reports >= bad)
        else:  # the changed mtime makes the edge check the file before serving it
            self.check(f"visitors given the bad copy: {bad}", bad == 0)
        whole = f"bad copy dropped, cache files whole after ({checked} checked)"
        self.check(whole, not problems, "; ".join(problems[:3]))
        self.row(f"corrupt cache file ({how})", t, 60, served_bad=bad)

    def truncated_audit_log(self) -> None:
        ks = self.topo.parts["keyserver"]
        log = self.base / "audit.log"
        t = time.time()
        ks.kill9()  # a crash in mid-write leaves a cut last line
        size = log.stat().st_size
        with log.open("r+b") as fh:
            fh.truncate(size - 37)
        offset = ks.log_path.stat().st_size
        took = self.restart_after_death("keyserver")
        self.audit_ok()
        cut = ks.find("audit_recovered", since=offset) or {}
        self.check(f"the cut is recorded ({cut.get('cut_bytes', '?')} bytes)", bool(cut))
        fault = "truncated audit log (key server killed, 37 bytes cut, restarted)"
        self.row(fault, t, 60, restart_s=took)

    def bad_reloads(self) -> None:
        t = time.time()
        good_edge = edge_config_text(self.topo)
        for name, bad_text in [
            ("edge", good_edge.replace("workers = 2", "workers = 2\nwrokers = 3")),
            ("origin", None),
            ("keyserver", None),
        ]:
            part = self.topo.parts[name]
            path = self.base / f"{name}.toml"
            original = path.read_text()
            _replace(path, bad_text if bad_text is not None else original + "\n[not toml\n")
            failed = self.reload(part, "reload_failed")
            _replace(path, original)
            again = self.reload(part, "reloaded")
            error = str((failed or {}).get("error", ""))[:60]
            good = bool(failed) and bool(again) and part.alive()
            self.check(f"{name}: the bad file refused ({error}...), the good one reloaded", good)
        self.row("config reload with a bad file (edge, origin, key server)", t, 30)

    def reload(self, part: Part, event: str) -> dict[str, Any] | None:
        offset = part.log_path.stat().st_size
        part.signal(signal.SIGHUP)
        self.wait(lambda: part.find(event, since=offset) is not None, 15)
        return part.find(event, since=offset)


SOURCE_UP = "blindfold_decisions_source_up"


def _running(pid: int) -> bool:
    """Alive and not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _replace(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--only", default="", help="comma-separated fault names (default: all)")
    ap.add_argument("--tmpfs-bytes", type=int, default=8 << 20)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__("now", True))

    tmpfs = args.tmpfs_bytes if os.geteuid() == 0 else 0
    try:
        topo = build(out / "topo", ban_s=600, cache_tmpfs_bytes=tmpfs)
    except subprocess.CalledProcessError:
        topo = build(out / "topo2", ban_s=600)  # no tmpfs allowed: the full disk is skipped
    rec = Recorder()
    visitors = Visitors(topo, rec, RATES, time.monotonic() + 3600, report_bad=True)
    run = Run(topo, rec, visitors)
    faults: dict[str, Callable[[], None]] = {
        "keyserver": run.kill_keyserver,
        "origin": run.kill_origin,
        "redis": run.kill_redis,
        "worker": run.kill_worker,
        "master": run.kill_master,
        "master-busy": run.kill_master_during_download,
        "disk": run.full_disk,
        "corrupt": lambda: run.corrupt_cache_file(keep_mtime=False),
        "bitrot": lambda: run.corrupt_cache_file(keep_mtime=True),
        "audit": run.truncated_audit_log,
        "reload": run.bad_reloads,
    }
    chosen = [f for f in args.only.split(",") if f] or list(faults)
    try:
        topo.start()
        visitors.start()
        print(f"faults: warming up 20 s (files in {topo.base})", flush=True)
        time.sleep(20)
        warm = rec.errors()
        if warm:
            print(f"faults: errors before any fault: {dict(warm)}", flush=True)
        for name in chosen:
            if stop["now"]:
                break
            faults[name]()
    finally:
        visitors.stop()
        topo.stop()
    tracebacks = {n: topo.parts[n].tracebacks() for n in topo.order()}
    (out / "results.json").write_text(json.dumps({"rows": run.rows, "tracebacks": tracebacks,
                                                  "examples": rec.samples}, indent=1))  # fmt: skip
    print("\n| fault | visitors' errors | recovery s | checked |\n|---|---|---|---|")
    for r in run.rows:
        if "skipped" in r:
            print(f"| {r['fault']} | skipped: {r['skipped']} | | |")
            continue
        errs = ", ".join(f"{k} {n}" for k, n in r["errors"].items()) or "none"
        checks = "; ".join(("" if c["ok"] else "FAILED: ") + c["check"] for c in r["checks"])
        print(f"| {r['fault']} | {errs} | {r['recovery_s']} | {checks} |")
    print(f"\ntracebacks: {tracebacks}")
    for key, ex in rec.samples.items():
        print(f"  e.g. {key}: {ex[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
