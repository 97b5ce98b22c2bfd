"""The aioquic internals the TLS engine uses (core.aioquic_compat): checked when blindfold starts,
with an error naming the installed aioquic when one is missing or has changed; and the HKDF it
installs into aioquic computes what `cryptography`'s HKDF computes."""

from __future__ import annotations

import subprocess
import sys

import aioquic
import aioquic.tls as qtls
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.hmac import HMAC
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand
from hypothesis import given
from hypothesis import strategies as st

from blindfold.core import aioquic_compat as compat

ALGORITHMS = {"sha256": hashes.SHA256(), "sha384": hashes.SHA384()}


def _their_expand_label(
    algorithm: hashes.HashAlgorithm, secret: bytes, label: bytes, context: bytes, length: int
) -> bytes:
    # RFC 8446 §7.1 HkdfLabel through cryptography's HKDF-Expand
    full = b"tls13 " + label
    info = length.to_bytes(2, "big") + bytes((len(full),)) + full + bytes((len(context),))
    return HKDFExpand(algorithm, length, info + context).derive(secret)


@given(
    st.sampled_from(sorted(ALGORITHMS)),
    st.binary(min_size=1, max_size=64),
    st.binary(max_size=40),
    st.binary(max_size=64),
    st.integers(1, 200),
)
def test_hkdf_expand_label_is_cryptographys(
    name: str, secret: bytes, label: bytes, context: bytes, length: int
) -> None:
    algorithm = ALGORITHMS[name]
    ours = compat.hkdf_expand_label(algorithm, secret, label, context, length)
    assert ours == _their_expand_label(algorithm, secret, label, context, length)
    # and it is what aioquic's key schedule now calls
    assert qtls.hkdf_expand_label is compat.hkdf_expand_label


@given(st.sampled_from(sorted(ALGORITHMS)), st.binary(max_size=80), st.binary(max_size=80))
def test_hkdf_extract_is_cryptographys(name: str, salt: bytes, ikm: bytes) -> None:
    algorithm = ALGORITHMS[name]
    mac = HMAC(salt, algorithm)
    mac.update(ikm)
    assert compat.hkdf_extract(algorithm, salt, ikm) == mac.finalize()


def test_rfc8448_key_schedule() -> None:
    """RFC 8448 §3: Early Secret and Derive-Secret(., "derived", "") on aioquic's schedule."""
    ks = compat.KeySchedule(compat.CipherSuite(0x1301))
    ks.extract(None)
    assert ks.derive_secret(b"derived").hex() == (
        "6f2615a108c702c5678f54fc9dbab69716c076189c48250cebeac3576c3611ba"
    )


def test_the_installed_version_is_the_tested_one() -> None:
    assert compat.VERSION == aioquic.__version__ == compat.TESTED_VERSION


def _changed_parameters(self: object, label: bytes, context: bytes) -> bytes:
    return b""


@pytest.mark.parametrize(
    "target,name,value,says",
    [
        (qtls, "hkdf_label", None, "aioquic.tls.hkdf_label is missing"),
        (qtls.KeySchedule, "derive_secret", None, "KeySchedule.derive_secret is missing"),
        (
            qtls.KeySchedule,
            "derive_secret",
            _changed_parameters,
            "KeySchedule.derive_secret takes ('self', 'label', 'context')",
        ),
        (qtls, "SERVER_CONTEXT_STRING", b"TLS 1.4", "SERVER_CONTEXT_STRING changed"),
    ],
)
def test_a_changed_internal_is_named_with_the_aioquic_version(
    monkeypatch: pytest.MonkeyPatch, target: object, name: str, value: object, says: str
) -> None:
    if value is None:
        monkeypatch.delattr(target, name)
    else:
        monkeypatch.setattr(target, name, value)
    with pytest.raises(compat.AioquicMismatch) as info:
        compat._check_shapes()
    assert says in str(info.value)
    assert f"aioquic {aioquic.__version__} is installed" in str(info.value)
    assert f"aioquic=={compat.TESTED_VERSION}" in str(info.value)


def test_an_hkdf_that_computes_otherwise_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    def other(
        algorithm: hashes.HashAlgorithm, secret: bytes, label: bytes, hash_value: bytes, length: int
    ) -> bytes:
        return bytes(length)

    monkeypatch.setattr(qtls, "hkdf_expand_label", other)
    with pytest.raises(compat.AioquicMismatch, match="hkdf_expand_label computes"):
        compat._check_and_install_hkdf()
    assert qtls.hkdf_expand_label is other  # not replaced


def test_the_check_runs_when_the_tls_engine_is_imported() -> None:
    """What `blindfold edge` does at start-up, with an aioquic whose KeySchedule changed."""
    code = (
        "import aioquic.tls as t\n"
        "del t.KeySchedule.finished_verify_data\n"
        "import blindfold.core.tls13_server\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("blindfold.core.aioquic_compat.AioquicMismatch: aioquic ")
    assert "KeySchedule.finished_verify_data is missing" in last
