"""A small web application for the demo and the tests (Python's http.server, threads).

GET /                 a page naming the visitor address the application was told
GET /bytes?n=N        N bytes, streamed
POST /upload          counts and hashes the body as it streams in
GET|POST /echo        the request head and body back, as JSON
GET /login            sets the session cookie (the demo's "logged in")
GET /auth/private     204 for a request carrying the session (cookie or Bearer), else 401: the
                      blind store's private_auth_path; /auth/forbidden (403), /auth/broken
                      (500), /auth/redirect (302) and /auth/slow (answers after 10 s) for tests
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


class AppHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "blindfold-demo-app"
    seen: list[dict[str, str]] = []
    lock = threading.Lock()
    session = secrets.token_hex(16)

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _record(self) -> dict[str, str]:
        info = {
            "peer": self.client_address[0],
            "x-forwarded-for": self.headers.get("X-Forwarded-For", ""),
            "forwarded": self.headers.get("Forwarded", ""),
            "x-request-id": self.headers.get("X-Request-Id", ""),
            "host": self.headers.get("Host", ""),
            "path": self.path,
            "method": self.command,
            "if-none-match": self.headers.get("If-None-Match", ""),
            "cookie": self.headers.get("Cookie", ""),
            "authorization": self.headers.get("Authorization", ""),
            "x-original-uri": self.headers.get("X-Original-URI", ""),
        }
        with self.lock:
            self.seen.append(info)
            del self.seen[:-1000]
        return info

    def _send(self, status: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(length) if length else b""

    def do_GET(self) -> None:
        info = self._record()
        url = urlsplit(self.path)
        if url.path == "/bytes":
            n = int(parse_qs(url.query).get("n", ["0"])[0])
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(n))
            self.end_headers()
            chunk = b"b" * 65536
            try:
                while n > 0:
                    part = chunk[: min(n, len(chunk))]
                    self.wfile.write(part)
                    n -= len(part)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True  # the reader went away: an ordinary end, not an error
            return
        if url.path == "/login":
            self.send_response(204)
            self.send_header(
                "Set-Cookie", f"session={self.session}; Path=/; Secure; HttpOnly; SameSite=Strict"
            )
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if url.path.startswith("/auth/"):
            self._auth(url.path)
            return
        if url.path == "/echo":
            self._send(200, json.dumps(info).encode(), "application/json")
            return
        if url.path.startswith("/cached/"):
            # a cacheable resource: ?max_age=N (default 60), ETag validators, 304 on a match
            q = parse_qs(url.query)
            max_age = int(q.get("max_age", ["60"])[0])
            body = f"cacheable {url.path} version {q.get('v', ['1'])[0]}\n".encode()
            etag = '"' + hashlib.sha256(body).hexdigest()[:16] + '"'
            if self.headers.get("If-None-Match") == etag:
                self.send_response(304)
                self.send_header("ETag", etag)
                self.send_header("Cache-Control", f"public, max-age={max_age}")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", f"public, max-age={max_age}")
            self.send_header("ETag", etag)
            if "vary" in q:
                self.send_header("Vary", q["vary"][0])
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
            return
        page = (
            f"<!doctype html><title>demo app</title><h1>Hello from the application</h1>"
            f"<p>The origin agent says the visitor is <b>{info['x-forwarded-for']}</b>.</p>"
            f"<p>Request id {info['x-request-id']}</p>\n"
        ).encode()
        self._send(200, page, "text/html; charset=utf-8")

    do_HEAD = do_GET

    def _no_content(self) -> None:
        self.send_response(204)
        self.end_headers()

    def _auth(self, path: str) -> None:
        cookies = [c.strip() for c in self.headers.get("Cookie", "").split(";")]
        admitted = f"session={self.session}" in cookies or self.headers.get(
            "Authorization", ""
        ) == (f"Bearer {self.session}")
        if path == "/auth/private" and admitted:
            self._no_content()
        elif path == "/auth/private":
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Bearer realm="private"')
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", "15")
            self.end_headers()
            self.wfile.write(b"login required\n")
        elif path == "/auth/forbidden":
            self._send(403, b"not for you\n")
        elif path == "/auth/redirect":
            self.send_response(302)
            self.send_header("Location", "/login")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif path == "/auth/slow":
            time.sleep(10)
            with contextlib.suppress(OSError):  # the origin gave up long ago
                self._no_content()
        else:
            self._send(500, b"broken\n")

    def do_POST(self) -> None:
        info = self._record()
        if self.path.startswith("/upload"):
            h = hashlib.sha256()
            total = 0
            length = int(self.headers.get("Content-Length") or 0)
            while total < length:
                piece = self.rfile.read(min(65536, length - total))
                if not piece:
                    break
                h.update(piece)
                total += len(piece)
            self._send(
                200,
                json.dumps({"bytes": total, "sha256": h.hexdigest()}).encode(),
                "application/json",
            )
            return
        body = self._body()
        info["body"] = body.decode("latin-1")[:1000]
        self._send(200, json.dumps(info).encode(), "application/json")

    do_PUT = do_POST


class DemoApp:
    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.server = ThreadingHTTPServer((host, port), AppHandler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def seen(self) -> list[dict[str, str]]:
        return AppHandler.seen

    @property
    def session(self) -> str:
        return AppHandler.session

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
