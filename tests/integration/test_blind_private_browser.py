"""Headless Chromium and private content (issue 18): logged in (the application sets a session
cookie), the page's private image and 20 MB private file come sealed from the blind edge
through the service worker, every digest right; without the session the private manifest is
refused, the files are not shown, and nothing private reaches the browser."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from blindfold import pki
from tests.conftest import need
from tests.helpers.clients import wait_until
from tests.helpers.edgeproc import EdgeProcess, OriginProcess
from tests.integration.test_blind import CDN
from tests.integration.test_blind_browser import _png
from tests.integration.test_blind_private import MARKER, PrivateSite
from tests.integration.test_keyless_browser import spki_pin

BIG = 20 * 1024 * 1024

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>members</title></head>
<body><p id="status">loading</p>
<script>
function hex(buf) {
  return Array.from(new Uint8Array(buf), (b) => b.toString(16).padStart(2, '0')).join('');
}
function report(path, result) {
  return fetch('/.well-known/blindfold/report', {method: 'POST',
    headers: {'content-type': 'application/json'}, body: JSON.stringify({path, result})});
}
async function main() {
  if (location.search === '?login') await fetch('/login');  // the application's session
  await navigator.serviceWorker.register('/blindfold-sw.js', {scope: '/'});
  await navigator.serviceWorker.ready;
  if (!navigator.serviceWorker.controller) {
    await new Promise((ok) => navigator.serviceWorker.addEventListener(
      'controllerchange', ok, {once: true}));
  }
  const img = new Image();
  img.src = '/members/photo.png';
  const shown = await img.decode().then(() => `${img.naturalWidth}x${img.naturalHeight}`,
                                        () => 'not-shown');
  await report('image', shown);
  for (const path of ['/members/photo.png', '/members/big.bin', '/members/report.txt']) {
    const r = await fetch(path);
    const body = await r.arrayBuffer();
    const digest = hex(await crypto.subtle.digest('SHA-256', body));
    const text = new TextDecoder().decode(new Uint8Array(body).slice(0, 64));
    await report(path, `${r.status}:${digest}:${body.byteLength}:` +
                       `${r.headers.get('x-blindfold-source')}:${text.includes('PRIVATE')}`);
  }
  await report('page-done', 'ok');
}
main().catch((err) => report('page-error', String(err)));
</script></body></html>
"""


class PrivateBrowserSite(PrivateSite):
    site_cert: Path

    def browse(self, name: str, page: str) -> dict[str, str]:
        browser = shutil.which("chromium") or need("chromium")
        seen = len(self.origin.records("blind_client_report"))
        pins = ",".join(spki_pin(p) for p in (self.site_cert, self.tmp / "cdn.pem"))
        proc = subprocess.Popen(
            [
                browser,
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                f"--user-data-dir={self.tmp / ('profile-' + name)}",
                f"--host-resolver-rules=MAP example.test 127.0.0.1, MAP {CDN} 127.0.0.1",
                f"--ignore-certificate-errors-spki-list={pins}",
                f"https://example.test:{self.edge.port}{page}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )

        def finished() -> bool:
            return any(
                r.get("path") in ("page-done", "page-error")
                for r in self.origin.records("blind_client_report")[seen:]
            )

        try:
            done = wait_until(finished, timeout=120, interval=0.2)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)  # our own process group (start_new_session)
            _, err = proc.communicate(timeout=30)
        reports = self.origin.records("blind_client_report")[seen:]
        assert done, (reports, err.decode(errors="replace")[-2000:])
        return {r["path"]: r.get("result") or r.get("error", "") for r in reports}

    def expected(self, path: str) -> str:
        data = self.files[path]
        return f"200:{hashlib.sha256(data).hexdigest()}:{len(data)}:edge"


@pytest.fixture
def browser_site(
    tmp_path: Path,
    ca: pki.Issued,
    site: dict[str, Path],
    app: Any,
    start_edge: Callable[..., EdgeProcess],
    start_origin: Callable[..., OriginProcess],
) -> PrivateBrowserSite:
    files = {
        "/index.html": PAGE.encode(),
        "/img/logo.png": _png(11, 7),
        "/members/photo.png": _png(37, 23),
        "/members/big.bin": MARKER + os.urandom(BIG - len(MARKER)),
        "/members/report.txt": MARKER + b" numbers\n",
    }
    s = PrivateBrowserSite(
        tmp_path,
        ca,
        site,
        app,
        start_edge,
        start_origin,
        blind={"edge_url": f"https://{CDN}:0"},
        files=files,
    )
    s.site_cert = site["cert"]
    s.set_blind(edge_url=f"https://{CDN}:{s.edge.port}")  # the edge's port, known now
    return s


def _origin(s: PrivateSite, kind: str) -> float:
    return s.origin.metric("blindfold_origin_blind_bytes_total", kind=kind)


@pytest.mark.timeout(400)
def test_chromium_gets_private_files_from_the_edge_only_when_logged_in(
    browser_site: PrivateBrowserSite,
) -> None:
    s = browser_site
    # Without the session: the private manifest is refused, nothing private is shown.
    anon = s.browse("anonymous", "/")
    assert anon.get("page-done") == "ok", anon
    assert anon["image"] == "not-shown", anon
    for path in ("/members/photo.png", "/members/big.bin", "/members/report.txt"):
        status, _digest, size, source, private = anon[path].split(":")
        # the application's refusal (through the origin), no bytes of the file
        assert (status, size, source, private) == ("401", "15", "null", "false"), anon
    assert _origin(s, "private_manifest") == 0  # no private key ever left the origin
    assert _origin(s, "plaintext") == 0
    assert s.origin.metric("blindfold_origin_blind_requests_total", kind="private_refused") >= 1
    # Logged in: the image is shown and every private file comes from the edge, verified.
    edge_before = s.edge.metric("blindfold_blind_served_bytes_total", route="route1")
    member = s.browse("member", "/?login")
    assert member.get("page-done") == "ok", member
    assert member["image"] == "37x23", member
    for path in ("/members/photo.png", "/members/big.bin", "/members/report.txt"):
        assert (
            member[path]
            == s.expected(path) + ":" + str(s.files[path].startswith(b"PRIVATE")).lower()
        ), (path, member)
    served = s.edge.metric("blindfold_blind_served_bytes_total", route="route1") - edge_before
    assert served > BIG  # the bulk came from the edge...
    assert _origin(s, "plaintext") == 0  # ...none of it in plaintext from the origin
    assert _origin(s, "private_manifest") > 0
    # The edge's cache holds the private blobs, and no plaintext of them.
    cached = b"".join(p.read_bytes() for p in (s.tmp / "edge-cache").rglob("*") if p.is_file())
    assert len(cached) > BIG
    for path in ("/members/photo.png", "/members/big.bin"):
        sample = s.files[path][1000:1064] if len(s.files[path]) > 1064 else s.files[path][-40:]
        assert sample not in cached
    assert MARKER not in cached
