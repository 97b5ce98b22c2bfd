"""Helpers for accepting connections: survive running out of descriptors (a reserve fd, a
back-off), read a PROXY header from an accepted socket without reading past it, then start TLS
on the same socket."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import ssl

from blindfold.core.proxyproto import V2_SIGNATURE, ProxyHeader, parse_proxy_header
from blindfold.errors import ProtocolError

# accept() failures that say "no resources now", not "this one connection went wrong": the
# listener stays readable, so retrying at once spins; pause instead
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
BACKOFF_MIN_S = 0.05
BACKOFF_MAX_S = 1.0


class FdReserve:
    """One descriptor held back for when accept() fails with EMFILE: given up to accept the
    waiting connection and close it at once, so its client gets a close instead of hanging in
    the backlog, then taken again (the nginx/HAProxy trick)."""

    def __init__(self) -> None:
        self.fd = self._open()
        self.shed = 0  # connections accepted and closed this way

    @staticmethod
    def _open() -> int:
        try:
            return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return -1

    def shed_one(self, accept: socket.socket) -> bool:
        """Accept one waiting connection on `accept` (non-blocking) with the reserve and close
        it. True when one was closed."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        try:
            conn, _ = accept.accept()
        except OSError:
            return False
        else:
            conn.close()
            self.shed += 1
            return True
        finally:
            self.fd = self._open()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Backoff:
    """How long to stop accepting after a resource failure: doubling while they persist."""

    __slots__ = ("delay_s",)

    def __init__(self) -> None:
        self.delay_s = 0.0

    def failed(self) -> float:
        self.delay_s = min(BACKOFF_MAX_S, max(BACKOFF_MIN_S, self.delay_s * 2))
        return self.delay_s

    def succeeded(self) -> None:
        self.delay_s = 0.0


def fd_limit() -> int:
    """The soft limit on open descriptors."""
    import resource

    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


async def _recv_exact(loop: asyncio.AbstractEventLoop, sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = await loop.sock_recv(sock, n - len(buf))
        if not chunk:
            raise ProtocolError("bad_proxy_header", "connection closed inside the PROXY header")
        buf += chunk
    return buf


async def read_proxy_header(
    sock: socket.socket, timeout_s: float, max_bytes: int = 4096
) -> ProxyHeader:
    """Read exactly one v1 or v2 PROXY header from non-blocking `sock` (nothing after it)."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout_s):
        # 12 bytes first: the v2 signature, and less than the shortest v1 line
        # ("PROXY UNKNOWN\r\n" is 15 bytes), so a ClientHello byte is never read with it
        buf = await _recv_exact(loop, sock, len(V2_SIGNATURE))
        if buf == V2_SIGNATURE:
            buf += await _recv_exact(loop, sock, 4)
            length = int.from_bytes(buf[14:16], "big")
            if 16 + length > max_bytes:
                raise ProtocolError("bad_proxy_header", "v2 header too long")
            buf += await _recv_exact(loop, sock, length)
        else:
            # v1: one byte at a time up to the CRLF, so nothing after it is consumed; the
            # parser refuses anything that is not a v1 line, or one longer than 107 bytes
            while parse_proxy_header(buf, max_bytes) is None:
                buf += await _recv_exact(loop, sock, 1)
    parsed = parse_proxy_header(buf, max_bytes)
    if parsed is None or parsed[1] != len(buf):
        raise ProtocolError("bad_proxy_header", "incomplete or overlong PROXY header")
    return parsed[0]


async def start_tls_server(
    sock: socket.socket,
    context: ssl.SSLContext,
    handshake_timeout_s: float = 10.0,
    limit: int = 1 << 16,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Wrap an accepted socket in server-side TLS and return asyncio streams."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=limit, loop=loop)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    transport, _ = await loop.connect_accepted_socket(
        lambda: protocol, sock, ssl=context, ssl_handshake_timeout=handshake_timeout_s
    )
    writer = asyncio.StreamWriter(transport, protocol, reader, loop)
    return reader, writer


async def peek(sock: socket.socket, n: int, timeout_s: float) -> bytes:
    """Up to `n` bytes from `sock` without consuming them (MSG_PEEK), waiting until some
    arrive. b'' means the peer closed."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout_s):
        while True:
            try:
                return sock.recv(n, socket.MSG_PEEK)
            except (BlockingIOError, InterruptedError):
                pass
            ready = loop.create_future()
            loop.add_reader(sock.fileno(), ready.set_result, None)
            try:
                await ready
            finally:
                loop.remove_reader(sock.fileno())
