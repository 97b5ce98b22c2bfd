"""JA4 against the examples in FoxIO's specification (technical_details/JA4.md)."""

from __future__ import annotations

import struct

from blindfold.core.clienthello import peek_client_hello
from blindfold.core.ja4 import alpn_chars, ja4_fingerprint
from tests.helpers import tlsbuild as tb

SPEC_CIPHERS = [
    0x1301,
    0x1302,
    0x1303,
    0xC02B,
    0xC02F,
    0xC02C,
    0xC030,
    0xCCA9,
    0xCCA8,
    0xC013,
    0xC014,
    0x009C,
    0x009D,
    0x002F,
    0x0035,
]
SPEC_EXTS = [
    0x001B,
    0x0000,
    0x0033,
    0x0010,
    0x4469,
    0x0017,
    0x002D,
    0x000D,
    0x0005,
    0x0023,
    0x0012,
    0x002B,
    0xFF01,
    0x000B,
    0x000A,
    0x0015,
]
SPEC_SIGS = [0x0403, 0x0804, 0x0401, 0x0503, 0x0805, 0x0501, 0x0806, 0x0601]


def _sig_bytes(sigs: list[int]) -> bytes:
    return struct.pack(">H", 2 * len(sigs)) + b"".join(struct.pack(">H", s) for s in sigs)


def _ciphers(c: list[int]) -> bytes:
    return b"".join(struct.pack(">H", x) for x in c)


def test_spec_example() -> None:
    ja4 = ja4_fingerprint(
        0x0303,
        (0x0304, 0x0303),
        True,
        _ciphers(SPEC_CIPHERS),
        tuple(SPEC_EXTS),
        _sig_bytes(SPEC_SIGS),
        b"h2",
    )
    assert ja4 == "t13d1516h2_8daaf6152771_e5627efa2ab1"


def test_spec_example_without_signature_algorithms() -> None:
    ja4 = ja4_fingerprint(
        0x0303, (0x0304,), True, _ciphers(SPEC_CIPHERS), tuple(SPEC_EXTS), b"", b"h2"
    )
    assert ja4.endswith("_6d807ffa2a79")


def test_grease_is_ignored_everywhere() -> None:
    plain = ja4_fingerprint(
        0x0303,
        (0x0304,),
        True,
        _ciphers(SPEC_CIPHERS),
        tuple(SPEC_EXTS),
        _sig_bytes(SPEC_SIGS),
        b"h2",
    )
    greased = ja4_fingerprint(
        0x0303,
        (0x3A3A, 0x0304),
        True,
        _ciphers([0x0A0A, *SPEC_CIPHERS]),
        (0x2A2A, *SPEC_EXTS, 0xFAFA),
        _sig_bytes([0x1A1A, *SPEC_SIGS]),
        b"h2",
    )
    assert greased == plain


def test_parsed_hello_matches_the_spec_example() -> None:
    """The same fields carried in a real ClientHello encoding give the spec's fingerprint."""
    exts = []
    for e in SPEC_EXTS:
        if e == 0x0000:
            exts.append(tb.sni_ext(b"example.test"))
        elif e == 0x0010:
            exts.append(tb.alpn_ext([b"h2", b"http/1.1"]))
        elif e == 0x002B:
            exts.append(tb.versions_ext([0x0304, 0x0303]))
        elif e == 0x000D:
            exts.append(tb.sigalgs_ext(SPEC_SIGS))
        else:
            exts.append(tb.ext(e, b""))
    raw = tb.records(tb.handshake(tb.client_hello_body(ciphers=SPEC_CIPHERS, extensions=exts)))
    hello = peek_client_hello(raw)
    assert hello is not None
    assert hello.ja4 == "t13d1516h2_8daaf6152771_e5627efa2ab1"


def test_alpn_characters() -> None:
    assert alpn_chars(None) == "00"
    assert alpn_chars(b"") == "00"
    assert alpn_chars(b"http/1.1") == "h1"
    assert alpn_chars(b"h") == "hh"
    # spec: non-alphanumeric first/last byte -> first and last hex digits
    assert alpn_chars(b"\xab") == "ab"
    assert alpn_chars(b"\xab\xcd") == "ad"
    assert alpn_chars(b"\x30\xab") == "3b"
    assert alpn_chars(b"\x30\x31\xab\xcd") == "3d"
    assert alpn_chars(b"\x30\xab\xcd\x31") == "01"


def test_version_and_counts() -> None:
    many = _ciphers(list(range(1, 120)))
    ja4 = ja4_fingerprint(0x0301, (), False, many, (), b"", None)
    assert ja4.startswith("t10i9900")  # counts cap at 99
    assert ja4.endswith("_000000000000")
    assert ja4_fingerprint(0x0300, (), False, b"", (), b"", None) == (
        "ts3i000000_000000000000_000000000000"
    )
    assert ja4_fingerprint(0x9999, (), True, b"\x13\x01", (0x0000,), b"", None)[1:3] == "00"
