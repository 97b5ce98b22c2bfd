"""Whom the origin agent attributes an HTTP/3 request to when the connection's path changes
(attack review atk3, finding 1; docs/quic.md "Paths and migration").

A QUIC client that holds a connection's keys can send its next packets with any source
address. aioquic makes a new path current as soon as a non-probing packet arrives on it, before
the path is validated (RFC 9000 §9.3). The origin attributes a request to the visitor of the
last *validated* path: an address the client has shown it receives at, so a one-way spoof
cannot pin its requests (and the ban they earn) on someone else's address."""

from __future__ import annotations

import asyncio
import json
import select
import socket
from pathlib import Path
from typing import Any, cast

from tests.helpers.clients import curl
from tests.helpers.h3client import H3Client
from tests.integration.test_h3_origin import SQLI
from tests.integration.test_quic_edge import quic_chain


class _SpoofedSource:
    """A transport that sends from another socket (the victim's address) and so never gets
    what comes back there: a one-way spoof, as from a network without source filtering."""

    def __init__(self, real: Any, sock: socket.socket) -> None:
        self.real = real
        self.sock = sock
        self.sent = 0

    def sendto(self, data: bytes, addr: Any = None) -> None:
        self.sent += len(data)
        self.sock.sendto(data, addr)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def _same_worker(address: str, first: int) -> str:
    """An address the edge steers to the same worker as `address` (so its flow is known)."""
    from blindfold.io.listeners import steer_index

    return next(
        f"127.0.0.{i}"
        for i in range(first, 250)
        if steer_index(f"127.0.0.{i}", 2) == steer_index(address, 2)
    )


def test_a_one_way_spoofed_path_does_not_frame_another_address(
    start_edge: Any, start_origin: Any, app: Any, site: dict[str, Path], tmp_path: Path
) -> None:
    """The attacker completes HTTP/3 from its own address, then sends an SQL injection on its
    connection with a victim's address as source, never answering the origin's PATH_CHALLENGE
    (it never receives there). The WAF's ban falls on the attacker, the victim stays served."""
    edge, origin, uport = quic_chain(
        start_edge, start_origin, app, site, tmp_path, quic_kw={"idle_timeout_s": 30.0}
    )
    attacker = "127.0.0.80"
    victim = _same_worker(attacker, 81)
    vsock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    vsock.bind((victim, 0))

    async def run() -> int:
        async with H3Client(uport, ca=site["ca"], source=attacker, timeout=3) as c:
            assert json.loads((await c.get("/echo")).body)["x-forwarded-for"] == attacker
            protocol = c.protocol
            assert protocol is not None
            spoof = _SpoofedSource(protocol._transport, vsock)
            protocol._transport = cast(Any, spoof)  # sends from the victim's socket
            try:
                # no answer can come back: it goes to the victim's address
                await asyncio.wait_for(c.get(SQLI), 2)
            except TimeoutError:
                pass
            protocol._transport = spoof.real
            return spoof.sent

    try:
        sent = asyncio.run(run())
        back = 0
        while select.select([vsock], [], [], 0.2)[0]:
            back += len(vsock.recv(65535))
    finally:
        vsock.close()
    assert sent > 0  # the injection did leave from the victim's address
    decision = origin.wait_for(lambda r: r.get("event") == "decision", 10)
    assert decision is not None, "the injection never reached the WAF"
    assert decision["value"] == attacker
    assert (
        origin.wait_for(lambda r: r.get("event") == "decision" and r.get("value") == victim, 0.5)
        is None
    )
    assert curl(edge.port, "example.test", site["ca"], source=victim).returncode == 0


def test_a_validated_migration_moves_the_visitor(
    start_edge: Any, start_origin: Any, app: Any, site: dict[str, Path], tmp_path: Path
) -> None:
    """A client that really moves to a new address (and so answers PATH_CHALLENGE there) is
    that address's visitor once the path is validated."""
    _edge, _origin, uport = quic_chain(
        start_edge, start_origin, app, site, tmp_path, decisions=False
    )
    first = "127.0.0.90"
    moved = _same_worker(first, 91)

    async def run() -> list[str]:
        async with H3Client(uport, ca=site["ca"], source=first, timeout=3) as c:
            seen = [json.loads((await c.get("/echo")).body)["x-forwarded-for"]]
            protocol = c.protocol
            assert protocol is not None
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind((moved, 0))
            loop = asyncio.get_running_loop()
            await loop.create_datagram_endpoint(lambda: protocol, sock=sock)
            # the first request on the new path may arrive before it is validated
            for _ in range(3):
                seen.append(json.loads((await c.get("/echo")).body)["x-forwarded-for"])
            return seen

    seen = asyncio.run(run())
    assert seen[0] == first
    assert seen[-1] == moved


class _Capture:
    """A transport that remembers the last datagram it sent."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.last: bytes | None = None

    def sendto(self, data: bytes, addr: Any = None) -> None:
        self.last = data
        self.real.sendto(data, addr)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


class _Rotating:
    """A transport that sends from one of several sockets at the victim's address in turn."""

    def __init__(self, real: Any, socks: list[socket.socket]) -> None:
        self.real = real
        self.socks = socks
        self.i = 0

    def sendto(self, data: bytes, addr: Any = None) -> None:
        self.socks[self.i % len(self.socks)].sendto(data, addr)
        self.i += 1

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def test_an_edge_port_reused_for_another_visitor_frames_nobody(
    start_edge: Any, start_origin: Any, app: Any, site: dict[str, Path], tmp_path: Path
) -> None:
    """atk4 #1: the origin looked the proven path's visitor up at request time, by the edge's
    socket address. The attacker proves its path, then replays one of its own datagrams from
    ever new ports at the victim's address: each is a new path at the edge (its oldest, the
    attacker's real one, evicted and its socket closed) with a fresh socket announced as the
    victim, until the kernel gives the proven path's port to one of them; a one-way spoofed
    SQL injection was then attributed to the victim. The visitor is now the one bound when
    the path was proven."""
    _edge, origin, uport = quic_chain(
        start_edge, start_origin, app, site, tmp_path, quic_kw={"idle_timeout_s": 120.0}
    )
    attacker = "127.0.0.80"
    victim = _same_worker(attacker, 81)
    vsocks = []
    for _ in range(8):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.bind((victim, 0))
        s.setblocking(False)
        vsocks.append(s)
    dest = ("127.0.0.1", uport)

    async def run() -> int:
        async with H3Client(uport, ca=site["ca"], source=attacker, timeout=5) as c:
            assert json.loads((await c.get("/echo")).body)["x-forwarded-for"] == attacker
            protocol = c.protocol
            assert protocol is not None
            cap = _Capture(protocol._transport)
            protocol._transport = cast(Any, cap)
            protocol._quic.send_ping(1)
            protocol.transmit()
            await asyncio.sleep(0.05)
            replay = cap.last
            assert replay is not None
            protocol._transport = cast(Any, _Rotating(cap.real, vsocks))
            sent = 0
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            while sent < 60000 and loop.time() - t0 < 30:
                for _ in range(100):
                    vsocks[sent % 8].sendto(replay, dest)
                    sent += 1
                await asyncio.sleep(0.006)
                for s in vsocks:  # what comes back at the victim's address: never read
                    try:
                        while s.recv(65535):
                            pass
                    except BlockingIOError:
                        pass
            # the attacker's stack never sees an acknowledgement (they go to the victim)
            protocol._quic._loss._cc.bytes_in_flight = 0
            task = asyncio.ensure_future(protocol.request("GET", SQLI, "example.test", b"", []))
            await asyncio.sleep(1.0)
            task.cancel()
            return sent

    try:
        assert asyncio.run(run()) >= 10000
    finally:
        for s in vsocks:
            s.close()
    # the edge now also limits new paths per flow, so most replays (and perhaps the
    # injection) stop there: whatever reaches the origin, the victim is not banned
    decision = origin.wait_for(lambda r: r.get("event") == "decision", 10)
    assert decision is None or decision["value"] == attacker, decision
    assert (
        origin.wait_for(lambda r: r.get("event") == "decision" and r["value"] == victim, 1) is None
    )
