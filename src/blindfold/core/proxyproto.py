"""PROXY protocol v1 and v2 (HAProxy's proxy-protocol.txt): writer for the edge, parser for the
origin agent. Sans-IO: `parse_proxy_header(buf)` returns None until the header is complete."""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass, field

from blindfold.errors import ProtocolError

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
    return ProxyHeader(version=2, local=local, src=src, dst=dst, tlvs=tuple(tlvs)), total


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
