"""The edge's QUIC flow table, driven with real clients' datagrams and `now` passed in."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blindfold.core.quic_flows import (
    DECIDING,
    OPEN,
    Dropped,
    FlowLimits,
    Forward,
    Held,
    HelloReceived,
    QuicFlowTable,
    SendToClient,
)
from blindfold.core.quic_initial import (
    QUIC_V1,
    QUIC_V2,
    VERSION_NEGOTIATION,
    parse_datagram,
    parse_long_header,
)
from tests.helpers import quic_build as qb

VISITOR = ("203.0.113.7", 50000)
SERVER_CID = bytes.fromhex("a1a2a3a4a5a6a7a8")


def hello(table: QuicFlowTable, name: str = "aioquic_v1", now: float = 0.0) -> HelloReceived:
    result = None
    for data in qb.datagrams(name):
        result = table.from_client(data, VISITOR, now)
        if isinstance(result, HelloReceived):
            return result
    raise AssertionError(f"no hello: {result}")


def open_flow(table: QuicFlowTable, name: str = "aioquic_v1") -> Forward:
    got = hello(table, name)
    return table.accept(got.flow, 0.0, route="r0")


def test_a_flow_is_held_until_its_hello_then_forwarded_in_order() -> None:
    table = QuicFlowTable()
    grams = qb.datagrams("chromium_v1")
    first = table.from_client(grams[0], VISITOR, 0.0)
    assert isinstance(first, Held)
    second = table.from_client(grams[1], VISITOR, 0.1)
    assert isinstance(second, HelloReceived) and second.flow.state == DECIDING
    assert second.hello.sni == "example.test" and second.hello.ja4.startswith("q13d")
    fwd = table.accept(second.flow, 0.2)
    assert fwd.datagrams == (grams[0], grams[1])
    assert fwd.new_path and fwd.announce and fwd.path.client == VISITOR
    # later datagrams of the flow go straight through
    third = table.from_client(grams[2], VISITOR, 0.3)
    assert isinstance(third, Forward) and third.datagrams == (grams[2],) and not third.new_path


def test_rejected_flows_leave_a_tombstone() -> None:
    table = QuicFlowTable()
    got = hello(table)
    ended = table.reject(got.flow, "unknown_sni", 0.0)
    assert ended.reason == "rejected:unknown_sni"
    again = table.from_client(qb.datagrams("aioquic_v1")[1], VISITOR, 1.0)
    assert isinstance(again, Dropped) and again.reason == "rejected:unknown_sni"
    assert table.expire(10.0) == []  # reported once, at reject
    assert len(table) == 0
    # after the tombstone, the same datagram would start a flow again
    result = table.from_client(qb.datagrams("aioquic_v1")[1], VISITOR, 11.0)
    assert isinstance(result, HelloReceived)


def origin_initial(version: int = QUIC_V1) -> bytes:
    return qb.server_long_header("initial", dcid=b"c" * 8, scid=SERVER_CID, version=version)


def short_packet(dcid: bytes) -> bytes:
    return bytes([0x40 | 0x01]) + dcid + b"\x77" * 60


def test_origin_ids_are_learnt_and_nat_rebinding_survives() -> None:
    table = QuicFlowTable()
    fwd = open_flow(table)
    back = table.from_origin(fwd.path, origin_initial(), 0.5)
    assert isinstance(back, SendToClient) and back.address == VISITOR
    same = table.from_client(short_packet(SERVER_CID), VISITOR, 1.0)
    assert isinstance(same, Forward) and same.path is fwd.path and not same.announce
    moved = ("203.0.113.7", 61000)  # the visitor's NAT gave it another port
    result = table.from_client(short_packet(SERVER_CID), moved, 2.0)
    assert isinstance(result, Forward) and result.new_path and result.announce
    assert result.path is not fwd.path and result.path.client == moved
    # the origin answers on the new path's socket: to the new address
    reply = table.from_origin(result.path, b"\x41" + b"\x00" * 40, 2.1)
    assert isinstance(reply, SendToClient) and reply.address == moved


def test_unknown_connection_ids_are_dropped() -> None:
    """An ID from a NEW_CONNECTION_ID frame is invisible to the edge: documented as a
    migration the edge does not carry."""
    table = QuicFlowTable()
    fwd = open_flow(table)
    table.from_origin(fwd.path, origin_initial(), 0.5)
    result = table.from_client(short_packet(b"\x99" * 8), VISITOR, 1.0)
    assert isinstance(result, Dropped) and result.reason == "unknown_connection"


def test_paths_per_flow_are_bounded() -> None:
    table = QuicFlowTable(FlowLimits(max_paths=2))
    fwd = open_flow(table)
    table.from_origin(fwd.path, origin_initial(), 0.5)
    r1 = table.from_client(short_packet(SERVER_CID), ("198.51.100.1", 1), 1.0)
    assert isinstance(r1, Forward) and r1.evicted is None
    r2 = table.from_client(short_packet(SERVER_CID), ("198.51.100.2", 2), 2.0)
    assert isinstance(r2, Forward) and r2.evicted is fwd.path
    assert len(r2.path.flow.paths) == 2


def test_a_new_address_during_the_hello_is_dropped() -> None:
    table = QuicFlowTable()
    grams = qb.datagrams("chromium_v1")
    table.from_client(grams[0], VISITOR, 0.0)
    result = table.from_client(grams[1], ("198.51.100.9", 4), 0.1)
    assert isinstance(result, Dropped) and result.reason == "address_changed_during_hello"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", "unknown_connection"),  # 0x47: a short header's bits
        (b"\x16\x03\x01\x02\x00\x01", "not_quic"),
        (short_packet(b"\x11" * 8), "unknown_connection"),
        (qb.datagrams("aioquic_v1")[0][:1199], "initial_too_small"),
        (qb.datagrams("aioquic_v1")[0] + b"\x00" * 400, "oversized"),
        (qb.datagrams("qh3_v1")[0][:1250], "truncated"),
        (qb.server_long_header("handshake", dcid=b"h" * 8, scid=b"s" * 8), "unknown_connection"),
    ],
)
def test_garbage_is_dropped_and_counted(data: bytes, reason: str) -> None:
    table = QuicFlowTable()
    result = table.from_client(data, VISITOR, 0.0)
    assert isinstance(result, Dropped) and result.reason == reason
    assert table.stats[f"drop:{reason}"] == 1
    assert len(table) == 0


def test_short_client_dcid_is_refused() -> None:
    packet = qb.initial_packet(b"\x01" + b"\x00" * 1200, dcid=b"\x01\x02\x03\x04")
    result = QuicFlowTable().from_client(packet, VISITOR, 0.0)
    assert isinstance(result, Dropped) and result.reason == "dcid_too_short"


def unknown_version_datagram(size: int = 1200, version: int = 0x1A2A3A4A) -> bytes:
    head = bytes([0xC0]) + version.to_bytes(4, "big") + b"\x08" + b"D" * 8 + b"\x05SSSSS"
    return head + b"\x00" * (size - len(head))


def test_version_negotiation() -> None:
    table = QuicFlowTable(random=lambda n: b"\x5a" * n)
    data = unknown_version_datagram()
    result = table.from_client(data, VISITOR, 0.0)
    assert isinstance(result, SendToClient) and result.address == VISITOR
    vn = parse_long_header(result.datagram)
    assert vn.kind == VERSION_NEGOTIATION
    assert vn.dcid == b"SSSSS" and vn.scid == b"D" * 8  # RFC 9000 §17.2.1
    assert result.datagram[0] & 0xC0 == 0xC0
    body = result.datagram[vn.pn_offset :]
    listed = [int.from_bytes(body[i : i + 4], "big") for i in range(0, len(body), 4)]
    assert listed[:2] == [QUIC_V1, QUIC_V2] and listed[2] & 0x0F0F0F0F == 0x0A0A0A0A
    assert len(result.datagram) <= len(data)  # never amplifies
    assert len(table) == 0  # no state for it


def test_no_version_negotiation_for_small_datagrams_or_negotiation_packets() -> None:
    table = QuicFlowTable()
    small = table.from_client(unknown_version_datagram(1199), VISITOR, 0.0)
    assert isinstance(small, Dropped) and small.reason == "unsupported_version"
    vn = table.from_client(unknown_version_datagram(1300, version=0), VISITOR, 0.0)
    assert isinstance(vn, Dropped) and vn.reason == "version_negotiation"


def test_version_negotiation_is_rate_limited() -> None:
    table = QuicFlowTable(FlowLimits(vn_rate_per_s=1.0, vn_burst=3))
    results = [table.from_client(unknown_version_datagram(), VISITOR, 0.0) for _ in range(5)]
    assert [type(r).__name__ for r in results] == ["SendToClient"] * 3 + ["Dropped"] * 2
    assert isinstance(table.from_client(unknown_version_datagram(), VISITOR, 1.5), SendToClient)


def test_v2_only_edge_answers_v1_with_negotiation() -> None:
    table = QuicFlowTable(FlowLimits(versions=(QUIC_V2,)))
    result = table.from_client(qb.datagrams("aioquic_v1")[0], VISITOR, 0.0)
    assert isinstance(result, SendToClient)


def test_pending_flows_are_bounded() -> None:
    table = QuicFlowTable(FlowLimits(max_pending=2, max_pending_per_address=5))
    for name in ("chromium_v1", "qh3_v1"):
        assert isinstance(table.from_client(qb.datagrams(name)[0], VISITOR, 0.0), Held)
    third = table.from_client(qb.datagrams("chromium_v2")[0], ("198.51.100.3", 3), 0.0)
    assert isinstance(third, Dropped) and third.reason == "table_full"
    per_ip = QuicFlowTable(FlowLimits(max_pending_per_address=1))
    assert isinstance(per_ip.from_client(qb.datagrams("chromium_v1")[0], VISITOR, 0.0), Held)
    refused = per_ip.from_client(qb.datagrams("qh3_v1")[0], VISITOR, 0.0)
    assert isinstance(refused, Dropped) and refused.reason == "pending_per_address"


def test_held_datagrams_are_bounded() -> None:
    table = QuicFlowTable(FlowLimits(max_held_bytes=2000))
    grams = qb.datagrams("chromium_v1")
    assert isinstance(table.from_client(grams[0], VISITOR, 0.0), Held)
    result = table.from_client(grams[2], VISITOR, 0.0)  # a retransmission: still no hello
    assert isinstance(result, Dropped) and result.reason == "held_full"


def test_expiry() -> None:
    table = QuicFlowTable(FlowLimits(hello_timeout_s=5.0, idle_timeout_s=30.0))
    table.from_client(qb.datagrams("chromium_v1")[0], VISITOR, 0.0)  # never completed
    fwd = open_flow(table, "aioquic_v1")
    assert len(table) == 2
    ended = table.expire(5.0)
    assert [e.reason for e in ended] == ["hello_timeout"]
    table.from_origin(fwd.path, origin_initial(), 20.0)
    assert table.expire(49.0) == []
    ended = table.expire(50.0)
    assert [e.reason for e in ended] == ["idle"] and len(table) == 0
    fields = ended[0].flow.log_fields()
    assert fields["sni"] == "example.test" and fields["datagrams_out"] == 1
    assert table.from_client(short_packet(SERVER_CID), VISITOR, 51.0) == Dropped(
        "unknown_connection"
    )


def test_a_conflicting_initial_on_an_open_flow_is_not_forwarded() -> None:
    table = QuicFlowTable()
    fwd = open_flow(table)
    dcid = fwd.path.flow.odcid
    forged = qb.initial_packet(
        qb.crypto_frame(0, b"\x01\x00\x01\xd1" + b"\x03\x03" + b"Z" * 200), dcid=dcid, pn=9
    )
    forged += b"\x00" * (1200 - len(forged))
    result = table.from_client(forged, VISITOR, 1.0)
    assert isinstance(result, Dropped) and result.reason == "crypto_mismatch"


def test_retry_changes_the_initial_keys() -> None:
    table = QuicFlowTable()
    fwd = open_flow(table)
    retry_cid = b"R" * 8
    retry = qb.server_long_header("retry", dcid=b"c" * 8, scid=retry_cid, body=b"t" * 40)
    assert isinstance(table.from_origin(fwd.path, retry, 0.5), SendToClient)
    # the client's post-Retry Initial: DCID and keys from the Retry's SCID, a PING
    again = qb.initial_packet(b"\x01" + b"\x00" * 1100, dcid=retry_cid, pn=5)
    result = table.from_client(again, VISITOR, 1.0)
    assert isinstance(result, Forward), result
    old_keys = qb.initial_packet(
        b"\x01" + b"\x00" * 1100, dcid=retry_cid, key_dcid=fwd.path.flow.odcid, pn=6
    )
    # unreadable with the public keys: the origin cannot read it either and drops it; the
    # datagram goes through for what may follow the Initial in it
    passed = table.from_client(old_keys, VISITOR, 1.0)
    assert isinstance(passed, Forward) and table.stats["initial_undecryptable"] == 1


def test_an_unreadable_initial_before_the_decision_is_dropped() -> None:
    table = QuicFlowTable()
    grams = qb.datagrams("chromium_v1")
    held = table.from_client(grams[0], VISITOR, 0.0)
    assert isinstance(held, Held)
    forged = qb.initial_packet(
        b"\x01" + b"\x00" * 1200, dcid=held.flow.odcid, key_dcid=b"\x00" * 8, pn=7
    )
    result = table.from_client(forged, VISITOR, 0.1)
    assert isinstance(result, Dropped) and result.reason == "undecryptable"
    assert len(held.flow.held) == 1


def test_accept_and_reject_only_deciding_flows() -> None:
    table = QuicFlowTable()
    held = table.from_client(qb.datagrams("chromium_v1")[0], VISITOR, 0.0)
    assert isinstance(held, Held)
    with pytest.raises(ValueError):
        table.accept(held.flow, 0.0)
    got = table.from_client(qb.datagrams("chromium_v1")[1], VISITOR, 0.0)
    assert isinstance(got, HelloReceived)
    table.accept(got.flow, 0.0)
    assert got.flow.state == OPEN
    with pytest.raises(ValueError):
        table.reject(got.flow, "late", 0.0)


@given(
    data=st.one_of(
        st.binary(max_size=1600),
        st.builds(
            lambda name, i, v: (lambda d: d[: i % len(d)] + bytes([v]) + d[i % len(d) + 1 :])(
                qb.datagrams(name)[0]
            ),
            st.sampled_from(qb.CAPTURES),
            st.integers(min_value=0, max_value=1300),
            st.integers(min_value=0, max_value=255),
        ),
    )
)
def test_any_datagram_gives_a_result_never_an_exception(data: bytes) -> None:
    table = QuicFlowTable()
    result = table.from_client(data, VISITOR, 0.0)
    assert isinstance(result, (Forward, HelloReceived, Held, Dropped, SendToClient))
    if isinstance(result, SendToClient):
        assert len(result.datagram) <= len(data)
    if isinstance(result, Dropped):
        assert table.stats[f"drop:{result.reason}"] == 1


def test_origin_datagrams_after_the_end_are_dropped() -> None:
    table = QuicFlowTable()
    fwd = open_flow(table)
    table.end(fwd.path.flow, "banned")
    result = table.from_origin(fwd.path, origin_initial(), 1.0)
    assert isinstance(result, Dropped) and result.reason == "origin_after_close"
    assert parse_datagram(origin_initial()).packets[0].scid == SERVER_CID


def test_initials_after_the_clients_first_handshake_packet_are_dropped() -> None:
    """RFC 9001 §4.9.1: the client has discarded its Initial keys; the reader is freed."""
    table = QuicFlowTable()
    fwd = open_flow(table)
    flow = fwd.path.flow
    table.from_origin(fwd.path, origin_initial(), 0.5)
    handshake = qb.server_long_header("handshake", dcid=SERVER_CID, scid=b"c" * 8)
    assert isinstance(table.from_client(handshake, VISITOR, 1.0), Forward)
    assert flow.reader is None
    late = table.from_client(qb.datagrams("aioquic_v1")[1], VISITOR, 1.5)
    assert isinstance(late, Dropped) and late.reason == "initial_after_handshake"


def test_per_address_pending_counts_are_released() -> None:
    table = QuicFlowTable(FlowLimits(max_pending_per_address=1, hello_timeout_s=5.0))
    grams = qb.datagrams("chromium_v1")
    assert isinstance(table.from_client(grams[0], VISITOR, 0.0), Held)
    refused = table.from_client(qb.datagrams("qh3_v1")[0], VISITOR, 1.0)
    assert isinstance(refused, Dropped) and refused.reason == "pending_per_address"
    got = table.from_client(grams[1], VISITOR, 1.0)
    assert isinstance(got, HelloReceived)
    table.accept(got.flow, 1.0)  # decided: no longer pending
    assert isinstance(table.from_client(qb.datagrams("qh3_v1")[0], VISITOR, 2.0), Held)
    assert [e.reason for e in table.expire(7.5)] == ["hello_timeout"]
    assert isinstance(table.from_client(qb.datagrams("chromium_v2")[0], VISITOR, 8.0), Held)
    assert table.pending == 1 and len(table) == 2


def test_a_flow_is_validated_only_by_a_handshake_packet_to_an_id_the_origin_chose() -> None:
    """RFC 9000 §8.1 (atk3 finding 2): the client proves it receives at its address by
    answering the origin's Initial; a forger knows only its own first ID."""
    table = QuicFlowTable()
    fwd = open_flow(table)
    flow = fwd.path.flow
    assert not fwd.validated and not flow.validated and table.unvalidated == 1
    forged = qb.server_long_header("handshake", dcid=flow.odcid, scid=b"c" * 8)
    result = table.from_client(forged, VISITOR, 0.5)
    assert isinstance(result, Forward) and not result.validated and table.unvalidated == 1
    table.from_origin(fwd.path, origin_initial(), 0.6)
    # 1-RTT or Initial datagrams prove nothing either
    one_rtt = table.from_client(short_packet(SERVER_CID), VISITOR, 0.7)
    assert isinstance(one_rtt, Forward) and not one_rtt.validated
    handshake = qb.server_long_header("handshake", dcid=SERVER_CID, scid=b"c" * 8)
    proof = table.from_client(handshake, VISITOR, 1.0)
    assert isinstance(proof, Forward) and proof.validated and flow.validated
    assert table.unvalidated == 0 and table.stats["flows:validated"] == 1
    again = table.from_client(handshake, VISITOR, 1.1)
    assert isinstance(again, Forward) and not again.validated  # reported once


def test_unvalidated_flows_are_bounded_and_expire() -> None:
    table = QuicFlowTable(
        FlowLimits(max_pending=2, max_pending_per_address=1, validation_timeout_s=3.0)
    )
    first = open_flow(table)
    # the same address's next hello finds its share of the pool taken
    result = None
    for data in qb.datagrams("chromium_v1"):
        result = table.from_client(data, VISITOR, 0.5)
        if not isinstance(result, Held):
            break
    assert isinstance(result, Dropped) and result.reason == "unvalidated_per_address"
    assert table.stats["flows:rejected:unvalidated_per_address"] == 1
    other = ("198.51.100.5", 5)
    second = None
    for data in qb.datagrams("qh3_v1"):
        second = table.from_client(data, other, 0.5)
        if isinstance(second, HelloReceived):
            break
    assert isinstance(second, HelloReceived)
    table.accept(second.flow, 0.5)
    third = None
    for data in qb.datagrams("chromium_v2"):
        third = table.from_client(data, ("198.51.100.6", 6), 0.6)
        if not isinstance(third, Held):
            break
    assert isinstance(third, Dropped) and third.reason == "unvalidated_full"
    # never validated: ended after validation_timeout_s from accept, counted
    assert [e.reason for e in table.expire(3.0)] == ["unvalidated"]
    assert first.path.flow.state == "closed" and table.unvalidated == 1
    assert [e.reason for e in table.expire(3.5)] == ["unvalidated"]
    assert table.stats["flows:ended:unvalidated"] == 2 and table.unvalidated == 0


def test_a_validated_flow_the_guards_refuse_ends() -> None:
    table = QuicFlowTable()
    fwd = open_flow(table)
    flow = fwd.path.flow
    table.from_origin(fwd.path, origin_initial(), 0.5)
    handshake = qb.server_long_header("handshake", dcid=SERVER_CID, scid=b"c" * 8)
    proof = table.from_client(handshake, VISITOR, 1.0)
    assert isinstance(proof, Forward) and proof.validated
    ended = table.refuse(flow, "global_cap")
    assert ended.reason == "rejected:global_cap" and len(table) == 0
    assert table.stats["flows:rejected:global_cap"] == 1
    assert "flows:ended:global_cap" not in table.stats
    after = table.from_client(handshake, VISITOR, 1.1)
    assert isinstance(after, Dropped) and after.reason == "unknown_connection"


def test_new_paths_per_flow_are_rate_limited() -> None:
    """atk4 #1b: a client replaying its own datagrams from ever new ports made the edge open
    and announce a new origin socket for each (tens of thousands a second), churning the
    origin's visitor bindings until new visitors were refused."""
    table = QuicFlowTable(FlowLimits(new_paths_per_s=0.5, new_paths_burst=4))
    fwd = open_flow(table)
    table.from_origin(fwd.path, origin_initial(), 0.5)
    results = [
        table.from_client(short_packet(SERVER_CID), ("198.51.100.9", 1000 + i), 1.0)
        for i in range(20)
    ]
    new = [r for r in results if isinstance(r, Forward) and r.new_path]
    dropped = [r for r in results if isinstance(r, Dropped)]
    assert len(new) == 4 and len(dropped) == 16
    assert all(r.reason == "new_path_rate" for r in dropped)
    # the paths it has keep working, and the budget refills with time
    again = table.from_client(short_packet(SERVER_CID), ("198.51.100.9", 1003), 1.1)
    assert isinstance(again, Forward) and not again.new_path
    later = table.from_client(short_packet(SERVER_CID), ("198.51.100.9", 5000), 3.1)
    assert isinstance(later, Forward) and later.new_path
