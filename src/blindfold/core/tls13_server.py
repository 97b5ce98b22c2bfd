"""A TLS 1.3 server connection whose private key lives elsewhere, sans-IO.

This is the server side of the TLS 1.3 handshake (RFC 8446 §4) as the keyless edge needs it:
a full (EC)DHE handshake or a PSK-DHE resumption, nothing else: no HelloRetryRequest (a
ClientHello that would need one, or TLS 1.2, is passed through to the origin instead: see
`fallback_reason`), no client certificates, no early data. That is a straight line, split
where the key server's signature is awaited, and it is written here on the RFC 8446 §7.1 key
schedule of `core.tls13_keys` (hashlib and one-shot HMAC; checked at start-up against
aioquic's, `core.aioquic_compat`), with `tls13_record` as the record layer. aioquic's own
server (`tls.Context`, which this engine used to drive through its internals) is not used:
a profile of the edge put 46% of its CPU per handshake in `Context._server_handle_hello` (a
second full parse of the ClientHello the edge had already parsed, a dataclass and
generator-based builders per message, the certificate chain encoded again on every
handshake), and its synchronous `sign()` needed a greenlet to suspend the handshake for the
key server. Here the ClientHello is read from the
edge's own parse (`core.clienthello`), the Certificate message is built once per
certificate, and waiting for the signature is a state.

What else this module does:
- The CertificateVerify signature is not made here: after the Certificate, the handshake
  stops with a `SignatureRequested` event (the scheme and the handshake messages the signature
  covers, from which the key server computes the transcript hash itself). The caller asks the
  key server and resumes with `signature_received`. Nothing is sent to the visitor before.
- Finished and PSK binders are compared in constant time (`hmac.compare_digest`).
- TLS-over-TCP parts: middlebox-compatibility ChangeCipherSpec (RFC 8446 §D.4), alerts under
  the right keys, KeyUpdate both ways (§4.6.3), record limits, skipping rejected early data
  (§4.2.10), and session tickets issued only after the client's Finished, kept server-side,
  single use, with a configurable lifetime and never valid for 0-RTT.
- Ephemeral X25519 key shares come from a `KeySharePool` filled ahead of time, each key
  handed out once (§4.2.8); the pool is emptied in a forked child.

A connection is created per visitor with the ClientHello bytes read so far; `receive` takes more
bytes, the methods return events, and `data_to_send` gives the bytes for the visitor.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa, x448, x25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from blindfold.core import tls13_record as rl
from blindfold.core.clienthello import ClientHello, peek_client_hello
from blindfold.core.tls13_keys import KeySchedule
from blindfold.errors import ProtocolError

# RFC 8446 §4 handshake types and §4.2 extensions used here
HS_CLIENT_HELLO = 1
HS_SERVER_HELLO = 2
HS_NEW_SESSION_TICKET = 4
HS_ENCRYPTED_EXTENSIONS = 8
HS_CERTIFICATE = 11
HS_CERTIFICATE_VERIFY = 15
HS_FINISHED = 20
HS_KEY_UPDATE = 24
EXT_SERVER_NAME = 0
EXT_ALPN = 16
EXT_PRE_SHARED_KEY = 41
EXT_EARLY_DATA = 42
EXT_SUPPORTED_VERSIONS = 43
EXT_PSK_MODES = 45
EXT_KEY_SHARE = 51
PSK_DHE_KE = 1
TLS13 = 0x0304

X25519 = 0x001D
X448 = 0x001E
_CURVES: dict[int, type[ec.EllipticCurve]] = {
    0x0017: ec.SECP256R1,
    0x0018: ec.SECP384R1,
    0x0019: ec.SECP521R1,
}
# Groups this server answers with a key share (so no HelloRetryRequest is needed).
SERVER_GROUPS = frozenset((X25519, X448, *_CURVES))
CIPHER_SUITES = (0x1301, 0x1302, 0x1303)  # in the server's order of preference
CHACHA = 0x1303

MAX_HANDSHAKE_MESSAGE = 1 << 16  # a ClientHello or a post-handshake message, reassembled
MAX_SKIPPED_EARLY_DATA = 1 << 16  # §4.2.10: rejected 0-RTT records discarded, at most this much
MAX_KEY_UPDATES_IN_A_ROW = 128  # KeyUpdates without application data between them

_U16 = struct.Struct(">H")
_HH = struct.Struct(">HH")


# ------------------------------------------------------------------------------ events
@dataclass(frozen=True, slots=True)
class SignatureRequested:
    """The handshake waits for the key server: sign this CertificateVerify.

    `messages` is what the signature covers, as it is hashed into the transcript: the
    visitor's ClientHello, our ServerHello, EncryptedExtensions and Certificate (RFC 8446
    §4.4.1, no HelloRetryRequest: this engine never sends one). The key server hashes them
    itself; `transcript_hash` is our hash of the same bytes."""

    scheme: int
    transcript_hash: bytes
    messages: bytes


@dataclass(frozen=True, slots=True)
class HandshakeCompleted:
    alpn: str | None
    cipher_suite: int
    resumed: bool


@dataclass(frozen=True, slots=True)
class DataReceived:
    data: bytes


@dataclass(frozen=True, slots=True)
class PeerClosed:
    """The visitor sent close_notify: no more data will come."""


@dataclass(frozen=True, slots=True)
class ConnectionFailed:
    """The connection is over. `alert` is what was sent (None: nothing, e.g. the peer's own
    fatal alert); `reason` a stable token for metrics and logs."""

    reason: str
    alert: int | None
    detail: str = ""


Event = SignatureRequested | HandshakeCompleted | DataReceived | PeerClosed | ConnectionFailed


# ------------------------------------------------------------------------------ configuration
def schemes_for_certificate(cert: x509.Certificate) -> tuple[int, ...]:
    """Signature schemes a TLS 1.3 CertificateVerify may use with this certificate's key
    (RFC 8446 §4.2.3; RSA only with PSS, never PKCS#1 v1.5)."""
    key = cert.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        if isinstance(key.curve, ec.SECP256R1):
            return (0x0403,)
        if isinstance(key.curve, ec.SECP384R1):
            return (0x0503,)
        raise ValueError(f"unsupported curve {key.curve.name}")
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise ValueError(f"RSA key of {key.key_size} bits (at least 2048)")
        return (0x0804, 0x0805)
    if isinstance(key, ed25519.Ed25519PublicKey):
        return (0x0807,)
    raise ValueError(f"unsupported key type {type(key).__name__}")


class StoredSession(Protocol):
    """What a session store keeps of a session (aioquic's `SessionTicket` has these too)."""

    @property
    def ticket(self) -> bytes: ...

    @property
    def resumption_secret(self) -> bytes: ...

    @property
    def cipher_suite(self) -> int: ...


class Session(NamedTuple):
    ticket: bytes  # the identity the client presents (random, opaque)
    resumption_secret: bytes
    cipher_suite: int
    age_add: int


class SessionStore:
    """Server-side session tickets: the ticket is a random identity, the resumption secret stays
    here. Single use (a client gets a new ticket on every connection), bounded, expiring."""

    def __init__(self, lifetime_s: float, max_entries: int) -> None:
        self.lifetime_s = lifetime_s
        self.max_entries = max_entries
        self._entries: OrderedDict[bytes, tuple[float, str, StoredSession]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, session: StoredSession, server_name: str, now: float) -> None:
        entries = self._entries
        entries[session.ticket] = (now + self.lifetime_s, server_name, session)
        while len(entries) > self.max_entries:
            entries.popitem(last=False)

    def take(self, identity: bytes, server_name: str, now: float) -> StoredSession | None:
        entry = self._entries.pop(identity, None)
        if entry is None:
            return None
        expires, name, session = entry
        # RFC 8446 §4.6.1 / RFC 6066 §3: a session resumes only for the name it was made for
        if now >= expires or name != server_name:
            return None
        return session

    def expire(self, now: float) -> None:
        entries = self._entries
        while entries:
            key, (expires, _name, _s) = next(iter(entries.items()))
            if expires > now:
                break
            del entries[key]


@dataclass(frozen=True, slots=True)
class ServerIdentity:
    """One hostname's certificate as the edge serves it: the chain (leaf first), the schemes its
    key allows, and the leaf's SHA-256 (the key server's name for the key)."""

    chain: tuple[x509.Certificate, ...]
    schemes: tuple[int, ...]
    certificate_sha256: bytes
    chain_der_len: int
    ders: tuple[bytes, ...]
    certificate_message: bytes  # the Certificate handshake message, made once

    @classmethod
    def from_pem(cls, pem: bytes) -> ServerIdentity:
        chain = tuple(x509.load_pem_x509_certificates(pem))
        if not chain:
            raise ValueError("no certificate in the file")
        return cls.from_chain(chain)

    @classmethod
    def from_chain(cls, chain: tuple[x509.Certificate, ...]) -> ServerIdentity:
        ders = tuple(c.public_bytes(Encoding.DER) for c in chain)
        return cls(
            chain,
            schemes_for_certificate(chain[0]),
            hashlib.sha256(ders[0]).digest(),
            sum(len(d) for d in ders),
            ders,
            certificate(ders),
        )


@dataclass(frozen=True, slots=True)
class TlsSettings:
    alpn: tuple[str, ...] = ("h2", "http/1.1")
    key_update_records: int = rl.DEFAULT_KEY_UPDATE_RECORDS
    issue_tickets: bool = True


def fallback_reason(hello: ClientHello, schemes: tuple[int, ...]) -> str | None:
    """Why this ClientHello cannot be answered by our TLS 1.3 engine (so the connection should
    be passed through to the origin instead), or None if it can."""
    if TLS13 not in hello.supported_versions:
        return "tls12_only"
    if hello.legacy_version != 0x0303:
        return "odd_legacy_version"  # RFC 8446 §4.1.2 says 0x0303; OpenSSL copes with others
    if not set(hello.cipher_suites) & set(CIPHER_SUITES):
        return "no_tls13_cipher"
    if not set(hello.key_share_groups) & SERVER_GROUPS:
        return "needs_hello_retry"  # this server sends no HelloRetryRequest
    if not set(hello.signature_algorithms) & set(schemes):
        return "no_common_signature_scheme"
    return None


# ------------------------------------------------------------------------------ key shares
def _new_x25519() -> tuple[x25519.X25519PrivateKey, bytes]:
    key = x25519.X25519PrivateKey.generate()
    return key, key.public_key().public_bytes_raw()


class KeySharePool:
    """X25519 key pairs made before the handshakes that use them, so that making one (about a
    third of the handshake's own crypto) is off the path from ClientHello to the signature
    request. Each pair is handed out once and then forgotten by the pool: every handshake has
    its own ephemeral key (RFC 8446 §4.2.8, forward secrecy). `fill` runs when the I/O side has
    nothing more urgent to do; `take` makes a pair on the spot when the pool is empty.

    A forked child starts with every pool empty: otherwise parent and children would hand
    out the same keys."""

    def __init__(self, size: int = 64) -> None:
        self.size = size
        self._pairs: list[tuple[x25519.X25519PrivateKey, bytes]] = []
        self.made_on_demand = 0
        _POOLS.add(self)

    def __len__(self) -> int:
        return len(self._pairs)

    @property
    def wanted(self) -> int:
        return self.size - len(self._pairs)

    def take(self) -> tuple[x25519.X25519PrivateKey, bytes]:
        try:
            return self._pairs.pop()  # atomic: threads may share a pool
        except IndexError:
            self.made_on_demand += 1
            return _new_x25519()

    def fill(self, most: int) -> int:
        """Make up to `most` pairs, never beyond `size`; returns how many were made."""
        made = 0
        pairs = self._pairs
        while made < most and len(pairs) < self.size:
            pairs.append(_new_x25519())
            made += 1
        return made


_POOLS: weakref.WeakSet[KeySharePool] = weakref.WeakSet()


def _forget_key_shares() -> None:
    for pool in list(_POOLS):
        pool._pairs.clear()


os.register_at_fork(after_in_child=_forget_key_shares)

KEY_SHARES = KeySharePool()
"""The process's pool, used by every TlsServer unless it is given another."""


def _key_exchange(
    shares: list[tuple[int, bytes]], pool: KeySharePool
) -> tuple[int, bytes, bytes] | None:
    """(group, our public key share, shared secret) for the first share the client sent in a
    group we support (the client's order: it lists its preferred first, §4.2.8), or None."""
    for group, peer in shares:
        try:
            if group == X25519:
                peer_key = x25519.X25519PublicKey.from_public_bytes(peer)
                key, public = pool.take()
                # ValueError for an all-zero shared secret (§7.4.2: must abort)
                return group, public, key.exchange(peer_key)
            if group == X448:
                peer448 = x448.X448PublicKey.from_public_bytes(peer)
                key448 = x448.X448PrivateKey.generate()
                return group, key448.public_key().public_bytes_raw(), key448.exchange(peer448)
            curve = _CURVES.get(group)
            if curve is None:
                continue
            if peer[:1] != b"\x04":  # §4.2.8.2: UncompressedPointRepresentation only
                raise ValueError("not an uncompressed point")
            peer_ec = ec.EllipticCurvePublicKey.from_encoded_point(curve(), peer)
            key_ec = ec.generate_private_key(curve())
            public = key_ec.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
            return group, public, key_ec.exchange(ec.ECDH(), peer_ec)
        except ValueError:
            raise rl.protocol_error(
                "bad_key_share", rl.A_ILLEGAL_PARAMETER, f"invalid key share for group {group}"
            ) from None
    return None


# ------------------------------------------------------------------------------ messages
# The server's handshake messages (RFC 8446 §4), built directly: each is a handful of fields,
# and tests/unit/test_tls13_server.py checks every one byte for byte against aioquic's own
# builders and has the key server parse them.
def _message(msg_type: int, body: bytes) -> bytes:
    return bytes((msg_type,)) + len(body).to_bytes(3, "big") + body  # §4 Handshake


def server_hello(
    random: bytes, session_id: bytes, suite: int, group: int, key_share: bytes, psk: bool
) -> bytes:
    """§4.1.3 ServerHello: supported_versions (§4.2.1), key_share (§4.2.8), pre_shared_key
    (§4.2.11, identity 0) when resuming."""
    extensions = (
        b"\x00\x2b\x00\x02\x03\x04"
        + _HH.pack(EXT_KEY_SHARE, 4 + len(key_share))
        + _HH.pack(group, len(key_share))
        + key_share
        + (b"\x00\x29\x00\x02\x00\x00" if psk else b"")
    )
    return _message(
        HS_SERVER_HELLO,
        b"\x03\x03"  # legacy_version
        + random
        + bytes((len(session_id),))
        + session_id  # legacy_session_id_echo
        + _U16.pack(suite)
        + b"\x00"  # legacy_compression_method
        + _U16.pack(len(extensions))
        + extensions,
    )


def encrypted_extensions(alpn: str | None, sni_acknowledged: bool) -> bytes:
    """§4.3.1 EncryptedExtensions: the ALPN choice (RFC 7301 §3.1) and the empty server_name
    that acknowledges the client's SNI (RFC 6066 §3)."""
    extensions = b""
    if alpn is not None:
        name = alpn.encode("latin-1")
        extensions += _HH.pack(EXT_ALPN, len(name) + 3) + _U16.pack(len(name) + 1)
        extensions += bytes((len(name),)) + name
    if sni_acknowledged:
        extensions += b"\x00\x00\x00\x00"
    return _message(HS_ENCRYPTED_EXTENSIONS, _U16.pack(len(extensions)) + extensions)


def certificate(ders: tuple[bytes, ...]) -> bytes:
    """§4.4.2 Certificate: empty request context, each entry without extensions."""
    entries = b"".join(len(d).to_bytes(3, "big") + d + b"\x00\x00" for d in ders)
    return _message(HS_CERTIFICATE, b"\x00" + len(entries).to_bytes(3, "big") + entries)


def certificate_verify(scheme: int, signature: bytes) -> bytes:
    """§4.4.3 CertificateVerify."""
    return _message(HS_CERTIFICATE_VERIFY, _HH.pack(scheme, len(signature)) + signature)


def new_session_ticket(lifetime_s: int, age_add: int, nonce: bytes, ticket: bytes) -> bytes:
    """§4.6.1 NewSessionTicket, without extensions (no early_data: 0-RTT is never allowed)."""
    return _message(
        HS_NEW_SESSION_TICKET,
        struct.pack(">IIB", lifetime_s, age_add, len(nonce))
        + nonce
        + _U16.pack(len(ticket))
        + ticket
        + b"\x00\x00",
    )


# ------------------------------------------------------------------------------ the ClientHello
class _Offer(NamedTuple):
    """What the server uses of a ClientHello beyond `core.clienthello`'s parse."""

    session_id: bytes
    compression_methods: bytes
    key_shares: list[tuple[int, bytes]] | None  # None: no key_share extension
    psk_modes: bytes
    psk: tuple[bytes, bytes, int] | None  # one identity, its binder, where the binders start
    early_data: bool


def _decode_error(what: str) -> ProtocolError:
    return rl.protocol_error("malformed_hello", rl.A_DECODE_ERROR, what)


def _read_offer(hello: ClientHello) -> _Offer:
    """The ClientHello's fields and extensions that `core.clienthello` leaves unparsed; its
    parse already checked the message's framing (lengths, one extension of each type)."""
    message = hello.message
    sid_len = message[38]
    pos = 39 + sid_len
    pos += 2 + _U16.unpack_from(message, pos)[0]
    compression = message[pos + 1 : pos + 1 + message[pos]]
    spans = hello.ext_spans
    shares: list[tuple[int, bytes]] | None = None
    span = spans.get(EXT_KEY_SHARE)
    if span is not None:
        # §4.2.8: client_shares<0..2^16-1> of KeyShareEntry (group, key_exchange<1..2^16-1>)
        start, end = span
        if end - start < 2 or _U16.unpack_from(message, start)[0] != end - start - 2:
            raise _decode_error("bad key_share length")
        shares = []
        pos = start + 2
        while pos < end:
            if pos + 4 > end:
                raise _decode_error("truncated key_share entry")
            group, length = _HH.unpack_from(message, pos)
            pos += 4
            if length == 0 or pos + length > end:
                raise _decode_error("bad key_share entry length")
            shares.append((group, message[pos : pos + length]))
            pos += length
    modes = b""
    span = spans.get(EXT_PSK_MODES)
    if span is not None:
        # §4.2.9: ke_modes<1..255>
        start, end = span
        if end - start < 2 or message[start] != end - start - 1:
            raise _decode_error("bad psk_key_exchange_modes length")
        modes = message[start + 1 : end]
    psk = None
    span = spans.get(EXT_PRE_SHARED_KEY)
    if span is not None:
        if hello.extensions[-1] != EXT_PRE_SHARED_KEY:  # §4.2.11: it must be the last one
            raise rl.protocol_error(
                "malformed_hello", rl.A_ILLEGAL_PARAMETER, "pre_shared_key is not last"
            )
        psk = _read_psk(message, *span)
    return _Offer(
        message[39 : 39 + sid_len], compression, shares, modes, psk, EXT_EARLY_DATA in spans
    )


def _read_psk(message: bytes, start: int, end: int) -> tuple[bytes, bytes, int] | None:
    """§4.2.11 OfferedPsks: identities<7..2^16-1> of (identity<1..2^16-1>, u32 age), then
    binders<33..2^16-1> of PskBinderEntry<32..255>. The identity and binder when there is
    exactly one of each (the only offer this server takes up), else None."""
    if end - start < 2:
        raise _decode_error("truncated pre_shared_key")
    ids_end = start + 2 + _U16.unpack_from(message, start)[0]
    if ids_end + 2 > end:
        raise _decode_error("bad pre_shared_key identities length")
    identities = []
    pos = start + 2
    while pos < ids_end:
        if pos + 2 > ids_end:
            raise _decode_error("truncated psk identity")
        length = _U16.unpack_from(message, pos)[0]
        if length == 0 or pos + 2 + length + 4 > ids_end:
            raise _decode_error("bad psk identity length")
        identities.append(message[pos + 2 : pos + 2 + length])
        pos += 2 + length + 4
    if not identities or _U16.unpack_from(message, ids_end)[0] != end - ids_end - 2:
        raise _decode_error("bad pre_shared_key binders length")
    binders = []
    pos = ids_end + 2
    while pos < end:
        length = message[pos]
        if length < 32 or pos + 1 + length > end:
            raise _decode_error("bad psk binder length")
        binders.append(message[pos + 1 : pos + 1 + length])
        pos += 1 + length
    if not binders:
        raise _decode_error("no psk binder")
    if len(identities) != 1 or len(binders) != 1:
        return None
    return identities[0], binders[0], ids_end


def _negotiate(ours: tuple[int, ...], theirs: tuple[int, ...]) -> int | None:
    """The first of our values (our order of preference) that the client offers."""
    offered = set(theirs)
    return next((v for v in ours if v in offered), None)


# ------------------------------------------------------------------------------ the connection
class TlsServer:
    """One visitor's TLS 1.3 connection. States: hello -> signing -> handshake -> open
    -> closed."""

    __slots__ = (
        "_client_hs_secret",
        "_early_data_offered",
        "_encrypted",
        "_hello",
        "_hs_buf",
        "_key_updates_in_a_row",
        "_ks",
        "_legacy_session_id",
        "_offers_tickets",
        "_out",
        "_peeked",
        "_pending_records",
        "_read",
        "_reader",
        "_scheme",
        "_server_hello",
        "_server_hs_secret",
        "_skipped_early",
        "_write",
        "alpn",
        "cipher_suite",
        "identity",
        "key_shares",
        "key_updates_received",
        "key_updates_sent",
        "now",
        "reason",
        "resumed",
        "server_name",
        "sessions",
        "settings",
        "state",
    )

    def __init__(
        self,
        identity: ServerIdentity,
        settings: TlsSettings,
        sessions: SessionStore,
        server_name: str,
        hello: ClientHello | None = None,
        key_shares: KeySharePool = KEY_SHARES,
    ) -> None:
        """`hello`: the ClientHello as the edge already parsed it (saves parsing it again)."""
        self.identity = identity
        self._peeked = hello
        self.settings = settings
        self.sessions = sessions
        self.server_name = server_name
        self.key_shares = key_shares
        self.state = "hello"
        self.now = 0.0
        self.alpn: str | None = None
        self.cipher_suite = 0
        self.resumed = False
        self.reason = ""
        self._reader = rl.RecordReader()
        self._out = bytearray()
        self._hello = b""
        self._offers_tickets = False
        self._early_data_offered = False
        self._skipped_early = 0
        self._ks: KeySchedule | None = None
        self._scheme = 0
        self._server_hello = b""
        self._encrypted = b""  # EncryptedExtensions (+ Certificate): sent with the rest
        self._legacy_session_id = b""
        self._server_hs_secret = b""
        self._client_hs_secret = b""
        self._read: rl.RecordProtection | None = None
        self._write: rl.RecordProtection | None = None
        self._pending_records: list[rl.Record] = []  # read while the signature is awaited
        self._hs_buf = b""  # handshake bytes being reassembled (client Finished, KeyUpdate)
        self._key_updates_in_a_row = 0
        self.key_updates_received = 0
        self.key_updates_sent = 0

    # ---------------------------------------------------------------- public API
    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def receive(self, data: bytes, now: float) -> list[Event]:
        self.now = now
        if self.state == "closed":
            return []
        try:
            records = self._reader.feed(data)
            if self.state == "signing":
                if len(self._pending_records) + len(records) > 64:
                    raise rl.protocol_error(
                        "too_many_records",
                        rl.A_UNEXPECTED_MESSAGE,
                        "records sent before the server's flight",
                    )
                self._pending_records.extend(records)
                return []
            return self._records(records)
        except ProtocolError as exc:
            return [self._fail(exc)]

    def signature_received(self, signature: bytes, now: float) -> list[Event]:
        self.now = now
        if self.state != "signing":
            return []
        try:
            if len(signature) > 0xFFFF:
                raise rl.protocol_error(
                    "bad_signature", rl.A_INTERNAL_ERROR, f"signature of {len(signature)} bytes"
                )
            self._send_flight(certificate_verify(self._scheme, signature))
            if not self._pending_records:
                return []
            records, self._pending_records = self._pending_records, []
            return self._records(records)
        except ProtocolError as exc:
            return [self._fail(exc)]

    def signature_failed(self, reason: str, detail: str = "") -> list[Event]:
        """The key server did not sign: the handshake ends with internal_error queued (the
        caller may instead hand the untouched connection to another path: nothing has been
        sent to the visitor yet)."""
        if self.state != "signing":
            return []
        self._ks = None
        return [self._fail(ProtocolError(reason, detail, alert=rl.A_INTERNAL_ERROR))]

    def send(self, data: bytes | bytearray | memoryview) -> None:
        """Application data to the visitor (only once open)."""
        if self.state != "open":
            return
        assert self._write is not None
        mv = memoryview(data)
        for i in range(0, len(mv), rl.MAX_PLAINTEXT):
            self._maybe_update_write_key()
            self._out += self._write.seal(rl.APPLICATION_DATA, mv[i : i + rl.MAX_PLAINTEXT])
            self._key_updates_in_a_row = 0

    def close(self) -> None:
        """Send close_notify (§6.1); the connection takes no more data."""
        if self.state in ("open", "handshake"):
            self._alert(rl.A_CLOSE_NOTIFY, fatal=False)
        self.state = "closed"

    def request_key_update(self) -> None:
        """Update our sending keys now (normally done every `key_update_records` records)."""
        if self.state == "open":
            self._send_key_update(request=False)

    # ---------------------------------------------------------------- records
    def _records(self, records: list[rl.Record]) -> list[Event]:
        events: list[Event] = []
        for i, record in enumerate(records):
            if self.state == "closed":
                break
            if self.state == "signing":  # the rest waits for the signature and our flight
                self._pending_records.extend(records[i:])
                break
            if record.type == rl.CHANGE_CIPHER_SPEC:
                self._change_cipher_spec(record)
                continue
            if self._read is None:
                if len(record.payload) > rl.MAX_PLAINTEXT:
                    raise rl.protocol_error("record_overflow", rl.A_RECORD_OVERFLOW)
                if self.state != "hello" or record.type != rl.HANDSHAKE:
                    if record.type == rl.ALERT and self.state == "hello":
                        event = self._peer_alert(record.payload)
                        if event is not None:
                            events.append(event)
                        continue
                    raise rl.protocol_error(
                        "unexpected_record",
                        rl.A_UNEXPECTED_MESSAGE,
                        f"type {record.type} before the ClientHello",
                    )
                events.extend(self._client_hello_bytes(record.payload))
                continue
            if record.type == rl.ALERT and self.state == "handshake" and len(record.payload) == 2:
                # a client that could not process our ServerHello has no keys to encrypt with
                event = self._peer_alert(record.payload)
                if event is not None:
                    events.append(event)
                continue
            try:
                ctype, content = self._read.open(record)
            except ProtocolError as exc:
                if exc.reason == "bad_record_mac" and self._skipping_early_data(record):
                    continue
                raise
            self._skipped_early = -1  # a record decrypted: no more early data to skip
            if self._hs_buf and ctype != rl.HANDSHAKE:
                # §5.1: handshake messages must not be interleaved with other record types
                raise rl.protocol_error("interleaved_handshake", rl.A_UNEXPECTED_MESSAGE)
            if ctype == rl.HANDSHAKE:
                if not content:
                    raise rl.protocol_error("empty_handshake_record", rl.A_UNEXPECTED_MESSAGE)
                events.extend(self._handshake(content))
            elif ctype == rl.APPLICATION_DATA:
                if self.state != "open":
                    raise rl.protocol_error(
                        "early_application_data",
                        rl.A_UNEXPECTED_MESSAGE,
                        "application data before the client's Finished",
                    )
                self._key_updates_in_a_row = 0
                if content:
                    events.append(DataReceived(content))
            elif ctype == rl.ALERT:
                event = self._peer_alert(content)
                if event is not None:
                    events.append(event)
            else:  # CCS inside protection, or an unknown inner type
                raise rl.protocol_error(
                    "bad_inner_type", rl.A_UNEXPECTED_MESSAGE, f"inner content type {ctype}"
                )
        return events

    def _change_cipher_spec(self, record: rl.Record) -> None:
        # §5: a single 0x01 byte, after the ClientHello and before the client's Finished
        if self.state != "handshake":
            raise rl.protocol_error("unexpected_ccs", rl.A_UNEXPECTED_MESSAGE)
        if record.payload != b"\x01":
            raise rl.protocol_error("bad_ccs", rl.A_UNEXPECTED_MESSAGE)

    def _skipping_early_data(self, record: rl.Record) -> bool:
        # §4.2.10: early data we did not accept fails to decrypt under the handshake key
        if not self._early_data_offered or self._skipped_early < 0 or self.state != "handshake":
            return False
        self._skipped_early += len(record.payload)
        if self._skipped_early > MAX_SKIPPED_EARLY_DATA:
            raise rl.protocol_error("too_much_early_data", rl.A_UNEXPECTED_MESSAGE)
        return True

    def _peer_alert(self, content: bytes) -> Event | None:
        if not content:  # §5.1: zero-length fragments of alerts are not allowed
            raise rl.protocol_error("empty_alert", rl.A_UNEXPECTED_MESSAGE)
        if len(content) != 2:  # §5.1: exactly one alert per record
            raise rl.protocol_error("bad_alert", rl.A_DECODE_ERROR, f"{len(content)} bytes")
        description = content[1]
        if description == rl.A_CLOSE_NOTIFY:
            if self.state != "open":
                self.state = "closed"
                return ConnectionFailed("peer_closed_in_handshake", None)
            return PeerClosed()
        if description == rl.A_USER_CANCELED:  # §6.1: not fatal; a close_notify follows
            return None
        # §6: in TLS 1.3 every other alert is fatal, whatever its level says
        self.state = "closed"
        return ConnectionFailed("peer_alert", None, f"alert {description}")

    # ---------------------------------------------------------------- the ClientHello
    def _client_hello_bytes(self, payload: bytes) -> list[Event]:
        if not payload:
            raise rl.protocol_error("empty_handshake_record", rl.A_UNEXPECTED_MESSAGE)
        self._hello += payload
        hello = self._hello
        if len(hello) < 4:
            return []
        length = int.from_bytes(hello[1:4], "big")
        if hello[0] != HS_CLIENT_HELLO:
            raise rl.protocol_error("not_client_hello", rl.A_UNEXPECTED_MESSAGE)
        if length + 4 > MAX_HANDSHAKE_MESSAGE:
            raise rl.protocol_error("hello_too_large", rl.A_DECODE_ERROR)
        if len(hello) < length + 4:
            return []
        if len(hello) > length + 4:
            # §5.1: nothing may follow the ClientHello under the same (absent) keys
            raise rl.protocol_error("data_after_hello", rl.A_UNEXPECTED_MESSAGE)
        return self._start_handshake(hello)

    def _start_handshake(self, message: bytes) -> list[Event]:
        if len(message) >= 6 and int.from_bytes(message[4:6], "big") < 0x0303:
            # RFC 8446 §D.5 (legacy_version 0x0300 and below), and TLS 1.0/1.1 likewise here
            raise rl.protocol_error("old_legacy_version", rl.A_PROTOCOL_VERSION)
        hello = self._peeked
        if hello is None or hello.message != message:
            hello = peek_client_hello(rl.plaintext_records(rl.HANDSHAKE, message), 1 << 20)
            assert hello is not None  # a whole message in whole records
        if hello.legacy_version != 0x0303:  # §4.1.2 (the edge passes these to the origin)
            raise rl.protocol_error("bad_legacy_version", rl.A_DECODE_ERROR)
        offer = _read_offer(hello)
        self._offers_tickets = PSK_DHE_KE in offer.psk_modes
        self._early_data_offered = offer.early_data
        alpn_offered = EXT_ALPN in hello.ext_spans
        if alpn_offered and self.settings.alpn:
            # RFC 7301 §3.2: the server's preference among the protocols both sides know
            theirs = set(hello.alpn_text)
            self.alpn = next((p for p in self.settings.alpn if p in theirs), None)
            if self.alpn is None:
                raise rl.protocol_error(
                    "no_application_protocol",
                    rl.A_NO_APPLICATION_PROTOCOL,
                    f"client offers {list(hello.alpn_text)}",
                )
        suites = CIPHER_SUITES
        first = next((s for s in hello.cipher_suites if (s & 0x0F0F) != 0x0A0A), 0)
        if first == CHACHA:  # the client has no AES hardware: honour that
            suites = (CHACHA, 0x1301, 0x1302)
        suite = _negotiate(suites, hello.cipher_suites)
        if suite is None:
            raise rl.protocol_error("no_common_cipher", rl.A_HANDSHAKE_FAILURE)
        if offer.compression_methods != b"\x00":
            # §4.1.2: exactly one compression method, null, in a TLS 1.3 ClientHello
            raise rl.protocol_error("bad_compression_methods", rl.A_ILLEGAL_PARAMETER)
        scheme = _negotiate(self.identity.schemes, hello.signature_algorithms)
        if scheme is None:
            raise rl.protocol_error("no_common_signature_scheme", rl.A_HANDSHAKE_FAILURE)
        if TLS13 not in hello.supported_versions:
            raise rl.protocol_error("no_tls13", rl.A_PROTOCOL_VERSION)
        if offer.key_shares is None:  # §9.2: (EC)DHE needs key_share
            raise rl.protocol_error("no_key_share", rl.A_MISSING_EXTENSION)
        self._scheme = scheme
        self._legacy_session_id = offer.session_id
        ks = self._psk_schedule(hello, offer, suite)
        if ks is None:
            ks = KeySchedule(suite)
            ks.extract(None)
            ks.update_hash(message)
        exchanged = _key_exchange(offer.key_shares, self.key_shares)
        if exchanged is None:
            raise rl.protocol_error("no_supported_key_share", rl.A_HANDSHAKE_FAILURE)
        group, public, shared = exchanged
        self._ks = ks
        self.cipher_suite = suite
        # §4.1.3 ServerHello, then the handshake secrets (§7.1)
        sh = server_hello(os.urandom(32), offer.session_id, suite, group, public, psk=self.resumed)
        self._server_hello = sh
        ks.update_hash(sh)
        ks.extract(shared)
        self._server_hs_secret = ks.derive_secret(b"s hs traffic")
        self._client_hs_secret = ks.derive_secret(b"c hs traffic")
        ee = encrypted_extensions(self.alpn, hello.sni is not None)
        ks.update_hash(ee)
        if self.resumed:  # §2.2: no Certificate, no CertificateVerify
            self._encrypted = ee
            self._send_flight(b"")
            return []
        cert = self.identity.certificate_message
        ks.update_hash(cert)
        self._encrypted = ee + cert
        self.state = "signing"
        # §4.4.3: the signature covers the transcript hash of ClientHello .. Certificate
        return [
            SignatureRequested(
                scheme,
                ks.transcript_hash(),
                b"".join((message, sh, ee, cert)),
            )
        ]

    def _psk_schedule(self, hello: ClientHello, offer: _Offer, suite: int) -> KeySchedule | None:
        """The key schedule of a resumption (§2.2) if the client offers one of our tickets
        with a valid binder, else None. 0-RTT is never accepted (§8: replays), so a client
        that offers early data gets a full handshake and keeps its ticket unused."""
        if offer.psk is None or not self._offers_tickets or offer.early_data:
            return None
        identity, binder, binders_start = offer.psk
        session = self.sessions.take(identity, self.server_name, self.now)
        if session is None or session.cipher_suite != suite:
            return None
        ks = KeySchedule(suite)
        ks.extract(session.resumption_secret)
        binder_key = ks.derive_secret(b"res binder")
        # §4.2.11.2: the binder is the Finished HMAC over the ClientHello truncated before
        # the binders list
        message = hello.message
        ks.update_hash(message[:binders_start])
        if not hmac.compare_digest(ks.finished_verify_data(binder_key), binder):
            raise rl.protocol_error("bad_binder", rl.A_DECRYPT_ERROR, "PSK binder")
        ks.update_hash(message[binders_start:])
        self.resumed = True
        return ks

    def _send_flight(self, cert_verify: bytes) -> None:
        """ServerHello .. Finished to the visitor (§2): the handshake is processed up to the
        client's Finished."""
        ks = self._ks
        assert ks is not None
        suite = self.cipher_suite
        if cert_verify:
            ks.update_hash(cert_verify)
        finished = _message(HS_FINISHED, ks.finished_verify_data(self._server_hs_secret))
        ks.update_hash(finished)
        ks.extract(None)  # the master secret (§7.1)
        out = self._out
        out += rl.plaintext_records(rl.HANDSHAKE, self._server_hello)
        if self._legacy_session_id:
            out += rl.CHANGE_CIPHER_SPEC_RECORD  # §D.4 middlebox compatibility
        data = b"".join((self._encrypted, cert_verify, finished))
        protection = rl.RecordProtection(suite, self._server_hs_secret)
        for i in range(0, len(data), rl.MAX_PLAINTEXT):
            out += protection.seal(rl.HANDSHAKE, data[i : i + rl.MAX_PLAINTEXT])
        self._server_hello = self._encrypted = b""
        # From our Finished on, the client reads with our application key (alerts included).
        self._write = rl.RecordProtection(suite, ks.derive_secret(b"s ap traffic"))
        self._read = rl.RecordProtection(suite, self._client_hs_secret)
        self.state = "handshake"

    # ---------------------------------------------------------------- handshake messages
    def _handshake(self, content: bytes) -> list[Event]:
        buf = self._hs_buf + content if self._hs_buf else content
        if self.state == "handshake":
            return self._client_finished(buf)
        # post-handshake messages: only KeyUpdate is expected from a client
        while len(buf) >= 4:
            mtype = buf[0]
            length = int.from_bytes(buf[1:4], "big")
            if mtype != HS_KEY_UPDATE:
                raise rl.protocol_error(
                    "unexpected_handshake",
                    rl.A_UNEXPECTED_MESSAGE,
                    f"handshake type {mtype} after the handshake",
                )
            if length != 1:
                raise rl.protocol_error("bad_key_update", rl.A_DECODE_ERROR)
            if len(buf) < 5:
                break
            request = buf[4]
            buf = buf[5:]
            if request > 1:
                raise rl.protocol_error("bad_key_update", rl.A_ILLEGAL_PARAMETER)
            if buf:  # §5.1: nothing may follow a key change in the same record
                raise rl.protocol_error("data_after_key_update", rl.A_UNEXPECTED_MESSAGE)
            self._key_updates_in_a_row += 1
            if self._key_updates_in_a_row > MAX_KEY_UPDATES_IN_A_ROW:
                raise rl.protocol_error("key_update_flood", rl.A_UNEXPECTED_MESSAGE)
            assert self._read is not None
            self._read = self._read.updated()
            self.key_updates_received += 1
            if request == 1:  # §4.6.3: answer before our next application data
                self._send_key_update(request=False)
        self._hs_buf = buf
        return []

    def _client_finished(self, buf: bytes) -> list[Event]:
        """§4.4.4: the client's Finished, the only message expected after our flight (no
        client certificate was asked for)."""
        ks = self._ks
        assert ks is not None
        if buf[0] != HS_FINISHED:
            raise rl.protocol_error(
                "unexpected_handshake",
                rl.A_UNEXPECTED_MESSAGE,
                f"handshake type {buf[0]} instead of Finished",
            )
        size = ks.digest_size
        if len(buf) >= 4 and int.from_bytes(buf[1:4], "big") != size:
            # verify_data is exactly Hash.length
            raise rl.protocol_error("bad_finished_length", rl.A_DECODE_ERROR)
        if len(buf) < 4 + size:
            self._hs_buf = buf
            return []
        if len(buf) > 4 + size:  # §5.1: a message after Finished under the old key
            raise rl.protocol_error("data_after_finished", rl.A_UNEXPECTED_MESSAGE)
        self._hs_buf = b""
        expected = ks.finished_verify_data(self._client_hs_secret)
        if not hmac.compare_digest(expected, buf[4:]):
            raise rl.protocol_error("bad_finished", rl.A_DECRYPT_ERROR)
        # §7.1: client_application_traffic_secret_0 hashes up to the server Finished, the
        # resumption master secret up to the client's
        self._read = rl.RecordProtection(self.cipher_suite, ks.derive_secret(b"c ap traffic"))
        ks.update_hash(buf)
        self._server_hs_secret = self._client_hs_secret = b""
        self.state = "open"
        self._issue_ticket()
        return [HandshakeCompleted(self.alpn, self.cipher_suite, self.resumed)]

    def _issue_ticket(self) -> None:
        ks = self._ks
        self._ks = None
        if not (self.settings.issue_tickets and self._offers_tickets) or ks is None:
            return
        assert self._write is not None
        nonce = b"\x00"
        random = os.urandom(36)  # one system call for both
        age_add = int.from_bytes(random[:4], "big")
        identity = random[4:]
        # §4.6.1: resumption secret from the resumption master secret and the ticket nonce
        secret = ks.expand_label(
            ks.derive_secret(b"res master"), b"resumption", nonce, ks.digest_size
        )
        self.sessions.put(
            Session(identity, secret, self.cipher_suite, age_add), self.server_name, self.now
        )
        ticket = new_session_ticket(int(self.sessions.lifetime_s), age_add, nonce, identity)
        self._out += self._write.seal(rl.HANDSHAKE, ticket)

    def _send_key_update(self, *, request: bool) -> None:
        assert self._write is not None
        self._out += self._write.seal(rl.HANDSHAKE, bytes((HS_KEY_UPDATE, 0, 0, 1, int(request))))
        self._write = self._write.updated()
        self.key_updates_sent += 1

    def _maybe_update_write_key(self) -> None:
        assert self._write is not None
        if self._write.seq >= self.settings.key_update_records:
            self._send_key_update(request=False)

    # ---------------------------------------------------------------- failure
    def _alert(self, description: int, *, fatal: bool) -> None:
        # The key is the one the client reads with: none before our flight went out, our
        # application key after it (the flight ends with our Finished).
        body = bytes((2 if fatal else 1, description))
        if self._write is not None:
            self._out += self._write.seal(rl.ALERT, body)
        else:
            self._out += rl.plaintext_records(rl.ALERT, body)

    def _fail(self, exc: ProtocolError) -> ConnectionFailed:
        alert = exc.alert
        if self.state != "closed" and alert is not None:
            self._alert(alert, fatal=True)
        self.state = "closed"
        self.reason = exc.reason
        return ConnectionFailed(exc.reason, alert, exc.detail)
