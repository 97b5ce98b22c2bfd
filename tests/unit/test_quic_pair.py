"""Pair test: aioquic's client and server wired in memory through the edge's flow table, with
`now` passed in. The handshake and a stream cross the table untouched; a client whose address
changes keeps its connection, and the origin validates the new path itself (RFC 9000 §9)."""

from __future__ import annotations

from pathlib import Path

from aioquic.quic import events as qe
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection

from blindfold.core.quic_flows import (
    Dropped,
    Forward,
    Held,
    HelloReceived,
    QuicFlowTable,
    SendToClient,
)
from blindfold.core.quic_flows import (
    Path as FlowPath,
)
from blindfold.core.quic_initial import QUIC_V2

ORIGIN = ("192.0.2.80", 443)
VISITOR = ("203.0.113.7", 50000)


class Wire:
    """client <-> edge flow table <-> origin, all in memory. Each path of a flow is its own
    'edge socket' as the origin sees it: ("192.0.2.1", 40000 + n)."""

    def __init__(self, site: dict[str, Path], version: int = 1, prefer: int | None = None) -> None:
        client_cfg = QuicConfiguration(
            is_client=True,
            alpn_protocols=["h3"],
            server_name="example.test",
            cafile=str(site["ca"]),
            supported_versions=[version] if prefer is None else [prefer, version],
            original_version=version if prefer is not None else None,
        )
        self.server_cfg = QuicConfiguration(is_client=False, alpn_protocols=["h3"])
        self.server_cfg.load_cert_chain(str(site["cert"]), str(site["key"]))
        self.client = QuicConnection(configuration=client_cfg)
        self.server: QuicConnection | None = None
        self.table = QuicFlowTable()
        self.now = 1000.0
        self.client_addr = VISITOR
        self.edge_ports: dict[int, FlowPath] = {}
        self.hellos: list[HelloReceived] = []
        self.drops: list[str] = []
        self.elsewhere: list[tuple[tuple[str, int], bytes]] = []  # sent to other addresses
        self.sent: list[bytes] = []  # what the client sent, in order
        self.client.connect(ORIGIN, now=self.now)

    def _to_origin(self, fwd: Forward) -> None:
        if fwd.new_path:
            port = 40000 + len(self.edge_ports)
            fwd.path.handle = port
            self.edge_ports[port] = fwd.path
        for data in fwd.datagrams:
            if self.server is None:
                self.server = QuicConnection(
                    configuration=self.server_cfg,
                    original_destination_connection_id=fwd.path.flow.odcid,
                )
            self.server.receive_datagram(data, ("192.0.2.1", fwd.path.handle), now=self.now)

    def pump(self, rounds: int = 20) -> None:
        for _ in range(rounds):
            moved = False
            for data, _addr in self.client.datagrams_to_send(now=self.now):
                moved = True
                self.sent.append(data)
                r = self.table.from_client(data, self.client_addr, self.now)
                if isinstance(r, HelloReceived):
                    self.hellos.append(r)
                    r = self.table.accept(r.flow, self.now)
                if isinstance(r, Forward):
                    self._to_origin(r)
                elif isinstance(r, Dropped):
                    self.drops.append(r.reason)
                else:
                    assert isinstance(r, Held), r
            if self.server is not None:
                for data, addr in self.server.datagrams_to_send(now=self.now):
                    moved = True
                    path = self.edge_ports[addr[1]]
                    back = self.table.from_origin(path, data, self.now)
                    assert isinstance(back, SendToClient)
                    if back.address == self.client_addr:
                        self.client.receive_datagram(back.datagram, ORIGIN, now=self.now)
                    else:
                        self.elsewhere.append((back.address, back.datagram))
            self.now += 0.01
            if not moved:
                break

    def events(self, conn: QuicConnection) -> list[qe.QuicEvent]:
        out = []
        while (e := conn.next_event()) is not None:
            out.append(e)
        return out


def _handshake(wire: Wire) -> None:
    wire.pump()
    assert any(isinstance(e, qe.HandshakeCompleted) for e in wire.events(wire.client))
    assert wire.server is not None
    assert any(isinstance(e, qe.HandshakeCompleted) for e in wire.events(wire.server))


def test_a_handshake_and_a_stream_cross_the_flow_table(site: dict[str, Path]) -> None:
    wire = Wire(site)
    _handshake(wire)
    assert [h.hello.sni for h in wire.hellos] == ["example.test"]
    assert wire.hellos[0].hello.ja4.startswith("q13d")
    flow = wire.hellos[0].flow
    assert len(flow.cids) >= 2  # the original DCID and the origin's ID, learnt
    sid = wire.client.get_next_available_stream_id()
    wire.client.send_stream_data(sid, b"ping over the edge", end_stream=True)
    wire.pump()
    assert wire.server is not None
    got = [e for e in wire.events(wire.server) if isinstance(e, qe.StreamDataReceived)]
    assert b"".join(e.data for e in got) == b"ping over the edge"
    assert flow.reader is None  # freed after the client's first Handshake packet
    assert flow.datagrams_in > 2 and flow.datagrams_out > 2 and not wire.drops


def test_v2_handshake_crosses_the_flow_table(site: dict[str, Path]) -> None:
    wire = Wire(site, version=QUIC_V2)
    _handshake(wire)
    assert wire.hellos[0].hello.version == QUIC_V2


def test_compatible_version_negotiation_crosses_the_flow_table(site: dict[str, Path]) -> None:
    """RFC 9368: the client starts in v1 and lists v2 first; the origin answers in v2, and
    the client's later Initials use v2 keys (from the same original DCID). The edge follows:
    it learns the origin's IDs from v2 packets and reads the v2 Initials."""
    wire = Wire(site, version=1, prefer=QUIC_V2)
    _handshake(wire)
    assert wire.server is not None and wire.server._version == QUIC_V2
    assert not wire.drops
    sid = wire.client.get_next_available_stream_id()
    wire.client.send_stream_data(sid, b"in v2", end_stream=True)
    wire.pump()
    got = [e for e in wire.events(wire.server) if isinstance(e, qe.StreamDataReceived)]
    assert b"".join(e.data for e in got) == b"in v2"


def test_a_new_client_address_is_validated_by_the_origin(site: dict[str, Path]) -> None:
    """NAT rebinding: the client's datagrams now come from another port. The edge gives that
    path its own socket; the origin sees a new peer address, challenges it (through the edge,
    to the new address) and moves the connection there once answered."""
    wire = Wire(site)
    _handshake(wire)
    assert wire.server is not None
    assert wire.server.get_peer_address() == ("192.0.2.1", 40000)
    wire.client_addr = ("203.0.113.7", 61000)
    sid = wire.client.get_next_available_stream_id()
    wire.client.send_stream_data(sid, b"after the move", end_stream=True)
    wire.pump(40)
    got = [e for e in wire.events(wire.server) if isinstance(e, qe.StreamDataReceived)]
    assert b"".join(e.data for e in got) == b"after the move"
    assert wire.server.get_peer_address() == ("192.0.2.1", 40001)  # the new path's socket
    path = wire.edge_ports[40001]
    assert path.client == ("203.0.113.7", 61000) and path.confirmed
    assert len(wire.hellos[0].flow.paths) == 2


def test_a_replayed_datagram_from_a_spoofed_address_moves_nothing(site: dict[str, Path]) -> None:
    """An on-path attacker replays the client's datagram from a victim's address: the edge
    opens a path for it, the origin challenges that address (at most 3x what it received
    there) and keeps the connection on the client's path."""
    wire = Wire(site)
    _handshake(wire)
    sid = wire.client.get_next_available_stream_id()
    wire.client.send_stream_data(sid, b"x" * 100)
    wire.pump()
    victim = ("198.51.100.66", 4444)
    replayed = wire.sent[-1]
    r = wire.table.from_client(replayed, victim, wire.now)
    assert isinstance(r, Forward) and r.new_path  # the edge's guards check `victim` here
    wire._to_origin(r)
    wire.pump()
    assert wire.server is not None
    assert wire.server.get_peer_address() == ("192.0.2.1", 40000)
    to_victim = sum(len(d) for a, d in wire.elsewhere if a == victim)
    assert to_victim <= 3 * len(replayed)
