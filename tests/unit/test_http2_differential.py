"""Differential test: web.http2's H2Connection (the code under test) against the h2-based
connection it replaces (tests/helpers/h2_reference.py), fed the same client bytes through an
in-memory transport on an event loop. What a client (and our logs) can observe must be equal:
the frames sent back, parsed; whether and how the connection was closed; what each request's
handler saw; the connection's events. Every case must pass, except those listed in CHANGED, each
with the reason the new answer is right.

Normalisations (only what may legitimately differ between two correct servers):
- Streams: the frames of each stream, and those of the connection (stream 0), are compared in
  the order they were sent; how streams interleave is the scheduler's choice (compared only
  with H2DIFF_STRICT=1, as is the order of events).
- DATA: payloads are concatenated per stream (how a body is split into frames, or interleaved
  between streams, is the sender's choice); the sequence keeps only ("END", sid) where a DATA
  frame carries END_STREAM, and drops empty DATA frames without it.
- HEADERS + CONTINUATION: compared as the decoded header list (HPACK is stateful, so the
  client's decoder runs over every block in order; how the encoder indexes is its choice).
- WINDOW_UPDATE: not in the sequence; the sum of increments per stream id is compared (when and
  in how many frames the receiver opens its windows is its choice; the total is what matters).
- SETTINGS: the values a frame sets, sorted by id (their order means nothing), the last of a
  repeated id; in the server's first SETTINGS, values equal to the RFC's initial ones are
  dropped (sending them or not means the same).
- GOAWAY: last stream id and error code; the debug data (free text) is ignored.
- Events (on_event): the names, sorted (which task runs first is the loop's choice), plus the
  reason of h2_abuse and the answer of bad_request (status or reset), not the free-text errors.
- The handler's view (method, target, authority, scheme, headers, body) is compared as is.

Run against another tree (read-only): copy this file and tests/helpers/h2_reference.py into a
temporary tests/ package and put that tree's src first on PYTHONPATH.
"""

from __future__ import annotations

import asyncio
import collections
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import hpack
import pytest
from hpack.hpack import encode_integer

from blindfold.web import http2
from blindfold.web.http1 import ConnInfo
from blindfold.web.limits import HttpLimits
from blindfold.web.messages import BodyStream, PreparedHead, Request, Responder, start_prepared
from tests.helpers import h2_reference

LIMITS = HttpLimits(
    max_body_bytes=100_000,
    max_headers=20,
    h2_max_concurrent_streams=8,
    h2_initial_window=65535,
    h2_max_header_list_size=4096,
    h2_max_streams_per_connection=20,
    h2_max_resets_per_window=10,
    h2_max_control_frames_per_window=50,
)
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# frame types (RFC 9113 §6) and flags
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE = range(9)
CONTINUATION = 9
END_STREAM, ACK, END_HEADERS, PADDED, PRIO = 0x1, 0x1, 0x4, 0x8, 0x20
# settings ids (RFC 9113 §6.5.2)
TABLE, PUSH, MAX_STREAMS, IWS, MAX_FRAME, MAX_LIST = range(1, 7)
ERRORS = [
    "NO_ERROR",
    "PROTOCOL_ERROR",
    "INTERNAL_ERROR",
    "FLOW_CONTROL_ERROR",
    "SETTINGS_TIMEOUT",
    "STREAM_CLOSED",
    "FRAME_SIZE_ERROR",
    "REFUSED_STREAM",
    "CANCEL",
    "COMPRESSION_ERROR",
    "CONNECT_ERROR",
    "ENHANCE_YOUR_CALM",
    "INADEQUATE_SECURITY",
    "HTTP_1_1_REQUIRED",
]


# ---------------------------------------------------------------------- client bytes
def frame(
    kind: int, flags: int, sid: int, payload: bytes = b"", length: int | None = None
) -> bytes:
    n = len(payload) if length is None else length
    return struct.pack(">I", n)[1:] + bytes((kind, flags)) + struct.pack(">I", sid) + payload


def _int(value: int, prefix_bits: int) -> bytes:
    """RFC 7541 §5.1, by the hpack library (the servers' own encoders are under test)."""
    return bytes(encode_integer(value, prefix_bits))


def block(fields: Sequence[tuple[bytes, bytes]]) -> bytes:
    """A header block of literals without indexing, new names, no Huffman (RFC 7541 §6.2.2):
    any bytes at all, and no dynamic-table state."""
    return b"".join(b"\x00" + _int(len(n), 7) + n + _int(len(v), 7) + v for n, v in fields)


def req(
    path: bytes = b"/",
    method: bytes = b"GET",
    extra: Sequence[tuple[bytes, bytes]] = (),
    authority: bytes | None = b"a.test",
    scheme: bytes = b"https",
) -> list[tuple[bytes, bytes]]:
    out = [(b":method", method), (b":scheme", scheme), (b":path", path)]
    if authority is not None:
        out.append((b":authority", authority))
    return out + list(extra)


def headers(
    sid: int,
    fields: Sequence[tuple[bytes, bytes]] | bytes,
    end: bool = True,
    end_headers: bool = True,
    pad: int | None = None,
    prio: tuple[int, int] | None = None,
) -> bytes:
    payload = fields if isinstance(fields, bytes) else block(fields)
    flags = (END_STREAM if end else 0) | (END_HEADERS if end_headers else 0)
    if prio is not None:
        flags |= PRIO
        payload = struct.pack(">IB", prio[0], prio[1]) + payload
    if pad is not None:
        flags |= PADDED
        payload = bytes((pad,)) + payload + b"\x00" * pad
    return frame(HEADERS, flags, sid, payload)


def data(sid: int, payload: bytes, end: bool = False, pad: int | None = None) -> bytes:
    flags = END_STREAM if end else 0
    if pad is not None:
        flags |= PADDED
        payload = bytes((pad,)) + payload + b"\x00" * pad
    return frame(DATA, flags, sid, payload)


def cont(sid: int, fragment: bytes, end: bool = True) -> bytes:
    return frame(CONTINUATION, END_HEADERS if end else 0, sid, fragment)


def settings(*pairs: tuple[int, int], ack: bool = False) -> bytes:
    return frame(
        SETTINGS, ACK if ack else 0, 0, b"".join(struct.pack(">HI", k, v) for k, v in pairs)
    )


def wu(sid: int, increment: int) -> bytes:
    return frame(WINDOW_UPDATE, 0, sid, struct.pack(">I", increment))


def rst(sid: int, code: int = 8) -> bytes:
    return frame(RST_STREAM, 0, sid, struct.pack(">I", code))


def ping(payload: bytes = b"pingpong", ack: bool = False) -> bytes:
    return frame(PING, ACK if ack else 0, 0, payload)


def priority(sid: int, dep: int, weight: int = 15) -> bytes:
    return frame(PRIORITY, 0, sid, struct.pack(">IB", dep, weight))


def goaway(last: int, code: int = 0) -> bytes:
    return frame(GOAWAY, 0, 0, struct.pack(">II", last, code))


START = PREFACE + settings() + settings(ack=True)
SETTINGS_ACK = settings(ack=True)


def get(sid: int, path: bytes = b"/", **kw: Any) -> bytes:
    return headers(sid, req(path, **kw))


def post(sid: int, body: bytes, extra: Sequence[tuple[bytes, bytes]] = ()) -> bytes:
    return headers(sid, req(b"/echo", b"POST", extra), end=False) + data(sid, body, end=True)


# markers between reads: the loop runs until quiet after each read and marker
EOF = "eof"
PAUSE = "pause_writing"
RESUME = "resume_writing"
Step = bytes | str


# ---------------------------------------------------------------------- the server side
BODY = bytes(range(256)) * 8
HEAD = PreparedHead(
    200,
    [
        (b"content-type", b"application/octet-stream"),
        (b"cache-control", b"public, max-age=60"),
        (b"x-long-" + b"n" * 140, b"v" * 300),
        (b"content-length", str(len(BODY)).encode()),
    ],
)


class Transport(asyncio.Transport):
    """What the connection writes, kept; closing recorded, not performed."""

    def __init__(self) -> None:
        super().__init__()
        self.out = bytearray()
        self.closed: str | None = None
        self.late_writes = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.closed is not None:
            self.late_writes += 1
            return
        self.out += data

    def writelines(self, lines: Any) -> None:
        self.write(b"".join(lines))

    def close(self) -> None:
        self.closed = self.closed or "close"

    def abort(self) -> None:
        self.closed = self.closed or "abort"

    def is_closing(self) -> bool:
        return self.closed is not None

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


async def app(request: Request, body: BodyStream, respond: Responder, seen: list[Any]) -> None:
    """/big?N: N bytes in one send (flow control); /prepared: a prepared head; /early: answer
    without reading the body; /abort: start, send, give up; /interim: a 103 first; /raise: a
    handler error; anything else: read the body and echo what was seen."""
    view: dict[str, Any] = {
        "method": request.method,
        "target": request.target,
        "authority": request.authority,
        "scheme": request.scheme,
        "headers": request.headers,
        "raw_target": request.raw_target,
    }
    seen.append(view)
    path = request.path
    if path == b"/big":
        n = int(request.target.partition(b"?")[2] or b"200000")
        await respond.start(200, [(b"content-length", b"%d" % n)])
        await respond.send(bytes(i % 251 for i in range(n)))
        await respond.end()
        return
    if path == b"/prepared":
        await start_prepared(respond, HEAD, [(b"age", b"1")])
        await respond.send(BODY)
        await respond.end()
        return
    if path == b"/early":
        await respond.start(403, [(b"content-length", b"0")])
        await respond.end()
        return
    if path == b"/abort":
        await respond.start(200, [(b"content-length", b"10")])
        await respond.send(b"abc")
        respond.abort()
        return
    if path == b"/raise":
        raise RuntimeError("handler failed")
    if path == b"/interim":
        await respond.interim(103, [(b"link", b"</s.css>; rel=preload")])  # type: ignore[attr-defined]
    try:
        got = await body.read_all(1 << 20)
        view["body"] = (len(got), got[:64])
    except Exception as exc:
        view["body"] = type(exc).__name__
    out = repr(view).encode()
    await respond.start(
        200, [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(out))]
    )
    await respond.send(out)
    await respond.end()


async def _settle() -> None:
    for _ in range(60):
        await asyncio.sleep(0)


def run(factory: Callable[..., asyncio.Protocol], steps: Sequence[Step]) -> dict[str, Any]:
    """Feed `steps` to a new connection made by `factory`; what a client and the logs see."""
    seen: list[Any] = []
    events: list[tuple[Any, ...]] = []
    errors: list[Any] = []

    def on_event(name: str, fields: dict[str, Any]) -> None:
        if name == "h2_abuse":
            events.append((name, fields.get("reason")))
        elif name == "bad_request":
            events.append((name, fields.get("status"), fields.get("reset")))
        else:
            events.append((name,))

    async def handler(request: Request, body: BodyStream, respond: Responder) -> None:
        await app(request, body, respond, seen)

    async def main() -> Transport:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _loop, context: errors.append(context.get("message")))
        info = ConnInfo(("127.0.0.1", 1), ("127.0.0.1", 2), b"https", {})
        conn: Any = factory(handler, LIMITS, info, on_event)
        transport = Transport()
        conn.connection_made(transport)
        await _settle()
        for step in steps:
            if step == EOF:
                conn.eof_received()
            elif step == PAUSE:
                conn.pause_writing()
            elif step == RESUME:
                conn.resume_writing()
            else:
                assert isinstance(step, bytes)
                conn.data_received(step)
            await _settle()
        closed_before_lost = transport.closed
        conn.connection_lost(None)
        await _settle()
        transport.closed = closed_before_lost
        return transport

    transport = asyncio.run(asyncio.wait_for(main(), 20))
    obs = observe(bytes(transport.out))
    obs["closed"] = transport.closed
    obs["late_writes"] = transport.late_writes
    obs["handlers"] = seen
    obs["events"] = sorted(events)
    obs["event_order"] = events
    obs["loop_errors"] = errors
    return obs


def observe(out: bytes) -> dict[str, Any]:
    """The server's bytes as a client sees them (see the module docstring's normalisations)."""
    decoder = hpack.Decoder()
    decoder.max_header_list_size = 1 << 24
    decoder.max_allowed_table_size = 1 << 32  # the client's setting bounds the server's
    seq: list[tuple[Any, ...]] = []
    bodies: dict[int, bytes] = collections.defaultdict(bytes)
    windows: dict[int, int] = collections.Counter()
    pending: tuple[int, int, bytes] | None = None  # sid, flags, fragments
    pos = 0
    while len(out) - pos >= 9:
        length = int.from_bytes(out[pos : pos + 3], "big")
        kind, flags = out[pos + 3], out[pos + 4]
        sid = int.from_bytes(out[pos + 5 : pos + 9], "big") & 0x7FFFFFFF
        if len(out) - pos - 9 < length:
            break
        p = out[pos + 9 : pos + 9 + length]
        pos += 9 + length
        if kind in (DATA, HEADERS) and flags & PADDED:
            p = p[1 : len(p) - p[0]]
        if kind == DATA:
            bodies[sid] += p
            if flags & END_STREAM:
                seq.append(("END", sid))
        elif kind in (HEADERS, CONTINUATION):
            if kind == HEADERS:
                if flags & PRIO:
                    p = p[5:]
                pending = (sid, flags, p)
            elif pending is not None:
                pending = (pending[0], pending[1], pending[2] + p)
            else:
                seq.append(("STRAY-CONTINUATION", sid))
            if flags & END_HEADERS and pending is not None:
                psid, pflags, frag = pending
                pending = None
                try:
                    fields = tuple(tuple(f) for f in decoder.decode(frag, raw=True))
                except Exception as exc:
                    fields = (("undecodable", type(exc).__name__),)  # type: ignore[assignment]
                seq.append(("HEADERS", psid, bool(pflags & END_STREAM), fields))
        elif kind == RST_STREAM:
            seq.append(("RST", sid, _code(p)))
        elif kind == SETTINGS:
            values = dict(struct.unpack(">HI", p[i : i + 6]) for i in range(0, len(p) - 5, 6))
            if not any(f[0] == "SETTINGS" and not f[1] for f in seq):  # the first: from defaults
                values = {k: v for k, v in values.items() if _DEFAULTS.get(k) != v}
            seq.append(("SETTINGS", bool(flags & ACK), tuple(sorted(values.items()))))
        elif kind == PING:
            seq.append(("PING", bool(flags & ACK), p))
        elif kind == GOAWAY:
            seq.append(("GOAWAY", int.from_bytes(p[:4], "big") & 0x7FFFFFFF, _code(p[4:8])))
        elif kind == WINDOW_UPDATE:
            windows[sid] += int.from_bytes(p, "big") & 0x7FFFFFFF
        else:
            seq.append(("FRAME", kind, flags, sid, p))
    if pos < len(out):
        seq.append(("PARTIAL", len(out) - pos))
    # per stream (0: the connection's own frames), in the order sent
    frames: dict[int, list[tuple[Any, ...]]] = collections.defaultdict(list)
    for item in seq:
        on_stream = item[0] in ("END", "HEADERS", "RST", "STRAY-CONTINUATION")
        frames[item[1] if on_stream else 0].append(item)
    return {"frames": dict(frames), "order": seq, "bodies": dict(bodies), "windows": dict(windows)}


# RFC 9113 §6.5.2 (and RFC 8441 §3 for 8, ENABLE_CONNECT_PROTOCOL): the initial values
_DEFAULTS = {TABLE: 4096, PUSH: 1, IWS: 65535, MAX_FRAME: 16384, 8: 0}


def _code(p: bytes) -> str:
    code = int.from_bytes(p[:4], "big")
    return ERRORS[code] if code < len(ERRORS) else f"0x{code:x}"


# ---------------------------------------------------------------------- the corpus
@dataclass(frozen=True)
class Case:
    steps: Sequence[Step]
    # what the reference must show, so that a case tests what its name says:
    # "ok": no error GOAWAY, no RST, no 4xx/5xx; "conn": GOAWAY with an error, or closed;
    # "stream": an RST_STREAM or a 4xx/5xx status, no error GOAWAY; "any": not checked
    kind: str = "ok"


def _lots_of_data(sid: int, n: int, size: int) -> list[bytes]:
    return [data(sid, b"d" * size, end=i == n - 1) for i in range(n)]


_ENC = hpack.Encoder()


def _hpack_encoded(*lists: list[tuple[bytes, bytes]], huffman: bool = True) -> list[bytes]:
    """Header blocks from a real HPACK encoder (dynamic table, Huffman), in order."""
    enc = hpack.Encoder()
    return [enc.encode(fields, huffman=huffman) for fields in lists]


def _big_block() -> bytes:
    return block(req(extra=[(b"x-big", b"v" * 3000), (b"x-big2", b"w" * 3000)]))


_B3 = _hpack_encoded(
    req(extra=[(b"x-token", b"abcdef" * 10)]),
    req(b"/2", extra=[(b"x-token", b"abcdef" * 10)]),
    req(b"/3", extra=[(b"x-token", b"abcdef" * 10)]),
)
_CONT = block(req(extra=[(b"x-%d" % i, b"v" * 40) for i in range(10)]))
_BIG = _big_block()

CASES: dict[str, Case] = {
    # ---------------------------------------------------------------- valid traffic
    "get": Case([START + get(1)]),
    "get-split-bytewise": Case([bytes((b,)) for b in START + get(1)]),
    "get-no-settings-ack": Case([PREFACE + settings() + get(1)]),
    "head": Case([START + get(1, method=b"HEAD")]),
    "get-query": Case([START + get(1, b"/a/b?c=d&e")]),
    "options-asterisk": Case([START + get(1, b"*", method=b"OPTIONS")]),
    "host-only": Case([START + headers(1, req(authority=None, extra=[(b"host", b"h.test")]))]),
    "host-equal-authority": Case([START + headers(1, req(extra=[(b"host", b"a.test")]))]),
    "cookies-split": Case(
        [START + headers(1, req(extra=[(b"cookie", b"a=1"), (b"cookie", b"b=2")]))]
    ),
    "many-headers-echoed": Case(
        [START + headers(1, req(extra=[(b"x-h%d" % i, b"%d" % i) for i in range(15)]))]
    ),
    "te-trailers": Case([START + headers(1, req(extra=[(b"te", b"trailers")]))]),
    "post-one-data": Case([START + post(1, b"hello")]),
    "post-content-length": Case([START + post(1, b"hello", [(b"content-length", b"5")])]),
    "post-many-data": Case(
        [
            START
            + headers(1, req(b"/echo", b"POST"), end=False)
            + b"".join(_lots_of_data(1, 20, 100))
        ]
    ),
    "post-data-in-reads": Case(
        [START + headers(1, req(b"/echo", b"POST"), end=False), *_lots_of_data(1, 8, 1000)]
    ),
    "post-empty-end": Case(
        [START + headers(1, req(b"/echo", b"POST"), end=False) + data(1, b"", end=True)]
    ),
    "post-body-fills-window": Case(
        [START + headers(1, req(b"/echo", b"POST"), end=False)]
        + [data(1, b"z" * 16384) for _ in range(3)]
        + [data(1, b"z" * 16383, end=True)]
    ),
    "post-trailers": Case(
        [
            START
            + headers(1, req(b"/echo", b"POST"), end=False)
            + data(1, b"abc")
            + headers(1, [(b"x-trailer", b"t")], end=True)
        ]
    ),
    "padded-headers": Case([START + headers(1, req(), pad=10)]),
    "padded-data": Case(
        [START + headers(1, req(b"/echo", b"POST"), end=False) + data(1, b"abc", True, pad=200)]
    ),
    "padded-data-only-padding": Case(
        [START + headers(1, req(b"/echo", b"POST"), end=False) + data(1, b"", True, pad=255)]
    ),
    "padded-data-max-frame": Case(
        [
            START
            + headers(1, req(b"/echo", b"POST"), end=False)
            + data(1, b"q" * (16384 - 256), pad=255)
            + data(1, b"", True)
        ]
    ),
    "headers-with-priority": Case([START + headers(1, req(), prio=(0, 200))]),
    "headers-padded-with-priority": Case([START + headers(1, req(), prio=(0, 1), pad=3)]),
    "priority-frame-idle-stream": Case([START + priority(3, 0) + get(1)]),
    "priority-frame-open-stream": Case(
        [
            START
            + headers(1, req(b"/echo", b"POST"), end=False)
            + priority(1, 0)
            + data(1, b"x", True)
        ]
    ),
    "continuation-one": Case(
        [START + headers(1, _CONT[:100], end_headers=False) + cont(1, _CONT[100:])]
    ),
    "continuation-many": Case(
        [
            START
            + headers(1, _CONT[:10], end_headers=False)
            + b"".join(cont(1, _CONT[i : i + 10], end=False) for i in range(10, 500, 10))
            + cont(1, _CONT[500:])
        ]
    ),
    "continuation-empty-fragments": Case(
        [START + headers(1, _CONT, end_headers=False) + cont(1, b"", end=False) + cont(1, b"")]
    ),
    "hpack-dynamic-table": Case(
        [START + b"".join(headers(s, b) for s, b in zip((1, 3, 5), _B3, strict=False))]
    ),
    "hpack-huffman-plain": Case(
        [
            START
            + b"".join(
                headers(s, b)
                for s, b in zip((1, 3), _hpack_encoded(req(), req(b"/x")), strict=False)
            )
        ]
    ),
    "hpack-size-update-in-block": Case([START + headers(1, b"\x20" + block(req()))]),
    "hpack-size-update-then-grow": Case([START + headers(1, b"\x20\x3f\xe1\x1f" + block(req()))]),
    "concurrent-8": Case([START + b"".join(get(s, b"/s%d" % s) for s in range(1, 17, 2))]),
    "concurrent-8-posts": Case(
        [
            START
            + b"".join(headers(s, req(b"/echo", b"POST"), end=False) for s in range(1, 17, 2)),
            b"".join(data(s, b"p%d" % s, end=True) for s in range(15, 0, -2)),
        ]
    ),
    "sequential-10": Case([START + get(1)] + [get(s) for s in range(3, 21, 2)]),
    "stream-ids-skip": Case([START + get(1) + get(7) + get(101)]),
    "big-response-blocks-on-window": Case([START + get(1, b"/big?200000")]),
    "big-response-window-update-resume": Case(
        [START + get(1, b"/big?200000"), wu(1, 70000) + wu(0, 70000), wu(1, 100000) + wu(0, 100000)]
    ),
    "big-response-conn-window-first": Case(
        [START + get(1, b"/big?100000"), wu(0, 50000), wu(1, 50000)]
    ),
    "big-response-large-iws": Case(
        [
            PREFACE
            + settings((IWS, 1 << 20))
            + SETTINGS_ACK
            + wu(0, 1 << 20)
            + get(1, b"/big?300000")
        ]
    ),
    "big-response-max-frame-size": Case(
        [
            PREFACE
            + settings((IWS, 1 << 20), (MAX_FRAME, 65536))
            + SETTINGS_ACK
            + wu(0, 1 << 20)
            + get(1, b"/big?200000")
        ]
    ),
    "iws-shrink-mid-stream": Case(
        [
            START + get(1, b"/big?100000"),
            settings((IWS, 1000)),
            wu(0, 100000) + wu(1, 20000),
            wu(1, 100000),
        ]
    ),
    "iws-grow-mid-stream": Case(
        [START + get(1, b"/big?100000"), wu(0, 100000) + settings((IWS, 200000))]
    ),
    "iws-zero-then-grow": Case(
        [
            PREFACE + settings((IWS, 0)) + SETTINGS_ACK + wu(0, 100000) + get(1, b"/big?5000"),
            settings((IWS, 6000)),
        ]
    ),
    "two-big-responses-share-conn-window": Case(
        [
            START + get(1, b"/big?50000") + get(3, b"/big?50000"),
            wu(1, 50000) + wu(3, 50000),
            wu(0, 200000),
        ]
    ),
    "table-size-zero": Case([PREFACE + settings((TABLE, 0)) + SETTINGS_ACK + get(1) + get(3)]),
    "table-size-zero-after-request": Case([START + get(1), settings((TABLE, 0)), get(3) + get(5)]),
    "table-size-large": Case([PREFACE + settings((TABLE, 65536)) + SETTINGS_ACK + get(1) + get(3)]),
    # the largest table a client may offer: the server's encoder may use it all (reference) or
    # less (RFC 7541 §4.2); only the decoded lists are compared
    "table-size-max": Case(
        [PREFACE + settings((TABLE, (1 << 32) - 1)) + SETTINGS_ACK]
        + [get(s, b"/q%d" % s) for s in range(1, 11, 2)]
    ),
    "max-list-size-small": Case(
        [PREFACE + settings((MAX_LIST, 100)) + SETTINGS_ACK + get(1)], "any"
    ),
    "ping": Case([START + ping()]),
    "ping-between-requests": Case([START + get(1) + ping(b"\x00" * 8) + get(3)]),
    "ping-ack-unsolicited": Case([START + ping(ack=True) + get(1)]),
    "settings-ack-extra": Case([START + SETTINGS_ACK + get(1)]),
    "settings-push-0": Case([PREFACE + settings((PUSH, 0)) + SETTINGS_ACK + get(1)]),
    "settings-unknown-id": Case([PREFACE + settings((0x99, 7)) + SETTINGS_ACK + get(1)]),
    "unknown-frame-type": Case(
        [START + frame(0x42, 0xFF, 0, b"hello") + frame(0x42, 0, 1, b"") + get(1)]
    ),
    "window-update-open-stream": Case(
        [START + headers(1, req(b"/echo", b"POST"), end=False) + wu(1, 10) + data(1, b"a", True)]
    ),
    "prepared": Case([START + get(1, b"/prepared")]),
    "prepared-head": Case([START + get(1, b"/prepared", method=b"HEAD")]),
    "prepared-after-table-size-zero": Case(
        [START + get(1), settings((TABLE, 0)), get(3, b"/prepared") + get(5, b"/prepared")]
    ),
    "prepared-small-window": Case(
        [PREFACE + settings((IWS, 300)) + SETTINGS_ACK + get(1, b"/prepared"), wu(1, 5000)]
    ),
    "interim-103": Case([START + get(1, b"/interim")]),
    "early-answer-while-body-pending": Case(
        [START + headers(1, req(b"/early", b"POST"), end=False), data(1, b"late", True)], "any"
    ),
    "handler-abort": Case([START + get(1, b"/abort")], "stream"),
    "handler-raises": Case([START + get(1, b"/raise")], "stream"),
    "client-cancels-stream": Case(
        [START + headers(1, req(b"/echo", b"POST"), end=False), rst(1, 8), get(3)]
    ),
    "client-cancels-big-response": Case([START + get(1, b"/big?200000"), rst(1, 8), get(3)]),
    "client-cancels-after-response": Case([START + get(1), rst(1, 8), get(3)], "any"),
    # the reference closes at once on a client GOAWAY, dropping the answer to stream 1
    "client-goaway": Case([START + get(1) + goaway(1)], "any"),
    "client-goaway-then-request": Case([START + goaway(0) + get(1)], "any"),
    "eof-after-request": Case([START + get(1), EOF]),
    "eof-mid-body": Case(
        [START + headers(1, req(b"/echo", b"POST"), end=False) + data(1, b"abc"), EOF], "any"
    ),
    "pause-writing-big": Case([START, PAUSE, get(1, b"/big?30000"), RESUME, get(3)]),
    "body-over-limit-by-content-length": Case(
        [START + headers(1, req(b"/echo", b"POST", [(b"content-length", b"200000")]), end=False)],
        "stream",
    ),
    "body-over-limit-streamed": Case(
        [START + headers(1, req(b"/echo", b"POST"), end=False)]
        + [data(1, b"b" * 16000) for _ in range(8)],
        "any",
    ),
    "authority-with-port": Case([START + get(1, authority=b"a.test:8443")]),
    # ---------------------------------------------------------------- connection errors
    "bad-preface-http1": Case([b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"], "conn"),
    "bad-preface-garbage": Case([b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n" + settings()], "conn"),
    "bad-preface-then-eof": Case([PREFACE[:10], EOF], "conn"),
    # RFC 9113 §3.4 wants SETTINGS first (PROTOCOL_ERROR); the reference (h2) does not check
    "no-settings-first": Case([PREFACE + get(1)], "any"),
    "settings-bad-length": Case([PREFACE + frame(SETTINGS, 0, 0, b"\x00" * 5)], "conn"),
    "settings-ack-with-payload": Case([START + frame(SETTINGS, ACK, 0, b"\x00" * 6)], "conn"),
    "settings-on-stream": Case([PREFACE + frame(SETTINGS, 0, 1, b"")], "conn"),
    "settings-enable-push-2": Case([PREFACE + settings((PUSH, 2))], "conn"),
    "settings-iws-too-big": Case([PREFACE + settings((IWS, 1 << 31))], "conn"),
    "settings-max-frame-small": Case([PREFACE + settings((MAX_FRAME, 100))], "conn"),
    "settings-max-frame-huge": Case([PREFACE + settings((MAX_FRAME, 1 << 24))], "conn"),
    "settings-iws-overflows-open-window": Case(
        [START + get(1, b"/big?1000") + wu(1, (1 << 31) - 1 - 65535) + settings((IWS, 70000))],
        "any",
    ),
    "ping-short": Case([START + frame(PING, 0, 0, b"1234567")], "conn"),
    "ping-on-stream": Case([START + frame(PING, 0, 1, b"12345678")], "conn"),
    "window-update-short": Case([START + frame(WINDOW_UPDATE, 0, 0, b"\x00\x00\x01")], "conn"),
    "window-update-zero-conn": Case([START + wu(0, 0)], "conn"),
    # RFC 9113 §6.9: a stream error; the reference (h2) ends the connection
    "window-update-zero-stream": Case(
        [START + headers(1, req(b"/echo", b"POST"), end=False) + wu(1, 0)], "conn"
    ),
    "window-update-overflow-conn": Case([START + wu(0, (1 << 31) - 1)], "conn"),
    "window-update-overflow-stream": Case(
        [START + headers(1, req(b"/echo", b"POST"), end=False) + wu(1, (1 << 31) - 1)], "stream"
    ),
    "window-update-idle-stream": Case([START + wu(5, 10)], "conn"),
    "rst-short": Case([START + get(1) + frame(RST_STREAM, 0, 1, b"\x00\x00\x08")], "conn"),
    "rst-stream-0": Case([START + rst(0)], "conn"),
    "rst-idle-stream": Case([START + rst(1)], "conn"),
    "goaway-on-stream": Case([START + frame(GOAWAY, 0, 1, b"\x00" * 8)], "conn"),
    "priority-short": Case([START + frame(PRIORITY, 0, 1, b"\x00" * 4)], "any"),
    "priority-stream-0": Case([START + priority(0, 1)], "conn"),
    "priority-self-dependency": Case([START + priority(1, 1)], "any"),
    "headers-self-dependency": Case([START + headers(1, req(), prio=(1, 0))], "any"),
    "headers-stream-0": Case([START + get(0)], "conn"),
    "data-stream-0": Case([START + data(0, b"x")], "conn"),
    "continuation-stream-0": Case([START + cont(0, b"")], "conn"),
    "even-stream-id": Case([START + get(2)], "conn"),
    "decreasing-stream-id": Case([START + get(5) + get(3)], "conn"),
    "reused-stream-id": Case([START + get(1), get(1)], "conn"),
    "data-idle-stream": Case([START + data(1, b"x")], "conn"),
    "data-closed-stream": Case([START + get(1), data(1, b"x")], "any"),
    "data-half-closed-remote": Case([START + get(1, b"/big?200000"), data(1, b"x")], "stream"),
    "headers-half-closed-remote": Case([START + get(1, b"/big?200000"), get(1)], "any"),
    "data-after-rst": Case(
        [START + headers(1, req(b"/echo", b"POST"), end=False), rst(1), data(1, b"x")], "any"
    ),
    "push-promise-from-client": Case(
        [
            START
            + headers(1, req(), end=False)
            + frame(PUSH_PROMISE, END_HEADERS, 1, b"\x00\x00\x00\x02" + block(req()))
        ],
        "conn",
    ),
    "continuation-without-headers": Case([START + cont(1, block(req()))], "conn"),
    "continuation-other-stream": Case(
        [START + headers(1, _CONT[:50], end_headers=False) + cont(3, _CONT[50:])], "conn"
    ),
    "frame-between-headers-and-continuation": Case(
        [START + headers(1, _CONT[:50], end_headers=False) + ping() + cont(1, _CONT[50:])], "conn"
    ),
    "headers-interleaved-with-headers": Case(
        [START + headers(1, _CONT[:50], end_headers=False) + get(3)], "conn"
    ),
    "endless-continuation": Case(
        [START + headers(1, b"", end_headers=False)]
        + [cont(1, b"\x00", end=False) * 100 for _ in range(3)],
        "conn",
    ),
    "endless-continuation-big": Case(
        [START + headers(1, _BIG[:16000], end_headers=False)]
        + [cont(1, b"a" * 16384, end=False) for _ in range(70)],
        "conn",
    ),
    "frame-too-large": Case([START + frame(DATA, 0, 1, b"x" * 16385)], "conn"),
    "headers-frame-too-large": Case(
        [START + headers(1, req(extra=[(b"x", b"v" * 16400)]))], "conn"
    ),
    # the reference (h2) reads a whole frame before it checks its length: it buffers up to
    # 16 MiB of a frame it will refuse (RFC 9113 §4.2 allows refusing on the header)
    "frame-length-too-large-header-only": Case(
        [START + frame(HEADERS, END_HEADERS, 1, b"", length=1 << 23)], "any"
    ),
    "frame-length-too-large-partial-body": Case(
        [START + frame(DATA, 0, 1, b"", length=(1 << 24) - 1), b"x" * 20000, b"y" * 20000], "any"
    ),
    "padding-longer-than-payload": Case(
        [START + frame(HEADERS, END_HEADERS | PADDED, 1, b"\x10abc")], "conn"
    ),
    "data-padding-longer-than-payload": Case(
        [START + headers(1, req(b"/echo", b"POST"), end=False) + frame(DATA, PADDED, 1, b"\x05ab")],
        "conn",
    ),
    "padded-flag-empty-payload": Case([START + frame(DATA, PADDED, 1, b"")], "conn"),
    "data-over-stream-window": Case(
        [
            START
            + headers(1, req(b"/early", b"POST"), end=False)
            + b"".join(data(1, b"w" * 16384) for _ in range(5))
        ],
        "any",
    ),
    "data-over-conn-window": Case(
        [
            START
            + b"".join(headers(s, req(b"/echo", b"POST"), end=False) for s in range(1, 13, 2))
            + b"".join(data(s, b"w" * 16384) for s in range(1, 13, 2) for _ in range(3))
        ],
        "any",
    ),
    "hpack-garbage": Case([START + headers(1, b"\xff\xff\xff\xff\xff\xff")], "conn"),
    "hpack-index-zero": Case([START + headers(1, b"\x80")], "conn"),
    "hpack-index-out-of-range": Case([START + headers(1, b"\xfe")], "conn"),
    "hpack-truncated-literal": Case([START + headers(1, b"\x00\x05ab")], "conn"),
    "hpack-bad-huffman": Case([START + headers(1, b"\x00\x81\xff\x01a")], "conn"),
    "hpack-size-update-too-big": Case(
        [START + headers(1, b"\x3f\xe1\xff\x03" + block(req()))], "conn"
    ),
    "hpack-size-update-after-field": Case([START + headers(1, block(req()) + b"\x20")], "conn"),
    "hpack-integer-overflow": Case([START + headers(1, b"\x0f" + b"\xff" * 12 + b"\x01")], "conn"),
    "huge-header-list-after-ack": Case(
        [START + headers(1, _BIG[:8000], end_headers=False) + cont(1, _BIG[8000:])], "stream"
    ),
    "huge-header-list-before-ack": Case(
        [PREFACE + settings() + headers(1, _BIG[:8000], end_headers=False) + cont(1, _BIG[8000:])],
        "stream",
    ),
    "too-many-headers": Case(
        [START + headers(1, req(extra=[(b"x-%d" % i, b"v") for i in range(30)]))], "stream"
    ),
    "rapid-reset": Case(
        [START + b"".join(get(s, b"/big?200000") + rst(s) for s in range(1, 31, 2))], "conn"
    ),
    "rapid-reset-posts": Case(
        [
            START
            + b"".join(
                headers(s, req(b"/echo", b"POST"), end=False) + rst(s) for s in range(1, 31, 2)
            )
        ],
        "conn",
    ),
    "ping-flood": Case([START + ping() * 60], "conn"),
    "settings-flood": Case([START + settings() * 60], "conn"),
    "window-update-flood": Case([START + wu(0, 1) * 60], "conn"),
    "priority-flood": Case([START + priority(1, 0) * 60], "conn"),
    "empty-data-flood": Case(
        [START + headers(1, req(b"/echo", b"POST"), end=False) + data(1, b"") * 60], "conn"
    ),
    "too-many-concurrent-streams": Case(
        [START + b"".join(get(s, b"/big?200000") for s in range(1, 23, 2))], "conn"
    ),
    "streams-per-connection-limit": Case([START + get(1)] + [get(s) for s in range(3, 51, 2)]),
    # the 21st stream gets GOAWAY(NO_ERROR, last=its id) while 7 answers wait for window
    "streams-per-connection-limit-open": Case(
        [START + wu(0, 1 << 20) + b"".join(get(s, b"/big?70000") for s in range(1, 15, 2))]
        + [get(s) for s in range(15, 43, 2)]
        + [b"".join(wu(s, 1 << 16) for s in range(1, 15, 2))],
        "any",
    ),
    # the limits' edges (LIMITS: 50 control frames, 10 resets, 20 streams; the client's
    # SETTINGS counts as a control frame)
    "ping-49-under-flood-limit": Case([START + ping() * 49 + get(1)]),
    "ping-50-at-flood-limit": Case([START + ping() * 50 + get(1)], "conn"),
    "rapid-reset-10-under-limit": Case(
        [START + b"".join(get(s, b"/big?200000") + rst(s) for s in range(1, 21, 2)) + get(21)]
    ),
    "rapid-reset-11-over-limit": Case(
        [START + b"".join(get(s, b"/big?200000") + rst(s) for s in range(1, 23, 2)) + get(23)],
        "conn",
    ),
    "streams-20-at-limit": Case([START + get(1)] + [get(s) for s in range(3, 41, 2)]),
    "goaway-short": Case([START + frame(GOAWAY, 0, 0, b"\x00" * 7)], "conn"),
    "window-update-long": Case(
        [START + frame(WINDOW_UPDATE, 0, 0, b"\x00\x00\x00\x01\x00")], "conn"
    ),
    "settings-max-concurrent-from-client": Case(
        [PREFACE + settings((MAX_STREAMS, 0)) + SETTINGS_ACK + get(1)]
    ),
    "stream-id-max": Case([START + get((1 << 31) - 1)]),
    "stream-id-max-then-more": Case([START + get((1 << 31) - 1) + get(1)], "conn"),
    "priority-closed-stream": Case([START + get(1), priority(1, 0) + get(3)]),
    "data-after-trailers": Case(
        [
            START
            + headers(1, req(b"/echo", b"POST"), end=False)
            + headers(1, [(b"x-t", b"1")], end=True)
            + data(1, b"late")
        ],
        "any",
    ),
    "hpack-evictions": Case(
        [
            START
            + b"".join(
                headers(s, b)
                for s, b in zip(
                    range(1, 13, 2),
                    _hpack_encoded(
                        *[req(b"/e%d" % i, extra=[(b"x-fill", b"%d" % i * 1500)]) for i in range(6)]
                    ),
                    strict=True,
                )
            )
        ]
    ),
    "hpack-dynamic-ref-after-table-size-zero": Case(
        [START + headers(1, _B3[0]) + headers(3, b"\x20" + _B3[1])], "conn"
    ),
    # RFC 9113 §6.5.2: a field's size is name + value + 32; req() is 172, x-pad 37 + value
    "header-list-at-limit": Case([START + headers(1, req(extra=[(b"x-pad", b"p" * 3887)]))]),
    "header-list-over-limit": Case(
        [START + headers(1, req(extra=[(b"x-pad", b"p" * 3888)]))], "stream"
    ),
    # h2 holds at most 64 frames of one header block (CONTINUATION_BACKLOG)
    "header-block-in-64-frames": Case(
        [
            START + headers(1, _CONT[:8], end_headers=False),
            b"".join(cont(1, _CONT[8 + i * 8 : 16 + i * 8], end=False) for i in range(62)),
            cont(1, _CONT[8 + 62 * 8 :]),
        ]
    ),
    "header-block-in-65-frames": Case(
        [
            START + headers(1, _CONT[:7], end_headers=False),
            b"".join(cont(1, _CONT[7 + i * 7 : 14 + i * 7], end=False) for i in range(63)),
            cont(1, _CONT[7 + 63 * 7 :]),
        ],
        "conn",
    ),
    "header-block-then-65-empty-continuations": Case(
        [START + headers(1, _CONT, end_headers=False), cont(1, b"", end=False) * 64 + cont(1, b"")],
        "conn",
    ),
    # a refusal (400, 431) whose connection ends in the same read: see KNOWN_BUGS
    "refused-400-then-client-goaway": Case([START + get(1, b"abc") + goaway(0)], "any"),
    "refused-431-then-client-goaway": Case(
        [START + headers(1, req(extra=[(b"x-pad", b"p" * 3888)])) + goaway(0)], "any"
    ),
    "zero-length-headers": Case(
        [START + frame(HEADERS, END_HEADERS | END_STREAM, 1, b"")], "stream"
    ),
    "zero-length-unknown-frame": Case([START + frame(0x20, 0, 0, b"") + get(1)]),
    # ---------------------------------------------------------------- malformed requests
    "mal-no-method": Case(
        [START + headers(1, [(b":scheme", b"https"), (b":path", b"/"), (b":authority", b"a")])],
        "stream",
    ),
    "mal-no-path": Case(
        [START + headers(1, [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"a")])],
        "stream",
    ),
    "mal-no-scheme": Case(
        [START + headers(1, [(b":method", b"GET"), (b":path", b"/"), (b":authority", b"a")])],
        "stream",
    ),
    "mal-no-authority-no-host": Case([START + headers(1, req(authority=None))], "any"),
    "mal-duplicate-method": Case(
        [START + headers(1, req(extra=[(b":method", b"POST")]))], "stream"
    ),
    "mal-duplicate-path": Case([START + headers(1, [(b":path", b"/x"), *req()])], "stream"),
    "mal-unknown-pseudo": Case([START + headers(1, req(extra=[(b":foo", b"bar")]))], "stream"),
    "mal-status-in-request": Case(
        [START + headers(1, req(extra=[(b":status", b"200")]))], "stream"
    ),
    "mal-pseudo-after-regular": Case(
        [
            START
            + headers(
                1,
                [
                    (b":method", b"GET"),
                    (b"x-a", b"b"),
                    (b":scheme", b"https"),
                    (b":path", b"/"),
                    (b":authority", b"a"),
                ],
            )
        ],
        "stream",
    ),
    "mal-uppercase-name": Case([START + headers(1, req(extra=[(b"X-Upper", b"v")]))], "stream"),
    "mal-connection-header": Case(
        [START + headers(1, req(extra=[(b"connection", b"close")]))], "stream"
    ),
    "mal-keep-alive": Case([START + headers(1, req(extra=[(b"keep-alive", b"5")]))], "stream"),
    "mal-proxy-connection": Case(
        [START + headers(1, req(extra=[(b"proxy-connection", b"x")]))], "stream"
    ),
    "mal-transfer-encoding": Case(
        [START + headers(1, req(extra=[(b"transfer-encoding", b"chunked")]))], "stream"
    ),
    "mal-upgrade": Case([START + headers(1, req(extra=[(b"upgrade", b"h2c")]))], "stream"),
    "mal-te-gzip": Case([START + headers(1, req(extra=[(b"te", b"gzip")]))], "stream"),
    "mal-te-trailers-gzip": Case(
        [START + headers(1, req(extra=[(b"te", b"trailers, gzip")]))], "stream"
    ),
    # RFC 9113 §8.1.1 makes these stream errors; the reference (h2) ends the connection
    "mal-content-length-mismatch-short": Case(
        [START + post(1, b"hello", [(b"content-length", b"10")])], "any"
    ),
    "mal-content-length-mismatch-long": Case(
        [START + post(1, b"hello", [(b"content-length", b"2")])], "any"
    ),
    "mal-content-length-no-body": Case(
        [START + headers(1, req(extra=[(b"content-length", b"5")]))], "any"
    ),
    "mal-content-length-garbage": Case(
        [START + post(1, b"hi", [(b"content-length", b"abc")])], "any"
    ),
    "mal-content-length-two": Case(
        [START + post(1, b"hi", [(b"content-length", b"2"), (b"content-length", b"2")])], "any"
    ),
    "mal-empty-path": Case([START + get(1, b"")], "stream"),
    "mal-path-no-slash": Case([START + get(1, b"abc")], "stream"),
    "mal-path-absolute": Case([START + get(1, b"https://a.test/x")], "stream"),
    "mal-path-asterisk-get": Case([START + get(1, b"*")], "any"),
    "mal-scheme-http": Case([START + get(1, scheme=b"http")], "stream"),
    "mal-connect": Case(
        [START + headers(1, [(b":method", b"CONNECT"), (b":authority", b"a.test:443")])], "any"
    ),
    "mal-connect-with-path": Case(
        [
            START
            + headers(
                1,
                [
                    (b":method", b"CONNECT"),
                    (b":authority", b"a.test:443"),
                    (b":path", b"/"),
                    (b":scheme", b"https"),
                ],
            )
        ],
        "any",
    ),
    # RFC 8441 is not advertised (no SETTINGS_ENABLE_CONNECT_PROTOCOL), yet the reference takes it
    "mal-extended-connect": Case(
        [START + headers(1, req(extra=[(b":protocol", b"websocket")], method=b"CONNECT"))], "any"
    ),
    "mal-host-differs": Case([START + headers(1, req(extra=[(b"host", b"b.test")]))], "stream"),
    "mal-two-hosts": Case(
        [START + headers(1, req(authority=None, extra=[(b"host", b"a"), (b"host", b"b")]))],
        "stream",
    ),
    "mal-bad-authority": Case([START + get(1, authority=b"a b")], "stream"),
    "mal-empty-authority": Case([START + get(1, authority=b"")], "any"),
    "mal-authority-userinfo": Case([START + get(1, authority=b"u@a.test")], "stream"),
    "mal-name-with-space": Case([START + headers(1, req(extra=[(b"x a", b"v")]))], "stream"),
    "mal-name-with-colon": Case([START + headers(1, req(extra=[(b"x:a", b"v")]))], "stream"),
    "mal-empty-name": Case([START + headers(1, req(extra=[(b"", b"v")]))], "stream"),
    "mal-value-nul": Case([START + headers(1, req(extra=[(b"x-a", b"a\x00b")]))], "stream"),
    "mal-value-crlf": Case([START + headers(1, req(extra=[(b"x-a", b"a\r\nb: c")]))], "stream"),
    "mal-value-leading-space": Case([START + headers(1, req(extra=[(b"x-a", b" v")]))], "stream"),
    "mal-value-obs-text": Case([START + headers(1, req(extra=[(b"x-a", b"caf\xe9")]))]),
    "mal-method-lowercase": Case([START + get(1, method=b"get")], "any"),
    "mal-method-empty": Case([START + get(1, method=b"")], "any"),
    "mal-trailers-with-pseudo": Case(
        [
            START
            + headers(1, req(b"/echo", b"POST"), end=False)
            + data(1, b"x")
            + headers(1, [(b":path", b"/")], end=True)
        ],
        "stream",
    ),
    "mal-trailers-without-end-stream": Case(
        [
            START
            + headers(1, req(b"/echo", b"POST"), end=False)
            + data(1, b"x")
            + headers(1, [(b"x-t", b"t")], end=False)
        ],
        "any",
    ),
    "mal-then-good-stream": Case(
        [START + headers(1, req(extra=[(b"connection", b"x")])) + get(3)], "stream"
    ),
}

# Cases where our own HTTP/2 core (web/h2core.py, issue 19) answers differently from the
# reference on purpose: name -> why the new answer is right. They apply once web.http2 no
# longer drives the h2 library; while it does, the code under test is the reference.
_RFC_COMPRESSION = "RFC 9113 §4.3: a field block that does not decode is COMPRESSION_ERROR"
NEW_CORE_CHANGES: dict[str, str] = {
    "post-body-fills-window": "no WINDOW_UPDATE for a stream the client has ended: it can "
    "send nothing more on it (h2 sent one; the connection's window is reopened the same)",
    "client-goaway-then-request": "after the client's GOAWAY the connection closes without "
    "a GOAWAY of ours (h2 sent PROTOCOL_ERROR); nothing is served either way",
    "bad-preface-http1": "RFC 9113 §3.4: a bad preface is a connection error PROTOCOL_ERROR; "
    "we say so with GOAWAY before closing (h2 closed silently)",
    "bad-preface-garbage": "as bad-preface-http1",
    "settings-ack-with-payload": "RFC 9113 §6.5: SETTINGS ACK with a payload is "
    "FRAME_SIZE_ERROR (h2: PROTOCOL_ERROR)",
    "window-update-zero-stream": "RFC 9113 §6.9: WINDOW_UPDATE 0 on a stream is a stream "
    "error (h2 ended the connection)",
    "headers-self-dependency": "RFC 9113 §5.3.1: a stream depending on itself is a stream "
    "error (h2 ended the connection); on an idle stream (PRIORITY alone) it stays a "
    "connection error, as no RST_STREAM may name an idle stream (§5.1)",
    "frame-length-too-large-header-only": "RFC 9113 §4.2: refused on its 9-byte header; h2 "
    "buffered up to 16 MiB of a frame it would refuse",
    "frame-length-too-large-partial-body": "as frame-length-too-large-header-only",
    "hpack-garbage": _RFC_COMPRESSION,
    "hpack-index-zero": _RFC_COMPRESSION,
    "hpack-index-out-of-range": _RFC_COMPRESSION,
    "hpack-truncated-literal": _RFC_COMPRESSION,
    "hpack-bad-huffman": _RFC_COMPRESSION,
    "hpack-size-update-too-big": _RFC_COMPRESSION,
    "hpack-size-update-after-field": _RFC_COMPRESSION,
    "hpack-integer-overflow": _RFC_COMPRESSION,
    "hpack-dynamic-ref-after-table-size-zero": _RFC_COMPRESSION,
    "streams-per-connection-limit": "the stream named in GOAWAY(NO_ERROR, last) is answered; "
    "h2 closed its state machine with the GOAWAY, so that answer was lost",
    "streams-per-connection-limit-open": "after GOAWAY(NO_ERROR) the open responses finish, "
    "as the docstring of web/http2.py promises; h2 cut them and answered the client's "
    "WINDOW_UPDATEs with GOAWAY(PROTOCOL_ERROR)",
    "mal-content-length-mismatch-short": "RFC 9113 §8.1.1: a malformed request is a stream "
    "error (h2 ended the connection)",
    "mal-content-length-mismatch-long": "as mal-content-length-mismatch-short",
    "refused-400-then-client-goaway": "the refusal of a request whose connection ends in the "
    "same read is dropped quietly (the reference's task raised ConnectionError that nothing "
    "retrieved: KNOWN_BUGS)",
    "refused-431-then-client-goaway": "as refused-400-then-client-goaway",
}
CHANGED: dict[str, str] = {} if hasattr(http2, "h2") else NEW_CORE_CHANGES


_ref_cache: dict[str, dict[str, Any]] = {}


def reference(name: str) -> dict[str, Any]:
    if name not in _ref_cache:
        _ref_cache[name] = run(h2_reference.H2Connection, CASES[name].steps)
    return _ref_cache[name]


STRICT = os.environ.get("H2DIFF_STRICT") == "1"


def differences(ref: dict[str, Any], got: dict[str, Any]) -> list[str]:
    """What differs; the interleaving of streams and the order of events only when STRICT."""
    out = []
    for key in ref:
        if key in ("order", "event_order") and not STRICT:
            continue
        if ref[key] != got.get(key):
            out.append(
                f"{key}:\n  reference: {ref[key]!r:.3000}\n  under test: {got.get(key)!r:.3000}"
            )
    return out


def _statuses(obs: dict[str, Any]) -> list[int]:
    return [
        int(dict(f[3]).get(b":status", b"0"))
        for f in obs["order"]
        if f[0] == "HEADERS" and dict(f[3]).get(b":status", b"0").isdigit()
    ]


@pytest.mark.parametrize("name", list(CASES))
def test_same_as_reference(name: str) -> None:
    ref = reference(name)
    got = run(http2.H2Connection, CASES[name].steps)
    diff = differences(ref, got)
    if name in CHANGED:
        assert diff, f"{name} is listed in CHANGED but answers as the reference did"
        return
    assert not diff, "\n".join(diff)


# Bugs of the reference (so of main) that the new core keeps: the case's own test fails
# until they are fixed (strict xfail: a fix makes it pass, and then this entry must go).
KNOWN_BUGS = {
    "refused-400-then-client-goaway": "H2Connection._refuse: the refusal task runs after the "
    "connection closed, responder.start raises ConnectionError and nothing awaits the task "
    "(asyncio logs 'Task exception was never retrieved'); found by fuzz/ http2_client_view",
    "refused-431-then-client-goaway": "as refused-400-then-client-goaway",
}


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=KNOWN_BUGS[n]))
        if n in KNOWN_BUGS
        else n
        for n in CASES
    ],
)
def test_case_tests_what_it_says(name: str) -> None:
    """The reference's answer has the kind the case claims, so a case cannot silently stop
    exercising what its name says (and the answers are not all the same)."""
    case, ref = CASES[name], reference(name)
    assert not ref["loop_errors"], ref["loop_errors"]
    goaways = [f[2] for f in ref["order"] if f[0] == "GOAWAY"]
    error_goaway = any(code != "NO_ERROR" for code in goaways)
    rsts = [f for f in ref["order"] if f[0] == "RST"]
    bad_status = [s for s in _statuses(ref) if s >= 400]
    if case.kind == "ok":
        assert not error_goaway and not rsts and not bad_status, ref["order"]
        assert _statuses(ref) or any(f[0] == "PING" for f in ref["order"]), ref["order"]
    elif case.kind == "conn":
        assert error_goaway or (ref["closed"] and not _statuses(ref)), ref["order"]
    elif case.kind == "stream":
        assert (rsts or bad_status) and not error_goaway, ref["order"]


class _ResetCode(h2_reference.H2Connection):
    """Resets malformed streams with INTERNAL_ERROR instead of PROTOCOL_ERROR."""

    def _malformed(self, sid: int, headers: Any, flags: Any) -> bool:
        import h2.exceptions
        from h2.utilities import validate_headers

        try:
            for _ in validate_headers(headers or (), flags):
                pass
        except h2.exceptions.ProtocolError:
            self.conn.reset_stream(sid, 2)
            return True
        return False


class _ConnError(h2_reference.H2Connection):
    """Ends the whole connection on a malformed request (a stream error in RFC 9113)."""

    def _malformed(self, sid: int, headers: Any, flags: Any) -> bool:
        if super()._malformed(sid, headers, flags):
            self._calm("malformed")
            return True
        return False


class _NoFloodCount(h2_reference.H2Connection):
    def _count_control(self) -> None:
        pass


class _ShortWrite(h2_reference.H2Connection):
    """Loses the last byte of every large write (a framing bug)."""

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data and self.transport is not None and not self.closed:
            self.transport.write(data[:-1] if len(data) > 2000 else data)


class _NoWindowWake(h2_reference.H2Connection):
    """Never resumes a response blocked on flow control."""

    def _wake_windows(self, sid: int) -> None:
        pass


@pytest.mark.parametrize(
    ("mutant", "name"),
    [
        (_ResetCode, "mal-uppercase-name"),
        (_ConnError, "mal-then-good-stream"),
        (_NoFloodCount, "ping-flood"),
        (_ShortWrite, "big-response-large-iws"),
        (_NoWindowWake, "big-response-window-update-resume"),
        (_NoWindowWake, "iws-grow-mid-stream"),
    ],
    ids=lambda v: getattr(v, "__name__", v),
)
def test_a_different_answer_is_seen(mutant: Callable[..., asyncio.Protocol], name: str) -> None:
    """The comparison can fail: servers with bugs a new core could have differ from the
    reference on the case that exercises the bug."""
    assert differences(reference(name), run(mutant, CASES[name].steps))


def test_corpus_is_large_and_varied() -> None:
    assert len(CASES) >= 100
    kinds = collections.Counter(c.kind for c in CASES.values())
    assert kinds["ok"] >= 40 and kinds["conn"] >= 30 and kinds["stream"] >= 25, kinds


def test_changes_name_cases() -> None:
    assert set(NEW_CORE_CHANGES) <= set(CASES), set(NEW_CORE_CHANGES) - set(CASES)
    assert set(KNOWN_BUGS) <= set(CASES), set(KNOWN_BUGS) - set(CASES)
