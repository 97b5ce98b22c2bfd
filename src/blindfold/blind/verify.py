"""`blindfold verify URL`: check a site end to end, as a visitor sees it through an edge.

- the certificate presented for the URL is the expected one: the origin's own (pinned) on a
  passthrough route, the site's certificate on a keyless route (`--pin` / `--expect-cert`),
- the response carries a valid origin signature (RFC 9421) over its status, type, date, body
  digest and the request it answers (method, authority, path, query: a response the origin
  signed for another URL fails) (`--signature-key`),
- the blind-delivery manifest verifies (`--manifest-key`), and every blob the edge serves has
  the digest the manifest names (`--edge`).
Each check prints one line; the exit code is 1 when any fails."""

from __future__ import annotations

import hashlib
import urllib.parse
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding

from blindfold.blind.fetch import FetchOptions, _Get, get_manifest
from blindfold.core import msgsig
from blindfold.core.manifest import Entry
from blindfold.errors import ConfigError, UpstreamError, VerificationError

MAX_PAGE_BYTES = 64 << 20


@dataclass(frozen=True, slots=True)
class VerifyOptions:
    ca_file: str | None = None
    connect_to: dict[str, str] = field(default_factory=dict)
    timeout_s: float = 30.0
    pins_sha256: tuple[bytes, ...] = ()
    signature_key: Ed25519PublicKey | None = None
    manifest_key: Ed25519PublicKey | None = None
    edge: str = ""
    max_blobs: int = 1000


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{'ok  ' if self.ok else 'FAIL'} {self.name}: {self.detail}"


def cert_pins(pins_hex: list[str], cert_files: list[str]) -> tuple[bytes, ...]:
    out = []
    for i, text in enumerate(pins_hex):
        try:
            pin = bytes.fromhex(text.replace(":", ""))
        except ValueError:
            pin = b""
        if len(pin) != 32:
            raise ConfigError(f"pin[{i}]", f"{text!r} is not a SHA-256 fingerprint (64 hex)")
        out.append(pin)
    for path in cert_files:
        try:
            with open(path, "rb") as f:
                cert = x509.load_pem_x509_certificates(f.read())[0]
        except (OSError, ValueError) as exc:
            raise ConfigError("expect_cert", f"{path}: {exc}") from None
        out.append(hashlib.sha256(cert.public_bytes(Encoding.DER)).digest())
    return tuple(out)


def verify_site(url: str, opts: VerifyOptions) -> list[Check]:
    fopts = FetchOptions(
        edge=opts.edge,
        public_key=opts.manifest_key,
        ca_file=opts.ca_file,
        connect_to=opts.connect_to,
        timeout_s=opts.timeout_s,
    )
    checks: list[Check] = []
    try:
        req = _Get(url, fopts)
    except UpstreamError as exc:
        return [Check("fetch", False, str(exc))]
    try:
        body = req.read_all(MAX_PAGE_BYTES)
        status, headers = req.resp.status, req.resp.getheaders()
        der = req.peer_cert
    except UpstreamError as exc:
        return [Check("fetch", False, str(exc))]
    finally:
        req.close()
    checks.append(Check("fetch", True, f"HTTP {status}, {len(body)} bytes"))
    if der is not None:
        fp = hashlib.sha256(der).digest()
        if opts.pins_sha256:
            checks.append(
                Check(
                    "certificate",
                    fp in opts.pins_sha256,
                    f"sha256 {fp.hex()} "
                    + (
                        "is the expected one"
                        if fp in opts.pins_sha256
                        else "is NOT the expected one"
                    ),
                )
            )
        else:
            checks.append(
                Check(
                    "certificate",
                    True,
                    f"sha256 {fp.hex()} (no pin given: verified against the CA only)",
                )
            )
    if opts.signature_key is not None:
        try:
            u = urllib.parse.urlsplit(url)
            asked = msgsig.RequestRef("GET", urllib.parse.urlunsplit((*u[:4], "")))
            v = msgsig.verify_response(status, headers, body, opts.signature_key, asked)
            checks.append(
                Check(
                    "signature",
                    True,
                    f"RFC 9421 by key {v.key_id}, expires {v.expires}, covers status, type, "
                    "digest, date and this request (method, authority, path, query)",
                )
            )
        except VerificationError as exc:
            checks.append(Check("signature", False, str(exc)))
    if opts.manifest_key is not None:
        try:
            m = get_manifest(url, fopts)
        except (VerificationError, UpstreamError, ConfigError) as exc:
            checks.append(Check("manifest", False, str(exc)))
            return checks
        checks.append(
            Check(
                "manifest",
                True,
                f"{len(m.files)} files, signed by {m.key_id}, expires {m.expires_at}",
            )
        )
        if opts.edge:
            checks.append(_blobs(m.files, fopts, opts.max_blobs))
    return checks


def _blobs(files: dict[str, Entry], fopts: FetchOptions, limit: int) -> Check:
    bad = []
    checked = 0
    for path, e in list(files.items())[:limit]:
        try:
            req = _Get(fopts.edge.rstrip("/") + "/b/" + e.id, fopts)
            h = hashlib.sha256()
            try:
                while data := req.chunk(e.sealed_size):
                    h.update(data)
            finally:
                req.close()
            if h.hexdigest() != e.blob_sha256:
                bad.append(f"{path}: digest differs")
        except UpstreamError as exc:
            bad.append(f"{path}: {exc}")
        checked += 1
    if bad:
        return Check("blobs", False, f"{len(bad)} of {checked} bad: " + "; ".join(bad[:5]))
    return Check("blobs", True, f"{checked} blobs from the edge match the manifest")
