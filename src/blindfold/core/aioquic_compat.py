"""Everything the keyless TLS engine takes from aioquic, in one place, checked at start-up.

`core.tls13_server` runs its own TLS 1.3 server handshake (see there why) on aioquic's key
schedule (`KeySchedule`, RFC 8446 §7.1) and HKDF-Expand-Label; `core.tls13_record` uses the
latter for traffic keys. These are module-level names of `aioquic.tls`, not a documented API:
an aioquic release may rename or reshape them. This module is the only importer of
`aioquic.tls` in blindfold. Importing it (which the edge does when it starts) checks that every
name is there with the shape used and that the key schedule still computes RFC 8448's values,
and raises `AioquicMismatch` naming the installed aioquic version otherwise. Nothing in aioquic
is patched.

The origin agent's HTTP/3 (`origin.h3`, which imports this module when it starts) also reads a
connection's network paths here (`network_paths`): aioquic makes a path current before it is
validated and has no public API that says whether it is. The shape it reads is checked on
import too.
"""

from __future__ import annotations

import inspect
from typing import Any

import aioquic
import aioquic.quic.connection as _connection
import aioquic.tls as _tls
from aioquic.quic.configuration import QuicConfiguration

from blindfold.core.tls13_keys import hkdf_expand_label as _fast_hkdf_expand_label

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


# function in aioquic.tls -> the parameters it must take
_FUNCTIONS: dict[str, tuple[str, ...]] = {
    "hkdf_expand_label": ("algorithm", "secret", "label", "hash_value", "length"),
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


def _check_key_schedule() -> None:
    ks = _tls.KeySchedule(_tls.CipherSuite(0x1301))
    ks.extract(None)
    if ks.derive_secret(b"derived") != _RFC8448_DERIVED:
        raise _mismatch("its key schedule does not give RFC 8448's derived secret")


def _check_fast_key_schedule() -> None:
    """`core.tls13_keys` (the engine's key schedule on hashlib and one-shot HMAC) must give
    aioquic's bytes: one full and one resumed schedule of each hash, every derivation."""
    from blindfold.core import tls13_keys

    for suite in (0x1301, 0x1302):
        size = 48 if suite == 0x1302 else 32
        for psk in (None, bytes(range(size))):
            theirs = _tls.KeySchedule(_tls.CipherSuite(suite))
            ours = tls13_keys.KeySchedule(suite)
            got: list[bytes] = []
            want: list[bytes] = []
            pairs: list[tuple[Any, list[bytes]]] = [(theirs, want), (ours, got)]
            for ks, out in pairs:
                ks.extract(psk)
                out.append(ks.derive_secret(b"res binder"))
                ks.update_hash(b"client hello")
                ks.extract(b"\x07" * 32)
                out.append(ks.derive_secret(b"s hs traffic"))
                out.append(ks.finished_verify_data(b"\x05" * size))
                out.append(ks.certificate_verify_data(_tls.SERVER_CONTEXT_STRING))
                ks.extract(None)
                out.append(ks.derive_secret(b"s ap traffic"))
            if got != want:
                raise _mismatch(f"its key schedule (suite {suite:#06x}) differs from blindfold's")
        algorithm = _tls.cipher_suite_hash(_tls.CipherSuite(suite))
        for label, context, length in ((b"key", b"", 16), (b"iv", b"", 12), (b"x", b"c", 100)):
            if tls13_keys.hkdf_expand_label(
                algorithm, b"\x01" * 32, label, context, length
            ) != _tls.hkdf_expand_label(algorithm, b"\x01" * 32, label, context, length):
                raise _mismatch("its hkdf_expand_label differs from blindfold's")


def _check_network_paths() -> None:
    path_type = getattr(_connection, "QuicNetworkPath", None)
    if not isinstance(path_type, type):
        raise _mismatch("aioquic.quic.connection.QuicNetworkPath is missing")
    path = path_type(("127.0.0.1", 1))
    if path.addr != ("127.0.0.1", 1) or path.is_validated is not False:
        raise _mismatch("QuicNetworkPath no longer has addr and is_validated")
    connection = _connection.QuicConnection(configuration=QuicConfiguration(is_client=True))
    if getattr(connection, "_network_paths", None) != []:
        raise _mismatch("QuicConnection no longer keeps its paths in _network_paths")


_check_shapes()
_check_key_schedule()
_check_fast_key_schedule()
_check_network_paths()


def network_paths(connection: _connection.QuicConnection) -> list[tuple[Any, bool]]:
    """A connection's network paths, the current one (where datagrams are sent now, aioquic's
    `get_peer_address()`) first: (address, validated). aioquic marks a path validated by a
    PATH_RESPONSE to its PATH_CHALLENGE (RFC 9000 §8.2) or by any Handshake packet received
    on it (which proves the client received the server's Initial, §8.1, but not at *that*
    address): the caller decides what it accepts."""
    return [(path.addr, bool(path.is_validated)) for path in connection._network_paths]


# What the engine uses, under the names it uses. HKDF-Expand-Label is core.tls13_keys's
# (aioquic's bytes, checked above, for a fraction of the calls' set-up); aioquic's KeySchedule
# stays here for the tests that pin it to RFC 8448 (the engine uses core.tls13_keys's).
KeySchedule = _tls.KeySchedule
CipherSuite = _tls.CipherSuite
cipher_suite_hash = _tls.cipher_suite_hash
hkdf_expand_label = _fast_hkdf_expand_label
SERVER_CONTEXT_STRING: bytes = _tls.SERVER_CONTEXT_STRING
