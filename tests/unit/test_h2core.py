"""web.h2core, the sans-IO HTTP/2 server core: every rule it keeps (RFC 9113, and h2's
behaviour where a client can see it), each asserted on the exact frames it writes; and its
one-pass request-field check against h2's own validator on generated header lists."""

from __future__ import annotations

import struct

import h2.exceptions
import hpack
import pytest
from h2.utilities import HeaderValidationFlags, normalize_inbound_headers, validate_headers
from hypothesis import given, settings
from hypothesis import strategies as st

from blindfold.web import h2core
from blindfold.web.h2core import (
    PREFACE,
    ConnectionFailed,
    H2Server,
    StreamGone,
    field_error,
    join_cookies,
)

REQ = [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"a.test"), (b":path", b"/")]


def frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return struct.pack(">HBBBL", n >> 8, n & 0xFF, ftype, flags, sid) + payload


def frames(data: bytes) -> list[tuple[int, int, int, bytes]]:
    out = []
    while data:
        hi, lo, ftype, flags, sid = struct.unpack_from(">HBBBL", data)
        n = hi << 8 | lo
        out.append((ftype, flags, sid, data[9 : 9 + n]))
        data = data[9 + n :]
    return out


def settings_frame(**values: int) -> bytes:
    codes = {
        "header_table_size": 1,
        "enable_push": 2,
        "initial_window_size": 4,
        "max_frame_size": 5,
        "enable_connect_protocol": 8,
    }
    return frame(4, 0, 0, b"".join(struct.pack(">HL", codes[k], v) for k, v in values.items()))


class Client:
    """A test peer: its own HPACK encoder (so blocks follow the server's decoder)."""

    def __init__(self, **kw: int) -> None:
        self.s = H2Server(**kw)
        self.s.initiate()
        self.enc = hpack.Encoder()
        self.s.receive(PREFACE + frame(4, 0, 0))
        self.s.data_to_send()

    def send(self, data: bytes) -> list[tuple[object, ...]]:
        return self.s.receive(data)

    def out(self) -> list[tuple[int, int, int, bytes]]:
        return frames(self.s.data_to_send())

    def block(self, fields: list[tuple[bytes, bytes]] = REQ) -> bytes:
        return self.enc.encode(fields)

    def headers(self, sid: int, fields: list[tuple[bytes, bytes]] = REQ, end: bool = True) -> bytes:
        return frame(1, 0x4 | (0x1 if end else 0), sid, self.block(fields))

    def fails(self, data: bytes) -> int:
        """The connection error `data` causes: its code, as the GOAWAY written says."""
        with pytest.raises(ConnectionFailed) as info:
            self.s.receive(data)
        sent = [f for f in self.out() if f[0] == 7]
        assert len(sent) == 1
        code: int = struct.unpack(">L", sent[0][3][4:8])[0]
        assert code == info.value.code
        assert self.s.receive(frame(6, 0, 0, bytes(8))) == []  # nothing more is read
        return code

    def resets(self) -> list[tuple[int, int]]:
        return [(f[2], struct.unpack(">L", f[3])[0]) for f in self.out() if f[0] == 3]


# ------------------------------------------------------------------------- preface, SETTINGS
def test_initiate_sends_our_settings_and_opens_the_connection_window() -> None:
    s = H2Server(initial_window=1 << 18, max_concurrent_streams=7)
    s.initiate(connection_window=1 << 20)
    (t1, _, _, p1), (t2, _, sid, p2) = frames(s.data_to_send())
    sent = dict(struct.unpack_from(">HL", p1, i) for i in range(0, len(p1), 6))
    assert t1 == 4 and sent[4] == 1 << 18 and sent[3] == 7 and sent[2] == 0
    assert t2 == 8 and sid == 0 and struct.unpack(">L", p2)[0] == (1 << 20) - 65535


def test_preface_is_checked_across_reads() -> None:
    s = H2Server()
    assert s.receive(PREFACE[:5]) == []
    assert s.receive(PREFACE[5:] + frame(4, 0, 0)) == [(h2core.SETTINGS, 0)]
    bad = H2Server()
    with pytest.raises(ConnectionFailed) as info:
        bad.receive(b"GET / HTTP/1.1\r\n")
    assert info.value.code == h2core.PROTOCOL_ERROR


def test_settings_are_acknowledged_and_validated() -> None:
    c = Client()
    c.send(settings_frame(enable_push=1))
    assert c.out() == [(4, 1, 0, b"")]
    assert Client().fails(settings_frame(enable_push=2)) == h2core.PROTOCOL_ERROR
    assert Client().fails(settings_frame(enable_connect_protocol=2)) == h2core.PROTOCOL_ERROR
    big = settings_frame(initial_window_size=2**31)
    assert Client().fails(big) == h2core.FLOW_CONTROL_ERROR
    assert Client().fails(settings_frame(max_frame_size=16383)) == h2core.PROTOCOL_ERROR
    assert Client().fails(settings_frame(max_frame_size=2**24)) == h2core.PROTOCOL_ERROR
    assert Client().fails(frame(4, 0, 0, bytes(5))) == h2core.FRAME_SIZE_ERROR
    assert Client().fails(frame(4, 1, 0, bytes(6))) == h2core.FRAME_SIZE_ERROR  # ACK + payload
    assert Client().fails(frame(4, 0, 1)) == h2core.PROTOCOL_ERROR
    c = Client()
    c.send(frame(4, 1, 0))  # an ACK of ours: nothing to answer
    assert c.out() == []


def test_initial_window_size_rebases_open_streams_and_overflow_fails() -> None:
    c = Client()
    c.send(frame(8, 0, 0, struct.pack(">L", 1 << 20)))  # the connection window is not the limit
    c.send(c.headers(1))
    assert c.s.window(1) == 65535
    c.send(settings_frame(initial_window_size=100))
    assert c.s.window(1) == 100
    c.send(frame(8, 0, 1, struct.pack(">L", 10)))
    assert c.s.window(1) == 110
    c.out()
    assert c.fails(settings_frame(initial_window_size=2**31 - 1)) == h2core.FLOW_CONTROL_ERROR


def test_header_table_size_setting_reaches_the_encoder() -> None:
    c = Client()
    c.send(settings_frame(header_table_size=0))
    assert c.s.encoder_resized and c.s.encoder.header_table_size == 0


# ------------------------------------------------------------------------- PING, GOAWAY
def test_ping_is_acked_with_its_payload() -> None:
    c = Client()
    assert c.send(frame(6, 0, 0, b"12345678")) == [(h2core.PING, 0)]
    assert c.out() == [(6, 1, 0, b"12345678")]
    assert c.send(frame(6, 1, 0, b"12345678")) == []  # an ACK is not answered
    assert c.out() == []
    assert Client().fails(frame(6, 0, 0, b"1234567")) == h2core.FRAME_SIZE_ERROR
    assert Client().fails(frame(6, 0, 1, b"12345678")) == h2core.PROTOCOL_ERROR


def test_goaway_from_the_client_ends_reading() -> None:
    c = Client()
    events = c.send(frame(7, 0, 0, struct.pack(">LL", 5, 2)) + c.headers(1))
    assert events == [(h2core.GOAWAY, 2, 5)]
    assert c.send(c.headers(3)) == []
    assert Client().fails(frame(7, 0, 0, bytes(7))) == h2core.FRAME_SIZE_ERROR


def test_our_goaway_refuses_later_streams() -> None:
    c = Client()
    c.send(c.headers(1))
    c.s.close_connection(h2core.NO_ERROR, last_stream_id=1)
    assert frames(c.s.data_to_send())[0][0] == 7
    assert c.send(c.headers(3)) == [(h2core.RESET, 3, h2core.REFUSED_STREAM, False)]
    assert c.resets() == [(3, h2core.REFUSED_STREAM)]
    c.s.send_headers(1, [(b":status", b"200")], True)  # stream 1 still finishes
    assert c.out()[0][:3] == (1, 0x5, 1)


# ------------------------------------------------------------------------- WINDOW_UPDATE
def test_window_update_rules() -> None:
    c = Client()
    c.send(c.headers(1))
    events = c.send(frame(8, 0, 1, struct.pack(">L", 0)))
    assert events == [(h2core.RESET, 1, h2core.PROTOCOL_ERROR, False)]  # a stream error
    assert c.resets() == [(1, h2core.PROTOCOL_ERROR)]
    assert Client().fails(frame(8, 0, 0, struct.pack(">L", 0))) == h2core.PROTOCOL_ERROR
    big = struct.pack(">L", 2**31 - 65535)
    assert Client().fails(frame(8, 0, 0, big)) == h2core.FLOW_CONTROL_ERROR
    c = Client()
    c.send(c.headers(1))
    assert c.send(frame(8, 0, 1, big)) == [(h2core.RESET, 1, h2core.FLOW_CONTROL_ERROR, False)]
    assert c.resets() == [(1, h2core.FLOW_CONTROL_ERROR)]
    assert Client().fails(frame(8, 0, 9, struct.pack(">L", 1))) == h2core.PROTOCOL_ERROR  # idle
    assert Client().fails(frame(8, 0, 0, bytes(5))) == h2core.FRAME_SIZE_ERROR
    c = Client()
    assert c.send(frame(8, 0, 0, struct.pack(">L", 1000))) == [(h2core.WINDOW, 0)]
    assert c.s.out_window == 65535 + 1000


# ------------------------------------------------------------------------- HEADERS
def test_headers_padded_and_with_priority() -> None:
    c = Client()
    block = c.block()
    payload = bytes([3]) + struct.pack(">LB", 0x80000000 | 0, 15) + block + b"\0\0\0"
    events = c.send(frame(1, 0x4 | 0x1 | 0x8 | 0x20, 1, payload))
    assert events == [(h2core.REQUEST, 1, REQ, True)]
    c = Client()
    payload = bytes([200]) + c.block()
    assert c.fails(frame(1, 0x5 | 0x8, 1, payload)) == h2core.PROTOCOL_ERROR
    assert Client().fails(frame(1, 0x5 | 0x20, 1, b"\0\0")) == h2core.FRAME_SIZE_ERROR


def test_continuation_joins_and_nothing_may_interleave() -> None:
    c = Client()
    block = c.block()
    events = c.send(frame(1, 0x1, 1, block[:3]) + frame(9, 0, 1, block[3:5]))
    assert events == []
    assert c.send(frame(9, 0x4, 1, block[5:])) == [(h2core.REQUEST, 1, REQ, True)]
    c = Client()
    block = c.block()
    data = frame(1, 0x1, 1, block[:3]) + frame(6, 0, 0, bytes(8))
    assert c.fails(data) == h2core.PROTOCOL_ERROR
    c = Client()
    data = frame(1, 0x1, 1, c.block()[:3]) + frame(9, 0x4, 3, b"")
    assert c.fails(data) == h2core.PROTOCOL_ERROR  # another stream's CONTINUATION
    assert Client().fails(frame(9, 0x4, 1, b"")) == h2core.PROTOCOL_ERROR  # naked


def test_continuation_count_is_bounded() -> None:
    """CVE-2024-27316 class: a header block of more than 64 frames ends the connection (h2's
    bound); 64 are fine."""
    c = Client()
    block = c.block()
    data = frame(1, 0x1, 1, block) + frame(9, 0, 1, b"") * 62 + frame(9, 0x4, 1, b"")
    assert c.send(data) == [(h2core.REQUEST, 1, REQ, True)]
    c = Client()
    data = frame(1, 0x1, 1, c.block()) + frame(9, 0, 1, b"") * 64
    assert c.fails(data) == h2core.PROTOCOL_ERROR


def test_trailers_end_the_stream_and_need_end_stream() -> None:
    c = Client()
    c.send(c.headers(1, end=False))
    events = c.send(frame(0, 0, 1, b"abc") + c.headers(1, [(b"x-t", b"1")]))
    assert events == [(h2core.DATA, 1, b"abc", 3, False), (h2core.TRAILERS, 1, [(b"x-t", b"1")])]
    c = Client()
    c.send(c.headers(1, end=False))
    assert c.fails(c.headers(1, [(b"x-t", b"1")], end=False)) == h2core.PROTOCOL_ERROR


def test_headers_on_a_half_closed_remote_stream_is_stream_closed() -> None:
    c = Client()
    c.send(c.headers(1))
    events = c.send(c.headers(1, [(b"x-t", b"1")]))
    assert events == [(h2core.RESET, 1, h2core.STREAM_CLOSED, False)]
    assert c.resets() == [(1, h2core.STREAM_CLOSED)]


# ------------------------------------------------------------------------- PRIORITY, RST_STREAM
def test_priority_rules() -> None:
    c = Client()
    assert c.send(frame(2, 0, 5, struct.pack(">LB", 1, 0))) == [(h2core.PRIORITY, 5)]  # idle
    assert c.out() == []
    c.send(c.headers(1, end=False))
    events = c.send(frame(2, 0, 1, struct.pack(">LB", 1, 0)))  # depends on itself
    assert events == [(h2core.RESET, 1, h2core.PROTOCOL_ERROR, False)]
    assert c.resets() == [(1, h2core.PROTOCOL_ERROR)]
    c.send(frame(6, 0, 0, bytes(8)))  # the connection goes on
    assert c.out() == [(6, 1, 0, bytes(8))]
    assert Client().fails(frame(2, 0, 3, struct.pack(">LB", 3, 0))) == h2core.PROTOCOL_ERROR  # idle
    assert Client().fails(frame(2, 0, 1, bytes(4))) == h2core.FRAME_SIZE_ERROR
    assert Client().fails(frame(2, 0, 0, bytes(5))) == h2core.PROTOCOL_ERROR
    c = Client()  # a HEADERS frame that makes its stream depend on itself
    payload = struct.pack(">LB", 3, 0) + c.block()
    assert c.send(frame(1, 0x25, 3, payload)) == [(h2core.RESET, 3, h2core.PROTOCOL_ERROR, False)]
    assert c.resets() == [(3, h2core.PROTOCOL_ERROR)]


def test_rst_stream_rules() -> None:
    assert Client().fails(frame(3, 0, 1, bytes(4))) == h2core.PROTOCOL_ERROR  # idle
    assert Client().fails(frame(3, 0, 0, bytes(4))) == h2core.PROTOCOL_ERROR
    assert Client().fails(frame(3, 0, 1, bytes(3))) == h2core.FRAME_SIZE_ERROR
    c = Client()
    c.send(c.headers(1))
    assert c.send(frame(3, 0, 1, struct.pack(">L", 8))) == [(h2core.RESET, 1, 8, True)]
    assert c.send(frame(3, 0, 1, struct.pack(">L", 8))) == []  # closed: ignored
    assert c.out() == []
    with pytest.raises(StreamGone):
        c.s.send_headers(1, [(b":status", b"200")], True)


# ------------------------------------------------------------------------- DATA
def test_data_padding_counts_against_flow_control() -> None:
    c = Client()
    c.send(c.headers(1, end=False))
    events = c.send(frame(0, 0x8, 1, bytes([4]) + b"ab" + bytes(4)))
    assert events == [(h2core.DATA, 1, b"ab", 7, False)]
    assert c.s.in_window == 65535 - 7 and c.s.streams[1].in_window == 65535 - 7
    assert c.fails(frame(0, 0x8, 1, bytes([6]) + bytes(5))) == h2core.PROTOCOL_ERROR


def test_data_beyond_the_window_fails() -> None:
    c = Client(initial_window=100)
    c.send(c.headers(1, end=False))
    c.send(frame(0, 0, 1, bytes(100)))
    assert c.fails(frame(0, 0, 1, b"x")) == h2core.FLOW_CONTROL_ERROR
    c = Client(initial_window=1 << 20)
    c.send(c.headers(1, end=False))
    for _ in range(3):
        c.send(frame(0, 0, 1, bytes(16384)))
    c.send(frame(0, 0, 1, bytes(65535 - 3 * 16384)))
    assert c.fails(frame(0, 0, 1, b"x")) == h2core.FLOW_CONTROL_ERROR  # the connection's


def test_data_on_half_closed_closed_and_idle_streams() -> None:
    c = Client()
    c.send(c.headers(1))  # END_STREAM: half-closed (remote)
    events = c.send(frame(0, 0, 1, b"abc"))
    assert events == [(h2core.RESET, 1, h2core.STREAM_CLOSED, False)]
    assert c.resets() == [(1, h2core.STREAM_CLOSED)]
    c = Client()
    c.send(c.headers(1))
    c.s.send_headers(1, [(b":status", b"204")], True)  # closed by END_STREAM both ways
    c.out()
    assert c.send(frame(0, 0, 1, b"abc")) == [(h2core.RESET, 1, h2core.STREAM_CLOSED, False)]
    assert c.resets() == [(1, h2core.STREAM_CLOSED)]
    assert Client().fails(frame(0, 0, 1, b"abc")) == h2core.PROTOCOL_ERROR
    assert Client().fails(frame(0, 0, 0, b"abc")) == h2core.PROTOCOL_ERROR


def test_content_length_mismatch_is_a_stream_error() -> None:
    fields = [*REQ, (b"content-length", b"3")]
    c = Client()
    c.send(c.headers(1, fields, end=False))
    events = c.send(frame(0, 0, 1, b"abcd"))
    assert events == [(h2core.RESET, 1, h2core.PROTOCOL_ERROR, False)]
    assert c.resets() == [(1, h2core.PROTOCOL_ERROR)]
    c = Client()
    c.send(c.headers(1, fields, end=False))
    assert c.send(frame(0, 1, 1, b"ab")) == [(h2core.RESET, 1, h2core.PROTOCOL_ERROR, False)]
    c = Client()
    c.send(c.headers(1, fields, end=False))
    assert c.send(frame(0, 1, 1, b"abc")) == [(h2core.DATA, 1, b"abc", 3, True)]
    c = Client()
    c.send(c.headers(1, fields, end=False))
    assert c.send(c.headers(1, [(b"x-t", b"1")])) == [
        (h2core.RESET, 1, h2core.PROTOCOL_ERROR, False)
    ]
    bad = [*REQ, (b"content-length", b"x")]
    c = Client()
    assert c.fails(c.headers(1, bad)) == h2core.PROTOCOL_ERROR  # as h2


def test_acknowledged_data_reopens_windows_as_h2_does() -> None:
    c = Client(initial_window=1000)
    c.send(c.headers(1, end=False))
    c.send(frame(0, 0, 1, bytes(400)))
    c.s.acknowledge_received_data(400, 1)
    assert c.out() == []  # less than half of either window
    c.send(frame(0, 0, 1, bytes(200)))
    c.s.acknowledge_received_data(200, 1)
    assert c.out() == [(8, 0, 1, struct.pack(">L", 600))]  # half the stream's window
    c = Client(initial_window=1 << 20)
    c.send(c.headers(1, end=False))
    c.send(frame(0, 0, 1, bytes(16384)) + frame(0, 0, 1, bytes(16382)))
    c.s.acknowledge_received_data(32766, 1)
    assert c.out() == []
    c.send(frame(0, 0, 1, b"x"))
    c.s.acknowledge_received_data(1, 1)
    assert c.out() == [(8, 0, 0, struct.pack(">L", 32767))]  # half the connection's window


# ------------------------------------------------------------------------- frames
def test_push_promise_unknown_and_oversized_frames() -> None:
    c = Client()
    assert c.fails(frame(5, 0x4, 1, struct.pack(">L", 2))) == h2core.PROTOCOL_ERROR
    c = Client()
    assert c.send(frame(0x20, 0xFF, 7, b"whatever")) == []  # unknown: ignored
    assert c.out() == []
    c = Client()
    big = struct.pack(">HBBBL", 16385 >> 8, 16385 & 0xFF, 0, 0, 1)  # the header is enough
    assert c.fails(big) == h2core.FRAME_SIZE_ERROR


def test_stream_ids() -> None:
    c = Client()
    assert c.fails(c.headers(2)) == h2core.PROTOCOL_ERROR  # even
    c = Client()
    c.send(c.headers(5))
    assert c.fails(c.headers(3)) == h2core.PROTOCOL_ERROR  # lower than the highest, never seen
    c = Client()
    c.send(c.headers(1))
    c.s.send_headers(1, [(b":status", b"204")], True)
    c.out()
    assert c.fails(c.headers(1)) == h2core.STREAM_CLOSED  # closed by END_STREAM: as h2
    c = Client()
    c.send(c.headers(1))
    c.s.reset_stream(1, h2core.CANCEL)
    c.out()
    # closed by RST_STREAM: a stream error, reported so web/http2.py counts it
    assert c.send(c.headers(1)) == [(h2core.RESET, 1, h2core.STREAM_CLOSED, False)]
    assert c.resets() == [(1, h2core.STREAM_CLOSED)]
    assert Client().fails(frame(1, 0x5, 0, b"")) == h2core.PROTOCOL_ERROR


def test_max_concurrent_streams_as_h2() -> None:
    c = Client(max_concurrent_streams=2)
    c.send(c.headers(1) + c.headers(3))
    c.s.send_headers(1, [(b":status", b"204")], True)
    assert c.send(c.headers(5))  # one closed: room for another
    assert c.fails(c.headers(7)) == h2core.PROTOCOL_ERROR


# ------------------------------------------------------------------------- HPACK
def test_hpack_errors() -> None:
    c = Client()
    assert c.fails(frame(1, 0x5, 1, b"\xff\xff\xff\xff")) == h2core.COMPRESSION_ERROR
    c = Client()
    update = hpack.hpack.encode_integer(8192, 5)
    update[0] |= 0x20  # RFC 7541 §6.3: a table size update beyond our SETTINGS
    assert c.fails(frame(1, 0x5, 1, bytes(update) + c.block())) == h2core.COMPRESSION_ERROR
    c = Client()
    huge = [*REQ, *((b"x-%d" % i, b"v" * 1000) for i in range(70))]
    block = c.block(huge)
    data = frame(1, 0x1, 1, block[:16000])
    for i in range(16000, len(block), 16000):
        last = 0x4 if i + 16000 >= len(block) else 0
        data += frame(9, last, 1, block[i : i + 16000])
    assert c.fails(data) == h2core.ENHANCE_YOUR_CALM  # as h2: over 64 KiB decoded


def _last_field(events: list[tuple[object, ...]]) -> object:
    fields = events[0][2]
    assert isinstance(fields, list)
    return fields[-1]


def test_decode_cache_follows_the_dynamic_table() -> None:
    """A block whose decoding left the dynamic table alone is decoded once, until the table
    changes: index 62 means another field after that, or nothing after a size update."""
    c = Client()
    first = c.block([*REQ, (b"x-a", b"1")])  # x-a: 1 becomes index 62
    assert _last_field(c.send(frame(1, 0x5, 1, first))) == (b"x-a", b"1")
    indexed = bytes([0x82, 0x87, 0x84, 0x80 | 63, 0x80 | 62])  # GET https / :authority, 62
    assert _last_field(c.send(frame(1, 0x5, 3, indexed))) == (b"x-a", b"1")
    second = c.block([*REQ, (b"x-b", b"2")])  # x-b: 2 is now 62
    assert _last_field(c.send(frame(1, 0x5, 5, second))) == (b"x-b", b"2")
    assert _last_field(c.send(frame(1, 0x5, 7, indexed))) == (b"x-b", b"2")
    assert _last_field(c.send(frame(1, 0x5, 9, indexed))) == (b"x-b", b"2")  # from the cache
    resize = bytes([0x20, 0x3F, 0xE1, 0x1F])  # RFC 7541 §6.3: to 0, then back to 4096
    c.send(frame(1, 0x5, 11, resize + bytes([0x82, 0x87, 0x84, 0x01, 6]) + b"a.test"))
    assert c.fails(frame(1, 0x5, 13, indexed)) == h2core.COMPRESSION_ERROR  # 62 is gone


# ------------------------------------------------------------------------- sending
def test_outbound_frames_split_at_the_peer_max_frame_size_and_windows_are_exact() -> None:
    c = Client()
    c.send(settings_frame(max_frame_size=16384, initial_window_size=40000))
    c.send(frame(8, 0, 0, struct.pack(">L", 100000)))
    c.send(c.headers(1))
    c.out()
    c.s.send_headers(1, [(b":status", b"200"), (b"x-big", b"v" * 40000)], False)
    got = c.out()
    assert [(t, f) for t, f, _, _ in got] == [(1, 0), (9, 0), (9, 4)]
    assert max(len(p) for *_, p in got) == 16384
    assert c.s.window(1) == 40000
    c.s.send_data(1, bytes(35000))
    got = c.out()
    assert [len(p) for *_, p in got] == [16384, 16384, 35000 - 32768]
    assert c.s.window(1) == 5000
    with pytest.raises(StreamGone):
        c.s.send_data(1, bytes(5001))
    c.s.send_data(1, bytes(5000), end_stream=True)
    assert c.out() == [(0, 1, 1, bytes(5000))]
    assert c.s.out_window == 65535 + 100000 - 40000
    c.send(c.headers(3))
    assert c.s.window(3) == 40000  # the stream's window is the smaller now
    c.send(frame(8, 0, 3, struct.pack(">L", 100000)))
    assert c.s.window(3) == 65535 + 100000 - 40000  # now the connection's


def test_header_list_size_is_left_to_the_caller_below_64k() -> None:
    """As h2: lists over our advertised MAX_HEADER_LIST_SIZE but under the decoder's 64 KiB
    reach the caller (web/http2.py answers them 431)."""
    c = Client(max_header_list_size=100)
    fields = [*REQ, (b"x-long", b"v" * 500)]
    assert c.send(c.headers(1, fields)) == [(h2core.REQUEST, 1, fields, True)]


# ------------------------------------------------------------------------- request fields
_REQUEST = HeaderValidationFlags(
    is_client=False, is_trailer=False, is_response_header=False, is_push_promise=False
)
_TRAILERS = _REQUEST._replace(is_trailer=True)


def _h2_error(fields: list[tuple[bytes, bytes]], trailer: bool) -> bool:
    """What h2 did with a received header list: cookies joined, then validated."""
    flags = _TRAILERS if trailer else _REQUEST
    try:
        for _ in validate_headers(normalize_inbound_headers(fields, flags), flags):
            pass
    except h2.exceptions.ProtocolError:
        return True
    return False


_NAMES = st.sampled_from(
    [
        b":method", b":scheme", b":path", b":authority", b":status", b":protocol", b":x", b":",
        b"host", b"te", b"connection", b"upgrade", b"keep-alive", b"proxy-connection",
        b"transfer-encoding", b"x-a", b"X-A", b"a b", b"", b"a:b", b"\x7f", b"content-length",
        b"cookie", b"cookie",
    ]
)  # fmt: skip
_VALUES = st.sampled_from(
    [
        b"GET", b"CONNECT", b"https", b"/", b"", b"a.test", b"b.test", b"trailers", b"TraiLers",
        b"gzip", b" x", b"x\t", b"a\r\nb", b"a\0", b"200", b"websocket", b"1",
    ]
)  # fmt: skip


def _request_like() -> st.SearchStrategy[list[tuple[bytes, bytes]]]:
    base = st.sampled_from(
        [
            [],
            REQ,
            [(b":method", b"CONNECT"), (b":authority", b"a.test")],
            [(b":method", b"CONNECT"), (b":protocol", b"websocket"), *REQ[1:]],
        ]
    )
    extra = st.lists(st.tuples(_NAMES, _VALUES), max_size=5)
    return st.builds(
        lambda b, e, i: [*b[:i], *e, *b[i:]], base, extra, st.integers(0, 4)
    ) | st.builds(lambda b, e: [*b, *e], base, extra)


@settings(max_examples=3000, deadline=None)
@given(_request_like(), st.booleans())
def test_field_error_agrees_with_h2(fields: list[tuple[bytes, bytes]], trailer: bool) -> None:
    got = field_error(join_cookies(fields), trailer) is not None
    assert got == _h2_error(fields, trailer), fields


def test_split_cookies_are_joined_last_as_h2_did() -> None:
    fields = [*REQ, (b"cookie", b"a=1"), (b"x-a", b"1"), (b"cookie", b"b=2")]
    want = list(normalize_inbound_headers(fields, _REQUEST))
    assert join_cookies(fields) == want == [*REQ, (b"x-a", b"1"), (b"cookie", b"a=1; b=2")]
    assert join_cookies(REQ) is REQ


def test_field_error_examples() -> None:
    assert field_error(REQ, False) is None
    assert field_error([*REQ, (b"host", b"a.test")], False) is None
    assert field_error([*REQ, (b"host", b"b.test")], False) is not None
    assert field_error([*REQ, (b"te", b"trailers")], False) is None
    assert field_error([*REQ, (b"te", b"gzip")], False) is not None
    assert field_error([(b"x-a", b"1"), *REQ], False) is not None
    assert field_error([(b"x-t", b"1")], True) is None
    assert field_error([(b":path", b"/")], True) is not None


def test_any_buffer_and_any_chunking_read_the_same() -> None:
    c = Client()
    c.send(frame(8, 0, 0, struct.pack(">L", 1000)))
    data = c.headers(1, end=False) + frame(0, 0x8, 1, bytes([1]) + b"abc" + b"\0")
    data += frame(0, 1, 1, b"de") + frame(6, 0, 0, b"pingpong")
    whole = Client()
    whole.send(frame(8, 0, 0, struct.pack(">L", 1000)))
    want = whole.send(data)
    assert want[0][:2] == (h2core.REQUEST, 1) and len(want) == 4
    for step in (1, 2, 7, 10):
        c = Client()
        c.send(frame(8, 0, 0, struct.pack(">L", 1000)))
        got = []
        for i in range(0, len(data), step):
            got += c.send(memoryview(bytearray(data[i : i + step])))  # type: ignore[arg-type]
        assert got == want, step
