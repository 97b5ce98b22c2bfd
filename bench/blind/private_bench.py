"""Private content (issue 18) next to public content, in one run, in process on loopback:

1. sealing: `seal_tree` on one tree sealed all public, then all private (`--private '*'`),
   each into a fresh store (first seal) and again (re-seal, nothing changed);
2. serving at the origin: the blind store answering the public manifest vs the private
   manifest (each request asks the application, the demo app over a real loopback HTTP/1.1
   connection pool, before it is served), and the plaintext fallback of a public vs a private
   file; requests/s and per-request latency, bounded by count and time.

What the edge serves does not depend on the class: a private blob is a blob (same route, same
cache, same bytes per request), so the edge's numbers are bench/blind/run.sh's.

    PYTHONPATH=src .venv/bin/python bench/blind/private_bench.py [--files 200] [--requests 2000]

A benchmark, not a test: it prints numbers and ratios (private / public).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from blindfold.blind.sealer import SealOptions, load_id_secret, load_signing_key, seal_tree
from blindfold.config.origin import BlindStoreConfig
from blindfold.demo.app import DemoApp
from blindfold.origin.blindstore import BlindStore, LocalResponse
from blindfold.web.client import UpstreamPool
from blindfold.web.messages import BodyStream, Request


def tree(root: Path, files: int, big_mb: int) -> Path:
    src = root / "src"
    (src / "f").mkdir(parents=True)
    for i in range(files):
        (src / "f" / f"{i}.bin").write_bytes(os.urandom(64 << 10))
    (src / "big.bin").write_bytes(os.urandom(big_mb << 20))
    return src


def seal(src: Path, out: Path, keys: Path, private: bool) -> tuple[float, float, float]:
    key = load_signing_key(str(keys / "m.pem"), create=True)
    secret = load_id_secret(str(keys / "id"), create=True)
    opts = SealOptions(private=("*",) if private else ())
    t0 = time.perf_counter()
    report = seal_tree(str(src), str(out), key, secret, opts)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    seal_tree(str(src), str(out), key, secret, opts)
    again = time.perf_counter() - t0
    return first, again, report.plain_bytes / 1e6


def request(path: str, cookie: str) -> Request:
    return Request(
        method=b"GET",
        target=path.encode(),
        authority=b"example.test",
        scheme=b"https",
        headers=[(b"cookie", cookie.encode())],
        http_version="1.1",
        client=("127.0.0.1", 40000),
        server=("127.0.0.1", 443),
        request_id="b",
        tls={"sni": "example.test"},
    )


async def one(store: BlindStore, path: str, cookie: str) -> int:
    body = BodyStream(1 << 20, lambda n: None)
    body.end()
    resp = await store.answer(request(path, cookie), body, [])
    assert isinstance(resp, LocalResponse)
    size = 0
    async for chunk in resp.body():
        size += len(chunk)
    resp.close()
    if resp.status != 200:
        raise RuntimeError(f"{path}: HTTP {resp.status}")
    return size


async def measure(
    name: str, call: Callable[[], Awaitable[int]], count: int, budget_s: float
) -> tuple[float, float]:
    times = []
    deadline = time.monotonic() + budget_s
    for _ in range(count):
        if time.monotonic() > deadline:
            break
        t0 = time.perf_counter()
        await call()
        times.append(time.perf_counter() - t0)
    rate = len(times) / sum(times)
    p50 = statistics.median(times) * 1e3
    print(f"  {name:<34} {len(times):>6} requests  {rate:>8.0f}/s  p50 {p50:.2f} ms")
    return rate, p50


def _store(out: Path, src: Path, app: DemoApp) -> BlindStore:
    cfg = BlindStoreConfig(
        dir=str(out),
        site_names=("example.test",),
        source_dir=str(src),
        private_auth_path="/auth/private",
    )
    store = BlindStore(cfg, {}, lambda *a, **k: None)
    store.pool = UpstreamPool(f"http://127.0.0.1:{app.port}")
    return store


async def serve(
    public_out: Path, private_out: Path, src: Path, app: DemoApp, count: int, budget_s: float
) -> None:
    """The same files' manifest: all public (anyone) vs all private (the app asked first)."""
    public, private = _store(public_out, src, app), _store(private_out, src, app)
    cookie = f"session={app.session}"
    try:
        print("origin, serving (one request at a time):")
        pub, _ = await measure(
            "public manifest",
            lambda: one(public, "/.well-known/blindfold/manifest.json", cookie),
            count,
            budget_s,
        )
        priv, _ = await measure(
            "private manifest (app asked)",
            lambda: one(private, "/.well-known/blindfold/manifest-private.json", cookie),
            count,
            budget_s,
        )
        print(f"  ratio private/public manifest requests/s: {priv / pub:.2f}")
    finally:
        for store in (public, private):
            assert store.pool is not None
            store.pool.close()


async def serve_plain(
    public_out: Path, private_out: Path, src: Path, app: DemoApp, count: int, budget_s: float
) -> None:
    rates = []
    for label, out in (("public", public_out), ("private", private_out)):
        store = _store(out, src, app)
        try:
            rate, _ = await measure(
                f"plaintext fallback, {label} 64 KiB",
                lambda store=store: one(  # type: ignore[misc]
                    store, "/.well-known/blindfold/plain/f/1.bin", f"session={app.session}"
                ),
                count,
                budget_s,
            )
            rates.append(rate)
        finally:
            assert store.pool is not None
            store.pool.close()
    print(f"  ratio private/public fallback requests/s: {rates[1] / rates[0]:.2f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=200, help="64 KiB files in the tree")
    ap.add_argument("--big-mb", type=int, default=20, help="size of the one big file")
    ap.add_argument("--requests", type=int, default=2000, help="requests per serving row")
    ap.add_argument("--budget", type=float, default=20.0, help="seconds per serving row at most")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        src = tree(root, args.files, args.big_mb)
        print(f"tree: {args.files} x 64 KiB + {args.big_mb} MiB")
        print("sealing (first seal, then a re-seal with nothing changed):")
        got = {}
        for label, private in (("public", False), ("private", True)):
            first, again, mb = seal(src, root / f"out-{label}", root, private)
            got[label] = (first, again)
            print(
                f"  {label:<8} first {first:6.2f} s ({mb / first:5.0f} MB/s)"
                f"   re-seal {again:5.2f} s ({mb / again:5.0f} MB/s)"
            )
        print(
            f"  ratio private/public time: first {got['private'][0] / got['public'][0]:.2f}, "
            f"re-seal {got['private'][1] / got['public'][1]:.2f}"
        )
        app = DemoApp()
        try:
            out_public, out_private = root / "out-public", root / "out-private"
            asyncio.run(serve(out_public, out_private, src, app, args.requests, args.budget))
            asyncio.run(
                serve_plain(
                    out_public,
                    out_private,
                    src,
                    app,
                    args.requests,
                    args.budget,
                )
            )
        finally:
            app.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
