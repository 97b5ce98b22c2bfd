"""How the origin learns a QUIC visitor's address from the edge (sans-IO, both sides).

For TCP the edge writes a PROXY v2 header and the origin believes it from `trusted_edges`
only; the TCP handshake proves the connection comes from the edge's address. UDP has no
handshake: anyone can send a datagram whose source address is an edge's. PROXY v2 defines
UDP families but neither authenticates the header nor says how it relates to a flow of
datagrams (implementations prepend it to every datagram, costing 28-52 bytes of every
packet's path MTU and a rewrite of every datagram before the QUIC stack sees it).

So the edge gives each path of a flow (`core.quic_flows.Path`) its own UDP socket towards
the origin, and sends from it, before the flow's first datagram, an announcement: this
socket carries visitor V. The announcement is authenticated with HMAC-SHA256 (RFC 2104) under
a key shared by the edges and the origin (the origin may hold several, one per edge group,
named by key id), carries a timestamp and a nonce (replays outside the window, or twice
within it, are refused) and the edge's source port (an announcement replayed from another
port is refused). The origin believes it only from a `trusted_edges` address *and* with a
valid MAC, then attributes every datagram from that edge address and port to V until the
binding is idle or replaced.

A visitor who spoofs an edge's address cannot forge an announcement, so its datagrams from an
unbound port are dropped; from a bound port they reach the QUIC connection of that path,
which cannot be completed or used without the connection's keys (QUIC's handshake answers go
to the edge, not to the spoofer), so no request is ever attributed to another visitor.

Wire format (big-endian): 0x00 | "BFVA" | format 1 | key id (8: SHA-256(key)[:8]) |
unix time in ms (8) | nonce (16) | edge source port (2) | family (1: 4 or 6) | visitor IP
(4 or 16) | visitor port (2) | HMAC-SHA256 over all of the above (32). A QUIC v1/v2 packet
never starts with 0x00 (RFC 9000 §17: the header form or fixed bit is set).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path as FilePath

from blindfold.errors import ConfigError, ProtocolError

Address = tuple[str, int]
MAGIC = b"\x00BFVA"
FORMAT = 1
MAC_BYTES = 32
MIN_KEY_BYTES = 32
_FIXED = len(MAGIC) + 1 + 8 + 8 + 16 + 2 + 1  # up to the visitor IP


def key_id(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()[:8]


def load_key(path: str, config_key: str) -> bytes:
    """A key file: at least 32 random bytes, hex encoded (`openssl rand -hex 32`)."""
    try:
        text = FilePath(path).read_text().strip()
        key = bytes.fromhex(text)
    except OSError as exc:
        raise ConfigError(config_key, f"cannot read {path}: {exc.strerror}") from None
    except ValueError:
        raise ConfigError(
            config_key, f"{path} is not hex (make one: openssl rand -hex 32)"
        ) from None
    if len(key) < MIN_KEY_BYTES:
        raise ConfigError(config_key, f"{path} holds {len(key)} bytes; use at least 32")
    return key


def is_announcement(data: bytes) -> bool:
    return data[:1] == b"\x00"


def encode_announcement(
    key: bytes, visitor: Address, edge_port: int, now: float, nonce: bytes
) -> bytes:
    """The edge's side: announce `visitor` for the socket bound to `edge_port`."""
    if len(nonce) != 16:
        raise ValueError("nonce must be 16 bytes")
    ip = ipaddress.ip_address(visitor[0])
    body = (
        MAGIC
        + bytes([FORMAT])
        + key_id(key)
        + int(now * 1000).to_bytes(8, "big")
        + nonce
        + edge_port.to_bytes(2, "big")
        + bytes([ip.version])
        + ip.packed
        + visitor[1].to_bytes(2, "big")
    )
    return body + hmac.new(key, body, hashlib.sha256).digest()


@dataclass(frozen=True, slots=True)
class Announcement:
    key_id: bytes
    sent_at: float
    nonce: bytes
    edge_port: int
    visitor: Address


def decode_announcement(data: bytes, keys: dict[bytes, bytes]) -> Announcement:
    """Parse and authenticate (the MAC is checked before any field is believed)."""
    if not data.startswith(MAGIC) or len(data) < _FIXED:
        raise ProtocolError("bad_announcement", "not a visitor announcement")
    if data[len(MAGIC)] != FORMAT:
        raise ProtocolError("bad_announcement", f"format {data[len(MAGIC)]}")
    pos = len(MAGIC) + 1
    kid = data[pos : pos + 8]
    family = data[_FIXED - 1]
    ip_len = {4: 4, 6: 16}.get(family)
    if ip_len is None:
        raise ProtocolError("bad_announcement", f"address family {family}")
    end = _FIXED + ip_len + 2
    if len(data) != end + MAC_BYTES:
        raise ProtocolError("bad_announcement", f"announcement of {len(data)} bytes")
    key = keys.get(kid)
    if key is None:
        raise ProtocolError("unknown_key", f"key id {kid.hex()}")
    want = hmac.new(key, data[:end], hashlib.sha256).digest()
    if not hmac.compare_digest(want, data[end:]):
        raise ProtocolError("bad_mac", "announcement MAC does not verify")
    sent_ms = int.from_bytes(data[pos + 8 : pos + 16], "big")
    nonce = data[pos + 16 : pos + 32]
    edge_port = int.from_bytes(data[pos + 32 : pos + 34], "big")
    ip = ipaddress.ip_address(data[_FIXED : _FIXED + ip_len])
    port = int.from_bytes(data[_FIXED + ip_len : end], "big")
    return Announcement(kid, sent_ms / 1000, nonce, edge_port, (str(ip), port))


@dataclass(slots=True)
class Binding:
    visitor: Address
    sent_at: float
    last_seen: float


class VisitorBindings:
    """The origin's side: edge (address, port) -> visitor, from authenticated announcements.
    Bounded (`max_bindings`, least recently used dropped), idle bindings expire, nonces are
    remembered for the replay window."""

    def __init__(
        self,
        keys: dict[bytes, bytes],
        *,
        window_s: float = 30.0,
        idle_s: float = 120.0,
        max_bindings: int = 100_000,
    ) -> None:
        self.keys = keys
        self.window_s = window_s
        self.idle_s = idle_s
        self.max_bindings = max_bindings
        self._bindings: OrderedDict[Address, Binding] = OrderedDict()
        self._nonces: OrderedDict[bytes, float] = OrderedDict()  # nonce -> forget after

    def __len__(self) -> int:
        return len(self._bindings)

    def announce(self, data: bytes, source: Address, now: float) -> Address:
        """Check an announcement that came from `source` (already known to be a trusted
        edge's address); returns the visitor it binds. Raises ProtocolError."""
        a = decode_announcement(data, self.keys)
        if abs(now - a.sent_at) > self.window_s:
            raise ProtocolError("stale_announcement", f"{now - a.sent_at:+.1f} s old")
        if a.edge_port != source[1]:
            raise ProtocolError("port_mismatch", f"for port {a.edge_port}, from {source[1]}")
        self._forget_nonces(now)
        if a.nonce in self._nonces:
            raise ProtocolError("replayed_announcement", "nonce seen before")
        if len(self._nonces) >= 4 * self.max_bindings:
            raise ProtocolError("announcement_flood", "replay cache full")
        self._nonces[a.nonce] = now + 2 * self.window_s
        old = self._bindings.get(source)
        if old is not None and old.sent_at > a.sent_at:
            raise ProtocolError("stale_announcement", "older than the current binding")
        self._bindings[source] = Binding(a.visitor, a.sent_at, now)
        self._bindings.move_to_end(source)
        while len(self._bindings) > self.max_bindings:
            self._bindings.popitem(last=False)
        return a.visitor

    def visitor(self, source: Address, now: float) -> Address | None:
        b = self._bindings.get(source)
        if b is None:
            return None
        if now - b.last_seen > self.idle_s:
            del self._bindings[source]
            return None
        b.last_seen = now
        self._bindings.move_to_end(source)
        return b.visitor

    def expire(self, now: float) -> int:
        gone = 0
        while self._bindings:
            source, b = next(iter(self._bindings.items()))
            if now - b.last_seen <= self.idle_s:
                break
            del self._bindings[source]
            gone += 1
        self._forget_nonces(now)
        return gone

    def _forget_nonces(self, now: float) -> None:
        nonces = self._nonces
        while nonces:
            nonce, until = next(iter(nonces.items()))
            if until > now:
                break
            del nonces[nonce]
