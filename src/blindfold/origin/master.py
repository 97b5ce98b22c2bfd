"""The origin master: binds the site's listeners, starts and supervises the workers (respawn),
reloads on SIGHUP (a new generation of workers from the new config; the old ones drain), drains
on SIGTERM, and keeps everything that must be one for the whole origin.

What is one (the master's OriginAgent, role "master"): the decision rules, the decision store,
the decision stream for the edges, the Redis publisher, the journal, the admin listener (its
/metrics add up the workers' counters) and HTTP/3 (its UDP listener stays in the master: QUIC
flows cannot be steered to workers by connection ID without eBPF; docs/origin.md).

Workers (origin.worker) serve `listen` and `http_listen`: one SO_REUSEPORT socket per worker
and address, spread by the kernel's hash of the connection's addresses and ports. They send the
master every WAF block and every request on a rate rule's path (batched, a few ms), so N blocks
from one address within the window ban it whichever workers saw them, and rate rules count
across workers. Like the edge's master (edge/master.py), workers are separate interpreters,
not forks.

Per worker (not shared): the per-client limits, and the replay cache of authenticated PROXY
headers; a header is bound to its connection's addresses and ports, and the kernel hashes
those same four to pick the worker, so a replay reaches the worker that saw the original.
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
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from blindfold.config import Config, load_file
from blindfold.config.origin import OriginConfig
from blindfold.errors import ConfigError
from blindfold.io import compat
from blindfold.io.listeners import bind_group
from blindfold.io.service import run_service
from blindfold.obs.log import JsonLog
from blindfold.origin import allocator
from blindfold.origin.agent import OriginAgent
from blindfold.origin.edges import Reporter
from blindfold.origin.gate import count_waf_path

READY_TIMEOUT_S = 30.0
STATS_TIMEOUT_S = 2.0
RESPAWN_WINDOW_S = 30.0
RESPAWN_MAX = 5
DRAIN_TIMEOUT_S = 15.0  # a worker's own drain is bounded at 10 s (OriginAgent.serve)


def worker_count(cfg: OriginConfig) -> int:
    return cfg.workers or os.cpu_count() or 1


@dataclass(eq=False)
class WorkerHandle:
    index: int
    generation: int
    proc: subprocess.Popen[bytes]
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    state: str = "starting"  # starting | ready | draining | exited
    ready: asyncio.Future[None] | None = None
    replies: dict[int, asyncio.Future[dict[str, Any]]] = field(default_factory=dict)
    task: asyncio.Task[None] | None = None
    events: int = 0
    allocator: str = ""  # what the worker says it runs on (origin.allocator.loaded)

    def send(self, message: dict[str, Any]) -> None:
        if self.state != "exited" and not self.writer.is_closing():
            self.writer.write(json.dumps(message).encode() + b"\n")


class OriginMaster:
    def __init__(self, path: str, config: Config, log: JsonLog) -> None:
        assert config.origin is not None
        self.path = path
        self.cfg = config.origin
        self.log = log
        self.agent = OriginAgent(path, self.cfg, log, role="master")
        self.agent.on_certificates = self._certificates_renewed
        self.agent.collect = self._collect
        self.nworkers = worker_count(self.cfg)
        self.groups: dict[tuple[str, bool], list[socket.socket]] = {}
        self.workers: list[WorkerHandle] = []
        self.old_workers: list[WorkerHandle] = []
        self.generation = 0
        self.draining = False
        self.respawns: dict[int, list[float]] = {}
        self._respawning: set[int] = set()
        self._lock = asyncio.Lock()
        self._stats_id = 0
        self._supervisor: asyncio.Task[None] | None = None

    # ---------------------------------------------------------------- listeners
    def bind(self, cfg: OriginConfig) -> dict[tuple[str, bool], list[socket.socket]]:
        """One SO_REUSEPORT group per listen address (kept from `self.groups` when the address
        is already bound)."""
        groups: dict[tuple[str, bool], list[socket.socket]] = {}
        wanted = [(a, True, f"origin.listen[{i}]") for i, a in enumerate(cfg.listen)]
        wanted += [(a, False, f"origin.http_listen[{i}]") for i, a in enumerate(cfg.http_listen)]
        try:
            # an address already bound: by the same text, or the port 0 bound before named now
            bound = {
                (_bound_name(socks[0]), tls): socks for (_a, tls), socks in self.groups.items()
            }
            for address, tls, key in wanted:
                if (address, tls) in self.groups:
                    groups[(address, tls)] = self.groups[(address, tls)]
                    continue
                if (address, tls) in bound:
                    groups[(address, tls)] = bound[(address, tls)]
                    continue
                try:
                    groups[(address, tls)] = bind_group(
                        address, self.nworkers, steer=False, v6only=False
                    )
                except OSError as exc:
                    raise ConfigError(key, f"cannot listen on {address}: {exc.strerror}") from None
        except ConfigError:
            self._close_new(groups)
            raise
        return groups

    def _close_new(self, groups: dict[tuple[str, bool], list[socket.socket]]) -> None:
        kept = {id(s) for socks in self.groups.values() for s in socks}
        for socks in groups.values():
            for s in socks:
                if id(s) not in kept:
                    s.close()

    def _addresses(self, tls: bool) -> list[str]:
        out = []
        for (_address, is_tls), socks in self.groups.items():
            if is_tls == tls:
                host, port = socks[0].getsockname()[:2]
                out.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
        return out

    def _quic_port(self) -> int:
        if self.agent.quic is None:
            return 0
        from blindfold.origin.h3 import advertised_port

        return advertised_port(self.agent.cfg, self.agent.quic)

    # ---------------------------------------------------------------- workers
    async def spawn(
        self,
        index: int,
        generation: int,
        groups: dict[tuple[str, bool], list[socket.socket]],
        cfg: OriginConfig | None = None,
    ) -> WorkerHandle:
        """`cfg`: the config the worker will read (a reload's new one); default the running."""
        setting = (cfg or self.cfg).worker_allocator
        env = allocator.worker_env(setting, os.environ)  # ConfigError before anything opens
        parent, child = socket.socketpair()
        fds = [socks[index].fileno() for socks in groups.values()]
        listeners = [[a, tls, socks[index].fileno()] for (a, tls), socks in groups.items()]
        cmd = [
            sys.executable,
            "-m",
            "blindfold.origin.worker",
            "--index",
            str(index),
            "--config",
            self.path,
            "--control-fd",
            str(child.fileno()),
            "--listeners",
            json.dumps(listeners),
            "--quic-port",
            str(self._quic_port()),
        ]
        proc = subprocess.Popen(cmd, pass_fds=[child.fileno(), *fds], close_fds=True, env=env)
        child.close()
        reader, writer = await asyncio.open_connection(sock=parent, limit=8 << 20)
        handle = WorkerHandle(index, generation, proc, reader, writer)
        handle.ready = asyncio.get_running_loop().create_future()
        handle.task = asyncio.create_task(self._read_worker(handle))
        return handle

    async def _read_worker(self, handle: WorkerHandle) -> None:
        agent = self.agent
        try:
            while True:
                line = await handle.reader.readline()
                if not line:
                    break
                message = json.loads(line)
                op = message.get("op")
                if op == "events":
                    self._apply(message.get("e") or [])
                    handle.events += len(message.get("e") or [])
                elif op == "stats":
                    fut = handle.replies.pop(message.get("id"), None)
                    if fut is not None and not fut.done():
                        fut.set_result(message)
                elif op == "ready":
                    handle.allocator = str(message.get("allocator", ""))
                    if handle.state == "starting":
                        handle.state = "ready"
                    if handle.ready is not None and not handle.ready.done():
                        handle.ready.set_result(None)
                elif op == "config_failed" and handle.ready is not None and not handle.ready.done():
                    handle.ready.set_exception(
                        ConfigError(message.get("key", ""), message.get("error", ""))
                    )
        except ConnectionError:
            pass  # the worker exited (supervision tells)
        except ValueError as exc:
            agent.log.emit("worker_channel_error", worker=handle.index, error=repr(exc))
        finally:
            if handle.ready is not None and not handle.ready.done():
                handle.ready.set_exception(ConfigError("", "a worker exited before it was ready"))
                handle.ready.exception()  # retrieved: nobody may be waiting any more
            for reply in handle.replies.values():
                if not reply.done():
                    reply.cancel()

    def _apply(self, events: list[Any]) -> None:
        """What the workers' gates saw, through the one set of decision rules."""
        agent = self.agent
        rules = agent.rules
        for event in events:
            try:
                kind, ip, now, name, address, path = event
                now = float(now)
            except (TypeError, ValueError):
                continue
            if kind == "b":
                if path:  # the blocked path's label: counted here, in the one TopLabels
                    count_waf_path(agent.stats, agent.waf_paths, str(path), now)
                ban = rules.on_block(str(ip), now)
            elif kind == "r":
                ban = rules.on_request(str(ip), str(path).encode("latin-1", "replace"), now)
            else:
                continue
            if ban is not None:
                reporter = Reporter(str(name), str(address)) if address else None
                agent.ban(*ban, reporter)

    async def _wait_ready(self, handles: list[WorkerHandle]) -> None:
        futures = [h.ready for h in handles if h.ready is not None]
        try:
            await asyncio.wait_for(asyncio.gather(*futures), READY_TIMEOUT_S)
        except TimeoutError:
            raise ConfigError("", "origin workers did not become ready in time") from None

    async def _start_generation(
        self,
        groups: dict[tuple[str, bool], list[socket.socket]],
        cfg: OriginConfig | None = None,
    ) -> list[WorkerHandle]:
        handles: list[WorkerHandle] = []
        try:
            for i in range(self.nworkers):
                handles.append(await self.spawn(i, self.generation + 1, groups, cfg))
            await self._wait_ready(handles)
        except (ConfigError, OSError):
            for h in handles:
                h.state = "exited"
                if h.proc.poll() is None:
                    h.proc.kill()
            for h in handles:
                await asyncio.to_thread(h.proc.wait)
            raise
        self.generation += 1
        return handles

    # ---------------------------------------------------------------- service
    async def start(self) -> dict[str, Any]:
        ready = await self.agent.start()
        try:
            self.groups = self.bind(self.cfg)
            self.workers = await self._start_generation(self.groups)
        except (ConfigError, OSError):
            self._close_new({})
            for socks in self.groups.values():
                for s in socks:
                    s.close()
            self.agent.stop()
            await self.agent.serve()
            raise
        self._supervisor = asyncio.create_task(self._supervise())
        return {
            **ready,
            "listen": self._addresses(True),
            "http_listen": self._addresses(False),
            "workers": self.nworkers,
            "worker_pids": [h.proc.pid for h in self.workers],
            "worker_allocator": sorted({h.allocator for h in self.workers}),
        }

    def stop(self) -> None:
        self.agent.stop()

    async def serve(self) -> int:
        await self.agent.stopping.wait()
        self.draining = True
        async with self._lock:
            if self._supervisor is not None:
                self._supervisor.cancel()
            handles = [*self.workers, *self.old_workers]
            self.log.emit("origin_draining", workers=len(handles))
            for h in handles:
                h.state = "draining"
                h.send({"op": "drain"})
            await self._wait_exit(handles, DRAIN_TIMEOUT_S)
            for socks in self.groups.values():
                for s in socks:
                    s.close()
        return await self.agent.serve()

    async def _wait_exit(self, handles: list[WorkerHandle], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and any(h.proc.poll() is None for h in handles):
            await asyncio.sleep(0.05)
        for h in handles:
            if h.proc.poll() is None:
                h.proc.kill()
                await asyncio.to_thread(h.proc.wait)
            if h.task is not None:  # its last events are in
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait_for(asyncio.shield(h.task), 1.0)

    # ---------------------------------------------------------------- supervision
    async def _supervise(self) -> None:
        while True:
            await asyncio.sleep(0.2)
            try:
                self._check_workers()
            except Exception as exc:  # supervision must outlive any bug in one pass
                self.log.emit("supervise_error", error=f"{type(exc).__name__}: {exc}")

    def _check_workers(self) -> None:
        for h in list(self.old_workers):
            if h.proc.poll() is not None:
                h.state = "exited"
                self.old_workers.remove(h)
                self.log.emit("worker_drained", worker=h.index, generation=h.generation)
        for h in self.workers:
            if h.state == "exited" or h.proc.poll() is None:
                continue
            was, h.state = h.state, "exited"
            self.log.emit("worker_exited", worker=h.index, code=h.proc.returncode, state=was)
            if not self.draining and h.index not in self._respawning:
                self._respawning.add(h.index)
                task = asyncio.create_task(self._respawn(h))
                task.add_done_callback(partial(self._respawned, index=h.index))

    def _respawned(self, task: asyncio.Task[None], *, index: int) -> None:
        self._respawning.discard(index)
        if not task.cancelled() and task.exception() is not None:
            self.log.emit("respawn_failed", worker=index, error=repr(task.exception()))

    async def _respawn(self, handle: WorkerHandle) -> None:
        now = time.monotonic()
        recent = [t for t in self.respawns.get(handle.index, []) if now - t < RESPAWN_WINDOW_S]
        if len(recent) >= RESPAWN_MAX:
            self.log.emit("worker_respawn_suppressed", worker=handle.index, respawns=len(recent))
            await asyncio.sleep(RESPAWN_WINDOW_S / RESPAWN_MAX)
        async with self._lock:
            if self.draining or handle not in self.workers:
                return
            recent.append(time.monotonic())
            self.respawns[handle.index] = recent
            new = await self.spawn(handle.index, self.generation, self.groups)
            self.workers[self.workers.index(handle)] = new
            try:
                await self._wait_ready([new])
            except ConfigError as exc:
                self.log.emit("respawn_failed", worker=handle.index, error=str(exc))
                return
            self.log.emit("worker_respawned", worker=handle.index, pid=new.proc.pid)

    # ---------------------------------------------------------------- reload
    def _certificates_renewed(self) -> None:
        """The ACME client (in this process) installed a renewed chain: every worker re-reads
        the site's certificate files now (new connections get it, open ones keep theirs)."""
        for h in self.workers:
            if h.state != "exited":
                h.send({"op": "tls"})

    def reload(self) -> None:
        """SIGHUP: the master's part (HTTP/3, decision rules, edges' keys) reloads in place;
        then a new generation of workers starts from the new file and the old one drains
        (its connections finish). A config the new workers refuse changes nothing."""
        asyncio.get_running_loop().create_task(self._reload())

    async def _reload(self) -> None:
        async with self._lock:
            if self.draining:
                return
            try:
                config, _ = load_file(self.path)
                if config.origin is None:
                    raise ConfigError("origin", "the config has no [origin] section")
                new = config.origin
                if worker_count(new) != self.nworkers:
                    self.log.emit(
                        "reload_note",
                        note="'workers' changes take effect at restart",
                        running=self.nworkers,
                    )
                groups = self.bind(new)
            except ConfigError as exc:
                self.log.emit("reload_failed", error=str(exc))
                return
            try:
                handles = await self._start_generation(groups, new)
            except (ConfigError, OSError) as exc:
                self._close_new(groups)
                self.log.emit("reload_failed", error=str(exc) or "the new workers failed")
                return
            self.agent.reload()  # logs "reloaded" (or reload_failed)
            old, self.workers = self.workers, handles
            for h in old:
                if h.state != "exited":
                    h.state = "draining"
                    h.send({"op": "drain"})
                    self.old_workers.append(h)
            kept = {id(s) for socks in groups.values() for s in socks}
            for socks in self.groups.values():
                for s in socks:
                    if id(s) not in kept:
                        s.close()
            self.groups = groups
            self.cfg = new

    # ---------------------------------------------------------------- metrics
    async def _collect(self) -> list[dict[str, Any]]:
        loop = asyncio.get_running_loop()
        waits = []
        for h in [*self.workers, *self.old_workers]:
            if h.state not in ("ready", "draining"):
                continue
            self._stats_id += 1
            fut: asyncio.Future[dict[str, Any]] = loop.create_future()
            h.replies[self._stats_id] = fut
            h.send({"op": "stats", "id": self._stats_id})
            waits.append(fut)
        if not waits:
            return []
        done, pending = await asyncio.wait(waits, timeout=STATS_TIMEOUT_S)
        for fut in pending:
            fut.cancel()
        return [f.result() for f in done if not f.cancelled() and f.exception() is None]


def run_origin_master(path: str) -> int:
    """`blindfold origin --config FILE` with workers."""

    def make(config: Config, _text: str, path: str, log: JsonLog) -> OriginMaster:
        compat.install_ssl_alerts()
        return OriginMaster(path, config, log)

    return run_service("origin", path, "origin", "origin", make)


def _bound_name(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
