"""A small TLS origin for the demo: optional PROXY header, TLS with the site's certificate,
one HTTP/1.1 page that shows which visitor address the origin sees."""

from __future__ import annotations

import asyncio
import contextlib
import html
import socket
import ssl

import h11

from blindfold.errors import ProtocolError
from blindfold.io.accepted import read_proxy_header, start_tls_server


class DemoOrigin:
    def __init__(self, context: ssl.SSLContext, *, expect_proxy: bool) -> None:
        self.context = context
        self.expect_proxy = expect_proxy
        self._sock: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None
        self._conns: set[asyncio.Task[None]] = set()

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        sock = socket.create_server((host, port), backlog=512)
        sock.setblocking(False)
        self._sock = sock
        self._task = asyncio.create_task(self._accept_loop(sock))
        return int(sock.getsockname()[1])

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for task in list(self._conns):
            task.cancel()
        if self._sock is not None:
            self._sock.close()

    async def _accept_loop(self, lsock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            sock, peer = await loop.sock_accept(lsock)
            sock.setblocking(False)
            task = asyncio.create_task(self._serve(sock, peer))
            self._conns.add(task)
            task.add_done_callback(self._conns.discard)

    async def _serve(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        visitor = f"{peer[0]}:{peer[1]}"
        via = "direct"
        writer = None
        try:
            async with asyncio.timeout(10):
                if self.expect_proxy:
                    header = await read_proxy_header(sock, 5)
                    if header.src is not None:
                        visitor = f"{header.src[0]}:{header.src[1]}"
                    via = f"PROXY v{header.version} from {peer[0]}"
                reader, writer = await start_tls_server(sock, self.context)
                conn = h11.Connection(h11.SERVER)
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        conn.receive_data(await reader.read(65536))
                        continue
                    if isinstance(event, h11.Request):
                        body = (
                            "<!doctype html><title>blindfold demo origin</title>"
                            "<h1>Hello from the origin</h1>"
                            f"<p>Visitor address seen by the origin: <b>{html.escape(visitor)}</b>"
                            f" ({html.escape(via)})</p><p>TLS ended here, at the origin; the edge"
                            " only forwarded encrypted bytes.</p>\n"
                        ).encode()
                        writer.write(conn.send(h11.Response(status_code=200, headers=[
                            ("content-type", "text/html; charset=utf-8"),
                            ("content-length", str(len(body))), ("connection", "close")])))
                        writer.write(conn.send(h11.Data(data=body)))
                        writer.write(conn.send(h11.EndOfMessage()))
                        await writer.drain()
                    return
        except (ProtocolError, h11.ProtocolError, ssl.SSLError, OSError, TimeoutError):
            return
        finally:
            with contextlib.suppress(Exception):
                if writer is not None:
                    writer.close()
                else:
                    sock.close()
