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
