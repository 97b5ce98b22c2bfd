"""The edge's ban set: the master's table (limits, IPv6 prefixes, sources, expiry, resyncs),
its distribution to workers (snapshots, deltas, one message in flight, a bounded log), the
worker's incremental set and its sliced application, and signed decisions for Redis."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from blindfold.core.iplist import IPSet, MutableIPSet
from blindfold.decisions.bans import BanDistributor, BanLimits, BanTable, decode, encode
from blindfold.decisions.feed import supervise
from blindfold.decisions.signed import PURPOSE, DecisionSigner, DecisionVerifier
from blindfold.edge.bans import SLICE_KEYS
from blindfold.errors import ProtocolError
from blindfold.obs.log import JsonLog


def key_of(text: str) -> int:
    net = ipaddress.ip_network(text, strict=False)
    return encode(net.version, int(net.network_address), net.prefixlen)


def enforced(table: BanTable) -> set[str]:
    out = set()
    for key in table.keys():  # noqa: SIM118 (a method of ours, not a dict)
        version, net, plen = decode(key)
        addr = ipaddress.ip_address(net) if version == 6 else ipaddress.IPv4Address(net)
        out.add(f"{addr}/{plen}")
    return out


def replay(table: BanTable) -> set[int]:
    """What a worker holds after applying the whole log from the start."""
    held: set[int] = set()
    for entry in table.log:
        if entry >= 0:
            held.add(entry)
        else:
            held.discard(~entry)
    return held


# ---------------------------------------------------------------------- table
def test_ranges_wider_than_the_limits_are_refused_and_counted() -> None:
    table = BanTable(BanLimits(min_prefix_len_v4=16, min_prefix_len_v6=32))
    table.update(
        "stream",
        [
            ("range", "0.0.0.0/0", 60, ""),
            ("range", "10.0.0.0/8", 60, ""),
            ("range", "::/0", 60, ""),
            ("range", "2001:db8::/31", 60, ""),
            ("range", "10.1.0.0/16", 60, ""),
            ("range", "2001:db8::/32", 60, ""),
            ("ip", "not an address", 60, ""),
        ],
        [],
        0.0,
    )
    assert enforced(table) == {"10.1.0.0/16", "2001:db8::/32"}
    assert table.refused == {"too_wide": 4, "bad_decision": 1}


def test_the_ban_count_is_capped_and_refusals_counted() -> None:
    table = BanTable(BanLimits(max_bans=3))
    table.update("stream", [("ip", f"192.0.2.{i}", 60, "") for i in range(5)], [], 0.0)
    assert table.size == 3 and table.refused == {"cap": 2}
    table.update("redis", [("ip", "192.0.2.0", 60, "")], [], 0.0)  # already enforced: free
    assert table.size == 3 and table.refused == {"cap": 2}
    table.update("stream", [], [("ip", "192.0.2.1")], 0.0)
    table.update("redis", [("ip", "192.0.2.9", 60, "")], [], 0.0)  # room again
    assert table.size == 3 and "192.0.2.9/32" in enforced(table)


def test_ipv6_bans_cover_the_limit_prefix_and_lift_only_with_their_last_member() -> None:
    table = BanTable(BanLimits(ipv6_prefix_len=64))
    table.update(
        "stream",
        [("ip", "2001:db8:1:2::a", 60, ""), ("ip", "2001:db8:1:2::b", 60, "")],
        [],
        0.0,
    )
    table.update("stream", [("range", "2001:db8:1:2:8000::/65", 60, "")], [], 0.0)
    assert enforced(table) == {"2001:db8:1:2::/64"}
    assert table.size == 1
    table.update("stream", [], [("ip", "2001:db8:1:2::a")], 1.0)
    table.update("stream", [], [("range", "2001:db8:1:2:8000::/65")], 1.0)
    assert enforced(table) == {"2001:db8:1:2::/64"}  # ::b is still banned
    table.update("stream", [], [("ip", "2001:db8:1:2::b")], 1.0)
    assert enforced(table) == set()
    wide = BanTable(BanLimits(ipv6_prefix_len=64))
    wide.update("stream", [("range", "2001:db8::/48", 60, "")], [], 0.0)
    assert enforced(wide) == {"2001:db8::/48"}  # wider than the prefix: as it is


def test_sources_union_expiry_and_the_log() -> None:
    table = BanTable(BanLimits())
    table.update("stream", [("ip", "192.0.2.1", 10, "")], [], 0.0)
    table.update("redis", [("ip", "192.0.2.1", 50, ""), ("range", "10.1.0.0/16", 5, "")], [], 0.0)
    assert table.size == 2
    table.update("stream", [], [("ip", "192.0.2.1")], 1.0)  # redis still bans it
    assert enforced(table) == {"192.0.2.1/32", "10.1.0.0/16"}
    assert table.expire(6.0) == 1
    assert enforced(table) == {"192.0.2.1/32"}
    table.update("redis", [("ip", "192.0.2.1", 100, "")], [], 7.0)  # extended
    assert table.expire(60.0) == 0
    assert table.expire(107.0) == 1
    assert table.size == 0 and replay(table) == set()


def test_a_resync_changes_only_the_difference() -> None:
    """A full answer must not lift every ban and add it back (visitors would get through
    while a million of them travel)."""
    table = BanTable(BanLimits())
    table.update("stream", [(("ip", f"192.0.2.{i}", 60, "")) for i in range(10)], [], 0.0)
    seq = table.seq
    table.begin_resync("stream")
    table.update("stream", [(("ip", f"192.0.2.{i}", 60, "")) for i in range(5, 12)], [], 1.0)
    table.end_resync("stream")
    changes = table.log[seq - table.log_base :]
    assert sorted(changes) == sorted(
        [~key_of(f"192.0.2.{i}/32") for i in range(5)]
        + [key_of(f"192.0.2.{i}/32") for i in (10, 11)]
    )
    assert table.size == 7 and len(replay(table)) == 7


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["stream", "redis"]),
            st.booleans(),
            st.integers(0, 7),
            st.integers(1, 30),
            st.integers(0, 40),
        ),
        max_size=60,
    )
)
def test_the_log_always_replays_to_the_enforced_set(
    ops: list[tuple[str, bool, int, int, int]],
) -> None:
    table = BanTable(BanLimits(max_bans=5))
    for source, add, n, duration, now in ops:
        value = f"2001:db8:{n % 3}::{n}" if n % 2 else f"192.0.2.{n}"
        if add:
            table.update(source, [("ip", value, duration, "")], [], float(now))
        else:
            table.update(source, [], [("ip", value)], float(now))
        table.expire(float(now))
        assert replay(table) == set(table.keys())
        assert table.size == len(table.keys()) <= 5


# ---------------------------------------------------------------------- distribution
def test_a_new_worker_gets_a_snapshot_in_chunks_then_deltas() -> None:
    table = BanTable(BanLimits())
    table.update("stream", [("ip", f"10.0.{i >> 8}.{i & 255}", 60, "") for i in range(25)], [], 0)
    dist = BanDistributor(table, chunk=10)
    dist.add("w")
    first: dict[str, Any] | None = dist.next_message("w")
    assert first is not None and first["reset"] and not first["swap"] and len(first["add"]) == 10
    assert dist.next_message("w") is None  # one message in flight at a time
    table.update("stream", [("ip", "192.0.2.1", 60, "")], [], 0)  # during the snapshot
    got = list(first["add"])
    while True:
        assert dist.acked("w", first["id"])
        first = dist.next_message("w")
        if first is None:
            break
        got += first["add"]
        assert not first["reset"]
    assert set(got) == set(table.keys()) and len(got) == 26
    assert dist.pending("w") == 0


def test_changes_made_while_a_message_is_in_flight_coalesce() -> None:
    table = BanTable(BanLimits())
    dist = BanDistributor(table, chunk=100)
    dist.add("w")
    snap = dist.next_message("w")
    assert snap is not None and snap["reset"] and snap["swap"] and snap["add"] == []
    table.update("stream", [("ip", "192.0.2.1", 60, "")], [], 0)
    table.update("stream", [("ip", "192.0.2.2", 60, "")], [], 0)
    table.update("stream", [], [("ip", "192.0.2.1")], 0)  # added and lifted meanwhile
    assert dist.next_message("w") is None
    dist.acked("w", snap["id"])
    delta = dist.next_message("w")
    assert delta is not None
    assert delta["add"] == [key_of("192.0.2.2/32")]
    assert delta["del"] == [key_of("192.0.2.1/32")]  # idempotent at the worker
    assert dist.acked("w", delta["id"]) and dist.next_message("w") is None
    assert table.log == []  # every worker has it all: the log is empty


def test_a_worker_that_does_not_keep_up_gets_a_snapshot_not_a_queue() -> None:
    table = BanTable(BanLimits(max_bans=1000))
    dist = BanDistributor(table, chunk=50, max_log=200)
    dist.add("slow")
    dist.add("fast")
    for worker in ("slow", "fast"):
        m = dist.next_message(worker)
        assert m is not None
        dist.acked(worker, m["id"])
    for i in range(300):
        table.update("stream", [("ip", f"10.0.{i >> 8}.{i & 255}", 60, "")], [], 0)
        dist.trim()
        m = dist.next_message("fast")
        if m is not None:
            dist.acked("fast", m["id"])
    assert len(table.log) <= 200  # bounded although "slow" never read a thing
    assert dist.resyncs == 1
    m = dist.next_message("slow")
    assert m is not None and m["reset"]
    dist.remove("slow")
    assert dist.pending("slow") == 0


# ---------------------------------------------------------------------- worker's set
@given(
    st.lists(
        st.tuples(
            st.booleans(), st.sampled_from([4, 6]), st.integers(0, 1 << 128), st.integers(0, 128)
        ),
        max_size=40,
    ),
    st.lists(st.integers(0, (1 << 128) - 1), min_size=1, max_size=10),
)
def test_the_mutable_set_agrees_with_a_fresh_ipset(
    ops: list[tuple[bool, int, int, int]], probes: list[int]
) -> None:
    live = MutableIPSet()
    nets: set[Any] = set()
    for add, version, raw, plen in ops:
        bits = 32 if version == 4 else 128
        plen = min(plen, bits)
        kind = ipaddress.IPv4Network if version == 4 else ipaddress.IPv6Network
        net = kind((raw % (1 << bits), plen), strict=False)
        key = encode(version, int(net.network_address), plen)
        if add:
            live.add_key(key)
            nets.add(net)
        else:
            live.discard_key(key)
            nets.discard(net)
    fresh = IPSet(nets)
    assert live.size == fresh.size
    for p in probes:
        assert live.contains(p & 0xFFFFFFFF, 4) == fresh.contains(p & 0xFFFFFFFF, 4)
        assert live.contains(p, 6) == fresh.contains(p, 6)


EDGE = """
[edge]
listen = ["127.0.0.1:0"]
[[edge.routes]]
sni = ["a.test"]
origins = ["127.0.0.1:9"]
"""


def test_a_worker_applies_a_large_update_in_short_slices() -> None:
    """A real worker (no listeners) given a 200k-ban snapshot and a delta: no slice of work
    holds its loop for long, the old set stays enforced until the snapshot is complete, and
    every message is acknowledged once applied."""
    from blindfold.edge.worker import Worker

    ours, theirs = socket.socketpair()
    worker = Worker(0, 1, theirs.detach(), [])
    try:
        worker.apply_config(EDGE)
        worker.configured = True
        old = key_of("198.51.100.7/32")
        worker.guards.bans.add_key(old)
        keys = [encode(4, (10 << 24) + i, 32) for i in range(200_000)]
        worker.ban_updates.push(
            {"op": "bans", "id": 1, "reset": True, "swap": False, "add": keys[:100_000], "del": []}
        )
        worker.ban_updates.push(
            {"op": "bans", "id": 2, "reset": False, "swap": True, "add": keys[100_000:], "del": []}
        )
        worker.ban_updates.push(
            {"op": "bans", "id": 3, "add": [key_of("192.0.2.1/32")], "del": [keys[0]]}
        )
        slowest = 0.0
        steps = 0
        half_way_old_enforced = None
        while worker.ban_updates.queue or worker.ban_updates._job is not None:
            t0 = time.perf_counter()
            worker.ban_updates._step()
            slowest = max(slowest, time.perf_counter() - t0)
            steps += 1
            if steps == 200_000 // SLICE_KEYS - 2:  # inside the second snapshot message
                half_way_old_enforced = worker.guards.is_banned(
                    4, int(ipaddress.IPv4Address("198.51.100.7"))
                )
        assert half_way_old_enforced is True
        assert slowest < 0.05, f"a slice took {slowest * 1000:.1f} ms"
        assert steps >= 200_000 // SLICE_KEYS  # never the whole message in one go
        bans = worker.guards.bans
        assert bans.size == 200_000 and not bans.contains(10 << 24, 4)
        assert bans.contains(int(ipaddress.IPv4Address("192.0.2.1")), 4)
        assert not bans.contains(int(ipaddress.IPv4Address("198.51.100.7")), 4)  # swapped out
        assert worker.ban_updates.synced
        ours.settimeout(5)
        acks = b""
        while acks.count(b"\n") < 3:
            acks += ours.recv(65536)
        assert [json.loads(line)["id"] for line in acks.splitlines()] == [1, 2, 3]
    finally:
        ours.close()
        worker.reactor.close()


# ---------------------------------------------------------------------- signed decisions
@pytest.fixture
def signer() -> DecisionSigner:
    return DecisionSigner(Ed25519PrivateKey.generate())


def test_signed_decisions_round_trip(signer: DecisionSigner) -> None:
    verifier = DecisionVerifier([signer._key.public_key()])
    text = signer.sign("ip", "192.0.2.1", 1000.0, 10.0, "waf")
    d = verifier.admit(text, 100.0)
    assert d is not None and (d.scope, d.value, d.until, d.issued) == (
        "ip",
        "192.0.2.1",
        1000.0,
        10.0,
    )
    assert verifier.admit(text, 101.0) is None  # the same decision again (a resync)
    assert verifier.admit(text.encode(), 101.0) is None


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda t, s: '{"scope":"range","value":"0.0.0.0/0","until":9e9}', "unsigned"),
        (lambda t, s: "bfd2" + t[4:], "unsigned"),
        (lambda t, s: t + ".x", "unsigned"),
        (lambda t, s: "bfd1." + "0" * 16 + t[21:], "unknown_signer"),
        (lambda t, s: t[:-3] + ("AAA" if t[-3:] != "AAA" else "BBB"), "bad_signature"),
        (lambda t, s: t.replace(t.split(".")[3], "!!"), "bad_signature"),
        (lambda t, s: ".".join([*t.split(".")[:2], s, t.split(".")[3]]), "bad_signature"),
        (lambda t, s: t + "=" * 3000, "unsigned"),
    ],
)
def test_forged_and_tampered_decisions_are_refused(
    signer: DecisionSigner, mutate: Any, reason: str
) -> None:
    import base64

    verifier = DecisionVerifier([signer._key.public_key()])
    text = signer.sign("ip", "192.0.2.1", 1000.0, 10.0, "waf")
    other_payload = (
        base64.urlsafe_b64encode(
            b'{"scope":"range","value":"0.0.0.0/0","until":9e9,"issued":9e9,"reason":""}'
        )
        .decode()
        .rstrip("=")
    )
    with pytest.raises(ProtocolError) as info:
        verifier.admit(mutate(text, other_payload), 100.0)
    assert info.value.reason == reason


def test_a_signature_is_bound_to_its_purpose(signer: DecisionSigner) -> None:
    """The same key signing the same bytes for another purpose yields no decision."""
    import base64

    verifier = DecisionVerifier([signer._key.public_key()])
    payload = (
        base64.urlsafe_b64encode(
            b'{"scope":"ip","value":"192.0.2.1","until":1000,"issued":1,"reason":""}'
        )
        .decode()
        .rstrip("=")
    )
    signed_part = f"{signer.signer}.{payload}".encode()
    for wrong in (signed_part, b"blindfold decision v2\x00" + signed_part):
        sig = base64.urlsafe_b64encode(signer._key.sign(wrong)).decode().rstrip("=")
        with pytest.raises(ProtocolError) as info:
            verifier.admit(f"bfd1.{signer.signer}.{payload}.{sig}", 100.0)
        assert info.value.reason == "bad_signature"
    sig = base64.urlsafe_b64encode(signer._key.sign(PURPOSE + signed_part)).decode().rstrip("=")
    assert verifier.admit(f"bfd1.{signer.signer}.{payload}.{sig}", 100.0) is not None


def test_expired_and_replayed_decisions_are_refused(signer: DecisionSigner) -> None:
    verifier = DecisionVerifier([signer._key.public_key()])
    old = signer.sign("ip", "192.0.2.1", 500.0, 10.0, "first")
    new = signer.sign("ip", "192.0.2.1", 900.0, 20.0, "extended")
    with pytest.raises(ProtocolError) as info:
        verifier.admit(old, 600.0)
    assert info.value.reason == "expired"
    assert verifier.admit(new, 100.0) is not None
    with pytest.raises(ProtocolError) as info:
        verifier.admit(old, 101.0)  # an older decision played back
    assert info.value.reason == "replayed"
    verifier.sweep(1000.0)
    assert verifier.held == {}


@given(st.integers(0, 400), st.integers(0, 255))
def test_any_byte_change_is_refused_or_means_the_same(position: int, byte: int) -> None:
    signer = DecisionSigner(Ed25519PrivateKey.from_private_bytes(bytes(32)))
    verifier = DecisionVerifier([signer._key.public_key()])
    text = signer.sign("range", "2001:db8::/64", 1000.0, 10.0, "waf").encode()
    changed = bytearray(text)
    changed[position % len(text)] = byte
    try:
        d = verifier.open(bytes(changed), 100.0)
    except ProtocolError:
        return
    assert (d.scope, d.value, d.until, d.issued) == ("range", "2001:db8::/64", 1000.0, 10.0)


def test_a_lift_ends_only_the_bans_issued_before_it(signer: DecisionSigner) -> None:
    """atk-trust #2: a ban is lifted by a signed lift (or its own `until`), never by a key
    that went missing; a lift cannot end a later ban, a lifted ban cannot be played back."""
    verifier = DecisionVerifier([signer._key.public_key()])
    ban = signer.sign("ip", "192.0.2.1", 1000.0, 10.0, "waf", "edge1", "198.51.100.1")
    d = verifier.admit(ban, 100.0)
    assert d is not None and not d.lift and (d.edge, d.edge_address) == ("edge1", "198.51.100.1")
    assert verifier.holds_until("ip", "192.0.2.1", 100.0) == 1000.0
    lift = signer.sign_lift("ip", "192.0.2.1", 900.0, 50.0, "operator")
    d = verifier.admit(lift, 100.0)
    assert d is not None and d.lift and d.issued == 50.0
    assert verifier.holds_until("ip", "192.0.2.1", 100.0) is None
    assert verifier.admit(lift, 101.0) is None  # read again at a resync: nothing new
    for replayed in (ban, signer.sign("ip", "192.0.2.1", 2000.0, 50.0, "same instant")):
        with pytest.raises(ProtocolError) as info:
            verifier.admit(replayed, 102.0)
        assert info.value.reason == "replayed"
    # remembered until the lifted ban's own end (1000), not the lift's shorter `until`
    verifier.sweep(950.0)
    with pytest.raises(ProtocolError):
        verifier.admit(ban, 960.0)
    later = signer.sign("ip", "192.0.2.1", 3000.0, 60.0, "banned again")
    assert verifier.admit(later, 103.0) is not None
    assert verifier.holds_until("ip", "192.0.2.1", 103.0) == 3000.0
    with pytest.raises(ProtocolError) as info:  # the old lift cannot end the new ban
        verifier.admit(signer.sign_lift("ip", "192.0.2.1", 900.0, 50.0, "old"), 104.0)
    assert info.value.reason == "replayed"


def test_a_ban_signature_is_not_a_lift_signature(signer: DecisionSigner) -> None:
    """Same key, same payload: a ban's signature under the lift's magic (or the other way
    round) does not verify."""
    verifier = DecisionVerifier([signer._key.public_key()])
    ban = signer.sign("ip", "192.0.2.1", 1000.0, 10.0, "waf")
    lift = signer.sign_lift("ip", "192.0.2.1", 1000.0, 10.0, "waf")
    for forged in ("bfu1" + ban[4:], "bfd1" + lift[4:]):
        with pytest.raises(ProtocolError) as info:
            verifier.admit(forged, 100.0)
        assert info.value.reason == "bad_signature"


def test_another_signers_ban_survives_a_lift() -> None:
    one, two = (DecisionSigner(Ed25519PrivateKey.generate()) for _ in range(2))
    verifier = DecisionVerifier([one._key.public_key(), two._key.public_key()])
    assert verifier.admit(one.sign("ip", "192.0.2.1", 1000.0, 10.0, "a"), 100.0) is not None
    assert verifier.admit(two.sign("ip", "192.0.2.1", 500.0, 10.0, "b"), 100.0) is not None
    assert verifier.admit(one.sign_lift("ip", "192.0.2.1", 1000.0, 20.0, "x"), 100.0)
    assert verifier.holds_until("ip", "192.0.2.1", 100.0) == 500.0


@pytest.mark.parametrize(
    ("values", "total", "bad"),
    [
        ([3, b"4", None, b"0"], 7, 0),
        ([3, b"-1000000000"], 3, 1),  # atk-trust #3: a negative count exempts nobody
        ([-5, b"2"], 2, 1),
        ([3, b"9223372036854775807", b"9223372036854775807"], 3 + 2 * (2**63 - 1), 0),
        ([3, b"junk", RuntimeError("OOM"), b"1.5", True], 3, 4),
    ],
)
def test_shared_totals(values: list[object], total: int, bad: int) -> None:
    from blindfold.decisions.redis_bus import shared_total

    assert shared_total(values) == (total, bad)


# ---------------------------------------------------------------------- supervision
def test_a_task_that_dies_is_reported_and_restarted(tmp_path: Path) -> None:
    log_path = tmp_path / "log.jsonl"
    log = JsonLog.open(str(log_path), process="test")
    runs: list[int] = []
    downs: list[str] = []

    async def flaky() -> None:
        runs.append(len(runs))
        if len(runs) < 3:
            raise RecursionError("maximum recursion depth exceeded while decoding JSON")

    async def main() -> None:
        await asyncio.wait_for(
            supervise(
                "stream", flaky, log, lambda e: downs.append(type(e).__name__), backoff_s=0.01
            ),
            5,
        )

    asyncio.run(main())
    log.flush()
    assert runs == [0, 1, 2]
    assert downs == ["RecursionError", "RecursionError"]
    lines = [json.loads(x) for x in log_path.read_text().splitlines()]
    failed = [r for r in lines if r["event"] == "decisions_task_failed"]
    assert [r["restart_in_s"] for r in failed] == [0.01, 0.02]
    assert os.path.exists(log_path)
