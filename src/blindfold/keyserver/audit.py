"""A keyed, hash-chained, append-only audit log of every signature and refusal.

Each line is a JSON object: `seq` (1, 2, ...), `ts`, the entry's fields, `prev` (the previous
line's `mac`; 64 zeros for the first) and last `mac` = HMAC-SHA256(audit key, the line's
bytes up to the `,"mac":` that ends it, with `}` appended). The key is a separate file (0600,
`keyserver.audit_key`) that whoever can read or rewrite the log must not have: without it no
line can be changed, inserted, removed or reordered without `verify` naming the first bad line.
With it (the key server itself, root on its host) everything can be rewritten: docs/
keyless-protocol.md says who can forge what. Cutting whole lines off the end leaves a valid
shorter chain; the key server logs its last `seq` and `mac` to its own log at start and stop,
a copy kept elsewhere to compare with.

At start the whole chain is verified. A last line without its newline is what a key server
killed in mid-write leaves; it was never acknowledged (entries are written before the reply
leaves), so it is cut, and a `recovered` entry records how many bytes were cut and their hash.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import stat
import time
from dataclasses import dataclass
from typing import Any

GENESIS = "0" * 64
_ENCODE = json.JSONEncoder(separators=(",", ":")).encode
json_str = json.encoder.encode_basestring_ascii  # a str as a JSON string (C, escapes all)
_MAC_TAIL = len(',"mac":""}') + 64  # bytes after the MAC'd part of a line (without "\n")
_MAC_SEP = b',"mac":"'


class AuditError(Exception):
    """The audit log or its key cannot be used; the message says which and why."""


def load_key(path: str) -> bytes:
    """The audit key: hex, at least 32 bytes, readable by its owner only."""
    try:
        st = os.stat(path)
        text = open(path, encoding="ascii").read().strip()  # noqa: SIM115 - small file
    except (OSError, UnicodeDecodeError) as exc:
        raise AuditError(f"cannot read the audit key {path}: {exc}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise AuditError(
            f"the audit key {path} is open to group or others (mode "
            f"{stat.S_IMODE(st.st_mode):o}): chmod 600 {path}"
        )
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise AuditError(f"the audit key {path} is not hex") from None
    if len(key) < 32:
        raise AuditError(f"the audit key {path} has {len(key)} bytes (at least 32)")
    return key


def create_key(path: str) -> bytes:
    """A new random audit key in a new file (0600); refuses to overwrite one."""
    key = os.urandom(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise AuditError(f"cannot create the audit key {path}: {exc.strerror}") from None
    with os.fdopen(fd, "w") as fh:
        fh.write(key.hex() + "\n")
    return key


def _mac(key: bytes, body: bytes) -> str:
    return hmac.new(key, body, hashlib.sha256).hexdigest()


@dataclass(frozen=True, slots=True)
class VerifyResult:
    ok: bool
    entries: int
    last_mac: str
    line: int = 0  # first bad line (1-based) when not ok
    problem: str = ""
    partial_tail: int = 0  # bytes after the last newline (a line cut by a crash)


def _check_line(key: bytes, raw: bytes, prev: str, seq: int) -> tuple[str | None, str]:
    """(problem or None, mac) of one line (without its newline)."""
    cut = len(raw) - _MAC_TAIL
    if cut < 2 or raw[cut : cut + len(_MAC_SEP)] != _MAC_SEP or not raw.endswith(b'"}'):
        return "no MAC at the end of the line (not written by a key server with a key)", ""
    mac = raw[cut + len(_MAC_SEP) : -2].decode("ascii", "replace")
    if not hmac.compare_digest(_mac(key, raw[:cut] + b"}"), mac):
        return "the MAC does not match (the line was changed, or another key wrote it)", ""
    try:
        entry = json.loads(raw)
    except ValueError:
        return "not a JSON object", ""
    if entry.get("prev") != prev:
        return (
            "prev is not the previous line's MAC (a line was removed, inserted or moved before it)",
            "",
        )
    if entry.get("seq") != seq + 1:
        return f"seq {entry.get('seq')} after {seq}", ""
    return None, mac


def verify(path: str, key: bytes) -> VerifyResult:
    """Check every line's MAC, sequence and link. A partial last line (no newline) is
    reported in `partial_tail` and does not make the result bad: it was never acknowledged."""
    prev, seq = GENESIS, 0
    with open(path, "rb") as fh:
        for n, raw in enumerate(fh, 1):
            if not raw.endswith(b"\n"):
                return VerifyResult(True, seq, prev, partial_tail=len(raw))
            problem, mac = _check_line(key, raw[:-1], prev, seq)
            if problem is not None:
                return VerifyResult(False, seq, prev, n, problem)
            prev, seq = mac, seq + 1
    return VerifyResult(True, seq, prev)


class AuditLog:
    """Verifies the existing chain, recovers a cut last line, then appends entries."""

    def __init__(self, path: str, key: bytes) -> None:
        self.path = path
        self._key = key
        self.prev = GENESIS
        self.seq = 0
        self.recovered = 0
        self._cut_hash = ""
        if os.path.exists(path) and os.path.getsize(path) > 0:
            try:
                result = verify(path, key)
            except OSError as exc:
                raise AuditError(f"cannot read the audit log {path}: {exc.strerror}") from None
            if not result.ok:
                raise AuditError(
                    f"the audit log {path} does not verify at line {result.line}: "
                    f"{result.problem}. Keep it as evidence and move it aside to start a new one."
                )
            self.prev, self.seq = result.last_mac, result.entries
            if result.partial_tail:
                self._cut_tail(result.partial_tail)
        self._fh = open(path, "ab")  # noqa: SIM115 - held for the process lifetime
        self._pending: list[bytes] = []
        self._last_sync = time.monotonic()
        if self.recovered:
            self.append(event="recovered", cut_bytes=self.recovered, cut_sha256=self._cut_hash)
            self.flush(0)

    def _cut_tail(self, size: int) -> None:
        with open(self.path, "r+b") as fh:
            fh.seek(-size, os.SEEK_END)
            self._cut_hash = hashlib.sha256(fh.read()).hexdigest()
            fh.seek(-size, os.SEEK_END)
            fh.truncate()
            fh.flush()
            os.fsync(fh.fileno())
        self.recovered = size

    def append(self, **fields: Any) -> int:
        """Chain an entry; returns its seq. Written by the next `flush`."""
        return self.append_json(_ENCODE(fields)[1:-1])

    def append_json(self, members: str) -> int:
        """Chain an entry given as JSON object members without the braces (`"a":1,"b":"x"`),
        encoded by the caller: the key server's hot path formats its own."""
        self.seq += 1
        sep = "," if members else ""
        body = (
            f'{{"seq":{self.seq},"ts":{round(time.time(), 6)!r}{sep}{members},'
            f'"prev":"{self.prev}"}}'
        ).encode()
        mac = _mac(self._key, body)
        self.prev = mac
        self._pending.append(body[:-1] + b',"mac":"' + mac.encode() + b'"}\n')
        return self.seq

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
