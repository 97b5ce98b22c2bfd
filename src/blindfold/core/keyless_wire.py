"""The keyless wire format between edges and the key server (docs/keyless-protocol.md), sans-IO.

Every frame: u32 length (of what follows) | u8 version (1) | u8 type | u32 request id | body.
Requests carry ids so that many can be in flight on one connection (pipelining); responses
come back with the same id, in any order. Frames are bounded (MAX_FRAME); the decoder raises
ProtocolError on anything malformed and never buffers more than one frame plus a read.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from blindfold.errors import ProtocolError

VERSION = 1
MAX_FRAME = 16384
HEADER = struct.Struct(">IBBI")  # length, version, type, id (length excludes its own 4 bytes)

SIGN_REQUEST = 1
SIGN_RESPONSE = 2
ERROR = 3
PING = 4
PONG = 5

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
ERROR_NAMES = {
    E_MALFORMED: "malformed",
    E_UNAUTHORIZED: "unauthorized",
    E_UNKNOWN_KEY: "unknown_key",
    E_BAD_SCHEME: "bad_scheme",
    E_RATE_LIMITED: "rate_limited",
    E_INTERNAL: "internal",
}


@dataclass(frozen=True, slots=True)
class SignRequest:
    """Sign the TLS 1.3 server CertificateVerify for this transcript hash."""

    scheme: int
    transcript_hash: bytes
    hostname: str
    client: str  # the visitor's address, for the audit log
    certificate_sha256: bytes  # which certificate (so which key) the edge presented


@dataclass(frozen=True, slots=True)
class Frame:
    type: int
    request_id: int
    body: bytes


def _bad(detail: str) -> ProtocolError:
    return ProtocolError("bad_keyless_frame", detail)


def encode_frame(frame_type: int, request_id: int, body: bytes) -> bytes:
    if len(body) + 6 > MAX_FRAME:
        raise ValueError("frame too large")
    return HEADER.pack(len(body) + 6, VERSION, frame_type, request_id) + body


def encode_sign_request(request_id: int, req: SignRequest) -> bytes:
    host = req.hostname.encode("ascii")
    addr = ipaddress.ip_address(req.client).packed if req.client else b""
    if len(host) > 255 or len(req.transcript_hash) > 255 or len(req.certificate_sha256) != 32:
        raise ValueError("field too long")
    body = (
        struct.pack(">HB", req.scheme, len(req.transcript_hash))
        + req.transcript_hash
        + bytes([len(host)])
        + host
        + bytes([len(addr)])
        + addr
        + req.certificate_sha256
    )
    return encode_frame(SIGN_REQUEST, request_id, body)


def decode_sign_request(body: bytes) -> SignRequest:
    try:
        scheme, hlen = struct.unpack_from(">HB", body, 0)
        pos = 3
        th = body[pos : pos + hlen]
        pos += hlen
        nlen = body[pos]
        host_raw = body[pos + 1 : pos + 1 + nlen]
        pos += 1 + nlen
        alen = body[pos]
        addr = body[pos + 1 : pos + 1 + alen]
        pos += 1 + alen
        fp = body[pos : pos + 32]
        pos += 32
    except (struct.error, IndexError):
        raise _bad("truncated sign request") from None
    if len(th) != hlen or len(host_raw) != nlen or len(addr) != alen or len(fp) != 32:
        raise _bad("truncated sign request")
    if pos != len(body):
        raise _bad("trailing bytes in sign request")
    if alen not in (0, 4, 16):
        raise _bad("bad address length")
    try:
        host = host_raw.decode("ascii")
    except UnicodeDecodeError:
        raise _bad("hostname is not ASCII") from None
    client = str(ipaddress.ip_address(addr)) if addr else ""
    return SignRequest(scheme, th, host, client, fp)


def encode_sign_response(request_id: int, signature: bytes) -> bytes:
    return encode_frame(SIGN_RESPONSE, request_id, struct.pack(">H", len(signature)) + signature)


def decode_sign_response(body: bytes) -> bytes:
    if len(body) < 2 or struct.unpack_from(">H", body)[0] != len(body) - 2:
        raise _bad("bad sign response")
    return body[2:]


def encode_error(request_id: int, code: int, message: str) -> bytes:
    text = message.encode("utf-8")[:1000]
    return encode_frame(ERROR, request_id, struct.pack(">BH", code, len(text)) + text)


def decode_error(body: bytes) -> tuple[int, str]:
    if len(body) < 3 or struct.unpack_from(">H", body, 1)[0] != len(body) - 3:
        raise _bad("bad error frame")
    return body[0], body[3:].decode("utf-8", "replace")


class FrameDecoder:
    """Bytes in, frames out. Raises ProtocolError on a bad header, version or size."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Frame]:
        self._buf += data
        out = []
        buf = self._buf
        while len(buf) >= 4:
            length = int.from_bytes(buf[:4], "big")
            if length < 6 or length + 4 > self.max_frame:
                raise _bad(f"frame length {length}")
            if len(buf) < 4 + length:
                break
            _len, version, ftype, rid = HEADER.unpack_from(buf, 0)
            if version != VERSION:
                raise _bad(f"version {version}")
            if ftype not in (SIGN_REQUEST, SIGN_RESPONSE, ERROR, PING, PONG):
                raise _bad(f"frame type {ftype}")
            out.append(Frame(ftype, rid, bytes(buf[10 : 4 + length])))
            del buf[: 4 + length]
        return out


def certificate_verify_content(transcript_hash: bytes) -> bytes:
    """RFC 8446 §4.4.3: what a TLS 1.3 server signs. The key server builds it itself."""
    return b"\x20" * 64 + b"TLS 1.3, server CertificateVerify" + b"\x00" + transcript_hash
