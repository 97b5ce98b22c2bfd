"""The key server's hash-chained audit log."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from blindfold.cli.main import main
from blindfold.keyserver.audit import AuditLog, verify


def make(path: Path, n: int) -> None:
    log = AuditLog(str(path))
    for i in range(n):
        log.append(
            edge="e1",
            hostname="example.test",
            client=f"192.0.2.{i}",
            scheme="0x0403",
            key="k",
            transcript_hash="00" * 32,
        )
    log.close()


def test_chain_verifies_and_continues(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    make(path, 5)
    make(path, 3)  # a restart continues the chain
    result = verify(str(path))
    assert result.ok and result.entries == 8
    lines = path.read_text().splitlines()
    assert json.loads(lines[5])["prev"] == json.loads(lines[4])["hash"]


@pytest.mark.parametrize("tamper", ["edit", "delete", "insert", "reorder"])
def test_tampering_is_found_at_its_line(tmp_path: Path, tamper: str) -> None:
    path = tmp_path / "audit.log"
    make(path, 6)
    lines = path.read_text().splitlines()
    if tamper == "edit":
        entry = json.loads(lines[2])
        entry["client"] = "203.0.113.66"
        lines[2] = json.dumps(entry, separators=(",", ":"))
        expected = 3
    elif tamper == "delete":
        del lines[2]
        expected = 3
    elif tamper == "insert":
        lines.insert(2, lines[1])
        expected = 3
    else:
        lines[2], lines[3] = lines[3], lines[2]
        expected = 3
    path.write_text("\n".join(lines) + "\n")
    result = verify(str(path))
    assert not result.ok and result.line == expected
    assert main(["audit", "verify", str(path)]) == 1


def test_cli_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "audit.log"
    make(path, 2)
    assert main(["audit", "verify", str(path)]) == 0
    assert "ok: 2 entries" in capsys.readouterr().out


def test_refuses_to_continue_a_broken_tail(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    make(path, 2)
    path.write_text(path.read_text().replace("192.0.2.1", "192.0.2.9"))
    with pytest.raises(ValueError, match="cannot continue"):
        AuditLog(str(path))
