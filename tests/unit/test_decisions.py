"""Decisions: Go durations, the store's stream semantics (CrowdSec bouncer API), the rules that
create bans, stream parsing, and the edge's ban set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blindfold.decisions.core import (
    DecisionRules,
    DecisionStore,
    RateRule,
    ban_target,
    format_duration,
    normalise,
    parse_duration,
    parse_net,
    parse_stream,
    scope_of,
)
from blindfold.errors import ProtocolError


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("4h", 14400.0),
        ("3h59m59.99s", 14399.99),
        ("1m30s", 90.0),
        ("45s", 45.0),
        ("500ms", 0.5),
        ("-1.5s", -1.5),
        ("2h0m0s", 7200.0),
        ("1.5h", 5400.0),
    ],
)
def test_go_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@given(st.floats(-1e6, 1e7, allow_nan=False))
def test_duration_round_trip(seconds: float) -> None:
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds, abs=1e-3)


@pytest.mark.parametrize("bad", ["", "4", "h", "4x", "1h-2m", "abc", "1.2.3s"])
def test_bad_durations(bad: str) -> None:
    with pytest.raises(ProtocolError):
        parse_duration(bad)


def test_scopes() -> None:
    assert normalise("Ip", "::ffff:192.0.2.1") == ("ip", "192.0.2.1")
    assert normalise("range", "10.1.2.3/8") == ("range", "10.0.0.0/8")
    with pytest.raises(ProtocolError) as info:
        normalise("Country", "FR")
    assert info.value.reason == "unsupported_scope"
    with pytest.raises(ProtocolError):
        normalise("ip", "not-an-ip")


def test_stream_startup_then_deltas() -> None:
    store = DecisionStore()
    store.add("ip", "192.0.2.1", 60, "waf", now=1000.0)
    first = store.stream("edge1", True, 1000.0)
    assert [d["value"] for d in first["new"]] == ["192.0.2.1"]
    assert first["new"][0]["scope"] == "Ip" and first["new"][0]["type"] == "ban"
    assert first["new"][0]["duration"] == "1m0s"
    assert store.stream("edge1", False, 1001.0)["new"] is None
    store.add("range", "198.51.100.0/24", 5, "rate", now=1002.0)
    delta = store.stream("edge1", False, 1002.0)
    assert [d["value"] for d in delta["new"]] == ["198.51.100.0/24"]
    # another bouncer has its own cursor
    assert len(store.stream("edge2", True, 1002.0)["new"]) == 2
    # expiry shows up as a deletion, once
    gone = store.stream("edge1", False, 1008.0)
    assert [d["value"] for d in gone["deleted"]] == ["198.51.100.0/24"]
    assert store.stream("edge1", False, 1009.0)["deleted"] is None
    store.remove("ip", "192.0.2.1")
    assert [d["value"] for d in store.stream("edge1", False, 1010.0)["deleted"]] == ["192.0.2.1"]


def test_add_extends_never_shortens() -> None:
    store = DecisionStore()
    a = store.add("ip", "192.0.2.1", 100, "x", now=0.0)
    b = store.add("ip", "192.0.2.1", 10, "y", now=1.0)
    assert b is a and a.until == 100.0
    c = store.add("ip", "192.0.2.1", 500, "z", now=1.0)
    assert c.until == 501.0 and c.id != a.id


def test_block_threshold_and_window() -> None:
    rules = DecisionRules(ban_after_blocks=3, block_window_s=10, ban_duration_s=60)
    assert rules.on_block("1.2.3.4", 0.0) is None
    assert rules.on_block("1.2.3.4", 5.0) is None
    assert rules.on_block("1.2.3.4", 20.0) is None  # the first two fell out of the window
    assert rules.on_block("1.2.3.4", 21.0) is None
    ban = rules.on_block("1.2.3.4", 22.0)
    assert ban is not None and ban[0] == "1.2.3.4" and ban[1] == 60
    one = DecisionRules(ban_after_blocks=1, block_window_s=10, ban_duration_s=5)
    assert one.on_block("5.6.7.8", 0.0) is not None


def test_rate_rule_per_path_and_address() -> None:
    rules = DecisionRules(
        ban_after_blocks=5,
        block_window_s=10,
        ban_duration_s=60,
        rate_rules=(RateRule("/login", 1.0, 3, 120, "login"),),
    )
    hits = [rules.on_request("1.2.3.4", b"/login", 0.0) for _ in range(4)]
    assert hits[:3] == [None, None, None] and hits[3] == ("1.2.3.4", 120, "rate: login")
    assert rules.on_request("1.2.3.5", b"/login", 0.0) is None  # per address
    assert all(rules.on_request("1.2.3.4", b"/other", 0.0) is None for _ in range(10))


def test_parse_crowdsec_stream() -> None:
    payload = {
        "new": [
            {
                "duration": "3h59m59.9s",
                "id": 1,
                "origin": "cscli",
                "scenario": "manual",
                "scope": "Ip",
                "type": "ban",
                "value": "127.0.0.7",
            },
            {"duration": "1h", "scope": "Range", "type": "ban", "value": "10.0.0.0/8"},
            {"duration": "1h", "scope": "Country", "type": "ban", "value": "FR"},
            {"duration": "1h", "scope": "Ip", "type": "captcha", "value": "1.1.1.1"},
            "garbage",
        ],
        "deleted": [{"scope": "Ip", "value": "127.0.0.8", "type": "ban"}],
    }
    new, deleted, problems = parse_stream(payload)
    assert [(s, v) for s, v, _d, _r in new] == [("ip", "127.0.0.7"), ("range", "10.0.0.0/8")]
    assert new[0][2] == pytest.approx(14399.9)
    assert deleted == [("ip", "127.0.0.8")]
    assert len(problems) == 3
    assert parse_stream({"new": None, "deleted": None}) == ([], [], [])
    with pytest.raises(ProtocolError):
        parse_stream([])


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=10),
        lambda inner: (
            st.lists(inner, max_size=4)
            | st.dictionaries(
                st.sampled_from(["new", "deleted", "scope", "value", "duration", "type"]),
                inner,
                max_size=4,
            )
        ),
        max_leaves=15,
    )
)
def test_any_payload_parses_or_raises(payload: object) -> None:
    try:
        parse_stream(payload)
    except ProtocolError:
        pass


@given(st.integers(0, (1 << 32) - 1), st.integers(0, 32))
def test_parse_net_agrees_with_ipaddress_v4(addr: int, plen: int) -> None:
    import ipaddress

    text = f"{ipaddress.IPv4Address(addr)}/{plen}"
    net = ipaddress.ip_network(text, strict=False)
    assert parse_net("range", text) == (4, int(net.network_address), plen)
    assert normalise("Range", text) == ("range", str(net))


@given(st.integers(0, (1 << 128) - 1), st.integers(0, 128))
def test_parse_net_agrees_with_ipaddress_v6(addr: int, plen: int) -> None:
    import ipaddress

    text = f"{ipaddress.IPv6Address(addr)}/{plen}"
    net = ipaddress.ip_network(text, strict=False)
    version, value, length = parse_net("range", text)
    if addr >> 32 == 0xFFFF and plen >= 96:  # IPv4-mapped: enforced as IPv4
        assert (version, length) == (4, plen - 96)
        assert value == int(net.network_address) & 0xFFFFFFFF
    else:
        assert (version, value, length) == (6, int(net.network_address), plen)
        assert normalise("range", text) == ("range", str(net))


@pytest.mark.parametrize(
    "value",
    [
        "",
        "1.2.3",
        "01.2.3.4",
        "1.2.3.4/33",
        "1.2.3.4/-1",
        "1.2.3.4/ 8",
        "1.2.3.4/8/8",
        "::/129",
        "1.2.3.4 ",
        "x" * 70,
        "1.2.3.4/٣",
    ],
)
def test_parse_net_refuses(value: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_net("range", value)
    assert info.value.reason == "bad_decision"
    with pytest.raises(ProtocolError):
        parse_net("ip", "10.0.0.0/8")  # an address has no prefix


def test_bans_cover_the_ipv6_prefix_the_limits_use() -> None:
    assert ban_target("192.0.2.7", 64) == "192.0.2.7"
    assert ban_target("2001:db8:1:2:3:4:5:6", 64) == "2001:db8:1:2::/64"
    assert ban_target("2001:db8:1:2:3:4:5:6", 48) == "2001:db8:1::/48"
    assert ban_target("2001:db8::1", 128) == "2001:db8::1"
    assert ban_target("::ffff:192.0.2.7", 64) == "192.0.2.7"


def test_waf_blocks_count_and_ban_per_ipv6_prefix() -> None:
    """An attacker rotating through its /64 was counted per address and never banned."""
    rules = DecisionRules(
        ban_after_blocks=3, block_window_s=60, ban_duration_s=600, ipv6_prefix_len=64
    )
    assert rules.on_block("2001:db8:1:2::a", 0.0) is None
    assert rules.on_block("2001:db8:1:2::b", 1.0) is None
    ban = rules.on_block("2001:db8:1:2:ffff::c", 2.0)
    assert ban is not None and ban[0] == "2001:db8:1:2::/64"
    assert rules.on_block("2001:db8:1:3::a", 3.0) is None  # another /64 is another client
    rate = DecisionRules(
        ban_after_blocks=5,
        block_window_s=10,
        ban_duration_s=60,
        rate_rules=(RateRule("/login", 1.0, 2, 120, "login"),),
        ipv6_prefix_len=56,
    )
    hits = [rate.on_request(f"2001:db8:0:{n}::1", b"/login", 0.0) for n in range(3)]
    assert hits[:2] == [None, None] and hits[2] == ("2001:db8::/56", 120, "rate: login")
    store = DecisionStore()
    d = store.add(scope_of("2001:db8::/56"), "2001:db8::/56", 120, "rate", 0.0)
    assert (d.scope, d.value) == ("range", "2001:db8::/56")


def test_followers_sharing_a_key_keep_their_own_position() -> None:
    store = DecisionStore()
    a = store.stream("edge", True, 0.0)["blindfold"]["position"]
    b = store.stream("edge", True, 0.0)["blindfold"]["position"]
    store.add("ip", "192.0.2.1", 60, "waf", 1.0)
    first = store.stream("edge", False, 2.0, position=a)
    assert [d["value"] for d in first["new"]] == ["192.0.2.1"]
    assert first["blindfold"]["full"] is False
    # the other follower with the same key still gets it
    second = store.stream("edge", False, 2.0, position=b)
    assert [d["value"] for d in second["new"]] == ["192.0.2.1"]
    again = store.stream("edge", False, 2.0, position=first["blindfold"]["position"])
    assert again["new"] is None
    # without a token (CrowdSec bouncers): one position per (key, User-Agent)
    store.stream("edge", True, 2.0, instance="bouncer-a")
    store.stream("edge", True, 2.0, instance="bouncer-b")
    store.add("ip", "192.0.2.2", 60, "waf", 3.0)
    assert store.stream("edge", False, 4.0, instance="bouncer-a")["new"] is not None
    assert store.stream("edge", False, 4.0, instance="bouncer-b")["new"] is not None


@pytest.mark.parametrize("token", ["", "x", "zz.1.0", "1.2", "a.b.c", "%s.999.0", "%s.0.999"])
def test_a_position_we_cannot_continue_from_answers_the_whole_set(token: str) -> None:
    store = DecisionStore()
    store.add("ip", "192.0.2.1", 60, "waf", 0.0)
    answer = store.stream("edge", False, 1.0, position=token.replace("%s", store.epoch))
    assert answer["blindfold"]["full"] is True
    assert [d["value"] for d in answer["new"]] == ["192.0.2.1"]


def test_an_extended_decision_is_new_again_and_expiry_is_by_heap() -> None:
    store = DecisionStore()
    store.add("ip", "192.0.2.1", 10, "a", 0.0)
    store.add("ip", "192.0.2.2", 100, "b", 0.0)
    token = store.stream("e", True, 0.0)["blindfold"]["position"]
    store.add("ip", "192.0.2.1", 500, "c", 1.0)  # extended: a new id, moved to the end
    delta = store.stream("e", False, 2.0, position=token)
    assert [d["value"] for d in delta["new"]] == ["192.0.2.1"]
    assert [d.value for d in store.expire(200.0)] == ["192.0.2.2"]
    assert [d.value for d in store.active(200.0)] == ["192.0.2.1"]


def test_the_demo_writes_api_keys_only_their_owner_can_read(tmp_path: Path) -> None:
    from blindfold.demo.run import _edge_config, _origin_config

    (tmp_path / "edge.key").write_text("an older file, readable by all\n")
    (tmp_path / "edge.key").chmod(0o644)
    _origin_config(tmp_path, 1, 2)
    _edge_config("127.0.0.1:1", "127.0.0.1:2", 3, 4, tmp_path, 5, 6)
    for name in ("edge-keys.txt", "edge.key", "quic-edge.key"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o600, name
    assert (tmp_path / "edge.key").read_text().startswith("demo-edge-key")


@settings(max_examples=50)
@given(
    st.lists(
        st.tuples(st.ip_addresses(v=4).map(str), st.integers(1, 10_000), st.text(max_size=20)),
        max_size=60,
    ),
    st.sampled_from([1, 7, 1000]),
    st.booleans(),
)
def test_the_whole_set_encoded_in_chunks_is_the_stream_answer(
    bans: list[tuple[str, int, str]], chunk: int, named: bool
) -> None:
    """atk-trust #9: the whole set is encoded chunk by chunk (off the event loop); it must
    be exactly the answer `stream` gives, edge fields included."""
    store = DecisionStore()
    for value, duration, reason in bans:
        store.add(
            "ip",
            value,
            duration,
            reason,
            1000.0,
            edge="e1" if named else "",
            edge_address="192.0.2.9",
        )
    snapshot = store.snapshot(1001.0)
    expected = store.stream("x", True, 1001.0)
    assert json.loads(snapshot.encode(1001.0)) == expected
    assert json.loads(snapshot.encode_list(1001.0, chunk)) == expected["new"]
    if expected["new"]:
        assert expected["new"][0]["edge"] == ("e1" if named else None)
        assert expected["new"][0]["edge_address"] == "192.0.2.9"


def test_a_snapshot_position_continues_with_what_changed_since() -> None:
    """A cached whole set is up to 5 s old: its position token brings the rest."""
    store = DecisionStore()
    store.add("ip", "192.0.2.1", 60, "a", now=1000.0)
    snapshot = store.snapshot(1000.0)
    store.add("ip", "192.0.2.2", 60, "b", now=1002.0)
    store.add("ip", "192.0.2.3", 1, "c", now=1002.0)
    later = store.stream("edge", False, 1004.0, position=snapshot.position)
    assert [d["value"] for d in later["new"]] == ["192.0.2.2"]
    assert [d["value"] for d in later["deleted"]] == ["192.0.2.3"]
    assert later["blindfold"]["full"] is False


def test_retry_after_of_a_throttled_source_is_read_and_bounded() -> None:
    """RFC 9110 §10.2.3: delay-seconds or an HTTP-date; a source cannot park the feed."""
    from email.utils import formatdate

    from blindfold.decisions.feed import (
        THROTTLED_DEFAULT_S,
        THROTTLED_MAX_S,
        THROTTLED_MIN_S,
        retry_after_s,
    )

    now = 1_800_000_000.0
    assert retry_after_s(b"7", now) == 7.0
    assert retry_after_s(b"99999999999999999999", now) == THROTTLED_MAX_S
    assert retry_after_s(b"0", now) == THROTTLED_MIN_S
    assert retry_after_s(formatdate(now + 30, usegmt=True).encode(), now) == 30.0
    assert retry_after_s(formatdate(now - 30, usegmt=True).encode(), now) == THROTTLED_MIN_S
    for bad in (None, b"", b"soon", b"-5", b"1.5"):
        assert retry_after_s(bad, now) == THROTTLED_DEFAULT_S
