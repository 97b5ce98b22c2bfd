"""The baseline server: Python's `ssl` (OpenSSL), TLS 1.3 only, one certificate and key, ALPN
h2 and http/1.1, one session ticket per connection (what blindfold's keyless edge sends), and a
minimal HTTP/1.1 answer to whatever request head arrives.

    python baseline.py --cert site.pem --key site.key [--port 0]

Prints `ready <port>` on stdout once listening; stops on SIGTERM. Loopback only.
"""

from __future__ import annotations

import argparse
import signal
import socket
import ssl
import sys
import threading
import time

BODY = b"hello from the python-ssl baseline\n"
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: "
    + str(len(BODY)).encode()
    + b"\r\nConnection: close\r\n\r\n"
    + BODY
)
MAX_HEAD = 1 << 20
TIMEOUT_S = 15.0


def context(cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    ctx.num_tickets = 1  # as the keyless edge: one ticket after the client's Finished
    return ctx


def linger_close(sock: socket.socket) -> None:
    """Close like a real server: FIN after what was sent (an alert, say), then read what the
    client still sends until it closes, so that unread bytes do not turn the close into a reset
    that can destroy the alert before the client reads it."""
    try:
        sock.shutdown(socket.SHUT_WR)  # an SSLSocket drops its TLS state here: plain reads
        sock.settimeout(1.0)
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and sock.recv(65536):
            pass
    except (OSError, ValueError):
        pass
    finally:
        sock.close()


def serve_one(raw: socket.socket, ctx: ssl.SSLContext) -> None:
    raw.settimeout(TIMEOUT_S)
    sock: socket.socket = raw
    try:
        tls = ctx.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
        sock = tls
        tls.do_handshake()
        head = b""
        while b"\r\n\r\n" not in head and len(head) < MAX_HEAD:
            chunk = tls.recv(65536)
            if not chunk:  # close_notify (or EOF): answer nothing
                break
            head += chunk
        else:
            tls.sendall(RESPONSE)
        tls.unwrap()  # our close_notify (and the client's, when it sends one)
    except (OSError, ssl.SSLError, ValueError):
        pass
    finally:
        linger_close(sock)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cert", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args()
    ctx = context(args.cert, args.key)
    lsock = socket.socket()
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("127.0.0.1", args.port))
    lsock.listen(512)
    stop = threading.Event()

    def on_term(_sig: int, _frame: object) -> None:
        stop.set()
        lsock.close()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    print(f"ready {lsock.getsockname()[1]}", flush=True)
    while not stop.is_set():
        try:
            conn, _ = lsock.accept()
        except OSError:
            break
        threading.Thread(target=serve_one, args=(conn, ctx), daemon=True).start()
    return 0


if __name__ == "__main__":
    sys.exit(main())
