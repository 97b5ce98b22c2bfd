"""HTTP/1.1 layer CPU per request without sockets: one keep-alive connection over an in-memory
transport, a GET fed, the 2 KB answer (start or start_prepared) collected, repeated; web.http1
against the h11 reference, alternated, several rounds. What is left out (syscalls, the event
loop's polling) is the same for both, so the ratio here is the HTTP layer's own.
Usage: bench/http1/inproc.py [--requests 20000] [--rounds 5]"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent.parent / "src"), str(HERE.parent.parent)]

import server  # noqa: E402

from blindfold.web.http1 import ConnInfo, H1Connection  # noqa: E402
from blindfold.web.limits import HttpLimits  # noqa: E402
from tests.helpers import h11_reference  # noqa: E402

REQUEST = (
    b"GET %s HTTP/1.1\r\nHost: bench.test\r\nUser-Agent: wrk\r\nAccept: */*\r\n"
    b"Accept-Encoding: gzip, br\r\nX-Forwarded-For: 192.0.2.1\r\n\r\n"
)


class Sink(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.n = 0
        self.done: asyncio.Future[None] | None = None

    def write(self, data: Any) -> None:
        self.n += len(data)
        if self.done is not None and not self.done.done():
            self.done.set_result(None)

    def writelines(self, lines: Any) -> None:
        self.write(b"".join(lines))

    def close(self) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def one_run(connection: type[Any], path: bytes, n: int) -> float:
    loop = asyncio.get_running_loop()
    info = ConnInfo(("127.0.0.1", 1), ("127.0.0.1", 2), b"http", {})
    conn = connection(server.handler, HttpLimits(), info)
    sink = Sink()
    conn.connection_made(sink)
    request = REQUEST % path
    start = time.process_time()
    for _ in range(n):
        sink.done = loop.create_future()
        conn.data_received(request)
        await sink.done
        await asyncio.sleep(0)  # the response's end and the next cycle
    used = time.process_time() - start
    conn._close()
    return used / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    variants = [(impl, path) for path in (b"/start", b"/prepared") for impl in ("old", "new")]
    classes = {"old": h11_reference.H1Connection, "new": H1Connection}
    got: dict[tuple[str, bytes], list[float]] = {v: [] for v in variants}
    for r in range(args.rounds):
        for impl, path in variants if r % 2 == 0 else variants[::-1]:
            us = asyncio.run(one_run(classes[impl], path, args.requests))
            got[(impl, path)].append(us)
    for path in (b"/start", b"/prepared"):
        old, new = got[("old", path)], got[("new", path)]
        print(
            f"{path.decode():9} old {statistics.median(old):6.1f} us "
            f"({min(old):.1f}-{max(old):.1f})"
            f"  new {statistics.median(new):6.1f} us ({min(new):.1f}-{max(new):.1f})"
            f"  ratio {statistics.median(old) / statistics.median(new):.2f}"
        )


if __name__ == "__main__":
    main()
