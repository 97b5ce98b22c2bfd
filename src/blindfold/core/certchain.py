"""Checks on a certificate chain before it replaces the one in service (sans-IO: the time is
passed in). A chain fetched from the key server, or a renewed file, is swapped in only if it
parses, each certificate is signed by the next (the order TLS sends them, RFC 8446 §4.4.2),
the leaf is valid at `now` and its names cover every hostname the route serves. It does not
check trust anchors: the visitor's client does that; this stops a broken or wrong chain from
replacing a working one."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtensionOID

from blindfold.core.keyless_handshake import uncovered_names

MAX_CHAIN = 10


class ChainError(ValueError):
    """Why a chain is refused; `reason` is a metric label (a small fixed set)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def leaf_names(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
    except x509.ExtensionNotFound:
        return []
    assert isinstance(san, x509.SubjectAlternativeName)
    return [n.lower().rstrip(".") for n in san.get_values_for_type(x509.DNSName)]


def check_chain(
    ders: Sequence[bytes], hostnames: Sequence[str], now: float
) -> tuple[x509.Certificate, ...]:
    """The parsed chain, or ChainError(reason in: unparsable, broken_chain, expired,
    not_yet_valid, names_not_covered)."""
    if not 0 < len(ders) <= MAX_CHAIN:
        raise ChainError("unparsable", f"a chain has 1 to {MAX_CHAIN} certificates")
    try:
        chain = tuple(x509.load_der_x509_certificate(d) for d in ders)
    except ValueError as exc:
        raise ChainError("unparsable", f"a certificate does not parse: {exc}") from None
    for child, parent in itertools.pairwise(chain):
        try:
            child.verify_directly_issued_by(parent)
        except Exception as exc:  # ValueError, TypeError, InvalidSignature
            raise ChainError(
                "broken_chain",
                f"{child.subject.rfc4514_string()} is not issued by the next certificate "
                f"({type(exc).__name__})",
            ) from None
    leaf = chain[0]
    if now < leaf.not_valid_before_utc.timestamp():
        raise ChainError("not_yet_valid", f"the leaf is valid from {leaf.not_valid_before_utc}")
    if now >= leaf.not_valid_after_utc.timestamp():
        raise ChainError("expired", f"the leaf expired at {leaf.not_valid_after_utc}")
    missing = uncovered_names(hostnames, leaf_names(leaf))
    if missing:
        raise ChainError("names_not_covered", f"the leaf does not cover {', '.join(missing)}")
    return chain


def check_replaced_pem(
    path: str, previous: Sequence[str], now: float
) -> tuple[x509.Certificate, ...]:
    """check_chain on a replaced PEM file (key server, origin agent, blind route): each
    certificate signed by the next, the leaf valid at `now`, and the new leaf covering every
    DNS name the one in service (`previous`) had: a renewal may add names, never drop one."""
    try:
        with open(path, "rb") as f:
            certs = x509.load_pem_x509_certificates(f.read())
    except (OSError, ValueError) as exc:
        raise ChainError("unparsable", f"cannot load {path}: {exc}") from None
    ders = [c.public_bytes(serialization.Encoding.DER) for c in certs]
    return check_chain(ders, previous, now)
