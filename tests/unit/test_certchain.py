"""core.certchain: a chain replaces the one in service only if it parses, links, is valid now
and covers the route's names."""

from __future__ import annotations

import time

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from blindfold import pki
from blindfold.core.certchain import ChainError, check_chain


@pytest.fixture(scope="module")
def ca() -> pki.Issued:
    return pki.make_ca("certchain test CA")


def der(issued: pki.Issued) -> bytes:
    return issued.cert.public_bytes(Encoding.DER)


def test_a_good_chain_passes(ca: pki.Issued) -> None:
    leaf = pki.issue(ca, ["example.test", "*.example.test"])
    chain = check_chain([der(leaf), der(ca)], ["example.test", "*.example.test"], time.time())
    assert chain[0] == leaf.cert
    # a name below the wildcard, and the leaf alone
    assert check_chain([der(leaf)], ["www.example.test"], time.time())


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("garbage", "unparsable"),
        ("empty", "unparsable"),
        ("other_issuer", "broken_chain"),
        ("expired", "expired"),
        ("future", "not_yet_valid"),
        ("names", "names_not_covered"),
        ("wildcard", "names_not_covered"),
    ],
)
def test_bad_chains_are_refused(ca: pki.Issued, case: str, reason: str) -> None:
    leaf = pki.issue(ca, ["example.test", "*.example.test"])
    now = time.time()
    names = ["example.test", "*.example.test"]
    ders: list[bytes] = [der(leaf), der(ca)]
    if case == "garbage":
        ders = [b"\x30\x03abc"]
    elif case == "empty":
        ders = []
    elif case == "other_issuer":
        ders = [der(leaf), der(pki.make_ca("another CA"))]
    elif case == "expired":
        now += 31 * 86400
    elif case == "future":
        now -= 3600
    elif case == "names":
        names = ["example.test", "other.test"]
    elif case == "wildcard":
        ders = [der(pki.issue(ca, ["www.example.test"]))]
        names = ["*.example.test"]
    with pytest.raises(ChainError) as refused:
        check_chain(ders, names, now)
    assert refused.value.reason == reason
