"""What the benchmarks share (bench/keyless, bench/blind): processes started and stopped by
PID, CPU time from /proc, Prometheus samples, small statistics. Benchmarks only: the product
never imports this."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
TICK = os.sysconf("SC_CLK_TCK")


def http_get(url: str, timeout: float = 10.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return str(resp.read().decode())


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        base, _, lab = key.partition("{")
        if base != name:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', lab))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(value)
    return total


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def git_rev() -> str:
    try:
        rev = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "diff", "--quiet", "HEAD", "--", "src"], timeout=10
        ).returncode
        return rev + (" + uncommitted src/ changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "?"


def stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat after the command name (field 3 onwards)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def cpu_s(pid: int) -> float:
    """utime + stime of one process (all its threads), in seconds; 0 when it is gone."""
    try:
        rest = stat_fields(pid)
    except OSError:
        return 0.0
    return (int(rest[11]) + int(rest[12])) / TICK


def sys_s(pid: int) -> float:
    """stime alone (kernel time: on loopback it includes much of delivering what it sends)."""
    try:
        return int(stat_fields(pid)[12]) / TICK
    except OSError:
        return 0.0


class Proc:
    """A process we started (in a session of its own, so terminal signals reach only us):
    output to files, stopped by its PID only."""

    registry: list[Proc] = []

    def __init__(
        self,
        name: str,
        cmd: list[str],
        out: Path,
        *,
        pin: str = "",
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.stdout_path = out / f"{name}.stdout"
        self.stderr_path = out / f"{name}.stderr"
        if pin:
            cmd = ["taskset", "-c", pin, *cmd]
        self._o = open(self.stdout_path, "wb")  # noqa: SIM115
        self._e = open(self.stderr_path, "wb")  # noqa: SIM115
        (out / f"{name}.cmd").write_text(" ".join(cmd) + "\n")
        self.proc = subprocess.Popen(
            cmd,
            stdout=self._o,
            stderr=self._e,
            stdin=subprocess.DEVNULL,
            cwd=str(REPO),
            env=env,
            start_new_session=True,
        )
        self.pid = self.proc.pid
        Proc.registry.append(self)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float) -> None:
        """Wait for a process that ends by itself; stopped by PID if it overruns."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        self.stop()

    def stop(self, timeout: float = 15.0, sig: int = signal.SIGTERM) -> int | None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                self.proc.wait(5)
        self._o.close()
        self._e.close()
        return self.proc.returncode

    def last_json(self) -> dict[str, Any]:
        lines = self.stdout_path.read_text(errors="replace").strip().splitlines()
        if not lines:
            raise RuntimeError(
                f"{self.name} printed nothing; stderr:\n"
                + self.stderr_path.read_text(errors="replace")[-3000:]
            )
        return dict(json.loads(lines[-1]))

    def wait_json(self, path: Path, event: str, timeout: float = 30.0) -> dict[str, Any]:
        """The first JSON line with "event": event in `path`."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with contextlib.suppress(OSError):
                for line in path.read_text(errors="replace").splitlines():
                    if f'"{event}"' in line:
                        with contextlib.suppress(ValueError):
                            rec = json.loads(line)
                            if rec.get("event") == event:
                                return dict(rec)
            if not self.alive():
                break
            time.sleep(0.05)
        tail = self.stderr_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{self.name} did not log {event!r}; stderr:\n{tail}")

    def wait_line(self, timeout: float = 30.0) -> str:
        """The first line the process printed."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            text = self.stdout_path.read_text(errors="replace")
            if "\n" in text:
                return text.splitlines()[0]
            if not self.alive():
                break
            time.sleep(0.02)
        raise RuntimeError(
            f"{self.name} printed nothing; stderr:\n"
            + self.stderr_path.read_text(errors="replace")[-3000:]
        )

    @classmethod
    def stop_all(cls) -> None:
        for p in reversed(cls.registry):
            with contextlib.suppress(Exception):
                p.stop(timeout=10)
