"""One request id across hops: a keyless edge's request id reaches the origin agent and the
application in X-Request-Id, and the edge and the origin both log it; a visitor's own
X-Request-Id is never believed; through a passthrough route (the visitor speaks HTTP to the
origin itself) the origin makes its own id."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.helpers.clients import curl
from tests.helpers.edgeproc import EdgeProcess, OriginProcess, edge_config, route
from tests.helpers.keyless import KeylessPki, KeyServerProcess
from tests.helpers.topology import origin_config
from tests.integration.test_keyless import keyless_route, keyserver, kpki  # noqa: F401

FORGED = "visitor-chosen-id"


def test_the_edges_request_id_reaches_the_origin_and_the_application(
    start_edge: Callable[..., EdgeProcess],
    start_origin: Callable[..., OriginProcess],
    app: Any,
    site: dict[str, Path],
    tmp_path: Path,
    kpki: KeylessPki,  # noqa: F811
    keyserver: KeyServerProcess,  # noqa: F811
) -> None:
    origin = start_origin(origin_config(site, app.port, tmp_path))
    edge = start_edge(
        edge_config(
            keyless_route(kpki, site, [keyserver.port], origin.port)
            + route(["other.test"], [f"127.0.0.1:{origin.port}"], proxy_protocol="v2"),
            per_ip_rate_per_s=0,
        )
    )
    out = curl(edge.port, "example.test", kpki.site_ca, "-H", f"X-Request-Id: {FORGED}", path="/k")
    assert out.returncode == 0, out.stderr
    done = time.monotonic()
    at_edge = edge.wait_for(lambda r: r.get("event") == "request" and r.get("path") == "/k")
    assert at_edge is not None
    assert time.monotonic() - done < 0.4, (time.time() - at_edge["ts"], time.monotonic() - done)
    rid = at_edge["request_id"]
    assert rid and rid != FORGED
    at_origin = origin.wait_for(lambda r: r.get("event") == "request" and r.get("path") == "/k")
    assert at_origin is not None and at_origin["request_id"] == rid, (at_edge, at_origin)
    seen = [s for s in app.seen if s["path"] == "/k"]
    assert seen and seen[-1]["x-request-id"] == rid
    # passthrough: the visitor's header reaches the origin untouched by the edge; the origin
    # must not believe it
    out = curl(edge.port, "other.test", site["ca"], "-H", f"X-Request-Id: {FORGED}", path="/p")
    assert out.returncode == 0, out.stderr
    at_origin = origin.wait_for(lambda r: r.get("event") == "request" and r.get("path") == "/p")
    assert at_origin is not None and at_origin["request_id"] != FORGED
    seen = [s for s in app.seen if s["path"] == "/p"]
    assert seen and seen[-1]["x-request-id"] == at_origin["request_id"]
