"""The key server's keyed, hash-chained audit log: tampering is found without trusting the
file, a line cut by a crash is recovered, and `blindfold audit verify --key` checks it."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from pathlib import Path

import pytest

from blindfold.cli.main import main
from blindfold.core import keyless_handshake as kh
from blindfold.keyserver.audit import (
    GENESIS,
    AuditError,
    AuditLog,
    create_key,
    json_str,
    load_key,
    verify,
)
from blindfold.keyserver.server import _verified, signed_entry

KEY = bytes(range(32))


def make(path: Path, n: int, key: bytes = KEY) -> None:
    log = AuditLog(str(path), key)
    for i in range(n):
        log.append(
            event="signed",
            edge="e1",
            key="k",
            verified={"sni": "example.test", "client_random": f"{i:064x}"},
            claimed={"client": f"192.0.2.{i}"},
        )
    log.close()


def key_file(tmp_path: Path, key: bytes = KEY) -> Path:
    path = tmp_path / "audit.key"
    path.write_text(key.hex() + "\n")
    path.chmod(0o600)
    return path


def test_chain_verifies_and_continues(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    make(path, 5)
    make(path, 3)  # a restart continues the chain
    result = verify(str(path), KEY)
    assert result.ok and result.entries == 8
    lines = path.read_text().splitlines()
    assert json.loads(lines[5])["prev"] == json.loads(lines[4])["mac"]
    assert json.loads(lines[0])["prev"] == GENESIS


def _rechain(lines: list[str], key: bytes, prev: str = GENESIS) -> list[str]:
    """Rewrite the lines' prev and MAC with `key`, the way the key server writes them."""
    out = []
    for line in lines:
        entry = json.loads(line)
        entry.pop("mac")
        entry["prev"] = prev
        body = json.dumps(entry, separators=(",", ":")).encode()
        prev = hmac.new(key, body, hashlib.sha256).hexdigest()
        out.append(body[:-1].decode() + f',"mac":"{prev}"}}')
    return out


def test_a_rewritten_line_with_a_recomputed_chain_is_found(tmp_path: Path) -> None:
    """Finding 9: someone who can rewrite the file changes a line and recomputes the chain
    from it on. Without the key the MACs cannot be right: the changed line is named."""
    path = tmp_path / "audit.log"
    make(path, 6)
    lines = path.read_text().splitlines()
    entry = json.loads(lines[2])
    entry["claimed"]["client"] = "203.0.113.66"
    lines[2] = json.dumps(entry, separators=(",", ":"))
    prev = json.loads(lines[1])["mac"]
    path.write_text("\n".join(lines[:2] + _rechain(lines[2:], os.urandom(32), prev)) + "\n")
    result = verify(str(path), KEY)
    assert not result.ok and result.line == 3 and "MAC" in result.problem
    # who holds the key can rewrite it (docs/keyless-protocol.md says who can forge what)
    path.write_text("\n".join(lines[:2] + _rechain(lines[2:], KEY, prev)) + "\n")
    assert verify(str(path), KEY).ok


@pytest.mark.parametrize("tamper", ["edit", "delete", "insert", "reorder"])
def test_tampering_is_found_at_its_line(tmp_path: Path, tamper: str) -> None:
    path = tmp_path / "audit.log"
    make(path, 6)
    lines = path.read_text().splitlines()
    if tamper == "edit":
        lines[2] = lines[2].replace("192.0.2.2", "192.0.2.9")
    elif tamper == "delete":
        del lines[2]
    elif tamper == "insert":
        lines.insert(2, lines[1])
    else:
        lines[2], lines[3] = lines[3], lines[2]
    path.write_text("\n".join(lines) + "\n")
    result = verify(str(path), KEY)
    assert not result.ok and result.line == 3
    assert main(["audit", "verify", "--key", str(key_file(tmp_path)), str(path)]) == 1


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "audit.log"
    make(path, 2)
    key = key_file(tmp_path)
    assert main(["audit", "verify", "--key", str(key), str(path)]) == 0
    out = capsys.readouterr().out
    assert "ok: 2 entries" in out and json.loads(path.read_text().splitlines()[1])["mac"] in out
    other = tmp_path / "other.key"
    other.write_text(os.urandom(32).hex())
    other.chmod(0o600)
    assert main(["audit", "verify", "--key", str(other), str(path)]) == 1  # another key
    key.chmod(0o644)
    assert main(["audit", "verify", "--key", str(key), str(path)]) == 2
    assert "chmod 600" in capsys.readouterr().err


def test_a_line_cut_by_a_crash_is_recovered_and_recorded(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    make(path, 3)
    data = path.read_bytes()
    cut = data[:-20]  # killed in the middle of writing the last line
    path.write_bytes(cut)
    assert verify(str(path), KEY).partial_tail == len(cut) - cut.rfind(b"\n") - 1
    log = AuditLog(str(path), KEY)
    assert log.recovered and log.seq == 3
    log.close()
    result = verify(str(path), KEY)
    assert result.ok and result.entries == 3 and result.partial_tail == 0
    last = json.loads(path.read_text().splitlines()[-1])
    lost = cut[cut.rfind(b"\n") + 1 :]
    assert last["event"] == "recovered" and last["cut_bytes"] == len(lost)
    assert last["cut_sha256"] == hashlib.sha256(lost).hexdigest()


def test_refuses_to_continue_a_tampered_log(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    make(path, 4)
    path.write_text(path.read_text().replace("192.0.2.1", "192.0.2.9"))
    with pytest.raises(AuditError, match="line 2"):
        AuditLog(str(path), KEY)
    with pytest.raises(AuditError, match="line 1"):  # an unkeyed (version 1) log
        p1 = tmp_path / "v1.log"
        p1.write_text('{"seq":1,"prev":"' + GENESIS + '","hash":"' + "ab" * 32 + '"}\n')
        AuditLog(str(p1), KEY)


def test_keys(tmp_path: Path) -> None:
    path = str(tmp_path / "k")
    key = create_key(path)
    assert load_key(path) == key and len(key) == 32
    assert os.stat(path).st_mode & 0o777 == 0o600
    with pytest.raises(AuditError, match="cannot create"):
        create_key(path)  # never overwritten
    Path(path).write_text("abcd")
    with pytest.raises(AuditError, match="at least 32"):
        load_key(path)
    Path(path).write_text("zz" * 32)
    with pytest.raises(AuditError, match="not hex"):
        load_key(path)


@pytest.mark.parametrize("repeat", [False, True])
def test_the_key_servers_own_formatting_is_the_generic_entry(tmp_path: Path, repeat: bool) -> None:
    hs = kh.Handshake(
        'we"ird\\.example',  # never a valid SNI, but escaping must hold anyway
        bytes(range(32)),
        0x1302,
        0x001D,
        "h2",
        (0x0403,),
        bytes(32),
        bytes(range(48)),
    )
    fast, generic = AuditLog(str(tmp_path / "a"), KEY), AuditLog(str(tmp_path / "b"), KEY)
    fast.append_json(signed_entry(json_str("edge\u00e9"), 'k"1', hs, 0x0804, "::1", repeat))
    generic.append(
        event="signed",
        edge="edge\u00e9",
        key='k"1',
        verified={**_verified(hs), "scheme": "0x0804"},
        claimed={"client": "::1"},
        **({"repeat": True} if repeat else {}),
    )
    fast.close()
    generic.close()
    a, b = (json.loads((tmp_path / n).read_text()) for n in "ab")
    assert {k: v for k, v in a.items() if k not in ("ts", "mac")} == {
        k: v for k, v in b.items() if k not in ("ts", "mac")
    }
    assert verify(str(tmp_path / "a"), KEY).ok
