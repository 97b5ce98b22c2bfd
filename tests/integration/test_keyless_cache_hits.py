"""What a cache hit on the keyless edge serves (issue 19: hits go out from a prepared head):
the stored response's fields in the stored order, then a Content-Length of the stored body,
Age and X-Blindfold-Cache; the same fields and bytes over HTTP/1.1 and HTTP/2; HEAD, 304, Vary
and bodies bigger than one write. Visitor -> edge (keyless) -> origin agent -> application,
with Python ssl as the HTTP/1.1 client and the `h2` library over Python ssl for HTTP/2."""

from __future__ import annotations

import hashlib
import socket
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest

from tests.helpers.keyless import KeylessPki
from tests.integration.test_keyless_cache import chain, keyserver, kpki  # noqa: F401

BIG = hashlib.sha256(b"big").digest() * (400 * 1024 // 32)  # 400 KiB: more than one send
LM = "Fri, 04 Dec 2026 10:00:00 GMT"


class App:
    """/page: varies on Accept-Language, with an ETag, Cache-Tag and repeated fields;
    /big: 400 KiB. Both public for a shared cache. Counts what reaches it."""

    def __init__(self) -> None:
        app = self
        self.requests = 0
        self.lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                with app.lock:
                    app.requests += 1
                lang = self.headers.get("Accept-Language", "en")
                etag = f'"page-{lang}"'
                body = BIG if self.path == "/big" else f"page in {lang}\n".encode() * 50
                if self.headers.get("If-None-Match") == etag:
                    self.send_response(304)
                else:
                    self.send_response(200)
                self.send_header("Cache-Control", "public, max-age=600")
                self.send_header("ETag", etag)
                self.send_header("Last-Modified", LM)
                self.send_header("Vary", "Accept-Language")
                self.send_header("Cache-Tag", "pages, lang-" + lang)
                self.send_header("Link", "</a.css>; rel=preload")
                self.send_header("Link", "</b.js>; rel=preload")
                self.send_header("X-App", "one")
                if self.headers.get("If-None-Match") == etag:
                    self.end_headers()
                    return
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def app() -> Iterator[App]:
    a = App()
    yield a
    a.close()


Fields = list[tuple[str, str]]


def _tls(port: int, ca: Any, alpn: str) -> ssl.SSLSocket:
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.set_alpn_protocols([alpn])
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    tls = ctx.wrap_socket(raw, server_hostname="example.test")
    assert tls.selected_alpn_protocol() == alpn
    return tls


def h1(
    port: int, ca: Any, path: str, *headers: str, method: str = "GET"
) -> tuple[int, Fields, bytes]:
    """One request on its own connection (Connection: close): status, fields in order (names
    lower-case), body (all bytes after the head)."""
    with _tls(port, ca, "http/1.1") as tls:
        extra = "".join(f"{h}\r\n" for h in headers)
        tls.sendall(
            f"{method} {path} HTTP/1.1\r\nHost: example.test\r\n{extra}"
            "Connection: close\r\n\r\n".encode()
        )
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    fields = [(k.strip().lower(), v.strip()) for k, _, v in (x.partition(":") for x in lines[1:])]
    # the connection-management field our request asked for is not part of the response
    fields = [(k, v) for k, v in fields if k != "connection"]
    return int(lines[0].split()[1]), fields, body


def h2get(
    port: int,
    ca: Any,
    path: str,
    *headers: tuple[str, str],
    method: str = "GET",
    big_windows: bool = False,
) -> tuple[int, Fields, bytes]:
    """One request on its own HTTP/2 connection; `big_windows`: 1 MiB flow-control windows
    (a fresh hit is then answered as the request is read, web/http2.py `answer_now`)."""
    with _tls(port, ca, "h2") as tls:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        if big_windows:
            conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1 << 20})
            conn.increment_flow_control_window(1 << 20)
        conn.send_headers(
            1,
            [
                (":method", method),
                (":scheme", "https"),
                (":authority", "example.test"),
                (":path", path),
                *headers,
            ],
            end_stream=True,
        )
        tls.sendall(conn.data_to_send())
        fields: Fields = []
        body = b""
        ended = False
        while not ended:
            data = tls.recv(65536)
            assert data, "connection closed"
            for e in conn.receive_data(data):
                if isinstance(e, h2.events.ResponseReceived):
                    fields = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in e.headers]
                elif isinstance(e, h2.events.DataReceived):
                    body += e.data
                    conn.acknowledge_received_data(e.flow_controlled_length, 1)
                elif isinstance(e, h2.events.StreamEnded | h2.events.StreamReset):
                    ended = True
            tls.sendall(conn.data_to_send())
    status = int(dict(fields)[":status"])
    return status, [(k, v) for k, v in fields if not k.startswith(":")], body


def _no_age(fields: Fields) -> Fields:
    return [(k, "*" if k == "age" else v) for k, v in fields]


def test_hits_serve_the_stored_response_alike_on_http1_and_http2(
    chain: Any,  # noqa: F811
    kpki: KeylessPki,  # noqa: F811
    app: App,
) -> None:
    edge, _ = chain(app.port)
    port, ca = edge.port, kpki.site_ca
    status, miss, body = h1(port, ca, "/page")
    assert status == 200 and ("x-blindfold-cache", "miss") in miss
    assert app.requests == 1
    # what a hit must carry: the stored fields in order (no Cache-Tag, no hop-by-hop), then
    # Content-Length, Age, X-Blindfold-Cache
    stored = [
        (k, v)
        for k, v in miss
        if k not in ("content-length", "cache-tag", "x-blindfold-cache", "transfer-encoding")
    ]
    want = [*stored, ("content-length", str(len(body))), ("age", "*"), ("x-blindfold-cache", "hit")]
    for big in (False, True, False, True):  # a Task per stream, or answered at once
        s1, f1, b1 = h1(port, ca, "/page")
        s2, f2, b2 = h2get(port, ca, "/page", big_windows=big)
        assert (s1, _no_age(f1), b1) == (200, want, body)
        assert (s2, _no_age(f2), b2) == (200, want, body)
    # HEAD: the same fields, no body, on both
    s1, f1, b1 = h1(port, ca, "/page", method="HEAD")
    for big in (False, True):
        s2, f2, b2 = h2get(port, ca, "/page", method="HEAD", big_windows=big)
        assert (s1, _no_age(f1), b1) == (s2, _no_age(f2), b2) == (200, want, b"")
    # the visitor's own validator: 304 from the stored entry, the §15.4.5 fields
    cond = ("if-none-match", '"page-en"')
    s1, f1, b1 = h1(port, ca, "/page", 'If-None-Match: "page-en"')
    want304 = [
        (k, v)
        for k, v in stored
        if k in ("cache-control", "date", "etag", "vary", "last-modified", "expires")
    ] + [("age", "*"), ("x-blindfold-cache", "hit")]
    for big in (False, True):
        s2, f2, b2 = h2get(port, ca, "/page", cond, big_windows=big)
        assert (s1, _no_age(f1), b1) == (s2, _no_age(f2), b2) == (304, want304, b"")
    # another variant: its own entry, its own body, then hits
    s2, f2, fr = h2get(port, ca, "/page", ("accept-language", "fr"))
    assert s2 == 200 and ("x-blindfold-cache", "miss") in f2 and b"page in fr" in fr
    s1, f1, b1 = h1(port, ca, "/page", "Accept-Language: fr")
    assert (s1, b1) == (200, fr) and ("x-blindfold-cache", "hit") in f1
    assert ("etag", '"page-fr"') in f1
    assert app.requests == 2  # every other answer came from the cache


def test_big_hits_arrive_whole_on_http1_and_http2(
    chain: Any,  # noqa: F811
    kpki: KeylessPki,  # noqa: F811
    app: App,
) -> None:
    edge, _ = chain(app.port)
    port, ca = edge.port, kpki.site_ca
    status, _fields, body = h1(port, ca, "/big")
    assert status == 200 and body == BIG
    for big in (False, True):
        s1, f1, b1 = h1(port, ca, "/big")
        s2, f2, b2 = h2get(port, ca, "/big", big_windows=big)
        assert s1 == s2 == 200 and b1 == BIG and b2 == BIG
        assert ("x-blindfold-cache", "hit") in f1 and ("x-blindfold-cache", "hit") in f2
        assert ("content-length", str(len(BIG))) in f1 and ("content-length", str(len(BIG))) in f2
    assert app.requests == 1
