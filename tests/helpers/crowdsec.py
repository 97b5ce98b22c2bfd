"""A real CrowdSec Local API (Debian's `crowdsec` package), started per test on loopback.

The daemon runs in the foreground as LAPI only (`-no-cs -no-capi`), with its own config,
SQLite database and credentials in a work directory: no agent, no acquisition, no hub,
no Central API, no Prometheus listener. `cscli -c <that config>` manages bouncers and
decisions. Nothing under /etc/crowdsec or /var/lib/crowdsec is used at run time.

Installing the package on a machine without systemd and without internet: the package's
postinst registers to the Central API (`cscli capi register`), which fails without
internet ("dial tcp: lookup api.crowdsec.net ... no such host") and leaves the package
half-configured, so every later `apt-get install` fails too. README.Debian documents the
opt-out: an /etc/crowdsec/online_api_credentials.yaml that holds only a comment makes the
postinst skip that registration. `ensure_installed()` writes that file before installing,
and repairs a package left half-configured by an earlier attempt (`dpkg --configure`).
Without systemd the postinst starts no service (it checks /run/systemd/system).

Stream format seen with 1.4.6 (GET /v1/decisions/stream, header X-Api-Key):
    {"deleted":null,"new":[{"duration":"59.630915506s","id":1,"origin":"cscli",
      "scenario":"test","scope":"Ip","type":"ban","value":"127.0.0.7"}]}
and after `cscli decisions delete` (the decision's `until` is set to "now"):
    {"deleted":[{"duration":"-9.351634ms",...same fields...}],"new":null}
The reason given to cscli shows up as "scenario"; ranges have scope "Range"; an empty
list is JSON null. A plain stream call reports deletions since the bouncer's last pull
minus 2 seconds (so a deletion can show up on two consecutive calls less than 2 s apart);
`startup=true` reports every active decision under "new" and every expired or deleted one
still in the database under "deleted".

Usage:
    lapi = CrowdSecLapi(tmp_path)
    try:
        key = lapi.add_bouncer("edge")
        lapi.add_decision("127.0.0.7", duration="1m")
        lapi.stream(key, startup=True)
    finally:
        lapi.stop()

Standalone check: `.venv/bin/python -m tests.helpers.crowdsec` from the project root.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

CAPI_OPT_OUT = Path("/etc/crowdsec/online_api_credentials.yaml")
APT_TIMEOUT = 900
CLI_TIMEOUT = 30
_ENV = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}


def _binary(name: str) -> str | None:
    return shutil.which(name) or next(
        (p for p in (f"/usr/bin/{name}", f"/usr/sbin/{name}") if Path(p).exists()), None
    )


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, env=_ENV, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"{cmd[0]} timed out after {timeout}s: {cmd}") from e


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _package_configured() -> bool:
    if not _binary("dpkg-query"):
        return True
    out = _run(["dpkg-query", "-W", "-f=${Status}", "crowdsec"], 30)
    return out.returncode != 0 or out.stdout.strip() == "install ok installed"


def _opt_out_of_capi() -> None:
    """README.Debian: a comment-only credentials file makes the postinst skip CAPI."""
    if not CAPI_OPT_OUT.exists() or CAPI_OPT_OUT.stat().st_size == 0:
        CAPI_OPT_OUT.parent.mkdir(parents=True, exist_ok=True)
        CAPI_OPT_OUT.write_text("# no thanks: no Central API registration (tests, offline)\n")


def ensure_installed() -> tuple[str, str]:
    """Return the paths of crowdsec and cscli, installing Debian's package if needed."""
    crowdsec, cscli = _binary("crowdsec"), _binary("cscli")
    is_root = os.geteuid() == 0
    if crowdsec and cscli:
        if is_root and not _package_configured():
            # Half-configured by an earlier install whose CAPI registration failed: that
            # would make every later apt-get install fail, so finish the configuration.
            _opt_out_of_capi()
            _run(["dpkg", "--configure", "crowdsec"], APT_TIMEOUT)
        return crowdsec, cscli
    if not is_root:
        raise RuntimeError(
            "crowdsec/cscli are missing and installing them needs root "
            "(apt-get install -y crowdsec)"
        )
    _opt_out_of_capi()
    log = []
    policy = _run(["apt-cache", "policy", "crowdsec"], 60)
    if "Candidate:" not in policy.stdout or "Candidate: (none)" in policy.stdout:
        upd = _run(["apt-get", "update"], APT_TIMEOUT)
        log.append(upd.stdout + upd.stderr)
    inst = _run(["apt-get", "install", "-y", "--no-install-recommends", "crowdsec"], APT_TIMEOUT)
    log.append(inst.stdout + inst.stderr)
    if inst.returncode != 0:
        # A failing postinst (no systemd, no internet) still leaves the binaries unpacked;
        # give dpkg one more go now that the CAPI opt-out file exists.
        conf = _run(["dpkg", "--configure", "-a"], APT_TIMEOUT)
        log.append(conf.stdout + conf.stderr)
    crowdsec, cscli = _binary("crowdsec"), _binary("cscli")
    if not (crowdsec and cscli):
        raise RuntimeError(
            "apt-get install crowdsec did not provide crowdsec and cscli:\n" + _tail("\n".join(log))
        )
    return crowdsec, cscli


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_PROFILES = """\
name: default_ip_remediation
filters:
 - Alert.Remediation == true && Alert.GetScope() == "Ip"
decisions:
 - type: ban
   duration: 4h
on_success: break
"""


class CrowdSecLapi:
    """One crowdsec LAPI process on 127.0.0.1:<free port>, with its state in workdir."""

    def __init__(self, workdir: Path, *, start_timeout: float = 30.0) -> None:
        self.crowdsec, self.cscli = ensure_installed()
        self.dir = Path(workdir) / "crowdsec"
        for sub in ("data", "etc", "hub"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        (self.dir / "etc" / "profiles.yaml").write_text(_PROFILES)
        (self.dir / "etc" / "simulation.yaml").write_text("simulation: off\n")
        self.config = self.dir / "config.yaml"
        self.log_path = self.dir / "crowdsec.log"
        self.creds = self.dir / "etc" / "local_api_credentials.yaml"
        self.proc: subprocess.Popen[bytes] | None = None
        self.startup_seconds = 0.0
        for attempt in range(3):
            self.port = free_port()
            self.url = f"http://127.0.0.1:{self.port}"
            self._write_config()
            try:
                self._start(start_timeout)
                break
            except RuntimeError as e:
                if attempt == 2 or "address already in use" not in str(e):
                    raise
        # A machine account for cscli's decision commands (they go through the LAPI).
        self._cli("machines", "add", "tests", "--auto", "--force", "-f", str(self.creds))

    def _write_config(self) -> None:
        d = self.dir
        self.config.write_text(f"""\
common:
  daemonize: false
  log_media: stdout
  log_level: info
  working_dir: {d}
config_paths:
  config_dir: {d}/etc/
  data_dir: {d}/data/
  simulation_path: {d}/etc/simulation.yaml
  hub_dir: {d}/hub/
  index_path: {d}/hub/.index.json
  notification_dir: {d}/etc/notifications/
  plugin_dir: /usr/lib/crowdsec/plugins/
cscli:
  output: human
  color: "no"
db_config:
  log_level: info
  type: sqlite
  db_path: {d}/data/crowdsec.db
  use_wal: true
  flush:
    max_items: 5000
    max_age: 7d
api:
  client:
    insecure_skip_verify: false
    credentials_path: {self.creds}
  server:
    log_level: info
    listen_uri: 127.0.0.1:{self.port}
    profiles_path: {d}/etc/profiles.yaml
    console_path: {d}/etc/console.yaml
    trusted_ips:
      - 127.0.0.1
      - ::1
prometheus:
  enabled: false
""")

    def _start(self, timeout: float) -> None:
        started = time.monotonic()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [self.crowdsec, "-c", str(self.config), "-no-cs", "-no-capi"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = started + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"crowdsec exited with {self.proc.returncode}:\n" + self.log_tail()
                )
            if self._answers():
                self.startup_seconds = time.monotonic() - started
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(
            f"crowdsec LAPI did not answer on {self.url} within {timeout}s:\n" + self.log_tail()
        )

    def _answers(self) -> bool:
        try:
            urllib.request.urlopen(f"{self.url}/v1/decisions/stream", timeout=1).close()
            return True
        except urllib.error.HTTPError:
            return True  # 403 without a key: the LAPI is up
        except OSError:
            return False

    def log_tail(self, lines: int = 40) -> str:
        try:
            return _tail(self.log_path.read_text(errors="replace"), lines)
        except OSError:
            return ""

    def _cli(self, *args: str) -> str:
        out = _run([self.cscli, "-c", str(self.config), "--color", "no", *args], CLI_TIMEOUT)
        if out.returncode != 0:
            raise RuntimeError(
                f"cscli {' '.join(args)} failed ({out.returncode}): "
                f"{_tail(out.stderr + out.stdout)}"
            )
        return out.stdout

    @staticmethod
    def _target(value: str) -> list[str]:
        return ["--range", value] if "/" in value else ["--ip", value]

    def add_bouncer(self, name: str, key: str | None = None) -> str:
        """Register a bouncer and return its API key (the X-Api-Key header value)."""
        extra = ["-k", key] if key else []
        api_key = self._cli("bouncers", "add", name, "-o", "raw", *extra).strip()
        if not api_key:
            raise RuntimeError(f"cscli bouncers add {name} printed no key")
        return api_key

    def add_decision(
        self, ip: str, duration: str = "1m", reason: str = "test", type: str = "ban"
    ) -> None:
        """Add a decision for an IP (or a CIDR range, which gets scope "Range")."""
        self._cli(
            "decisions",
            "add",
            *self._target(ip),
            "--duration",
            duration,
            "--reason",
            reason,
            "--type",
            type,
        )

    def delete_decision(self, ip: str) -> None:
        """Delete the decisions for an IP (or range): they move to the stream's "deleted"."""
        self._cli("decisions", "delete", *self._target(ip))

    def stream(self, api_key: str, *, startup: bool = False) -> dict[str, Any]:
        """GET /v1/decisions/stream as a bouncer would."""
        query = "?startup=true" if startup else ""
        req = urllib.request.Request(
            f"{self.url}/v1/decisions/stream{query}", headers={"X-Api-Key": api_key}
        )
        with urllib.request.urlopen(req, timeout=5) as resp:
            data: dict[str, Any] = json.loads(resp.read())
        return data

    def stop(self) -> None:
        """Terminate the crowdsec process this object started (by PID), bounded wait."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def __enter__(self) -> CrowdSecLapi:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory(prefix="crowdsec-check-") as tmp:
        t0 = time.monotonic()
        lapi = CrowdSecLapi(Path(tmp))
        try:
            print(
                f"LAPI at {lapi.url}, pid {lapi.proc.pid if lapi.proc else None}, "
                f"answered after {lapi.startup_seconds:.2f}s "
                f"(ready incl. machine account: {time.monotonic() - t0:.2f}s)"
            )
            key = lapi.add_bouncer("check")
            print("bouncer key:", key)
            print("empty startup:", json.dumps(lapi.stream(key, startup=True)))
            lapi.add_decision("127.0.0.7", duration="1m", reason="test")
            new = lapi.stream(key, startup=True)
            print("after add (startup=true):", json.dumps(new))
            assert [d["value"] for d in new["new"] or []] == ["127.0.0.7"], new
            print("next plain call:", json.dumps(lapi.stream(key)))
            lapi.delete_decision("127.0.0.7")
            gone = lapi.stream(key)
            print("after delete (plain):", json.dumps(gone))
            assert [d["value"] for d in gone["deleted"] or []] == ["127.0.0.7"], gone
            assert not gone["new"], gone
            time.sleep(2.5)
            print("plain call 2.5s later:", json.dumps(lapi.stream(key)))
        finally:
            lapi.stop()
        assert lapi.proc is not None and lapi.proc.poll() is not None
        print(f"stopped, exit code {lapi.proc.returncode}; total {time.monotonic() - t0:.2f}s")
