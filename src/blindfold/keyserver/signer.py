"""The site's keys and the only signing the key server does: TLS 1.3 server CertificateVerify
content (RFC 8446 §4.4.3) that it builds itself from a transcript hash. No raw private-key
operation, no signing of a caller-supplied digest or message."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509.oid import ExtensionOID

from blindfold.config.keyserver import KeyConfig
from blindfold.core import keyless_wire as w
from blindfold.core.certchain import ChainError, check_chain
from blindfold.core.routing import SniRouter
from blindfold.errors import ConfigError
from blindfold.keyserver.hsm import HsmKey, check_pair, open_key

MAX_CHAIN_BYTES = 65536  # a chain goes to edges in one CHAIN_RESPONSE frame (MAX_FRAME 128 KiB)
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey


class SignError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(slots=True)
class SiteKey:
    name: str
    key: PrivateKey | HsmKey
    cert_sha256: bytes
    router: SniRouter[bool]  # the certificate's DNS names
    schemes: frozenset[int]
    # every name a client accepts the certificate for: its DNS names and IP addresses
    names: tuple[str, ...] = ()
    chain: tuple[bytes, ...] = ()  # DER, leaf first: what edges are sent (CHAIN_REQUEST)
    not_after: float = 0.0  # the leaf's expiry, POSIX seconds
    public: PublicKey | None = None  # the leaf's key (an HSM key's public half)

    def covers(self, hostname: str) -> bool:
        return bool(self.router.lookup(hostname))


def schemes_for(key: PrivateKey | PublicKey) -> frozenset[int]:
    if isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)):
        if isinstance(key.curve, ec.SECP256R1):
            return frozenset({w.ECDSA_SECP256R1_SHA256})
        if isinstance(key.curve, ec.SECP384R1):
            return frozenset({w.ECDSA_SECP384R1_SHA384})
        return frozenset()
    if isinstance(key, (rsa.RSAPrivateKey, rsa.RSAPublicKey)):
        # TLS 1.3 signs with RSA-PSS only (RFC 8446 §4.2.3: PKCS#1 v1.5 is not allowed here)
        return frozenset({w.RSA_PSS_RSAE_SHA256, w.RSA_PSS_RSAE_SHA384, w.RSA_PSS_RSAE_SHA512})
    if isinstance(key, (ed25519.Ed25519PrivateKey, ed25519.Ed25519PublicKey)):
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


def _is_ip(name: str) -> bool:
    return ":" in name or name.replace(".", "").isdigit()


def _why(exc: Exception) -> str:
    return (exc.strerror or str(exc)) if isinstance(exc, OSError) else str(exc)


def _spki(key: PrivateKey | PublicKey) -> bytes:
    pub = key.public_key() if isinstance(key, PrivateKey) else key
    return pub.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_key(
    index: int, cfg: KeyConfig, *, now: float | None = None, previous: tuple[str, ...] = ()
) -> SiteKey:
    """The key and its certificate chain, checked to fit together. With `now` (a reload of
    replaced files) the chain must also pass core.certchain's checks: each certificate signed
    by the next, the leaf valid at `now` and covering every DNS name in `previous` (the names
    of the certificate in service); otherwise the replacement is refused and the old pair
    stays (edges would refuse that chain and keep the old one, which the key server stops
    signing for after the grace)."""
    where = f"keyserver.keys[{index}]"
    try:
        chain = x509.load_pem_x509_certificates(Path(cfg.certificate).read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"{where}.certificate", f"cannot load {cfg.certificate}: {_why(exc)}"
        ) from None
    ders = tuple(c.public_bytes(serialization.Encoding.DER) for c in chain)
    if len(ders) > w.MAX_CHAIN_CERTS or sum(len(d) for d in ders) > MAX_CHAIN_BYTES:
        raise ConfigError(
            f"{where}.certificate",
            f"at most {w.MAX_CHAIN_CERTS} certificates and {MAX_CHAIN_BYTES} bytes (DER) in a "
            "chain: edges are sent it in one frame",
        )
    cert = chain[0]
    public = cert.public_key()
    if not isinstance(
        public, (ec.EllipticCurvePublicKey, rsa.RSAPublicKey, ed25519.Ed25519PublicKey)
    ):
        raise ConfigError(f"{where}.certificate", "only ECDSA, RSA and Ed25519 certificates")
    if cfg.pkcs11 is not None:
        if not isinstance(public, (ec.EllipticCurvePublicKey, rsa.RSAPublicKey)):
            raise ConfigError(f"{where}.pkcs11", "only ECDSA P-256/P-384 and RSA keys in a token")
        hsm = open_key(f"{where}.pkcs11", cfg.pkcs11)
        key: PrivateKey | HsmKey = hsm
        schemes = schemes_for(public)
        if isinstance(public, rsa.RSAPublicKey) and public.key_size < 2048:
            raise ConfigError(f"{where}.pkcs11", "RSA keys must have at least 2048 bits")
        if not schemes:
            raise ConfigError(f"{where}.pkcs11", "unsupported curve (P-256 and P-384 only)")
        check_pair(f"{where}.pkcs11", hsm, public, _HASHES[min(schemes)]())
    else:
        try:
            pem = serialization.load_pem_private_key(Path(cfg.key).read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise ConfigError(f"{where}.key", f"cannot load {cfg.key}: {_why(exc)}") from None
        if not isinstance(
            pem, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey)
        ):
            raise ConfigError(f"{where}.key", "only ECDSA P-256/P-384, RSA and Ed25519 keys")
        key = pem
        if isinstance(pem, rsa.RSAPrivateKey) and pem.key_size < 2048:
            raise ConfigError(f"{where}.key", "RSA keys must have at least 2048 bits")
        schemes = schemes_for(pem)
        if not schemes:
            raise ConfigError(f"{where}.key", "unsupported curve (P-256 and P-384 only)")
        if _spki(public) != _spki(pem):
            raise ConfigError(where, "the key does not belong to the certificate")
    names, addresses = _names(cert)
    if not names:
        raise ConfigError(f"{where}.certificate", "the certificate has no DNS names")
    not_after = cert.not_valid_after_utc.timestamp()
    if now is not None:
        try:
            check_chain(ders, [n for n in previous if not _is_ip(n)], now)
        except ChainError as exc:
            raise ConfigError(f"{where}.certificate", f"{cfg.certificate}: {exc}") from None
    return SiteKey(
        cfg.name or f"key{index}",
        key,
        cert.fingerprint(hashes.SHA256()),
        SniRouter([(n, True) for n in names]),
        schemes,
        tuple(dict.fromkeys(names + addresses)),
        ders,
        not_after,
        public,
    )


def utc_now() -> float:
    return datetime.datetime.now(datetime.UTC).timestamp()


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
    if isinstance(key, HsmKey):
        try:
            return key.sign(content, site.public, algorithm)
        except Exception as exc:  # the token's own errors (pkcs11.PKCS11Error and kin)
            raise SignError(w.E_INTERNAL, f"the token refused: {type(exc).__name__}") from None
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(content, ec.ECDSA(algorithm))
    # RFC 8446 §4.2.3: RSASSA-PSS with MGF1 on the same hash, salt as long as the hash
    return key.sign(
        content,
        padding.PSS(mgf=padding.MGF1(algorithm), salt_length=algorithm.digest_size),
        algorithm,
    )
