"""Path rules, Host checks and forwarding headers against crafted requests (issue 8 findings
3, 4, 5, 8), through a keyless edge and at the origin agent, with curl as the client and a WSGI
application (what a Python framework would believe) behind the origin."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.clients import curl, h2_exchange
from tests.helpers.edgeproc import EdgeProcess, OriginProcess, edge_config
from tests.helpers.keyless import KeylessPki, KeyServerProcess
from tests.helpers.topology import origin_config
from tests.helpers.wsgiapp import WsgiApp
from tests.integration.test_keyless import keyless_route, keyserver, kpki

__all__ = ["keyserver", "kpki"]  # fixtures used here

SQLI = "?id=1%27%20OR%201=1--"
LOOKALIKES = [
    "X_Forwarded_For: 6.6.6.6",
    "x_real_ip: 6.6.6.6",
    "X_Forwarded_Host: evil.example",
    "X-Forwarded-Port: 1",
    "X_FORWARDED_PROTO: http",
    "Client-IP: 6.6.6.6",
    "True-Client-IP: 6.6.6.6",
    "X-Client-IP: 6.6.6.6",
]


@pytest.fixture
def wsgi() -> Iterator[WsgiApp]:
    a = WsgiApp()
    yield a
    a.close()


@pytest.fixture
def keyless(
    start_edge: Callable[..., EdgeProcess],
    start_origin: Callable[..., OriginProcess],
    wsgi: WsgiApp,
    site: dict[str, Path],
    tmp_path: Path,
    kpki: KeylessPki,
    keyserver: KeyServerProcess,
) -> Callable[..., EdgeProcess]:
    def make(**route_kw: Any) -> EdgeProcess:
        origin = start_origin(origin_config(site, wsgi.port, tmp_path))
        text = edge_config(
            keyless_route(kpki, site, [keyserver.port], origin.port, **route_kw),
            per_ip_rate_per_s=0,
        )
        return start_edge(text)

    return make


def request(
    port: int,
    ca: Path,
    path: str,
    *args: str,
    headers: list[str] | tuple[str, ...] = (),
    source: str = "127.0.0.1",
) -> tuple[int, dict[str, str] | None]:
    """curl, the path sent exactly as written: (status, the application's view or None)."""
    extra = [a for h in headers for a in ("-H", h)]
    out = curl(
        port,
        "example.test",
        ca,
        "--path-as-is",
        "-w",
        "\n%{http_code}",
        *extra,
        *args,
        source=source,
        path=path,
    )
    body, _, code = out.stdout.rpartition("\n")
    try:
        view = json.loads(body)
    except ValueError:
        view = None
    return int(code or 0), view


SPELLINGS = ["/%6cogin", "//login", "/./login", "/x/../login", "/%2e%2e/login", "/login;v=1"]
# what a servlet container (Tomcat: path parameters stripped, then dot-segments) routes to /login
SERVLET_SPELLINGS = ["/x/..;/login", "/x/..;v=1/login", "/;v=1/login", "/.;v/login"]


def test_edge_rate_limit_counts_every_spelling_of_the_path(
    keyless: Callable[..., EdgeProcess], kpki: KeylessPki, wsgi: WsgiApp
) -> None:
    edge = keyless(
        rate_limits=[{"path_prefix": "/login", "rate_per_s": 0.01, "burst": 2, "name": "login"}]
    )
    ca, src = kpki.site_ca, "127.0.0.21"
    assert [request(edge.port, ca, "/login", source=src)[0] for _ in range(2)] == [200, 200]
    absolute = ("--http1.1", "--request-target", f"https://example.test:{edge.port}/login")
    codes = [request(edge.port, ca, p, source=src)[0] for p in SPELLINGS + SERVLET_SPELLINGS]
    codes.append(request(edge.port, ca, "/", *absolute, source=src)[0])
    assert codes == [429] * (len(SPELLINGS) + len(SERVLET_SPELLINGS) + 1)
    assert request(edge.port, ca, "/loginX", source=src)[0] == 200  # another path
    assert [s["RAW_URI"] for s in wsgi.seen] == ["/login", "/login", "/loginX"]


def test_an_absolute_form_target_is_routed_by_its_authority(
    keyless: Callable[..., EdgeProcess], kpki: KeylessPki, wsgi: WsgiApp
) -> None:
    edge = keyless(sni=["example.test"])
    ca = kpki.site_ca
    secret = ("--http1.1", "--request-target", "https://internal.example/secret")
    assert request(edge.port, ca, "/", *secret)[0] == 400  # differs from Host
    assert request(edge.port, ca, "/", *secret, headers=["Host: internal.example"])[0] == 421
    assert wsgi.seen == []  # neither reached the application
    own = ("--http1.1", "--request-target", f"https://example.test:{edge.port}/a/../echo?x=1")
    code, view = request(edge.port, ca, "/", *own)
    assert code == 200 and view is not None
    assert view["RAW_URI"] == "/echo?x=1"  # reduced to origin-form
    assert view["HTTP_HOST"] == f"example.test:{edge.port}"


@pytest.mark.parametrize(
    "host",
    [
        'x",for=6.6.6.6,a="a.example.test',
        "x;for=6.6.6.6;a.example.test",
        "evil.example,a.example.test",
        "evil.example a.example.test",
    ],
)
def test_a_crafted_host_is_refused(
    keyless: Callable[..., EdgeProcess], kpki: KeylessPki, wsgi: WsgiApp, host: str
) -> None:
    edge = keyless()  # example.test and *.example.test
    assert request(edge.port, kpki.site_ca, "/echo", headers=[f"Host: {host}"])[0] == 400
    assert wsgi.seen == []


def test_forwarding_headers_name_the_visitor_only(
    keyless: Callable[..., EdgeProcess], kpki: KeylessPki
) -> None:
    edge = keyless()
    code, view = request(
        edge.port,
        kpki.site_ca,
        "/echo",
        headers=["Host: a.example.test", *LOOKALIKES],
        source="127.0.0.22",
    )
    assert code == 200 and view is not None
    assert view["HTTP_X_FORWARDED_FOR"] == "127.0.0.22"
    assert view["HTTP_X_FORWARDED_HOST"] == "a.example.test"
    assert view["HTTP_X_FORWARDED_PROTO"] == "https"
    assert view["HTTP_FORWARDED"] == 'for=127.0.0.22;proto=https;host="a.example.test"'
    assert "HTTP_X_REAL_IP" not in view and "HTTP_X_FORWARDED_PORT" not in view


# ---------------------------------------------------------------------- at the origin agent
def origin_direct(
    start_origin: Callable[..., OriginProcess],
    wsgi: WsgiApp,
    site: dict[str, Path],
    tmp_path: Path,
    extra: str = "",
    **kw: Any,
) -> OriginProcess:
    return start_origin(
        origin_config(site, wsgi.port, tmp_path, proxy_protocol="optional", **kw) + extra
    )


def test_origin_rate_rule_counts_every_spelling_of_the_path(
    start_origin: Any, wsgi: WsgiApp, site: dict[str, Path], tmp_path: Path
) -> None:
    rule = {"path_prefix": "/login", "rate_per_s": 0.01, "burst": 3, "name": "login"}
    origin = origin_direct(
        start_origin, wsgi, site, tmp_path, decisions={"rate_rules": [rule]}, access_log=False
    )
    for path in ["/login", *SPELLINGS[:3]]:
        assert request(origin.port, site["ca"], path, source="127.0.0.23")[0] == 200
    decision = origin.wait_for(lambda r: r.get("event") == "decision", 5)
    assert decision is not None, "the 4th /login (spelled differently) was not counted"
    assert decision["reason"] == "rate: login" and decision["value"] == "127.0.0.23"


def test_origin_waf_exclusion_covers_its_segment_only(
    start_origin: Any, wsgi: WsgiApp, site: dict[str, Path], tmp_path: Path
) -> None:
    origin = origin_direct(
        start_origin,
        wsgi,
        site,
        tmp_path,
        '\n[[origin.waf.exclusions]]\npath_prefix = "/webhook"\n',
        decisions={"ban_after_blocks": 100},
    )
    ca = site["ca"]
    assert request(origin.port, ca, "/webhook" + SQLI)[0] == 200  # excluded
    assert request(origin.port, ca, "/webhook/../login" + SQLI)[0] == 403
    assert request(origin.port, ca, "/webhookX/a" + SQLI)[0] == 403
    # a servlet container routes these to /login: the WAF must inspect them
    for path in ("/webhook/..;/login", "/webhook/.;/../login", "/webhook;x/..;/login"):
        assert request(origin.port, ca, path + SQLI)[0] == 403, path
    assert [s["RAW_URI"] for s in wsgi.seen] == ["/webhook" + SQLI]


def test_origin_checks_host_and_forwarding_headers(
    start_origin: Any, wsgi: WsgiApp, site: dict[str, Path], tmp_path: Path
) -> None:
    origin = origin_direct(start_origin, wsgi, site, tmp_path)
    ca = site["ca"]
    for host in ('x",for=6.6.6.6,a="example.test', "evil.example,example.test"):
        assert request(origin.port, ca, "/echo", headers=[f"Host: {host}"])[0] == 400
    secret = ("--http1.1", "--request-target", "https://internal.example/secret")
    assert request(origin.port, ca, "/", *secret)[0] == 400
    assert wsgi.seen == []
    code, view = request(origin.port, ca, "/echo", headers=LOOKALIKES, source="127.0.0.24")
    assert code == 200 and view is not None
    assert view["HTTP_X_FORWARDED_FOR"] == "127.0.0.24"
    assert view["HTTP_X_FORWARDED_HOST"] == f"example.test:{origin.port}"
    assert "HTTP_X_REAL_IP" not in view and "HTTP_X_FORWARDED_PORT" not in view
    assert not {"HTTP_CLIENT_IP", "HTTP_TRUE_CLIENT_IP", "HTTP_X_CLIENT_IP"} & set(view)
    assert view["HTTP_FORWARDED"] == (
        f'for=127.0.0.24;proto=https;host="example.test:{origin.port}"'
    )


def test_an_h2_scheme_never_reaches_the_forwarding_headers(
    start_origin: Any, wsgi: WsgiApp, site: dict[str, Path], tmp_path: Path
) -> None:
    """`:scheme` is the visitor's: a crafted one must not add elements to the application's
    Forwarded header (host=..., for=...) or X-Forwarded-Proto."""
    origin = origin_direct(start_origin, wsgi, site, tmp_path)
    base = [(b":method", b"GET"), (b":authority", b"example.test"), (b":path", b"/echo")]
    evil = b"https;host=evil.example,for=6.6.6.6;proto=https"
    for scheme in (evil, b"http"):
        [(status, _)] = h2_exchange(
            origin.port, "example.test", site["ca"], [([*base, (b":scheme", scheme)], None)]
        )
        assert status == 400, scheme
    assert wsgi.seen == []
    [(status, body)] = h2_exchange(
        origin.port, "example.test", site["ca"], [([*base, (b":scheme", b"https")], None)]
    )
    assert status == 200
    assert json.loads(body)["HTTP_FORWARDED"].startswith("for=127.0.0.1;proto=https;")
