"""The admin listener (/metrics, /healthz; io.admin_http) against slow clients (atk-visitor
#7): 64 connections trickling a header line every 4 s kept every slot, because the deadline was
per read, not per request; /healthz went unanswered. A real server on a loop in a thread, real
sockets."""

from __future__ import annotations

import asyncio
import select
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from blindfold.io import admin_http
from blindfold.io.admin_http import AdminServer


async def _handler(method: str, path: str) -> tuple[int, str, bytes]:
    return (200, "text/plain", b"ok\n") if path == "/healthz" else (404, "text/plain", b"")


@pytest.fixture
def admin() -> Iterator[int]:
    loop = asyncio.new_event_loop()
    server = AdminServer(_handler)
    ready = threading.Event()
    port: list[int] = []

    async def start() -> None:
        port.append((await server.start("127.0.0.1", 0))[1])
        ready.set()

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(start(), loop)
    assert ready.wait(10)
    yield port[0]
    asyncio.run_coroutine_threadsafe(server.close(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


def _healthz(port: int, source: str = "127.0.0.1") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0)) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
        return data


def test_a_request_head_has_one_deadline(admin: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(admin_http, "REQUEST_TIMEOUT_S", 1.0, raising=False)
    monkeypatch.setattr(admin_http, "READ_TIMEOUT_S", 1.0, raising=False)  # (before the fix)
    slow = socket.create_connection(("127.0.0.1", admin), timeout=5)
    slow.sendall(b"GET /healthz HTTP/1.1\r\n")
    start = time.monotonic()
    ended = None
    try:
        while time.monotonic() - start < 4.0:
            # a header line every 0.3 s: each read comes well within the deadline
            if select.select([slow], [], [], 0.3)[0]:
                slow.recv(4096)  # the 400, or the end: the server gave up on this request
                ended = time.monotonic() - start
                break
            slow.sendall(b"x-a: b\r\n")
    except OSError:
        ended = time.monotonic() - start
    finally:
        slow.close()
    assert ended is not None and ended < 2.5, ended


def test_one_address_cannot_take_every_slot(admin: int) -> None:
    hog = [
        socket.create_connection(("127.0.0.1", admin), timeout=5, source_address=("127.0.0.9", 0))
        for _ in range(admin_http.MAX_CONNECTIONS)
    ]
    try:
        assert _healthz(admin, "127.0.0.10").startswith(b"HTTP/1.1 200")
    finally:
        for s in hog:
            s.close()


def test_a_connection_open_at_shutdown_ends_quietly() -> None:
    """A process stopping with an admin connection open cancels its handler; Python 3.11's
    start_server callback then calls task.exception() on the cancelled task and logs
    "Exception in callback" with a traceback (seen when the origin stopped under a slow
    client)."""
    reported: list[dict[str, object]] = []

    async def run() -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _loop, ctx: reported.append(ctx))
        server = AdminServer(_handler)
        _host, port = await server.start("127.0.0.1", 0)
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /healthz HTTP/1.1\r\n")  # a head that never ends
        await writer.drain()
        for _ in range(100):  # until the server's handler waits for the rest
            await asyncio.sleep(0.01)
            handlers = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            if handlers:
                break
        assert handlers
        await server.close()
        for task in handlers:  # what asyncio.run does to the tasks left at its end
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        await asyncio.sleep(0.05)  # the done-callbacks run
        writer.close()

    asyncio.run(run())
    assert not reported, reported


def _keep_alive_get(s: socket.socket) -> bytes:
    """One keep-alive GET /healthz on `s`; the answer's head and body (b"" if it closed)."""
    s.sendall(b"GET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
    data = b""
    while not data.endswith(b"ok\n"):
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def test_a_few_clients_asking_slowly_cannot_keep_the_listener(
    admin: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """atk3 #4: 4 addresses x 16 keep-alive connections, each asking now and then, held all
    64 slots for as long as they liked: /metrics from anyone else was reset."""
    monkeypatch.setattr(admin_http, "CONNECTION_LIFETIME_S", 1.0, raising=False)
    hogs: list[socket.socket] = []
    try:
        for n in range(4):
            for _ in range(admin_http.MAX_PER_ADDRESS):
                hogs.append(
                    socket.create_connection(
                        ("127.0.0.1", admin), timeout=5, source_address=(f"127.0.0.{20 + n}", 0)
                    )
                )
        # every hog that got a slot asks (a closed one answers nothing)
        held = [s for s in hogs if _keep_alive_get(s).startswith(b"HTTP/1.1 200")]
        assert len(held) < admin_http.MAX_CONNECTIONS  # the reserve stays for new clients
        assert _healthz(admin, "127.0.0.30").startswith(b"HTTP/1.1 200")
        # a held connection's answers end it once its lifetime is over
        time.sleep(1.1)  # the lifetime under test; nothing to wait for but the clock
        last = _keep_alive_get(held[0])
        assert b"connection: close" in last.lower()
        assert held[0].recv(1) == b""  # closed by the server
    finally:
        for s in hogs:
            s.close()


TOKEN = b"0123456789abcdef-admin-token"


def _get(
    port: int, path: str, headers: str = "", host: str = "127.0.0.1", method: str = "GET"
) -> tuple[str, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        request = f"{method} {path} HTTP/1.1\r\nhost: {host}\r\n{headers}connection: close\r\n\r\n"
        s.sendall(request.encode())
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return head.decode("latin-1"), body


def test_with_a_token_every_path_but_the_page_needs_it() -> None:
    """Issue 13: an admin listener off loopback must not hand its figures to whoever reaches
    it. The page itself holds none (it asks status.json with the token)."""
    loop = asyncio.new_event_loop()

    async def handler(method: str, path: str) -> tuple[int, str, bytes]:
        return 200, "text/plain", f"answer {path}".encode()

    server = AdminServer(handler, TOKEN)
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        port = asyncio.run_coroutine_threadsafe(server.start("127.0.0.1", 0), loop).result(10)[1]
        for path in ("/metrics", "/status.json", "/healthz", "/anything"):
            head, body = _get(port, path)
            assert head.startswith("HTTP/1.1 401") and b"answer" not in body, (path, head)
            assert "www-authenticate: Bearer" in head
            head, body = _get(port, path, "authorization: Bearer wrong-token-0123456789\r\n")
            assert head.startswith("HTTP/1.1 401") and b"answer" not in body
            head, body = _get(port, path, f"authorization: Bearer {TOKEN.decode()}\r\n")
            assert head.startswith("HTTP/1.1 200") and body == f"answer {path}".encode()
        head, body = _get(port, "/")
        assert head.startswith("HTTP/1.1 200") and body == b"answer /"
        assert "content-security-policy: default-src 'none'" in head
        assert "x-content-type-options: nosniff" in head and "cache-control: no-store" in head
    finally:
        asyncio.run_coroutine_threadsafe(server.close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def test_without_a_token_a_page_under_another_name_gets_no_figures(admin: int) -> None:
    """DNS rebinding: a site whose name now resolves to 127.0.0.1 runs script in the
    operator's browser; its requests name that site in Host. Before: answered."""
    for host in ("evil.example", f"evil.example:{admin}", "127.0.0.1.evil.example"):
        head, _ = _get(admin, "/healthz", host=host)
        assert head.startswith("HTTP/1.1 403"), (host, head)
    for host in (
        f"127.0.0.1:{admin}",
        "127.0.0.1",
        "localhost:1",
        "[::1]:7743",
        "[::1]",
        "10.0.0.5:80",
    ):
        head, _ = _get(admin, "/healthz", host=host)
        assert head.startswith("HTTP/1.1 200"), (host, head)
    head, _ = _get(admin, "/", host="evil.example")  # the page itself holds no figures
    assert head.startswith("HTTP/1.1 404")  # (this test's handler has no page)


def test_a_post_needs_the_token_and_no_cross_site_request_passes() -> None:
    """Attack review H: a page in the operator's browser posted a simple form to
    http://127.0.0.1:PORT/acme/renew on a listener without a token: 202, six times, each
    spending the CA's duplicate-certificate limit. Before the fix: 200 below (no token) and
    200 with the token plus Origin / Sec-Fetch-Site: cross-site."""
    loop = asyncio.new_event_loop()

    async def handler(method: str, path: str) -> tuple[int, str, bytes]:
        return 200, "text/plain", f"answer {method} {path}".encode()

    untokened = AdminServer(handler, None, post_paths=frozenset({"/renew"}))
    tokened = AdminServer(handler, TOKEN, post_paths=frozenset({"/renew"}))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    auth = f"authorization: Bearer {TOKEN.decode()}\r\n"
    try:
        bare = asyncio.run_coroutine_threadsafe(untokened.start("127.0.0.1", 0), loop).result(10)
        port = asyncio.run_coroutine_threadsafe(tokened.start("127.0.0.1", 0), loop).result(10)[1]
        head, body = _get(bare[1], "/renew", method="POST")
        assert head.startswith("HTTP/1.1 403") and b"answer" not in body, head
        head, _ = _get(bare[1], "/healthz")  # reads stay as they were on loopback
        assert head.startswith("HTTP/1.1 200"), head
        for extra in (
            "origin: https://evil.example\r\n",
            "origin: null\r\n",
            "sec-fetch-site: cross-site\r\n",
            "sec-fetch-site: same-site\r\n",
        ):
            head, body = _get(port, "/renew", auth + extra, method="POST")
            assert head.startswith("HTTP/1.1 403") and b"answer" not in body, (extra, head)
            head, body = _get(bare[1], "/healthz", extra)
            assert head.startswith("HTTP/1.1 403") and b"answer" not in body, (extra, head)
        head, body = _get(port, "/renew", method="POST")
        assert head.startswith("HTTP/1.1 401"), head
        head, body = _get(port, "/renew", auth + "sec-fetch-site: none\r\n", method="POST")
        assert head.startswith("HTTP/1.1 200") and body == b"answer POST /renew", head
        head, body = _get(bare[1], "/healthz", "sec-fetch-site: same-origin\r\n")
        assert head.startswith("HTTP/1.1 200"), head
    finally:
        for server in (untokened, tokened):
            asyncio.run_coroutine_threadsafe(server.close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
