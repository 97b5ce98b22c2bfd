"""The key server wire format: round trips, any chunking, any mutation, version 1 refused."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blindfold.core import keyless_wire as w
from blindfold.errors import ProtocolError

requests = st.builds(
    w.SignRequest,
    scheme=st.sampled_from(sorted(w.SCHEMES)),
    client=st.one_of(st.just(""), st.ip_addresses().map(str)),
    messages=st.binary(min_size=4, max_size=3000),
)


@given(requests, st.integers(0, 2**32 - 1))
def test_sign_request_round_trip(req: w.SignRequest, rid: int) -> None:
    frames = w.FrameDecoder().feed(w.encode_sign_request(rid, req))
    assert len(frames) == 1 and frames[0].type == w.SIGN_REQUEST
    assert frames[0].request_id == rid
    got = w.decode_sign_request(frames[0].body)
    assert (got.scheme, got.messages) == (req.scheme, req.messages)
    # the same address (inet_ntop and ipaddress may spell IPv4-mapped IPv6 differently)
    assert (ipaddress.ip_address(got.client) if got.client else "") == (
        ipaddress.ip_address(req.client) if req.client else ""
    )


@given(st.lists(requests, min_size=1, max_size=5), st.lists(st.integers(1, 500), max_size=40))
def test_any_chunking(reqs: list[w.SignRequest], chunks: list[int]) -> None:
    data = b"".join(w.encode_sign_request(i, r) for i, r in enumerate(reqs))
    data += w.encode_sign_response(99, b"sig") + w.encode_error(7, w.E_RATE_LIMITED, "slow down")
    decoder = w.FrameDecoder()
    frames: list[w.Frame] = []
    pos = 0
    for size in [*chunks, len(data)]:
        frames += decoder.feed(data[pos : pos + size])
        pos += size
    assert [w.decode_sign_request(f.body).messages for f in frames[: len(reqs)]] == [
        r.messages for r in reqs
    ]
    assert w.decode_sign_response(frames[-2].body) == b"sig"
    assert w.decode_error(frames[-1].body) == (w.E_RATE_LIMITED, "slow down")


@given(requests, st.data())
def test_any_mutation_decodes_or_raises(req: w.SignRequest, data: st.DataObject) -> None:
    raw = bytearray(w.encode_sign_request(1, req))
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    try:
        for frame in w.FrameDecoder().feed(bytes(raw)):
            if frame.type == w.SIGN_REQUEST:
                w.decode_sign_request(frame.body)
            elif frame.type == w.SIGN_RESPONSE:
                w.decode_sign_response(frame.body)
            elif frame.type == w.ERROR:
                w.decode_error(frame.body)
    except ProtocolError:
        pass


def test_a_big_client_hello_and_chain_fit_but_the_frame_is_capped() -> None:
    messages = b"\x01" + (1 << 16).to_bytes(3, "big") + bytes(1 << 16) + bytes(40000)
    frame = w.encode_sign_request(1, w.SignRequest(0x0403, "2001:db8::1", messages))
    assert w.decode_sign_request(w.FrameDecoder().feed(frame)[0].body).messages == messages
    with pytest.raises(ValueError, match="too large"):
        w.encode_sign_request(1, w.SignRequest(0x0403, "", bytes(w.MAX_FRAME)))
    with pytest.raises(ProtocolError, match="frame length"):
        w.FrameDecoder().feed(struct.pack(">IBBI", w.MAX_FRAME, w.VERSION, w.SIGN_REQUEST, 1))


@pytest.mark.parametrize(
    "raw",
    [
        (3).to_bytes(4, "big") + b"\x02\x01\x00",  # shorter than a header
        (6).to_bytes(4, "big") + b"\x02\x09" + b"\x00" * 4,  # unknown type
        (6).to_bytes(4, "big") + b"\x02\x01" + b"\x00" * 4,  # a sign request without a body
        (9).to_bytes(4, "big") + b"\x02\x01" + b"\x00" * 4 + b"\x04\x03\x05",  # address length
    ],
)
def test_bad_frames(raw: bytes) -> None:
    with pytest.raises(ProtocolError):
        for frame in w.FrameDecoder().feed(raw):
            w.decode_sign_request(frame.body)


def v1_sign_request(rid: int) -> bytes:
    """A version-1 request as an old edge sends it (hash, hostname, address, certificate)."""
    body = (
        struct.pack(">HB", 0x0403, 32)
        + bytes(32)
        + bytes([12])
        + b"example.test"
        + bytes([4, 192, 0, 2, 7])
        + bytes(32)
    )
    return struct.pack(">IBBI", len(body) + 6, 1, w.SIGN_REQUEST, rid) + body


def v1_decode(data: bytes) -> tuple[int, int, int, str]:
    """What an old edge's decoder reads of an ERROR: (type, request id, code, message)."""
    length, version, ftype, rid = struct.unpack_from(">IBBI", data)
    assert length + 4 == len(data) and version == 1 and ftype == w.ERROR
    code, mlen = struct.unpack_from(">BH", data, 10)
    return ftype, rid, code, data[13 : 13 + mlen].decode()


def test_version_1_is_refused_in_version_1_framing() -> None:
    decoder = w.FrameDecoder()
    with pytest.raises(ProtocolError) as info:
        decoder.feed(v1_sign_request(77))
    assert info.value.reason == "unsupported_version"
    ftype, rid, code, message = v1_decode(w.refusal(decoder, info.value))
    assert (ftype, rid, code) == (w.ERROR, 77, w.E_UNSUPPORTED_VERSION)
    assert "version 1 is not supported" in message and "upgrade" in message
    # the version is read as soon as a header is there, whatever the length says
    with pytest.raises(ProtocolError, match="unsupported_version"):
        w.FrameDecoder().feed(struct.pack(">IBBI", 60000, 1, w.SIGN_REQUEST, 1))


def test_other_frame_errors_are_answered_in_version_2() -> None:
    decoder = w.FrameDecoder()
    with pytest.raises(ProtocolError) as info:
        decoder.feed((6).to_bytes(4, "big") + b"\x02\x09" + b"\x00" * 4)
    frames = w.FrameDecoder().feed(w.refusal(decoder, info.value))
    assert frames[0].type == w.ERROR and w.decode_error(frames[0].body)[0] == w.E_MALFORMED


def test_content_is_built_by_rfc_8446() -> None:
    th = bytes(range(32))
    content = w.certificate_verify_content(th)
    assert content == b" " * 64 + b"TLS 1.3, server CertificateVerify\x00" + th


@pytest.mark.parametrize(
    "code,message,reason",
    [
        (
            w.E_UNAUTHORIZED,
            "unauthorized_sni: this edge may not sign for x.test",
            "unauthorized_sni",
        ),
        (
            w.E_REPLAYED,
            "replayed_client_random: signed for another handshake",
            "replayed_client_random",
        ),
        (w.E_RATE_LIMITED, "edge e1 is over its signature rate", "rate_limited"),
        (w.E_UNAUTHORIZED, "this edge is no longer authorised", "unauthorized"),
        # a reason the wire does not list is not believed: labels stay a fixed set
        (w.E_BAD_HANDSHAKE, "made_up_" + "x" * 40 + ": whatever", "bad_handshake"),
        (200, "anything", "error"),
    ],
)
def test_an_error_frame_has_a_stable_reason(code: int, message: str, reason: str) -> None:
    assert w.error_reason(code, message) == reason


hostnames = st.from_regex(r"\A(\*\.)?[a-z0-9-]{1,20}(\.[a-z0-9-]{1,20}){0,3}\Z")
chains = st.lists(st.binary(min_size=1, max_size=2000), min_size=1, max_size=w.MAX_CHAIN_CERTS)


@given(hostnames, st.integers(0, 2**32 - 1))
def test_chain_request_round_trip(name: str, rid: int) -> None:
    (frame,) = w.FrameDecoder().feed(w.encode_chain_request(rid, name))
    assert (frame.type, frame.request_id) == (w.CHAIN_REQUEST, rid)
    assert w.decode_chain_request(frame.body) == name


@given(chains, st.integers(0, 2**32 - 1))
def test_chain_response_round_trip(ders: list[bytes], rid: int) -> None:
    (frame,) = w.FrameDecoder().feed(w.encode_chain_response(rid, ders))
    assert frame.type == w.CHAIN_RESPONSE
    assert w.decode_chain_response(frame.body) == tuple(ders)


@given(chains, hostnames, st.data())
def test_chain_frames_any_mutation_decodes_or_raises(
    ders: list[bytes], name: str, data: st.DataObject
) -> None:
    for body, decode in (
        (w.encode_chain_response(1, ders)[w.HEADER_LEN :], w.decode_chain_response),
        (w.encode_chain_request(1, name)[w.HEADER_LEN :], w.decode_chain_request),
    ):
        mutated = bytearray(body)
        for _ in range(data.draw(st.integers(1, 4))):
            at = data.draw(st.integers(0, len(mutated)))
            op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
            if op == "flip" and at < len(mutated):
                mutated[at] ^= data.draw(st.integers(1, 255))
            elif op == "cut":
                del mutated[at:]
            else:
                mutated[at:at] = data.draw(st.binary(min_size=1, max_size=4))
        try:
            decode(bytes(mutated))
        except ProtocolError:
            pass


@pytest.mark.parametrize(
    "body",
    [b"", b"\x05abc", b"\x03ABC", b"\x03a b", b"\x02\xc3\xa9", b"\x00", b"\x01\n"],
)
def test_bad_chain_requests(body: bytes) -> None:
    with pytest.raises(ProtocolError):
        w.decode_chain_request(body)


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"\x00",
        b"\x0b" + b"\x00\x00\x01a" * 11,
        b"\x01\x00\x00\x00",
        b"\x01\x00\x00\x05ab",
        b"\x01\x00\x00\x01ab",
    ],
)
def test_bad_chain_responses(body: bytes) -> None:
    with pytest.raises(ProtocolError):
        w.decode_chain_response(body)


@pytest.mark.parametrize(
    "client", ["127.0.0.7", "2001:db8::1", "::ffff:10.0.0.1", "fe80::1%eth0", "::"]
)
def test_the_visitor_address_is_packed_as_ipaddress_packs_it(client: str) -> None:
    frame = w.FrameDecoder().feed(w.encode_sign_request(1, w.SignRequest(0x0403, client, b"m")))
    addr = ipaddress.ip_address(client).packed
    assert frame[0].body[2] == len(addr) and frame[0].body[3 : 3 + len(addr)] == addr


def test_a_sign_request_for_a_malformed_address_is_refused() -> None:
    with pytest.raises(ValueError):
        w.encode_sign_request(1, w.SignRequest(0x0403, "999.1.1.1", b"m"))
