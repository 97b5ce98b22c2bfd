"""What one visitor of a blind route may cost the others (atk-visitor #1): origin pulls are
shared per blob, also for blobs the cache cannot keep, and capped per visitor address."""

from __future__ import annotations

import time
from collections.abc import Callable

from blindfold.io.listeners import steer_index
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


def _same_worker(address: str) -> str:
    """Another loopback address the edge's two workers steer to `address`'s worker: the
    bounds below are per route and worker."""
    return next(
        f"127.0.0.{i}"
        for i in range(100, 250)
        if steer_index(f"127.0.0.{i}", 2) == steer_index(address, 2)
    )


def _get(blob: str) -> list[tuple[bytes, bytes]]:
    return [
        (b":method", b"GET"),
        (b":scheme", b"https"),
        (b":authority", CDN.encode()),
        (b":path", f"/b/{blob}".encode()),
    ]


def test_one_address_cannot_pin_every_temporary_file(
    blind_site: Callable[..., Site],  # noqa: F811
) -> None:
    """atk3 #3: a reader with receive window 0 on a 4.8 MB uncacheable blob kept its
    temporary file open, and counted, while it lived: with disk_cache_bytes 5.2 MB every
    other visitor of the worker got 503 for every uncacheable blob. Now an address keeps
    open at most disk_cache_bytes / 4 of them."""
    s = blind_site(cache_dir="", memory_max_object_bytes=512 << 10, disk_cache_bytes=5_200_000)
    ids = s.ids()
    attacker = "127.0.0.70"
    victim = _same_worker(attacker)
    tls = h2_stall_streams(s.edge.port, CDN, s.ca, [_get(ids["/big.bin"])], source=attacker)
    try:
        # the big blob pulled into a temporary file (before), or refused (now)
        assert wait_until(lambda: _count(s, "uncached") + _count(s, "busy") >= 1, timeout=20)
        r = s.curl_blob(
            f"/b/{ids['/img/photo.bin']}",
            "--interface",
            victim,
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        )
        assert r.stdout == b"200", r  # ~700 KB, uncacheable here too
        assert _count(s, "busy") == 1  # the attacker's: 4.8 MB is over its 1.3 MB share
    finally:
        tls.close()


def test_a_slow_reader_cannot_hold_a_finished_temporary_file(
    blind_site: Callable[..., Site],  # noqa: F811
) -> None:
    """atk3 #3: one byte of window every 25 s (less than send_timeout_s apart) kept a reader
    of an uncacheable blob, and its temporary file, alive for good. Once the pull is done it
    must take the rest within send_timeout_s + rest / 64 KiB/s, or it is cut off."""
    s = blind_site(
        cache_dir="", memory_max_object_bytes=512 << 10, route_kw={"http": {"send_timeout_s": 2}}
    )
    photo = s.ids()["/img/photo.bin"]  # ~700 KB: cut off ~13 s after its pull is done
    tls = h2_stall_streams(s.edge.port, CDN, s.ca, [_get(photo)], source="127.0.0.71")
    # RFC 9113 §6.9: WINDOW_UPDATE of 1 byte on stream 1 (length 4, type 8, no flags)
    one_byte = (
        (4).to_bytes(3, "big") + b"\x08\x00" + (1).to_bytes(4, "big") + (1).to_bytes(4, "big")
    )
    try:
        deadline = time.monotonic() + 30
        while _count(s, "too_slow") < 1 and time.monotonic() < deadline:
            tls.sendall(one_byte)  # it reads: the send timeout never fires
            wait_until(lambda: _count(s, "too_slow") >= 1, timeout=1)
        assert _count(s, "too_slow") == 1
        assert _count(s, "uncached") == 1
        line = s.edge.wait_for(lambda r: r.get("event") == "blind_reader_too_slow")
        assert line is not None and line["client"] == "127.0.0.71", line
        assert line["sent"] < line["size"], line
    finally:
        tls.close()
