"""The QUIC visitor announcement: an edge's claim the origin believes only with the key, from
the socket it names, once, within the window."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blindfold.core.quic_visitor import (
    VisitorBindings,
    decode_announcement,
    encode_announcement,
    is_announcement,
    key_id,
)
from blindfold.errors import ProtocolError

KEY = bytes(range(32))
OTHER = bytes(range(1, 33))
EDGE = ("192.0.2.10", 40001)
VISITOR = ("203.0.113.7", 50000)
NOW = 1_800_000_000.0


def ann(visitor: tuple[str, int] = VISITOR, port: int = EDGE[1], **kw: object) -> bytes:
    return encode_announcement(
        kw.get("key", KEY),  # type: ignore[arg-type]
        visitor,
        port,
        kw.get("now", NOW),  # type: ignore[arg-type]
        kw.get("nonce", b"n" * 16),  # type: ignore[arg-type]
    )


def bindings() -> VisitorBindings:
    return VisitorBindings({key_id(KEY): KEY})


def test_round_trip_v4_and_v6() -> None:
    b = bindings()
    assert b.announce(ann(), EDGE, NOW) == VISITOR
    assert b.visitor(EDGE, NOW + 1) == VISITOR
    v6 = ("2001:db8::1", 443)
    assert decode_announcement(ann(v6), {key_id(KEY): KEY}).visitor == v6
    assert is_announcement(ann()) and not is_announcement(b"\xc0\x00")


@pytest.mark.parametrize(
    ("data", "source", "now", "reason"),
    [
        (ann(key=OTHER), EDGE, NOW, "unknown_key"),
        (ann()[:-1] + b"\x00", EDGE, NOW, "bad_mac"),
        (ann(now=NOW - 31), EDGE, NOW, "stale_announcement"),
        (ann(now=NOW + 31), EDGE, NOW, "stale_announcement"),
        (ann(port=40002), EDGE, NOW, "port_mismatch"),
        (b"\x00BFVA\x02" + b"\x00" * 80, EDGE, NOW, "bad_announcement"),
        (b"\x00BFV", EDGE, NOW, "bad_announcement"),
    ],
)
def test_refused(data: bytes, source: tuple[str, int], now: float, reason: str) -> None:
    b = bindings()
    with pytest.raises(ProtocolError) as err:
        b.announce(data, source, now)
    assert err.value.reason == reason
    assert b.visitor(source, now) is None


def test_a_forged_visitor_with_the_right_key_id_does_not_verify() -> None:
    data = bytearray(ann())
    data[-34 - 4 : -34] = bytes([198, 51, 100, 1])  # another visitor IP, same MAC
    with pytest.raises(ProtocolError) as err:
        bindings().announce(bytes(data), EDGE, NOW)
    assert err.value.reason == "bad_mac"


def test_replays_are_refused() -> None:
    b = bindings()
    first = ann(nonce=b"a" * 16, now=NOW)
    b.announce(first, EDGE, NOW)
    with pytest.raises(ProtocolError) as err:
        b.announce(first, EDGE, NOW + 1)
    assert err.value.reason == "replayed_announcement"
    # a newer announcement rebinds (the visitor's NAT changed its port)
    b.announce(ann(("203.0.113.7", 50001), nonce=b"b" * 16, now=NOW + 2), EDGE, NOW + 2)
    assert b.visitor(EDGE, NOW + 2) == ("203.0.113.7", 50001)
    # an older one (captured earlier, new nonce) cannot bring the old visitor back
    with pytest.raises(ProtocolError) as err:
        b.announce(ann(nonce=b"c" * 16, now=NOW + 1), EDGE, NOW + 3)
    assert err.value.reason == "stale_announcement"


def test_bindings_expire_and_are_bounded() -> None:
    b = VisitorBindings({key_id(KEY): KEY}, idle_s=10, max_bindings=2)
    for i, port in enumerate((1, 2, 3)):
        b.announce(ann(port=port, nonce=bytes([i]) * 16), ("192.0.2.10", port), NOW)
    assert len(b) == 2 and b.visitor(("192.0.2.10", 1), NOW) is None
    assert b.visitor(("192.0.2.10", 3), NOW + 5) == VISITOR
    assert b.expire(NOW + 11) == 1  # port 2, idle since NOW
    assert b.visitor(("192.0.2.10", 3), NOW + 16) is None


@given(data=st.binary(max_size=120), cut=st.integers(0, 100), flip=st.integers(0, 255))
def test_any_bytes_are_an_announcement_or_a_protocol_error(
    data: bytes, cut: int, flip: int
) -> None:
    good = ann()
    mutated = bytearray(good)
    mutated[cut % len(good)] ^= flip or 1
    for candidate in (data, good[:cut], bytes(mutated)):
        try:
            visitor = bindings().announce(candidate, EDGE, NOW)
        except ProtocolError:
            continue
        assert candidate == good and visitor == VISITOR
