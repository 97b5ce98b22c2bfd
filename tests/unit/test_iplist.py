"""Block/allow list files and the address set."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blindfold.core.iplist import IPSet, parse_address, parse_list, visitor_key

SPAMHAUS_STYLE = """\
; Spamhaus DROP List 2026/11/27 - (c) 2026 The Spamhaus Project
; Last-Modified: Fri, 27 Nov 2026 06:00:00 GMT
1.10.16.0/20 ; SBL256894
2.57.122.0/24 ; SBL636050
"""
FIREHOL_STYLE = """\
#
# firehol_level1
#
192.0.2.7
198.51.100.0/24   # trailing comment
2001:db8:bad::/48
::ffff:203.0.113.0/120
not-an-address
10.0.0.300
"""


def test_parse_formats() -> None:
    nets, errors = parse_list(SPAMHAUS_STYLE + FIREHOL_STYLE)
    assert [str(n) for n in nets] == [
        "1.10.16.0/20",
        "2.57.122.0/24",
        "192.0.2.7/32",
        "198.51.100.0/24",
        "2001:db8:bad::/48",
        "203.0.113.0/24",
    ]
    assert [e.line for e in errors] == [12, 13]


def test_membership() -> None:
    nets, _ = parse_list(SPAMHAUS_STYLE + FIREHOL_STYLE)
    s = IPSet(nets)
    assert s.contains_text("1.10.31.255")
    assert not s.contains_text("1.10.32.0")
    assert s.contains_text("192.0.2.7") and not s.contains_text("192.0.2.8")
    assert s.contains_text("2001:db8:bad:ffff::1") and not s.contains_text("2001:db8:bae::1")
    assert s.contains_text("::ffff:203.0.113.9")  # IPv4-mapped is IPv4
    assert not IPSet().contains_text("1.2.3.4")


def test_host_bits_are_masked() -> None:
    nets, errors = parse_list("192.0.2.77/24\n")
    assert not errors and str(nets[0]) == "192.0.2.0/24"


@given(
    st.lists(
        st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)).flatmap(
            lambda a: st.integers(
                a.max_prefixlen - 24 if a.version == 6 else 8, a.max_prefixlen
            ).map(lambda p: ipaddress.ip_network(f"{a}/{p}", strict=False))
        ),
        max_size=30,
    ),
    st.lists(st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)), min_size=1, max_size=30),
)
def test_matches_ipaddress_reference(nets: list, probes: list) -> None:  # type: ignore[type-arg]
    s = IPSet(nets)
    for probe in probes:
        version, value = parse_address(str(probe))
        if probe.version == 6 and probe.ipv4_mapped is not None:
            probe = probe.ipv4_mapped  # the edge treats IPv4-mapped IPv6 as IPv4
        expected = any(probe in n for n in nets)
        assert s.contains(value, version) == expected, (probe, nets)


@pytest.mark.parametrize(
    ("ip", "key"),
    [
        ("192.0.2.7", "192.0.2.7"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
        ("::ffff:192.0.2.7", "192.0.2.7"),  # a dual-stack socket's IPv4 peer (atk-trust #8)
        ("::ffff:c000:208", "192.0.2.8"),
        ("::192.0.2.7", "::/64"),  # IPv4-compatible (deprecated), not mapped: an IPv6 address
        ("64:ff9b::c000:207", "64:ff9b::/64"),  # NAT64: one translator, one /64
    ],
)
def test_visitor_keys(ip: str, key: str) -> None:
    assert visitor_key(ip) == key


@given(st.ip_addresses(v=4))
def test_a_mapped_address_is_its_ipv4_visitor(addr: ipaddress.IPv4Address) -> None:
    assert visitor_key(f"::ffff:{addr}") == visitor_key(str(addr)) == str(addr)
