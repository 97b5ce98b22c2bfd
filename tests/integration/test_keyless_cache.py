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
