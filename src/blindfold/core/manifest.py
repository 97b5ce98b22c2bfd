"""The blind-delivery manifest: path -> sealed blob, signed by the site (Ed25519), with an expiry.

Sans-IO: `build` makes the signed bytes, `verify` checks them and returns a `Manifest`. The
format (docs/blind.md):

    {"format": "blindfold-manifest/1", "alg": "ed25519", "key_id": "<hex>",
     "payload": "<JSON text>", "signature": "<base64url of Ed25519(payload as UTF-8)>"}

The payload is carried as a string so that a verifier checks exactly the bytes that were
signed (no JSON canonicalisation on either side); it holds `issued_at`, `expires_at` (Unix
seconds) and `files`: {"/path": {id, blob_sha256, sha256, type, size, sealed_size, rs, key}}
where `key` is the file's aes128gcm key, base64url. The manifest is secret (it holds the keys):
only the origin serves it, over its own TLS.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import hmac
import json
import re
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from blindfold.core import ece
from blindfold.errors import VerificationError

FORMAT = "blindfold-manifest/1"
MAX_MANIFEST_BYTES = 32 << 20
ALLOWED_SKEW_S = 300.0  # a manifest issued up to this far in the future still verifies
_ID = re.compile(r"[0-9a-f]{32}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
# The service worker checks a blob up to this size whole before releasing a byte; a larger one
# is streamed, piece by piece, each piece checked against its signed digest (Entry.chunks).
STREAM_BYTES = 8 << 20
CHUNK_BYTES = 1 << 20


def chunk_digests(data: bytes, size: int = CHUNK_BYTES) -> tuple[str, ...]:
    return tuple(hashlib.sha256(data[i : i + size]).hexdigest() for i in range(0, len(data), size))


def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64u(text: str) -> bytes:
    if not isinstance(text, str) or not re.fullmatch(r"[A-Za-z0-9_-]*", text):
        raise VerificationError("manifest: bad base64url")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise VerificationError("manifest: bad base64url") from None


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(Encoding.Raw, PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def blob_id(secret: bytes, path: str, version: str) -> str:
    """The opaque name of a sealed file: HMAC-SHA256 under the site's id secret of the path
    and a version, so an edge cannot map ids back to paths; same inputs, same id."""
    msg = b"blindfold-blob-id/1\x00" + path.encode() + b"\x00" + version.encode()
    return hmac.new(secret, msg, hashlib.sha256).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class Entry:
    path: str
    id: str
    blob_sha256: str
    sha256: str
    type: str
    size: int
    sealed_size: int
    rs: int
    key: bytes
    # Blobs the service worker streams (sealed_size > STREAM_BYTES): the SHA-256 (hex) of
    # each CHUNK_BYTES piece of the sealed blob, in order, so every piece is checked against
    # the site's signature before a byte of it is decrypted and released. Optional (older
    # manifests lack it: then such a file is not streamed from the edge).
    chunk_size: int = 0
    chunks: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        extra: dict[str, Any] = (
            {"chunk_size": self.chunk_size, "chunks": list(self.chunks)} if self.chunks else {}
        )
        return {
            **extra,
            "id": self.id,
            "blob_sha256": self.blob_sha256,
            "sha256": self.sha256,
            "type": self.type,
            "size": self.size,
            "sealed_size": self.sealed_size,
            "rs": self.rs,
            "key": b64u(self.key),
        }


@dataclass(frozen=True, slots=True)
class Manifest:
    issued_at: int
    expires_at: int
    key_id: str
    files: dict[str, Entry]


def build(
    entries: list[Entry], signing_key: Ed25519PrivateKey, issued_at: int, expires_at: int
) -> bytes:
    payload = json.dumps(
        {
            "format": FORMAT,
            "issued_at": issued_at,
            "expires_at": expires_at,
            "files": {e.path: e.to_json() for e in sorted(entries, key=lambda e: e.path)},
        },
        separators=(",", ":"),
        sort_keys=True,
    )
    signature = signing_key.sign(payload.encode())
    doc = {
        "format": FORMAT,
        "alg": "ed25519",
        "key_id": key_id(signing_key.public_key()),
        "payload": payload,
        "signature": b64u(signature),
    }
    return json.dumps(doc, indent=1).encode() + b"\n"


def _field(obj: dict[str, Any], name: str, kind: type, where: str) -> Any:
    value = obj.get(name)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise VerificationError(f"manifest: {where}.{name} missing or not a {kind.__name__}")
    return value


def parse_entry(path: str, raw: Any) -> Entry:
    where = f"files[{path!r}]"
    if not isinstance(raw, dict):
        raise VerificationError(f"manifest: {where} is not an object")
    if not path.startswith("/") or "\x00" in path:
        raise VerificationError(f"manifest: {where}: a path must start with /")
    entry = Entry(
        path=path,
        id=_field(raw, "id", str, where),
        blob_sha256=_field(raw, "blob_sha256", str, where),
        sha256=_field(raw, "sha256", str, where),
        type=_field(raw, "type", str, where),
        size=_field(raw, "size", int, where),
        sealed_size=_field(raw, "sealed_size", int, where),
        rs=_field(raw, "rs", int, where),
        key=unb64u(_field(raw, "key", str, where)),
    )
    if not _ID.fullmatch(entry.id):
        raise VerificationError(f"manifest: {where}.id is not 32 hex digits")
    if not (_HEX64.fullmatch(entry.blob_sha256) and _HEX64.fullmatch(entry.sha256)):
        raise VerificationError(f"manifest: {where}: digests must be 64 hex digits")
    if len(entry.key) != ece.KEY_BYTES:
        raise VerificationError(f"manifest: {where}.key must be {ece.KEY_BYTES} bytes")
    if not ece.MIN_RS <= entry.rs <= ece.MAX_RS:
        raise VerificationError(f"manifest: {where}.rs out of range")
    if entry.size < 0 or entry.sealed_size < ece.sealed_size(entry.size, entry.rs):
        raise VerificationError(f"manifest: {where}: sizes are inconsistent")
    if "chunks" in raw:
        size = _field(raw, "chunk_size", int, where)
        chunks = _field(raw, "chunks", list, where)
        if not 1 << 12 <= size <= 1 << 26 or len(chunks) != -(-entry.sealed_size // size):
            raise VerificationError(f"manifest: {where}: chunks do not cover the blob")
        if not all(isinstance(c, str) and _HEX64.fullmatch(c) for c in chunks):
            raise VerificationError(f"manifest: {where}.chunks must be 64 hex digits each")
        entry = dataclasses.replace(entry, chunk_size=size, chunks=tuple(chunks))
    return entry


def verify(data: bytes, public: Ed25519PublicKey, now: float | None) -> Manifest:
    """Check the signature, the key id, the format and the validity window (not when `now`
    is None: the sealer reading its previous manifest); return the manifest. Anything wrong
    raises `VerificationError` naming what."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise VerificationError(f"manifest: larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):  # deep nesting: RecursionError
        raise VerificationError("manifest: not JSON") from None
    if not isinstance(doc, dict):
        raise VerificationError("manifest: not a JSON object")
    if doc.get("format") != FORMAT or doc.get("alg") != "ed25519":
        raise VerificationError(f"manifest: format must be {FORMAT} with alg ed25519")
    if doc.get("key_id") != key_id(public):
        raise VerificationError(
            f"manifest: signed by key {doc.get('key_id')!r}, expected {key_id(public)}"
        )
    payload = _field(doc, "payload", str, "manifest")
    try:
        public.verify(unb64u(_field(doc, "signature", str, "manifest")), payload.encode())
    except InvalidSignature:
        raise VerificationError("manifest: bad signature") from None
    try:
        body = json.loads(payload)  # signed by the site, but never trust the shape
    except (ValueError, RecursionError):
        raise VerificationError("manifest: payload is not JSON") from None
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        raise VerificationError("manifest: payload format")
    issued = _field(body, "issued_at", int, "payload")
    expires = _field(body, "expires_at", int, "payload")
    if now is not None and now < issued - ALLOWED_SKEW_S:
        raise VerificationError(f"manifest: issued in the future ({issued})")
    if now is not None and now >= expires:
        raise VerificationError(f"manifest: expired at {expires}")
    files = _field(body, "files", dict, "payload")
    return Manifest(
        issued_at=issued,
        expires_at=expires,
        key_id=doc["key_id"],
        files={p: parse_entry(p, raw) for p, raw in files.items()},
    )


# ---------------------------------------------------------------------------- blob index
# What an edge may cache, and how to tell a good copy: each blob's (and SRI copy's) SHA-256 and
# size by its public name, signed by the site's manifest key. No keys, no paths: the edge
# learns nothing it does not see anyway. The signature covers INDEX_PURPOSE + payload, so an
# index signature can never pass for a manifest signature or the other way round (a manifest
# payload is JSON: it cannot start with the purpose string).
INDEX_FORMAT = "blindfold-blob-index/1"
INDEX_PURPOSE = b"blindfold-blob-index/1\x00"
MAX_INDEX_BYTES = 32 << 20
_INDEX_NAME = re.compile(r"[0-9a-f]{32}(?:\.js|\.css)?")


@dataclass(frozen=True, slots=True)
class BlobIndex:
    issued_at: int
    key_id: str
    blobs: dict[str, tuple[bytes, int]]  # name -> (sha256, size)


def build_index(
    blobs: dict[str, tuple[str, int]], signing_key: Ed25519PrivateKey, issued_at: int
) -> bytes:
    """`blobs`: public name (id, or id + .js/.css for SRI copies) -> (sha256 hex, size)."""
    payload = json.dumps(
        {
            "format": INDEX_FORMAT,
            "issued_at": issued_at,
            "blobs": {n: {"sha256": d, "size": z} for n, (d, z) in sorted(blobs.items())},
        },
        separators=(",", ":"),
        sort_keys=True,
    )
    doc = {
        "format": INDEX_FORMAT,
        "alg": "ed25519",
        "key_id": key_id(signing_key.public_key()),
        "payload": payload,
        "signature": b64u(signing_key.sign(INDEX_PURPOSE + payload.encode())),
    }
    return json.dumps(doc, indent=1).encode() + b"\n"


def verify_index(data: bytes, public: Ed25519PublicKey) -> BlobIndex:
    """Check an index's signature (with its purpose), key and entries; VerificationError
    naming what is wrong. No expiry: an id names one content forever, so an entry never goes
    stale; a newer index only adds names (the edge keeps the newest it has seen)."""
    if len(data) > MAX_INDEX_BYTES:
        raise VerificationError(f"blob index: larger than {MAX_INDEX_BYTES} bytes")
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise VerificationError("blob index: not JSON") from None
    if not isinstance(doc, dict):
        raise VerificationError("blob index: not a JSON object")
    if doc.get("format") != INDEX_FORMAT or doc.get("alg") != "ed25519":
        raise VerificationError(f"blob index: format must be {INDEX_FORMAT} with alg ed25519")
    if doc.get("key_id") != key_id(public):
        raise VerificationError(
            f"blob index: signed by key {doc.get('key_id')!r}, expected {key_id(public)}"
        )
    payload = _field(doc, "payload", str, "blob index")
    try:
        public.verify(
            unb64u(_field(doc, "signature", str, "blob index")),
            INDEX_PURPOSE + payload.encode(),
        )
    except InvalidSignature:
        raise VerificationError("blob index: bad signature") from None
    try:
        body = json.loads(payload)
    except (ValueError, RecursionError):
        raise VerificationError("blob index: payload is not JSON") from None
    if not isinstance(body, dict) or body.get("format") != INDEX_FORMAT:
        raise VerificationError("blob index: payload format")
    issued = _field(body, "issued_at", int, "payload")
    blobs: dict[str, tuple[bytes, int]] = {}
    for name, raw in _field(body, "blobs", dict, "payload").items():
        where = f"blob index: blobs[{name!r}]"
        if not _INDEX_NAME.fullmatch(name) or not isinstance(raw, dict):
            raise VerificationError(f"{where}: not a blob name")
        digest, size = raw.get("sha256"), raw.get("size")
        if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
            raise VerificationError(f"{where}.sha256 must be 64 hex digits")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise VerificationError(f"{where}.size must be a non-negative integer")
        blobs[name] = (bytes.fromhex(digest), size)
    return BlobIndex(issued, doc["key_id"], blobs)


# ---------------------------------------------------------------------------- private policy
# Which files of the site are private: the sealer's --private patterns, signed with the
# manifest key (purpose-bound like the index). The origin treats ANY file of source_dir that
# they match as private (sealed or not, added after the last seal or skipped by --skip), not
# only the entries of the last private manifest. Only the origin reads it (never served).
POLICY_FORMAT = "blindfold-private-policy/1"
POLICY_PURPOSE = b"blindfold-private-policy/1\x00"


def build_policy(patterns: list[str], signing_key: Ed25519PrivateKey, issued_at: int) -> bytes:
    payload = json.dumps(
        {"format": POLICY_FORMAT, "issued_at": issued_at, "private": sorted(set(patterns))},
        separators=(",", ":"),
        sort_keys=True,
    )
    doc = {
        "format": POLICY_FORMAT,
        "alg": "ed25519",
        "key_id": key_id(signing_key.public_key()),
        "payload": payload,
        "signature": b64u(signing_key.sign(POLICY_PURPOSE + payload.encode())),
    }
    return json.dumps(doc, indent=1).encode() + b"\n"


def verify_policy(data: bytes, public: Ed25519PublicKey) -> tuple[str, ...]:
    """The private patterns of a signed policy; VerificationError naming what is wrong."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise VerificationError("private policy: not JSON") from None
    if not isinstance(doc, dict) or doc.get("format") != POLICY_FORMAT:
        raise VerificationError(f"private policy: format must be {POLICY_FORMAT}")
    if doc.get("alg") != "ed25519" or doc.get("key_id") != key_id(public):
        raise VerificationError("private policy: signed by another key")
    payload = _field(doc, "payload", str, "private policy")
    try:
        public.verify(
            unb64u(_field(doc, "signature", str, "private policy")),
            POLICY_PURPOSE + payload.encode(),
        )
    except InvalidSignature:
        raise VerificationError("private policy: bad signature") from None
    try:
        body = json.loads(payload)
    except (ValueError, RecursionError):
        raise VerificationError("private policy: payload is not JSON") from None
    if not isinstance(body, dict) or body.get("format") != POLICY_FORMAT:
        raise VerificationError("private policy: payload format")
    patterns = _field(body, "private", list, "payload")
    if not all(isinstance(p, str) and p for p in patterns):
        raise VerificationError("private policy: patterns must be non-empty strings")
    return tuple(patterns)
