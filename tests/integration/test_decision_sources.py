"""Decisions from other sources: Redis shared by several edges and origins, and a real CrowdSec
Local API (Debian's crowdsec) followed as a bouncer."""

from __future__ import annotations

import base64
import json
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from tests.conftest import need
from tests.helpers.clients import curl, wait_until
from tests.helpers.edgeproc import EdgeProcess, edge_config, route
from tests.helpers.nginx import free_port
from tests.helpers.origin import TlsOrigin
from tests.helpers.topology import origin_config

SQLI = "/?id=1%27%20OR%201=1--"
CHANNEL = "blindfold:decisions"


def start_redis(
    workdir: Path, *args: str, tls: bool = False
) -> tuple[subprocess.Popen[bytes], int]:
    """redis-server on 127.0.0.1, no persistence; plain or TLS (server certificate only)."""
    port = free_port()
    listen = ["--port", str(port)]
    if tls:
        listen = ["--port", "0", "--tls-port", str(port), "--tls-auth-clients", "no"]
    proc = subprocess.Popen(
        [
            need("redis-server"),
            *listen,
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
            *args,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    proc.wait(5)
    pytest.fail("redis-server did not start")


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    proc, port = start_redis(tmp_path)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def signer(tmp_path: Path) -> dict[str, Path]:
    """The origin's decision-signing key pair, as PEM files."""
    return write_keypair(tmp_path, "decisions")


def write_keypair(workdir: Path, name: str) -> dict[str, Path]:
    key = Ed25519PrivateKey.generate()
    private, public = workdir / f"{name}.key", workdir / f"{name}.pub"
    private.write_bytes(key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    private.chmod(0o600)
    public.write_bytes(
        key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    )
    return {"private": private, "public": public}


def stored(c: redis.Redis, key: str) -> bytes:
    value = c.get(key)
    assert isinstance(value, bytes), (key, value)
    return value


def redis_decisions(url: str, signer: dict[str, Path], **extra: Any) -> str:
    values = {"redis_url": url, "signer_public_keys": [str(signer["public"])], **extra}
    return "[edge.decisions]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())


def code(edge: EdgeProcess, site: dict[str, Path], path: str, source: str) -> int:
    out = curl(
        edge.port,
        "example.test",
        site["ca"],
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        source=source,
        path=path,
    )
    return int(out.stdout or 0)


def test_two_edges_share_bans_and_rates_through_redis(
    start_edge: Any,
    start_origin: Any,
    app: Any,
    site: dict[str, Path],
    tmp_path: Path,
    redis_url: str,
    signer: dict[str, Path],
) -> None:
    origin = start_origin(
        origin_config(
            site,
            app.port,
            tmp_path,
            decisions={"redis_url": redis_url, "signing_key": str(signer["private"])},
        )
    )
    r = route(["example.test"], [f"127.0.0.1:{origin.port}"], proxy_protocol="v2")
    dec = redis_decisions(redis_url, signer)
    edges = [
        start_edge(edge_config(r, per_ip_rate_per_s=0.1, per_ip_burst=12) + dec) for _ in range(2)
    ]
    for e in edges:
        assert e.wait_for(lambda rec: rec.get("event") == "decisions_source_up", 10)
    a, b = edges
    assert code(b, site, "/echo", "127.0.0.60") == 200
    assert code(a, site, SQLI, "127.0.0.60") == 403  # the attack goes through edge A
    t0 = time.monotonic()
    assert wait_until(lambda: code(b, site, "/echo", "127.0.0.60") == 0, 5)
    assert time.monotonic() - t0 < 2.0  # edge B never saw it, and refuses within 2 s
    assert code(a, site, "/echo", "127.0.0.60") == 0
    assert code(b, site, "/echo", "127.0.0.62") == 200

    # shared per-address rate: 7 connections on each edge stay under each edge's own burst
    # of 12, but 14 pass the shared budget (0.1/s * 10 s + 12 = 13)
    # keep the burst inside one 10 s window: the shared counters are keyed by wall-clock
    # 10 s windows in every edge (redis_bus.RATE_WINDOW_S), a clock this test cannot move,
    # so the event to wait for is the start of a window
    while time.time() % 10 > 4:
        time.sleep(0.2)
    results = [code(e, site, "/echo", "127.0.0.61") for _ in range(7) for e in (a, b)]
    assert results.count(200) >= 13  # the shared budget, at least, was served
    assert wait_until(lambda: code(b, site, "/echo", "127.0.0.61") == 0, 3, 0.3)
    # edge A reads the shared total at its next report (each second): no edge publishes bans
    assert wait_until(lambda: code(a, site, "/echo", "127.0.0.61") == 0, 3, 0.3)
    assert code(b, site, "/echo", "127.0.0.63") == 200
    # edge B refused because of the shared count, never because of its own bucket
    assert b.metric("blindfold_connections_refused_total", reason="per_ip_rate") == 0
    assert b.metric("blindfold_connections_refused_total", reason="banned") >= 1
    assert any(r.get("event") == "shared_rate_exceeded" for e in (a, b) for r in e.records())
    # the edges wrote counters, never decisions: the only decision is the origin's, signed
    c = redis.Redis.from_url(redis_url)
    names = sorted(k.decode() for k in c.scan_iter(match="blindfold:decision:*"))
    assert names == ["blindfold:decision:ip:127.0.0.60"]
    assert stored(c, names[0]).startswith(b"bfd1.")
    # what edges write: their own counters (no user name, no rate_name: "default")
    assert any(c.scan_iter(match="blindfold:rate:default:127.0.0.61:*"))


def test_forged_decisions_on_redis_are_not_believed(
    start_edge: Any,
    start_origin: Any,
    app: Any,
    site: dict[str, Path],
    tmp_path: Path,
    redis_url: str,
    signer: dict[str, Path],
) -> None:
    """Anyone who can write to Redis (every edge can) once banned every visitor of every edge
    with one message: a ban on 0.0.0.0/0."""
    from blindfold.decisions.signed import DecisionSigner

    origin = start_origin(
        origin_config(
            site,
            app.port,
            tmp_path,
            decisions={"redis_url": redis_url, "signing_key": str(signer["private"])},
        )
    )
    text = edge_config(
        route(["example.test"], [f"127.0.0.1:{origin.port}"], proxy_protocol="v2"),
        per_ip_rate_per_s=0,
    ) + redis_decisions(redis_url, signer)
    edge = start_edge(text)
    assert edge.wait_for(lambda rec: rec.get("event") == "decisions_source_up", 10)
    c = redis.Redis.from_url(redis_url)
    until = time.time() + 600
    forged = json.dumps(
        {"scope": "range", "value": "0.0.0.0/0", "type": "ban", "until": until, "origin": "edge"}
    )
    c.set("blindfold:decision:range:0.0.0.0/0", forged, ex=600)
    c.publish(CHANNEL, forged)
    stranger = DecisionSigner(Ed25519PrivateKey.generate())
    c.publish(CHANNEL, stranger.sign("ip", "127.0.0.80", until, time.time(), "not ours"))
    c.publish(CHANNEL, b"[" * 100_000)  # nested deeper than a parser allows
    c.publish(CHANNEL, b"bfd1.\xff\xfe")
    # the origin's own ban still travels, and is the only one believed
    assert code(edge, site, SQLI, "127.0.0.81") == 403
    assert wait_until(lambda: code(edge, site, "/echo", "127.0.0.81") == 0, 5)
    real = stored(c, "blindfold:decision:ip:127.0.0.81").decode()
    magic, signer_id, _payload, signature = real.split(".")
    other = base64.urlsafe_b64encode(
        json.dumps(
            {"scope": "range", "value": "127.0.0.0/16", "until": until, "issued": until}
        ).encode()
    )
    c.publish(CHANNEL, f"{magic}.{signer_id}.{other.decode().rstrip('=')}.{signature}")
    assert wait_until(
        lambda: edge.metric("blindfold_decisions_refused_total", reason="bad_signature") == 1, 5
    )
    assert code(edge, site, "/echo", "127.0.0.82") == 200
    assert code(edge, site, "/echo", "127.0.1.82") == 200
    assert edge.metric("blindfold_decisions_refused_total", reason="unsigned") == 3
    assert edge.metric("blindfold_decisions_refused_total", reason="unknown_signer") == 1
    assert edge.metric("blindfold_decisions_active") == 1
    # an edge starting now reads the keys: the signed ban is believed, the forged one not
    late = start_edge(text)
    assert late.wait_for(lambda rec: rec.get("event") == "decisions_source_up", 10)
    assert wait_until(lambda: code(late, site, "/echo", "127.0.0.81") == 0, 5)
    assert code(late, site, "/echo", "127.0.0.82") == 200
    assert late.metric("blindfold_decisions_refused_total", reason="unsigned") == 1


def test_edges_with_their_own_redis_user_over_tls(
    start_edge: Any,
    start_origin: Any,
    app: Any,
    site: dict[str, Path],
    tmp_path: Path,
    signer: dict[str, Path],
) -> None:
    """docs/decisions.md's ACL, over rediss://: the edge follows decisions and writes its
    rate counters, and can do nothing else."""
    docs = (Path(__file__).resolve().parents[2] / "docs" / "decisions.md").read_text()
    acl = re.search(r"### An ACL for Redis 7.*?```text\n(.*?)```", docs, re.S)
    assert acl is not None
    aclfile = tmp_path / "users.acl"
    aclfile.write_text(
        acl.group(1)
        .replace("ORIGIN-PASSWORD", "origin-secret-0123")
        .replace("EDGE1-PASSWORD", "edge1-secret-0123")
    )
    proc, port = start_redis(
        tmp_path,
        "--aclfile",
        str(aclfile),
        "--tls-cert-file",
        str(site["cert"]),
        "--tls-key-file",
        str(site["key"]),
        tls=True,
    )
    try:
        base = f"@127.0.0.1:{port}/0"
        origin = start_origin(
            origin_config(
                site,
                app.port,
                tmp_path,
                decisions={
                    "redis_url": f"rediss://origin:origin-secret-0123{base}",
                    "redis_ca": str(site["ca"]),
                    "signing_key": str(signer["private"]),
                },
            )
        )
        r = route(["example.test"], [f"127.0.0.1:{origin.port}"], proxy_protocol="v2")
        edge = start_edge(
            edge_config(r, per_ip_rate_per_s=0.1, per_ip_burst=20)
            + redis_decisions(
                f"rediss://edge1:edge1-secret-0123{base}", signer, redis_ca=str(site["ca"])
            )
        )
        assert edge.wait_for(lambda rec: rec.get("event") == "decisions_source_up", 10)
        assert code(edge, site, "/echo", "127.0.0.91") == 200
        assert code(edge, site, SQLI, "127.0.0.90") == 403
        assert wait_until(lambda: code(edge, site, "/echo", "127.0.0.90") == 0, 5)
        as_edge = redis.Redis(
            host="127.0.0.1",
            port=port,
            username="edge1",
            password="edge1-secret-0123",
            ssl=True,
            ssl_ca_certs=str(site["ca"]),
        )
        assert wait_until(
            lambda: any(as_edge.scan_iter(match="blindfold:rate:edge1:127.0.0.91:*")), 5
        )
        assert stored(as_edge, "blindfold:decision:ip:127.0.0.90").startswith(b"bfd1.")
        for forbidden in (
            lambda: as_edge.set("blindfold:decision:range:0.0.0.0/0", "x"),
            lambda: as_edge.delete("blindfold:decision:ip:127.0.0.90"),
            lambda: as_edge.publish(CHANNEL, "x"),
            lambda: as_edge.incrby("blindfold:rate:edge2:127.0.0.91:1", -1000),
            lambda: as_edge.flushall(),
        ):
            with pytest.raises(redis.exceptions.NoPermissionError):
                forbidden()
        assert (
            edge.metric("blindfold_decisions_polls_total", source="redis", result="rate_error") == 0
        )
        as_edge.close()
    finally:
        proc.terminate()
        proc.wait(10)


def test_real_crowdsec_lapi(
    start_edge: Any, origin: TlsOrigin, site: dict[str, Path], tmp_path: Path
) -> None:
    from tests.helpers.crowdsec import CrowdSecLapi

    lapi = CrowdSecLapi(tmp_path / "crowdsec")
    try:
        key = lapi.add_bouncer("blindfold-edge")
        keyfile = tmp_path / "cs.key"
        keyfile.write_text(key)
        text = edge_config(route(["example.test"], [f"127.0.0.1:{origin.port}"]))
        text += (
            f'[edge.decisions]\nurl = "{lapi.url}"\napi_key_file = "{keyfile}"\n'
            "poll_interval_s = 0.5\n"
        )
        edge = start_edge(text)
        assert edge.wait_for(lambda r: r.get("event") == "decisions_source_up", 10)
        assert code(edge, site, "/hello", "127.0.0.7") == 200
        lapi.add_decision("127.0.0.7", duration="5m", reason="crowdsec test")
        lapi.add_decision("127.0.9.0/24", duration="5m", reason="range test")
        assert wait_until(lambda: code(edge, site, "/hello", "127.0.0.7") == 0, 3)
        assert code(edge, site, "/hello", "127.0.9.77") == 0
        assert code(edge, site, "/hello", "127.0.0.8") == 200
        assert edge.metric("blindfold_decisions_active") == 2
        lapi.delete_decision("127.0.0.7")
        assert wait_until(lambda: code(edge, site, "/hello", "127.0.0.7") == 200, 5)
        assert code(edge, site, "/hello", "127.0.9.77") == 0
    finally:
        lapi.stop()
