"""The operator's controls end to end (issue 13): `blindfold decisions` and `blindfold purge`
(the real CLI, as a process) against a real origin agent, two real edges with keyless routes
(a real key server), Redis with docs/decisions.md's ACL in the path, curl as the visitor.

edge A follows the origin's HTTPS stream and Redis; edge B follows Redis only, so what
reaches B went through Redis, signed."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from blindfold import pki
from blindfold.decisions.purge import HEAD_EVERY_S
from tests.conftest import DECISIONS_NAME
from tests.helpers.clients import curl, wait_until
from tests.helpers.edgeproc import EdgeProcess, OriginProcess, edge_config
from tests.helpers.keyless import KeylessPki, KeyServerProcess, keyserver_config, make_pki
from tests.helpers.topology import API_KEY, edge_decisions, origin_config
from tests.integration.test_blind import CDN, Site, blind_site  # noqa: F401 (a fixture)
from tests.integration.test_decision_sources import CHANNEL, redis_decisions, write_keypair
from tests.integration.test_keyless import keyless_route
from tests.integration.test_redis_trust import ONE, Redis, start_redis_server

OPERATOR_KEY = "ops-secret-0123456789abcdef"
BANNED = "127.0.0.77"


@pytest.fixture
def redises() -> Iterator[list[Redis]]:
    started: list[Redis] = []
    yield started
    for r in started:
        r.stop()


@pytest.fixture
def kpki(tmp_path: Path, ca: pki.Issued) -> KeylessPki:
    return make_pki(tmp_path, ca)


@pytest.fixture
def keyserver(kpki: KeylessPki, tmp_path: Path) -> Iterator[KeyServerProcess]:
    ks = KeyServerProcess(
        keyserver_config(kpki, {"edge1": ["example.test", "*.example.test"]}), tmp_path, name="ks"
    )
    yield ks
    ks.stop()
    assert not ks.tracebacks(), "".join(ks.stderr_lines)


class Deployment:
    def __init__(
        self, origin: OriginProcess, edges: list[EdgeProcess], site: dict[str, Path], tmp: Path
    ) -> None:
        self.origin = origin
        self.edges = edges
        self.site = site
        self.keyfile = tmp / "operator.key"
        self.keyfile.write_text(f"alice:{OPERATOR_KEY}\n")
        self.keyfile.chmod(0o600)
        self.redis: Redis | None = None

    def cli(self, *args: str, key: Path | None = None) -> subprocess.CompletedProcess[str]:
        """`blindfold ARGS --origin ... --key-file ...`, a real process."""
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "blindfold",
                *args,
                "--origin",
                f"https://127.0.0.1:{self.origin.decisions_port}",
                "--ca",
                str(self.site["ca"]),
                "--server-name",
                DECISIONS_NAME,
                "--key-file",
                str(key or self.keyfile),
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )


@pytest.fixture
def deployment(
    start_edge: Callable[..., EdgeProcess],
    start_origin: Callable[..., OriginProcess],
    app: Any,
    site: dict[str, Path],
    tmp_path: Path,
    kpki: KeylessPki,
    keyserver: KeyServerProcess,
    redises: list[Redis],
) -> Deployment:
    signer = write_keypair(tmp_path, "decisions")
    r = start_redis_server(redises, tmp_path, ONE)
    operators = tmp_path / "operators.txt"
    operators.write_text(f"# operator keys\nalice:{OPERATOR_KEY}\n")
    operators.chmod(0o600)
    origin = start_origin(
        origin_config(
            site,
            app.port,
            tmp_path,
            decisions={
                "redis_url": r.url("origin"),
                "signing_key": str(signer["private"]),
                "operator_keys_file": str(operators),
            },
        )
    )
    route = keyless_route(kpki, site, [keyserver.port], origin.port)
    # A: the HTTPS stream and Redis; B: Redis only
    stream = edge_decisions(site, origin.decisions_port, tmp_path)
    a_text = edge_config(route, per_ip_rate_per_s=0, workers=2) + stream.rstrip("\n")
    a_text += f'\nredis_url = "{r.url("edge1")}"\nsigner_public_keys = ["{signer["public"]}"]\n'
    b_text = edge_config(route, per_ip_rate_per_s=0, workers=2) + redis_decisions(
        r.url("edge2"), signer
    )
    edges = [start_edge(a_text), start_edge(b_text)]
    for edge in edges:
        assert edge.wait_for(lambda rec: rec.get("event") == "decisions_source_up", 10)
    deployment = Deployment(origin, edges, site, tmp_path)
    deployment.redis = r
    return deployment


def get(
    edge: EdgeProcess, kpki: KeylessPki, path: str, source: str = "127.0.0.1"
) -> tuple[int, str]:
    """(status, x-blindfold-cache) of a GET through the keyless edge; status 0: refused."""
    out = curl(
        edge.port,
        "example.test",
        kpki.site_ca,
        "-o",
        "/dev/null",
        "-D",
        "/dev/stdout",
        source=source,
        path=path,
        timeout=10,
    )
    lines = out.stdout.splitlines()
    status = int(lines[0].split()[1]) if lines and lines[0].startswith("HTTP/") else 0
    cache = next(
        (
            ln.partition(":")[2].strip()
            for ln in lines
            if ln.lower().startswith("x-blindfold-cache")
        ),
        "",
    )
    tags = [ln for ln in lines if ln.lower().startswith("cache-tag")]
    assert not tags, f"Cache-Tag reached the visitor: {tags}"
    return status, cache


def warm(edge: EdgeProcess, kpki: KeylessPki, path: str) -> None:
    """Until both workers hold `path` (each worker has its own cache): hits seen twice."""
    hits = 0
    deadline = time.monotonic() + 20
    while hits < 2 and time.monotonic() < deadline:
        status, cache = get(edge, kpki, path)
        assert status == 200
        hits += cache == "hit"
    for _ in range(6):  # a few more, so that each worker has had its turn
        assert get(edge, kpki, path)[0] == 200


def msum(edge: EdgeProcess, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    total = 0.0
    for line in edge.metrics().splitlines():
        key, _, value = line.rpartition(" ")
        base, _, have = key.partition("{")
        if base == name and all(f'{k}="{v}"' in have for k, v in labels.items()):
            total += float(value)
    return total


def cache_bytes(edge: EdgeProcess) -> float:
    return msum(edge, "blindfold_keyless_cache_bytes")


def test_decisions_by_cli_reach_both_edges_within_2s(
    deployment: Deployment, kpki: KeylessPki
) -> None:
    d = deployment
    for edge in d.edges:
        assert get(edge, kpki, "/echo", BANNED)[0] == 200
    added = d.cli("decisions", "add", "--ip", BANNED, "--duration", "5m", "--reason", "test ban")
    t0 = time.monotonic()
    assert added.returncode == 0, added.stderr
    for edge in d.edges:
        assert wait_until(lambda e=edge: get(e, kpki, "/echo", BANNED)[0] == 0, 2.0)
    banned_in = time.monotonic() - t0
    assert banned_in < 2.0
    assert get(d.edges[0], kpki, "/echo", "127.0.0.78")[0] == 200  # nobody else
    listed = d.cli("decisions", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    [ban] = [x for x in json.loads(listed.stdout)["decisions"] if x["value"] == BANNED]
    assert (ban["origin"], ban["reason"]) == ("operator:alice", "test ban")
    action = d.origin.wait_for(
        lambda rec: rec.get("event") == "operator_action" and rec.get("action") == "decision_add"
    )
    assert action is not None and action["operator"] == "alice" and action["value"] == BANNED

    deleted = d.cli("decisions", "delete", "--ip", BANNED)
    t0 = time.monotonic()
    assert deleted.returncode == 0, deleted.stderr
    for edge in d.edges:  # B lifts it on the signed lift from Redis alone
        assert wait_until(lambda e=edge: get(e, kpki, "/echo", BANNED)[0] == 200, 2.0)
    assert time.monotonic() - t0 < 2.0
    action = d.origin.wait_for(
        lambda rec: rec.get("event") == "operator_action" and rec.get("action") == "decision_delete"
    )
    assert action is not None and action["operator"] == "alice" and action["found"] is True
    # each edge logs what it applied, with the operator: A from the stream and Redis, B Redis
    for edge, sources in ((d.edges[0], {"stream", "redis"}), (d.edges[1], {"redis"})):
        applied = edge.records("operator_decision")
        assert {r["source"] for r in applied if r["action"] == "add"} == sources, applied
        assert {(r["operator"], r["value"]) for r in applied} == {("alice", BANNED)}
    lifted = d.edges[1].wait_for(
        lambda rec: rec.get("event") == "operator_decision" and rec.get("action") == "delete"
    )
    assert lifted is not None and lifted["operator"] == "alice"
    # too wide a range is refused at the origin, with a clear answer
    wide = d.cli("decisions", "add", "--range", "10.0.0.0/8")
    assert wide.returncode == 1 and "wider than /16" in wide.stderr


def test_purges_reach_both_edges_within_2s_and_the_next_request_misses(
    deployment: Deployment, kpki: KeylessPki
) -> None:
    d = deployment
    paths = {
        "url": "/cached/one",
        "prefix": "/cached/dir/two",
        "tag": "/cached/three?tag=product-42,red",
        "kept": "/cached/four",
    }
    for edge in d.edges:
        for path in paths.values():
            warm(edge, kpki, path)
        assert get(edge, kpki, paths["url"])[1] == "hit"
    before = [cache_bytes(e) for e in d.edges]
    assert d.redis is not None
    listener = d.redis.admin.pubsub()
    listener.subscribe(CHANNEL)
    purged = d.cli(
        "purge",
        "--url",
        "https://example.test/cached/one",
        "--prefix",
        "example.test/cached/dir",
        "--tag",
        "product-42",
    )
    assert purged.returncode == 0, purged.stderr
    action = d.origin.wait_for(
        lambda rec: rec.get("event") == "operator_action" and rec.get("action") == "purge"
    )
    assert action is not None and action["operator"] == "alice" and action["items"] == 3
    t0 = action["ts"]  # when the origin took it (the CLI's own start-up is not the path's)
    applied = []
    for edge in d.edges:
        rec = edge.wait_for(lambda rec: rec.get("event") == "purge_applied", 2.0)
        assert rec is not None, edge.records()
        applied.append(rec)
    assert max(rec["ts"] for rec in applied) - t0 < 2.0
    for rec in applied:  # every worker answered, each removed what it held
        assert rec["operator"] == "alice"
        assert (rec["workers"], rec["of_workers"]) == (2, 2)
        assert 3 <= rec["removed"] <= 6
    assert applied[1]["source"] == "redis"  # B has nothing else
    for edge, was in zip(d.edges, before, strict=True):
        assert cache_bytes(edge) < was
        for name in ("url", "prefix", "tag"):
            assert get(edge, kpki, paths[name])[1] == "miss", name
        assert get(edge, kpki, paths["kept"])[1] == "hit"  # the rest stays
    # A heard it twice (stream and Redis) and applied it once
    a = d.edges[0]
    assert wait_until(
        lambda: msum(a, "blindfold_edge_purges_total") == 2,
        3,
    )
    assert msum(a, "blindfold_edge_purges_total", result="applied") == 1

    # Redis, where every edge (or anyone, without the ACL) might publish: the signed purge
    # played back is applied no second time; one changed to purge what it did not is dropped
    signed = b""
    deadline = time.monotonic() + 5
    while not signed.startswith(b"bfp1.") and time.monotonic() < deadline:
        message = listener.get_message(ignore_subscribe_messages=True, timeout=1.0)
        if message is not None:
            signed = message["data"]
    listener.close()
    assert signed.startswith(b"bfp1."), "the purge was not published on Redis"
    b = d.edges[1]
    magic, signer, payload, signature = signed.split(b".")
    claim = json.loads(base64.urlsafe_b64decode(payload + b"=" * (-len(payload) % 4)))
    claim.update(id="f" * 16, urls=["example.test/cached/four"], tags=[], prefixes=[])
    forged = base64.urlsafe_b64encode(json.dumps(claim).encode()).rstrip(b"=")
    d.redis.admin.publish(CHANNEL, signed)  # replayed
    d.redis.admin.publish(CHANNEL, b".".join((magic, signer, forged, signature)))
    d.redis.admin.publish(CHANNEL, b"bfp1.unsigned")
    assert b.wait_for(
        lambda rec: rec.get("event") == "purge_dropped" and rec.get("reason") == "unsigned", 3
    ), [r for r in b.records() if "purge" in str(r.get("event"))]
    assert b.records("purge_dropped")[0]["reason"] == "bad_signature"
    assert wait_until(
        lambda: msum(b, "blindfold_edge_purges_total", source="redis", result="duplicate") == 1, 3
    )
    assert len(b.records("purge_applied")) == 1
    assert get(b, kpki, paths["kept"])[1] == "hit"

    # the channel lost a moment: B, which has no other source of purges, waits for the
    # origin's signed HEAD, finds it missed no number and keeps its caches (before, attack
    # review of issue 13 A: it emptied them at every reconnection); A too
    d.redis.admin.client_kill_filter(_type="pubsub")
    read = b.wait_for(lambda rec: rec.get("event") == "purge_log_read", 10)
    assert read is not None and (read["lost"], read["purges"]) == ("", 0), read
    assert wait_until(lambda: len(a.records("decisions_source_up")) >= 3, 10)  # A reconnected
    for edge in d.edges:
        assert [r for r in edge.records("purge_applied") if r["purge"] == "all"] == []
        assert get(edge, kpki, paths["kept"])[1] == "hit"
    assert len(b.records("purge_applied")) == 1


def cut_off(r: Redis, user: str) -> None:
    """`user` can no longer reach Redis: disabled, its connections closed."""
    r.admin.acl_setuser(user, enabled=False)
    r.admin.client_kill_filter(user=user)


def test_a_redis_only_edge_back_after_a_gap_applies_the_purges_it_missed_and_keeps_the_rest(
    deployment: Deployment, kpki: KeylessPki
) -> None:
    """Attack review of issue 13, A: an edge that follows Redis only used to empty every
    cache at every reconnection (anyone who can drop its Redis connection made it cold, an
    origin flood). Now the origin numbers its purges and says its last number (a signed HEAD):
    the edge reads the numbers it missed from their keys and empties its caches only when it
    cannot (second review, 1-4: a trimmed, rolled back or partial list made it skip purges)."""
    d = deployment
    assert d.redis is not None
    a, b = d.edges
    gone, kept, later = "/cached/gap/one", "/cached/gap/two", "/cached/gap/three"
    for path in (gone, kept, later):
        warm(b, kpki, path)
    # B has heard the origin's HEAD (every HEAD_EVERY_S) before the gap: where it is
    up = b.records("decisions_source_up")[-1]["ts"]
    while time.time() - up < HEAD_EVERY_S + 1.5:
        time.sleep(0.2)
    cut_off(d.redis, "edge2")
    assert b.wait_for(lambda rec: rec.get("event") == "decisions_source_down", 10)
    purged = d.cli("purge", "--url", f"https://example.test{gone}")
    assert purged.returncode == 0, purged.stderr
    assert a.wait_for(lambda rec: rec.get("event") == "purge_applied", 5)  # made, meanwhile
    assert b.records("purge_applied") == []
    keys = cast(list[bytes], d.redis.admin.keys("blindfold:purge:*"))
    assert len(keys) == 1 and keys[0].endswith(b":1"), keys
    assert 0 < d.redis.admin.ttl(keys[0]) <= 120
    d.redis.admin.acl_setuser("edge2", enabled=True)
    read = b.wait_for(lambda rec: rec.get("event") == "purge_log_read", 15)
    assert read is not None and (read["lost"], read["purges"]) == ("", 1), read
    applied = b.wait_for(lambda rec: rec.get("event") == "purge_applied", 5)
    assert applied is not None and applied["purge"] != "all", b.records("purge_applied")
    assert applied["source"] == "redis" and applied["removed"] >= 1
    assert get(b, kpki, gone)[1] == "miss"
    assert get(b, kpki, kept)[1] == "hit"  # before: every cache emptied, a miss
    assert msum(b, "blindfold_edge_purges_total", result="gap") == 0

    # the purge made while B was away is not there as that number (the origin's Redis user
    # overwrote it with an older purge, or deleted it; Redis restarted from an older RDB;
    # the origin's ACL refused the SET): before, B took an entry it knew as proof and kept
    # serving the purged path (a hit); now it cannot show it has purge 2 and empties its
    # caches
    ups, downs = len(b.records("decisions_source_up")), len(b.records("decisions_source_down"))
    cut_off(d.redis, "edge2")
    assert wait_until(lambda: len(b.records("decisions_source_down")) > downs, 10)
    purged = d.cli("purge", "--url", f"https://example.test{later}")
    assert purged.returncode == 0, purged.stderr
    assert wait_until(lambda: len(d.redis.admin.keys("blindfold:purge:*")) == 2, 5)
    first, second = sorted(d.redis.admin.keys("blindfold:purge:*"))
    d.redis.admin.set(second, d.redis.admin.get(first) or b"")  # replayed as number 2
    d.redis.admin.acl_setuser("edge2", enabled=True)
    assert wait_until(lambda: len(b.records("decisions_source_up")) > ups, 15)
    gap = b.wait_for(lambda rec: rec.get("event") == "purge_applied" and rec["purge"] == "all")
    assert gap is not None and gap["source"] == "redis"
    assert [r["lost"] for r in b.records("purge_log_read")] == ["", "wrong_purge"]
    assert get(b, kpki, later)[1] == "miss"
    assert get(b, kpki, kept)[1] == "miss"
    assert msum(b, "blindfold_edge_purges_total", result="gap") == 1
    # ... once: the next reconnection (no purge since) empties nothing
    downs = len(b.records("decisions_source_down"))
    cut_off(d.redis, "edge2")
    assert wait_until(lambda: len(b.records("decisions_source_down")) > downs, 10)
    d.redis.admin.acl_setuser("edge2", enabled=True)
    assert wait_until(lambda: len(b.records("purge_log_read")) == 3, 15)
    assert b.records("purge_log_read")[-1]["lost"] == ""
    assert msum(b, "blindfold_edge_purges_total", result="gap") == 1


def test_a_wrong_operator_key_and_an_edge_read_key_are_refused_and_logged(
    deployment: Deployment, tmp_path: Path, kpki: KeylessPki
) -> None:
    d = deployment
    wrong = tmp_path / "wrong.key"
    wrong.write_text("mallory:not-the-operator-key-0123\n")
    edge_key = tmp_path / "edge-as-operator.key"
    edge_key.write_text(API_KEY + "\n")  # edge1's read key (edge-keys.txt)
    for key, reason in ((wrong, "wrong_key"), (edge_key, "edge_key")):
        out = d.cli("decisions", "add", "--ip", BANNED, "--duration", "1m", key=key)
        assert out.returncode == 1 and "401" in out.stderr, out.stderr
        rec = d.origin.wait_for(
            lambda rec, r=reason: rec.get("event") == "operator_refused" and rec.get("reason") == r
        )
        assert rec is not None and rec["client"] == "127.0.0.1"
        assert OPERATOR_KEY not in json.dumps(rec) and API_KEY not in json.dumps(rec)
        out = d.cli("purge", "--tag", "x", key=key)
        assert out.returncode == 1 and "401" in out.stderr
    assert d.origin.records("operator_action") == []
    refused = {
        why: d.origin.metric("blindfold_origin_operator_requests_total", result=f"refused_{why}")
        for why in ("wrong_key", "edge_key")
    }
    assert refused == {"wrong_key": 2, "edge_key": 2}
    listed = d.cli("decisions", "list", "--json")
    assert [x for x in json.loads(listed.stdout)["decisions"] if x["value"] == BANNED] == []
    (seen,) = d.origin.records("operator_action")  # a list is logged too (before: not)
    assert seen["action"] == "decisions_list" and seen["operator"] == "alice", seen
    for edge in d.edges:
        assert get(edge, kpki, "/echo", BANNED)[0] == 200
        assert edge.records("purge_applied") == []

    # attack review G: a key removed from the file + SIGHUP is refused from then on (before:
    # the origin logged `reloaded` and alice's key still added bans and purges)
    bob = tmp_path / "bob.key"
    bob.write_text("bob:bob-own-operator-key-0123456789\n")
    (tmp_path / "operators.txt").write_text(bob.read_text())
    reloaded = d.origin.reload()
    assert reloaded is not None and reloaded["event"] == "reloaded", reloaded
    out = d.cli("purge", "--tag", "x")  # alice
    assert out.returncode == 1 and "401" in out.stderr, out.stderr
    assert d.origin.records("operator_action") == [seen]
    out = d.cli("purge", "--tag", "x", key=bob)
    assert out.returncode == 0, out.stderr
    assert d.origin.records("operator_action")[-1]["operator"] == "bob"


def test_a_purge_removes_a_blind_routes_blob_from_memory_and_disk(
    blind_site: Callable[..., Site],  # noqa: F811 (the fixture imported above)
    start_edge: Callable[..., EdgeProcess],
    site: dict[str, Path],
    tmp_path: Path,
) -> None:
    """Blind routes: the named blob (by id, or by its /b/ URL) leaves every worker's memory
    and disk caches; the next request pulls it again."""
    operators = tmp_path / "operators.txt"
    operators.write_text(f"alice:{OPERATOR_KEY}\n")
    operators.chmod(0o600)
    s = blind_site(origin_kw={"decisions": {"operator_keys_file": str(operators)}})
    # the same edge, now following the origin's stream (the blind cache on disk is kept)
    text = s.edge.config_path.read_text()
    s.edge.stop()
    edge = start_edge(text + edge_decisions(site, s.origin.decisions_port, tmp_path))
    assert edge.wait_for(lambda rec: rec.get("event") == "decisions_source_up", 10)
    s.edge = edge
    ids = s.ids()
    photo, script = ids["/img/photo.bin"], ids["/js/app.js"]

    def cache(blob: str) -> str:
        out = s.curl_blob(f"/b/{blob}", "-o", "/dev/null", "-D", "/dev/stdout")
        lines = out.stdout.decode("latin-1").splitlines()
        assert lines and " 200" in lines[0], lines
        return next(ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("x-blindfold"))

    for blob in (photo, script):
        cache(blob)
        assert wait_until(lambda b=blob: cache(b) == "hit", 10)  # every worker's turn
        for _ in range(4):
            cache(blob)
    assert (s.cache / "w0").exists()
    on_disk = {p.name for p in s.cache.glob("w*/*")}
    assert photo in on_disk
    deployment = Deployment(s.origin, [edge], site, tmp_path)
    out = deployment.cli("purge", "--blob", photo, "--url", f"https://{CDN}/b/{script}")
    assert out.returncode == 0, out.stderr
    rec = edge.wait_for(lambda rec: rec.get("event") == "purge_applied", 2.0)
    assert rec is not None and rec["removed"] >= 2
    assert photo not in {p.name for p in s.cache.glob("w*/*")}
    assert cache(photo) == "miss" and cache(script) == "miss"
