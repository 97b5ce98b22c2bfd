"""The keyless edge's shared cache and origin connections under attack, end to end: visitor ->
edge (keyless) -> origin agent -> application, with real clients (curl, the `h2` library over
Python ssl)."""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import pytest

from blindfold import pki
from tests.helpers.clients import curl, wait_until
from tests.helpers.edgeproc import EdgeProcess, OriginProcess, edge_config
from tests.helpers.keyless import KeylessPki, KeyServerProcess, keyserver_config, make_pki
from tests.helpers.topology import origin_config
from tests.integration.test_keyless import keyless_route


class RollingCookieApp:
    """An application with a rolling session: every response to a request that carries a
    session cookie renews it (`Set-Cookie: session=<same>-renewed`), 304s included; pages are
    public for a shared cache (max-age=60) with an ETag. Anonymous requests get no cookie."""

    def __init__(self) -> None:
        app = self
        self.requests: list[dict[str, str]] = []
        self.lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                cookie = self.headers.get("Cookie", "")
                with app.lock:
                    app.requests.append(
                        {"cookie": cookie, "inm": self.headers.get("If-None-Match", "")}
                    )
                etag = '"page-v1"'
                status = 304 if self.headers.get("If-None-Match") == etag else 200
                self.send_response(status)
                self.send_header("Cache-Control", "public, max-age=60")
                self.send_header("ETag", etag)
                if cookie.startswith("session="):
                    renewed = cookie.partition("=")[2] + "-renewed"
                    self.send_header("Set-Cookie", f"session={renewed}; Path=/; HttpOnly")
                if status == 200:
                    body = b"the page\n"
                    self.send_header("Content-Type", "text/plain")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                else:
                    self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def kpki(tmp_path: Path, ca: pki.Issued) -> KeylessPki:
    return make_pki(tmp_path, ca)


@pytest.fixture
def keyserver(kpki: KeylessPki, tmp_path: Path) -> Iterator[KeyServerProcess]:
    ks = KeyServerProcess(
        keyserver_config(kpki, {"edge1": ["example.test", "*.example.test"]}), tmp_path, name="ks"
    )
    yield ks
    ks.stop()
    assert not ks.tracebacks(), "".join(ks.stderr_lines)


@pytest.fixture
def chain(
    start_edge: Callable[..., EdgeProcess],
    start_origin: Callable[..., OriginProcess],
    site: dict[str, Path],
    tmp_path: Path,
    kpki: KeylessPki,
    keyserver: KeyServerProcess,
) -> Callable[..., tuple[EdgeProcess, OriginProcess]]:
    def make(
        app_port: int,
        edge_kw: dict[str, Any] | None = None,
        origin_kw: dict[str, Any] | None = None,
        **route_kw: Any,
    ) -> tuple[EdgeProcess, OriginProcess]:
        origin = start_origin(origin_config(site, app_port, tmp_path, **(origin_kw or {})))
        text = edge_config(
            keyless_route(kpki, site, [keyserver.port], origin.port, **route_kw),
            per_ip_rate_per_s=0,
            **{"workers": 1, **(edge_kw or {})},  # one worker: one cache to observe
        )
        return start_edge(text), origin

    return make


def _get(
    edge: EdgeProcess, kpki: KeylessPki, path: str, *headers: str, source: str = "127.0.0.1"
) -> tuple[int, list[tuple[str, str]], str]:
    """GET through curl: status, response header lines (lower-case names), body."""
    args = ["-D", "/dev/stderr"]
    for h in headers:
        args += ["-H", h]
    out = curl(edge.port, "example.test", kpki.site_ca, *args, path=path, source=source)
    lines = out.stderr.splitlines()
    status = int(lines[0].split()[1]) if lines and lines[0].startswith("HTTP/") else 0
    head = [
        (k.strip().lower(), v.strip())
        for k, sep, v in (line.partition(":") for line in lines[1:])
        if sep
    ]
    return status, head, out.stdout


def _values(head: list[tuple[str, str]], name: str) -> list[str]:
    return [v for k, v in head if k == name]


def test_a_304_never_hands_one_visitors_cookie_to_another(chain: Any, kpki: KeylessPki) -> None:
    """Issue 15 finding 1: a revalidation answered 304 + Set-Cookie used to merge the cookie
    into the shared entry, and the next visitors got it on cache hits."""
    app = RollingCookieApp()
    try:
        edge, _ = chain(app.port)
        # an anonymous visitor: the page (no cookie) is stored
        status, head, body = _get(edge, kpki, "/page", source="127.0.0.21")
        assert (status, body, _values(head, "x-blindfold-cache")) == (200, "the page\n", ["miss"])
        assert _values(head, "set-cookie") == []
        # Alice, logged in, forces a revalidation: the origin answers 304 and renews her cookie
        status, head, body = _get(
            edge,
            kpki,
            "/page",
            "Cookie: session=alice-secret",
            "Cache-Control: no-cache",
            source="127.0.0.22",
        )
        assert (status, body) == (200, "the page\n")
        assert app.requests[-1] == {"cookie": "session=alice-secret", "inm": '"page-v1"'}
        # she gets her own renewed cookie...
        assert _values(head, "set-cookie") == ["session=alice-secret-renewed; Path=/; HttpOnly"]
        # ...and nobody else ever does
        for source in ("127.0.0.23", "127.0.0.24"):
            status, head, body = _get(edge, kpki, "/page", source=source)
            assert (status, body) == (200, "the page\n")
            assert _values(head, "set-cookie") == [], head
        # her browser revalidates its own copy: a 304, still with her cookie
        status, head, body = _get(
            edge,
            kpki,
            "/page",
            "Cookie: session=alice-secret",
            "Cache-Control: no-cache",
            'If-None-Match: "page-v1"',
            source="127.0.0.22",
        )
        assert (status, body) == (304, "")
        assert _values(head, "set-cookie") == ["session=alice-secret-renewed; Path=/; HttpOnly"]
        status, head, _ = _get(edge, kpki, "/page", source="127.0.0.25")
        assert status == 200 and _values(head, "set-cookie") == []
    finally:
        app.close()


def _h2_streams_never_read(
    port: int, ca: Path, source: str, path: str, streams: int
) -> ssl.SSLSocket:
    """An HTTP/2 visitor (the `h2` library over Python ssl) that opens `streams` GETs at once
    and then never reads a byte: every response stalls on flow control, holding whatever the
    edge gave it."""
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.set_alpn_protocols(["h2"])
    raw = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    tls = ctx.wrap_socket(raw, server_hostname="example.test")
    assert tls.selected_alpn_protocol() == "h2"
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    for i in range(streams):
        conn.send_headers(
            1 + 2 * i,
            [
                (":method", "GET"),
                (":scheme", "https"),
                (":authority", "example.test"),
                (":path", path),
            ],
            end_stream=True,
        )
    tls.sendall(conn.data_to_send())
    return tls


def test_visitor_connections_cannot_hold_the_origins_connections(
    chain: Any, kpki: KeylessPki, app: Any
) -> None:
    """Issue 15 finding 2: on a keyless route one HTTP/2 connection whose 100 streams never
    read held 100 origin connections, and three such connections from one address made the
    origin (max_connections) refuse an innocent visitor. Origin connections are now capped
    per visitor connection and per client address; the rest wait their turn."""
    edge, origin = chain(
        app.port, origin_kw={"max_connections": 40}, http={"upstream_queue_timeout_s": 1.0}
    )
    # each response is far larger than HTTP/2's initial window: none can finish
    attackers = [
        _h2_streams_never_read(edge.port, kpki.site_ca, "127.0.0.31", "/bytes?n=4000000", 100)
        for _ in range(5)
    ]
    try:
        seen: list[float] = []

        def active() -> float:
            return float(origin.metric("blindfold_origin_connections_active"))

        def busy() -> bool:
            seen.append(active())
            return seen[-1] >= 30

        assert wait_until(busy, 20), seen  # the attack holds what the edge lets it hold
        for _ in range(3):
            status, _, body = _get(edge, kpki, "/echo", source="127.0.0.32")
            assert status == 200, body  # an innocent visitor is still served
            seen.append(active())
        # from the origin's side: one address never held more than its share (32 by default)
        assert max(seen) <= 32 + 1, seen
        # the attacker's address has used its share: its next request waits, then gets 503
        t0 = time.monotonic()
        status, head, _ = _get(edge, kpki, "/echo", source="127.0.0.31")
        assert (status, _values(head, "retry-after")) == (503, ["1"])
        assert time.monotonic() - t0 >= 0.9
    finally:
        for tls in attackers:
            tls.close()


def test_one_visitors_refused_origin_connection_does_not_take_the_origin_down(
    chain: Any, kpki: KeylessPki, app: Any
) -> None:
    """The origin closes a visitor's connections beyond twice its share at once, before TLS:
    a handshake that fails for that visitor only. It must not mark the origin down for every
    visitor (before: `origin_down`, blindfold_origin_up 0, the origin skipped by everyone for
    origin_down_s)."""
    edge, origin = chain(app.port, origin_kw={"per_client_connections": 1})
    target = f"127.0.0.1:{origin.port}"
    attacker = _h2_streams_never_read(edge.port, kpki.site_ca, "127.0.0.33", "/bytes?n=4000000", 10)
    try:
        refused = "refused_per_client_connections"

        def origin_refused() -> bool:
            return bool(origin.metric("blindfold_origin_connections_total", result=refused) >= 1)

        assert wait_until(origin_refused, 15)  # the origin closed some of them at once

        def edge_saw_it() -> bool:
            text = edge.metrics()
            return "blindfold_origin_connect_failures_total{" in text

        assert wait_until(edge_saw_it, 15)  # and the edge's handshakes there failed
        assert edge.metric("blindfold_origin_up", route="route0", origin=target) == 1
        assert not edge.records("origin_down"), edge.records("origin_down")
        status, _, body = _get(edge, kpki, "/echo", source="127.0.0.34")
        assert status == 200, body  # another visitor is served as before
    finally:
        attacker.close()


class Issue17App:
    """/hints: 103 Early Hints, then a page public for 60 s. /flaky: public for 1 s with
    stale-if-error=60 and while-revalidate off, then 503 once `failing` is set. /swr: public for
    1 s with stale-while-revalidate=30 and an ETag; its revalidation gets a 304 (max-age=60)."""

    def __init__(self) -> None:
        app = self
        self.requests: list[tuple[str, str]] = []  # (path, If-None-Match)
        self.failing = False
        self.lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                inm = self.headers.get("If-None-Match", "")
                with app.lock:
                    app.requests.append((self.path, inm))
                status, cc = 200, "public, max-age=60"
                if self.path == "/hints":
                    self.wfile.write(
                        b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
                    )
                elif self.path == "/flaky":
                    status = 503 if app.failing else 200
                    cc = "no-store" if app.failing else "public, max-age=1, stale-if-error=60"
                elif self.path == "/swr":
                    status = 304 if inm == '"v1"' else 200
                    cc = "public, max-age=60" if inm else "max-age=1, stale-while-revalidate=30"
                body = f"{self.path} {len(app.requests)}\n".encode() if status != 304 else b""
                self.send_response(status)
                self.send_header("Cache-Control", cc)
                self.send_header("ETag", '"v1"')
                if status != 304:
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


def _dump(edge: EdgeProcess, kpki: KeylessPki, path: str, *args: str) -> list[str]:
    """curl's header dump: every response head, interim ones included, as lines."""
    out = curl(edge.port, "example.test", kpki.site_ca, "-D", "/dev/stderr", *args, path=path)
    assert out.returncode == 0, out.stderr
    return [line.strip() for line in out.stderr.splitlines()]


def test_early_hints_reach_http1_and_http2_visitors_and_are_never_cached(
    chain: Any, kpki: KeylessPki
) -> None:
    """Issue 17: the origin's 103 Early Hints (through the origin agent) reaches visitors over
    HTTP/1.1 and HTTP/2, before the final response; a cache hit sends none, and the stored
    response has none of the hint's fields. Before, the upstream client dropped every 1xx."""
    app = Issue17App()
    try:
        edge, _ = chain(app.port)
        for version in ("--http1.1", "--http2"):
            lines = _dump(edge, kpki, "/hints", version, "-H", "Cache-Control: no-cache")
            first = lines[0].split()
            assert first[1] == "103", lines
            assert "link: </style.css>; rel=preload" in [x.lower() for x in lines]
            finals = [x for x in lines if x.startswith("HTTP/") and " 200" in x]
            assert len(finals) == 1 and lines.index(finals[0]) > 0, lines
        served = len(app.requests)
        lines = _dump(edge, kpki, "/hints", "--http1.1")
        assert lines[0].split()[1] == "200", lines  # from the cache: no hint
        assert "x-blindfold-cache: hit" in [x.lower() for x in lines]
        assert not any(x.lower().startswith("link:") for x in lines)
        assert len(app.requests) == served
    finally:
        app.close()


def test_stale_if_error_answers_an_origin_error_within_its_window(
    chain: Any, kpki: KeylessPki
) -> None:
    """RFC 5861 §4 at the edge: once stale, a copy with stale-if-error=60 answers instead of the
    origin's 503; a route with cache_stale_if_error = false passes the 503 on."""
    for enabled in (True, False):
        app = Issue17App()
        try:
            edge, _ = chain(app.port, cache_stale_if_error=enabled)
            status, head, body = _get(edge, kpki, "/flaky")
            assert (status, _values(head, "x-blindfold-cache")) == (200, ["miss"])
            app.failing = True
            time.sleep(1.2)  # max-age=1: the stored copy is stale now
            status, head, body2 = _get(edge, kpki, "/flaky")
            if enabled:
                assert (status, body2) == (200, body)
                assert _values(head, "x-blindfold-cache") == ["stale"]
                assert int(_values(head, "age")[0]) >= 1
            else:
                assert status == 503
            assert app.requests[-1][0] == "/flaky"  # the origin was asked either way
        finally:
            app.close()


def test_stale_while_revalidate_serves_at_once_then_refreshes(chain: Any, kpki: KeylessPki) -> None:
    """RFC 5861 §3 at the edge: within the window the stale copy is served at once and the
    origin is asked with the stored validators afterwards; its 304 freshens the copy."""
    app = Issue17App()
    try:
        edge, _ = chain(app.port)
        status, head, body = _get(edge, kpki, "/swr")
        assert (status, _values(head, "x-blindfold-cache")) == (200, ["miss"])
        time.sleep(1.2)
        status, head, body2 = _get(edge, kpki, "/swr")
        assert (status, body2, _values(head, "x-blindfold-cache")) == (200, body, ["stale"])
        assert wait_until(lambda: app.requests[-1] == ("/swr", '"v1"'), 10), app.requests
        status, head, body3 = _get(edge, kpki, "/swr")  # freshened by the 304: max-age=60
        assert (status, body3, _values(head, "x-blindfold-cache")) == (200, body, ["hit"])
        assert len(app.requests) == 2
    finally:
        app.close()
