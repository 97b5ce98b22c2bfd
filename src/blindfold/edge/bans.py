"""The worker's side of ban distribution: apply the master's ban messages (see
blindfold.decisions.bans) to the worker's set a slice at a time, close the open connections
the new bans cover, and acknowledge each message once it is done.

Every slice is bounded (SLICE_KEYS set operations or SLICE_CONNS connection checks) and the
next slice waits for the next turn of the event loop, so a million-ban update never holds
visitors up for more than a few milliseconds at a time. A snapshot (`reset` ... `swap`) is
built aside and swapped in whole, so the old set is enforced until the new one is complete.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from blindfold.core.iplist import MutableIPSet, parse_address
from blindfold.errors import ProtocolError

if TYPE_CHECKING:
    from blindfold.edge.passthrough import Conn
    from blindfold.edge.worker import Worker

SLICE_KEYS = 4096
SLICE_CONNS = 2048
CHECK_EVERY_S = 1.0  # during a long run of messages, check open connections at least this often


class BanUpdates:
    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.queue: deque[dict[str, Any]] = deque()
        self.synced = False  # a first snapshot has been swapped in
        self.messages = 0
        self._building: MutableIPSet | None = None
        self._unchecked: MutableIPSet | None = None  # bans not yet checked against open conns
        self._unchecked_since = 0.0
        self._job: Iterator[None] | None = None
        self._scheduled = False

    def push(self, message: dict[str, Any]) -> None:
        self.queue.append(message)
        self._schedule()

    def resume(self) -> None:
        if self.queue or self._job is not None:
            self._schedule()

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            self.worker.reactor.call_later(0.0, self._step)

    def _step(self) -> None:
        self._scheduled = False
        if self._job is None:
            if not self.queue or not self.worker.configured:
                return
            self._job = self._apply(self.queue.popleft())
        try:
            next(self._job)
        except StopIteration:
            self._job = None
        if self._job is not None or self.queue:
            self._schedule()

    def _apply(self, message: dict[str, Any]) -> Iterator[None]:
        worker = self.worker
        guards = worker.guards
        add: list[int] = message.get("add") or []
        delete: list[int] = message.get("del") or []
        if message.get("reset"):
            self._building = MutableIPSet()
        target = self._building if self._building is not None else guards.bans
        for i in range(0, len(delete), SLICE_KEYS):
            for key in delete[i : i + SLICE_KEYS]:
                target.discard_key(key)
            yield
        live = target is guards.bans
        fresh = self._unchecked
        if live and add and fresh is None:
            fresh = self._unchecked = MutableIPSet()
            self._unchecked_since = worker.reactor.now
        for i in range(0, len(add), SLICE_KEYS):
            for key in add[i : i + SLICE_KEYS]:
                if target.add_key(key) and live:
                    fresh.add_key(key)  # type: ignore[union-attr]
            yield
        check: MutableIPSet | None = None
        if message.get("swap") and self._building is not None:
            guards.bans, self._building = self._building, None
            check, self._unchecked = guards.bans, None  # the whole new set, once
            if not self.synced:
                self.synced = True
                worker.bans_synced()
        elif self._unchecked is not None and (
            not message.get("more") or worker.reactor.now - self._unchecked_since >= CHECK_EVERY_S
        ):
            check, self._unchecked = self._unchecked, None
        if check is not None and check and worker.conns:
            doomed: list[Conn] = []
            conns = list(worker.conns)
            allow = guards.allow
            for i in range(0, len(conns), SLICE_CONNS):
                for conn in conns[i : i + SLICE_CONNS]:
                    try:
                        version, addr = parse_address(conn.ip)
                    except ProtocolError:
                        continue
                    if check.contains(addr, version) and not (
                        allow and allow.contains(addr, version)
                    ):
                        doomed.append(conn)
                yield
            if doomed:
                worker.close_banned_later(doomed)
        self.messages += 1
        worker.control.send({"op": "bans_applied", "id": message.get("id")})
