"""A real TLS origin for tests: Python ssl (OpenSSL) in threads, HTTP/1.1 via h11, optional
PROXY header (parsed with blindfold's parser), keep-alive. It records what it saw."""

from __future__ import annotations

import socket
import socketserver
import ssl
import threading
from dataclasses import dataclass, field
from pathlib import Path

import h11

from blindfold.core.proxyproto import V2_SIGNATURE, ProxyHeader, parse_proxy_header


@dataclass
class Seen:
    peers: list[str] = field(default_factory=list)  # visitor addresses (PROXY src or peer)
    headers: list[ProxyHeader] = field(default_factory=list)
    sni: list[str | None] = field(default_factory=list)
    requests: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed inside PROXY header")
        buf += chunk
    return buf


def read_proxy_blocking(sock: socket.socket) -> ProxyHeader:
    buf = _recv_exact(sock, 16)
    if buf.startswith(V2_SIGNATURE):
        buf += _recv_exact(sock, int.from_bytes(buf[14:16], "big"))
    else:
        while not buf.endswith(b"\r\n") and len(buf) < 107:
            buf += _recv_exact(sock, 1)
    parsed = parse_proxy_header(buf)
    assert parsed is not None and parsed[1] == len(buf), buf
    return parsed[0]


class TlsOrigin:
    """`GET /hello` -> 'hello from origin <name>; visitor <addr>; secret <marker>';
    `GET /bytes?n=N` -> N bytes; `POST /echo` -> the body back."""

    def __init__(
        self,
        cert: Path,
        key: Path,
        *,
        name: str = "A",
        proxy: bool = False,
        marker: str = "",
        host: str = "127.0.0.1",
    ) -> None:
        self.name = name
        self.proxy = proxy
        self.marker = marker
        self.seen = Seen()
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        ctx.set_alpn_protocols(["http/1.1"])
        ctx.sni_callback = self._sni
        self.ctx = ctx
        origin = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                origin._handle(self.request, self.client_address)

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True
            request_queue_size = 1024

        self.server = Server((host, 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def _sni(self, sslobj: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
        with self.seen.lock:
            self.seen.sni.append(name)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handle(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        sock.settimeout(20)
        visitor = f"{peer[0]}:{peer[1]}"
        try:
            if self.proxy:
                header = read_proxy_blocking(sock)
                with self.seen.lock:
                    self.seen.headers.append(header)
                if header.src:
                    visitor = f"{header.src[0]}:{header.src[1]}"
            with self.seen.lock:
                self.seen.peers.append(visitor)
            tls = self.ctx.wrap_socket(sock, server_side=True)
            self._http(tls, visitor)
        except (OSError, ssl.SSLError, ConnectionError, h11.ProtocolError):
            pass
        finally:
            sock.close()

    def _http(self, tls: ssl.SSLSocket, visitor: str) -> None:
        conn = h11.Connection(h11.SERVER)
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = tls.recv(65536)
                conn.receive_data(data)
                if not data:
                    return
                continue
            if isinstance(event, h11.ConnectionClosed):
                return
            if not isinstance(event, h11.Request):
                continue
            body = b""
            while True:
                ev = conn.next_event()
                if ev is h11.NEED_DATA:
                    data = tls.recv(65536)
                    if not data:
                        return
                    conn.receive_data(data)
                elif isinstance(ev, h11.Data):
                    body += bytes(ev.data)
                elif isinstance(ev, h11.EndOfMessage):
                    break
            with self.seen.lock:
                self.seen.requests += 1
            target = event.target.decode()
            if target.startswith("/bytes"):
                n = int(target.split("n=")[1])
                chunk = b"x" * 65536
                tls.sendall(
                    conn.send(h11.Response(status_code=200, headers=[("content-length", str(n))]))
                )
                left = n
                while left:
                    part = chunk[: min(left, len(chunk))]
                    tls.sendall(conn.send(h11.Data(data=part)))
                    left -= len(part)
                tls.sendall(conn.send(h11.EndOfMessage()))
            else:
                if target.startswith("/echo"):
                    out = body
                else:
                    out = (
                        f"hello from origin {self.name}; visitor {visitor}; secret {self.marker}\n"
                    ).encode()
                tls.sendall(
                    conn.send(
                        h11.Response(
                            status_code=200,
                            headers=[
                                ("content-length", str(len(out))),
                                ("content-type", "text/plain"),
                            ],
                        )
                    )
                )
                tls.sendall(conn.send(h11.Data(data=out)))
                tls.sendall(conn.send(h11.EndOfMessage()))
            if conn.our_state is h11.MUST_CLOSE:
                return
            conn.start_next_cycle()
