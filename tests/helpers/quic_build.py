"""Build QUIC Initial packets for tests, the way a client does (RFC 9000 §17.2.2, RFC 9001 §5):
frames in, a protected packet out. Keys and protection are aioquic's (the client side)."""

from __future__ import annotations

import json
from pathlib import Path

from aioquic.quic.crypto import CryptoPair

from blindfold.core.quic_initial import QUIC_V1, QUIC_V2

DATA = Path(__file__).resolve().parent.parent / "data" / "quic"
CAPTURES = ("aioquic_v1", "aioquic_v2", "qh3_v1", "qh3_v2", "chromium_v1", "chromium_v2")


def capture(name: str) -> dict[str, object]:
    return dict(json.loads((DATA / f"{name}.json").read_text()))


def datagrams(name: str) -> list[bytes]:
    return [bytes.fromhex(x) for x in capture(name)["datagrams"]]  # type: ignore[attr-defined]


def varint(value: int, size: int = 0) -> bytes:
    """RFC 9000 §16; `size` forces a longer encoding (1, 2, 4 or 8 bytes)."""
    if not size:
        size = 1 if value < 0x40 else 2 if value < 0x4000 else 4 if value < 0x40000000 else 8
    prefix = {1: 0, 2: 1, 4: 2, 8: 3}[size]
    return ((prefix << (8 * size - 2)) | value).to_bytes(size, "big")


def crypto_frame(offset: int, data: bytes) -> bytes:
    return b"\x06" + varint(offset) + varint(len(data)) + data


def long_type_bits(version: int, kind: str) -> int:
    order = (
        ("initial", "0rtt", "handshake", "retry")
        if version != QUIC_V2
        else ("retry", "initial", "0rtt", "handshake")
    )
    return order.index(kind)


def initial_packet(
    frames: bytes,
    *,
    dcid: bytes,
    scid: bytes = b"\x01\x02\x03\x04",
    pn: int = 0,
    version: int = QUIC_V1,
    token: bytes = b"",
    key_dcid: bytes | None = None,
    reserved: int = 0,
    pn_len: int = 2,
) -> bytes:
    """One client Initial packet carrying `frames` (padded so the sample exists)."""
    if len(frames) < 4:
        frames += b"\x00" * (4 - len(frames))
    pair = CryptoPair()
    pair.setup_initial(cid=key_dcid or dcid, is_client=True, version=version)
    first = 0xC0 | (long_type_bits(version, "initial") << 4) | (reserved << 2) | (pn_len - 1)
    length = pn_len + len(frames) + 16
    header = (
        bytes([first])
        + version.to_bytes(4, "big")
        + bytes([len(dcid)])
        + dcid
        + bytes([len(scid)])
        + scid
        + varint(len(token))
        + token
        + varint(length, 2)
        + (pn & ((1 << (8 * pn_len)) - 1)).to_bytes(pn_len, "big")
    )
    return pair.encrypt_packet(header, frames, pn)


def server_long_header(
    kind: str, *, dcid: bytes, scid: bytes, version: int = QUIC_V1, body: bytes = b"\x00" * 40
) -> bytes:
    """A server's long-header packet as the edge sees it (its protected body is opaque)."""
    first = 0xC0 | (long_type_bits(version, kind) << 4)
    head = bytes([first]) + version.to_bytes(4, "big")
    head += bytes([len(dcid)]) + dcid + bytes([len(scid)]) + scid
    if kind == "retry":
        return head + body
    if kind == "initial":
        head += varint(0)
    return head + varint(len(body), 2) + body


__all__ = ["CAPTURES", "QUIC_V1", "QUIC_V2"]
