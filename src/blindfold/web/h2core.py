"""Server side of an HTTP/2 connection (RFC 9113), sans-IO: bytes in, tuple events out, bytes
to send accumulated in `out`. HPACK is the maintained `hpack` library's Decoder/Encoder.

Why not h2 (which drove web/http2.py before): on a keep-alive 2 KB cache hit, h2's receive path
(hyperframe Frame objects, its stream and connection state machines, event objects, header
validation generators) measured ~54% of the edge worker's CPU (issue 19). Here frames are
parsed with struct straight from the read, events are plain tuples and a stream is one slotted
object; nothing is allocated per frame on the hot path.

Behaviour follows h2 4.4 (the library this replaces) where a client can observe it, except
where RFC 9113 makes h2 wrong; each such place says so in a comment ("h2: ...").

Events (tuples, first item the kind):
  (REQUEST, sid, headers, end_stream)        a request's header section
  (DATA, sid, data, flow_controlled_len, end_stream)
  (TRAILERS, sid, headers)                   a trailer section (the stream's end)
  (RESET, sid, error_code, by_peer)          the stream is gone (by_peer: the client's RST_STREAM)
  (WINDOW, sid)                              WINDOW_UPDATE (sid 0: the connection's)
  (SETTINGS, 0) / (PING, 0) / (PRIORITY, sid)
  (GOAWAY, error_code, last_stream_id)
A connection error raises `ConnectionFailed` with the GOAWAY already in `out`.
"""

from __future__ import annotations

import re
import struct

from hpack import Decoder, Encoder
from hpack.exceptions import HPACKError, OversizedHeaderListError
from hpack.table import HeaderTable

from blindfold.errors import ProtocolError

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# frame types (RFC 9113 §6)
F_DATA, F_HEADERS, F_PRIORITY, F_RST_STREAM, F_SETTINGS = 0, 1, 2, 3, 4
F_PUSH_PROMISE, F_PING, F_GOAWAY, F_WINDOW_UPDATE, F_CONTINUATION = 5, 6, 7, 8, 9
# flags
FLAG_END_STREAM = FLAG_ACK = 0x1
FLAG_END_HEADERS = 0x4
FLAG_PADDED = 0x8
FLAG_PRIORITY = 0x20
# error codes (RFC 9113 §7)
NO_ERROR = 0x0
PROTOCOL_ERROR = 0x1
INTERNAL_ERROR = 0x2
FLOW_CONTROL_ERROR = 0x3
STREAM_CLOSED = 0x5
FRAME_SIZE_ERROR = 0x6
REFUSED_STREAM = 0x7
CANCEL = 0x8
COMPRESSION_ERROR = 0x9
ENHANCE_YOUR_CALM = 0xB
# settings (RFC 9113 §6.5.2, RFC 8441 §3)
S_HEADER_TABLE_SIZE, S_ENABLE_PUSH, S_MAX_CONCURRENT_STREAMS = 1, 2, 3
S_INITIAL_WINDOW_SIZE, S_MAX_FRAME_SIZE, S_MAX_HEADER_LIST_SIZE = 4, 5, 6
S_ENABLE_CONNECT_PROTOCOL = 8

# event kinds
REQUEST, DATA, TRAILERS, RESET, WINDOW, SETTINGS, PING, PRIORITY, GOAWAY = range(1, 10)
# the decoded-header cache: blocks up to this size, this many bytes per connection
DECODE_CACHE_BLOCK, DECODE_CACHE_BYTES = 512, 16384
# the HPACK table our encoder keeps, whatever larger size the client allows
ENCODER_TABLE_MAX = 4096

MAX_WINDOW = 2**31 - 1
# h2's limits, kept: the HPACK decoder's list size (h2.connection DEFAULT_MAX_HEADER_LIST_SIZE)
# and CONTINUATION frames per header block (h2.frame_buffer CONTINUATION_BACKLOG: a block of
# more than 64 frames, CVE-2024-27316 class, is a connection error)
DECODER_MAX_HEADER_LIST_SIZE = 2**16
MAX_HEADER_FRAMES = 64
MAX_CLOSED_STREAMS = 2**16  # as h2: how many closed streams' endings are remembered

_HEAD = struct.Struct(">HBBBL")  # 24-bit length as 16 + 8, type, flags, stream id
_U32 = struct.Struct(">L")
_GOAWAY = struct.Struct(">LL")
_SETTING = struct.Struct(">HL")

_CLOSED_BY_END, _CLOSED_BY_RESET = 1, 2


class ConnectionFailed(ProtocolError):
    """A connection error (RFC 9113 §5.4.1): GOAWAY with `code` is queued, nothing more is
    read."""

    def __init__(self, code: int, detail: str) -> None:
        super().__init__("h2_connection_error", detail)
        self.code = code


class _CountingTable(HeaderTable):
    """The decoder's dynamic table, counting its changes (RFC 7541 §4: an entry added, the
    size changed): a block decoded without a change decodes the same while the count stays."""

    generation = 0

    def add(self, name: bytes, value: bytes) -> None:
        self.generation += 1
        super().add(name, value)

    @property
    def maxsize(self) -> int:
        return self._maxsize

    @maxsize.setter
    def maxsize(self, newmax: int) -> None:
        self.generation += 1
        HeaderTable.maxsize.fset(self, newmax)  # type: ignore[attr-defined]


class StreamGone(ConnectionError):
    """A send on a stream that is closed (or closed for sending)."""


def _frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return _HEAD.pack(n >> 8, n & 0xFF, ftype, flags, sid) + payload


class _Stream:
    __slots__ = (
        "expected",
        "in_max",
        "in_processed",
        "in_window",
        "local_open",
        "out_window",
        "received",
        "remote_open",
    )

    def __init__(self, out_window: int, in_window: int) -> None:
        self.out_window = out_window
        self.in_window = in_window
        self.in_max = in_window
        self.in_processed = 0
        self.remote_open = True
        self.local_open = True
        self.expected: int | None = None  # Content-Length, if the request had one
        self.received = 0


def _grant(max_size: int, current: int, processed: int) -> int | None:
    """h2.windows.WindowManager._maybe_update_window: how far to reopen a window once
    `processed` bytes were consumed (None: not yet; then `processed` starts again from 0)."""
    if (current == 0 and processed > min(1024, max_size // 4)) or processed >= max_size // 2:
        return min(processed, max_size - current)
    return None


class H2Server:
    """One server connection. `receive(data)` returns events; the send methods append frames
    to `out` (take them with `data_to_send()`)."""

    def __init__(
        self,
        *,
        max_concurrent_streams: int = 100,
        initial_window: int = 65535,
        max_header_list_size: int = 16384,
        header_table_size: int = 4096,
        max_frame_size: int = 16384,
    ) -> None:
        self.local_settings = {
            S_HEADER_TABLE_SIZE: header_table_size,
            S_ENABLE_PUSH: 0,
            S_MAX_CONCURRENT_STREAMS: max_concurrent_streams,
            S_INITIAL_WINDOW_SIZE: initial_window,
            S_MAX_FRAME_SIZE: max_frame_size,
            S_MAX_HEADER_LIST_SIZE: max_header_list_size,
        }
        self.max_concurrent_streams = max_concurrent_streams
        self.initial_window = initial_window
        self.max_inbound_frame_size = max_frame_size
        self.decoder = Decoder(DECODER_MAX_HEADER_LIST_SIZE)
        self._table = self.decoder.header_table = _CountingTable()
        self.decoder.max_allowed_table_size = header_table_size
        self.encoder = Encoder()
        self.out = bytearray()
        self.streams: dict[int, _Stream] = {}
        self.closed_streams: dict[int, int] = {}
        self.highest_inbound = 0
        # the peer's settings
        self.out_initial_window = 65535
        self.max_outbound_frame_size = 16384
        # connection windows
        self.out_window = 65535
        self.in_window = 65535
        self.in_max = 65535
        self.in_processed = 0
        self.goaway_last: int | None = None  # last_stream_id of the GOAWAY we sent
        self.failed = False
        self.peer_gone = False
        self._buf = bytearray()
        self._preface = PREFACE
        # an unfinished header block: (stream id, HEADERS flags, fragments)
        self._block: tuple[int, int, list[bytes], tuple[int, int] | None] | None = None
        # header blocks whose decoding left the dynamic table alone (indexed fields, literals
        # without indexing: a client's repeated request), by block: they decode the same while
        # the table's generation is the one they were decoded in
        self._decoded: dict[bytes, tuple[int, list[tuple[bytes, bytes]]]] = {}
        self._decoded_bytes = 0

    # ------------------------------------------------------------------ setup
    def initiate(self, connection_window: int | None = None) -> None:
        """Our SETTINGS (RFC 9113 §3.4), and a connection window opened to
        `connection_window` when it is larger than the default."""
        payload = b"".join(_SETTING.pack(k, v) for k, v in sorted(self.local_settings.items()))
        self.out += _frame(F_SETTINGS, 0, 0, payload)
        if connection_window is not None and connection_window > self.in_window:
            extra = connection_window - self.in_window
            self.in_window += extra
            self.in_max = max(self.in_max, self.in_window)
            self.out += _frame(F_WINDOW_UPDATE, 0, 0, _U32.pack(extra))

    def data_to_send(self) -> bytes:
        data = bytes(self.out)
        self.out.clear()
        return data

    # ------------------------------------------------------------------ receiving
    def receive(self, data: bytes) -> list[tuple[object, ...]]:
        if self.failed or self.peer_gone:
            return []
        if type(data) is not bytes:
            data = bytes(data)  # payloads become events and cache keys: immutable bytes
        if self._preface:
            n = min(len(data), len(self._preface))
            if data[:n] != self._preface[:n]:
                self._fail(PROTOCOL_ERROR, "Invalid HTTP/2 preamble.")
            self._preface = self._preface[n:]
            data = data[n:]
        if self._buf:
            self._buf += data
            data = bytes(self._buf)
            self._buf.clear()
        events: list[tuple[object, ...]] = []
        pos = 0
        end = len(data)
        unpack = _HEAD.unpack_from
        while end - pos >= 9:
            hi, lo, ftype, flags, sid = unpack(data, pos)
            length = hi << 8 | lo
            sid &= 0x7FFFFFFF
            if length > self.max_inbound_frame_size:
                # RFC 9113 §4.2 (h2 reads the whole frame first; refused as soon as the
                # header says so here, so that no more than a frame is ever buffered)
                self._fail(FRAME_SIZE_ERROR, f"frame of {length} bytes")
            if end - pos - 9 < length:
                break
            payload = data[pos + 9 : pos + 9 + length]
            pos += 9 + length
            if self._block is not None:
                self._continuation(events, ftype, flags, sid, payload)
            elif ftype == F_HEADERS:
                self._headers(events, flags, sid, payload)
            elif ftype == F_DATA:
                self._data(events, flags, sid, payload)
            elif ftype == F_WINDOW_UPDATE:
                self._window_update(events, sid, payload)
            elif ftype == F_RST_STREAM:
                self._rst_stream(events, sid, payload)
            elif ftype == F_SETTINGS:
                self._settings(events, flags, sid, payload)
            elif ftype == F_PING:
                self._ping(events, flags, sid, payload)
            elif ftype == F_PRIORITY:
                self._priority(events, sid, payload)
            elif ftype == F_GOAWAY:
                if sid:
                    self._fail(PROTOCOL_ERROR, "GOAWAY on a stream")
                if length < 8:
                    self._fail(FRAME_SIZE_ERROR, "short GOAWAY")
                last, code = _GOAWAY.unpack_from(payload)
                self.peer_gone = True
                events.append((GOAWAY, code, last & 0x7FFFFFFF))
                return events
            elif ftype == F_PUSH_PROMISE:
                # RFC 9113 §8.4: a client cannot push (we advertise ENABLE_PUSH 0)
                self._fail(PROTOCOL_ERROR, "PUSH_PROMISE from a client")
            elif ftype == F_CONTINUATION:
                self._fail(PROTOCOL_ERROR, "CONTINUATION without HEADERS")
            # unknown frame types are ignored (RFC 9113 §5.5)
        if pos < end:
            self._buf += data[pos:]
        return events

    def _fail(self, code: int, detail: str) -> None:
        """A connection error: GOAWAY, then nothing more is read (raises)."""
        if not self.failed:
            self.failed = True
            self.out += _frame(F_GOAWAY, 0, 0, _GOAWAY.pack(self.highest_inbound, code))
        raise ConnectionFailed(code, detail)

    def _stream_error(self, events: list[tuple[object, ...]], sid: int, code: int) -> None:
        """RFC 9113 §5.4.2: RST_STREAM; the stream, if open, ends (a RESET event)."""
        self.out += _frame(F_RST_STREAM, 0, sid, _U32.pack(code))
        self.streams.pop(sid, None)
        # an event whether or not the stream was open: every RST_STREAM the client's frames
        # cost us is counted by web/http2.py against its abuse limits (atk-h2)
        events.append((RESET, sid, code, False))
        self._remember(sid, _CLOSED_BY_RESET)

    def _remember(self, sid: int, how: int) -> None:
        closed = self.closed_streams
        closed[sid] = how
        if len(closed) > MAX_CLOSED_STREAMS:
            del closed[next(iter(closed))]

    def _is_idle(self, sid: int) -> bool:
        # even ids are ours (pushes), and we never open one
        return sid > self.highest_inbound or not sid & 1

    # HEADERS / CONTINUATION ----------------------------------------------------------
    def _headers(self, events: list[tuple[object, ...]], flags: int, sid: int, p: bytes) -> None:
        if not sid:
            self._fail(PROTOCOL_ERROR, "HEADERS on stream 0")
        start = 0
        stop = len(p)
        pad = 0
        if flags & FLAG_PADDED:
            if not p:
                self._fail(FRAME_SIZE_ERROR, "HEADERS too short for its padding")
            pad = p[0]
            start = 1
        priority: tuple[int, int] | None = None
        if flags & FLAG_PRIORITY:
            if stop - start < 5:
                self._fail(FRAME_SIZE_ERROR, "HEADERS too short for its priority")
            dep = _U32.unpack_from(p, start)[0] & 0x7FFFFFFF
            priority = (dep, p[start + 4])
            start += 5
        if pad and (pad >= stop or start + pad > stop):
            self._fail(PROTOCOL_ERROR, "padding longer than the frame")  # RFC 9113 §6.2
        fragment = p[start : stop - pad]
        if flags & FLAG_END_HEADERS:
            self._header_block(events, sid, flags, fragment, priority)
        else:
            self._block = (sid, flags, [fragment], priority)

    def _continuation(
        self, events: list[tuple[object, ...]], ftype: int, flags: int, sid: int, p: bytes
    ) -> None:
        assert self._block is not None
        bsid, bflags, fragments, priority = self._block
        if ftype != F_CONTINUATION or sid != bsid:
            # RFC 9113 §6.10: nothing may come between a header block's frames
            self._fail(PROTOCOL_ERROR, "Invalid frame during header block.")
        fragments.append(p)
        if len(fragments) > MAX_HEADER_FRAMES:
            self._fail(PROTOCOL_ERROR, "Too many continuation frames received.")
        if flags & FLAG_END_HEADERS:
            self._block = None
            self._header_block(events, sid, bflags, b"".join(fragments), priority)

    def _decode(self, block: bytes) -> list[tuple[bytes, bytes]]:
        table = self._table
        generation = table.generation
        hit = self._decoded.get(block)
        if hit is not None and hit[0] == generation:
            return hit[1]
        try:
            headers: list[tuple[bytes, bytes]] = self.decoder.decode(block, raw=True)  # type: ignore[assignment]
        except OversizedHeaderListError as exc:
            # as h2 (DenialOfServiceError): an HPACK bomb
            self._fail(ENHANCE_YOUR_CALM, f"Oversized header block: {exc}")
            raise  # unreachable
        except (HPACKError, IndexError, TypeError, UnicodeDecodeError, ValueError) as exc:
            # RFC 9113 §4.3: COMPRESSION_ERROR (h2 says PROTOCOL_ERROR)
            self._fail(COMPRESSION_ERROR, f"Error decoding header block: {exc}")
            raise  # unreachable
        if table.generation == generation and len(block) <= DECODE_CACHE_BLOCK:
            # bounded per connection (atk-h2: whole blocks of 64 KB literals held ~8 MB): small
            # blocks only (a repeated real request is < 200 bytes), at most DECODE_CACHE_BYTES
            size = len(block) + sum(len(n) + len(v) + 32 for n, v in headers)
            if len(self._decoded) >= 64 or self._decoded_bytes + size > DECODE_CACHE_BYTES:
                self._decoded.clear()
                self._decoded_bytes = 0
            if size <= DECODE_CACHE_BYTES:
                self._decoded[block] = (generation, headers)
                self._decoded_bytes += size
        return headers

    def _header_block(
        self,
        events: list[tuple[object, ...]],
        sid: int,
        flags: int,
        block: bytes,
        priority: tuple[int, int] | None,
    ) -> None:
        stream = self.streams.get(sid)
        if stream is None and len(self.streams) + 1 > self.max_concurrent_streams:
            # as h2 (TooManyStreamsError): a connection error, checked before decoding.
            # RFC 9113 §5.1.2 asks for a stream error, §5.4.1 lets it be a connection error.
            self._fail(PROTOCOL_ERROR, f"Max inbound streams is {self.max_concurrent_streams}")
        headers = self._decode(block)  # always: the HPACK context must follow every block
        end = bool(flags & FLAG_END_STREAM)
        if stream is None:
            if sid <= self.highest_inbound:
                how = self.closed_streams.get(sid)
                if how == _CLOSED_BY_RESET:
                    self.out += _frame(F_RST_STREAM, 0, sid, _U32.pack(STREAM_CLOSED))
                    events.append((RESET, sid, STREAM_CLOSED, False))  # counted: see _stream_error
                    return
                if how == _CLOSED_BY_END:
                    self._fail(STREAM_CLOSED, f"HEADERS on closed stream {sid}")
                self._fail(PROTOCOL_ERROR, f"stream id {sid} too low")
            if not sid & 1:
                self._fail(PROTOCOL_ERROR, "Invalid stream ID for peer.")
            self.highest_inbound = sid
            if self.goaway_last is not None and sid > self.goaway_last:
                # RFC 9113 §6.8: after our GOAWAY, new streams are refused (retry elsewhere)
                self.out += _frame(F_RST_STREAM, 0, sid, _U32.pack(REFUSED_STREAM))
                self._remember(sid, _CLOSED_BY_RESET)
                events.append((RESET, sid, REFUSED_STREAM, False))  # counted: see _stream_error
                return
            if priority is not None and priority[0] == sid:
                # RFC 9113 §5.3.1: a stream error (h2 ends the connection)
                self._stream_error(events, sid, PROTOCOL_ERROR)
                return
            stream = _Stream(self.out_initial_window, self.initial_window)
            self.streams[sid] = stream
            try:
                stream.expected = _content_length(headers)
            except ConnectionFailed as exc:
                self._fail(exc.code, exc.detail)
            if end:
                stream.remote_open = False
            events.append((REQUEST, sid, headers, end))
            return
        if not stream.remote_open:
            # as h2: HEADERS on a half-closed (remote) stream is a stream error STREAM_CLOSED
            self._stream_error(events, sid, STREAM_CLOSED)
            return
        if priority is not None and priority[0] == sid:
            self._stream_error(events, sid, PROTOCOL_ERROR)
            return
        if not end:
            self._fail(PROTOCOL_ERROR, "Trailers must have END_STREAM set")
        if stream.expected is not None and stream.expected != stream.received:
            # RFC 9113 §8.1.1: a body shorter than its Content-Length (h2 does not check here)
            self._stream_error(events, sid, PROTOCOL_ERROR)
            return
        stream.remote_open = False
        events.append((TRAILERS, sid, headers))
        if not stream.local_open:
            del self.streams[sid]
            self._remember(sid, _CLOSED_BY_END)

    # DATA ------------------------------------------------------------------------------
    def _data(self, events: list[tuple[object, ...]], flags: int, sid: int, p: bytes) -> None:
        if not sid:
            self._fail(PROTOCOL_ERROR, "DATA on stream 0")
        size = len(p)  # RFC 9113 §6.9.1: padding counts against flow control
        data = p
        if flags & FLAG_PADDED:
            if not p:
                self._fail(FRAME_SIZE_ERROR, "DATA too short for its padding")
            pad = p[0]
            if pad and pad >= size:
                self._fail(PROTOCOL_ERROR, "padding longer than the frame")
            data = p[1 : size - pad]
        self.in_window -= size
        if self.in_window < 0:
            self._fail(FLOW_CONTROL_ERROR, "connection window exceeded")
        stream = self.streams.get(sid)
        if stream is None or not stream.remote_open:
            if stream is None and self._is_idle(sid):
                self._fail(PROTOCOL_ERROR, f"DATA on idle stream {sid}")
            # as h2: STREAM_CLOSED for the stream; the bytes still reopen the connection's
            # window (nobody will consume them)
            self._conn_processed(size)
            self._stream_error(events, sid, STREAM_CLOSED)
            return
        stream.in_window -= size
        if stream.in_window < 0:
            self._fail(FLOW_CONTROL_ERROR, f"stream {sid} window exceeded")  # as h2
        stream.received += len(data)
        end = bool(flags & FLAG_END_STREAM)
        expected = stream.expected
        if expected is not None and (
            expected < stream.received or (end and expected != stream.received)
        ):
            # RFC 9113 §8.1.1: a malformed request is a stream error (h2 ends the connection)
            self._conn_processed(size)
            self._stream_error(events, sid, PROTOCOL_ERROR)
            return
        if end:
            stream.remote_open = False
            if not stream.local_open:
                del self.streams[sid]
                self._remember(sid, _CLOSED_BY_END)
        events.append((DATA, sid, data, size, end))

    def _conn_processed(self, size: int) -> None:
        self.in_processed += size
        grant = _grant(self.in_max, self.in_window, self.in_processed)
        if grant is not None:
            self.in_processed = 0
            self.in_window += grant
        if grant:
            self.out += _frame(F_WINDOW_UPDATE, 0, 0, _U32.pack(grant))

    def acknowledge_received_data(self, size: int, sid: int) -> None:
        """The application consumed `size` flow-controlled bytes of stream `sid`: reopen the
        windows as h2 does (h2.windows.WindowManager)."""
        if not size or self.failed:
            return
        self._conn_processed(size)
        stream = self.streams.get(sid)
        if stream is not None and stream.remote_open:
            stream.in_processed += size
            grant = _grant(stream.in_max, stream.in_window, stream.in_processed)
            if grant is not None:
                stream.in_processed = 0
                stream.in_window += grant
            if grant:
                self.out += _frame(F_WINDOW_UPDATE, 0, sid, _U32.pack(grant))

    # control frames ----------------------------------------------------------------
    def _window_update(self, events: list[tuple[object, ...]], sid: int, p: bytes) -> None:
        if len(p) != 4:
            self._fail(FRAME_SIZE_ERROR, "WINDOW_UPDATE of the wrong size")
        inc = _U32.unpack(p)[0] & 0x7FFFFFFF
        if not sid:
            if not inc:
                self._fail(PROTOCOL_ERROR, "WINDOW_UPDATE of 0")  # RFC 9113 §6.9
            self.out_window += inc
            if self.out_window > MAX_WINDOW:
                self._fail(FLOW_CONTROL_ERROR, "connection window over 2^31-1")
            events.append((WINDOW, 0))
            return
        stream = self.streams.get(sid)
        if stream is None:
            if self._is_idle(sid):
                self._fail(PROTOCOL_ERROR, f"WINDOW_UPDATE on idle stream {sid}")
            # closed: ignored (RFC 9113 §5.1), but counted by the caller as a control frame
            events.append((WINDOW, sid))
            return
        if not inc:
            # RFC 9113 §6.9: a stream error on a stream (h2 ends the connection)
            self._stream_error(events, sid, PROTOCOL_ERROR)
            return
        stream.out_window += inc
        if stream.out_window > MAX_WINDOW:
            self._stream_error(events, sid, FLOW_CONTROL_ERROR)  # as h2, RFC 9113 §6.9.1
            return
        events.append((WINDOW, sid))

    def _rst_stream(self, events: list[tuple[object, ...]], sid: int, p: bytes) -> None:
        if len(p) != 4:
            self._fail(FRAME_SIZE_ERROR, "RST_STREAM of the wrong size")
        if not sid:
            self._fail(PROTOCOL_ERROR, "RST_STREAM on stream 0")
        code = _U32.unpack(p)[0]
        if self.streams.pop(sid, None) is not None:
            self._remember(sid, _CLOSED_BY_RESET)
            events.append((RESET, sid, code, True))
        elif self._is_idle(sid):
            # RFC 9113 §6.4: a connection error (h2 ignores it)
            self._fail(PROTOCOL_ERROR, f"RST_STREAM on idle stream {sid}")
        # on a closed stream: ignored (RFC 9113 §5.1)

    def _settings(self, events: list[tuple[object, ...]], flags: int, sid: int, p: bytes) -> None:
        if sid:
            self._fail(PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & FLAG_ACK:
            if p:
                self._fail(FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            return
        if len(p) % 6:
            self._fail(FRAME_SIZE_ERROR, "SETTINGS of the wrong size")
        new: dict[int, int] = {}
        for i in range(0, len(p), 6):
            key, value = _SETTING.unpack_from(p, i)
            new[key] = value
        # validate all, then apply (h2.settings.Settings.validate_received_setting)
        for key, value in new.items():
            if key in (S_ENABLE_PUSH, S_ENABLE_CONNECT_PROTOCOL) and value not in (0, 1):
                self._fail(PROTOCOL_ERROR, f"setting {key} must be 0 or 1")
            if key == S_INITIAL_WINDOW_SIZE and value > MAX_WINDOW:
                self._fail(FLOW_CONTROL_ERROR, "INITIAL_WINDOW_SIZE over 2^31-1")
            if key == S_MAX_FRAME_SIZE and not 16384 <= value <= 2**24 - 1:
                self._fail(PROTOCOL_ERROR, "MAX_FRAME_SIZE out of range")
        for key, value in new.items():
            if key == S_HEADER_TABLE_SIZE:
                # RFC 7541 §4.2: the encoder may use less than the peer allows; a client's
                # 4 GiB would let every indexed response field stay (h2 took it as given)
                self.encoder.header_table_size = min(value, ENCODER_TABLE_MAX)
            elif key == S_INITIAL_WINDOW_SIZE:
                delta = value - self.out_initial_window
                self.out_initial_window = value
                for stream in self.streams.values():  # RFC 9113 §6.9.2
                    stream.out_window += delta
                    if stream.out_window > MAX_WINDOW:
                        self._fail(FLOW_CONTROL_ERROR, "a stream window over 2^31-1")
            elif key == S_MAX_FRAME_SIZE:
                self.max_outbound_frame_size = value
        self.out += _frame(F_SETTINGS, FLAG_ACK, 0)
        events.append((SETTINGS, 0))

    def _ping(self, events: list[tuple[object, ...]], flags: int, sid: int, p: bytes) -> None:
        if len(p) != 8:
            self._fail(FRAME_SIZE_ERROR, "PING of the wrong size")
        if sid:
            self._fail(PROTOCOL_ERROR, "PING on a stream")
        if not flags & FLAG_ACK:
            self.out += _frame(F_PING, FLAG_ACK, 0, p)
            events.append((PING, 0))

    def _priority(self, events: list[tuple[object, ...]], sid: int, p: bytes) -> None:
        if len(p) != 5:
            self._fail(FRAME_SIZE_ERROR, "PRIORITY of the wrong size")  # as h2
        if not sid:
            self._fail(PROTOCOL_ERROR, "PRIORITY on stream 0")
        if _U32.unpack_from(p)[0] & 0x7FFFFFFF == sid:
            if sid not in self.streams and self._is_idle(sid):
                # as h2: a connection error (RST_STREAM may not name an idle stream, §6.4)
                self._fail(PROTOCOL_ERROR, f"Stream {sid} may not depend on itself")
            # RFC 9113 §5.3.1: a stream error (h2 ends the connection)
            self._stream_error(events, sid, PROTOCOL_ERROR)
            return
        events.append((PRIORITY, sid))  # on idle streams too (RFC 9113 §5.1)

    # ------------------------------------------------------------------ sending
    def _open_for_sending(self, sid: int) -> _Stream:
        stream = self.streams.get(sid)
        if stream is None or not stream.local_open or self.failed:
            raise StreamGone(f"stream {sid} is closed")
        return stream

    def _local_end(self, sid: int, stream: _Stream) -> None:
        stream.local_open = False
        if not stream.remote_open:
            del self.streams[sid]
            self._remember(sid, _CLOSED_BY_END)

    def send_headers(self, sid: int, headers: list[tuple[bytes, bytes]], end_stream: bool) -> None:
        self.send_header_block(sid, self.encoder.encode(headers), end_stream)

    def send_header_block(self, sid: int, block: bytes, end_stream: bool) -> None:
        """A HEADERS frame (and CONTINUATIONs, split at the peer's MAX_FRAME_SIZE) carrying an
        already encoded block."""
        stream = self._open_for_sending(sid)
        size = self.max_outbound_frame_size
        flags = FLAG_END_STREAM if end_stream else 0
        out = self.out
        if len(block) <= size:
            n = len(block)
            out += _HEAD.pack(n >> 8, n & 0xFF, F_HEADERS, flags | FLAG_END_HEADERS, sid)
            out += block
        else:
            out += _frame(F_HEADERS, flags, sid, block[:size])
            for i in range(size, len(block), size):
                last = FLAG_END_HEADERS if i + size >= len(block) else 0
                out += _frame(F_CONTINUATION, last, sid, block[i : i + size])
        if end_stream:
            self._local_end(sid, stream)

    def window(self, sid: int) -> int:
        """How many DATA bytes stream `sid` may send now (RFC 9113 §6.9.1: both windows)."""
        stream = self._open_for_sending(sid)
        return min(stream.out_window, self.out_window)

    def send_data(self, sid: int, data: bytes, end_stream: bool = False) -> None:
        """DATA frames (split at the peer's MAX_FRAME_SIZE); `data` must fit `window(sid)`."""
        stream = self._open_for_sending(sid)
        n = len(data)
        if n > stream.out_window or n > self.out_window:
            raise StreamGone(f"stream {sid}: {n} bytes exceed the flow-control window")
        stream.out_window -= n
        self.out_window -= n
        size = self.max_outbound_frame_size
        out = self.out
        flags = FLAG_END_STREAM if end_stream else 0
        if n <= size:
            out += _HEAD.pack(n >> 8, n & 0xFF, F_DATA, flags, sid)
            out += data
        else:
            for i in range(0, n, size):
                piece = data[i : i + size]
                m = len(piece)
                last = flags if i + size >= n else 0
                out += _HEAD.pack(m >> 8, m & 0xFF, F_DATA, last, sid)
                out += piece
        if end_stream:
            self._local_end(sid, stream)

    def end_stream(self, sid: int) -> None:
        stream = self._open_for_sending(sid)
        self.out += _HEAD.pack(0, 0, F_DATA, FLAG_END_STREAM, sid)
        self._local_end(sid, stream)

    def reset_stream(self, sid: int, code: int) -> None:
        """RST_STREAM on an open stream (a closed one is left alone, as h2 refuses it)."""
        if self.failed or self.streams.pop(sid, None) is None:
            return
        self.out += _frame(F_RST_STREAM, 0, sid, _U32.pack(code))
        self._remember(sid, _CLOSED_BY_RESET)

    def close_connection(self, code: int = NO_ERROR, last_stream_id: int | None = None) -> None:
        """GOAWAY (RFC 9113 §6.8); with NO_ERROR the open streams may still finish."""
        if self.failed:
            return
        last = self.highest_inbound if last_stream_id is None else last_stream_id
        self.goaway_last = last
        self.out += _frame(F_GOAWAY, 0, 0, _GOAWAY.pack(last, code))
        if code != NO_ERROR:
            self.failed = True

    @property
    def encoder_resized(self) -> bool:
        """A table size update is due at the start of the next header block (RFC 7541 §4.2):
        a prepared block (which has none) cannot be sent as it is."""
        return bool(self.encoder.header_table.resized)


def _content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    """As h2 (H2Stream._initialize_content_length): a Content-Length that is not digits, or two
    that differ, end the connection (ProtocolError). Returns None without one."""
    length: int | None = None
    for name, value in headers:
        if name == b"content-length":
            if not value.isdigit():
                raise ConnectionFailed(PROTOCOL_ERROR, f"Invalid content-length header: {value!r}")
            n = int(value)
            if length is not None and n != length:
                raise ConnectionFailed(PROTOCOL_ERROR, "conflicting content-length headers")
            length = n
    return length


# ---------------------------------------------------------------------- request fields
def join_cookies(fields: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """RFC 9113 §8.2.3: Cookie fields a client split are joined with "; " (as h2's
    normalize_inbound_headers: the joined field goes last). `fields` itself without one."""
    for name, _ in fields:
        if name == b"cookie":
            break
    else:
        return fields
    cookies = b"; ".join([v for n, v in fields if n == b"cookie"])
    return [f for f in fields if f[0] != b"cookie"] + [(b"cookie", cookies)]


_CONNECTION_FIELDS = frozenset(
    {b"connection", b"proxy-connection", b"keep-alive", b"transfer-encoding", b"upgrade"}
)
_PSEUDO_FIELDS = frozenset(
    {b":method", b":scheme", b":authority", b":path", b":status", b":protocol"}
)
# a name: lower case, visible ASCII, `:` only as a pseudo-header's first byte (RFC 9113 §8.2.1)
_NAME = re.compile(rb":?[\x21-\x39\x3b-\x40\x5b-\x7e]+")
# a value: no NUL, CR or LF anywhere, no space or tab at either end (RFC 9113 §8.2.1)
_BAD_VALUE = re.compile(rb"[\x00\r\n]|\A[ \t]|[ \t]\Z")


def field_error(headers: list[tuple[bytes, bytes]], trailer: bool) -> str | None:
    """Why a request's (or its trailers') header fields are malformed (RFC 9113 §8.1.1 to
    §8.3.1), or None: in one pass, the checks of h2.utilities.validate_headers for a server
    receiving a request (tests/unit/test_h2core.py runs both on generated lists). Cookies are
    joined first (`join_cookies`), as h2 did before validating."""
    seen: set[bytes] = set()
    regular = False
    method: bytes | None = None
    authority: bytes | None = None
    host: bytes | None = None
    name_ok = _NAME.fullmatch
    bad_value = _BAD_VALUE.search
    for name, value in headers:
        if name_ok(name) is None:
            return f"bad field name {name[:40]!r}"
        if value and bad_value(value) is not None:
            return f"bad value of {name[:40]!r}"
        if name[0] == 0x3A:  # ":"
            if name in seen:
                return f"duplicate {name!r}"
            if regular:
                return f"pseudo-header {name!r} after a regular field"
            if name not in _PSEUDO_FIELDS:
                return f"unknown pseudo-header {name[:40]!r}"
            seen.add(name)
            if name == b":method":
                method = value
            elif name == b":authority":
                authority = value
            elif name == b":path" and not value and not trailer:
                return "empty :path"
            continue
        regular = True
        if name in _CONNECTION_FIELDS:
            return f"connection-specific field {name!r}"
        if name == b"te" and value.lower() != b"trailers":
            return "TE other than trailers"
        if name == b"host" and not trailer:
            if host is not None:
                return "more than one Host"
            host = value
    if trailer:
        return "pseudo-header in trailers" if seen else None
    if method is None:
        return "no :method"
    connect = method == b"CONNECT"
    if connect and b":protocol" not in seen:
        if b":scheme" in seen or b":path" in seen:
            return "CONNECT with :scheme or :path"
    elif b":scheme" not in seen or b":path" not in seen:
        return "no :scheme or :path"
    if b":status" in seen:
        return ":status in a request"
    if not connect and b":protocol" in seen:
        return ":protocol without CONNECT"
    if authority is None and host is None:
        return "no :authority or Host"
    if authority is not None and host is not None and authority != host:
        return "Host differs from :authority"
    return None
