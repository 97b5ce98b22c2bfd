"""What the origin's worker -> master reports cost per event (origin/worker.py MasterLink,
origin/master.py OriginMaster._apply), against the baseline measured in the same run: the
decision rules applied in-process, as a single-process origin did.

    PYTHONPATH=src .venv/bin/python bench/origin/ipc.py [--events 200000]

Worker side: MasterLink.block() for each event, batches flushed (JSON) into a real socketpair.
Master side: the same bytes read back, parsed, and applied to DecisionRules (on_block). Only
CPU time of this process counts (both ends run here, one after the other, no event loop
waits). Events are WAF blocks from 1,000 addresses (ban_after_blocks high: no bans)."""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import time

from blindfold.decisions.core import DecisionRules
from blindfold.origin.worker import EVENT_BATCH, MasterLink


def rules() -> DecisionRules:
    return DecisionRules(ban_after_blocks=1 << 30, block_window_s=60, ban_duration_s=60)


class _Writer:
    """The part of asyncio.StreamWriter MasterLink uses, over a blocking socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def write(self, data: bytes) -> None:
        self.sock.sendall(data)

    def is_closing(self) -> bool:
        return False


async def run(n: int) -> None:
    ips = [f"10.0.{i // 250}.{i % 250}" for i in range(1000)]
    now = time.time()
    # baseline: in-process
    r = rules()
    t0 = time.process_time()
    for i in range(n):
        r.on_block(ips[i % 1000], now)
    base = (time.process_time() - t0) / n
    # worker side, into a socketpair drained by a reader thread-free loop: read after each batch
    a, b = socket.socketpair()
    b.setblocking(False)
    link = MasterLink(_Writer(a))  # type: ignore[arg-type]
    chunks: list[bytes] = []
    t0 = time.process_time()
    for i in range(n):
        link.block(ips[i % 1000], now, None)
        if i % EVENT_BATCH == EVENT_BATCH - 1:
            while True:
                try:
                    chunks.append(b.recv(1 << 20))
                except BlockingIOError:
                    break
    link.flush()
    worker = (time.process_time() - t0) / n
    while True:
        try:
            chunks.append(b.recv(1 << 20))
        except BlockingIOError:
            break
    data = b"".join(chunks)
    # master side: parse and apply
    r = rules()
    t0 = time.process_time()
    for line in data.splitlines():
        for kind, ip, ts, _name, _address, _path in json.loads(line)["e"]:
            if kind == "b":
                r.on_block(ip, float(ts))
    master = (time.process_time() - t0) / n
    a.close()
    b.close()
    print(f"events: {n}, batch {EVENT_BATCH}, {len(data) / n:.0f} bytes per event")
    print(f"in-process rules (baseline):   {base * 1e6:6.2f} µs/event")
    print(f"worker side (MasterLink):      {worker * 1e6:6.2f} µs/event")
    print(f"master side (parse + rules):   {master * 1e6:6.2f} µs/event")
    print(f"IPC path / in-process:         {(worker + master) / base:6.2f}x")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--events", type=int, default=200_000)
    asyncio.run(run(p.parse_args().events))


if __name__ == "__main__":
    main()
