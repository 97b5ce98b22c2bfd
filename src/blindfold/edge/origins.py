"""Origin pools: which origin to try next, and which are marked down. Sans-IO (time passed in).

An origin that refuses or times out is skipped for `down_s`; if every origin is down the pool
still offers them (the earliest to recover first) rather than refusing every visitor.
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass, field
from typing import Literal


@dataclass(slots=True)
class Origin:
    text: str  # as configured
    family: int
    sockaddr: tuple[str, int] | tuple[str, int, int, int]
    active: int = 0
    down_until: float = 0.0
    failures: dict[str, int] = field(default_factory=dict)
    json: str = ""  # the name as a JSON string, for log lines

    def __post_init__(self) -> None:
        self.json = json.dumps(self.text)

    def is_up(self, now: float) -> bool:
        return now >= self.down_until


def resolve(text: str) -> tuple[int, tuple[str, int] | tuple[str, int, int, int]]:
    """Resolve 'host:port' once (at start and reload, never per connection)."""
    from blindfold.config.common import parse_hostport

    host, port = parse_hostport(text)
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    family, _type, _proto, _canon, sockaddr = infos[0]
    return family, sockaddr  # type: ignore[return-value]


class OriginPool:
    def __init__(
        self, origins: list[Origin], balance: Literal["round_robin", "least_conn"], down_s: float
    ) -> None:
        self.origins = origins
        self.balance = balance
        self.down_s = down_s
        self._next = 0

    def order(self, now: float) -> list[Origin]:
        """Origins to try, in order: up ones by the balancing policy, then down ones."""
        origins = self.origins
        if len(origins) == 1:
            return [origins[0]]
        up = [o for o in origins if o.is_up(now)]
        down = sorted((o for o in origins if not o.is_up(now)), key=lambda o: o.down_until)
        if self.balance == "least_conn":
            start = self._next % len(origins)
            rotated = origins[start:] + origins[:start]  # rotate so ties spread
            self._next += 1
            up = sorted((o for o in rotated if o.is_up(now)), key=lambda o: o.active)
        elif up:
            start = self._next % len(up)
            self._next += 1
            up = up[start:] + up[:start]
        return up + down

    def mark_down(self, origin: Origin, reason: str, now: float) -> None:
        origin.down_until = now + self.down_s
        self.count_failure(origin, reason)

    @staticmethod
    def count_failure(origin: Origin, reason: str) -> None:
        """A failure that says nothing about the origin for other visitors (a TLS handshake
        the origin ended for this visitor): counted, the origin stays up."""
        origin.failures[reason] = origin.failures.get(reason, 0) + 1

    @staticmethod
    def mark_up(origin: Origin) -> None:
        origin.down_until = 0.0
