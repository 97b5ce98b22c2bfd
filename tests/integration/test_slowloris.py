"""A hello sent byte by byte is cut at hello_timeout_s; thousands of such connections do not
slow a legitimate client (its latency stays within 2x of unloaded)."""

from __future__ import annotations

import selectors
import socket
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from blindfold.io.limits import raise_fd_limit
from tests.helpers import tlsbuild
from tests.helpers.clients import get, wait_until
from tests.helpers.edgeproc import EdgeProcess, edge_config, route
from tests.helpers.origin import TlsOrigin

Start = Callable[..., EdgeProcess]
SLOW = 2000
HELLO_TIMEOUT = 3.0


def latency(port: int, ca: Path, n: int = 30) -> float:
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        reply = get(port, "example.test", ca, source="127.0.0.2")
        samples.append(time.perf_counter() - t0)
        assert b"HTTP/1.1 200 " in reply
    return statistics.median(samples)


def test_slowloris_is_cut_and_legit_latency_holds(
    start_edge: Start, origin: TlsOrigin, site: dict[str, Path]
) -> None:
    assert raise_fd_limit() > SLOW + 500
    edge = start_edge(
        edge_config(
            route(["example.test"], [f"127.0.0.1:{origin.port}"]),
            hello_timeout_s=HELLO_TIMEOUT,
            max_connections=50000,
        )
    )
    latency(edge.port, site["ca"], 10)  # warm up
    unloaded = latency(edge.port, site["ca"])

    hello = tlsbuild.openssl_hello("example.test")
    sel = selectors.DefaultSelector()
    socks: dict[socket.socket, float] = {}
    closed_after: list[float] = []
    for i in range(SLOW):
        s = socket.socket()
        s.setblocking(False)
        s.bind((f"127.0.{1 + i // 250}.{1 + i % 250}", 0))
        s.connect_ex(("127.0.0.1", edge.port))
        socks[s] = time.monotonic()
    _wait_connected(list(socks))
    for s in socks:
        s.send(hello[:1])  # the first byte only: the edge accepts and starts its timer
        sel.register(s, selectors.EVENT_READ)
    # measure once the edge holds every one of them (accepted, waiting for the hello)
    assert wait_until(lambda: edge.metric("blindfold_connections_active") >= SLOW, 10)
    loaded = latency(edge.port, site["ca"])

    # keep trickling one byte per second each until the edge cuts them, bounded in time
    sent = 1
    deadline = time.monotonic() + HELLO_TIMEOUT + 10
    next_byte = time.monotonic()
    while socks and time.monotonic() < deadline:
        if time.monotonic() >= next_byte and sent < len(hello):
            for s in list(socks):
                try:
                    s.send(hello[sent : sent + 1])
                except OSError:
                    pass
            sent += 1
            next_byte = time.monotonic() + 1.0
        for key, _ in sel.select(0.1):
            s = key.fileobj  # type: ignore[assignment]
            assert isinstance(s, socket.socket)
            try:
                data = s.recv(100)
            except OSError:
                data = b""
            if not data:
                closed_after.append(time.monotonic() - socks.pop(s))
                sel.unregister(s)
                s.close()
    for s in socks:
        s.close()
    assert not socks, f"{len(socks)} slow connections were not cut"
    assert len(closed_after) == SLOW
    assert min(closed_after) >= HELLO_TIMEOUT - 0.3
    assert max(closed_after) <= HELLO_TIMEOUT + 3.0
    print(f"latency unloaded {unloaded * 1e3:.2f} ms, with {SLOW} slowloris {loaded * 1e3:.2f} ms")
    assert loaded <= 2 * unloaded, (loaded, unloaded)
    assert edge.metric("blindfold_connections_refused_total", reason="hello_timeout") == SLOW
    assert origin.seen.requests == 10 + 30 + 30  # slow connections never reached it


def _wait_connected(socks: list[socket.socket], timeout_s: float = 10.0) -> None:
    """Until every non-blocking connect has completed (the socket turns writable)."""
    pending = set(socks)
    with selectors.DefaultSelector() as sel:
        for s in pending:
            sel.register(s, selectors.EVENT_WRITE)
        deadline = time.monotonic() + timeout_s
        while pending and time.monotonic() < deadline:
            for key, _events in sel.select(deadline - time.monotonic()):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
                sel.unregister(sock)
                pending.discard(sock)
    assert not pending, f"{len(pending)} connections not established"
