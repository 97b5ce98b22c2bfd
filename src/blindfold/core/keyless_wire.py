"""The keyless wire format between edges and the key server (docs/keyless-protocol.md), sans-IO.

Every frame: u32 length (of what follows) | u8 version (2) | u8 type | u32 request id | body.
Requests carry ids so that many can be in flight on one connection (pipelining); responses
come back with the same id, in any order. Frames are bounded (MAX_FRAME); the decoder raises
ProtocolError on anything malformed and never buffers more than one frame plus a read.

Version 2 sends the handshake messages themselves (ClientHello .. Certificate), not a hash and
a hostname the edge computed: the key server parses and hashes them (core.keyless_handshake).
A peer still speaking version 1 gets an ERROR in version-1 framing (`refusal`) it can decode.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass

from blindfold.errors import ProtocolError

VERSION = 2
# A ClientHello may be up to 64 KiB (the edge's max_hello_bytes), a certificate chain several
# KiB: a request is bounded by this whole frame (length field included).
MAX_FRAME = 1 << 17
HEADER = struct.Struct(">IBBI")  # length, version, type, id (length excludes its own 4 bytes)
HEADER_LEN = 10

SIGN_REQUEST = 1
SIGN_RESPONSE = 2
ERROR = 3
PING = 4
PONG = 5
CHAIN_REQUEST = 6  # the current certificate chain of a hostname the edge is authorised for
CHAIN_RESPONSE = 7
FRAME_TYPES = frozenset(
    (SIGN_REQUEST, SIGN_RESPONSE, ERROR, PING, PONG, CHAIN_REQUEST, CHAIN_RESPONSE)
)
MAX_HOSTNAME = 253  # RFC 1035 §2.3.4 (a name in text form)
MAX_CHAIN_CERTS = 10

# TLS 1.3 SignatureScheme values (RFC 8446 §4.2.3) the key server will sign with
ECDSA_SECP256R1_SHA256 = 0x0403
ECDSA_SECP384R1_SHA384 = 0x0503
RSA_PSS_RSAE_SHA256 = 0x0804
RSA_PSS_RSAE_SHA384 = 0x0805
RSA_PSS_RSAE_SHA512 = 0x0806
ED25519 = 0x0807
SCHEMES = frozenset(
    {
        ECDSA_SECP256R1_SHA256,
        ECDSA_SECP384R1_SHA384,
        RSA_PSS_RSAE_SHA256,
        RSA_PSS_RSAE_SHA384,
        RSA_PSS_RSAE_SHA512,
        ED25519,
    }
)
TRANSCRIPT_HASH_SIZES = frozenset({32, 48})  # SHA-256 and SHA-384 cipher suites

# error codes
E_MALFORMED = 1
E_UNAUTHORIZED = 2
E_UNKNOWN_KEY = 3
E_BAD_SCHEME = 4
E_RATE_LIMITED = 5
E_INTERNAL = 6
E_BAD_HANDSHAKE = 7
E_REPLAYED = 8
E_UNSUPPORTED_VERSION = 9
ERROR_NAMES = {
    E_MALFORMED: "malformed",
    E_UNAUTHORIZED: "unauthorized",
    E_UNKNOWN_KEY: "unknown_key",
    E_BAD_SCHEME: "bad_scheme",
    E_RATE_LIMITED: "rate_limited",
    E_INTERNAL: "internal",
    E_BAD_HANDSHAKE: "bad_handshake",
    E_REPLAYED: "replayed",
    E_UNSUPPORTED_VERSION: "unsupported_version",
}

# What the key server's refusals (core.keyless_handshake reasons) are called on the wire
REFUSAL_CODES = {
    "no_sni": E_UNAUTHORIZED,
    "unauthorized_sni": E_UNAUTHORIZED,
    "certificate_mismatch": E_UNKNOWN_KEY,
    "certificate_too_broad": E_UNAUTHORIZED,
    "scheme_not_offered": E_BAD_SCHEME,
    "bad_scheme": E_BAD_SCHEME,
    "replayed_client_random": E_REPLAYED,
}  # any other reason: E_BAD_HANDSHAKE (messages that do not parse or do not fit together)

# Every reason a key server gives for refusing a signature (core.keyless_handshake's, the
# signer's and the replay guard's). It leads the ERROR frame's message ("reason: detail");
# `error_reason` believes only these, so a client's labels stay a small fixed set.
REFUSAL_REASONS = frozenset(
    {
        "alpn_not_offered",
        "bad_certificate",
        "bad_client_hello",
        "bad_encrypted_extensions",
        "bad_scheme",
        "bad_server_hello",
        "certificate_mismatch",
        "certificate_too_broad",
        "edge_not_authorised",
        "cipher_not_offered",
        "hello_retry",
        "hello_too_large",
        "key_share_mismatch",
        "no_certificate",
        "no_sni",
        "not_tls13",
        "psk_handshake",
        "replayed_client_random",
        "scheme_not_offered",
        "session_id_mismatch",
        "sign_failed",
        "too_many_certificates",
        "too_many_extensions",
        "unauthorized_sni",
        "unexpected_message",
    }
)


@dataclass(frozen=True, slots=True)
class SignRequest:
    """Sign the TLS 1.3 server CertificateVerify of the handshake these messages begin.

    `messages` is ClientHello || ServerHello || EncryptedExtensions || Certificate, each with
    its handshake header (type u8, length u24), exactly as hashed into the transcript
    (RFC 8446 §4.4.1). `client` is the visitor's address as the edge claims it (audit only)."""

    scheme: int
    client: str
    messages: bytes


@dataclass(frozen=True, slots=True)
class Frame:
    type: int
    request_id: int
    body: bytes


def _bad(detail: str) -> ProtocolError:
    return ProtocolError("bad_keyless_frame", detail)


def encode_frame(frame_type: int, request_id: int, body: bytes, version: int = VERSION) -> bytes:
    if len(body) + HEADER_LEN > MAX_FRAME:
        raise ValueError("frame too large")
    return HEADER.pack(len(body) + 6, version, frame_type, request_id) + body


def _packed(client: str) -> bytes:
    """The visitor's address, 4 or 16 bytes (inet_pton: a third of ipaddress's cost)."""
    try:
        return socket.inet_pton(socket.AF_INET6 if ":" in client else socket.AF_INET, client)
    except OSError:  # e.g. a scoped IPv6 address: ipaddress drops the scope
        return ipaddress.ip_address(client).packed


def encode_sign_request(request_id: int, req: SignRequest) -> bytes:
    addr = _packed(req.client) if req.client else b""
    return encode_frame(
        SIGN_REQUEST,
        request_id,
        struct.pack(">HB", req.scheme, len(addr)) + addr + req.messages,
    )


def decode_sign_request(body: bytes) -> SignRequest:
    if len(body) < 3:
        raise _bad("truncated sign request")
    scheme = int.from_bytes(body[:2], "big")
    alen = body[2]
    if alen not in (0, 4, 16):
        raise _bad("bad address length")
    if len(body) < 3 + alen + 4:
        raise _bad("truncated sign request: no handshake messages")
    # inet_ntop: the ipaddress module costs a microsecond per request here
    client = (
        socket.inet_ntop(socket.AF_INET if alen == 4 else socket.AF_INET6, body[3 : 3 + alen])
        if alen
        else ""
    )
    return SignRequest(scheme, client, body[3 + alen :])


def encode_sign_response(request_id: int, signature: bytes) -> bytes:
    return encode_frame(SIGN_RESPONSE, request_id, struct.pack(">H", len(signature)) + signature)


def decode_sign_response(body: bytes) -> bytes:
    if len(body) < 2 or struct.unpack_from(">H", body)[0] != len(body) - 2:
        raise _bad("bad sign response")
    return body[2:]


def encode_chain_request(request_id: int, hostname: str) -> bytes:
    name = hostname.encode("ascii")
    if not 0 < len(name) <= MAX_HOSTNAME:
        raise ValueError("bad hostname length")
    return encode_frame(CHAIN_REQUEST, request_id, bytes([len(name)]) + name)


def decode_chain_request(body: bytes) -> str:
    """The hostname asked for: lower case ASCII (an exact name or '*.suffix')."""
    if not body or body[0] != len(body) - 1 or not 0 < body[0] <= MAX_HOSTNAME:
        raise _bad("bad chain request")
    try:
        name = body[1:].decode("ascii")
    except UnicodeDecodeError:
        raise _bad("chain request hostname is not ASCII") from None
    if name != name.lower() or not name.isprintable() or " " in name:
        raise _bad("chain request hostname must be lower case, printable, without spaces")
    return name


def encode_chain_response(request_id: int, ders: tuple[bytes, ...] | list[bytes]) -> bytes:
    """Body: u8 count, then per certificate (leaf first) u24 length + DER, as in the TLS 1.3
    Certificate message's certificate_list (RFC 8446 §4.4.2) minus the extensions."""
    if not 0 < len(ders) <= MAX_CHAIN_CERTS:
        raise ValueError("bad chain length")
    parts = [bytes([len(ders)])]
    for der in ders:
        parts.append(len(der).to_bytes(3, "big") + der)
    return encode_frame(CHAIN_RESPONSE, request_id, b"".join(parts))


def decode_chain_response(body: bytes) -> tuple[bytes, ...]:
    if not body or not 0 < body[0] <= MAX_CHAIN_CERTS:
        raise _bad("bad chain response")
    out = []
    pos = 1
    for _ in range(body[0]):
        if len(body) - pos < 3:
            raise _bad("truncated chain response")
        n = int.from_bytes(body[pos : pos + 3], "big")
        pos += 3
        if n == 0 or len(body) - pos < n:
            raise _bad("truncated chain response")
        out.append(body[pos : pos + n])
        pos += n
    if pos != len(body):
        raise _bad("trailing bytes in chain response")
    return tuple(out)


def encode_error(request_id: int, code: int, message: str, version: int = VERSION) -> bytes:
    """`version`: the framing the peer reads (1 for an edge that speaks only version 1)."""
    text = message.encode("utf-8")[:1000]
    return encode_frame(ERROR, request_id, struct.pack(">BH", code, len(text)) + text, version)


def decode_error(body: bytes) -> tuple[int, str]:
    if len(body) < 3 or struct.unpack_from(">H", body, 1)[0] != len(body) - 3:
        raise _bad("bad error frame")
    return body[0], body[3:].decode("utf-8", "replace")


def error_reason(code: int, message: str) -> str:
    """A stable token for an ERROR frame: the key server's own refusal reason when its message
    starts with a known one ("unauthorized_sni: ..."), else the error code's name."""
    head = message.partition(":")[0]
    if head in REFUSAL_REASONS:
        return head
    return ERROR_NAMES.get(code, "error")


class FrameDecoder:
    """Bytes in, frames out. Raises ProtocolError on a bad header, version or size; after an
    unsupported version (reason `unsupported_version`) `peer_version` and `peer_request_id`
    say how to answer (`refusal`)."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()
        self.peer_version = VERSION
        self.peer_request_id = 0

    def feed(self, data: bytes) -> list[Frame]:
        self._buf += data
        out = []
        buf = self._buf
        pos = 0
        n = len(buf)
        try:
            while n - pos >= 4:
                length = int.from_bytes(buf[pos : pos + 4], "big")
                if n - pos >= HEADER_LEN and buf[pos + 4] != VERSION:
                    # every version so far has the same header: answer in the peer's framing
                    version = buf[pos + 4]
                    self.peer_version = version
                    self.peer_request_id = int.from_bytes(buf[pos + 6 : pos + 10], "big")
                    raise ProtocolError(
                        "unsupported_version",
                        f"keyless protocol version {version} is not supported (this side "
                        f"speaks version {VERSION}): upgrade the side that speaks version "
                        f"{version}",
                    )
                if length < 6 or length + 4 > self.max_frame:
                    raise _bad(f"frame length {length}")
                end = pos + 4 + length
                if n < end:
                    break
                _len, _version, ftype, rid = HEADER.unpack_from(buf, pos)
                if ftype not in FRAME_TYPES:
                    raise _bad(f"frame type {ftype}")
                out.append(Frame(ftype, rid, bytes(buf[pos + HEADER_LEN : end])))
                pos = end
        finally:
            del buf[:pos]  # once per read, not once per frame
        return out


def refusal(decoder: FrameDecoder, exc: ProtocolError) -> bytes:
    """The ERROR frame that answers a frame-level error, in the framing the peer reads; the
    connection is closed after it."""
    if exc.reason == "unsupported_version":
        return encode_error(
            decoder.peer_request_id,
            E_UNSUPPORTED_VERSION,
            exc.detail,
            decoder.peer_version if 0 < decoder.peer_version < VERSION else VERSION,
        )
    return encode_error(0, E_MALFORMED, exc.detail or exc.reason)


def certificate_verify_content(transcript_hash: bytes) -> bytes:
    """RFC 8446 §4.4.3: what a TLS 1.3 server signs. The key server builds it itself."""
    return b"\x20" * 64 + b"TLS 1.3, server CertificateVerify" + b"\x00" + transcript_hash
