"""The site's keys and the only signing the key server does: TLS 1.3 server CertificateVerify
content (RFC 8446 §4.4.3) that it builds itself from a transcript hash. No raw private-key
operation, no signing of a caller-supplied digest or message."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509.oid import ExtensionOID

from blindfold.config.keyserver import KeyConfig
from blindfold.core import keyless_wire as w
from blindfold.core.routing import SniRouter
from blindfold.errors import ConfigError

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


class SignError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(slots=True)
class SiteKey:
    name: str
    key: PrivateKey
    cert_sha256: bytes
    router: SniRouter[bool]  # the certificate's DNS names
    schemes: frozenset[int]
    # every name a client accepts the certificate for: its DNS names and IP addresses
    names: tuple[str, ...] = ()

    def covers(self, hostname: str) -> bool:
        return bool(self.router.lookup(hostname))


def schemes_for(key: PrivateKey) -> frozenset[int]:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        if isinstance(key.curve, ec.SECP256R1):
            return frozenset({w.ECDSA_SECP256R1_SHA256})
        if isinstance(key.curve, ec.SECP384R1):
            return frozenset({w.ECDSA_SECP384R1_SHA384})
        return frozenset()
    if isinstance(key, rsa.RSAPrivateKey):
        # TLS 1.3 signs with RSA-PSS only (RFC 8446 §4.2.3: PKCS#1 v1.5 is not allowed here)
        return frozenset({w.RSA_PSS_RSAE_SHA256, w.RSA_PSS_RSAE_SHA384, w.RSA_PSS_RSAE_SHA512})
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return frozenset({w.ED25519})
    return frozenset()


def _names(cert: x509.Certificate) -> tuple[list[str], list[str]]:
    """The subjectAltName's DNS names (lower case) and IP addresses (RFC 5280 §4.2.1.6)."""
    try:
        san = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
    except x509.ExtensionNotFound:
        return [], []
    assert isinstance(san, x509.SubjectAlternativeName)
    dns = [n.lower().rstrip(".") for n in san.get_values_for_type(x509.DNSName)]
    return dns, [str(a) for a in san.get_values_for_type(x509.IPAddress)]


def _why(exc: Exception) -> str:
    return (exc.strerror or str(exc)) if isinstance(exc, OSError) else str(exc)


def load_key(index: int, cfg: KeyConfig) -> SiteKey:
    where = f"keyserver.keys[{index}]"
    try:  # each file's error names its own key
        key = serialization.load_pem_private_key(Path(cfg.key).read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{where}.key", f"cannot load {cfg.key}: {_why(exc)}") from None
    try:
        cert = x509.load_pem_x509_certificate(Path(cfg.certificate).read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"{where}.certificate", f"cannot load {cfg.certificate}: {_why(exc)}"
        ) from None
    if not isinstance(
        key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey)
    ):
        raise ConfigError(f"{where}.key", "only ECDSA P-256/P-384, RSA and Ed25519 keys")
    if isinstance(key, rsa.RSAPrivateKey) and key.key_size < 2048:
        raise ConfigError(f"{where}.key", "RSA keys must have at least 2048 bits")
    schemes = schemes_for(key)
    if not schemes:
        raise ConfigError(f"{where}.key", "unsupported curve (P-256 and P-384 only)")
    pub = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if pub != key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ):
        raise ConfigError(where, "the key does not belong to the certificate")
    names, addresses = _names(cert)
    if not names:
        raise ConfigError(f"{where}.certificate", "the certificate has no DNS names")
    return SiteKey(
        cfg.name or f"key{index}",
        key,
        cert.fingerprint(hashes.SHA256()),
        SniRouter([(n, True) for n in names]),
        schemes,
        tuple(dict.fromkeys(names + addresses)),
    )


_HASHES: dict[int, type[hashes.SHA256 | hashes.SHA384 | hashes.SHA512]] = {
    w.ECDSA_SECP256R1_SHA256: hashes.SHA256,
    w.ECDSA_SECP384R1_SHA384: hashes.SHA384,
    w.RSA_PSS_RSAE_SHA256: hashes.SHA256,
    w.RSA_PSS_RSAE_SHA384: hashes.SHA384,
    w.RSA_PSS_RSAE_SHA512: hashes.SHA512,
}


def sign_certificate_verify(site: SiteKey, scheme: int, transcript_hash: bytes) -> bytes:
    """Sign the CertificateVerify content built here from `transcript_hash`."""
    if scheme not in site.schemes:
        raise SignError(w.E_BAD_SCHEME, f"scheme 0x{scheme:04x} does not fit key {site.name}")
    if len(transcript_hash) not in w.TRANSCRIPT_HASH_SIZES:
        raise SignError(
            w.E_MALFORMED, f"a transcript hash has 32 or 48 bytes, not {len(transcript_hash)}"
        )
    content = w.certificate_verify_content(transcript_hash)
    key = site.key
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(content)
    algorithm = _HASHES[scheme]()
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(content, ec.ECDSA(algorithm))
    # RFC 8446 §4.2.3: RSASSA-PSS with MGF1 on the same hash, salt as long as the hash
    return key.sign(
        content,
        padding.PSS(mgf=padding.MGF1(algorithm), salt_length=algorithm.digest_size),
        algorithm,
    )
