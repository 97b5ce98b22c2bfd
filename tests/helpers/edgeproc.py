"""Run `blindfold edge` as a real process for integration tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any


class BlindfoldProcess:
    """`blindfold <kind> --config FILE` as a real process; JSON log lines collected."""

    kind = "edge"
    admin_token = ""  # sent as a Bearer token to /metrics when the config sets admin_token_file

    def __init__(
        self, config_text: str, workdir: Path, *, name: str = "edge", wrap: list[str] | None = None
    ) -> None:
        """`wrap`: a command prefix (e.g. strace); stop() then signals the process group."""
        self.wrapped = bool(wrap)
        self.workdir = workdir
        self.config_path = workdir / f"{name}.toml"
        self.config_path.write_text(config_text)
        self.lines: list[dict[str, Any]] = []
        self.stderr_lines: list[str] = []
        self._lock = threading.Lock()
        self.proc = subprocess.Popen(
            [
                *(wrap or []),
                sys.executable,
                "-m",
                "blindfold",
                self.kind,
                "--config",
                str(self.config_path),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        self._threads = [
            threading.Thread(target=self._read_out, daemon=True),
            threading.Thread(target=self._read_err, daemon=True),
        ]
        for t in self._threads:
            t.start()
        ready = self.wait_for(lambda r: r.get("event") == f"{self.kind}_ready", timeout=30)
        if ready is None:
            self.stop()
            raise RuntimeError(
                f"{self.kind} did not become ready:\n" + "\n".join(self.stderr_lines)
            )
        self.ready = ready
        try:
            self.ports = [int(a.rpartition(":")[2]) for a in ready.get("listen") or []]
            self.port = self.ports[0] if self.ports else 0
            self.admin = ready["admin"]
        except (KeyError, ValueError, TypeError):
            self.stop()  # never leave a process behind
            raise

    def _read_out(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            try:
                record = json.loads(raw)
            except ValueError:
                record = {"event": "unparsed", "text": raw.decode(errors="replace")}
            with self._lock:
                self.lines.append(record)

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            with self._lock:
                self.stderr_lines.append(raw.decode(errors="replace"))

    def records(self, event: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            return [r for r in self.lines if event is None or r.get("event") == event]

    def wait_for(self, pred: Any, timeout: float = 10.0) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout
        seen = 0
        while time.monotonic() < deadline:
            with self._lock:
                new = self.lines[seen:]
                seen = len(self.lines)
            for r in new:
                if pred(r):
                    return r
            if self.proc.poll() is not None and not new:
                return None
            time.sleep(0.02)
        return None

    def conn_lines(self, **match: Any) -> list[dict[str, Any]]:
        return [r for r in self.records("conn") if all(r.get(k) == v for k, v in match.items())]

    def wait_conn(self, timeout: float = 10.0, **match: Any) -> dict[str, Any] | None:
        return self.wait_for(
            lambda r: r.get("event") == "conn" and all(r.get(k) == v for k, v in match.items()),
            timeout,
        )

    def metrics(self) -> str:
        req = urllib.request.Request(f"http://{self.admin}/metrics")
        if self.admin_token:
            req.add_header("authorization", f"Bearer {self.admin_token}")
        with urllib.request.urlopen(req, timeout=10) as resp:
            return str(resp.read().decode())

    def metric(self, name: str, **labels: str) -> float:
        """Value of one sample (0 when absent)."""
        want = ",".join(f'{k}="{v}"' for k, v in labels.items())
        for line in self.metrics().splitlines():
            if line.startswith("#"):
                continue
            key, _, value = line.rpartition(" ")
            if key == (f"{name}{{{want}}}" if want else name):
                return float(value)
        return 0.0

    def write_config(self, text: str) -> None:
        """Replace the file atomically, as an operator should: a reload never reads half."""
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.config_path)

    def reload(self, timeout: float = 10.0) -> dict[str, Any] | None:
        n = len(self.records("reloaded")) + len(self.records("reload_failed"))
        self.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done = self.records("reloaded") + self.records("reload_failed")
            if len(done) > n:
                return done[-1]
            time.sleep(0.05)
        return None

    def worker_pids(self) -> list[int]:
        path = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        return [int(p) for p in path.read_text().split()] if path.exists() else []

    def stop(self, timeout: float = 40.0) -> int:
        if self.proc.poll() is None:
            if self.wrapped:
                os.killpg(self.proc.pid, signal.SIGTERM)
            else:
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        for t in self._threads:
            t.join(2)
        return self.proc.returncode

    def tracebacks(self) -> list[str]:
        return [line for line in self.stderr_lines if "Traceback" in line]


class EdgeProcess(BlindfoldProcess):
    kind = "edge"


class OriginProcess(BlindfoldProcess):
    kind = "origin"

    @property
    def decisions_port(self) -> int:
        return int(str(self.ready["decisions"]).rpartition(":")[2])


def toml_table(name: str, values: dict[str, Any]) -> str:
    return f"[{name}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items()) + "\n"


def edge_config(routes: str, **edge: Any) -> str:
    """A config with [edge] settings (Python values rendered as TOML) and route tables."""
    settings = {"listen": ["127.0.0.1:0"], "admin_listen": "127.0.0.1:0", "workers": 2}
    settings.update(edge)
    lines = ["[edge]"]
    for key, value in settings.items():
        lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines) + "\n\n" + routes


def toml_value(value: Any) -> str:
    """A Python value as TOML (inline tables for dicts)."""
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(value)


def route(sni: list[str], origins: list[str], **extra: Any) -> str:
    """A route table; without `proxy_protocol` it sends none (the test origins of
    tests/helpers/origin.py read a PROXY header only when asked), not the edge's default v2."""
    extra.setdefault("proxy_protocol", "none")
    lines = ["[[edge.routes]]", f"sni = {json.dumps(sni)}", f"origins = {json.dumps(origins)}"]
    for key, value in extra.items():
        lines.append(f"{key} = {toml_value(value)}")
    return "\n".join(lines) + "\n\n"
