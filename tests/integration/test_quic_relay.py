"""The edge's QUIC cores on real sockets (tests/helpers/quic_relay.py) in front of the origin
agent: real clients complete HTTP/3 through them with the origin's certificate, the origin
learns each visitor from the relay's authenticated announcements and applies its WAF and bans
per visitor, a hello for an unknown name never reaches the origin, and the relay never holds
the page's plaintext."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.conftest import need
from tests.helpers.h3client import h3_get
from tests.helpers.quic_relay import QuicRelay
from tests.integration.test_h3_origin import EDGE_KEY, SQLI, quic_origin
from tests.integration.test_keyless_browser import spki_pin


@pytest.fixture
def relayed(
    start_origin: Any, app: Any, site: dict[str, Path], tmp_path: Path
) -> Iterator[tuple[Any, QuicRelay]]:
    origin, qport = quic_origin(start_origin, app, site, tmp_path, proxy_protocol="required")
    relay = QuicRelay(("127.0.0.1", qport), EDGE_KEY, {"example.test"})
    yield origin, relay
    relay.close()


def test_h3_through_the_edge_cores(relayed: tuple[Any, QuicRelay], site: dict[str, Path]) -> None:
    origin, relay = relayed
    r = h3_get(relay.port, "/echo", ca=site["ca"], source="127.0.0.20")
    assert r.status == 200
    assert json.loads(r.body)["x-forwarded-for"] == "127.0.0.20"  # the visitor, not the relay
    r = h3_get(relay.port, SQLI, ca=site["ca"], source="127.0.0.21")
    assert r.status == 403
    decision = origin.wait_for(lambda x: x.get("event") == "decision", 5)
    assert decision is not None and decision["value"] == "127.0.0.21"
    assert relay.hellos == ["example.test", "example.test"]
    assert relay.table.stats["flows:accepted"] == 2
    assert origin.metric("blindfold_origin_quic_announcements_total", result="ok") >= 2


def test_a_compatible_version_switch_through_the_edge_cores(
    relayed: tuple[Any, QuicRelay], site: dict[str, Path]
) -> None:
    """The client starts in v1 and prefers v2; the origin switches (RFC 9368) and the relay
    follows the flow into v2."""
    from aioquic.quic.packet import QuicProtocolVersion

    _origin, relay = relayed
    v2 = QuicProtocolVersion.VERSION_2
    r = h3_get(relay.port, "/echo", ca=site["ca"], source="127.0.0.23", prefer=v2)
    assert r.status == 200
    flow = next(iter(relay.table.flows()))
    assert flow.version == QuicProtocolVersion.VERSION_1 and flow.negotiated == v2


def test_unknown_names_never_reach_the_origin(
    relayed: tuple[Any, QuicRelay], site: dict[str, Path]
) -> None:
    origin, relay = relayed
    with pytest.raises((TimeoutError, ConnectionError)):
        h3_get(
            relay.port, "/", ca=site["ca"], source="127.0.0.22", server_name="other.test", timeout=2
        )
    assert relay.table.stats["flows:rejected:unknown_sni"] == 1
    assert relay.table.stats.get("drop:rejected:unknown_sni", 0) >= 1  # retransmissions
    assert origin.metric("blindfold_origin_quic_datagrams_total", result="ok") == 0


def test_chromium_through_the_edge_cores(
    relayed: tuple[Any, QuicRelay], site: dict[str, Path], tmp_path: Path
) -> None:
    browser = shutil.which("chromium") or need("chromium")
    origin, relay = relayed
    out = subprocess.run(
        [
            browser,
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            f"--user-data-dir={tmp_path / 'chromium-profile'}",
            "--host-resolver-rules=MAP example.test 127.0.0.1",
            f"--origin-to-force-quic-on=example.test:{relay.port}",
            f"--ignore-certificate-errors-spki-list={spki_pin(site['cert'])}",
            "--dump-dom",
            f"https://example.test:{relay.port}/",
        ],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert "Hello from the application" in out.stdout, out.stderr[-3000:]
    assert "The origin agent says the visitor is <b>127.0.0.1</b>" in out.stdout
    line = origin.wait_for(lambda r: r.get("event") == "request" and r.get("path") == "/", 5)
    assert line is not None and line["http"] == "3"
    assert relay.hellos and relay.hellos[0] == "example.test"
    # what the relay handled is ciphertext: the page is not in it, nor the site's certificate
    cert = x509.load_pem_x509_certificate(site["cert"].read_bytes())
    seen = bytes(relay.seen)
    assert len(seen) > 5000
    assert b"Hello from the application" not in seen
    assert cert.public_bytes(serialization.Encoding.DER)[:200] not in seen


def test_a_client_changing_its_connection_id_keeps_working(
    relayed: tuple[Any, QuicRelay], site: dict[str, Path]
) -> None:
    """A client may switch to another connection ID of the origin's at any time (RFC 9000
    §5.1.1); IDs sent in NEW_CONNECTION_ID frames are encrypted, so the edge could not follow.
    The origin issues none on flows from an edge: the client keeps the ID the edge knows."""
    import asyncio

    from tests.helpers.h3client import H3Client

    _origin, relay = relayed

    async def run() -> tuple[int, int, int]:
        async with H3Client(relay.port, ca=site["ca"], source="127.0.0.24", timeout=5) as c:
            first = await c.get("/echo")
            assert c.protocol is not None
            spare = len(c.protocol._quic._peer_cid_available)
            c.protocol.change_connection_id()
            second = await c.get("/echo")
            return first.status, second.status, spare

    first, second, spare = asyncio.run(run())
    assert (first, second) == (200, 200)
    assert spare == 0
    assert "unknown_connection" not in relay.drops
