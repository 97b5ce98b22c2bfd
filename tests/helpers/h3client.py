"""A real HTTP/3 client for tests: aioquic's QUIC and HTTP/3 (client side) on a UDP socket we
bind ourselves, so a test can choose the source address and send a visitor announcement
from the same socket first, as an edge does."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3 import events as h3e
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.quic import events as qe
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import QuicProtocolVersion
from cryptography import x509


@dataclass
class H3Response:
    status: int = 0
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    reset: bool = False

    def header(self, name: bytes) -> bytes | None:
        return next((v for k, v in self.headers if k == name), None)


class _Client(QuicConnectionProtocol):
    def __init__(self, quic: QuicConnection) -> None:
        super().__init__(quic)
        self.h3 = H3Connection(quic)
        self.waiters: dict[int, asyncio.Future[H3Response]] = {}
        self.responses: dict[int, H3Response] = {}
        self.terminated: list[qe.QuicEvent] = []  # the ConnectionTerminated event, if any
        self.stopped: list[int] = []  # streams the server asked us to stop sending

    def quic_event_received(self, event: qe.QuicEvent) -> None:
        if isinstance(event, qe.ConnectionTerminated):
            self.terminated.append(event)
        if isinstance(event, qe.StopSendingReceived):
            self.stopped.append(event.stream_id)
        if isinstance(event, qe.StreamReset) and event.stream_id in self.waiters:
            self.responses[event.stream_id].reset = True
            self._finish(event.stream_id)
        for ev in self.h3.handle_event(event):
            if isinstance(ev, h3e.HeadersReceived):
                r = self.responses[ev.stream_id]
                for k, v in ev.headers:
                    if k == b":status":
                        r.status = int(v)
                    else:
                        r.headers.append((k, v))
                if ev.stream_ended:
                    self._finish(ev.stream_id)
            elif isinstance(ev, h3e.DataReceived):
                self.responses[ev.stream_id].body += ev.data
                if ev.stream_ended:
                    self._finish(ev.stream_id)
        if isinstance(event, qe.ConnectionTerminated):
            for sid in list(self.waiters):
                waiter = self.waiters.pop(sid)
                if not waiter.done():
                    waiter.set_exception(ConnectionError(event.reason_phrase))

    def _finish(self, sid: int) -> None:
        waiter = self.waiters.pop(sid, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(self.responses[sid])

    async def request(
        self, method: str, path: str, authority: str, body: bytes, headers: list[tuple[str, str]]
    ) -> H3Response:
        sid = self._quic.get_next_available_stream_id()
        self.responses[sid] = H3Response()
        waiter = self.waiters[sid] = asyncio.get_running_loop().create_future()
        self.h3.send_headers(
            sid,
            [
                (b":method", method.encode()),
                (b":scheme", b"https"),
                (b":authority", authority.encode()),
                (b":path", path.encode()),
                *[(k.encode(), v.encode()) for k, v in headers],
            ],
            end_stream=not body,
        )
        if body:
            self.h3.send_data(sid, body, end_stream=True)
        self.transmit()
        response: H3Response = await waiter
        return response


class H3Client:
    """`async with H3Client(port, ca=...) as c: r = await c.get("/")`."""

    def __init__(
        self,
        port: int,
        *,
        ca: Any,
        host: str = "127.0.0.1",
        server_name: str = "example.test",
        source: str = "127.0.0.1",
        announce: Callable[[int], bytes] | None = None,
        version: int = QuicProtocolVersion.VERSION_1,
        prefer: int | None = None,
        timeout: float = 10.0,
    ) -> None:
        self.addr = (host, port)
        self.server_name = server_name
        self.timeout = timeout
        self.config = QuicConfiguration(
            is_client=True,
            alpn_protocols=list(H3_ALPN),
            server_name=server_name,
            cafile=str(ca),
            # `prefer`: start in `version`, list `prefer` first (RFC 9368 compatible switch)
            supported_versions=[version] if prefer is None else [prefer, version],
            original_version=None if prefer is None else version,
        )
        self.source = source
        self.announce = announce
        self.protocol: _Client | None = None
        self.transport: asyncio.DatagramTransport | None = None
        self.sock: socket.socket | None = None

    async def __aenter__(self) -> H3Client:
        sock = self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((self.source, 0))
        if self.announce is not None:
            sock.sendto(self.announce(sock.getsockname()[1]), self.addr)
        quic = QuicConnection(configuration=self.config)
        loop = asyncio.get_running_loop()
        transport, protocol = await loop.create_datagram_endpoint(lambda: _Client(quic), sock=sock)
        self.transport, self.protocol = transport, protocol
        protocol.connect(self.addr)
        await asyncio.wait_for(protocol.wait_connected(), self.timeout)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.protocol is not None:
            self.protocol.close()
            try:
                await asyncio.wait_for(self.protocol.wait_closed(), 2)
            except TimeoutError:
                pass
        if self.transport is not None:
            self.transport.close()

    @property
    def peer_certificate(self) -> x509.Certificate:
        assert self.protocol is not None
        cert = self.protocol._quic.tls._peer_certificate
        assert cert is not None
        return cert

    async def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        headers: list[tuple[str, str]] | None = None,
    ) -> H3Response:
        assert self.protocol is not None
        return await asyncio.wait_for(
            self.protocol.request(method, path, self.server_name, body, headers or []),
            self.timeout,
        )

    async def get(self, path: str) -> H3Response:
        return await self.request("GET", path)


def h3_get(port: int, path: str, **kw: Any) -> H3Response:
    """One request on a fresh connection (blocking, for tests)."""

    async def run() -> H3Response:
        async with H3Client(port, **kw) as client:
            return await client.get(path)

    return asyncio.run(run())
