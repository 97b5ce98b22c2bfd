"""An origin worker process: serves its share of the site's listeners (TLS, PROXY, HTTP/1.1
and HTTP/2, the WAF, the application) and reports what the decision rules count to the master.

Started by the origin master (`python -m blindfold.origin.worker`) with its listening sockets
as inherited descriptors and a control socket. It reads the config file itself (the master
checked it first), says `ready`, serves until told to `drain` (or until the master goes away),
then finishes its connections and exits.

The control channel carries newline-delimited JSON (blindfold.io.control.encode), both ways:
  master -> worker  {"op": "stats", "id": N}, {"op": "drain"}, {"op": "tls"} (re-read the
                    site's certificate files: a renewal was installed)
  worker -> master  {"op": "ready", ...}, {"op": "config_failed", "key", "error"},
                    {"op": "stats", "id": N, "stats": {...}},
                    {"op": "events", "e": [[kind, ip, now, edge name, edge address, path]...]}
Events (a WAF block, kind "b"; a request on a rate rule's path, kind "r") are batched: sent
EVENT_DELAY_S after the first of a batch, or at once when EVENT_BATCH are waiting.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
from typing import Any

from blindfold.config import load_file
from blindfold.decisions.core import RateRule
from blindfold.errors import ConfigError
from blindfold.io import compat, control
from blindfold.io.limits import raise_fd_limit
from blindfold.obs.log import JsonLog
from blindfold.origin import allocator
from blindfold.origin.edges import Reporter
from blindfold.web.target import path_has_prefix

EVENT_BATCH = 256
EVENT_DELAY_S = 0.002


class MasterLink:
    """The worker's end of the decision rules (gate.RemoteRules): events to the master."""

    def __init__(self, writer: asyncio.StreamWriter | None = None) -> None:
        self.writer = writer
        self.rate_prefixes: tuple[str, ...] = ()
        self._events: list[list[Any]] = []
        self._timer: asyncio.TimerHandle | None = None
        self.sent = 0

    def set_rules(self, rules: tuple[RateRule, ...]) -> None:
        self.rate_prefixes = tuple(r.path_prefix for r in rules)

    def request(self, ip: str, path: bytes, now: float, reporter: Reporter | None) -> None:
        text = path.decode("latin-1")
        for prefix in self.rate_prefixes:
            if path_has_prefix(text, prefix):
                self._add(["r", ip, now, reporter, text])
                return

    def block(self, ip: str, now: float, reporter: Reporter | None, label: str = "") -> None:
        self._add(["b", ip, now, reporter, label])

    def _add(self, event: list[Any]) -> None:
        reporter: Reporter | None = event[3]
        event[3:4] = [reporter.name, reporter.address] if reporter else ["", ""]
        self._events.append(event)
        if len(self._events) >= EVENT_BATCH:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(EVENT_DELAY_S, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._events:
            return
        events, self._events = self._events, []
        if self.writer is not None and not self.writer.is_closing():
            self.writer.write(control.encode({"op": "events", "e": events}))
            self.sent += len(events)


async def _main(args: argparse.Namespace) -> int:
    from blindfold.origin.agent import OriginAgent

    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection(
        sock=socket.socket(fileno=args.control_fd), limit=control.MAX_MESSAGE_BYTES
    )
    link = MasterLink(writer)
    inherited = [(a, bool(tls), int(fd)) for a, tls, fd in json.loads(args.listeners)]
    try:
        config, _ = load_file(args.config)
        if config.origin is None:
            raise ConfigError("origin", "the config has no [origin] section")
        cfg = config.origin
        log = JsonLog.open(cfg.log_path, process=f"origin-worker-{args.index}")
        log.flush_soon(loop.call_soon)  # lines reach the file at once, as the master's do
        agent = OriginAgent(args.config, cfg, log, role="worker", inherited=inherited, remote=link)
        agent.quic_port = args.quic_port
        link.set_rules(agent.rules.rate_rules)
        ready = await agent.start()
    except ConfigError as exc:
        writer.write(control.encode({"op": "config_failed", "key": exc.key, "error": exc.message}))
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        return 2
    for sig in (signal.SIGTERM, signal.SIGINT):  # the master drains us, not a signal to all
        loop.add_signal_handler(sig, agent.stop)
    loop.add_signal_handler(signal.SIGHUP, lambda: None)
    writer.write(
        control.encode(
            {"op": "ready", "pid": os.getpid(), "allocator": allocator.loaded(), **ready}
        )
    )

    async def read_master() -> None:
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                message = json.loads(line)
                op = message.get("op")
                if op == "stats":
                    link.flush()  # what the counters include has reached the master first
                    writer.write(
                        control.encode(
                            {"op": "stats", "id": message.get("id"), **agent.worker_stats()}
                        )
                    )
                elif op == "drain":
                    agent.stop()
                elif op == "tls":  # the master's ACME client installed a renewed chain
                    agent.reload_certificates()
        except (ConnectionError, ValueError):
            pass
        agent.stop()  # drained, or the master went away

    task = loop.create_task(read_master())
    code = await agent.serve()
    link.flush()
    with contextlib.suppress(ConnectionError):
        await writer.drain()
    task.cancel()
    return code


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="blindfold.origin.worker")
    p.add_argument("--index", type=int, required=True)
    p.add_argument("--config", required=True)
    p.add_argument("--control-fd", type=int, required=True)
    p.add_argument("--listeners", required=True, help="JSON [[address, tls, fd], ...]")
    p.add_argument("--quic-port", type=int, default=0, help="the master's HTTP/3 port")
    args = p.parse_args(argv)
    compat.check()
    compat.install_ssl_alerts()
    raise_fd_limit()
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(_main(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
