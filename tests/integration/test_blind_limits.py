"""What one visitor of a blind route may cost the others (atk-visitor #1): origin pulls are
shared per blob, also for blobs the cache cannot keep, and capped per visitor address."""

from __future__ import annotations

from collections.abc import Callable

from tests.helpers.clients import h2_exchange, wait_until
from tests.helpers.h2stall import h2_stall_streams
from tests.integration.test_blind import CDN, Site, blind_site  # noqa: F401


def _count(s: Site, result: str) -> float:
    return s.edge.metric("blindfold_blind_requests_total", route="route1", result=result)


def test_stalled_streams_on_an_uncacheable_blob_cost_one_pull(
    blind_site: Callable[..., Site],  # noqa: F811
) -> None:
    """Two h2 connections with receive window 0 and 65 streams each on a blob too big for the
    memory tier (no disk tier) held 128 origin requests: an innocent visitor got 502."""
    s = blind_site(cache_dir="", memory_max_object_bytes=1 << 20)
    ids = s.ids()
    big = ids["/big.bin"]  # ~4.8 MB
    req = [
        (b":method", b"GET"),
        (b":scheme", b"https"),
        (b":authority", CDN.encode()),
        (b":path", f"/b/{big}".encode()),
    ]
    before = s.origin.metric("blindfold_origin_blind_requests_total", kind="blob")
    socks = [
        h2_stall_streams(s.edge.port, CDN, s.ca, [req] * 65, source="127.0.0.66") for _ in range(2)
    ]
    try:
        assert wait_until(lambda: _count(s, "uncached") >= 128, timeout=30), _count(s, "uncached")
        r = s.curl_blob(f"/b/{ids['/img/photo.bin']}", "-o", "/dev/null", "-w", "%{http_code}")
        assert r.stdout == b"200", r
        # one pull of the big blob for all 130 streams (and the innocent visitor's blob)
        pulls = s.origin.metric("blindfold_origin_blind_requests_total", kind="blob") - before
        assert pulls <= 2, pulls
    finally:
        for tls in socks:
            tls.close()


def test_one_visitor_cannot_spend_everyones_reports(
    blind_site: Callable[..., Site],  # noqa: F811
) -> None:
    """atk-visitor #6: the edge's POST /r/<id> bucket was one per route and worker: 25 reports
    at once from one address and every other visitor's report was refused (429)."""
    s = blind_site()
    blob = s.ids()["/img/photo.bin"]
    report = (
        [
            (b":method", b"POST"),
            (b":scheme", b"https"),
            (b":authority", CDN.encode()),
            (b":path", f"/r/{blob}".encode()),
        ],
        None,
    )
    flood = h2_exchange(s.edge.port, CDN, s.ca, [report] * 25, source="127.0.0.51")
    assert {status for status, _ in flood} == {202, 429}  # the flooder's own share runs out
    other = s.curl_blob(
        f"/r/{blob}",
        "-X",
        "POST",
        "--interface",
        "127.0.0.52",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
    )
    assert other.stdout == b"202", other


def test_the_temporary_files_of_uncacheable_blobs_are_bounded(
    blind_site: Callable[..., Site],  # noqa: F811
) -> None:
    """Without a disk tier, blobs too big for memory are pulled into unnamed temporary files
    (which may be memory, on a tmpfs): at most disk_cache_bytes of them at once."""
    s = blind_site(cache_dir="", memory_max_object_bytes=1 << 20, disk_cache_bytes=4 << 20)
    ids = s.ids()
    r = s.curl_blob(f"/b/{ids['/big.bin']}", "-o", "/dev/null", "-w", "%{http_code}")
    assert r.stdout == b"503", r  # ~4.8 MB: over the bound
    assert _count(s, "busy") == 1
    r = s.curl_blob(f"/b/{ids['/img/photo.bin']}", "-o", "/dev/null", "-w", "%{http_code}")
    assert r.stdout == b"200", r  # 700 KB: memory
