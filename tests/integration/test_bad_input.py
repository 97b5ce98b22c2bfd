"""Bad input: each connection closed with a counted reason, no traceback, no effect on others."""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Callable
from pathlib import Path

from tests.helpers import tlsbuild as tb
from tests.helpers.clients import get, http_get, tls_connect, wait_until
from tests.helpers.edgeproc import EdgeProcess, edge_config, route
from tests.helpers.origin import TlsOrigin

Start = Callable[..., EdgeProcess]
OK = b"HTTP/1.1 200 "

CASES = {
    "not_tls": b"GET / HTTP/1.1\r\nHost: example.test\r\n\r\n",
    "sslv2_hello": b"\x80\x2e\x01\x00\x02\x00\x15\x00\x00\x00\x10" + b"\x00" * 37,
    "empty_record": b"\x16\x03\x01\x00\x00" * 3,
    "record_overflow": b"\x16\x03\x01\x48\x01" + b"\x00" * 100,
    "not_client_hello": b"\x16\x03\x01\x00\x04\x02\x00\x00\x00",
    "malformed_hello": tb.records(tb.handshake(b"\x03\x03" + b"\x00" * 10)),
    "bad_sni": tb.simple_hello(sni="bücher.example.test".encode()),
    "hello_too_large": tb.records(
        tb.handshake(
            tb.client_hello_body(
                extensions=[tb.sni_ext(b"example.test"), tb.ext(0x0015, b"\x00" * 20000)]
            )
        )
    ),
    "bad_record": b"\x16\x03\x01\x00\x05\x01\x00\x01\x00\x03" + b"\x17\x03\x03\x00\x01\x00",
}


def send_and_wait_close(port: int, data: bytes, source: str) -> bool:
    """Send `data`, return True once the edge has closed the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0)) as s:
        try:
            s.sendall(data)
            while s.recv(4096):
                pass
        except (ConnectionResetError, BrokenPipeError):
            pass
        except TimeoutError:
            return False
    return True


def test_each_bad_hello_has_its_reason(
    start_edge: Start, origin: TlsOrigin, site: dict[str, Path]
) -> None:
    edge = start_edge(
        edge_config(
            route(["example.test"], [f"127.0.0.1:{origin.port}"]),
            max_hello_bytes=16384,
            per_ip_rate_per_s=0,
        )
    )
    stop = threading.Event()
    good: list[bool] = []

    def legit() -> None:
        while not stop.is_set():
            good.append(OK in get(edge.port, "example.test", site["ca"], source="127.0.0.2"))

    t = threading.Thread(target=legit)
    t.start()
    try:
        for i, (reason, data) in enumerate(CASES.items()):
            for rep in range(3):
                assert send_and_wait_close(edge.port, data, f"127.0.1.{10 * i + rep + 1}"), reason
        # truncated: half a hello, then the client stops sending
        with socket.create_connection(
            ("127.0.0.1", edge.port), timeout=5, source_address=("127.0.2.1", 0)
        ) as s:
            s.sendall(tb.simple_hello()[:40])
            s.shutdown(socket.SHUT_WR)
            assert s.recv(10) == b""
    finally:
        stop.set()
        t.join(30)
    assert good and all(good)
    for reason in CASES:
        assert wait_until(
            lambda r=reason: edge.metric("blindfold_connections_refused_total", reason=r) == 3, 5
        ), reason
    assert edge.metric("blindfold_connections_refused_total", reason="hello_eof") == 1
    assert origin.seen.requests == len(good)  # nothing bad reached the origin
    assert not edge.tracebacks()


def test_a_peer_that_never_reads_is_bounded(
    start_edge: Start, origin: TlsOrigin, site: dict[str, Path]
) -> None:
    edge = start_edge(
        edge_config(
            route(["example.test"], [f"127.0.0.1:{origin.port}"]),
            idle_timeout_s=2,
            pipe_size_bytes=65536,
        )
    )
    stuck = tls_connect(edge.port, "example.test", site["ca"], source="127.0.0.50")
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.sendall(b"GET /bytes?n=200000000 HTTP/1.1\r\nHost: example.test\r\n\r\n")
    rss_before = _rss(edge)  # from the start: anything the edge buffers shows as growth
    for _ in range(5):  # others are served meanwhile
        assert OK in get(edge.port, "example.test", site["ca"], source="127.0.0.51")
    line = edge.wait_conn(timeout=15, outcome="idle_timeout", client="127.0.0.50")
    assert line is not None
    assert 0 < line["bytes_out"] < 20_000_000  # it flowed, then was held back, not buffered
    assert _rss(edge) - rss_before < 10_000_000
    stuck.close()


def _rss(edge: EdgeProcess) -> int:
    total = 0
    for pid in edge.worker_pids():
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) * 1024
    return total


def test_client_that_vanishes_mid_handshake(
    start_edge: Start, origin: TlsOrigin, site: dict[str, Path]
) -> None:
    edge = start_edge(edge_config(route(["example.test"], [f"127.0.0.1:{origin.port}"])))
    for i in range(20):
        raw = socket.create_connection(
            ("127.0.0.1", edge.port), source_address=(f"127.0.3.{i + 1}", 0)
        )
        raw.sendall(tb.openssl_hello("example.test"))
        raw.close()  # gone before the ServerHello
    ctx = ssl.create_default_context(cafile=str(site["ca"]))
    for _ in range(3):
        with ctx.wrap_socket(
            socket.create_connection(("127.0.0.1", edge.port)), server_hostname="example.test"
        ) as tls:
            assert OK in http_get(tls)
    assert wait_until(lambda: edge.metric("blindfold_connections_active") == 0, 10)
