"""`blindfold seal --private`: private files only in the private manifest (same key, same
format), nothing of them in the public one; `--rotate-private` gives them new keys and ids."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from blindfold.blind import sealer
from blindfold.core import ece, manifest
from blindfold.errors import ConfigError

SK = Ed25519PrivateKey.generate()
PK = SK.public_key()
SECRET = b"s" * 32
PRIVATE = sealer.SealOptions(record_size=4096, private=("/members/*",))


def _tree(tmp: Path) -> Path:
    src = tmp / "src"
    (src / "members").mkdir(parents=True)
    (src / "index.html").write_text("<p>hello</p>")
    (src / "logo.png").write_bytes(os.urandom(3000))
    (src / "members" / "report.pdf").write_bytes(b"PRIVATE-REPORT" + os.urandom(50_000))
    (src / "members" / "photo.png").write_bytes(os.urandom(20_000))
    return src


def _manifests(out: Path, now: float) -> tuple[manifest.Manifest, manifest.Manifest]:
    public = manifest.verify((out / "manifest.json").read_bytes(), PK, now)
    private = manifest.verify((out / "manifest-private.json").read_bytes(), PK, now)
    return public, private


def test_private_files_are_only_in_the_private_manifest(tmp_path: Path) -> None:
    src, out = _tree(tmp_path), tmp_path / "out"
    report = sealer.seal_tree(str(src), str(out), SK, SECRET, PRIVATE, now=1000)
    assert (report.files, report.sealed, report.private) == (4, 4, 2)
    public, private = _manifests(out, 1001)
    assert set(public.files) == {"/index.html", "/logo.png"}
    assert set(private.files) == {"/members/report.pdf", "/members/photo.png"}
    # The public manifest holds no path, id or key of a private file, in any form.
    text = (out / "manifest.json").read_bytes()
    for e in private.files.values():
        for secret in (e.path, e.id, manifest.b64u(e.key), e.sha256, e.blob_sha256):
            assert secret.encode() not in text, secret
        blob = (out / "blobs" / e.id).read_bytes()
        assert ece.open_all(blob, e.key) == (src / e.path.lstrip("/")).read_bytes()
    # The blob index (what edges get) lists the private blobs by id and size, no path/key.
    index = manifest.verify_index((out / "blob-index.json").read_bytes(), PK)
    index_text = (out / "blob-index.json").read_bytes()
    for e in private.files.values():
        assert index.blobs[e.id] == (bytes.fromhex(e.blob_sha256), e.sealed_size)
        assert e.path.encode() not in index_text and manifest.b64u(e.key).encode() not in index_text
    assert (out / "manifest-private.json").stat().st_mode & 0o777 == 0o640


def test_reseal_keeps_private_entries_and_rotation_replaces_them(tmp_path: Path) -> None:
    src, out = _tree(tmp_path), tmp_path / "out"
    sealer.seal_tree(str(src), str(out), SK, SECRET, PRIVATE, now=1000)
    _, first = _manifests(out, 1001)
    report = sealer.seal_tree(str(src), str(out), SK, SECRET, PRIVATE, now=2000)
    assert (report.sealed, report.reused) == (0, 4)
    public_before, second = _manifests(out, 2001)
    assert second.files == first.files  # unchanged: edges keep their copies
    rotate = sealer.SealOptions(record_size=4096, private=PRIVATE.private, rotate_private=True)
    report = sealer.seal_tree(str(src), str(out), SK, SECRET, rotate, now=3000)
    assert (report.sealed, report.reused, report.removed) == (2, 2, 2)
    public, third = _manifests(out, 3001)
    assert public.files == public_before.files  # public files are not touched
    index = manifest.verify_index((out / "blob-index.json").read_bytes(), PK)
    for path, old in second.files.items():
        new = third.files[path]
        assert new.id != old.id and new.key != old.key
        # the old blob is gone from the store and the index: the origin serves it no more
        assert not (out / "blobs" / old.id).exists() and old.id not in index.blobs
        # and the old key opens nothing new
        blob = (out / "blobs" / new.id).read_bytes()
        with pytest.raises(Exception):  # noqa: B017 - any failure to open is the point
            ece.open_all(blob, old.key)
        assert ece.open_all(blob, new.key) == (src / path.lstrip("/")).read_bytes()


def test_a_file_made_private_gets_a_new_key_and_one_made_public_drops_out(
    tmp_path: Path,
) -> None:
    src, out = _tree(tmp_path), tmp_path / "out"
    sealer.seal_tree(str(src), str(out), SK, SECRET, sealer.SealOptions(record_size=4096), now=1)
    was_public = manifest.verify((out / "manifest.json").read_bytes(), PK, 2).files
    assert not (out / "manifest-private.json").exists()
    sealer.seal_tree(str(src), str(out), SK, SECRET, PRIVATE, now=10)
    public, private = _manifests(out, 11)
    for path, e in private.files.items():
        # its old key was in the public manifest: every visitor may hold it
        assert e.key != was_public[path].key and e.id != was_public[path].id
    assert "/members/report.pdf" not in public.files
    # No private files any more: no private manifest left behind.
    sealer.seal_tree(str(src), str(out), SK, SECRET, sealer.SealOptions(record_size=4096), now=20)
    assert not (out / "manifest-private.json").exists()
    again = manifest.verify((out / "manifest.json").read_bytes(), PK, 21).files
    assert "/members/report.pdf" in again
    assert again["/members/report.pdf"].key != private.files["/members/report.pdf"].key


def test_private_and_sri_together_are_refused(tmp_path: Path) -> None:
    src = _tree(tmp_path)
    (src / "members" / "app.js").write_text("secret()")
    opts = sealer.SealOptions(private=("/members/*",), sri=("*.js",))
    with pytest.raises(ConfigError) as err:
        sealer.seal_tree(str(src), str(tmp_path / "out"), SK, SECRET, opts, now=1)
    assert err.value.key == "private" and "/members/app.js" in str(err.value)
    assert not (tmp_path / "out" / "public").exists()


def test_private_ids_are_unlinkable_across_seals(tmp_path: Path) -> None:
    """Two stores sealed from the same tree and secret: public ids agree (by design: same
    path, same content), private ids do not (a random nonce)."""
    src = _tree(tmp_path)
    for name in ("a", "b"):
        sealer.seal_tree(str(src), str(tmp_path / name), SK, SECRET, PRIVATE, now=1)
    pa, qa = _manifests(tmp_path / "a", 2)
    pb, qb = _manifests(tmp_path / "b", 2)
    assert {e.id for e in pa.files.values()} == {e.id for e in pb.files.values()}
    assert not {e.id for e in qa.files.values()} & {e.id for e in qb.files.values()}
    assert json.loads((tmp_path / "a" / "manifest-private.json").read_text())["format"] == (
        manifest.FORMAT
    )


def test_a_link_to_a_private_file_is_private(tmp_path: Path) -> None:
    src = _tree(tmp_path)
    (src / "shared.pdf").symlink_to(src / "members" / "report.pdf")
    sealer.seal_tree(str(src), str(tmp_path / "out"), SK, SECRET, PRIVATE, now=1)
    public, private = _manifests(tmp_path / "out", 2)
    assert "/shared.pdf" in private.files and "/shared.pdf" not in public.files
