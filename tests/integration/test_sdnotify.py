"""Readiness for systemd (Type=notify): each of the edge master, the origin agent and the key
server sends READY=1 on $NOTIFY_SOCKET from its main PID once its listeners accept, and not
before (systemd then starts what depends on it)."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from blindfold import pki
from tests.helpers.edgeproc import BlindfoldProcess, EdgeProcess, edge_config, route
from tests.helpers.keyless import KeyServerProcess, keyserver_config, make_pki
from tests.helpers.notify import NotifySocket
from tests.helpers.topology import origin_config


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifySocket]:
    receiver = NotifySocket(tmp_path / "notify")
    monkeypatch.setenv("NOTIFY_SOCKET", receiver.address)  # inherited by the processes
    yield receiver
    receiver.close()


def _check_ready(proc: BlindfoldProcess, receiver: NotifySocket) -> None:
    got = receiver.receive(10)
    assert got is not None, f"{proc.kind} sent no READY=1"
    fields, sender = got
    assert fields["READY"] == "1"
    assert sender == proc.proc.pid, "sent by a child, not the main process (NotifyAccess=main)"
    assert fields["MAINPID"] == str(proc.proc.pid)
    assert f"127.0.0.1:{proc.port}" in fields["STATUS"]
    with socket.create_connection(("127.0.0.1", proc.port), timeout=5):
        pass  # what it announced accepts connections
    assert receiver.receive(0.2) is None, "one READY=1 per start"


def test_edge_reports_ready(
    notify_socket: NotifySocket, start_edge: Callable[..., EdgeProcess]
) -> None:
    edge = start_edge(edge_config(route(["example.test"], ["127.0.0.1:9"])))
    _check_ready(edge, notify_socket)


def test_origin_reports_ready(
    notify_socket: NotifySocket,
    start_origin: Callable[..., BlindfoldProcess],
    site: dict[str, Path],
    app: Any,
    tmp_path: Path,
) -> None:
    origin = start_origin(origin_config(site, app.port, tmp_path))
    _check_ready(origin, notify_socket)


def test_keyserver_reports_ready(
    notify_socket: NotifySocket, ca: pki.Issued, tmp_path: Path
) -> None:
    p = make_pki(tmp_path, ca)
    ks = KeyServerProcess(keyserver_config(p, {"edge1": ["example.test"]}), tmp_path, name="ks")
    try:
        _check_ready(ks, notify_socket)
    finally:
        ks.stop()
    assert not ks.tracebacks()


def test_every_daemon_reports_stopping_then_exits_0(
    notify_socket: NotifySocket,
    start_edge: Callable[..., EdgeProcess],
    start_origin: Callable[..., BlindfoldProcess],
    site: dict[str, Path],
    app: Any,
    tmp_path: Path,
    ca: pki.Issued,
) -> None:
    """One start-up shell (io.service) for the three: READY=1 when listening, STOPPING=1 on
    SIGTERM from the main PID, then a clean exit (0) once drained."""
    p = make_pki(tmp_path, ca)
    procs: list[BlindfoldProcess] = [
        start_edge(edge_config(route(["example.test"], ["127.0.0.1:9"]))),
        start_origin(origin_config(site, app.port, tmp_path)),
        KeyServerProcess(keyserver_config(p, {"edge1": ["example.test"]}), tmp_path, name="ks"),
    ]
    for proc in procs:
        got = notify_socket.receive(10)
        assert got is not None and got[0]["READY"] == "1", proc.kind
        assert got[1] == proc.proc.pid
    for proc in procs:
        assert proc.stop() == 0, (proc.kind, "".join(proc.stderr_lines))
        got = notify_socket.receive(10)
        assert got is not None and got[0] == {"STOPPING": "1"}, (proc.kind, got)
        assert got[1] == proc.proc.pid
        assert not proc.tracebacks(), "".join(proc.stderr_lines)
