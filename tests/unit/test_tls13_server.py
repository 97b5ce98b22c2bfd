"""The keyless TLS 1.3 server core against a real client: Python's ssl (OpenSSL) over memory
BIOs, with the CertificateVerify signed by the key server's own signing code. No sockets, no
event loop: bytes in, events and bytes out."""

from __future__ import annotations

import hmac
import os
import ssl
import struct
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import given
from hypothesis import strategies as st

from blindfold import pki
from blindfold.core import keyless_handshake as kh
from blindfold.core import tls13_record as rl
from blindfold.core import tls13_server as ts
from blindfold.core.clienthello import peek_client_hello
from blindfold.core.routing import SniRouter
from blindfold.keyserver.signer import SiteKey, schemes_for, sign_certificate_verify
from tests.helpers import forge
from tests.helpers.tlsbuild import records as records_of

HOST = "example.test"
NAMES = (HOST, "*.example.test")


class Site:
    def __init__(self, ca: pki.Issued, kind: str, tmp: Path) -> None:
        leaf = pki.issue(ca, list(NAMES), kind=kind)  # type: ignore[arg-type]
        self.identity = ts.ServerIdentity.from_pem(leaf.cert_pem())
        self.key = SiteKey(
            kind,
            leaf.key,
            self.identity.certificate_sha256,
            SniRouter([(n, True) for n in NAMES]),
            schemes_for(leaf.key),
        )
        self.keys = {self.key.cert_sha256: self.key}
        self.edge_may_sign = SniRouter([(n, True) for n in NAMES]).lookup
        self.cafile = tmp / "ca.pem"
        ca.write(self.cafile)

    def keyserver_sign(self, request: ts.SignatureRequested) -> bytes:
        """What the key server does with the messages the edge sends: parse and hash them
        itself, authorise, sign. Its own hash is aioquic's transcript hash."""
        hs = kh.parse_handshake(request.messages)
        assert hs.transcript_hash == request.transcript_hash
        key = kh.authorise(hs, request.scheme, self.edge_may_sign, self.keys, {})
        return sign_certificate_verify(key, request.scheme, hs.transcript_hash)


@pytest.fixture(scope="module")
def sites(ca: pki.Issued, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Site]:
    tmp = tmp_path_factory.mktemp("tls13")
    return {k: Site(ca, k, tmp) for k in ("ec256", "ec384", "rsa2048", "ed25519")}


class Pair:
    """A Python ssl client and a TlsServer wired back to back."""

    def __init__(
        self,
        site: Site,
        *,
        alpn: list[str] | None = ("h2", "http/1.1"),  # type: ignore[assignment]
        session: ssl.SSLSession | None = None,
        settings: ts.TlsSettings | None = None,
        store: ts.SessionStore | None = None,
        ctx: ssl.SSLContext | None = None,
        sni: str = HOST,
    ) -> None:
        self.site = site
        self.ctx = ctx or ssl.create_default_context(cafile=str(site.cafile))
        if alpn:
            self.ctx.set_alpn_protocols(list(alpn))
        self.inc, self.out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.client = self.ctx.wrap_bio(self.inc, self.out, server_hostname=sni, session=session)
        self.store = store if store is not None else ts.SessionStore(3600, 100)
        self.server = ts.TlsServer(site.identity, settings or ts.TlsSettings(), self.store, sni)
        self.events: list[ts.Event] = []
        self.signed: list[ts.SignatureRequested] = []
        self.now = 1000.0

    def client_step(self) -> bool:
        try:
            self.client.do_handshake()
            return True
        except ssl.SSLWantReadError:
            return False

    def to_server(self, data: bytes | None = None) -> list[ts.Event]:
        data = self.out.read() if data is None else data
        events = self.server.receive(data, self.now) if data else []
        while events and isinstance(events[-1], ts.SignatureRequested):
            request = events.pop()
            assert isinstance(request, ts.SignatureRequested)
            self.signed.append(request)
            sig = self.site.keyserver_sign(request)
            events += self.server.signature_received(sig, self.now)
        self.events += events
        return events

    def to_client(self) -> bytes:
        data = self.server.data_to_send()
        if data:
            self.inc.write(data)
        return data

    def handshake(self) -> None:
        for _ in range(10):
            done = self.client_step()
            self.to_server()
            self.to_client()
            if done and self.server.state == "open":
                # the client reads the ticket with its first read
                return
        raise AssertionError(f"no handshake: {self.events}")

    def client_read(self) -> bytes:
        got = b""
        while True:
            try:
                chunk = self.client.read(1 << 20)
            except ssl.SSLWantReadError:
                return got
            if not chunk:
                return got
            got += chunk


def records(data: bytes) -> list[tuple[int, int]]:
    out, pos = [], 0
    while pos < len(data):
        ctype, _v, length = struct.unpack_from(">BHH", data, pos)
        out.append((ctype, length))
        pos += 5 + length
    return out


@pytest.mark.parametrize(
    "kind,scheme", [("ec256", 0x0403), ("ec384", 0x0503), ("rsa2048", 0x0804), ("ed25519", 0x0807)]
)
def test_full_handshake_signed_remotely(sites: dict[str, Site], kind: str, scheme: int) -> None:
    p = Pair(sites[kind])
    p.handshake()
    assert p.client.version() == "TLSv1.3"
    assert [s.scheme for s in p.signed] == [scheme]
    assert len(p.signed[0].transcript_hash) == 32  # SHA-256 suites: only the hash leaves
    assert any(isinstance(e, ts.HandshakeCompleted) and e.alpn == "h2" for e in p.events)
    assert p.client.selected_alpn_protocol() == "h2"


def test_application_data_both_ways_in_bounded_records(sites: dict[str, Site]) -> None:
    p = Pair(sites["ec256"])
    p.handshake()
    payload = bytes(range(256)) * 400  # 100 KiB
    p.client.write(payload)
    got = b"".join(e.data for e in p.to_server() if isinstance(e, ts.DataReceived))
    assert got == payload
    p.server.send(payload)
    wire = p.to_client()
    sizes = [length for ctype, length in records(wire)]
    assert all(ctype == rl.APPLICATION_DATA for ctype, _ in records(wire))
    assert max(sizes) <= rl.MAX_PLAINTEXT + 1 + rl.TAG_LEN
    assert p.client_read() == payload


@pytest.mark.parametrize(
    "offered,chosen", [(["h2", "http/1.1"], "h2"), (["http/1.1"], "http/1.1"), (None, None)]
)
def test_alpn(sites: dict[str, Site], offered: list[str] | None, chosen: str | None) -> None:
    p = Pair(sites["ec256"], alpn=offered)
    p.handshake()
    assert p.server.alpn == chosen and p.client.selected_alpn_protocol() == chosen


def test_no_common_alpn_is_refused_with_its_alert(sites: dict[str, Site]) -> None:
    p = Pair(sites["ec256"], alpn=["spdy/3"])
    p.client_step()
    events = p.to_server()
    assert isinstance(events[-1], ts.ConnectionFailed)
    assert events[-1].alert == rl.A_NO_APPLICATION_PROTOCOL
    assert not p.signed  # refused before anything was signed
    p.to_client()
    with pytest.raises(ssl.SSLError, match=r"NO_APPLICATION_PROTOCOL|no application protocol"):
        p.client.do_handshake()


def test_server_updates_its_keys(sites: dict[str, Site]) -> None:
    p = Pair(sites["ec256"], settings=ts.TlsSettings(key_update_records=3))
    p.handshake()
    chunks = [bytes([i]) * 1000 for i in range(20)]
    for chunk in chunks:
        p.server.send(chunk)
    p.to_client()
    assert p.client_read() == b"".join(chunks)  # OpenSSL followed every KeyUpdate
    assert p.server.key_updates_sent >= 5
    p.client.write(b"still talking")
    assert next(e for e in p.to_server() if isinstance(e, ts.DataReceived)).data == b"still talking"


def test_resumption_needs_no_signature_and_tickets_are_single_use(sites: dict[str, Site]) -> None:
    site = sites["ec256"]
    store = ts.SessionStore(3600, 100)
    first = Pair(site, store=store)
    first.handshake()
    first.client.write(b"x")
    first.to_server()
    first.client_read()  # the ticket arrives after the client's Finished
    session = first.client.session
    assert session is not None and session.has_ticket and len(store) == 1
    second = Pair(site, store=store, session=session, ctx=first.ctx)
    second.handshake()
    assert second.client.session_reused and second.server.resumed
    assert second.signed == []  # the key server was not asked
    third = Pair(site, store=store, session=session, ctx=first.ctx)
    third.handshake()
    assert not third.client.session_reused and len(third.signed) == 1


def test_a_ticket_does_not_resume_another_hostname(sites: dict[str, Site]) -> None:
    site = sites["ec256"]
    store = ts.SessionStore(3600, 100)
    first = Pair(site, store=store)
    first.handshake()
    first.client.write(b"x")
    first.to_server()
    first.client_read()
    ctx = first.ctx
    ctx.check_hostname = False
    other = Pair(site, store=store, session=first.client.session, ctx=ctx, sni="www.example.test")
    other.handshake()
    assert not other.server.resumed


def test_ticket_lifetime_and_bound() -> None:
    store = ts.SessionStore(10, 2)
    import aioquic.tls as q

    def ticket(n: int) -> q.SessionTicket:
        import datetime

        now = datetime.datetime.now(datetime.UTC)
        return q.SessionTicket(
            1, q.CipherSuite.AES_128_GCM_SHA256, now, now, b"s", HOST, bytes([n])
        )

    store.put(ticket(1), HOST, 0.0)
    store.put(ticket(2), HOST, 0.0)
    store.put(ticket(3), HOST, 0.0)
    assert len(store) == 2 and store.take(bytes([1]), HOST, 1.0) is None  # oldest dropped
    assert store.take(bytes([2]), HOST, 11.0) is None  # expired
    store.expire(11.0)
    assert len(store) == 0


def _tamper_last_record(data: bytes) -> bytes:
    assert records(data)[-1][0] == rl.APPLICATION_DATA
    return data[:-1] + bytes([data[-1] ^ 0x01])


def test_bad_finished_record_gets_an_alert_the_client_can_read(sites: dict[str, Site]) -> None:
    p = Pair(sites["ec256"])
    p.client_step()
    p.to_server()
    p.to_client()
    assert p.client_step()  # the client has our Finished and sent its own
    flight = p.out.read()
    events = p.to_server(_tamper_last_record(flight))
    assert isinstance(events[-1], ts.ConnectionFailed) and events[-1].alert == rl.A_BAD_RECORD_MAC
    p.to_client()
    # the alert is under our application key, which the client reads with after our Finished
    with pytest.raises(ssl.SSLError, match=r"BAD_RECORD_MAC|bad record mac"):
        p.client_read()


def test_failed_signature_sends_a_plaintext_internal_error(sites: dict[str, Site]) -> None:
    p = Pair(sites["ec256"])
    p.client_step()
    events = p.server.receive(p.out.read(), 0.0)
    assert isinstance(events[-1], ts.SignatureRequested)
    assert p.server.data_to_send() == b""  # nothing leaves before the signature
    events = p.server.signature_failed("keyserver_down")
    assert isinstance(events[-1], ts.ConnectionFailed)
    assert p.server.data_to_send() == bytes.fromhex("150303000202") + bytes([rl.A_INTERNAL_ERROR])


def test_change_cipher_spec_after_the_handshake_is_unexpected(sites: dict[str, Site]) -> None:
    p = Pair(sites["ec256"])
    p.handshake()
    events = p.to_server(rl.CHANGE_CIPHER_SPEC_RECORD)
    assert isinstance(events[-1], ts.ConnectionFailed)
    assert events[-1].alert == rl.A_UNEXPECTED_MESSAGE


def test_oversized_record_is_a_record_overflow(sites: dict[str, Site]) -> None:
    p = Pair(sites["ec256"])
    p.handshake()
    events = p.to_server(struct.pack(">BHH", 23, 0x0303, rl.MAX_CIPHERTEXT + 1))
    assert isinstance(events[-1], ts.ConnectionFailed)
    assert events[-1].alert == rl.A_RECORD_OVERFLOW


def test_close_notify_is_a_clean_end(sites: dict[str, Site]) -> None:
    p = Pair(sites["ec256"])
    p.handshake()
    with pytest.raises(ssl.SSLWantReadError):
        p.client.unwrap()
    assert any(isinstance(e, ts.PeerClosed) for e in p.to_server())
    p.server.close()
    p.to_client()
    p.client.unwrap()  # the client receives our close_notify


def test_finished_and_binders_are_compared_in_constant_time(
    sites: dict[str, Site], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append(len(a))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    site = sites["ec256"]
    store = ts.SessionStore(3600, 10)
    first = Pair(site, store=store)
    first.handshake()
    assert calls == [32]  # the client's Finished
    first.client.write(b"x")
    first.to_server()
    first.client_read()
    calls.clear()
    second = Pair(site, store=store, session=first.client.session, ctx=first.ctx)
    second.handshake()
    assert second.server.resumed and calls == [32, 32]  # the PSK binder, then Finished


def test_fallback_reasons_from_real_client_hellos(sites: dict[str, Site]) -> None:
    def hello_of(ctx: ssl.SSLContext) -> bytes:
        inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
        obj = ctx.wrap_bio(inc, out, server_hostname=HOST)
        with pytest.raises(ssl.SSLWantReadError):
            obj.do_handshake()
        return out.read()

    schemes = sites["ec256"].identity.schemes
    modern = ssl.create_default_context()
    hello = peek_client_hello(hello_of(modern), 16384)
    assert hello is not None and ts.fallback_reason(hello, schemes) is None
    old = ssl.create_default_context()
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    hello = peek_client_hello(hello_of(old), 16384)
    assert hello is not None and ts.fallback_reason(hello, schemes) == "tls12_only"


def _in_thread(fn: Callable[[], object]) -> object:
    """`fn()` run in a new thread; its result, or its exception raised here."""
    out: list[object] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(30)
    assert not thread.is_alive(), "the thread did not finish"
    if errors:
        raise errors[0]
    return out[0]


def test_connections_work_from_any_thread(sites: dict[str, Site]) -> None:
    """An edge may drive TlsServer from several threads (executors, a loop per thread): a
    handshake must not depend on state made by another thread."""
    site = sites["ec256"]
    Pair(site).handshake()  # this thread first: whatever it leaves behind for reuse

    def handshake() -> str:
        p = Pair(site)
        p.handshake()
        return p.server.state

    assert _in_thread(handshake) == "open"
    assert _in_thread(handshake) == "open"
    Pair(site).handshake()  # and this thread again, after the others


def _client_flight(site: Site) -> bytes:
    p = Pair(site)
    p.client_step()
    return p.out.read()


@given(st.binary(max_size=3000))
def test_garbage_never_raises(data: bytes) -> None:
    site = _SITE_FOR_FUZZ
    server = ts.TlsServer(site.identity, ts.TlsSettings(), ts.SessionStore(10, 10), HOST)
    for event in server.receive(data, 0.0):
        assert isinstance(event, ts.Event)


@given(st.data())
def test_mutated_client_hellos_never_raise(data: st.DataObject) -> None:
    site = _SITE_FOR_FUZZ
    flight = bytearray(_FLIGHT_FOR_FUZZ)
    for _ in range(data.draw(st.integers(1, 8))):
        i = data.draw(st.integers(0, len(flight) - 1))
        flight[i] = data.draw(st.integers(0, 255))
    server = ts.TlsServer(site.identity, ts.TlsSettings(), ts.SessionStore(10, 10), HOST)
    events = server.receive(bytes(flight), 0.0)
    if events and isinstance(events[-1], ts.SignatureRequested):
        sig = sign_certificate_verify(site.key, events[-1].scheme, events[-1].transcript_hash)
        events = server.signature_received(sig, 0.0)
    for event in events:
        assert not isinstance(event, ts.SignatureRequested)


_SITE_FOR_FUZZ: Site
_FLIGHT_FOR_FUZZ: bytes


@pytest.fixture(autouse=True, scope="module")
def _fuzz_inputs(sites: dict[str, Site]) -> None:
    global _SITE_FOR_FUZZ, _FLIGHT_FOR_FUZZ
    _SITE_FOR_FUZZ = sites["ec256"]
    _FLIGHT_FOR_FUZZ = _client_flight(sites["ec256"])


# ------------------------------------------------------------------------------ the handshake
def _refusal(site: Site, flight: bytes) -> ts.ConnectionFailed:
    server = ts.TlsServer(site.identity, ts.TlsSettings(), ts.SessionStore(10, 10), HOST)
    events = server.receive(flight, 0.0)
    assert events and isinstance(events[-1], ts.ConnectionFailed), events
    assert server.data_to_send() == bytes((21, 3, 3, 0, 2, 2, events[-1].alert or 0))
    return events[-1]


@pytest.mark.parametrize(
    "curve,group",
    [
        ("X25519", 0x001D),
        ("prime256v1", 0x0017),
        ("secp384r1", 0x0018),
        ("secp521r1", 0x0019),
        ("X448", 0x001E),
    ],
)
def test_every_group_the_edge_answers_completes_a_handshake(
    sites: dict[str, Site], curve: str, group: int
) -> None:
    """`fallback_reason` keeps a ClientHello whose key shares are all in SERVER_GROUPS (no
    HelloRetryRequest needed): each of those groups must then work on its own."""
    ctx = ssl.create_default_context(cafile=str(sites["ec256"].cafile))
    try:
        ctx.set_ecdh_curve(curve)
    except ssl.SSLError:
        # some builds of Python's ssl (Debian's 3.11) name only EC curves here; OpenSSL's
        # default ClientHello offers an X25519 key share alone, so that group needs no setting
        if curve != "X25519":
            pytest.skip(f"this Python's ssl cannot offer {curve} alone (set_ecdh_curve)")
    p = Pair(sites["ec256"], ctx=ctx)
    p.client_step()
    flight = p.out.read()
    hello = peek_client_hello(flight)
    assert hello is not None and hello.key_share_groups == (group,)
    assert ts.fallback_reason(hello, sites["ec256"].identity.schemes) is None
    p.to_server(flight)
    p.to_client()
    p.handshake()
    assert p.client.version() == "TLSv1.3" and p.server.state == "open"


def test_each_handshake_takes_its_own_key_share_from_the_pool(sites: dict[str, Site]) -> None:
    pool = ts.KeySharePool(size=4)
    assert pool.fill(10) == 4 and len(pool) == 4
    publics = {public for _key, public in pool._pairs}
    seen = []
    for _ in range(3):
        p = Pair(sites["ec256"])
        p.server.key_shares = pool
        p.handshake()
        sh = forge.ServerHello.parse(forge.split_messages(p.signed[0].messages)[1])
        share = dict(sh.extensions)[51]
        assert share[:4] == bytes.fromhex("001d0020")
        seen.append(share[4:])
    assert len(set(seen)) == 3 and set(seen) <= publics  # from the pool, each once
    assert len(pool) == 1 and pool.made_on_demand == 0
    assert {public for _key, public in pool._pairs}.isdisjoint(seen)  # forgotten once used
    pool.take()
    pool.take()  # empty: made on the spot
    assert pool.made_on_demand == 1


def test_a_forked_child_does_not_hand_out_the_parents_key_shares() -> None:
    pool = ts.KeySharePool(size=8)
    pool.fill(8)
    parent = {public for _key, public in pool._pairs}
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its pool size and the key it would use first
        try:
            _key, public = pool.take()
            os.write(write_end, bytes((len(pool),)) + public)
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        got = f.read()
    os.waitpid(pid, 0)
    assert got[0] == 0  # the child's pool started empty
    assert len(got) == 33 and got[1:] not in parent
    assert len(pool) == 8  # the parent's is untouched


def test_a_handshake_may_resume_in_another_thread(sites: dict[str, Site]) -> None:
    """The key server's answer may be handled by another thread than the ClientHello."""
    p = Pair(sites["ec256"])
    p.client_step()
    flight = p.out.read()
    events = _in_thread(lambda: p.server.receive(flight, p.now))
    assert isinstance(events, list) and isinstance(events[-1], ts.SignatureRequested)
    sig = p.site.keyserver_sign(events[-1])
    assert p.server.signature_received(sig, p.now) == []
    p.to_client()
    p.handshake()
    assert p.server.state == "open"


def test_server_messages_are_aioquics(sites: dict[str, Site]) -> None:
    """Our handshake messages, byte for byte what aioquic's builders make of the same fields."""
    from aioquic.buffer import Buffer  # type: ignore[attr-defined]
    from aioquic.tls import (
        Certificate,
        CertificateVerify,
        EncryptedExtensions,
        NewSessionTicket,
        ServerHello,
        push_certificate,
        push_certificate_verify,
        push_encrypted_extensions,
        push_new_session_ticket,
        push_server_hello,
    )

    def built(push: Callable[[Buffer, object], None], value: object) -> bytes:
        buf = Buffer(capacity=16384)
        push(buf, value)
        return buf.data

    random, sid, share = os.urandom(32), os.urandom(32), os.urandom(32)
    for psk in (False, True):
        theirs = ServerHello(
            random=random,
            legacy_session_id=sid,
            cipher_suite=0x1302,
            compression_method=0,
            key_share=(0x001D, share),
            pre_shared_key=0 if psk else None,
            supported_version=0x0304,
        )
        assert ts.server_hello(random, sid, 0x1302, 0x001D, share, psk) == built(
            push_server_hello,  # type: ignore[arg-type]
            theirs,
        )
    for alpn, sni in (("h2", True), ("http/1.1", False), (None, True), (None, False)):
        ee = EncryptedExtensions(alpn_protocol=alpn, other_extensions=[(0, b"")] if sni else [])
        assert ts.encrypted_extensions(alpn, sni) == built(push_encrypted_extensions, ee)  # type: ignore[arg-type]
    ders = sites["rsa2048"].identity.ders + sites["ec256"].identity.ders
    cert = Certificate(request_context=b"", certificates=[(d, b"") for d in ders])
    assert ts.certificate(ders) == built(push_certificate, cert)  # type: ignore[arg-type]
    cv = CertificateVerify(algorithm=0x0804, signature=os.urandom(256))
    assert ts.certificate_verify(0x0804, cv.signature) == built(push_certificate_verify, cv)  # type: ignore[arg-type]
    nst = NewSessionTicket(
        ticket_lifetime=7200, ticket_age_add=0xDEADBEEF, ticket_nonce=b"\x00", ticket=sid
    )
    assert ts.new_session_ticket(7200, 0xDEADBEEF, b"\x00", sid) == built(
        push_new_session_ticket,  # type: ignore[arg-type]
        nst,
    )


def _openssl_hello(site: Site, edit: Callable[[forge.Hello], forge.Hello]) -> bytes:
    hello = peek_client_hello(_client_flight(site))
    assert hello is not None
    return records_of(edit(forge.Hello.parse(hello.message)).encode())


def _compressed_p256(hello: forge.Hello) -> forge.Hello:
    point = ec.generate_private_key(ec.SECP256R1()).public_key()
    data = point.public_bytes(Encoding.X962, PublicFormat.CompressedPoint)
    share = (0x0017).to_bytes(2, "big") + len(data).to_bytes(2, "big") + data
    return hello.with_ext(51, len(share).to_bytes(2, "big") + share)


@pytest.mark.parametrize(
    "edit,alert",
    [
        # RFC 8446 §4.1.2: a TLS 1.3 ClientHello's compression methods are exactly [null]
        (lambda h: replace(h, compression=b"\x02\x00\x01"), rl.A_ILLEGAL_PARAMETER),
        # §4.2.8.2: ECDHE shares are uncompressed points
        (_compressed_p256, rl.A_ILLEGAL_PARAMETER),
        # §4.2.8: an X25519 share is 32 bytes; a key_share list must add up
        (lambda h: h.with_ext(51, bytes.fromhex("0023001d001f") + bytes(31)), 47),
        (lambda h: h.with_ext(51, bytes.fromhex("0024001d0020") + bytes(31)), rl.A_DECODE_ERROR),
        # §7.4.2: an X25519 shared secret of zeros (a low-order point) aborts
        (lambda h: h.with_ext(51, bytes.fromhex("0024001d0020") + bytes(32)), 47),
        # §9.2: (EC)DHE needs a key_share
        (lambda h: h.with_ext(51, None), rl.A_MISSING_EXTENSION),
        # §4.2.11: pre_shared_key must be the last extension
        (
            lambda h: replace(
                h,
                extensions=[
                    (
                        41,
                        bytes.fromhex("000a0004")
                        + b"tick"
                        + bytes(4)
                        + b"\x00\x21\x20"
                        + bytes(32),
                    ),
                    *h.extensions,
                ],
            ),
            rl.A_ILLEGAL_PARAMETER,
        ),
    ],
)
def test_client_hellos_refused_with_their_alert(
    sites: dict[str, Site], edit: Callable[[forge.Hello], forge.Hello], alert: int
) -> None:
    assert _refusal(sites["ec256"], _openssl_hello(sites["ec256"], edit)).alert == alert


def test_a_wrong_psk_binder_is_a_decrypt_error(sites: dict[str, Site]) -> None:
    """RFC 8446 §6.2: decrypt_error when a PSK binder does not validate; the ticket is spent."""
    site = sites["ec256"]
    store = ts.SessionStore(3600, 10)
    first = Pair(site, store=store)
    first.handshake()
    first.client.write(b"x")
    first.to_server()
    first.client_read()
    second = Pair(site, store=store, session=first.client.session, ctx=first.ctx)
    second.client_step()
    flight = bytearray(second.out.read())
    hello = peek_client_hello(bytes(flight))
    assert hello is not None and hello.extensions[-1] == 41
    flight[len(hello.message) + 5 - 1] ^= 1  # the binder is the ClientHello's last bytes
    events = second.server.receive(bytes(flight), second.now)
    assert isinstance(events[-1], ts.ConnectionFailed)
    assert events[-1].alert == rl.A_DECRYPT_ERROR and events[-1].reason == "bad_binder"
    assert len(store) == 0


@pytest.mark.parametrize(
    "offered,chosen",
    [
        ([0x1301, 0x1302, 0x1303], 0x1301),
        ([0x1303, 0x1301], 0x1303),  # a client without AES hardware lists ChaCha20 first
        ([0x0A0A, 0x1303, 0x1302], 0x1303),  # GREASE (RFC 8701) does not count as first
        ([0x1302, 0x1303], 0x1302),  # otherwise the server's order
    ],
)
def test_cipher_suite_choice(sites: dict[str, Site], offered: list[int], chosen: int) -> None:
    flight = _openssl_hello(sites["ec256"], lambda h: replace(h, ciphers=offered))
    server = ts.TlsServer(sites["ec256"].identity, ts.TlsSettings(), ts.SessionStore(10, 10), HOST)
    (request,) = server.receive(flight, 0.0)
    assert isinstance(request, ts.SignatureRequested)
    assert forge.ServerHello.parse(forge.split_messages(request.messages)[1]).suite == chosen


def test_a_ticket_resumes_only_with_its_own_cipher_suite(sites: dict[str, Site]) -> None:
    """RFC 8446 §4.2.11: the PSK's hash must be the chosen suite's; another suite means a full
    handshake (the ticket is spent either way: single use)."""
    site = sites["ec256"]
    store = ts.SessionStore(3600, 10)
    first = Pair(site, store=store)
    first.handshake()
    first.client.write(b"x")
    first.to_server()
    first.client_read()
    assert first.server.cipher_suite == 0x1301 and len(store) == 1
    second = Pair(site, store=store, session=first.client.session, ctx=first.ctx)
    second.client_step()
    hello = peek_client_hello(second.out.read())
    assert hello is not None and hello.extensions[-1] == 41  # it offers the ticket
    sha384 = replace(forge.Hello.parse(hello.message), ciphers=[0x1302])
    events = second.server.receive(records_of(sha384.encode()), second.now)
    assert isinstance(events[-1], ts.SignatureRequested)  # a full handshake
    assert not second.server.resumed and len(store) == 0


def test_early_data_is_never_accepted(sites: dict[str, Site]) -> None:
    """RFC 8446 §8: 0-RTT data can be replayed. A client offering early data with its ticket
    gets a full handshake, no early_data in EncryptedExtensions, and keeps its ticket."""
    site = sites["ec256"]
    store = ts.SessionStore(3600, 10)
    first = Pair(site, store=store)
    first.handshake()
    first.client.write(b"x")
    first.to_server()
    first.client_read()
    second = Pair(site, store=store, session=first.client.session, ctx=first.ctx)
    second.client_step()
    hello = peek_client_hello(second.out.read())
    assert hello is not None
    offer = forge.Hello.parse(hello.message)
    psk = offer.extensions[-1]
    assert psk[0] == 41
    with_early = replace(offer, extensions=[*offer.extensions[:-1], (42, b""), psk])
    events = second.server.receive(records_of(with_early.encode()), second.now)
    assert isinstance(events[-1], ts.SignatureRequested)
    ee = forge.split_messages(events[-1].messages)[2]
    assert ee[0] == 8 and b"\x00\x2a\x00\x00" not in ee
    assert not second.server.resumed and len(store) == 1


def test_many_handshakes_wait_for_signatures_at_once(sites: dict[str, Site]) -> None:
    """An edge has many handshakes waiting on the key server; answers come in any order."""
    pairs = [Pair(sites["ec256"]) for _ in range(20)]
    requests = []
    for p in pairs:
        p.client_step()
        (request,) = p.server.receive(p.out.read(), p.now)
        assert isinstance(request, ts.SignatureRequested) and p.server.state == "signing"
        requests.append(request)
    for p, request in reversed(list(zip(pairs, requests, strict=True))):
        assert p.server.signature_received(p.site.keyserver_sign(request), p.now) == []
        p.to_client()
        p.handshake()
        assert p.server.state == "open"
