"""PROXY protocol v1/v2 (HAProxy's proxy-protocol.txt): writer, parser, round trips."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blindfold.core.proxyproto import (
    PP2_TYPE_ALPN,
    PP2_TYPE_AUTHORITY,
    V2_SIGNATURE,
    crc32c,
    encode_v1,
    encode_v2,
    parse_proxy_header,
)
from blindfold.errors import ProtocolError

ports = st.integers(0, 65535)
v4 = st.ip_addresses(v=4).map(str)
v6 = st.ip_addresses(v=6).map(str)
tlvs = st.lists(
    st.tuples(
        st.sampled_from([PP2_TYPE_ALPN, PP2_TYPE_AUTHORITY, 0x05, 0xE0]), st.binary(max_size=60)
    ),
    max_size=4,
)


def test_v1_exact_bytes() -> None:
    assert encode_v1(("192.0.2.1", 56324), ("198.51.100.2", 443)) == (
        b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n"
    )
    assert encode_v1(("2001:db8::1", 1), ("::1", 2)) == b"PROXY TCP6 2001:db8::1 ::1 1 2\r\n"
    assert encode_v1(None, None) == b"PROXY UNKNOWN\r\n"


def test_v2_exact_bytes() -> None:
    header = encode_v2(("127.0.0.2", 4660), ("127.0.0.1", 443))
    assert header == (
        V2_SIGNATURE
        + b"\x21\x11\x00\x0c"
        + bytes([127, 0, 0, 2, 127, 0, 0, 1])
        + b"\x12\x34\x01\xbb"
    )


def test_crc32c_check_value() -> None:
    assert crc32c(b"123456789") == 0xE3069283  # the Castagnoli check value


@given(st.one_of(st.tuples(v4, v4), st.tuples(v6, v6)), ports, ports)
def test_v1_round_trip(addrs: tuple[str, str], sport: int, dport: int) -> None:
    raw = encode_v1((addrs[0], sport), (addrs[1], dport))
    parsed = parse_proxy_header(raw + b"\x16\x03\x01")
    assert parsed is not None
    header, used = parsed
    assert used == len(raw) <= 107
    assert header.src == (str(ipaddress.ip_address(addrs[0])), sport)
    assert header.dst == (str(ipaddress.ip_address(addrs[1])), dport)


@given(st.one_of(st.tuples(v4, v4), st.tuples(v6, v6)), ports, ports, tlvs, st.booleans())
def test_v2_round_trip(
    addrs: tuple[str, str], sport: int, dport: int, extra: list[tuple[int, bytes]], crc: bool
) -> None:
    raw = encode_v2((addrs[0], sport), (addrs[1], dport), tuple(extra), crc=crc)
    parsed = parse_proxy_header(raw + b"rest")
    assert parsed is not None
    header, used = parsed
    assert used == len(raw)
    assert not header.local
    assert header.src == (str(ipaddress.ip_address(addrs[0])), sport)
    assert header.dst == (str(ipaddress.ip_address(addrs[1])), dport)
    assert [t for t in header.tlvs if t[0] != 0x03] == extra


@given(
    st.one_of(st.tuples(v4, v4), st.tuples(v6, v6)),
    ports,
    ports,
    tlvs,
    st.lists(st.integers(1, 20), max_size=20),
)
def test_any_chunking_gives_the_same_result(
    addrs: tuple[str, str],
    sport: int,
    dport: int,
    extra: list[tuple[int, bytes]],
    chunks: list[int],
) -> None:
    for raw in (
        encode_v1((addrs[0], sport), (addrs[1], dport)),
        encode_v2((addrs[0], sport), (addrs[1], dport), tuple(extra)),
    ):
        whole = parse_proxy_header(raw)
        buf = b""
        pos = 0
        result = None
        for size in [*chunks, len(raw)]:
            buf += raw[pos : pos + size]
            pos += size
            result = parse_proxy_header(buf)
            if result is not None:
                break
            assert pos < len(raw)
        assert result == whole


@given(st.data())
def test_any_mutation_parses_or_raises_protocol_error(data: st.DataObject) -> None:
    raw = bytearray(
        data.draw(
            st.sampled_from(
                [
                    encode_v1(("192.0.2.1", 1), ("192.0.2.2", 2)),
                    encode_v2(
                        ("192.0.2.1", 1),
                        ("192.0.2.2", 2),
                        ((PP2_TYPE_AUTHORITY, b"a.test"),),
                        crc=True,
                    ),
                    encode_v2(("2001:db8::1", 1), ("2001:db8::2", 2)),
                ]
            )
        )
    )
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(raw) - 1))
        if data.draw(st.booleans()):
            raw[i] = data.draw(st.integers(0, 255))
        else:
            del raw[i]
    try:
        parse_proxy_header(bytes(raw))
    except ProtocolError:
        pass


@pytest.mark.parametrize(
    "raw",
    [
        b"GET / HTTP/1.1\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",  # leading zero in a port
        b"PROXY TCP4 ::1 ::1 1 2\r\n",  # family mismatch
        b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 70000\r\n",
        b"PROXY " + b"x" * 120,  # no CRLF within 107 bytes
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",  # LF only
        V2_SIGNATURE + b"\x31\x11\x00\x0c" + b"\x00" * 12,  # version 3
        V2_SIGNATURE + b"\x22\x11\x00\x0c" + b"\x00" * 12,  # command 2
        V2_SIGNATURE + b"\x21\x11\x00\x04" + b"\x00" * 4,  # address block too short
        V2_SIGNATURE + b"\x21\x99\x00\x00",  # unknown family
        V2_SIGNATURE + b"\x21\x11\x00\x10" + b"\x00" * 12 + b"\x02\x00\x09x",  # TLV overruns
    ],
)
def test_bad_headers(raw: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_proxy_header(raw)
    assert info.value.reason == "bad_proxy_header"


def test_crc_mismatch_is_refused() -> None:
    raw = bytearray(encode_v2(("192.0.2.1", 1), ("192.0.2.2", 2), crc=True))
    raw[20] ^= 1
    with pytest.raises(ProtocolError):
        parse_proxy_header(bytes(raw))


def test_v2_header_size_is_bounded() -> None:
    big = encode_v2(("192.0.2.1", 1), ("192.0.2.2", 2), ((0xE0, b"x" * 5000),))
    with pytest.raises(ProtocolError):
        parse_proxy_header(big, max_bytes=4096)


def test_local_and_unknown() -> None:
    parsed = parse_proxy_header(encode_v2(None, None))
    assert parsed is not None and parsed[0].local and parsed[0].src is None
    parsed = parse_proxy_header(b"PROXY UNKNOWN\r\n")
    assert parsed is not None and parsed[0].local


def test_with_tlv_adds_one_tlv_to_a_v2_header_only() -> None:
    from blindfold.core.proxyproto import PP2_TYPE_BLINDFOLD_HTTP, encode_v1, with_tlv

    header = encode_v2(("198.51.100.7", 40000), ("192.0.2.10", 443), ((0x02, b"a.test"),))
    out = with_tlv(header, PP2_TYPE_BLINDFOLD_HTTP, b"")
    parsed = parse_proxy_header(out)
    assert parsed is not None and parsed[1] == len(out)
    assert parsed[0].tlv(PP2_TYPE_BLINDFOLD_HTTP) == b"" and parsed[0].tlv(0x02) == b"a.test"
    v1 = encode_v1(("198.51.100.7", 40000), ("192.0.2.10", 443))
    assert with_tlv(v1, PP2_TYPE_BLINDFOLD_HTTP, b"") == v1
    assert with_tlv(b"", PP2_TYPE_BLINDFOLD_HTTP, b"") == b""


def test_a_request_id_is_the_edges_only_from_an_edge_and_only_a_plain_token() -> None:
    from blindfold.web.limits import request_id_for

    assert request_id_for([(b"x-request-id", b"abc-1.2_3")], True) == "abc-1.2_3"
    assert request_id_for([(b"x-request-id", b"abc-1")], False) != "abc-1"
    for bad in (b"", b"a b", b'a"b', b"x" * 65, b"caf\xc3\xa9"):
        assert request_id_for([(b"x-request-id", bad)], True) != bad.decode("latin-1")
