"""Debian's `pebble` (an ACME test CA) and `pebble-challtestsrv` (its DNS), started on
loopback for `blindfold demo --acme` and the ACME tests. Pebble validates tls-alpn-01 by
connecting to `tls_port` of the address challtestsrv gives for the hostname (127.0.0.1: the
edge), and dns-01 by asking challtestsrv for the TXT record (set through challtestsrv's
management API)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path

from blindfold import pki


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def have_pebble() -> bool:
    return bool(shutil.which("pebble") and shutil.which("pebble-challtestsrv"))


class Pebble:
    def __init__(self, workdir: Path, *, ca: pki.Issued) -> None:
        """Ports are chosen and challtestsrv started here; pebble by `start(tls_port)`."""
        self.dir = workdir / "pebble"
        self.dir.mkdir(exist_ok=True)
        # pebble's own HTTPS listener: a certificate from the tests' CA (Debian ships none)
        self.ca_file = self.dir / "ca.pem"
        ca.write(self.ca_file)
        pki.issue(ca, ["127.0.0.1", "localhost"]).write(
            self.dir / "pebble.pem", self.dir / "pebble.key"
        )
        self.dns_port = free_port()
        self.challtest_port = free_port()
        self.acme_port = free_port()
        self.mgmt_port = free_port()
        self.tls_port = 0
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []
        self._start_challtestsrv()

    # ------------------------------------------------------------ processes
    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        log = self.dir / f"{name}.log"
        self.logs.append(log)
        with log.open("ab") as out:
            proc = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
                start_new_session=True,
            )
        self.procs.append(proc)

    def _start_challtestsrv(self) -> None:
        self._spawn(
            "challtestsrv",
            [
                "pebble-challtestsrv",
                "-dns01",
                f"127.0.0.1:{self.dns_port}",
                "-management",
                f"127.0.0.1:{self.challtest_port}",
                "-http01",
                "",
                "-https01",
                "",
                "-tlsalpn01",
                "",
                "-defaultIPv4",
                "127.0.0.1",
                "-defaultIPv6",
                "",
            ],
        )
        self._wait_port(self.challtest_port)

    def start(self, tls_port: int = 0) -> None:
        """(Re)start pebble itself (its CA keys are new at each start); it validates
        tls-alpn-01 on `tls_port` (the edge's)."""
        self.tls_port = tls_port or self.tls_port
        config = {
            "pebble": {
                "listenAddress": f"127.0.0.1:{self.acme_port}",
                "managementListenAddress": f"127.0.0.1:{self.mgmt_port}",
                "certificate": str(self.dir / "pebble.pem"),
                "privateKey": str(self.dir / "pebble.key"),
                "httpPort": free_port(),
                "tlsPort": self.tls_port,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": False,
            }
        }
        cfg = self.dir / "pebble-config.json"
        cfg.write_text(json.dumps(config))
        self._spawn(
            "pebble",
            ["pebble", "-config", str(cfg), "-dnsserver", f"127.0.0.1:{self.dns_port}"],
            env={
                "PEBBLE_VA_NOSLEEP": "1",
                "PEBBLE_WFE_NONCEREJECT": "0",
                "PEBBLE_AUTHZREUSE": "0",  # each order proves control again
            },
        )
        self.pebble = self.procs[-1]
        self._wait_port(self.acme_port)

    def stop_ca(self) -> None:
        """Stop pebble (the CA is down); challtestsrv stays."""
        self._end(self.pebble)

    def _end(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    def close(self) -> None:
        for proc in reversed(self.procs):
            self._end(proc)

    def _wait_port(self, port: int, timeout: float = 15.0) -> None:
        import socket

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.05)
        logs = "\n".join(p.read_text(errors="replace") for p in self.logs if p.exists())
        raise RuntimeError(f"port {port} not listening:\n{logs}")

    # ------------------------------------------------------------ APIs
    @property
    def directory(self) -> str:
        return f"https://127.0.0.1:{self.acme_port}/dir"

    def root_pem(self, path: Path) -> Path:
        """Pebble's root (regenerated at each start), from its management port."""
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        url = f"https://127.0.0.1:{self.mgmt_port}/roots/0"
        with urllib.request.urlopen(url, context=ctx, timeout=10) as resp:
            path.write_bytes(resp.read())
        return path

    def challtest(self, endpoint: str, body: dict[str, object]) -> None:
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.challtest_port}/{endpoint}",
            data=json.dumps(body).encode(),
            method="POST",
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            resp.read()

    def add_a(self, host: str, address: str = "127.0.0.1") -> None:
        self.challtest("add-a", {"host": host.rstrip(".") + ".", "addresses": [address]})
