"""The origin's trusted edges (origin/edges.py), sans-IO: who a PROXY header's reporter is,
the authentication an edge with a key owes for each connection, and each edge's budget of
decisions (atk-trust #4, #10)."""

from __future__ import annotations

from pathlib import Path

import pytest

from blindfold.config import loads
from blindfold.core.proxyproto import ProxyHeader, authenticate_v2, encode_v2, parse_proxy_header
from blindfold.errors import ProtocolError
from blindfold.origin.edges import DecisionBudget, Reporter, TrustedEdges

NOW = 1_750_000_000.0
KEYS = {"edge1": bytes(range(32)), "edge2": bytes(range(1, 33))}
ORIGIN = (("198.51.100.5", 9443),)


@pytest.fixture
def edges(tmp_path: Path) -> TrustedEdges:
    text = """
[origin]
upstream = "http://127.0.0.1:8080"
listen = []
trusted_edges = ["192.0.2.0/28"]
"""
    for name, addresses in (("edge1", "192.0.2.10/32"), ("edge2", "192.0.2.10/32")):
        keyfile = tmp_path / f"{name}.key"
        keyfile.write_text(KEYS[name].hex())
        text += (
            f"\n[[origin.edges]]\nname = '{name}'\naddresses = ['{addresses}']\n"
            f"proxy_auth_key_file = '{keyfile}'\n"
        )
    text += "\n[[origin.edges]]\nname = 'plain'\naddresses = ['203.0.113.0/24']\n"
    cfg = loads(text).origin
    assert cfg is not None
    return TrustedEdges(cfg)


def header(name: str, peer: tuple[str, int], now: float = NOW) -> ProxyHeader:
    raw = authenticate_v2(
        encode_v2(("203.0.113.200", 1), ("198.51.100.5", 443)),
        name,
        KEYS[name],
        (peer, ORIGIN[0]),
        now,
    )
    parsed = parse_proxy_header(raw)
    assert parsed is not None
    return parsed[0]


def test_reporters(edges: TrustedEdges) -> None:
    plain = parse_proxy_header(encode_v2(("203.0.113.200", 1), ("198.51.100.5", 443)))
    assert plain is not None
    assert edges.admit(plain[0], ("192.0.2.3", 1), ORIGIN[0], NOW) == Reporter("", "192.0.2.3")
    assert edges.admit(plain[0], ("203.0.113.9", 1), ORIGIN[0], NOW) == Reporter(
        "plain", "203.0.113.9"
    )
    assert edges.is_trusted("203.0.113.9") and not edges.is_trusted("198.51.100.1")
    assert edges.must_authenticate("192.0.2.10") and not edges.must_authenticate("192.0.2.3")
    assert edges.must_authenticate("::ffff:192.0.2.10")  # a dual-stack listener's view
    with pytest.raises(ProtocolError) as info:  # a keyed edge's address without the TLV
        edges.admit(plain[0], ("192.0.2.10", 1), ORIGIN[0], NOW)
    assert info.value.reason == "proxy_auth_missing"


def test_two_keyed_edges_behind_one_address(edges: TrustedEdges) -> None:
    peer = ("192.0.2.10", 40000)
    for name in ("edge1", "edge2"):
        got = edges.admit(header(name, peer), peer, ORIGIN[0], NOW)
        assert got == Reporter(name, "192.0.2.10")
    with pytest.raises(ProtocolError) as info:  # the same header again: a replay
        edges.admit(header("edge1", peer), peer, ORIGIN[0], NOW)
    assert info.value.reason == "proxy_auth_replayed"
    later = header("edge1", peer, NOW + 1)
    assert edges.admit(later, peer, ORIGIN[0], NOW + 1).name == "edge1"


def test_a_keyed_header_from_elsewhere_is_refused(edges: TrustedEdges) -> None:
    """edge1's key vouches only from edge1's addresses, and only for its connection."""
    other = ("192.0.2.3", 40000)  # trusted, but not edge1's
    got = edges.admit(header("edge1", other), other, ORIGIN[0], NOW)
    assert got == Reporter("", "192.0.2.3")  # not keyed: believed, named by address only
    peer = ("192.0.2.10", 40000)
    with pytest.raises(ProtocolError) as info:
        edges.admit(header("edge1", ("192.0.2.10", 40001)), peer, ORIGIN[0], NOW)
    assert info.value.reason == "proxy_auth_bad"


def test_each_edge_has_its_own_budget() -> None:
    budget = DecisionBudget(3, 60.0)
    a, b, c = (
        Reporter("edge1", "192.0.2.10"),
        Reporter("edge1", "192.0.2.11"),
        Reporter("", "192.0.2.3"),
    )
    assert [budget.allow(a, 0.0) for _ in range(3)] == [True] * 3
    assert not budget.allow(b, 0.0)  # the same edge from another address: one budget
    assert budget.allow(c, 0.0)  # another edge
    assert not budget.allow(a, 19.0)
    assert budget.allow(a, 21.0)  # refilled at 3 per 60 s
