"""Issue 8, finding 1: an edge authorised for one name must not get a visitor's handshake
signed for another name the same certificate covers, whatever it sends the key server.

The edge is the liar: it holds a real edge identity (edge1's client certificate), runs our TLS
core with curl as the visitor, and when the handshake needs its signature sends the key server
what a liar would. The key server is the real process. edge1 may sign for example.test and
rsa.test (*.rsa.test too); the site certificate it serves also covers *.example.test, so curl
visits www.example.test. Since atk-trust finding 1 that certificate is useless to edge1 even
for example.test: it covers a name edge1 is not authorised for (a browser would send that
name's requests over the connection), so the key server signs nothing with it for edge1."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from blindfold import pki
from blindfold.cli.main import main as cli
from blindfold.core import keyless_wire as w
from blindfold.core import tls13_server as ts
from tests.helpers import forge
from tests.helpers.clients import curl, wait_until
from tests.helpers.keyless import KeylessPki, KeyServerProcess, Visit, keyserver_config, make_pki
from tests.helpers.lying_edge import Attempt, KeyServerLink, LyingEdge, Outcome

AUTHORISED = "example.test"
VICTIM = "www.example.test"  # covered by the certificate, not by edge1's hostnames
OWN = "rsa.test"  # edge1 is authorised for every name of that certificate


@pytest.fixture
def kpki(tmp_path: Path, ca: pki.Issued) -> KeylessPki:
    return make_pki(tmp_path, ca)


@pytest.fixture
def keyserver(kpki: KeylessPki, tmp_path: Path) -> Iterator[KeyServerProcess]:
    ks = KeyServerProcess(
        keyserver_config(kpki, {"edge1": [AUTHORISED, OWN, f"*.{OWN}"]}), tmp_path, name="ks"
    )
    yield ks
    ks.stop()
    assert not ks.tracebacks(), "".join(ks.stderr_lines)


@pytest.fixture
def liar(kpki: KeylessPki, keyserver: KeyServerProcess) -> Iterator[LyingEdge]:
    identity = ts.ServerIdentity.from_pem(kpki.sites["p256"][0].read_bytes())
    edge = LyingEdge(identity, keyserver.port, kpki.edge_tls("edge1"))
    yield edge
    edge.close()


def visit(liar: LyingEdge, kpki: KeylessPki, host: str, trick: object) -> tuple[Outcome, str]:
    outcome = liar.serve_one(trick)  # type: ignore[arg-type]
    result = curl(liar.port, host, kpki.site_ca, path="/")
    liar.join()
    return outcome, f"exit {result.returncode}: {result.stdout}{result.stderr}"


def honest(a: Attempt) -> bytes | None:
    return a.ask(w.encode_sign_request(a.link.rid(), w.SignRequest(a.request.scheme, "", _m(a))))


def _m(a: Attempt) -> bytes:
    return a.request.messages


def _errors(outcome: Outcome) -> list[str]:
    return [w.decode_error(f.body)[1] for f in outcome.answers if f.type == w.ERROR]


def test_a_lying_edge_never_completes_a_handshake_for_a_name_it_is_not_authorised_for(
    kpki: KeylessPki, keyserver: KeyServerProcess, liar: LyingEdge
) -> None:
    # Even the authorised name gets no handshake with a certificate that also covers others.
    outcome, result = visit(liar, kpki, AUTHORISED, honest)
    assert not outcome.handshake_completed and not outcome.served, result
    assert any("certificate_too_broad" in e for e in _errors(outcome)), _errors(outcome)
    # An honest request for a name of a certificate edge1 covers fully is signed.
    recorded = [w.encode_sign_request(1, Visit(kpki, "rsa", OWN).sign_request(client=""))]
    link = KeyServerLink(keyserver.port, kpki.edge_tls("edge1"))
    try:
        assert link.call(recorded[0]).type == w.SIGN_RESPONSE
    finally:
        link.close()

    def ask_as_it_is(a: Attempt) -> bytes | None:
        return honest(a)

    def claim_the_authorised_name_v1(a: Attempt) -> bytes | None:
        """The version-1 lie: the transcript hash with hostname = the authorised name."""
        body = (
            struct.pack(">HB", a.request.scheme, len(a.request.transcript_hash))
            + a.request.transcript_hash
            + bytes([len(AUTHORISED)])
            + AUTHORISED.encode()
            + bytes([4, 192, 0, 2, 1])
            + liar.identity.certificate_sha256
        )
        link = KeyServerLink(keyserver.port, kpki.edge_tls("edge1"))
        try:
            reply = link.call_raw(struct.pack(">IBBI", len(body) + 6, 1, w.SIGN_REQUEST, 9) + body)
        finally:
            link.close()
        _len, version, ftype, rid = struct.unpack_from(">IBBI", reply)  # version-1 framing
        assert (version, ftype, rid) == (1, w.ERROR, 9), reply
        a.answers.append(w.Frame(ftype, rid, reply[10:]))
        return None

    def claim_the_authorised_name_v2(a: Attempt) -> bytes | None:
        """A hostname appended to the messages, where a version-1 request had it."""
        req = w.SignRequest(a.request.scheme, "", _m(a) + bytes([12]) + AUTHORISED.encode())
        return a.ask(w.encode_sign_request(a.link.rid(), req))

    def forge_the_client_hello(a: Attempt) -> bytes | None:
        """Rewrite the visitor's SNI to the authorised name (before finding 1 this was signed,
        for a transcript that is not the visitor's)."""
        msgs = forge.split_messages(_m(a))
        hello = forge.Hello.parse(msgs[0]).with_sni(AUTHORISED).encode()
        req = w.SignRequest(a.request.scheme, "", hello + b"".join(msgs[1:]))
        return a.ask(w.encode_sign_request(a.link.rid(), req))

    rsa_der = x509.load_pem_x509_certificate(kpki.sites["rsa"][0].read_bytes()).public_bytes(
        Encoding.DER
    )

    def send_another_certificate(a: Attempt) -> bytes | None:
        """A forged ClientHello for an authorised name with the certificate of another key
        the key server holds (rsa.test), whose names do not cover it."""
        msgs = forge.split_messages(_m(a))
        hello = forge.Hello.parse(msgs[0]).with_sni(AUTHORISED).encode()
        messages = hello + msgs[1] + msgs[2] + forge.certificate([rsa_der])
        return a.ask(w.encode_sign_request(a.link.rid(), w.SignRequest(0x0804, "", messages)))

    def replay_the_old_request(a: Attempt) -> bytes | None:
        """The honest request of the earlier visitor, sent again as it was."""
        return a.ask(recorded[0])

    def replay_the_old_client_hello(a: Attempt) -> bytes | None:
        """The earlier visitor's ClientHello (an authorised SNI) with this handshake's server
        messages and the certificate of that name's key."""
        old = w.decode_sign_request(w.FrameDecoder().feed(recorded[0])[0].body).messages
        old_hello = forge.split_messages(old)[0]
        msgs = forge.split_messages(_m(a))
        sh = forge.ServerHello.parse(msgs[1])
        sh.session_id = forge.Hello.parse(old_hello).session_id  # consistent, as a liar makes it
        messages = old_hello + sh.encode() + msgs[2] + forge.certificate([rsa_der])
        req = w.SignRequest(w.RSA_PSS_RSAE_SHA256, "", messages)
        return a.ask(w.encode_sign_request(a.link.rid(), req))

    expected = {
        ask_as_it_is: "unauthorized_sni",
        claim_the_authorised_name_v1: "version 1 is not supported",
        claim_the_authorised_name_v2: "unexpected_message",
        forge_the_client_hello: "certificate_too_broad",
        send_another_certificate: "certificate_mismatch",
        replay_the_old_request: None,  # signed again: over the old visitor's transcript
        replay_the_old_client_hello: "replayed_client_random",
    }
    for trick, refusal in expected.items():
        outcome, result = visit(liar, kpki, VICTIM, trick)
        name = trick.__name__
        assert not outcome.handshake_completed and not outcome.served, (name, result)
        assert not result.startswith("exit 0") and "read by a liar" not in result, (name, result)
        if refusal is None:
            assert [f.type for f in outcome.answers] == [w.SIGN_RESPONSE], name
            assert "SSL" in result or "signature" in result, (name, result)  # curl's verdict
        else:
            assert any(refusal in e for e in _errors(outcome)), (name, _errors(outcome))

    # The audit log says what the key server read itself: the refused visitor's real SNI.
    audit = kpki.dir / "audit.log"
    assert wait_until(lambda: audit.exists() and audit.read_text().count("\n") >= 8, 5)
    entries = [json.loads(line) for line in audit.read_text().splitlines()]
    assert entries[0]["reason"] == "certificate_too_broad"
    assert entries[0]["verified"]["sni"] == AUTHORISED
    assert entries[1]["event"] == "signed" and entries[1]["verified"]["sni"] == OWN
    refused = next(e for e in entries[2:] if e["event"] == "refused")
    assert refused["reason"] == "unauthorized_sni" and refused["verified"]["sni"] == VICTIM
    assert {e["verified"]["sni"] for e in entries if e["event"] == "signed"} == {OWN}, (
        "a handshake was signed with the certificate that covers the unauthorised name"
    )
    assert cli(["audit", "verify", "--key", str(kpki.audit_key), str(audit)]) == 0
