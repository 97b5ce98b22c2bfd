"""Structured logs: one JSON object per line.

Lines are buffered and written in batches of whole lines no larger than PIPE_BUF, so lines from
several worker processes sharing one pipe or O_APPEND file never interleave. The descriptor is
made non-blocking: a log reader that stalls costs dropped lines (counted), never a stalled
relay. The buffer is bounded. With `flush_soon(loop.call_soon)` (the asyncio daemons) a line is
written at the end of the loop iteration that logged it, so a log file is never behind.
"""

from __future__ import annotations

import json
import os
import select
import time
from collections.abc import Callable
from typing import Any

PIPE_BUF = select.PIPE_BUF
MAX_PENDING_BYTES = 4 << 20


def peer_text(address: object) -> str:
    """A socket address as people write it: 'ip:port', '[v6]:port' (never a Python tuple)."""
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = str(address[0]), address[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return str(address)


class JsonLog:
    def __init__(self, fd: int, *, process: str, nonblocking: bool = True) -> None:
        self.fd = fd
        self.process = process
        self.dropped = 0
        self._pending: list[bytes] = []
        self.pending = 0  # lines waiting (a plain attribute: read on every poll round)
        self._pending_bytes = 0
        self._call_soon: Callable[[Callable[[], None]], object] | None = None
        self._flush_queued = False
        if nonblocking:
            try:
                os.set_blocking(fd, False)
            except OSError:
                pass

    @classmethod
    def open(cls, path: str, *, process: str) -> JsonLog:
        if not path:
            return cls(1, process=process)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        return cls(fd, process=process)

    def flush_soon(self, call_soon: Callable[[Callable[[], None]], object]) -> None:
        """From now on, a logged line schedules a flush with `call_soon` (one per batch)."""
        self._call_soon = call_soon

    def _queued(self) -> None:
        self._flush_queued = False
        self.flush()

    def _added(self) -> None:
        if self._call_soon is not None and not self._flush_queued:
            self._flush_queued = True
            self._call_soon(self._queued)

    def log(self, event: str, **fields: Any) -> None:
        record = {"ts": round(time.time(), 6), "event": event, "process": self.process}
        record.update(fields)
        line = json.dumps(record, separators=(",", ":"), default=str).encode() + b"\n"
        if len(line) > PIPE_BUF:
            # shorten strings, then lists, so that the line stays one valid JSON object
            record = {k: (v[:200] if isinstance(v, str) else v) for k, v in record.items()}
            record["truncated"] = True
            line = json.dumps(record, separators=(",", ":"), default=str).encode() + b"\n"
            if len(line) > PIPE_BUF:
                record = {k: (v[:4] if isinstance(v, list) else v) for k, v in record.items()}
                line = json.dumps(record, separators=(",", ":"), default=str).encode() + b"\n"
            if len(line) > PIPE_BUF:
                line = line[: PIPE_BUF - 1] + b"\n"
        if self._pending_bytes + len(line) > MAX_PENDING_BYTES:
            self.dropped += 1
            return
        self._pending.append(line)
        self._pending_bytes += len(line)
        self.pending += 1
        self._added()

    def line(self, fields: str, event: str = "conn") -> None:
        """Append a prebuilt line: `fields` is the inside of a JSON object (no braces), already
        valid JSON. Used on the per-connection hot path, where json.dumps of a dict costs more
        than the rest of the bookkeeping."""
        line = (
            f'{{"ts":{time.time():.6f},"event":"{event}","process":"{self.process}",{fields}}}\n'
        ).encode()
        if self._pending_bytes + len(line) > MAX_PENDING_BYTES or len(line) > PIPE_BUF:
            self.dropped += 1
            return
        self._pending.append(line)
        self._pending_bytes += len(line)
        self.pending += 1
        self._added()

    def flush(self) -> None:
        pending = self._pending
        while pending:
            batch = bytearray()
            count = 0
            for line in pending:
                if batch and len(batch) + len(line) > PIPE_BUF:
                    break
                batch += line
                count += 1
            try:
                written = os.write(self.fd, batch)
            except BlockingIOError:
                return  # reader is slow; keep the (bounded) buffer for the next flush
            except OSError:
                self.dropped += len(pending)
                pending.clear()
                self._pending_bytes = 0
                self.pending = 0
                return
            if written < len(batch):
                # a regular file on a full disk, or a pipe that took part of a large write
                self.dropped += count
            del pending[:count]
            self._pending_bytes -= len(batch)
            self.pending = len(pending)

    def emit(self, event: str, **fields: Any) -> None:
        """Log and flush at once (rare events: start-up, reload, errors)."""
        self.log(event, **fields)
        self.flush()
