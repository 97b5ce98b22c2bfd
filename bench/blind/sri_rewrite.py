"""The origin's SRI page rewrite (`rewrite_html`), measured in process on a real event loop:
how long the first request for a page takes (the rewrite, in a worker thread), the longest
the event loop was kept from running meanwhile (a 2 ms heartbeat), and a cached request.

    .venv/bin/python bench/blind/sri_rewrite.py [--mb 1]

A benchmark, not a test: it prints numbers. The page has one published <script> per ~1 KiB
of paragraphs."""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

from blindfold.blind.sealer import SealOptions, load_id_secret, load_signing_key, seal_tree
from blindfold.config.origin import BlindStoreConfig
from blindfold.origin.blindstore import BlindStore
from blindfold.web.messages import BodyStream, Request


def page(n_bytes: int) -> str:
    unit = "<p>filler text for the tokenizer</p>\n" * 24 + '<script src="/js/a.js"></script>\n'
    return "<!doctype html><html><body>\n" + unit * (n_bytes // len(unit)) + "</body></html>\n"


async def get(store: BlindStore) -> int:
    request = Request(
        b"GET",
        b"/p.html",
        b"example.test",
        b"https",
        [],
        "1.1",
        ("127.0.0.1", 1),
        ("127.0.0.1", 443),
        "bench",
        {"sni": "example.test"},
    )
    body = BodyStream(1, lambda n: None)
    body.end()
    resp = await store.answer(request, body, [])
    assert resp is not None
    n = 0
    async for chunk in resp.body():
        n += len(chunk)
    resp.close()
    return n


async def measure(store: BlindStore, repeat: int) -> tuple[float, float, float]:
    gaps: list[float] = []
    stop = asyncio.Event()

    async def heartbeat() -> None:
        last = time.monotonic()
        while not stop.is_set():
            await asyncio.sleep(0.002)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    beat = asyncio.create_task(heartbeat())
    await asyncio.sleep(0.05)
    t0 = time.monotonic()
    await get(store)
    first = time.monotonic() - t0
    await asyncio.sleep(0.05)
    stop.set()
    await beat
    t0 = time.monotonic()
    for _ in range(repeat):
        await get(store)
    return first, max(gaps), (time.monotonic() - t0) / repeat


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=float, default=1.0, help="page size in MiB")
    ap.add_argument("--repeat", type=int, default=20, help="cached requests timed")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="sri-bench-"))
    src, out = tmp / "www", tmp / "sealed"
    (src / "js").mkdir(parents=True)
    (src / "js" / "a.js").write_text("window.A = 1;\n")
    (src / "p.html").write_text(page(int(a.mb * (1 << 20))))
    seal_tree(
        str(src),
        str(out),
        load_signing_key(str(tmp / "k.pem"), create=True),
        load_id_secret(str(tmp / "s"), create=True),
        SealOptions(skip=("*.html",), sri=("*.js",)),
    )
    cfg = BlindStoreConfig(
        dir=str(out),
        site_names=("example.test",),
        source_dir=str(src),
        pages_prefix="/",
        edge_url="https://cdn.example.test",
        rewrite_html=True,
    )
    store = BlindStore(cfg, {}, lambda *args, **kw: None)
    first, stall, cached = asyncio.run(measure(store, a.repeat))
    print(
        f"{a.mb:g} MiB page: first request (the rewrite, in a thread) {first * 1000:.0f} ms, "
        f"longest event-loop stall meanwhile {stall * 1000:.1f} ms, "
        f"cached {cached * 1000:.2f} ms per request"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
