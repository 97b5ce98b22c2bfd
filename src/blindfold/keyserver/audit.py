"""A hash-chained, append-only audit log of every signature.

Each line is a JSON object with `seq`, `prev` (the previous line's hash) and `hash` (SHA-256
over the canonical JSON of the line without `hash`). Changing, inserting or removing a line
breaks the chain at that point; `verify` names the first broken line. Cutting lines off the
end is only visible against a copy of the last hash kept elsewhere (`verify` prints it).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from typing import Any

GENESIS = "0" * 64


def _digest(entry: dict[str, Any]) -> str:
    body = {k: v for k, v in entry.items() if k != "hash"}
    return hashlib.sha256(
        json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()


@dataclass(frozen=True, slots=True)
class VerifyResult:
    ok: bool
    entries: int
    last_hash: str
    line: int = 0  # first broken line (1-based) when not ok
    problem: str = ""


def verify(path: str) -> VerifyResult:
    prev, seq, n, last = GENESIS, 0, 0, GENESIS
    with open(path, "rb") as fh:
        for n, raw in enumerate(fh, 1):
            try:
                entry = json.loads(raw)
            except ValueError:
                return VerifyResult(False, n - 1, last, n, "not a JSON object")
            if not isinstance(entry, dict):
                return VerifyResult(False, n - 1, last, n, "not a JSON object")
            if entry.get("prev") != prev:
                return VerifyResult(
                    False,
                    n - 1,
                    last,
                    n,
                    "prev does not match the previous line's hash "
                    "(a line was changed, removed or inserted before it)",
                )
            if entry.get("seq") != seq + 1:
                return VerifyResult(False, n - 1, last, n, f"seq {entry.get('seq')} after {seq}")
            if entry.get("hash") != _digest(entry):
                return VerifyResult(
                    False,
                    n - 1,
                    last,
                    n,
                    "hash does not match the line's content (the line was changed)",
                )
            prev = last = entry["hash"]
            seq += 1
    return VerifyResult(True, seq, last)


class AuditLog:
    """Appends entries; continues the chain of an existing file (checking its last line)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.prev = GENESIS
        self.seq = 0
        if os.path.exists(path) and os.path.getsize(path) > 0:
            last = _last_line(path)
            try:
                entry = json.loads(last)
                if entry.get("hash") != _digest(entry):
                    raise ValueError("last line does not hash to itself")
                self.prev, self.seq = entry["hash"], int(entry["seq"])
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}: cannot continue the audit chain: {exc}") from None
        self._fh = open(path, "ab")  # noqa: SIM115 - held for the process lifetime
        self._pending: list[bytes] = []
        self._last_sync = time.monotonic()

    def append(self, **fields: Any) -> None:
        self.seq += 1
        entry: dict[str, Any] = {
            "seq": self.seq,
            "ts": round(time.time(), 6),
            **fields,
            "prev": self.prev,
        }
        entry["hash"] = _digest(entry)
        self.prev = entry["hash"]
        self._pending.append(json.dumps(entry, separators=(",", ":")).encode() + b"\n")

    def flush(self, fsync_every_s: float = 1.0) -> None:
        """Write what was appended (one write per batch of requests); fsync at most once per
        `fsync_every_s` so a burst of signatures costs one disk flush."""
        if self._pending:
            self._fh.write(b"".join(self._pending))
            self._pending.clear()
            self._fh.flush()
        now = time.monotonic()
        if now - self._last_sync >= fsync_every_s:
            os.fsync(self._fh.fileno())
            self._last_sync = now

    def close(self) -> None:
        self.flush(0)
        self._fh.close()


def _last_line(path: str) -> bytes:
    with open(path, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        size = fh.tell()
        block = min(size, 65536)
        fh.seek(size - block)
        data = fh.read().rstrip(b"\n")
        return data.rsplit(b"\n", 1)[-1]
