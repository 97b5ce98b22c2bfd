"""The origin agent against lying or hostile peers (second attack review, atk-trust): PROXY
headers that are not what they seem, visitors counted by the wrong key, edges that hold the
decision stream or make decisions they should not. Real origin processes, real TLS clients."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from blindfold.core.proxyproto import encode_v2
from tests.helpers.clients import http_get
from tests.helpers.edgeproc import OriginProcess
from tests.helpers.topology import origin_config
from tests.integration.test_origin_limits import tls

StartOrigin = Callable[..., OriginProcess]


def connect(port: int, header: bytes | None, source: str = "127.0.0.1") -> socket.socket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    if header:
        raw.sendall(header)
    return raw


def test_a_v1_unknown_header_is_read_without_the_hello(
    start_origin: StartOrigin, app: Any, site: dict[str, Path], tmp_path: Path
) -> None:
    """`PROXY UNKNOWN\\r\\n` (an edge's own connection in v1, 15 bytes) used to be read as 16
    bytes: the first byte of the ClientHello went with it and the handshake failed."""
    origin = start_origin(origin_config(site, app.port, tmp_path))
    with tls(connect(origin.port, b"PROXY UNKNOWN\r\n"), site["ca"]) as t:
        assert http_get(t, "/echo").startswith(b"HTTP/1.1 200")


def _hold(port: int, ca: Path, source: str, header: bytes | None, n: int) -> list[ssl.SSLSocket]:
    out = []
    for _ in range(n):
        out.append(tls(connect(port, header, source), ca))
    return out


@pytest.mark.parametrize("listen", ["[::]:0", "0.0.0.0:0"])
def test_ipv4_visitors_of_a_dual_stack_listener_are_counted_apart(
    start_origin: StartOrigin, app: Any, site: dict[str, Path], tmp_path: Path, listen: str
) -> None:
    """atk-trust #8: on `[::]` every IPv4 visitor arrives as ::ffff:a.b.c.d, and the
    per-visitor key made them all one visitor (`::/64`): one visitor holding its share got
    every other IPv4 visitor answered 429."""
    origin = start_origin(
        origin_config(
            site,
            app.port,
            tmp_path,
            proxy_protocol="optional",
            listen=[listen],
            per_client_connections=2,
        )
    )
    ca = site["ca"]
    hog = _hold(origin.port, ca, "127.0.0.5", None, 2)  # its whole share, direct
    try:
        with tls(connect(origin.port, None, "127.0.0.6"), ca) as other:
            assert http_get(other, "/echo").startswith(b"HTTP/1.1 200")
        with tls(connect(origin.port, None, "127.0.0.5"), ca) as third:  # the hog's own third
            assert http_get(third, "/echo").startswith(b"HTTP/1.1 429")
    finally:
        for s in hog:
            s.close()


def test_a_v4_mapped_proxy_claim_is_the_ipv4_visitor(
    start_origin: StartOrigin, app: Any, site: dict[str, Path], tmp_path: Path
) -> None:
    """An edge listening on [::] names IPv4 visitors as ::ffff:a.b.c.d in a TCP6 header: the
    same visitor as a TCP4 header naming a.b.c.d, and not every other IPv4 visitor."""
    origin = start_origin(origin_config(site, app.port, tmp_path, per_client_connections=2))
    ca = site["ca"]
    mapped = encode_v2(("::ffff:203.0.113.7", 40000), ("::ffff:127.0.0.1", 443))
    hog = _hold(origin.port, ca, "127.0.0.1", mapped, 2)
    try:
        other = encode_v2(("::ffff:203.0.113.8", 40000), ("::ffff:127.0.0.1", 443))
        with tls(connect(origin.port, other), ca) as t:
            assert http_get(t, "/echo").startswith(b"HTTP/1.1 200")
        same = encode_v2(("203.0.113.7", 40001), ("127.0.0.1", 443))
        with tls(connect(origin.port, same), ca) as t:
            assert http_get(t, "/echo").startswith(b"HTTP/1.1 429")
    finally:
        for s in hog:
            s.close()
