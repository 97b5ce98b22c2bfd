"""Certificate chains distributed by the key server (issue 12): an edge asks for the current
chain of the hostnames it is authorised for (CHAIN_REQUEST over its mutual-TLS connection),
swaps a renewed one in for new handshakes while open connections keep going, and is refused
(and audited) for a hostname it is not authorised for. The key server picks up replaced
certificate/key files, and never a broken pair."""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import json
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from blindfold import pki
from blindfold.errors import KeyServerError
from tests.helpers.clients import wait_until
from tests.helpers.edgeproc import EdgeProcess, OriginProcess, edge_config
from tests.helpers.keyless import KeylessPki, KeyServerProcess, keyserver_config, make_pki, names_of
from tests.helpers.topology import origin_config
from tests.integration.test_keyless import keyless_route


def leaf_for(
    ca: pki.Issued,
    public_key: Any,
    names: list[str],
    *,
    not_before: datetime.datetime | None = None,
    days: float = 30,
) -> x509.Certificate:
    """A certificate for an existing key (a renewal keeps the key), signed by `ca`."""
    start = not_before or datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca.cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False
        )
        .sign(ca.key, hashes.SHA256())
    )


def replace_file(path: Path, data: bytes) -> None:
    """As an ACME client does: write a temporary file, rename it over the old one."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    tmp.rename(path)


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def served_sha256(port: int, sni: str, ca: Path) -> str:
    ctx = ssl.create_default_context(cafile=str(ca))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname=sni) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return hashlib.sha256(der).hexdigest()


@pytest.fixture
def kpki(tmp_path: Path, ca: pki.Issued) -> KeylessPki:
    return make_pki(tmp_path, ca)


@pytest.fixture
def keyserver(kpki: KeylessPki, tmp_path: Path) -> Iterator[KeyServerProcess]:
    text = keyserver_config(
        kpki,
        {
            "edge1": names_of("example.test", "p384.test"),
            "edge2": names_of("rsa.test"),
            "rogue": ["rsa.test"],  # not *.rsa.test: rsa.test's certificate is too broad for it
        },
    )
    ks = KeyServerProcess(text + "", tmp_path, name="ks")
    yield ks
    ks.stop()
    assert not ks.tracebacks(), "".join(ks.stderr_lines)


def _reload_interval(ks_text: str) -> str:
    return ks_text.replace("[keyserver]\n", "[keyserver]\nreload_interval_s = 0.2\n", 1)


@pytest.fixture
def fast_keyserver(kpki: KeylessPki, tmp_path: Path) -> Iterator[KeyServerProcess]:
    text = keyserver_config(
        kpki, {"edge1": names_of("example.test", "p384.test"), "edge2": names_of("rsa.test")}
    )
    ks = KeyServerProcess(_reload_interval(text), tmp_path, name="ks")
    yield ks
    ks.stop()
    assert not ks.tracebacks(), "".join(ks.stderr_lines)


def fetch_chain(kpki: KeylessPki, edge: str, port: int, hostname: str) -> tuple[bytes, ...]:
    async def go() -> tuple[bytes, ...]:
        client = kpki.client(edge, port, sign_timeout_s=5)
        try:
            return await client.fetch_chain(hostname)
        finally:
            await client.close()

    return asyncio.run(go())


def test_an_edge_gets_the_chains_it_is_authorised_for_and_is_refused_others(
    kpki: KeylessPki, keyserver: KeyServerProcess
) -> None:
    ders = fetch_chain(kpki, "edge1", keyserver.port, "example.test")
    on_disk = x509.load_pem_x509_certificates(kpki.sites["p256"][0].read_bytes())
    assert ders == tuple(c.public_bytes(serialization.Encoding.DER) for c in on_disk)
    # a wildcard the edge is authorised for, and a name below it
    assert fetch_chain(kpki, "edge1", keyserver.port, "*.p384.test")[0] == (
        x509.load_pem_x509_certificate(kpki.sites["p384"][0].read_bytes()).public_bytes(
            serialization.Encoding.DER
        )
    )
    assert fetch_chain(kpki, "edge2", keyserver.port, "www.rsa.test")
    # edge2 is not authorised for example.test: refused, audited, counted
    with pytest.raises(KeyServerError) as refused:
        fetch_chain(kpki, "edge2", keyserver.port, "example.test")
    assert refused.value.reason == "unauthorized_sni"
    # authorised for the name, not for every name of its certificate
    with pytest.raises(KeyServerError) as broad:
        fetch_chain(kpki, "rogue", keyserver.port, "rsa.test")
    assert broad.value.reason == "certificate_too_broad"
    # a name no key covers, for an edge authorised for it
    with pytest.raises(KeyServerError) as unknown:
        fetch_chain(kpki, "edge1", keyserver.port, "nothing.example.test.invalid")
    assert unknown.value.reason in ("unauthorized_sni", "no_certificate")
    audit = kpki.dir / "audit.log"
    assert wait_until(lambda: audit.exists() and "chain_refused" in audit.read_text(), 5)
    entries = [json.loads(line) for line in audit.read_text().splitlines()]
    refused_entries = [e for e in entries if e["event"] == "chain_refused"]
    assert {
        "edge": "edge2",
        "reason": "unauthorized_sni",
        "hostname": "example.test",
    } in [
        {"edge": e["edge"], "reason": e["reason"], "hostname": e["claimed"]["hostname"]}
        for e in refused_entries
    ]
    assert (
        keyserver.metric(
            "blindfold_keyserver_chains_total", edge="edge2", result="unauthorized_sni"
        )
        == 1
    )
    assert keyserver.metric("blindfold_keyserver_chains_total", edge="edge1", result="ok") == 2
    assert keyserver.wait_for(
        lambda r: r.get("event") == "chain_refused" and r.get("edge") == "edge2", timeout=5
    )


def test_keyserver_swaps_a_replaced_certificate_and_refuses_a_broken_one(
    kpki: KeylessPki, fast_keyserver: KeyServerProcess, ca: pki.Issued
) -> None:
    ks = fast_keyserver
    cert_path, key_path, _ = kpki.sites["p256"]
    old = fetch_chain(kpki, "edge1", ks.port, "example.test")
    key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    names = ["example.test", "*.example.test"]
    expiry = ks.metric(
        "blindfold_certificate_expiry_seconds",
        component="keyserver",
        hostname="example.test",
        certificate="p256",
    )
    assert 29 * 86400 < expiry <= 30 * 86400
    # 1. a certificate of another key: the pair does not fit, the old one stays
    other = leaf_for(ca, pki.new_key().public_key(), names)
    replace_file(cert_path, pem(other))
    assert ks.wait_for(lambda r: r.get("event") == "key_reload_failed", timeout=5)
    assert (
        ks.metric(
            "blindfold_certificate_reloads_total",
            component="keyserver",
            certificate="p256",
            result="invalid",
        )
        == 1
    )
    assert fetch_chain(kpki, "edge1", ks.port, "example.test") == old
    # 2. an expired certificate of the right key: refused too
    expired = leaf_for(
        ca,
        key.public_key(),
        names,
        not_before=datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=3),
        days=1,
    )
    replace_file(cert_path, pem(expired))
    assert wait_until(
        lambda: (
            ks.metric(
                "blindfold_certificate_reloads_total",
                component="keyserver",
                certificate="p256",
                result="invalid",
            )
            == 2
        ),
        5,
    )
    assert fetch_chain(kpki, "edge1", ks.port, "example.test") == old
    # 2b. (attack review certs #2) the right key and valid, but followed by a certificate that
    # did not issue it, or naming fewer hostnames: every edge would refuse it and keep the old
    # chain, which the key server stops signing for after the grace: refused here too
    unrelated = (kpki.dir / "ca.pem").read_bytes()  # the edge CA: did not sign the leaf
    for n, data in enumerate(
        (
            pem(leaf_for(ca, key.public_key(), names, days=60)) + unrelated,
            pem(leaf_for(ca, key.public_key(), ["example.test"], days=60)),
        ),
        start=3,
    ):
        replace_file(cert_path, data)
        assert wait_until(
            lambda n=n: (
                ks.metric(
                    "blindfold_certificate_reloads_total",
                    component="keyserver",
                    certificate="p256",
                    result="invalid",
                )
                == n
            ),
            5,
        ), n
        assert fetch_chain(kpki, "edge1", ks.port, "example.test") == old
    assert ks.wait_for(
        lambda r: r.get("event") == "key_reload_failed" and "does not cover" in r.get("error", ""),
        timeout=5,
    )
    # 3. a renewed certificate for the same key: swapped in, sent to edges
    renewed = leaf_for(ca, key.public_key(), names, days=60)
    replace_file(cert_path, pem(renewed))
    new_der = renewed.public_bytes(serialization.Encoding.DER)
    assert wait_until(lambda: fetch_chain(kpki, "edge1", ks.port, "example.test")[0] == new_der, 5)
    assert ks.wait_for(lambda r: r.get("event") == "key_reloaded", timeout=5)
    assert (
        ks.metric(
            "blindfold_certificate_expiry_seconds",
            component="keyserver",
            hostname="example.test",
            certificate="p256",
        )
        > 59 * 86400
    )


@pytest.fixture
def chain_edge(
    start_edge: Callable[..., EdgeProcess],
    start_origin: Callable[..., OriginProcess],
    app: Any,
    site: dict[str, Path],
    tmp_path: Path,
    kpki: KeylessPki,
    fast_keyserver: KeyServerProcess,
) -> EdgeProcess:
    origin = start_origin(origin_config(site, app.port, tmp_path))
    text = keyless_route(kpki, site, [fast_keyserver.port], origin.port)
    text = text.rstrip("\n").rstrip("}") + ", chain_refresh_s = 0.5 }\n\n"
    return start_edge(edge_config(text, per_ip_rate_per_s=0))


def test_edge_serves_a_renewed_chain_to_new_handshakes_while_an_old_download_goes_on(
    kpki: KeylessPki, fast_keyserver: KeyServerProcess, chain_edge: EdgeProcess, ca: pki.Issued
) -> None:
    edge = chain_edge
    cert_path, key_path, old_fp = kpki.sites["p256"]
    assert served_sha256(edge.port, "example.test", kpki.site_ca) == old_fp
    # an old connection starts a long download (read slowly: it is still going at the swap)
    size = 24 << 20
    ctx = ssl.create_default_context(cafile=str(kpki.site_ca))
    raw = socket.create_connection(("127.0.0.1", edge.port), timeout=10)
    old_conn = ctx.wrap_socket(raw, server_hostname="example.test")
    old_conn.sendall(
        f"GET /bytes?n={size} HTTP/1.1\r\nHost: example.test\r\nConnection: close\r\n\r\n".encode()
    )
    got = old_conn.recv(65536)
    assert got.startswith(b"HTTP/1.1 200"), got[:100]
    # the key server's certificate file is renewed (same key, new certificate)
    key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    renewed = leaf_for(ca, key.public_key(), ["example.test", "*.example.test"], days=60)
    new_fp = renewed.fingerprint(hashes.SHA256()).hex()
    t0 = time.monotonic()
    replace_file(cert_path, pem(renewed))
    assert wait_until(
        lambda: served_sha256(edge.port, "example.test", kpki.site_ca) == new_fp, 5, 0.1
    ), "the edge did not serve the renewed chain within 5 s"
    took = time.monotonic() - t0
    assert took < 5
    # the old connection kept its certificate and finishes its download
    assert hashlib.sha256(old_conn.getpeercert(binary_form=True) or b"").hexdigest() == old_fp
    total = len(got)
    while True:
        part = old_conn.recv(1 << 20)
        if not part:
            break
        total += len(part)
    old_conn.close()
    head_len = got.index(b"\r\n\r\n") + 4
    assert total - head_len == size
    assert edge.wait_for(lambda r: r.get("event") == "keyless_chain_updated", timeout=5)
    assert (
        edge.metric(
            "blindfold_certificate_reloads_total",
            component="edge",
            certificate="route0",
            result="swapped",
        )
        >= 1
    )
    assert (
        edge.metric(
            "blindfold_certificate_expiry_seconds",
            component="edge",
            hostname="example.test",
            certificate="route0",
        )
        > 59 * 86400
    )


def test_edge_keeps_its_chain_when_the_new_one_does_not_cover_the_route(
    kpki: KeylessPki, fast_keyserver: KeyServerProcess, chain_edge: EdgeProcess, ca: pki.Issued
) -> None:
    """The renewed certificate names example.test only; the old one and the route also cover
    *.example.test. The key server refuses it (attack review certs #2: it would swap in a
    chain every edge refuses, then stop signing for the old one after its grace), so the
    edge keeps serving the old chain. (The edge's own refusal of
    such a chain, should a key server send one, is core.certchain: tests/unit/test_certchain.)"""
    edge = chain_edge
    cert_path, key_path, old_fp = kpki.sites["p256"]
    key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    narrower = leaf_for(ca, key.public_key(), ["example.test"], days=60)
    replace_file(cert_path, pem(narrower))
    failed = fast_keyserver.wait_for(lambda r: r.get("event") == "key_reload_failed", timeout=5)
    assert failed is not None and "does not cover *.example.test" in failed["error"], failed
    assert not fast_keyserver.records("key_reloaded")
    assert served_sha256(edge.port, "www.example.test", kpki.site_ca) == old_fp
