"""The signed manifest and the sealer: sign/verify, every way a manifest can be wrong,
incremental re-sealing, opaque ids."""

from __future__ import annotations

import hashlib
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


def _other_first_char(text: str) -> str:
    """`text` with its first character changed (always a change: the old `[:-2] + "AA"` left
    a signature ending in "AA" as it was, one run in 256)."""
    return ("B" if text[0] != "B" else "C") + text[1:]


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
        ("signature", _other_first_char(doc["signature"])),
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


# ---------------------------------------------------------------- the signed blob index
def test_blob_index_round_trip_and_refusals() -> None:
    blobs = {"a" * 32: ("1" * 64, 10), "b" * 32 + ".js": ("2" * 64, 0)}
    data = manifest.build_index(blobs, SK, 1000)
    index = manifest.verify_index(data, PK)
    assert index.issued_at == 1000
    assert index.blobs == {n: (bytes.fromhex(d), z) for n, (d, z) in blobs.items()}
    with pytest.raises(VerificationError, match="signed by key"):
        manifest.verify_index(data, Ed25519PrivateKey.generate().public_key())
    doc = json.loads(data)
    for field, value in (
        ("payload", doc["payload"].replace('"size":10', '"size":11')),
        ("signature", _other_first_char(doc["signature"])),
    ):
        with pytest.raises(VerificationError):
            manifest.verify_index(json.dumps({**doc, field: value}).encode(), PK)
    for name, entry in (("../x", {"sha256": "1" * 64, "size": 1}), ("c" * 32, {"size": -1})):
        bad = json.loads(doc["payload"])
        bad["blobs"][name] = entry
        payload = json.dumps(bad)
        signature = manifest.b64u(SK.sign(manifest.INDEX_PURPOSE + payload.encode()))
        with pytest.raises(VerificationError, match="blobs"):
            manifest.verify_index(
                json.dumps({**doc, "payload": payload, "signature": signature}).encode(), PK
            )


def test_index_and_manifest_signatures_are_not_interchangeable() -> None:
    """The index is signed with a purpose prefix, the manifest without: a signature made for
    one never verifies as the other."""
    payload = json.dumps({"format": manifest.INDEX_FORMAT, "issued_at": 1, "blobs": {}})
    plain = manifest.b64u(SK.sign(payload.encode()))  # as a manifest would be signed
    doc = {
        "format": manifest.INDEX_FORMAT,
        "alg": "ed25519",
        "key_id": manifest.key_id(PK),
        "payload": payload,
        "signature": plain,
    }
    with pytest.raises(VerificationError, match="bad signature"):
        manifest.verify_index(json.dumps(doc).encode(), PK)
    m = json.loads(manifest.build([_entry()], SK, 1000, 2000))
    prefixed = manifest.b64u(SK.sign(manifest.INDEX_PURPOSE + m["payload"].encode()))
    with pytest.raises(VerificationError, match="bad signature"):
        manifest.verify(json.dumps({**m, "signature": prefixed}).encode(), PK, 1500)


def test_seal_writes_the_index_of_every_servable_blob(tmp_path: Path) -> None:
    src, out = _tree(tmp_path), tmp_path / "out"
    (src / "app.js").write_text("window.x = 1;\n")
    sealer.seal_tree(str(src), str(out), SK, SECRET, sealer.SealOptions(sri=("*.js",)), now=1000)
    first = manifest.verify((out / "manifest.json").read_bytes(), PK, 1001).files
    index = manifest.verify_index((out / sealer.BLOB_INDEX_NAME).read_bytes(), PK)
    for e in first.values():
        blob = (out / "blobs" / e.id).read_bytes()
        assert index.blobs[e.id] == (hashlib.sha256(blob).digest(), len(blob))
    [copy] = [n for n in index.blobs if n.endswith(".js")]
    assert index.blobs[copy][0] == hashlib.sha256((out / "public" / copy).read_bytes()).digest()
    # Re-sealed after a change: the old blob (still on disk) stays listed for visitors whose
    # manifest is a little older; one whose file is gone is not.
    (src / "index.html").write_text("<p>changed</p>")
    sealer.seal_tree(str(src), str(out), SK, SECRET, sealer.SealOptions(sri=("*.js",)), now=2000)
    second = manifest.verify((out / "manifest.json").read_bytes(), PK, 2001).files
    index = manifest.verify_index((out / sealer.BLOB_INDEX_NAME).read_bytes(), PK)
    old_id, new_id = first["/index.html"].id, second["/index.html"].id
    assert old_id != new_id and {old_id, new_id} <= set(index.blobs)
    (out / "blobs" / old_id).unlink()
    sealer.seal_tree(str(src), str(out), SK, SECRET, sealer.SealOptions(sri=("*.js",)), now=3000)
    index = manifest.verify_index((out / sealer.BLOB_INDEX_NAME).read_bytes(), PK)
    assert old_id not in index.blobs and new_id in index.blobs and index.issued_at == 3000
