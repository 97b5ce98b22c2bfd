"""Peek at a TLS ClientHello without terminating TLS (RFC 8446 §4.1.2, §5.1).

`HelloReader.feed(data)` is called with each read from the visitor. It returns None while more
bytes are needed, a `ClientHello` once the whole handshake message has arrived (it may span
several TLS records and TCP reads), and raises `ProtocolError` with a stable `reason` on
anything that is not a well-formed ClientHello. The reader keeps its place across reads (the
offset of the next record, the handshake bytes reassembled so far), so each byte is looked at
once however the hello is cut: RFC 8446 §5.1 allows handshake records of any length >= 1, and a
hello re-parsed from the start on every read cost O(n^2) (~0.5 s of CPU for one hello in 1-byte
records). It also bounds the records a hello may span (`max_records`). `peek_client_hello(buf)`
is the one-shot form. The edge forwards the bytes unchanged; this module only reads them. It
parses only what the edge uses (SNI, ALPN, versions, signature algorithms, the extension list)
and keeps the rest as spans of the message, parsed on demand.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from blindfold.core.ja4 import ja4_fingerprint
from blindfold.errors import ProtocolError

RECORD_HANDSHAKE = 22
HANDSHAKE_CLIENT_HELLO = 1
MAX_RECORD_PLAINTEXT = 1 << 14  # RFC 8446 §5.1
# Records one ClientHello may span. Browsers and TLS libraries send it in one record (two when
# it exceeds 16 KiB); tools that fragment it to evade SNI filtering use a few to a few dozen.
MAX_HELLO_RECORDS = 64

EXT_SERVER_NAME = 0x0000
EXT_SUPPORTED_GROUPS = 0x000A
EXT_SIGNATURE_ALGORITHMS = 0x000D
EXT_ALPN = 0x0010
EXT_PRE_SHARED_KEY = 0x0029
EXT_EARLY_DATA = 0x002A
EXT_SUPPORTED_VERSIONS = 0x002B
EXT_KEY_SHARE = 0x0033

# TLS alerts (RFC 8446 §6): what a terminating server would answer with.
ALERT_DECODE_ERROR = 50
ALERT_ILLEGAL_PARAMETER = 47
ALERT_UNEXPECTED_MESSAGE = 10
ALERT_RECORD_OVERFLOW = 22
ALERT_UNRECOGNIZED_NAME = 112

_PARSED_EXTENSIONS = frozenset(
    (EXT_SERVER_NAME, EXT_ALPN, EXT_SUPPORTED_VERSIONS, EXT_SIGNATURE_ALGORITHMS)
)
_U16 = struct.Struct(">H")
_REC = struct.Struct(">BHH")
_EXT = struct.Struct(">HH")


def is_grease(value: int) -> bool:
    """RFC 8701 GREASE values: 0x?a?a with both bytes equal."""
    return (value & 0x0F0F) == 0x0A0A and (value >> 8) == (value & 0xFF)


class ClientHello(NamedTuple):
    """What the edge may learn from the cleartext ClientHello. (A NamedTuple: built once per
    connection on the hot path, several times cheaper than a frozen dataclass.)"""

    legacy_version: int
    sni: str | None
    alpn: tuple[bytes, ...]
    supported_versions: tuple[int, ...]
    cipher_suites: tuple[int, ...]
    extensions: tuple[int, ...]  # extension types in the order sent, GREASE included
    signature_algorithms: tuple[int, ...]
    ja4: str
    record_bytes: int  # bytes of the input that carried the hello (whole records)
    message: bytes  # the handshake message: type, length, body
    ext_spans: dict[int, tuple[int, int]]  # extension type -> (start, end) in `message`

    @property
    def max_version(self) -> int:
        versions = [v for v in self.supported_versions if not is_grease(v)]
        return max(versions) if versions else self.legacy_version

    @property
    def alpn_text(self) -> tuple[str, ...]:
        return tuple(p.decode("ascii", "backslashreplace") for p in self.alpn)

    def extension(self, ext_type: int) -> bytes | None:
        span = self.ext_spans.get(ext_type)
        return None if span is None else self.message[span[0] : span[1]]

    @property
    def supported_groups(self) -> tuple[int, ...]:
        data = self.extension(EXT_SUPPORTED_GROUPS)
        return () if data is None else _parse_u16_list(data, 0, 2, len(data), "supported_groups")

    @property
    def key_share_groups(self) -> tuple[int, ...]:
        data = self.extension(EXT_KEY_SHARE)
        return () if data is None else _parse_key_share(data)


def _fail(reason: str, detail: str, alert: int = ALERT_DECODE_ERROR) -> ProtocolError:
    return ProtocolError(reason, detail, alert=alert)


def peek_client_hello(
    buf: bytes | bytearray, max_bytes: int = 16384, max_records: int = MAX_HELLO_RECORDS
) -> ClientHello | None:
    """Return the ClientHello at the start of `buf`, or None if more bytes are needed."""
    return HelloReader(max_bytes, max_records).feed(buf)


class HelloReader:
    """Reads one ClientHello from a stream of reads (RFC 8446 §5.1 record framing, §4.1.2
    message). `raw` is every byte fed so far (what the edge forwards unchanged)."""

    __slots__ = ("_msg", "_need", "_pos", "_raw", "_records", "max_bytes", "max_records")

    def __init__(self, max_bytes: int = 16384, max_records: int = MAX_HELLO_RECORDS) -> None:
        self.max_bytes = max_bytes
        self.max_records = max_records
        self._raw: bytes | bytearray = b""
        self._pos = 0  # offset in raw of the next record header
        self._msg = bytearray()  # handshake bytes of the records read so far
        self._need = -1  # total handshake bytes needed (4 + body), once known
        self._records = 0

    @property
    def raw(self) -> bytes:
        raw = self._raw
        return raw if isinstance(raw, bytes) else bytes(raw)

    def __len__(self) -> int:
        return len(self._raw)

    def feed(self, data: bytes | bytearray) -> ClientHello | None:
        """Add one read; the ClientHello once complete (later calls are not expected)."""
        raw = self._raw
        if not raw:
            raw = self._raw = data  # the usual case: the whole hello in one read, no copy
        elif data:
            if isinstance(raw, bytes):
                raw = self._raw = bytearray(raw)
            raw += data
        n = len(raw)
        if n == 0:
            return None
        if self._pos == 0:
            first = raw[0]
            if first != RECORD_HANDSHAKE:
                if first & 0x80:
                    raise _fail(
                        "sslv2_hello", "SSLv2-style record header", ALERT_UNEXPECTED_MESSAGE
                    )
                raise _fail(
                    "not_tls",
                    f"first byte 0x{first:02x} is not a TLS handshake record",
                    ALERT_UNEXPECTED_MESSAGE,
                )
        max_bytes = self.max_bytes
        pos = self._pos
        msg = self._msg
        while True:
            if n - pos < 5:
                if pos < n and raw[pos] != RECORD_HANDSHAKE:
                    raise _fail(
                        "bad_record",
                        "non-handshake record inside the ClientHello",
                        ALERT_UNEXPECTED_MESSAGE,
                    )
                if n - pos > 1 and raw[pos + 1] != 3:
                    raise _fail("not_tls", "record version major is not 3")
                break
            ctype, version, length = _REC.unpack_from(raw, pos)
            if ctype != RECORD_HANDSHAKE:
                raise _fail(
                    "bad_record",
                    "non-handshake record inside the ClientHello",
                    ALERT_UNEXPECTED_MESSAGE,
                )
            if version >> 8 != 3:
                raise _fail("not_tls", f"record version 0x{version:04x}")
            if length == 0:
                # RFC 8446 §5.1: zero-length handshake fragments MUST NOT be sent
                raise _fail(
                    "empty_record", "zero-length handshake record", ALERT_UNEXPECTED_MESSAGE
                )
            if length > MAX_RECORD_PLAINTEXT:
                raise _fail("record_overflow", f"record of {length} bytes", ALERT_RECORD_OVERFLOW)
            if pos + 5 + length > max_bytes:
                raise _fail("hello_too_large", f"record ends past {max_bytes} bytes")
            if n - pos - 5 < length:
                break
            start = pos + 5
            pos = self._pos = start + length
            self._records += 1
            if not msg and length >= 4:
                # fast path: the record holds the message's header, perhaps all of it
                need = self._need = self._message_length(raw[start : start + 4])
                if length >= need:
                    return _parse_message(bytes(raw[start : start + need]), pos)
            msg += raw[start:pos]
            if self._need < 0 and len(msg) >= 4:
                self._need = self._message_length(msg)
            if 0 <= self._need <= len(msg):
                return _parse_message(bytes(msg[: self._need]), pos)
            if self._records >= self.max_records:
                raise _fail(
                    "hello_too_many_records",
                    f"ClientHello not complete within {self.max_records} records",
                )
        if n >= max_bytes:
            raise _fail("hello_too_large", f"no complete ClientHello within {max_bytes} bytes")
        return None

    def _message_length(self, head: bytes | bytearray) -> int:
        """RFC 8446 §4: msg_type, then a 24-bit length."""
        if head[0] != HANDSHAKE_CLIENT_HELLO:
            raise _fail("not_client_hello", f"handshake type {head[0]}", ALERT_UNEXPECTED_MESSAGE)
        need = 4 + int.from_bytes(head[1:4], "big")
        if need > self.max_bytes:
            raise _fail("hello_too_large", f"ClientHello of {need} bytes")
        return need


def parse_hello_message(msg: bytes, transport: str = "t") -> ClientHello:
    """Parse one whole ClientHello handshake message (type, length, body) that arrived without
    TLS records: QUIC carries it in CRYPTO frames (RFC 9001 §4.1.3); JA4's `transport` is then
    'q'. The message must be exactly one ClientHello."""
    if len(msg) < 4 or msg[0] != HANDSHAKE_CLIENT_HELLO:
        raise _fail("not_client_hello", "not a ClientHello message", ALERT_UNEXPECTED_MESSAGE)
    if 4 + int.from_bytes(msg[1:4], "big") != len(msg):
        raise _fail("malformed_hello", "ClientHello length does not match the message")
    return _parse_message(msg, 0, transport)


def _parse_message(msg: bytes, record_bytes: int, transport: str = "t") -> ClientHello:
    """Parse a whole ClientHello handshake message (RFC 8446 §4.1.2). Offsets are absolute in
    `msg` so only the fields the edge keeps are copied."""
    end = len(msg)
    if end < 4 + 38:
        raise _fail("malformed_hello", "ClientHello too short")
    legacy_version = _U16.unpack_from(msg, 4)[0]
    pos = 4 + 34  # header, version, random
    sid_len = msg[pos]
    if sid_len > 32:
        raise _fail("malformed_hello", "legacy_session_id longer than 32", ALERT_ILLEGAL_PARAMETER)
    pos += 1 + sid_len
    if pos + 2 > end:
        raise _fail("malformed_hello", "truncated before cipher_suites")
    cs_len = _U16.unpack_from(msg, pos)[0]
    pos += 2
    if cs_len < 2 or cs_len & 1 or pos + cs_len > end:
        raise _fail("malformed_hello", "bad cipher_suites length")
    cipher_bytes = msg[pos : pos + cs_len]
    pos += cs_len
    if pos >= end:
        raise _fail("malformed_hello", "truncated before compression_methods")
    comp_len = msg[pos]
    if comp_len < 1 or pos + 1 + comp_len > end:
        raise _fail("malformed_hello", "bad compression_methods length")
    pos += 1 + comp_len

    sni: str | None = None
    alpn: tuple[bytes, ...] = ()
    versions: tuple[int, ...] = ()
    sigalgs: tuple[int, ...] = ()
    sigalg_bytes = b""
    spans: dict[int, tuple[int, int]] = {}
    if pos < end:  # extensions are optional before TLS 1.3
        if pos + 2 > end:
            raise _fail("malformed_hello", "truncated extensions length")
        ext_len = _U16.unpack_from(msg, pos)[0]
        pos += 2
        if pos + ext_len != end:
            raise _fail("malformed_hello", "extensions length does not match the message")
        unpack = _EXT.unpack_from
        while pos < end:
            if pos + 4 > end:
                raise _fail("malformed_hello", "truncated extension header")
            etype, elen = unpack(msg, pos)
            start = pos + 4
            pos = start + elen
            if pos > end:
                raise _fail("malformed_hello", f"extension 0x{etype:04x} overruns the message")
            if etype in spans:
                # RFC 8446 §4.2: no more than one extension of each type
                raise _fail(
                    "malformed_hello", f"duplicate extension 0x{etype:04x}", ALERT_ILLEGAL_PARAMETER
                )
            spans[etype] = (start, pos)
            if etype not in _PARSED_EXTENSIONS:  # most of them: one test instead of four
                continue
            if etype == EXT_SERVER_NAME:
                sni = _parse_sni(msg[start:pos])
            elif etype == EXT_ALPN:
                alpn = _parse_alpn(msg, start, pos)
            elif etype == EXT_SUPPORTED_VERSIONS:
                versions = _parse_u16_list(msg, start, 1, pos, "supported_versions")
            else:  # EXT_SIGNATURE_ALGORITHMS
                sigalgs = _parse_u16_list(msg, start, 2, pos, "signature_algorithms")
                sigalg_bytes = msg[start:pos]
    exts = tuple(spans)
    ja4 = ja4_fingerprint(
        legacy_version,
        versions,
        sni is not None,
        cipher_bytes,
        exts,
        sigalg_bytes,
        alpn[0] if alpn else None,
        transport,
    )
    return ClientHello(
        legacy_version,
        sni,
        alpn,
        versions,
        struct.unpack(f">{cs_len // 2}H", cipher_bytes),
        exts,
        sigalgs,
        ja4,
        record_bytes,
        msg,
        spans,
    )


def _parse_u16_list(data: bytes, pos: int, prefix: int, stop: int, what: str) -> tuple[int, ...]:
    n = stop - pos
    if n < prefix:
        raise _fail("malformed_hello", f"truncated {what}")
    length = data[pos] if prefix == 1 else _U16.unpack_from(data, pos)[0]
    if length != n - prefix or length < 2 or length & 1:
        raise _fail("malformed_hello", f"bad {what} length")
    return struct.unpack_from(f">{length // 2}H", data, pos + prefix)


_SNI_CACHE: dict[bytes, str] = {}


def _parse_sni(data: bytes) -> str:
    # RFC 6066 §3: ServerNameList of (NameType, HostName); one host_name at most
    n = len(data)
    if n < 2 or _U16.unpack_from(data, 0)[0] != n - 2:
        raise _fail("malformed_hello", "bad server_name list length")
    pos = 2
    host: bytes | None = None
    while pos < n:
        if pos + 3 > n:
            raise _fail("malformed_hello", "truncated server_name entry")
        name_type = data[pos]
        length = _U16.unpack_from(data, pos + 1)[0]
        pos += 3
        if length == 0 or pos + length > n:
            raise _fail("malformed_hello", "bad server_name entry length")
        if name_type == 0:
            if host is not None:
                raise _fail("malformed_hello", "two host_name entries", ALERT_ILLEGAL_PARAMETER)
            host = data[pos : pos + length]
        pos += length
    if host is None:
        raise _fail("malformed_hello", "server_name without a host_name")
    name = _SNI_CACHE.get(host)
    if name is None:
        name = _check_hostname(host)
        if len(_SNI_CACHE) >= 4096:
            _SNI_CACHE.clear()
        _SNI_CACHE[host] = name
    return name


_HOST_CHARS = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


def _check_hostname(host: bytes) -> str:
    if host.endswith(b"."):
        host = host[:-1]  # RFC 6066 forbids the trailing dot; tolerate it like servers do
    if not host or len(host) > 253:
        raise _fail("bad_sni", f"server name of {len(host)} bytes", ALERT_UNRECOGNIZED_NAME)
    if not _HOST_CHARS.issuperset(host):
        raise _fail(
            "bad_sni",
            "server name is not an ASCII hostname (IDNs use xn-- labels)",
            ALERT_UNRECOGNIZED_NAME,
        )
    for label in host.split(b"."):
        if not label or len(label) > 63 or label[0] == 0x2D or label[-1] == 0x2D:
            raise _fail(
                "bad_sni",
                "server name has an empty, long or dash-edged label",
                ALERT_UNRECOGNIZED_NAME,
            )
    return host.decode("ascii").lower()


def _parse_alpn(data: bytes, pos: int, stop: int) -> tuple[bytes, ...]:
    # RFC 7301 §3.1: ProtocolNameList <2..2^16-1> of ProtocolName <1..2^8-1>
    n = stop - pos
    if n <= 2 or _U16.unpack_from(data, pos)[0] != n - 2:
        raise _fail("malformed_hello", "bad ALPN list length")
    pos += 2
    out = []
    while pos < stop:
        length = data[pos]
        pos += 1
        if length == 0 or pos + length > stop:
            raise _fail("malformed_hello", "bad ALPN protocol name length")
        out.append(data[pos : pos + length])
        pos += length
    return tuple(out)


def _parse_key_share(data: bytes) -> tuple[int, ...]:
    # RFC 8446 §4.2.8: client_shares <0..2^16-1> of (group, key_exchange<1..2^16-1>)
    n = len(data)
    if n < 2 or _U16.unpack_from(data, 0)[0] != n - 2:
        raise _fail("malformed_hello", "bad key_share length")
    pos = 2
    out = []
    while pos < n:
        if pos + 4 > n:
            raise _fail("malformed_hello", "truncated key_share entry")
        group, length = _EXT.unpack_from(data, pos)
        pos += 4
        if length == 0 or pos + length > n:
            raise _fail("malformed_hello", "bad key_share entry length")
        out.append(group)
        pos += length
    return tuple(out)
