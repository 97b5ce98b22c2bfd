"""Every byte the service worker releases is the site's (atk-private A2), and a fallback tells
the TLS relay no exact size (A6). Headless Chromium, logged in, behind a hostile blind edge
(the operator's, with the CDN certificate it legitimately holds) that serves the genuine
blobs except two, re-sealed under the files' own keys (which any member, or for a public file
any visitor, holds): the 20 MB private file wholly other bytes, and a 9 MiB public file the
same up to its 3rd MiB and other bytes (authenticating: same key and salt) after it. Before
the fix the browser showed both forgeries, `x-blindfold-source: edge`, nothing reported."""

from __future__ import annotations

import hashlib
import http.server
import os
import ssl
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from blindfold import pki
from blindfold.core import ece
from tests.helpers.edgeproc import EdgeProcess, OriginProcess
from tests.integration.test_blind import CDN
from tests.integration.test_blind_private import MARKER
from tests.integration.test_blind_private_browser import BIG, PrivateBrowserSite

PUB = 9 * 1024 * 1024
PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>forgery</title></head><body><script>
function hex(buf) {
  return Array.from(new Uint8Array(buf), (b) => b.toString(16).padStart(2, '0')).join('');
}
function report(path, result) {
  return fetch('/.well-known/blindfold/report', {method: 'POST',
    headers: {'content-type': 'application/json'}, body: JSON.stringify({path, result})});
}
async function main() {
  await fetch('/login');
  await navigator.serviceWorker.register('/blindfold-sw.js', {scope: '/'});
  await navigator.serviceWorker.ready;
  if (!navigator.serviceWorker.controller) {
    await new Promise((ok) => navigator.serviceWorker.addEventListener(
      'controllerchange', ok, {once: true}));
  }
  for (const path of ['/members/big.bin', '/pub/big.bin']) {
    let result;
    try {
      const r = await fetch(path);
      const body = await r.arrayBuffer();
      const digest = hex(await crypto.subtle.digest('SHA-256', body));
      result = `${r.status}:${digest}:${body.byteLength}:${r.headers.get('x-blindfold-source')}`;
    } catch (err) {
      result = `error:${err}`;
    }
    await report(path, result);
  }
  await report('page-done', 'ok');
}
main().catch((err) => report('page-error', String(err)));
</script></body></html>
"""


class HostileEdge:
    """A blind edge that serves the origin's blobs from disk, except `forged` ones."""

    def __init__(self, cert: Path, key: Path, blobs: Path, forged: dict[str, bytes], allow: str):
        served: list[tuple[str, bool]] = []
        self.served = served

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a: Any) -> None:
                pass

            def _head(self, status: int, length: int) -> None:
                self.send_response(status)
                self.send_header("content-type", "application/octet-stream")
                self.send_header("content-length", str(length))
                self.send_header("access-control-allow-origin", allow)
                self.end_headers()

            def do_GET(self) -> None:
                blob = self.path.rpartition("/")[2]
                data = forged.get(blob)
                if data is None and (blobs / blob).is_file():
                    data = (blobs / blob).read_bytes()
                served.append((blob, blob in forged))
                if data is None:
                    self._head(404, 0)
                    return
                self._head(200, len(data))
                self.wfile.write(data)

            def do_POST(self) -> None:  # reports: accepted, ignored
                self._head(204, 0)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(cert), str(key))
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.timeout(400)
def test_a_hostile_edge_cannot_replace_streamed_files(
    tmp_path: Path,
    ca: pki.Issued,
    site: dict[str, Path],
    app: Any,
    start_edge: Callable[..., EdgeProcess],
    start_origin: Callable[..., OriginProcess],
) -> None:
    pub = os.urandom(PUB)
    files = {
        "/index.html": PAGE.encode(),
        "/members/big.bin": MARKER + os.urandom(BIG - len(MARKER)),
        "/pub/big.bin": pub,
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
    priv = s.entries("manifest-private.json")["/members/big.bin"]
    public = s.entries("public")["/pub/big.bin"]
    assert priv.chunks and public.chunks  # signed piece digests for both streamed blobs
    # wholly other bytes under the private file's key (any member holds it)
    forged_priv = ece.seal(b"F" * BIG, priv.key, rs=priv.rs, pad_to=priv.sealed_size)
    # the public file: same key and salt, the plaintext changed after its 3rd MiB: the first
    # pieces are genuine, the later ones authenticate but are not the site's
    genuine = (s.out / "blobs" / public.id).read_bytes()
    changed = pub[: 3 << 20] + b"\xff" * (PUB - (3 << 20))
    forged_pub = ece.seal(
        changed, public.key, rs=public.rs, pad_to=public.sealed_size, salt=genuine[:16]
    )
    assert forged_pub[: 2 << 20] == genuine[: 2 << 20] and forged_pub != genuine
    assert len(forged_priv) == priv.sealed_size and len(forged_pub) == public.sealed_size
    hostile = HostileEdge(
        tmp_path / "cdn.pem",
        tmp_path / "cdn.key",
        s.out / "blobs",
        {priv.id: forged_priv, public.id: forged_pub},
        f"https://example.test:{s.edge.port}",
    )
    try:
        s.set_blind(edge_url=f"https://{CDN}:{hostile.port}")
        seen = s.browse("member", "/")
        assert seen.get("page-done") == "ok", seen
        # the private file: refused whole at its first piece, then the origin's copy of
        # the blob (checked the same way), never its plaintext
        want = hashlib.sha256(files["/members/big.bin"]).hexdigest()
        assert seen["/members/big.bin"] == f"200:{want}:{BIG}:origin", seen
        # the public file: streamed from the edge until the forged piece, then resumed from
        # the origin's copy of the blob at that byte (the response began as the edge's)
        assert seen["/pub/big.bin"] == f"200:{hashlib.sha256(pub).hexdigest()}:{PUB}:edge", seen
        assert (priv.id, True) in hostile.served and (public.id, True) in hostile.served
        reports = s.origin.records("blind_client_report")
        assert any(r.get("id") == priv.id for r in reports), reports
        assert any(r.get("id") == public.id and "piece 3" in r.get("error", "") for r in reports)
        # A6: no fallback in plaintext: the relay of the site's TLS saw only blob sizes
        assert s.origin.metric("blindfold_origin_blind_bytes_total", kind="plaintext") == 0
    finally:
        hostile.close()
