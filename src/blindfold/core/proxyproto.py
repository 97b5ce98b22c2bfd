"""PROXY protocol v1 and v2 (HAProxy's proxy-protocol.txt): writer for the edge, parser for the
origin agent. Sans-IO: `parse_proxy_header(buf)` returns None until the header is complete.

The header travels in clear before the TLS that the edge verifies, so anyone on the path
between edge and origin can rewrite it (and get an innocent address banned). Our own v2 TLV
(`PP2_TYPE_BLINDFOLD_AUTH`, in the range §2.2.7 leaves to applications) binds it to the edge:
an HMAC-SHA256 (RFC 2104) under a key the edge shares with the origin, over the whole header,
the TCP connection's addresses and ports as both ends see them (so it cannot be moved to
another connection) and a timestamp (so it cannot be kept for later):

    value = version (1, u8) | name length (u8) | name (ASCII) | time (u64, Unix ms) | MAC (32)
    MAC   = HMAC-SHA256(key, "blindfold proxy auth v1" 0x00 | connection | header)

`connection` is source address (16 bytes, IPv4 as ::ffff:a.b.c.d, RFC 4291 §2.5.5.2), source
port (u16), destination address, destination port: the edge's end of its connection to the
origin, then the origin's. `header` is the whole v2 header with the MAC bytes (and a CRC32C
TLV's value, which covers the MAC) set to zero. `name` tells the origin which edge's key to
use; the origin also checks that the connection comes from that edge's addresses.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import socket
import struct
from dataclasses import dataclass, field
from pathlib import Path

from blindfold.errors import ConfigError, ProtocolError

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"  # §2.2
V1_PREFIX = b"PROXY "
V1_MAX = 107  # §2.1: the longest v1 line, CRLF included

# §2.2 address families and TLV types
FAM_UNSPEC, FAM_TCP4, FAM_UDP4, FAM_TCP6, FAM_UDP6, FAM_UNIX, FAM_UNIX_DGRAM = (
    0x00,
    0x11,
    0x12,
    0x21,
    0x22,
    0x31,
    0x32,
)
PP2_TYPE_ALPN = 0x01
PP2_TYPE_AUTHORITY = 0x02
PP2_TYPE_CRC32C = 0x03
PP2_TYPE_NOOP = 0x04
PP2_TYPE_UNIQUE_ID = 0x05
PP2_TYPE_MIN_CUSTOM, PP2_TYPE_MAX_CUSTOM = 0xE0, 0xEF  # §2.2.7: for applications
# 0xE0 (Google Cloud), 0xEA (AWS) and 0xEE (Azure) are taken by their load balancers
PP2_TYPE_BLINDFOLD_AUTH = 0xE9
# The edge itself speaks HTTP on this connection (keyless, blind): its requests carry the
# edge's request id in X-Request-Id, which the origin then keeps (the visitor's never arrives:
# the edge overwrites it). A passthrough connection's header never has it. The type is one no
# known load balancer uses and the value is fixed: another PROXY sender trusted for addresses
# (an AWS NLB puts 0xEA in every header) never makes the origin believe a visitor's id. From an
# [[origin.edges]] entry with a key the whole header, this TLV included, is authenticated.
PP2_TYPE_BLINDFOLD_HTTP = 0xEB
BLINDFOLD_HTTP_MARK = b"blindfold-http/1"
AUTH_VERSION = 1
AUTH_MAC_BYTES = 32
AUTH_LABEL = b"blindfold proxy auth v1\x00"
MAX_AUTH_NAME = 64
MIN_AUTH_KEY_BYTES = 16

_ADDR_LEN = {
    FAM_TCP4: 12,
    FAM_UDP4: 12,
    FAM_TCP6: 36,
    FAM_UDP6: 36,
    FAM_UNIX: 216,
    FAM_UNIX_DGRAM: 216,
    FAM_UNSPEC: 0,
}


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A parsed PROXY header. `local` is v2 LOCAL (or v1 UNKNOWN): the connection was made by
    the proxy itself (health checks) and carries no visitor address."""

    version: int
    local: bool
    src: tuple[str, int] | None = None
    dst: tuple[str, int] | None = None
    tlvs: tuple[tuple[int, bytes], ...] = field(default=())
    raw: bytes = field(default=b"", compare=False, repr=False)  # the header as received

    def tlv(self, kind: int) -> bytes | None:
        for t, v in self.tlvs:
            if t == kind:
                return v
        return None


def _bad(detail: str) -> ProtocolError:
    return ProtocolError("bad_proxy_header", detail, status=400)


# ----------------------------------------------------------------------------- writers


def encode_v1(src: tuple[str, int] | None, dst: tuple[str, int] | None) -> bytes:
    """`PROXY TCP4 1.2.3.4 5.6.7.8 1111 443\\r\\n` (§2.1); UNKNOWN without addresses."""
    if src is None or dst is None:
        return b"PROXY UNKNOWN\r\n"
    s, d = ipaddress.ip_address(src[0]), ipaddress.ip_address(dst[0])
    if s.version != d.version:
        return b"PROXY UNKNOWN\r\n"
    proto = "TCP4" if s.version == 4 else "TCP6"
    return f"PROXY {proto} {s} {d} {src[1]} {dst[1]}\r\n".encode("ascii")


def encode_v2(
    src: tuple[str, int] | None,
    dst: tuple[str, int] | None,
    tlvs: tuple[tuple[int, bytes], ...] = (),
    *,
    crc: bool = False,
) -> bytes:
    """Binary v2 header (§2.2): PROXY command over TCP, or LOCAL when addresses are unknown."""
    ver_cmd, fam, addr = 0x20, FAM_UNSPEC, b""  # LOCAL: no visitor address
    if src is not None and dst is not None:
        af = socket.AF_INET6 if ":" in src[0] else socket.AF_INET
        if (":" in dst[0]) == (af == socket.AF_INET6):
            ver_cmd = 0x21
            fam = FAM_TCP4 if af == socket.AF_INET else FAM_TCP6
            addr = (
                socket.inet_pton(af, src[0])
                + socket.inet_pton(af, dst[0])
                + struct.pack(">HH", src[1], dst[1])
            )
    body = bytearray(addr)
    for kind, value in tlvs:
        if len(value) > 0xFFFF:
            raise ValueError("TLV value too long")
        body += struct.pack(">BH", kind, len(value)) + value
    if crc:
        body += struct.pack(">BH", PP2_TYPE_CRC32C, 4) + b"\x00\x00\x00\x00"
    header = bytearray(V2_SIGNATURE + struct.pack(">BBH", ver_cmd, fam, len(body)) + body)
    if crc:
        header[-4:] = struct.pack(">I", crc32c(bytes(header)))
    return bytes(header)


# ----------------------------------------------------------------------------- parser


def parse_proxy_header(
    buf: bytes | bytearray, max_bytes: int = 4096
) -> tuple[ProxyHeader, int] | None:
    """Parse a v1 or v2 header at the start of `buf`: (header, bytes consumed) or None if more
    bytes are needed. Raises ProtocolError('bad_proxy_header') on anything else."""
    n = len(buf)
    if n == 0:
        return None
    if buf[0] == 0x0D:
        head = bytes(buf[:12])
        if not V2_SIGNATURE.startswith(head):
            raise _bad("neither a v1 nor a v2 PROXY header")
        if n < 16:
            return None
        return _parse_v2(buf, max_bytes)
    if buf[0] == 0x50:  # 'P'
        head = bytes(buf[:6])
        if not V1_PREFIX.startswith(head):
            raise _bad("neither a v1 nor a v2 PROXY header")
        end = bytes(buf[:V1_MAX]).find(b"\r\n")
        if end < 0:
            if n >= V1_MAX:
                raise _bad("v1 line longer than 107 bytes")
            if b"\n" in bytes(buf[:V1_MAX]):
                raise _bad("v1 line not ended by CRLF")
            return None
        return _parse_v1(bytes(buf[:end])), end + 2
    raise _bad("neither a v1 nor a v2 PROXY header")


def _parse_v1(line: bytes) -> ProxyHeader:
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        raise _bad("v1 header is not ASCII") from None
    parts = text.split(" ")
    if parts[:2] == ["PROXY", "UNKNOWN"]:
        return ProxyHeader(version=1, local=True)
    if len(parts) != 6 or parts[1] not in ("TCP4", "TCP6"):
        raise _bad("v1 header must be 'PROXY TCP4|TCP6 src dst sport dport'")
    want = 4 if parts[1] == "TCP4" else 6
    addrs = []
    for text_addr in parts[2:4]:
        try:
            addr = ipaddress.ip_address(text_addr)
        except ValueError:
            raise _bad(f"v1 address {text_addr!r}") from None
        if addr.version != want:
            raise _bad(f"v1 address {text_addr!r} does not match {parts[1]}")
        addrs.append(str(addr))
    ports = []
    for text_port in parts[4:6]:
        # §2.1: ports are decimal without leading zeroes
        if (
            not text_port.isdigit()
            or (len(text_port) > 1 and text_port[0] == "0")
            or int(text_port) > 65535
        ):
            raise _bad(f"v1 port {text_port!r}")
        ports.append(int(text_port))
    return ProxyHeader(version=1, local=False, src=(addrs[0], ports[0]), dst=(addrs[1], ports[1]))


def _parse_v2(buf: bytes | bytearray, max_bytes: int) -> tuple[ProxyHeader, int] | None:
    ver_cmd, fam, length = struct.unpack_from(">BBH", buf, 12)
    if ver_cmd >> 4 != 2:
        raise _bad(f"v2 version nibble {ver_cmd >> 4}")
    command = ver_cmd & 0x0F
    if command > 1:
        raise _bad(f"v2 command {command}")
    total = 16 + length
    if total > max_bytes:
        raise _bad(f"v2 header of {total} bytes exceeds {max_bytes}")
    if len(buf) < total:
        return None
    if fam not in _ADDR_LEN:
        raise _bad(f"v2 address family 0x{fam:02x}")
    addr_len = _ADDR_LEN[fam]
    if length < addr_len:
        raise _bad("v2 address block shorter than its family needs")
    body = bytes(buf[16:total])
    src = dst = None
    if command == 1 and fam in (FAM_TCP4, FAM_UDP4):
        src = (socket.inet_ntop(socket.AF_INET, body[0:4]), int.from_bytes(body[8:10], "big"))
        dst = (socket.inet_ntop(socket.AF_INET, body[4:8]), int.from_bytes(body[10:12], "big"))
    elif command == 1 and fam in (FAM_TCP6, FAM_UDP6):
        src = (str(ipaddress.IPv6Address(body[0:16])), int.from_bytes(body[32:34], "big"))
        dst = (str(ipaddress.IPv6Address(body[16:32])), int.from_bytes(body[34:36], "big"))
    tlvs = []
    pos = addr_len
    crc_at = -1
    while pos < length:
        if pos + 3 > length:
            raise _bad("truncated v2 TLV header")
        kind, tlen = struct.unpack_from(">BH", body, pos)
        if pos + 3 + tlen > length:
            raise _bad(f"v2 TLV 0x{kind:02x} overruns the header")
        value = body[pos + 3 : pos + 3 + tlen]
        if kind == PP2_TYPE_CRC32C:
            if tlen != 4 or crc_at >= 0:
                raise _bad("bad CRC32C TLV")
            crc_at = 16 + pos + 3
        tlvs.append((kind, value))
        pos += 3 + tlen
    if crc_at >= 0:
        header = bytearray(buf[:total])
        expected = bytes(header[crc_at : crc_at + 4])
        header[crc_at : crc_at + 4] = b"\x00\x00\x00\x00"
        if struct.pack(">I", crc32c(bytes(header))) != expected:
            raise _bad("v2 CRC32C mismatch")
    local = command == 0 or src is None
    raw = bytes(buf[:total])
    return ProxyHeader(version=2, local=local, src=src, dst=dst, tlvs=tuple(tlvs), raw=raw), total


# ----------------------------------------------------------------------------- authentication

Endpoint = tuple[str, int]


@dataclass(frozen=True, slots=True)
class AuthClaim:
    """What a PP2_TYPE_BLINDFOLD_AUTH TLV says: who, when (Unix seconds), and its MAC."""

    name: str
    timestamp: float
    mac: bytes


def _endpoint(ep: Endpoint) -> bytes:
    try:
        addr = ipaddress.ip_address(ep[0].partition("%")[0])
    except ValueError:
        raise ValueError(f"{ep[0]!r} is not an IP address") from None
    if addr.version == 4:
        addr = ipaddress.IPv6Address(b"\x00" * 10 + b"\xff\xff" + addr.packed)
    return addr.packed + struct.pack(">H", ep[1])


def _tlv_spans(raw: bytes) -> list[tuple[int, int, int]]:
    """(type, offset of the value in `raw`, length) of each TLV of a parsed v2 header."""
    fam = raw[13]
    pos, end = 16 + _ADDR_LEN[fam], len(raw)
    spans = []
    while pos < end:
        kind, tlen = struct.unpack_from(">BH", raw, pos)
        spans.append((kind, pos + 3, tlen))
        pos += 3 + tlen
    return spans


def _auth_mac(key: bytes, raw: bytes, conn: tuple[Endpoint, Endpoint], mac_at: int) -> bytes:
    zeroed = bytearray(raw)
    zeroed[mac_at : mac_at + AUTH_MAC_BYTES] = bytes(AUTH_MAC_BYTES)
    for kind, at, tlen in _tlv_spans(raw):
        if kind == PP2_TYPE_CRC32C:
            zeroed[at : at + tlen] = bytes(tlen)
    message = AUTH_LABEL + _endpoint(conn[0]) + _endpoint(conn[1]) + bytes(zeroed)
    return hmac.digest(key, message, hashlib.sha256)


def with_tlv(header: bytes, kind: int, value: bytes) -> bytes:
    """`header` with one more TLV when it is one complete v2 header (unchanged when it is
    empty or v1). Before authenticate_v2, which covers it."""
    parsed = parse_proxy_header(header) if header else None
    if parsed is None or parsed[1] != len(header) or parsed[0].version != 2:
        return header
    out = bytearray(header) + struct.pack(">BH", kind, len(value)) + value
    if len(out) - 16 > 0xFFFF:
        raise ValueError("header too long for v2")
    struct.pack_into(">H", out, 14, len(out) - 16)
    return bytes(out)


def authenticate_v2(
    header: bytes, name: str, key: bytes, conn: tuple[Endpoint, Endpoint], now: float
) -> bytes:
    """`header` (an encoded v2 header, PROXY or LOCAL) with a PP2_TYPE_BLINDFOLD_AUTH TLV
    appended: the edge calls it once connected, `conn` being (its own address and port on the
    connection to the origin, the origin's), i.e. (getsockname(), getpeername())."""
    parsed = parse_proxy_header(header)
    if parsed is None or parsed[1] != len(header) or parsed[0].version != 2:
        raise ValueError("not one complete v2 PROXY header")
    if parsed[0].tlv(PP2_TYPE_BLINDFOLD_AUTH) is not None:
        raise ValueError("the header is authenticated already")
    raw_name = name.encode("ascii")
    if not 0 < len(raw_name) <= MAX_AUTH_NAME:
        raise ValueError(f"an edge name is 1-{MAX_AUTH_NAME} ASCII characters")
    if len(key) < MIN_AUTH_KEY_BYTES:
        raise ValueError(f"an authentication key has at least {MIN_AUTH_KEY_BYTES} bytes")
    value = (
        bytes((AUTH_VERSION, len(raw_name)))
        + raw_name
        + struct.pack(">Q", max(0, int(now * 1000)))
        + bytes(AUTH_MAC_BYTES)
    )
    out = bytearray(header)
    out += struct.pack(">BH", PP2_TYPE_BLINDFOLD_AUTH, len(value)) + value
    length = len(out) - 16
    if length > 0xFFFF:
        raise ValueError("header too long for v2")
    struct.pack_into(">H", out, 14, length)
    mac_at = len(out) - AUTH_MAC_BYTES
    out[mac_at:] = _auth_mac(key, bytes(out), conn, mac_at)
    for kind, at, tlen in _tlv_spans(bytes(out)):
        if kind == PP2_TYPE_CRC32C and tlen == 4:
            out[at : at + 4] = bytes(4)
            out[at : at + 4] = struct.pack(">I", crc32c(bytes(out)))
    return bytes(out)


def read_auth(header: ProxyHeader) -> AuthClaim | None:
    """The header's PP2_TYPE_BLINDFOLD_AUTH TLV, or None when it has none (v1 never has).
    Raises ProtocolError('proxy_auth_bad') for a malformed or repeated one."""
    values = [v for t, v in header.tlvs if t == PP2_TYPE_BLINDFOLD_AUTH]
    if not values:
        return None
    if len(values) > 1:
        raise ProtocolError("proxy_auth_bad", "more than one authentication TLV", status=400)
    v = values[0]
    if len(v) < 2 or v[0] != AUTH_VERSION or len(v) != 2 + v[1] + 8 + AUTH_MAC_BYTES or not v[1]:
        raise ProtocolError("proxy_auth_bad", "malformed authentication TLV", status=400)
    n = v[1]
    try:
        name = v[2 : 2 + n].decode("ascii")
    except UnicodeDecodeError:
        raise ProtocolError("proxy_auth_bad", "edge name is not ASCII", status=400) from None
    (ms,) = struct.unpack_from(">Q", v, 2 + n)
    return AuthClaim(name, ms / 1000.0, bytes(v[-AUTH_MAC_BYTES:]))


def verify_auth(
    header: ProxyHeader,
    key: bytes,
    conn: tuple[Endpoint, Endpoint],
    now: float,
    max_skew_s: float,
) -> AuthClaim:
    """Check the header's authentication TLV under `key`, for the connection `conn` as the
    origin sees it ((peer address, port), (its own address, port)). Raises ProtocolError:
    proxy_auth_missing (none), proxy_auth_bad (malformed, or the MAC does not verify: another
    key, another connection, a changed header), proxy_auth_stale (time off by more than
    `max_skew_s`). The caller checks the name and replays."""
    claim = read_auth(header)
    if claim is None:
        raise ProtocolError("proxy_auth_missing", "no authentication TLV", status=400)
    raw = header.raw
    mac_at = -1
    for kind, at, tlen in _tlv_spans(raw):
        if kind == PP2_TYPE_BLINDFOLD_AUTH:
            mac_at = at + tlen - AUTH_MAC_BYTES
    try:
        expected = _auth_mac(key, raw, conn, mac_at)
    except ValueError:
        raise ProtocolError("proxy_auth_bad", "connection addresses unusable", status=400) from None
    if not hmac.compare_digest(expected, claim.mac):
        raise ProtocolError("proxy_auth_bad", f"MAC of {claim.name!r} does not verify", status=400)
    if abs(now - claim.timestamp) > max_skew_s:
        raise ProtocolError(
            "proxy_auth_stale",
            f"{claim.name!r} header {now - claim.timestamp:.1f} s old",
            status=400,
        )
    return claim


class ReplayCache:
    """MACs of authenticated headers seen within their validity: a header replayed on a new
    connection with the same addresses and ports (an on-path attacker can make one) within
    the allowed skew is refused. Bounded; full (only valid MACs fill it) means refuse."""

    def __init__(self, max_entries: int = 1_000_000) -> None:
        self.max_entries = max_entries
        self._seen: dict[bytes, float] = {}  # MAC prefix -> when it may be forgotten

    def first_time(self, mac: bytes, forget_at: float, now: float) -> bool:
        seen = self._seen
        key = mac[:16]
        old = seen.get(key)
        if old is not None and old > now:
            return False
        if len(seen) >= self.max_entries:
            for k in [k for k, t in seen.items() if t <= now]:
                del seen[k]
            if len(seen) >= self.max_entries:
                return False
        seen[key] = forget_at
        return True

    def sweep(self, now: float) -> None:
        """Forget what can no longer be replayed, oldest first (entries are added in about
        the order they expire; stragglers go when the cache fills)."""
        seen = self._seen
        while seen:
            key = next(iter(seen))
            if seen[key] > now:
                break
            del seen[key]

    def __len__(self) -> int:
        return len(self._seen)


def parse_auth_key(text: str) -> bytes:
    """The key file's text: hex (`openssl rand -hex 32`). Raises ValueError."""
    try:
        key = bytes.fromhex(text.strip())
    except ValueError:
        raise ValueError("not hex (make one with `openssl rand -hex 32`)") from None
    if len(key) < MIN_AUTH_KEY_BYTES:
        raise ValueError(f"{len(key)} bytes; at least {MIN_AUTH_KEY_BYTES} (openssl rand -hex 32)")
    return key


def load_auth_key(path: str, where: str) -> bytes:
    """A PROXY authentication key from its file; ConfigError names `where`."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(where, f"cannot read {path}: {exc}") from None
    try:
        return parse_auth_key(text)
    except ValueError as exc:
        raise ConfigError(where, f"{path}: {exc}") from None


# CRC32C (Castagnoli), needed for PP2_TYPE_CRC32C. The stdlib has only zlib's CRC32; a table is
# enough for headers of a few hundred bytes.
def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    c = 0xFFFFFFFF
    for b in data:
        c = _CRC_TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF
