"""How long an operator's purge and ban take to reach every edge: one origin agent, Redis
(docs/decisions.md's ACL), a key server and two edges with a keyless route, each following
the origin's HTTPS stream (polled every --poll s) and Redis, on loopback.

For each of --n rounds:
- purge: the time from the operator API call (POST /v1/operator/purge, a URL the edges hold
  in cache) until both edges' masters logged `purge_applied` (every worker answered);
- ban (the baseline, the decision path the purge travels beside): the time from
  POST /v1/operator/decisions until a connection from the banned address is refused at both
  edges (probed every 10 ms), then deleted.
Printed: p50/p90/max of each, which source (stream or redis) brought each purge first, and
the ratio purge/ban. Benchmarks only: it borrows the test suite's process helpers."""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "src"))

from blindfold import pki  # noqa: E402
from blindfold.cli.operator import request  # noqa: E402
from tests.conftest import DECISIONS_NAME  # noqa: E402
from tests.helpers.edgeproc import EdgeProcess, OriginProcess, edge_config  # noqa: E402
from tests.helpers.keyless import KeyServerProcess, keyserver_config, make_pki  # noqa: E402
from tests.helpers.topology import edge_decisions, origin_config  # noqa: E402
from tests.integration.test_decision_sources import write_keypair  # noqa: E402
from tests.integration.test_keyless import keyless_route  # noqa: E402
from tests.integration.test_redis_trust import ONE, Redis  # noqa: E402

OPERATOR_KEY = "bench-operator-key-0123456789"


def refused(port: int, source: str) -> bool:
    """Whether the edge refuses a connection from `source`: a banned address's is closed at
    accept; anyone else's waits for its ClientHello (the probe sends none)."""
    try:
        with socket.create_connection(
            ("127.0.0.1", port), timeout=1, source_address=(source, 0)
        ) as s:
            s.settimeout(0.05)
            try:
                return s.recv(1) == b""
            except TimeoutError:
                return False
    except (ConnectionError, OSError):
        return True


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=20, help="rounds of each (20)")
    ap.add_argument("--poll", type=float, default=1.0, help="edges' stream poll interval (1.0)")
    ap.add_argument("--no-redis", action="store_true", help="edges follow the HTTPS stream only")
    ap.add_argument("--dir", help="keep the outputs here (default: a temporary directory)")
    args = ap.parse_args()
    work = Path(args.dir or tempfile.mkdtemp(prefix="obench-"))
    work.mkdir(parents=True, exist_ok=True)
    ca = pki.make_ca("obench CA")
    d = work / "pki"
    d.mkdir(exist_ok=True)
    ca.write(d / "ca.pem")
    pki.issue(ca, ["example.test", "*.example.test"]).write(d / "site.pem", d / "site.key")
    pki.issue(ca, [DECISIONS_NAME]).write(d / "decisions.pem", d / "decisions.key")
    site = {
        "dir": d,
        "ca": d / "ca.pem",
        "cert": d / "site.pem",
        "key": d / "site.key",
        "decisions_cert": d / "decisions.pem",
        "decisions_key": d / "decisions.key",
    }
    procs: list[Any] = []
    from blindfold.demo.app import DemoApp

    app = DemoApp()
    redis = None
    try:
        redis = Redis(work, ONE)
        signer = write_keypair(work, "decisions")
        ops = work / "operators.txt"
        ops.write_text(f"bench:{OPERATOR_KEY}\n")
        ops.chmod(0o600)
        keyfile = work / "bench.key"
        keyfile.write_text(OPERATOR_KEY + "\n")
        keyfile.chmod(0o600)
        origin = OriginProcess(
            origin_config(
                site,
                app.port,
                work,
                decisions={
                    "redis_url": redis.url("origin"),
                    "signing_key": str(signer["private"]),
                    "operator_keys_file": str(ops),
                },
            ),
            work,
            name="origin",
        )
        procs.append(origin)
        kpki = make_pki(work, ca)
        ks = KeyServerProcess(
            keyserver_config(kpki, {"edge1": ["example.test", "*.example.test"]}), work, name="ks"
        )
        procs.append(ks)
        route = keyless_route(kpki, site, [ks.port], origin.port)
        edges: list[EdgeProcess] = []
        for i, user in enumerate(("edge1", "edge2")):
            text = edge_config(route, per_ip_rate_per_s=0, workers=2)
            text += edge_decisions(site, origin.decisions_port, work, poll_interval_s=args.poll)
            if not args.no_redis:
                text += f'redis_url = "{redis.url(user)}"\n'
                text += f'signer_public_keys = ["{signer["public"]}"]\n'
            edge = EdgeProcess(text, work, name=f"edge{i}")
            procs.append(edge)
            edges.append(edge)
        for edge in edges:
            assert edge.wait_for(lambda r: r.get("event") == "decisions_source_up", 10)
        api = SimpleNamespace(
            origin=f"https://127.0.0.1:{origin.decisions_port}",
            ca=str(site["ca"]),
            server_name=DECISIONS_NAME,
            key_file=str(keyfile),
        )
        purge_s: list[float] = []
        first: dict[str, int] = {}
        for i in range(args.n):
            seen = [len(e.records("purge_applied")) for e in edges]
            t0 = time.time()
            request(api, "POST", "/v1/operator/purge", {"urls": [f"example.test/cached/{i}"]})
            done = []
            for edge, n in zip(edges, seen, strict=True):
                rec = edge.wait_for(
                    lambda r, n=n, e=edge: (
                        r.get("event") == "purge_applied" and len(e.records("purge_applied")) > n
                    ),
                    10,
                )
                assert rec is not None, "a purge did not arrive"
                done.append(rec["ts"])
                first[rec["source"]] = first.get(rec["source"], 0) + 1
            purge_s.append(max(done) - t0)
            time.sleep(0.1)
        ban_s: list[float] = []
        for i in range(args.n):
            source = f"127.0.3.{i + 1}"
            t0 = time.monotonic()
            request(api, "POST", "/v1/operator/decisions", {"scope": "ip", "value": source})
            pending = list(edges)
            while pending and time.monotonic() - t0 < 10:
                pending = [e for e in pending if not refused(e.port, source)]
                if pending:
                    time.sleep(0.01)
            assert not pending, "a ban did not arrive"
            ban_s.append(time.monotonic() - t0)
            request(api, "DELETE", f"/v1/operator/decisions?scope=ip&value={source}")
            time.sleep(0.1)
        report = {
            "rounds": args.n,
            "poll_interval_s": args.poll,
            "sources": "stream" if args.no_redis else "stream+redis",
            "purge_ms": {
                "p50": round(1000 * statistics.median(purge_s), 1),
                "p90": round(1000 * pct(purge_s, 0.9), 1),
                "max": round(1000 * max(purge_s), 1),
            },
            "purge_first_source": first,
            "ban_ms": {
                "p50": round(1000 * statistics.median(ban_s), 1),
                "p90": round(1000 * pct(ban_s, 0.9), 1),
                "max": round(1000 * max(ban_s), 1),
            },
        }
        report["ratio_purge_to_ban_p50"] = round(
            report["purge_ms"]["p50"] / max(report["ban_ms"]["p50"], 0.001), 2
        )
        (work / "results.json").write_text(json.dumps(report, indent=2))
        print(json.dumps(report, indent=2))
        print(f"outputs: {work}")
        return 0
    finally:
        for proc in reversed(procs):
            proc.stop()
        if redis is not None:
            redis.stop()
        app.close()


if __name__ == "__main__":
    sys.exit(main())
