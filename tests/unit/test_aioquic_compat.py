"""The aioquic internals the TLS engine uses (core.aioquic_compat): checked when blindfold starts,
with an error naming the installed aioquic when one is missing or has changed."""

from __future__ import annotations

import subprocess
import sys

import aioquic
import aioquic.tls as qtls
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from blindfold.core import aioquic_compat as compat


def test_hkdf_expand_label_is_rfc8446s() -> None:
    """§7.1 HkdfLabel (length, "tls13 " + label, context) through cryptography's HKDF-Expand."""
    for algorithm in (hashes.SHA256(), hashes.SHA384()):
        secret = bytes(range(algorithm.digest_size))
        for label, context, length in ((b"key", b"", 16), (b"c hs traffic", secret, 48)):
            full = b"tls13 " + label
            info = length.to_bytes(2, "big") + bytes((len(full),)) + full
            info += bytes((len(context),)) + context
            theirs = HKDFExpand(algorithm, length, info).derive(secret)
            assert compat.hkdf_expand_label(algorithm, secret, label, context, length) == theirs


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
        (qtls, "hkdf_expand_label", None, "aioquic.tls.hkdf_expand_label is missing"),
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


def test_a_key_schedule_that_computes_otherwise_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    def derive_secret(self: object, label: bytes) -> bytes:
        return bytes(32)

    monkeypatch.setattr(qtls.KeySchedule, "derive_secret", derive_secret)
    compat._check_shapes()  # the same shape
    with pytest.raises(compat.AioquicMismatch, match="RFC 8448"):
        compat._check_key_schedule()


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
