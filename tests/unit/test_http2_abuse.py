"""web.http2 on web.h2core against abuse the attack review (atk-h2) found: streams the server
resets for the client's frames count as rapid reset (CVE-2023-44487), RST_STREAMs the core
answers frames on closed streams with count as control frames, reading stops while writing is
paused, and the core's decoded-header cache and HPACK encoder table stay bounded."""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import hpack
import pytest

from blindfold.web import h2core
from blindfold.web.h2core import PREFACE, H2Server
from blindfold.web.http1 import ConnInfo
from blindfold.web.http2 import H2Connection
from blindfold.web.limits import HttpLimits
from blindfold.web.messages import BodyStream, Request, Responder


def frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return struct.pack(">HBBBL", n >> 8, n & 0xFF, ftype, flags, sid) + payload


def goaway_codes(out: bytes | bytearray) -> list[int]:
    codes, pos = [], 0
    while len(out) - pos >= 9:
        hi, lo, ftype, _flags, _sid = struct.unpack_from(">HBBBL", out, pos)
        n = hi << 8 | lo
        if ftype == 7:
            codes.append(struct.unpack_from(">L", out, pos + 13)[0])
        pos += 9 + n
    return codes


class Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.out = bytearray()
        self.closed = False
        self.reading = True

    def write(self, data: Any) -> None:
        self.out += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    abort = close

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True


LIMITS = HttpLimits(h2_max_resets_per_window=20, h2_max_control_frames_per_window=50)


def request(enc: hpack.Encoder, method: bytes = b"POST") -> bytes:
    return enc.encode(
        [
            (b":method", method),
            (b":scheme", b"https"),
            (b":authority", b"a.test"),
            (b":path", b"/up"),
            (b"content-length", b"1"),
        ]
    )


async def run(tricks: list[bytes] | None, make_stream: bool = True, n: int = 100) -> dict[str, Any]:
    started = cancelled = 0

    async def handler(request: Request, body: BodyStream, respond: Responder) -> None:
        nonlocal started, cancelled
        started += 1
        try:
            await asyncio.sleep(60)  # as a request waiting for its origin
        except asyncio.CancelledError:
            cancelled += 1
            raise

    info = ConnInfo(("127.0.0.1", 1), ("127.0.0.1", 2), b"https", {})
    conn = H2Connection(handler, LIMITS, info)
    transport = Transport()
    conn.connection_made(transport)
    conn.data_received(PREFACE + frame(4, 0, 0))
    enc = hpack.Encoder()
    opened = 0
    for i in range(n):
        if transport.closed:
            break
        sid = 2 * i + 1
        conn.data_received(frame(1, 0x4, sid, request(enc)))
        opened += 1
        await asyncio.sleep(0)
        assert tricks is not None
        trick = tricks[0]
        if trick == b"trailers":
            conn.data_received(frame(1, 0x5, sid, enc.encode([(b":path", b"/t")])))
        else:
            conn.data_received(trick.replace(b"SID!", struct.pack(">L", sid)))
    await asyncio.sleep(0)
    conn.connection_lost(None)
    await asyncio.sleep(0)
    return {
        "opened": opened,
        "started": started,
        "cancelled": cancelled,
        "closed": transport.closed,
        "goaway": goaway_codes(transport.out),
    }


def _on_sid(ftype: int, flags: int, payload: bytes) -> bytes:
    """A frame on the stream just opened (SID! is replaced with its id)."""
    n = len(payload)
    return struct.pack(">HBBB", n >> 8, n & 0xFF, ftype, flags) + b"SID!" + payload


@pytest.mark.parametrize(
    "trick",
    [
        _on_sid(3, 0, struct.pack(">L", 8)),  # the client's own RST_STREAM CANCEL
        _on_sid(8, 0, struct.pack(">L", 0)),  # WINDOW_UPDATE 0: a stream error
        _on_sid(0, 0, b"xx"),  # DATA past Content-Length: a stream error
        b"trailers",  # a malformed trailer section (pseudo-header): a stream error
    ],
    ids=["rst_stream", "window_update_0", "content_length_overrun", "bad_trailers"],
)
def test_streams_reset_for_the_clients_frames_count_as_rapid_reset(trick: bytes) -> None:
    got = asyncio.run(run([trick]))
    # 20 resets allowed in the window: the 21st ends the connection, ENHANCE_YOUR_CALM
    assert got["closed"] and h2core.ENHANCE_YOUR_CALM in got["goaway"], got
    assert got["opened"] == LIMITS.h2_max_resets_per_window + 1, got
    assert got["cancelled"] == got["started"], got


def test_rst_streams_the_core_answers_by_itself_count_as_control_frames() -> None:
    async def main() -> dict[str, Any]:
        async def handler(request: Request, body: BodyStream, respond: Responder) -> None:
            await respond.start(200, [(b"content-length", b"0")])
            await respond.end()

        info = ConnInfo(("127.0.0.1", 1), ("127.0.0.1", 2), b"https", {})
        conn = H2Connection(handler, LIMITS, info)
        transport = Transport()
        conn.connection_made(transport)
        enc = hpack.Encoder()
        conn.data_received(PREFACE + frame(4, 0, 0) + frame(1, 0x5, 1, request(enc, b"GET")))
        for _ in range(5):
            await asyncio.sleep(0)
        sent = 0
        while not transport.closed and sent < 1000:
            conn.data_received(frame(0, 0, 1, b"x"))  # DATA on the closed stream 1
            sent += 1
        conn.connection_lost(None)
        return {"sent": sent, "closed": transport.closed, "goaway": goaway_codes(transport.out)}

    got = asyncio.run(main())
    assert got["closed"] and h2core.ENHANCE_YOUR_CALM in got["goaway"], got
    assert got["sent"] <= LIMITS.h2_max_control_frames_per_window + 1, got


def test_reading_stops_while_writing_is_paused() -> None:
    async def main() -> list[bool]:
        async def handler(request: Request, body: BodyStream, respond: Responder) -> None:
            return None

        info = ConnInfo(("127.0.0.1", 1), ("127.0.0.1", 2), b"https", {})
        conn = H2Connection(handler, LIMITS, info)
        transport = Transport()
        conn.connection_made(transport)
        seen = [transport.reading]
        conn.pause_writing()
        seen.append(transport.reading)
        conn.resume_writing()
        seen.append(transport.reading)
        conn.connection_lost(None)
        return seen

    assert asyncio.run(main()) == [True, False, True]


def _client() -> tuple[H2Server, hpack.Encoder]:
    server = H2Server()
    server.initiate()
    server.receive(PREFACE + frame(4, 0, 0))
    server.data_to_send()
    return server, hpack.Encoder()


def test_decoded_header_cache_holds_small_blocks_only_and_is_bounded() -> None:
    server, enc = _client()
    fields = [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"a"), (b":path", b"/")]
    for i in range(1, 40, 2):
        # never indexed: the dynamic table is left alone, so the block could be cached
        big = [*fields, hpack.NeverIndexedHeaderTuple(b"x-big", b"v" * 8000)]
        block = enc.encode(big, huffman=False)
        server.receive(frame(1, 0x5, i, block))
        server.data_to_send()
    assert server._decoded_bytes == 0 and not server._decoded
    small = enc.encode(fields)
    for i in range(41, 161, 2):
        server.receive(frame(1, 0x5, i, small))
        server.data_to_send()
    assert 0 < server._decoded_bytes <= h2core.DECODE_CACHE_BYTES
    assert len(server._decoded) <= 64


def test_encoder_table_capped_whatever_the_client_allows() -> None:
    server, _enc = _client()
    server.receive(frame(4, 0, 0, struct.pack(">HL", 1, 1 << 30)))  # HEADER_TABLE_SIZE 1 GiB
    assert server.encoder.header_table_size == h2core.ENCODER_TABLE_MAX
    server.receive(frame(4, 0, 0, struct.pack(">HL", 1, 256)))  # smaller: taken as given
    assert server.encoder.header_table_size == 256
