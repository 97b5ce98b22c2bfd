"""Visitors for the soak and the fault runs: real TLS clients (Python ssl, http.client) from
many 127.x.y.z source addresses, each kind in a thread of its own, every loop bounded in count
and time, every request with a deadline. Each outcome is recorded with its time, so a fault run
can say what visitors saw during and after a fault.

Kinds (what each one expects):
- page: passthrough GETs (new connection, or three on one keep-alive connection) -> 200.
- upload: passthrough POST /upload of 8-512 KB -> 200 with the body's SHA-256 echoed.
- keyless: a new connection (a full TLS 1.3 handshake, so one key-server signature) -> 200.
- attack: an SQL injection from an address never used before, alternately through the
  passthrough and the keyless route -> 403 from the origin's WAF, then the edge refuses the
  address at layer 4 within `ban_deadline_s` (outcomes `blocked` and `banned`, both expected).
- blind: a sealed blob from the CDN hostname, checked as the service worker checks it (size,
  blob digest, every record's tag, plaintext digest against the signed manifest) -> `ok`;
  anything else is an error, and `verify:` means a bad or half-written blob was served.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import os
import random
import socket
import ssl
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.soak.topology import API_KEY, CDN_HOST, HOST, KEYLESS_HOST, Topology

EXPECTED = frozenset({"ok", "blocked", "banned", "reported"})
API_KEY_HEADER = {"x-api-key": API_KEY}


@dataclass(frozen=True, slots=True)
class Outcome:
    t: float  # time.time()
    kind: str
    what: str  # "ok", "blocked", "banned", or an error class
    seconds: float


@dataclass
class Recorder:
    events: list[Outcome] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    samples: dict[str, list[str]] = field(default_factory=dict)  # error class -> examples

    def add(self, kind: str, what: str, seconds: float, detail: str = "") -> None:
        with self.lock:
            self.events.append(Outcome(time.time(), kind, what, seconds))
            if what not in EXPECTED and detail:
                ex = self.samples.setdefault(f"{kind}:{what}", [])
                if len(ex) < 3:
                    ex.append(detail[:300])

    def counts(self, since: float = 0.0, until: float = float("inf")) -> Counter[tuple[str, str]]:
        with self.lock:
            return Counter((e.kind, e.what) for e in self.events if since <= e.t < until)

    def errors(self, since: float = 0.0, until: float = float("inf")) -> Counter[tuple[str, str]]:
        return Counter({k: n for k, n in self.counts(since, until).items() if k[1] not in EXPECTED})

    def last_error(self, since: float) -> float | None:
        with self.lock:
            times = [e.t for e in self.events if e.t >= since and e.what not in EXPECTED]
        return max(times) if times else None

    def last_error_by_kind(self, since: float) -> dict[str, float]:
        """Seconds from `since` to each kind's last error."""
        out: dict[str, float] = {}
        with self.lock:
            for e in self.events:
                if e.t >= since and e.what not in EXPECTED:
                    out[e.kind] = round(max(out.get(e.kind, 0.0), e.t - since), 2)
        return out


class _Conn(http.client.HTTPSConnection):
    """HTTPS with SNI/Host `host` over a TCP connection from `source` to 127.0.0.1:`port`."""

    def __init__(self, host: str, port: int, source: str, ctx: ssl.SSLContext, timeout: float):
        super().__init__(host, port, timeout=timeout, context=ctx)
        self._source = source
        self._ctx = ctx

    def connect(self) -> None:
        raw = socket.create_connection(
            ("127.0.0.1", self.port), self.timeout, source_address=(self._source, 0)
        )
        try:
            self.sock = self._ctx.wrap_socket(raw, server_hostname=self.host)
        except BaseException:
            raw.close()
            raise


def classify(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, (ConnectionResetError, BrokenPipeError)):
        return "reset"
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return "timeout"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return "tls:cert"
    if isinstance(exc, ssl.SSLError):
        return f"tls:{exc.reason or type(exc).__name__}"
    if isinstance(exc, (http.client.RemoteDisconnected, http.client.IncompleteRead)):
        return "closed"
    if isinstance(exc, http.client.HTTPException):
        return f"http:{type(exc).__name__}"
    if isinstance(exc, OSError) and exc.errno:
        return f"os:{errno.errorcode.get(exc.errno, exc.errno)}"
    return type(exc).__name__


def request(
    host: str,
    port: int,
    source: str,
    ctx: ssl.SSLContext,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 15.0,
    conn: _Conn | None = None,
) -> tuple[int, bytes, _Conn]:
    c = conn or _Conn(host, port, source, ctx, timeout)
    c.request(method, path, body=body, headers=headers or {})
    resp = c.getresponse()
    data = resp.read(64 << 20)
    return resp.status, data, c


class Visitors:
    """Starts one thread per kind at the given rates (per second); `stop()` ends them."""

    def __init__(
        self,
        topo: Topology,
        rec: Recorder,
        rates: dict[str, float],
        deadline: float,
        *,
        ban_deadline_s: float = 5.0,
        max_per_kind: int = 1_000_000,
        report_bad: bool = False,
    ) -> None:
        self.topo = topo
        self.rec = rec
        self.rates = rates
        self.deadline = deadline  # time.monotonic() after which every loop ends
        self.ban_deadline_s = ban_deadline_s
        self.report_bad = report_bad  # a bad blob is reported to the edge (POST /r/<id>)
        self.max_per_kind = max_per_kind
        self.stopping = threading.Event()
        self.ctx = ssl.create_default_context(cafile=str(topo.base / "ca.pem"))
        self.threads: list[threading.Thread] = []
        self.manifest: Any = None
        self.manifest_at = 0.0
        self.attackers = 0
        self.paused: set[str] = set()  # kinds paused by a fault run
        self.extra_files: list[str] = []  # blind paths added by a fault run (cold files)

    def start(self) -> None:
        loops = {
            "page": self.page,
            "upload": self.upload,
            "keyless": self.keyless,
            "attack": self.attack,
            "blind": self.blind,
        }
        for kind, rate in self.rates.items():
            if rate <= 0:
                continue
            t = threading.Thread(target=self._loop, args=(kind, loops[kind], rate), daemon=True)
            t.start()
            self.threads.append(t)

    def stop(self, timeout: float = 30.0) -> None:
        self.stopping.set()
        end = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.1, end - time.monotonic()))

    def _loop(self, kind: str, one: Any, rate: float) -> None:
        interval = 1.0 / rate
        n = 0
        rng = random.Random(hash(kind))
        while not self.stopping.is_set() and time.monotonic() < self.deadline:
            if n >= self.max_per_kind:
                return
            start = time.monotonic()
            if kind not in self.paused:
                n += 1
                try:
                    one(n, rng)
                except Exception as exc:  # a bug in the visitor, not the system: still counted
                    self.rec.add(kind, f"driver:{type(exc).__name__}", 0.0, repr(exc))
            # exponential gaps: arrivals as a Poisson process, not a metronome
            wait = rng.expovariate(1.0 / interval) - (time.monotonic() - start)
            if wait > 0:
                self.stopping.wait(min(wait, 5.0))

    # ------------------------------------------------------------------ kinds
    def _timed(self, kind: str, fn: Any, source: str) -> str:
        t0 = time.monotonic()
        try:
            what, detail = fn()
        except Exception as exc:
            what, detail = classify(exc), f"{source}: {exc!r}"
        self.rec.add(kind, what, time.monotonic() - t0, detail)
        return str(what)

    def page(self, n: int, rng: random.Random) -> None:
        source = f"127.1.{n % 4}.{(n // 4) % 250 + 1}"
        port = self.topo.edge_port

        def go() -> tuple[str, str]:
            paths = ["/", "/echo", f"/cached/p{n % 7}?max_age=5"]
            if n % 5:
                status, body, c = request(HOST, port, source, self.ctx, "GET", rng.choice(paths))
                c.close()
                return ("ok", "") if status == 200 else (f"http_{status}", body[:200].decode())
            c = None
            try:
                for path in paths:  # three on one keep-alive connection
                    status, body, c = request(HOST, port, source, self.ctx, "GET", path, conn=c)
                    if status != 200:
                        return f"http_{status}", body[:200].decode(errors="replace")
            finally:
                if c is not None:
                    c.close()
            return "ok", ""

        self._timed("page", go, source)

    def upload(self, n: int, rng: random.Random) -> None:
        source = f"127.4.0.{n % 100 + 1}"
        body = rng.randbytes(rng.randint(8 << 10, 512 << 10))

        def go() -> tuple[str, str]:
            status, data, c = request(
                HOST, self.topo.edge_port, source, self.ctx, "POST", "/upload", body,
                {"content-type": "application/octet-stream"}, timeout=30,
            )  # fmt: skip
            c.close()
            if status != 200:
                return f"http_{status}", data[:200].decode(errors="replace")
            import json

            got = json.loads(data)
            if (
                got.get("bytes") != len(body)
                or got.get("sha256") != hashlib.sha256(body).hexdigest()
            ):
                return "upload_mismatch", repr(got)[:200]
            return "ok", ""

        self._timed("upload", go, source)

    def keyless(self, n: int, rng: random.Random) -> None:
        source = f"127.5.0.{n % 200 + 1}"

        def go() -> tuple[str, str]:
            path = rng.choice(["/", "/echo", f"/cached/k{n % 5}?max_age=30"])
            status, body, c = request(
                KEYLESS_HOST, self.topo.edge_port, source, self.ctx, "GET", path
            )
            c.close()
            return (
                ("ok", "")
                if status == 200
                else (f"http_{status}", body[:200].decode(errors="replace"))
            )

        self._timed("keyless", go, source)

    def attack(self, n: int, rng: random.Random) -> None:
        self.attackers += 1
        a = self.attackers
        source = f"127.3.{(a // 250) % 250}.{a % 250 + 1}"
        host = HOST if n % 2 else KEYLESS_HOST
        port = self.topo.edge_port

        def go() -> tuple[str, str]:
            status, body, c = request(host, port, source, self.ctx, "GET", "/?id=1%27%20OR%201=1--")
            c.close()
            if status != 403:
                return f"not_blocked_{status}", body[:200].decode(errors="replace")
            return "blocked", ""

        if self._timed("attack", go, source) != "blocked":
            return  # not blocked (the origin was away): no ban to look for
        # then the edge must refuse the address, at layer 4, within the deadline
        t0 = time.monotonic()
        end = t0 + self.ban_deadline_s
        while time.monotonic() < end and not self.stopping.is_set():
            try:
                _status, _body, c = request(host, port, source, self.ctx, "GET", "/", timeout=5)
                c.close()
            except (OSError, http.client.HTTPException):
                self.rec.add("attack", "banned", time.monotonic() - t0)
                return
            time.sleep(0.2)
        if not self.stopping.is_set():
            self.rec.add("attack", "ban_not_enforced", time.monotonic() - t0, source)

    def blind(self, n: int, rng: random.Random) -> None:
        from blindfold.core import ece

        source = f"127.6.0.{n % 50 + 1}"
        stale = self.manifest is None or time.monotonic() - self.manifest_at > 60
        if stale and not self._load_manifest():
            return
        files = self.topo.blind_files + self.extra_files
        path = files[n % len(files)]
        entry = self.manifest.files[path]

        def go() -> tuple[str, str]:
            status, data, c = request(
                CDN_HOST, self.topo.edge_port, source, self.ctx, "GET", f"/b/{entry.id}"
            )
            c.close()
            if status != 200:
                return f"http_{status}", data[:200].decode(errors="replace")
            if (
                len(data) != entry.sealed_size
                or hashlib.sha256(data).hexdigest() != entry.blob_sha256
            ):
                self._report(entry.id, source)
                return "verify:blob", f"{path}: {len(data)} bytes, not the manifest's"
            opener = ece.Opener(entry.key, max_rs=entry.rs)
            try:
                plain = b"".join(opener.feed(data)) + opener.finish()
            except Exception as exc:
                self._report(entry.id, source)
                return "verify:records", f"{path}: {exc}"
            if hashlib.sha256(plain).hexdigest() != entry.sha256:
                self._report(entry.id, source)
                return "verify:plaintext", path
            return "ok", ""

        self._timed("blind", go, source)

    def _report(self, blob: str, source: str) -> None:
        """What the service worker and `blindfold fetch` do with a copy that failed."""
        if not self.report_bad:
            return
        try:
            status, _b, c = request(
                CDN_HOST, self.topo.edge_port, source, self.ctx, "POST", f"/r/{blob}"
            )
            c.close()
            self.rec.add("blind", "reported" if status == 202 else f"report_{status}", 0.0)
        except Exception as exc:
            self.rec.add("blind", f"report:{classify(exc)}", 0.0, repr(exc))

    def _load_manifest(self) -> bool:
        from blindfold.blind.fetch import FetchOptions, get_manifest, load_public_key

        opts = FetchOptions(
            edge=self.topo.url(CDN_HOST),
            public_key=load_public_key(str(self.topo.base / "sealed" / "manifest-public.pem")),
            ca_file=str(self.topo.base / "ca.pem"),
            connect_to={f"{HOST}:{self.topo.edge_port}": f"127.0.0.1:{self.topo.edge_port}"},
            timeout_s=15,
        )
        t0 = time.monotonic()
        try:
            self.manifest = get_manifest(self.topo.url(HOST, "/blind/"), opts)
        except Exception as exc:
            self.rec.add("blind", f"manifest:{classify(exc)}", time.monotonic() - t0, repr(exc))
            return self.manifest is not None
        self.manifest_at = time.monotonic()
        return True


def audit_verify(topo: Topology) -> tuple[int, str]:
    """`blindfold audit verify --key KEY LOG`: (exit status, output)."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "blindfold", "audit", "verify", "--key",
         str(topo.base / "audit.key"), str(topo.base / "audit.log")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    return out.returncode, (out.stdout + out.stderr).strip()


def log_events(path: Path) -> Counter[str]:
    """How many lines of each event a JSON log holds."""
    import json

    counts: Counter[str] = Counter()
    if not path.exists():
        return counts
    with path.open("rb") as fh:
        for raw in fh:
            if not raw.startswith(b"{"):
                continue
            try:
                counts[str(json.loads(raw).get("event"))] += 1
            except ValueError:
                counts["<not json>"] += 1
    return counts


def manifest_entries(topo: Topology) -> dict[str, Any]:
    """The sealed site's manifest, checked with its public key: {URL path: Entry}."""
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    from blindfold.core.manifest import verify as verify_manifest

    data = (topo.base / "sealed" / "manifest.json").read_bytes()
    key = load_pem_public_key((topo.base / "sealed" / "manifest-public.pem").read_bytes())
    return dict(verify_manifest(data, key, time.time()).files)  # type: ignore[arg-type]


def cache_files_whole(topo: Topology) -> tuple[int, list[str]]:
    """Every blob file in the edge's cache compared with the manifest: (files checked,
    problems). A file whose bytes are not the sealed blob the manifest names is a problem."""
    by_id = {e.id: e for e in manifest_entries(topo).values()}
    checked, problems = 0, []
    for root, _dirs, names in os.walk(topo.cache_dir):
        for name in names:
            p = Path(root) / name
            if name.endswith(".tmp") or name.startswith("."):
                problems.append(f"left behind: {p.relative_to(topo.cache_dir)}")
                continue
            entry = by_id.get(name)
            if entry is None:
                continue  # the index file
            checked += 1
            blob = p.read_bytes()
            if (
                len(blob) != entry.sealed_size
                or hashlib.sha256(blob).hexdigest() != entry.blob_sha256
            ):
                problems.append(f"not whole or not the blob: {p.relative_to(topo.cache_dir)}")
    return checked, problems
