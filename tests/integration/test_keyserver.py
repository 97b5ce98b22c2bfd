"""The key server as a real process: mutual TLS, per-edge authorisation, only CertificateVerify
content is ever signed, revocation by SIGHUP, rate limits, the audit chain."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import socket
import ssl
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
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
from tests.helpers import forge
from tests.helpers.keyless import (
    KeylessPki,
    KeyServerProcess,
    Visit,
    fresh_random,
    keyserver_config,
    make_pki,
    names_of,
)


@pytest.fixture
def kpki(tmp_path: Path, ca: pki.Issued) -> KeylessPki:
    return make_pki(tmp_path, ca)


@pytest.fixture
def keyserver(kpki: KeylessPki, tmp_path: Path) -> Iterator[KeyServerProcess]:
    ks = KeyServerProcess(
        keyserver_config(
            kpki,
            {
                "edge1": names_of("example.test", "p384.test", "rsa.test", "ed.test"),
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
    ("site", "host", "scheme"),
    [
        ("p256", "www.example.test", w.ECDSA_SECP256R1_SHA256),
        ("p384", "p384.test", w.ECDSA_SECP384R1_SHA384),
        ("rsa", "rsa.test", w.RSA_PSS_RSAE_SHA256),
        ("ed", "ed.test", w.ED25519),
    ],
)
def test_a_real_client_accepts_the_signature(
    kpki: KeylessPki, keyserver: KeyServerProcess, site: str, host: str, scheme: int
) -> None:
    visit = Visit(kpki, site, host)
    assert visit.request.scheme == scheme
    sig = sign(kpki, keyserver.port, "edge1", visit.sign_request())
    verify_sig(kpki.sites[site][0], scheme, visit.request.transcript_hash, sig)
    key = x509.load_pem_x509_certificate(kpki.sites[site][0].read_bytes()).public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):  # over the RFC 8446 §4.4.3 content only
        with pytest.raises(InvalidSignature):
            key.verify(sig, visit.request.transcript_hash, ec.ECDSA(hashes.SHA256()))
    assert visit.finish(sig)  # OpenSSL completes the handshake with it


def test_a_sha384_suite_is_hashed_with_sha384(
    kpki: KeylessPki, keyserver: KeyServerProcess
) -> None:
    visit = Visit(kpki, "rsa", "rsa.test")
    msgs = forge.split_messages(visit.request.messages)
    hello = replace(forge.Hello.parse(msgs[0]), ciphers=[0x1302, 0x1301])
    sh = replace(forge.ServerHello.parse(msgs[1]), suite=0x1302)
    messages = hello.encode() + sh.encode() + b"".join(msgs[2:])
    sig = sign(kpki, keyserver.port, "edge1", w.SignRequest(0x0805, "", messages))
    verify_sig(kpki.sites["rsa"][0], 0x0805, hashlib.sha384(messages).digest(), sig)


def test_refusals(kpki: KeylessPki, keyserver: KeyServerProcess) -> None:
    www = Visit(kpki, "p256", "www.example.test")
    cases = [
        ("edge2", www.sign_request(), "unauthorized: unauthorized_sni"),  # other.test only
        ("edge1", Visit(kpki, "p256", "evil.test").sign_request(), "unauthorized_sni"),
        ("edge1", Visit(kpki, "p256", None).sign_request(), "unauthorized: no_sni"),
        # an authorised name, but the Certificate message's certificate does not cover it
        ("edge1", Visit(kpki, "p256", "p384.test").sign_request(), "certificate_mismatch"),
        ("edge1", www.sign_request(scheme=w.RSA_PSS_RSAE_SHA256), "bad_scheme"),
        ("edge1", www.sign_request(scheme=0x0401), "bad_scheme"),  # PKCS#1: never
        # not a handshake: no signing oracle for arbitrary bytes
        ("edge1", w.SignRequest(0x0403, "", os.urandom(48)), "bad_handshake"),
    ]
    for edge, req, expected in cases:
        with pytest.raises(KeyServerError, match=expected):
            sign(kpki, keyserver.port, edge, req)
    assert (
        keyserver.metric(
            "blindfold_keyserver_signatures_total", edge="edge1", result="unauthorized_sni"
        )
        == 1
    )
    audit = kpki.dir / "audit.log"
    assert wait_file(audit, len(cases))
    refused = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [e["event"] for e in refused] == ["refused"] * len(cases)
    assert refused[0]["edge"] == "edge2" and refused[0]["reason"] == "unauthorized_sni"
    assert refused[0]["verified"]["sni"] == "www.example.test"
    assert refused[0]["claimed"] == {"client": "192.0.2.7", "scheme": "0x0403"}
    assert refused[-1]["verified"] == {}  # nothing could be read from those bytes


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
        s.sendall(w.encode_sign_request(1, Visit(kpki, "p256", "example.test").sign_request()))
        reply = _reply(s)  # one ERROR about the connection (request id 0), then closed
    frame = w.FrameDecoder().feed(reply)
    assert [(f.type, f.request_id) for f in frame] == [(w.ERROR, 0)]
    code, message = w.decode_error(frame[0].body)
    assert code == w.E_UNAUTHORIZED and message.startswith("edge_not_authorised: ")
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


def _reply(s: ssl.SSLSocket) -> bytes:
    reply = b""
    while chunk := s.recv(1000):
        reply += chunk
    return reply


def test_malformed_and_oversized_frames_close(
    kpki: KeylessPki, keyserver: KeyServerProcess
) -> None:
    for data in (
        b"\x00\x00\x00\x07\x02\x01\x00\x00\x00\x01\xff",  # truncated sign request
        (200000).to_bytes(4, "big") + b"\x02\x01" + b"\x00" * 100,  # oversized
        b"\x00\x00\x00\x06\x02\x09\x00\x00\x00\x01",  # unknown frame type
    ):
        with _tls_connect(keyserver.port, kpki.edge_tls("edge1")) as s:
            s.sendall(data)
            reply = _reply(s)  # and then the key server closes
            frames = w.FrameDecoder().feed(reply)
            assert [f.type for f in frames] == [w.ERROR]
            assert w.decode_error(frames[0].body)[0] == w.E_MALFORMED
    # and the server still serves
    sign(kpki, keyserver.port, "edge1", Visit(kpki, "p256", "example.test").sign_request())


def test_a_version_1_edge_is_told_to_upgrade(kpki: KeylessPki, keyserver: KeyServerProcess) -> None:
    """The old request form (a transcript hash and a hostname the edge computed) is refused
    with an ERROR the old edge can decode (version-1 framing), then the connection closes."""
    body = (
        struct.pack(">HB", 0x0403, 32)
        + os.urandom(32)
        + bytes([12])
        + b"example.test"
        + bytes([4, 192, 0, 2, 7])
        + bytes.fromhex(kpki.sites["p256"][2])
    )
    with _tls_connect(keyserver.port, kpki.edge_tls("edge1")) as s:
        s.sendall(struct.pack(">IBBI", len(body) + 6, 1, w.SIGN_REQUEST, 41) + body)
        reply = _reply(s)
    length, version, ftype, rid = struct.unpack_from(">IBBI", reply)
    assert (len(reply), version, ftype, rid) == (length + 4, 1, w.ERROR, 41)
    code, mlen = struct.unpack_from(">BH", reply, 10)
    message = reply[13 : 13 + mlen].decode()
    assert code == w.E_UNSUPPORTED_VERSION and "version 1 is not supported" in message
    assert "upgrade" in message
    assert (
        keyserver.metric(
            "blindfold_keyserver_signatures_total", edge="edge1", result="unsupported_version"
        )
        == 1
    )


def test_revocation_by_sighup(kpki: KeylessPki, keyserver: KeyServerProcess) -> None:
    """A revoked edge's next signature fails at once with the key server's reason (before:
    `timeout ... no signature within 1.0 s` after retrying for the whole deadline), and the key
    server logs the refusal with the edge's address as ip:port."""

    async def go() -> None:
        client = kpki.client("edge1", keyserver.port, sign_timeout_s=1.0)
        await client.sign(Visit(kpki, "p256", "example.test").sign_request())
        keyserver.write_config(keyserver_config(kpki, {"edge2": ["other.test"]}))
        keyserver.proc.send_signal(signal.SIGHUP)
        assert keyserver.wait_for(lambda r: r.get("event") == "reloaded", 5)
        for _ in range(3):  # its connection was closed; each new one is refused, at once
            t0 = time.monotonic()
            with pytest.raises(KeyServerError) as info:
                await client.sign(Visit(kpki, "p256", "example.test").sign_request())
            assert time.monotonic() - t0 < 0.5, (info.value, keyserver.records())
            assert info.value.reason == "edge_not_authorised", info.value
            assert "refused this edge" in str(info.value)
        await client.close()

    asyncio.run(go())
    line = keyserver.wait_for(lambda r: r.get("event") == "edge_refused", 5)
    assert line is not None and line["reason"] == "unknown_edge"
    host, _, port = line["peer"].rpartition(":")
    assert host == "127.0.0.1" and port.isdigit(), line


def test_a_certificate_wider_than_the_edge_is_refused_and_reported_at_reload(
    kpki: KeylessPki, keyserver: KeyServerProcess
) -> None:
    """atk-trust finding 1: edge2, now authorised for www.example.test only, gets nothing signed
    with the certificate that also covers example.test and *.example.test; the reload says so."""
    keyserver.write_config(keyserver_config(kpki, {"edge2": ["www.example.test"]}))
    keyserver.proc.send_signal(signal.SIGHUP)
    assert keyserver.wait_for(lambda r: r.get("event") == "reloaded", 5)
    warned = keyserver.wait_for(
        lambda r: r.get("event") == "edge_key_partly_authorised" and r.get("edge") == "edge2", 5
    )
    assert warned is not None and warned["key"] == "p256"
    assert warned["unauthorised"] == ["example.test", "*.example.test"]
    with pytest.raises(KeyServerError, match="unauthorized: certificate_too_broad"):
        sign(kpki, keyserver.port, "edge2", Visit(kpki, "p256", "www.example.test").sign_request())
    assert (
        keyserver.metric(
            "blindfold_keyserver_signatures_total", edge="edge2", result="certificate_too_broad"
        )
        == 1
    )


def test_rate_limit_per_edge(kpki: KeylessPki, keyserver: KeyServerProcess) -> None:
    # edge2: 1/s, burst 2, now allowed the site certificate's names.
    keyserver.write_config(
        keyserver_config(
            kpki, {"edge2": ["example.test", "*.example.test"]}, edge_rates={"edge2": (1.0, 2)}
        )
    )
    keyserver.proc.send_signal(signal.SIGHUP)
    assert keyserver.wait_for(lambda r: r.get("event") == "reloaded", 5)
    ok = Visit(kpki, "p256", "example.test").request.messages

    def req() -> w.SignRequest:
        return w.SignRequest(0x0403, "", fresh_random(ok))

    # a refusal costs a token too: the bucket bounds the work (and audit lines) an edge causes
    with pytest.raises(KeyServerError, match="bad_handshake"):
        sign(kpki, keyserver.port, "edge2", w.SignRequest(0x0403, "", b"\x01\x00\x00\x00"))
    sign(kpki, keyserver.port, "edge2", req())
    with pytest.raises(KeyServerError, match="rate_limited"):
        sign(kpki, keyserver.port, "edge2", req())
    # the refill at edge2's 1/s is checked with a clock the test controls:
    # tests/unit/test_keyserver_rate.py (no sleeping here)


def test_replays(kpki: KeylessPki, keyserver: KeyServerProcess) -> None:
    """A request sent again (the edge's client retries after a broken connection) is signed
    again and audited as a repeat; the visitor's random in another transcript is refused."""
    visit = Visit(kpki, "p256", "example.test")
    first = sign(kpki, keyserver.port, "edge1", visit.sign_request())
    again = sign(kpki, keyserver.port, "edge1", visit.sign_request())
    msgs = forge.split_messages(visit.request.messages)
    sh = replace(forge.ServerHello.parse(msgs[1]), random=os.urandom(32))
    other = msgs[0] + sh.encode() + b"".join(msgs[2:])
    with pytest.raises(KeyServerError, match="replayed: replayed_client_random"):
        sign(kpki, keyserver.port, "edge1", w.SignRequest(0x0403, "", other))
    assert visit.finish(again) and first != again  # ECDSA: a new signature, same content
    audit = kpki.dir / "audit.log"
    assert wait_file(audit, 3)
    entries = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [(e["event"], e.get("repeat")) for e in entries] == [
        ("signed", None),
        ("signed", True),
        ("refused", None),
    ]
    assert entries[2]["reason"] == "replayed_client_random"


def test_pipelining_and_the_audit_chain(kpki: KeylessPki, keyserver: KeyServerProcess) -> None:
    visit = Visit(kpki, "p256", "www.example.test")

    async def go() -> list[bytes]:
        client = kpki.client("edge1", keyserver.port)
        reqs = [
            w.SignRequest(0x0403, f"198.51.100.{i % 250}", fresh_random(visit.request.messages))
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
    key = str(kpki.audit_key)
    assert oct(kpki.audit_key.stat().st_mode & 0o777) == "0o600"
    assert cli(["audit", "verify", "--key", key, str(audit)]) == 0
    lines = audit.read_text().splitlines()
    entry = json.loads(lines[7])
    assert entry["event"] == "signed" and entry["edge"] == "edge1" and entry["key"] == "p256"
    # what the key server read itself, apart from what the edge says
    assert entry["claimed"] == {"client": "198.51.100.7"}
    verified = entry["verified"]
    assert verified["sni"] == "www.example.test" and verified["scheme"] == "0x0403"
    assert verified["cipher_suite"] == "0x1301"
    assert verified["certificate_sha256"] == kpki.sites["p256"][2]
    assert len(bytes.fromhex(verified["client_random"])) == 32
    assert len({json.loads(line)["verified"]["client_random"] for line in lines}) == 300
    lines[42] = lines[42].replace("198.51.100", "203.0.113")
    audit.write_text("\n".join(lines) + "\n")
    assert cli(["audit", "verify", "--key", key, str(audit)]) == 1


def test_the_audit_log_is_verified_and_recovered_at_start(
    kpki: KeylessPki, keyserver: KeyServerProcess, tmp_path: Path
) -> None:
    sign(kpki, keyserver.port, "edge1", Visit(kpki, "p256", "example.test").sign_request())
    audit = kpki.dir / "audit.log"
    assert wait_file(audit, 1)
    assert keyserver.stop() == 0
    last = keyserver.records("keyserver_stopped")[-1]
    assert last["audit_entries"] == 1
    assert last["audit_last_mac"] == json.loads(audit.read_text())["mac"]
    # killed in the middle of writing a line: the line has no newline and was never answered
    partial = b'{"seq":2,"ts":1.0,"event":"signed","edge":"edge1","verif'
    with audit.open("ab") as fh:
        fh.write(partial)
    ks = KeyServerProcess(keyserver.config_path.read_text(), tmp_path, name="ks2")
    try:
        recovered = ks.wait_for(lambda r: r.get("event") == "audit_recovered", 5)
        assert recovered is not None and recovered["cut_bytes"] == len(partial)
        sign(kpki, ks.port, "edge1", Visit(kpki, "p256", "example.test").sign_request())
        assert wait_file(audit, 3)
    finally:
        ks.stop()
    assert not ks.tracebacks(), "".join(ks.stderr_lines)
    entries = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [e["event"] for e in entries] == ["signed", "recovered", "signed"]
    assert cli(["audit", "verify", "--key", str(kpki.audit_key), str(audit)]) == 0
    # a changed line: the key server will not start on it (exit 2, the line named)
    audit.write_text(audit.read_text().replace("192.0.2.7", "192.0.2.8", 1))
    result = subprocess.run(
        [sys.executable, "-m", "blindfold", "keyserver", "--config", str(keyserver.config_path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "keyserver.audit_log" in result.stderr and "line 1" in result.stderr


def wait_file(path: Path, lines: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().count("\n") >= lines:
            return True
        time.sleep(0.05)
    return False
