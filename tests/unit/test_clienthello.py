"""The ClientHello peek: real OpenSSL hellos, synthetic ones, every chunking, every mutation."""

from __future__ import annotations

import ssl
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blindfold.core import clienthello
from blindfold.core.clienthello import MAX_HELLO_RECORDS, HelloReader, peek_client_hello
from blindfold.errors import ProtocolError
from tests.helpers import tlsbuild as tb


def feed(data: bytes, chunks: list[int], max_bytes: int = 16384):  # type: ignore[no-untyped-def]
    """Feed `data` in pieces the way the edge does; return the first non-None result."""
    reader = HelloReader(max_bytes)
    pos = 0
    for size in [*chunks, len(data)]:
        piece = data[pos : pos + max(size, 1)]
        pos += len(piece)
        result = reader.feed(piece)
        if result is not None:
            assert reader.raw == data[:pos]  # every byte kept, to be forwarded unchanged
            return result
        if pos >= len(data):
            return None
    return None


def test_openssl_tls13_hello() -> None:
    raw = tb.openssl_hello("www.example.test", ("h2", "http/1.1"))
    hello = peek_client_hello(raw)
    assert hello is not None
    assert hello.sni == "www.example.test"
    assert hello.alpn == (b"h2", b"http/1.1")
    assert hello.max_version == 0x0304
    assert hello.record_bytes == len(raw)
    assert 0x001D in hello.supported_groups  # x25519
    assert hello.key_share_groups  # OpenSSL sends one share
    assert hello.ja4.startswith("t13d") and hello.ja4[8:10] == "h2"


def test_openssl_tls12_only_hello() -> None:
    raw = tb.openssl_hello("example.test", (), max_version=ssl.TLSVersion.TLSv1_2)
    hello = peek_client_hello(raw)
    assert hello is not None
    assert hello.max_version == 0x0303
    assert hello.alpn == ()
    assert hello.ja4.startswith("t12d") and hello.ja4[8:10] == "00"


def test_no_sni() -> None:
    raw = tb.openssl_hello(None)
    hello = peek_client_hello(raw)
    assert hello is not None and hello.sni is None
    assert hello.ja4[3] == "i"


def test_sni_is_normalised() -> None:
    hello = peek_client_hello(tb.simple_hello(sni=b"WWW.Example.TEST."))
    assert hello is not None and hello.sni == "www.example.test"


def test_hello_spanning_records_and_reads() -> None:
    message = tb.handshake(tb.client_hello_body(extensions=[tb.sni_ext(b"a.example.test")]))
    raw = tb.records(message, [1, 3, 10, 7])  # five records, the header split across three
    one = peek_client_hello(tb.records(message))
    many = feed(raw, [2, 2, 1, 9, 5, 3])
    assert one is not None and many is not None
    assert many.sni == one.sni == "a.example.test"
    assert many.ja4 == one.ja4
    assert many.record_bytes == len(raw)


def _padded_message(size: int) -> bytes:
    """A ClientHello handshake message of exactly `size` bytes (padding extension)."""
    base = tb.handshake(tb.client_hello_body(extensions=[tb.sni_ext(b"a.example.test")]))
    pad = size - len(base) - 4
    assert pad >= 0
    exts = [tb.sni_ext(b"a.example.test"), tb.ext(0x0015, bytes(pad))]
    message = tb.handshake(tb.client_hello_body(extensions=exts))
    assert len(message) == size
    return message


def test_hello_records_are_bounded() -> None:
    """RFC 8446 §5.1 allows 1-byte records; more than MAX_HELLO_RECORDS of them for one
    hello is refused as soon as the record past the bound completes."""
    message = _padded_message(200)
    at_bound = tb.records(message, [1] * (MAX_HELLO_RECORDS - 1))
    hello = peek_client_hello(at_bound)
    assert hello is not None and hello.sni == "a.example.test"
    assert hello.record_bytes == len(at_bound)
    over = tb.records(message, [1] * MAX_HELLO_RECORDS)
    reader = HelloReader()
    for i in range(MAX_HELLO_RECORDS - 1):
        assert reader.feed(over[6 * i : 6 * i + 6]) is None
    with pytest.raises(ProtocolError) as info:
        reader.feed(over[6 * (MAX_HELLO_RECORDS - 1) : 6 * MAX_HELLO_RECORDS])
    assert info.value.reason == "hello_too_many_records"
    assert peek_client_hello(over, 16384, MAX_HELLO_RECORDS + 1) is not None


def _work_to_read(message: bytes) -> int:
    """Lines of clienthello.py executed while a hello in 1-byte records arrives one record
    per read (the attacker's pace): a measure of work that does not depend on the machine."""
    raw = tb.records(message, [1] * len(message))
    reader = HelloReader(len(raw) + 1, max_records=len(message))
    lines = 0
    code_file = clienthello.__file__

    def tracer(frame, event, arg):  # type: ignore[no-untyped-def]
        nonlocal lines
        if frame.f_code.co_filename != code_file:
            return None
        if event == "line":
            lines += 1
        return tracer

    result = None
    sys.settrace(tracer)
    try:
        for i in range(0, len(raw), 6):
            result = reader.feed(raw[i : i + 6])
    finally:
        sys.settrace(None)
    assert result is not None and result.sni == "a.example.test"
    return lines


def test_a_hello_in_one_byte_records_costs_linear_work() -> None:
    """Issue 15 finding 6: the hello was re-parsed from its first record on every read, so a
    hello of n 1-byte records cost O(n^2) (~0.5 s of a worker each at 2.7k records)."""
    small = _work_to_read(_padded_message(150))
    large = _work_to_read(_padded_message(600))
    assert large <= 4.5 * small, (small, large)  # 4x the records: ~4x the work, not 16x


def test_incomplete_hello_needs_more() -> None:
    raw = tb.simple_hello()
    for cut in range(len(raw)):
        assert peek_client_hello(raw[:cut]) is None


def test_bytes_after_the_hello_are_not_consumed() -> None:
    raw = tb.simple_hello()
    hello = peek_client_hello(raw + b"\x14\x03\x03\x00\x01\x01")  # a CCS record follows
    assert hello is not None and hello.record_bytes == len(raw)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"GET / HTTP/1.1\r\n", "not_tls"),
        (b"\x80\x2e\x01\x00\x02", "sslv2_hello"),
        (b"\x16\x03\x01\x00\x00", "empty_record"),
        (b"\x16\x02\x01\x00\x05", "not_tls"),
        (b"\x16\x03\x01\x48\x01", "record_overflow"),
        (b"\x16\x03\x01\x00\x04\x02\x00\x00\x00", "not_client_hello"),
        (b"\x16\x03\x01\x00\x04\x01\x00\x00\x00", "malformed_hello"),
        (b"\x16\x03\x01\x00\x05\x01\x00\x00\x64\x03" + b"\x17\x03\x03\x00\x01\x00", "bad_record"),
    ],
)
def test_bad_input_raises_with_reason(data: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError) as info:
        peek_client_hello(data)
    assert info.value.reason == reason


def test_oversized_hello_is_refused_early() -> None:
    big = tb.records(
        tb.handshake(tb.client_hello_body(extensions=[tb.ext(0x0015, b"\x00" * 20000)]))
    )
    with pytest.raises(ProtocolError) as info:
        peek_client_hello(big[:5], 16384)  # the record header alone tells
    assert info.value.reason == "hello_too_large"
    with pytest.raises(ProtocolError) as info:
        peek_client_hello(big, 16384)
    assert info.value.reason == "hello_too_large"


def test_huge_or_non_ascii_sni_is_refused() -> None:
    for name in (
        b"a" * 300,
        "bücher.example".encode(),
        b"bad name.test",
        b"-x.test",
        b"a..b.test",
        b"x" * 64 + b".test",
    ):
        with pytest.raises(ProtocolError) as info:
            peek_client_hello(tb.simple_hello(sni=name))
        assert info.value.reason == "bad_sni", name


def test_duplicate_extension_is_malformed() -> None:
    exts = [tb.sni_ext(b"a.test"), tb.sni_ext(b"b.test")]
    with pytest.raises(ProtocolError) as info:
        peek_client_hello(tb.records(tb.handshake(tb.client_hello_body(extensions=exts))))
    assert info.value.reason == "malformed_hello"


def test_hello_without_extensions_block() -> None:
    raw = tb.records(tb.handshake(tb.client_hello_body(with_extensions_block=False)))
    hello = peek_client_hello(raw)
    assert hello is not None and hello.extensions == () and hello.sni is None
    assert hello.ja4.endswith("_000000000000")


# ---------------------------------------------------------------- properties

hostnames = st.from_regex(
    r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\.[a-z0-9]{1,10}){0,3}", fullmatch=True
)
protocols = st.lists(st.binary(min_size=1, max_size=20), min_size=1, max_size=5)


@st.composite
def hellos(draw: st.DrawFn) -> tuple[bytes, bytes | None, list[bytes]]:
    sni = draw(st.none() | hostnames.map(str.encode))
    alpn = draw(st.lists(st.binary(min_size=1, max_size=12), max_size=4))
    ciphers = draw(st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=40))
    grease = draw(st.lists(st.sampled_from(tb.GREASE), max_size=3, unique=True))
    exts = []
    if sni is not None:
        exts.append(tb.sni_ext(sni))
    if alpn:
        exts.append(tb.alpn_ext(alpn))
    exts.append(tb.versions_ext([*grease[:1], 0x0304, 0x0303]))
    exts.extend(tb.ext(g, b"") for g in grease)
    exts.append(tb.sigalgs_ext(draw(st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=10))))
    exts = draw(st.permutations(exts))
    body = tb.client_hello_body(ciphers=ciphers, extensions=exts)
    sizes = draw(st.lists(st.integers(1, 300), max_size=6))
    return tb.records(tb.handshake(body), sizes), sni, alpn


@given(hellos(), st.lists(st.integers(1, 64), max_size=30))
def test_any_chunking_gives_the_same_result(
    case: tuple[bytes, bytes | None, list[bytes]], chunks: list[int]
) -> None:
    raw, sni, alpn = case
    whole = peek_client_hello(raw)
    assert whole is not None
    assert whole.sni == (sni.decode() if sni is not None else None)
    assert whole.alpn == tuple(alpn)
    assert whole.record_bytes == len(raw)
    assert feed(raw, chunks) == whole


@given(hellos(), st.data())
def test_any_mutation_parses_or_raises_protocol_error(
    case: tuple[bytes, bytes | None, list[bytes]], data: st.DataObject
) -> None:
    raw = bytearray(case[0])
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        if op == "flip" and raw:
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] = data.draw(st.integers(0, 255))
        elif op == "cut" and raw:
            i = data.draw(st.integers(0, len(raw) - 1))
            del raw[i : i + data.draw(st.integers(1, 8))]
        else:
            i = data.draw(st.integers(0, len(raw)))
            raw[i:i] = data.draw(st.binary(min_size=1, max_size=8))
    try:
        peek_client_hello(bytes(raw))
    except ProtocolError:
        pass


@given(st.binary(max_size=600))
def test_random_bytes_parse_or_raise(data: bytes) -> None:
    try:
        peek_client_hello(data)
    except ProtocolError:
        pass
