"""Record the first datagrams real QUIC clients send to a server that never answers.

    python tests/data/quic/capture.py aioquic v1 OUT.json      # the project's venv (aioquic)
    /tmp/qh3venv/bin/python tests/data/quic/capture.py qh3 v2 OUT.json   # a venv with qh3
    python tests/data/quic/capture.py chromium v1 OUT.json     # Debian's chromium

A UDP socket on 127.0.0.1:0 records every datagram for `--seconds` (the client's first flight
and its retransmissions: new packet numbers, the same ClientHello); nothing is answered. The
output is JSON: the client, the QUIC version asked for, the SNI and ALPN the client was given,
and the datagrams in arrival order as hex.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

SNI = "example.test"


def record(sock: socket.socket, seconds: float, out: list[bytes]) -> None:
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            data, _ = sock.recvfrom(65535)
        except TimeoutError:
            break
        out.append(data)


async def run_quic_lib(lib: str, version: str, port: int, seconds: float) -> None:
    # aioquic and its fork qh3 share this API
    connect = importlib.import_module(f"{lib}.asyncio.client").connect
    QuicConfiguration = importlib.import_module(f"{lib}.quic.configuration").QuicConfiguration
    QuicProtocolVersion = importlib.import_module(f"{lib}.quic.packet").QuicProtocolVersion
    versions = [QuicProtocolVersion.VERSION_2 if version == "v2" else QuicProtocolVersion.VERSION_1]
    config = QuicConfiguration(
        is_client=True, alpn_protocols=["h3"], server_name=SNI, supported_versions=versions
    )
    try:
        async with connect("127.0.0.1", port, configuration=config, wait_connected=True):
            pass
    except Exception:
        pass


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("client", choices=["aioquic", "qh3", "chromium"])
    p.add_argument("version", choices=["v1", "v2"])
    p.add_argument("out")
    p.add_argument("--seconds", type=float, default=1.5)
    args = p.parse_args()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    got: list[bytes] = []
    t = threading.Thread(target=record, args=(sock, args.seconds, got))
    t.start()
    if args.client == "chromium":
        browser = shutil.which("chromium")
        assert browser, "chromium is not installed"
        with tempfile.TemporaryDirectory() as profile:
            cmd = [
                browser,
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                f"--user-data-dir={profile}",
                f"--host-resolver-rules=MAP {SNI} 127.0.0.1",
                f"--origin-to-force-quic-on={SNI}:{port}",
                *(["--quic-version=RFCv2"] if args.version == "v2" else []),
                f"https://{SNI}:{port}/",
            ]
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            t.join()
            proc.terminate()
            proc.wait(10)
    else:
        try:
            asyncio.run(
                asyncio.wait_for(
                    run_quic_lib(args.client, args.version, port, args.seconds), args.seconds
                )
            )
        except TimeoutError:
            pass
        t.join()
    sock.close()
    with open(args.out, "w") as f:
        json.dump(
            {
                "client": args.client,
                "version": args.version,
                "sni": SNI,
                "alpn": ["h3"],
                "datagrams": [d.hex() for d in got],
            },
            f,
            indent=1,
        )
        f.write("\n")
    print(f"{args.out}: {len(got)} datagrams", file=sys.stderr)
    return 0 if got else 1


if __name__ == "__main__":
    sys.exit(main())
