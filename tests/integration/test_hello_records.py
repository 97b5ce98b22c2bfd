"""ClientHellos cut into small TLS records (RFC 8446 §5.1 allows any length >= 1), sent one
record per TCP segment: read once each, forwarded unchanged, bounded in number."""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Callable
from pathlib import Path

from tests.helpers import tlsbuild as tb
from tests.helpers.clients import wait_until
from tests.helpers.edgeproc import EdgeProcess, edge_config, route
from tests.helpers.origin import TlsOrigin

Start = Callable[..., EdgeProcess]


def _message_of(first_flight: bytes) -> bytes:
    """The handshake bytes carried by a flight of TLS records."""
    out, pos = b"", 0
    while pos < len(first_flight):
        assert first_flight[pos] == 22
        length = int.from_bytes(first_flight[pos + 3 : pos + 5], "big")
        out += first_flight[pos + 5 : pos + 5 + length]
        pos += 5 + length
    return out


def _send_records(sock: socket.socket, raw: bytes) -> None:
    """One record per send (TCP_NODELAY): the edge reads them one by one."""
    pos = 0
    while pos < len(raw):
        length = int.from_bytes(raw[pos + 3 : pos + 5], "big")
        sock.sendall(raw[pos : pos + 5 + length])
        pos += 5 + length
        time.sleep(0.001)


def test_a_real_hello_in_small_records_is_forwarded_and_served(
    start_edge: Start, origin: TlsOrigin, site: dict[str, Path]
) -> None:
    edge = start_edge(edge_config(route(["example.test"], [f"127.0.0.1:{origin.port}"])))
    ctx = ssl.create_default_context(cafile=str(site["ca"]))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname="example.test")
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    message = _message_of(outgoing.read())
    raw = tb.records(message, [1] * 40 + [3] * 20)  # 61 records, under the bound of 64
    with socket.create_connection(("127.0.0.1", edge.port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _send_records(sock, raw)
        # the rest of the handshake and one request, over the same socket
        done = False
        while not done:
            try:
                tls.do_handshake()
                done = True
            except ssl.SSLWantReadError:
                pass
            if out := outgoing.read():
                sock.sendall(out)
            if not done:
                data = sock.recv(65536)
                assert data, "the edge or the origin closed during the handshake"
                incoming.write(data)
        tls.write(b"GET /hello HTTP/1.1\r\nHost: example.test\r\nConnection: close\r\n\r\n")
        sock.sendall(outgoing.read())
        response = b""
        while True:
            data = sock.recv(65536)
            if not data:
                break
            incoming.write(data)
            try:
                while chunk := tls.read(65536):
                    response += chunk
            except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
                pass
    assert response.startswith(b"HTTP/1.1 200 ") and b"hello from origin A" in response
    assert origin.seen.sni == ["example.test"]  # the origin parsed the very same hello


def test_a_hello_in_too_many_records_is_refused(
    start_edge: Start, origin: TlsOrigin, site: dict[str, Path]
) -> None:
    edge = start_edge(edge_config(route(["example.test"], [f"127.0.0.1:{origin.port}"])))
    message = _message_of(tb.openssl_hello("example.test"))
    raw = tb.records(message, [1] * len(message))
    got = b""
    with socket.create_connection(("127.0.0.1", edge.port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            _send_records(sock, raw)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused after 64 records: the rest may not be accepted
        try:
            while data := sock.recv(4096):
                got += data
        except ConnectionResetError:
            pass
    assert got == b"\x15\x03\x03\x00\x02\x02\x32"  # RFC 8446 §6: fatal decode_error
    assert wait_until(
        lambda: (
            edge.metric("blindfold_connections_refused_total", reason="hello_too_many_records") == 1
        ),
        5,
    )
    assert origin.seen.requests == 0 and origin.seen.peers == []
