"""The servers tlsfuzzer talks to, all on 127.0.0.1 with throwaway certificates:

- a key server holding the site keys (ECDSA P-256 for example.test, RSA-2048 for rsa.test),
- per key type: an origin agent serving that same certificate with its real key (the edge's
  passthrough fallbacks end there: OpenSSL, TLS 1.2 and 1.3) in front of the demo application,
  and an edge whose only route is a keyless route, `default = true` (no-SNI clients match),
  with that certificate and that origin,
- per key type: the baseline, bench/tlsfuzzer/baseline.py (Python ssl, TLS 1.3 only).

Built from the integration tests' helpers (tests/helpers: make_pki, keyserver_config,
origin_config, edge_config, route), the setup tests/integration/test_keyless.py runs.
Every process is started here and stopped here by its PID.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO))

from blindfold import pki  # noqa: E402
from tests.conftest import DECISIONS_NAME  # noqa: E402
from tests.helpers.edgeproc import BlindfoldProcess, EdgeProcess, OriginProcess, edge_config, route  # noqa: E402
from tests.helpers.keyless import KeyServerProcess, keyserver_config, make_pki  # noqa: E402
from tests.helpers.topology import origin_config  # noqa: E402

# key type -> (kpki site name, route SNI patterns, name the origin's certificate has)
KEY_TYPES = {
    "ecdsa": ("p256", ["example.test", "*.example.test"], "example.test"),
    "rsa": ("rsa", ["rsa.test", "*.rsa.test"], "rsa.test"),
}
METRIC_RE = re.compile(r"^(blindfold_keyless_(?:fallbacks|handshakes)_total)\{([^}]*)\} (\S+)$")


@dataclass
class Target:
    name: str  # keyless-rsa, python-ssl-ecdsa, ...
    server: str  # keyless | python-ssl
    key: str  # rsa | ecdsa
    port: int
    admin: str = ""  # edges: admin address for /metrics

    def counters(self) -> dict[str, float]:
        """Keyless fallback and handshake counters, e.g. 'fallbacks/needs_hello_retry'."""
        if not self.admin:
            return {}
        try:
            with urllib.request.urlopen(f"http://{self.admin}/metrics", timeout=10) as resp:
                text = resp.read().decode()
        except OSError:  # the edge is gone (stopped by an interrupt)
            return {}
        out: dict[str, float] = {}
        for line in text.splitlines():
            m = METRIC_RE.match(line)
            if not m:
                continue
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
            kind = m.group(1).split("_")[2]  # fallbacks | handshakes
            out[f"{kind}/{labels.get('reason') or labels.get('result')}"] = float(m.group(3))
        return out


@dataclass
class Topology:
    workdir: Path
    workers: int = 1
    max_hello_bytes: int = 65536
    targets: dict[str, Target] = field(default_factory=dict)
    _procs: list[BlindfoldProcess] = field(default_factory=list)
    _baselines: list[subprocess.Popen[bytes]] = field(default_factory=list)
    _app: Any = None

    def start(self) -> None:
        from blindfold.demo.app import DemoApp

        self.workdir.mkdir(parents=True, exist_ok=True)
        ca = pki.make_ca("blindfold tlsfuzzer throwaway CA")  # ECDSA P-256
        with contextlib.redirect_stdout(io.StringIO()):  # `blindfold pki` prints its files
            kpki = make_pki(self.workdir, ca)
        # The RSA site certificate is signed by an RSA CA, so that a chain signed only with RSA
        # exists: most tlsfuzzer scripts send signature_algorithms_cert with RSA schemes only,
        # and OpenSSL refuses (handshake_failure) a chain it cannot match with it.
        rsa_ca = pki.make_ca("blindfold tlsfuzzer throwaway RSA CA", kind="rsa2048")
        rsa_cert, rsa_key, _fp = kpki.sites["rsa"]
        pki.issue(rsa_ca, ["rsa.test", "*.rsa.test"], kind="rsa2048").write(rsa_cert, rsa_key)
        cas = self.workdir / "site-cas.pem"
        cas.write_bytes(ca.cert_pem() + rsa_ca.cert_pem())
        # the origin's decision stream has a certificate of its own (tests/conftest.py)
        decisions_cert, decisions_key = (
            self.workdir / "decisions.pem",
            self.workdir / "decisions.key",
        )
        pki.issue(ca, [DECISIONS_NAME]).write(decisions_cert, decisions_key)
        hosts = [h for _site, patterns, _n in KEY_TYPES.values() for h in patterns]
        # tlsfuzzer sends the same ClientHello random (all zeros) in every handshake: the key
        # server's replay check would refuse every signature after the first for 60 s
        ks_text = keyserver_config(kpki, {"edge1": hosts})
        ks_text = ks_text.replace("[keyserver]\n", "[keyserver]\nreplay_window_s = 0\n", 1)
        ks = KeyServerProcess(ks_text, self.workdir, name="ks")
        self._procs.append(ks)
        self._app = DemoApp()
        for key, (site_name, patterns, origin_name) in KEY_TYPES.items():
            cert, keyfile, _fp = kpki.sites[site_name]
            origin = OriginProcess(
                origin_config(
                    {
                        "cert": cert,
                        "key": keyfile,
                        "decisions_cert": decisions_cert,
                        "decisions_key": decisions_key,
                    },
                    self._app.port,
                    self.workdir,
                    waf={"enabled": False},
                    decisions={"ban_after_blocks": 1_000_000},
                ),
                self.workdir,
                name=f"origin-{key}",
            )
            self._procs.append(origin)
            text = route(
                patterns,
                [f"127.0.0.1:{origin.port}"],
                mode="keyless",
                certificate=str(cert),
                proxy_protocol="v2",
                origin_ca=str(cas),
                origin_server_name=origin_name,
                default=True,
                keyserver={
                    "addresses": [f"127.0.0.1:{ks.port}"],
                    "client_cert": str(kpki.dir / "edge1.pem"),
                    "client_key": str(kpki.dir / "edge1.key"),
                    "ca": str(kpki.edge_ca),
                    "server_name": "keyserver.test",
                },
            )
            edge = EdgeProcess(
                edge_config(
                    text,
                    per_ip_rate_per_s=0,
                    workers=self.workers,
                    per_ip_concurrent=10_000,
                    max_connections=20_000,
                    max_hello_bytes=self.max_hello_bytes,
                ),
                self.workdir,
                name=f"edge-{key}",
            )
            self._procs.append(edge)
            self.targets[f"keyless-{key}"] = Target(
                f"keyless-{key}", "keyless", key, edge.port, str(edge.admin)
            )
            base = subprocess.Popen(
                [
                    sys.executable,
                    str(HERE / "baseline.py"),
                    "--cert",
                    str(cert),
                    "--key",
                    str(keyfile),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
            )
            self._baselines.append(base)
            assert base.stdout is not None
            line = base.stdout.readline().decode().split()
            if len(line) != 2 or line[0] != "ready":
                raise RuntimeError("the python-ssl baseline did not start")
            self.targets[f"python-ssl-{key}"] = Target(
                f"python-ssl-{key}", "python-ssl", key, int(line[1])
            )
        (self.workdir / "targets.json").write_text(
            json.dumps({n: t.__dict__ for n, t in self.targets.items()}, indent=1)
        )

    def problems(self) -> list[str]:
        """Tracebacks any blindfold process wrote so far."""
        return ["".join(p.stderr_lines) for p in self._procs if p.tracebacks()]

    def pids(self) -> list[int]:
        return [p.proc.pid for p in self._procs] + [b.pid for b in self._baselines]

    def stop(self) -> None:
        for b in self._baselines:
            if b.poll() is None:
                b.send_signal(signal.SIGTERM)
        for p in reversed(self._procs):
            try:
                p.stop(timeout=20)
            except Exception as exc:  # keep stopping the others
                print(f"stopping {p.kind} (pid {p.proc.pid}): {exc}", file=sys.stderr)
        for b in self._baselines:
            try:
                b.wait(5)
            except subprocess.TimeoutExpired:
                b.kill()
                b.wait(5)
        if self._app is not None:
            self._app.close()
            self._app = None
        for p in self._procs:
            (self.workdir / f"{p.config_path.stem}.stderr.log").write_text("".join(p.stderr_lines))
            (self.workdir / f"{p.config_path.stem}.stdout.jsonl").write_text(
                "".join(json.dumps(r) + "\n" for r in p.lines)
            )


if __name__ == "__main__":  # start, print the targets, run until Ctrl-C
    import tempfile

    topo = Topology(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp()))
    topo.start()
    print(json.dumps({n: t.__dict__ for n, t in topo.targets.items()}), flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        topo.stop()
