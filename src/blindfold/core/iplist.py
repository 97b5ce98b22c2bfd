"""IP address sets for block and allow lists, and the parser of list files.

List files use the format of common published drop lists (Spamhaus DROP, FireHOL netsets):
one IPv4/IPv6 address or CIDR per line, comments after '#' or ';', blank lines ignored.
Lookups test one hash set per distinct prefix length, so a list of thousands of entries costs
a handful of set lookups per connection.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass

from blindfold.errors import ProtocolError

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class ListEntryError:
    line: int
    text: str
    problem: str


def parse_list(text: str) -> tuple[list[IPNetwork], list[ListEntryError]]:
    """Parse list-file text into networks; bad lines are returned, not fatal, so one typo in a
    published list does not disable the whole list."""
    nets: list[IPNetwork] = []
    errors: list[ListEntryError] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw
        for mark in ("#", ";"):
            cut = line.find(mark)
            if cut >= 0:
                line = line[:cut]
        line = line.strip()
        if not line:
            continue
        token = line.split()[0]
        try:
            net = ipaddress.ip_network(token, strict=False)
        except ValueError:
            errors.append(ListEntryError(lineno, raw[:200], "not an IP address or CIDR"))
            continue
        if isinstance(net, ipaddress.IPv6Network) and net.network_address.ipv4_mapped:
            mapped = net.network_address.ipv4_mapped
            net = ipaddress.ip_network(f"{mapped}/{max(net.prefixlen - 96, 0)}", strict=False)
        nets.append(net)
    return nets, errors


class IPSet:
    """A set of IPv4 and IPv6 networks with membership tests on integer addresses."""

    __slots__ = ("_v4", "_v6", "size")

    def __init__(self, networks: Iterable[IPNetwork] = ()) -> None:
        v4: dict[int, set[int]] = {}
        v6: dict[int, set[int]] = {}
        size = 0
        for net in networks:
            table = v4 if net.version == 4 else v6
            table.setdefault(net.prefixlen, set()).add(int(net.network_address))
            size += 1
        bits4 = 32
        bits6 = 128
        # (mask, members) per prefix length, longest first
        self._v4 = [
            (((1 << bits4) - 1) ^ ((1 << (bits4 - p)) - 1), s)
            for p, s in sorted(v4.items(), reverse=True)
        ]
        self._v6 = [
            (((1 << bits6) - 1) ^ ((1 << (bits6 - p)) - 1), s)
            for p, s in sorted(v6.items(), reverse=True)
        ]
        self.size = size

    def __bool__(self) -> bool:
        return self.size > 0

    def contains(self, addr: int, version: int) -> bool:
        for mask, members in self._v4 if version == 4 else self._v6:
            if addr & mask in members:
                return True
        return False

    def contains_text(self, address: str) -> bool:
        version, addr = parse_address(address)
        return self.contains(addr, version)


def visitor_key(ip: str) -> str:
    """What per-visitor limits count by: an IPv4 address, or an IPv6 /64 (one subscriber).
    An IPv4-mapped IPv6 address (::ffff:a.b.c.d, RFC 4291 §2.5.5.2: how a dual-stack `[::]`
    socket shows an IPv4 peer, and how an edge on one may name it in a PROXY header) is the
    IPv4 visitor a.b.c.d: its /64 would be ::/64, every IPv4 visitor at once."""
    if ":" not in ip:
        return ip
    try:
        addr = ipaddress.IPv6Address(ip)
    except ValueError:
        return ip
    if addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(ipaddress.IPv6Network((addr, 64), strict=False))


def parse_address(address: str) -> tuple[int, int]:
    """'192.0.2.1' or '2001:db8::1' -> (version, integer); IPv4-mapped IPv6 becomes IPv4."""
    try:
        if ":" not in address:
            return 4, int.from_bytes(socket.inet_pton(socket.AF_INET, address), "big")
        value = int.from_bytes(socket.inet_pton(socket.AF_INET6, address), "big")
    except OSError:
        raise ProtocolError("bad_address", f"{address!r} is not an IP address") from None
    if value >> 32 == 0xFFFF:
        return 4, value & 0xFFFFFFFF
    return 6, value


class MutableIPSet:
    """A ban set changed in place: the worker's copy of the master's ban table. Networks come
    as the master's integer keys ((network << 9) | (prefix length << 1) | is_ipv6, see
    blindfold.decisions.bans); a lookup costs one hash probe per distinct prefix length in the
    address's family, as in `IPSet`, whatever the number of networks."""

    __slots__ = ("_lookup", "_sets", "size")

    def __init__(self) -> None:
        self._sets: dict[int, set[int]] = {}  # key & 0x1FF (prefix length, family) -> networks
        # per family (0: IPv4, 1: IPv6): (mask, networks) per prefix length, longest first
        self._lookup: tuple[list[tuple[int, set[int]]], list[tuple[int, set[int]]]] = ([], [])
        self.size = 0

    def __bool__(self) -> bool:
        return self.size > 0

    def add_keys(self, keys: list[int]) -> int:
        """Add networks; returns how many were new. One loop with local names: the worker
        applies up to a million of these."""
        sets = self._sets
        added = 0
        for key in keys:
            members = sets.get(key & 0x1FF)
            if members is None:
                members = sets[key & 0x1FF] = set()
                self._relink(key & 1)
            n = len(members)
            members.add(key >> 9)
            added += len(members) - n
        self.size += added
        return added

    def discard_keys(self, keys: list[int]) -> int:
        sets = self._sets
        removed = 0
        for key in keys:
            members = sets.get(key & 0x1FF)
            if members is None:
                continue
            n = len(members)
            members.discard(key >> 9)
            removed += n - len(members)
            if not members:
                del sets[key & 0x1FF]
                self._relink(key & 1)
        self.size -= removed
        return removed

    def add_key(self, key: int) -> bool:
        return self.add_keys([key]) == 1

    def discard_key(self, key: int) -> bool:
        return self.discard_keys([key]) == 1

    def _relink(self, family: int) -> None:
        bits = 128 if family else 32
        full = (1 << bits) - 1
        self._lookup[family][:] = [
            (full ^ ((1 << (bits - (index >> 1))) - 1), members)
            for index, members in sorted(self._sets.items(), reverse=True)
            if index & 1 == family
        ]

    def contains(self, addr: int, version: int) -> bool:
        for mask, members in self._lookup[version == 6]:  # noqa: SIM110 (no generator: per accept)
            if addr & mask in members:
                return True
        return False
