"""Run `blindfold demo --self-check` as a real process, with a deadline that also ends what the
demo started (edge, origin agent, key server) if it hangs."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from tests.helpers.nginx import free_port

CHECKS = (
    "a page through the edge",
    "a page over HTTP/3 through the edge (QUIC passed through, never decrypted)",
    "the WAF blocks the SQL injection",
    "the edge then refuses the attacker",
    "another visitor is still served",
    "its signature is in the audit log, with the SNI the key server read itself",
    "the keyless hostname's certificate names no host the edge may not sign for",
    "a lying edge (the demo edge's identity) cannot get a handshake for demo.blindfold.test signed",
    "the audit log verifies with its key",
)


def run_demo_self_check(
    blindfold: list[str],
    *,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout_s: float = 120,
) -> subprocess.CompletedProcess[str]:
    """`blindfold demo --self-check` without --duration: it must exit by itself."""
    proc = subprocess.Popen(
        [
            *blindfold,
            "demo",
            "--self-check",
            "--port",
            str(free_port()),
            "--admin-port",
            str(free_port()),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=cwd,
        env=env,
        start_new_session=True,  # its own process group: the deadline ends its children too
    )
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the group we started, by its leader's PID
        out, err = proc.communicate()
        raise AssertionError(
            f"`blindfold demo --self-check` still running after {timeout_s} s:\n{out}{err}"
        ) from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
