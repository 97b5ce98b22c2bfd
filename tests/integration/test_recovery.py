"""What survives a crash: the origin killed with SIGKILL and started again keeps every ban it
had made (its decision journal), and the edges following it keep enforcing them."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from tests.helpers.clients import curl, wait_until
from tests.helpers.edgeproc import EdgeProcess, OriginProcess, edge_config, route
from tests.helpers.nginx import free_port
from tests.helpers.topology import edge_decisions, origin_config

SQLI = "/?id=1%27%20OR%201=1--"


def status(edge: EdgeProcess, site: dict[str, Path], source: str) -> int:
    out = curl(
        edge.port, "example.test", site["ca"], "-o", "/dev/null", "-w", "%{http_code}",
        source=source, path="/echo",
    )  # fmt: skip
    return int(out.stdout or 0)


def stream_values(origin: OriginProcess, site: dict[str, Path], tmp_path: Path) -> list[str]:
    """The whole set the origin now serves (what a starting edge gets), read with curl."""
    from tests.conftest import DECISIONS_NAME
    from tests.helpers.topology import API_KEY

    port = origin.decisions_port
    out = curl(
        port, DECISIONS_NAME, site["ca"], "-H", f"X-Api-Key: {API_KEY}",
        path="/v1/decisions/stream?startup=true",
    )  # fmt: skip
    payload = json.loads(out.stdout)
    return sorted(d["value"] for d in payload["new"] or [])


def test_bans_survive_an_origin_killed_and_restarted(
    start_edge: Any, start_origin: Any, app: Any, site: dict[str, Path], tmp_path: Path
) -> None:
    """A SIGKILLed origin used to come back with an empty decision store: every edge, on its
    next poll, got the whole (empty) set and lifted every ban (an attacker banned an hour ago
    was let in again by a crash)."""
    journal = tmp_path / "decisions.journal"
    config = origin_config(
        site,
        app.port,
        tmp_path,
        listen=[f"127.0.0.1:{free_port()}"],  # the same addresses after the restart
        decisions={
            "listen": f"127.0.0.1:{free_port()}",
            "ban_duration_s": 3600,
            "journal": str(journal),
        },
    )
    origin = start_origin(config)
    text = edge_config(
        route(["example.test"], [f"127.0.0.1:{origin.port}"], proxy_protocol="v2"),
        per_ip_rate_per_s=0,
    )
    edge = start_edge(text + edge_decisions(site, origin.decisions_port, tmp_path))
    assert edge.wait_for(lambda r: r.get("event") == "decisions_source_up", 10)
    assert status(edge, site, "127.0.0.41") == 200
    assert status(edge, site, "127.0.0.40") == 200
    out = curl(edge.port, "example.test", site["ca"], "-o", "/dev/null", "-w", "%{http_code}",
               source="127.0.0.40", path=SQLI)  # fmt: skip
    assert out.stdout == "403"
    assert wait_until(lambda: status(edge, site, "127.0.0.40") == 0, 5)

    origin.proc.kill()  # SIGKILL: no goodbye, nothing flushed at exit
    origin.proc.wait(10)
    assert edge.wait_for(lambda r: r.get("event") == "decisions_source_down", 10)
    ups = len(edge.records("decisions_source_up"))
    started = time.monotonic()
    again = start_origin(config)
    assert again.decisions_port == origin.decisions_port
    # the edge's next poll carries a position from before the restart: the origin answers
    # with the whole set, which the edge takes as the truth
    assert edge.wait_for(
        lambda r: r.get("event") == "decisions_source_up" and len(edge.records(r["event"])) > ups,
        15,
    )
    assert again.metric("blindfold_decisions_active") == 1
    assert stream_values(again, site, tmp_path) == ["127.0.0.40"]
    assert status(edge, site, "127.0.0.40") == 0  # still refused at layer 4
    assert status(edge, site, "127.0.0.41") == 200  # the others are served again
    assert edge.metric("blindfold_decisions_active") == 1
    assert time.monotonic() - started < 15
    restored = again.records("decisions_restored")
    assert restored and restored[0]["decisions"] == 1 and restored[0]["problems"] == []
