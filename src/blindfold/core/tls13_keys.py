"""The TLS 1.3 key schedule (RFC 8446 §7.1) on hashlib and OpenSSL's one-shot HMAC.

The keyless engine's handshake runs about 20 HKDF-Expand-Label calls per connection (handshake
and application secrets, four record keys and IVs, two Finished keys, a binder key when
resuming, the resumption secret). aioquic's `hkdf_expand_label` builds a `cryptography`
`HKDFExpand` object for each, and its `KeySchedule` keeps the transcript in a `cryptography`
`Hash`: per call that is object set-up around a single HMAC. Here HKDF-Expand is
`hmac.digest` (OpenSSL's HMAC in one call, constant-time like any OpenSSL HMAC) over the
RFC 8446 §7.1 HkdfLabel, and the transcript is a `hashlib` object. Same bytes out: the
module checks itself against aioquic's key schedule and RFC 8448 when it is imported
(`core.aioquic_compat` raises if aioquic's own changed), and tests/unit/test_tls13_keys.py
compares every method on random inputs.

Also: the Early Secret of a handshake without a PSK and the "derived" secret made from it
(§7.1: HKDF-Extract(0, 0) and Derive-Secret(., "derived", "")) are the same for every such
handshake of a hash; they are computed once per hash instead of once per connection.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from typing import Any, Protocol

SERVER_CONTEXT_STRING = b"TLS 1.3, server CertificateVerify"


class _Hash(Protocol):
    def update(self, data: bytes, /) -> None: ...
    def copy(self) -> _Hash: ...
    def digest(self) -> bytes: ...


class _HashInfo:
    __slots__ = ("derived", "digest_size", "early", "empty", "name", "new", "zeros")

    def __init__(self, name: str, new: Callable[[], Any]) -> None:
        self.name = name
        self.new = new
        self.digest_size: int = new().digest_size
        self.zeros = bytes(self.digest_size)
        self.empty: bytes = new().digest()
        # §7.1 without a PSK: Early Secret = HKDF-Extract(salt 0, IKM 0), then its "derived"
        self.early = hmac.digest(self.zeros, self.zeros, name)
        self.derived = hkdf_expand_label_named(
            self, self.early, b"derived", self.empty, self.digest_size
        )


def hkdf_expand_label_named(
    h: _HashInfo, secret: bytes, label: bytes, context: bytes, length: int
) -> bytes:
    """RFC 8446 §7.1 HKDF-Expand-Label(secret, label, context, length) (RFC 5869 §2.3)."""
    full = b"tls13 " + label
    info = bytes((length >> 8, length & 0xFF, len(full))) + full + bytes((len(context),)) + context
    name = h.name
    if length <= h.digest_size:  # every use in TLS 1.3: one block
        return hmac.digest(secret, info + b"\x01", name)[:length]
    if length > 255 * h.digest_size:
        raise ValueError("HKDF-Expand: length too large")
    out = b""
    block = b""
    i = 0
    while len(out) < length:
        i += 1
        block = hmac.digest(secret, block + info + bytes((i,)), name)
        out += block
    return out[:length]


_BY_NAME: dict[str, _HashInfo] = {
    "sha256": _HashInfo("sha256", hashlib.sha256),
    "sha384": _HashInfo("sha384", hashlib.sha384),
}
# TLS 1.3 cipher suites (RFC 8446 §B.4) and their hash
_BY_SUITE: dict[int, _HashInfo] = {
    0x1301: _BY_NAME["sha256"],  # TLS_AES_128_GCM_SHA256
    0x1302: _BY_NAME["sha384"],  # TLS_AES_256_GCM_SHA384
    0x1303: _BY_NAME["sha256"],  # TLS_CHACHA20_POLY1305_SHA256
}


def hkdf_expand_label(
    algorithm: Any, secret: bytes, label: bytes, hash_value: bytes, length: int
) -> bytes:
    """aioquic's `hkdf_expand_label` signature: `algorithm` is a `cryptography` hash
    (SHA256 or SHA384, what TLS 1.3 suites use), known by its name."""
    return hkdf_expand_label_named(_BY_NAME[algorithm.name], secret, label, hash_value, length)


class KeySchedule:
    """The §7.1 key schedule of one connection: the secret of the current stage, the
    transcript hash (`update_hash` with each handshake message), and the derivations. The
    methods and their results are those of aioquic's `tls.KeySchedule`."""

    __slots__ = ("_h", "cipher_suite", "digest_size", "generation", "hash", "secret")

    def __init__(self, cipher_suite: int) -> None:
        h = _BY_SUITE[int(cipher_suite)]
        self._h = h
        self.cipher_suite = int(cipher_suite)
        self.digest_size = h.digest_size
        self.generation = 0
        self.hash: _Hash = h.new()
        self.secret = h.zeros

    def transcript_hash(self) -> bytes:
        return self.hash.copy().digest()

    def update_hash(self, data: bytes) -> None:
        self.hash.update(data)

    def extract(self, key_material: bytes | None = None) -> None:
        """The next stage: HKDF-Extract(Derive-Secret(secret, "derived", ""), key_material),
        the first stage from a zero salt (§7.1)."""
        h = self._h
        if self.generation == 0 and key_material is None:
            self.secret = h.early  # no PSK: the same Early Secret for every handshake
        else:
            if self.generation == 1 and self.secret is h.early:
                salt = h.derived
            elif self.generation:
                salt = hkdf_expand_label_named(h, self.secret, b"derived", h.empty, h.digest_size)
            else:
                salt = self.secret
            self.secret = hmac.digest(
                salt, h.zeros if key_material is None else key_material, h.name
            )
        self.generation += 1

    def derive_secret(self, label: bytes) -> bytes:
        h = self._h
        return hkdf_expand_label_named(
            h, self.secret, label, self.hash.copy().digest(), h.digest_size
        )

    def finished_verify_data(self, secret: bytes) -> bytes:
        """§4.4.4: HMAC(finished_key, transcript hash)."""
        h = self._h
        key = hkdf_expand_label_named(h, secret, b"finished", b"", h.digest_size)
        return hmac.digest(key, self.hash.copy().digest(), h.name)

    def certificate_verify_data(self, context_string: bytes) -> bytes:
        """§4.4.3: what a CertificateVerify signs (64 spaces, the context, 0, the hash)."""
        return b" " * 64 + context_string + b"\x00" + self.hash.copy().digest()

    def expand_label(self, secret: bytes, label: bytes, context: bytes, length: int) -> bytes:
        return hkdf_expand_label_named(self._h, secret, label, context, length)
