"""The edge relays a TLS session without ever holding its plaintext.

strace records every byte the edge's worker processes read from and write to sockets (the
relay runs in copy mode so that every byte passes through the process; in the default mode bulk
bytes do not even enter it). The recording must contain the TLS session (its ClientHello, whose
SNI is cleartext by design) and none of the application's plaintext: not the request path, not
the response body.
"""

from __future__ import annotations

import re
import secrets
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

from tests.conftest import need
from tests.helpers.clients import http_get, tls_connect, wait_until
from tests.helpers.edgeproc import EdgeProcess, edge_config, route
from tests.helpers.origin import TlsOrigin

Start = Callable[..., EdgeProcess]
_QUOTED = re.compile(r'"((?:\\x[0-9a-f]{2})*)"')


def recorded_bytes(trace: Path) -> bytes:
    out = bytearray()
    for line in trace.read_text(errors="replace").splitlines():
        for match in _QUOTED.finditer(line):
            out += bytes.fromhex(match.group(1).replace("\\x", ""))
    return bytes(out)


def test_no_plaintext_passes_through_the_edge(
    start_edge: Start, origin: TlsOrigin, site: dict[str, Path], marker: str, tmp_path: Path
) -> None:
    edge = start_edge(
        edge_config(
            route(["example.test"], [f"127.0.0.1:{origin.port}"], proxy_protocol="none"),
            relay="copy",
        )
    )
    trace = tmp_path / "edge.strace"
    cmd = [
        need("strace"),
        "-f",
        "-qq",
        "-xx",
        "-s",
        "100000000",
        "-o",
        str(trace),
        "-e",
        "trace=read,write,readv,writev,recvfrom,sendto,recvmsg,sendmsg,splice",
    ]
    for pid in edge.worker_pids():
        cmd += ["-p", str(pid)]
    tracer = subprocess.Popen(cmd, stderr=subprocess.PIPE)
    try:
        assert wait_until(lambda: _traced_by(edge.worker_pids(), tracer.pid), 10)
        path = "/hello-" + secrets.token_hex(8)
        body = b""
        for _ in range(3):
            with tls_connect(edge.port, "example.test", site["ca"]) as tls:
                body += http_get(tls, path)
        assert marker.encode() in body  # the client did get the plaintext
        # the edge logs each connection once it has closed it: every relayed byte is traced
        assert wait_until(lambda: len(edge.conn_lines()) >= 3, 10)
    finally:
        tracer.send_signal(signal.SIGINT)
        tracer.wait(10)
    seen = recorded_bytes(trace)
    assert b"example.test" in seen  # the recording works: the cleartext SNI is there
    assert seen.count(b"\x16\x03\x01") >= 3  # three ClientHellos
    assert len(seen) > 3 * 2000  # and the encrypted sessions both ways
    assert marker.encode() not in seen
    assert path.encode() not in seen
    assert b"hello from origin" not in seen
    assert b"HTTP/1.1" not in seen


def _traced_by(pids: list[int], tracer: int) -> bool:
    """strace has attached to every one of these processes (their TracerPid)."""
    for pid in pids:
        status = Path(f"/proc/{pid}/status").read_text()
        if f"TracerPid:\t{tracer}\n" not in status:
            return False
    return bool(pids)
