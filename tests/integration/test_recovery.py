"""What survives a crash: the origin killed with SIGKILL and started again keeps every ban it
had made (its decision journal), and the edges following it keep enforcing them."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.conftest import need
from tests.helpers.clients import curl, wait_until
from tests.helpers.edgeproc import EdgeProcess, OriginProcess, edge_config, route
from tests.helpers.nginx import free_port
from tests.helpers.topology import edge_decisions, origin_config

SQLI = "/?id=1%27%20OR%201=1--"


def status(edge: EdgeProcess, site: dict[str, Path], source: str) -> int:
    out = curl(
        edge.port, "example.test", site["ca"], "-o", "/dev/null", "-w", "%{http_code}",
        source=source, path="/echo",
    )  # fmt: skip
    return int(out.stdout or 0)


def stream_values(origin: OriginProcess, site: dict[str, Path], tmp_path: Path) -> list[str]:
    """The whole set the origin now serves (what a starting edge gets), read with curl."""
    from tests.conftest import DECISIONS_NAME
    from tests.helpers.topology import API_KEY

    port = origin.decisions_port
    out = curl(
        port, DECISIONS_NAME, site["ca"], "-H", f"X-Api-Key: {API_KEY}",
        path="/v1/decisions/stream?startup=true",
    )  # fmt: skip
    payload = json.loads(out.stdout)
    return sorted(d["value"] for d in payload["new"] or [])


def test_bans_survive_an_origin_killed_and_restarted(
    start_edge: Any, start_origin: Any, app: Any, site: dict[str, Path], tmp_path: Path
) -> None:
    """A SIGKILLed origin used to come back with an empty decision store: every edge, on its
    next poll, got the whole (empty) set and lifted every ban (an attacker banned an hour ago
    was let in again by a crash)."""
    journal = tmp_path / "decisions.journal"
    config = origin_config(
        site,
        app.port,
        tmp_path,
        listen=[f"127.0.0.1:{free_port()}"],  # the same addresses after the restart
        decisions={
            "listen": f"127.0.0.1:{free_port()}",
            "ban_duration_s": 3600,
            "journal": str(journal),
        },
    )
    origin = start_origin(config)
    text = edge_config(
        route(["example.test"], [f"127.0.0.1:{origin.port}"], proxy_protocol="v2"),
        per_ip_rate_per_s=0,
    )
    edge = start_edge(text + edge_decisions(site, origin.decisions_port, tmp_path))
    assert edge.wait_for(lambda r: r.get("event") == "decisions_source_up", 10)
    assert status(edge, site, "127.0.0.41") == 200
    assert status(edge, site, "127.0.0.40") == 200
    out = curl(edge.port, "example.test", site["ca"], "-o", "/dev/null", "-w", "%{http_code}",
               source="127.0.0.40", path=SQLI)  # fmt: skip
    assert out.stdout == "403"
    assert wait_until(lambda: status(edge, site, "127.0.0.40") == 0, 5)

    origin.proc.kill()  # SIGKILL: no goodbye, nothing flushed at exit
    origin.proc.wait(10)
    assert edge.wait_for(lambda r: r.get("event") == "decisions_source_down", 10)
    ups = len(edge.records("decisions_source_up"))
    started = time.monotonic()
    again = start_origin(config)
    assert again.decisions_port == origin.decisions_port
    # the edge's next poll carries a position from before the restart: the origin answers
    # with the whole set, which the edge takes as the truth
    assert edge.wait_for(
        lambda r: r.get("event") == "decisions_source_up" and len(edge.records(r["event"])) > ups,
        15,
    )
    assert again.metric("blindfold_decisions_active") == 1
    assert stream_values(again, site, tmp_path) == ["127.0.0.40"]
    assert status(edge, site, "127.0.0.40") == 0  # still refused at layer 4
    assert status(edge, site, "127.0.0.41") == 200  # the others are served again
    assert edge.metric("blindfold_decisions_active") == 1
    assert time.monotonic() - started < 15
    restored = again.records("decisions_restored")
    assert restored and restored[0]["decisions"] == 1 and restored[0]["problems"] == []


def redis_on(port: int, workdir: Path, aclfile: Path) -> subprocess.Popen[bytes]:
    """redis-server on 127.0.0.1:`port`, no persistence (a restart starts empty), with the
    ACL of docs/decisions.md."""
    proc = subprocess.Popen(
        [
            need("redis-server"), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(workdir), "--aclfile", str(aclfile),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    if not wait_until(lambda: _accepts(port), 10):
        proc.kill()
        proc.wait(5)
        pytest.fail("redis-server did not start")
    return proc


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def test_bans_come_back_to_a_redis_that_restarted_empty(
    start_edge: Any, start_origin: Any, app: Any, site: dict[str, Path], tmp_path: Path
) -> None:
    """Redis killed and started again without its data (no persistence, or a new host) used to
    lose every decision: the origin never wrote them again, and an edge that follows Redis
    only dropped them all at its resync after the reconnection, letting banned attackers in.
    The origin now notices (its newest decision's key is gone) and publishes its whole set
    again, with the ACL's commands only."""
    from tests.integration.test_decision_sources import redis_decisions, write_keypair

    docs = (Path(__file__).resolve().parents[2] / "docs" / "decisions.md").read_text()
    acl = re.search(r"### An ACL for Redis 7.*?```text\n(.*?)```", docs, re.S)
    assert acl is not None
    aclfile = tmp_path / "users.acl"
    aclfile.write_text(
        acl.group(1).replace("ORIGIN-PASSWORD", "origin-pw-0123").replace("EDGE1-PASSWORD", "e1")
    )
    port = free_port()
    redis_proc = redis_on(port, tmp_path, aclfile)
    try:
        signer = write_keypair(tmp_path, "decisions")
        origin = start_origin(
            origin_config(
                site,
                app.port,
                tmp_path,
                decisions={
                    "redis_url": f"redis://origin:origin-pw-0123@127.0.0.1:{port}/0",
                    "signing_key": str(signer["private"]),
                    "ban_duration_s": 3600,
                },
            )
        )
        r = route(["example.test"], [f"127.0.0.1:{origin.port}"], proxy_protocol="v2")
        edge = start_edge(
            edge_config(r, per_ip_rate_per_s=0)
            + redis_decisions(f"redis://edge1:e1@127.0.0.1:{port}/0", signer)
        )
        assert edge.wait_for(lambda rec: rec.get("event") == "decisions_source_up", 10)
        out = curl(edge.port, "example.test", site["ca"], "-o", "/dev/null", "-w",
                   "%{http_code}", source="127.0.0.50", path=SQLI)  # fmt: skip
        assert out.stdout == "403"
        assert wait_until(lambda: status(edge, site, "127.0.0.50") == 0, 5)

        redis_proc.kill()  # SIGKILL: what it held in memory is gone
        redis_proc.wait(10)
        assert edge.wait_for(lambda rec: rec.get("event") == "decisions_source_down", 10)
        ups = len(edge.records("decisions_source_up"))
        redis_proc = redis_on(port, tmp_path, aclfile)
        assert edge.wait_for(
            lambda rec: (
                rec.get("event") == "decisions_source_up"
                and len(edge.records("decisions_source_up")) > ups
            ),
            20,
        )
        reader = redis.Redis(port=port, username="edge1", password="e1", socket_timeout=5)
        try:
            assert wait_until(lambda: reader.get("blindfold:decision:ip:127.0.0.50"), 10)
        finally:
            reader.close()
        assert wait_until(lambda: status(edge, site, "127.0.0.50") == 0, 5)  # refused again
        time.sleep(1.5)  # and it stays refused (the edge's resync no longer lifts it)
        assert status(edge, site, "127.0.0.50") == 0
        assert status(edge, site, "127.0.0.51") == 200
        assert origin.wait_for(lambda rec: rec.get("event") == "redis_republished", 5)
    finally:
        redis_proc.kill()
        redis_proc.wait(10)


JOURNAL_ON_A_FULL_DISK = """
import asyncio, json, resource, signal, sys
from blindfold.decisions.core import DecisionStore
from blindfold.decisions.journal import DecisionJournal
from blindfold.obs.log import JsonLog

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
path, limit = sys.argv[1], int(sys.argv[2])

async def main():
    store = DecisionStore()
    journal = DecisionJournal(path, JsonLog(2, process="t", nonblocking=False), retry_s=0)
    journal.open(store, 1000.0)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    for i in range(30):
        store.add("ip", f"192.0.2.{i + 1}", 600, "waf", 1000.0)  # never raises
    failed = journal.failed
    journal.tick(store)  # the rewrite fails too: still over the limit
    await journal._compacting
    still = journal.failed
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)  # space again
    journal.tick(store)
    await journal._compacting
    await journal.close()
    print(json.dumps({"failed": failed, "still": still, "after": journal.failed,
                      "active": len(store.decisions)}))

asyncio.run(main())
"""


def test_the_journal_on_a_full_disk_keeps_deciding_and_rewrites_itself(tmp_path: Path) -> None:
    """A journal that cannot be written (the file-size limit stands in for a full disk: the
    same short write, then errors) never stops a decision; once it can be written again it
    is rewritten whole, with every decision and without the part-line the failure left."""
    import sys

    path = tmp_path / "decisions.journal"
    out = subprocess.run(
        [sys.executable, "-c", JOURNAL_ON_A_FULL_DISK, str(path), "2000"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result == {"failed": True, "still": True, "after": False, "active": 30}
    events = [json.loads(line)["event"] for line in out.stderr.splitlines()]
    assert events.count("decision_journal_failed") == 1  # once per episode
    assert "decision_journal_recovered" in events
    lines = path.read_bytes().splitlines(keepends=True)
    assert len(lines) == 30 and all(line.endswith(b"}\n") for line in lines)
    from blindfold.decisions.core import DecisionStore

    assert DecisionStore().replay(lines, 1000.0) == (30, [])
