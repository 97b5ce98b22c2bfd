"""The origin's decision journal: every decision it makes survives a restart or a crash.

An append-only file of JSON lines (`blindfold.decisions.core.journal_line`), written as each
decision is made (one `write` with O_APPEND: a process killed after it returns loses nothing;
`fsync` once a second bounds what a power cut can take) and read back at the next start,
expired decisions dropped. It is compacted (rewritten with the active decisions only) at start
and whenever it holds more than twice as many lines as there are active decisions: the new
file is written beside it in a thread, fsynced, given the lines appended meanwhile, and
renamed over the old one, so at every instant one complete journal is on disk.

The journal is the origin's own state, not a trust boundary: a line that does not parse (the
last line of a crash, a damaged block) is skipped and reported, and the file that held it is
kept aside as `<journal>.damaged` for the operator. A journal that cannot be written (full
disk, read-only file system) never stops the origin: decisions keep being made and served,
one `decision_journal_failed` line says what is not being kept, and the next compaction tries
again.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from blindfold.decisions.core import (
    MAX_JOURNAL_LINE,
    Decision,
    DecisionStore,
    journal_line,
    journal_removal,
)
from blindfold.errors import ConfigError
from blindfold.obs.log import JsonLog

COMPACT_MIN_LINES = 1000  # never compact a journal of fewer lines than this (plus 2 x active)
RETRY_S = 5.0  # between compactions while the journal cannot be written


def _lines(fh: BinaryIO) -> Iterator[bytes]:
    """Lines of at most MAX_JOURNAL_LINE + 1 bytes (a longer one comes in pieces, each of which
    is then refused): a damaged file without newlines costs bounded memory."""
    while line := fh.readline(MAX_JOURNAL_LINE + 1):
        yield line


class DecisionJournal:
    """Listens to a DecisionStore and keeps its decisions in `path`."""

    def __init__(
        self,
        path: str,
        log: JsonLog,
        key: str = "origin.decisions.journal",
        *,
        retry_s: float = RETRY_S,
    ) -> None:
        self.path = Path(path)
        self.retry_s = retry_s
        self.key = key
        self.log = log
        self.fd = -1
        self.lines = 0  # lines in the current file
        self.dirty = False  # written since the last fsync
        self.failed = False  # a write failed: nothing is appended until a compaction succeeds
        self.errors = 0
        self._retry_at = 0.0  # monotonic time of the next compaction after a failure
        self._held: list[bytes] | None = None  # lines appended while a compaction runs
        self._compacting: asyncio.Task[None] | None = None

    # ---------------------------------------------------------------- start
    def open(self, store: DecisionStore, now: float) -> tuple[int, list[str]]:
        """Read the journal into `store`, compact it, and listen to the store. Raises
        ConfigError when the file exists but cannot be read, or cannot be written at all."""
        restored, problems = 0, list[str]()
        try:
            with self.path.open("rb") as fh:
                restored, problems = store.replay(_lines(fh), now)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise ConfigError(self.key, f"cannot read {self.path}: {exc.strerror}") from None
        if problems:
            with contextlib.suppress(OSError):
                os.replace(self.path, self.path.with_name(self.path.name + ".damaged"))
        try:
            lines = [journal_line(d) for d in store.decisions.values()]
            self._write_snapshot(self._tmp(), lines)
            self._install(self._tmp(), [], len(lines))
        except OSError as exc:
            raise ConfigError(self.key, f"cannot write {self.path}: {exc.strerror}") from None
        store.listener = self
        return restored, problems

    def _tmp(self) -> Path:
        return self.path.with_name(f".{self.path.name}.tmp")

    @staticmethod
    def _write_snapshot(tmp: Path, lines: list[bytes]) -> None:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(b"".join(lines))
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)

    def _install(self, tmp: Path, held: list[bytes], lines: int) -> None:
        """Append `held` to the new file of `lines` lines, fsync, rename it over the journal
        and switch to it."""
        fd = os.open(tmp, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        try:
            if held:
                data = b"".join(held)
                if os.write(fd, data) != len(data):
                    raise OSError(errno.ENOSPC, "short write")
                os.fsync(fd)
            os.replace(tmp, self.path)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        if self.fd >= 0:
            os.close(self.fd)
        self.fd, self.lines, self.dirty = fd, lines + len(held), False
        dir_fd = os.open(self.path.parent, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(dir_fd)  # the rename itself survives a power cut
        finally:
            os.close(dir_fd)

    # ---------------------------------------------------------------- the store's listener
    def added(self, decision: Decision) -> None:
        self._append(journal_line(decision))

    def removed(self, decision: Decision) -> None:
        self._append(journal_removal(decision))

    def _append(self, line: bytes) -> None:
        if self._held is not None:
            self._held.append(line)
        if self.failed:
            # after a failed or short write the file may end in part of a line: nothing more
            # is appended to it (it would join that part); the compaction rewrites it whole
            return
        try:
            if os.write(self.fd, line) != len(line):  # a full disk can take part of it
                raise OSError(errno.ENOSPC, "short write (no space left on device?)")
        except OSError as exc:
            self._failed(exc)
            return
        self.lines += 1
        self.dirty = True

    def _failed(self, exc: OSError) -> None:
        self.errors += 1
        if not self.failed:
            self.failed = True
            self.log.emit(
                "decision_journal_failed",
                path=str(self.path),
                error=f"{exc.strerror or exc}",
                problem="decisions are enforced but would not survive a restart; the "
                "journal is rewritten at the next compaction",
            )

    # ---------------------------------------------------------------- housekeeping
    def tick(self, store: DecisionStore) -> None:
        """Once a second: fsync what was written; compact when the file has grown, or to
        rewrite it whole after a failed write."""
        if self.dirty:
            try:
                os.fsync(self.fd)
                self.dirty = False
            except OSError as exc:
                self._failed(exc)
        if self._compacting is not None:
            return
        if self.failed:
            if time.monotonic() < self._retry_at:
                return
            self._retry_at = time.monotonic() + self.retry_s
        elif self.lines <= 2 * len(store.decisions) + COMPACT_MIN_LINES:
            return
        self._compacting = asyncio.get_running_loop().create_task(self._compact(store))

    async def _compact(self, store: DecisionStore) -> None:
        started = time.monotonic()
        self._held = []
        try:
            decisions = list(store.decisions.values())  # never changed in place: a snapshot
            tmp = self._tmp()
            await asyncio.to_thread(
                lambda: self._write_snapshot(tmp, [journal_line(d) for d in decisions])
            )
            held, self._held = self._held, None
            self._install(tmp, held, len(decisions))
        except OSError as exc:
            self._failed(exc)
            return
        finally:
            self._held = None
            self._compacting = None
        if self.failed:
            self.failed = False
            self.log.emit("decision_journal_recovered", path=str(self.path))
        self.log.log(
            "decision_journal_compacted",
            decisions=len(decisions),
            lines=self.lines,
            took_s=round(time.monotonic() - started, 3),
        )

    async def close(self) -> None:
        if self._compacting is not None:
            with contextlib.suppress(Exception):
                await self._compacting
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.fsync(self.fd)
            os.close(self.fd)
            self.fd = -1
