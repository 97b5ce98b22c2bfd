"""Worker CPU spent reading ClientHellos cut into 1-byte TLS records (issue 15 finding 6).

RFC 8446 §5.1 allows handshake records of any length >= 1, so a visitor may send its hello as
thousands of 6-byte records, one per TCP segment. This starts an edge (one worker, one
passthrough route to a listener that accepts and closes), opens CONNS such connections, sends
each one's hello record by record (round robin, paced), and prints the worker's CPU seconds.

    .venv/bin/python bench/l4/hello_records.py                  # 12 connections, defaults
    .venv/bin/python bench/l4/hello_records.py --max-hello-records 4096   # no record cap

`--max-hello-records` writes `max_hello_records` into the edge's config (leave it out for an
edge that predates the setting).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchlib import REPO, Proc, cpu_s

SNI = b"bench.example"


def client_hello(message_bytes: int) -> bytes:
    """A TLS 1.3 ClientHello handshake message of about `message_bytes`, grown with the padding
    extension (RFC 7685)."""
    sni = struct.pack(">HBH", len(SNI) + 3, 0, len(SNI)) + SNI
    exts = [
        struct.pack(">HH", 0x0000, len(sni)) + sni,
        struct.pack(">HHB", 0x002B, 3, 2) + b"\x03\x04",
        struct.pack(">HHH", 0x000D, 4, 2) + b"\x04\x03",
        struct.pack(">HHH", 0x000A, 4, 2) + b"\x00\x1d",
    ]
    body = b"\x03\x03" + bytes(32) + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00"
    fixed = len(body) + 2 + sum(len(e) for e in exts) + 4 + 4
    exts.append(struct.pack(">HH", 0x0015, max(0, message_bytes - fixed)))
    exts[-1] += bytes(max(0, message_bytes - fixed))
    ext_bytes = b"".join(exts)
    body += struct.pack(">H", len(ext_bytes)) + ext_bytes
    return b"\x01" + len(body).to_bytes(3, "big") + body


def one_byte_records(message: bytes) -> list[bytes]:
    return [b"\x16\x03\x01\x00\x01" + message[i : i + 1] for i in range(len(message))]


def sink() -> tuple[socket.socket, list[int]]:
    """The origin: counts the connections the edge forwards and closes them (what happens
    after the hello is not measured)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(128)
    accepted = [0]

    def run() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            accepted[0] += 1
            conn.close()

    threading.Thread(target=run, daemon=True).start()
    return srv, accepted


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--conns", type=int, default=12)
    ap.add_argument("--max-hello-bytes", type=int, default=16384)
    ap.add_argument("--max-hello-records", type=int, default=0, help="0: leave unset")
    ap.add_argument("--pace-s", type=float, default=0.0005, help="pause between rounds")
    args = ap.parse_args()
    message = client_hello(args.max_hello_bytes // 6 - 8)
    records = one_byte_records(message)
    work = Path(tempfile.mkdtemp(prefix="hello-records-"))
    srv, accepted = sink()
    extra = f"max_hello_records = {args.max_hello_records}\n" if args.max_hello_records else ""
    (work / "edge.toml").write_text(
        "[edge]\n"
        'listen = ["127.0.0.1:0"]\n'
        'admin_listen = "127.0.0.1:0"\n'
        "workers = 1\n"
        "hello_timeout_s = 60\n"
        f"max_hello_bytes = {args.max_hello_bytes}\n"
        f"{extra}"
        "per_ip_rate_per_s = 0\n"
        f'log_path = "{work / "edge.log"}"\n\n'
        "[[edge.routes]]\n"
        f'sni = ["{SNI.decode()}"]\n'
        f'origins = ["127.0.0.1:{srv.getsockname()[1]}"]\n'
        'proxy_protocol = "none"\n'
    )
    edge = Proc(
        "edge",
        [
            str(REPO / ".venv/bin/python"),
            "-m",
            "blindfold",
            "edge",
            "--config",
            str(work / "edge.toml"),
        ],
        work,
    )
    try:
        ready = edge.wait_json(work / "edge.log", "edge_ready")
        port = int(ready["listen"][0].rpartition(":")[2])
        children = Path(f"/proc/{edge.pid}/task/{edge.pid}/children")
        deadline = time.monotonic() + 10
        while not children.read_text().split() and time.monotonic() < deadline:
            time.sleep(0.05)
        worker = int(children.read_text().split()[0])
        socks = []
        for _ in range(args.conns):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            socks.append(s)
        cpu0 = cpu_s(worker)
        t0 = time.monotonic()
        sent_records = 0
        for rec in records:
            for s in list(socks):
                try:
                    s.sendall(rec)
                except OSError:  # refused (e.g. the record cap): the edge closed it
                    socks.remove(s)
            if not socks:
                break
            sent_records += 1
            if args.pace_s:
                time.sleep(args.pace_s)
        send_s = time.monotonic() - t0
        # wait for the worker to finish with the hellos: forwarded or refused
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            text = (work / "edge.log").read_text(errors="replace")
            if accepted[0] + text.count('"outcome":"refused"') >= args.conns:
                break
            time.sleep(0.05)
        cpu = cpu_s(worker) - cpu0
        for s in socks:
            with contextlib.suppress(OSError):
                s.close()
        deadline = time.monotonic() + 10  # their log lines
        while time.monotonic() < deadline:
            if (work / "edge.log").read_text(errors="replace").count('"outcome"') >= args.conns:
                break
            time.sleep(0.05)
        outcomes: dict[str, int] = {}
        for line in (work / "edge.log").read_text(errors="replace").splitlines():
            rec = json.loads(line)
            if "outcome" in rec:
                key = f"{rec['outcome']}:{rec.get('reason')}"
                outcomes[key] = outcomes.get(key, 0) + 1
        print(
            json.dumps(
                {
                    "conns": args.conns,
                    "records_per_hello": len(records),
                    "records_sent_per_conn": sent_records,
                    "send_s": round(send_s, 3),
                    "worker_cpu_s": round(cpu, 3),
                    "worker_cpu_ms_per_conn": round(cpu * 1000 / args.conns, 2),
                    "outcomes": outcomes,
                }
            )
        )
    finally:
        edge.stop()
        srv.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
