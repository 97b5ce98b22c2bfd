"""`blindfold origin` with workers (origin/master.py, origin/worker.py), as real processes on
loopback: decisions stay exact across workers (WAF blocks and rate-rule hits seen by different
workers add up to one ban), the admin endpoint sums the workers, a killed worker is respawned,
SIGHUP starts a new generation from the new file while the old one finishes its connections,
SIGTERM drains and exits.

Each request goes on a new connection: the kernel's SO_REUSEPORT hash of the connection's ports
spreads them over both workers (the log line's `process` says which served it)."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from blindfold.origin import allocator
from tests.helpers.edgeproc import OriginProcess

XSS = "/?q=%3Cscript%3Ealert(1)%3C%2Fscript%3E"


def origin_toml(app_port: int, **decisions: Any) -> str:
    d = {"ban_after_blocks": 20, "block_window_s": 60, **decisions}
    rules = d.pop("rate_rules", [])
    out = (
        "[origin]\n"
        f'upstream = "http://127.0.0.1:{app_port}"\n'
        "listen = []\n"
        'http_listen = ["127.0.0.1:0"]\n'
        'proxy_protocol = "off"\n'
        'admin_listen = "127.0.0.1:0"\n'
        "workers = 2\n\n[origin.decisions]\n"
    )
    out += "".join(f"{k} = {json.dumps(v)}\n" for k, v in d.items())
    for rule in rules:
        out += "\n[[origin.decisions.rate_rules]]\n"
        out += "".join(f"{k} = {json.dumps(v)}\n" for k, v in rule.items())
    return out


def get(port: int, target: str, sock: socket.socket | None = None) -> int:
    """One GET (on a new connection unless `sock`); the status."""
    s = sock or socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        s.sendall(f"GET {target} HTTP/1.1\r\nHost: site.test\r\nAccept: */*\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(rest) < length:
            chunk = s.recv(65536)
            if not chunk:
                break
            rest += chunk
        return int(head.split(b" ")[1])
    finally:
        if sock is None:
            s.close()


@pytest.fixture
def origin(tmp_path: Path, app: Any) -> Iterator[OriginProcess]:
    o = OriginProcess(
        origin_toml(
            app.port,
            rate_rules=[{"path_prefix": "/limited", "rate_per_s": 0.01, "burst": 10}],
        ),
        tmp_path,
        name="origin",
    )
    yield o
    o.stop()
    assert not o.tracebacks(), "".join(o.stderr_lines)


def http_port(o: OriginProcess) -> int:
    return int(o.ready["http_listen"][0].rpartition(":")[2])


def served_by(o: OriginProcess, event: str, want: int = 2, **match: Any) -> set[str]:
    """The workers that logged `event` lines matching `match` (they flush each second)."""

    def seen() -> set[str]:
        return {
            r["process"]
            for r in o.records(event)
            if all(r.get(k) == v for k, v in match.items()) and r["process"].startswith("origin-w")
        }

    _wait(lambda: len(seen()) >= want, 3)
    return seen()


def test_blocks_and_rate_hits_seen_by_different_workers_add_up(origin: OriginProcess) -> None:
    port = http_port(origin)
    assert len(origin.ready["worker_pids"]) == 2
    # 19 blocks: one short of ban_after_blocks, spread over both workers
    assert [get(port, XSS) for _ in range(19)] == [403] * 19
    time.sleep(0.3)  # workers report within a few ms
    assert not origin.records("decision")
    assert served_by(origin, "waf", result="blocked") == {"origin-worker-0", "origin-worker-1"}
    # the 20th, whichever worker sees it, bans
    assert get(port, XSS) == 403
    d = origin.wait_for(lambda r: r.get("event") == "decision", 5)
    assert d is not None and d["value"] == "127.0.0.1"
    assert d["reason"] == "waf: 20 blocked requests"
    # rate rule: burst 10 over both workers; the 11th request on its path bans
    for _ in range(11):
        assert get(port, "/limited/x") == 200
    r = origin.wait_for(lambda r: r.get("reason") == "rate: /limited", 5)
    assert r is not None, origin.records("decision")
    assert served_by(origin, "request", path="/limited/x") == {
        "origin-worker-0",
        "origin-worker-1",
    }
    # the admin endpoint reports the sum over the workers
    assert origin.metric("blindfold_waf_blocks_total") == 20
    assert origin.metric("blindfold_origin_requests_total", status="4xx") == 20
    assert origin.metric("blindfold_origin_requests_total", status="2xx") == 11
    assert origin.metric("blindfold_decisions_created_total", cause="waf") == 1
    assert origin.metric("blindfold_decisions_created_total", cause="rate") == 1


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _wait(pred: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return False


def test_killed_worker_is_respawned(origin: OriginProcess) -> None:
    port = http_port(origin)
    victim = origin.ready["worker_pids"][0]
    os.kill(victim, signal.SIGKILL)
    line = origin.wait_for(lambda r: r.get("event") == "worker_respawned", 15)
    assert line is not None and line["worker"] == 0 and line["pid"] != victim
    assert sorted(origin.worker_pids()) == sorted([line["pid"], origin.ready["worker_pids"][1]])
    # both workers serve again: 20 connections, answered by two processes
    assert [get(port, "/") for _ in range(20)] == [200] * 20
    assert served_by(origin, "request") == {"origin-worker-0", "origin-worker-1"}


def test_sighup_new_generation_old_connections_finish(origin: OriginProcess) -> None:
    port = http_port(origin)
    old = set(origin.ready["worker_pids"])
    kept = socket.create_connection(("127.0.0.1", port), timeout=10)
    assert get(port, "/", kept) == 200  # a keep-alive connection held by an old worker
    origin.write_config(
        origin.config_path.read_text().replace(
            "[origin.decisions]", '[origin.waf]\nmode = "detect"\n\n[origin.decisions]'
        )
    )
    assert origin.reload(30) is not None
    assert origin.records("reloaded"), origin.records("reload_failed")
    new = set(origin.worker_pids()) - old
    assert len(new) == 2
    assert get(port, XSS) == 200  # the new workers run the new config (detect only)
    assert get(port, XSS, kept) == 403  # the old worker finishes its connection, as it was
    kept.close()
    assert _wait(lambda: not any(_alive(p) for p in old), 15), "old workers did not exit"


def test_sigterm_drains_workers_and_exits(origin: OriginProcess) -> None:
    pids = origin.ready["worker_pids"]
    assert origin.stop() == 0
    assert not any(_alive(p) for p in pids)
    assert origin.records("origin_draining") and origin.records("origin_stopped")


def test_sighup_with_a_config_the_workers_refuse_keeps_the_running_ones(
    origin: OriginProcess, tmp_path: Path
) -> None:
    """The master reads the file (it parses), but the new workers cannot load its WAF rules:
    the reload fails, the running workers stay and serve."""
    port = http_port(origin)
    before = sorted(origin.worker_pids())
    bad = tmp_path / "bad.conf"
    bad.write_text("SecNoSuchDirective On\n")
    origin.write_config(
        origin.config_path.read_text().replace(
            "[origin.decisions]",
            f'[origin.waf]\nextra_rules_files = ["{bad}"]\n\n[origin.decisions]',
        )
    )
    done = origin.reload(40)
    assert done is not None and done["event"] == "reload_failed", done
    assert "origin.waf" in done["error"]
    assert sorted(origin.worker_pids()) == before
    assert get(port, XSS) == 403 and get(port, "/") == 200


def _maps(pid: int) -> str:
    with open(f"/proc/{pid}/maps") as f:
        return f.read()


@pytest.mark.skipif(
    allocator.resolve("auto") is None, reason="mimalloc is not installed (libmimalloc2.0)"
)
def test_workers_run_on_mimalloc_and_a_reload_applies_worker_allocator(
    origin: OriginProcess,
) -> None:
    """`worker_allocator = "auto"` (the default) preloads mimalloc into every worker, not the
    master; the WAF decides the same on it; a reload's new setting applies to the new
    generation (the new file, not the running one)."""
    port = http_port(origin)
    assert origin.ready["worker_allocator"] == ["mimalloc"]
    for pid in origin.ready["worker_pids"]:
        assert "libmimalloc" in _maps(pid)
        with open(f"/proc/{pid}/environ", "rb") as f:
            assert b"LD_PRELOAD=" in f.read()
    assert "libmimalloc" not in _maps(origin.proc.pid)
    assert [get(port, XSS) for _ in range(4)] == [403] * 4
    assert [get(port, "/") for _ in range(4)] == [200] * 4
    old = set(origin.ready["worker_pids"])
    origin.write_config(
        origin.config_path.read_text().replace(
            "workers = 2\n", 'workers = 2\nworker_allocator = "system"\n'
        )
    )
    assert origin.reload(30) is not None
    assert origin.records("reloaded"), origin.records("reload_failed")
    new = set(origin.worker_pids()) - old
    assert len(new) == 2
    for pid in new:
        assert "libmimalloc" not in _maps(pid)
    assert get(port, XSS) == 403


def test_waf_lines_are_not_lost_when_the_workers_stop(origin: OriginProcess) -> None:
    """Workers write their log lines in batches (one write per loop turn): a stop right after
    the last request still has every request's `waf` line."""
    port = http_port(origin)
    for i in range(12):
        assert get(port, f"{XSS}&n={i}") == 403
    assert origin.stop() == 0
    blocked = [r for r in origin.records("waf") if r.get("result") == "blocked"]
    assert sorted(r["uri"].rpartition("=")[2] for r in blocked) == sorted(str(i) for i in range(12))
