"""Decisions and shared counters on Redis against a compromised edge that holds exactly the
Redis user docs/decisions.md gives every edge (second attack review, atk-trust #2 and #3).
Real redis-server, real edge and origin processes, the documented ACL file."""

from __future__ import annotations

import asyncio
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from blindfold.decisions.core import Decision
from blindfold.decisions.redis_bus import RedisPublisher
from blindfold.decisions.signed import (
    DecisionSigner,
    DecisionVerifier,
    load_private_key,
    load_public_key,
)
from blindfold.obs.log import JsonLog
from tests.helpers.clients import wait_until
from tests.helpers.edgeproc import EdgeProcess, edge_config, route
from tests.helpers.topology import origin_config
from tests.integration.test_decision_sources import (
    SQLI,
    code,
    redis_decisions,
    start_redis,
    write_keypair,
)

DOCS = Path(__file__).resolve().parents[2] / "docs" / "decisions.md"
BANNED = "127.0.0.90"


ACL_SECTION = re.compile(r"### An ACL for Redis 7(.*?)\n## ", re.S)
ONE, DECISIONS, COUNTERS = range(3)  # docs/decisions.md's ACL files, in order


def acl_file(workdir: Path, which: int) -> Path:
    """One of docs/decisions.md's ACL files, passwords filled in, plus the test's own
    administrator."""
    section = ACL_SECTION.search(DOCS.read_text())
    assert section is not None
    files = re.findall(r"```text\n(.*?)```", section.group(1), re.S)
    assert len(files) == 3
    text = files[which]
    for user in ("ORIGIN", "EDGE1", "EDGE2", "EDGE3"):
        text = text.replace(f"{user}-PASSWORD", f"{user.lower()}-secret-0123")
    path = workdir / "users.acl"
    path.write_text(text + "user admin on >admin-secret-0123 ~* &* +@all\n")
    return path


class Redis:
    def __init__(self, workdir: Path, acl: int, *args: str) -> None:
        self.dir = workdir / f"redis{time.monotonic_ns()}"
        self.dir.mkdir()
        self.proc, self.port = start_redis(
            self.dir, "--aclfile", str(acl_file(self.dir, acl)), *args
        )
        self.admin = self.client("admin")

    def url(self, user: str) -> str:
        return f"redis://{user}:{user}-secret-0123@127.0.0.1:{self.port}/0"

    def client(self, user: str) -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1", port=self.port, username=user, password=f"{user}-secret-0123"
        )

    def stop(self) -> None:
        self.admin.close()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture
def redises() -> Iterator[list[Redis]]:
    """The Redis servers a test started (`start_redis_server`), stopped at its end."""
    started: list[Redis] = []
    yield started
    for r in started:
        r.stop()


def start_redis_server(redises: list[Redis], tmp_path: Path, acl: int, *args: str) -> Redis:
    r = Redis(tmp_path, acl, *args)
    redises.append(r)
    return r


def origin_on(
    site: dict[str, Path], app: Any, tmp_path: Path, r: Redis, signer: dict[str, Path]
) -> str:
    return origin_config(
        site,
        app.port,
        tmp_path,
        decisions={
            "redis_url": r.url("origin"),
            "signing_key": str(signer["private"]),
            "ban_duration_s": 3600,
        },
    )


def edge_on(
    start_edge: Any,
    origin_port: int,
    url: str,
    signer: dict[str, Path],
    **decisions: Any,
) -> EdgeProcess:
    r = route(["example.test"], [f"127.0.0.1:{origin_port}"], proxy_protocol="v2")
    edge: EdgeProcess = start_edge(
        edge_config(r, per_ip_rate_per_s=decisions.pop("rate", 0), per_ip_burst=12)
        + redis_decisions(url, signer, **decisions)
    )
    assert edge.wait_for(lambda rec: rec.get("event") == "decisions_source_up", 10)
    return edge


def ups(edge: EdgeProcess) -> int:
    return len(edge.records("decisions_source_up"))


def test_a_missing_decision_key_lifts_no_ban_and_a_signed_lift_does(
    start_edge: Any,
    start_origin: Any,
    app: Any,
    site: dict[str, Path],
    tmp_path: Path,
    redises: list[Redis],
) -> None:
    """atk-trust #2: an edge that resynced (every reconnection, every 5 minutes) dropped every
    ban whose key was gone; a compromised edge made them go (filling Redis until it evicted
    them). A verified ban now lasts until its signed `until`, or a signed lift."""
    signer = write_keypair(tmp_path, "decisions")
    r = start_redis_server(redises, tmp_path, ONE)
    origin = start_origin(origin_on(site, app, tmp_path, r, signer))
    edge = edge_on(start_edge, origin.port, r.url("edge1"), signer)
    assert code(edge, site, SQLI, BANNED) == 403
    assert wait_until(lambda: code(edge, site, "/echo", BANNED) == 0, 5)
    key = f"blindfold:decision:ip:{BANNED}"
    signed = r.admin.get(key)
    assert isinstance(signed, bytes)
    verifier = DecisionVerifier([load_public_key(str(signer["public"]), "public")])
    made = verifier.open(signed, time.time())  # the signed ban names the edge that claimed
    assert (made.edge, made.edge_address) == ("", "127.0.0.1")  # the visitor (unnamed edge)
    r.admin.delete(key)  # as an eviction does
    r.admin.client_kill_filter(_type="pubsub")  # a network blip: the edge reconnects, resyncs
    assert wait_until(lambda: ups(edge) == 2, 10)
    assert code(edge, site, "/echo", BANNED) == 0  # still banned after the full resync
    # the origin notices its key is gone and writes its whole set again: an edge that starts
    # now knows the ban too
    assert origin.wait_for(lambda rec: rec.get("event") == "redis_republished", 10)
    assert isinstance(r.admin.get(key), bytes)
    late = edge_on(start_edge, origin.port, r.url("edge2"), signer)
    assert code(late, site, "/echo", BANNED) == 0

    # the origin's signed lift ends it everywhere (the origin has no command for it yet: the
    # test calls the publisher the origin would)
    async def lift() -> None:
        log = JsonLog.open(str(tmp_path / "publisher.log"), process="test")
        key_ = load_private_key(str(signer["private"]), "signing_key")
        publisher = RedisPublisher(r.url("origin"), "", DecisionSigner(key_), log)
        now = time.time()
        publisher.publish_lift(
            Decision(1, "ip", BANNED, "ban", "waf", "blindfold", now, now + 3600), now
        )
        await asyncio.gather(*publisher.tasks)
        await publisher.close()

    asyncio.run(lift())
    assert wait_until(lambda: code(edge, site, "/echo", BANNED) == 200, 5)
    assert wait_until(lambda: code(late, site, "/echo", BANNED) == 200, 5)
    stored = r.admin.get(key)
    assert isinstance(stored, bytes) and stored.startswith(b"bfu1.")
    # the lift stays in the key: an edge that missed the message lifts it at its next resync
    r.admin.client_kill_filter(_type="pubsub")
    assert wait_until(lambda: ups(edge) == 3, 10)
    assert code(edge, site, "/echo", BANNED) == 200
    # the origin still holds the ban, but the key holds a lift: its watch leaves it there
    time.sleep(2.5)  # two of the origin's 1 s watch rounds; nothing to wait for: a non-event
    stored = r.admin.get(key)
    assert isinstance(stored, bytes) and stored.startswith(b"bfu1.")


def flood_own_counters(evil: redis.Redis, name: str, seconds: float) -> int:
    """What a compromised edge can do with its own counter prefix: keys without a TTL until
    Redis is full (then Redis refuses its writes, or evicts)."""
    n = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        pipe = evil.pipeline(transaction=False)
        for i in range(2000):
            pipe.incrby(f"blindfold:rate:{name}:junk-{n + i}-{'x' * 40}:1", 1)
        results = pipe.execute(raise_on_error=False)
        n += 2000
        if any(isinstance(x, redis.exceptions.ResponseError) for x in results):
            break  # OOM: nothing left to evict
    return n


def test_counters_on_a_redis_of_their_own_cannot_evict_decisions(
    start_edge: Any,
    start_origin: Any,
    app: Any,
    site: dict[str, Path],
    tmp_path: Path,
    redises: list[Redis],
) -> None:
    """atk-trust #2, the documented layout: decisions on one Redis (edges only read there),
    counters on another that may evict. The compromised edge fills the counters' Redis: every
    edge, new ones too, still enforces the origin's bans, and the origin still publishes."""
    signer = write_keypair(tmp_path, "decisions")
    decisions = start_redis_server(
        redises, tmp_path, DECISIONS, "--maxmemory", "8mb", "--maxmemory-policy", "noeviction"
    )
    counters = start_redis_server(
        redises, tmp_path, COUNTERS, "--maxmemory", "8mb", "--maxmemory-policy", "allkeys-lru"
    )
    origin = start_origin(origin_on(site, app, tmp_path, decisions, signer))
    edge = edge_on(
        start_edge,
        origin.port,
        decisions.url("edge1"),
        signer,
        rate_redis_url=counters.url("edge1"),
        rate_peers=["edge2"],
        rate=1,
    )
    assert code(edge, site, SQLI, BANNED) == 403
    assert wait_until(lambda: code(edge, site, "/echo", BANNED) == 0, 5)
    evil = counters.client("edge2")
    with pytest.raises(redis.exceptions.NoPermissionError):
        evil.incrby("blindfold:rate:edge1:127.0.0.5:1", -1000)  # another edge's counter
    on_decisions = decisions.client("edge2")
    with pytest.raises(redis.exceptions.NoPermissionError):
        on_decisions.incrby("blindfold:rate:edge2:x:1", 1)  # only reads there
    written = flood_own_counters(evil, "edge2", 60)
    assert counters.admin.info("stats")["evicted_keys"] > 0  # the counters' Redis was full
    assert decisions.admin.exists(f"blindfold:decision:ip:{BANNED}")
    late = edge_on(
        start_edge,
        origin.port,
        decisions.url("edge3"),
        signer,
        rate_redis_url=counters.url("edge3"),
    )
    assert code(late, site, "/echo", BANNED) == 0
    assert code(late, site, SQLI, "127.0.0.91") == 403  # the origin publishes new bans
    assert wait_until(lambda: code(edge, site, "/echo", "127.0.0.91") == 0, 5)
    assert not origin.records("redis_publish_failed")
    print(f"{written} junk counters written by the compromised edge")
    evil.close()
    on_decisions.close()


def test_a_compromised_edge_cannot_exempt_an_address_from_the_shared_rate(
    start_edge: Any,
    start_origin: Any,
    app: Any,
    site: dict[str, Path],
    tmp_path: Path,
    redises: list[Redis],
) -> None:
    """atk-trust #3: INCRBY -10^9 into an address's counters for the next hour exempted it
    (served 22 times against a budget of 13); INCRBY 2^63-1 made every edge's whole pipeline
    fail. Now each edge writes only its own counters, negative counts count as 0, and a
    broken counter is that address's alone."""
    signer = write_keypair(tmp_path, "decisions")
    r = start_redis_server(redises, tmp_path, ONE)
    origin = start_origin(origin_on(site, app, tmp_path, r, signer))
    a, b = (
        edge_on(
            start_edge,
            origin.port,
            r.url(name),
            signer,
            rate=0.1,
            rate_peers=["edge1", "edge2", "edge3"],
        )
        for name in ("edge1", "edge2")
    )
    bot, control, inflated, bystander = "127.0.0.71", "127.0.0.61", "127.0.0.72", "127.0.0.63"
    evil = r.client("edge3")  # a third edge, listed as a peer by the others, compromised
    now_w = int(time.time()) // 10
    for w in range(now_w, now_w + 360):  # the next hour of windows
        for key in (f"blindfold:rate:{bot}:{w}", f"blindfold:rate:edge1:{bot}:{w}"):
            with pytest.raises(redis.exceptions.NoPermissionError):
                evil.incrby(key, -1_000_000_000)
        evil.incrby(f"blindfold:rate:edge3:{bot}:{w}", -1_000_000_000)
        evil.incrby(f"blindfold:rate:edge3:{inflated}:{w}", 2**63 - 1)
    while time.time() % 10 > 4:  # the whole burst inside one 10 s window
        time.sleep(0.2)
    served = {
        ip: [code(e, site, "/echo", ip) for _ in range(7) for e in (a, b)] for ip in (bot, control)
    }
    for ip in (bot, control):  # 14 connections over two edges: each edge's burst of 12 holds
        assert served[ip].count(200) >= 13, (ip, served[ip])
    # both addresses pass the shared budget of 13 and are refused by both edges
    for ip in (bot, control):
        for e in (a, b):
            assert wait_until(lambda e=e, ip=ip: code(e, site, "/echo", ip) == 0, 3, 0.3), ip
    # the counter at 2^63-1: that address is refused (inflating is what an edge can do) ...
    assert code(a, site, "/echo", inflated) == 200  # its first connection, counted
    assert wait_until(lambda: code(a, site, "/echo", inflated) == 0, 3, 0.3)
    # ... and nobody else's count is lost with it
    assert code(b, site, "/echo", bystander) == 200
    for e in (a, b):
        assert e.metric("blindfold_decisions_polls_total", source="redis", result="rate_error") == 0
        assert (
            e.metric("blindfold_decisions_polls_total", source="redis", result="rate_bad_count")
            >= 1
        )
    evil.close()
