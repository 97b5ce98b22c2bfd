"""HTTP/1.1 layer CPU per request without sockets, a cached 2 KB answer given in a Task
(`handler`, as every request before issue 19's hit19) or at once (`answer_now`, as the keyless
cache's fresh hits now): one keep-alive connection over bench/http1/inproc.py's in-memory
transport, alternated, several rounds; CPU time per request (process_time).
Usage: bench/http1/answer_now.py [--requests 20000] [--rounds 6]"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent.parent / "src"), str(HERE.parent.parent)]

import inproc  # noqa: E402
import server  # noqa: E402

from blindfold.web.http1 import ConnInfo, H1Connection, H1Responder  # noqa: E402
from blindfold.web.limits import HttpLimits  # noqa: E402
from blindfold.web.messages import BodyStream, Request, Responder  # noqa: E402

EXTRA = [(b"age", b"1"), (b"x-cache", b"HIT")]


class AnswerNow:
    async def __call__(self, request: Request, body: BodyStream, respond: Responder) -> None:
        await server.handler(request, body, respond)

    def answer_now(self, request: Request, respond: H1Responder) -> bool:
        if not respond.can_answer_now:
            return False
        respond.start_prepared_now(server.HEAD, EXTRA)
        respond.send_now(server.BODY)
        respond.end_now()
        return True


async def one_run(now: bool, n: int) -> float:
    loop = asyncio.get_running_loop()
    info = ConnInfo(("127.0.0.1", 1), ("127.0.0.1", 2), b"http", {})
    conn = H1Connection(AnswerNow() if now else server.handler, HttpLimits(), info)
    sink = inproc.Sink()
    conn.connection_made(sink)
    request = inproc.REQUEST % b"/prepared"
    start = time.process_time()
    for _ in range(n):
        sink.done = loop.create_future()
        conn.data_received(request)
        await sink.done
        await asyncio.sleep(0)
    used = time.process_time() - start
    conn._close()
    return used / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=6)
    args = ap.parse_args()
    got: dict[bool, list[float]] = {False: [], True: []}
    for r in range(args.rounds):
        for now in (False, True) if r % 2 == 0 else (True, False):
            got[now].append(asyncio.run(one_run(now, args.requests)))
    for now, label in ((False, "task"), (True, "answer_now")):
        v = got[now]
        print(f"{label:10} {statistics.median(v):6.1f} us ({min(v):.1f}-{max(v):.1f})")


if __name__ == "__main__":
    main()
