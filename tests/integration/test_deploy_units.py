"""deploy/: the systemd units for the edge, the origin agent and the key server.

`systemd-analyze verify` checks them the way systemd loads them (unknown keys, bad values,
missing executables) in a temporary root directory that holds the units, an executable at
their ExecStart path and the distribution's own units (`--root`); this runs without systemd as
PID 1. `systemd-analyze security --offline` scores their sandboxing. The rest checks what the
units promise against the code: the readiness protocol, reload by SIGHUP, one user each, only
CAP_NET_BIND_SERVICE and only for the edge (443), descriptors for the connection limits.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "deploy" / "systemd"
ROLES = ("edge", "origin", "keyserver")
BINARY = "/opt/blindfold/venv/bin/blindfold"
SYSTEM_UNITS = Path("/usr/lib/systemd/system")


def _analyze() -> str:
    tool = shutil.which("systemd-analyze")
    assert tool, "systemd-analyze is missing: scripts/bootstrap installs Debian's systemd"
    return tool


def _unit(role: str) -> dict[str, list[str]]:
    """Key -> values ([Service] and [Unit] together; a key may repeat)."""
    values: dict[str, list[str]] = {}
    for line in (UNITS / f"blindfold-{role}.service").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", "[")):
            continue
        key, _, value = line.partition("=")
        values.setdefault(key, []).append(value)
    return values


def _root(tmp_path: Path, units: dict[str, str]) -> Path:
    """A root directory as systemd would see on an installed host."""
    root = tmp_path / "root"
    (root / "etc/systemd/system").mkdir(parents=True)
    (root / "usr/lib/systemd").mkdir(parents=True)
    shutil.copytree(SYSTEM_UNITS, root / "usr/lib/systemd/system", symlinks=True)
    for name, text in units.items():
        (root / "etc/systemd/system" / name).write_text(text)
    exe = root / BINARY.lstrip("/")
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(0o755)
    (root / "bin").mkdir()
    shutil.copy2("/bin/kill", root / "bin/kill")
    return root


def _verify(root: Path, names: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_analyze(), "verify", f"--root={root}", *names],
        capture_output=True,
        text=True,
        timeout=60,
    )


def _texts() -> dict[str, str]:
    return {f"blindfold-{r}.service": (UNITS / f"blindfold-{r}.service").read_text() for r in ROLES}


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    texts = _texts()
    out = _verify(_root(tmp_path / "good", texts), list(texts))
    assert out.returncode == 0 and not out.stderr.strip(), out.stderr
    # the check is real: a misspelt key and a bad value are reported
    bad = dict(texts)
    bad["blindfold-edge.service"] = texts["blindfold-edge.service"].replace(
        "NoNewPrivileges=yes", "NoNewPrivilegs=yes"
    )
    bad["blindfold-origin.service"] = texts["blindfold-origin.service"].replace(
        "Type=notify", "Type=notified"
    )
    out = _verify(_root(tmp_path / "bad", bad), list(bad))
    assert "Unknown key 'NoNewPrivilegs'" in out.stderr
    assert "Type=notified" in out.stderr or "notified" in out.stderr


@pytest.mark.parametrize("role", ROLES)
def test_sandbox_exposure(role: str, tmp_path: Path) -> None:
    root = _root(tmp_path, _texts())
    out = subprocess.run(
        [_analyze(), "security", "--offline=true", f"--root={root}", f"blindfold-{role}.service"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    level = re.search(r"Overall exposure level for \S+: ([0-9.]+)", out.stdout)
    assert level is not None, out.stdout + out.stderr
    assert float(level[1]) <= 2.0, out.stdout  # systemd rates <= 2.0 as "OK"


@pytest.mark.parametrize("role", ROLES)
def test_unit_promises(role: str) -> None:
    from blindfold.cli.main import main as cli

    unit = _unit(role)
    assert unit["Type"] == ["notify"] and unit["NotifyAccess"] == ["main"]
    assert unit["User"] == [f"blindfold-{role}"] and unit["Group"] == [f"blindfold-{role}"]
    assert unit["NoNewPrivileges"] == ["yes"] and unit["ProtectSystem"] == ["strict"]
    assert unit["ExecStart"] == [f"{BINARY} {role} --config /etc/blindfold/{role}.toml"]
    assert unit["ExecReload"][-1] == "/bin/kill -HUP $MAINPID"
    assert "2" in unit["RestartPreventExitStatus"]  # a config error is not retried
    # every command the unit runs is one the CLI has, and check-config refuses a bad file
    for line in unit["ExecStartPre"] + unit["ExecReload"][:-1]:
        argv = line.split()
        assert argv[:2] == [BINARY, "check-config"], line
        assert cli(["check-config", "/nonexistent/blindfold.toml"]) == 2
    # writable paths: only the one directory each role writes, owned by systemd for it
    writable = {k for k in unit if k in ("ReadWritePaths", "StateDirectory", "CacheDirectory",
                                         "LogsDirectory", "RuntimeDirectory")}  # fmt: skip
    assert len(writable) == 1, writable
    caps = unit["CapabilityBoundingSet"]
    if role == "edge":  # it binds 443
        assert caps == ["CAP_NET_BIND_SERVICE"]
        assert unit["AmbientCapabilities"] == ["CAP_NET_BIND_SERVICE"]
    else:
        assert caps == [""] and unit.get("AmbientCapabilities", [""]) == [""]


def test_descriptor_limits_fit_the_connection_limits() -> None:
    """LimitNOFILE covers the default connection caps: per edge connection a visitor and an
    origin socket and, while splicing, a pipe each way; per origin connection two sockets."""
    from blindfold.config.edge import EdgeConfig
    from blindfold.config.origin import OriginConfig

    def default(cls: type, name: str) -> int:
        value = next(f for f in dataclasses.fields(cls) if f.name == name).default
        assert isinstance(value, int)
        return value

    assert int(_unit("edge")["LimitNOFILE"][0]) >= 6 * default(EdgeConfig, "max_connections")
    assert int(_unit("origin")["LimitNOFILE"][0]) >= 3 * default(OriginConfig, "max_connections")
    assert int(_unit("keyserver")["LimitNOFILE"][0]) >= 4096


def test_sysusers_defines_each_service_user() -> None:
    text = (ROOT / "deploy" / "sysusers.d" / "blindfold.conf").read_text()
    users = {line.split()[1] for line in text.splitlines() if line.startswith("u ")}
    assert users == {f"blindfold-{r}" for r in ROLES}
