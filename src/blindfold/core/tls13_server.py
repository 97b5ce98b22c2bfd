"""A TLS 1.3 server connection whose private key lives elsewhere, sans-IO.

The handshake state machine is aioquic's (`aioquic.tls.Context`, pinned in pyproject.toml: its
internals are used and covered by tests/unit/test_tls13_server.py); the record layer is
`tls13_record`. What this module adds:

- The CertificateVerify signature is not made here. aioquic calls `private_key.sign()` in the
  middle of processing the ClientHello; the call runs inside a greenlet, which suspends the
  handshake and hands a `SignatureRequested` event (the scheme and the handshake messages the
  signature covers, from which the key server computes the transcript hash itself) to the
  caller. The caller asks the key server and resumes with `signature_received`.
  The event loop is never blocked and aioquic needs no changes.
- Constant-time checks of Finished and PSK binders (aioquic compares them with `==`).
- TLS-over-TCP parts a QUIC library lacks: middlebox-compatibility ChangeCipherSpec (RFC 8446
  §D.4), alerts under the right keys, KeyUpdate both ways (§4.6.3), record limits, skipping
  rejected early data (§4.2.10), and session tickets issued only after the client's Finished,
  kept server-side, single use, with a configurable lifetime and never valid for 0-RTT.

A connection is created per visitor with the ClientHello bytes read so far; `receive` takes more
bytes, the methods return events, and `data_to_send` gives the bytes for the visitor.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import os
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import aioquic.tls as qtls
from aioquic.buffer import Buffer, BufferReadError  # type: ignore[attr-defined]
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from greenlet import greenlet

from blindfold.core import tls13_record as rl
from blindfold.core.clienthello import ClientHello
from blindfold.errors import ProtocolError

# RFC 8446 §4 handshake types and §4.2 extensions used here
HS_CLIENT_HELLO = 1
HS_NEW_SESSION_TICKET = 4
HS_FINISHED = 20
HS_KEY_UPDATE = 24
EXT_SERVER_NAME = 0
EXT_ALPN = 16
EXT_EARLY_DATA = 42
EXT_PSK_MODES = 45
PSK_DHE_KE = 1
TLS13 = 0x0304

# Groups aioquic's server can answer with a key share (so no HelloRetryRequest is needed).
SERVER_GROUPS = frozenset((0x001D, 0x001E, 0x0017, 0x0018, 0x0019))  # x25519 x448 P-256/384/521
CIPHER_SUITES = (0x1301, 0x1302, 0x1303)
CHACHA = 0x1303

MAX_HANDSHAKE_MESSAGE = 1 << 16  # a ClientHello or a post-handshake message, reassembled
MAX_SKIPPED_EARLY_DATA = 1 << 16  # §4.2.10: rejected 0-RTT records discarded, at most this much
MAX_KEY_UPDATES_IN_A_ROW = 128  # KeyUpdates without application data between them

_CV_PREFIX = b" " * 64 + qtls.SERVER_CONTEXT_STRING + b"\x00"  # RFC 8446 §4.4.3


# ------------------------------------------------------------------------------ events
@dataclass(frozen=True, slots=True)
class SignatureRequested:
    """The handshake waits for the key server: sign this CertificateVerify.

    `messages` is what the signature covers, as it is hashed into the transcript: the
    visitor's ClientHello, our ServerHello, EncryptedExtensions and Certificate (RFC 8446
    §4.4.1, no HelloRetryRequest: this engine never sends one). The key server hashes them
    itself; `transcript_hash` is aioquic's hash of the same bytes."""

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


class SessionStore:
    """Server-side session tickets: the ticket is a random identity, the resumption secret stays
    here. Single use (a client gets a new ticket on every connection), bounded, expiring."""

    def __init__(self, lifetime_s: float, max_entries: int) -> None:
        self.lifetime_s = lifetime_s
        self.max_entries = max_entries
        self._entries: OrderedDict[bytes, tuple[float, str, qtls.SessionTicket]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, ticket: qtls.SessionTicket, server_name: str, now: float) -> None:
        entries = self._entries
        entries[ticket.ticket] = (now + self.lifetime_s, server_name, ticket)
        while len(entries) > self.max_entries:
            entries.popitem(last=False)

    def take(self, identity: bytes, server_name: str, now: float) -> qtls.SessionTicket | None:
        entry = self._entries.pop(identity, None)
        if entry is None:
            return None
        expires, name, ticket = entry
        # RFC 8446 §4.6.1 / RFC 6066 §3: a session resumes only for the name it was made for
        if now >= expires or name != server_name:
            return None
        return ticket

    def expire(self, now: float) -> None:
        entries = self._entries
        while entries:
            key, (expires, _name, _t) = next(iter(entries.items()))
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

    @classmethod
    def from_pem(cls, pem: bytes) -> ServerIdentity:
        chain = tuple(x509.load_pem_x509_certificates(pem))
        if not chain:
            raise ValueError("no certificate in the file")
        ders = tuple(c.public_bytes(Encoding.DER) for c in chain)
        return cls(
            chain,
            schemes_for_certificate(chain[0]),
            hashlib.sha256(ders[0]).digest(),
            sum(len(d) for d in ders),
            ders,
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
        return "odd_legacy_version"  # aioquic insists on 0x0303; OpenSSL at the origin does not
    if not set(hello.cipher_suites) & set(CIPHER_SUITES):
        return "no_tls13_cipher"
    if not set(hello.key_share_groups) & SERVER_GROUPS:
        return "needs_hello_retry"  # aioquic sends no HelloRetryRequest
    if not set(hello.signature_algorithms) & set(schemes):
        return "no_common_signature_scheme"
    return None


# ------------------------------------------------------------------------------ aioquic glue
# aioquic builds and parses every length-prefixed block through @contextmanager generators
# (about 50 per handshake); generator-based context managers cost ~3 µs each, a third of the
# handshake's Python time beyond the crypto. These classes do exactly what aioquic 1.2.0's
# pull_block/push_block/push_extension/push_message do (same checks, same alert), without the
# generator. They replace aioquic.tls's module globals once, at import: aioquic is pinned, and
# tests/unit/test_tls13_server.py runs full handshakes through them against OpenSSL.
class _PullBlock:
    __slots__ = ("buf", "end", "length")

    def __init__(self, buf: Buffer, capacity: int) -> None:
        self.buf = buf
        self.length = int.from_bytes(buf.pull_bytes(capacity), "big")
        self.end = buf.tell() + self.length

    def __enter__(self) -> int:
        return self.length

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None and self.buf.tell() != self.end:
            raise qtls.AlertDecodeError("extra bytes at the end of a block")


class _PushBlock:
    __slots__ = ("buf", "capacity", "start")

    def __init__(self, buf: Buffer, capacity: int) -> None:
        self.buf = buf
        self.capacity = capacity
        self.start = buf.tell() + capacity
        buf.seek(self.start)

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is not None:
            return
        buf = self.buf
        end = buf.tell()
        buf.seek(self.start - self.capacity)
        buf.push_bytes((end - self.start).to_bytes(self.capacity, "big"))
        buf.seek(end)


class _PushExtension(_PushBlock):
    __slots__ = ()

    def __init__(self, buf: Buffer, extension_type: int) -> None:
        buf.push_uint16(extension_type)
        super().__init__(buf, 2)


class _PushMessage:
    __slots__ = ("buf", "key_schedule", "start")

    def __init__(self, key_schedule: Any, buf: Buffer) -> None:
        self.key_schedule = key_schedule
        self.buf = buf
        self.start = buf.tell()

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None:
            self.key_schedule.update_hash(self.buf.data_slice(self.start, self.buf.tell()))


qtls.pull_block = _PullBlock  # type: ignore[assignment]
qtls.push_block = _PushBlock  # type: ignore[assignment]
qtls.push_extension = _PushExtension  # type: ignore[assignment]
qtls.push_message = _PushMessage  # type: ignore[assignment]


class _CertificateDer:
    """What aioquic needs of our certificate: its DER, which it would re-encode on every
    handshake (`public_bytes`) if given the x509 object."""

    __slots__ = ("der",)

    def __init__(self, der: bytes) -> None:
        self.der = der

    def public_bytes(self, _encoding: object) -> bytes:
        return self.der


class _ConstantTimeBytes(bytes):
    """Verify data whose comparisons take the same time wherever they differ. aioquic compares
    Finished and PSK binders with `!=`; with this subclass on the right of that operator,
    Python calls its reflected `__ne__` first (a subclass of the left operand's type)."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, bytes | bytearray) and hmac.compare_digest(self, other)

    def __ne__(self, other: object) -> bool:
        return not self.__eq__(other)

    __hash__ = bytes.__hash__


class _ConstantTimeKeySchedule(qtls.KeySchedule):
    def finished_verify_data(self, secret: bytes) -> bytes:
        return _ConstantTimeBytes(super().finished_verify_data(secret))


class _SignCall:
    __slots__ = ("data", "params")

    def __init__(self, data: bytes, params: tuple[Any, ...]) -> None:
        self.data = data
        self.params = params


class _RemoteKey:
    """Stands in for the private key inside aioquic. `sign` suspends the handshake greenlet and
    returns whatever signature the caller resumes it with."""

    def sign(self, data: bytes, *params: Any) -> bytes:
        parent = greenlet.getcurrent().parent
        assert parent is not None, "sign() outside the handshake greenlet"
        result = parent.switch(_SignCall(data, params))
        assert isinstance(result, bytes)
        return result


class _Failed:
    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


_DONE = object()


class _Pool(threading.local):
    """Idle handshake greenlets (creating one costs more than using it), one pool per thread:
    a greenlet can only be switched to in the thread that created it."""

    def __init__(self) -> None:
        self.idle: list[greenlet] = []


_POOL = _Pool()


def _run_jobs() -> None:
    """A reusable handshake greenlet: runs `fn(arg)` jobs switched in by the event-loop side,
    reporting _DONE or _Failed; `_RemoteKey.sign` switches out in the middle of one."""
    outcome: object = None
    while True:
        job = greenlet.getcurrent().parent.switch(outcome)  # type: ignore[union-attr]
        try:
            fn, arg = job
            fn(arg)
            outcome = _DONE
        except BaseException as exc:
            outcome = _Failed(exc)


def _release(g: greenlet) -> None:
    idle = _POOL.idle
    if not g.dead and len(idle) < 64:
        idle.append(g)


class _Context(qtls.Context):
    """aioquic's server state machine with our key stand-in and constant-time verify data."""

    def __init__(
        self,
        schemes: tuple[int, ...],
        alpn: list[str] | None,
        cipher_suites: list[qtls.CipherSuite],
    ) -> None:
        self._schemes = schemes
        super().__init__(is_client=False, alpn_protocols=alpn, cipher_suites=cipher_suites)

    def _signature_algorithms_for_private_key(self) -> list[qtls.SignatureAlgorithm]:
        return [qtls.SignatureAlgorithm(s) for s in self._schemes]

    # aioquic assigns `self.key_schedule = KeySchedule(...)`; give the new schedule our
    # constant-time Finished/binder values (same object, subclass without new state).
    @property
    def key_schedule(self) -> qtls.KeySchedule | None:
        return self._bf_key_schedule

    @key_schedule.setter
    def key_schedule(self, value: qtls.KeySchedule | None) -> None:
        if value is not None and type(value) is qtls.KeySchedule:
            value.__class__ = _ConstantTimeKeySchedule
        self._bf_key_schedule = value


def _scheme_of(identity: ServerIdentity, params: tuple[Any, ...]) -> int:
    """The SignatureScheme aioquic chose, from the parameters it passes to sign()."""
    if len(identity.schemes) == 1:
        return identity.schemes[0]
    algorithm = params[1] if len(params) > 1 else None
    return 0x0805 if getattr(algorithm, "name", "") == "sha384" else 0x0804


# aioquic assumes well-formed peers in places (a ClientHello without key_share makes it iterate
# None); whatever it raises on peer data becomes an alert here, never an exception upwards.
_ALERT_FOR_EXCEPTION = (
    (BufferReadError, rl.A_DECODE_ERROR),
    (ValueError, rl.A_ILLEGAL_PARAMETER),
    (TypeError, rl.A_MISSING_EXTENSION),
)
_PEER_DATA_ERRORS = (ValueError, KeyError, AssertionError, TypeError, AttributeError, IndexError)


def _peer_data_error(reason: str, exc: Exception) -> ProtocolError:
    alert = next(
        (a for cls, a in _ALERT_FOR_EXCEPTION if isinstance(exc, cls)), rl.A_HANDSHAKE_FAILURE
    )
    return rl.protocol_error(reason, alert, str(exc) or type(exc).__name__)


# ------------------------------------------------------------------------------ the connection
class TlsServer:
    """One visitor's TLS 1.3 connection. States: hello -> signing -> handshake -> open
    -> closed."""

    def __init__(
        self,
        identity: ServerIdentity,
        settings: TlsSettings,
        sessions: SessionStore,
        server_name: str,
        hello: ClientHello | None = None,
    ) -> None:
        """`hello`: the ClientHello as the edge already parsed it (saves parsing it again)."""
        self.identity = identity
        self._peeked = hello
        self.settings = settings
        self.sessions = sessions
        self.server_name = server_name
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
        self._ctx: _Context | None = None
        self._greenlet: greenlet | None = None
        self._bufs: dict[qtls.Epoch, Buffer] = {}
        self._read: rl.RecordProtection | None = None
        self._write: rl.RecordProtection | None = None
        self._write_by_epoch: dict[qtls.Epoch, rl.RecordProtection] = {}
        self._next_read: rl.RecordProtection | None = None
        self._pending_records: list[rl.Record] = []  # read while the signature is awaited
        self._hs_buf = b""  # post-handshake handshake bytes being reassembled
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
        return self._resume(signature)

    def signature_failed(self, reason: str, detail: str = "") -> list[Event]:
        """The key server did not sign: the handshake ends with internal_error queued (the
        caller may instead hand the untouched connection to another path: nothing has been
        sent to the visitor yet)."""
        if self.state != "signing":
            return []
        g, self._greenlet = self._greenlet, None
        if g is not None and not g.dead:
            g.throw()  # GreenletExit unwinds aioquic's suspended frames now
            _release(g)
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
        peeked = self._peeked
        if peeked is not None and peeked.message == message:
            info = _info_from_peek(peeked)
        else:
            info = _hello_extensions(message)
        self._offers_tickets = PSK_DHE_KE in info.psk_modes
        self._early_data_offered = info.early_data
        if info.has_alpn and self.settings.alpn and not set(info.alpn) & set(self.settings.alpn):
            raise rl.protocol_error(
                "no_application_protocol",
                rl.A_NO_APPLICATION_PROTOCOL,
                f"client offers {list(info.alpn)}",
            )
        suites = [qtls.CipherSuite(s) for s in CIPHER_SUITES]
        if info.first_suite == CHACHA:  # the client has no AES hardware: honour that
            suites.remove(qtls.CipherSuite.CHACHA20_POLY1305_SHA256)
            suites.insert(0, qtls.CipherSuite.CHACHA20_POLY1305_SHA256)
        ctx = _Context(
            self.identity.schemes,
            list(self.settings.alpn) if info.has_alpn and self.settings.alpn else None,
            suites,
        )
        ders = [_CertificateDer(d) for d in self.identity.ders]
        ctx.certificate = ders[0]  # type: ignore[assignment]
        ctx.certificate_chain = ders[1:]  # type: ignore[assignment]
        ctx.certificate_private_key = _RemoteKey()  # type: ignore[assignment]
        if info.has_sni:
            ctx.handshake_extensions = [(EXT_SERVER_NAME, b"")]  # RFC 6066 §3 acknowledgement
        # Resumption only without early data (0-RTT is never accepted: §8 replay).
        if self._offers_tickets and not info.early_data:
            ctx.get_session_ticket_cb = self._find_ticket
        ctx.update_traffic_key_cb = self._on_traffic_key
        self._ctx = ctx
        capacity = 16384 + self.identity.chain_der_len
        self._bufs = {
            qtls.Epoch.INITIAL: Buffer(capacity=4096),
            qtls.Epoch.HANDSHAKE: Buffer(capacity=capacity),
            qtls.Epoch.ONE_RTT: Buffer(capacity=4096),
        }
        self._legacy_session_id = info.legacy_session_id
        idle = _POOL.idle
        self._greenlet = idle.pop() if idle else greenlet(_run_jobs)
        if not self._greenlet:  # a new one: run it to its first wait
            self._greenlet.switch()
        self.state = "signing"
        return self._resume((self._run_hello, message))

    def _run_hello(self, message: bytes) -> None:
        assert self._ctx is not None
        self._ctx.handle_message(message, self._bufs)

    def _resume(self, value: object) -> list[Event]:
        g = self._greenlet
        assert g is not None
        try:
            try:
                result = g.switch(value)
                if isinstance(result, _Failed):
                    self._greenlet = None
                    _release(g)
                    raise result.exc
            except qtls.Alert as exc:
                raise rl.protocol_error(
                    type(exc).__name__, int(exc.description), str(exc)
                ) from None
            except _PEER_DATA_ERRORS as exc:
                raise _peer_data_error("bad_hello", exc) from None
            if isinstance(result, _SignCall):
                data = result.data
                if not data.startswith(_CV_PREFIX):
                    raise rl.protocol_error(
                        "internal", rl.A_INTERNAL_ERROR, "unexpected content to sign"
                    )
                # aioquic calls sign() after pushing ServerHello into the INITIAL buffer and
                # EncryptedExtensions + Certificate into the HANDSHAKE one (nothing more yet)
                bufs = self._bufs
                return [
                    SignatureRequested(
                        _scheme_of(self.identity, result.params),
                        data[len(_CV_PREFIX) :],
                        b"".join(
                            (
                                self._hello,
                                bufs[qtls.Epoch.INITIAL].data,
                                bufs[qtls.Epoch.HANDSHAKE].data,
                            )
                        ),
                    )
                ]
            self._greenlet = None
            _release(g)
            events = self._flight()
            if self._pending_records:
                records, self._pending_records = self._pending_records, []
                events.extend(self._records(records))
            return events
        except ProtocolError as exc:
            self._greenlet = None
            return [self._fail(exc)]

    def _find_ticket(self, identity: bytes) -> qtls.SessionTicket | None:
        return self.sessions.take(identity, self.server_name, self.now)

    def _on_traffic_key(
        self,
        direction: qtls.Direction,
        epoch: qtls.Epoch,
        cipher_suite: qtls.CipherSuite,
        secret: bytes,
    ) -> None:
        protection = rl.RecordProtection(int(cipher_suite), secret)
        if direction == qtls.Direction.ENCRYPT:
            self._write_by_epoch[epoch] = protection
        elif epoch == qtls.Epoch.HANDSHAKE:
            self._read = protection
        elif epoch == qtls.Epoch.ONE_RTT:
            self._next_read = protection
        else:  # never: early data is not accepted
            raise rl.protocol_error("early_data_key", rl.A_INTERNAL_ERROR)

    def _flight(self) -> list[Event]:
        """The ClientHello is processed: send ServerHello .. Finished."""
        ctx = self._ctx
        assert ctx is not None and ctx.key_schedule is not None
        self.cipher_suite = int(ctx.key_schedule.cipher_suite)
        self.alpn = ctx.alpn_negotiated
        self.resumed = ctx.session_resumed
        out = self._out
        out += rl.plaintext_records(rl.HANDSHAKE, self._bufs[qtls.Epoch.INITIAL].data)
        if self._legacy_session_id:
            out += rl.CHANGE_CIPHER_SPEC_RECORD  # §D.4 middlebox compatibility
        hs = self._write_by_epoch[qtls.Epoch.HANDSHAKE]
        data = self._bufs[qtls.Epoch.HANDSHAKE].data
        for i in range(0, len(data), rl.MAX_PLAINTEXT):
            out += hs.seal(rl.HANDSHAKE, data[i : i + rl.MAX_PLAINTEXT])
        # From our Finished on, the client reads with our application key (alerts included);
        # anything aioquic queued for 1-RTT (its own ticket: it has none here) waits for the
        # client's Finished, as RFC 8446 §4.6.1 requires of tickets.
        self._write = self._write_by_epoch[qtls.Epoch.ONE_RTT]
        self.state = "handshake"
        return []

    # ---------------------------------------------------------------- handshake messages
    def _handshake(self, content: bytes) -> list[Event]:
        if self.state == "handshake":
            ctx = self._ctx
            assert ctx is not None and ctx.key_schedule is not None
            head = (ctx._receive_buffer + content)[:4]
            if (
                len(head) == 4
                and head[0] == HS_FINISHED
                and int.from_bytes(head[1:4], "big") != ctx.key_schedule.algorithm.digest_size
            ):
                # §4.4.4: verify_data is exactly Hash.length (aioquic would compare any length)
                raise rl.protocol_error("bad_finished_length", rl.A_DECODE_ERROR)
            try:
                ctx.handle_message(content, self._bufs)
            except qtls.Alert as exc:
                raise rl.protocol_error(
                    type(exc).__name__, int(exc.description), str(exc)
                ) from None
            except _PEER_DATA_ERRORS as exc:
                raise _peer_data_error("bad_handshake", exc) from None
            if len(ctx._receive_buffer) > MAX_HANDSHAKE_MESSAGE:
                raise rl.protocol_error("handshake_too_large", rl.A_DECODE_ERROR)
            if ctx.state != qtls.State.SERVER_POST_HANDSHAKE:
                return []
            if ctx._receive_buffer:  # §5.1: a message after Finished under the old key
                raise rl.protocol_error("data_after_finished", rl.A_UNEXPECTED_MESSAGE)
            self._read = self._next_read
            self._next_read = None
            self.state = "open"
            self._issue_ticket()
            return [HandshakeCompleted(self.alpn, self.cipher_suite, self.resumed)]
        # post-handshake messages: only KeyUpdate is expected from a client
        buf = self._hs_buf + content
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

    def _issue_ticket(self) -> None:
        ctx = self._ctx
        if not (self.settings.issue_tickets and self._offers_tickets) or ctx is None:
            return
        ks = ctx.key_schedule
        assert ks is not None and self._write is not None
        nonce = b"\x00"
        ticket = qtls.NewSessionTicket(
            ticket_lifetime=int(self.sessions.lifetime_s),
            ticket_age_add=struct.unpack("I", os.urandom(4))[0],
            ticket_nonce=nonce,
            ticket=os.urandom(32),
            max_early_data_size=None,
        )
        # §4.6.1: resumption secret from the resumption master secret and the ticket nonce
        res_master = ks.derive_secret(b"res master")
        secret = qtls.hkdf_expand_label(
            ks.algorithm, res_master, b"resumption", nonce, ks.algorithm.digest_size
        )
        start = datetime.datetime.now(datetime.UTC)
        self.sessions.put(
            qtls.SessionTicket(
                age_add=ticket.ticket_age_add,
                cipher_suite=ks.cipher_suite,
                not_valid_after=start + datetime.timedelta(seconds=self.sessions.lifetime_s),
                not_valid_before=start,
                resumption_secret=secret,
                server_name=self.server_name,
                ticket=ticket.ticket,
            ),
            self.server_name,
            self.now,
        )
        buf = Buffer(capacity=256)
        qtls.push_new_session_ticket(buf, ticket)
        self._out += self._write.seal(rl.HANDSHAKE, buf.data)

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


# ------------------------------------------------------------------------------ hello details
@dataclass(frozen=True, slots=True)
class _HelloInfo:
    legacy_session_id: bytes
    first_suite: int
    has_alpn: bool
    has_sni: bool
    early_data: bool
    psk_modes: bytes
    alpn: tuple[str, ...]


def _info_from_peek(hello: ClientHello) -> _HelloInfo:
    message = hello.message
    sid_len = message[38]
    first = next((s for s in hello.cipher_suites if (s & 0x0F0F) != 0x0A0A), 0)
    spans = hello.ext_spans
    modes = hello.extension(EXT_PSK_MODES) or b""
    return _HelloInfo(
        message[39 : 39 + sid_len],
        first,
        EXT_ALPN in spans,
        EXT_SERVER_NAME in spans,
        EXT_EARLY_DATA in spans,
        modes[1:],
        tuple(p.decode("latin-1") for p in hello.alpn),
    )


def _hello_extensions(message: bytes) -> _HelloInfo:
    """The few ClientHello facts needed before aioquic parses it (which it does fully)."""
    try:
        pos = 4 + 2 + 32
        sid_len = message[pos]
        sid = message[pos + 1 : pos + 1 + sid_len]
        pos += 1 + sid_len
        suites_len = int.from_bytes(message[pos : pos + 2], "big")
        suites = message[pos + 2 : pos + 2 + suites_len]
        first = 0
        for i in range(0, len(suites) - 1, 2):
            s = int.from_bytes(suites[i : i + 2], "big")
            if (s & 0x0F0F) != 0x0A0A:  # skip GREASE (RFC 8701)
                first = s
                break
        pos += 2 + suites_len
        pos += 1 + message[pos]
        ext_end = pos + 2 + int.from_bytes(message[pos : pos + 2], "big")
        pos += 2
        found: dict[int, bytes] = {}
        while pos + 4 <= ext_end:
            etype = int.from_bytes(message[pos : pos + 2], "big")
            elen = int.from_bytes(message[pos + 2 : pos + 4], "big")
            found.setdefault(etype, message[pos + 4 : pos + 4 + elen])
            pos += 4 + elen
    except IndexError:
        raise rl.protocol_error("malformed_hello", rl.A_DECODE_ERROR) from None
    modes = found.get(EXT_PSK_MODES, b"")
    alpn: list[str] = []
    data = found.get(EXT_ALPN, b"")
    pos = 2
    while pos < len(data):
        n = data[pos]
        alpn.append(data[pos + 1 : pos + 1 + n].decode("latin-1"))
        pos += 1 + n
    return _HelloInfo(
        sid,
        first,
        EXT_ALPN in found,
        EXT_SERVER_NAME in found,
        EXT_EARLY_DATA in found,
        modes[1:] if modes else b"",
        tuple(alpn),
    )
