"""Decisions: Go durations, the store's stream semantics (CrowdSec bouncer API), the rules that
create bans, stream parsing, and the edge's ban set."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blindfold.decisions.core import (
    DecisionRules,
    DecisionStore,
    RateRule,
    format_duration,
    normalise,
    parse_duration,
    parse_stream,
)
from blindfold.decisions.feed import BanSet
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
    assert store.stream("edge1", False, 1001.0) == {"new": None, "deleted": None}
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


def test_ban_set_sources_and_expiry() -> None:
    changes: list[list[str]] = []
    bans = BanSet(changes.append)
    bans.apply("stream", [("ip", "192.0.2.1", 10, "a")], [], now=0.0)
    bans.apply(
        "redis", [("ip", "192.0.2.1", 50, "b"), ("range", "10.0.0.0/8", 5, "c")], [], now=0.0
    )
    assert sorted(changes[-1]) == ["10.0.0.0/8", "192.0.2.1"]
    bans.apply("stream", [], [("ip", "192.0.2.1")], now=1.0)  # redis still bans it
    assert "192.0.2.1" in bans.networks()
    bans.expire(6.0)
    assert bans.networks() == ["192.0.2.1"]
    bans.apply("redis", [], [], now=7.0, replace=True)  # a full resync without it
    assert bans.networks() == []
    assert changes[-1] == []
