"""The keyless TLS 1.3 server core against a real client: Python's ssl (OpenSSL) over memory
BIOs, with the CertificateVerify signed by the key server's own signing code. No sockets, no
event loop: bytes in, events and bytes out."""

from __future__ import annotations

import hmac
import ssl
import struct
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blindfold import pki
from blindfold.core import keyless_handshake as kh
from blindfold.core import tls13_record as rl
from blindfold.core import tls13_server as ts
from blindfold.core.clienthello import peek_client_hello
from blindfold.core.routing import SniRouter
from blindfold.keyserver.signer import SiteKey, schemes_for, sign_certificate_verify

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
        key = kh.authorise(hs, request.scheme, self.edge_may_sign, self.keys)
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
