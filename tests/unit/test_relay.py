"""The relay on real loopback sockets: integrity, half-close, backpressure, resets, each mode."""

from __future__ import annotations

import hashlib
import os
import socket
import struct
import threading

import pytest

from blindfold.io.reactor import EPOLLET, EPOLLIN, EPOLLOUT, EPOLLRDHUP, Reactor
from blindfold.io.relay import COPY_CHUNK, PipePool, Relay

WATCH = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    lsock = socket.create_server(("127.0.0.1", 0))
    a = socket.create_connection(lsock.getsockname())
    b, _ = lsock.accept()
    lsock.close()
    return a, b


class Harness:
    """client <-> [edge_c | relay | edge_o] <-> origin, the relay on a reactor thread."""

    def __init__(self, mode: str, pipe_size: int = 65536) -> None:
        self.client, self.edge_c = tcp_pair()
        self.edge_o, self.origin = tcp_pair()
        for s in (self.edge_c, self.edge_o):
            s.setblocking(False)
        self.reactor = Reactor()
        self.pool = PipePool(pipe_size)
        self.result: list[str | None] = []
        self.max_pending = 0
        self.relay = Relay(self.pool, self.edge_c, self.edge_o, self._done, mode)
        self.reactor.add(self.edge_c.fileno(), WATCH, self.relay.on_a)
        self.reactor.add(self.edge_o.fileno(), WATCH, self.relay.on_b)
        self.reactor.call_later(0.001, self._sample)
        self.reactor.call_later(60, self.reactor.stop)  # a deadline on every wait
        self.relay.start()
        self.thread = threading.Thread(target=self.reactor.run, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        pending = max(self.relay._ab.pending, self.relay._ba.pending)
        self.max_pending = max(self.max_pending, pending)
        self.reactor.call_later(0.001, self._sample)

    def _done(self, error: str | None) -> None:
        self.result.append(error)
        self.edge_c.close()  # as the connection owner does
        self.edge_o.close()
        self.reactor.stop()

    def join(self) -> None:
        self.thread.join(70)
        assert not self.thread.is_alive()
        for s in (self.client, self.edge_c, self.edge_o, self.origin):
            s.close()


def pump_random(sock: socket.socket, total: int, digest: list[str], shut: bool = True) -> None:
    h = hashlib.sha256()
    seed = os.urandom(1 << 16)
    sent = 0
    while sent < total:
        chunk = seed[: min(len(seed), total - sent)]
        sock.sendall(chunk)
        h.update(chunk)
        sent += len(chunk)
        seed = seed[7:] + seed[:7]
    if shut:
        sock.shutdown(socket.SHUT_WR)
    digest.append(h.hexdigest())


def drain(sock: socket.socket, digest: list[str], slow: bool = False) -> None:
    h = hashlib.sha256()
    while True:
        data = sock.recv(4096 if slow else 1 << 18)
        if not data:
            break
        h.update(data)
        if slow:
            threading.Event().wait(0.0005)
    digest.append(h.hexdigest())


@pytest.mark.parametrize("mode", ["auto", "splice", "copy"])
def test_bulk_both_ways_is_byte_exact(mode: str) -> None:
    hx = Harness(mode)
    sent_up: list[str] = []
    sent_down: list[str] = []
    got_up: list[str] = []
    got_down: list[str] = []
    threads = [
        threading.Thread(target=pump_random, args=(hx.client, 20 << 20, sent_up)),
        threading.Thread(target=pump_random, args=(hx.origin, 30 << 20, sent_down)),
        threading.Thread(target=drain, args=(hx.origin, got_up)),
        threading.Thread(target=drain, args=(hx.client, got_down)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    hx.join()
    assert sent_up == got_up and sent_down == got_down
    assert hx.result == [None]
    assert hx.relay.bytes_a_to_b == 20 << 20 and hx.relay.bytes_b_to_a == 30 << 20


def test_half_close_request_then_response() -> None:
    hx = Harness("auto")
    hx.client.sendall(b"request")
    hx.client.shutdown(socket.SHUT_WR)  # client is done sending, still reading
    received = b""
    hx.origin.settimeout(10)
    while chunk := hx.origin.recv(100):
        received += chunk
    assert received == b"request"  # origin saw EOF after the request
    hx.origin.sendall(b"response after the client's FIN")
    hx.origin.close()
    hx.client.settimeout(10)
    reply = b""
    while chunk := hx.client.recv(100):
        reply += chunk
    assert reply == b"response after the client's FIN"
    hx.join()
    assert hx.result == [None]


def test_slow_reader_is_held_back_not_buffered() -> None:
    hx = Harness("auto", pipe_size=65536)
    got: list[str] = []
    sent: list[str] = []
    t1 = threading.Thread(target=pump_random, args=(hx.origin, 8 << 20, sent))
    t2 = threading.Thread(target=drain, args=(hx.client, got, True))
    t1.start()
    t2.start()
    hx.client.shutdown(socket.SHUT_WR)
    t1.join(60)
    t2.join(60)
    hx.join()
    assert sent == got
    # the edge holds at most one pipe or one copy chunk per direction, whatever the backlog
    assert 0 < hx.max_pending <= max(hx.pool.size, COPY_CHUNK)


def test_peer_reset_ends_the_relay() -> None:
    hx = Harness("auto")
    hx.client.sendall(b"x")
    hx.origin.recv(1)
    hx.client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    hx.client.close()  # RST
    hx.origin.settimeout(10)
    try:
        assert hx.origin.recv(10) == b""  # the origin sees the end
    except ConnectionResetError:
        pass
    hx.join()
    assert hx.result == ["reset"]
