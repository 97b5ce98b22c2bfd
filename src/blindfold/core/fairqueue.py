"""A queue that serves its keys in turn, weighted by cost: deficit round robin (Shreedhar and
Varghese, "Efficient fair queuing using deficit round robin", SIGCOMM 1995), sans-IO.

The key server queues every request of every edge here and serves them one at a time, so one
edge's backlog, however large or costly, delays another edge's request by at most one of its
own requests per turn: each key with work waiting gets `quantum` credit per turn and spends it
on the cost of the items it is served. Items of one key keep their order.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


class FairQueue(Generic[K, T]):
    __slots__ = ("_active", "_credit", "_pending", "_queues", "_size", "quantum")

    def __init__(self, quantum: float = 1.0) -> None:
        if quantum <= 0:
            raise ValueError("quantum must be positive")
        self.quantum = quantum
        self._queues: dict[K, deque[tuple[T, float]]] = {}
        self._active: deque[K] = deque()  # keys with items, in turn order
        self._credit: dict[K, float] = {}
        self._pending: dict[K, float] = {}  # cost queued per key
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def pending(self, key: K) -> float:
        """The cost of `key`'s items still queued."""
        return self._pending.get(key, 0.0)

    def push(self, key: K, item: T, cost: float = 1.0) -> None:
        q = self._queues.get(key)
        if q is None:
            q = self._queues[key] = deque()
            self._active.append(key)
            self._credit[key] = 0.0
            self._pending[key] = 0.0
        q.append((item, cost))
        self._pending[key] += cost
        self._size += 1

    def pop(self) -> tuple[K, T] | None:
        """The next item in fair order, with its key; None when empty."""
        active = self._active
        credit = self._credit
        while active:
            key = active[0]
            q = self._queues[key]
            item, cost = q[0]
            have = credit[key]
            if have < cost:
                # its turn is over: credit for the next one, and the next key's turn
                credit[key] = have + self.quantum
                active.rotate(-1)
                continue
            q.popleft()
            self._size -= 1
            if q:
                credit[key] = have - cost
                self._pending[key] -= cost
            else:
                # DRR: a key whose queue empties keeps no credit
                active.popleft()
                del self._queues[key], credit[key], self._pending[key]
            return key, item
        return None
