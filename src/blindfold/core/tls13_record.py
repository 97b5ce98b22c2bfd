"""The TLS 1.3 record layer (RFC 8446 §5), sans-IO.

aioquic gives blindfold the TLS 1.3 handshake state machine but, being a QUIC library, no record
layer: QUIC protects handshake bytes in its own packets. This module is the part written here:
record framing, AEAD protection with per-record nonces, content-type hiding and padding removal,
size limits, and traffic-key updates. It holds no state machine of its own beyond what the
record layer needs (which keys are active and how many records each has protected); what a
record's content means is up to `tls13_server`.

Every error is a `ProtocolError` whose `alert` is the RFC 8446 §6.2 alert to answer with.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from blindfold.core.aioquic_compat import CipherSuite, cipher_suite_hash, hkdf_expand_label
from blindfold.errors import ProtocolError

# RFC 8446 §5.1 content types
CHANGE_CIPHER_SPEC = 20
ALERT = 21
HANDSHAKE = 22
APPLICATION_DATA = 23

# RFC 8446 §6 alerts used here
A_CLOSE_NOTIFY = 0
A_UNEXPECTED_MESSAGE = 10
A_BAD_RECORD_MAC = 20
A_RECORD_OVERFLOW = 22
A_HANDSHAKE_FAILURE = 40
A_ILLEGAL_PARAMETER = 47
A_DECODE_ERROR = 50
A_DECRYPT_ERROR = 51
A_PROTOCOL_VERSION = 70
A_INTERNAL_ERROR = 80
A_USER_CANCELED = 90
A_MISSING_EXTENSION = 109
A_NO_APPLICATION_PROTOCOL = 120

MAX_PLAINTEXT = 1 << 14  # §5.1: TLSPlaintext.length
MAX_INNER_PLAINTEXT = MAX_PLAINTEXT + 1  # §5.2: content + the inner type byte
MAX_CIPHERTEXT = MAX_PLAINTEXT + 256  # §5.2: TLSCiphertext.length
HEADER = struct.Struct(">BHH")
LEGACY_VERSION = 0x0303
TAG_LEN = 16

# AEAD limits (RFC 8446 §5.5, and the AEAD analysis it cites): rekey long before 2^24.5 full
# records under AES-GCM; ChaCha20-Poly1305 allows more, one threshold serves both.
DEFAULT_KEY_UPDATE_RECORDS = 1 << 23


_TYPE_BYTE = {t: bytes((t,)) for t in (CHANGE_CIPHER_SPEC, ALERT, HANDSHAKE, APPLICATION_DATA)}


def protocol_error(reason: str, alert: int, detail: str = "") -> ProtocolError:
    return ProtocolError(reason, detail, alert=alert)


class Record(NamedTuple):
    """One record as read from the wire: its outer content type and its payload (plaintext
    for unprotected records, the ciphertext otherwise)."""

    type: int
    header: bytes
    payload: bytes


class RecordReader:
    """Splits the byte stream into records. `feed` returns the complete ones; a partial record
    waits, bounded by the largest legal record."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> list[Record]:
        buf = self._buf + data if self._buf else data
        out: list[Record] = []
        pos = 0
        end = len(buf)
        while end - pos >= 5:
            ctype, _version, length = HEADER.unpack_from(buf, pos)
            # §5.1: legacy_record_version is ignored; §5.2: a record longer than a ciphertext
            # may be is an overflow whatever its type (plaintext records are checked later,
            # once it is known whether protection was on).
            if length > MAX_CIPHERTEXT:
                raise protocol_error(
                    "record_overflow", A_RECORD_OVERFLOW, f"record of {length} bytes"
                )
            if ctype not in (CHANGE_CIPHER_SPEC, ALERT, HANDSHAKE, APPLICATION_DATA):
                raise protocol_error(
                    "bad_record_type", A_UNEXPECTED_MESSAGE, f"content type {ctype}"
                )
            if end - pos - 5 < length:
                break
            out.append(Record(ctype, buf[pos : pos + 5], buf[pos + 5 : pos + 5 + length]))
            pos += 5 + length
        self._buf = buf[pos:] if pos < end else b""
        return out

    @property
    def pending(self) -> int:
        return len(self._buf)


# the hash of each TLS 1.3 suite (§B.4), made once: hash algorithm objects are immutable
_SUITE_HASH = {int(s): cipher_suite_hash(s) for s in map(CipherSuite, (0x1301, 0x1302, 0x1303))}


def derive_key_iv(cipher_suite: int, secret: bytes) -> tuple[bytes, bytes]:
    """§7.3: write key and IV from a traffic secret."""
    algorithm = _SUITE_HASH[cipher_suite]
    key_len = 16 if cipher_suite == CipherSuite.AES_128_GCM_SHA256 else 32
    key = hkdf_expand_label(algorithm, secret, b"key", b"", key_len)
    iv = hkdf_expand_label(algorithm, secret, b"iv", b"", 12)
    return key, iv


def next_traffic_secret(cipher_suite: int, secret: bytes) -> bytes:
    """§7.2: application_traffic_secret_N+1 after a KeyUpdate."""
    algorithm = _SUITE_HASH[cipher_suite]
    return hkdf_expand_label(algorithm, secret, b"traffic upd", b"", algorithm.digest_size)


class RecordProtection:
    """One direction's AEAD state (§5.2, §5.3): key, IV and the 64-bit record sequence number."""

    __slots__ = ("_aead", "_iv", "_iv_int", "cipher_suite", "secret", "seq")

    def __init__(self, cipher_suite: int, secret: bytes) -> None:
        self.cipher_suite = cipher_suite
        self.secret = secret
        key, self._iv = derive_key_iv(cipher_suite, secret)
        self._iv_int = int.from_bytes(self._iv, "big")
        self._aead: AESGCM | ChaCha20Poly1305 = (
            ChaCha20Poly1305(key)
            if cipher_suite == CipherSuite.CHACHA20_POLY1305_SHA256
            else AESGCM(key)
        )
        self.seq = 0

    def _nonce(self) -> bytes:
        # §5.3: the sequence number, left-padded to the IV length, XORed with the IV
        return (self._iv_int ^ self.seq).to_bytes(12, "big")

    def updated(self) -> RecordProtection:
        return RecordProtection(
            self.cipher_suite, next_traffic_secret(self.cipher_suite, self.secret)
        )

    def seal(self, content_type: int, data: bytes | memoryview) -> bytes:
        """One TLSCiphertext record holding `data` (at most MAX_PLAINTEXT bytes)."""
        if self.seq >= (1 << 64) - 1:  # §5.3: the sequence number must not wrap
            raise protocol_error("sequence_exhausted", A_INTERNAL_ERROR)
        # one copy of `data` into the inner plaintext, one join of header and ciphertext
        # (`bytes(data) + type` copied the content twice: ~13% of a 16 KiB record's cost)
        inner = b"".join((data, _TYPE_BYTE[content_type]))
        header = HEADER.pack(APPLICATION_DATA, LEGACY_VERSION, len(inner) + TAG_LEN)
        sealed = self._aead.encrypt(self._nonce(), inner, header)
        self.seq += 1
        return b"".join((header, sealed))

    def open(self, record: Record) -> tuple[int, bytes]:
        """Decrypt one protected record: (inner content type, content). §5.2, §5.4."""
        if record.type != APPLICATION_DATA:
            raise protocol_error(
                "unprotected_record",
                A_UNEXPECTED_MESSAGE,
                f"content type {record.type} after keys were set",
            )
        if len(record.payload) < TAG_LEN + 1:
            raise protocol_error("short_record", A_BAD_RECORD_MAC)
        try:
            inner = self._aead.decrypt(self._nonce(), record.payload, record.header)
        except Exception:  # cryptography.exceptions.InvalidTag
            raise protocol_error("bad_record_mac", A_BAD_RECORD_MAC) from None
        self.seq += 1
        if len(inner) > MAX_INNER_PLAINTEXT:
            raise protocol_error(
                "record_overflow", A_RECORD_OVERFLOW, f"inner plaintext of {len(inner)} bytes"
            )
        # §5.4: the content type is the last non-zero byte; all zeros is an error
        stripped = inner.rstrip(b"\x00")
        if not stripped:
            raise protocol_error("no_content_type", A_UNEXPECTED_MESSAGE, "record is all padding")
        return stripped[-1], stripped[:-1]


def plaintext_records(content_type: int, data: bytes) -> bytes:
    """Unprotected records (the ServerHello, early alerts), fragmented at MAX_PLAINTEXT."""
    out = bytearray()
    for i in range(0, len(data), MAX_PLAINTEXT):
        chunk = data[i : i + MAX_PLAINTEXT]
        out += HEADER.pack(content_type, LEGACY_VERSION, len(chunk)) + chunk
    return bytes(out)


CHANGE_CIPHER_SPEC_RECORD = HEADER.pack(CHANGE_CIPHER_SPEC, LEGACY_VERSION, 1) + b"\x01"
