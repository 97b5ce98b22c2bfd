"""The origin agent's edges under attack: connection slots given back on every path (issue 8
finding 2), the decision stream's own limit, certificate and pre-TLS address check (issue 15
finding 8), per-visitor shares (issue 15 finding 2) and running out of descriptors (issue 15
finding 11). Real processes, real TLS clients, PROXY v2 headers from a trusted address."""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from blindfold.core.proxyproto import encode_v2
from tests.conftest import DECISIONS_NAME
from tests.helpers.clients import http_get, wait_until
from tests.helpers.edgeproc import OriginProcess
from tests.helpers.topology import API_KEY, origin_config
from tests.helpers.wsgiapp import WsgiApp


@pytest.fixture
def wsgi() -> Iterator[WsgiApp]:
    a = WsgiApp()
    yield a
    a.close()


LOCAL = "local"  # a PROXY v2 LOCAL header: the edge's own connection


def proxied(
    port: int, visitor: str | None, *, source: str = "127.0.0.1", timeout: float = 10
) -> socket.socket:
    """A TCP connection to the origin that starts with a PROXY v2 header naming `visitor`
    (LOCAL: a LOCAL header; None: no header)."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source, 0))
    if visitor == LOCAL:
        raw.sendall(encode_v2(None, None))
    elif visitor is not None:
        raw.sendall(encode_v2((visitor, 40000), ("127.0.0.1", 443)))
    return raw


def tls(
    raw: socket.socket, ca: Path, name: str = "example.test", alpn: list[str] | None = None
) -> ssl.SSLSocket:
    ctx = ssl.create_default_context(cafile=str(ca))
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx.wrap_socket(raw, server_hostname=name)


def site_get(port: int, ca: Path, visitor: str, path: str = "/echo") -> bytes:
    try:
        with tls(proxied(port, visitor), ca) as t:
            return http_get(t, path)
    except (OSError, ssl.SSLError):
        return b""


def stream_get(port: int, ca: Path, source: str = "127.0.0.1") -> bytes:
    """The decision stream, as an edge polls it."""
    try:
        with tls(proxied(port, None, source=source), ca, DECISIONS_NAME) as t:
            t.sendall(
                b"GET /v1/decisions/stream?startup=true HTTP/1.1\r\nHost: "
                + DECISIONS_NAME.encode()
                + b"\r\nX-Api-Key: "
                + API_KEY.encode()
                + b"\r\nConnection: close\r\n\r\n"
            )
            data = b""
            while chunk := t.recv(65536):
                data += chunk
            return data
    except (OSError, ssl.SSLError):
        return b""


def wait_closed(socks: Sequence[socket.socket], timeout: float) -> bool:
    """Every socket was closed by the server (EOF or reset) within `timeout`."""
    deadline = time.monotonic() + timeout
    for s in socks:
        s.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            while s.recv(4096):
                pass
        except TimeoutError:
            return False
        except OSError:
            pass
    return True


def test_failed_handshakes_give_their_slots_back(
    start_origin: Callable[..., OriginProcess], wsgi: WsgiApp, site: dict[str, Path], tmp_path: Path
) -> None:
    """Issue 8 finding 2: 21 bare or garbage connections to the decisions port made a site with
    max_connections = 20 refuse everyone until restart."""
    origin = start_origin(
        origin_config(
            site,
            wsgi.port,
            tmp_path,
            max_connections=20,
            http={"tls_handshake_timeout_s": 1.0},
        )
    )
    ca = site["ca"]
    garbage: list[socket.socket] = []
    for i in range(25):
        s = proxied(origin.decisions_port, None)
        s.sendall(b"\x16\x03\x01\x00\x05hello" if i % 2 else b"GET / HTTP/1.0\r\n\r\n")
        garbage.append(s)
    silent = [proxied(origin.decisions_port, None) for _ in range(25)]  # handshake times out
    assert wait_closed(garbage, 10)
    assert wait_closed(silent, 10)
    for _ in range(3):  # 30 failed handshakes on the site's listener, 10 at a time
        site_garbage = [proxied(origin.port, "203.0.113.1") for _ in range(10)]
        for s in site_garbage:
            s.sendall(b"\x16\x03\x01\x00\x05hello")
        assert wait_closed(site_garbage, 10)
    assert wait_until(lambda: origin.metric("blindfold_origin_connections_active") == 0, 5)
    assert wait_until(
        lambda: origin.metric("blindfold_origin_decisions_connections_active") == 0, 5
    )
    assert site_get(origin.port, ca, "198.51.100.1").startswith(b"HTTP/1.1 200")
    assert stream_get(origin.decisions_port, ca).startswith(b"HTTP/1.1 200")
    assert origin.metric("blindfold_origin_connections_total", result="decisions_tls_failed") > 0


def test_the_decision_stream_has_a_limit_of_its_own(
    start_origin: Callable[..., OriginProcess], wsgi: WsgiApp, site: dict[str, Path], tmp_path: Path
) -> None:
    origin = start_origin(
        origin_config(
            site, wsgi.port, tmp_path, max_connections=5, decisions={"max_connections": 3}
        )
    )
    held = [proxied(origin.decisions_port, None) for _ in range(10)]
    try:
        assert wait_until(
            lambda: (
                origin.metric(
                    "blindfold_origin_connections_total",
                    result="decisions_refused_max_connections",
                )
                == 7
            ),
            5,
        )
        assert origin.metric("blindfold_origin_decisions_connections_active") == 3
        assert site_get(origin.port, site["ca"], "198.51.100.2").startswith(b"HTTP/1.1 200")
    finally:
        for s in held:
            s.close()


def _peer_certificate(port: int, source: str) -> bytes | None:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    raw = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    try:
        with ctx.wrap_socket(raw, server_hostname="example.test") as t:
            return t.getpeercert(binary_form=True)
    except (OSError, ssl.SSLError):
        return None
    finally:
        raw.close()


def test_the_decision_stream_shows_strangers_no_certificate(
    start_origin: Callable[..., OriginProcess], wsgi: WsgiApp, site: dict[str, Path], tmp_path: Path
) -> None:
    """Issue 15 finding 8: the decisions port handed the site's certificate to anyone, so
    certificate scanners mapped the site's name to its origin address."""
    from cryptography import x509

    origin = start_origin(origin_config(site, wsgi.port, tmp_path))
    assert _peer_certificate(origin.decisions_port, "127.0.0.9") is None  # not an edge
    der = _peer_certificate(origin.decisions_port, "127.0.0.1")  # a trusted edge
    assert der is not None
    san = x509.load_der_x509_certificate(der).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert san.value.get_values_for_type(x509.DNSName) == [DECISIONS_NAME]
    assert (
        origin.metric(
            "blindfold_origin_connections_total", result="decisions_refused_untrusted_peer"
        )
        == 1
    )


def test_one_visitor_cannot_hold_the_origins_connections(
    start_origin: Callable[..., OriginProcess], wsgi: WsgiApp, site: dict[str, Path], tmp_path: Path
) -> None:
    """Issue 15 finding 2: visitors holding ~100 origin connections each made the origin refuse
    an innocent one."""
    origin = start_origin(
        origin_config(site, wsgi.port, tmp_path, max_connections=12, per_client_connections=4)
    )
    ca = site["ca"]
    served: list[ssl.SSLSocket] = []
    refused_before_tls = 0
    for _ in range(12):
        raw = proxied(origin.port, "203.0.113.7")
        try:
            served.append(tls(raw, ca))
        except (OSError, ssl.SSLError):
            raw.close()
            refused_before_tls += 1
    try:
        assert refused_before_tls == 4  # beyond twice the share: closed at once
        replies = [http_get(t, "/echo", keep_alive=True) for t in served]
        assert [r[:12] for r in replies] == [b"HTTP/1.1 200"] * 4 + [b"HTTP/1.1 429"] * 4
        assert all(b"retry-after: 1" in r.lower() for r in replies[4:])
        assert wait_closed(served[4:], 5)  # the over-share ones do not stay
        # an innocent visitor is served while the attacker holds its share
        assert site_get(origin.port, ca, "198.51.100.3").startswith(b"HTTP/1.1 200")
        # an edge's own connection (PROXY LOCAL) is not the attacker's
        with tls(proxied(origin.port, LOCAL), ca) as t:
            assert http_get(t, "/echo").startswith(b"HTTP/1.1 200")
    finally:
        for t in served:
            t.close()
    assert wait_until(lambda: origin.metric("blindfold_origin_connections_active") == 0, 5)
    assert site_get(origin.port, ca, "203.0.113.7").startswith(b"HTTP/1.1 200")  # released


def test_one_visitor_cannot_hold_the_applications_requests(
    start_origin: Callable[..., OriginProcess], wsgi: WsgiApp, site: dict[str, Path], tmp_path: Path
) -> None:
    origin = start_origin(
        origin_config(site, wsgi.port, tmp_path, per_client_requests=2, access_log=False)
    )
    ca = site["ca"]
    replies: list[bytes] = []

    def slow() -> None:
        replies.append(site_get(origin.port, ca, "203.0.113.8", "/slow"))

    threads = [threading.Thread(target=slow) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        assert wait_until(lambda: len(replies) == 2, 10)  # two answered 429 at once
        assert all(r.startswith(b"HTTP/1.1 429") for r in replies)
        assert wsgi.waiting == 2
        assert site_get(origin.port, ca, "198.51.100.4").startswith(b"HTTP/1.1 200")
    finally:
        wsgi.release.set()
        for t in threads:
            t.join(20)
    assert sorted(r[:12] for r in replies) == [b"HTTP/1.1 200"] * 2 + [b"HTTP/1.1 429"] * 2


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_running_out_of_descriptors_pauses_accepting_and_recovers(
    wsgi: WsgiApp, site: dict[str, Path], tmp_path: Path
) -> None:
    """Issue 15 finding 11 and issue 8 finding 2: EMFILE at accept must neither spin nor end
    an accept loop (the decision stream's ended for good)."""
    limit = 96
    origin = OriginProcess(
        origin_config(
            site,
            wsgi.port,
            tmp_path,
            proxy_header_timeout_s=60,
            http={"tls_handshake_timeout_s": 60},
        ),
        tmp_path,
        name="origin-fds",
        wrap=["prlimit", f"--nofile={limit}:{limit}", "--"],
    )
    held: list[socket.socket] = []
    try:
        pid = origin.ready["pid"]
        warning = origin.wait_for(lambda r: r.get("event") == "fd_limit_low", 5)
        assert warning is not None and warning["limit"] == limit
        # fill the descriptor table with connections that say nothing
        for _ in range(limit - _open_fds(pid) + 10):
            held.append(proxied(origin.port, None))
        assert origin.wait_for(lambda r: r.get("event") == "accept_paused", 10) is not None
        held += [proxied(origin.decisions_port, None) for _ in range(5)]  # EMFILE there too
        host, _, port = origin.admin.rpartition(":")
        held.append(socket.create_connection((host, int(port)), timeout=5))  # and at the admin
        time.sleep(0.5)  # let both listeners run into the limit
        before = _cpu_s(pid)
        time.sleep(1.0)
        assert _cpu_s(pid) - before < 0.25, "the agent spins while out of descriptors"
        for s in held:
            s.close()
        held.clear()
        assert origin.metric("blindfold_origin_connections_total", result="refused_fd_limit") > 0
        assert wait_until(
            lambda: site_get(origin.port, site["ca"], "198.51.100.5").startswith(b"HTTP/1.1 200"),
            10,
        )
        assert wait_until(
            lambda: stream_get(origin.decisions_port, site["ca"]).startswith(b"HTTP/1.1 200"), 10
        )
    finally:
        for s in held:
            with contextlib.suppress(OSError):
                s.close()
        origin.stop()
    assert not origin.tracebacks(), "".join(origin.stderr_lines)
    # the site's listener ran out in the worker; the admin listener and the decision stream
    # are the master's, whose table the visitors' connections do not fill (origin.master)
    paused = origin.records("accept_paused")
    assert {r["process"] for r in paused} == {"origin-worker-0"}, paused


def test_listening_everywhere_is_logged(
    start_origin: Callable[..., OriginProcess], wsgi: WsgiApp, site: dict[str, Path], tmp_path: Path
) -> None:
    token = tmp_path / "admin.token"  # off loopback the admin listener needs one (issue 13)
    token.write_text("0123456789abcdef-admin\n")
    token.chmod(0o600)
    origin = start_origin(
        origin_config(
            site, wsgi.port, tmp_path, admin_listen="0.0.0.0:0", admin_token_file=str(token)
        )
    )
    warnings = [r["problem"] for r in origin.records("config_warning")]
    assert any("origin.admin_listen" in w for w in warnings), warnings


def test_an_edges_own_requests_are_not_one_visitors_share(
    start_origin: Callable[..., OriginProcess], wsgi: WsgiApp, site: dict[str, Path], tmp_path: Path
) -> None:
    """atk-visitor #1 (origin side): an edge's own connections (PROXY LOCAL: its blind pulls
    for every visitor) were counted as one visitor's requests, so per_client_requests let one
    visitor's pulls make the edge's pulls for everyone else wait for 429s."""
    origin = start_origin(
        origin_config(site, wsgi.port, tmp_path, per_client_requests=2, access_log=False)
    )
    ca = site["ca"]
    replies: list[bytes] = []

    def pull() -> None:
        try:
            with tls(proxied(origin.port, LOCAL), ca) as t:
                replies.append(http_get(t, "/slow"))
        except (OSError, ssl.SSLError):
            replies.append(b"")

    threads = [threading.Thread(target=pull) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        assert wait_until(lambda: wsgi.waiting == 4, 10), (wsgi.waiting, replies)
        assert replies == []
    finally:
        wsgi.release.set()
        for t in threads:
            t.join(20)
    assert [r[:12] for r in replies] == [b"HTTP/1.1 200"] * 4
