"""Decrypt throughput in Chromium's service worker (bench/blind, part 4).

Headless Chromium (Debian's `chromium`) loads a page from the origin (through the edge's
passthrough route) whose service worker serves a sealed file from the blind edge (warm cache:
the edge serves it from memory or disk). The page times, in the same run:

- baseline: `fetch()` of the sealed blob itself from the edge (no service worker involved:
  cross-origin, read to the end, nothing decrypted) -> MB/s of the transfer alone,
- the service worker path: `fetch()` of the file's path, which the service worker answers by
  fetching the same blob, opening every RFC 8188 record with WebCrypto AES-GCM and checking
  sizes (and, up to 8 MiB, both SHA-256 digests) -> MB/s end to end,

each `--reps` times, and reports the medians and their ratio. Everything is started here on
127.0.0.1 with throwaway certificates and stopped by PID at the end.

    .venv/bin/python bench/blind/sw_bench.py [--size-mb 50] [--small-mb 4] [--reps 5]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO))

from blindfold import pki  # noqa: E402
from blindfold.demo.app import DemoApp  # noqa: E402
from tests.helpers.edgeproc import EdgeProcess, OriginProcess, edge_config, route  # noqa: E402
from tests.helpers.topology import origin_config  # noqa: E402
from tests.integration.test_keyless_browser import spki_pin  # noqa: E402

CDN = "cdn.example.test"

PAGE = """<!doctype html><html><head><meta charset="utf-8"></head><body><script>
const FILES = %(files)s;
const REPS = %(reps)d;
function report(path, result) {
  return fetch('/.well-known/blindfold/report', {method: 'POST',
    headers: {'content-type': 'application/json'}, body: JSON.stringify({path, result})});
}
async function timed(url, opts) {
  const t0 = performance.now();
  const r = await fetch(url, opts);
  const n = (await r.arrayBuffer()).byteLength;
  return [n, performance.now() - t0, r.headers.get('x-blindfold-source')];
}
async function main() {
  await navigator.serviceWorker.register('/blindfold-sw.js', {scope: '/'});
  await navigator.serviceWorker.ready;
  if (!navigator.serviceWorker.controller) {
    await new Promise((ok) => navigator.serviceWorker.addEventListener(
      'controllerchange', ok, {once: true}));
  }
  for (const [path, blobUrl] of FILES) {
    await timed(blobUrl, {mode: 'cors', cache: 'no-store'});  // warm the edge and the path
    await timed(path, {cache: 'no-store'});
    const raw = [], sw = [];
    for (let i = 0; i < REPS; i++) {
      raw.push(await timed(blobUrl, {mode: 'cors', cache: 'no-store'}));
      sw.push(await timed(path, {cache: 'no-store'}));
    }
    await report(path, JSON.stringify({raw, sw}));
  }
  await report('bench-done', 'ok');
}
main().catch((err) => report('bench-error', String(err)));
</script></body></html>
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mb", type=int, default=50, help="the streamed file (default 50)")
    ap.add_argument(
        "--small-mb",
        type=int,
        default=4,
        help="a file checked whole before release (<= 8 MiB; default 4)",
    )
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--timeout", type=float, default=300, help="seconds for the browser")
    ap.add_argument("--out", help="results directory (default: a new temporary one)")
    args = ap.parse_args()
    browser = shutil.which("chromium")
    if browser is None:
        print("chromium is not installed (scripts/bootstrap installs it)", file=sys.stderr)
        return 2
    out = Path(args.out or tempfile.mkdtemp(prefix="blindfold-sw-bench."))
    out.mkdir(parents=True, exist_ok=True)
    ca = pki.make_ca("sw bench CA")
    ca.write(out / "ca.pem")
    pki.issue(ca, ["example.test"]).write(out / "site.pem", out / "site.key")
    pki.issue(ca, [CDN]).write(out / "cdn.pem", out / "cdn.key")
    site = {"ca": out / "ca.pem", "cert": out / "site.pem", "key": out / "site.key"}
    src = out / "site"
    (src / "data").mkdir(parents=True)
    files = {"/data/big.bin": args.size_mb << 20, "/data/small.bin": args.small_mb << 20}
    for path, size in files.items():
        (src / path.lstrip("/")).write_bytes(os.urandom(size))
    sealed = out / "sealed"
    seal = subprocess.run(
        [
            sys.executable,
            "-m",
            "blindfold",
            "seal",
            str(src),
            str(sealed),
            "--signing-key",
            str(out / "manifest.pem"),
            "--id-secret",
            str(out / "id-secret"),
            "--create-keys",
            "--skip",
            "*.html",
        ],
        capture_output=True,
        text=True,
    )
    if seal.returncode:
        print(seal.stderr, file=sys.stderr)
        return 1
    ids = {
        p: e["id"]
        for p, e in json.loads(json.loads((sealed / "manifest.json").read_text())["payload"])[
            "files"
        ].items()
    }
    app = DemoApp()
    procs: list[OriginProcess | EdgeProcess] = []
    chrome: subprocess.Popen[bytes] | None = None
    try:
        origin = OriginProcess(
            origin_config(site, app.port, out) + f'\n[origin.blind]\ndir = "{sealed}"\n'
            f'source_dir = "{src}"\npages_prefix = "/"\nsite_names = ["example.test"]\nedge_url = "https://{CDN}:0"\n',
            out,
            name="origin",
        )
        procs.append(origin)
        routes = route(["example.test"], [f"127.0.0.1:{origin.port}"], proxy_protocol="v2") + route(
            [CDN],
            [f"127.0.0.1:{origin.port}"],
            mode="blind",
            certificate=str(out / "cdn.pem"),
            key=str(out / "cdn.key"),
            origin_ca=str(out / "ca.pem"),
            origin_server_name="example.test",
            proxy_protocol="v2",
            blind={
                "cache_dir": str(out / "cache"),
                "manifest_public_key": str(sealed / "manifest-public.pem"),
            },
        )
        edge = EdgeProcess(
            edge_config(routes, per_ip_rate_per_s=0, log_connections=False), out, name="edge"
        )
        procs.append(edge)
        origin.write_config(
            origin.config_path.read_text().replace(f"{CDN}:0", f"{CDN}:{edge.port}")
        )
        origin.reload()
        pairs = [[p, f"https://{CDN}:{edge.port}/b/{ids[p]}"] for p in files]
        (src / "bench.html").write_text(PAGE % {"files": json.dumps(pairs), "reps": args.reps})
        pins = ",".join(spki_pin(p) for p in (out / "site.pem", out / "cdn.pem"))
        chrome = subprocess.Popen(
            [
                browser,
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                f"--user-data-dir={out / 'profile'}",
                f"--host-resolver-rules=MAP example.test 127.0.0.1, MAP {CDN} 127.0.0.1",
                f"--ignore-certificate-errors-spki-list={pins}",
                f"https://example.test:{edge.port}/bench.html",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + args.timeout
        reports: dict[str, str] = {}
        while time.monotonic() < deadline:
            reports = {
                r["path"]: r.get("result", "") for r in origin.records("blind_client_report")
            }
            if "bench-done" in reports or "bench-error" in reports:
                break
            time.sleep(0.5)
        if "bench-done" not in reports:
            print(f"the page did not finish: {reports}", file=sys.stderr)
            return 1
    finally:
        if chrome is not None:
            os.killpg(chrome.pid, signal.SIGKILL)  # our own process group
            chrome.wait(timeout=30)
        for p in reversed(procs):
            p.stop()
        app.close()
    version = subprocess.run([browser, "--version"], capture_output=True, text=True).stdout
    lines = [
        f"4. Decrypt throughput in Chromium's service worker ({version.strip()}, headless; "
        f"warm edge cache, {args.reps} reps, medians)",
        f"   {'file':<18} {'fetch blob MB/s':>16} {'via SW MB/s':>12} {'ratio':>6}"
        "  (SW: fetch + AES-GCM per record + checks)",
    ]
    results = {}
    for path, size in files.items():
        data = json.loads(reports[path])
        raw = statistics.median(size / 1e6 / (ms / 1000) for _n, ms, _s in data["raw"])
        sw = statistics.median(size / 1e6 / (ms / 1000) for _n, ms, _s in data["sw"])
        sources = {s for _n, _ms, s in data["sw"]}
        ok = all(n == size for n, _ms, _s in data["sw"]) and sources == {"edge"}
        label = f"{path} ({size >> 20} MB)"
        lines.append(
            f"   {label:<18} {raw:16.1f} {sw:12.1f} {sw / raw:6.2f}"
            + ("" if ok else f"  WRONG: sizes/sources {sources}")
        )
        results[path] = {"fetch_blob_mb_s": raw, "service_worker_mb_s": sw, "ok": ok}
    (out / "sw_results.json").write_text(json.dumps(results, indent=1))
    print("\n".join(lines))
    print(f"   raw outputs: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
