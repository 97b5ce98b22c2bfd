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
from collections.abc import Collection, Iterator
from typing import Any, Protocol

from blindfold.core.iplist import MutableIPSet, parse_address
from blindfold.edge.guards import Guards
from blindfold.errors import ProtocolError
from blindfold.io.control import ControlChannel
from blindfold.io.reactor import Reactor


class Visitor(Protocol):
    @property
    def ip(self) -> str: ...


class Host(Protocol):
    """The worker as ban distribution sees it."""

    @property
    def reactor(self) -> Reactor: ...

    @property
    def guards(self) -> Guards: ...

    @property
    def configured(self) -> bool: ...

    @property
    def conns(self) -> Collection[Visitor]: ...

    @property
    def control(self) -> ControlChannel: ...

    def close_banned_later(self, doomed: list[Any]) -> None:
        """Close these (open connections of newly banned addresses) after the grace."""

    def bans_synced(self) -> None:
        """The first ban set is in."""

    def bans_checked(self) -> None:
        """New bans are in (what is not in `conns` is checked by its owner)."""


SLICE_KEYS = 8192  # ~1.5 ms of set operations
SLICE_CONNS = 1024  # ~1 ms of connection checks
CHECK_EVERY_S = 1.0  # during a long run of messages, check open connections at least this often


class BanUpdates:
    def __init__(self, worker: Host) -> None:
        self.worker = worker
        self.queue: deque[dict[str, Any]] = deque()
        self.synced = False  # a first snapshot has been swapped in
        self.messages = 0
        self._building: MutableIPSet | None = None
        self._unchecked_since: float | None = None  # bans added, open conns not checked yet
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
            target.discard_keys(delete[i : i + SLICE_KEYS])
            yield
        added = 0
        for i in range(0, len(add), SLICE_KEYS):
            added += target.add_keys(add[i : i + SLICE_KEYS])
            yield
        if target is guards.bans and added and self._unchecked_since is None:
            self._unchecked_since = worker.reactor.now
        check = False
        if message.get("swap") and self._building is not None:
            guards.bans, self._building = self._building, None
            check = True  # a whole new set: every open connection, once
            if not self.synced:
                self.synced = True
                worker.bans_synced()
        elif self._unchecked_since is not None and (
            not message.get("more") or worker.reactor.now - self._unchecked_since >= CHECK_EVERY_S
        ):
            check = True  # the end of a run of messages (or a second into a long one)
        if check:
            self._unchecked_since = None
            worker.bans_checked()
        if check and worker.conns:
            # Probing the live set costs what probing only the new bans would (one hash per
            # prefix length, not per ban), without building a copy of the new bans.
            bans = guards.bans
            allow = guards.allow
            doomed: list[Visitor] = []
            conns = list(worker.conns)
            for i in range(0, len(conns), SLICE_CONNS):
                for conn in conns[i : i + SLICE_CONNS]:
                    try:
                        version, addr = parse_address(conn.ip)
                    except ProtocolError:
                        continue
                    if bans.contains(addr, version) and not (
                        allow and allow.contains(addr, version)
                    ):
                        doomed.append(conn)
                yield
            if doomed:
                worker.close_banned_later(doomed)
        self.messages += 1
        worker.control.send({"op": "bans_applied", "id": message.get("id")})
