"""Take TLS 1.3 handshake messages apart and put them back together changed: what a lying edge
does to the messages it sends the key server (tests only; RFC 8446 §4 layouts)."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field, replace

from tests.helpers.tlsbuild import ext, handshake, sni_ext, u8, u16

HRR_RANDOM = bytes.fromhex("CF21AD74E59A6111BE1D8C021E65B891C2A211167ABB8C5E079E09E2C8A8339C")


def split_messages(blob: bytes) -> list[bytes]:
    """Handshake messages (header included) in the order they come."""
    out, pos = [], 0
    while pos < len(blob):
        end = pos + 4 + int.from_bytes(blob[pos + 1 : pos + 4], "big")
        out.append(blob[pos:end])
        pos = end
    return out


def _extensions(data: bytes) -> list[tuple[int, bytes]]:
    out, pos = [], 0
    while pos < len(data):
        etype, elen = struct.unpack_from(">HH", data, pos)
        out.append((etype, data[pos + 4 : pos + 4 + elen]))
        pos += 4 + elen
    return out


def _join(exts: list[tuple[int, bytes]]) -> bytes:
    body = b"".join(ext(t, d) for t, d in exts)
    return u16(len(body)) + body


@dataclass
class Hello:
    """A ClientHello, field by field."""

    legacy_version: int
    random: bytes
    session_id: bytes
    ciphers: list[int]
    compression: bytes
    extensions: list[tuple[int, bytes]] = field(default_factory=list)

    @classmethod
    def parse(cls, message: bytes) -> Hello:
        b = message[4:]
        sid_len = b[34]
        pos = 35 + sid_len
        cs_len = int.from_bytes(b[pos : pos + 2], "big")
        ciphers = list(struct.unpack_from(f">{cs_len // 2}H", b, pos + 2))
        pos += 2 + cs_len
        comp = b[pos : pos + 1 + b[pos]]
        pos += len(comp)
        ext_len = int.from_bytes(b[pos : pos + 2], "big")
        return cls(
            int.from_bytes(b[:2], "big"),
            b[2:34],
            b[35 : 35 + sid_len],
            ciphers,
            comp,
            _extensions(b[pos + 2 : pos + 2 + ext_len]),
        )

    def encode(self) -> bytes:
        cs = b"".join(u16(c) for c in self.ciphers)
        body = (
            u16(self.legacy_version)
            + self.random
            + u8(len(self.session_id))
            + self.session_id
            + u16(len(cs))
            + cs
            + self.compression
            + _join(self.extensions)
        )
        return handshake(body, 1)

    def ext(self, etype: int) -> bytes | None:
        return next((d for t, d in self.extensions if t == etype), None)

    def with_ext(self, etype: int, data: bytes | None) -> Hello:
        """Replace (or with None remove) an extension, keeping the order."""
        exts = [(t, d) for t, d in self.extensions if t != etype or data is not None]
        exts = [(t, data if t == etype and data is not None else d) for t, d in exts]
        if data is not None and self.ext(etype) is None:
            exts.append((etype, data))
        return replace(self, extensions=exts)

    def with_sni(self, name: str | None) -> Hello:
        if name is None:
            return self.with_ext(0, None)
        return self.with_ext(0, sni_ext(name.encode())[4:])


@dataclass
class ServerHello:
    random: bytes
    session_id: bytes
    suite: int
    extensions: list[tuple[int, bytes]]
    legacy_version: int = 0x0303
    compression: int = 0

    @classmethod
    def parse(cls, message: bytes) -> ServerHello:
        b = message[4:]
        sid_len = b[34]
        pos = 35 + sid_len
        suite = int.from_bytes(b[pos : pos + 2], "big")
        ext_len = int.from_bytes(b[pos + 3 : pos + 5], "big")
        return cls(
            b[2:34],
            b[35 : 35 + sid_len],
            suite,
            _extensions(b[pos + 5 : pos + 5 + ext_len]),
            int.from_bytes(b[:2], "big"),
            b[pos + 2],
        )

    def encode(self) -> bytes:
        body = (
            u16(self.legacy_version)
            + self.random
            + u8(len(self.session_id))
            + self.session_id
            + u16(self.suite)
            + u8(self.compression)
            + _join(self.extensions)
        )
        return handshake(body, 2)


def encrypted_extensions(exts: list[tuple[int, bytes]]) -> bytes:
    return handshake(_join(exts), 8)


def alpn_data(name: bytes) -> bytes:
    return u16(len(name) + 1) + u8(len(name)) + name


def certificate(ders: list[bytes], context: bytes = b"") -> bytes:
    entries = b"".join(len(d).to_bytes(3, "big") + d + u16(0) for d in ders)
    return handshake(u8(len(context)) + context + len(entries).to_bytes(3, "big") + entries, 11)
