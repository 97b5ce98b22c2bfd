"""The PROXY v2 authentication TLV (core/proxyproto.py; atk-trust #10): what an edge appends
verifies at the origin for that connection only, and any change to the header, the
connection, the key or the time is refused with a reason. Property-tested."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blindfold.core.proxyproto import (
    PP2_TYPE_AUTHORITY,
    PP2_TYPE_BLINDFOLD_AUTH,
    ProxyHeader,
    ReplayCache,
    authenticate_v2,
    encode_v1,
    encode_v2,
    parse_auth_key,
    parse_proxy_header,
    read_auth,
    verify_auth,
)
from blindfold.errors import ProtocolError

KEY = bytes(range(32))
NOW = 1_750_000_000.0
EDGE_SIDE = (("192.0.2.10", 40001), ("198.51.100.5", 9443))  # the edge's getsockname, getpeername
ports = st.integers(0, 65535)
v4 = st.ip_addresses(v=4).map(str)
v6 = st.ip_addresses(v=6).map(str)
addr_pairs = st.one_of(st.tuples(v4, v4), st.tuples(v6, v6))
tlvs = st.lists(
    st.tuples(st.sampled_from([0x01, PP2_TYPE_AUTHORITY, 0x05, 0xE0]), st.binary(max_size=40)),
    max_size=3,
)


def header_of(raw: bytes) -> ProxyHeader:
    parsed = parse_proxy_header(raw)
    assert parsed is not None and parsed[1] == len(raw)
    return parsed[0]


def signed() -> bytes:
    base = encode_v2(("203.0.113.7", 51000), ("192.0.2.10", 443), ((PP2_TYPE_AUTHORITY, b"x"),))
    return authenticate_v2(base, "edge1", KEY, EDGE_SIDE, NOW)


@given(
    addr_pairs,
    ports,
    ports,
    tlvs,
    st.booleans(),
    st.booleans(),
    st.sampled_from([EDGE_SIDE, (("2001:db8::1", 1), ("2001:db8::2", 2))]),
    st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=64),
)
def test_round_trip(
    addrs: tuple[str, str],
    sport: int,
    dport: int,
    extra: list[tuple[int, bytes]],
    crc: bool,
    local: bool,
    conn: tuple[tuple[str, int], tuple[str, int]],
    name: str,
) -> None:
    src, dst = (None, None) if local else ((addrs[0], sport), (addrs[1], dport))
    raw = authenticate_v2(encode_v2(src, dst, tuple(extra), crc=crc), name, KEY, conn, NOW)
    header = header_of(raw)  # the CRC, when there is one, still verifies
    assert header.src == (None if local else header_of(encode_v2(src, dst)).src)
    assert [t for t in header.tlvs if t[0] not in (0x03, PP2_TYPE_BLINDFOLD_AUTH)] == extra
    claim = verify_auth(header, KEY, conn, NOW + 1.5, 30)
    assert (claim.name, claim.timestamp) == (name, NOW)


def test_the_origins_view_of_the_connection_verifies() -> None:
    """The origin sees the same 4-tuple; on a dual-stack listener as ::ffff:a.b.c.d."""
    header = header_of(signed())
    for conn in (EDGE_SIDE, (("::ffff:192.0.2.10", 40001), ("::ffff:198.51.100.5", 9443))):
        assert verify_auth(header, KEY, conn, NOW, 30).name == "edge1"


@pytest.mark.parametrize(
    ("conn", "key", "now", "reason"),
    [
        ((("192.0.2.10", 40002), EDGE_SIDE[1]), KEY, NOW, "proxy_auth_bad"),  # another connection
        ((("192.0.2.11", 40001), EDGE_SIDE[1]), KEY, NOW, "proxy_auth_bad"),  # another edge
        ((EDGE_SIDE[0], ("198.51.100.6", 9443)), KEY, NOW, "proxy_auth_bad"),  # another origin
        (EDGE_SIDE, bytes(32), NOW, "proxy_auth_bad"),  # another edge's key
        (EDGE_SIDE, KEY, NOW + 31, "proxy_auth_stale"),  # kept for later
        (EDGE_SIDE, KEY, NOW - 31, "proxy_auth_stale"),
    ],
)
def test_refusals(
    conn: tuple[tuple[str, int], tuple[str, int]], key: bytes, now: float, reason: str
) -> None:
    with pytest.raises(ProtocolError) as info:
        verify_auth(header_of(signed()), key, conn, now, 30)
    assert info.value.reason == reason


def test_the_on_path_rewrite_is_refused() -> None:
    """atk-trust #10: a relay rewrites the v2 source address and passes the rest through."""
    raw = bytearray(signed())
    raw[16:20] = bytes((127, 0, 0, 77))  # TCP4 source address
    with pytest.raises(ProtocolError) as info:
        verify_auth(header_of(bytes(raw)), KEY, EDGE_SIDE, NOW, 30)
    assert info.value.reason == "proxy_auth_bad"
    # nor can it drop the TLV, or add its own, or use a v1 header
    plain = encode_v2(("127.0.0.77", 51000), ("192.0.2.10", 443))
    for raw2 in (plain, encode_v1(("127.0.0.77", 1), ("192.0.2.10", 443))):
        with pytest.raises(ProtocolError) as info:
            verify_auth(header_of(raw2), KEY, EDGE_SIDE, NOW, 30)
        assert info.value.reason == "proxy_auth_missing"
    twice = authenticate_v2(plain, "edge1", KEY, EDGE_SIDE, NOW)
    body = twice[16:]
    tlv = body[12:]
    doubled = bytearray(twice[:16] + body + tlv)
    struct.pack_into(">H", doubled, 14, len(doubled) - 16)
    with pytest.raises(ProtocolError) as info:
        verify_auth(header_of(bytes(doubled)), KEY, EDGE_SIDE, NOW, 30)
    assert info.value.reason == "proxy_auth_bad"


@given(st.data())
def test_any_change_is_refused(data: st.DataObject) -> None:
    """Any byte changed anywhere in an authenticated header: the parser refuses it, or the
    MAC does (never a header that verifies and says something else)."""
    raw = bytearray(signed())
    pos = data.draw(st.integers(0, len(raw) - 1))
    byte = data.draw(st.integers(0, 255).filter(lambda b: b != raw[pos]))
    raw[pos] = byte
    try:
        parsed = parse_proxy_header(bytes(raw))
    except ProtocolError:
        return
    if parsed is None or parsed[1] != len(raw):
        return  # a longer or shorter header: not this one
    with pytest.raises(ProtocolError) as info:
        verify_auth(parsed[0], KEY, EDGE_SIDE, NOW, 30)
    assert info.value.reason.startswith("proxy_auth_")


@given(st.binary(max_size=120))
def test_any_tlv_value_reads_or_raises(value: bytes) -> None:
    raw = encode_v2(("192.0.2.1", 1), ("192.0.2.2", 2), ((PP2_TYPE_BLINDFOLD_AUTH, value),))
    try:
        claim = read_auth(header_of(raw))
    except ProtocolError as exc:
        assert exc.reason == "proxy_auth_bad"
        return
    assert claim is not None and len(claim.mac) == 32


BASE = encode_v2(("192.0.2.1", 1), ("192.0.2.2", 2))


@pytest.mark.parametrize(
    ("header", "name", "key"),
    [
        (BASE, "", KEY),
        (BASE, "x" * 65, KEY),
        (BASE, "edge1", b"short"),
        (encode_v1(None, None), "edge1", KEY),
        (BASE + b"x", "edge1", KEY),
        (authenticate_v2(BASE, "edge1", KEY, EDGE_SIDE, NOW), "edge1", KEY),
    ],
)
def test_what_the_edge_side_refuses(header: bytes, name: str, key: bytes) -> None:
    with pytest.raises(ValueError):
        authenticate_v2(header, name, key, EDGE_SIDE, NOW)


def test_a_replay_within_the_skew_is_caught_and_the_cache_is_bounded() -> None:
    cache = ReplayCache(max_entries=2)
    assert cache.first_time(b"a" * 32, NOW + 30, NOW)
    assert not cache.first_time(b"a" * 32, NOW + 30, NOW + 1)
    assert cache.first_time(b"b" * 32, NOW + 30, NOW)
    assert not cache.first_time(b"c" * 32, NOW + 30, NOW)  # full of live entries: refuse
    assert cache.first_time(b"c" * 32, NOW + 70, NOW + 31)  # the old ones are forgotten
    assert len(cache) == 1
    cache.sweep(NOW + 69)
    assert len(cache) == 1
    cache.sweep(NOW + 70)
    assert len(cache) == 0


@pytest.mark.parametrize("text", ["", "zz", "00" * 15, "not hex at all"])
def test_bad_keys(text: str) -> None:
    with pytest.raises(ValueError):
        parse_auth_key(text)
    assert parse_auth_key(" " + "ab" * 32 + "\n") == bytes([0xAB]) * 32
