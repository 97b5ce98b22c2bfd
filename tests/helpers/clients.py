"""Real TLS clients for tests: Python ssl, curl and openssl s_client, from chosen source
addresses on 127.0.0.0/8."""

from __future__ import annotations

import socket
import ssl
import subprocess
import time
from pathlib import Path

from tests.conftest import need


def tls_connect(
    port: int,
    sni: str | None,
    ca: Path | None,
    *,
    source: str = "127.0.0.1",
    timeout: float = 10.0,
    alpn: list[str] | None = None,
) -> ssl.SSLSocket:
    ctx = ssl.create_default_context(cafile=str(ca) if ca else None)
    if ca is None or sni is None:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE if ca is None else ssl.CERT_REQUIRED
    if alpn:
        ctx.set_alpn_protocols(alpn)
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source, 0))
    try:
        return ctx.wrap_socket(raw, server_hostname=sni)
    except BaseException:
        raw.close()
        raise


def http_get(
    tls: ssl.SSLSocket, path: str = "/hello", host: str = "example.test", keep_alive: bool = False
) -> bytes:
    conn = "keep-alive" if keep_alive else "close"
    tls.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: {conn}\r\n\r\n".encode())
    data = b""
    while True:
        chunk = tls.recv(65536)
        if not chunk:
            break
        data += chunk
        head, sep, body = data.partition(b"\r\n\r\n")
        if sep and keep_alive:
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:") and len(body) >= int(
                    line.split(b":")[1]
                ):
                    return data
    return data


def get(
    port: int,
    sni: str = "example.test",
    ca: Path | None = None,
    *,
    source: str = "127.0.0.1",
    path: str = "/hello",
) -> bytes:
    with tls_connect(port, sni, ca, source=source) as tls:
        return http_get(tls, path, sni)


def curl(
    port: int,
    sni: str,
    ca: Path,
    *args: str,
    source: str = "127.0.0.1",
    path: str = "/hello",
    timeout: float = 30,
) -> subprocess.CompletedProcess[str]:
    """curl https://SNI:PORT/PATH through 127.0.0.1 from `source`; more URLs may be added with
    --url in args."""
    return subprocess.run(
        [
            need("curl"),
            "-sS",
            "--max-time",
            str(int(timeout) - 5),
            "--cacert",
            str(ca),
            "--interface",
            source,
            "--resolve",
            f"{sni}:{port}:127.0.0.1",
            f"https://{sni}:{port}{path}",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def s_client(
    port: int, sni: str, ca: Path, timeout: float = 15
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            need("openssl"),
            "s_client",
            "-connect",
            f"127.0.0.1:{port}",
            "-servername",
            sni,
            "-CAfile",
            str(ca),
            "-verify_return_error",
            "-showcerts",
            "-brief",
        ],
        input="",
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def wait_until(pred, timeout: float = 10.0, interval: float = 0.05) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return bool(pred())


def h2_exchange(
    port: int,
    host: str,
    ca: Path,
    requests: list[tuple[list[tuple[bytes, bytes]], bytes | None]],
    *,
    source: str = "127.0.0.1",
    timeout: float = 20.0,
) -> list[tuple[int, bytes]]:
    """Send every (headers, body) at once on one HTTP/2 connection, each on its own stream,
    headers exactly as given (h2's own checks off: a visitor's client need not be polite);
    returns (status, body) per request, in order (status 0: reset or no answer)."""
    import h2.config
    import h2.connection
    import h2.events
    import h2.settings

    tls = tls_connect(port, host, ca, source=source, timeout=timeout, alpn=["h2"])
    try:
        conn = h2.connection.H2Connection(
            h2.config.H2Configuration(
                header_encoding=None,
                validate_outbound_headers=False,
                normalize_outbound_headers=False,
            )
        )
        conn.initiate_connection()
        conn.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 1000})
        sids = []
        for headers, body in requests:
            sid = conn.get_next_available_stream_id()
            conn.send_headers(sid, headers, end_stream=body is None)
            if body is not None:
                conn.send_data(sid, body, end_stream=True)
            sids.append(sid)
        tls.sendall(conn.data_to_send())
        status = dict.fromkeys(sids, 0)
        bodies = {sid: bytearray() for sid in sids}
        waiting = set(sids)
        deadline = time.monotonic() + timeout
        while waiting and time.monotonic() < deadline:
            data = tls.recv(65536)
            if not data:
                break
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived) and event.stream_id in status:
                    status[event.stream_id] = int(dict(event.headers)[b":status"])
                elif isinstance(event, h2.events.DataReceived) and event.stream_id in bodies:
                    bodies[event.stream_id] += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
                    waiting.discard(event.stream_id)
            tls.sendall(conn.data_to_send())
        return [(status[sid], bytes(bodies[sid])) for sid in sids]
    finally:
        tls.close()
