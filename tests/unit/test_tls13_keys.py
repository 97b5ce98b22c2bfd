"""core.tls13_keys: the engine's RFC 8446 §7.1 key schedule gives aioquic's (and RFC 8448's)
bytes, for full and resumed schedules of every TLS 1.3 suite, whatever the inputs."""

from __future__ import annotations

import os
from typing import Any

import aioquic.tls as qtls
import pytest
from cryptography.hazmat.primitives import hashes

from blindfold.core import tls13_keys as keys

SUITES = (0x1301, 0x1302, 0x1303)


def _run(ks: Any, size: int, psk: bytes | None, shared: bytes, msgs: list[bytes]) -> list[bytes]:
    """Every derivation of a handshake (§7.1), in the engine's order."""
    out = []
    ks.extract(psk)
    out.append(ks.derive_secret(b"res binder"))
    ks.update_hash(msgs[0])
    out.append(ks.finished_verify_data(out[-1]))  # a binder
    ks.update_hash(msgs[1])
    ks.extract(shared)
    s_hs = ks.derive_secret(b"s hs traffic")
    c_hs = ks.derive_secret(b"c hs traffic")
    out += [s_hs, c_hs]
    for m in msgs[2:]:
        ks.update_hash(m)
        out.append(ks.certificate_verify_data(qtls.SERVER_CONTEXT_STRING))
    out.append(ks.finished_verify_data(s_hs))
    ks.extract(None)
    out.append(ks.derive_secret(b"s ap traffic"))
    out.append(ks.derive_secret(b"c ap traffic"))
    out.append(ks.finished_verify_data(c_hs))
    ks.update_hash(b"client finished")
    out.append(ks.derive_secret(b"res master"))
    return out


@pytest.mark.parametrize("suite", SUITES)
@pytest.mark.parametrize("resumed", [False, True])
def test_same_bytes_as_aioquic(suite: int, resumed: bool) -> None:
    size = 48 if suite == 0x1302 else 32
    for _ in range(20):
        psk = os.urandom(size) if resumed else None
        shared = os.urandom(32)
        msgs = [os.urandom(n) for n in (200, 90, 40, 1500, 300)]
        theirs = _run(qtls.KeySchedule(qtls.CipherSuite(suite)), size, psk, shared, msgs)
        ours = _run(keys.KeySchedule(suite), size, psk, shared, msgs)
        assert ours == theirs
        assert len({len(x) for x in ours[:-1]} - {size, 64 + 34 + size}) == 0


def test_a_zero_psk_and_no_psk_give_the_same_schedule() -> None:
    """The cached Early Secret (no PSK) is HKDF-Extract(0, 0): a PSK of zeros must match it,
    and a schedule that started from a real PSK must not take the cached "derived"."""
    a, b, c = keys.KeySchedule(0x1301), keys.KeySchedule(0x1301), keys.KeySchedule(0x1301)
    a.extract(None)
    b.extract(bytes(32))
    c.extract(b"\x01" * 32)
    for ks in (a, b, c):
        ks.extract(b"\x02" * 32)
    assert a.secret == b.secret != c.secret
    ref = qtls.KeySchedule(qtls.CipherSuite(0x1301))
    ref.extract(b"\x01" * 32)
    ref.extract(b"\x02" * 32)
    assert ref.secret == c.secret


def test_rfc8448_simple_1rtt_handshake_secret() -> None:
    """RFC 8448 §3: Early Secret, then the handshake secret from the (EC)DHE shared secret."""
    ks = keys.KeySchedule(0x1301)
    ks.extract(None)
    assert ks.secret.hex() == "33ad0a1c607ec03b09e6cd9893680ce210adf300aa1f2660e1b22e10f170f92a"
    ks.extract(bytes.fromhex("8bd4054fb55b9d63fdfbacf9f04b9f0d35e6d63f537563efd46272900f89492d"))
    assert ks.secret.hex() == "1dc826e93606aa6fdc0aadc12f741b01046aa6b99f691ed221a9f0ca043fbeac"


@pytest.mark.parametrize("algorithm", [hashes.SHA256(), hashes.SHA384()])
@pytest.mark.parametrize("length", [1, 12, 16, 32, 48, 100, 255])
def test_hkdf_expand_label_any_length(algorithm: hashes.HashAlgorithm, length: int) -> None:
    secret = os.urandom(algorithm.digest_size)
    for label, context in ((b"key", b""), (b"c hs traffic", os.urandom(algorithm.digest_size))):
        want = qtls.hkdf_expand_label(algorithm, secret, label, context, length)
        assert keys.hkdf_expand_label(algorithm, secret, label, context, length) == want


def test_hkdf_expand_refuses_more_than_255_blocks() -> None:
    with pytest.raises(ValueError):
        keys.hkdf_expand_label(hashes.SHA256(), bytes(32), b"x", b"", 255 * 32 + 1)
