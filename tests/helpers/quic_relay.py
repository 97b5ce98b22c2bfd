"""A minimal QUIC relay for tests: the edge's sans-IO cores (`core.quic_flows`,
`core.quic_visitor`) driven on real UDP sockets, the way the edge's QUIC mode will drive them,
with a set of allowed SNIs standing in for the edge's routes and guards. It runs its own event
loop in a thread so a test can point real clients (aioquic, Chromium) at it."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from typing import Any

from blindfold.core.quic_flows import (
    Dropped,
    Forward,
    HelloReceived,
    Path,
    QuicFlowTable,
    SendToClient,
)
from blindfold.core.quic_visitor import encode_announcement


class _Listener(asyncio.DatagramProtocol):
    def __init__(self, relay: QuicRelay) -> None:
        self.relay = relay

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.relay.from_client(data, (addr[0], addr[1]))


class QuicRelay:
    def __init__(self, origin: tuple[str, int], key: bytes, snis: set[str]) -> None:
        self.origin = origin
        self.key = key
        self.snis = snis
        self.table = QuicFlowTable()
        self.loop = asyncio.new_event_loop()
        self.transport: asyncio.DatagramTransport | None = None
        self.port = 0
        self.hellos: list[str] = []
        self.drops: list[str] = []
        self.seen = bytearray()  # every byte relayed, both ways (what an edge could record)
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("relay did not start")

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def start() -> None:
            transport, _ = await self.loop.create_datagram_endpoint(
                lambda: _Listener(self), local_addr=("127.0.0.1", 0)
            )
            self.transport = transport
            self.port = transport.get_extra_info("sockname")[1]
            self.loop.call_later(1.0, self._expire)
            self._ready.set()

        self.loop.run_until_complete(start())
        self.loop.run_forever()

    def close(self) -> None:
        def stop() -> None:
            for flow in list(self.table.flows()):
                self._close_paths(self.table.end(flow, "shutdown").flow.paths.values())
            if self.transport is not None:
                self.transport.close()
            self.loop.stop()

        self.loop.call_soon_threadsafe(stop)
        self._thread.join(10)

    # ------------------------------------------------------------------ client side
    def from_client(self, data: bytes, addr: tuple[str, int]) -> None:
        now = self.loop.time()
        self.seen += data
        r = self.table.from_client(data, addr, now)
        if isinstance(r, HelloReceived):
            self.hellos.append(r.hello.sni or "")
            if r.hello.sni in self.snis:
                r = self.table.accept(r.flow, now)
            else:
                self.table.reject(r.flow, "unknown_sni", now)
                return
        if isinstance(r, Forward):
            self._forward(r)
        elif isinstance(r, SendToClient):
            assert self.transport is not None
            self.transport.sendto(r.datagram, r.address)
        elif isinstance(r, Dropped):
            self.drops.append(r.reason)

    def _forward(self, fwd: Forward) -> None:
        path = fwd.path
        if fwd.new_path:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind(("127.0.0.1", 0))
            sock.connect(self.origin)
            sock.setblocking(False)
            path.handle = sock
            self.loop.add_reader(sock.fileno(), self._from_origin, path)
        if fwd.evicted is not None:
            self._close_paths([fwd.evicted])
        sock = path.handle
        if fwd.announce:
            port = sock.getsockname()[1]
            sock.send(encode_announcement(self.key, path.client, port, time.time(), os.urandom(16)))
        for data in fwd.datagrams:
            sock.send(data)

    # ------------------------------------------------------------------ origin side
    def _from_origin(self, path: Path) -> None:
        sock = path.handle
        while True:
            try:
                data = sock.recv(65535)
            except (BlockingIOError, ConnectionRefusedError):
                return
            self.seen += data
            r = self.table.from_origin(path, data, self.loop.time())
            if isinstance(r, SendToClient) and self.transport is not None:
                self.transport.sendto(r.datagram, r.address)

    def _close_paths(self, paths: Any) -> None:
        for path in paths:
            if path.handle is not None:
                self.loop.remove_reader(path.handle.fileno())
                path.handle.close()
                path.handle = None

    def _expire(self) -> None:
        for ended in self.table.expire(self.loop.time()):
            self._close_paths(ended.flow.paths.values())
        self.loop.call_later(1.0, self._expire)
