"""The origin's blind store in process, on real files and a real event loop: what it does to
the loop matters here (issue 15 finding 10: the SRI rewrite ran in the loop, uncached)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from blindfold.blind.sealer import SealOptions, load_id_secret, load_signing_key, seal_tree
from blindfold.config.origin import BlindStoreConfig
from blindfold.origin.blindstore import BlindStore, LocalResponse
from blindfold.web.messages import BodyStream, Request

PAGE_MB = 4


def _request(path: str) -> Request:
    return Request(
        method=b"GET",
        target=path.encode(),
        authority=b"example.test",
        scheme=b"https",
        headers=[],
        http_version="1.1",
        client=("127.0.0.1", 40000),
        server=("127.0.0.1", 443),
        request_id="t",
        tls={"sni": "example.test"},
    )


async def _get(store: BlindStore, path: str) -> tuple[int, bytes, dict[bytes, bytes]]:
    body = BodyStream(1 << 20, lambda n: None)
    body.end()
    resp = await store.answer(_request(path), body, [])
    assert isinstance(resp, LocalResponse)
    chunks: AsyncIterator[bytes] = resp.body()
    data = b"".join([c async for c in chunks])
    resp.close()
    return resp.status, data, dict(resp.headers)


def _page(n_bytes: int, tag: str) -> str:
    unit = (
        f"<p>{tag} filler text for the tokenizer</p>\n" * 24 + '<script src="/js/a.js"></script>\n'
    )
    return "<!doctype html><html><body>\n" + unit * (n_bytes // len(unit)) + "</body></html>\n"


@pytest.fixture
def store(tmp_path: Path) -> tuple[BlindStore, dict[str, Any], Path]:
    src, out = tmp_path / "www", tmp_path / "sealed"
    (src / "js").mkdir(parents=True)
    (src / "js" / "a.js").write_text("window.A = 1;\n")
    (src / "big.html").write_text(_page(PAGE_MB << 20, "big"))
    seal_tree(
        str(src),
        str(out),
        load_signing_key(str(tmp_path / "k.pem"), create=True),
        load_id_secret(str(tmp_path / "s"), create=True),
        SealOptions(skip=("*.html",), sri=("*.js",)),
    )
    stats: dict[str, Any] = {}
    cfg = BlindStoreConfig(
        dir=str(out),
        site_names=("example.test",),
        source_dir=str(src),
        pages_prefix="/",
        edge_url="https://cdn.example.test",
        rewrite_html=True,
    )
    return BlindStore(cfg, stats, lambda *a, **k: None), stats, src


@pytest.mark.timeout(120)
def test_the_sri_rewrite_runs_off_the_loop_once_per_version(
    store: tuple[BlindStore, dict[str, Any], Path],
) -> None:
    s, stats, src = store

    async def run() -> None:
        gaps: list[float] = []
        stop = asyncio.Event()

        async def heartbeat() -> None:
            last = time.monotonic()
            while not stop.is_set():
                await asyncio.sleep(0.005)
                now = time.monotonic()
                gaps.append(now - last)
                last = now

        beat = asyncio.create_task(heartbeat())
        await asyncio.sleep(0.05)  # the heartbeat runs
        t0 = time.monotonic()
        status, page, headers = await _get(s, "/big.html")
        first_s = time.monotonic() - t0
        await asyncio.sleep(0.05)  # its next beat records how long the loop was away
        stop.set()
        await beat
        assert status == 200 and b'integrity="sha384-' in page
        assert headers[b"integrity-policy"] == b"blocked-destinations=(script)"
        # The rewrite took a while, but the loop kept running meanwhile.
        assert max(gaps) < max(0.25, first_s / 4), (max(gaps), first_s)
        assert stats.get("blind_requests:page_rewrite") == 1
        # Again: from the cache, the same bytes, no rewrite.
        t0 = time.monotonic()
        assert (await _get(s, "/big.html"))[1] == page
        assert time.monotonic() - t0 < first_s / 4
        assert stats["blind_requests:page_rewrite"] == 1
        # A new version of the file: rewritten once, however many ask at the same time.
        (src / "big.html").write_text(_page(PAGE_MB << 20, "new"))
        pages = await asyncio.gather(*(_get(s, "/big.html") for _ in range(6)))
        assert all(b"new filler" in p[1] and p[1] == pages[0][1] for p in pages)
        assert stats["blind_requests:page_rewrite"] == 2
        # A new set of published copies (re-sealed) counts as a new version too.
        sri_json = Path(s.cfg.dir) / "sri.json"
        os.utime(sri_json, ns=(time.time_ns(), time.time_ns() + 10**9))
        await _get(s, "/big.html")
        assert stats["blind_requests:page_rewrite"] == 3

    asyncio.run(run())


@pytest.mark.timeout(120)
def test_the_rewrite_cache_is_bounded(store: tuple[BlindStore, dict[str, Any], Path]) -> None:
    s, _stats, src = store
    for i in range(12):
        (src / f"p{i}.html").write_text(_page(3 << 20, f"p{i}"))

    async def run() -> None:
        for i in range(12):
            status, page, _ = await _get(s, f"/p{i}.html")
            assert status == 200 and f"p{i} filler".encode() in page
        assert 0 < s.rewrite_cache_bytes <= s.REWRITE_CACHE_BYTES

    asyncio.run(run())


def test_a_sealed_dir_inside_source_dir_is_refused(tmp_path: Path) -> None:
    """atk-visitor (blind store): with the sealed output inside source_dir, the store served
    the sealed dir's manifest (the content keys) like any page of source_dir."""
    from blindfold.errors import ConfigError

    src = tmp_path / "www"
    (src / "sealed").mkdir(parents=True)
    cfg = BlindStoreConfig(
        dir=str(src / "sealed"),
        site_names=("example.test",),
        source_dir=str(src),
        pages_prefix="/",
        edge_url="https://cdn.example.test",
    )
    with pytest.raises(ConfigError) as err:
        BlindStore(cfg, {}, lambda *a, **k: None)
    assert err.value.key == "blind.dir" and "inside source_dir" in str(err.value)
    # beside it (not inside) passes this check, on to the next: an empty dir is not sealed
    (tmp_path / "out").mkdir()
    with pytest.raises(ConfigError) as err:
        BlindStore(dataclasses.replace(cfg, dir=str(tmp_path / "out")), {}, lambda *a, **k: None)
    assert "run `blindfold seal` first" in str(err.value)
