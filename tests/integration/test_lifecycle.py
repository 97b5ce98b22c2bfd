"""SIGHUP reloads keep live connections; SIGTERM drains; bad configs never take effect."""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers.clients import get, http_get, tls_connect, wait_until
from tests.helpers.edgeproc import EdgeProcess, edge_config, route
from tests.helpers.nginx import free_port
from tests.helpers.origin import TlsOrigin

Start = Callable[..., EdgeProcess]
OK = b"HTTP/1.1 200 "


@pytest.fixture
def origin_b(site: dict[str, Path]) -> Iterator[TlsOrigin]:
    o = TlsOrigin(site["cert"], site["key"], name="B")
    yield o
    o.close()


def test_reload_keeps_open_connections(
    start_edge: Start, origin: TlsOrigin, origin_b: TlsOrigin, site: dict[str, Path]
) -> None:
    one = route(["example.test"], [f"127.0.0.1:{origin.port}"], name="a")
    edge = start_edge(edge_config(one))
    live = tls_connect(edge.port, "example.test", site["ca"])
    assert b"origin A" in http_get(live, keep_alive=True)
    with pytest.raises((ssl.SSLError, OSError)):
        get(edge.port, "other.test", site["ca"])

    two = one + route(["other.test"], [f"127.0.0.1:{origin_b.port}"], name="b")
    edge.write_config(edge_config(two, per_ip_rate_per_s=1000.0))
    result = edge.reload()
    assert result is not None and result["event"] == "reloaded", result
    assert b"origin B" in get(edge.port, "other.test", site["ca"])  # the new route
    assert b"origin A" in http_get(live, keep_alive=True)  # the old connection lives on
    live.close()
    assert edge.metric("blindfold_config_reloads_total", result="ok") == 1

    edge.write_config("[edge]\nlisten = [\n")  # broken: refused, nothing changes
    result = edge.reload()
    assert result is not None and result["event"] == "reload_failed"
    assert b"origin B" in get(edge.port, "other.test", site["ca"])
    edge.write_config(edge_config(two, workers="four"))
    result = edge.reload()
    assert result is not None and "edge.workers" in result["error"]
    assert edge.metric("blindfold_config_reloads_total", result="invalid") == 2


def test_reload_with_new_listen_address(
    start_edge: Start, origin: TlsOrigin, site: dict[str, Path]
) -> None:
    r = route(["example.test"], [f"127.0.0.1:{origin.port}"])
    first = free_port()
    edge = start_edge(edge_config(r, listen=[f"127.0.0.1:{first}"]))
    live = tls_connect(first, "example.test", site["ca"])
    assert OK in http_get(live, keep_alive=True)
    second = free_port()
    edge.write_config(edge_config(r, listen=[f"127.0.0.1:{second}"]))
    result = edge.reload(timeout=30)
    assert result is not None and result["event"] == "reloaded", result
    assert OK in get(second, "example.test", site["ca"])
    assert OK in http_get(live, keep_alive=True)  # served by the draining old workers
    assert wait_until(lambda: _refused(first), 10)
    live.close()


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return True
    return False


def test_sigterm_drains(start_edge: Start, origin: TlsOrigin, site: dict[str, Path]) -> None:
    edge = start_edge(
        edge_config(route(["example.test"], [f"127.0.0.1:{origin.port}"]), drain_timeout_s=20)
    )
    live = tls_connect(edge.port, "example.test", site["ca"])
    assert OK in http_get(live, keep_alive=True)
    edge.proc.terminate()
    assert edge.wait_for(lambda r: r.get("event") == "edge_draining", 5) is not None
    assert wait_until(lambda: _refused(edge.port), 5)  # no new connections: draining
    assert OK in http_get(live, keep_alive=True)  # the open one continues
    t0 = time.monotonic()
    live.close()
    assert edge.proc.wait(15) == 0
    assert time.monotonic() - t0 < 5  # exits once its last connection ended, not at the deadline


def test_drain_deadline_closes_the_rest(
    start_edge: Start, origin: TlsOrigin, site: dict[str, Path]
) -> None:
    edge = start_edge(
        edge_config(route(["example.test"], [f"127.0.0.1:{origin.port}"]), drain_timeout_s=1)
    )
    live = tls_connect(edge.port, "example.test", site["ca"])
    assert OK in http_get(live, keep_alive=True)
    t0 = time.monotonic()
    edge.proc.terminate()
    assert edge.proc.wait(15) == 0
    assert 0.9 < time.monotonic() - t0 < 6
    live.settimeout(5)
    assert live.recv(100) == b""
    assert any(r.get("outcome") == "drain_timeout" for r in edge.records("conn"))
    live.close()


def test_worker_is_replaced_when_it_dies(
    start_edge: Start, origin: TlsOrigin, site: dict[str, Path]
) -> None:
    import os
    import signal

    edge = start_edge(edge_config(route(["example.test"], [f"127.0.0.1:{origin.port}"])))
    pids = edge.worker_pids()
    assert len(pids) == 2
    os.kill(pids[0], signal.SIGKILL)
    assert edge.wait_for(lambda r: r.get("event") == "worker_exited", 10) is not None
    assert wait_until(
        lambda: len(edge.worker_pids()) == 2 and pids[0] not in edge.worker_pids(), 15
    )
    for i in range(2, 12):  # every source address (both workers' shares) is served again
        assert OK in get(edge.port, "example.test", site["ca"], source=f"127.0.0.{i}")


def _served_everywhere(port: int, sni: str, ca: Path) -> bool:
    """Every worker serves `sni` (source addresses spread connections over the workers)."""
    try:
        return all(OK in get(port, sni, ca, source=f"127.0.0.{i}") for i in range(2, 12))
    except (OSError, ssl.SSLError):
        return False


def test_overlapping_reloads_end_with_the_last_file(
    start_edge: Start, origin: TlsOrigin, origin_b: TlsOrigin, site: dict[str, Path]
) -> None:
    """Two SIGHUPs in a row, the first changing the listen address (a new generation of
    workers): the second must not interleave with it, and the edge must end up running the
    second file, respawned workers included (issue 15 finding 15)."""
    import os
    import signal

    a = route(["example.test"], [f"127.0.0.1:{origin.port}"], name="a")
    b = route(["other.test"], [f"127.0.0.1:{origin_b.port}"], name="b")
    first, second = free_port(), free_port()
    edge = start_edge(edge_config(a, listen=[f"127.0.0.1:{first}"]))
    edge.write_config(edge_config(a, listen=[f"127.0.0.1:{second}"]))
    edge.proc.send_signal(signal.SIGHUP)
    # the second SIGHUP while the first is starting the new generation of workers
    assert wait_until(lambda: len(edge.worker_pids()) > 2, 10, interval=0.005)
    edge.write_config(edge_config(a + b, listen=[f"127.0.0.1:{second}"]))
    edge.proc.send_signal(signal.SIGHUP)
    assert wait_until(lambda: _served_everywhere(second, "other.test", site["ca"]), 30)
    assert wait_until(lambda: _refused(first), 10)
    assert not edge.records("reload_failed")
    # a worker started after the reloads (a respawn) runs the last file too
    assert wait_until(lambda: len(edge.worker_pids()) == 2, 15)  # the old generation is gone
    pids = edge.worker_pids()
    os.kill(pids[0], signal.SIGKILL)
    assert wait_until(lambda: len(set(edge.worker_pids()) - set(pids)) == 1, 15)
    assert wait_until(lambda: _served_everywhere(second, "other.test", site["ca"]), 15)


@pytest.mark.slow
def test_supervision_survives_a_reload_during_a_respawn_back_off(
    start_edge: Start, origin: TlsOrigin, site: dict[str, Path]
) -> None:
    """A worker that keeps dying is respawned after a back-off; a reload that replaces the
    workers during that back-off must not end supervision (issue 15 finding 15)."""
    import os
    import signal

    r = route(["example.test"], [f"127.0.0.1:{origin.port}"])
    edge = start_edge(edge_config(r, listen=[f"127.0.0.1:{free_port()}"]))
    for _ in range(6):  # the sixth death within the window is respawned after a back-off
        pids = edge.worker_pids()
        victim = next(p for p in pids if p == max(pids))  # the newest: the same index
        os.kill(victim, signal.SIGKILL)
        if edge.records("worker_respawn_suppressed"):
            break
        assert wait_until(
            lambda v=victim: (
                edge.records("worker_respawn_suppressed")
                or (len(edge.worker_pids()) == 2 and v not in edge.worker_pids())
            ),
            15,
        )
    assert edge.wait_for(lambda r: r.get("event") == "worker_respawn_suppressed", 10)
    port = free_port()
    edge.write_config(edge_config(r, listen=[f"127.0.0.1:{port}"]))
    result = edge.reload(timeout=30)
    assert result is not None and result["event"] == "reloaded", result
    time.sleep(6.5)  # the back-off (RESPAWN_WINDOW_S / RESPAWN_MAX) runs out: that is the test
    pids = edge.worker_pids()
    assert len(pids) == 2
    for pid in pids:  # the new generation's workers are still supervised
        os.kill(pid, signal.SIGKILL)
    assert wait_until(
        lambda: len(edge.worker_pids()) == 2 and not set(edge.worker_pids()) & set(pids), 20
    )
    assert _served_everywhere(port, "example.test", site["ca"])
    assert not edge.records("supervise_error")


def test_a_failed_new_generation_leaves_nothing_behind(
    start_edge: Start, origin: TlsOrigin, site: dict[str, Path], tmp_path: Path
) -> None:
    """New workers that cannot start (here: a blocklist file they cannot read) undo the
    reload: their processes end and the new listen address is not left bound, accepting
    connections nobody serves (issue 15 finding 15)."""
    r = route(["example.test"], [f"127.0.0.1:{origin.port}"])
    first, second = free_port(), free_port()
    edge = start_edge(edge_config(r, listen=[f"127.0.0.1:{first}"]))
    pids = set(edge.worker_pids())
    assert len(pids) == 2
    edge.write_config(
        edge_config(
            r,
            listen=[f"127.0.0.1:{second}"],
            blocklist_files=[str(tmp_path / "missing.txt")],
        )
    )
    result = edge.reload(timeout=30)
    assert result is not None and result["event"] == "reload_failed", result
    assert _refused(second)
    assert wait_until(lambda: set(edge.worker_pids()) == pids, 10), edge.worker_pids()
    assert _served_everywhere(first, "example.test", site["ca"])
    assert edge.metric("blindfold_config_reloads_total", result="workers_failed") == 1
