"""The key server wire format: round trips, any chunking, any mutation."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blindfold.core import keyless_wire as w
from blindfold.errors import ProtocolError

requests = st.builds(
    w.SignRequest,
    scheme=st.sampled_from(sorted(w.SCHEMES)),
    transcript_hash=st.sampled_from([32, 48]).flatmap(lambda n: st.binary(min_size=n, max_size=n)),
    hostname=st.from_regex(r"[a-z0-9.-]{1,60}", fullmatch=True),
    client=st.one_of(st.just(""), st.ip_addresses().map(str)),
    certificate_sha256=st.binary(min_size=32, max_size=32),
)


@given(requests, st.integers(0, 2**32 - 1))
def test_sign_request_round_trip(req: w.SignRequest, rid: int) -> None:
    frames = w.FrameDecoder().feed(w.encode_sign_request(rid, req))
    assert len(frames) == 1 and frames[0].type == w.SIGN_REQUEST
    assert frames[0].request_id == rid
    assert w.decode_sign_request(frames[0].body) == req


@given(st.lists(requests, min_size=1, max_size=5), st.lists(st.integers(1, 50), max_size=40))
def test_any_chunking(reqs: list[w.SignRequest], chunks: list[int]) -> None:
    data = b"".join(w.encode_sign_request(i, r) for i, r in enumerate(reqs))
    data += w.encode_sign_response(99, b"sig") + w.encode_error(7, w.E_RATE_LIMITED, "slow down")
    decoder = w.FrameDecoder()
    frames: list[w.Frame] = []
    pos = 0
    for size in [*chunks, len(data)]:
        frames += decoder.feed(data[pos : pos + size])
        pos += size
    assert [w.decode_sign_request(f.body) for f in frames[: len(reqs)]] == reqs
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


@pytest.mark.parametrize(
    "raw",
    [
        (20000).to_bytes(4, "big") + b"\x01\x01" + b"\x00" * 4,  # over the frame limit
        (3).to_bytes(4, "big") + b"\x01\x01\x00",  # shorter than a header
        (6).to_bytes(4, "big") + b"\x02\x01" + b"\x00" * 4,  # unknown version
        (6).to_bytes(4, "big") + b"\x01\x09" + b"\x00" * 4,  # unknown type
    ],
)
def test_bad_frames(raw: bytes) -> None:
    with pytest.raises(ProtocolError):
        w.FrameDecoder().feed(raw)


def test_content_is_built_by_rfc_8446() -> None:
    th = bytes(range(32))
    content = w.certificate_verify_content(th)
    assert content == b" " * 64 + b"TLS 1.3, server CertificateVerify\x00" + th
