"""The edge following a decision stream it cannot trust to be well-formed or modest: a
malformed response, bans wider than the configured limit, more bans than the cap, and a large
ban set that changes while visitors connect."""

from __future__ import annotations

import os
import signal
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers.clients import get, tls_connect, wait_until
from tests.helpers.decisionsrc import KEY, StreamSource
from tests.helpers.edgeproc import EdgeProcess, edge_config, route
from tests.helpers.origin import TlsOrigin

Start = Callable[..., EdgeProcess]


@pytest.fixture
def source() -> Iterator[StreamSource]:
    s = StreamSource()
    yield s
    s.close()


def start(
    start_edge: Start,
    origin: TlsOrigin,
    source: StreamSource,
    tmp_path: Path,
    decisions: str = "",
    key_mode: int = 0o600,
    **edge: object,
) -> EdgeProcess:
    keyfile = tmp_path / "source.key"
    keyfile.write_text(KEY)
    keyfile.chmod(key_mode)
    text = edge_config(route(["example.test"], [f"127.0.0.1:{origin.port}"]), **edge)
    text += (
        f'[edge.decisions]\nurl = "{source.url}"\napi_key_file = "{keyfile}"\n'
        f"poll_interval_s = 0.2\n{decisions}"
    )
    e = start_edge(text)
    assert e.wait_for(lambda r: r.get("event") == "decisions_source_up", 10)
    return e


def served(edge: EdgeProcess, site: dict[str, Path], source: str) -> bool:
    try:
        return b"hello from origin" in get(edge.port, ca=site["ca"], source=source)
    except OSError:
        return False


def test_a_malformed_stream_response_does_not_kill_the_feed(
    start_edge: Start,
    origin: TlsOrigin,
    site: dict[str, Path],
    source: StreamSource,
    tmp_path: Path,
) -> None:
    source.add(["127.0.0.40"])
    edge = start(start_edge, origin, source, tmp_path)
    assert wait_until(lambda: not served(edge, site, "127.0.0.40"), 5)
    # JSON nested deeper than any parser's recursion limit, then a body that is not UTF-8
    source.poison = [b"[" * 200_000 + b"]" * 200_000, b'{"new":"\xff\xfe"}']
    assert wait_until(
        lambda: (
            edge.metric("blindfold_decisions_polls_total", source="stream", result="bad_response")
            >= 2
        ),
        10,
    )
    assert not served(edge, site, "127.0.0.40")  # the last known set is still enforced
    source.add(["127.0.0.41"])  # the source is healthy again: the feed follows it
    assert wait_until(lambda: not served(edge, site, "127.0.0.41"), 5)
    assert not served(edge, site, "127.0.0.40")
    assert served(edge, site, "127.0.0.42")
    assert edge.metric("blindfold_decisions_source_up", source="stream") == 1
    down = [r for r in edge.records("decisions_source_down") if r.get("reason") == "bad_response"]
    assert down, "the bad response was not reported"


def test_bans_wider_than_the_limit_are_refused_and_counted(
    start_edge: Start,
    origin: TlsOrigin,
    site: dict[str, Path],
    source: StreamSource,
    tmp_path: Path,
) -> None:
    source.add(["0.0.0.0/0", "127.0.0.0/8", "::/0", "127.0.0.44", "127.0.1.0/24"])
    edge = start(start_edge, origin, source, tmp_path, key_mode=0o644)
    warning = edge.records("key_file_readable_by_others")
    assert warning and warning[0]["mode"] == "0o644"
    assert wait_until(lambda: not served(edge, site, "127.0.0.44"), 5)
    assert not served(edge, site, "127.0.1.9")  # a /24 is within the default limit (/16)
    assert served(edge, site, "127.0.0.45")  # 0.0.0.0/0 and 127.0.0.0/8 were not believed
    assert edge.metric("blindfold_decisions_refused_total", reason="too_wide") == 3
    assert edge.metric("blindfold_decisions_active") == 2


def test_the_ban_count_is_capped(
    start_edge: Start,
    origin: TlsOrigin,
    site: dict[str, Path],
    source: StreamSource,
    tmp_path: Path,
) -> None:
    source.add([f"10.0.{i >> 8}.{i & 255}" for i in range(1500)])
    edge = start(start_edge, origin, source, tmp_path, "max_bans = 1000\n")
    assert wait_until(lambda: edge.metric("blindfold_decisions_active") == 1000, 10)
    assert edge.metric("blindfold_decisions_refused_total", reason="cap") == 500
    source.add(["127.0.0.46"])  # still full: refused and counted, visitors unaffected
    assert wait_until(
        lambda: edge.metric("blindfold_decisions_refused_total", reason="cap") == 501, 5
    )
    assert served(edge, site, "127.0.0.46")


def handshake_ms(edge: EdgeProcess, site: dict[str, Path]) -> float:
    t0 = time.monotonic()
    with tls_connect(edge.port, "example.test", site["ca"], source="127.0.0.50", timeout=10):
        pass
    return (time.monotonic() - t0) * 1000


def test_ban_changes_do_not_stall_visitors(
    start_edge: Start,
    origin: TlsOrigin,
    site: dict[str, Path],
    source: StreamSource,
    tmp_path: Path,
) -> None:
    """200k bans, then one more every poll: each change must cost the workers the change,
    not the whole set (which stalled every visitor for about a second per change)."""
    n = 200_000
    source.add(f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}" for i in range(n))
    edge = start(start_edge, origin, source, tmp_path)
    assert wait_until(lambda: edge.metric("blindfold_decisions_active") == n, 60, 0.5)
    assert wait_until(
        lambda: not served(edge, site, "10.0.0.1"),
        30,
        0.2,
    )
    baseline = [handshake_ms(edge, site) for _ in range(20)]
    samples = []
    deadline = time.monotonic() + 5.0
    i = 0
    while time.monotonic() < deadline:
        i += 1
        source.add([f"11.0.{i >> 8}.{i & 255}"])  # one new ban per poll (0.2 s)
        samples.append(handshake_ms(edge, site))
        time.sleep(0.02)
    assert wait_until(lambda: not served(edge, site, f"11.0.{i >> 8}.{i & 255}"), 5)
    samples.sort()
    p99 = samples[int(0.99 * (len(samples) - 1))]
    assert p99 < statistics.median(baseline) + 100, (
        f"p99 {p99:.1f} ms with changes vs median {statistics.median(baseline):.1f} ms before"
    )
    # the master holds no backlog: SIGTERM ends the edge promptly
    t0 = time.monotonic()
    edge.proc.send_signal(signal.SIGTERM)
    edge.proc.wait(15)
    assert time.monotonic() - t0 < 10


def test_a_respawned_worker_enforces_every_ban_from_its_first_connection(
    start_edge: Start,
    origin: TlsOrigin,
    site: dict[str, Path],
    source: StreamSource,
    tmp_path: Path,
) -> None:
    """A new worker loads the ban set in slices; it must not accept its share of visitors
    before the set is in."""
    from blindfold.io.listeners import steer_index

    n = 100_000
    source.add(f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}" for i in range(n))
    banned = next(f"127.0.0.{i}" for i in range(100, 200) if steer_index(f"127.0.0.{i}", 2) == 0)
    other = next(
        f"127.0.0.{i}"
        for i in range(100, 200)
        if steer_index(f"127.0.0.{i}", 2) == 0 and f"127.0.0.{i}" != banned
    )
    source.add([banned])
    edge = start(start_edge, origin, source, tmp_path)
    assert wait_until(
        lambda: (
            edge.metric("blindfold_decisions_active") == n + 1
            and edge.metric("blindfold_ban_updates_pending") == 0
        ),
        60,
        0.5,
    )
    assert not served(edge, site, banned) and served(edge, site, other)
    victim = next(
        pid
        for pid in edge.worker_pids()
        if "--index\x000\x00" in Path(f"/proc/{pid}/cmdline").read_text()
    )
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 30
    attempts = 0
    while time.monotonic() < deadline:
        attempts += 1
        assert not served(edge, site, banned), f"served on attempt {attempts}"
        if victim not in edge.worker_pids() and served(edge, site, other):
            break
    else:
        pytest.fail("the worker was not replaced")
    for _ in range(20):
        assert not served(edge, site, banned)


def test_a_throttled_source_is_up_and_its_retry_after_honoured(
    start_edge: Start,
    origin: TlsOrigin,
    site: dict[str, Path],
    source: StreamSource,
    tmp_path: Path,
) -> None:
    """The origin rations whole-set answers per key with 429 and Retry-After: the feed took
    that for "source down" (a log line, the gauge at 0, a resync) and polled again at its
    interval. It now waits as asked (bounded), counts `throttled` and stays up."""
    source.add(["127.0.0.40"])
    edge = start(start_edge, origin, source, tmp_path)
    assert wait_until(lambda: not served(edge, site, "127.0.0.40"), 5)
    source.throttle = ["2"]
    n = len(source.times)
    assert wait_until(
        lambda: (
            edge.metric("blindfold_decisions_polls_total", source="stream", result="throttled") == 1
        ),
        10,
    )
    assert edge.metric("blindfold_decisions_source_up", source="stream") == 1
    assert wait_until(lambda: len(source.times) >= n + 2, 10)  # the next poll after it
    throttled_at = source.times[n]
    assert source.times[n + 1] - throttled_at >= 1.9  # not at poll_interval_s (0.2 s)
    source.add(["127.0.0.41"])  # a delta, not a resync
    assert wait_until(lambda: not served(edge, site, "127.0.0.41"), 5)
    assert not served(edge, site, "127.0.0.40")
    assert not edge.records("decisions_source_down")
    assert source.requests[-1].endswith("startup=false")


def test_the_purge_log_is_followed_and_a_gap_empties_every_cache(
    start_edge: Start,
    origin: TlsOrigin,
    site: dict[str, Path],
    source: StreamSource,
    tmp_path: Path,
) -> None:
    """An edge follows the source's purge log with its own position; a purge it gets is
    applied by every worker and logged; a `reset` (it fell behind the log) empties every
    cache; a garbled purge is dropped alone, the decisions and the feed unharmed."""
    source.purge_log = True
    purge = {
        "id": "0123456789abcdef",
        "urls": ["example.test/a"],
        "tags": ["t1"],
        "issued": time.time(),
        "operator": "alice",
    }
    source.purge_answers = [
        {"position": "e.1", "reset": False, "purges": []},
        {"position": "e.2", "reset": False, "purges": [purge, {"id": "nope"}]},
        {"position": "e.9", "reset": True, "purges": []},
    ]
    source.add(["127.0.0.40"])
    edge = start(start_edge, origin, source, tmp_path, workers=2)
    applied = edge.wait_for(lambda r: r.get("event") == "purge_applied", 5)
    assert applied is not None
    assert (applied["purge"], applied["operator"], applied["source"]) == (
        "0123456789abcdef",
        "alice",
        "stream",
    )
    assert (applied["workers"], applied["of_workers"]) == (2, 2)
    dropped = edge.wait_for(lambda r: r.get("event") == "purge_dropped", 5)
    assert dropped is not None and dropped["reason"] == "bad_purge"
    gap = edge.wait_for(lambda r: r.get("event") == "purge_applied" and r["purge"] == "all", 5)
    assert gap is not None and gap["source"] == "stream"
    assert edge.metric("blindfold_edge_purges_total", source="stream", result="gap") == 1
    assert wait_until(lambda: len(source.purge_positions) >= 4, 5)
    assert source.purge_positions[:4] == [None, "e.1", "e.2", "e.9"]  # its position, sent back
    assert not served(edge, site, "127.0.0.40")
    assert edge.metric("blindfold_decisions_source_up", source="stream") == 1
