"""The start-up shell of the three daemons (`blindfold edge`, `origin`, `keyserver`).

`run_service` does, in this order, what every one of them needs: check the Python runtime
(io.compat), read and check the config file (a ConfigError is printed naming the key, exit
code 2), raise the descriptor limit, open the JSON log, build and start the service (a
ConfigError then, e.g. a port already taken: exit 2), announce readiness (a `<name>_ready`
log line and sd_notify READY=1), route the signals (SIGTERM and SIGINT: stop accepting, drain,
exit; SIGHUP: reload the config), and return the service's exit code.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Callable
from typing import Any, Protocol

from blindfold.config import Config, load_file
from blindfold.errors import ConfigError
from blindfold.io import compat
from blindfold.io.limits import raise_fd_limit
from blindfold.obs import sdnotify
from blindfold.obs.log import JsonLog

EXIT_CONFIG = 2  # the configuration (or what it names: files, ports) is not usable
EXIT_RUNTIME = 1  # this Python lacks something blindfold relies on


class Service(Protocol):
    async def start(self) -> dict[str, Any]:
        """Bind, load, start: ready to serve on return. ConfigError for what the config does
        not allow (it cleans up what it started). Returns the fields of the ready line;
        `listen` (and `http_listen`) name the addresses it accepts on."""

    def reload(self) -> None:
        """SIGHUP: read the config file again (in the background); a bad one changes
        nothing and is logged."""

    def stop(self) -> None:
        """SIGTERM, SIGINT: stop accepting and drain; `serve` then returns."""

    async def serve(self) -> int:
        """Serve until stopped and drained; the exit code."""


Factory = Callable[[Config, str, str, JsonLog], Service]  # (config, its text, path, log)


def run_service(name: str, path: str, section: str, process: str, make: Factory) -> int:
    """Run the service `make(config, text, path, log)` for the config file at `path`, which
    must have a `[section]`; `process` names the process in log lines."""
    prog = f"blindfold {name}"
    try:
        compat.check()
    except compat.CompatError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    try:
        config, text = load_file(path)
        own = getattr(config, section)
        if own is None:
            raise ConfigError(section, f"{path} has no [{section}] section")
    except ConfigError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    raise_fd_limit()
    log = JsonLog.open(own.log_path, process=process)

    async def main() -> int:
        log.flush_soon(asyncio.get_running_loop().call_soon)  # lines reach the file at once
        try:
            service = make(config, text, path, log)
            ready = await service.start()
        except ConfigError as exc:
            print(f"{prog}: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        loop = asyncio.get_running_loop()

        def stop() -> None:
            sdnotify.stopping()
            service.stop()

        loop.add_signal_handler(signal.SIGTERM, stop)
        loop.add_signal_handler(signal.SIGINT, stop)
        loop.add_signal_handler(signal.SIGHUP, service.reload)
        log.emit(f"{name}_ready", **ready, pid=os.getpid())
        addresses = [*ready.get("listen", ()), *ready.get("http_listen", ())]
        sdnotify.ready(f"listening on {', '.join(addresses)}")
        return await service.serve()

    with contextlib.suppress(KeyboardInterrupt):  # a SIGINT before the handlers are in
        return asyncio.run(main())
    return 0
