"""The demo's static site for blind delivery: a page the origin serves, whose script, image and
a larger file come sealed from the blind edge through the service worker, and a page that
uses Subresource Integrity instead (for browsers without service workers)."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>blindfold: blind delivery</title>
<style>body{font-family:sans-serif;max-width:46em;margin:2em auto} code{background:#eee}</style>
</head><body>
<h1>Blind delivery</h1>
<p>This page came from the origin (through the edge's passthrough route: TLS end to end).
Its script, its image and <code>files/sample.bin</code> come from the blind edge
(<code>%(edge)s</code>) as sealed blobs: the service worker fetches them, checks them against
the signed manifest and decrypts them here, in your browser. The edge never had a key.</p>
<p id="status">registering the service worker...</p>
<p><img id="logo" alt="sealed image" width="240" height="80"></p>
<pre id="out"></pre>
<script>
const out = (text) => { document.getElementById('out').textContent += text + '\\n'; };
const hex = (buf) => Array.from(new Uint8Array(buf),
                               (b) => b.toString(16).padStart(2, '0')).join('');
async function main() {
  if (!('serviceWorker' in navigator)) {
    document.getElementById('status').textContent = 'no service worker: see sri.html';
    return;
  }
  await navigator.serviceWorker.register('/blindfold-sw.js', {scope: '/'});
  await navigator.serviceWorker.ready;
  if (!navigator.serviceWorker.controller) {
    await new Promise((ok) => navigator.serviceWorker.addEventListener(
      'controllerchange', ok, {once: true}));
  }
  document.getElementById('status').textContent = 'the service worker is in control';
  await new Promise((ok, bad) => {
    const s = document.createElement('script');
    s.src = 'js/app.js'; s.onload = ok; s.onerror = () => bad(new Error('script failed'));
    document.head.appendChild(s);
  });
  document.getElementById('logo').src = 'img/logo.png';
  const r = await fetch('files/sample.bin');
  const body = await r.arrayBuffer();
  const digest = hex(await crypto.subtle.digest('SHA-256', body));
  const source = r.headers.get('x-blindfold-source');
  out(`files/sample.bin: ${body.byteLength} bytes from the ${source}, sha256 ${digest}`);
}
main().catch((err) => out('error: ' + err));
</script></body></html>
"""

SRI_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>blindfold: SRI</title>
<link rel="stylesheet" href="css/site.css">
<script src="js/sri.js"></script>
</head><body><h1>Subresource Integrity</h1>
<p>The origin rewrote this page: its script and stylesheet load from the edge with
<code>integrity</code> attributes (view the source), and the page is sent with
<code>Integrity-Policy</code>. An edge that changes them gets them refused by the browser.</p>
<p id="sri">the script from the edge did not run</p>
</body></html>
"""


def _png(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack("!I", len(data)) + body + struct.pack("!I", zlib.crc32(body))

    rows = b"".join(
        b"\x00" + b"".join(bytes(((x * 5) % 256, (y * 3) % 256, 160)) for x in range(width))
        for y in range(height)
    )
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack("!IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def write_site(root: Path, edge_url: str) -> Path:
    """The tree `blindfold seal` seals (pages excluded); returns the directory of the pages."""
    site = root / "blind"
    for sub in ("js", "img", "files", "css"):
        (site / sub).mkdir(parents=True, exist_ok=True)
    (site / "index.html").write_text(PAGE % {"edge": edge_url})
    (site / "sri.html").write_text(SRI_PAGE)
    (site / "js" / "app.js").write_text(
        "document.getElementById('status').textContent += '; the sealed script ran';\n"
    )
    (site / "js" / "sri.js").write_text(
        "addEventListener('DOMContentLoaded', () => { document.getElementById('sri')"
        ".textContent = 'the script from the edge ran (its integrity checked)'; });\n"
    )
    (site / "css" / "site.css").write_text("body { font-family: sans-serif; color: #123; }\n")
    (site / "img" / "logo.png").write_bytes(_png(240, 80))
    (site / "files" / "sample.bin").write_bytes(os.urandom(2 << 20))
    return site
