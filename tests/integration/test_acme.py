"""ACME end to end with Debian's pebble and pebble-challtestsrv on loopback.

A passthrough hostname (certificate and key at the origin agent) and a keyless hostname (key
at the key server) each get a certificate through a running edge by tls-alpn-01: pebble
connects to the edge's port offering ALPN acme-tls/1, the edge forwards the hello to the
origin agent in both modes, and the agent answers from the shared challenge directory. curl
then verifies each hostname against pebble's root through the edge. A forced renewal swaps
the certificate while a long download continues on a connection made with the old one; a
renewal that fails (a challenge that fails, the CA down) keeps the old certificate, is
retried, and shows in the metrics and logs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from blindfold import pki
from tests.helpers.clients import curl, wait_until
from tests.helpers.edgeproc import EdgeProcess, OriginProcess, edge_config, route, toml_table
from tests.helpers.keyless import KeylessPki, KeyServerProcess, keyserver_config, make_pki
from tests.helpers.nginx import free_port
from tests.helpers.pebble import Pebble, have_pebble
from tests.helpers.topology import origin_config

pytestmark = pytest.mark.skipif(not have_pebble(), reason="pebble is not installed")

PT = "pt.acme.test"
KL = "kl.acme.test"


@pytest.fixture
def pebble(tmp_path: Path, ca: pki.Issued) -> Iterator[Pebble]:
    p = Pebble(tmp_path, ca=ca)
    yield p
    p.close()


def order_table(prefix: str, o: dict[str, Any]) -> str:
    return f"\n[[{prefix}.acme.orders]]\n" + "".join(
        f"{k} = {json.dumps(v)}\n" for k, v in o.items()
    )


def acme_config(
    prefix: str, pebble: Pebble, work: Path, orders: list[dict[str, Any]], **kw: Any
) -> str:
    values: dict[str, Any] = {
        "directory": pebble.directory,
        "ca_bundle": str(pebble.ca_file),
        "account_key": str(work / f"{prefix}-account.key"),
        "contact": ["mailto:ops@acme.test"],
        "challenge_dir": str(work / "challenges"),
        "retry_initial_s": 0.5,
        "retry_max_s": 2.0,
        "order_timeout_s": 30,
        "request_timeout_s": 10,
    }
    values.update(kw)
    return (
        "\n"
        + toml_table(f"{prefix}.acme", values)
        + "".join(order_table(prefix, o) for o in orders)
    )


def serial_of(pem_path: Path) -> int:
    return x509.load_pem_x509_certificates(pem_path.read_bytes())[0].serial_number


ADMIN_TOKEN = "acme-test-admin-token-0123456789"  # a POST needs one (attack review H)


def post(admin: str, path: str) -> int:
    """POST, again while the answer is 429 (one forced renewal per retry_initial_s)."""
    deadline = time.monotonic() + 10
    while True:
        req = urllib.request.Request(f"http://{admin}{path}", data=b"", method="POST")
        req.add_header("authorization", f"Bearer {ADMIN_TOKEN}")
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as exc:
            if exc.code != 429 or time.monotonic() > deadline:
                return exc.code
        time.sleep(0.1)


def peer_serial(port: int, host: str, root: Path) -> int:
    ctx = ssl.create_default_context(cafile=str(root))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname=host) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


@pytest.fixture
def kpki(tmp_path: Path, ca: pki.Issued) -> KeylessPki:
    return make_pki(tmp_path, ca)


@pytest.fixture
def topology(
    tmp_path: Path,
    pebble: Pebble,
    site: dict[str, Path],
    app: Any,
    kpki: KeylessPki,
    start_edge: Callable[..., EdgeProcess],
    start_origin: Callable[..., OriginProcess],
) -> Iterator[dict[str, Any]]:
    """pebble -> edge (a passthrough and a keyless route) -> origin agent / key server."""
    work = tmp_path / "acme"
    work.mkdir()
    edge_port = free_port()
    pebble.start(edge_port)
    for host in (PT, KL):
        pebble.add_a(host)
    pt = {"hostnames": [PT], "cert": str(work / "pt.pem"), "key": str(work / "pt.key")}
    kl = {"hostnames": [KL], "cert": str(work / "kl.pem"), "key": str(work / "kl.key")}
    token = work / "admin.token"
    token.write_text(ADMIN_TOKEN + "\n")
    token.chmod(0o600)
    origin = start_origin(
        origin_config(site, app.port, tmp_path, admin_token_file=str(token))
        + acme_config("origin", pebble, work, [pt])
    )
    origin.admin_token = ADMIN_TOKEN
    ks_text = keyserver_config(kpki, {"edge1": [KL]}).replace(
        "[keyserver]\n", f'[keyserver]\nadmin_token_file = "{token}"\n', 1
    )
    ks_text += (
        f'\n[[keyserver.keys]]\nname = "acme"\nkey = "{kl["key"]}"\ncertificate = "{kl["cert"]}"\n'
    )
    ks_text += acme_config("keyserver", pebble, work, [kl])
    keyserver = KeyServerProcess(ks_text, tmp_path, name="ks")
    keyserver.admin_token = ADMIN_TOKEN
    try:
        routes = route([PT], [f"127.0.0.1:{origin.port}"], proxy_protocol="v2")
        routes += (
            route(
                [KL],
                [f"127.0.0.1:{origin.port}"],
                mode="keyless",
                certificate=kl["cert"],
                proxy_protocol="v2",
                origin_ca=str(site["ca"]),
                origin_server_name="example.test",
            ).rstrip("\n")
            + "\nkeyserver = "
            + (
                "{ "
                + ", ".join(
                    f"{k} = {json.dumps(v)}"
                    for k, v in {
                        "addresses": [f"127.0.0.1:{keyserver.port}"],
                        "client_cert": str(kpki.dir / "edge1.pem"),
                        "client_key": str(kpki.dir / "edge1.key"),
                        "ca": str(kpki.edge_ca),
                        "server_name": "keyserver.test",
                    }.items()
                )
                + " }\n\n"
            )
        )
        edge = start_edge(
            edge_config(routes, listen=[f"127.0.0.1:{edge_port}"], per_ip_rate_per_s=0)
        )
        yield {
            "edge": edge,
            "origin": origin,
            "keyserver": keyserver,
            "work": work,
            "pt": pt,
            "kl": kl,
        }
    finally:
        keyserver.stop()
        assert not keyserver.tracebacks(), "".join(keyserver.stderr_lines)


def renewed(proc: Any, n: int, timeout: float = 60.0) -> bool:
    ok = wait_until(lambda: len(proc.records("acme_renewed")) >= n, timeout=timeout)
    if not ok:
        for r in proc.records("acme_renewal_failed")[-3:]:
            print(r["reason"], r["error"])
    return ok


def test_passthrough_and_keyless_hostnames_get_certificates_through_the_edge(
    topology: dict[str, Any], pebble: Pebble, tmp_path: Path
) -> None:
    edge: EdgeProcess = topology["edge"]
    origin: OriginProcess = topology["origin"]
    keyserver: KeyServerProcess = topology["keyserver"]
    assert renewed(origin, 1), origin.records("acme_renewal_failed")
    assert renewed(keyserver, 1), keyserver.records("acme_renewal_failed")
    root = pebble.root_pem(tmp_path / "pebble-root.pem")
    # the challenges came through the edge: the origin answered them (both hostnames)
    answered = {r["sni"] for r in origin.records("acme_challenge_answered")}
    assert answered == {PT, KL}
    assert (
        edge.metric("blindfold_keyless_fallbacks_total", route="route1", reason="acme_tls_alpn")
        >= 1
    )
    # the keys stayed where they are used; the edge holds the keyless chain only
    assert (Path(topology["pt"]["key"]).stat().st_mode & 0o777) == 0o600
    assert (Path(topology["kl"]["key"]).stat().st_mode & 0o777) == 0o600

    out = curl(edge.port, PT, root, "-w", "\n%{http_code}", path="/echo")
    assert out.stdout.endswith("\n200"), out.stderr
    # with no challenge pending an acme-tls/1 hello gets nothing: not the site's TLS, not a
    # way around the keyless edge to the application
    for host in (PT, KL):
        ctx = ssl.create_default_context(cafile=str(root))
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.set_alpn_protocols(["acme-tls/1"])
        with (
            socket.create_connection(("127.0.0.1", edge.port), timeout=10) as raw,
            pytest.raises((ssl.SSLError, OSError)),
        ):
            ctx.wrap_socket(raw, server_hostname=host).close()
    assert wait_until(
        lambda: origin.metric("blindfold_origin_connections_total", result="acme_no_challenge") == 2
    )
    # the keyless edge serves the chain the key server obtained (distribution to edges is
    # hsm12's part; here the edge reads the same file and reloads)
    assert edge.reload() is not None
    out = curl(edge.port, KL, root, "-w", "\n%{http_code}", path="/echo")
    assert out.stdout.endswith("\n200"), out.stderr
    assert edge.metric("blindfold_keyless_handshakes_total", route="route1", result="full") >= 1
    assert origin.metric("blindfold_acme_renewals_total", hostname=PT) == 1

    # the key server renews; an edge that still has the previous chain keeps working (the
    # key is the same) until it fetches the new one
    assert post(keyserver.admin, "/acme/renew") == 202
    assert renewed(keyserver, 2)
    out = curl(edge.port, KL, root, "-w", "\n%{http_code}", "--no-sessionid", path="/echo")
    assert out.stdout.endswith("\n200"), out.stdout[-300:] + out.stderr
    assert edge.reload() is not None
    assert peer_serial(edge.port, KL, root) == serial_of(Path(topology["kl"]["cert"]))


def test_forced_renewal_swaps_the_certificate_under_a_long_download(
    topology: dict[str, Any], pebble: Pebble, tmp_path: Path
) -> None:
    edge: EdgeProcess = topology["edge"]
    origin: OriginProcess = topology["origin"]
    assert renewed(origin, 1), origin.records("acme_renewal_failed")
    root = pebble.root_pem(tmp_path / "pebble-root.pem")
    first = serial_of(Path(topology["pt"]["cert"]))
    assert peer_serial(edge.port, PT, root) == first

    total = 48 << 20
    ctx = ssl.create_default_context(cafile=str(root))
    raw = socket.create_connection(("127.0.0.1", edge.port), timeout=30)
    tls = ctx.wrap_socket(raw, server_hostname=PT)
    try:
        der = tls.getpeercert(binary_form=True)
        assert der is not None and x509.load_der_x509_certificate(der).serial_number == first
        tls.sendall(f"GET /bytes?n={total} HTTP/1.1\r\nHost: {PT}\r\n\r\n".encode())
        got = 0
        head = b""
        while b"\r\n\r\n" not in head:
            head += tls.recv(65536)
        got = len(head.partition(b"\r\n\r\n")[2])
        assert head.startswith(b"HTTP/1.1 200")
        while got < (1 << 20):
            got += len(tls.recv(65536))
        # the download is under way on the old certificate's connection: renew now
        assert post(origin.admin, "/acme/renew") == 202
        assert renewed(origin, 2)
        second = serial_of(Path(topology["pt"]["cert"]))
        assert second != first
        assert wait_until(lambda: peer_serial(edge.port, PT, root) == second, timeout=10)
        while got < total:
            chunk = tls.recv(1 << 18)
            assert chunk, f"the old connection ended after {got} of {total} bytes"
            got += len(chunk)
        assert got == total
    finally:
        tls.close()
    assert origin.metric("blindfold_acme_renewals_total", hostname=PT) == 2


def test_failed_renewals_keep_the_old_certificate_and_are_retried(
    topology: dict[str, Any], pebble: Pebble, tmp_path: Path
) -> None:
    edge: EdgeProcess = topology["edge"]
    origin: OriginProcess = topology["origin"]
    assert renewed(origin, 1), origin.records("acme_renewal_failed")
    root = pebble.root_pem(tmp_path / "pebble-root.pem")
    serial = serial_of(Path(topology["pt"]["cert"]))

    def failures(reason: str) -> list[dict[str, Any]]:
        return [r for r in origin.records("acme_renewal_failed") if r["reason"] == reason]

    # 1. a challenge that fails: the CA is sent to an address where nothing answers
    pebble.add_a(PT, "127.0.0.9")
    assert post(origin.admin, "/acme/renew") == 202
    assert wait_until(lambda: len(failures("challenge_failed")) >= 2, timeout=60), origin.records(
        "acme_renewal_failed"
    )
    attempts = [r["attempt"] for r in failures("challenge_failed")]
    assert attempts[:2] == [1, 2]  # retried, with backoff
    assert serial_of(Path(topology["pt"]["cert"])) == serial
    assert peer_serial(edge.port, PT, root) == serial
    assert (
        origin.metric(
            "blindfold_acme_renewal_failures_total", hostname=PT, reason="challenge_failed"
        )
        >= 2
    )

    # 2. the CA down
    pebble.add_a(PT)
    pebble.stop_ca()
    n = len(origin.records("acme_renewal_failed"))
    assert post(origin.admin, "/acme/renew") == 202
    assert wait_until(lambda: len(failures("ca_unreachable")) >= 2, timeout=60), origin.records(
        "acme_renewal_failed"
    )[n:]
    assert (
        origin.metric("blindfold_acme_renewal_failures_total", hostname=PT, reason="ca_unreachable")
        >= 2
    )
    assert peer_serial(edge.port, PT, root) == serial
    out = curl(edge.port, PT, root, "-w", "\n%{http_code}", path="/echo")
    assert out.stdout.endswith("\n200"), out.stderr
    next_at = origin.metric("blindfold_acme_next_renewal_timestamp_seconds", hostname=PT)
    assert time.time() - 5 < next_at < time.time() + 10  # the next retry is scheduled soon

    # 3. the CA is back: the retry succeeds without anyone's help
    pebble.start()
    assert renewed(origin, 2)
    assert serial_of(Path(topology["pt"]["cert"])) != serial


def test_dns01_wildcard_through_the_hook(pebble: Pebble, tmp_path: Path) -> None:
    """dns-01 for a wildcard: the hook sets the TXT record in challtestsrv, pebble reads it."""
    from blindfold.acme.client import AcmeManager
    from blindfold.config.acme import AcmeConfig
    from blindfold.config.schema import build

    pebble.start(free_port())
    work = tmp_path / "dns"
    cfg = build(
        AcmeConfig,
        {
            "directory": pebble.directory,
            "ca_bundle": str(pebble.ca_file),
            "account_key": str(work / "account.key"),
            "challenge": "dns-01",
            "dns_hook": pebble.hook_command(),
            "dns_hook_timeout_s": 20,
            "orders": [
                {
                    "hostnames": ["*.wild.acme.test", "wild.acme.test"],
                    "cert": str(work / "wild.pem"),
                    "key": str(work / "wild.key"),
                }
            ],
        },
    )
    logs: list[tuple[str, dict[str, Any]]] = []
    installed: list[Any] = []
    manager = AcmeManager(cfg, lambda e, **f: logs.append((e, f)), installed.append)
    manager.prepare()

    async def once() -> None:
        await manager._attempt(manager.states[0])

    asyncio.run(once())
    assert installed, logs
    # the account URI is logged for the CAA accounturi= record (attack review certs #1)
    accounts = [f for e, f in logs if e == "acme_account"]
    assert len(accounts) == 1, logs
    assert accounts[0]["account_uri"].startswith("https://"), accounts
    assert f"accounturi={accounts[0]['account_uri']}" in accounts[0]["caa"]
    cert = x509.load_pem_x509_certificates((work / "wild.pem").read_bytes())[0]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"*.wild.acme.test", "wild.acme.test"}
    assert cert.issuer != cert.subject  # pebble's, not the placeholder

    # a hook that fails: the order fails with its exit code, the certificate stays
    bad = build(
        AcmeConfig,
        {
            "directory": pebble.directory,
            "ca_bundle": str(pebble.ca_file),
            "account_key": str(work / "account.key"),
            "challenge": "dns-01",
            "dns_hook": ["/bin/sh", "-c", "echo zone locked >&2; exit 3", "hook"],
            "orders": [
                {
                    "hostnames": ["*.wild.acme.test"],
                    "cert": str(work / "wild.pem"),
                    "key": str(work / "wild.key"),
                }
            ],
        },
    )
    logs.clear()
    failing = AcmeManager(bad, lambda e, **f: logs.append((e, f)), installed.append)
    failing.prepare()
    asyncio.run(failing._attempt(failing.states[0]))
    failed = [f for e, f in logs if e == "acme_renewal_failed"]
    assert failed and failed[0]["reason"] == "dns_hook_failed", logs
    assert "exit code 3" in failed[0]["error"] and "zone locked" in failed[0]["error"]
    assert x509.load_pem_x509_certificates((work / "wild.pem").read_bytes())[0] == cert


def test_the_edge_gets_its_own_blind_cdn_certificate(
    tmp_path: Path,
    pebble: Pebble,
    site: dict[str, Path],
    start_edge: Callable[..., EdgeProcess],
) -> None:
    """A blind route's CDN hostname is the edge's own name: the edge orders its certificate
    (key made and kept at the edge) and answers tls-alpn-01 itself."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    cdn = "cdn.acme.test"
    work = tmp_path / "edge-acme"
    work.mkdir()
    manifest_key = work / "manifest.pub"
    manifest_key.write_bytes(
        Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    )
    edge_port = free_port()
    pebble.start(edge_port)
    pebble.add_a(cdn)
    order = {"hostnames": [cdn], "cert": str(work / "cdn.pem"), "key": str(work / "cdn.key")}
    routes = route(
        [cdn],
        ["127.0.0.1:9"],
        mode="blind",
        certificate=order["cert"],
        key=order["key"],
        origin_ca=str(site["ca"]),
        origin_server_name="example.test",
        blind={"manifest_public_key": str(manifest_key)},
    )
    edge = start_edge(
        edge_config(routes, listen=[f"127.0.0.1:{edge_port}"], per_ip_rate_per_s=0)
        + acme_config("edge", pebble, work, [order])
    )
    assert renewed(edge, 1)
    assert wait_until(lambda: len(edge.records("reloaded")) >= 1, timeout=20)
    assert edge.records("acme_challenge_answered")
    assert (work / "cdn.key").stat().st_mode & 0o777 == 0o600
    root = pebble.root_pem(tmp_path / "pebble-root.pem")
    assert wait_until(lambda: peer_serial(edge.port, cdn, root) == serial_of(work / "cdn.pem"))
    out = curl(edge.port, cdn, root, "-w", "\n%{http_code}", path="/")
    assert out.returncode == 0, out.stderr  # TLS verified against pebble's root
    assert edge.metric("blindfold_acme_renewals_total", hostname=cdn) == 1


def test_demo_with_a_local_acme_ca() -> None:
    """`blindfold demo --acme`: one hostname's certificate from a local pebble, verified by
    curl through the edge (the default demo is unchanged)."""
    import subprocess
    import sys

    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "blindfold",
            "demo",
            "--acme",
            "--self-check",
            "--port",
            str(free_port()),
            "--admin-port",
            str(free_port()),
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert (
        "self-check: a certificate from the local ACME CA, verified through the edge: OK"
        in out.stdout
    )


class _ClockAhead:
    """time with time() moved `offset` seconds ahead; monotonic and the rest are the real ones."""

    def __init__(self, offset: float) -> None:
        self.offset = offset

    def time(self) -> float:
        return time.time() + self.offset

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def test_a_clock_ahead_does_not_make_back_to_back_orders(
    pebble: Pebble, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Attack review certs #4: with the host clock at 80 % of a fresh certificate's lifetime
    every new certificate is due at once; after a success the next order waits at least
    max(1 h, 10 % of the lifetime). Before the floor: 12 orders in 15 s."""
    import blindfold.acme.client as acme_client
    from blindfold.acme.client import AcmeManager
    from blindfold.config.acme import AcmeConfig
    from blindfold.config.schema import build

    pebble.start(free_port())
    work = tmp_path / "storm"
    cfg = build(
        AcmeConfig,
        {
            "directory": pebble.directory,
            "ca_bundle": str(pebble.ca_file),
            "account_key": str(work / "account.key"),
            "challenge": "dns-01",
            "dns_hook": pebble.hook_command(),
            "dns_hook_timeout_s": 20,
            "orders": [
                {
                    "hostnames": ["storm.acme.test"],
                    "cert": str(work / "s.pem"),
                    "key": str(work / "s.key"),
                }
            ],
        },
    )
    logs: list[tuple[str, dict[str, Any]]] = []
    manager = AcmeManager(cfg, lambda e, **f: logs.append((e, f)), lambda o: None)
    manager.prepare()
    asyncio.run(manager._attempt(manager.states[0]))  # the first certificate, real clock
    leaf = x509.load_pem_x509_certificates((work / "s.pem").read_bytes())[0]
    nb, na = leaf.not_valid_before_utc.timestamp(), leaf.not_valid_after_utc.timestamp()
    offset = nb + 0.8 * (na - nb) - time.time()
    logs.clear()
    manager.states[0].not_before = 0.0  # as after a restart: the first order is due at once
    monkeypatch.setattr(acme_client, "time", _ClockAhead(offset))

    async def run_for(seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await manager.run()

    asyncio.run(run_for(8))
    renewed = [f for e, f in logs if e == "acme_renewed"]
    assert len(renewed) == 1, [e for e, _ in logs]
    gap = renewed[0]["next_renewal"] - (time.time() + offset)
    assert gap >= max(3600, 0.1 * (na - nb)) - 60, gap
