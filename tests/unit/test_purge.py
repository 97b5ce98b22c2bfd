"""Purges, sans-IO (decisions.purge): what an operator may ask, how an edge's cache matches
it, the origin's purge log, the signed Redis format and its refusals; the operator API's key
checks (decisions.operator)."""

from __future__ import annotations

import json
import os
from dataclasses import replace
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


# ---------------------------------------------------------------- numbered purges on Redis
SIGNER = key_id(KEY.public_key())
EPOCH, EPOCH2 = "a" * 16, "b" * 16


def numbered(seq: int, epoch: str = EPOCH, issued: float = T0, key: Ed25519PrivateKey = KEY) -> str:
    made = p.parse_purge(
        {"urls": [f"example.com/{seq}"]}, id_=f"{seq:016x}", issued=issued, operator="alice"
    )

    return p.sign_purge(key, replace(made, epoch=epoch, seq=seq))


def head(seq: int, epoch: str = EPOCH, issued: float = T0, final: bool = False) -> p.Head:
    return p.open_head(p.sign_head(KEY, epoch, seq, issued, final), KEYS, issued)


def live(seqs: p.PurgeSequence, seq: int, epoch: str = EPOCH, now: float = T0) -> p.Need:
    signer, made = p.open_signed_purge(numbered(seq, epoch), KEYS, T0)
    assert (signer, made.epoch, made.seq) == (SIGNER, epoch, seq)
    return seqs.on_purge(signer, made, now)


def fetch(*numbers: int, epoch: str = EPOCH) -> p.Need:
    return p.Need([(SIGNER, epoch, n) for n in numbers])


def walk(*numbers: int, since: float, epoch: str = EPOCH, cut: bool = False) -> p.Need:
    return p.Need(fetch(*numbers, epoch=epoch).fetch, since=since, cut=cut)


def test_numbered_purges_and_heads_are_signed_and_refused_when_not_the_origins() -> None:
    h = head(7, final=True)
    assert (h.signer, h.epoch, h.seq, h.final) == (SIGNER, EPOCH, 7, True)
    text = p.sign_head(KEY, EPOCH, 7, T0)
    assert p.is_signed_head(text) and not p.is_signed_purge(text)
    with pytest.raises(ProtocolError) as err:  # stale: a replayed HEAD
        p.open_head(text, KEYS, T0 + p.MAX_HEAD_AGE_S + 1)
    assert err.value.reason == "expired"
    magic, signer, _payload, sig = text.split(".")
    other = p._b64(json.dumps({"epoch": EPOCH, "seq": 9, "issued": T0, "final": False}).encode())
    with pytest.raises(ProtocolError) as err:  # renumbered: the number is signed
        p.open_head(f"{magic}.{signer}.{other}.{sig}", KEYS, T0)
    assert err.value.reason == "bad_signature"
    with pytest.raises(ProtocolError) as err:  # a purge's signature is not a HEAD's
        p.open_head(f"{magic}.{numbered(1).split('.', 1)[1]}", KEYS, T0)
    assert err.value.reason == "bad_signature"
    with pytest.raises(ProtocolError) as err:
        p.open_head(p.sign_head(Ed25519PrivateKey.generate(), EPOCH, 1, T0), KEYS, T0)
    assert err.value.reason == "unknown_signer"
    # the number is inside the signed purge, and goes to the workers with it
    made = p.open_purge(numbered(3), KEYS, T0)
    assert (made.epoch, made.seq) == (EPOCH, 3)
    assert p.purge_from_json(made.to_json()) == made


def test_an_edge_follows_each_origins_numbers_and_reads_what_it_missed() -> None:
    seqs = p.PurgeSequence()
    seqs.subscribed(T0, first=True)
    # the first heard, just started: walked back to what was issued before this edge started
    assert live(seqs, 5) == walk(4, 3, 2, 1, since=T0 - p.WALK_SKEW_S)
    assert live(seqs, 6) == p.Need()
    assert live(seqs, 6) == p.Need(dropped="seen")  # a replay
    assert seqs.on_head(head(6), T0) == p.Need()
    # a number skipped (a message lost, or the origin's write failed): read from its key
    assert live(seqs, 9) == fetch(7, 8)
    assert seqs.on_head(head(11), T0) == fetch(10, 11)
    assert seqs.on_head(head(4), T0) == p.Need()  # stale
    assert seqs.last == {(SIGNER, EPOCH): 11}
    big = p.PurgeSequence(max_fetch=10)
    big.subscribed(T0, first=True)
    big.on_head(head(1), T0)
    assert big.on_head(head(12), T0).lost == "gap_too_big"


def test_the_keys_read_must_be_those_purges() -> None:
    seqs = p.PurgeSequence()
    wanted = [(SIGNER, EPOCH, 7), (SIGNER, EPOCH, 8)]
    purges, lost = seqs.check(wanted, [numbered(7).encode(), numbered(8)], KEYS, T0 + 100)
    assert lost == "" and [x.seq for x in purges] == [7, 8]  # old is fine: the number binds
    cases: list[tuple[list[object], str]] = [
        ([numbered(7), None], "missing"),  # withheld, expired, never written
        ([numbered(7), b""], "missing"),
        ([numbered(7), numbered(7)], "wrong_purge"),  # replayed under another number
        ([numbered(7), numbered(8, EPOCH2)], "wrong_purge"),
        ([numbered(7), numbered(8, key=Ed25519PrivateKey.generate())], "unknown_signer"),
        ([numbered(7), b"x" * (p.MAX_PURGE_BYTES + 1)], "unsigned"),  # huge: refused
        ([numbered(7), numbered(8, issued=T0 + 1000)], "expired"),  # from the future
        ([numbered(7), 7], "missing"),
    ]
    for values, reason in cases:
        assert seqs.check(wanted, values, KEYS, T0) == ([], reason), reason


def test_after_a_reconnection_every_origin_must_say_where_it_is() -> None:
    seqs = p.PurgeSequence()
    seqs.subscribed(T0, first=True)
    seqs.on_head(head(3), T0)
    seqs.subscribed(T0 + 60, first=False)
    assert seqs.pending == {(SIGNER, EPOCH)}
    # a HEAD from before the gap (replayed) proves nothing
    seqs.on_head(head(3, issued=T0 + 60 - p.HEAD_SKEW_S - 1), T0 + 60)
    assert seqs.pending == {(SIGNER, EPOCH)}
    assert seqs.on_head(head(5, issued=T0 + 61), T0 + 61) == fetch(4, 5)
    assert seqs.pending == set() and seqs.overdue() == p.Need()
    # an origin that says nothing (Redis withholds it, it crashed): lost
    seqs.subscribed(T0 + 100, first=False)
    assert seqs.overdue().lost == "no_head"
    # an older origin that numbers nothing: every reconnection, however long ago it spoke
    old = p.PurgeSequence()
    old.subscribed(T0, first=True)
    old.on_purge(SIGNER, p.open_purge(signed_at(T0, 1), KEYS, T0), T0)
    old.prune(T0 + 10 * p.SILENT_S)
    old.subscribed(T0 + 10 * p.SILENT_S, first=False)
    assert old.pending == {(SIGNER, "")} and old.overdue().lost == "no_head"


def test_an_origin_life_this_edge_does_not_know_is_read_from_its_first_purge() -> None:
    seqs = p.PurgeSequence()
    seqs.subscribed(T0, first=True)
    seqs.on_head(head(4), T0)
    # later: a new life (the origin restarted, or a second origin with the same key): all of
    # it, both followed
    assert seqs.on_head(head(2, EPOCH2, issued=T0 + 60), T0 + 60) == fetch(1, 2, epoch=EPOCH2)
    assert live(seqs, 1, EPOCH2, now=T0 + 60) == p.Need()
    assert seqs.last == {(SIGNER, EPOCH): 4, (SIGNER, EPOCH2): 2}
    # a final HEAD at what this edge has: that life is over, not awaited after a gap
    seqs.on_head(head(4, final=True, issued=T0 + 61), T0 + 61)
    assert seqs.last == {(SIGNER, EPOCH2): 2}
    seqs.subscribed(T0 + 62, first=False)
    assert seqs.pending == {(SIGNER, EPOCH2)}
    seqs.on_head(head(2, EPOCH2, issued=T0 + 62), T0 + 62)
    # silent for SILENT_S while this edge follows the channel: over (it heard all of it); if
    # it speaks again it is read from 1 (its expired keys then empty the caches)
    seqs.prune(T0 + 62 + p.SILENT_S + 1)
    assert seqs.last == {}
    assert seqs.on_head(head(3, EPOCH2, issued=T0 + 200), T0 + 200) == fetch(1, 2, 3, epoch=EPOCH2)
    # just after emptying the caches: where each origin is (nothing cached to protect)
    seqs.emptied(T0 + 300)
    since = T0 + 300 - p.WALK_SKEW_S  # walked back to what the emptying covers
    assert seqs.on_head(head(9, EPOCH, issued=T0 + 301), T0 + 301) == walk(
        *range(9, 0, -1), since=since
    )
    assert seqs.on_head(head(2, EPOCH2, issued=T0 + 302), T0 + 302) == p.Need()  # covered
    assert seqs.last == {(SIGNER, EPOCH): 9, (SIGNER, EPOCH2): 2}
    # bounded
    few = p.PurgeSequence(max_lives=1)
    few.subscribed(T0, first=True)
    few.on_head(head(1), T0)
    assert few.on_head(head(1, EPOCH2), T0).lost == "too_many_lives"


def signed_at(issued: float, n: int) -> str:
    made = p.parse_purge(
        {"urls": [f"example.com/{n}"]}, id_=f"{n:016x}", issued=issued, operator="alice"
    )
    return p.sign_purge(KEY, made)


def test_a_purge_withheld_just_after_an_emptying_is_read_back() -> None:
    # finding 1 of atk-purge2: in the window after an emptying, a life's first word was taken
    # where it is, so a purge issued after the emptying and withheld on the channel was skipped
    seqs = p.PurgeSequence()
    seqs.subscribed(T0 - 100, first=True)
    seqs.on_head(head(3, issued=T0 - 99), T0 - 99)
    seqs.emptied(T0)  # lost something: caches emptied at T0, life covered up to 3
    need = seqs.on_head(head(5, issued=T0 + 1), T0 + 1)  # 4 and 5 made after, 4 withheld
    assert need == walk(5, 4, since=T0 - p.WALK_SKEW_S)
    purges, lost = seqs.check(
        need.fetch,
        [numbered(5, issued=T0 + 1), numbered(4, issued=T0 + 1)],
        KEYS,
        T0 + 1,
        need.since,
    )
    assert lost == "" and [x.seq for x in purges] == [5, 4]
    # a life this edge did not know: walked back until a purge issued before the emptying
    need = seqs.on_head(head(9, EPOCH2, issued=T0 + 2), T0 + 2)
    assert need == walk(*range(9, 0, -1), since=T0 - p.WALK_SKEW_S, epoch=EPOCH2)
    # 7 made after the emptying by an origin whose clock is 5 s behind the edge's: still read
    # (WALK_SKEW_S); 6 and before were issued well before the emptying: covered
    issued = {9: T0 + 1, 8: T0 + 1, 7: T0 - 5}
    values = [numbered(n, EPOCH2, issued=issued.get(n, T0 - 20)) for n in range(9, 0, -1)]
    purges, lost = seqs.check(need.fetch, values, KEYS, T0 + 2, need.since)
    assert lost == "" and [x.seq for x in purges] == [9, 8, 7]
    # a key missing on the way back is a loss, as any
    seqs.emptied(T0 + 10)
    need = seqs.on_head(head(5, EPOCH, issued=T0 + 11), T0 + 11)
    assert need == p.Need()  # the emptying covered 1..5
    need = seqs.on_head(head(12, EPOCH2, issued=T0 + 11), T0 + 11)
    assert need == walk(12, 11, 10, since=T0 + 10 - p.WALK_SKEW_S, epoch=EPOCH2)
    assert seqs.check(
        need.fetch, [numbered(12, EPOCH2, issued=T0 + 11), None, None], KEYS, T0 + 11, need.since
    ) == ([], "missing")
    # bounded: a walk longer than max_fetch is cut (ending it without an older purge: a loss)
    few = p.PurgeSequence(max_fetch=3)
    few.subscribed(T0, first=True)
    assert few.on_head(head(10), T0) == walk(10, 9, 8, since=T0 - p.WALK_SKEW_S, cut=True)
    # the first subscription: from this edge's start, not the subscription (it cached before)
    late = p.PurgeSequence(started=T0 - 50)
    late.subscribed(T0, first=True)
    assert late.on_head(head(2), T0) == walk(2, 1, since=T0 - 50 - p.WALK_SKEW_S)


def test_replays_of_an_ended_life_are_dropped_never_read_from_1() -> None:
    # finding 2 of atk-purge2: a replayed purge or HEAD of an ended life made the edge read
    # it from 1 (key 1 expired: the caches emptied), once per replay
    seqs = p.PurgeSequence()
    seqs.subscribed(T0 - 100, first=True)
    seqs.on_head(head(3, issued=T0), T0)
    seqs.on_head(head(3, final=True, issued=T0), T0)
    assert seqs.last == {} and seqs.ended[(SIGNER, EPOCH)] == (3, T0)
    # ids this edge never heard (a replayer's pick), and HEADs: dropped, no life, no read
    assert live(seqs, 3, now=T0 + 1) == p.Need(dropped="ended_life")
    assert live(seqs, 2, now=T0 + p.MAX_SIGNED_AGE_S) == p.Need(dropped="ended_life")
    for later in (1.0, 30.0, p.MAX_SIGNED_AGE_S):
        replay = head(3, final=True, issued=T0 + later)
        assert seqs.on_head(replay, T0 + later) == p.Need(dropped="ended_life")
    assert seqs.last == {}
    # silent for SILENT_S (over), then it speaks again past its number: from where it was
    seqs.on_head(head(2, EPOCH2, issued=T0), T0)
    seqs.prune(T0 + p.SILENT_S + 1)
    assert seqs.ended[(SIGNER, EPOCH2)] == (2, T0 + p.SILENT_S + 1)
    assert seqs.on_head(head(2, EPOCH2, issued=T0 + 35), T0 + 35) == p.Need(dropped="ended_life")
    assert seqs.on_head(head(4, EPOCH2, issued=T0 + 36), T0 + 36) == fetch(3, 4, epoch=EPOCH2)
    # forgotten ENDED_KEEP_S after, by then nothing of it can be replayed (MAX_SIGNED_AGE_S)
    seqs.prune(T0 + p.ENDED_KEEP_S + 1)  # (EPOCH2 silent again since T0 + 36: ended now)
    assert list(seqs.ended) == [(SIGNER, EPOCH2)]
    # bounded
    many = p.PurgeSequence()
    many.subscribed(T0 - 100, first=True)
    for i in range(p.MAX_ENDED + 5):
        many.on_head(head(0, f"{i:016x}", final=True, issued=T0), T0)
    assert len(many.ended) == p.MAX_ENDED and many.last == {}


def test_a_purge_already_heard_never_makes_a_life_or_a_read() -> None:
    seqs = p.PurgeSequence()
    seqs.subscribed(T0 - 100, first=True)
    seqs.on_head(head(2), T0)
    assert live(seqs, 3) == p.Need()
    seqs.emptied(T0 + 1)
    seqs.prune(T0 + 100)
    # replayed after the emptying and the window: once would have read the life from 1
    assert live(seqs, 3, now=T0 + 20) == p.Need(dropped="seen")
    assert seqs.last == {}
