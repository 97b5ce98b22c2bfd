"""RFC 8188 aes128gcm: round trips, interoperability with the `http-ece` package both ways,
any chunking, any mutation detected, padding buckets."""

from __future__ import annotations

import os

import http_ece  # type: ignore[import-untyped]
import pytest
from hypothesis import given
from hypothesis import strategies as st

from blindfold.core import ece
from blindfold.errors import VerificationError

KEY = bytes(range(16))


def _open_chunked(blob: bytes, key: bytes, cuts: list[int]) -> bytes:
    opener = ece.Opener(key)
    out = []
    last = 0
    for cut in sorted(c % (len(blob) + 1) for c in cuts):
        out.extend(opener.feed(blob[last:cut]))
        last = cut
    out.extend(opener.feed(blob[last:]))
    out.append(opener.finish())
    return b"".join(out)


def test_rfc8188_section_3_1_example() -> None:
    # RFC 8188 §3.1: "I am the walrus", rs 4096, the salt and key given there.
    import base64

    def b64(s: str) -> bytes:
        return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))

    blob = b64("I1BsxtFttlv3u_Oo94xnmwAAEAAA-NAVub2qFgBEuQKRapoZu-IxkIva3MEB1PD-ly8Thjg")
    assert ece.open_all(blob, b64("yqdlZ-tYemfogSmv7Ws5PQ")) == b"I am the walrus"
    again = ece.seal(b"I am the walrus", b64("yqdlZ-tYemfogSmv7Ws5PQ"), rs=4096, salt=blob[:16])
    assert again == blob


@given(
    st.binary(max_size=3000),
    st.integers(min_value=18, max_value=600),
    st.lists(st.integers(min_value=0), max_size=6),
    st.booleans(),
)
def test_round_trip_any_chunking(data: bytes, rs: int, cuts: list[int], pad: bool) -> None:
    pad_to = ece.padme(ece.sealed_size(len(data), rs)) if pad else 0
    blob = ece.seal(data, KEY, rs=rs, pad_to=pad_to)
    assert len(blob) >= pad_to
    assert _open_chunked(blob, KEY, cuts) == data


@given(st.binary(min_size=1, max_size=2000), st.integers(min_value=18, max_value=300))
def test_interoperates_with_http_ece(data: bytes, rs: int) -> None:
    ours = ece.seal(data, KEY, rs=rs, pad_to=ece.padme(ece.sealed_size(len(data), rs)))
    assert http_ece.decrypt(ours, key=KEY, version="aes128gcm") == data
    theirs = http_ece.encrypt(data, key=KEY, version="aes128gcm", rs=rs)
    assert ece.open_all(theirs, KEY) == data


@given(st.binary(max_size=800), st.integers(min_value=18, max_value=200), st.data())
def test_any_mutation_is_detected(data: bytes, rs: int, draw: st.DataObject) -> None:
    blob = bytearray(ece.seal(data, KEY, rs=rs))
    i = draw.draw(st.integers(min_value=0, max_value=len(blob) - 1))
    blob[i] ^= draw.draw(st.integers(min_value=1, max_value=255))
    try:
        got = ece.open_all(bytes(blob), KEY, max_rs=1 << 24)
    except VerificationError:
        return
    # RFC 8188 does not authenticate the header's rs: a bigger rs over a blob whose records
    # all fit in it still opens, to the same bytes (the manifest's blob digest catches it).
    # Nothing else may parse, and nothing may ever open to different bytes.
    assert 16 <= i < 20 and got == data, f"mutation at {i} parsed"


@given(st.binary(min_size=1, max_size=800), st.integers(min_value=18, max_value=100), st.data())
def test_truncation_is_detected(data: bytes, rs: int, draw: st.DataObject) -> None:
    blob = ece.seal(data, KEY, rs=rs)
    cut = draw.draw(st.integers(min_value=0, max_value=len(blob) - 1))
    with pytest.raises(VerificationError):
        ece.open_all(blob[:cut], KEY)


def test_wrong_key_and_extra_records() -> None:
    blob = ece.seal(b"x" * 1000, KEY, rs=100)
    with pytest.raises(VerificationError, match="does not authenticate"):
        ece.open_all(blob, os.urandom(16))
    with pytest.raises(VerificationError):
        ece.open_all(blob + blob[21:121], KEY)  # a record appended after the last one
    # records swapped
    body = blob[21:]
    swapped = blob[:21] + body[100:200] + body[:100] + body[200:]
    with pytest.raises(VerificationError):
        ece.open_all(swapped, KEY)


@pytest.mark.parametrize("extra", [1, 17, 99, 100, 250])
def test_bytes_after_a_full_sized_last_record_are_refused(extra: int) -> None:
    data = b"x" * (83 * 3)  # three records of exactly rs = 100 (83 data + delimiter + tag)
    blob = ece.seal(data, KEY, rs=100)
    assert len(blob) == 21 + 300 and ece.open_all(blob, KEY) == data
    with pytest.raises(VerificationError, match="after the last record"):
        ece.open_all(blob + b"X" * extra, KEY)
    opener = ece.Opener(KEY)
    with pytest.raises(VerificationError, match="after the last record"):
        opener.feed(blob)
        opener.feed(b"X" * extra)
        opener.finish()


def test_oversized_and_undersized_record_sizes_are_refused() -> None:
    blob = ece.seal(b"hello", KEY, rs=1 << 20)
    with pytest.raises(VerificationError, match="over the limit"):
        ece.Opener(KEY, max_rs=1 << 16).feed(blob)
    bad = blob[:16] + (17).to_bytes(4, "big") + blob[20:]
    with pytest.raises(VerificationError, match="below"):
        ece.open_all(bad, KEY)
    with pytest.raises(VerificationError, match="header"):
        ece.open_all(blob[:10], KEY)
    with pytest.raises(ValueError):
        ece.seal(b"", KEY, rs=17)


def test_padme_buckets() -> None:
    assert [ece.padme(n) for n in (0, 1, 2, 9, 100, 1000)] == [0, 1, 2, 10, 104, 1024]
    for n in (1234, 65_537, 1_000_003, 52_428_800):
        p = ece.padme(n)
        assert n <= p <= n * 1.12
    # sizes within a bucket cannot be told apart
    assert len({ece.padme(n) for n in range(1_000_000, 1_030_000)}) < 5


def test_opener_memory_is_bounded_by_one_record() -> None:
    rs = 4096
    blob = ece.seal(os.urandom(200_000), KEY, rs=rs)
    opener = ece.Opener(KEY)
    for i in range(0, len(blob), 1000):
        opener.feed(blob[i : i + 1000])
        assert len(opener._buf) <= rs + 1000
    opener.finish()
