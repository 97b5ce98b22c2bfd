"""Authenticated PROXY headers, edge side: an edge with `proxy_auth_name` and
`proxy_auth_key_file` authenticates each header it sends for the very connection it sends it
on (passthrough: every connect attempt; keyless and blind: every origin connection, the
edge's own pulls included), so an origin that requires it serves the edge, and a box on the
path that rewrites the visitor's address is refused (the origin side: test_origin_trust)."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from blindfold import pki
from tests.helpers.clients import curl
from tests.helpers.edgeproc import EdgeProcess, OriginProcess, edge_config, route
from tests.helpers.keyless import KeylessPki, KeyServerProcess
from tests.helpers.topology import origin_config
from tests.integration.test_blind import Site, blind_site  # noqa: F401
from tests.integration.test_keyless import keyless_route, keyserver, kpki  # noqa: F401

EDGE_KEY = bytes(range(1, 33))
VISITOR = "127.0.0.23"


def _key(tmp_path: Path) -> Path:
    keyfile = tmp_path / "edge1.proxy-key"
    keyfile.write_text(EDGE_KEY.hex() + "\n")
    keyfile.chmod(0o600)
    return keyfile


def _edges(keyfile: Path) -> str:
    return (
        "\n[[origin.edges]]\n"
        'name = "edge1"\n'
        'addresses = ["127.0.0.1/32"]\n'
        f"proxy_auth_key_file = {json.dumps(str(keyfile))}\n"
    )


def _auth(keyfile: Path) -> dict[str, Any]:
    return {"proxy_auth_name": "edge1", "proxy_auth_key_file": str(keyfile)}


def _refused(origin: OriginProcess) -> float:
    return sum(
        origin.metric("blindfold_origin_connections_total", result=f"refused_proxy_auth_{r}")
        for r in ("missing", "bad", "stale", "unknown_edge", "replayed")
    )


def test_passthrough_and_blind_pulls_authenticate_their_headers(
    blind_site: Callable[..., Site],  # noqa: F811
    tmp_path: Path,
) -> None:
    keyfile = _key(tmp_path)
    s = blind_site(
        origin_kw={"trusted_edges": []},
        origin_tail=_edges(keyfile),
        route_kw=_auth(keyfile),
        cache_dir="",
    )
    # the manifest and page through the passthrough route, the blobs pulled by the edge
    r, got = s.fetch("/img/photo.bin")
    assert r.returncode == 0 and "from the edge" in r.stdout, (r.stdout, r.stderr)
    assert got == s.files["/img/photo.bin"]
    assert s.edge.metric("blindfold_blind_requests_total", route="route1", result="miss") >= 1
    assert _refused(s.origin) == 0
    line = s.origin.wait_for(lambda rec: rec.get("event") == "request" and rec.get("edge"))
    assert line is not None and line["edge"] == "edge1"


def test_keyless_origin_connections_authenticate_their_headers(
    start_edge: Callable[..., EdgeProcess],
    start_origin: Callable[..., OriginProcess],
    app: Any,
    site: dict[str, Path],
    tmp_path: Path,
    kpki: KeylessPki,  # noqa: F811
    keyserver: KeyServerProcess,  # noqa: F811
) -> None:
    keyfile = _key(tmp_path)
    origin = start_origin(
        origin_config(site, app.port, tmp_path, trusted_edges=[]) + _edges(keyfile)
    )
    edge = start_edge(
        edge_config(
            keyless_route(kpki, site, [keyserver.port], origin.port, **_auth(keyfile)),
            per_ip_rate_per_s=0,
        )
    )
    out = curl(
        edge.port,
        "example.test",
        kpki.site_ca,
        "-w",
        "\n%{http_code}",
        source=VISITOR,
        path="/echo",
        timeout=30,
    )
    assert out.stdout.rpartition("\n")[2] == "200", out
    assert _refused(origin) == 0
    line = origin.wait_for(lambda rec: rec.get("event") == "request" and rec.get("edge"))
    assert line is not None and (line["edge"], line["client"]) == ("edge1", VISITOR)


class RewritingRelay:
    """A box on the path between edge and origin: it relays TCP and writes another source
    address into the PROXY v2 header (TCP4) on its way."""

    def __init__(self, target: int, address: str = "203.0.113.77") -> None:
        self.target, self.address = target, socket.inet_aton(address)
        self.lsock = socket.create_server(("127.0.0.1", 0))
        self.lsock.settimeout(0.2)
        self.port = self.lsock.getsockname()[1]
        self.rewritten = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                client, _ = self.lsock.accept()
            except TimeoutError:
                continue
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        client.settimeout(10)
        try:
            upstream = socket.create_connection(("127.0.0.1", self.target), timeout=10)
            head = b""
            while len(head) < 16:
                more = client.recv(16 - len(head))
                if not more:
                    return
                head += more
            need = 16 + int.from_bytes(head[14:16], "big")
            data = bytearray(head)
            while len(data) < need:
                more = client.recv(need - len(data))
                if not more:
                    return
                data += more
            if data[13] == 0x11:  # TCP over IPv4: the source address at 16..20
                data[16:20] = self.address
                self.rewritten += 1
            upstream.sendall(data)
            pump = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
            pump.start()
            _pump(client, upstream)
            pump.join(10)
        except OSError:
            pass
        finally:
            client.close()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.lsock.close()


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass


@pytest.fixture
def relay_to() -> Iterator[Callable[[int], RewritingRelay]]:
    made: list[RewritingRelay] = []

    def make(port: int) -> RewritingRelay:
        made.append(RewritingRelay(port))
        return made[-1]

    yield make
    for r in made:
        r.close()


def test_a_relay_that_rewrites_the_visitor_address_is_refused(
    start_edge: Callable[..., EdgeProcess],
    start_origin: Callable[..., OriginProcess],
    app: Any,
    site: dict[str, Path],
    tmp_path: Path,
    ca: pki.Issued,
    relay_to: Callable[[int], RewritingRelay],
) -> None:
    keyfile = _key(tmp_path)
    origin = start_origin(
        origin_config(site, app.port, tmp_path, trusted_edges=[]) + _edges(keyfile)
    )
    relay = relay_to(origin.port)
    edge = start_edge(
        edge_config(
            route(
                ["example.test"],
                [f"127.0.0.1:{origin.port}"],
                proxy_protocol="v2",
                **_auth(keyfile),
            )
            + route(
                ["via.example.test"],
                [f"127.0.0.1:{relay.port}"],
                proxy_protocol="v2",
                **_auth(keyfile),
            ),
            per_ip_rate_per_s=0,
        )
    )
    direct = curl(
        edge.port, "example.test", site["ca"], "-w", "\n%{http_code}", source=VISITOR, path="/echo"
    )
    assert direct.stdout.rpartition("\n")[2] == "200", direct
    # (-k: the origin's certificate names example.test; the header is refused before TLS)
    via = curl(
        edge.port,
        "via.example.test",
        site["ca"],
        "-k",
        "-w",
        "\n%{http_code}",
        source=VISITOR,
        path="/echo",
    )
    assert relay.rewritten == 1
    assert via.stdout.rpartition("\n")[2] != "200", via
    assert origin.metric("blindfold_origin_connections_total", result="refused_proxy_auth_bad") == 1
    served = [r.get("client") for r in origin.records() if r.get("event") == "request"]
    assert "203.0.113.77" not in served
