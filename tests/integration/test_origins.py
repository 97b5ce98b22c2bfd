"""Origin choice and health: refused and silent origins are skipped, marked down, recovered."""

from __future__ import annotations

import socket
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers.clients import get, http_get, tls_connect
from tests.helpers.edgeproc import EdgeProcess, edge_config, route
from tests.helpers.nginx import free_port
from tests.helpers.origin import TlsOrigin

Start = Callable[..., EdgeProcess]


@pytest.fixture
def origin_b(site: dict[str, Path]) -> Iterator[TlsOrigin]:
    o = TlsOrigin(site["cert"], site["key"], name="B")
    yield o
    o.close()


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port whose accept queue is full: SYNs are dropped and connects time out."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(0)
    port = lsock.getsockname()[1]
    fillers = []
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        fillers.append(s)
    yield port
    for s in fillers:
        s.close()
    lsock.close()


def test_round_robin_spreads(
    start_edge: Start, origin: TlsOrigin, origin_b: TlsOrigin, site: dict[str, Path]
) -> None:
    edge = start_edge(
        edge_config(
            route(["example.test"], [f"127.0.0.1:{origin.port}", f"127.0.0.1:{origin_b.port}"]),
            workers=1,
        )
    )
    names = Counter(
        get(edge.port, "example.test", site["ca"]).split(b"origin ")[1][:1] for _ in range(10)
    )
    assert names == {b"A": 5, b"B": 5}


def test_refused_origin_is_skipped_and_marked_down(
    start_edge: Start, origin: TlsOrigin, site: dict[str, Path]
) -> None:
    dead = f"127.0.0.1:{free_port()}"
    edge = start_edge(
        edge_config(
            route(["example.test"], [dead, f"127.0.0.1:{origin.port}"], name="r"),
            workers=1,
            origin_down_s=60,
        )
    )
    for _ in range(6):
        assert b"origin A" in get(edge.port, "example.test", site["ca"])
    assert edge.metric("blindfold_origin_up", route="r", origin=dead) == 0
    assert edge.metric("blindfold_origin_up", route="r", origin=f"127.0.0.1:{origin.port}") == 1
    # marked down after the first refusal: not retried on every connection
    assert (
        edge.metric(
            "blindfold_origin_connect_failures_total", route="r", origin=dead, reason="refused"
        )
        == 1
    )
    assert edge.wait_for(lambda r: r.get("event") == "origin_down" and r["origin"] == dead)


def test_silent_origin_times_out_then_the_next_serves(
    start_edge: Start, origin: TlsOrigin, site: dict[str, Path], silent_port: int
) -> None:
    silent = f"127.0.0.1:{silent_port}"
    edge = start_edge(
        edge_config(
            route(["example.test"], [silent, f"127.0.0.1:{origin.port}"], name="r"),
            workers=1,
            connect_timeout_s=0.5,
        )
    )
    assert b"origin A" in get(edge.port, "example.test", site["ca"])
    assert (
        edge.metric(
            "blindfold_origin_connect_failures_total",
            route="r",
            origin=silent,
            reason="connect_timeout",
        )
        == 1
    )


def test_all_origins_down_is_a_clean_refusal(start_edge: Start, site: dict[str, Path]) -> None:
    dead = f"127.0.0.1:{free_port()}"
    edge = start_edge(edge_config(route(["example.test"], [dead])))
    with pytest.raises(OSError):
        get(edge.port, "example.test", site["ca"])
    line = edge.wait_conn(outcome="origin_failed")
    assert line is not None and line["reason"] == "refused"


def test_least_conn_prefers_the_idle_origin(
    start_edge: Start, origin: TlsOrigin, origin_b: TlsOrigin, site: dict[str, Path]
) -> None:
    edge = start_edge(
        edge_config(
            route(
                ["example.test"],
                [f"127.0.0.1:{origin.port}", f"127.0.0.1:{origin_b.port}"],
                balance="least_conn",
            ),
            workers=1,
        )
    )
    held = [tls_connect(edge.port, "example.test", site["ca"]) for _ in range(2)]
    first = [http_get(c, keep_alive=True).split(b"origin ")[1][:1] for c in held]
    assert sorted(first) == [b"A", b"B"]
    a_conn = held[first.index(b"A")]
    a_conn.close()  # A now has none open, B has one
    names = {get(edge.port, "example.test", site["ca"]).split(b"origin ")[1][:1] for _ in range(3)}
    assert names == {b"A"}
    for c in held:
        c.close()
