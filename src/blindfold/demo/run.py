"""`blindfold demo`: the whole topology on loopback with throwaway certificates.

    visitor --TLS--> edge (passthrough) --PROXY v2 + TLS--> origin agent (key, WAF) --> app
    visitor --TLS 1.3--> edge (keyless; signatures from the key server) --verified TLS--> ...
    browser --TLS--> edge (blind CDN hostname: sealed blobs only) --verified TLS--> origin

It prints what to run, and with --self-check runs it: a page through the edge, an SQL
injection the origin's WAF blocks, the resulting ban enforced by the edge at layer 4, a page
over the keyless hostname whose handshake signature is in the key server's audit log, a lying
edge (the demo edge's own identity) refused a handshake for the site's name, which the edge is
not authorised for, and a sealed file fetched from the blind edge, verified and decrypted
(`blindfold fetch`, `verify`). The keyless hostname has a certificate of its own: a browser
sends requests for every name a certificate covers over one connection (RFC 9113 §9.1.1), so
a certificate shared with the passthrough names would hand the edge their plaintext (the key
server refuses to sign with one).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

from blindfold import pki
from blindfold.demo.app import DemoApp

HOST = "demo.blindfold.test"
KEYLESS_HOST = "keyless.blindfold.test"
CDN_HOST = "cdn.blindfold.test"
ACME_HOST = f"acme.{HOST}"  # `--acme`: its certificate comes from a local pebble CA
DECISIONS_HOST = "decisions.blindfold.internal"  # the decision stream's own certificate
ATTACKER = "127.0.0.66"
API_KEY = "demo-edge-key-0123456789abcdef"


class Proc:
    """A blindfold process whose JSON log lines we follow."""

    def __init__(self, kind: str, config: Path, log: Path) -> None:
        self.kind = kind
        self.config = config
        self.log_path = log
        self.proc: asyncio.subprocess.Process | None = None
        self.ready: dict[str, Any] = {}
        self.events: list[dict[str, Any]] = []
        self._pump: asyncio.Task[None] | None = None

    async def start(self, timeout: float = 30) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "blindfold",
            self.kind,
            "--config",
            str(self.config),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        self._pump = asyncio.create_task(self._read())
        async with asyncio.timeout(timeout):
            while not self.ready:
                if self.proc.returncode is not None:
                    break
                await asyncio.sleep(0.05)
        if not self.ready:
            raise RuntimeError(f"{self.kind} did not start; see {self.log_path}")

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        with self.log_path.open("ab") as fh:
            while line := await self.proc.stdout.readline():
                fh.write(line)
                fh.flush()
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                self.events.append(record)
                del self.events[:-2000]
                if record.get("event") == f"{self.kind}_ready":
                    self.ready = record

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 40)
            except TimeoutError:
                self.proc.kill()
        if self._pump is not None:
            self._pump.cancel()


def write_private(path: Path, text: str) -> None:
    """A key file only its owner can read (0600 from the start, not chmod'ed afterwards)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)  # an existing file keeps its mode otherwise
        f.write(text)


def _origin_config(base: Path, app_port: int, edge_port: int) -> str:
    write_private(base / "edge-keys.txt", f"demo-edge:{API_KEY}\n")
    write_private(base / "quic-edge.key", os.urandom(32).hex() + "\n")
    return f"""\
# blindfold demo: the origin agent holds the site's key, runs the WAF, and bans attackers.
[origin]
upstream = "http://127.0.0.1:{app_port}"
listen = ["127.0.0.1:0"]
trusted_edges = ["127.0.0.1/32"]
proxy_protocol = "required"
admin_listen = "127.0.0.1:0"

[[origin.certificates]]
cert = "{base / "site.pem"}"
key = "{base / "site.key"}"

# the keyless hostname's own certificate: the edge's connections to the origin for it, and
# its handshakes when the key server is down (keyserver_down = "passthrough")
[[origin.certificates]]
cert = "{base / "keyless.pem"}"
key = "{base / "keyless.key"}"

# HTTP/3: the edge forwards QUIC flows here and announces each visitor, signed with this key
[origin.quic]
listen = ["127.0.0.1:0"]
edge_keys = ["{base / "quic-edge.key"}"]

[origin.waf]
paranoia_level = 1
mode = "block"

[origin.decisions]
listen = "127.0.0.1:0"
cert = "{base / "decisions.pem"}"
key = "{base / "decisions.key"}"
api_keys_file = "{base / "edge-keys.txt"}"
ban_after_blocks = 1
ban_duration_s = 60

# blind delivery: the sealed store (`blindfold seal`), the service worker, SRI, signatures
[origin.blind]
dir = "{base / "sealed"}"
source_dir = "{base / "static"}"
pages_prefix = "/blind/"
site_names = ["{HOST}"]
edge_url = "https://{CDN_HOST}:{edge_port}"
rewrite_html = true
response_signing_key = "{base / "responses.pem"}"
"""


def _keyserver_config(base: Path, edge_fp: str) -> str:
    kl = base / "keyless"
    return f"""\
# blindfold demo: the key server holds the keyless hostname's key and signs handshakes for the
# edge.
[keyserver]
listen = "127.0.0.1:0"
cert = "{kl / "keyserver.pem"}"
key = "{kl / "keyserver.key"}"
client_ca = "{kl / "ca.pem"}"
audit_log = "{kl / "audit.log"}"
audit_key = "{base / "audit.key"}"            # kept apart from the log (created at start)
admin_listen = "127.0.0.1:0"

# A certificate of its own, for {KEYLESS_HOST} only: the key server signs with a key only for
# an edge authorised for every name its certificate covers (a browser would send another
# name's requests over the keyless connection).
[[keyserver.keys]]
name = "keyless"
key = "{base / "keyless.key"}"
certificate = "{base / "keyless.pem"}"

# This edge may have handshakes signed for {KEYLESS_HOST} only (the SNI in the visitor's
# ClientHello, which the key server reads itself).
[[keyserver.edges]]
name = "demo-edge"
cert_sha256 = "{edge_fp}"
hostnames = ["{KEYLESS_HOST}"]
"""


def _edge_config(
    listen: str,
    admin: str,
    origin_port: int,
    decisions_port: int,
    base: Path,
    keyserver_port: int,
    quic_port: int,
) -> str:
    kl = base / "keyless"
    write_private(base / "edge.key", API_KEY + "\n")
    return f"""\
# blindfold demo: an edge in passthrough mode; it never decrypts.
[edge]
listen = ["{listen}"]
admin_listen = "{admin}"
workers = 2

[[edge.routes]]
name = "demo"
sni = ["{HOST}", "*.{HOST}"]
mode = "passthrough"
origins = ["127.0.0.1:{origin_port}"]
proxy_protocol = "v2"
quic = true                     # HTTP/3 too, on UDP at the same port: never decrypted either
quic_origins = ["127.0.0.1:{quic_port}"]

# keyless: the edge ends TLS 1.3 with the keyless hostname's certificate but not its key
[[edge.routes]]
name = "demo-keyless"
sni = ["{KEYLESS_HOST}"]
mode = "keyless"
certificate = "{base / "keyless.pem"}"
origins = ["127.0.0.1:{origin_port}"]
proxy_protocol = "v2"
origin_ca = "{base / "ca.pem"}"
keyserver = {{ addresses = ["127.0.0.1:{keyserver_port}"], client_cert = "{kl / "demo-edge.pem"}", \
client_key = "{kl / "demo-edge.key"}", ca = "{kl / "ca.pem"}" }}

# blind: the CDN hostname (the edge's own certificate); it serves sealed blobs by id
[[edge.routes]]
name = "demo-blind"
sni = ["{CDN_HOST}"]
mode = "blind"
certificate = "{base / "cdn.pem"}"
key = "{base / "cdn.key"}"
origins = ["127.0.0.1:{origin_port}"]
proxy_protocol = "v2"
origin_ca = "{base / "ca.pem"}"
origin_server_name = "{HOST}"
blind = {{ cache_dir = "{base / "edge-cache"}", \
manifest_public_key = "{base / "sealed" / "manifest-public.pem"}" }}

[edge.quic]
announce_key_file = "{base / "quic-edge.key"}"

[edge.decisions]
url = "https://127.0.0.1:{decisions_port}"
server_name = "{DECISIONS_HOST}"
api_key_file = "{base / "edge.key"}"
ca = "{base / "ca.pem"}"
poll_interval_s = 0.5
"""


def _public_pem(private: Path, public: Path) -> None:
    from cryptography.hazmat.primitives.serialization import (
        Encoding,
        PublicFormat,
        load_pem_private_key,
    )

    key = load_pem_private_key(private.read_bytes(), None)
    public.write_bytes(
        key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    )


def _spki_pin(cert: Path) -> str:
    import base64
    import hashlib

    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    c = x509.load_pem_x509_certificate(cert.read_bytes())
    spki = c.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


async def _curl(args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_shell(
        args + " -sS --max-time 10 -w '\\n%{http_code}'",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, _err = await proc.communicate()
    body, _, code = out.decode(errors="replace").rpartition("\n")
    return int(code or 0), body


def _acme_config(base: Path, pebble: Any) -> str:
    return f"""
# `--acme`: {ACME_HOST} gets its certificate from a local ACME CA (pebble) by tls-alpn-01:
# pebble connects to the edge, which forwards the acme-tls/1 hello here (docs/acme.md)
[origin.acme]
directory = "{pebble.directory}"
ca_bundle = "{pebble.ca_file}"
account_key = "{base / "acme-account.key"}"
challenge_dir = "{base / "acme-challenges"}"
retry_initial_s = 1
retry_max_s = 10

[[origin.acme.orders]]
hostnames = ["{ACME_HOST}"]
cert = "{base / "acme.pem"}"
key = "{base / "acme.key"}"
"""


async def _acme_issued(base: Path, pebble: Any, timeout: float = 60) -> bool:
    """Wait for the origin's first ACME certificate; then fetch pebble's root."""
    from cryptography import x509

    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        try:
            leaf = x509.load_pem_x509_certificates((base / "acme.pem").read_bytes())[0]
            if leaf.issuer != leaf.subject:  # not the placeholder
                pebble.root_pem(base / "pebble-root.pem")
                return True
        except (OSError, ValueError):
            pass
        await asyncio.sleep(0.2)
    return False


async def demo(
    port: int,
    admin_port: int,
    workdir: str | None,
    duration: float | None,
    self_check: bool,
    acme: bool = False,
) -> int:
    pebble: Any = None
    if acme:
        from blindfold.demo.pebble import have_pebble

        if not have_pebble():
            print(
                "blindfold demo --acme: needs Debian's pebble (apt install pebble)", file=sys.stderr
            )
            return 2
    base = Path(workdir or tempfile.mkdtemp(prefix="blindfold-demo-"))
    base.mkdir(parents=True, exist_ok=True)
    ca = pki.make_ca("blindfold demo CA")
    ca.write(base / "ca.pem")
    pki.issue(ca, [HOST, f"*.{HOST}"]).write(base / "site.pem", base / "site.key")
    # the keyless hostname's own certificate (never one shared with the passthrough names)
    pki.issue(ca, [KEYLESS_HOST]).write(base / "keyless.pem", base / "keyless.key")
    pki.issue(ca, [DECISIONS_HOST]).write(base / "decisions.pem", base / "decisions.key")
    # the keyless side's own PKI: an mTLS CA, the key server's certificate, the edge's identity
    kl = base / "keyless"
    kl.mkdir(exist_ok=True)
    mtls_ca = pki.make_ca("blindfold demo edge CA")
    mtls_ca.write(kl / "ca.pem", kl / "ca.key")
    pki.issue(mtls_ca, ["127.0.0.1"]).write(kl / "keyserver.pem", kl / "keyserver.key")
    edge_id = pki.issue(mtls_ca, ["demo-edge"], client=True)
    edge_id.write(kl / "demo-edge.pem", kl / "demo-edge.key")
    # blind delivery: the edge's own certificate for the CDN name, the static site, sealed
    pki.issue(ca, [CDN_HOST]).write(base / "cdn.pem", base / "cdn.key")
    from blindfold.blind.sealer import SealOptions, load_id_secret, load_signing_key, seal_tree
    from blindfold.demo.blindsite import write_site

    write_site(base / "static", f"https://{CDN_HOST}:{port}")
    seal_tree(
        str(base / "static"),
        str(base / "sealed"),
        load_signing_key(str(base / "manifest.pem"), create=True),
        load_id_secret(str(base / "id-secret"), create=True),
        SealOptions(skip=("*.html",), sri=("/blind/js/sri.js", "*.css")),
    )
    load_signing_key(str(base / "responses.pem"), create=True)
    _public_pem(base / "responses.pem", base / "responses.pub.pem")
    app = DemoApp()
    origin_text = _origin_config(base, app.port, port)
    if acme:
        from blindfold.demo.pebble import Pebble

        pebble = Pebble(base, ca=ca)
        pebble.start(port)  # it validates tls-alpn-01 on the edge's port
        pebble.add_a(ACME_HOST)
        origin_text += _acme_config(base, pebble)
    (base / "origin.toml").write_text(origin_text)
    (base / "keyserver.toml").write_text(
        _keyserver_config(base, pki.fingerprint_sha256(edge_id.cert))
    )
    origin = Proc("origin", base / "origin.toml", base / "origin.log")
    keyserver = Proc("keyserver", base / "keyserver.toml", base / "keyserver.log")
    edge: Proc | None = None
    try:
        await keyserver.start()
        keyserver_port = int(keyserver.ready["listen"][0].rpartition(":")[2])
        await origin.start()
        origin_port = int(origin.ready["listen"][0].rpartition(":")[2])
        decisions_port = int(str(origin.ready["decisions"]).rpartition(":")[2])
        quic_port = int(origin.ready["quic_listen"][0].rpartition(":")[2])
        (base / "edge.toml").write_text(
            _edge_config(
                f"127.0.0.1:{port}",
                f"127.0.0.1:{admin_port}",
                origin_port,
                decisions_port,
                base,
                keyserver_port,
                quic_port,
            )
        )
        edge = Proc("edge", base / "edge.toml", base / "edge.log")
        await edge.start()
        curl = (
            f"curl --cacert {base / 'ca.pem'} --resolve {HOST}:{port}:127.0.0.1 "
            f"https://{HOST}:{port}"
        )
        kcurl = (
            f"curl --cacert {base / 'ca.pem'} --resolve {KEYLESS_HOST}:{port}:127.0.0.1 "
            f"https://{KEYLESS_HOST}:{port}"
        )
        audit = kl / "audit.log"
        connect = (
            f"--cacert {base / 'ca.pem'} --connect-to {HOST}:{port}:127.0.0.1:{port} "
            f"--connect-to {CDN_HOST}:{port}:127.0.0.1:{port}"
        )
        fetch_cmd = (
            f"blindfold fetch https://{HOST}:{port}/blind/files/sample.bin "
            f"--edge https://{CDN_HOST}:{port} --manifest-key "
            f"{base / 'sealed' / 'manifest-public.pem'} {connect} -o /tmp/sample.bin"
        )
        verify_cmd = (
            f"blindfold verify https://{HOST}:{port}/blind/ --expect-cert "
            f"{base / 'site.pem'} --signature-key {base / 'responses.pub.pem'} "
            f"--manifest-key {base / 'sealed' / 'manifest-public.pem'} --edge "
            f"https://{CDN_HOST}:{port} {connect}"
        )
        print(
            f"""
blindfold demo is running (files in {base})

  visitor --TLS--> edge 127.0.0.1:{port} (passthrough: forwards encrypted bytes, never decrypts)
            --PROXY v2 + TLS--> origin agent 127.0.0.1:{origin_port} (the key, the WAF, the bans)
            --HTTP--> application 127.0.0.1:{app.port}

1. A page through the edge (the certificate is the origin's; the edge never had the key):
     {curl}/
   Over HTTP/3 too: the edge reads only the QUIC Initials' ClientHello (public keys) and
   forwards the flow (chromium --origin-to-force-quic-on={HOST}:{port} ...).

2. An SQL injection: the origin's WAF (ModSecurity + OWASP CRS) answers 403 with a request id
   and bans the address; within a second every edge refuses it at layer 4:
     {curl}/?id=1%27%20OR%201=1-- --interface {ATTACKER}
     {curl}/ --interface {ATTACKER}        # now refused by the edge (for 60 s)
     {curl}/ --interface 127.0.0.67        # another visitor is still served

3. Keyless: the edge ends TLS 1.3 itself with {KEYLESS_HOST}'s certificate (its own: one
   shared with {HOST} would let a browser send {HOST}'s requests over this connection) but
   not its key; each handshake's signature comes from the key server
   (127.0.0.1:{keyserver_port}), which reads the handshake messages itself, signs only for the
   SNI it is authorised for, and writes a keyed, hash-chained audit log ("verified": SNI,
   client random, suite, certificate; "claimed": the visitor's address as the edge says):
     {kcurl}/
     tail -n 3 {audit}
     blindfold audit verify --key {base / "audit.key"} {audit}    # exit 0: intact
     curl -s http://127.0.0.1:{admin_port}/metrics | grep keyless_handshakes

4. Blind delivery: {CDN_HOST} is a route of the edge's own that serves only sealed blobs;
   the keys are in the manifest the origin signs and serves itself. Open in a browser
   (the service worker fetches, verifies and decrypts; sri.html shows Subresource Integrity):
     chromium --user-data-dir=$(mktemp -d) \\
       --host-resolver-rules='MAP *.blindfold.test 127.0.0.1' \\
       --ignore-certificate-errors-spki-list={_spki_pin(base / "site.pem")},\
{_spki_pin(base / "cdn.pem")} \\
       https://{HOST}:{port}/blind/
   The same from Python, then the whole site checked end to end:
     {fetch_cmd}
     {verify_cmd}

5. Watch it: the status pages (live figures and charts; read-only)
     http://127.0.0.1:{admin_port}/  (edge)   http://{origin.ready["admin"]}/  (origin agent)
     http://{keyserver.ready["admin"]}/  (key server)
   the edge's metrics and the origin's decision stream (what edges poll):
     curl -s http://127.0.0.1:{admin_port}/metrics | grep -E 'decisions|banned'
     curl -s --cacert {base / "ca.pem"} --resolve {DECISIONS_HOST}:{decisions_port}:127.0.0.1 \\
          -H 'X-Api-Key: {API_KEY}' \\
          'https://{DECISIONS_HOST}:{decisions_port}/v1/decisions/stream?startup=true'

Logs (JSON lines): {base / "edge.log"}  {base / "origin.log"}  {base / "keyserver.log"}
Stop with Ctrl-C.
""",
            flush=True,
        )
        if pebble is not None:
            issued = await _acme_issued(base, pebble)
            acurl = (
                f"curl --cacert {base / 'pebble-root.pem'} --resolve {ACME_HOST}:{port}:127.0.0.1 "
                f"https://{ACME_HOST}:{port}"
            )
            print(
                f"""6. ACME: {ACME_HOST}'s certificate comes from the local ACME CA (pebble,
   directory {pebble.directory}) by tls-alpn-01 through the edge (a forced renewal,
   POST /acme/renew, needs an admin_token_file, which the demo does not set);
   watch blindfold_acme_* on the origin's /metrics:
     {acurl}/
"""
                if issued
                else f"6. ACME: no certificate for {ACME_HOST} yet; see {base / 'origin.log'}",
                flush=True,
            )
        status = 0
        if self_check:
            ok = await _self_check(
                curl, kcurl, audit, edge, fetch_cmd, verify_cmd, base, keyserver_port, port
            )
            if pebble is not None:
                code, _body = (
                    await _curl(acurl + "/") if (base / "pebble-root.pem").exists() else (0, "")
                )
                acme_ok = code == 200
                print(
                    f"self-check: a certificate from the local ACME CA, verified through the "
                    f"edge: {'OK' if acme_ok else 'FAILED'}",
                    flush=True,
                )
                ok = ok and acme_ok
            status = 0 if ok else 1
            if duration is None:  # checks done: exit with their verdict
                return status
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), duration)
        return status
    finally:
        if edge is not None:
            await edge.stop()
        await origin.stop()
        await keyserver.stop()
        app.close()
        if pebble is not None:
            pebble.close()
        if workdir is None and not os.environ.get("BLINDFOLD_DEMO_KEEP"):
            shutil.rmtree(base, ignore_errors=True)


async def _h3_get(port: int, ca: Path, path: str, timeout: float = 10.0) -> tuple[int, bytes]:
    """One HTTP/3 GET of https://HOST:port/path over 127.0.0.1 (aioquic's client)."""
    from aioquic.asyncio.client import connect
    from aioquic.asyncio.protocol import QuicConnectionProtocol
    from aioquic.h3 import events as h3e
    from aioquic.h3.connection import H3_ALPN, H3Connection
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.events import QuicEvent

    done: asyncio.Future[tuple[int, bytes]] = asyncio.get_running_loop().create_future()
    answer: dict[str, Any] = {"status": 0, "body": b""}

    class Client(QuicConnectionProtocol):
        def __init__(self, *args: Any, **kw: Any) -> None:
            super().__init__(*args, **kw)
            self.h3 = H3Connection(self._quic)

        def quic_event_received(self, event: QuicEvent) -> None:
            for ev in self.h3.handle_event(event):
                if isinstance(ev, h3e.HeadersReceived):
                    answer["status"] = int(dict(ev.headers).get(b":status", b"0"))
                elif isinstance(ev, h3e.DataReceived):
                    answer["body"] += ev.data
                if getattr(ev, "stream_ended", False) and not done.done():
                    done.set_result((answer["status"], answer["body"]))

    config = QuicConfiguration(
        is_client=True, alpn_protocols=list(H3_ALPN), server_name=HOST, cafile=str(ca)
    )
    async with asyncio.timeout(timeout):
        async with connect("127.0.0.1", port, configuration=config, create_protocol=Client) as c:
            assert isinstance(c, Client)
            sid = c._quic.get_next_available_stream_id()
            c.h3.send_headers(
                sid,
                [
                    (b":method", b"GET"),
                    (b":scheme", b"https"),
                    (b":authority", f"{HOST}:{port}".encode()),
                    (b":path", path.encode()),
                ],
                end_stream=True,
            )
            c.transmit()
            return await done


async def _run_blindfold(command: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_shell(
        command.replace("blindfold ", f"{sys.executable} -m blindfold ", 1),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode(errors="replace")


async def _lying_edge(base: Path, keyserver_port: int) -> str:
    """Plays a lying edge with the demo edge's real identity: the handshake of a visitor to
    {HOST} (which this edge is not authorised for), sent to the key server as it is. Returns
    the key server's answer ("signed" or its refusal)."""
    import ssl

    from blindfold.core import keyless_wire as w
    from blindfold.core import tls13_server as ts
    from blindfold.core.clienthello import peek_client_hello
    from blindfold.errors import KeyServerError
    from blindfold.keyless.client import KeyServerClient

    visitor = ssl.create_default_context(cafile=str(base / "ca.pem"))
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    with contextlib.suppress(ssl.SSLWantReadError):
        visitor.wrap_bio(inc, out, server_hostname=HOST).do_handshake()
    flight = out.read()
    hello = peek_client_hello(flight)
    identity = ts.ServerIdentity.from_pem((base / "site.pem").read_bytes())
    server = ts.TlsServer(identity, ts.TlsSettings(), ts.SessionStore(10, 10), HOST, hello)
    request = server.receive(flight, 0.0)[-1]
    if not isinstance(request, ts.SignatureRequested):
        return f"no signature request: {request}"
    kl = base / "keyless"
    tls = ssl.create_default_context(cafile=str(kl / "ca.pem"))
    tls.load_cert_chain(kl / "demo-edge.pem", kl / "demo-edge.key")
    client = KeyServerClient((f"127.0.0.1:{keyserver_port}",), tls)
    try:
        await client.sign(w.SignRequest(request.scheme, ATTACKER, request.messages))
        return "signed"
    except KeyServerError as exc:
        return str(exc)
    finally:
        server.signature_failed("demo")
        await client.close()


def _audit_entries(audit: Path) -> list[dict[str, Any]]:
    try:
        return [json.loads(line) for line in audit.read_text().splitlines()]
    except (OSError, ValueError):
        return []


async def _self_check(
    curl: str,
    kcurl: str,
    audit: Path,
    edge: Proc,
    fetch_cmd: str,
    verify_cmd: str,
    base: Path,
    keyserver_port: int,
    port: int,
) -> bool:
    checks = []
    try:
        status, page = await _h3_get(port, base / "ca.pem", "/")
    except (OSError, ConnectionError, TimeoutError) as exc:
        status, page = 0, repr(exc).encode()
    checks.append(
        (
            "a page over HTTP/3 through the edge (QUIC passed through, never decrypted)",
            status == 200 and b"Hello from the application" in page,
        )
    )
    code, out = await _run_blindfold(fetch_cmd)
    checks.append(
        (
            "a sealed file from the blind edge, verified and decrypted",
            code == 0 and "from the edge" in out,
        )
    )
    code, out = await _run_blindfold(verify_cmd)
    checks.append(
        (
            "the site verifies end to end (certificate, signature, manifest, blobs)",
            code == 0 and out.count("ok  ") == 5,
        )
    )
    code, body = await _curl(f"{kcurl}/ --interface 127.0.0.68")
    checks.append(
        ("a page over the keyless hostname", code == 200 and "Hello from the application" in body)
    )
    from blindfold.keyserver.audit import load_key, verify

    signed: dict[str, Any] = {}
    for _ in range(20):  # the key server writes its audit log in batches
        signed = next(
            (
                e
                for e in _audit_entries(audit)
                if e.get("event") == "signed" and e.get("claimed") == {"client": "127.0.0.68"}
            ),
            {},
        )
        if signed:
            break
        await asyncio.sleep(0.1)
    checks.append(
        (
            "its signature is in the audit log, with the SNI the key server read itself",
            signed.get("verified", {}).get("sni") == KEYLESS_HOST,
        )
    )
    ks_log = (base / "keyserver.log").read_text(errors="replace")
    checks.append(
        (
            "the keyless hostname's certificate names no host the edge may not sign for",
            "keyserver_ready" in ks_log and '"event":"edge_key_partly_authorised"' not in ks_log,
        )
    )
    answer = await _lying_edge(base, keyserver_port)
    lie: dict[str, Any] = {}
    for _ in range(20):
        lie = next(
            (
                e
                for e in _audit_entries(audit)
                if e.get("event") == "refused" and e.get("verified", {}).get("sni") == HOST
            ),
            {},
        )
        if lie:
            break
        await asyncio.sleep(0.1)
    checks.append(
        (
            f"a lying edge (the demo edge's identity) cannot get a handshake for {HOST} signed",
            "unauthorized_sni" in answer and lie.get("reason") == "unauthorized_sni",
        )
    )
    checks.append(
        (
            "the audit log verifies with its key",
            verify(str(audit), load_key(str(base / "audit.key"))).ok,
        )
    )
    code, body = await _curl(f"{curl}/")
    checks.append(("a page through the edge", code == 200 and "Hello from the application" in body))
    code, body = await _curl(f"{curl}/?id=1%27%20OR%201=1-- --interface {ATTACKER}")
    checks.append(("the WAF blocks the SQL injection", code == 403 and "request id" in body))
    refused = False
    for _ in range(40):
        code, _body = await _curl(f"{curl}/ --interface {ATTACKER}")
        if code == 0:
            refused = True
            break
        await asyncio.sleep(0.1)
    checks.append(("the edge then refuses the attacker", refused))
    code, _body = await _curl(f"{curl}/ --interface 127.0.0.67")
    checks.append(("another visitor is still served", code == 200))
    for name, ok in checks:
        print(f"self-check: {name}: {'OK' if ok else 'FAILED'}", flush=True)
    return all(ok for _name, ok in checks)


def run_demo(
    port: int,
    admin_port: int,
    workdir: str | None,
    duration: float | None,
    self_check: bool,
    acme: bool = False,
) -> int:
    return asyncio.run(demo(port, admin_port, workdir, duration, self_check, acme))
