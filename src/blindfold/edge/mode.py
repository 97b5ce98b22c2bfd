"""What an edge mode is, and what it sees of the worker and of a visitor connection.

Every connection starts the same way (accept, the guards, the ClientHello: `edge.connection`);
then its route's mode decides what happens to it. A mode is a plug-in: one module under
`edge/modes/`, one line in the registry (`edge/modes/__init__.py`). The worker builds each
route's state with its mode, asks the mode about every connection (`check` in the admission
core, then `begin`), and sweeps and snapshots it. A mode sees the worker only as a
`ModeContext` and a connection only as a `Connection`: it never imports the worker, and
nothing outside the registry and the worker names a mode.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Awaitable, Collection, Sequence
from typing import Any, ClassVar, Protocol

from blindfold.config.edge import EdgeConfig, RouteConfig
from blindfold.core.clienthello import ClientHello
from blindfold.core.routing import SniRouter
from blindfold.decisions.purge import Purge
from blindfold.edge.guards import Guards
from blindfold.edge.origins import OriginPool
from blindfold.edge.stats import RouteStats, WorkerStats
from blindfold.io.reactor import Reactor
from blindfold.io.tls13_transport import TlsServerProtocol
from blindfold.obs.log import JsonLog
from blindfold.obs.metrics import MetricSpec, Snapshot


class RouteState:
    """A route as the worker uses it; rebuilt on reload, its counters carried over by name.
    `state` is the mode's own (built by `Mode.build`, None for passthrough)."""

    __slots__ = (
        "json_name",
        "mode",
        "name",
        "pool",
        "proxy_auth",
        "proxy_protocol",
        "proxy_tlvs",
        "state",
        "stats",
    )

    def __init__(
        self,
        name: str,
        pool: OriginPool,
        proxy_protocol: str,
        proxy_tlvs: bool,
        stats: RouteStats,
        mode: Mode,
        state: Any = None,
        proxy_auth: tuple[str, bytes] | None = None,
    ) -> None:
        """`proxy_auth`: (this edge's name, its key) when the route authenticates its PROXY
        headers (`edge.admission.authenticated`)."""
        self.name = name
        self.json_name = json.dumps(name)
        self.pool = pool
        self.proxy_protocol = proxy_protocol
        self.proxy_tlvs = proxy_tlvs
        self.stats = stats
        self.mode = mode
        self.state = state
        self.proxy_auth = proxy_auth


class Connection(Protocol):
    """A visitor connection as a mode sees it. Between `take()` and its end the mode owns it:
    it either moves on (`forward()` to the origins, `hand_off()` to asyncio) or ends
    (`close`). `close` stays the one exit that releases the guards' slot
    and writes the connection's log line."""

    @property
    def ip(self) -> str: ...

    @property
    def client_port(self) -> int: ...

    @property
    def local(self) -> tuple[str, int] | None:
        """The address the visitor connected to (None if it could not be read)."""

    @property
    def route(self) -> RouteState | None: ...

    @property
    def hello_bytes(self) -> bytes:
        """The ClientHello's bytes as received (whole TLS records)."""

    @property
    def taken(self) -> bool:
        """A mode owns it (from `take()` on, until it is forwarded or closed)."""

    @property
    def pending(self) -> bool:
        """Taken, and neither handed to asyncio nor closed yet (waiting for a signature)."""

    def take(self) -> None: ...

    def forward(self) -> None:
        """Passthrough after all: nothing was sent to the visitor, the hello goes to the
        route's origins unchanged."""

    def hand_off(self, protocol: TlsServerProtocol, send_buffer_bytes: int = 0) -> None:
        """The socket moves to the asyncio loop, served by `protocol`."""

    def finished(self, reason: str, bytes_in: int, bytes_out: int) -> None:
        """The handed-off connection is over (`TlsServerProtocol`'s on_done)."""

    def send_now(self, data: bytes) -> None:
        """Best effort, before any hand-off: an alert that fits the socket buffer."""

    def close(self, outcome: str, reason: str) -> None: ...

    def proxy_header(self) -> bytes:
        """The PROXY header the route sends its origins for this visitor (b"" for none)."""


class ModeContext(Protocol):
    """The worker as a mode sees it."""

    @property
    def index(self) -> int: ...

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The asyncio loop the worker's reactor runs in (set before a mode that needs it is
        made)."""

    @property
    def now(self) -> float:
        """The worker's clock (monotonic, refreshed once per poll)."""

    @property
    def config(self) -> EdgeConfig: ...

    @property
    def router(self) -> SniRouter[RouteState]: ...

    @property
    def log(self) -> JsonLog: ...

    @property
    def reactor(self) -> Reactor:
        """The worker's event loop (datagram sockets and timers)."""

    @property
    def guards(self) -> Guards:
        """Lists, bans, per-address limits and JA4 rules (for what does not arrive as a
        connection: QUIC datagrams)."""

    @property
    def stats(self) -> WorkerStats: ...

    @property
    def conns(self) -> Collection[Connection]: ...

    def may_log_refusal(self) -> bool:
        """Whether a refused connection may be logged now (edge.log_refused_per_s)."""


class Mode:
    """One mode of one worker: made once per worker by the registry, the first time a route
    names it. The defaults fit a mode that keeps no state of its own."""

    name: ClassVar[str]
    needs_asyncio: ClassVar[bool] = False  # it serves connections on the asyncio loop
    metrics: ClassVar[tuple[MetricSpec, ...]] = ()  # what `snapshot` reports

    def __init__(self, ctx: ModeContext) -> None:
        self.ctx = ctx

    @classmethod
    def check_config(cls, where: str, rc: RouteConfig, edge: EdgeConfig) -> None:
        """What `blindfold check-config` checks of a route (its files load); ConfigError
        naming the key. Nothing is started."""

    def build(self, where: str, rc: RouteConfig, edge: EdgeConfig, old: Any) -> Any:
        """The route's state (`RouteState.state`) for its config `rc` at `where`
        ("edge.routes[i]"), carrying over what a reload should keep from `old` (the same
        route's previous state, or None). ConfigError naming the key."""
        return None

    def check(self, route: RouteState, hello: ClientHello) -> bool:
        """Sans-IO, part of admission: True if this mode takes the connection (`begin` is
        called), False if it is forwarded to the origins as passthrough. ProtocolError: a
        hello the mode refuses (its `alert` is sent)."""
        return False

    def begin(self, conn: Connection, route: RouteState, hello: ClientHello) -> bool:
        """Take the connection on; False: forward it as passthrough after all."""
        return False

    def configured(self, routes: Sequence[RouteState]) -> None:
        """A (re)loaded config is in; `routes` are this mode's (maybe none)."""

    def sweep(self, routes: Sequence[RouteState], now: float) -> None:
        """Housekeeping, about once a second."""

    def listening(self, datagram_sockets: Sequence[socket.socket]) -> None:
        """The worker starts serving: its share of the UDP listeners (QUIC), maybe none."""

    def bans_changed(self, grace_s: float) -> None:
        """New bans are in: end what the mode holds for banned addresses after `grace_s`
        (connections are the worker's)."""

    def drain(self) -> None:
        """The worker drains: stop taking what the mode serves outside connections."""

    def purge(self, routes: Sequence[RouteState], purge: Purge | None) -> int | Awaitable[int]:
        """Remove what `purge` names from the caches of this mode's `routes` (None: all of
        it); returns the entries removed, or (a mode on the asyncio loop with much to scan)
        an awaitable of it."""
        return 0

    def snapshot(self, routes: Sequence[RouteState]) -> Snapshot:
        """Metric tables (obs.metrics) for this mode's routes."""
        return {}
