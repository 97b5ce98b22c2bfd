"""asyncio glue for `core.tls13_server`: a Protocol on the visitor's socket that runs the TLS
connection, and the Transport the HTTP layer writes plaintext to (the role asyncio's own
sslproto plays for OpenSSL). The HTTP protocols (h11/h2) cannot tell the difference.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from blindfold.core import tls13_server as ts


class TlsEngine(Protocol):
    """What the glue needs of a server-side TLS engine: `core.tls13_server.TlsServer` (keyless)
    or `io.openssl_engine.OpenSslServer` (the edge's own key)."""

    @property
    def state(self) -> str: ...

    @property
    def server_name(self) -> str | None: ...

    @property
    def alpn(self) -> str | None: ...

    @property
    def cipher_suite(self) -> int: ...

    @property
    def resumed(self) -> bool: ...

    def receive(self, data: bytes, now: float) -> list[ts.Event]: ...

    def data_to_send(self) -> bytes: ...

    def send(self, data: bytes | bytearray | memoryview) -> None: ...

    def close(self) -> None: ...


class TlsAppTransport(asyncio.Transport):
    """What the HTTP layer sees: write() encrypts, close() sends close_notify."""

    def __init__(self, owner: TlsServerProtocol) -> None:
        super().__init__()
        self._owner = owner
        self._closing = False
        self._pending: list[bytes | memoryview] = []
        self._pending_bytes = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        # Writes made in one turn of the loop (a response's head and body, several HTTP/2
        # frames) are sealed together: fewer, fuller records and one send.
        owner = self._owner
        if self._closing or owner.raw is None or owner.raw.is_closing() or not data:
            return
        owner.bytes_out += len(data)
        if not self._pending:
            owner.flusher.add(self)  # sealed and sent at the end of this turn of the loop
        # bytes, and views of bytes (a cached body's slices), are immutable: kept as they
        # are; anything else is copied (the caller may reuse its buffer once write returns,
        # as with any asyncio transport)
        if type(data) is not bytes and not (
            type(data) is memoryview and type(data.obj) is bytes and data.contiguous
        ):
            data = bytes(data)
        self._pending.append(data)
        self._pending_bytes += len(data)
        if self._pending_bytes >= 1 << 16:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        owner = self._owner
        if owner.raw is None or owner.raw.is_closing():
            self._pending.clear()
            self._pending_bytes = 0
            return
        pending = self._pending
        if len(pending) == 1:
            owner.server.send(pending[0])
        elif self._pending_bytes <= RECORD_BYTES:  # small pieces: one record
            owner.server.send(b"".join(pending))
        else:
            for record in records(pending):
                owner.server.send(record)
        pending.clear()
        self._pending_bytes = 0
        owner.flush()  # everything sealed in this turn: one write to the socket

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def can_write_eof(self) -> bool:
        return False

    def write_eof(self) -> None:
        raise NotImplementedError("TLS 1.3 has no half-close for the server: use close()")

    def close(self) -> None:
        if self._closing:
            return
        self._flush()
        self._closing = True
        owner = self._owner
        owner.server.close()
        owner.flush()
        if owner.raw is not None:
            owner.raw.close()

    def abort(self) -> None:
        self._closing = True
        if self._owner.raw is not None:
            self._owner.raw.abort()

    def is_closing(self) -> bool:
        raw = self._owner.raw
        return self._closing or raw is None or raw.is_closing()

    def pause_reading(self) -> None:
        self._owner.reading_paused = True
        if self._owner.raw is not None:
            self._owner.raw.pause_reading()

    def resume_reading(self) -> None:
        self._owner.reading_paused = False
        if self._owner.raw is not None:
            self._owner.raw.resume_reading()

    def is_reading(self) -> bool:
        return not self._owner.reading_paused

    def get_write_buffer_size(self) -> int:
        raw = self._owner.raw
        return self._pending_bytes + (raw.get_write_buffer_size() if raw is not None else 0)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        raw = self._owner.raw
        return raw.get_write_buffer_limits() if raw is not None else (0, 0)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if self._owner.raw is not None:
            self._owner.raw.set_write_buffer_limits(high, low)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        server = self._owner.server
        tls = {
            "sni": server.server_name,
            "alpn": server.alpn,
            "version": "TLSv1.3",
            "cipher_suite": f"0x{server.cipher_suite:04x}",
            "resumed": server.resumed,
        }
        if name in tls:
            return tls[name]
        raw = self._owner.raw
        return raw.get_extra_info(name, default) if raw is not None else default


RECORD_BYTES = 1 << 14  # RFC 8446 §5.1: the most plaintext a record holds


class Flusher:
    """The app transports of one loop with writes to seal and send, flushed by ONE callback
    queued behind what the loop has ready, rather than one callback per connection: every
    response written in a turn (of the many connections a busy turn serves) leaves in the
    next, as before, for one Handle a turn instead of one a response. The turn between the
    write and the send is kept on purpose: sending from inside the read made the clients'
    next requests arrive one by one, and cost more per response than it saved."""

    __slots__ = ("_dirty", "_queued")  # no reference to the loop: it keys _FLUSHERS weakly

    def __init__(self) -> None:
        self._dirty: list[TlsAppTransport] = []
        self._queued = False

    def add(self, transport: TlsAppTransport) -> None:
        self._dirty.append(transport)
        if not self._queued:
            self._queued = True
            transport._owner.loop.call_soon(self._run)

    def _run(self) -> None:
        dirty, self._dirty = self._dirty, []
        self._queued = False
        for transport in dirty:
            try:
                transport._flush()
            except Exception as exc:  # one connection's failure is its own, as with a Handle
                transport._owner.loop.call_exception_handler(
                    {"message": "TLS flush failed", "exception": exc, "transport": transport}
                )


_FLUSHERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Flusher] = (
    weakref.WeakKeyDictionary()
)


def flusher_of(loop: asyncio.AbstractEventLoop) -> Flusher:
    flusher = _FLUSHERS.get(loop)
    if flusher is None:
        flusher = _FLUSHERS[loop] = Flusher()
    return flusher


def records(pieces: Sequence[bytes | memoryview]) -> list[bytes | memoryview]:
    """The plaintext of `pieces` cut into full records (RECORD_BYTES; the last may be short)
    across the pieces' boundaries: a response head and its body share a record rather than
    the head taking one of its own. A record inside one piece is a slice of it (no copy);
    only records that span pieces are joined."""
    out: list[bytes | memoryview] = []
    parts: list[bytes | memoryview] = []  # the record being filled
    fill = 0
    for piece in pieces:
        view = memoryview(piece)
        pos, end = 0, len(view)
        while pos < end:
            take = min(RECORD_BYTES - fill, end - pos)
            part = view[pos : pos + take]
            pos += take
            if fill == 0 and take == RECORD_BYTES:
                out.append(part)  # a whole record inside this piece
                continue
            parts.append(part)
            fill += take
            if fill == RECORD_BYTES:
                out.append(b"".join(parts))
                parts, fill = [], 0
    if parts:
        out.append(parts[0] if len(parts) == 1 else b"".join(parts))
    return out


_FILLING: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()  # a fill is queued
KEY_SHARE_FILL_BATCH = 2  # X25519 key pairs made per callback (~50 µs each)


def fill_key_shares_later(loop: asyncio.AbstractEventLoop, pool: ts.KeySharePool) -> None:
    """Refill the handshakes' key-share pool in callbacks queued behind whatever the loop has
    ready (asyncio has no idle hook): the keys are made between connections' I/O, not on a
    handshake's path, a few at a time so that no callback holds the loop long."""
    if pool.wanted <= 0 or loop in _FILLING:
        return
    _FILLING.add(loop)
    loop.call_soon(_fill_key_shares, loop, pool)


def _fill_key_shares(loop: asyncio.AbstractEventLoop, pool: ts.KeySharePool) -> None:
    # a module-level function, not a closure that queues itself: a closure referring to
    # itself is a reference cycle only the cyclic collector frees
    pool.fill(KEY_SHARE_FILL_BATCH)
    if pool.wanted > 0:
        loop.call_soon(_fill_key_shares, loop, pool)
    else:
        _FILLING.discard(loop)


# One read buffer for every connection of the process: asyncio fills it and calls
# buffer_updated synchronously, which copies the bytes out before the next read. (asyncio's
# default for plain protocols allocates 256 KiB per read: an mmap and munmap each time.)
_READ_BUFFER = memoryview(bytearray(65536))
WRITE_BUFFER_HIGH = 256 * 1024


class TlsServerProtocol(asyncio.BufferedProtocol):
    """Runs a `TlsServer` whose ClientHello is already processed (its flight is ready) on the
    visitor's socket. `app_factory(alpn)` makes the HTTP protocol when the first application
    data arrives (browsers open connections they may never use: those cost no HTTP state), and
    a connection idle for `first_data_timeout_s` after its handshake is closed.
    `on_done(reason, bytes_in, bytes_out)` is called once when the connection is over."""

    def __init__(
        self,
        server: TlsEngine,
        app_factory: Callable[[str | None], asyncio.Protocol],
        on_done: Callable[[str, int, int], None],
        handshake_timeout_s: float,
        first_data_timeout_s: float = 60.0,
    ) -> None:
        self.server = server
        self.first_data_timeout_s = first_data_timeout_s
        self.alpn: str | None = None
        self.app_factory = app_factory
        self.on_done = on_done
        self.handshake_timeout_s = handshake_timeout_s
        self.raw: asyncio.Transport | None = None
        self.app: asyncio.Protocol | None = None
        self.app_transport: TlsAppTransport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.reason = ""
        self.bytes_in = 0
        self.bytes_out = 0
        self.reading_paused = False
        self.aborted = False
        self.loop = asyncio.get_event_loop()
        self.flusher = flusher_of(self.loop)

    # ---------------------------------------------------------------- raw side
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        if self.aborted:  # closed while the transport was being made (a ban, a drain)
            transport.abort()
            return
        self.raw = transport
        # Up to 256 KiB of ciphertext may wait in the socket's buffer before the HTTP layer is
        # paused: a response body of a few hundred KiB then goes out without a pause/resume
        # round per 64 KiB (asyncio's default), at a bounded cost per connection.
        transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH)
        self.timer = self.loop.call_later(self.handshake_timeout_s, self._handshake_timeout)
        self.flush()
        if isinstance(self.server, ts.TlsServer):  # its handshake used a key share
            fill_key_shares_later(self.loop, self.server.key_shares)

    def get_buffer(self, sizehint: int) -> memoryview:
        return _READ_BUFFER

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(bytes(_READ_BUFFER[:nbytes]))

    def data_received(self, data: bytes) -> None:
        self._events(self.server.receive(data, self.loop.time()))
        self.flush()

    def eof_received(self) -> bool | None:
        # The visitor closed TCP; without close_notify that may be a truncation attack, and the
        # HTTP layer treats it as the end of input either way.
        if self.app is not None:
            self.app.eof_received()
        self.reason = self.reason or "eof"
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        app, self.app = self.app, None
        if app is not None:
            app.connection_lost(exc)
        self.raw = None
        self.app_transport = None  # it refers back to us: free both without the cyclic GC
        reason = self.reason or ("reset" if exc is not None else "closed")
        self.on_done(reason, self.bytes_in, self.bytes_out)

    def pause_writing(self) -> None:
        if self.app is not None:
            self.app.pause_writing()

    def resume_writing(self) -> None:
        if self.app is not None:
            self.app.resume_writing()

    # ---------------------------------------------------------------- TLS events
    def _events(self, events: list[ts.Event]) -> None:
        for event in events:
            if isinstance(event, ts.DataReceived):
                self.bytes_in += len(event.data)
                # "closing": OpenSSL read the visitor's close_notify in the same batch as this
                # request; the request is still answered (TLS 1.3 half-close).
                if self.app is None and self.server.state in ("open", "closing"):
                    self._start_app()
                if self.app is not None:
                    self.app.data_received(event.data)
            elif isinstance(event, ts.HandshakeCompleted):
                if self.timer is not None:
                    self.timer.cancel()
                self.alpn = event.alpn
                self.timer = self.loop.call_later(self.first_data_timeout_s, self._idle_timeout)
            elif isinstance(event, ts.PeerClosed):
                self.reason = "closed"
                if self.app is not None:
                    keep = self.app.eof_received()
                    if not keep and self.app_transport is not None:
                        self.app_transport.close()
                else:
                    self.server.close()
                    self.flush()
                    if self.raw is not None:
                        self.raw.close()
            elif isinstance(event, ts.ConnectionFailed):
                self.reason = f"tls_{event.reason}"
                self.flush()
                if self.raw is not None:
                    self.raw.close()
                return

    def flush(self) -> None:
        data = self.server.data_to_send()
        if data and self.raw is not None and not self.raw.is_closing():
            self.raw.write(data)

    def _start_app(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.app = self.app_factory(self.alpn)
        self.app_transport = TlsAppTransport(self)
        self.app.connection_made(self.app_transport)

    def _handshake_timeout(self) -> None:
        self.timer = None
        if self.app is None and self.raw is not None:
            self.reason = "tls_handshake_timeout"
            self.raw.abort()

    def _idle_timeout(self) -> None:
        self.timer = None
        if self.app is None and self.raw is not None:
            self.reason = "idle_timeout"
            self.server.close()
            self.flush()
            self.raw.close()

    def abort(self) -> None:
        self.aborted = True
        if self.raw is not None:
            self.raw.abort()
