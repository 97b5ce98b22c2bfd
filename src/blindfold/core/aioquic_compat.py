"""Everything the keyless TLS engine takes from aioquic, in one place, checked at start-up.

`core.tls13_server` runs its own TLS 1.3 server handshake (see there why) on aioquic's key
schedule (`KeySchedule`, RFC 8446 §7.1) and HKDF-Expand-Label; `core.tls13_record` uses the
latter for traffic keys. These are module-level names of `aioquic.tls`, not a documented API:
an aioquic release may rename or reshape them. This module is the only importer of
`aioquic.tls` in blindfold; importing it (which the edge does when it starts) checks that every
name is there with the shape used, and that the key schedule still computes RFC 8448's values,
and raises `AioquicMismatch` naming the installed aioquic version otherwise.

It also replaces aioquic's `hkdf_expand_label` and `hkdf_extract` with equivalents on the
standard library's one-shot HMAC (`hmac.digest`, OpenSSL underneath): aioquic builds a
`cryptography` HKDFExpand or HMAC object per call, about 4 µs each, and a handshake makes ~20
of them. The replacements are checked against aioquic's own functions before they are
installed, and only then installed (for every user of aioquic in the process: same results).
"""

from __future__ import annotations

import hmac
import inspect
import struct
from typing import Any

import aioquic
import aioquic.tls as _tls

TESTED_VERSION = "1.7.2"  # the version pinned in pyproject.toml, which CI tests
VERSION: str = getattr(aioquic, "__version__", "unknown")


class AioquicMismatch(ImportError):
    """The installed aioquic lacks, or has changed, something the TLS engine uses."""


def _mismatch(what: str) -> AioquicMismatch:
    return AioquicMismatch(
        f"aioquic {VERSION} is installed, but blindfold's keyless TLS engine was built and "
        f"tested on aioquic {TESTED_VERSION} and {what}: install aioquic=={TESTED_VERSION} "
        "(scripts/bootstrap installs the pinned version)"
    )


# name in aioquic.tls -> the parameters it must take (None: a constant or a class to inspect)
_FUNCTIONS: dict[str, tuple[str, ...]] = {
    "hkdf_label": ("label", "hash_value", "length"),
    "hkdf_expand_label": ("algorithm", "secret", "label", "hash_value", "length"),
    "hkdf_extract": ("algorithm", "salt", "key_material"),
    "cipher_suite_hash": ("cipher_suite",),
}
_KEY_SCHEDULE_METHODS: dict[str, tuple[str, ...]] = {
    "__init__": ("self", "cipher_suite"),
    "certificate_verify_data": ("self", "context_string"),
    "finished_verify_data": ("self", "secret"),
    "derive_secret": ("self", "label"),
    "extract": ("self", "key_material"),
    "update_hash": ("self", "data"),
}
_KEY_SCHEDULE_ATTRIBUTES = ("algorithm", "cipher_suite")

# RFC 8448 §3 (simple 1-RTT handshake): Early Secret = HKDF-Extract(0, 0), then
# Derive-Secret(Early Secret, "derived", "")
_RFC8448_DERIVED = bytes.fromhex("6f2615a108c702c5678f54fc9dbab69716c076189c48250cebeac3576c3611ba")


def _parameters(fn: Any) -> tuple[str, ...]:
    return tuple(inspect.signature(fn).parameters)


def _check_shapes() -> None:
    for name, params in _FUNCTIONS.items():
        fn = getattr(_tls, name, None)
        if not callable(fn):
            raise _mismatch(f"aioquic.tls.{name} is missing")
        if _parameters(fn) != params:
            raise _mismatch(f"aioquic.tls.{name} takes {_parameters(fn)}, not {params}")
    schedule = getattr(_tls, "KeySchedule", None)
    if not isinstance(schedule, type):
        raise _mismatch("aioquic.tls.KeySchedule is missing")
    for name, params in _KEY_SCHEDULE_METHODS.items():
        method = getattr(schedule, name, None)
        if not callable(method):
            raise _mismatch(f"KeySchedule.{name} is missing")
        if _parameters(method) != params:
            raise _mismatch(f"KeySchedule.{name} takes {_parameters(method)}, not {params}")
    suite = getattr(_tls, "CipherSuite", None)
    if suite is None or {int(s) for s in suite} < {0x1301, 0x1302, 0x1303}:
        raise _mismatch("aioquic.tls.CipherSuite lacks a TLS 1.3 suite")
    context = getattr(_tls, "SERVER_CONTEXT_STRING", None)
    if context != b"TLS 1.3, server CertificateVerify":
        raise _mismatch("aioquic.tls.SERVER_CONTEXT_STRING changed")
    ks = schedule(suite(0x1301))
    for attribute in _KEY_SCHEDULE_ATTRIBUTES:
        if not hasattr(ks, attribute):
            raise _mismatch(f"KeySchedule objects have no {attribute}")


# ------------------------------------------------------------------------------ fast HKDF
_LABEL_HEAD = struct.Struct("!HB")


def hkdf_expand_label(
    algorithm: Any, secret: bytes, label: bytes, hash_value: bytes, length: int
) -> bytes:
    """RFC 8446 §7.1 HKDF-Expand-Label = HKDF-Expand (RFC 5869 §2.3) of the HkdfLabel."""
    full_label = b"tls13 " + label
    info = (
        _LABEL_HEAD.pack(length, len(full_label))
        + full_label
        + bytes((len(hash_value),))
        + hash_value
    )
    name = algorithm.name
    size = algorithm.digest_size
    if length <= size:  # every TLS 1.3 use: one HMAC block
        return hmac.digest(secret, info + b"\x01", name)[:length]
    if length > 255 * size:
        raise ValueError(f"HKDF-Expand cannot make {length} bytes with {name}")
    out = b""
    block = b""
    counter = 1
    while len(out) < length:
        block = hmac.digest(secret, block + info + bytes((counter,)), name)
        out += block
        counter += 1
    return out[:length]


def hkdf_extract(algorithm: Any, salt: bytes, key_material: bytes) -> bytes:
    """RFC 5869 §2.2 HKDF-Extract."""
    return hmac.digest(salt, key_material, algorithm.name)


def _check_and_install_hkdf() -> None:
    original_expand = _tls.hkdf_expand_label
    original_extract = _tls.hkdf_extract
    if original_expand is not hkdf_expand_label:
        for suite in (0x1301, 0x1302):
            algorithm = _tls.cipher_suite_hash(_tls.CipherSuite(suite))
            secret = bytes(range(algorithm.digest_size))
            for label, context, length in ((b"key", b"", 16), (b"c hs traffic", secret, 48)):
                theirs = original_expand(algorithm, secret, label, context, length)
                if hkdf_expand_label(algorithm, secret, label, context, length) != theirs:
                    raise _mismatch("aioquic.tls.hkdf_expand_label computes something else")
            if hkdf_extract(algorithm, secret, b"ikm") != original_extract(
                algorithm, secret, b"ikm"
            ):
                raise _mismatch("aioquic.tls.hkdf_extract computes something else")
    # KeySchedule calls them through the module's globals
    _tls.hkdf_expand_label = hkdf_expand_label
    _tls.hkdf_extract = hkdf_extract
    ks = _tls.KeySchedule(_tls.CipherSuite(0x1301))
    ks.extract(None)
    if ks.derive_secret(b"derived") != _RFC8448_DERIVED:
        raise _mismatch("its key schedule does not give RFC 8448's derived secret")


_check_shapes()
_check_and_install_hkdf()

# What the engine uses, under the names it uses.
KeySchedule = _tls.KeySchedule
CipherSuite = _tls.CipherSuite
cipher_suite_hash = _tls.cipher_suite_hash
SERVER_CONTEXT_STRING: bytes = _tls.SERVER_CONTEXT_STRING
