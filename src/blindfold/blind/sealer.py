"""`blindfold seal SRC_DIR OUT_DIR`: every regular file under SRC_DIR sealed with RFC 8188
aes128gcm under its own random key, padded to a Padmé size bucket, stored as
OUT_DIR/blobs/<id>, and OUT_DIR/manifest.json signed by the site's Ed25519 key. Files marked
private (`--private GLOB`) go to OUT_DIR/manifest-private.json instead (same key, same format),
which the origin serves only to visitors its application admits; the public manifest names
nothing of them.

Re-sealing is incremental: a file whose bytes did not change keeps its entry (id, key, blob),
so edges keep their cached copies; a changed file gets a new id (and never collides with a
blob an edge may still hold under the old one)."""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import mimetypes
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
)

from blindfold.core import ece, manifest
from blindfold.errors import ConfigError, VerificationError

MANIFEST_NAME = "manifest.json"
PRIVATE_MANIFEST_NAME = "manifest-private.json"
BLOB_INDEX_NAME = "blob-index.json"
SRI_NAME = "sri.json"
PUBLIC_DIR = "public"
SRI_TYPES = {".js": "text/javascript", ".css": "text/css"}
PUBLIC_KEY_NAME = "manifest-public.pem"
BLOBS_DIR = "blobs"
MIN_SECRET_BYTES = 32


@dataclass(frozen=True, slots=True)
class SealOptions:
    record_size: int = ece.DEFAULT_RS
    buckets: Literal["padme", "none"] = "padme"
    expires_in_s: int = 7 * 86400
    max_file_bytes: int = 1 << 30
    skip: tuple[str, ...] = ()  # glob patterns (on the /path or the file name) left unsealed
    # Scripts and stylesheets also published in plaintext for Subresource Integrity (browsers
    # without service workers): the edge can read those copies, but not change them unseen.
    sri: tuple[str, ...] = ()
    # Files only some visitors may see (glob patterns, like skip): their entries go to the
    # private manifest, never to the public one.
    private: tuple[str, ...] = ()
    # Give every private file a new key and id (the old private blobs are removed): a former
    # member who kept the old keys cannot open anything sealed from now on.
    rotate_private: bool = False


@dataclass(slots=True)
class SealReport:
    files: int = 0
    sealed: int = 0
    reused: int = 0
    sri: int = 0
    private: int = 0
    removed: int = 0  # old private blobs removed by --rotate-private
    plain_bytes: int = 0
    sealed_bytes: int = 0
    seconds: float = 0.0

    def line(self) -> str:
        mb = self.plain_bytes / 1e6
        rate = mb / self.seconds if self.seconds > 0 else 0.0
        overhead = (self.sealed_bytes / self.plain_bytes - 1) * 100 if self.plain_bytes else 0.0
        sri = f", {self.sri} published for SRI" if self.sri else ""
        if self.private or self.removed:
            sri += f", {self.private} private"
        if self.removed:
            sri += f" ({self.removed} old private blobs removed)"
        return (
            f"{self.files} files: {self.sealed} sealed, {self.reused} unchanged{sri}; "
            f"{mb:.1f} MB in, {self.sealed_bytes / 1e6:.1f} MB out (+{overhead:.1f}% "
            f"padding and tags) in {self.seconds:.2f} s ({rate:.0f} MB/s)"
        )


def load_signing_key(path: str, *, create: bool = False) -> Ed25519PrivateKey:
    p = Path(path)
    if create and not p.exists():
        key = Ed25519PrivateKey.generate()
        _write_private(p, key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
        return key
    try:
        loaded = load_pem_private_key(p.read_bytes(), None)
    except OSError as exc:
        msg = f"{path}: {exc.strerror} (--create-keys makes one)"
        raise ConfigError("signing_key", msg) from None
    except (ValueError, TypeError) as exc:
        msg = f"{path}: not an unencrypted PEM private key ({exc})"
        raise ConfigError("signing_key", msg) from None
    if not isinstance(loaded, Ed25519PrivateKey):
        raise ConfigError("signing_key", f"{path}: must be an Ed25519 key")
    return loaded


def load_id_secret(path: str, *, create: bool = False) -> bytes:
    p = Path(path)
    if create and not p.exists():
        secret = secrets.token_bytes(MIN_SECRET_BYTES)
        _write_private(p, secret.hex().encode() + b"\n")
        return secret
    try:
        text = p.read_text().strip()
    except OSError as exc:
        msg = f"{path}: {exc.strerror} (--create-keys makes one)"
        raise ConfigError("id_secret", msg) from None
    try:
        secret = bytes.fromhex(text)
    except ValueError:
        raise ConfigError("id_secret", f"{path}: must be hex") from None
    if len(secret) < MIN_SECRET_BYTES:
        raise ConfigError(
            "id_secret",
            f"{path}: at least {MIN_SECRET_BYTES} bytes ({2 * MIN_SECRET_BYTES} hex digits)",
        )
    return secret


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _sha256_file(path: Path) -> str | None:
    try:
        with path.open("rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError:
        return None


def _matches(path: str, name: str, globs: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(path, g) or fnmatch.fnmatchcase(name, g) for g in globs)


def _previous(out: Path, key: Ed25519PrivateKey, name: str) -> dict[str, manifest.Entry]:
    try:
        data = (out / name).read_bytes()
    except FileNotFoundError:
        return {}
    try:
        return manifest.verify(data, key.public_key(), None).files
    except VerificationError:
        return {}  # another key or damaged: seal everything afresh (new ids, see below)


def _files(src: Path, skip: tuple[str, ...]) -> list[tuple[str, Path]]:
    """The files to seal: regular files under `src`, never dotfiles or anything under a
    dot-directory (.git, .env: their keys would be in the public manifest), never a symlink
    that leads outside `src`, never what `skip` names."""
    root_dir = src.resolve()
    found = []
    for root, dirs, names in os.walk(src):  # does not follow directory symlinks
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if name.startswith("."):
                continue
            p = Path(root, name)
            path = "/" + p.relative_to(src).as_posix()
            if _matches(path, name, skip):
                continue
            if p.is_file() and p.resolve().is_relative_to(root_dir):
                found.append((path, p))
    return found


def _previous_index(out: Path, key: Ed25519PrivateKey) -> dict[str, tuple[str, int]]:
    """Names of the last index whose files are still there (same size): old blobs stay
    servable to visitors whose manifest is a little older, and so stay in the index."""
    try:
        index = manifest.verify_index((out / BLOB_INDEX_NAME).read_bytes(), key.public_key())
    except (OSError, VerificationError):
        return {}
    kept = {}
    for name, (digest, size) in index.blobs.items():
        where = out / (PUBLIC_DIR if "." in name else BLOBS_DIR) / name
        try:
            if where.stat().st_size == size:
                kept[name] = (digest.hex(), size)
        except OSError:
            continue
    return kept


def _publish(out: Path, secret: bytes, path: str, data: bytes, digest: str) -> dict[str, str]:
    """A plaintext copy for Subresource Integrity, named like a blob (opaque, by content)."""
    ext = Path(path).suffix.lower()
    if ext not in SRI_TYPES:
        raise ConfigError(
            "sri", f"{path}: only scripts and stylesheets (.js, .css) can be published for SRI"
        )
    name = manifest.blob_id(secret, path, f"sri:{digest}") + ext
    target = out / PUBLIC_DIR / name
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(target, data)
    integrity = "sha384-" + base64.b64encode(hashlib.sha384(data).digest()).decode()
    return {"url_path": f"/p/{name}", "integrity": integrity}


def seal_tree(
    src: str,
    out: str,
    signing_key: Ed25519PrivateKey,
    id_secret: bytes,
    options: SealOptions | None = None,
    now: float | None = None,
) -> SealReport:
    opts = options or SealOptions()
    if not ece.MIN_RS <= opts.record_size <= ece.MAX_RS:
        raise ConfigError("record_size", f"must be in [{ece.MIN_RS}, {ece.MAX_RS}]")
    src_dir, out_dir = Path(src), Path(out)
    if not src_dir.is_dir():
        raise ConfigError("src", f"{src}: not a directory")
    if out_dir.resolve().is_relative_to(src_dir.resolve()):
        raise ConfigError(
            "out",
            f"{out} is inside {src}: the sealed output (its manifest holds "
            "the keys) must not be sealed or served as a page",
        )
    started = time.perf_counter()
    issued = int(time.time() if now is None else now)
    blobs = out_dir / BLOBS_DIR
    blobs.mkdir(parents=True, exist_ok=True)
    previous = _previous(out_dir, signing_key, MANIFEST_NAME)
    previous_private = _previous(out_dir, signing_key, PRIVATE_MANIFEST_NAME)
    index = _previous_index(out_dir, signing_key)
    report = SealReport()
    entries: list[manifest.Entry] = []
    private: list[manifest.Entry] = []
    sri: dict[str, dict[str, str]] = {}
    for path, file in _files(src_dir, opts.skip):
        # private by its path, or by where it really is (a link to a private file)
        real = "/" + file.resolve().relative_to(src_dir.resolve()).as_posix()
        is_private = _matches(path, file.name, opts.private) or _matches(
            real, real.rpartition("/")[2], opts.private
        )
        if is_private and _matches(path, file.name, opts.sri):
            raise ConfigError(
                "private",
                f"{path} is both --private and --sri: an SRI copy is published in plaintext",
            )
        if file.stat().st_size > opts.max_file_bytes:
            raise ConfigError("max_file_bytes", f"{file} is larger than {opts.max_file_bytes}")
        data = file.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        report.files += 1
        report.plain_bytes += len(data)
        if _matches(path, file.name, opts.sri):
            sri[path] = _publish(out_dir, id_secret, path, data, digest)
            index[sri[path]["url_path"].rpartition("/")[2]] = (digest, len(data))
            report.sri += 1
        # An entry is kept only in its own class: a file that was public has a key every
        # visitor may hold, so made private it is sealed afresh (new key, new id).
        old = (previous_private if is_private else previous).get(path)
        if (
            old is not None
            and not (is_private and opts.rotate_private)
            and old.sha256 == digest
            and old.rs == opts.record_size
            and _sha256_file(blobs / old.id) == old.blob_sha256
        ):
            (private if is_private else entries).append(old)
            report.reused += 1
            report.private += is_private
            report.sealed_bytes += old.sealed_size
            continue
        # A new id for new content; the generation skips ids whose blob exists but is not
        # this content's (say, a manifest lost with its blobs kept): an edge may cache those.
        # A private file's id also takes a random nonce: its ids are unlinkable across seals
        # (and rotations), even for the same path and content.
        version = f"private:{digest}:{secrets.token_hex(16)}" if is_private else digest
        gen = 0
        while (blobs / (blob_id := manifest.blob_id(id_secret, path, f"{version}:{gen}"))).exists():
            gen += 1
        key = secrets.token_bytes(ece.KEY_BYTES)
        pad_to = 0
        if opts.buckets == "padme":
            pad_to = ece.padme(ece.sealed_size(len(data), opts.record_size))
        sealed = ece.seal(data, key, rs=opts.record_size, pad_to=pad_to)
        _write_atomic(blobs / blob_id, sealed)
        ctype = mimetypes.guess_type(path)[0] or "application/octet-stream"
        report.private += is_private
        (private if is_private else entries).append(
            manifest.Entry(
                path=path,
                id=blob_id,
                blob_sha256=hashlib.sha256(sealed).hexdigest(),
                sha256=digest,
                type=ctype,
                size=len(data),
                sealed_size=len(sealed),
                rs=opts.record_size,
                key=key,
            )
        )
        report.sealed += 1
        report.sealed_bytes += len(sealed)
    if opts.rotate_private:
        # Old private blobs go: the origin no longer serves them nor lists them in the index,
        # so edges stop serving them (and evict them in time); the old keys open nothing new.
        kept = {e.id for e in private}
        for e in previous_private.values():
            if e.id not in kept and (blobs / e.id).exists():
                (blobs / e.id).unlink()
                index.pop(e.id, None)
                report.removed += 1
    for e in entries + private:
        index[e.id] = (e.blob_sha256, e.sealed_size)
    # The index first: an edge that sees a new manifest's ids finds them in it. It names
    # private blobs too (id, digest, size: what the edge sees anyway), never their paths.
    _write_atomic(out_dir / BLOB_INDEX_NAME, manifest.build_index(index, signing_key, issued))
    if private:
        doc = manifest.build(private, signing_key, issued, issued + opts.expires_in_s)
        _write_atomic(out_dir / PRIVATE_MANIFEST_NAME, doc, 0o640)
    else:
        (out_dir / PRIVATE_MANIFEST_NAME).unlink(missing_ok=True)
    doc = manifest.build(entries, signing_key, issued, issued + opts.expires_in_s)
    _write_atomic(out_dir / MANIFEST_NAME, doc, 0o640)
    public = signing_key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    _write_atomic(out_dir / PUBLIC_KEY_NAME, public)
    _write_atomic(
        out_dir / SRI_NAME,
        json.dumps({"format": "blindfold-sri/1", "files": sri}, indent=1, sort_keys=True).encode()
        + b"\n",
    )
    report.seconds = time.perf_counter() - started
    return report
