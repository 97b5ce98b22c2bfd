"""Certificate and key files as ACME manages them: keys generated where they are used (mode
0600), a placeholder until the first issuance, a chain checked before it replaces a working
one, and atomic replacement (write a temporary file, then rename) so that a process reloading
the file sees the old chain or the new one, never half of one."""

from __future__ import annotations

import datetime
import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import NameOID

from blindfold.acme.challenge import write_atomic
from blindfold.errors import VerificationError

KEY_TYPES = ("ec-p256", "ec-p384", "rsa-2048", "rsa-3072")


def generate_key(key_type: str) -> CertificateIssuerPrivateKeyTypes:
    if key_type == "ec-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "ec-p384":
        return ec.generate_private_key(ec.SECP384R1())
    if key_type in ("rsa-2048", "rsa-3072"):
        return rsa.generate_private_key(65537, int(key_type[4:]))
    raise ValueError(key_type)


def key_pem(key: CertificateIssuerPrivateKeyTypes) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_or_create_key(path: str, key_type: str) -> CertificateIssuerPrivateKeyTypes:
    """The key at `path`, or a new one written there with mode 0600. A renewal keeps the key:
    for keyless hostnames the edges hold the previous chain until they fetch the new one, and
    the key server must still be able to sign for it."""
    p = Path(path)
    if p.exists():
        key = serialization.load_pem_private_key(p.read_bytes(), None)
        if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
            raise VerificationError(f"{path}: an ECDSA or RSA key is needed for ACME")
        return key
    key = generate_key(key_type)
    write_atomic(p, key_pem(key), 0o600)
    return key


def make_csr(key: CertificateIssuerPrivateKeyTypes, hostnames: Sequence[str]) -> bytes:
    """RFC 8555 §7.4: a PKCS#10 request naming every hostname as a SAN dNSName."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostnames[0])]))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(h) for h in hostnames]), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def ensure_placeholder(
    cert_path: str, key_path: str, hostnames: Sequence[str], key_type: str
) -> bool:
    """Before the first issuance the TLS server needs something to load: a self-signed
    certificate for the hostnames (one day), with the real key (made here, 0600). True if
    one was written."""
    if Path(cert_path).exists():
        return False
    key = load_or_create_key(key_path, key_type)
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostnames[0])])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(h) for h in hostnames]), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    write_atomic(Path(cert_path), cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return True


def _san_covers(san: str, host: str) -> bool:
    """RFC 6125 §6.4.3: a SAN wildcard covers exactly one leftmost label."""
    if san == host:
        return True
    return san.startswith("*.") and "." in host and host.split(".", 1)[1] == san[2:]


def is_placeholder(cert: x509.Certificate) -> bool:
    return cert.issuer == cert.subject


def load_chain(pem: bytes) -> list[x509.Certificate]:
    try:
        chain = x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        raise VerificationError(f"not a PEM certificate chain: {exc}") from None
    if not chain:
        raise VerificationError("empty certificate chain")
    return chain


def check_chain(
    chain_pem: bytes,
    key: CertificateIssuerPrivateKeyTypes,
    hostnames: Sequence[str],
    now: float,
) -> list[x509.Certificate]:
    """What must hold before a chain replaces the one in service (VerificationError naming
    what failed): the leaf's public key is `key`'s, its SANs cover every hostname, it is
    valid now, and each certificate is signed by the next one in the chain."""
    chain = load_chain(chain_pem)
    leaf = chain[0]
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if leaf.public_key().public_bytes(der, pub) != key.public_key().public_bytes(der, pub):
        raise VerificationError("the certificate is not for this key")
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [n.lower() for n in san.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        names = []
    missing = [h for h in hostnames if not any(_san_covers(n, h) for n in names)]
    if missing:
        raise VerificationError(f"the certificate does not name {', '.join(missing)}")
    start = leaf.not_valid_before_utc.timestamp()
    end = leaf.not_valid_after_utc.timestamp()
    if not start - 300 <= now < end:
        raise VerificationError("the certificate is not valid now")
    for child, parent in itertools.pairwise(chain):
        try:
            child.verify_directly_issued_by(parent)
        except (ValueError, TypeError, InvalidSignature) as exc:
            raise VerificationError(
                f"{child.subject.rfc4514_string()} is not signed by the next certificate: "
                f"{type(exc).__name__}"
            ) from None
    return chain


def install_chain(cert_path: str, chain_pem: bytes) -> None:
    """Replace the chain file atomically (the key file, reused, is not touched)."""
    write_atomic(Path(cert_path), chain_pem, 0o644)


def pending_files(orders: Sequence[Any]) -> set[str]:
    """The orders' cert/key files that do not exist yet (made at the first start)."""
    return {p for o in orders for p in (o.cert, o.key) if not Path(p).exists()}
