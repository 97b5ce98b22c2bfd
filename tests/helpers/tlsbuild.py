"""Build TLS ClientHello bytes for tests: synthetic ones with chosen fields, and real ones
produced by Python's ssl module (OpenSSL) through memory BIOs."""

from __future__ import annotations

import ssl
import struct
from collections.abc import Sequence

GREASE = [
    0x0A0A,
    0x1A1A,
    0x2A2A,
    0x3A3A,
    0x4A4A,
    0x5A5A,
    0x6A6A,
    0x7A7A,
    0x8A8A,
    0x9A9A,
    0xAAAA,
    0xBABA,
    0xCACA,
    0xDADA,
    0xEAEA,
    0xFAFA,
]


def u8(n: int) -> bytes:
    return bytes([n])


def u16(n: int) -> bytes:
    return struct.pack(">H", n)


def ext(ext_type: int, data: bytes) -> bytes:
    return u16(ext_type) + u16(len(data)) + data


def sni_ext(name: bytes) -> bytes:
    entry = u8(0) + u16(len(name)) + name
    return ext(0x0000, u16(len(entry)) + entry)


def alpn_ext(protocols: Sequence[bytes]) -> bytes:
    body = b"".join(u8(len(p)) + p for p in protocols)
    return ext(0x0010, u16(len(body)) + body)


def versions_ext(versions: Sequence[int]) -> bytes:
    body = b"".join(u16(v) for v in versions)
    return ext(0x002B, u8(len(body)) + body)


def sigalgs_ext(algs: Sequence[int]) -> bytes:
    body = b"".join(u16(a) for a in algs)
    return ext(0x000D, u16(len(body)) + body)


def client_hello_body(
    *,
    ciphers: Sequence[int] = (0x1301, 0x1302, 0x1303),
    extensions: Sequence[bytes] = (),
    legacy_version: int = 0x0303,
    session_id: bytes = b"\x11" * 32,
    with_extensions_block: bool = True,
) -> bytes:
    body = u16(legacy_version) + b"\x42" * 32 + u8(len(session_id)) + session_id
    cs = b"".join(u16(c) for c in ciphers)
    body += u16(len(cs)) + cs + b"\x01\x00"
    if with_extensions_block:
        exts = b"".join(extensions)
        body += u16(len(exts)) + exts
    return body


def handshake(body: bytes, msg_type: int = 1) -> bytes:
    return u8(msg_type) + len(body).to_bytes(3, "big") + body


def records(message: bytes, sizes: Sequence[int] | None = None, version: int = 0x0301) -> bytes:
    """Split a handshake message into TLS records of the given fragment sizes (the last takes
    the rest)."""
    out = b""
    pos = 0
    for size in sizes or ():
        frag = message[pos : pos + size]
        if not frag:
            break
        out += u8(22) + u16(version) + u16(len(frag)) + frag
        pos += len(frag)
    while pos < len(message):
        frag = message[pos : pos + 16384]
        out += u8(22) + u16(version) + u16(len(frag)) + frag
        pos += len(frag)
    return out


def simple_hello(
    sni: bytes | None = b"example.test", alpn: Sequence[bytes] = (b"h2",), **kw: object
) -> bytes:
    exts = []
    if sni is not None:
        exts.append(sni_ext(sni))
    if alpn:
        exts.append(alpn_ext(alpn))
    exts.append(versions_ext([0x0304, 0x0303]))
    exts.append(sigalgs_ext([0x0403, 0x0804]))
    return records(handshake(client_hello_body(extensions=exts, **kw)))  # type: ignore[arg-type]


def openssl_hello(
    server_name: str | None = "example.test",
    alpn: Sequence[str] = ("h2",),
    *,
    max_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3,
) -> bytes:
    """The first flight of a real OpenSSL client (Python ssl), captured from a memory BIO."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.maximum_version = max_version
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=server_name)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()
