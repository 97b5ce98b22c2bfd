"""ACME challenge material: key authorizations (RFC 8555 §8.1), the tls-alpn-01 certificate
(RFC 8737 §3), the dns-01 TXT value (RFC 8555 §8.4), and the directory where challenge
certificates wait for the TLS server that answers them.

The directory is how the component running ACME hands a tls-alpn-01 certificate to the one
that answers on port 443: the origin agent answers for every site hostname (edges forward
`acme-tls/1` hellos to it in every mode), whether the origin agent itself or the key server
(for keyless hostnames) ordered the certificate. A challenge certificate's key is a throwaway
made for that one challenge, never the site's key.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import hashlib
import os
import re
import ssl
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID, ObjectIdentifier

ACME_TLS_ALPN = b"acme-tls/1"  # RFC 8737 §6.2
ID_PE_ACME_IDENTIFIER = ObjectIdentifier("1.3.6.1.5.5.7.1.31")  # RFC 8737 §6.1
_HOSTNAME = re.compile(
    r"^(?:\*\.)?[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*$"
)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def key_authorization(token: str, thumbprint: bytes) -> str:
    """RFC 8555 §8.1: token || '.' || base64url(JWK thumbprint (RFC 7638, SHA-256))."""
    return f"{token}.{b64url(thumbprint)}"


def dns01_value(key_auth: str) -> str:
    """RFC 8555 §8.4: the TXT record's value, base64url(SHA-256(key authorization))."""
    return b64url(hashlib.sha256(key_auth.encode("ascii")).digest())


def dns01_name(hostname: str) -> str:
    """RFC 8555 §8.4: `_acme-challenge.` + the name (a wildcard's base name)."""
    return "_acme-challenge." + hostname.removeprefix("*.")


def tls_alpn01_certificate(
    hostname: str, key_auth: str, now: datetime.datetime | None = None
) -> tuple[bytes, bytes]:
    """RFC 8737 §3: a self-signed certificate for `hostname` (its only SAN dNSName) with the
    critical acmeIdentifier extension holding SHA-256(key authorization) as a DER OCTET
    STRING. Returns (certificate PEM, throwaway key PEM)."""
    digest = hashlib.sha256(key_auth.encode("ascii")).digest()
    key = ec.generate_private_key(ec.SECP256R1())
    now = now or datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ACME tls-alpn-01 challenge")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .add_extension(
            x509.UnrecognizedExtension(ID_PE_ACME_IDENTIFIER, b"\x04\x20" + digest),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def valid_hostname(name: str) -> bool:
    """A lowercase DNS name (no path separators, no '..'): safe as a file name."""
    return len(name) <= 253 and bool(_HOSTNAME.match(name))


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write a file so that a reader sees the old content or the new, never a mix: a
    temporary file in the same directory, fsync, then rename over the target."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class ChallengeDir:
    """tls-alpn-01 certificates by hostname, one file each (`<hostname>.pem`: certificate and
    throwaway key), readable by the process that answers. `context(name)` is what the TLS
    server uses for an `acme-tls/1` hello: None when no challenge is pending for the name."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def _file(self, hostname: str) -> Path | None:
        name = hostname.lower()
        if not valid_hostname(name):
            return None
        return self.path / f"{name}.pem"

    def put(self, hostname: str, cert_pem: bytes, key_pem: bytes) -> None:
        f = self._file(hostname)
        if f is None:
            raise ValueError(f"not a hostname: {hostname!r}")
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_atomic(f, cert_pem + key_pem)

    def remove(self, hostname: str) -> None:
        f = self._file(hostname)
        if f is not None:
            with contextlib.suppress(OSError):
                f.unlink()

    def context(self, hostname: str | None) -> ssl.SSLContext | None:
        """An SSLContext serving the challenge certificate with ALPN acme-tls/1 only
        (RFC 8737 §3: the server MUST negotiate acme-tls/1), or None."""
        if not hostname:
            return None
        f = self._file(hostname)
        if f is None or not f.is_file():
            return None
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_alpn_protocols([ACME_TLS_ALPN.decode()])
        try:
            ctx.load_cert_chain(str(f))
        except (OSError, ssl.SSLError):
            return None
        return ctx
