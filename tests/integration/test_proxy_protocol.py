"""The origin learns the visitor's address from the PROXY header the edge sends."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.clients import curl, get
from tests.helpers.edgeproc import EdgeProcess, OriginProcess, edge_config, route
from tests.helpers.nginx import Nginx
from tests.helpers.origin import TlsOrigin
from tests.helpers.topology import origin_config

Start = Callable[..., EdgeProcess]


@pytest.fixture
def nginx(tmp_path: Path, site: dict[str, Path]) -> Iterator[Nginx]:
    n = Nginx(tmp_path, site["cert"], site["key"])
    yield n
    n.stop()


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_nginx_sees_the_visitor_address(
    start_edge: Start, nginx: Nginx, site: dict[str, Path], version: str
) -> None:
    edge = start_edge(
        edge_config(route(["example.test"], [f"127.0.0.1:{nginx.port}"], proxy_protocol=version))
    )
    for source in ("127.0.0.2", "127.0.0.3"):
        result = curl(edge.port, "example.test", site["ca"], source=source)
        assert result.returncode == 0, result.stderr
        assert f"visitor={source} " in result.stdout
        assert f"server=127.0.0.1:{edge.port}" in result.stdout
        assert "sni=example.test" in result.stdout


def test_v2_tlvs_carry_sni_and_alpn(
    start_edge: Start, pp_origin: TlsOrigin, site: dict[str, Path]
) -> None:
    edge = start_edge(
        edge_config(route(["example.test"], [f"127.0.0.1:{pp_origin.port}"], proxy_protocol="v2"))
    )
    reply = get(edge.port, "example.test", site["ca"], source="127.0.0.9")
    assert b"visitor 127.0.0.9:" in reply
    header = pp_origin.seen.headers[-1]
    assert header.version == 2 and header.src is not None and header.src[0] == "127.0.0.9"
    assert header.tlv(0x02) == b"example.test"  # PP2_TYPE_AUTHORITY


def test_without_proxy_protocol_the_origin_sees_the_edge(
    start_edge: Start, origin: TlsOrigin, site: dict[str, Path]
) -> None:
    edge = start_edge(edge_config(route(["example.test"], [f"127.0.0.1:{origin.port}"])))
    reply = get(edge.port, "example.test", site["ca"], source="127.0.0.9")
    assert b"visitor 127.0.0.1:" in reply  # the edge's own address, nothing added


def test_defaults_agree_and_a_mismatch_is_named(
    start_edge: Start,
    start_origin: Callable[..., OriginProcess],
    app: Any,
    site: dict[str, Path],
    tmp_path: Path,
) -> None:
    """A route that says nothing about PROXY reaches an origin agent that says nothing either
    (edge v2, origin required); a route that sends none is refused by that origin before any
    TLS byte, and the edge's log line says so with a hint (before: reason "reset" or null)."""
    origin = start_origin(origin_config(site, app.port, tmp_path))
    default = '[[edge.routes]]\nsni = ["example.test"]\norigins = ["127.0.0.1:%d"]\n\n'
    edge = start_edge(
        edge_config(
            default % origin.port
            + route(["other.test"], [f"127.0.0.1:{origin.port}"], proxy_protocol="none")
        )
    )
    ok = curl(edge.port, "example.test", site["ca"], source="127.0.0.9")
    assert ok.returncode == 0, ok.stderr
    bad = curl(edge.port, "other.test", site["ca"], source="127.0.0.9")
    assert bad.returncode != 0
    line = edge.wait_conn(sni="other.test")
    assert line is not None
    assert line["reason"] == "origin_closed_before_tls", line
    assert "proxy_protocol" in line["hint"] and "trusted_edges" in line["hint"]
