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


def _visit(port: int, ca: Path, tlvs: tuple[tuple[int, bytes], ...], path: str) -> bytes:
    """A PROXY v2 sender in trusted_edges (an L4 load balancer, say) in front of the origin:
    its header names visitor 203.0.113.7, then the visitor's own TLS and HTTP bytes."""
    import socket
    import ssl

    from blindfold.core.proxyproto import encode_v2

    header = encode_v2(("203.0.113.7", 40000), ("127.0.0.1", port), tlvs)
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    raw.sendall(header)
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.set_alpn_protocols(["http/1.1"])
    with ctx.wrap_socket(raw, server_hostname="example.test") as s:
        s.sendall(
            f"GET {path} HTTP/1.1\r\nHost: example.test\r\nX-Request-Id: {FORGED}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def test_another_proxy_senders_tlvs_never_make_the_visitors_id_believed(
    start_origin: Callable[..., OriginProcess], app: Any, site: dict[str, Path], tmp_path: Path
) -> None:
    """Attack review (hops #3): the origin believed X-Request-Id whenever the header carried
    ANY TLV of the marker's type, 0xEA then, which an AWS NLB (PrivateLink) puts in every
    header it sends. Now: a type no load balancer uses, and only with blindfold's fixed value."""
    from blindfold.core.proxyproto import BLINDFOLD_HTTP_MARK, PP2_TYPE_BLINDFOLD_HTTP

    origin = start_origin(origin_config(site, app.port, tmp_path))
    cases = {
        "/aws": ((0xEA, b"\x01vpce-0123456789abcdef0"),),  # AWS PrivateLink's TLV
        "/other": ((PP2_TYPE_BLINDFOLD_HTTP, b"x"),),  # our type, another value
        "/empty": ((PP2_TYPE_BLINDFOLD_HTTP, b""),),
    }
    for path, tlvs in cases.items():
        assert _visit(origin.port, site["ca"], tlvs, path).startswith(b"HTTP/1.1 200")
        rec = origin.wait_for(lambda r, p=path: r.get("event") == "request" and r["path"] == p)
        assert rec is not None and rec["request_id"] != FORGED, (path, rec)
        assert rec["client"] == "203.0.113.7"
        seen = [s for s in app.seen if s["path"] == path]
        assert seen and seen[-1]["x-request-id"] == rec["request_id"]
    # the mark itself, from a trusted address: believed (what a keyless edge sends; edges
    # with a key authenticate the whole header, test_proxy_auth_edge)
    _visit(origin.port, site["ca"], ((PP2_TYPE_BLINDFOLD_HTTP, BLINDFOLD_HTTP_MARK),), "/mark")
    rec = origin.wait_for(lambda r: r.get("event") == "request" and r["path"] == "/mark")
    assert rec is not None and rec["request_id"] == FORGED


def test_cache_tag_reaches_a_keyless_edge_and_never_a_passthrough_visitor(
    start_edge: Callable[..., EdgeProcess],
    start_origin: Callable[..., OriginProcess],
    app: Any,
    site: dict[str, Path],
    tmp_path: Path,
    kpki: KeylessPki,  # noqa: F811
    keyserver: KeyServerProcess,  # noqa: F811
) -> None:
    """Attack review of issue 13, C: Cache-Tag names the site's internal tags for an edge's
    cache. The origin agent keeps it for an edge that speaks HTTP (its PROXY v2 mark; the
    edge reads it and strips it itself) and strips it for everyone else: a passthrough route's
    visitor (before: the application's header reached them), a direct visitor, a PROXY sender
    without the mark."""
    origin = start_origin(origin_config(site, app.port, tmp_path))
    edge = start_edge(
        edge_config(
            keyless_route(kpki, site, [keyserver.port], origin.port)
            + route(["other.test"], [f"127.0.0.1:{origin.port}"], proxy_protocol="v2"),
            per_ip_rate_per_s=0,
        )
    )
    path = "/cached/tagged?tag=internal-tag-42"

    def head(host: str, ca: Path) -> str:
        out = curl(edge.port, host, ca, "-o", "/dev/null", "-D", "/dev/stdout", path=path)
        assert out.returncode == 0 and out.stdout.startswith("HTTP/"), out.stderr
        return out.stdout.lower()

    from blindfold.core.proxyproto import BLINDFOLD_HTTP_MARK, PP2_TYPE_BLINDFOLD_HTTP

    assert "internal-tag-42" not in head("other.test", site["ca"])  # passthrough
    # through the keyless edge: the visitor never sees it (the edge strips it) ...
    for _ in range(3):
        assert "internal-tag-42" not in head("example.test", kpki.site_ca)
    assert "x-blindfold-cache: hit" in head("example.test", kpki.site_ca)
    # ... and the origin does send it to an edge that speaks HTTP (what the keyless edge
    # sends: the mark in its PROXY v2 header, from a trusted address)
    marked = ((PP2_TYPE_BLINDFOLD_HTTP, BLINDFOLD_HTTP_MARK),)
    assert b"\r\ncache-tag: internal-tag-42\r\n" in _visit(origin.port, site["ca"], marked, path)
    # a PROXY sender without the mark (an L4 load balancer in trusted_edges): stripped
    assert b"internal-tag-42" not in _visit(origin.port, site["ca"], (), path)
