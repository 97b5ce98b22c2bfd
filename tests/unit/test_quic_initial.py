"""The QUIC Initial reader: real clients' first flights (tests/data/quic), every split and
order of a real ClientHello, and hostile packets (each a counted ProtocolError)."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blindfold.core.ja4 import ja4_fingerprint
from blindfold.core.quic_initial import (
    INITIAL,
    QUIC_V1,
    QUIC_V2,
    RETRY,
    VERSION_NEGOTIATION,
    CryptoAssembler,
    InitialReader,
    QuicHello,
    parse_datagram,
    parse_initial_frames,
    parse_long_header,
)
from blindfold.errors import ProtocolError
from tests.helpers import quic_build as qb

# What each capture must give (tests/data/quic/README.md says how they were made)
EXPECTED = {
    "aioquic_v1": (QUIC_V1, "q13d0307h3_55b375c5d22e_1cecd519fee8"),
    "aioquic_v2": (QUIC_V2, "q13d0307h3_55b375c5d22e_1cecd519fee8"),
    "qh3_v1": (QUIC_V1, "q13d0310h3_55b375c5d22e_37b0b428b5c5"),
    "qh3_v2": (QUIC_V2, "q13d0310h3_55b375c5d22e_37b0b428b5c5"),
    "chromium_v1": (QUIC_V1, "q13d0312h3_55b375c5d22e_178839b6cec1"),
    "chromium_v2": (QUIC_V2, "q13d0312h3_55b375c5d22e_178839b6cec1"),
}


def read_capture(datagrams: list[bytes]) -> QuicHello:
    reader: InitialReader | None = None
    for data in datagrams:
        for header in parse_datagram(data).packets:
            if reader is None:
                reader = InitialReader(header.version, header.dcid)
            found = reader.feed(data, header)
            if found is not None:
                return found
    raise AssertionError("no ClientHello")


@pytest.mark.parametrize("name", qb.CAPTURES)
def test_real_clients_first_flight(name: str) -> None:
    version, ja4 = EXPECTED[name]
    hello = read_capture(qb.datagrams(name))
    assert hello.version == version
    assert hello.sni == "example.test"
    assert hello.hello.alpn == (b"h3",)
    assert hello.ja4 == ja4
    # JA4 for QUIC differs from TCP's only in its first character (FoxIO JA4.md, "QUIC")
    h = hello.hello
    sigalgs = h.extension(0x000D) or b""
    tcp = ja4_fingerprint(
        h.legacy_version,
        h.supported_versions,
        True,
        b"".join(c.to_bytes(2, "big") for c in h.cipher_suites),
        h.extensions,
        sigalgs,
        h.alpn[0],
    )
    assert hello.ja4 == "q" + tcp[1:]


def test_chromium_and_qh3_hellos_span_two_packets() -> None:
    """The post-quantum key share makes the hello longer than one packet: the first datagram
    alone gives nothing, the second completes it."""
    for name in ("chromium_v1", "qh3_v1", "chromium_v2"):
        grams = qb.datagrams(name)
        header = parse_datagram(grams[0]).packets[0]
        reader = InitialReader(header.version, header.dcid)
        assert reader.feed(grams[0], header) is None
        second = parse_datagram(grams[1]).packets[0]
        assert reader.feed(grams[1], second) is not None


def test_reading_stops_at_the_length_field() -> None:
    """aioquic pads its datagram with zeros after the packet: ignored, not an error."""
    data = qb.datagrams("aioquic_v1")[0]
    dgram = parse_datagram(data)
    assert len(dgram.packets) == 1
    assert dgram.packets[0].end < len(data) and dgram.ignored == len(data) - dgram.packets[0].end
    assert set(data[dgram.packets[0].end :]) == {0}


def test_retransmissions_of_the_same_hello_agree() -> None:
    """Chromium's later datagrams resend the hello cut differently: all of it must agree."""
    grams = qb.datagrams("chromium_v1")
    header = parse_datagram(grams[0]).packets[0]
    reader = InitialReader(header.version, header.dcid)
    results = [reader.feed(g, parse_datagram(g).packets[0]) for g in grams]
    assert [r is not None for r in results] == [False, True, False, False, False]


# ----------------------------------------------------------------------------- splits


def chromium_message() -> bytes:
    return read_capture(qb.datagrams("chromium_v1")).hello.message


DCID = bytes.fromhex("8394c8f03e515708")


def packets_from_frames(frames: list[bytes], per_packet: int, version: int) -> list[bytes]:
    out: list[bytes] = []
    for i in range(0, len(frames), per_packet):
        body = b"".join(frames[i : i + per_packet])
        out.append(qb.initial_packet(body, dcid=DCID, pn=len(out), version=version))
    return out


@given(
    cuts=st.lists(st.integers(min_value=1, max_value=1874), max_size=40, unique=True),
    seed=st.integers(min_value=0, max_value=2**32),
    per_packet=st.integers(min_value=1, max_value=12),
    version=st.sampled_from([QUIC_V1, QUIC_V2]),
)
def test_every_split_and_order_gives_the_same_hello(
    cuts: list[int], seed: int, per_packet: int, version: int
) -> None:
    message = chromium_message()
    want = read_capture(qb.datagrams("chromium_v1"))
    bounds = [0, *sorted(cuts), len(message)]
    rng = random.Random(seed)
    frames = [qb.crypto_frame(a, message[a:b]) for a, b in itertools.pairwise(bounds)]
    # mixed with PING and PADDING as Chromium does, and a duplicate piece
    frames += [b"\x01", b"\x00" * rng.randint(1, 30), frames[rng.randrange(len(frames))]]
    rng.shuffle(frames)
    packets = packets_from_frames(frames, per_packet, version)
    rng.shuffle(packets)
    reader = InitialReader(version, DCID, max_packets=64)  # the bound has its own test
    found = [r for p in packets if (r := reader.feed(p, parse_long_header(p))) is not None]
    assert len(found) == 1
    assert (found[0].sni, found[0].ja4, found[0].hello.alpn) == (
        want.sni,
        want.ja4,
        want.hello.alpn,
    )


@given(
    name=st.sampled_from(qb.CAPTURES),
    index=st.integers(min_value=0, max_value=1279),
    value=st.integers(min_value=0, max_value=255),
    cut=st.integers(min_value=0, max_value=1280),
)
def test_any_mutation_parses_or_is_a_protocol_error(
    name: str, index: int, value: int, cut: int
) -> None:
    """A changed byte or a truncated datagram: the same hello, no hello yet, or a
    ProtocolError; never another exception."""
    grams = qb.datagrams(name)
    first = parse_datagram(grams[0]).packets[0]
    mutated = bytearray(grams[0])
    mutated[index % len(mutated)] = value
    for data in (bytes(mutated), grams[0][:cut]):
        reader = InitialReader(first.version, first.dcid)
        try:
            for header in parse_datagram(data).packets:
                if header.kind == INITIAL and header.version == first.version:
                    reader.feed(data, header)
            for g in grams[1:]:
                for header in parse_datagram(g).packets:
                    reader.feed(g, header)
        except ProtocolError as exc:
            assert exc.reason
            continue
        if reader.hello is not None:
            assert reader.hello.ja4 == EXPECTED[name][1]


# ----------------------------------------------------------------------------- hostile


def reader_for(frames: bytes, **kw: object) -> tuple[InitialReader, bytes]:
    packet = qb.initial_packet(frames, dcid=DCID, **kw)  # type: ignore[arg-type]
    return InitialReader(QUIC_V1, DCID), packet


@pytest.mark.parametrize(
    ("frames", "reason"),
    [
        (b"\x08\x00\x00" + b"\x00" * 8, "frame_not_allowed"),  # STREAM in an Initial
        (b"\x1d\x00\x00\x00", "frame_not_allowed"),  # application CONNECTION_CLOSE
        (b"\x40\x06\x00\x00", "frame_not_allowed"),  # CRYPTO, non-minimal type encoding
        (b"\x06\x00\x44\x00\x01", "frame_encoding"),  # CRYPTO longer than the packet
        (b"\x02\x05\x00\x00\x06", "frame_encoding"),  # ACK below packet number 0
        (b"\x06\x00\x04\x02\x00\x00\x05", "not_client_hello"),  # ServerHello type
    ],
)
def test_bad_frames(frames: bytes, reason: str) -> None:
    reader, packet = reader_for(frames)
    with pytest.raises(ProtocolError) as err:
        reader.feed(packet, parse_long_header(packet))
    assert err.value.reason == reason


def test_packet_without_frames() -> None:
    with pytest.raises(ProtocolError) as err:
        parse_initial_frames(b"")
    assert err.value.reason == "no_frames"


def test_reserved_bits_after_unprotecting() -> None:
    reader, packet = reader_for(b"\x01\x00\x00\x00", reserved=1)
    with pytest.raises(ProtocolError) as err:
        reader.feed(packet, parse_long_header(packet))
    assert err.value.reason == "reserved_bits"


def test_wrong_keys_and_tampering() -> None:
    packet = qb.initial_packet(b"\x01" + b"\x00" * 30, dcid=DCID, key_dcid=b"\x00" * 8)
    with pytest.raises(ProtocolError) as err:
        InitialReader(QUIC_V1, DCID).feed(packet, parse_long_header(packet))
    assert err.value.reason == "undecryptable"


def test_conflicting_retransmission_is_refused() -> None:
    """The same CRYPTO offsets with other bytes: the edge would see one hello and the origin
    perhaps another."""
    message = chromium_message()
    reader = InitialReader(QUIC_V1, DCID)
    one = qb.initial_packet(qb.crypto_frame(0, message[:600]), dcid=DCID, pn=0)
    assert reader.feed(one, parse_long_header(one)) is None
    changed = message[:100] + b"X" + message[101:700]
    two = qb.initial_packet(qb.crypto_frame(0, changed), dcid=DCID, pn=1)
    with pytest.raises(ProtocolError) as err:
        reader.feed(two, parse_long_header(two))
    assert err.value.reason == "crypto_mismatch"


def test_second_hello_must_name_the_same_server() -> None:
    message = chromium_message()
    reader = InitialReader(QUIC_V1, DCID)
    full = [message[i : i + 900] for i in range(0, len(message), 900)]
    pn = 0
    offset = 0
    for piece in full:
        p = qb.initial_packet(qb.crypto_frame(offset, piece), dcid=DCID, pn=pn)
        reader.feed(p, parse_long_header(p))
        offset += len(piece)
        pn += 1
    assert reader.hello is not None
    other = message.replace(b"example.test", b"examplz.test")
    for piece in [other[i : i + 900] for i in range(0, len(other), 900)]:
        p = qb.initial_packet(qb.crypto_frame(offset, piece), dcid=DCID, pn=pn)
        pn += 1
        offset += len(piece)
        try:
            reader.feed(p, parse_long_header(p))
        except ProtocolError as exc:
            assert exc.reason == "hello_changed"
            return
    raise AssertionError("a second ClientHello for another server was accepted")


def test_assembler_bounds() -> None:
    a = CryptoAssembler(max_bytes=100, max_ranges=3)
    with pytest.raises(ProtocolError) as err:
        a.add(90, b"x" * 11)
    assert err.value.reason == "hello_too_large"
    for off in (0, 10, 20):
        a.add(off, b"y")
    with pytest.raises(ProtocolError) as err:
        a.add(30, b"y")
    assert err.value.reason == "crypto_gaps"
    a.add(1, b"y" * 9)  # closing a gap merges ranges
    assert a.contiguous == 11


def test_too_many_initial_packets() -> None:
    reader = InitialReader(QUIC_V1, DCID, max_packets=3)
    for pn in range(3):
        p = qb.initial_packet(b"\x01\x00\x00\x00", dcid=DCID, pn=pn)
        reader.feed(p, parse_long_header(p))
    p = qb.initial_packet(b"\x01\x00\x00\x00", dcid=DCID, pn=3)
    with pytest.raises(ProtocolError) as err:
        reader.feed(p, parse_long_header(p))
    assert err.value.reason == "too_many_initials"


def test_hello_without_quic_transport_parameters() -> None:
    message = bytearray(chromium_message())
    # rename extension 0x0039 to an unknown type: same length, no transport parameters
    hello = read_capture(qb.datagrams("chromium_v1")).hello
    start, _ = hello.ext_spans[0x0039]
    message[start - 4 : start - 2] = b"\xfa\xce"
    p1 = qb.initial_packet(qb.crypto_frame(0, bytes(message[:1000])), dcid=DCID, pn=0)
    p2 = qb.initial_packet(qb.crypto_frame(1000, bytes(message[1000:])), dcid=DCID, pn=1)
    reader = InitialReader(QUIC_V1, DCID)
    reader.feed(p1, parse_long_header(p1))
    with pytest.raises(ProtocolError) as err:
        reader.feed(p2, parse_long_header(p2))
    assert err.value.reason == "no_transport_parameters"


# ----------------------------------------------------------------------------- headers


def test_unknown_version_reads_only_the_invariants() -> None:
    data = bytes([0xC3]) + (0x1A2A3A4A).to_bytes(4, "big") + b"\x09" + b"d" * 9 + b"\x03sss"
    data += b"\xff" * 1200
    header = parse_long_header(data)
    assert (header.kind, header.dcid, header.scid, header.end) == (
        None,
        b"d" * 9,
        b"sss",
        len(data),
    )
    vn = parse_long_header(b"\x80\x00\x00\x00\x00\x00\x00" + b"\x00\x00\x00\x01")
    assert vn.kind == VERSION_NEGOTIATION


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\xc0\x00\x00\x00\x01\x15" + b"d" * 21 + b"\x00\x00\x01\x00", "bad_cid_length"),
        (b"\x80\x00\x00\x00\x01\x01d\x00\x00\x01\x00", "fixed_bit_zero"),
        (b"\xc0\x00\x00\x00\x01\x01d\x00\x00\x44\x00" + b"\x00" * 10, "truncated"),
        (b"\xc0\x00\x00\x00\x01\x08abc", "truncated"),
        (b"\x00\x01\x02", "not_quic"),
    ],
)
def test_bad_headers(data: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError) as err:
        parse_datagram(data)
    assert err.value.reason == reason


def test_coalesced_packets_of_another_connection_are_ignored() -> None:
    one = qb.initial_packet(b"\x01\x00\x00\x00", dcid=DCID)
    other = qb.initial_packet(b"\x01\x00\x00\x00", dcid=b"\x07" * 8)
    same = qb.server_long_header("handshake", dcid=DCID, scid=b"s" * 8)
    dgram = parse_datagram(one + same + other)
    assert [p.kind for p in dgram.packets] == [INITIAL, "handshake"]
    assert dgram.ignored == len(other)
    retry = qb.server_long_header(RETRY, dcid=DCID, scid=b"r" * 8)
    assert parse_datagram(retry).packets[0].end == len(retry)


@pytest.mark.parametrize(
    ("version", "secret", "key", "iv", "hp"),
    [
        (  # RFC 9001 Appendix A.1
            QUIC_V1,
            "c00cf151ca5be075ed0ebfb5c80323c42d6b7db67881289af4008f1f6c357aea",
            "1f369613dd76d5467730efcbe3b1a22d",
            "fa044b2f42a3fd3b46fb255c",
            "9f50449e04a0e810283a1e9933adedd2",
        ),
        (  # RFC 9369 Appendix A.1
            QUIC_V2,
            "14ec9d6eb9fd7af83bf5a668bc17a7e283766aade7ecd0891f70f9ff7f4bf47b",
            "8b1a0bc121284290a29e0971b5cd045d",
            "91f73e2351d8fa91660e909f",
            "45b95e15235d6f45a6b19cbcb0294ba9",
        ),
    ],
)
def test_initial_keys_match_the_rfcs(version: int, secret: str, key: str, iv: str, hp: str) -> None:
    from aioquic.quic.crypto import INITIAL_CIPHER_SUITE, derive_key_iv_hp

    from blindfold.core.quic_initial import client_initial_keys

    keys = client_initial_keys(version, bytes.fromhex("8394c8f03e515708"))
    assert keys.secret is not None and keys.secret.hex() == secret
    derived = derive_key_iv_hp(
        cipher_suite=INITIAL_CIPHER_SUITE, secret=keys.secret, version=version
    )
    assert [x.hex() for x in derived] == [key, iv, hp]
