"""The whole deployment on loopback, for the soak and the fault runs: an application, the
origin agent (WAF on, decision journal, decisions published to Redis), the key server (audit
log), Redis, and one edge with a passthrough, a keyless and a blind route that follows the
origin's decision stream and Redis.

Every part listens on a port picked once (so a part started again after a SIGKILL comes back
at the same address, as under systemd) and is started, signalled and stopped by its PID only.
Benchmarks only: the product never imports this."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO / "src"))

from blindfold import pki  # noqa: E402

HOST = "site.soak.test"  # passthrough: TLS ends at the origin agent
KEYLESS_HOST = "keyless.soak.test"  # keyless: TLS ends at the edge, signatures by the key server
CDN_HOST = "cdn.soak.test"  # blind: sealed blobs only
DECISIONS_HOST = "decisions.soak.internal"
API_KEY = "soak-edge-key-0123456789abcdef"
PY = sys.executable

APP_CODE = """
import signal, sys, threading
from blindfold.demo.app import DemoApp
app = DemoApp(port=int(sys.argv[1]))
print("app_ready", flush=True)
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
stop.wait()
app.close()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class Part:
    """One process of the deployment: started (again) with output appended to NAME.log and
    NAME.stderr, signalled by its PID, its readiness read from its own log."""

    def __init__(self, name: str, cmd: list[str], out: Path, ready: str, port: int = 0) -> None:
        self.name = name
        self.cmd = cmd
        self.log_path = out / f"{name}.log"
        self.err_path = out / f"{name}.stderr"
        self.ready_event = ready  # a JSON event name, a plain word, or "" for "port accepts"
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts: list[float] = []
        self._offset = 0

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else 0

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 60.0) -> float:
        """Start and wait until ready; returns the seconds it took."""
        t0 = time.monotonic()
        self._offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as out, self.err_path.open("ab") as err:
            self.proc = subprocess.Popen(
                self.cmd,
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                cwd=str(REPO),
                start_new_session=True,  # a terminal's signals reach the driver only
            )
        self.starts.append(time.time())
        self.wait_ready(timeout)
        return time.monotonic() - t0

    def wait_ready(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.ready_event:
                if port_open(self.port):
                    return {}
            else:
                found = self.find(self.ready_event, since=self._offset)
                if found is not None:
                    return found
            if not self.alive():
                break
            time.sleep(0.05)
        tail = self.err_path.read_text(errors="replace")[-2000:] if self.err_path.exists() else ""
        raise RuntimeError(f"{self.name} did not become ready ({self.ready_event}):\n{tail}")

    def find(self, event: str, since: int = 0) -> dict[str, Any] | None:
        """The first line after byte `since` of the log that is event `event` (JSON) or the
        word itself."""
        with contextlib.suppress(OSError), self.log_path.open("rb") as fh:
            fh.seek(since)
            for raw in fh:
                if event.encode() not in raw:
                    continue
                if raw.strip() == event.encode():
                    return {"event": event}
                with contextlib.suppress(ValueError):
                    rec = json.loads(raw)
                    if isinstance(rec, dict) and rec.get("event") == event:
                        return rec
        return None

    def signal(self, sig: int) -> None:
        if self.alive():
            assert self.proc is not None
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, sig)

    def kill9(self) -> None:
        """SIGKILL by PID, and reap it."""
        if self.proc is None:
            return
        self.signal(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)

    def stop(self, timeout: float = 45.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.proc.wait(10)
        return self.proc.returncode

    def children(self) -> list[int]:
        """PIDs of its child processes (the edge's workers)."""
        if not self.alive():
            return []
        try:
            text = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text()
        except OSError:
            return []
        return [int(p) for p in text.split()]

    def tracebacks(self) -> int:
        try:
            return self.err_path.read_text(errors="replace").count("Traceback (most recent")
        except OSError:
            return 0


@dataclass
class Topology:
    base: Path
    ports: dict[str, int] = field(default_factory=dict)
    parts: dict[str, Part] = field(default_factory=dict)
    blind_files: list[str] = field(default_factory=list)  # URL paths of sealed files
    cold_files: list[str] = field(default_factory=list)  # fetched only by the fault runs
    tmpfs: bool = False  # the blind cache is a tmpfs mount of its own (root only)

    @property
    def edge_port(self) -> int:
        return self.ports["edge"]

    @property
    def cache_dir(self) -> Path:
        return self.base / "edge-cache"

    def url(self, host: str, path: str = "/") -> str:
        return f"https://{host}:{self.edge_port}{path}"

    def order(self) -> list[str]:
        return ["redis", "app", "keyserver", "origin", "edge"]

    def start(self) -> None:
        for name in self.order():
            self.parts[name].start()

    def stop(self) -> None:
        for name in reversed(self.order()):
            with contextlib.suppress(Exception):
                self.parts[name].stop()
        if self.tmpfs:
            subprocess.run(["umount", str(self.cache_dir)], check=False, timeout=30)


def build(base: Path, *, ban_s: int = 60, cache_tmpfs_bytes: int = 0) -> Topology:
    """Write certificates, the sealed site and every config under `base`; nothing starts."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import (
        Encoding,
        NoEncryption,
        PrivateFormat,
        PublicFormat,
    )

    from blindfold.blind.sealer import SealOptions, load_id_secret, load_signing_key, seal_tree

    base.mkdir(parents=True, exist_ok=True)
    topo = Topology(base)
    p = topo.ports
    for name in ("app", "origin", "origin_admin", "decisions", "keyserver", "keyserver_admin"):
        p[name] = free_port()
    for name in ("redis", "edge", "edge_admin"):
        p[name] = free_port()

    ca = pki.make_ca("soak CA")
    ca.write(base / "ca.pem")
    # the origin terminates both names; the keyless name has a certificate of its own at the
    # key server (it signs nothing with a certificate that also covers a name the edge may not
    # serve: certificate_too_broad)
    pki.issue(ca, [HOST, KEYLESS_HOST]).write(base / "site.pem", base / "site.key")
    pki.issue(ca, [KEYLESS_HOST]).write(base / "keyless.pem", base / "keyless.key")
    pki.issue(ca, [DECISIONS_HOST]).write(base / "decisions.pem", base / "decisions.key")
    pki.issue(ca, [CDN_HOST]).write(base / "cdn.pem", base / "cdn.key")
    mtls = pki.make_ca("soak edge CA")
    mtls.write(base / "mtls-ca.pem", base / "mtls-ca.key")
    pki.issue(mtls, ["127.0.0.1"]).write(base / "keyserver.pem", base / "keyserver.key")
    edge_id = pki.issue(mtls, ["soak-edge"], client=True)
    edge_id.write(base / "edge-id.pem", base / "edge-id.key")

    # the decision-signing key pair (Redis): the private half on the origin, the public on edges
    sign_key = Ed25519PrivateKey.generate()
    pki.write_private(
        base / "decisions-sign.key",
        sign_key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()),
    )
    (base / "decisions-sign.pub").write_bytes(
        sign_key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    )

    # the sealed site: a few files kept warm by the visitors, a few only the faults ask for
    static = base / "static"
    for sub in ("blind/files", "blind/js"):
        (static / sub).mkdir(parents=True, exist_ok=True)
    (static / "blind" / "index.html").write_text("<!doctype html><title>soak</title>\n")
    (static / "blind" / "js" / "app.js").write_text("console.log('sealed');\n")
    (static / "blind" / "files" / "sample.bin").write_bytes(os.urandom(1 << 20))
    for i in range(4):
        name = f"/blind/files/hot-{i}.bin"
        (static / name.lstrip("/")).write_bytes(os.urandom(96 << 10))
        topo.blind_files.append(name)
    topo.blind_files += ["/blind/files/sample.bin", "/blind/js/app.js"]
    for i in range(8):
        name = f"/blind/files/cold-{i}.bin"
        (static / name.lstrip("/")).write_bytes(os.urandom(160 << 10))
        topo.cold_files.append(name)
    seal_tree(
        str(static),
        str(base / "sealed"),
        load_signing_key(str(base / "manifest.pem"), create=True),
        load_id_secret(str(base / "id-secret"), create=True),
        SealOptions(skip=("*.html",)),
    )
    keys = base / "edge-keys.txt"
    keys.write_text(f"soak-edge:{API_KEY}\n")
    keys.chmod(0o600)
    (base / "edge.apikey").write_text(API_KEY + "\n")
    (base / "edge.apikey").chmod(0o600)

    (base / "origin.toml").write_text(f"""\
[origin]
upstream = "http://127.0.0.1:{p["app"]}"
listen = ["127.0.0.1:{p["origin"]}"]
trusted_edges = ["127.0.0.1/32"]
proxy_protocol = "required"
admin_listen = "127.0.0.1:{p["origin_admin"]}"
max_connections = 4000  # what `ulimit -n` allows here (fd_limit_low otherwise)

[[origin.certificates]]
cert = "{base / "site.pem"}"
key = "{base / "site.key"}"

[origin.waf]
paranoia_level = 1
mode = "block"
allowed_content_types = "application/x-www-form-urlencoded multipart/form-data \
application/json application/octet-stream"
audit_log = "{base / "waf-audit.log"}"

[origin.decisions]
listen = "127.0.0.1:{p["decisions"]}"
cert = "{base / "decisions.pem"}"
key = "{base / "decisions.key"}"
api_keys_file = "{keys}"
ban_after_blocks = 1
ban_duration_s = {ban_s}
journal = "{base / "decisions.journal"}"
redis_url = "redis://127.0.0.1:{p["redis"]}/0"
signing_key = "{base / "decisions-sign.key"}"

[origin.blind]
dir = "{base / "sealed"}"
source_dir = "{static}"
site_names = ["{HOST}"]
""")
    (base / "keyserver.toml").write_text(f"""\
[keyserver]
listen = "127.0.0.1:{p["keyserver"]}"
cert = "{base / "keyserver.pem"}"
key = "{base / "keyserver.key"}"
client_ca = "{base / "mtls-ca.pem"}"
audit_log = "{base / "audit.log"}"
audit_key = "{base / "audit.key"}"
admin_listen = "127.0.0.1:{p["keyserver_admin"]}"

[[keyserver.keys]]
name = "keyless"
key = "{base / "keyless.key"}"
certificate = "{base / "keyless.pem"}"

[[keyserver.edges]]
name = "soak-edge"
cert_sha256 = "{pki.fingerprint_sha256(edge_id.cert)}"
hostnames = ["{KEYLESS_HOST}"]
""")
    write_edge_config(topo)

    if cache_tmpfs_bytes:
        topo.cache_dir.mkdir(exist_ok=True)
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={cache_tmpfs_bytes},mode=0700", "tmpfs",
             str(topo.cache_dir)],
            check=True, timeout=30,
        )  # fmt: skip
        topo.tmpfs = True

    bf = [PY, "-m", "blindfold"]
    topo.parts = {
        "redis": Part(
            "redis",
            [
                "redis-server",
                "--port",
                str(p["redis"]),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(base),
            ],
            base,
            "",
            p["redis"],
        ),
        "app": Part("app", [PY, "-c", APP_CODE, str(p["app"])], base, "app_ready"),
        "keyserver": Part(
            "keyserver",
            [*bf, "keyserver", "--config", str(base / "keyserver.toml")],
            base,
            "keyserver_ready",
        ),
        "origin": Part(
            "origin", [*bf, "origin", "--config", str(base / "origin.toml")], base, "origin_ready"
        ),
        "edge": Part(
            "edge", [*bf, "edge", "--config", str(base / "edge.toml")], base, "edge_ready"
        ),
    }
    return topo


def edge_config_text(topo: Topology) -> str:
    base, p = topo.base, topo.ports
    return f"""\
[edge]
listen = ["127.0.0.1:{p["edge"]}"]
admin_listen = "127.0.0.1:{p["edge_admin"]}"
workers = 2
max_connections = 4000
per_ip_rate_per_s = 50
per_ip_burst = 200
drain_timeout_s = 10

[[edge.routes]]
name = "site"
sni = ["{HOST}"]
mode = "passthrough"
origins = ["127.0.0.1:{p["origin"]}"]
proxy_protocol = "v2"

[[edge.routes]]
name = "keyless"
sni = ["{KEYLESS_HOST}"]
mode = "keyless"
certificate = "{base / "keyless.pem"}"
origins = ["127.0.0.1:{p["origin"]}"]
proxy_protocol = "v2"
origin_ca = "{base / "ca.pem"}"
keyserver = {{ addresses = ["127.0.0.1:{p["keyserver"]}"], client_cert = "{base / "edge-id.pem"}", \
client_key = "{base / "edge-id.key"}", ca = "{base / "mtls-ca.pem"}" }}

[[edge.routes]]
name = "blind"
sni = ["{CDN_HOST}"]
mode = "blind"
certificate = "{base / "cdn.pem"}"
key = "{base / "cdn.key"}"
origins = ["127.0.0.1:{p["origin"]}"]
proxy_protocol = "v2"
origin_ca = "{base / "ca.pem"}"
origin_server_name = "{HOST}"
blind = {{ cache_dir = "{topo.cache_dir}", memory_max_object_bytes = 16384, \
manifest_public_key = "{base / "sealed" / "manifest-public.pem"}" }}

[edge.decisions]
url = "https://127.0.0.1:{p["decisions"]}"
server_name = "{DECISIONS_HOST}"
api_key_file = "{base / "edge.apikey"}"
ca = "{base / "ca.pem"}"
poll_interval_s = 0.5
redis_url = "redis://127.0.0.1:{p["redis"]}/0"
signer_public_keys = ["{base / "decisions-sign.pub"}"]
"""


def write_edge_config(topo: Topology, text: str | None = None) -> None:
    """(Re)write edge.toml atomically, as an operator should before a reload."""
    path = topo.base / "edge.toml"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text if text is not None else edge_config_text(topo))
    os.replace(tmp, path)


# ---------------------------------------------------------------------------- /proc sampling
TICK = os.sysconf("SC_CLK_TCK")


def proc_sample(pid: int) -> dict[str, float] | None:
    """RSS (MB), open descriptors and CPU seconds of one process; None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
        rss_kb = 0
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss_kb = int(line.split()[1])
                    break
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, IndexError, ValueError):
        return None
    return {
        "rss_mb": rss_kb / 1024,
        "fds": fds,
        "cpu_s": (int(rest[11]) + int(rest[12])) / TICK,
    }


def processes(topo: Topology) -> dict[str, int]:
    """Name -> PID of every live process of the deployment (edge workers by index)."""
    out: dict[str, int] = {}
    for name in topo.order():
        part = topo.parts[name]
        if not part.alive():
            continue
        if name == "edge":
            out["edge-master"] = part.pid
            for i, pid in enumerate(sorted(part.children())):
                out[f"edge-worker{i}"] = pid
        else:
            out[name] = part.pid
    return out
