"""Attack review of issue 13, E: the origin's WAF-blocks-by-path metric keeps the busiest
paths of the last minutes, not the first 30 ever seen. A visitor who sends 30 junk blocked
paths first used to hold every label forever; a real hot path then only counted as `other`.
Real origin agent (ModSecurity + CRS), real requests, its /metrics and /status.json."""

from __future__ import annotations

import itertools
import json
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.helpers.edgeproc import OriginProcess
from tests.integration.test_waf_tuning import AlwaysOk, always_ok, config, send  # noqa: F401

ATTACK = "id=1%27%20OR%201=1--"
NAME = "blindfold_waf_path_blocks_total"


def test_a_hot_blocked_path_gets_its_label_after_30_junk_ones(
    always_ok: AlwaysOk,  # noqa: F811 (the fixture imported above)
    tmp_path: Path,
) -> None:
    # one worker (workers = 2: test_a_waf_path_counter_never_goes_down_with_two_workers)
    text = config(always_ok.port, tmp_path / "audit.log").replace(
        "[origin]\n", "[origin]\nworkers = 1\n", 1
    )
    origin = OriginProcess(text, tmp_path, name="origin")
    try:
        port = int(origin.ready["http_listen"][0].rpartition(":")[2])

        def blocked(path: str) -> int | None:
            raw = f"GET {path}?{ATTACK} HTTP/1.1\r\nHost: shop.example\r\n"
            raw += "User-Agent: Mozilla/5.0\r\nAccept: */*\r\nConnection: close\r\n\r\n"
            return send(port, raw.encode())[0]

        with ThreadPoolExecutor(8) as ex:
            junk = list(ex.map(blocked, [f"/junk{i}/x" for i in range(30)]))
            assert junk == [403] * 30
            hot = list(ex.map(blocked, ["/checkout/pay"] * 50))
            assert hot == [403] * 50
        samples: dict[str, float] = {}
        for line in origin.metrics().splitlines():
            if line.startswith(NAME + "{"):
                key, _, value = line.rpartition(" ")
                samples[key.partition('path="')[2].rstrip('"}')] = float(value)
        assert samples.get("/checkout", 0) >= 49, samples  # before: all 50 were 'other'
        assert len(samples) <= 31  # 30 + other: bounded
        assert sum(samples.values()) <= 80
        assert origin.metric("blindfold_waf_blocks_total") == 80
        # the status page's data shows it too
        with urllib.request.urlopen(f"http://{origin.admin}/status.json", timeout=10) as r:
            status = json.loads(r.read())
        series = status["metrics"][NAME]["series"]
        shown = {labels["path"]: value for labels, value in series}
        assert shown.get("/checkout", 0) >= 49, shown
    finally:
        origin.stop()


def test_a_waf_path_counter_never_goes_down_with_two_workers(
    always_ok: AlwaysOk,  # noqa: F811 (the fixture imported above)
    tmp_path: Path,
) -> None:
    """Attack review of issue 13, 7: each worker kept its own labels and dropped the series
    of one that left, while the master summed the workers' counters: an exported series went
    down (/hot 6 -> 3), which rate() reads as a counter reset. The master now keeps the one
    set of labels (workers send the blocked path's label with the block)."""
    text = config(always_ok.port, tmp_path / "audit.log").replace(
        "[origin]\n", "[origin]\nworkers = 2\n", 1
    )
    origin = OriginProcess(text, tmp_path, name="origin")
    try:
        port = int(origin.ready["http_listen"][0].rpartition(":")[2])

        def blocked(path: str) -> int | None:
            raw = f"GET {path}?{ATTACK} HTTP/1.1\r\nHost: shop.example\r\n"
            raw += "User-Agent: Mozilla/5.0\r\nAccept: */*\r\nConnection: close\r\n\r\n"
            return send(port, raw.encode())[0]

        def samples() -> dict[str, float]:
            out: dict[str, float] = {}
            for line in origin.metrics().splitlines():
                if line.startswith(NAME + "{"):
                    key, _, value = line.rpartition(" ")
                    out[key.partition('path="')[2].rstrip('"}')] = float(value)
            return out

        for _ in range(6):
            assert blocked("/hot/x") == 403
        with ThreadPoolExecutor(4) as ex:
            paths = [f"/junk{i}/x" for i in range(29) for _ in range(12)]
            assert set(ex.map(blocked, paths)) == {403}
        seen = []
        for _ in range(40):
            assert blocked("/newcomer/x") == 403
            seen.append(samples())
        for before, after in itertools.pairwise(seen):
            for label, value in after.items():  # exported in both: never lower
                assert value >= before.get(label, 0), (label, before, after)
        assert len(seen[-1]) <= 31
        assert origin.metric("blindfold_waf_blocks_total") == 6 + 29 * 12 + 40
    finally:
        origin.stop()
