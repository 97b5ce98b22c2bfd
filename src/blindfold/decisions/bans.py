"""The edge master's ban set and its distribution to workers, sans-IO (`now` passed in).

`BanTable` is the authoritative set: what each source (the stream, Redis, the shared rate
counters) bans, with expiry by a heap, the limits (widest range, most bans) enforced and the
refusals counted, IPv6 bans widened to the prefix the per-address limits use. Every change of
the enforced set is appended to a log as one integer.

`BanDistributor` sends each worker what changed since what it last acknowledged: a snapshot
in chunks for a new (or hopelessly late) worker, deltas after that, at most one message in
flight per worker. Changes made meanwhile wait in the log and go out together (coalesced);
the log is bounded, and a worker that falls further behind than that gets a fresh snapshot
instead of an ever-growing queue.

A network travels as one integer key: (network << 9) | (prefix length << 1) | is_ipv6.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from blindfold.decisions.core import parse_net
from blindfold.errors import ProtocolError

DEFAULT_MAX_BANS = 1_000_000
CHUNK = 10_000  # keys per message: ~0.5 MB of JSON, a few ms to decode in a worker


def encode(version: int, net: int, plen: int) -> int:
    return (net << 9) | (plen << 1) | (version == 6)


def decode(key: int) -> tuple[int, int, int]:
    """key -> (version, network, prefix length)."""
    return (6 if key & 1 else 4), key >> 9, (key >> 1) & 0xFF


@dataclass(frozen=True, slots=True)
class BanLimits:
    max_bans: int = DEFAULT_MAX_BANS
    min_prefix_len_v4: int = 16
    min_prefix_len_v6: int = 32
    ipv6_prefix_len: int = 64


New = tuple[str, str, float, str]  # (scope, value, duration_s, reason)


class BanTable:
    def __init__(self, limits: BanLimits) -> None:
        self.limits = limits
        self.size = 0  # distinct networks enforced
        self.refused: dict[str, int] = {}
        self.log: list[int] = []  # key: now banned; ~key: no longer banned
        self.log_base = 0  # sequence number of log[0]
        self.on_change: Callable[[], None] | None = None
        self._sources: dict[str, dict[int, float]] = {}  # source -> key -> until
        # IPv6 decisions widened to the limit prefix: which original networks (and until
        # when) hold each prefix, so deleting one of them does not lift the others
        self._members: dict[str, dict[int, dict[int, float]]] = {}
        self._resync: dict[str, set[int]] = {}
        self._heap: list[tuple[float, int, str]] = []

    @property
    def seq(self) -> int:
        return self.log_base + len(self.log)

    def keys(self) -> list[int]:
        seen: set[int] = set()
        out = []
        for mine in self._sources.values():
            for key in mine:
                if key not in seen:
                    seen.add(key)
                    out.append(key)
        return out

    def holds(self, scope: str, value: str) -> bool:
        try:
            key, _original, _m = self._key(scope, value)
        except ProtocolError:
            return False
        return self._enforced(key)

    def refuse(self, reason: str, n: int = 1) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + n

    # ------------------------------------------------------------------ changes
    def _key(self, scope: str, value: str) -> tuple[int, int, bool]:
        """(enforced key, original key, tracked as a member of a widened IPv6 prefix)."""
        version, net, plen = parse_net(scope, value)
        lim = self.limits
        if plen < (lim.min_prefix_len_v4 if version == 4 else lim.min_prefix_len_v6):
            raise ProtocolError("too_wide", f"{scope} {value}")
        original = encode(version, net, plen)
        if version == 6 and plen >= lim.ipv6_prefix_len:
            shift = 128 - lim.ipv6_prefix_len
            return encode(6, net >> shift << shift, lim.ipv6_prefix_len), original, True
        return original, original, False

    def _enforced(self, key: int) -> bool:
        return any(key in mine for mine in self._sources.values())

    def update(
        self,
        source: str,
        new: Iterable[New],
        deleted: Iterable[tuple[str, str]],
        now: float,
    ) -> None:
        """Apply what a source says is new and deleted. Refusals are counted by reason
        (too_wide, cap, bad_decision, unsupported_scope); nothing else is harmed."""
        before = self.seq
        mine = self._sources.setdefault(source, {})
        for scope, value in deleted:
            try:
                key, original, member = self._key(scope, value)
            except ProtocolError:
                continue  # never held
            self._drop(source, mine, key, original if member else None)
        for scope, value, duration, _reason in new:
            if not duration > 0:
                continue
            try:
                key, original, member = self._key(scope, value)
            except ProtocolError as exc:
                self.refuse(exc.reason)
                continue
            self._hold(source, mine, key, original if member else None, now + duration)
        self._changed(before)

    def _hold(
        self, source: str, mine: dict[int, float], key: int, original: int | None, until: float
    ) -> None:
        old = mine.get(key)
        if old is None and not self._enforced(key):
            if self.size >= self.limits.max_bans:
                self.refuse("cap")
                return
            self.size += 1
            self.log.append(key)
        resync = self._resync.get(source)
        if resync is not None:
            resync.add(key)
        if original is not None:
            members = self._members.setdefault(source, {}).setdefault(key, {})
            if members.get(original, 0.0) < until:
                members[original] = until
        if old is None or until > old:
            mine[key] = until
            heapq.heappush(self._heap, (until, key, source))
            if len(self._heap) > 2 * self.size + 4096:
                self._rebuild_heap()

    def _drop(self, source: str, mine: dict[int, float], key: int, original: int | None) -> None:
        if key not in mine:
            return
        groups = self._members.get(source)
        if groups is not None and key in groups:
            members = groups[key]
            if original is not None:
                members.pop(original, None)
            if members and original is not None:
                return  # other networks of this prefix are still banned
            del groups[key]
        del mine[key]
        if not self._enforced(key):
            self.size -= 1
            self.log.append(~key)

    def expire(self, now: float) -> int:
        before = self.seq
        heap = self._heap
        while heap and heap[0][0] <= now:
            until, key, source = heapq.heappop(heap)
            mine = self._sources.get(source)
            if mine is None or mine.get(key) != until:
                continue  # extended or deleted since
            del mine[key]
            groups = self._members.get(source)
            if groups is not None:
                groups.pop(key, None)
            if not self._enforced(key):
                self.size -= 1
                self.log.append(~key)
        self._changed(before)
        return self.seq - before

    def _rebuild_heap(self) -> None:
        self._heap = [
            (until, key, source)
            for source, mine in self._sources.items()
            for key, until in mine.items()
        ]
        heapq.heapify(self._heap)

    # ------------------------------------------------------------------ full resyncs
    def begin_resync(self, source: str) -> None:
        """A source is about to send its whole set (possibly in several `update`s); what it
        does not send again is dropped by `end_resync` (nothing is lifted in between)."""
        self._resync[source] = set()
        self._members.pop(source, None)  # rebuilt from what is sent again

    def end_resync(self, source: str) -> None:
        seen = self._resync.pop(source, None)
        if seen is None:
            return
        before = self.seq
        mine = self._sources.setdefault(source, {})
        for key in [k for k in mine if k not in seen]:
            self._drop(source, mine, key, None)
        self._changed(before)

    def abort_resync(self, source: str) -> None:
        self._resync.pop(source, None)

    def clear(self, source: str) -> None:
        self.begin_resync(source)
        self.end_resync(source)

    def _changed(self, before: int) -> None:
        if self.seq != before and self.on_change is not None:
            self.on_change()


class _Cursor:
    __slots__ = ("inflight", "pos", "seq", "snapshot")

    def __init__(self) -> None:
        self.seq: int | None = None  # next log entry to send; None: a snapshot is needed
        self.snapshot: list[int] | None = None
        self.pos = 0
        self.inflight = 0  # id of the unacknowledged message, 0: none


class BanDistributor:
    def __init__(self, table: BanTable, *, chunk: int = CHUNK, max_log: int | None = None) -> None:
        self.table = table
        self.chunk = chunk
        self.max_log = max_log if max_log is not None else 2 * table.limits.max_bans + chunk
        self.cursors: dict[Hashable, _Cursor] = {}
        self.resyncs = 0
        self._next_id = 0

    def add(self, worker: Hashable) -> None:
        self.cursors[worker] = _Cursor()

    def remove(self, worker: Hashable) -> None:
        self.cursors.pop(worker, None)
        self.trim()

    def pending(self, worker: Hashable) -> int:
        """Keys not yet acknowledged by `worker` (a snapshot counts in full)."""
        c = self.cursors.get(worker)
        if c is None:
            return 0
        if c.seq is None:
            return self.table.size
        left = len(c.snapshot) - c.pos if c.snapshot is not None else 0
        return left + self.table.seq - c.seq

    def next_message(self, worker: Hashable) -> dict[str, Any] | None:
        """The next message for `worker`, or None (one is in flight, or it is up to date)."""
        c = self.cursors.get(worker)
        if c is None or c.inflight:
            return None
        table = self.table
        add: list[int]
        delete: list[int] = []
        reset = swap = False
        if c.seq is None:  # start a snapshot; deltas continue from here once it is in
            c.snapshot, c.pos, c.seq = table.keys(), 0, table.seq
            reset = True
        if c.snapshot is not None:
            add = c.snapshot[c.pos : c.pos + self.chunk]
            c.pos += len(add)
            if c.pos >= len(c.snapshot):
                c.snapshot, swap = None, True
        else:
            if c.seq >= table.seq:
                return None
            start = c.seq - table.log_base
            entries = table.log[start : start + self.chunk]
            c.seq += len(entries)
            latest: dict[int, bool] = {}  # the last change of each key wins (coalescing)
            for entry in entries:
                if entry >= 0:
                    latest[entry] = True
                else:
                    latest[~entry] = False
            add = [k for k, banned in latest.items() if banned]
            delete = [k for k, banned in latest.items() if not banned]
        self._next_id += 1
        c.inflight = self._next_id
        return {
            "op": "bans",
            "id": self._next_id,
            "reset": reset,
            "swap": swap,
            "more": self.pending(worker) > 0,
            "add": add,
            "del": delete,
        }

    def acked(self, worker: Hashable, message_id: int) -> bool:
        c = self.cursors.get(worker)
        if c is None or c.inflight != message_id:
            return False
        c.inflight = 0
        self.trim()
        return True

    def trim(self) -> None:
        """Forget log entries every worker has; a worker further behind than `max_log` is
        sent a snapshot later instead of the entries it missed."""
        table = self.table
        if len(table.log) > self.max_log:
            floor = table.seq - self.max_log // 2
            for c in self.cursors.values():
                if c.seq is not None and c.seq < floor:
                    c.seq, c.snapshot, c.pos = None, None, 0
                    self.resyncs += 1
        low = min((c.seq for c in self.cursors.values() if c.seq is not None), default=table.seq)
        drop = low - table.log_base
        if drop > 0 and (drop >= 4096 or drop == len(table.log)):
            del table.log[:drop]
            table.log_base = low

    def workers(self) -> Iterator[Hashable]:
        return iter(self.cursors)
