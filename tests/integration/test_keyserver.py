"""The key server as a real process: mutual TLS, per-edge authorisation, only CertificateVerify
content is ever signed, revocation by SIGHUP, rate limits, the audit chain."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from blindfold import pki
from blindfold.cli.main import main as cli
from blindfold.core import keyless_wire as w
from blindfold.errors import KeyServerError
from tests.helpers.keyless import KeylessPki, KeyServerProcess, keyserver_config, make_pki


@pytest.fixture
def kpki(tmp_path: Path, ca: pki.Issued) -> KeylessPki:
    return make_pki(tmp_path, ca)


@pytest.fixture
def keyserver(kpki: KeylessPki, tmp_path: Path) -> Iterator[KeyServerProcess]:
    ks = KeyServerProcess(
        keyserver_config(
            kpki,
            {
                "edge1": ["example.test", "*.example.test", "p384.test", "rsa.test", "ed.test"],
                "edge2": ["other.test"],
            },
            edge_rates={"edge2": (1.0, 2)},
        ),
        tmp_path,
        name="ks",
    )
    yield ks
    ks.stop()
    assert not ks.tracebacks()


def request(
    kpki: KeylessPki,
    site: str,
    scheme: int,
    host: str,
    th: bytes | None = None,
    client: str = "192.0.2.7",
) -> w.SignRequest:
    return w.SignRequest(
        scheme, th or os.urandom(32), host, client, bytes.fromhex(kpki.sites[site][2])
    )


def sign(kpki: KeylessPki, port: int, edge: str, req: w.SignRequest) -> bytes:
    async def go() -> bytes:
        client = kpki.client(edge, port)
        try:
            return await client.sign(req)
        finally:
            await client.close()

    return asyncio.run(go())


def verify_sig(cert_path: Path, scheme: int, th: bytes, sig: bytes) -> None:
    key = x509.load_pem_x509_certificate(cert_path.read_bytes()).public_key()
    content = w.certificate_verify_content(th)
    h: hashes.HashAlgorithm
    if isinstance(key, ec.EllipticCurvePublicKey):
        h = hashes.SHA256() if scheme == w.ECDSA_SECP256R1_SHA256 else hashes.SHA384()
        key.verify(sig, content, ec.ECDSA(h))
    elif isinstance(key, rsa.RSAPublicKey):
        h = {
            w.RSA_PSS_RSAE_SHA256: hashes.SHA256(),
            w.RSA_PSS_RSAE_SHA384: hashes.SHA384(),
        }[scheme]
        key.verify(sig, content, padding.PSS(padding.MGF1(h), h.digest_size), h)
    else:
        assert isinstance(key, ed25519.Ed25519PublicKey)
        key.verify(sig, content)


@pytest.mark.parametrize(
    ("site", "scheme", "host", "size"),
    [
        ("p256", w.ECDSA_SECP256R1_SHA256, "www.example.test", 32),
        ("p384", w.ECDSA_SECP384R1_SHA384, "p384.test", 48),
        ("rsa", w.RSA_PSS_RSAE_SHA256, "rsa.test", 32),
        ("rsa", w.RSA_PSS_RSAE_SHA384, "rsa.test", 48),
        ("ed", w.ED25519, "ed.test", 32),
    ],
)
def test_signs_certificate_verify_content(
    kpki: KeylessPki, keyserver: KeyServerProcess, site: str, scheme: int, host: str, size: int
) -> None:
    th = os.urandom(size)
    sig = sign(kpki, keyserver.port, "edge1", request(kpki, site, scheme, host, th))
    verify_sig(kpki.sites[site][0], scheme, th, sig)  # over the RFC 8446 §4.4.3 content...
    key = x509.load_pem_x509_certificate(kpki.sites[site][0].read_bytes()).public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):  # ...and never over the raw hash
        with pytest.raises(InvalidSignature):
            key.verify(sig, th, ec.ECDSA(hashes.SHA256()))


def test_refusals(kpki: KeylessPki, keyserver: KeyServerProcess) -> None:
    cases = [
        (
            "edge2",
            request(kpki, "p256", w.ECDSA_SECP256R1_SHA256, "example.test"),
            "unauthorized",
        ),  # edge2 may only sign for other.test
        ("edge1", request(kpki, "p256", w.ECDSA_SECP256R1_SHA256, "evil.test"), "unauthorized"),
        (
            "edge1",
            request(kpki, "p256", w.ECDSA_SECP256R1_SHA256, "p384.test"),
            "unknown_key",
        ),  # allowed host, but not that certificate's name
        ("edge1", request(kpki, "p256", w.RSA_PSS_RSAE_SHA256, "example.test"), "bad_scheme"),
        (
            "edge1",
            request(kpki, "p256", w.ECDSA_SECP256R1_SHA256, "example.test", th=os.urandom(20)),
            "malformed",
        ),  # not a transcript hash: no oracle
        ("edge1", request(kpki, "p256", 0x0401, "example.test"), "bad_scheme"),  # PKCS#1
    ]
    for edge, req, expected in cases:
        with pytest.raises(KeyServerError, match=expected):
            sign(kpki, keyserver.port, edge, req)
    assert (
        keyserver.metric(
            "blindfold_keyserver_signatures_total", edge="edge1", result="unauthorized"
        )
        == 1
    )


def _tls_connect(port: int, ctx: ssl.SSLContext) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    return ctx.wrap_socket(raw, server_hostname="keyserver.test")


def test_unauthenticated_and_unknown_clients(
    kpki: KeylessPki, keyserver: KeyServerProcess, tmp_path: Path
) -> None:
    bare = ssl.create_default_context(cafile=str(kpki.edge_ca))  # no client certificate
    with pytest.raises((ssl.SSLError, OSError)):
        s = _tls_connect(keyserver.port, bare)
        s.sendall(w.encode_frame(w.PING, 1, b""))
        assert s.recv(100) == b""
        raise OSError("closed")
    rogue = kpki.edge_tls("rogue")  # a valid certificate from the CA, but not a known edge
    with _tls_connect(keyserver.port, rogue) as s:
        s.sendall(
            w.encode_sign_request(
                1, request(kpki, "p256", w.ECDSA_SECP256R1_SHA256, "example.test")
            )
        )
        assert s.recv(100) == b""
    foreign_ca = pki.make_ca("foreign")
    foreign = pki.issue(foreign_ca, [], client=True, server=False, common_name="edge1")
    foreign.write(tmp_path / "f.pem", tmp_path / "f.key")
    ctx = ssl.create_default_context(cafile=str(kpki.edge_ca))
    ctx.load_cert_chain(tmp_path / "f.pem", tmp_path / "f.key")
    with pytest.raises((ssl.SSLError, OSError)):
        s = _tls_connect(keyserver.port, ctx)
        s.sendall(w.encode_frame(w.PING, 1, b""))
        assert s.recv(100) == b""
        raise OSError("closed")
    assert keyserver.metric("blindfold_keyserver_connections_total", result="unknown_edge") == 1


def test_malformed_and_oversized_frames_close(
    kpki: KeylessPki, keyserver: KeyServerProcess
) -> None:
    for data in (
        b"\x00\x00\x00\x07\x01\x01\x00\x00\x00\x01\xff",  # truncated sign request
        (60000).to_bytes(4, "big") + b"\x01\x01" + b"\x00" * 100,  # oversized
        b"\x00\x00\x00\x06\x07\x01\x00\x00\x00\x01",
    ):  # unknown version
        with _tls_connect(keyserver.port, kpki.edge_tls("edge1")) as s:
            s.sendall(data)
            reply = b""
            while chunk := s.recv(1000):
                reply += chunk
            frames = w.FrameDecoder().feed(reply) if reply else []
            assert all(f.type == w.ERROR for f in frames)
    # and the server still serves
    sign(
        kpki,
        keyserver.port,
        "edge1",
        request(kpki, "p256", w.ECDSA_SECP256R1_SHA256, "example.test"),
    )


def test_revocation_by_sighup(kpki: KeylessPki, keyserver: KeyServerProcess) -> None:
    async def go() -> None:
        client = kpki.client("edge1", keyserver.port)
        req = request(kpki, "p256", w.ECDSA_SECP256R1_SHA256, "example.test")
        await client.sign(req)
        keyserver.write_config(keyserver_config(kpki, {"edge2": ["other.test"]}))
        import signal as sig

        keyserver.proc.send_signal(sig.SIGHUP)
        assert keyserver.wait_for(lambda r: r.get("event") == "reloaded", 5)
        with pytest.raises(KeyServerError):
            await client.sign(req)  # its connection was closed, and a new one is refused
        await client.close()

    asyncio.run(go())


def test_rate_limit_per_edge(kpki: KeylessPki, keyserver: KeyServerProcess) -> None:
    # edge2: 1/s, burst 2, now allowed example.test.
    keyserver.write_config(
        keyserver_config(kpki, {"edge2": ["example.test"]}, edge_rates={"edge2": (1.0, 2)})
    )
    import signal as sig

    keyserver.proc.send_signal(sig.SIGHUP)
    assert keyserver.wait_for(lambda r: r.get("event") == "reloaded", 5)
    ok = request(kpki, "p256", w.ECDSA_SECP256R1_SHA256, "example.test")
    sign(kpki, keyserver.port, "edge2", ok)
    sign(kpki, keyserver.port, "edge2", ok)
    with pytest.raises(KeyServerError, match="rate_limited"):
        sign(kpki, keyserver.port, "edge2", ok)
    # the refill at edge2's 1/s is checked with a clock the test controls:
    # tests/unit/test_keyserver_rate.py (no sleeping here)


def test_pipelining_and_the_audit_chain(kpki: KeylessPki, keyserver: KeyServerProcess) -> None:
    async def go() -> list[bytes]:
        client = kpki.client("edge1", keyserver.port)
        reqs = [
            request(
                kpki,
                "p256",
                w.ECDSA_SECP256R1_SHA256,
                "example.test",
                client=f"198.51.100.{i % 250}",
            )
            for i in range(300)
        ]
        try:
            return await asyncio.gather(*(client.sign(r) for r in reqs))
        finally:
            await client.close()

    sigs = asyncio.run(go())
    assert len(sigs) == 300 and all(sigs)
    audit = kpki.dir / "audit.log"
    assert wait_file(audit, 300)
    assert cli(["audit", "verify", str(audit)]) == 0
    lines = audit.read_text().splitlines()
    assert '"client":"198.51.100.7"' in lines[7] and '"edge":"edge1"' in lines[7]
    lines[42] = lines[42].replace("198.51.100", "203.0.113")
    audit.write_text("\n".join(lines) + "\n")
    assert cli(["audit", "verify", str(audit)]) == 1


def wait_file(path: Path, lines: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().count("\n") >= lines:
            return True
        time.sleep(0.05)
    return False
