"""Move bytes between two sockets until both directions are done, without Python touching them
once a direction carries bulk data.

Each direction starts in copy mode (read up to COPY_CHUNK bytes, write them): for the few small
TLS records of a short exchange that is cheaper than splicing through a pipe. The first read
that fills COPY_CHUNK switches that direction to `os.splice` socket -> pipe -> socket (Linux;
the kernel moves page references, no copy through user space), like HAProxy's splice-auto.
`mode="splice"` splices from the first byte, `mode="copy"` never splices (and is the fallback
where os.splice does not exist).

Sockets are registered once, edge-triggered, for input and output: no epoll_ctl per state
change. The price of edge triggering is remembering readiness: `readable`/`writable` are set by
events and cleared when a read comes back short or a call would block (a short read from a TCP
socket means its queue was empty at that moment and more data raises a new edge; after a
FIN or reset has been signalled we read on until EOF or the error).

Half-close is honoured: when one side stops sending, the other side's write half is shut down
once everything read has been delivered, and the relay ends when both directions are shut (or
on the first error). Pipes come from a small pool of empty pipes.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
from collections.abc import Callable

from blindfold.io.compat import CSocket
from blindfold.io.reactor import EPOLLERR, EPOLLHUP, EPOLLIN, EPOLLOUT, EPOLLRDHUP

F_SETPIPE_SZ = 1031
HAVE_SPLICE = hasattr(os, "splice")
COPY_CHUNK = 16384
_SPLICE_FLAGS = (os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK) if HAVE_SPLICE else 0
_RESET_ERRNOS = {
    errno.ECONNRESET,
    errno.EPIPE,
    errno.ETIMEDOUT,
    errno.EHOSTUNREACH,
    errno.ENETUNREACH,
    errno.ECONNABORTED,
}
_IN = EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR
_OUT = EPOLLOUT | EPOLLHUP | EPOLLERR
_END = EPOLLRDHUP | EPOLLHUP | EPOLLERR


class PipePool:
    """Reusable non-blocking pipe pairs of one capacity. Only empty pipes come back."""

    def __init__(self, size: int, keep: int = 256) -> None:
        self.size = size
        self.keep = keep
        self._free: list[tuple[int, int]] = []

    def get(self) -> tuple[int, int]:
        if self._free:
            return self._free.pop()
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            self.size = fcntl.fcntl(w, F_SETPIPE_SZ, self.size)
        except OSError:
            pass  # over fs.pipe-user-pages-soft or pipe-max-size: keep the default capacity
        return r, w

    def put(self, pipe: tuple[int, int], empty: bool) -> None:
        if empty and len(self._free) < self.keep:
            self._free.append(pipe)
        else:
            os.close(pipe[0])
            os.close(pipe[1])

    def clear(self) -> None:
        for r, w in self._free:
            os.close(r)
            os.close(w)
        self._free.clear()


class _Half:
    """One direction: src -> (bytes | pipe) -> dst."""

    __slots__ = (
        "data",
        "dst",
        "dst_sock",
        "eof",
        "hup",
        "moved",
        "offset",
        "pending",
        "pipe_r",
        "pipe_w",
        "readable",
        "shut",
        "splice",
        "src",
        "writable",
    )

    def __init__(self, src: CSocket, dst: CSocket, splice: bool, readable: bool) -> None:
        self.src = src.fileno()
        self.dst = dst.fileno()
        self.dst_sock = dst
        self.splice = splice
        self.pipe_r = self.pipe_w = -1
        self.data = b""  # copy mode: bytes read and not yet written (from offset)
        self.offset = 0
        self.pending = 0  # bytes read and not yet delivered
        self.moved = 0  # bytes delivered to dst
        self.eof = False
        self.shut = False
        self.readable = readable
        self.writable = True
        self.hup = False  # src signalled FIN, reset or error: read until EOF or error


class Relay:
    """Relay between `a` (the client) and `b` (the origin); both already registered with the
    reactor (edge-triggered, in and out) by the caller, whose handlers forward to `on_a`/`on_b`.

    `on_done(error)` is called once: None when both directions ended cleanly, else a short reason
    ('reset', 'error:<errno name>'). The owner closes the sockets and watches `moved` (bytes
    delivered either way) for its idle timeout. `a_readable`/`b_readable` say whether a socket
    may hold bytes no event will announce (it was registered, and its edge consumed, earlier).
    """

    __slots__ = ("_ab", "_ba", "_done", "_on_done", "_pool", "chunk", "first_end")

    def __init__(
        self,
        pool: PipePool,
        a: CSocket,
        b: CSocket,
        on_done: Callable[[str | None], None],
        mode: str = "auto",
        *,
        a_readable: bool = True,
        b_readable: bool = True,
    ) -> None:
        self._pool = pool
        splice = HAVE_SPLICE and mode == "splice"
        self._ab = _Half(a, b, splice, a_readable)
        self._ba = _Half(b, a, splice, b_readable)
        self._on_done: Callable[[str | None], None] | None = on_done
        self._done = False
        self.first_end = ""  # "a" or "b": whose end (FIN, reset, error) was seen first
        self.chunk = pool.size
        if mode == "copy" or not HAVE_SPLICE:
            self.chunk = 0  # never switch to splice
        if splice:
            self._ab.pipe_r, self._ab.pipe_w = pool.get()
            self._ba.pipe_r, self._ba.pipe_w = pool.get()

    @property
    def bytes_a_to_b(self) -> int:
        return self._ab.moved

    @property
    def bytes_b_to_a(self) -> int:
        return self._ba.moved

    @property
    def moved(self) -> int:
        return self._ab.moved + self._ba.moved

    def start(self) -> None:
        """Move whatever is already known to be waiting (edge-triggered: no event will come)."""
        if self._ab.readable:
            self._pump(self._ab)
        if self._ba.readable and not self._done:
            self._pump(self._ba)

    def on_a(self, mask: int) -> None:
        ab, ba = self._ab, self._ba
        if mask == EPOLLOUT and not ba.pending:
            ba.writable = True  # nothing waits to be written here: remember and return
            return
        if mask & _IN:
            ab.readable = True
            if mask & _END:
                ab.hup = True
        if mask & _OUT:
            ba.writable = True
        # a direction has work only if it may read or has bytes to write where it now can
        # (after a pump, a direction that saw EOF has also shut down its destination)
        if ab.readable or (ab.pending and ab.writable):
            self._pump(ab)
        if (ba.readable or (ba.pending and ba.writable)) and not self._done:
            self._pump(ba)

    def on_b(self, mask: int) -> None:
        ab, ba = self._ab, self._ba
        if mask == EPOLLOUT and not ab.pending:
            ab.writable = True
            return
        if mask & _IN:
            ba.readable = True
            if mask & _END:
                ba.hup = True
        if mask & _OUT:
            ab.writable = True
        if ba.readable or (ba.pending and ba.writable):
            self._pump(ba)
        if (ab.readable or (ab.pending and ab.writable)) and not self._done:
            self._pump(ab)

    def _pump(self, h: _Half) -> None:
        while True:
            if h.pending:
                if not h.writable:
                    return
                try:
                    if h.data:  # copy-mode bytes (also the last ones read before a switch)
                        offset = h.offset
                        n = os.write(h.dst, memoryview(h.data)[offset:] if offset else h.data)
                        h.offset = offset + n
                        if n == h.pending:
                            h.data = b""
                    else:
                        n = os.splice(h.pipe_r, h.dst, h.pending, flags=_SPLICE_FLAGS)
                except BlockingIOError:
                    h.writable = False
                    return
                except OSError as exc:
                    return self._finish(_reason(exc), self._other(h))
                h.pending -= n
                h.moved += n
                continue
            if h.eof:
                if not h.shut:
                    h.shut = True
                    try:
                        h.dst_sock.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                    if self._ab.shut and self._ba.shut:
                        self._finish(None)
                return
            if not h.readable:
                return
            if not h.splice:
                # Copy mode, the common case of short exchanges: read, then write what was
                # read at once while it is in hand (the loop above finishes a partial write).
                try:
                    data = os.read(h.src, COPY_CHUNK)
                except BlockingIOError:
                    h.readable = False
                    return
                except OSError as exc:
                    return self._finish(_reason(exc), h)
                n = len(data)
                if n == 0:
                    h.eof = True
                    self._ended(h)
                    continue
                if n < COPY_CHUNK and not h.hup:
                    h.readable = False  # (as below)
                sent = 0
                if h.writable:
                    try:
                        sent = os.write(h.dst, data)
                    except BlockingIOError:
                        h.writable = False
                    except OSError as exc:
                        return self._finish(_reason(exc), self._other(h))
                    h.moved += sent
                if sent < n:
                    h.data = data
                    h.offset = sent
                    h.pending = n - sent
                if n == COPY_CHUNK and self.chunk:
                    self._to_splice(h)
                elif not h.readable and not h.pending:
                    return
                continue
            try:
                if h.splice:
                    want = self.chunk
                    n = os.splice(h.src, h.pipe_w, want, flags=_SPLICE_FLAGS)
                else:
                    want = COPY_CHUNK
                    data = os.read(h.src, want)
                    n = len(data)
                    if n:
                        h.data = data
                        h.offset = 0
            except BlockingIOError:
                h.readable = False
                return
            except OSError as exc:
                return self._finish(_reason(exc), h)
            if n == 0:
                h.eof = True
                self._ended(h)
                continue
            if n < want and not h.hup:
                # A short read drained the socket's queue, so a new edge will announce more.
                # Not so after FIN/RST: that edge has been consumed with the data before it.
                h.readable = False
            h.pending = n
            if not h.splice and n == COPY_CHUNK and self.chunk:
                self._to_splice(h)

    def _to_splice(self, h: _Half) -> None:
        """Bulk data: splice this direction from its next read on. The switch happens with the
        copy-mode bytes still in hand; they go out first because the pipe is only read into
        once `pending` is zero."""
        h.pipe_r, h.pipe_w = self._pool.get()
        h.splice = True

    def _other(self, h: _Half) -> _Half:
        return self._ba if h is self._ab else self._ab

    def _ended(self, src: _Half) -> None:
        """`src`'s socket ended (EOF or error): remember which side did first."""
        if not self.first_end:
            self.first_end = "a" if src is self._ab else "b"

    def _finish(self, error: str | None, src: _Half | None = None) -> None:
        if src is not None:
            self._ended(src)
        if self._done:
            return
        self._done = True
        on_done = self._on_done
        self.release()
        if on_done is not None:
            on_done(error)

    def release(self) -> None:
        """Return the pipes and drop callbacks (no reference cycles). Idempotent."""
        self._done = True
        self._on_done = None
        for h in (self._ab, self._ba):
            if h.pipe_r >= 0:
                self._pool.put((h.pipe_r, h.pipe_w), h.pending == 0 or bool(h.data))
                h.pipe_r = h.pipe_w = -1
            h.data = b""


def _reason(exc: OSError) -> str:
    if exc.errno in _RESET_ERRNOS:
        return "reset"
    return f"error:{errno.errorcode.get(exc.errno or 0, str(exc.errno))}"
