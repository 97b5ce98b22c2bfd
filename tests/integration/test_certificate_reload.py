"""Renewed certificate files at the origin agent (issue 12): replaced files are picked up
without a restart, new handshakes get the new certificate while an open connection finishes
its download, and a broken replacement is never swapped in (log line and metric)."""

from __future__ import annotations

import hashlib
import shutil
import socket
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization

from blindfold import pki
from tests.helpers.clients import wait_until
from tests.helpers.edgeproc import OriginProcess
from tests.helpers.topology import origin_config
from tests.integration.test_blind import CDN, Site
from tests.integration.test_blind import blind_site as blind_site  # the fixture
from tests.integration.test_keyless_chains import leaf_for, pem, replace_file


def served_sha256(port: int, ca: Path) -> str:
    ctx = ssl.create_default_context(cafile=str(ca))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname="example.test") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return hashlib.sha256(der).hexdigest()


def test_origin_swaps_renewed_files_keeps_old_connections_and_refuses_broken_ones(
    start_origin: Callable[..., OriginProcess],
    app: Any,
    site: dict[str, Path],
    ca: pki.Issued,
    tmp_path: Path,
) -> None:
    own = dict(site)
    own["cert"], own["key"] = tmp_path / "site.pem", tmp_path / "site.key"
    shutil.copy(site["cert"], own["cert"])
    shutil.copy(site["key"], own["key"])
    origin = start_origin(
        origin_config(
            own, app.port, tmp_path, proxy_protocol="off", certificate_reload_interval_s=0.2
        )
    )
    old_fp = served_sha256(origin.port, site["ca"])
    assert old_fp == site["fingerprint"].read_text().strip()
    expiry = origin.metric(
        "blindfold_certificate_expiry_seconds",
        component="origin",
        hostname="example.test",
        certificate="certificates[0]",
    )
    assert 29 * 86400 < expiry <= 30 * 86400
    # an open connection downloading
    size = 24 << 20
    ctx = ssl.create_default_context(cafile=str(site["ca"]))
    old_conn = ctx.wrap_socket(
        socket.create_connection(("127.0.0.1", origin.port), timeout=10),
        server_hostname="example.test",
    )
    old_conn.sendall(
        f"GET /bytes?n={size} HTTP/1.1\r\nHost: example.test\r\nConnection: close\r\n\r\n".encode()
    )
    first = old_conn.recv(65536)
    assert first.startswith(b"HTTP/1.1 200"), first[:100]
    names = ["example.test", "*.example.test", "other.test", "localhost"]
    # 1. a certificate whose key is not the key file's: refused, the old one stays
    replace_file(own["cert"], pem(leaf_for(ca, pki.new_key().public_key(), names)))
    assert origin.wait_for(lambda r: r.get("event") == "certificate_reload_failed", timeout=5)
    # every process (master, workers) polls; the master's count is the one exported
    assert wait_until(
        lambda: (
            origin.metric(
                "blindfold_certificate_reloads_total",
                component="origin",
                certificate="certificates",
                result="invalid",
            )
            == 1
        ),
        5,
    )
    assert served_sha256(origin.port, site["ca"]) == old_fp
    # 1b. (attack review certs #3) the right key and valid, but followed by a certificate that
    # did not issue it, or no longer naming other.test: no client would accept it: refused
    site_key = serialization.load_pem_private_key(own["key"].read_bytes(), None)
    stranger = pki.issue(ca, ["stranger.test"], days=60).cert
    for n, data in enumerate(
        (
            pem(leaf_for(ca, site_key.public_key(), names, days=60)) + pem(stranger),
            pem(leaf_for(ca, site_key.public_key(), names[:2] + names[3:], days=60)),
        ),
        start=2,
    ):
        replace_file(own["cert"], data)
        assert wait_until(
            lambda n=n: (
                origin.metric(
                    "blindfold_certificate_reloads_total",
                    component="origin",
                    certificate="certificates",
                    result="invalid",
                )
                == n
            ),
            5,
        ), n
        assert served_sha256(origin.port, site["ca"]) == old_fp
    # 2. a renewed pair (new key, new certificate), each file renamed into place
    new = pki.issue(ca, names, days=60)
    new_fp = new.cert.fingerprint(hashes.SHA256()).hex()
    replace_file(own["key"], new.key_pem())
    replace_file(own["cert"], pem(new.cert))
    assert wait_until(lambda: served_sha256(origin.port, site["ca"]) == new_fp, 5, 0.1)
    assert origin.wait_for(lambda r: r.get("event") == "certificates_reloaded", timeout=5)
    assert wait_until(
        lambda: (
            origin.metric(
                "blindfold_certificate_expiry_seconds",
                component="origin",
                hostname="example.test",
                certificate="certificates[0]",
            )
            > 59 * 86400
        ),
        5,
    )
    # the old connection kept its certificate and finishes
    assert hashlib.sha256(old_conn.getpeercert(binary_form=True) or b"").hexdigest() == old_fp
    total = len(first)
    while part := old_conn.recv(1 << 20):
        total += len(part)
    old_conn.close()
    assert total - (first.index(b"\r\n\r\n") + 4) == size


def test_a_blind_route_takes_its_renewed_certificate_and_refuses_a_broken_one(
    blind_site: Callable[..., Site], ca: pki.Issued, site: dict[str, Path], tmp_path: Path
) -> None:
    s = blind_site()
    port = s.edge.port
    cert, key = tmp_path / "cdn.pem", tmp_path / "cdn.key"

    def served() -> str:
        ctx = ssl.create_default_context(cafile=str(site["ca"]))
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
            ctx.wrap_socket(raw, server_hostname=CDN) as tls,
        ):
            return hashlib.sha256(tls.getpeercert(binary_form=True) or b"").hexdigest()

    old_fp = served()
    labels = {"component": "edge", "hostname": CDN, "certificate": "route1"}
    assert s.edge.metric("blindfold_certificate_expiry_seconds", **labels) > 29 * 86400
    new = pki.issue(ca, [CDN], days=60)
    new_fp = new.cert.fingerprint(hashes.SHA256()).hex()
    replace_file(key, new.key_pem())
    replace_file(cert, pem(new.cert))
    assert wait_until(lambda: served() == new_fp, 5, 0.1), old_fp
    assert wait_until(
        lambda: s.edge.metric("blindfold_certificate_expiry_seconds", **labels) > 59 * 86400, 5
    )
    # a certificate whose key is not the key file's: not used
    replace_file(cert, pem(leaf_for(ca, pki.new_key().public_key(), [CDN])))
    refused = {"component": "edge", "certificate": "route1", "result": "invalid"}
    assert wait_until(lambda: s.edge.metric("blindfold_certificate_reloads_total", **refused), 5)
    assert served() == new_fp
    # (attack review certs #3) the right key and valid, but followed by a certificate that did
    # not issue it, or naming another host instead of the route's: not used either (each
    # worker polls and counts: wait for the count to grow, then past a poll for every worker)
    stranger = pki.issue(ca, ["stranger.test"], days=60).cert
    for data in (
        pem(leaf_for(ca, new.cert.public_key(), [CDN], days=60)) + pem(stranger),
        pem(leaf_for(ca, new.cert.public_key(), ["other.test"], days=60)),
    ):
        before = s.edge.metric("blindfold_certificate_reloads_total", **refused)
        replace_file(cert, data)
        assert wait_until(
            lambda before=before: (
                s.edge.metric("blindfold_certificate_reloads_total", **refused) > before
            ),
            10,
        ), data[:80]
        time.sleep(2.5)  # two polls (CERT_POLL_S) plus settling: every worker has seen it
        assert served() == new_fp
