"""tlsfuzzer conformance run: blindfold's keyless TLS 1.3 edge beside a Python `ssl` (OpenSSL)
baseline with the same certificate and key. Started by run.sh (see README.md), which provides
the tlsfuzzer checkout and a Python that has tlslite-ng and ecdsa; this file runs in the
project's .venv (it starts blindfold's processes).

For every (script, key type): the script runs against the keyless edge and the baseline at the
same time, with identical arguments and a timeout; its log is kept; the keyless edge's fallback
counters are read before and after, so the table says which scripts sent hellos that the edge
passed through to its origin (OpenSSL with the real key) instead of answering itself.
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
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from servers import KEY_TYPES, Target, Topology  # noqa: E402

RUNNING: set[subprocess.Popen[bytes]] = set()  # tlsfuzzer scripts now running
SNI = {key: patterns[0] for key, (_site, patterns, _name) in KEY_TYPES.items()}


@dataclass(frozen=True)
class Spec:
    script: str
    keys: tuple[str, ...]
    args: tuple[str, ...] = ("-n", "0")  # every test case, not a random sample
    sni: bool = True
    note: str = ""

    @property
    def label(self) -> str:
        return self.script.removeprefix("test-tls13-").removesuffix(".py") + (
            "" if self.sni else " (no SNI)"
        )


R, E, RE = ("rsa",), ("ecdsa",), ("rsa", "ecdsa")
# Key types: most scripts offer only RSA signature schemes (RSA_SIG_ALL or rsa_pss_*), so they
# run against the RSA servers; those that offer ECDSA too also run against the P-256 servers.
SCRIPTS: tuple[Spec, ...] = (
    Spec("test-tls13-conversation.py", RE),
    Spec(
        "test-tls13-conversation.py",
        RE,
        sni=False,
        note="tlsfuzzer as is: no server_name extension",
    ),
    Spec("test-tls13-ccs.py", R),
    Spec("test-tls13-keyupdate.py", R),
    Spec("test-tls13-keyupdate-from-server.py", R),
    Spec("test-tls13-finished.py", R),
    Spec("test-tls13-finished-plaintext.py", R),
    Spec("test-tls13-record-layer-limits.py", R),
    Spec("test-tls13-record-padding.py", R),
    Spec("test-tls13-empty-alert.py", R),
    Spec("test-tls13-unencrypted-alert.py", RE),
    Spec("test-tls13-zero-length-data.py", R),
    Spec("test-tls13-zero-content-type.py", RE),
    Spec("test-tls13-crfg-curves.py", R),
    Spec("test-tls13-ecdhe-curves.py", RE),
    Spec("test-tls13-0rtt-garbage.py", R),
    Spec("test-tls13-session-resumption.py", R),
    Spec(
        "test-tls13-count-tickets.py",
        R,
        ("-n", "0", "-t", "1"),
        note="-t 1: one ticket (baseline: num_tickets = 1); the script offers no "
        "psk_key_exchange_modes, and keyless then sends none (RFC 8446 4.2.9 SHOULD NOT)",
    ),
    Spec(
        "test-tls13-version-negotiation.py",
        R,
        note="most cases expect TLS 1.2 with CBC-SHA1 suites: the baseline is TLS 1.3 only, "
        "keyless passes them to its origin, which has no such suite",
    ),
    Spec("test-tls13-legacy-version.py", R),
    Spec("test-tls13-nociphers.py", R),
    Spec("test-tls13-invalid-ciphers.py", R),
    Spec("test-tls13-symetric-ciphers.py", R),
    Spec("test-tls13-unrecognised-groups.py", R),
    Spec("test-tls13-keyshare-omitted.py", R),
    Spec("test-tls13-hrr.py", R),
    Spec("test-tls13-signature-algorithms.py", R),
    Spec("test-tls13-rsapss-signatures.py", R),
    Spec("test-tls13-rsa-signatures.py", R),
    Spec("test-tls13-pkcs-signature.py", R),
    Spec("test-tls13-ecdsa-support.py", E),
    Spec("test-tls13-serverhello-random.py", R),
    Spec(
        "test-tls13-large-number-of-extensions.py",
        R,
        note="without --supgroup: OpenSSL's supported_groups in EncryptedExtensions fails it",
    ),
    Spec("test-tls13-shuffled-extentions.py", R),
    Spec("test-tls13-multiple-ccs-messages.py", RE),
    Spec(
        "test-tls13-connection-abort.py",
        RE,
        note="'After NewSessionTicket' needs a ticket without psk_key_exchange_modes (see "
        "count-tickets)",
    ),
    Spec(
        "test-tls13-non-support.py",
        R,
        note="expects a server WITHOUT TLS 1.3: both fail it by design",
    ),
)


# ------------------------------------------------------------------------------ results
@dataclass
class Case:
    status: str  # pass | fail | xfail | xpass
    expected: str = ""
    got: str = ""


@dataclass
class Outcome:
    target: str
    log: Path
    rc: int | None = None  # None: timed out
    seconds: float = 0.0
    totals: dict[str, int] = field(default_factory=dict)
    cases: dict[str, Case] = field(default_factory=dict)
    counters: dict[str, float] = field(default_factory=dict)  # keyless: deltas

    def cell(self) -> str:
        if self.rc is None:
            return "TIMEOUT"
        if "PASS" not in self.totals:
            return f"error rc={self.rc}"
        t = self.totals
        extra = "".join(f" +{t[k]}{k.lower()}" for k in ("XFAIL", "XPASS") if t.get(k))
        return f"{t['PASS']}/{t.get('FAIL', 0)}{extra}"


CASE_START = re.compile(r"^(.+?) ?\.\.\.$")  # `name ...` or `"name" repeat 0...`
NODE_ERR = re.compile(
    r"^Error encountered while processing node (.+?) \(child: (.*)\) with "
    r"last message being: (.*)$"
)


def parse_log(text: str) -> tuple[dict[str, int], dict[str, Case]]:
    totals: dict[str, int] = {}
    for key in ("TOTAL", "SKIP", "PASS", "XFAIL", "FAIL", "XPASS"):
        m = re.search(rf"^{key}: (\d+)$", text, re.M)
        if m:
            totals[key] = int(m.group(1))
    cases: dict[str, Case] = {}
    name = ""
    node = ""
    tb: list[str] = []
    in_tb = False
    for line in text.splitlines():
        m = CASE_START.match(line)
        if m and not in_tb:
            name, node, tb = m.group(1), "", []
            continue
        if not name:
            continue
        m = NODE_ERR.match(line)
        if m:
            node = m.group(1)
            continue
        if line == "Error while processing":
            in_tb, tb = True, []
            continue
        if in_tb:
            if line.strip() == "":
                in_tb = False
                got = next((t for t in reversed(tb) if t and not t.startswith(" ")), "")
                cases[name] = Case("fail", node, got)
            else:
                tb.append(line)
            continue
        if line in ("OK", "OK-expected failure") or line.startswith("XPASS"):
            status = {"OK": "pass", "OK-expected failure": "xfail"}.get(line, "xpass")
            prev = cases.get(name)
            # sanity runs twice (first and last): keep a failure
            if prev is None or prev.status == "pass":
                cases[name] = Case(status)
            name = ""
        elif line.startswith("Expected error message:"):
            cases[name] = Case("fail", node, line)
            name = ""
    return totals, cases


# ------------------------------------------------------------------------------ running
def run_one(spec: Spec, target: Target, args: argparse.Namespace, logdir: Path) -> Outcome:
    script = Path(args.tlsfuzzer) / "scripts" / spec.script
    stem = spec.script.removesuffix(".py") + ("" if spec.sni else ".nosni")
    log = logdir / f"{stem}.{target.name}.log"
    env = dict(os.environ, TLSFUZZER_SEED=str(args.seed), PYTHONUNBUFFERED="1")
    env.pop("TLSFUZZER_SNI", None)
    if spec.sni and not args.no_sni:
        env["TLSFUZZER_SNI"] = SNI[target.key]
    cmd = [
        args.python,
        str(HERE / "fuzz_wrapper.py"),
        str(script),
        "-h",
        "127.0.0.1",
        "-p",
        str(target.port),
        *spec.args,
    ]
    out = Outcome(target.name, log)
    before = target.counters()
    t0 = time.monotonic()
    with log.open("w") as fh:
        fh.write(
            "# "
            + " ".join(cmd)
            + (f"  (TLSFUZZER_SNI={env['TLSFUZZER_SNI']})" if "TLSFUZZER_SNI" in env else "")
            + "\n"
        )
        fh.flush()
        proc = subprocess.Popen(
            cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=args.tlsfuzzer
        )
        RUNNING.add(proc)
        try:
            out.rc = proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            proc.kill()  # by its PID: the script is our child, it starts none of its own
            proc.wait(10)
            out.rc = None
        finally:
            RUNNING.discard(proc)
    out.seconds = time.monotonic() - t0
    time.sleep(0.3)  # let the edge count connections that just ended
    after = target.counters()
    out.counters = {
        k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0) > 0
    }
    out.totals, out.cases = parse_log(log.read_text(errors="replace"))
    return out


def run_pair(
    spec: Spec, pair: list[Target], args: argparse.Namespace, logdir: Path
) -> list[Outcome | None]:
    """The same script against both servers at once."""
    results: list[Outcome | None] = [None] * len(pair)

    def work(i: int, target: Target) -> None:
        results[i] = run_one(spec, target, args, logdir)

    threads = [threading.Thread(target=work, args=(i, t)) for i, t in enumerate(pair)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def fallback_text(counters: dict[str, float]) -> str:
    parts = [
        f"{k.split('/', 1)[1]}:{int(v)}"
        for k, v in sorted(counters.items())
        if k.startswith("fallbacks/")
    ]
    return ",".join(parts) or "-"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tlsfuzzer", required=True, help="tlsfuzzer checkout (scripts/, tlsfuzzer/)")
    ap.add_argument("--python", required=True, help="Python with tlslite-ng and ecdsa")
    ap.add_argument("--out", required=True, help="results directory")
    ap.add_argument("--timeout", type=float, default=240.0, help="seconds per script run")
    ap.add_argument(
        "--budget",
        type=float,
        default=1500.0,
        help="seconds for all scripts: later ones are skipped past it",
    )
    ap.add_argument("--only", default="", help="regex: run only matching script names")
    ap.add_argument("--workers", type=int, default=1, help="edge worker processes")
    ap.add_argument(
        "--max-hello-bytes",
        type=int,
        default=65536,
        help="edge max_hello_bytes (default: its maximum; the edge's own default "
        "16384 refuses larger ClientHellos, which several scripts send)",
    )
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument(
        "--no-sni",
        action="store_true",
        help="never add a server_name extension (keyless then fails: see README)",
    )
    args = ap.parse_args()
    out = Path(args.out)
    logdir = out / "logs"
    logdir.mkdir(parents=True, exist_ok=True)
    specs = [s for s in SCRIPTS if re.search(args.only, s.script)]
    missing = [
        s.script for s in specs if not (Path(args.tlsfuzzer) / "scripts" / s.script).exists()
    ]
    specs = [s for s in specs if s.script not in missing]

    def on_term(_sig: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    topo = Topology(out / "servers", workers=args.workers, max_hello_bytes=args.max_hello_bytes)
    rows: list[tuple[Spec, str, Outcome | None, Outcome | None]] = []
    start = time.monotonic()
    try:
        topo.start()
        print(
            f"servers up (pids {' '.join(map(str, topo.pids()))}): "
            + ", ".join(f"{t.name}=127.0.0.1:{t.port}" for t in topo.targets.values()),
            flush=True,
        )
        for spec in specs:
            for key in spec.keys:
                if time.monotonic() - start > args.budget:
                    rows.append((spec, key, None, None))
                    continue
                kl, py = run_pair(
                    spec,
                    [topo.targets[f"keyless-{key}"], topo.targets[f"python-ssl-{key}"]],
                    args,
                    logdir,
                )
                rows.append((spec, key, kl, py))
                print(
                    f"  {spec.label:<34} {key:<5} keyless {kl.cell() if kl else '?':<12} "
                    f"python-ssl {py.cell() if py else '?':<12} "
                    f"fallbacks {fallback_text(kl.counters) if kl else '-'}",
                    flush=True,
                )
    except KeyboardInterrupt:
        print("interrupted: stopping", file=sys.stderr)
        for proc in list(RUNNING):
            proc.kill()
        return 130
    finally:
        topo.stop()
    problems = topo.problems()
    report = render(rows, missing, problems, time.monotonic() - start, args)
    (out / "summary.txt").write_text(report)
    (out / "summary.json").write_text(
        json.dumps(
            [
                {
                    "script": s.script,
                    "sni": s.sni,
                    "key": k,
                    "args": list(s.args),
                    "note": s.note,
                    **{
                        name: None
                        if o is None
                        else {
                            "rc": o.rc,
                            "seconds": round(o.seconds, 2),
                            "totals": o.totals,
                            "log": str(o.log),
                            "counters": o.counters,
                            "cases": {c: vars(v) for c, v in o.cases.items()},
                        }
                        for name, o in (("keyless", kl), ("python_ssl", py))
                    },
                }
                for s, k, kl, py in rows
            ],
            indent=1,
        )
    )
    print(report)
    print(f"results: {out}")
    return 0 if not problems else 1


def render(
    rows: list[tuple[Spec, str, Outcome | None, Outcome | None]],
    missing: list[str],
    problems: list[str],
    seconds: float,
    args: argparse.Namespace,
) -> str:
    lines = [
        f"tlsfuzzer TLS 1.3 scripts: keyless edge vs python-ssl (OpenSSL), "
        f"{seconds:.0f} s; cells are passed/failed test cases",
        "fallbacks = ClientHellos the keyless edge passed through to its origin (OpenSSL "
        "with the real key), by reason, during that script",
        "",
    ]
    head = f"{'script':<34} {'key':<5} {'keyless':>13} {'python-ssl':>13}  fallbacks"
    lines += [head, "-" * len(head)]
    for spec, key, kl, py in rows:
        if kl is None or py is None:
            lines.append(f"{spec.label:<34} {key:<5} {'skipped (time budget)':>28}")
            continue
        mark = " " if (kl.cell() == py.cell()) else "*"
        lines.append(
            f"{spec.label:<34} {key:<5} {kl.cell():>13} {py.cell():>13}{mark} "
            f"{fallback_text(kl.counters)}"
        )
    tot = {"keyless": [0, 0], "python": [0, 0]}
    for _s, _k, kl, py in rows:
        for name, o in (("keyless", kl), ("python", py)):
            if o is not None:
                tot[name][0] += o.totals.get("PASS", 0)
                tot[name][1] += o.totals.get("FAIL", 0)
    lines += [
        "-" * len(head),
        f"{'total':<40} {tot['keyless'][0]}/{tot['keyless'][1]:<8} "
        f"{tot['python'][0]}/{tot['python'][1]}",
        "",
    ]
    noted = {s for s, *_ in rows}
    for spec in SCRIPTS:
        if spec.note and spec in noted:
            lines.append(f"note {spec.label}: {spec.note}")
    if missing:
        lines.append("not in this tlsfuzzer checkout: " + ", ".join(missing))
    lines += [
        "",
        "Test cases that FAIL on keyless but PASS on python-ssl, grouped by what "
        "tlsfuzzer expected and got (count, then up to 3 case names):",
    ]
    n = 0
    for spec, key, kl, py in rows:
        if kl is None or py is None:
            continue
        groups: dict[tuple[str, str], list[str]] = {}
        for case, c in sorted(kl.cases.items()):
            other = py.cases.get(case)
            if c.status == "fail" and other is not None and other.status == "pass":
                groups.setdefault((c.expected, c.got), []).append(case)
        for (expected, got), names in groups.items():
            n += len(names)
            expected = re.sub(r" object at 0x[0-9a-f]+", "", expected)
            expected = re.sub(r"session_id=bytearray\(b.*", "...)", expected)
            lines.append(
                f"  {spec.label} [{key}] x{len(names)}: "
                + ", ".join(f"'{x}'" for x in names[:3])
                + (" ..." if len(names) > 3 else "")
            )
            lines.append(f"      expected: {expected[:160]}")
            lines.append(f"      got:      {got[:160]}")
    if not n:
        lines.append("  (none)")
    lines += ["", "Test cases that PASS on keyless but FAIL on python-ssl:"]
    m = 0
    for spec, key, kl, py in rows:
        if kl is None or py is None:
            continue
        names = sorted(
            case
            for case, c in py.cases.items()
            if c.status == "fail"
            and kl.cases.get(case) is not None
            and kl.cases[case].status == "pass"
        )
        if names:
            m += len(names)
            shown = ", ".join(f"'{x}'" for x in names[:8])
            lines.append(
                f"  {spec.label} [{key}] {len(names)}: {shown}" + (" ..." if len(names) > 8 else "")
            )
    if not m:
        lines.append("  (none)")
    if problems:
        lines += ["", "blindfold processes wrote tracebacks (see servers/*.stderr.log):"]
        lines += [p[-2000:] for p in problems]
    lines.append(f"\nlogs: {Path(args.out) / 'logs'}; servers' logs: {Path(args.out) / 'servers'}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
