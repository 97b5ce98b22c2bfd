"""A hostile blind edge for tests: a TLS server with the CDN hostname's certificate that answers
`GET /b/<id>` the way it is told (a given body, or an endless stream) and counts, per path,
the body bytes that got out before the client gave up."""

from __future__ import annotations

import os
import socket
import ssl
import threading
from pathlib import Path

CHUNK = 1 << 16


class HostileEdge:
    def __init__(
        self,
        cert: Path,
        key: Path,
        bodies: dict[str, bytes] | None = None,
        endless: set[str] | None = None,
        *,
        endless_cap_bytes: int = 2 << 30,
    ) -> None:
        self.bodies = dict(bodies or {})
        self.endless = set(endless or ())
        self.cap = endless_cap_bytes
        self.sent: dict[str, int] = {}
        self.finished: dict[str, threading.Event] = {}
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(cert, key)
        self.ctx.set_alpn_protocols(["http/1.1"])
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._stop = False
        self._accepting = threading.Thread(target=self._accept, daemon=True)
        self._accepting.start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                raw, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(raw,), daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        # a small send buffer: what the kernel holds for a client that stopped reading stays
        # small, so the count is close to what the client took
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, CHUNK)
        raw.settimeout(30)
        try:
            with self.ctx.wrap_socket(raw, server_side=True) as tls:
                while self._one(tls):
                    pass
        except OSError:
            pass

    def _one(self, tls: ssl.SSLSocket) -> bool:
        head = b""
        while b"\r\n\r\n" not in head:
            data = tls.recv(4096)
            if not data:
                return False
            head += data
        method, path, _ = head.split(b"\r\n", 1)[0].decode().split(" ", 2)
        with self._lock:
            self.requests.append((method, path))
        cors = "access-control-allow-origin: *\r\n"
        if method == "OPTIONS":
            tls.sendall(f"HTTP/1.1 204 No Content\r\n{cors}content-length: 0\r\n\r\n".encode())
            return True
        if path in self.endless:
            done = self.finished.setdefault(path, threading.Event())
            tls.sendall(
                "HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n"
                f"{cors}connection: close\r\n\r\n".encode()
            )
            block = os.urandom(CHUNK)
            try:
                while self.sent.get(path, 0) < self.cap:
                    tls.sendall(block)
                    with self._lock:
                        self.sent[path] = self.sent.get(path, 0) + len(block)
            finally:
                done.set()
            return False
        body = self.bodies.get(path)
        if body is None:
            tls.sendall(f"HTTP/1.1 404 Not Found\r\n{cors}content-length: 0\r\n\r\n".encode())
            return True
        tls.sendall(
            "HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n"
            f"{cors}content-length: {len(body)}\r\n\r\n".encode()
            + (body if method == "GET" else b"")
        )
        return True

    def close(self) -> None:
        self._stop = True
        self.listener.close()
        self._accepting.join(5)
