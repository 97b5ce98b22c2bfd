"""Purges, sans-IO (decisions.purge): what an operator may ask, how an edge's cache matches
it, the origin's purge log, the signed Redis format and its refusals; the operator API's key
checks (decisions.operator)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from blindfold.core.httpcache import HttpCache
from blindfold.decisions import purge as p
from blindfold.decisions.operator import OperatorApi, load_operator_keys
from blindfold.decisions.signed import DecisionSigner, DecisionVerifier, key_id
from blindfold.errors import ConfigError, ProtocolError
from blindfold.obs.log import JsonLog
from blindfold.web.messages import Request

T0 = 1_800_000_000.0
HEADERS = [(b"cache-control", b"public, max-age=60")]
KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
KEYS = {key_id(KEY.public_key()): KEY.public_key()}


def purge(**items: list[str]) -> p.Purge:
    return p.parse_purge(items, id_="0123456789abcdef", issued=T0, operator="alice")


def test_items_are_normalised_and_checked() -> None:
    got = purge(
        urls=["https://Example.COM/a.css?v=1", "example.com/a.css?v=1"],
        prefixes=["http://example.com/static/"],
        tags=["product-42"],
        blobs=["0" * 32, "a" * 32 + ".js"],
    )
    assert got.urls == ("example.com/a.css?v=1",)  # scheme dropped, host lower-cased, once
    assert got.prefixes == ("example.com/static",)  # as paths are compared (rule_prefix)
    assert got.size == 5
    for bad in (
        {"urls": ["/no-host"]},
        {"urls": ["example.com"]},  # no path
        {"urls": ["example.com/a b"]},
        {"urls": ["exa mple.com/a"]},
        {"urls": ["example.com/" + "a" * 2000]},
        {"prefixes": ["example.com/a?x=1"]},
        {"prefixes": ["example.com/%zz"]},  # not a path the edge could compare
        {"tags": ["two words"]},
        {"tags": ["a,b"]},
        {"tags": ["t" * 200]},
        {"blobs": ["../etc/passwd"]},
        {"urls": "example.com/a"},  # not a list
        {"purge_everything": True},  # unknown field
        {},  # nothing
        {"tags": [f"t{i}" for i in range(p.MAX_PURGE_ITEMS + 1)]},
    ):
        with pytest.raises(ProtocolError) as info:
            p.parse_purge(bad, id_="0" * 16, issued=T0, operator="x")
        assert info.value.reason == "bad_purge", bad


def test_cache_tags_are_bounded() -> None:
    tags = p.parse_cache_tags([(b"cache-tag", b"a, b,,c"), (b"cache-tag", b"a,d e,f")])
    assert tags == {"a", "b", "c", "f"}  # 'd e' is not a tag
    many = ",".join(f"t{i}" for i in range(100)).encode()
    assert len(p.parse_cache_tags([(b"cache-tag", many)])) == p.MAX_TAGS_PER_RESPONSE
    huge = [(b"cache-tag", b"x" * (p.MAX_CACHE_TAG_BYTES + 1))]
    assert p.parse_cache_tags(huge) == frozenset()


def filled() -> HttpCache:
    cache = HttpCache(1 << 20, 1 << 16)
    for authority, target, tags in (
        (b"example.com", b"/a.css?v=1", frozenset()),
        (b"example.com:8443", b"/static/x.js", frozenset()),
        (b"example.com", b"/static", frozenset()),
        (b"example.com", b"/staticfiles/y", frozenset()),
        (b"other.com", b"/static/x.js", frozenset({"product-42"})),
        (b"example.com", b"/page", frozenset({"product-42", "red"})),
        (b"example.com", b"/kept", frozenset({"blue"})),
    ):
        cache.store((authority, target), [], 200, HEADERS, b"body", T0, T0, tags=tags)
    return cache


def keys(cache: HttpCache) -> set[tuple[bytes, bytes]]:
    return set(cache._store)


def test_an_edge_cache_removes_what_a_purge_names_and_nothing_else() -> None:
    cache = filled()
    used = cache.used
    matcher = p.PurgeMatcher.of(purge(urls=["https://example.com/a.css?v=1"]))
    assert cache.purge(matcher.matches) == 1
    assert (b"example.com", b"/a.css?v=1") not in keys(cache) and cache.used < used
    # a prefix on a segment boundary, any port of a host named without one
    matcher = p.PurgeMatcher.of(purge(prefixes=["example.com/static"]))
    assert cache.purge(matcher.matches) == 2
    assert (b"example.com", b"/staticfiles/y") in keys(cache)
    assert (b"other.com", b"/static/x.js") in keys(cache)
    matcher = p.PurgeMatcher.of(purge(tags=["product-42"]))
    assert cache.purge(matcher.matches) == 2
    assert keys(cache) == {(b"example.com", b"/staticfiles/y"), (b"example.com", b"/kept")}
    assert cache.purged == 5
    assert cache.purge_all() == 2 and cache.used == 0 and len(cache) == 0


def test_a_host_named_with_a_port_is_that_port_only() -> None:
    cache = filled()
    matcher = p.PurgeMatcher.of(purge(urls=["example.com:9999/static/x.js"]))
    assert cache.purge(matcher.matches) == 0
    matcher = p.PurgeMatcher.of(purge(urls=["example.com:8443/static/x.js"]))
    assert cache.purge(matcher.matches) == 1


def test_the_purge_log_is_bounded_in_bytes_too() -> None:
    log = p.PurgeLog(max_bytes=3 * 2200)
    _, position, _ = log.since(None)
    for i in range(5):
        log.add(purge(urls=[f"example.com/{i}{'x' * 1000}", f"example.com/{'y' * 1000}"]))
    assert len(log.items) == 3 and log.bytes <= 3 * 2200
    assert log.since(position)[2] is True


def test_the_purge_log_gives_each_edge_what_it_has_not_seen() -> None:
    log = p.PurgeLog(max_entries=3)
    items, start, reset = log.since(None)  # a new follower: the current end
    assert (items, reset) == ([], False)
    first = purge(tags=["a"])
    log.add(first)
    items, after, reset = log.since(start)
    assert (items, reset) == ([first], False)
    assert log.since(after)[0] == []
    # the origin restarted: every purge of the new log (attack review F: before, ([], end),
    # and the purges made between the restart and the edge's next poll were lost)
    assert log.since("another-epoch.0") == ([first], after, False)
    assert log.since("another-epoch.7") == ([first], after, False)
    assert log.since(f"{log.epoch}.99") == ([first], after, False)  # from the future: the same
    for i in range(4):
        log.add(purge(tags=[f"t{i}"]))
    assert log.since(after)[2] is True  # fell behind the log: it cannot know what it missed
    assert log.since("another-epoch.1")[2] is True  # the new log's start is gone: reset
    assert log.since(f"{log.epoch}.x")[0] == []


def test_an_answer_of_the_log_is_bounded() -> None:
    log = p.PurgeLog()
    _, position, _ = log.since(None)
    for i in range(p.MAX_PURGES_PER_ANSWER + 5):
        log.add(purge(tags=[f"t{i}"]))
    items, position, _ = log.since(position)
    assert len(items) == p.MAX_PURGES_PER_ANSWER
    items, position, _ = log.since(position)
    assert len(items) == 5


def test_signed_purges_verify_and_refuse_what_is_not_the_origins() -> None:
    made = purge(urls=["example.com/a"], tags=["x"])
    text = p.sign_purge(KEY, made)
    assert p.is_signed_purge(text) and p.is_signed_purge(text.encode())
    assert p.open_purge(text, KEYS, T0 + 1) == made

    def reason(message: str | bytes, now: float = T0) -> str:
        with pytest.raises(ProtocolError) as info:
            p.open_purge(message, KEYS, now)
        return info.value.reason

    magic, signer, payload, sig = text.split(".")
    other = json.dumps({**made.to_json(), "tags": ["everything"]}).encode()
    assert reason(f"{magic}.{signer}.{p._b64(other)}.{sig}") == "bad_signature"
    assert reason(f"{magic}.{'0' * 16}.{payload}.{sig}") == "unknown_signer"
    assert reason(text, T0 + p.MAX_SIGNED_AGE_S + 1) == "expired"  # a replay, later
    assert reason(text, T0 - p.MAX_SIGNED_AGE_S - 1) == "expired"
    assert reason("bfd1.x.y.z") == "unsigned"
    assert reason(b"bfp1." + b"a" * p.MAX_PURGE_BYTES) == "unsigned"
    # a decision's signature (another purpose) never makes a purge, nor the reverse
    ban = DecisionSigner(KEY).sign("ip", "192.0.2.1", T0 + 60, T0, "x")
    assert reason("bfp1." + ban.split(".", 1)[1]) in ("bad_signature", "bad_purge")
    verifier = DecisionVerifier([KEY.public_key()])
    with pytest.raises(ProtocolError):
        verifier.open("bfd1." + text.split(".", 1)[1], T0)


@given(st.integers(min_value=0, max_value=400), st.integers(min_value=0, max_value=255))
def test_a_damaged_signed_purge_is_refused_never_anything_else(pos: int, byte: int) -> None:
    text = bytearray(p.sign_purge(KEY, purge(urls=["example.com/a"])).encode())
    text[pos % len(text)] = byte
    try:
        p.open_purge(bytes(text), KEYS, T0)
    except ProtocolError:
        pass


def test_an_edge_applies_each_purge_once() -> None:
    seen = p.SeenPurges(max_entries=2, keep_s=10)
    assert seen.first("a", T0) and not seen.first("a", T0 + 1)
    assert seen.first("b", T0) and seen.first("c", T0)  # bounded: 'a' forgotten
    assert seen.first("a", T0 + 2)
    assert seen.first("b", T0 + 20)  # kept keep_s only


def test_operator_keys_must_be_private(tmp_path: Path) -> None:
    f = tmp_path / "ops.txt"
    f.write_text("alice:0123456789abcdef0123\n")
    f.chmod(0o644)
    with pytest.raises(ConfigError) as info:
        load_operator_keys(str(f))
    assert info.value.key == "origin.decisions.operator_keys_file"
    f.chmod(0o640)
    assert load_operator_keys(str(f)) == {"alice": b"0123456789abcdef0123"}
    f.write_text("alice:short\n")
    os.chmod(f, 0o600)
    with pytest.raises(ConfigError):
        load_operator_keys(str(f))


def _request(authorization: bytes | None) -> Request:
    headers = [(b"host", b"decisions.internal")]
    if authorization is not None:
        headers.append((b"authorization", authorization))
    return Request(
        b"POST",
        b"/v1/operator/purge",
        b"decisions.internal",
        b"https",
        headers,
        "1.1",
        ("127.0.0.1", 1),
        ("127.0.0.1", 2),
        "id",
    )


def test_only_an_operator_key_authenticates(tmp_path: Path) -> None:
    log = JsonLog.open(str(tmp_path / "log"), process="test")
    keys = {"alice": b"operator-secret-0123"}
    api = OperatorApi(keys, {"edge1": b"edge-read-key-0123"}, None, log)  # type: ignore[arg-type]
    assert api.authenticate(_request(b"Bearer operator-secret-0123")) == ("alice", "")
    assert api.authenticate(_request(b"bearer  operator-secret-0123")) == ("alice", "")
    assert api.authenticate(_request(None)) == (None, "missing")
    assert api.authenticate(_request(b"Basic b3A6eA==")) == (None, "malformed")
    assert api.authenticate(_request(b"Bearer edge-read-key-0123")) == (None, "edge_key")
    assert api.authenticate(_request(b"Bearer operator-secret-0124")) == (None, "wrong_key")


def test_a_signed_ban_or_lift_names_the_operator_who_made_it() -> None:
    signer = DecisionSigner(KEY)
    verifier = DecisionVerifier([KEY.public_key()])
    ban = signer.sign("ip", "192.0.2.1", T0 + 60, T0, "manual", operator="alice")
    lift = signer.sign_lift("ip", "192.0.2.1", T0 + 60, T0 + 1, "lifted", "bob")
    assert verifier.open(ban, T0).operator == "alice"
    assert verifier.open(lift, T0).operator == "bob"
    assert verifier.open(signer.sign("ip", "192.0.2.1", T0 + 60, T0, "waf"), T0).operator == ""


def test_prefixes_match_by_segment_whatever_their_number() -> None:
    m = p.PurgeMatcher.of(purge(prefixes=[f"example.com/p{i}" for i in range(100)]))
    assert m.matches(b"example.com", b"/p42", frozenset())
    assert m.matches(b"example.com", b"/p42/", frozenset())
    assert m.matches(b"example.com", b"/p42/a/b?x=1", frozenset())
    assert m.matches(b"Example.com:8443", b"/p42;jsessionid=1/a", frozenset())  # as rules
    assert not m.matches(b"example.com", b"/p420", frozenset())
    assert not m.matches(b"example.com", b"/x/p42", frozenset())
    assert not m.matches(b"other.com", b"/p42", frozenset())
    everything = p.PurgeMatcher.of(purge(prefixes=["example.com/"]))
    assert everything.matches(b"example.com", b"/any/thing", frozenset())


def test_a_purge_can_go_a_slice_of_keys_at_a_time() -> None:
    cache = filled()
    keys_ = cache.stored_keys()
    matcher = p.PurgeMatcher.of(purge(prefixes=["example.com/"]))
    removed = sum(cache.purge(matcher.matches, keys_[i : i + 2]) for i in range(0, 7, 2))
    assert removed == 6 and keys(cache) == {(b"other.com", b"/static/x.js")}
    assert cache.purge(matcher.matches, keys_) == 0  # keys gone meanwhile are skipped


def test_a_delete_names_one_decision() -> None:
    from blindfold.decisions.operator import _delete_target

    assert _delete_target("scope=ip&value=192.0.2.7", []) == ("ip", "192.0.2.7")
    assert _delete_target("scope=range&value=192.0.2.0/24", []) == ("range", "192.0.2.0/24")
    for bad in ("a=1&b=2&c=3&d=4&e=5", "id=x", "id=7", "scope=ip&value=999.1.1.1", ""):
        with pytest.raises(ProtocolError):
            _delete_target(bad, [])


def test_an_answer_of_the_log_is_serialised_once() -> None:
    """Attack review D: three connections polling at the oldest position made the origin
    re-serialise up to 50 purges (megabytes) per request on its loop. Now once per content."""
    import json

    from blindfold.decisions.api import DecisionApi
    from blindfold.decisions.core import DecisionStore

    api = DecisionApi(DecisionStore(), {})
    api.purges = p.PurgeLog()
    _, position, _ = api.purges.since(None)
    for i in range(3):
        api.purges.add(purge(urls=[f"example.com/{i}{'x' * 1000}"]))
    answers = {api.purge_answer(position) for _ in range(20)}
    answers |= {api.purge_answer("another-epoch.0") for _ in range(20)}  # the same content
    assert len(answers) == 1 and api.purge_builds == 1
    assert len(json.loads(answers.pop())["purges"]) == 3
    api.purges.add(purge(tags=["new"]))  # the log moved: a new answer, with it
    assert len(json.loads(api.purge_answer(position))["purges"]) == 4
    assert api.purge_builds == 2
    for i in range(200):  # the kept answers are bounded
        api.purge_answer(f"{api.purges.epoch}.{i % 5}")
    assert len(api._purge_answers) <= 64


# ---------------------------------------------------------------- the Redis purge log
def signed_at(issued: float, n: int) -> str:
    made = p.parse_purge(
        {"urls": [f"example.com/{n}"]}, id_=f"{n:016x}", issued=issued, operator="alice"
    )
    return p.sign_purge(KEY, made)


def catch_up(
    log: list[object], heard: float, now: float, had_log: bool = True, known: tuple[str, ...] = ()
) -> p.LogCatchUp:
    """LogCatchUp driven as RedisFeed drives it, LRANGE done on a list in memory (Redis's
    clamping of out-of-range indices included)."""
    reader = p.LogCatchUp(KEYS, heard, now, had_log, len(log), frozenset(known))
    pages = 0
    while (indices := reader.page()) is not None:
        start, stop = (i + len(log) for i in indices)
        reader.feed(log[max(start, 0) : stop + 1] if stop >= 0 else [])
        pages += 1
        assert pages <= p.MAX_LOG_READ, "read without bound"
    return reader


def test_the_purge_log_gives_an_edge_what_it_missed_during_a_gap() -> None:
    # purges every 10 s from T0; the edge heard Redis last at T0+100, is back at T0+120
    log: list[object] = [signed_at(T0 + 10 * i, i) for i in range(15)]
    reader = catch_up(log, heard=T0 + 100, now=T0 + 120)
    assert reader.lost == ""
    # those after the gap's start (heard - GAP_MARGIN_S = T0+85), oldest first; the one at
    # T0+80 is the anchor (not applied); none before it was read
    assert [x.id for x in reader.purges] == [f"{i:016x}" for i in range(9, 15)]
    assert reader.read == 7  # newest first, stopped at the anchor: not the whole log
    assert reader.dropped == {}


def test_a_log_that_cannot_show_the_gap_empties_the_caches() -> None:
    log: list[object] = [signed_at(T0 + 10 * i, i) for i in range(15)]
    # trimmed past the gap (its oldest entry is newer than the gap's start)
    assert catch_up(log[12:], heard=T0 + 100, now=T0 + 145).lost == "log_trimmed"
    # ... unless this edge never saw a log: it began within the gap, all of it applies
    fresh = catch_up(log[12:], heard=T0 + 100, now=T0 + 145, had_log=False)
    assert fresh.lost == "" and len(fresh.purges) == 3
    # gone (Redis lost its data) after this edge had seen it
    assert catch_up([], heard=T0 + 100, now=T0 + 120).lost == "log_lost"
    assert catch_up([], heard=T0 + 100, now=T0 + 120, had_log=False).lost == ""
    # a gap longer than signatures live: not read at all
    long_gap = catch_up(log, heard=T0 + 100, now=T0 + 100 + p.MAX_GAP_S + 1)
    assert long_gap.lost == "gap_too_long" and long_gap.read == 0


def test_a_hostile_log_is_never_applied_nor_read_without_bound() -> None:
    good = signed_at(T0 + 110, 1)
    magic, signer, _payload, sig = good.split(".")
    other = p.parse_purge(
        {"urls": ["example.com/everything"]}, id_="f" * 16, issued=T0 + 111, operator=""
    )
    forged = f"{magic}.{signer}.{p._b64(json.dumps(other.to_json()).encode())}.{sig}"
    old_forged = p.sign_purge(Ed25519PrivateKey.generate(), purge(urls=["example.com/x"]))
    future = signed_at(T0 + 120 + p.MAX_SIGNED_AGE_S + 5, 2)
    log: list[object] = [
        signed_at(T0, 0),  # the anchor
        good,
        forged,
        "bfp1.unsigned",
        old_forged,  # signed by nobody known: never an anchor
        b"x" * (p.MAX_PURGE_BYTES + 1),
        future,
        7,
    ]
    reader = catch_up(log, heard=T0 + 100, now=T0 + 120)
    assert [x.id for x in reader.purges] == [f"{1:016x}"]
    assert reader.lost == ""
    assert reader.dropped == {
        "bad_signature": 1,
        "unsigned": 3,
        "unknown_signer": 1,
        "expired": 1,
    }
    # a log longer than the origin keeps, with no anchor: read up to the bound, then lost
    junk: list[object] = ["bfp1.junk"] * (p.MAX_LOG_READ * 3)
    reader = catch_up(junk, heard=T0 + 100, now=T0 + 120)
    assert reader.lost == "log_too_long" and reader.read == p.MAX_LOG_READ + 1
    # ... and in bytes: a few huge entries
    huge: list[object] = [b"y" * (8 << 20)] * 10
    reader = catch_up(huge, heard=T0 + 100, now=T0 + 120)
    assert reader.lost == "log_too_long" and reader.read <= 5


def test_a_purge_the_edge_already_had_shows_the_log_covers_the_gap() -> None:
    # the log began 5 s before the channel dropped: its first entry is within the gap's margin
    log: list[object] = [signed_at(T0 + 95, 0), signed_at(T0 + 105, 1)]
    assert catch_up(log, heard=T0 + 100, now=T0 + 110).lost == "log_trimmed"
    # ... but this edge had received that first purge on the channel: nothing before it was
    # trimmed that this edge missed, and the one after it is applied
    reader = catch_up(log, heard=T0 + 100, now=T0 + 110, known=(f"{0:016x}",))
    assert reader.lost == "" and [x.id for x in reader.purges] == [f"{1:016x}"]
