"""Attack review of issue 13, E: the origin's WAF-blocks-by-path metric keeps the busiest
paths of the last minutes, not the first 30 ever seen. A visitor who sends 30 junk blocked
paths first used to hold every label forever; a real hot path then only counted as `other`.
Real origin agent (ModSecurity + CRS), real requests, its /metrics and /status.json."""

from __future__ import annotations

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
    # one process: labels are kept per origin process (each worker has its own 30)
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
