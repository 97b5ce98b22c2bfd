"""Read a QUIC client's ClientHello from its Initial packets, holding no secret (sans-IO).

QUIC v1 and v2 Initial packets are protected with keys derived from the client's first
Destination Connection ID and a salt published in the RFCs (RFC 9001 §5.2, RFC 9369 §3.3.1):
anyone on the path can remove that protection. The edge does so only to read the ClientHello
(SNI, ALPN, JA4 with the `q` prefix) before it forwards a flow; it never holds a key that
protects anything else.

- `parse_datagram(data)`: the long-header packets of one datagram (RFC 9000 §12.2: coalesced,
  each ended by its Length field; what follows the last one, such as the zeros aioquic pads
  with, is ignored as §14.1 allows), or where a short-header packet begins.
- `InitialReader`: one flow's Initial packets, in any order and split however the client
  likes: header protection removed, payload decrypted (aioquic's `CryptoContext`, which is
  `cryptography`'s AES-GCM and AES-ECB underneath), frames parsed (only those RFC 9000 §12.4
  allows in an Initial), CRYPTO frames reassembled with hard bounds (bytes, disjoint ranges,
  packets) and checked for conflicting retransmissions, and the ClientHello parsed by
  `core.clienthello` once its bytes are contiguous.

Every problem raises `ProtocolError` with a stable `reason` (the edge counts drops by it).
Packet headers are parsed here rather than by `aioquic.quic.packet.pull_quic_header`: that one
reads the type bits and Length of every version as if it were v1 (a Version Negotiation
trigger from an unknown version must be read with RFC 8999's invariants only), and reports
problems as bare ValueErrors; the header is a few fields, and its parse is property-tested.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from aioquic._crypto import CryptoError
from aioquic.quic.crypto import (
    INITIAL_CIPHER_SUITE,
    INITIAL_SALT_VERSION_1,
    INITIAL_SALT_VERSION_2,
    CryptoContext,
)
from aioquic.tls import cipher_suite_hash, hkdf_expand_label, hkdf_extract

from blindfold.core.clienthello import ClientHello, parse_hello_message
from blindfold.errors import ProtocolError

QUIC_V1 = 0x00000001  # RFC 9000
QUIC_V2 = 0x6B3343CF  # RFC 9369 §3.1
SUPPORTED_VERSIONS = (QUIC_V1, QUIC_V2)
MIN_INITIAL_DATAGRAM = 1200  # RFC 9000 §14.1
MAX_CID_V1 = 20  # RFC 9000 §17.2 (and v2, RFC 9369 §3)
MIN_CLIENT_DCID = 8  # RFC 9000 §7.2: a client's first Destination Connection ID

INITIAL = "initial"
ZERO_RTT = "0rtt"
HANDSHAKE = "handshake"
RETRY = "retry"
VERSION_NEGOTIATION = "version_negotiation"
# the two long-packet-type bits (RFC 9000 §17.2 Table 5; RFC 9369 §3.2)
_LONG_TYPES = {
    QUIC_V1: (INITIAL, ZERO_RTT, HANDSHAKE, RETRY),
    QUIC_V2: (RETRY, INITIAL, ZERO_RTT, HANDSHAKE),
}

# RFC 9000 §12.4 Table 3: the frames an Initial packet may carry
FRAME_PADDING = 0x00
FRAME_PING = 0x01
FRAME_ACK = 0x02
FRAME_ACK_ECN = 0x03
FRAME_CRYPTO = 0x06
FRAME_CONNECTION_CLOSE = 0x1C
EXT_QUIC_TRANSPORT_PARAMETERS = 0x0039  # RFC 9001 §8.2
TLS13 = 0x0304
MAX_STREAM_OFFSET = (1 << 62) - 1  # RFC 9000 §19.6


def _fail(reason: str, detail: str) -> ProtocolError:
    return ProtocolError(reason, detail)


def read_varint(data: bytes, pos: int, end: int) -> tuple[int, int]:
    """RFC 9000 §16: a variable-length integer at `pos`; (value, position after it)."""
    if pos >= end:
        raise _fail("truncated", "variable-length integer past the end")
    first = data[pos]
    size = 1 << (first >> 6)
    if pos + size > end:
        raise _fail("truncated", "variable-length integer past the end")
    value = first & 0x3F
    for i in range(1, size):
        value = (value << 8) | data[pos + i]
    return value, pos + size


class LongHeader(NamedTuple):
    """A long-header packet (RFC 8999 §5.1 invariants; RFC 9000 §17.2 for v1, RFC 9369 for
    v2). Offsets are absolute in the datagram; `kind` is None for versions this module does
    not know (only the invariant fields are then meaningful)."""

    first: int  # the first byte, still under header protection
    version: int
    dcid: bytes
    scid: bytes
    kind: str | None
    token: bytes  # Initial: the address validation token (RFC 9000 §17.2.2)
    pn_offset: int  # Initial/0-RTT/Handshake: where the protected packet number starts
    start: int
    end: int


def parse_long_header(data: bytes, pos: int = 0) -> LongHeader:
    """The long-header packet at `pos`. For v1 and v2 the packet ends at its Length field; a
    Retry and a Version Negotiation packet take the rest of the datagram."""
    n = len(data)
    if pos + 7 > n:
        raise _fail("truncated", "long header shorter than 7 bytes")
    first = data[pos]
    if not first & 0x80:
        raise _fail("not_long_header", "header form bit is 0")
    version = int.from_bytes(data[pos + 1 : pos + 5], "big")
    p = pos + 5
    dlen = data[p]  # RFC 8999 §5.1: lengths up to 255 in the invariants
    p += 1
    if p + dlen + 1 > n:
        raise _fail("truncated", "destination connection ID past the end")
    dcid = bytes(data[p : p + dlen])
    p += dlen
    slen = data[p]
    p += 1
    if p + slen > n:
        raise _fail("truncated", "source connection ID past the end")
    scid = bytes(data[p : p + slen])
    p += slen
    if version == 0:  # RFC 9000 §17.2.1
        return LongHeader(first, version, dcid, scid, VERSION_NEGOTIATION, b"", p, pos, n)
    types = _LONG_TYPES.get(version)
    if types is None:
        return LongHeader(first, version, dcid, scid, None, b"", p, pos, n)
    if dlen > MAX_CID_V1 or slen > MAX_CID_V1:
        # RFC 9000 §17.2: a v1 long header with a longer ID MUST be dropped
        raise _fail("bad_cid_length", f"connection ID of {max(dlen, slen)} bytes")
    if not first & 0x40:
        # RFC 9000 §17.2: the fixed bit; packets with 0 MUST be discarded
        raise _fail("fixed_bit_zero", "the fixed bit is 0")
    kind = types[(first >> 4) & 0x03]
    token = b""
    if kind == RETRY:
        return LongHeader(first, version, dcid, scid, kind, b"", p, pos, n)
    if kind == INITIAL:
        tlen, p = read_varint(data, p, n)
        if p + tlen > n:
            raise _fail("truncated", "token past the end")
        token = bytes(data[p : p + tlen])
        p += tlen
    length, p = read_varint(data, p, n)
    end = p + length
    if end > n:
        raise _fail("truncated", f"{kind} packet of {length} bytes past the datagram's end")
    return LongHeader(first, version, dcid, scid, kind, token, p, pos, end)


@dataclass(frozen=True, slots=True)
class Datagram:
    """The packets of one datagram: `packets` are its long-header packets in order;
    `short_at` is the offset of a short-header packet that takes the rest (RFC 9000 §12.2),
    or None; `ignored` counts trailing bytes that are not a packet (padding after the Length,
    or a packet with another Destination Connection ID, which §12.2 says to ignore)."""

    packets: tuple[LongHeader, ...]
    short_at: int | None
    ignored: int


def parse_datagram(data: bytes) -> Datagram:
    """Split a datagram into its packets. Raises ProtocolError if the first packet is not a
    readable QUIC packet; later unreadable bytes are only ignored."""
    n = len(data)
    if n == 0:
        raise _fail("empty", "empty datagram")
    if not data[0] & 0x80:
        if not data[0] & 0x40:
            raise _fail("not_quic", "neither a long header nor a short header with fixed bit")
        return Datagram((), 0, 0)
    packets: list[LongHeader] = []
    pos = 0
    while pos < n:
        if packets:
            if not data[pos] & 0x80:
                if data[pos] & 0x40:
                    return Datagram(tuple(packets), pos, 0)
                return Datagram(tuple(packets), None, n - pos)
            try:
                header = parse_long_header(data, pos)
            except ProtocolError:
                return Datagram(tuple(packets), None, n - pos)
            if header.dcid != packets[0].dcid or header.version != packets[0].version:
                return Datagram(tuple(packets), None, n - pos)
        else:
            header = parse_long_header(data, pos)
        packets.append(header)
        if header.kind is None or header.kind in (RETRY, VERSION_NEGOTIATION):
            break  # the rest of the datagram belongs to this packet
        pos = header.end
    return Datagram(tuple(packets), None, 0)


def client_initial_keys(version: int, dcid: bytes) -> CryptoContext:
    """The keys that protect a client's Initial packets (RFC 9001 §5.2; RFC 9369 §3.3.1 salt
    and labels for v2), with aioquic's salts, HKDF and key schedule (`CryptoContext.setup`
    applies the v2 labels)."""
    if version not in SUPPORTED_VERSIONS:
        raise _fail("unsupported_version", f"version 0x{version:08x}")
    # CryptoPair.setup_initial derives both directions; the edge reads only the client's
    salt = INITIAL_SALT_VERSION_2 if version == QUIC_V2 else INITIAL_SALT_VERSION_1
    algorithm = cipher_suite_hash(INITIAL_CIPHER_SUITE)
    initial_secret = hkdf_extract(algorithm, salt, dcid)
    secret = hkdf_expand_label(algorithm, initial_secret, b"client in", b"", algorithm.digest_size)
    keys = CryptoContext()
    keys.setup(cipher_suite=INITIAL_CIPHER_SUITE, secret=secret, version=version)
    return keys


@dataclass(frozen=True, slots=True)
class InitialPayload:
    """What one decrypted Initial packet carried."""

    packet_number: int
    crypto: tuple[tuple[int, bytes], ...]  # (offset, data) of its CRYPTO frames
    ack_eliciting: bool
    connection_close: bool


def decrypt_initial(
    data: bytes, header: LongHeader, keys: CryptoContext, expected_pn: int
) -> InitialPayload:
    """Remove header protection (RFC 9001 §5.4) and packet protection (§5.3) from one Initial
    packet, then parse its frames."""
    packet = bytes(data[header.start : header.end])
    try:
        plain_header, payload, pn, _phase = keys.decrypt_packet(
            packet, header.pn_offset - header.start, expected_pn
        )
    except CryptoError as exc:  # too short to sample, or the AEAD tag did not verify
        raise _fail("undecryptable", str(exc) or "AEAD tag mismatch") from None
    if plain_header[0] & 0x0C:
        # RFC 9000 §17.2: reserved bits non-zero after removing protection
        raise _fail("reserved_bits", "reserved bits are not zero")
    return parse_initial_frames(payload, pn)


def parse_initial_frames(payload: bytes, pn: int = 0) -> InitialPayload:
    """The frames of a decrypted Initial packet (RFC 9000 §19). Anything RFC 9000 §12.4 does not
    allow in an Initial is a protocol violation; so is a packet without frames."""
    n = len(payload)
    if n == 0:
        raise _fail("no_frames", "Initial packet without frames")  # RFC 9000 §12.4
    pos = 0
    crypto: list[tuple[int, bytes]] = []
    eliciting = False
    close = False
    while pos < n:
        ftype = payload[pos]
        pos += 1
        if ftype == FRAME_PADDING:
            pos = n - len(payload[pos:].lstrip(b"\x00"))  # a run of PADDING, at C speed
        elif ftype == FRAME_PING:
            eliciting = True
        elif ftype in (FRAME_ACK, FRAME_ACK_ECN):
            pos = _skip_ack(payload, pos, n, ftype == FRAME_ACK_ECN)
        elif ftype == FRAME_CRYPTO:
            offset, pos = read_varint(payload, pos, n)
            length, pos = read_varint(payload, pos, n)
            if pos + length > n:
                raise _fail("frame_encoding", "CRYPTO frame past the packet's end")
            if offset + length > MAX_STREAM_OFFSET:
                raise _fail("frame_encoding", "CRYPTO frame past 2^62-1")
            crypto.append((offset, payload[pos : pos + length]))
            pos += length
            eliciting = True
        elif ftype == FRAME_CONNECTION_CLOSE:
            _code, pos = read_varint(payload, pos, n)
            _frame, pos = read_varint(payload, pos, n)
            rlen, pos = read_varint(payload, pos, n)
            if pos + rlen > n:
                raise _fail("frame_encoding", "CONNECTION_CLOSE reason past the packet's end")
            pos += rlen
            close = True
        else:
            # types are single bytes here; a longer (non-minimal) encoding of an allowed
            # type starts with 0x40.. and is refused too (RFC 9000 §12.4)
            raise _fail("frame_not_allowed", f"frame type 0x{ftype:02x} in an Initial packet")
    return InitialPayload(pn, tuple(crypto), eliciting, close)


def _skip_ack(payload: bytes, pos: int, n: int, ecn: bool) -> int:
    """RFC 9000 §19.3: check the ranges and skip the frame."""
    largest, pos = read_varint(payload, pos, n)
    _delay, pos = read_varint(payload, pos, n)
    count, pos = read_varint(payload, pos, n)
    first, pos = read_varint(payload, pos, n)
    smallest = largest - first
    if smallest < 0:
        raise _fail("frame_encoding", "ACK range below packet number 0")  # §19.3.1
    for _ in range(count):
        gap, pos = read_varint(payload, pos, n)
        length, pos = read_varint(payload, pos, n)
        smallest = smallest - gap - 2 - length
        if smallest < 0:
            raise _fail("frame_encoding", "ACK range below packet number 0")
    if ecn:
        for _ in range(3):
            _count, pos = read_varint(payload, pos, n)
    return pos


class CryptoAssembler:
    """Reassembles one CRYPTO stream (RFC 9000 §19.6) from frames in any order, with overlap
    allowed only where the bytes agree. Bounds: `max_bytes` of stream and `max_ranges`
    disjoint pieces held at once (a client that scatters one-byte frames far apart)."""

    __slots__ = ("_buf", "_ranges", "max_bytes", "max_ranges")

    def __init__(self, max_bytes: int, max_ranges: int) -> None:
        self.max_bytes = max_bytes
        self.max_ranges = max_ranges
        self._buf = bytearray()
        self._ranges: list[list[int]] = []  # sorted, disjoint, non-adjacent [start, end)

    @property
    def contiguous(self) -> int:
        """How many bytes from offset 0 have arrived."""
        r = self._ranges
        return r[0][1] if r and r[0][0] == 0 else 0

    def data(self, end: int) -> bytes:
        return bytes(self._buf[:end])

    def add(self, offset: int, data: bytes) -> None:
        if not data:
            return
        end = offset + len(data)
        if end > self.max_bytes:
            raise _fail("hello_too_large", f"CRYPTO data up to offset {end}")
        buf = self._buf
        # bytes already held must not change (a conflicting retransmission could show the
        # edge one ClientHello and the origin another)
        for start, stop in self._ranges:
            if stop <= offset:
                continue
            if start >= end:
                break
            lo, hi = max(start, offset), min(stop, end)
            if buf[lo:hi] != data[lo - offset : hi - offset]:
                raise _fail("crypto_mismatch", f"CRYPTO bytes {lo}..{hi} changed")
        if len(buf) < end:
            buf.extend(bytes(end - len(buf)))
        buf[offset:end] = data
        merged: list[list[int]] = []
        placed = False
        for r in self._ranges:
            if r[1] < offset:
                merged.append(r)
            elif r[0] > end:
                if not placed:
                    merged.append([offset, end])
                    placed = True
                merged.append(r)
            else:
                offset, end = min(offset, r[0]), max(end, r[1])
        if not placed:
            merged.append([offset, end])
        merged.sort()
        if len(merged) > self.max_ranges:
            raise _fail("crypto_gaps", f"more than {self.max_ranges} disjoint CRYPTO ranges")
        self._ranges = merged


@dataclass(frozen=True, slots=True)
class QuicHello:
    """What the edge learns from a QUIC client's first flight."""

    version: int
    dcid: bytes  # the client's original Destination Connection ID
    scid: bytes
    token: bool  # an address validation token was present (a Retry's or NEW_TOKEN's)
    hello: ClientHello  # ja4 starts with 'q'

    @property
    def sni(self) -> str | None:
        return self.hello.sni

    @property
    def ja4(self) -> str:
        return self.hello.ja4


def check_quic_hello(hello: ClientHello) -> None:
    """What RFC 9001 requires of a ClientHello carried by QUIC; a server would abort the
    handshake otherwise, so the edge drops the flow before it costs the origin anything."""
    if TLS13 not in hello.supported_versions:
        raise _fail("not_tls13", "QUIC needs TLS 1.3 (RFC 9001 §4.2)")
    if EXT_QUIC_TRANSPORT_PARAMETERS not in hello.ext_spans:
        raise _fail("no_transport_parameters", "no quic_transport_parameters (RFC 9001 §8.2)")
    if not hello.alpn:
        raise _fail("no_alpn", "QUIC needs ALPN (RFC 9001 §8.1)")


class InitialReader:
    """One flow's client Initial packets, from its first datagram on.

    `feed(data, header)` takes one Initial packet of a datagram (`parse_datagram`); it returns
    the `QuicHello` when the ClientHello has just become complete, else None. After that it
    keeps checking the client's later Initial packets: their CRYPTO bytes must repeat the ones
    seen, and a second ClientHello (after a HelloRetryRequest, RFC 9001 §4.7 / RFC 8446 §4.1.2)
    must name the same server and protocols. Keys follow the Retry a server may send
    (`retried`, RFC 9001 §5.2: the new Destination Connection ID) and a compatible version
    the server switches to (`negotiated`, RFC 9368 §2.3: v1 <-> v2, Initial keys of the new
    version from the same Destination Connection ID); Initials of the first version are still
    read (they may be in flight)."""

    __slots__ = (
        "_assembler",
        "_key_dcid",
        "_keys",
        "_largest_pn",
        "_next_message",
        "dcid",
        "hello",
        "max_packets",
        "packets",
        "version",
    )

    def __init__(
        self,
        version: int,
        dcid: bytes,
        *,
        max_hello_bytes: int = 16384,
        max_ranges: int = 64,
        max_packets: int = 32,
    ) -> None:
        self.version = version
        self.dcid = dcid
        self._key_dcid = dcid
        self._keys = {version: client_initial_keys(version, dcid)}
        self._assembler = CryptoAssembler(max_hello_bytes, max_ranges)
        self._largest_pn = -1
        self._next_message = 0  # stream offset of the next handshake message to parse
        self.max_packets = max_packets
        self.packets = 0
        self.hello: QuicHello | None = None

    def retried(self, new_dcid: bytes) -> None:
        """The server answered with a Retry whose Source Connection ID is `new_dcid`: the
        client's next Initial packets use keys derived from it."""
        self._key_dcid = new_dcid
        self._keys = {v: client_initial_keys(v, new_dcid) for v in self._keys}

    def negotiated(self, version: int) -> None:
        """The server answered in `version`, compatible with the client's (RFC 9368)."""
        if version not in self._keys:
            self._keys[version] = client_initial_keys(version, self._key_dcid)

    def feed(self, data: bytes, header: LongHeader) -> QuicHello | None:
        if header.kind != INITIAL:
            raise _fail("not_initial", f"{header.kind} packet")
        keys = self._keys.get(header.version)
        if keys is None:
            raise _fail("version_changed", "Initial packets of another version in the flow")
        self.packets += 1
        if self.packets > self.max_packets:
            raise _fail("too_many_initials", f"more than {self.max_packets} Initial packets")
        payload = decrypt_initial(data, header, keys, self._largest_pn + 1)
        self._largest_pn = max(self._largest_pn, payload.packet_number)
        assembler = self._assembler
        for offset, chunk in payload.crypto:
            assembler.add(offset, chunk)
        found: QuicHello | None = None
        have = assembler.contiguous
        while have - self._next_message >= 4:
            start = self._next_message
            head = assembler.data(start + 4)[start:]
            if head[0] != 1:  # RFC 8446 §4: a client sends only ClientHellos in Initials
                raise _fail("not_client_hello", f"handshake message type {head[0]}")
            end = start + 4 + int.from_bytes(head[1:4], "big")
            if end > assembler.max_bytes:
                raise _fail("hello_too_large", f"ClientHello of {end - start} bytes")
            if have < end:
                break
            hello = parse_hello_message(assembler.data(end)[start:], "q")
            self._next_message = end
            if self.hello is None:
                check_quic_hello(hello)
                found = self.hello = QuicHello(
                    self.version, self.dcid, header.scid, bool(header.token), hello
                )
            elif hello.sni != self.hello.hello.sni or hello.alpn != self.hello.hello.alpn:
                raise _fail("hello_changed", "a second ClientHello names another server")
        return found
