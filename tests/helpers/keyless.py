"""Key server fixtures: the site's keys, an mTLS CA for edges (made with `blindfold pki`),
and the key server's configuration."""

from __future__ import annotations

import contextlib
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from blindfold import pki
from blindfold.cli.main import main as cli
from blindfold.core import keyless_wire as w
from blindfold.core import tls13_server as ts
from blindfold.keyless.client import KeyServerClient
from tests.helpers.edgeproc import BlindfoldProcess


class KeyServerProcess(BlindfoldProcess):
    kind = "keyserver"


@dataclass
class KeylessPki:
    dir: Path
    edge_ca: Path
    site_ca: Path
    sites: dict[str, tuple[Path, Path, str]]  # name -> (cert, key, sha256 hex)
    fingerprints: dict[str, str]  # edge name -> client cert sha256

    @property
    def audit_key(self) -> Path:
        """Apart from the log (the key server creates it at its first start)."""
        return self.dir.parent / "audit.key"

    def edge_tls(self, name: str) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.edge_ca))
        ctx.load_cert_chain(self.dir / f"{name}.pem", self.dir / f"{name}.key")
        return ctx

    def client(self, name: str, port: int, **kw: float) -> KeyServerClient:
        return KeyServerClient(
            (f"127.0.0.1:{port}",),
            self.edge_tls(name),
            server_name="keyserver.test",
            **kw,
        )


def make_pki(base: Path, site_ca: pki.Issued) -> KeylessPki:
    d = base / "keyless"
    fps: dict[str, str] = {}
    assert cli(["pki", "ca", str(d)]) == 0
    assert (
        cli(
            [
                "pki",
                "server",
                "keyserver",
                str(d),
                "--host",
                "keyserver.test",
                "--host",
                "127.0.0.1",
            ]
        )
        == 0
    )
    for name in ("edge1", "edge2", "rogue"):
        assert cli(["pki", "edge", name, str(d)]) == 0
        cert = (d / f"{name}.pem").read_bytes()
        from cryptography import x509

        fps[name] = pki.fingerprint_sha256(x509.load_pem_x509_certificate(cert))
    site_ca.write(d / "site-ca.pem")
    sites = {}
    for name, kind, host in (
        ("p256", "ec256", "example.test"),
        ("p384", "ec384", "p384.test"),
        ("rsa", "rsa2048", "rsa.test"),
        ("ed", "ed25519", "ed.test"),
    ):
        leaf = pki.issue(site_ca, [host, f"*.{host}"], kind=kind)  # type: ignore[arg-type]
        leaf.write(d / f"site-{name}.pem", d / f"site-{name}.key")
        sites[name] = (
            d / f"site-{name}.pem",
            d / f"site-{name}.key",
            pki.fingerprint_sha256(leaf.cert),
        )
    return KeylessPki(d, d / "ca.pem", d / "site-ca.pem", sites, fps)


def names_of(*hosts: str) -> list[str]:
    """Every name the site certificates of `make_pki` cover for these hosts (the host and
    '*.host'): an edge authorised for all of them may have handshakes signed with them."""
    return [n for h in hosts for n in (h, f"*.{h}")]


def add_site(
    p: KeylessPki, site_ca: pki.Issued, name: str, hosts: list[str], kind: str = "ec256"
) -> Path:
    """Another site certificate (and key) for the key server to hold: `keyserver_config` made
    after this lists it too. Returns the certificate's path."""
    leaf = pki.issue(site_ca, hosts, kind=kind)  # type: ignore[arg-type]
    leaf.write(p.dir / f"site-{name}.pem", p.dir / f"site-{name}.key")
    p.sites[name] = (
        p.dir / f"site-{name}.pem",
        p.dir / f"site-{name}.key",
        pki.fingerprint_sha256(leaf.cert),
    )
    return p.dir / f"site-{name}.pem"


def keyserver_config(
    p: KeylessPki,
    edges: dict[str, list[str]],
    *,
    rate: tuple[float, int] | None = None,
    edge_rates: dict[str, tuple[float, int]] | None = None,
) -> str:
    out = f"""[keyserver]
listen = "127.0.0.1:0"
cert = "{p.dir / "keyserver.pem"}"
key = "{p.dir / "keyserver.key"}"
client_ca = "{p.edge_ca}"
audit_log = "{p.dir / "audit.log"}"
audit_key = "{p.audit_key}"
admin_listen = "127.0.0.1:0"
"""
    if rate:
        out += f"rate_per_s = {rate[0]}\nburst = {rate[1]}\n"
    for name, (cert, key, _fp) in p.sites.items():
        out += f'\n[[keyserver.keys]]\nname = "{name}"\nkey = "{key}"\ncertificate = "{cert}"\n'
    for edge, hosts in edges.items():
        out += (
            f'\n[[keyserver.edges]]\nname = "{edge}"\ncert_sha256 = "{p.fingerprints[edge]}"\n'
            f"hostnames = {hosts!r}\n".replace("'", '"')
        )
        if edge_rates and edge in edge_rates:
            r, b = edge_rates[edge]
            out += f"rate_per_s = {r}\nburst = {b}\n"
    return out


class Visit:
    """A real TLS 1.3 handshake up to its signature: an OpenSSL client (Python ssl over memory
    BIOs) visiting `sni`, answered by our TlsServer with a site's certificate, which waits in
    `request` (what an honest edge sends the key server)."""

    def __init__(self, kpki: KeylessPki, site: str, sni: str | None) -> None:
        ctx = ssl.create_default_context(cafile=str(kpki.site_ca))
        ctx.set_alpn_protocols(["h2", "http/1.1"])
        if sni is None:
            ctx.check_hostname = False
        self.inc, self.out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.client = ctx.wrap_bio(self.inc, self.out, server_hostname=sni)
        with contextlib.suppress(ssl.SSLWantReadError):
            self.client.do_handshake()
        flight = self.out.read()
        self.identity = ts.ServerIdentity.from_pem(kpki.sites[site][0].read_bytes())
        self.server = ts.TlsServer(
            self.identity, ts.TlsSettings(), ts.SessionStore(10, 10), sni or ""
        )
        event = self.server.receive(flight, 0.0)[-1]
        assert isinstance(event, ts.SignatureRequested), event
        self.request = event

    def sign_request(self, client: str = "192.0.2.7", scheme: int | None = None) -> w.SignRequest:
        return w.SignRequest(
            self.request.scheme if scheme is None else scheme, client, self.request.messages
        )

    def finish(self, signature: bytes) -> bool:
        """Hand the signature to our server and its flight to the client: did the client
        accept the handshake?"""
        self.server.signature_received(signature, 0.0)
        self.inc.write(self.server.data_to_send())
        try:
            self.client.do_handshake()
        except ssl.SSLError:
            return False
        return self.client.version() == "TLSv1.3"


def fresh_random(messages: bytes) -> bytes:
    """The same handshake with another ClientHello random (another visitor's, as far as the
    key server can tell): for loads of distinct requests without a client per request."""
    return messages[:6] + os.urandom(32) + messages[38:]
