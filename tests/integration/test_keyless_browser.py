"""Headless Chromium (Debian's `chromium`) loads a page through a keyless route: a real browser
completes the TLS 1.3 handshake whose CertificateVerify the key server signed, over HTTP/2."""

from __future__ import annotations

import base64
import hashlib
import shutil
import subprocess
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.conftest import need
from tests.helpers.keyless import KeylessPki
from tests.integration.test_keyless import chain, keyserver, kpki  # noqa: F401 (fixtures)


def spki_pin(cert_path: Path) -> str:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


def test_chromium_loads_a_page_over_a_keyless_route(
    chain: Any,  # noqa: F811
    kpki: KeylessPki,  # noqa: F811
    tmp_path: Path,
) -> None:
    browser = shutil.which("chromium") or need("chromium")
    edge, _ = chain()
    profile = tmp_path / "chromium-profile"
    # The throwaway site CA is not in Chromium's trust store; trusting exactly the site's key
    # (its SPKI pin) keeps every other check, the handshake signature included.
    out = subprocess.run(
        [
            browser,
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            f"--user-data-dir={profile}",
            "--host-resolver-rules=MAP example.test 127.0.0.1",
            f"--ignore-certificate-errors-spki-list={spki_pin(kpki.sites['p256'][0])}",
            "--dump-dom",
            f"https://example.test:{edge.port}/",
        ],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert "Hello from the application" in out.stdout, out.stderr[-3000:]
    assert "The origin agent says the visitor is <b>127.0.0.1</b>" in out.stdout
    request = edge.wait_for(lambda r: r.get("event") == "request" and r.get("path") == "/", 5)
    assert request is not None and request["http_version"] == "2" and request["status"] == 200
    assert edge.metric("blindfold_keyless_handshakes_total", route="route0", result="full") >= 1
