"""An edge worker process: accepts on its share of the listeners, runs the guards and relays,
and runs the routes' modes (the registry, `edge.modes`; this is the one module that uses it).

Started by the edge master (`python -m blindfold.edge.worker`), it receives the validated config
text over the control channel, serves until told to drain, and exits when its last connection
has ended (or at the drain deadline). If the master goes away the worker drains and exits.

Passthrough routes run on a bare epoll reactor (io.reactor: the hot path). The first route whose
mode needs asyncio (TLS and HTTP at the edge) moves the reactor into an asyncio loop, at start
or on a reload, with the connections it holds.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import dataclasses
import errno
import gc
import ipaddress
import json
import os
import signal
import socket
import sys
from collections.abc import Awaitable
from typing import Any

from blindfold.config import loads
from blindfold.config.edge import EdgeConfig
from blindfold.core.iplist import parse_address
from blindfold.core.proxyproto import load_auth_key
from blindfold.core.ratelimit import TokenBucket
from blindfold.core.routing import SniRouter
from blindfold.decisions.purge import purge_from_json
from blindfold.edge.bans import BanUpdates
from blindfold.edge.connection import Conn
from blindfold.edge.guards import Guards
from blindfold.edge.lists import ListSet
from blindfold.edge.mode import Mode, RouteState
from blindfold.edge.modes import MODES, metrics
from blindfold.edge.origins import Origin, OriginPool, resolve
from blindfold.edge.stats import WorkerStats
from blindfold.errors import ConfigError, ProtocolError
from blindfold.io import compat
from blindfold.io.accepted import BACKOFF_MIN_S, RESOURCE_ERRNOS, Backoff, FdReserve, fd_limit
from blindfold.io.compat import CSocket
from blindfold.io.control import ControlChannel
from blindfold.io.limits import raise_fd_limit
from blindfold.io.reactor import EPOLLIN, Reactor, Timer
from blindfold.io.relay import PipePool
from blindfold.obs.log import JsonLog

ACCEPT_BATCH = 64
SWEEP_INTERVAL_S = 1.0


class Worker:
    def __init__(
        self,
        index: int,
        workers: int,
        control_fd: int,
        listeners: list[tuple[str, int]],
    ) -> None:
        self.index = index
        self.workers = workers
        self.reactor = Reactor()
        self.stats = WorkerStats()
        self.conns: set[Conn] = set()
        self.relaying: set[Conn] = set()
        self.listeners: dict[int, tuple[str, socket.socket]] = {}
        self._pending_listeners = listeners
        self.config: EdgeConfig  # set by the first "config" message, before listening
        self.configured = False
        self.log = JsonLog(1, process=f"edge-worker-{index}")
        self.draining = False
        self._drain_deadline = 0.0
        self._next_list_check = 0.0
        self._refusal_log = TokenBucket(200.0, 200, 0.0)
        self.suppressed_logs = 0
        self.closed_by_ban = 0
        self.rate_counts: dict[str, int] = {}  # new connections per address, when shared
        self.share_rates = False
        self._log_flushed = 0.0
        self._log_timer: Timer | None = None
        self.block: ListSet | None = None
        self.allow: ListSet | None = None
        # Modes that terminate TLS need asyncio (TLS, HTTP, the key server client): the reactor
        # then runs inside an asyncio loop; passthrough-only workers keep the bare epoll loop.
        self.loop: asyncio.AbstractEventLoop | None = None
        self.modes: dict[str, Mode] = {}  # made the first time a route names one
        self._purges: set[asyncio.Task[None]] = set()  # purges scanning caches (Mode.purge)
        self.routes: list[RouteState] = []
        self.router: SniRouter[RouteState] = SniRouter([])
        self.ban_updates = BanUpdates(self)
        self.control = ControlChannel(
            self.reactor, control_fd, self._on_control, self._on_master_gone, self._control_error
        )
        self.reserve = FdReserve()  # for the moment accept() fails with EMFILE

    # ---------------------------------------------------------------- config
    def apply_config(self, text: str) -> None:
        """Build everything a config needs first, then swap it in; a bad config changes
        nothing (the master validated it, but list files may have changed since)."""
        config = loads(text).edge
        if config is None:
            raise ConfigError("edge", "the config has no [edge] section")
        now = self.reactor.now
        first = not self.configured
        block = ListSet(
            "blocklist",
            "blocklist_files",
            config.blocklist_files,
            config.block,
            self.block,
            strict=first,
        )
        allow = ListSet(
            "allowlist",
            "allowlist_files",
            config.allowlist_files,
            config.allow,
            self.allow,
            strict=first,
        )
        old_routes = {r.name: r for r in self.routes}
        routes: list[RouteState] = []
        entries: list[tuple[str, RouteState]] = []
        default = None
        for i, rc in enumerate(config.routes):
            name = config.route_name(i)
            where = f"edge.routes[{i}]"
            old = old_routes.get(name)
            old_origins = {o.text: o for o in old.pool.origins} if old else {}
            origins = []
            for j, text in enumerate(rc.origins):
                try:
                    family, sockaddr = resolve(text)
                except OSError as exc:
                    raise ConfigError(
                        f"{where}.origins[{j}]", f"cannot resolve {text!r}: {exc}"
                    ) from None
                origin = old_origins.get(text)
                if origin is None:
                    origin = Origin(text, family, sockaddr)
                else:  # the same object: live connections keep their counts right
                    origin.family, origin.sockaddr = family, sockaddr
                origins.append(origin)
            mode = self._mode(rc.mode)
            self.stats.route(name).mode = rc.mode
            state = mode.build(
                where, rc, config, old.state if old is not None and old.mode is mode else None
            )
            route = RouteState(
                name,
                OriginPool(origins, rc.balance, config.origin_down_s),
                rc.proxy_protocol,
                rc.proxy_protocol_tlvs,
                self.stats.route(name),
                mode,
                state,
                (
                    rc.proxy_auth_name,
                    load_auth_key(rc.proxy_auth_key_file, f"{where}.proxy_auth_key_file"),
                )
                if rc.proxy_auth_key_file
                else None,
            )
            routes.append(route)
            entries.extend((pattern, route) for pattern in rc.sni)
            if rc.default:
                default = route
        # -- commit
        self.routes = routes
        self.router = SniRouter(entries, default)
        for mode in self.modes.values():
            mode.configured(self._routes_of(mode))
        if first:
            self.guards = Guards(config, self.workers, now)
            self.log = JsonLog.open(config.log_path, process=f"edge-worker-{self.index}")
            self._flush_in_loop()
            self._check_fd_limit(config)
            self.reactor.on_idle(self._flush_log)
            self.pipes = PipePool(config.pipe_size_bytes)
        else:
            self.guards.configure(config, self.workers, now)
            if self.pipes.size != config.pipe_size_bytes:
                self.pipes.clear()
                self.pipes = PipePool(config.pipe_size_bytes)
        self.relay_mode = config.relay
        self.share_rates = bool(config.decisions and config.decisions.redis_url)
        self.block, self.allow = block, allow
        self.guards.block, self.guards.allow = block.ipset, allow.ipset
        self._refusal_log = TokenBucket(
            config.log_refused_per_s or 1e9, max(1, int(config.log_refused_per_s or 1e9)), now
        )
        self.config = config
        self.configured = True
        self._note_lists()
        for name, lst in (("blocklist", block), ("allowlist", allow)):
            for path, err in lst.errors[:20]:
                self.log.log(
                    "list_entry_invalid",
                    list=name,
                    path=path,
                    line=err.line,
                    text=err.text,
                    problem=err.problem,
                )

    def _mode(self, name: str) -> Mode:
        """This worker's instance of mode `name`, made on first use (moving the reactor into
        asyncio first when the mode needs it)."""
        mode = self.modes.get(name)
        if mode is None:
            cls = MODES[name]
            if cls.needs_asyncio and self.loop is None:
                self._use_asyncio()
            mode = self.modes[name] = cls(self)
        return mode

    def _routes_of(self, mode: Mode) -> list[RouteState]:
        return [r for r in self.routes if r.mode is mode]

    def _use_asyncio(self) -> None:
        """From now on the reactor runs inside an asyncio loop: `run()` returns from the bare
        loop after this round of events and runs the asyncio loop instead. Connections, timers
        and signal handlers carry over."""
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self.loop = loop
        self.reactor.attach(loop)
        self._flush_in_loop()

    def _flush_in_loop(self) -> None:
        """Lines logged by asyncio code (keyless, blind requests) may come with no reactor
        event after them: a flush within 50 ms, one per batch."""
        loop = self.loop
        if loop is not None:
            self.log.flush_soon(lambda flush: loop.call_later(0.05, flush))

    @property
    def now(self) -> float:
        return self.reactor.now

    def _check_fd_limit(self, config: EdgeConfig) -> None:
        """Warn when this worker's share of max_connections cannot all be open: each relayed
        connection takes a descriptor for the visitor and one for the origin."""
        share = -(-config.max_connections // self.workers)
        needed = 2 * share + 64
        limit = fd_limit()
        if needed > limit:
            self.log.log(
                "fd_limit_low",
                limit=limit,
                needed=needed,
                worker=self.index,
                problem="this worker's share of max_connections cannot all be open; raise "
                "`ulimit -n` or lower max_connections",
            )

    def _note_lists(self) -> None:
        assert self.block is not None and self.allow is not None
        self.stats.list_entries = {
            "blocklist": self.block.ipset.size,
            "allowlist": self.allow.ipset.size,
        }
        self.stats.list_reloads["ok"] = self.stats.list_reloads.get("ok", 0) + 1

    def _flush_log(self) -> None:
        # batch: one write per 64 lines or per 50 ms, not one per poll round
        log = self.log
        if not log.pending:
            return
        if log.pending >= 64 or self.reactor.now - self._log_flushed >= 0.05:
            log.flush()
            self._log_flushed = self.reactor.now
        elif self._log_timer is None:  # no later poll round may come soon: a timer wakes one
            self._log_timer = self.reactor.call_later(0.05, self._log_timer_fired)

    def _log_timer_fired(self) -> None:
        self._log_timer = None
        self._flush_log()

    def may_log_refusal(self) -> bool:
        if self._refusal_log.allow(self.reactor.now):
            return True
        self.suppressed_logs += 1
        return False

    # ---------------------------------------------------------------- accept
    def _start_listening(self) -> None:
        datagram_sockets = []
        for address, fd in self._pending_listeners:
            sock = socket.socket(fileno=fd)
            sock.setblocking(False)
            if sock.type == socket.SOCK_DGRAM:  # QUIC: served by the modes (passthrough's)
                datagram_sockets.append(sock)
                continue
            self.listeners[fd] = (address, sock)
            self.stats.accepted.setdefault(address, 0)
            self.reactor.add(fd, EPOLLIN, self._make_acceptor(address, sock))
        self._pending_listeners = []
        for mode in self.modes.values():
            mode.listening(datagram_sockets)

    def _make_acceptor(self, address: str, lsock: socket.socket):  # type: ignore[no-untyped-def]
        accepted = self.stats.accepted
        guards = self.guards
        reactor = self.reactor
        host, port = lsock.getsockname()[:2]
        # the PROXY header's destination: fixed for a listener on one address
        local = None if ipaddress.ip_address(host).is_unspecified else (host, port)

        family = lsock.family
        raw_accept = compat.raw_accept(lsock)  # (fd, addr): no socket object made

        backoff = Backoff()

        def on_accept(_mask: int) -> None:
            if backoff.delay_s:
                backoff.succeeded()  # called again after a pause: the pause is over
            for _ in range(ACCEPT_BATCH):
                try:
                    fd, peer = raw_accept()
                    # the C socket type: socket.socket's Python layer (IntEnum conversions,
                    # io refcounts) costs more per connection than the rest of accept
                    sock = CSocket(family, socket.SOCK_STREAM, 0, fd)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError as exc:
                    if exc.errno in RESOURCE_ERRNOS:
                        self._accept_starved(address, lsock, backoff, exc)
                        return
                    continue  # ECONNABORTED, EPROTO...: that one connection, not the listener
                accepted[address] += 1
                ip, port = peer[0], peer[1]
                try:
                    version, addr = parse_address(ip)
                except ProtocolError:
                    sock.close()
                    continue
                refused, adm = guards.admit(version, addr, reactor.now)
                if refused is not None or adm is None:
                    sock.close()
                    self._refused_at_accept(ip, port, refused or "refused")
                    continue
                sock.setblocking(False)
                if self.share_rates and len(self.rate_counts) < 50_000:
                    self.rate_counts[ip] = self.rate_counts.get(ip, 0) + 1
                conn = Conn(self, sock, ip, port, adm, local)
                self.conns.add(conn)
                conn.start()

        return on_accept

    def _accept_starved(
        self, address: str, lsock: socket.socket, backoff: Backoff, exc: OSError
    ) -> None:
        """accept() failed for lack of descriptors or memory. The listener stays readable
        (level-triggered), so returning would call us again at once and spin: give up the
        reserve descriptor to accept and close one waiting connection, then take the listener
        out of the poll set for a pause (50 ms doubling to 1 s while it lasts)."""
        name = errno.errorcode.get(exc.errno or 0, str(exc.errno)).lower()
        self.stats.refuse(f"accept_{name}")
        if self.reserve.shed_one(lsock):
            self.stats.refuse("fd_limit")
        delay = backoff.failed()
        if delay == BACKOFF_MIN_S:  # once per episode
            self.log.log(
                "accept_paused",
                listener=address,
                error=str(exc),
                limit=fd_limit(),
                worker=self.index,
            )
        fd = lsock.fileno()
        if fd in self.listeners:
            self.reactor.modify(fd, 0)
            self.reactor.call_later(delay, lambda: self._resume_accepting(fd))

    def _resume_accepting(self, fd: int) -> None:
        if fd in self.listeners and not self.draining:
            self.reactor.modify(fd, EPOLLIN)

    def _refused_at_accept(self, ip: str, port: int, reason: str) -> None:
        self.stats.refuse(reason)
        if self.config.log_connections and self.may_log_refusal():
            self.log.line(
                f'"client":"{ip}","client_port":{port},"sni":null,"alpn":[],"ja4":null,'
                f'"route":null,"origin":null,"outcome":"refused","reason":"{reason}",'
                f'"bytes_in":0,"bytes_out":0,"duration_s":0.0,"worker":{self.index}'
            )

    # ---------------------------------------------------------------- housekeeping
    def _sweep(self) -> None:
        now = self.reactor.now
        config = self.config
        idle = config.idle_timeout_s
        idle_conns = []
        for conn in self.relaying:  # activity = bytes moved since the last look
            moved = conn.relay.moved if conn.relay is not None else conn.moved
            if moved != conn.moved:
                conn.moved = moved
                conn.last = now
            elif now - conn.last > idle:
                idle_conns.append(conn)
        for conn in idle_conns:
            conn.close("idle_timeout", "idle_timeout")
        self.guards.sweep(now)
        for mode in self.modes.values():
            mode.sweep(self._routes_of(mode), now)
        if now >= self._next_list_check:
            self._next_list_check = now + config.list_check_interval_s
            self._refresh_lists()
        if self.draining and now >= self._drain_deadline:
            for conn in list(self.conns):
                conn.close("drain_timeout", "drain_timeout")
        if self.draining and not self.conns:
            self.reactor.stop()
            return
        self.reactor.call_later(SWEEP_INTERVAL_S, self._sweep)

    def _refresh_lists(self) -> None:
        changed = False
        for lst in (self.block, self.allow):
            assert lst is not None
            did, problems = lst.refresh()
            for problem in problems:
                self.log.log("list_reload_failed", list=lst.name, problem=problem)
                self.stats.list_reloads["error"] = self.stats.list_reloads.get("error", 0) + 1
            changed |= did
        if changed:
            assert self.block is not None and self.allow is not None
            self.guards.block, self.guards.allow = self.block.ipset, self.allow.ipset
            self._note_lists()
            self.log.log(
                "lists_reloaded", blocklist=self.block.ipset.size, allowlist=self.allow.ipset.size
            )

    # ---------------------------------------------------------------- control
    def _on_control(self, message: dict[str, Any]) -> None:
        op = message.get("op")
        if op == "config":
            seq = message.get("seq")  # echoed: the master matches answers to its requests
            try:
                self.apply_config(message["text"])
            except ConfigError as exc:
                self.control.send({"op": "config_failed", "error": str(exc), "seq": seq})
                return
            if not self._pending_listeners:
                self.control.send({"op": "reloaded", "seq": seq})
            elif self.ban_updates.synced:
                self._go_live()
            else:
                self.ban_updates.resume()  # listening starts once the ban set is in (bans_synced)
        elif op == "stats":
            self.control.send({"op": "stats", "id": message.get("id"), "metrics": self.snapshot()})
        elif op == "drain":
            self.drain()
        elif op == "rates":
            counts, self.rate_counts = self.rate_counts, {}
            self.control.send({"op": "rates", "id": message.get("id"), "counts": counts})
        elif op == "bans":
            self.ban_updates.push(message)
        elif op == "purge":
            self.purge(message)

    def purge(self, message: dict[str, Any]) -> None:
        """A purge from the master (decisions.purge), or `all`: every mode's caches; answered
        (`purged`, with the entries removed) once every mode is done."""
        purge = None if message.get("all") is True else purge_from_json(message.get("purge"))
        removed = 0
        pending: list[Awaitable[int]] = []
        for mode in self.modes.values():
            result = mode.purge(self._routes_of(mode), purge)
            if isinstance(result, int):
                removed += result
            else:
                pending.append(result)
        if not pending or self.loop is None:
            self.control.send({"op": "purged", "id": message.get("id"), "removed": removed})
            return

        async def finish() -> None:
            total = removed + sum(await asyncio.gather(*pending))
            self.control.send({"op": "purged", "id": message.get("id"), "removed": total})

        task = self.loop.create_task(finish())
        self._purges.add(task)  # held: asyncio keeps only weak references to tasks
        task.add_done_callback(self._purges.discard)

    def _control_error(self, problem: str, exc: BaseException) -> None:
        self.log.log("control_error", problem=problem, error=repr(exc)[:500], worker=self.index)

    def _go_live(self) -> None:
        self._start_listening()
        self.reactor.call_later(SWEEP_INTERVAL_S, self._sweep)
        # the metrics the modes report: the master renders what it is told of
        specs = [dataclasses.asdict(spec) for spec in metrics()]
        self.control.send({"op": "ready", "pid": os.getpid(), "metrics": specs})

    def bans_synced(self) -> None:
        """The first ban set is in: a new worker starts accepting only now, so a respawned
        worker never lets its share of banned visitors through while it loads."""
        if self._pending_listeners and self.configured and not self.draining:
            self._go_live()

    def close_banned_later(self, doomed: list[Conn]) -> None:
        """New connections from a banned address are refused at accept; its open ones are
        closed after the grace (so the response that earned the ban still reaches it)."""
        decisions = self.config.decisions
        grace = decisions.close_grace_s if decisions is not None else 0.0
        self.reactor.call_later(grace, lambda: self._close_banned(doomed))

    def bans_checked(self) -> None:
        """New bans are in: the modes end what they hold for banned addresses (QUIC flows)."""
        decisions = self.config.decisions
        grace = decisions.close_grace_s if decisions is not None else 0.0
        for mode in self.modes.values():
            mode.bans_changed(grace)

    def _close_banned(self, doomed: list[Conn]) -> None:
        closed = 0
        for conn in doomed:
            if conn in self.conns and self.guards.is_banned(*parse_address(conn.ip)):
                conn.close("banned", "banned")
                closed += 1
        self.closed_by_ban += closed
        if closed:
            self.log.log("banned_connections_closed", closed=closed, worker=self.index)

    def snapshot(self) -> dict[str, Any]:
        origins = []
        now = self.reactor.now
        for route in self.routes:
            for o in route.pool.origins:
                origins.append((route.name, o.text, int(o.is_up(now)), o.active, o.failures))
        snap = self.stats.snapshot(
            len(self.conns),
            self.guards.tracked,
            self.log.dropped,
            origins,
            self.guards.rule_matches,
        )
        snap["blindfold_log_lines_suppressed_total"] = [[[], self.suppressed_logs]]
        snap["blindfold_connections_closed_by_ban_total"] = [[[], self.closed_by_ban]]
        for mode in self.modes.values():
            # modes may report the same metric (blindfold_certificate_expiry_seconds)
            for name, samples in mode.snapshot(self._routes_of(mode)).items():
                snap.setdefault(name, []).extend(samples)
        return snap

    def drain(self) -> None:
        if self.draining:
            return
        self.draining = True
        self._drain_deadline = self.reactor.now + self.config.drain_timeout_s
        for fd, (_address, sock) in list(self.listeners.items()):
            self.reactor.remove(fd)
            sock.close()
        self.listeners.clear()
        for mode in self.modes.values():
            mode.drain()
        self.log.log(
            "draining",
            worker=self.index,
            connections=len(self.conns),
            deadline_s=self.config.drain_timeout_s,
        )
        if not self.conns:  # nothing to wait for: stop now, not at the next sweep
            self._sweep()

    def _on_master_gone(self) -> None:
        self.drain()

    def run(self) -> None:
        self.reactor.add_signal(signal.SIGTERM, self.drain)
        self.reactor.add_signal(signal.SIGINT, self.drain)
        if self.loop is None:
            self.reactor.run()  # returns when stopped, or when a mode moved it into asyncio
        if self.loop is not None:
            self.loop.run_forever()
        self.log.emit("worker_exit", worker=self.index)


def _die_with_parent() -> None:
    """Linux: SIGTERM us if the master dies without telling us (PR_SET_PDEATHSIG)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="blindfold-edge-worker")
    ap.add_argument("--index", type=int, required=True)
    ap.add_argument("--workers", type=int, required=True)
    ap.add_argument("--control-fd", type=int, required=True)
    ap.add_argument("--listeners", required=True, help="JSON list of [address, fd]")
    args = ap.parse_args(argv)
    _die_with_parent()
    raise_fd_limit()
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the master handles reloads
    listeners = [(str(a), int(fd)) for a, fd in json.loads(args.listeners)]
    # Connections make no reference cycles (they are broken at close), so the cyclic collector
    # has little to find; run it rarely and keep start-up objects out of its scans.
    gc.set_threshold(20000, 50, 50)
    worker = Worker(args.index, args.workers, args.control_fd, listeners)
    gc.freeze()
    worker.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
