"""RFC 8188 `aes128gcm` content encoding: a sealer and an incremental (streaming) opener.

Sans-IO. Written over `cryptography`'s AES-GCM and HKDF rather than the `http-ece` package
because blind delivery needs what that package does not offer: decryption record by record
as bytes arrive (bounded memory for a 50 MB blob, plaintext released per authenticated
record), exact control over where padding goes (size buckets), and typed errors. The tests
check interoperability both ways against `http-ece`.

Layout (RFC 8188 §2): header = salt(16) | rs(uint32) | idlen(uint8) | keyid, then records of
exactly `rs` bytes each (the last may be shorter); a record is AES-GCM(plaintext | delimiter
| zeros), delimiter 0x01 in every record but the last, 0x02 in the last.
"""

from __future__ import annotations

import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from blindfold.errors import VerificationError

KEY_BYTES = 16
SALT_BYTES = 16
TAG_BYTES = 16
HEADER_MIN = SALT_BYTES + 4 + 1
MIN_RS = TAG_BYTES + 2  # RFC 8188 §2: rs must be at least 18
DEFAULT_RS = 65536
MAX_RS = 1 << 24  # an opener refuses bigger records: it must buffer one record
_CEK_INFO = b"Content-Encoding: aes128gcm\x00"  # RFC 8188 §2.2
_NONCE_INFO = b"Content-Encoding: nonce\x00"  # RFC 8188 §2.3


def _derive(key: bytes, salt: bytes) -> tuple[AESGCM, int]:
    if len(key) != KEY_BYTES:
        raise VerificationError(f"aes128gcm key must be {KEY_BYTES} bytes, got {len(key)}")
    mac = hmac.HMAC(salt, hashes.SHA256())  # RFC 5869 HKDF-Extract(salt, IKM = key)
    mac.update(key)
    prk = mac.finalize()
    cek = HKDFExpand(hashes.SHA256(), 16, _CEK_INFO).derive(prk)
    nonce = HKDFExpand(hashes.SHA256(), 12, _NONCE_INFO).derive(prk)
    return AESGCM(cek), int.from_bytes(nonce, "big")


def _nonce(base: int, seq: int) -> bytes:
    return (base ^ seq).to_bytes(12, "big")  # RFC 8188 §2.3: NONCE XOR SEQ


def padme(length: int) -> int:
    """The Padmé size bucket for `length` (Nikitin et al., PURBs, PETS 2019): at most ~12%
    bigger, and a padded size leaks O(log log n) bits instead of O(log n)."""
    if length < 2:
        return length
    e = length.bit_length() - 1
    s = e.bit_length()
    mask = (1 << (e - s)) - 1
    return (length + mask) & ~mask


def sealed_size(plain_len: int, rs: int, keyid: bytes = b"") -> int:
    """Smallest aes128gcm output for `plain_len` bytes in records of `rs`."""
    data = rs - TAG_BYTES - 1
    records = max(1, -(-plain_len // data))
    return HEADER_MIN + len(keyid) + plain_len + records * (TAG_BYTES + 1)


def _layout(plain_len: int, rs: int, body: int) -> list[int]:
    """Record sizes (ciphertext bytes) summing to at least `body`: all `rs` but the last,
    each at least 17 bytes, with room for `plain_len` bytes of data."""
    full, last = divmod(body, rs)
    if last == 0:
        full, last = full - 1, rs
    if last < TAG_BYTES + 1:
        last = TAG_BYTES + 1
    sizes = [rs] * full + [last]
    if sum(s - TAG_BYTES - 1 for s in sizes) < plain_len:  # cannot happen for body >= minimum
        raise ValueError("padding layout too small")
    return sizes


def seal(
    plaintext: bytes,
    key: bytes,
    *,
    rs: int = DEFAULT_RS,
    salt: bytes | None = None,
    pad_to: int = 0,
    keyid: bytes = b"",
) -> bytes:
    """Encrypt `plaintext` as aes128gcm. The output is padded (zeros inside the records, so
    the padding is encrypted and authenticated too) to at least `pad_to` bytes."""
    if not MIN_RS <= rs <= MAX_RS:
        raise ValueError(f"record size must be in [{MIN_RS}, {MAX_RS}], got {rs}")
    if len(keyid) > 255:
        raise ValueError("keyid longer than 255 bytes")
    salt = os.urandom(SALT_BYTES) if salt is None else salt
    if len(salt) != SALT_BYTES:
        raise ValueError(f"salt must be {SALT_BYTES} bytes")
    aead, base = _derive(key, salt)
    header = salt + struct.pack("!IB", rs, len(keyid)) + keyid
    minimum = sealed_size(len(plaintext), rs, keyid)
    sizes = _layout(len(plaintext), rs, max(minimum, pad_to) - len(header))
    out = [header]
    view = memoryview(plaintext)
    pos = 0
    for seq, size in enumerate(sizes):
        room = size - TAG_BYTES - 1
        chunk = view[pos : pos + room]
        pos += len(chunk)
        delim = b"\x02" if seq == len(sizes) - 1 else b"\x01"
        record = bytes(chunk) + delim + bytes(room - len(chunk))
        out.append(aead.encrypt(_nonce(base, seq), record, None))
    return b"".join(out)


class Opener:
    """Streaming aes128gcm decryption: `feed(data)` returns the plaintext of every record
    completed so far, `finish()` checks that the stream ended with its last record.

    A record is released only after its tag verifies, and a record is known to be the last
    one only by its delimiter, so truncation, reordering, dropping or altering records is
    detected (RFC 8188 §4). Memory is bounded by one record (`max_rs`)."""

    def __init__(self, key: bytes, *, max_rs: int = MAX_RS) -> None:
        self._key = key
        self._max_rs = max_rs
        self._buf = bytearray()
        self._aead: AESGCM | None = None
        self._base = 0
        self._rs = 0
        self._seq = 0
        self._done = False
        self.keyid = b""

    def feed(self, data: bytes) -> list[bytes]:
        if self._done and data:
            raise VerificationError("aes128gcm: data after the last record")
        self._buf += data
        out: list[bytes] = []
        if self._aead is None and not self._read_header():
            return out
        # A full record is processed once a byte beyond it has arrived: only then can we
        # know it is not the (short or exactly rs-sized) last one. Records are decrypted
        # where they lie; the buffer is shifted once per feed, not once per record.
        rs, pos = self._rs, 0
        with memoryview(self._buf) as view:
            while len(self._buf) - pos > rs:
                out.append(self._open(view[pos : pos + rs], final_stream=False))
                pos += rs
        del self._buf[:pos]
        if self._done and self._buf:
            raise VerificationError("aes128gcm: data after the last record")
        return [p for p in out if p]

    def finish(self) -> bytes:
        """The plaintext of the final record; raises when the stream is truncated."""
        if self._done:
            if self._buf:
                raise VerificationError("aes128gcm: data after the last record")
            return b""
        if self._aead is None:
            raise VerificationError("aes128gcm: truncated header")
        if not self._buf:
            raise VerificationError("aes128gcm: truncated (no last record)")
        plain = self._open(bytes(self._buf), final_stream=True)
        self._buf.clear()
        if not self._done:
            raise VerificationError("aes128gcm: truncated (last record not marked last)")
        return plain

    def _read_header(self) -> bool:
        if len(self._buf) < HEADER_MIN:
            return False
        rs, idlen = struct.unpack_from("!IB", self._buf, SALT_BYTES)
        if len(self._buf) < HEADER_MIN + idlen:
            return False
        if rs < MIN_RS:
            raise VerificationError(f"aes128gcm: record size {rs} below {MIN_RS}")
        if rs > self._max_rs:
            raise VerificationError(f"aes128gcm: record size {rs} over the limit {self._max_rs}")
        salt = bytes(self._buf[:SALT_BYTES])
        self.keyid = bytes(self._buf[HEADER_MIN : HEADER_MIN + idlen])
        self._aead, self._base = _derive(self._key, salt)
        self._rs = rs
        del self._buf[: HEADER_MIN + idlen]
        return True

    def _open(self, record: bytes | memoryview, *, final_stream: bool) -> bytes:
        if self._done:
            raise VerificationError("aes128gcm: data after the last record")
        if len(record) <= TAG_BYTES or self._aead is None:
            raise VerificationError("aes128gcm: record too short")
        try:
            plain = self._aead.decrypt(_nonce(self._base, self._seq), record, None)
        except InvalidTag:
            raise VerificationError(
                f"aes128gcm: record {self._seq} does not authenticate (wrong key, or altered)"
            ) from None
        self._seq += 1
        body = plain.rstrip(b"\x00")  # RFC 8188 §2: padding is zeros after the delimiter
        if not body:
            raise VerificationError("aes128gcm: record without a delimiter")
        delim = body[-1]
        if delim == 2:
            self._done = True
        elif delim != 1:
            raise VerificationError(f"aes128gcm: bad delimiter {delim}")
        elif final_stream:
            raise VerificationError("aes128gcm: truncated (last record not marked last)")
        return body[:-1]


def open_all(blob: bytes, key: bytes, *, max_rs: int = MAX_RS) -> bytes:
    """Decrypt a whole aes128gcm body."""
    opener = Opener(key, max_rs=max_rs)
    parts = opener.feed(blob)
    parts.append(opener.finish())
    return b"".join(parts)
