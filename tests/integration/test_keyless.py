"""Keyless routes end to end on loopback: visitor -> edge (TLS 1.3 ends here; the signature
comes from the key server) -> origin agent (verified TLS, PROXY header) -> application.

Real clients: curl, openssl s_client and Python ssl; Chromium is in test_keyless_browser.py."""

from __future__ import annotations

import json
import re
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from blindfold import pki
from tests.conftest import need
from tests.helpers.clients import curl, wait_until
from tests.helpers.edgeproc import EdgeProcess, OriginProcess, edge_config, route
from tests.helpers.keyless import (
    KeylessPki,
    KeyServerProcess,
    keyserver_config,
    make_pki,
    names_of,
)
from tests.helpers.topology import origin_config


@pytest.fixture
def kpki(tmp_path: Path, ca: pki.Issued) -> KeylessPki:
    return make_pki(tmp_path, ca)


@pytest.fixture
def keyserver(kpki: KeylessPki, tmp_path: Path) -> Iterator[KeyServerProcess]:
    ks = KeyServerProcess(
        keyserver_config(
            kpki,
            {"edge1": names_of("example.test", "rsa.test", "ed.test", "p384.test")},
        ),
        tmp_path,
        name="ks",
    )
    yield ks
    ks.stop()
    assert not ks.tracebacks(), "".join(ks.stderr_lines)


def keyless_route(
    kpki: KeylessPki,
    site: dict[str, Path],
    ks_ports: list[int],
    origin_port: int,
    sni: list[str] | None = None,
    cert: str = "p256",
    **extra: Any,
) -> str:
    values: dict[str, Any] = {
        "mode": "keyless",
        "certificate": str(kpki.sites[cert][0]),
        "proxy_protocol": "v2",
        "origin_ca": str(site["ca"]),
    }
    values.update(extra)
    text = route(
        sni or ["example.test", "*.example.test"],
        [f"127.0.0.1:{origin_port}"],
        **{k: v for k, v in values.items() if v != ""},
    )
    ks = {
        "addresses": [f"127.0.0.1:{p}" for p in ks_ports],
        "client_cert": str(kpki.dir / "edge1.pem"),
        "client_key": str(kpki.dir / "edge1.key"),
        "ca": str(kpki.edge_ca),
        "server_name": "keyserver.test",
    }
    ks_text = "keyserver = { " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in ks.items()) + " }"
    return text.rstrip("\n") + "\n" + ks_text + "\n\n"


@pytest.fixture
def chain(
    start_edge: Callable[..., EdgeProcess],
    start_origin: Callable[..., OriginProcess],
    app: Any,
    site: dict[str, Path],
    tmp_path: Path,
    kpki: KeylessPki,
    keyserver: KeyServerProcess,
) -> Callable[..., tuple[EdgeProcess, OriginProcess]]:
    def make(
        edge_kw: dict[str, Any] | None = None, **route_kw: Any
    ) -> tuple[EdgeProcess, OriginProcess]:
        origin = start_origin(origin_config(site, app.port, tmp_path))
        text = edge_config(
            keyless_route(kpki, site, [keyserver.port], origin.port, **route_kw),
            per_ip_rate_per_s=0,
            **(edge_kw or {}),
        )
        return start_edge(text), origin

    return make


def fetch(
    edge: EdgeProcess,
    kpki: KeylessPki,
    path: str = "/echo",
    *extra: str,
    host: str = "example.test",
    source: str = "127.0.0.1",
) -> tuple[int, str, str]:
    out = curl(
        edge.port,
        host,
        kpki.site_ca,
        "-w",
        "\n%{http_code} %{http_version}",
        *extra,
        source=source,
        path=path,
        timeout=30,
    )
    body, _, tail = out.stdout.rpartition("\n")
    code, _, version = tail.partition(" ")
    return int(code or 0), version, body + out.stderr


def test_curl_http1_and_http2_through_a_keyless_route(
    chain: Any, kpki: KeylessPki, keyserver: KeyServerProcess, app: Any
) -> None:
    edge, _origin = chain()
    for flags, version in ((("--http1.1",), "1.1"), (("--http2",), "2")):
        code, got_version, body = fetch(edge, kpki, "/echo", *flags, source="127.0.0.7")
        assert (code, got_version) == (200, version), body
        seen = json.loads(body)
        assert seen["x-forwarded-for"] == "127.0.0.7"  # the visitor, through edge and origin
    audit = kpki.dir / "audit.log"
    assert wait_until(lambda: audit.exists() and len(audit.read_text().splitlines()) >= 2, 5)
    entries = [json.loads(line) for line in audit.read_text().splitlines()]
    assert {e["claimed"]["client"] for e in entries} == {"127.0.0.7"}
    assert all(e["verified"]["sni"] == "example.test" and e["edge"] == "edge1" for e in entries)
    assert all(e["event"] == "signed" for e in entries)
    assert edge.metric("blindfold_keyless_handshakes_total", route="route0", result="full") == 2
    assert edge.metric("blindfold_keyless_requests_total", route="route0", status="2xx") == 2


def test_openssl_s_client_sees_the_site_certificate_and_tls13(chain: Any, kpki: KeylessPki) -> None:
    edge, _ = chain()
    out = subprocess.run(
        [
            need("openssl"),
            "s_client",
            "-connect",
            f"127.0.0.1:{edge.port}",
            "-servername",
            "www.example.test",
            "-CAfile",
            str(kpki.site_ca),
            "-verify_return_error",
            "-alpn",
            "http/1.1",
            "-quiet",
        ],
        input="GET /echo HTTP/1.1\r\nHost: www.example.test\r\nConnection: close\r\n\r\n",
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert out.returncode == 0, out.stderr
    assert "HTTP/1.1 200" in out.stdout
    brief = subprocess.run(
        [
            need("openssl"),
            "s_client",
            "-connect",
            f"127.0.0.1:{edge.port}",
            "-servername",
            "example.test",
            "-CAfile",
            str(kpki.site_ca),
            "-verify_return_error",
            "-brief",
        ],
        input="",
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert "Protocol version: TLSv1.3" in brief.stderr, brief.stderr
    assert "Verification: OK" in brief.stderr


@pytest.mark.parametrize(
    "suite", ["TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"]
)
@pytest.mark.parametrize("group", ["X25519", "P-256"])
def test_cipher_suites_and_groups(chain: Any, kpki: KeylessPki, suite: str, group: str) -> None:
    edge, _ = chain()
    out = subprocess.run(
        [
            need("openssl"),
            "s_client",
            "-connect",
            f"127.0.0.1:{edge.port}",
            "-servername",
            "example.test",
            "-CAfile",
            str(kpki.site_ca),
            "-verify_return_error",
            "-brief",
            "-ciphersuites",
            suite,
            "-groups",
            group,
        ],
        input="",
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert f"Ciphersuite: {suite}" in out.stderr, out.stderr
    expected = {"X25519": "Server Temp Key: X25519", "P-256": "prime256v1"}[group]
    assert expected in out.stderr, out.stderr


def test_python_ssl_resumes_without_the_key_server(
    chain: Any, kpki: KeylessPki, keyserver: KeyServerProcess
) -> None:
    edge, _ = chain()
    ctx = ssl.create_default_context(cafile=str(kpki.site_ca))

    def one(session: ssl.SSLSession | None) -> tuple[ssl.SSLSession | None, bool]:
        with (
            socket.create_connection(("127.0.0.1", edge.port), timeout=10) as raw,
            ctx.wrap_socket(raw, server_hostname="example.test", session=session) as tls,
        ):
            tls.sendall(b"GET /echo HTTP/1.1\r\nHost: example.test\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
            assert data.startswith(b"HTTP/1.1 200"), data[:200]
            return tls.session, bool(tls.session_reused)

    session, reused = one(None)
    assert not reused and session is not None and session.has_ticket
    signed = edge.metric("blindfold_keyless_handshakes_total", route="route0", result="full")
    _, reused = one(session)
    assert reused
    assert edge.metric("blindfold_keyless_handshakes_total", route="route0", result="resumed") == 1
    assert (
        edge.metric("blindfold_keyless_handshakes_total", route="route0", result="full") == signed
    )  # no new signature
    # tickets are single use: the first one again means a full handshake
    _, reused = one(session)
    assert not reused


@pytest.mark.parametrize(
    "cert,host", [("rsa", "rsa.test"), ("ed", "ed.test"), ("p384", "p384.test")]
)
def test_every_key_type(chain: Any, kpki: KeylessPki, cert: str, host: str) -> None:
    edge, _ = chain(sni=[host], cert=cert, origin_server_name="example.test")
    ctx = ssl.create_default_context(cafile=str(kpki.site_ca))
    with (
        socket.create_connection(("127.0.0.1", edge.port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname=host) as tls,
    ):
        assert tls.version() == "TLSv1.3"
        tls.sendall(f"GET /echo HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        assert tls.recv(100).startswith(b"HTTP/1.1 200")


def test_key_update_both_ways_with_s_client(chain: Any, kpki: KeylessPki) -> None:
    edge, _ = chain()
    proc = subprocess.Popen(
        [
            need("openssl"),
            "s_client",
            "-connect",
            f"127.0.0.1:{edge.port}",
            "-servername",
            "example.test",
            "-CAfile",
            str(kpki.site_ca),
            "-verify_return_error",
            "-alpn",
            "http/1.1",
            "-crlf",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output: list[str] = []
    reader = threading.Thread(
        target=lambda: output.extend(iter(proc.stdout.readline, "")) if proc.stdout else None,
        daemon=True,
    )
    reader.start()

    def printed(text: str) -> bool:
        return any(text in line for line in list(output))

    try:
        assert proc.stdin is not None
        assert wait_until(lambda: printed("Verify return code: 0"), 10)  # handshake done
        proc.stdin.write("K\n")  # KeyUpdate, update_requested: the edge must answer with its own
        proc.stdin.flush()
        assert wait_until(lambda: printed("KEYUPDATE"), 10)  # s_client sent it
        proc.stdin.write("GET /echo HTTP/1.1\nHost: example.test\nConnection: close\n\n")
        proc.stdin.flush()
        # s_client stops at the end of its input: wait for the response before closing it
        assert wait_until(lambda: printed("HTTP/1.1 200"), 10), "".join(output)
        proc.stdin.close()
        proc.wait(15)
        reader.join(5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = "".join(output)
    assert "KEYUPDATE" in out
    assert "HTTP/1.1 200" in out, out  # both sides switched keys and kept talking
    assert wait_until(
        lambda: (
            edge.metric("blindfold_keyless_key_updates_total", route="route0", direction="received")
            == 1
        ),
        5,
    )
    assert edge.metric("blindfold_keyless_key_updates_total", route="route0", direction="sent") == 1


def test_tls12_only_and_hello_retry_clients_are_passed_through(
    chain: Any, kpki: KeylessPki, site: dict[str, Path]
) -> None:
    edge, _ = chain()
    ctx = ssl.create_default_context(cafile=str(site["ca"]))
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    with (
        socket.create_connection(("127.0.0.1", edge.port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="example.test") as tls,
    ):
        assert tls.version() == "TLSv1.2"
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        import hashlib

        # the origin's own certificate: the origin terminated this one with its key
        assert hashlib.sha256(der).hexdigest() == site["fingerprint"].read_text().strip()
        tls.sendall(b"GET /echo HTTP/1.1\r\nHost: example.test\r\nConnection: close\r\n\r\n")
        assert tls.recv(100).startswith(b"HTTP/1.1 200")
    out = subprocess.run(
        [
            need("openssl"),
            "s_client",
            "-connect",
            f"127.0.0.1:{edge.port}",
            "-servername",
            "example.test",
            "-CAfile",
            str(site["ca"]),
            "-verify_return_error",
            "-brief",
            "-groups",
            "ffdhe2048:X25519",
        ],  # a key share only for ffdhe2048: needs HRR
        input="",
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert "Protocol version: TLSv1.3" in out.stderr, out.stderr
    assert (
        edge.metric("blindfold_keyless_fallbacks_total", route="route0", reason="tls12_only") == 1
    )
    assert (
        edge.metric("blindfold_keyless_fallbacks_total", route="route0", reason="needs_hello_retry")
        == 1
    )
    assert edge.metric("blindfold_keyless_handshakes_total", route="route0", result="full") == 0


def test_a_client_without_sni_is_passed_through(
    chain: Any, kpki: KeylessPki, site: dict[str, Path], keyserver: KeyServerProcess
) -> None:
    """The key server authorises on the SNI in the ClientHello and refuses a handshake without
    one, so a default keyless route does not ask: the origin, which has the key, answers."""
    edge, _ = chain(default=True)
    out = subprocess.run(
        [
            need("openssl"),
            "s_client",
            "-connect",
            f"127.0.0.1:{edge.port}",
            "-noservername",
            "-CAfile",
            str(site["ca"]),
            "-brief",
        ],
        input="",
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert "Protocol version: TLSv1.3" in out.stderr, out.stderr
    assert edge.metric("blindfold_keyless_fallbacks_total", route="route0", reason="no_sni") == 1
    assert edge.metric("blindfold_keyless_handshakes_total", route="route0", result="full") == 0
    assert not (kpki.dir / "audit.log").exists() or not (kpki.dir / "audit.log").read_text()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("when_down", ["fail", "passthrough"])
def test_key_server_down_fails_fast_or_falls_back_and_recovers(
    start_edge: Callable[..., EdgeProcess],
    start_origin: Callable[..., OriginProcess],
    app: Any,
    site: dict[str, Path],
    tmp_path: Path,
    kpki: KeylessPki,
    when_down: str,
) -> None:
    port = _free_port()
    ks_text = keyserver_config(kpki, {"edge1": ["example.test", "*.example.test"]}).replace(
        '\nlisten = "127.0.0.1:0"', f'\nlisten = "127.0.0.1:{port}"', 1
    )
    ks = KeyServerProcess(ks_text, tmp_path, name="ks")
    origin = start_origin(origin_config(site, app.port, tmp_path))
    edge = start_edge(
        edge_config(
            keyless_route(kpki, site, [port], origin.port, keyserver_down=when_down),
            per_ip_rate_per_s=0,
            workers=1,
        )
    )
    try:
        assert fetch(edge, kpki)[0] == 200
        ks.stop()
        t0 = time.monotonic()
        code, _, detail = fetch(edge, kpki)
        elapsed = time.monotonic() - t0
        if when_down == "fail":
            assert code == 0 and "internal error" in detail.lower(), detail
            assert elapsed < 2.0  # sign_timeout_s is 1 s; refused connects fail at once
            t0 = time.monotonic()
            assert fetch(edge, kpki)[0] == 0
            assert time.monotonic() - t0 < 0.5  # while it is down: no waiting at all
        else:
            # forwarded untouched: the origin completed the handshake with the real key
            code2, _, _ = fetch(edge, kpki, "/echo", "--cacert", str(site["ca"]))
            assert code2 == 200
            assert (
                edge.metric(
                    "blindfold_keyless_fallbacks_total", route="route0", reason="keyserver_error"
                )
                + edge.metric(
                    "blindfold_keyless_fallbacks_total", route="route0", reason="keyserver_down"
                )
                >= 1
            )
        ks = KeyServerProcess(ks_text, tmp_path, name="ks")
        assert wait_until(
            lambda: (
                fetch(edge, kpki)[0] == 200
                and edge.metric("blindfold_keyless_handshakes_total", route="route0", result="full")
                >= 2
            ),
            10,
            0.3,
        )
    finally:
        ks.stop()


def _get_with_alpn(port: int, alpn: list[str], path: str) -> int | str:
    """A TLS 1.3 GET offering `alpn`: the status, or how the connection failed."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_alpn_protocols(alpn)
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            ctx.wrap_socket(raw, server_hostname="example.test") as tls,
        ):
            tls.sendall(
                f"GET {path} HTTP/1.1\r\nHost: example.test\r\nConnection: close\r\n\r\n".encode()
            )
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
    except (ssl.SSLError, OSError) as exc:
        return type(exc).__name__
    return int(data.split(b" ", 2)[1]) if data else "closed"


def test_acme_tls_alpn_beside_http_does_not_tunnel_past_the_edge(
    chain: Any, kpki: KeylessPki, app: Any
) -> None:
    """Attack review certs #5: a visitor adding acme-tls/1 to its ALPN list was relayed at
    layer 4 to the origin (which served it: no challenge dir), past the path rate limit. The
    edge now relays only a hello offering acme-tls/1 alone, and the origin closes one it
    cannot answer."""
    edge, _ = chain(
        rate_limits=[{"path_prefix": "/signin", "rate_per_s": 0.01, "burst": 1, "name": "login"}]
    )
    before = len(app.seen)
    codes = [_get_with_alpn(edge.port, ["acme-tls/1", "http/1.1"], "/signin") for _ in range(3)]
    assert codes == [200, 429, 429], codes
    assert len(app.seen) - before == 1
    # acme-tls/1 alone (an ACME server) is relayed; the origin has no challenge: it closes
    alone = _get_with_alpn(edge.port, ["acme-tls/1"], "/signin")
    assert not isinstance(alone, int), alone
    assert len(app.seen) - before == 1
    assert (
        edge.metric("blindfold_keyless_fallbacks_total", route="route0", reason="acme_tls_alpn")
        == 1
    )


def test_path_rate_limits(chain: Any, kpki: KeylessPki, app: Any) -> None:
    edge, _ = chain(
        rate_limits=[{"path_prefix": "/signin", "rate_per_s": 0.01, "burst": 2, "name": "login"}]
    )
    before = len(app.seen)
    codes = [fetch(edge, kpki, "/signin", "-o", "/dev/null")[0] for _ in range(3)]
    assert codes == [200, 200, 429]
    out = curl(
        edge.port, "example.test", kpki.site_ca, "-D", "-", "-o", "/dev/null", path="/signin"
    )
    assert re.match(r"HTTP/\S+ 429", out.stdout)
    assert re.search(r"(?i)retry-after: \d+", out.stdout)
    assert fetch(edge, kpki, "/echo", "-o", "/dev/null")[0] == 200  # other paths are free
    assert fetch(edge, kpki, "/signin", "-o", "/dev/null", source="127.0.0.9")[0] == 200
    assert len(app.seen) - before == 4  # refused requests never reached the origin
    assert edge.metric("blindfold_keyless_rate_limited_total", route="route0", rule="login") == 2


def _get(
    edge: EdgeProcess, kpki: KeylessPki, path: str, *headers: str
) -> tuple[int, dict[str, str], str]:
    args = ["-D", "/dev/stderr"]
    for h in headers:
        args += ["-H", h]
    out = curl(edge.port, "example.test", kpki.site_ca, *args, path=path)
    status = int(out.stderr.split()[1]) if out.stderr.startswith("HTTP/") else 0
    head = {
        k.strip().lower(): v.strip()
        for k, _, v in (line.partition(":") for line in out.stderr.splitlines()[1:])
        if v
    }
    return status, head, out.stdout


def test_cache_serves_fresh_revalidates_stale_and_honours_vary(
    chain: Any, kpki: KeylessPki, app: Any
) -> None:
    edge, _ = chain(edge_kw={"workers": 1})  # one worker: one cache to observe

    def origin_hits(path: str) -> int:
        return sum(1 for r in app.seen if r.get("path", "").startswith(path))

    s1, h1, b1 = _get(edge, kpki, "/cached/a")
    s2, h2, b2 = _get(edge, kpki, "/cached/a")
    assert (s1, h1["x-blindfold-cache"], s2, h2["x-blindfold-cache"]) == (200, "miss", 200, "hit")
    assert b1 == b2 and origin_hits("/cached/a") == 1 and "age" in h2
    # a visitor's own validator is answered from the cache
    s3, _, _ = _get(edge, kpki, "/cached/a", f"If-None-Match: {h1['etag']}")
    assert s3 == 304 and origin_hits("/cached/a") == 1
    # stale after max_age: revalidated with the stored ETag (the origin answers 304)
    # (max-age=0: stored, and stale at once; the age arithmetic itself is tested with a
    # controlled clock in tests/unit/test_httpcache.py)
    assert _get(edge, kpki, "/cached/b?max_age=0")[1]["x-blindfold-cache"] == "miss"
    s4, h4, b4 = _get(edge, kpki, "/cached/b?max_age=0")
    assert (s4, h4["x-blindfold-cache"]) == (200, "revalidated") and "cacheable" in b4
    assert origin_hits("/cached/b") == 2
    assert [r.get("if-none-match") for r in app.seen if r.get("path", "").startswith("/cached/b")][
        -1
    ] == h4["etag"]
    # Vary: a different Accept-Language is a different response
    path = "/cached/c?vary=Accept-Language"
    assert _get(edge, kpki, path, "Accept-Language: en")[1]["x-blindfold-cache"] == "miss"
    assert _get(edge, kpki, path, "Accept-Language: en")[1]["x-blindfold-cache"] == "hit"
    assert _get(edge, kpki, path, "Accept-Language: fr")[1]["x-blindfold-cache"] == "miss"
    # no-store requests and uncacheable responses go to the origin every time
    before = origin_hits("/echo")
    _get(edge, kpki, "/echo")
    _get(edge, kpki, "/echo")
    assert origin_hits("/echo") - before == 2
    assert edge.metric("blindfold_keyless_cache_total", route="route0", result="hit") >= 3
    assert edge.metric("blindfold_keyless_cache_bytes", route="route0") > 0


@pytest.mark.parametrize(
    "setting,expect",
    [
        ({"origin_ca": "EDGE_CA"}, 502),  # signed by a CA we do not trust for origins
        ({"origin_ca": "", "origin_pin_sha256": ["00" * 32]}, 502),  # wrong pin
        ({"origin_ca": "", "origin_pin_sha256": ["SITE_FP"]}, 200),  # the right pin
        ({"origin_server_name": "not-the-origin.test"}, 502),  # a name the certificate lacks
    ],
)
def test_origins_are_always_verified(
    chain: Any,
    kpki: KeylessPki,
    app: Any,
    site: dict[str, Path],
    setting: dict[str, Any],
    expect: int,
) -> None:
    values = {k: (str(kpki.edge_ca) if v == "EDGE_CA" else v) for k, v in setting.items()}
    if "origin_pin_sha256" in values:
        values["origin_pin_sha256"] = [
            site["fingerprint"].read_text().strip() if p == "SITE_FP" else p
            for p in values["origin_pin_sha256"]
        ]
    before = len(app.seen)
    edge, _ = chain(**values)
    code, _, body = fetch(edge, kpki, "/echo")
    assert code == expect, body
    assert (len(app.seen) > before) == (expect == 200)
    if expect == 502:
        assert edge.wait_for(lambda r: r.get("event") == "origin_down", 5)


def test_edge_never_opens_a_site_key(
    start_edge: Callable[..., EdgeProcess],
    start_origin: Callable[..., OriginProcess],
    app: Any,
    site: dict[str, Path],
    tmp_path: Path,
    kpki: KeylessPki,
    keyserver: KeyServerProcess,
) -> None:
    origin = start_origin(origin_config(site, app.port, tmp_path))
    trace = tmp_path / "edge.strace"
    edge = start_edge(
        edge_config(keyless_route(kpki, site, [keyserver.port], origin.port), per_ip_rate_per_s=0),
        wrap=[need("strace"), "-f", "-qq", "-e", "trace=open,openat,openat2", "-o", str(trace)],
    )
    for _ in range(3):
        assert fetch(edge, kpki)[0] == 200
    edge.stop()
    opened = trace.read_text()
    assert "edge1.key" in opened  # the edge's own identity towards the key server: yes
    site_keys = [str(k) for _, k, _ in kpki.sites.values()] + [str(site["key"])]
    for path in site_keys:
        assert path not in opened  # a site's private key: never
    assert str(kpki.sites["p256"][0]) in opened  # (the certificate, to be sure tracing worked)


def test_a_key_server_refusal_is_counted_by_its_own_reason(
    chain: Any, kpki: KeylessPki, keyserver: KeyServerProcess
) -> None:
    """The key server says why it did not sign (here: this edge is not authorised for the
    name); the edge counts and logs that reason, not a catch-all."""
    edge, _ = chain(sni=["unlisted.test"])
    code, _, detail = fetch(edge, kpki, host="unlisted.test")
    assert code == 0 and "internal error" in detail.lower(), detail
    result = "keyserver_unauthorized_sni"
    assert wait_until(
        lambda: (
            edge.metric("blindfold_keyless_handshakes_total", route="route0", result=result) == 1
        ),
        5,
    )
    line = edge.wait_for(lambda r: r.get("event") == "keyless_handshake_failed", 5)
    assert line is not None and line["reason"] == result, line
    assert edge.metric("blindfold_keyless_handshakes_total", route="route0", result="full") == 0


def test_a_keyless_route_sets_its_http2_abuse_limits(chain: Any, kpki: KeylessPki) -> None:
    """The HTTP server settings are one table for the origin and edge routes: a route can
    lower the rapid-reset threshold (CVE-2023-44487) like the origin agent can."""
    import h2.config
    import h2.connection
    import h2.events
    import h2.exceptions

    edge, _ = chain(http={"h2_max_resets_per_window": 5})
    ctx = ssl.create_default_context(cafile=str(kpki.site_ca))
    ctx.set_alpn_protocols(["h2"])
    raw = socket.create_connection(("127.0.0.1", edge.port), timeout=10)
    with ctx.wrap_socket(raw, server_hostname="example.test") as tls:
        assert tls.selected_alpn_protocol() == "h2"
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        for sid in range(1, 2 * 10, 2):  # open and cancel at once, 10 times
            head = [(":method", "GET"), (":path", "/echo"), (":scheme", "https")]
            conn.send_headers(sid, [*head, (":authority", "example.test")])
            conn.reset_stream(sid)
        tls.sendall(conn.data_to_send())
        code = None
        try:
            while code is None and (data := tls.recv(65536)):
                for e in conn.receive_data(data):
                    if isinstance(e, h2.events.ConnectionTerminated):
                        code = e.error_code
        except (OSError, h2.exceptions.ProtocolError):
            pass
    assert code == 0xB  # ENHANCE_YOUR_CALM
    assert edge.wait_for(lambda r: r.get("event") == "h2_abuse", 5) is not None


def test_a_host_outside_the_route_is_misdirected(chain: Any, kpki: KeylessPki, app: Any) -> None:
    edge, _ = chain(sni=["example.test"])
    before = len(app.seen)
    code, _, _ = fetch(edge, kpki, "/echo", "-H", "Host: other.test")
    assert code == 421 and len(app.seen) == before


def test_reload_keeps_sessions_and_applies_new_limits(
    chain: Any, kpki: KeylessPki, keyserver: KeyServerProcess, site: dict[str, Path]
) -> None:
    edge, origin = chain(edge_kw={"workers": 1})
    ctx = ssl.create_default_context(cafile=str(kpki.site_ca))

    def one(
        session: ssl.SSLSession | None, path: str = "/echo"
    ) -> tuple[ssl.SSLSession | None, bool, bytes]:
        with (
            socket.create_connection(("127.0.0.1", edge.port), timeout=10) as raw,
            ctx.wrap_socket(raw, server_hostname="example.test", session=session) as tls,
        ):
            tls.sendall(
                f"GET {path} HTTP/1.1\r\nHost: example.test\r\nConnection: close\r\n\r\n".encode()
            )
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
            return tls.session, bool(tls.session_reused), data

    session, _, _ = one(None)
    edge.write_config(
        edge_config(
            keyless_route(
                kpki,
                site,
                [keyserver.port],
                origin.port,
                rate_limits=[{"path_prefix": "/limited", "rate_per_s": 0.01, "burst": 1}],
            ),
            per_ip_rate_per_s=0,
            workers=1,
        )
    )
    done = edge.reload()
    assert done is not None and done["event"] == "reloaded", done
    _, reused, data = one(session, "/limited")
    assert reused  # the session store survived the reload
    assert data.startswith(b"HTTP/1.1 200")
    assert one(None, "/limited")[2].startswith(b"HTTP/1.1 429")  # the new limit applies


def test_a_passthrough_edge_gains_a_keyless_route_by_reload(
    start_edge: Callable[..., EdgeProcess],
    start_origin: Callable[..., OriginProcess],
    app: Any,
    site: dict[str, Path],
    tmp_path: Path,
    kpki: KeylessPki,
    keyserver: KeyServerProcess,
) -> None:
    origin = start_origin(origin_config(site, app.port, tmp_path))
    edge = start_edge(
        edge_config(
            route(["example.test"], [f"127.0.0.1:{origin.port}"], proxy_protocol="v2"),
            per_ip_rate_per_s=0,
        )
    )
    assert fetch(edge, kpki, "/echo", "--cacert", str(site["ca"]))[0] == 200
    edge.write_config(
        edge_config(keyless_route(kpki, site, [keyserver.port], origin.port), per_ip_rate_per_s=0)
    )
    done = edge.reload(timeout=30)
    assert done is not None and done["event"] == "reloaded", done
    assert wait_until(lambda: fetch(edge, kpki)[0] == 200, 10)
    assert edge.metric("blindfold_keyless_handshakes_total", route="route0", result="full") >= 1


def test_the_origin_waf_bans_a_keyless_visitor_at_the_edge(
    start_edge: Callable[..., EdgeProcess],
    start_origin: Callable[..., OriginProcess],
    app: Any,
    site: dict[str, Path],
    tmp_path: Path,
    kpki: KeylessPki,
    keyserver: KeyServerProcess,
) -> None:
    from tests.helpers.topology import edge_decisions

    origin = start_origin(origin_config(site, app.port, tmp_path))
    edge = start_edge(
        edge_config(keyless_route(kpki, site, [keyserver.port], origin.port), per_ip_rate_per_s=0)
        + edge_decisions(site, origin.decisions_port, tmp_path)
    )
    assert edge.wait_for(lambda r: r.get("event") == "decisions_source_up", 10)
    code, _, body = fetch(edge, kpki, "/?id=1%27%20OR%201=1--", source="127.0.0.5")
    assert code == 403, body  # the origin's WAF saw the keyless visitor's real address...
    assert wait_until(lambda: fetch(edge, kpki, source="127.0.0.5")[0] == 0, 5, 0.1)
    assert fetch(edge, kpki, source="127.0.0.6")[0] == 200  # ...and the edge bans only it
    assert edge.metric("blindfold_connections_refused_total", reason="banned") >= 1
