"""The key server's own reading of a handshake (core.keyless_handshake): real messages from our
TlsServer answering an OpenSSL client in memory, then every lie an edge could tell about them.
The key server's transcript hash must be aioquic's; each lie must be refused with its reason."""

from __future__ import annotations

import hashlib
import os
import ssl
from collections.abc import Callable
from dataclasses import replace

import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import given
from hypothesis import strategies as st

from blindfold import pki
from blindfold.core import keyless_handshake as kh
from blindfold.core import keyless_wire as w
from blindfold.core import tls13_server as ts
from blindfold.core.clienthello import peek_client_hello
from blindfold.core.routing import SniRouter
from blindfold.errors import ProtocolError
from blindfold.keyserver.signer import SiteKey
from tests.helpers import forge
from tests.helpers.tlsbuild import records
from tests.unit.test_tls13_server import HOST, NAMES, Pair, Site


@pytest.fixture(scope="module")
def sites(ca: pki.Issued, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Site]:
    tmp = tmp_path_factory.mktemp("keyless-handshake")
    return {k: Site(ca, k, tmp) for k in ("ec256", "ec384", "rsa2048", "ed25519")}


def openssl_flight(site: Site, sni: str = HOST, alpn: tuple[str, ...] = ("h2",)) -> bytes:
    ctx = ssl.create_default_context(cafile=str(site.cafile))
    ctx.set_alpn_protocols(list(alpn))
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = ctx.wrap_bio(inc, out, server_hostname=sni)
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    return out.read()


def request_for(site: Site, flight: bytes, sni: str = HOST) -> ts.SignatureRequested:
    """Our TLS engine's signature request for this client flight (records)."""
    hello = peek_client_hello(flight, 1 << 16)
    assert hello is not None
    server = ts.TlsServer(site.identity, ts.TlsSettings(), ts.SessionStore(10, 10), sni, hello)
    events = server.receive(flight, 0.0)
    assert isinstance(events[-1], ts.SignatureRequested), events
    return events[-1]


def edited(site: Site, edit: Callable[[forge.Hello], forge.Hello]) -> ts.SignatureRequested:
    """A signature request for a real OpenSSL ClientHello changed by `edit`."""
    flight = openssl_flight(site)
    hello = peek_client_hello(flight)
    assert hello is not None
    changed = edit(forge.Hello.parse(hello.message))
    return request_for(site, records(changed.encode()))


def refused(
    site: Site,
    messages: bytes,
    scheme: int = 0x0403,
    edge: Callable[[str], object] | None = None,
) -> str:
    with pytest.raises(ProtocolError) as info:
        hs = kh.parse_handshake(messages)
        kh.authorise(hs, scheme, edge or site.edge_may_sign, site.keys, {})
    return info.value.reason


# ------------------------------------------------------------------------------ the honest path
@pytest.mark.parametrize(
    "kind,scheme", [("ec256", 0x0403), ("ec384", 0x0503), ("rsa2048", 0x0804), ("ed25519", 0x0807)]
)
def test_the_key_servers_hash_is_the_transcript_hash(
    sites: dict[str, Site], kind: str, scheme: int
) -> None:
    site = sites[kind]
    p = Pair(site, sni="www.example.test")
    p.client_step()
    flight = p.out.read()
    p.to_server(flight)
    request = p.signed[0]
    hs = kh.parse_handshake(request.messages)
    assert hs.transcript_hash == request.transcript_hash  # aioquic's own
    assert hs.sni == "www.example.test"
    hello = peek_client_hello(flight)
    assert hello is not None and hs.client_random == hello.message[6:38]
    assert hs.certificate_sha256 == site.identity.certificate_sha256
    assert hs.alpn == "h2" and hs.cipher_suite == 0x1301
    assert kh.authorise(hs, scheme, site.edge_may_sign, site.keys, {}) is site.key
    p.to_client()
    p.handshake()  # and the client accepts the signature made over the key server's hash
    assert p.client.version() == "TLSv1.3"


@pytest.mark.parametrize("suite,size", [(0x1302, 48), (0x1303, 32)])
def test_sha384_and_chacha_suites(sites: dict[str, Site], suite: int, size: int) -> None:
    site = sites["ec256"]
    request = edited(site, lambda h: replace(h, ciphers=[suite]))
    hs = kh.parse_handshake(request.messages)
    assert hs.cipher_suite == suite and len(hs.transcript_hash) == size
    assert hs.transcript_hash == request.transcript_hash


def test_no_alpn(sites: dict[str, Site]) -> None:
    request = edited(sites["ec256"], lambda h: h.with_ext(16, None))
    assert kh.parse_handshake(request.messages).alpn is None


# ------------------------------------------------------------------------------ lies
def test_no_sni_is_refused(sites: dict[str, Site]) -> None:
    request = edited(sites["ec256"], lambda h: h.with_sni(None))
    assert refused(sites["ec256"], request.messages) == "no_sni"


def test_an_unauthorised_sni_is_refused(sites: dict[str, Site]) -> None:
    site = sites["ec256"]
    request = request_for(site, openssl_flight(site, sni="www.example.test"))
    only_apex = SniRouter([(HOST, True)]).lookup
    assert refused(site, request.messages, edge=only_apex) == "unauthorized_sni"
    # the certificate covers it, and another edge may have it signed
    hs = kh.parse_handshake(request.messages)
    assert kh.authorise(hs, 0x0403, site.edge_may_sign, site.keys, {}) is site.key


def test_a_certificate_wider_than_the_edge_is_refused(sites: dict[str, Site]) -> None:
    """atk-trust finding 1: an edge authorised for one of the certificate's names must not get
    a handshake signed with it (a browser would send the other names' requests over it)."""
    site = sites["ec256"]  # example.test, *.example.test
    request = request_for(site, openssl_flight(site, sni="www.example.test"))
    hs = kh.parse_handshake(request.messages)
    only_www = ("www.example.test",)
    extra = kh.uncovered_names(NAMES, only_www)
    assert extra == (HOST, "*.example.test")
    allowed = SniRouter([(n, True) for n in only_www]).lookup
    with pytest.raises(ProtocolError) as info:
        kh.authorise(hs, 0x0403, allowed, site.keys, {site.key.cert_sha256: extra})
    assert info.value.reason == "certificate_too_broad"
    assert "*.example.test" in info.value.detail
    # another key's entry does not matter; the edge's names covering all of them do
    assert kh.authorise(hs, 0x0403, allowed, site.keys, {bytes(32): extra}) is site.key


@pytest.mark.parametrize(
    "names,patterns,uncovered",
    [
        (["a.test", "*.a.test"], ["a.test", "*.a.test"], []),
        (["a.test", "*.a.test"], ["a.test"], ["*.a.test"]),
        (["a.test", "*.a.test"], ["*.a.test"], ["a.test"]),  # '*.' never covers the apex
        (["*.a.test"], ["www.a.test"], ["*.a.test"]),  # an exact name is not the wildcard
        (["*.x.a.test", "y.x.a.test"], ["*.a.test"], []),  # a wider wildcard covers them
        (["*.a.test"], ["*.x.a.test"], ["*.a.test"]),  # a narrower one does not
        (["*.a.test"], ["*.xa.test"], ["*.a.test"]),  # label boundaries
        (["a.test", "192.0.2.1"], ["a.test"], ["192.0.2.1"]),  # an IP address name
        (["keyless.a.test"], ["keyless.a.test"], []),
    ],
)
def test_uncovered_names(names: list[str], patterns: list[str], uncovered: list[str]) -> None:
    assert kh.uncovered_names(names, patterns) == tuple(uncovered)


@pytest.mark.parametrize(
    "names,patterns,overlap",
    [
        (["a.test", "*.a.test"], ["a.test"], True),
        (["a.test", "*.a.test"], ["www.a.test"], True),
        (["*.x.a.test"], ["*.a.test"], True),
        (["*.a.test"], ["*.x.a.test"], True),
        (["a.test"], ["*.a.test"], False),
        (["a.test", "*.a.test"], ["b.test", "*.b.test"], False),
        (["*.a.test"], ["*.xa.test"], False),
    ],
)
def test_names_overlap(names: list[str], patterns: list[str], overlap: bool) -> None:
    assert kh.names_overlap(names, patterns) is overlap


def test_a_forged_client_hello_has_another_transcript(sites: dict[str, Site]) -> None:
    """The lie that is signed: the SNI changed to an authorised name. The key server signs the
    forged transcript, which is not the visitor's: the hash differs from the real one."""
    site = sites["ec256"]
    request = request_for(site, openssl_flight(site, sni="www.example.test"))
    msgs = forge.split_messages(request.messages)
    forged = forge.Hello.parse(msgs[0]).with_sni(HOST).encode()
    hs = kh.parse_handshake(forged + b"".join(msgs[1:]))
    assert hs.sni == HOST and hs.transcript_hash != request.transcript_hash


def test_not_tls13(sites: dict[str, Site]) -> None:
    site = sites["ec256"]
    msgs = forge.split_messages(request_for(site, openssl_flight(site)).messages)
    hello = forge.Hello.parse(msgs[0]).with_ext(43, b"\x02\x03\x03")
    assert refused(site, hello.encode() + b"".join(msgs[1:])) == "not_tls13"
    sh = forge.ServerHello.parse(msgs[1])
    sh.extensions = [(t, b"\x03\x03" if t == 43 else d) for t, d in sh.extensions]
    assert refused(site, msgs[0] + sh.encode() + b"".join(msgs[2:])) == "not_tls13"


def _with_fillers(hello: forge.Hello, n: int, size: int = 0) -> forge.Hello:
    """The hello with `n` more extensions of unassigned types, `size` bytes each."""
    used = {t for t, _ in hello.extensions}
    types = [t for t in range(0x1000, 0x1000 + n + len(used)) if t not in used][:n]
    return replace(hello, extensions=[*hello.extensions, *((t, bytes(size)) for t in types)])


def test_client_hello_caps(sites: dict[str, Site]) -> None:
    """atk-trust finding 6: a ClientHello is at most 16 KiB and 64 extensions. The attack's
    hello (64 KiB of 16,000 empty extensions, ~5 ms of parsing each) and one of 4,000 empty
    extensions in 16 KiB are refused before they are parsed; real hellos are far below."""
    site = sites["ec256"]
    msgs = forge.split_messages(request_for(site, openssl_flight(site)).messages)
    hello = forge.Hello.parse(msgs[0])
    rest = b"".join(msgs[1:])
    room = kh.MAX_HELLO_EXTENSIONS - len(hello.extensions)
    at_cap = _with_fillers(hello, room).encode()
    assert kh.parse_handshake(at_cap + rest).sni == HOST  # 64 extensions: read
    assert refused(site, _with_fillers(hello, room + 1).encode() + rest) == "too_many_extensions"
    many = _with_fillers(hello, 3900).encode()
    assert len(many) <= kh.MAX_CLIENT_HELLO
    assert refused(site, many + rest) == "too_many_extensions"
    huge = _with_fillers(hello, 16000).encode()
    assert refused(site, huge + rest) == "hello_too_large"
    # a few large extensions (post-quantum key shares are 1-2 KB) pass up to the size cap
    big = _with_fillers(hello, 7, size=2000).encode()
    assert kh.MAX_CLIENT_HELLO - 2100 < len(big) <= kh.MAX_CLIENT_HELLO
    assert kh.parse_handshake(big + rest).sni == HOST
    bigger = _with_fillers(hello, 8, size=2000).encode()
    assert refused(site, bigger + rest) == "hello_too_large"


def test_server_message_caps(sites: dict[str, Site], ca: pki.Issued) -> None:
    site = sites["ec256"]
    msgs = forge.split_messages(request_for(site, openssl_flight(site)).messages)
    fillers = [(0x1000 + i, b"") for i in range(kh.MAX_SERVER_EXTENSIONS + 1)]
    ee = forge.encrypted_extensions(fillers)
    assert refused(site, msgs[0] + msgs[1] + ee + msgs[3]) == "too_many_extensions"
    ee = forge.encrypted_extensions(fillers[:-1])
    assert kh.parse_handshake(msgs[0] + msgs[1] + ee + msgs[3]).sni == HOST
    leaf = site.identity.ders[0]
    head = b"".join(msgs[:3])
    chain = forge.certificate([leaf] * (kh.MAX_CERTIFICATES + 1))
    assert refused(site, head + chain) == "too_many_certificates"
    assert kh.parse_handshake(head + forge.certificate([leaf] * kh.MAX_CERTIFICATES))


def _with_server_hello(
    messages: bytes, edit: Callable[[forge.ServerHello], forge.ServerHello]
) -> bytes:
    msgs = forge.split_messages(messages)
    sh = edit(forge.ServerHello.parse(msgs[1]))
    return msgs[0] + sh.encode() + b"".join(msgs[2:])


@pytest.mark.parametrize(
    "edit,reason",
    [
        (lambda sh: replace(sh, random=forge.HRR_RANDOM), "hello_retry"),
        (lambda sh: replace(sh, extensions=[*sh.extensions, (41, b"\x00\x00")]), "psk_handshake"),
        (lambda sh: replace(sh, session_id=os.urandom(32)), "session_id_mismatch"),
        (lambda sh: replace(sh, session_id=b""), "session_id_mismatch"),
        (lambda sh: replace(sh, suite=0x1302), "cipher_not_offered"),
        (lambda sh: replace(sh, suite=0x1304), "bad_server_hello"),
        (lambda sh: replace(sh, legacy_version=0x0304), "bad_server_hello"),
        (lambda sh: replace(sh, compression=1), "bad_server_hello"),
        (
            lambda sh: replace(
                sh,
                extensions=[(t, b"\x00\x17" + d[2:] if t == 51 else d) for t, d in sh.extensions],
            ),
            "key_share_mismatch",
        ),
        (
            lambda sh: replace(sh, extensions=[(t, d) for t, d in sh.extensions if t != 51]),
            "bad_server_hello",
        ),
        (lambda sh: replace(sh, extensions=[*sh.extensions, (0, b"")]), "bad_server_hello"),
        (lambda sh: replace(sh, extensions=[*sh.extensions, sh.extensions[0]]), "bad_server_hello"),
    ],
)
def test_server_hello_lies(
    sites: dict[str, Site], edit: Callable[[forge.ServerHello], forge.ServerHello], reason: str
) -> None:
    site = sites["ec256"]
    # the client offers AES-128 only, so that another TLS 1.3 suite is "not offered"
    request = edited(site, lambda h: replace(h, ciphers=[0x1301]))
    assert refused(site, _with_server_hello(request.messages, edit)) == reason


def test_encrypted_extensions_lies(sites: dict[str, Site]) -> None:
    site = sites["ec256"]
    msgs = forge.split_messages(request_for(site, openssl_flight(site)).messages)
    rest = msgs[3]
    for exts, reason in [
        ([(16, forge.alpn_data(b"spdy/3"))], "alpn_not_offered"),
        ([(16, forge.alpn_data(b"h2") + b"\x02h2")], "bad_encrypted_extensions"),
        ([(42, b"")], "bad_encrypted_extensions"),
        ([(0, b""), (0, b"")], "bad_encrypted_extensions"),
    ]:
        blob = msgs[0] + msgs[1] + forge.encrypted_extensions(exts) + rest
        assert refused(site, blob) == reason, exts


def test_certificate_lies(sites: dict[str, Site], ca: pki.Issued) -> None:
    site = sites["ec256"]
    msgs = forge.split_messages(request_for(site, openssl_flight(site)).messages)
    head = b"".join(msgs[:3])
    leaf = site.identity.ders[0]
    stranger = pki.issue(ca, [HOST]).cert.public_bytes(Encoding.DER)
    assert refused(site, head + forge.certificate([stranger])) == "certificate_mismatch"
    assert refused(site, head + forge.certificate([leaf], b"\x01")) == "bad_certificate"
    assert refused(site, head + forge.certificate([])) == "bad_certificate"
    # a certificate this key server holds, but not for this name
    other = sites["ec384"]
    keys = {**site.keys, **other.keys}
    other_name = SiteKey(
        "narrow", other.key.key, other.key.cert_sha256, SniRouter([("x.test", True)]), frozenset()
    )
    keys[other.key.cert_sha256] = other_name
    hs = kh.parse_handshake(head + forge.certificate([other.identity.ders[0]]))
    with pytest.raises(ProtocolError, match="certificate_mismatch"):
        kh.authorise(hs, 0x0503, site.edge_may_sign, keys, {})
    # the chain after the leaf does not matter to the key server (the visitor checks it)
    hs = kh.parse_handshake(head + forge.certificate([leaf, stranger]))
    assert hs.certificate_sha256 == hashlib.sha256(leaf).digest()


def test_schemes(sites: dict[str, Site]) -> None:
    site = sites["ec256"]
    msgs = forge.split_messages(request_for(site, openssl_flight(site)).messages)
    rsa_only = forge.Hello.parse(msgs[0]).with_ext(13, b"\x00\x02\x08\x04").encode()
    blob = rsa_only + b"".join(msgs[1:])
    assert refused(site, blob, scheme=0x0403) == "scheme_not_offered"
    request = request_for(site, openssl_flight(site))
    assert refused(site, request.messages, scheme=0x0804) == "bad_scheme"  # not an RSA key
    # OpenSSL offers PKCS#1 v1.5 (for certificates): never for a TLS 1.3 CertificateVerify
    assert refused(site, request.messages, scheme=0x0401) == "bad_scheme"


def test_messages_out_of_place(sites: dict[str, Site]) -> None:
    site = sites["ec256"]
    messages = request_for(site, openssl_flight(site)).messages
    msgs = forge.split_messages(messages)
    cv = bytes((15, 0, 0, 4, 4, 3, 0, 0))  # a CertificateVerify: never part of a request
    assert refused(site, messages + cv) == "unexpected_message"
    assert refused(site, messages[:-1]) == "bad_certificate"
    assert refused(site, b"".join(msgs[:3])) == "bad_certificate"  # no Certificate
    assert refused(site, msgs[0] + msgs[2] + msgs[1] + msgs[3]) == "bad_server_hello"
    # an HRR transcript starts with a synthetic message_hash (RFC 8446 §4.4.1)
    message_hash = bytes((254, 0, 0, 32)) + hashlib.sha256(msgs[0]).digest()
    assert refused(site, message_hash + messages) == "bad_client_hello"
    assert refused(site, b"") == "bad_client_hello"


@given(st.data())
def test_any_mutation_parses_or_is_refused(data: st.DataObject) -> None:
    blob = bytearray(_MESSAGES)
    for _ in range(data.draw(st.integers(1, 6))):
        op = data.draw(st.sampled_from(["set", "cut", "insert"]))
        i = data.draw(st.integers(0, len(blob) - 1))
        if op == "set":
            blob[i] = data.draw(st.integers(0, 255))
        elif op == "cut":
            del blob[i : i + data.draw(st.integers(1, 64))]
        else:
            blob[i:i] = data.draw(st.binary(min_size=1, max_size=8))
        if not blob:
            break
    try:
        hs = kh.parse_handshake(bytes(blob))
    except ProtocolError as exc:
        assert exc.reason in REASONS, exc.reason
        return
    assert hs.transcript_hash == kh.SUITE_HASHES[hs.cipher_suite](bytes(blob)).digest()


REASONS = {
    "bad_client_hello",
    "not_tls13",
    "no_sni",
    "bad_server_hello",
    "hello_retry",
    "session_id_mismatch",
    "psk_handshake",
    "cipher_not_offered",
    "key_share_mismatch",
    "bad_encrypted_extensions",
    "alpn_not_offered",
    "bad_certificate",
    "unexpected_message",
    "hello_too_large",
    "too_many_extensions",
    "too_many_certificates",
}
_MESSAGES: bytes


def test_the_wire_names_every_refusal_reason() -> None:
    """An edge labels a refusal with the key server's reason only if the wire format lists it
    (keyless_wire.error_reason): every reason the key server can give must be listed."""
    authorisation = {
        "unauthorized_sni",
        "certificate_mismatch",
        "certificate_too_broad",
        "scheme_not_offered",
    }
    others = {"bad_scheme", "replayed_client_random", "sign_failed"}
    assert REASONS | authorisation | others <= w.REFUSAL_REASONS


@pytest.fixture(autouse=True, scope="module")
def _fuzz_messages(sites: dict[str, Site]) -> None:
    global _MESSAGES
    site = sites["ec256"]
    _MESSAGES = request_for(site, openssl_flight(site)).messages


# ------------------------------------------------------------------------------ replays
def test_replay_guard(sites: dict[str, Site]) -> None:
    site = sites["ec256"]
    hs = kh.parse_handshake(request_for(site, openssl_flight(site)).messages)
    guard = kh.ReplayGuard(window_s=60, max_entries=3)
    assert guard.check(hs, "edge1", 0.0) is False
    guard.remember(hs, "edge1", 0.0)
    assert guard.check(hs, "edge1", 1.0) is True  # the same request again: a retry
    other = hs._replace(transcript_hash=bytes(32))
    with pytest.raises(ProtocolError, match="replayed_client_random"):
        guard.check(other, "edge1", 1.0)  # the visitor's random in another transcript
    with pytest.raises(ProtocolError, match="replayed_client_random"):
        guard.check(hs, "edge2", 1.0)  # the same request from another edge
    assert guard.check(other, "edge1", 60.0) is False  # the window is over
    assert len(guard) == 0
    for i in range(5):  # bounded: the oldest go first
        guard.remember(hs._replace(client_random=bytes([i]) * 32), "edge1", 100.0)
    assert len(guard) == 3
    assert guard.check(other._replace(client_random=bytes(32)), "edge1", 100.0) is False
    off = kh.ReplayGuard(window_s=0, max_entries=3)
    off.remember(hs, "edge1", 0.0)
    assert off.check(other, "edge2", 0.0) is False and len(off) == 0
