"""The signed manifest and the sealer: sign/verify, every way a manifest can be wrong,
incremental re-sealing, opaque ids."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from blindfold.blind import sealer
from blindfold.core import ece, manifest
from blindfold.errors import ConfigError, VerificationError

SK = Ed25519PrivateKey.generate()
PK = SK.public_key()
SECRET = b"s" * 32


def _entry(path: str = "/a.js", size: int = 10) -> manifest.Entry:
    return manifest.Entry(
        path=path,
        id="0" * 32,
        blob_sha256="1" * 64,
        sha256="2" * 64,
        type="text/javascript",
        size=size,
        sealed_size=ece.sealed_size(size, 4096),
        rs=4096,
        key=b"k" * 16,
    )


def test_round_trip() -> None:
    data = manifest.build([_entry(), _entry("/b.css")], SK, 1000, 2000)
    m = manifest.verify(data, PK, 1500)
    assert set(m.files) == {"/a.js", "/b.css"} and m.files["/a.js"] == _entry()
    assert (m.issued_at, m.expires_at) == (1000, 2000)


def test_expiry_future_and_wrong_key() -> None:
    data = manifest.build([_entry()], SK, 1000, 2000)
    with pytest.raises(VerificationError, match="expired"):
        manifest.verify(data, PK, 2000)
    with pytest.raises(VerificationError, match="future"):
        manifest.verify(data, PK, 1000 - manifest.ALLOWED_SKEW_S - 1)
    with pytest.raises(VerificationError, match="signed by key"):
        manifest.verify(data, Ed25519PrivateKey.generate().public_key(), 1500)


def test_a_changed_payload_or_signature_is_refused() -> None:
    doc = json.loads(manifest.build([_entry()], SK, 1000, 2000))
    for field, value in (
        ("payload", doc["payload"].replace('"size":10', '"size":11')),
        ("signature", doc["signature"][:-2] + "AA"),
        ("format", "blindfold-manifest/0"),
        ("alg", "rsa"),
    ):
        bad = dict(doc, **{field: value})
        with pytest.raises(VerificationError):
            manifest.verify(json.dumps(bad).encode(), PK, 1500)


@given(st.binary(max_size=400))
def test_garbage_is_a_verification_error(data: bytes) -> None:
    with pytest.raises(VerificationError):
        manifest.verify(data, PK, 1500)


@given(st.data())
def test_any_byte_change_is_refused(draw: st.DataObject) -> None:
    data = bytearray(manifest.build([_entry()], SK, 1000, 2000))
    i = draw.draw(st.integers(min_value=0, max_value=len(data) - 1))
    new = draw.draw(st.integers(min_value=0, max_value=255).filter(lambda b: b != data[i]))
    data[i] = new
    try:
        m = manifest.verify(bytes(data), PK, 1500)
    except VerificationError:
        return
    # JSON whitespace outside the signed payload may change; the content may not.
    assert m.files == {"/a.js": _entry()}


def test_signed_but_malformed_entries_are_refused() -> None:
    for bad in (
        {"id": "zz"},
        {"key": "AAAA"},
        {"rs": 5},
        {"size": -1},
        {"sha256": "x"},
        {"sealed_size": 1},
    ):
        raw = dict(_entry().to_json(), **bad)
        payload = json.dumps(
            {"format": manifest.FORMAT, "issued_at": 1, "expires_at": 9 << 40, "files": {"/a": raw}}
        )
        doc = {
            "format": manifest.FORMAT,
            "alg": "ed25519",
            "key_id": manifest.key_id(PK),
            "payload": payload,
            "signature": manifest.b64u(SK.sign(payload.encode())),
        }
        with pytest.raises(VerificationError):
            manifest.verify(json.dumps(doc).encode(), PK, 1500)


def test_blob_ids_are_opaque_and_stable() -> None:
    a = manifest.blob_id(SECRET, "/a.js", "v1")
    assert a == manifest.blob_id(SECRET, "/a.js", "v1") and len(a) == 32
    assert a != manifest.blob_id(SECRET, "/a.js", "v2")
    assert a != manifest.blob_id(SECRET, "/b.js", "v1")
    assert a != manifest.blob_id(b"t" * 32, "/a.js", "v1")


def _tree(tmp: Path) -> Path:
    src = tmp / "src"
    (src / "sub").mkdir(parents=True)
    (src / "index.html").write_text("<p>hello</p>")
    (src / "sub" / "data.bin").write_bytes(os.urandom(100_000))
    (src / "empty.txt").write_bytes(b"")
    return src


def test_seal_tree_then_open_every_blob(tmp_path: Path) -> None:
    src = _tree(tmp_path)
    report = sealer.seal_tree(
        str(src), str(tmp_path / "out"), SK, SECRET, sealer.SealOptions(record_size=4096), now=1000
    )
    assert (report.files, report.sealed, report.reused) == (3, 3, 0)
    m = manifest.verify((tmp_path / "out" / "manifest.json").read_bytes(), PK, 1001)
    assert set(m.files) == {"/index.html", "/sub/data.bin", "/empty.txt"}
    assert m.files["/index.html"].type == "text/html"
    for path, e in m.files.items():
        blob = (tmp_path / "out" / "blobs" / e.id).read_bytes()
        assert len(blob) == e.sealed_size == ece.padme(ece.sealed_size(e.size, 4096))
        assert ece.open_all(blob, e.key) == (src / path.lstrip("/")).read_bytes()
        assert path.encode() not in blob
    # Each file has its own key.
    assert len({e.key for e in m.files.values()}) == 3


def test_reseal_keeps_unchanged_and_renames_changed(tmp_path: Path) -> None:
    src, out = _tree(tmp_path), tmp_path / "out"
    sealer.seal_tree(str(src), str(out), SK, SECRET, now=1000)
    first = manifest.verify((out / "manifest.json").read_bytes(), PK, 1001).files
    (src / "index.html").write_text("<p>changed</p>")
    report = sealer.seal_tree(str(src), str(out), SK, SECRET, now=2000)
    assert (report.sealed, report.reused) == (1, 2)
    second = manifest.verify((out / "manifest.json").read_bytes(), PK, 2001).files
    assert second["/sub/data.bin"] == first["/sub/data.bin"]
    assert second["/index.html"].id != first["/index.html"].id
    # The manifest lost, the blobs kept: ids of existing blobs are not reused for new keys.
    (out / "manifest.json").unlink()
    sealer.seal_tree(str(src), str(out), SK, SECRET, now=3000)
    third = manifest.verify((out / "manifest.json").read_bytes(), PK, 3001).files
    assert all(third[p].id != second[p].id for p in third)
    for e in third.values():
        assert ece.open_all((out / "blobs" / e.id).read_bytes(), e.key) is not None


def test_key_files(tmp_path: Path) -> None:
    key = sealer.load_signing_key(str(tmp_path / "k.pem"), create=True)
    assert (tmp_path / "k.pem").stat().st_mode & 0o777 == 0o600
    again = sealer.load_signing_key(str(tmp_path / "k.pem"))
    assert manifest.key_id(key.public_key()) == manifest.key_id(again.public_key())
    with pytest.raises(ConfigError, match="signing_key"):
        sealer.load_signing_key(str(tmp_path / "missing.pem"))
    (tmp_path / "short").write_text("abcd\n")
    with pytest.raises(ConfigError, match="at least 32 bytes"):
        sealer.load_id_secret(str(tmp_path / "short"))
    secret = sealer.load_id_secret(str(tmp_path / "s"), create=True)
    assert sealer.load_id_secret(str(tmp_path / "s")) == secret


def test_dotfiles_and_links_out_of_the_tree_are_never_sealed(tmp_path: Path) -> None:
    src = _tree(tmp_path)
    (src / ".env").write_text("DB_PASSWORD=hunter2")
    (src / ".git").mkdir()
    (src / ".git" / "config").write_text("[core]")
    outside = tmp_path / "outside.txt"
    outside.write_text("secret")
    (src / "link.txt").symlink_to(outside)
    (src / "inside-link.html").symlink_to(src / "index.html")
    sealer.seal_tree(str(src), str(tmp_path / "out"), SK, SECRET, now=1000)
    files = manifest.verify((tmp_path / "out" / "manifest.json").read_bytes(), PK, 1001).files
    assert set(files) == {"/index.html", "/sub/data.bin", "/empty.txt", "/inside-link.html"}
    with pytest.raises(ConfigError, match="inside"):
        sealer.seal_tree(str(src), str(src / "sealed"), SK, SECRET, now=1000)
