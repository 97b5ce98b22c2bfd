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
from typing import Any

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
    # writable paths: only the directories each role writes, owned by systemd for it
    writable = {k for k in unit if k in ("ReadWritePaths", "StateDirectory", "CacheDirectory",
                                         "LogsDirectory", "RuntimeDirectory")}  # fmt: skip
    assert (
        writable
        == {
            "edge": {"CacheDirectory"},  # blind routes' cache
            "origin": {"LogsDirectory", "StateDirectory"},  # WAF audit log; decision journal
            "keyserver": {"StateDirectory"},  # the audit log
        }[role]
    )
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


# ------------------------------------------------------------------ the system-call filter
def _syscall_group(name: str) -> set[str]:
    """A systemd system-call group, nested groups expanded (systemd-analyze syscall-filter)."""
    out = subprocess.run(
        [_analyze(), "syscall-filter", name], capture_output=True, text=True, timeout=30
    ).stdout
    calls: set[str] = set()
    for line in out.splitlines()[1:]:
        item = line.strip()
        if not item or item.startswith("#"):
            continue
        if not line.startswith("    "):
            break  # the next group's heading
        calls |= _syscall_group(item) if item.startswith("@") else {item}
    return calls


def _allowed(role: str) -> set[str]:
    """What the unit's SystemCallFilter= lines leave allowed."""
    allowed: set[str] = set()
    for spec in _unit(role)["SystemCallFilter"]:
        deny = spec.startswith("~")
        names: set[str] = set()
        for item in spec.lstrip("~").split():
            names |= _syscall_group(item) if item.startswith("@") else {item}
        allowed = allowed - names if deny else allowed | names
    return allowed


def _traced(trace: Path) -> set[str]:
    """Syscall names from the summary table `strace -C` ends with."""
    names = set()
    in_table = False
    for line in trace.read_text(errors="replace").splitlines():
        in_table = in_table or line.startswith("% time")
        parts = line.split()
        if in_table and len(parts) >= 5 and re.fullmatch(r"[0-9.]+", parts[0]):
            names.add(parts[-1])
    names.discard("total")
    return names


def _writable_executable(trace: Path) -> list[str]:
    """Calls MemoryDenyWriteExecute=yes refuses: a mapping both writable and executable, or
    making memory executable later (mprotect with PROT_EXEC), systemd.exec(5)."""
    bad = []
    for line in trace.read_text(errors="replace").splitlines():
        call = re.search(r"\b(mmap|mprotect|pkey_mprotect)\((.*)", line)
        if call is None or "PROT_EXEC" not in call[2]:
            continue
        if call[1] != "mmap" or "PROT_WRITE" in call[2]:
            bad.append(line)
    return bad


def _check_trace(role: str, trace: Path, expect: set[str]) -> None:
    used = _traced(trace)
    assert expect <= used, used  # the trace is real
    assert used <= _allowed(role), used - _allowed(role)
    if _unit(role).get("MemoryDenyWriteExecute") == ["yes"]:
        assert not _writable_executable(trace), _writable_executable(trace)[:5]


def _reload(proc: Any) -> None:
    """SIGHUP to the traced process itself (strace, its parent, would exit on it)."""
    import os
    import signal

    os.kill(int(proc.ready["pid"]), signal.SIGHUP)
    got = proc.wait_for(lambda r: r.get("event") in ("reloaded", "reload_failed"), 15)
    assert got is not None and got["event"] == "reloaded", got


def _strace(summary: Path) -> list[str]:
    from tests.conftest import need

    # -C: every call (for the mmap/mprotect flags) and the summary table at the end
    return [need("strace"), "-f", "-qq", "-C", "-s", "0", "-o", str(summary)]


def test_edge_syscalls_pass_the_units_filter(
    tmp_path: Path, site: dict[str, Path], origin: Any
) -> None:
    """A real edge (master, workers, splice relay, reload) run under strace: every system call
    it makes is one its unit's SystemCallFilter allows (else it would get EPERM)."""
    from tests.helpers.clients import get
    from tests.helpers.edgeproc import EdgeProcess, edge_config, route

    summary = tmp_path / "edge.syscalls"
    config = edge_config(route(["example.test"], [f"127.0.0.1:{origin.port}"]), relay="splice")
    edge = EdgeProcess(config, tmp_path, wrap=_strace(summary))
    try:
        big = get(edge.port, "example.test", site["ca"], path="/bytes?n=300000")
        assert big.startswith(b"HTTP/1.1 200") and len(big) > 300000
        _reload(edge)
        assert get(edge.port, "example.test", site["ca"]).startswith(b"HTTP/1.1 200")
    finally:
        edge.stop()
    assert not edge.tracebacks()
    _check_trace("edge", summary, {"splice", "accept4", "epoll_wait"})


def test_keyserver_syscalls_pass_the_units_filter(tmp_path: Path, ca: Any) -> None:
    import asyncio

    from tests.helpers.keyless import KeyServerProcess, Visit, keyserver_config, make_pki

    p = make_pki(tmp_path, ca)
    summary = tmp_path / "keyserver.syscalls"
    ks = KeyServerProcess(
        keyserver_config(p, {"edge1": ["example.test", "*.example.test"]}),
        tmp_path,
        name="ks",
        wrap=_strace(summary),
    )
    try:
        req = Visit(p, "p256", "example.test").sign_request()

        async def go() -> bytes:
            client = p.client("edge1", ks.port)
            try:
                return await client.sign(req)
            finally:
                await client.close()

        assert asyncio.run(go())
        _reload(ks)
    finally:
        ks.stop()
    assert not ks.tracebacks()
    _check_trace("keyserver", summary, {"accept4"})


def test_origin_syscalls_pass_the_units_filter(
    tmp_path: Path, site: dict[str, Path], app: Any
) -> None:
    """The origin agent with its WAF (libmodsecurity through ctypes) answering a request and
    blocking an attack."""
    from tests.helpers.clients import get
    from tests.helpers.edgeproc import OriginProcess
    from tests.helpers.topology import origin_config

    summary = tmp_path / "origin.syscalls"
    config = origin_config(
        site,
        app.port,
        tmp_path,
        proxy_protocol="off",
        waf={"mode": "block"},
        decisions={"journal": str(tmp_path / "decisions.journal")},  # the block bans: written
    )
    origin = OriginProcess(config, tmp_path, name="origin", wrap=_strace(summary))
    try:
        assert get(origin.port, "example.test", site["ca"], path="/echo").startswith(
            b"HTTP/1.1 200"
        )
        blocked = get(origin.port, "example.test", site["ca"], path="/?id=1%27%20OR%201=1--")
        assert blocked.startswith(b"HTTP/1.1 403")
        _reload(origin)
    finally:
        origin.stop()
    assert not origin.tracebacks()
    _check_trace("origin", summary, {"accept4"})


def test_keyless_edge_syscalls_pass_the_units_filter(
    tmp_path: Path, site: dict[str, Path], ca: Any, app: Any
) -> None:
    """The edge's other worker kind: a keyless route (asyncio, TLS 1.3 core, greenlets, the
    key-server client, HTTP/1.1 and HTTP/2, the cache) under the same filter."""
    from tests.helpers.edgeproc import EdgeProcess, OriginProcess, edge_config
    from tests.helpers.keyless import KeyServerProcess, keyserver_config, make_pki
    from tests.helpers.topology import origin_config
    from tests.integration.test_keyless import fetch, keyless_route

    p = make_pki(tmp_path, ca)
    ks = KeyServerProcess(
        keyserver_config(p, {"edge1": ["example.test", "*.example.test"]}), tmp_path, name="ks"
    )
    origin = OriginProcess(origin_config(site, app.port, tmp_path), tmp_path, name="origin")
    summary = tmp_path / "edge.syscalls"
    edge = None
    try:
        config = edge_config(
            keyless_route(p, site, [ks.port], origin.port, sni=["example.test"]),
            per_ip_rate_per_s=0,
        )
        edge = EdgeProcess(config, tmp_path, name="kedge", wrap=_strace(summary))
        for flag in ("--http1.1", "--http2"):
            code, _version, body = fetch(edge, p, "/cached/x", flag)
            assert code == 200, body
    finally:
        if edge is not None:
            edge.stop()
        origin.stop()
        ks.stop()
    assert edge is not None and not edge.tracebacks()
    _check_trace("edge", summary, {"accept4", "epoll_wait"})
