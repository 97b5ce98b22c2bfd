"""The edge master: binds the listeners, starts and supervises the workers, reloads the config
on SIGHUP, drains on SIGTERM, and serves /metrics and /healthz on the admin listener.

The master never touches visitor traffic. Workers are separate interpreters (not forks) so the
master can use asyncio freely; each gets its listening sockets as inherited descriptors and
the validated config text over its control channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from blindfold.config import Config, load_file
from blindfold.config.common import load_admin_token, parse_hostport
from blindfold.config.edge import EdgeConfig
from blindfold.config.schema import changes
from blindfold.decisions.bans import BanDistributor, BanLimits, BanTable
from blindfold.decisions.feed import StreamFeed, supervise
from blindfold.decisions.purge import Purge, SeenPurges
from blindfold.edge.stats import EDGE_METRICS, EDGE_SPECS, top_ja4
from blindfold.errors import ConfigError
from blindfold.io import control
from blindfold.io.admin_http import AdminServer
from blindfold.io.listeners import bind_group
from blindfold.io.service import run_service
from blindfold.obs.log import JsonLog
from blindfold.obs.metrics import MetricSpec, Snapshot, merge, render
from blindfold.obs.status import HTML_TYPE, JSON_TYPE, PAGE, status_json

READY_TIMEOUT_S = 15.0
STATS_TIMEOUT_S = 2.0
RESPAWN_WINDOW_S = 30.0
RESPAWN_MAX = 5
QUIC_PREFIX = "udp/"  # the key of a listen address's UDP group (QUIC routes)


def group_keys(config: EdgeConfig) -> list[str]:
    """The listener groups `config` needs, in `EdgeMaster.bind`'s order."""
    keys = list(config.listen)
    if any(r.quic for r in config.routes):
        keys += [QUIC_PREFIX + a for a in config.listen]
    return keys


EDGE_METRICS_ALL = [
    *EDGE_METRICS,
    MetricSpec(
        "blindfold_log_lines_suppressed_total",
        "counter",
        "Refused-connection log lines not written (log_refused_per_s).",
    ),
]
PURGE_METRIC = MetricSpec(
    "blindfold_edge_purges_total",
    "counter",
    "Cache purges from the origin by source (stream, redis) and result (applied; duplicate: "
    "already applied from the other source; gap: purges may have been missed, every cache "
    "emptied).",
    ("source", "result"),
)
EDGE_METRICS_ALL.append(PURGE_METRIC)
EDGE_SPECS_ALL = {
    **EDGE_SPECS,
    "blindfold_log_lines_suppressed_total": EDGE_METRICS_ALL[-2],
    PURGE_METRIC.name: PURGE_METRIC,
}
# purges replayed to a worker that starts within RECENT_PURGES_S of them (a respawned
# worker's blind disk cache outlived them)
RECENT_PURGES = 100
RECENT_PURGES_S = 60.0


@dataclass(eq=False)
class WorkerHandle:
    index: int
    generation: int
    proc: subprocess.Popen[bytes]
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    state: str = "starting"  # starting | ready | draining | exited
    replies: dict[int, asyncio.Future[dict[str, Any]]] = field(default_factory=dict)
    ready: asyncio.Future[None] | None = None
    # config messages carry a sequence number, echoed in the worker's answer
    config_results: dict[int, asyncio.Future[str]] = field(default_factory=dict)
    task: asyncio.Task[None] | None = None

    def send(self, message: dict[str, Any]) -> None:
        if self.state != "exited" and not self.writer.is_closing():
            self.writer.write(control.encode(message))


class EdgeMaster:
    def __init__(self, config_path: str, config: Config, text: str, log: JsonLog) -> None:
        assert config.edge is not None
        control.check_config_size(text)
        self.path = config_path
        self.config: EdgeConfig = config.edge
        self.text = text
        self.log = log
        self.nworkers = self.config.workers or os.cpu_count() or 1
        self.groups: dict[str, list[socket.socket]] = {}
        self.workers: list[WorkerHandle] = []
        self.old_workers: list[WorkerHandle] = []
        self.generation = 0
        self.draining = False
        self.reloads: dict[str, int] = {}
        self.respawns: dict[int, list[float]] = {}
        self._stats_id = 0
        self._stop = asyncio.Event()
        self.admin = AdminServer(
            self._admin,
            load_admin_token(self.config.admin_token_file, "edge.admin_token_file"),
            post_paths=frozenset({"/acme/renew"}),
        )
        self.admin_address: tuple[str, int] | None = None
        self.bans = BanTable(_ban_limits(self.config))
        self.bans.on_change = self._bans_changed
        self.distributor = BanDistributor(self.bans)
        self._bans_logged = 0.0
        self.feeds: list[Any] = []
        self.feed_tasks: list[asyncio.Task[None]] = []
        # metrics the workers report for their modes, as they describe them (the master
        # knows no mode)
        self.mode_metrics: dict[str, MetricSpec] = {}
        # Every change of the worker set (reload, new generation, respawn) holds this lock, so
        # they never interleave; SIGHUPs that arrive during a reload coalesce into one more.
        self._workers_lock = asyncio.Lock()
        self._reload_task: asyncio.Task[None] | None = None
        self._reload_again = False
        self._config_seq = 0
        self._respawning: dict[int, asyncio.Task[None]] = {}
        self.acme: Any = None  # acme.client.AcmeManager for [edge.acme] (a blind CDN name)
        self._acme_task: asyncio.Task[None] | None = None
        if self.config.acme is not None:
            self.acme = _acme_manager(self.config, log.emit, lambda _order: self.reload())
        self.seen_purges = SeenPurges()
        # (monotonic time, message) of the last purges, for workers that start after them
        self.recent_purges: deque[tuple[float, dict[str, Any]]] = deque(maxlen=RECENT_PURGES)
        self.purge_counts: dict[tuple[str, str], int] = {}
        self._purge_tasks: set[asyncio.Task[None]] = set()

    # ---------------------------------------------------------------- start
    def bind(self, config: EdgeConfig) -> dict[str, list[socket.socket]]:
        groups: dict[str, list[socket.socket]] = {}
        try:
            for i, address in enumerate(config.listen):
                if address in self.groups:
                    groups[address] = self.groups[address]
                    continue
                try:
                    groups[address] = bind_group(
                        address,
                        self.nworkers,
                        ipv6_prefix_len=config.ipv6_prefix_len,
                        defer_accept_s=int(config.hello_timeout_s) if config.defer_accept else 0,
                    )
                except OSError as exc:
                    raise ConfigError(
                        f"edge.listen[{i}]", f"cannot listen on {address}: {exc.strerror}"
                    ) from None
            if any(r.quic for r in config.routes):  # QUIC: UDP at each listener's port
                for i, address in enumerate(config.listen):
                    key = QUIC_PREFIX + address
                    if key in self.groups:
                        groups[key] = self.groups[key]
                        continue
                    host, _ = parse_hostport(address)
                    port = groups[address][0].getsockname()[1]
                    udp = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
                    try:
                        groups[key] = bind_group(
                            udp,
                            self.nworkers,
                            ipv6_prefix_len=config.ipv6_prefix_len,
                            kind=socket.SOCK_DGRAM,
                        )
                    except OSError as exc:
                        raise ConfigError(
                            f"edge.listen[{i}]", f"cannot listen on UDP {udp}: {exc.strerror}"
                        ) from None
        except ConfigError:
            for address, socks in groups.items():
                if address not in self.groups:
                    for s in socks:
                        s.close()
            raise
        return groups

    def _bound_addresses(self, quic: bool = False) -> list[str]:
        out = []
        for key, socks in self.groups.items():
            if key.startswith(QUIC_PREFIX) != quic:
                continue
            host, _ = parse_hostport(key.removeprefix(QUIC_PREFIX))
            port = socks[0].getsockname()[1]
            out.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
        return out

    async def spawn(
        self,
        index: int,
        generation: int,
        groups: dict[str, list[socket.socket]] | None = None,
        text: str | None = None,
    ) -> WorkerHandle:
        groups = self.groups if groups is None else groups
        parent, child = socket.socketpair()
        fds = [socks[index].fileno() for socks in groups.values()]
        listeners = [[address, socks[index].fileno()] for address, socks in groups.items()]
        cmd = [
            sys.executable,
            "-m",
            "blindfold.edge.worker",
            "--index",
            str(index),
            "--workers",
            str(self.nworkers),
            "--control-fd",
            str(child.fileno()),
            "--listeners",
            json.dumps(listeners),
        ]
        proc = subprocess.Popen(
            cmd, pass_fds=[child.fileno(), *fds], close_fds=True, start_new_session=False
        )
        child.close()
        reader, writer = await asyncio.open_connection(sock=parent, limit=64 << 20)
        handle = WorkerHandle(index, generation, proc, reader, writer)
        handle.ready = asyncio.get_running_loop().create_future()
        handle.task = asyncio.create_task(self._read_worker(handle))
        self._config_seq += 1
        handle.send(
            {"op": "config", "text": self.text if text is None else text, "seq": self._config_seq}
        )
        # the worker starts accepting once this snapshot of the ban set is in
        self.distributor.add(handle)
        self._send_bans(handle)
        for at, message in self.recent_purges:  # its blind disk cache may hold what they removed
            if time.monotonic() - at < RECENT_PURGES_S:
                handle.send(message)
        return handle

    async def _read_worker(self, handle: WorkerHandle) -> None:
        try:
            while True:
                line = await handle.reader.readline()
                if not line:
                    break
                message = json.loads(line)
                op = message.get("op")
                if op == "ready":
                    handle.state = "ready" if handle.state == "starting" else handle.state
                    for spec in message.get("metrics") or ():
                        self.mode_metrics.setdefault(spec["name"], _spec(spec))
                    if handle.ready is not None and not handle.ready.done():
                        handle.ready.set_result(None)
                elif op == "bans_applied":
                    if self.distributor.acked(handle, message.get("id")):
                        self._send_bans(handle)
                elif op == "purged":
                    fut = handle.replies.pop(message.get("id"), None)
                    if fut is not None and not fut.done():
                        fut.set_result(message)
                elif op in ("stats", "rates"):
                    fut = handle.replies.pop(message.get("id"), None)
                    if fut is not None and not fut.done():
                        fut.set_result(message["metrics"] if op == "stats" else message)
                elif op in ("reloaded", "config_failed"):
                    if op == "config_failed":
                        self.log.emit(
                            "worker_config_failed", worker=handle.index, error=message.get("error")
                        )
                    result = handle.config_results.pop(message.get("seq"), None)
                    if result is not None and not result.done():
                        result.set_result(op)
                    if (
                        handle.ready is not None
                        and not handle.ready.done()
                        and (op == "config_failed")
                    ):
                        handle.ready.set_exception(ConfigError("", message.get("error", "")))
        except (ConnectionError, ValueError):
            pass
        finally:
            self.distributor.remove(handle)
            if handle.ready is not None and not handle.ready.done():
                # it died before it was ready: whoever waits for it learns now, not at the
                # READY_TIMEOUT_S deadline
                handle.ready.set_exception(ConfigError("", "a worker exited before it was ready"))
                handle.ready.exception()  # retrieved: nobody may be waiting any more
            for reply in handle.replies.values():
                if not reply.done():
                    reply.cancel()
            for result in handle.config_results.values():
                if not result.done():
                    result.cancel()

    async def start(self) -> dict[str, Any]:
        """Bind, start the workers and the decision feeds (io.service.Service). On a
        ConfigError the workers started are ended."""
        try:
            self.groups = self.bind(self.config)
            host, port = parse_hostport(self.config.admin_listen)
            try:
                admin = await self.admin.start(host, port)
            except OSError as exc:
                raise ConfigError(
                    "edge.admin_listen",
                    f"cannot listen on {self.config.admin_listen}: {exc.strerror}",
                ) from None
            self.admin_address = admin
            self.generation = 1
            self.workers = [await self.spawn(i, 1) for i in range(self.nworkers)]
            await self._wait_ready(self.workers)
            await self._start_feeds(self.config)
            if self.acme is not None:
                self._acme_task = asyncio.get_running_loop().create_task(
                    supervise("acme", self.acme.run, self.log)
                )
        except ConfigError:
            for handle in self.workers:
                if handle.proc.poll() is None:
                    handle.proc.kill()
            raise
        return {
            "listen": self._bound_addresses(),
            "quic_listen": self._bound_addresses(quic=True),
            "admin": f"{admin[0]}:{admin[1]}",
            "workers": self.nworkers,
            "routes": [self.config.route_name(i) for i in range(len(self.config.routes))],
        }

    async def _wait_ready(self, handles: list[WorkerHandle]) -> None:
        futures = [h.ready for h in handles if h.ready is not None]
        try:
            await asyncio.wait_for(asyncio.gather(*futures), READY_TIMEOUT_S)
        except TimeoutError:
            raise ConfigError("", "workers did not become ready in time") from None

    # ---------------------------------------------------------------- decisions
    async def _start_feeds(self, config: EdgeConfig) -> None:
        for task in self.feed_tasks:
            task.cancel()
        for feed in self.feeds:
            close = getattr(feed, "close", None)
            if close is not None:
                await close()
        self.feeds, self.feed_tasks = [], []
        limits = _ban_limits(config)
        if limits != self.bans.limits:  # the feeds started below resync into the new limits
            self.bans.limits = limits
            self.distributor.max_log = 2 * limits.max_bans + self.distributor.chunk
        src = config.decisions
        kept = {"stream"} if src is not None and src.url else set()
        if src is not None and src.redis_url:
            kept |= {"redis", "shared_rate"}
        for source in ("stream", "redis", "shared_rate"):
            if source not in kept:
                self.bans.clear(source)
        if src is None:
            return
        loop = asyncio.get_running_loop()
        feeds: list[Any] = []
        if src.url:
            feeds.append(StreamFeed(src, self.bans, self.log))
        if src.redis_url:
            from blindfold.decisions.redis_bus import RedisFeed

            feeds.append(RedisFeed(src, self.bans, self.log, config))
        stream = next((f for f in feeds if f.kind == "stream"), None)
        for feed in feeds:
            feed.on_purge = self.apply_purge
            # purges missed (a gap in the stream's purge log; the Redis channel lost while no
            # stream with a purge log covers it, e.g. a CrowdSec LAPI's): every cache emptied
            feed.on_gap = partial(self._purge_gap, feed.kind, stream)
            self.feeds.append(feed)
            self.feed_tasks.append(
                loop.create_task(supervise(feed.kind, feed.run, self.log, feed.down))
            )
            if feed.kind == "redis":
                self.feed_tasks.append(
                    loop.create_task(
                        supervise("shared_rates", partial(self._share_rates, feed), self.log)
                    )
                )
        self.feed_tasks.append(loop.create_task(supervise("expiry", self._expire_bans, self.log)))

    # ---------------------------------------------------------------- purges
    def apply_purge(self, purge: Purge, source: str) -> None:
        """A purge from a decision source (the stream's purge log, or verified from Redis):
        once, however many sources bring it, to every worker; logged with what was removed."""
        if not self.seen_purges.first(purge.id, time.time()):
            self._count_purge(source, "duplicate")
            return
        self._count_purge(source, "applied")
        message = {"op": "purge", "purge": purge.to_json()}
        self.recent_purges.append((time.monotonic(), message))
        fields = {
            "purge": purge.id,
            "operator": purge.operator,
            "source": source,
            "issued": purge.issued,
            "items": purge.size,
        }
        self._spawn_purge(self._send_purge(message, fields))

    def purge_everything(self, source: str) -> None:
        """Purges may have been missed: empty every cache of every worker."""
        self._count_purge(source, "gap")
        message = {"op": "purge", "all": True}
        self.recent_purges.append((time.monotonic(), message))
        self._spawn_purge(self._send_purge(message, {"purge": "all", "source": source}))

    def _purge_gap(self, source: str, stream: Any) -> None:
        if source == "redis" and stream is not None and stream.purges_supported:
            return  # the stream's purge log brings what the channel lost
        self.purge_everything(source)

    def _count_purge(self, source: str, result: str) -> None:
        key = (source, result)
        self.purge_counts[key] = self.purge_counts.get(key, 0) + 1

    def _spawn_purge(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._purge_tasks.add(task)
        task.add_done_callback(self._purge_tasks.discard)

    async def _send_purge(self, message: dict[str, Any], fields: dict[str, Any]) -> None:
        loop = asyncio.get_running_loop()
        waits = []
        started = time.monotonic()
        for handle in [*self.workers, *self.old_workers]:
            if handle.state not in ("starting", "ready", "draining"):
                continue
            self._stats_id += 1
            fut: asyncio.Future[dict[str, Any]] = loop.create_future()
            handle.replies[self._stats_id] = fut
            handle.send({**message, "id": self._stats_id})
            waits.append(fut)
        removed = answered = 0
        if waits:
            done, pending = await asyncio.wait(waits, timeout=STATS_TIMEOUT_S)
            for fut in pending:
                fut.cancel()
            for fut in done:
                if not fut.cancelled() and fut.exception() is None:
                    answered += 1
                    removed += int(fut.result().get("removed", 0))
        self.log.emit(
            "purge_applied",
            **fields,
            removed=removed,
            workers=answered,
            of_workers=len(waits),
            ms=round((time.monotonic() - started) * 1000, 1),
        )

    async def _share_rates(self, feed: Any) -> None:
        """Every second: collect the workers' per-address counts, add them in Redis."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(1.0)
            waits = []
            for handle in self.workers:
                if handle.state != "ready":
                    continue
                self._stats_id += 1
                fut: asyncio.Future[dict[str, Any]] = loop.create_future()
                handle.replies[self._stats_id] = fut
                handle.send({"op": "rates", "id": self._stats_id})
                waits.append(fut)
            counts: dict[str, int] = {}
            if waits:
                done, pending = await asyncio.wait(waits, timeout=STATS_TIMEOUT_S)
                for fut in pending:
                    fut.cancel()
                for fut in done:
                    if not fut.cancelled() and fut.exception() is None:
                        for ip, n in fut.result().get("counts", {}).items():
                            counts[ip] = counts.get(ip, 0) + int(n)
            over = await feed.share_rates(counts)
            if over:
                self.log.emit("shared_rate_exceeded", addresses=over[:20], count=len(over))

    async def _expire_bans(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            self.bans.expire(time.time())

    def _bans_changed(self) -> None:
        """The table changed: every worker without a message in flight gets the change now;
        the others get it, with whatever follows, when they acknowledge."""
        for handle in list(self.distributor.workers()):
            self._send_bans(handle)
        self.distributor.trim()
        now = time.monotonic()
        if now - self._bans_logged >= 1.0:  # one line per second at most, however many changes
            self._bans_logged = now
            self.log.emit("bans_updated", active=self.bans.size)

    def _send_bans(self, handle: Any) -> None:
        if handle.state == "exited":
            return
        message = self.distributor.next_message(handle)
        if message is not None:
            handle.send(message)

    # ---------------------------------------------------------------- run
    async def serve(self) -> int:
        supervise = asyncio.create_task(self._supervise())
        await self._stop.wait()
        supervise.cancel()
        if self._acme_task is not None:
            self._acme_task.cancel()
        await self._drain()
        return 0

    def stop(self) -> None:
        self._stop.set()

    async def _supervise(self) -> None:
        """Notice exited workers; an old generation's are forgotten, the current one's are
        respawned (each in its own task: a respawn back-off never holds up supervision)."""
        while True:
            await asyncio.sleep(0.5)
            try:
                self._check_workers()
            except Exception as exc:  # supervision must outlive any bug in one pass
                self.log.emit("supervise_error", error=f"{type(exc).__name__}: {exc}")

    def _check_workers(self) -> None:
        for handle in [*self.workers, *self.old_workers]:
            if handle.state == "exited" or handle.proc.poll() is None:
                continue
            was = handle.state
            handle.state = "exited"
            if handle in self.old_workers:
                self.old_workers.remove(handle)
                continue
            self.log.emit(
                "worker_exited", worker=handle.index, code=handle.proc.returncode, state=was
            )
            if not self.draining and handle.index not in self._respawning:
                task = asyncio.create_task(self._respawn(handle))
                self._respawning[handle.index] = task
                task.add_done_callback(self._respawned)

    def _respawned(self, task: asyncio.Task[None]) -> None:
        for index, t in list(self._respawning.items()):
            if t is task:
                del self._respawning[index]
        if not task.cancelled() and task.exception() is not None:
            self.log.emit("respawn_failed", error=repr(task.exception()))

    async def _respawn(self, handle: WorkerHandle) -> None:
        now = time.monotonic()
        recent = [t for t in self.respawns.get(handle.index, []) if now - t < RESPAWN_WINDOW_S]
        if len(recent) >= RESPAWN_MAX:
            self.log.emit(
                "worker_respawn_suppressed",
                worker=handle.index,
                respawns=len(recent),
                window_s=RESPAWN_WINDOW_S,
            )
            await asyncio.sleep(RESPAWN_WINDOW_S / RESPAWN_MAX)
        async with self._workers_lock:
            # a reload may have replaced the whole generation meanwhile: then nothing to do
            if self.draining or handle not in self.workers:
                return
            recent.append(time.monotonic())
            self.respawns[handle.index] = recent
            new = await self.spawn(handle.index, self.generation)
            self.workers[self.workers.index(handle)] = new
            with contextlib.suppress(ConfigError):
                await self._wait_ready([new])

    # ---------------------------------------------------------------- reload
    def reload(self) -> None:
        """SIGHUP. Reloads never overlap: one arriving during a reload runs once that one is
        done (and reads the file as it is then); any number of them coalesce into one."""
        if self._reload_task is not None:
            self._reload_again = True
            return
        self._reload_task = asyncio.create_task(self._reload_loop())

    async def _reload_loop(self) -> None:
        try:
            self._reload_again = True
            while self._reload_again and not self.draining:
                self._reload_again = False
                async with self._workers_lock:
                    await self._reload()
        finally:
            self._reload_task = None

    async def _reload(self) -> None:
        try:
            config, text = load_file(self.path)
            if config.edge is None:
                raise ConfigError("edge", "the config has no [edge] section")
            control.check_config_size(text)
        except ConfigError as exc:
            self._count_reload("invalid")
            self.log.emit("reload_failed", error=str(exc))
            return
        new = config.edge
        wanted = new.workers or os.cpu_count() or 1
        if wanted != self.nworkers:
            self.log.emit(
                "reload_note",
                note="'workers' changes take effect at restart",
                running=self.nworkers,
                configured=wanted,
            )
        if new.admin_listen != self.config.admin_listen:
            self.log.emit("reload_note", note="'admin_listen' changes take effect at restart")
        if new.decisions != self.config.decisions or _ban_limits(new) != self.bans.limits:
            try:
                await self._start_feeds(new)
            except ConfigError as exc:
                self._count_reload("invalid")
                self.log.emit("reload_failed", error=str(exc))
                return
        if tuple(group_keys(new)) != tuple(self.groups):
            await self._new_generation(new, text)
            return
        results = []
        loop = asyncio.get_running_loop()
        for handle in self.workers:
            self._config_seq += 1
            result: asyncio.Future[str] = loop.create_future()
            handle.config_results[self._config_seq] = result
            handle.send({"op": "config", "text": text, "seq": self._config_seq})
            results.append(result)
        _done, pending = await asyncio.wait(results, timeout=READY_TIMEOUT_S)
        outcomes = [
            "timeout" if f in pending else "exited" if f.cancelled() else f.result()
            for f in results
        ]
        for f in pending:
            f.cancel()
        ok = all(o == "reloaded" for o in outcomes)
        changed = changes(self.config, new)
        # What workers started from now on (respawns) get: the file as it was read here.
        self.config, self.text = new, text
        self._count_reload("ok" if ok else "partial")
        self.log.emit("reloaded" if ok else "reload_partial", outcomes=outcomes, changed=changed)

    async def _new_generation(self, new: EdgeConfig, text: str) -> None:
        """Listen addresses changed: bind the new ones, start a new
        set of workers on the new socket set, then drain the old workers (their connections
        continue). If the new workers do not all come up, everything made for them is undone:
        their processes ended, the sockets bound for them closed, the old generation kept."""
        try:
            groups = self.bind(new)
        except ConfigError as exc:
            self._count_reload("bind_failed")
            self.log.emit("reload_failed", error=str(exc))
            return
        handles: list[WorkerHandle] = []
        try:
            for i in range(self.nworkers):
                handles.append(await self.spawn(i, self.generation + 1, groups, text))
            await self._wait_ready(handles)
        except (ConfigError, OSError) as exc:
            for handle in handles:
                handle.state = "exited"
                if handle.proc.poll() is None:
                    handle.proc.kill()
                with contextlib.suppress(Exception):
                    handle.writer.close()
            for handle in handles:
                await asyncio.to_thread(handle.proc.wait)
            for address, socks in groups.items():
                if address not in self.groups:
                    for sock in socks:
                        sock.close()
            self._count_reload("workers_failed")
            self.log.emit("reload_failed", error=str(exc) or "the new workers failed to start")
            return
        old_groups = self.groups
        self.groups = groups
        self.generation += 1
        old = self.workers
        self.workers = handles
        for handle in old:
            if handle.state != "exited":
                handle.state = "draining"
                handle.send({"op": "drain"})
                self.old_workers.append(handle)
        for address, socks in old_groups.items():
            if address not in groups:
                for s in socks:
                    s.close()
        changed = changes(self.config, new)
        self.config, self.text = new, text
        self._count_reload("ok")
        self.log.emit(
            "reloaded",
            listen=self._bound_addresses(),
            generation=self.generation,
            workers="replaced",
            changed=changed,
        )

    def _count_reload(self, result: str) -> None:
        self.reloads[result] = self.reloads.get(result, 0) + 1

    # ---------------------------------------------------------------- stop
    async def _drain(self) -> None:
        self.draining = True  # no reload or respawn starts from now on
        async with self._workers_lock:  # and one under way finishes first (each is bounded)
            await self._drain_workers()

    async def _drain_workers(self) -> None:
        handles = [*self.workers, *self.old_workers]
        self.log.emit(
            "edge_draining", workers=len(handles), drain_timeout_s=self.config.drain_timeout_s
        )
        for handle in handles:
            handle.state = "draining"
            handle.send({"op": "drain"})
        for socks in self.groups.values():  # workers closed theirs: stop the kernel queueing
            for s in socks:
                s.close()
        deadline = time.monotonic() + self.config.drain_timeout_s + 5.0
        while time.monotonic() < deadline and any(h.proc.poll() is None for h in handles):
            await asyncio.sleep(0.05)
        for handle in handles:
            if handle.proc.poll() is None:
                handle.proc.kill()
                handle.proc.wait()
        await self.admin.close()
        self.log.emit("edge_stopped")

    # ---------------------------------------------------------------- admin
    async def _admin(self, method: str, path: str) -> tuple[int, str, bytes]:
        if path == "/healthz":
            alive = [h for h in self.workers if h.state == "ready" and h.proc.poll() is None]
            ok = not self.draining and len(alive) == len(self.workers)
            body = json.dumps(
                {
                    "status": "ok" if ok else "degraded",
                    "workers": len(alive),
                    "expected": len(self.workers),
                    "draining": self.draining,
                }
            )
            return (200 if ok else 503), "application/json", body.encode() + b"\n"
        if path == "/metrics":
            return (
                200,
                "text/plain; version=0.0.4; charset=utf-8",
                (await self.metrics_text()).encode(),
            )
        if path == "/acme/renew" and self.acme is not None:
            if method != "POST":
                return 405, "text/plain", b"POST renews every ACME certificate now\n"
            if not self.acme.force():
                return 429, "text/plain", b"a forced renewal is already under way\n"
            return 202, "application/json", b'{"status":"renewing"}\n'
        if path == "/":
            return 200, HTML_TYPE, PAGE
        if path == "/status.json":
            merged, specs = await self.metrics_snapshot()
            return 200, JSON_TYPE, status_json("edge", socket.gethostname(), merged, specs)
        return 404, "text/plain", b"not found\n"

    async def metrics_text(self) -> str:
        return render(*await self.metrics_snapshot())

    async def metrics_snapshot(self) -> tuple[Snapshot, list[MetricSpec]]:
        """The workers' numbers merged with the master's own: what /metrics and the status
        page show."""
        loop = asyncio.get_running_loop()
        waits = []
        for handle in [*self.workers, *self.old_workers]:
            if handle.state not in ("ready", "draining"):
                continue
            self._stats_id += 1
            fut: asyncio.Future[dict[str, Any]] = loop.create_future()
            handle.replies[self._stats_id] = fut
            handle.send({"op": "stats", "id": self._stats_id})
            waits.append(fut)
        snaps = []
        if waits:
            done, pending = await asyncio.wait(waits, timeout=STATS_TIMEOUT_S)
            for fut in pending:
                fut.cancel()
            snaps = [f.result() for f in done if not f.cancelled() and f.exception() is None]
        merged = top_ja4(merge(snaps, {**EDGE_SPECS_ALL, **self.mode_metrics}))
        states: dict[str, int] = {}
        for handle in [*self.workers, *self.old_workers]:
            states[handle.state] = states.get(handle.state, 0) + 1
        merged["blindfold_workers"] = [[[k], v] for k, v in states.items()]
        merged["blindfold_config_reloads_total"] = [[[k], v] for k, v in self.reloads.items()]
        merged["blindfold_decisions_active"] = [[[], self.bans.size]]
        merged["blindfold_decisions_refused_total"] = [
            [[reason], n] for reason, n in self.bans.refused.items()
        ]
        merged["blindfold_ban_updates_pending"] = [
            [[], sum(self.distributor.pending(h) for h in self.distributor.workers())]
        ]
        merged["blindfold_ban_resyncs_total"] = [[[], self.distributor.resyncs]]
        merged[PURGE_METRIC.name] = [[[src, res], n] for (src, res), n in self.purge_counts.items()]
        for feed in self.feeds:
            kind = feed.kind
            merged.setdefault("blindfold_decisions_source_up", []).append([[kind], int(feed.up)])
            for result, n in feed.polls.items():
                merged.setdefault("blindfold_decisions_polls_total", []).append([[kind, result], n])
        specs = [*EDGE_METRICS_ALL, *self.mode_metrics.values()]
        if self.acme is not None:
            from blindfold.acme.client import METRICS as ACME_METRICS

            merged.update(self.acme.snapshot())
            specs += ACME_METRICS
        return merged, specs


def _acme_manager(
    config: EdgeConfig, log: Callable[..., None], installed: Callable[[Any], None]
) -> Any:
    """[edge.acme]: the keys (made here) and placeholders before the workers load them."""
    from blindfold.acme.client import AcmeManager
    from blindfold.errors import VerificationError

    assert config.acme is not None
    manager = AcmeManager(config.acme, log, installed)
    try:
        manager.prepare()
    except (OSError, ValueError, VerificationError) as exc:
        raise ConfigError("edge.acme", f"cannot prepare the key files: {exc}") from None
    return manager


def _ban_limits(config: EdgeConfig) -> BanLimits:
    d = config.decisions
    if d is None:
        return BanLimits(ipv6_prefix_len=config.ipv6_prefix_len)
    return BanLimits(
        max_bans=d.max_bans,
        min_prefix_len_v4=d.min_ban_prefix_len_v4,
        min_prefix_len_v6=d.min_ban_prefix_len_v6,
        ipv6_prefix_len=config.ipv6_prefix_len,
    )


def _spec(d: dict[str, Any]) -> MetricSpec:
    """A metric as a worker describes it (`dataclasses.asdict` of its MetricSpec)."""
    return MetricSpec(
        d["name"],
        d["kind"],
        d["help"],
        tuple(d.get("labels") or ()),
        d.get("merge", "sum"),
        tuple(d.get("buckets") or ()),
    )


def run_edge(config_path: str) -> int:
    """`blindfold edge --config FILE`. Returns the exit code (2 for configuration errors)."""
    return run_service(
        "edge",
        config_path,
        "edge",
        "edge-master",
        lambda config, text, path, log: EdgeMaster(path, config, text, log),
    )
