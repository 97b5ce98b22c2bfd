"""The three daemons as an operator runs them: SIGHUP reloads each one and its `reloaded` line
says what changed; SIGTERM with nothing open ends each one in well under a second with a
`<name>_stopped` line; a request's log line reaches the log at once, not at the next
periodic flush."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.helpers.clients import curl
from tests.helpers.edgeproc import BlindfoldProcess, EdgeProcess, OriginProcess, edge_config, route
from tests.helpers.keyless import KeylessPki, KeyServerProcess, keyserver_config
from tests.helpers.topology import origin_config
from tests.integration.test_keyless import kpki  # noqa: F401

STOP_WITHIN_S = 1.0


def _stop_quickly(proc: BlindfoldProcess, name: str) -> None:
    t0 = time.monotonic()
    proc.proc.send_signal(signal.SIGTERM)
    proc.proc.wait(10)
    took = time.monotonic() - t0
    assert proc.proc.returncode == 0, proc.stderr_lines
    print(f"{name} stopped in {took:.2f} s")
    assert took < STOP_WITHIN_S, f"{name} took {took:.2f} s to stop"
    assert proc.wait_for(lambda r: r.get("event") == f"{name}_stopped", 2)


def test_reload_and_stop_for_all_three(
    start_edge: Callable[..., EdgeProcess],
    start_origin: Callable[..., OriginProcess],
    app: Any,
    site: dict[str, Path],
    tmp_path: Path,
    kpki: KeylessPki,  # noqa: F811
) -> None:
    origin = start_origin(origin_config(site, app.port, tmp_path))
    routes = route(["example.test"], [f"127.0.0.1:{origin.port}"], proxy_protocol="v2", name="a")
    edge = start_edge(edge_config(routes, per_ip_rate_per_s=0))
    keyserver = KeyServerProcess(
        keyserver_config(kpki, {"edge1": ["example.test"]}), tmp_path, name="ks"
    )
    try:
        # a request's line is in the origin's log at once (it flushed once a second before)
        for i in range(3):
            out = curl(edge.port, "example.test", site["ca"], path=f"/now{i}")
            assert out.returncode == 0, out.stderr
            done = time.monotonic()
            line = origin.wait_for(
                lambda r, i=i: r.get("event") == "request" and r.get("path") == f"/now{i}", 2
            )
            assert line is not None and time.monotonic() - done < 0.4
        # SIGHUP: each reloads and says what changed
        edge.write_config(
            edge_config(routes.replace('"a"', '"b"'), per_ip_rate_per_s=0, hello_timeout_s=4)
        )
        edge.proc.send_signal(signal.SIGHUP)
        line = edge.wait_for(lambda r: r.get("event") == "reloaded", 10)
        assert line is not None and set(line["changed"]) == {
            "hello_timeout_s",
            "+routes[b]",
            "-routes[a]",
        }, line
        origin.write_config(
            origin_config(site, app.port, tmp_path, waf={"paranoia_level": 2}).replace(
                '"127.0.0.1:0"', f'"127.0.0.1:{origin.port}"', 1
            )
        )
        origin.proc.send_signal(signal.SIGHUP)
        line = origin.wait_for(lambda r: r.get("event") == "reloaded", 10)
        assert line is not None and "waf.paranoia_level" in line["changed"], line
        assert origin.metric("blindfold_origin_config_reloads_total", result="ok") == 1
        keyserver.proc.send_signal(signal.SIGHUP)
        line = keyserver.wait_for(lambda r: r.get("event") == "reloaded", 10)
        assert line is not None and line["edges"] == ["edge1"]
        # SIGTERM with nothing open: each ends in well under a second
        _stop_quickly(edge, "edge")
        _stop_quickly(origin, "origin")
        _stop_quickly(keyserver, "keyserver")
    finally:
        keyserver.stop()
