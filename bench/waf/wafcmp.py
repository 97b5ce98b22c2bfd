#!/usr/bin/env python3
"""Helpers of bench/waf/run.sh (standard library only, runs with the system python3).

wafcmp.py ports                      free loopback ports: ANCHOR (and ANCHOR+1000) BLINDFOLD ADMIN
wafcmp.py wait-http HOST:PORT SECS   wait until something accepts TCP there
wafcmp.py wait-ready LOG PID SECS    wait for blindfold's origin_ready line; print its pid
wafcmp.py cpu PID                    CPU seconds of PID and its direct children (as bench_http.py)
wafcmp.py report [--kit DIR] OUT PL...   the comparison table from run.sh's results directory
"""

from __future__ import annotations

import collections
import glob
import json
import os
import random
import re
import shutil
import socket
import sys
import time

TICK = os.sysconf("SC_CLK_TCK")
# CRS 3.3 rules that only run with an optional crs-setup.conf setting (as in run_ftw.py)
OPTIONAL_RULES = {920250, 920360, 920370, 920380, 920390, 920400, 920410}


# ---------------------------------------------------------------------------- small commands
def _free(port: int) -> bool:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def cmd_ports() -> None:
    # below the ephemeral range (32768+) so no outgoing connection holds them
    rng = random.Random()
    for _ in range(500):
        base = rng.randrange(20000, 30000, 10)
        want = [base, base + 1000, base + 3, base + 4]
        if all(_free(p) for p in want):
            print(base, base + 3, base + 4)
            return
    sys.exit("no free ports found in 20000-31000")


def cmd_wait_http(hostport: str, secs: str) -> None:
    host, port = hostport.rsplit(":", 1)
    end = time.time() + float(secs)
    while time.time() < end:
        try:
            socket.create_connection((host, int(port)), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    sys.exit(1)


def cmd_wait_ready(log: str, pid: str, secs: str) -> None:
    end = time.time() + float(secs)
    while time.time() < end:
        try:
            with open(log, encoding="utf-8", errors="replace") as f:
                for line in f:
                    if '"origin_ready"' in line:
                        print(json.loads(line).get("pid"))
                        return
        except OSError:
            pass
        if not os.path.exists(f"/proc/{pid}") or _state(int(pid)) == "Z":
            sys.exit(1)
        time.sleep(0.2)
    sys.exit(1)


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "?"


def _pids_with_children(pid: int) -> list[int]:
    out = [pid]
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(p))
            except (OSError, IndexError, ValueError):
                pass
    return out


def cmd_cpu(pid: str) -> None:
    t = 0
    for p in _pids_with_children(int(pid)):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            t += int(fields[11]) + int(fields[12])
        except OSError:
            pass
    print("%.2f" % (t / TICK))


# ---------------------------------------------------------------------------- report
SUITE_NAMES = {
    "crs": "CRS 3.3.4 regression tests",
    "corpora:attacks_patt": "PayloadsAllTheThings attacks",
    "corpora:attacks_libinjection": "libinjection attacks",
    "corpora:benign_libinjection_fp": "libinjection false-positive list",
}
BENCH_RE = re.compile(
    r"wall\s+([\d.]+) req/s \| WAF CPU\s+([\d.]+)s for (\d+) req =\s+([\d.]+) req/s per core "
    r"\(\s*([\d.]+) us CPU/req\) \| non-2xx (\d+) \| avg latency (\S+)"
)


def _text(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def _load(path: str):
    text = _text(path)
    try:
        return json.loads(text)["results"] if text else None
    except (ValueError, KeyError):
        return None


def _pct(a: int, b: int) -> str:
    return f"{100.0 * a / b:.2f}%" if b else "n/a"


def _delta(a: str, b: str, unit: str = "pp") -> str:
    ma, mb = re.match(r"\s*(-?[\d.]+)", a), re.match(r"\s*(-?[\d.]+)", b)
    if not ma or not mb:
        return ""
    x, y = float(ma.group(1)), float(mb.group(1))
    if unit == "pp":
        return f"{y - x:+.2f} pp"
    return f"{100.0 * (y - x) / x:+.0f}%" if x else ""


def _ftw_rows(res, pl: int) -> list[tuple[str, str, str]]:
    """(key, label, value 'x% (a/b)') rows for one target."""
    rows = []
    suites: dict[str, list] = collections.OrderedDict()
    for r in res:
        suites.setdefault(r["suite"], []).append(r)
    for suite, rs in suites.items():
        name = SUITE_NAMES.get(suite, suite)
        att = [r for r in rs if r["expect"] == "attack"]
        ben = [r for r in rs if r["expect"] == "benign"]
        if att:
            n = sum(r["blocked"] for r in att)
            rows.append(
                (
                    f"{suite}/att",
                    f"{name}: attacks blocked",
                    f"{_pct(n, len(att))} ({n}/{len(att)})",
                )
            )
        if suite == "crs" and att:
            ins = [
                r
                for r in att
                if r.get("rule_pl")
                and r["rule_pl"] <= pl
                and r["want_ids"]
                and r["want_ids"][0] not in OPTIONAL_RULES
            ]
            n = sum(r["blocked"] for r in ins)
            rows.append(
                (
                    f"{suite}/ins",
                    f"{name}: attacks whose rule is active at the PL",
                    f"{_pct(n, len(ins))} ({n}/{len(ins)})",
                )
            )
        if ben:
            n = sum(r["blocked"] for r in ben)
            rows.append(
                (
                    f"{suite}/ben",
                    f"{name}: benign blocked (false positives)",
                    f"{_pct(n, len(ben))} ({n}/{len(ben)})",
                )
            )
    return rows


def _bench(path: str):
    m = BENCH_RE.search(_text(path) or "")
    if not m:
        return None
    return {
        "wall": float(m.group(1)),
        "cpu": float(m.group(2)),
        "n": int(m.group(3)),
        "per_core": float(m.group(4)),
        "us": float(m.group(5)),
        "non2xx": int(m.group(6)),
        "lat": m.group(7),
    }


def _standin_us(d: str, script: str, bf) -> float | None:
    try:
        c0, c1 = (float(x) for x in (_text(os.path.join(d, f"standin.{script}.cpu")) or "").split())
    except ValueError:
        return None
    if not bf or not bf["n"]:
        return None
    return 1e6 * (c1 - c0) / bf["n"]


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return (
            "| "
            + " | ".join(
                str(c).ljust(w) if i == 0 else str(c).rjust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            )
            + " |"
        )

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep] + [line(r) for r in rows])


def _counts(counter: collections.Counter) -> str:
    return ", ".join(f"{k} x{n}" for k, n in counter.most_common())


def _origin_log_summary(d: str) -> list[str]:
    out = []
    events: collections.Counter = collections.Counter()
    errors: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    by_req: dict[str, dict] = {}
    handler_errors = []
    bad = 0
    text = _text(os.path.join(d, "origin.log"))
    if text is None:
        return ["   (no origin.log)"]
    for line in text.splitlines():
        try:
            e = json.loads(line)
        except ValueError:
            bad += 1
            continue
        ev = e.get("event", "?")
        events[ev] += 1
        if ev == "waf" and e.get("request_id"):
            by_req[e["request_id"]] = e
        if ev == "handler_error":
            handler_errors.append(e)
        if ev in ("bad_request", "h2_abuse", "send_timeout", "accept_error", "reload_failed"):
            msg = str(e.get("error", e.get("reason", "")))
            msg = re.sub(r"bytearray\(b'.*", "bytearray(...)", msg)[:90]
            errors[ev][f"{e.get('status', '')} {msg}".strip()] += 1
    out.append("   events: " + _counts(events) + (f", unparsable lines x{bad}" if bad else ""))
    for ev, c in errors.items():
        for msg, n in c.most_common(8):
            out.append(f"   {ev} x{n}: {msg}")
    if handler_errors:
        kinds: collections.Counter = collections.Counter()
        for e in handler_errors:
            w = by_req.get(e.get("request_id", ""), {})
            kinds[
                (
                    e.get("error", "?"),
                    w.get("method", "?"),
                    w.get("result", "no waf event"),
                    w.get("status", "?"),
                )
            ] += 1
        for (err, method, result, status), n in kinds.most_common():
            out.append(
                f"   handler_error x{n}: {err}  [request: {method}, WAF {result}, status {status}]"
            )
    stdout = os.path.join(d, "origin.stdout")
    text = _text(stdout) or ""
    if text.strip():
        tb = text.count("Traceback (most recent call last)")
        out.append(
            f"   stdout/stderr: {len(text.splitlines())} lines, {tb} tracebacks (see {stdout})"
        )
        out += ["     " + ln for ln in text.strip().splitlines()[-6:]]
    else:
        out.append("   stdout/stderr: empty (no tracebacks)")
    return out


def _outcome_diff(ra: list, rb: list) -> list[str]:
    out = []
    ib = {r["id"]: r for r in rb}
    diff = []
    status_only: collections.Counter = collections.Counter()
    for r in ra:
        o = ib.get(r["id"])
        if o is None or r["expect"] == "skip":
            continue
        sa = r["status"] if r["status"] is not None else r["error"]
        sb = o["status"] if o["status"] is not None else o["error"]
        if r["blocked"] != o["blocked"]:
            diff.append((r, sa, sb))
        elif sa != sb:
            status_only[f"{sa}->{sb}"] += 1

    def count(expect: str, blocked_by_nginx: bool) -> int:
        return sum(
            1 for r, _, _ in diff if r["expect"] == expect and r["blocked"] == blocked_by_nginx
        )

    out.append(
        f"   cases with a different outcome: {len(diff)} (attacks blocked only by nginx "
        f"{count('attack', True)}, only by blindfold {count('attack', False)}; benign "
        f"blocked only by nginx {count('benign', True)}, only by blindfold "
        f"{count('benign', False)})"
    )
    for r, sa, sb in diff:
        out.append(f"     {r['id']:<36} {r['expect']:<7} nginx {sa!s:<18} blindfold {sb}")
    if status_only:
        out.append("   same outcome, different status (nginx->blindfold): " + _counts(status_only))
    for name, res in (("nginx", ra), ("blindfold", rb)):
        st = collections.Counter(
            str(r["status"] if r["status"] is not None else r["error"]) for r in res
        )
        out.append(f"   responses {name}: " + _counts(st))
    return out


def _anchor_log_summary(d: str) -> list[str]:
    path = (_text(os.path.join(d, "anchor-log-path.txt")) or "").strip()
    if not path:
        return []
    bad = []
    try:
        with open(path, errors="replace") as f:
            for line in f:
                if re.search(r"\[(?:emerg|alert|crit)\]", line):
                    bad.append(line.strip()[:200])
    except OSError:
        return []
    return [f"   nginx error.log ({path}): {len(bad)} emerg/alert/crit lines"] + [
        "     " + ln for ln in bad[:5]
    ]


def cmd_report(args: list[str]) -> None:
    global OPTIONAL_RULES
    if args[:1] == ["--kit"]:
        kit, args = args[1], args[2:]
        sys.path.insert(0, kit)
        try:
            import run_ftw  # type: ignore[import-not-found]

            OPTIONAL_RULES = set(run_ftw.OPTIONAL_RULES)
        except Exception:
            pass
    out, pls = args[0], [int(p) for p in args[1:]]
    env = _text(os.path.join(out, "env.txt")) or ""
    header = ["metric"]
    for pl in pls:
        header += [f"PL{pl} nginx+ModSec", f"PL{pl} blindfold", f"PL{pl} Δ"]
    rows: dict[str, list] = collections.OrderedDict()
    labels: dict[str, str] = {}
    details: list[str] = []

    def put(key: str, label: str, col: int, value: str) -> None:
        labels.setdefault(key, label)
        rows.setdefault(key, [""] * (3 * len(pls)))[col] = value

    for i, pl in enumerate(pls):
        d = os.path.join(out, f"pl{pl}")
        ra = _load(os.path.join(d, "anchor.ftw.json"))
        rb = _load(os.path.join(d, "blindfold.ftw.json"))
        for j, res in ((0, ra), (1, rb)):
            for key, label, val in _ftw_rows(res or [], pl):
                put(key, label, 3 * i + j, val)
        for r in rows.values():
            if r[3 * i] and r[3 * i + 1]:
                r[3 * i + 2] = _delta(r[3 * i], r[3 * i + 1])
        for script, name in (("get_page", "GET"), ("post_form", "form POST")):
            a = _bench(os.path.join(d, f"anchor.{script}.bench.txt"))
            b = _bench(os.path.join(d, f"blindfold.{script}.bench.txt"))
            for j, x in ((0, a), (1, b)):
                if x:
                    put(
                        f"perf/{script}/pc",
                        f"{name}: req/s per core (req / WAF CPU-s)",
                        3 * i + j,
                        f"{x['per_core']:.0f}",
                    )
                    put(
                        f"perf/{script}/us",
                        f"{name}: WAF CPU per request (µs)",
                        3 * i + j,
                        f"{x['us']:.0f}",
                    )
                    put(
                        f"perf/{script}/wall",
                        f"{name}: wall req/s (WAF CPU-s used / run)",
                        3 * i + j,
                        f"{x['wall']:.0f} ({x['cpu']:.1f}s)",
                    )
                    put(f"perf/{script}/lat", f"{name}: avg latency", 3 * i + j, x["lat"])
                    put(
                        f"perf/{script}/err",
                        f"{name}: non-2xx responses",
                        3 * i + j,
                        f"{x['non2xx']} / {x['n']}",
                    )
            if a and b:
                for k, f in (("pc", "per_core"), ("wall", "wall"), ("us", "us")):
                    rows[f"perf/{script}/{k}"][3 * i + 2] = _delta(
                        f"{a[f]:.0f}", f"{b[f]:.0f}", "rel"
                    )
            for j, who in ((0, "anchor"), (1, "blindfold")):
                spread = _text(os.path.join(d, f"{who}.{script}.spread.txt"))
                if spread and " " in spread.strip():
                    put(
                        f"perf/{script}/spread",
                        f"{name}: WAF CPU per request, every run in order (µs)",
                        3 * i + j,
                        spread.strip().replace(" ", ", "),
                    )
            s_us = _standin_us(d, script, b)
            if a and s_us is not None:
                # the anchor's nginx worker also serves the stand-in origin; blindfold's process
                # does not (it is a separate process). Remove that share for a like-for-like view.
                waf_us = a["us"] - s_us
                put(
                    f"perf/{script}/pc_adj",
                    f"{name}: per core, stand-in origin CPU removed",
                    3 * i,
                    f"{1e6 / waf_us:.0f}" if waf_us > 0 else "?",
                )
                put(
                    f"perf/{script}/standin",
                    f"{name}: stand-in origin CPU per request (µs)",
                    3 * i,
                    f"{s_us:.0f}",
                )
                if b:
                    put(f"perf/{script}/pc_adj", "", 3 * i + 1, f"{b['per_core']:.0f}")
                    if waf_us > 0:
                        rows[f"perf/{script}/pc_adj"][3 * i + 2] = _delta(
                            f"{1e6 / waf_us:.0f}", f"{b['per_core']:.0f}", "rel"
                        )
        details.append(f"== PL{pl}")
        aff = _text(os.path.join(d, "affinity.txt"))
        if aff:
            details.append("   " + aff.strip())
        if ra and rb:
            details += _outcome_diff(ra, rb)
        details.append("   blindfold origin log:")
        details += _origin_log_summary(d)
        details += _anchor_log_summary(d)

    table_rows = [[labels[k], *v] for k, v in rows.items()]
    print()
    print(
        "WAF side by side: nginx + ModSecurity-nginx + CRS 3.3.4 (reference anchor) vs "
        "blindfold origin (same libmodsecurity + CRS)"
    )
    for line in env.strip().splitlines():
        if line.startswith(
            (
                "WAF CPU",
                "nginx version",
                "libmodsecurity3",
                "modsecurity-crs",
                "libnginx-mod",
                "blindfold",
            )
        ):
            print("  " + line)
    print("  detection/FP: black-box (blocked = non-2xx/3xx or no response); Δ = blindfold - nginx")
    print()
    print(_table(header, table_rows))
    print()
    print("\n".join(details))


def cmd_pick_median(d: str) -> None:
    """Of the runs *.bench.rep<K>.txt of each target and request, copy the one with the median
    CPU per request to *.bench.txt (and, for blindfold, the stand-in's CPU of that same run to
    standin.<script>.cpu); every run's CPU per request goes to *.spread.txt."""
    for name in ("anchor", "blindfold"):
        for script in ("get_page", "post_form"):
            runs = []
            for path in sorted(glob.glob(os.path.join(d, f"{name}.{script}.bench.rep*.txt"))):
                b = _bench(path)
                if b:
                    rep = path.rsplit(".rep", 1)[1].removesuffix(".txt")
                    runs.append((b["us"], rep, path))
            if not runs:
                continue
            _us, rep, path = sorted(runs)[(len(runs) - 1) // 2]
            shutil.copyfile(path, os.path.join(d, f"{name}.{script}.bench.txt"))
            standin = os.path.join(d, f"standin.{script}.rep{rep}.cpu")
            if name == "blindfold" and os.path.exists(standin):
                shutil.copyfile(standin, os.path.join(d, f"standin.{script}.cpu"))
            with open(os.path.join(d, f"{name}.{script}.spread.txt"), "w") as f:
                f.write(" ".join(f"{u:.0f}" for u, _, _ in sorted(runs, key=lambda r: r[1])))


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "ports":
        cmd_ports()
    elif cmd == "wait-http":
        cmd_wait_http(*args)
    elif cmd == "wait-ready":
        cmd_wait_ready(*args)
    elif cmd == "cpu":
        cmd_cpu(*args)
    elif cmd == "pick-median":
        cmd_pick_median(*args)
    elif cmd == "report":
        cmd_report(args)
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
