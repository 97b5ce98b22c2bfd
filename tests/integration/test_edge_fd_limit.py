"""An edge worker out of descriptors (issue 15 finding 11): EMFILE at accept made the worker
spin at 100% CPU on its level-triggered listener. Run under a low RLIMIT_NOFILE (prlimit)."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from pathlib import Path

from tests.helpers.clients import get, wait_until
from tests.helpers.edgeproc import EdgeProcess, edge_config, route
from tests.helpers.origin import TlsOrigin


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def test_a_worker_out_of_descriptors_pauses_and_recovers(
    origin: TlsOrigin, site: dict[str, Path], tmp_path: Path
) -> None:
    limit = 128
    text = edge_config(
        route(["example.test"], [f"127.0.0.1:{origin.port}"]),
        workers=1,
        per_ip_rate_per_s=0,
        per_ip_concurrent=10000,
        hello_timeout_s=60,
    )
    edge = EdgeProcess(
        text, tmp_path, name="edge-fds", wrap=["prlimit", f"--nofile={limit}:{limit}", "--"]
    )
    held: list[socket.socket] = []
    try:
        [worker] = edge.worker_pids()
        warning = edge.wait_for(lambda r: r.get("event") == "fd_limit_low", 5)
        assert warning is not None and warning["limit"] == limit  # 20000 / 1 worker cannot fit
        # connections that never send a ClientHello fill the worker's descriptor table
        for i in range(limit - len(os.listdir(f"/proc/{worker}/fd")) + 20):
            held.append(
                socket.create_connection(
                    (("127.0.0.1", edge.port)),
                    timeout=5,
                    source_address=(f"127.0.1.{i % 200 + 1}", 0),
                )
            )
        time.sleep(0.5)  # the worker meets EMFILE
        before = _cpu_s(worker)
        time.sleep(1.0)
        assert _cpu_s(worker) - before < 0.25, "the worker spins while out of descriptors"
        paused = edge.wait_for(lambda r: r.get("event") == "accept_paused", 5)
        assert paused is not None and "Too many open files" in paused["error"]
        for s in held:
            s.close()
        held.clear()
        # the worker accepts again, and its reserve descriptor closed some waiting connections
        assert wait_until(lambda: b"hello from origin" in get(edge.port, ca=site["ca"]), 10)
        assert edge.metric("blindfold_connections_refused_total", reason="fd_limit") > 0
        assert edge.metric("blindfold_connections_refused_total", reason="accept_emfile") > 0
    finally:
        for s in held:
            with contextlib.suppress(OSError):
                s.close()
        edge.stop()
    assert not edge.tracebacks(), "".join(edge.stderr_lines)
