#!/usr/bin/env python3
"""bench/edgecache: the HTTP/2 server side of a cached 2 KB hit, in-process (no sockets, no
TLS): web.http2.H2Connection fed h2load-like requests by an `h2` client, a handler answering
from a PreparedHead (start_prepared), with `start`, or at once (`answer_now`, mode now), the
bytes discarded. Prints CPU µs per
response; --profile prints the top of a cProfile. Benchmarks only.

  PYTHONPATH=src python bench/edgecache/h2micro.py [--n 20000] [--mode prepared|plain|now]"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import sys
import time
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings

from blindfold.web.http1 import ConnInfo
from blindfold.web.http2 import H2Connection
from blindfold.web.limits import HttpLimits
from blindfold.web.messages import BodyStream, PreparedHead, Request, Responder, start_prepared

BODY = bytes(2048)
HEAD = PreparedHead(
    200,
    [
        (b"server", b"nginx/1.22.1"),
        (b"date", b"Sun, 06 Dec 2026 08:00:00 GMT"),
        (b"content-type", b"application/octet-stream"),
        (b"last-modified", b"Sun, 06 Dec 2026 07:59:00 GMT"),
        (b"etag", b'"6932e1a4-800"'),
        (b"cache-control", b"public, max-age=3600"),
        (b"accept-ranges", b"bytes"),
        (b"content-length", b"2048"),
    ],
)


class Sink(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.out: list[bytes] = []

    def write(self, data: Any) -> None:
        self.out.append(bytes(data))

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass


async def main(a: argparse.Namespace) -> None:
    async def handler(request: Request, body: BodyStream, respond: Responder) -> None:
        extra = [(b"age", b"3"), (b"x-blindfold-cache", b"hit")]
        if a.mode == "prepared":
            await start_prepared(respond, HEAD, extra)
        else:
            await respond.start(200, [*HEAD.headers, *extra])
        await respond.send(BODY)
        await respond.end()

    class NowHandler:
        """`answer_now` as the keyless cache hit (web/http2.py answers while parsing)."""

        async def __call__(self, request: Request, body: BodyStream, respond: Responder) -> None:
            await handler(request, body, respond)

        def answer_now(self, request: Request, respond: Any) -> bool:
            if not respond.can_answer_now:
                return False
            respond.start_prepared_now(HEAD, [(b"age", b"3"), (b"x-blindfold-cache", b"hit")])
            respond.send_now(BODY)
            respond.end_now()
            return True

    app: Any = NowHandler() if a.mode == "now" else handler
    info = ConnInfo(("127.0.0.1", 1), ("127.0.0.1", 2), b"https", {})
    limits = HttpLimits(h2_max_streams_per_connection=10**9, h2_max_control_frames_per_window=10**9)
    server = H2Connection(app, limits, info)
    sink = Sink()
    server.connection_made(sink)
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    if a.mode == "now":  # h2load's windows (-w 30 -W 30)
        client.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 2**30 - 1})
        client.increment_flow_control_window(2**30 - 1 - 65535)
    server.data_received(client.data_to_send())
    client.receive_data(b"".join(sink.out))
    sink.out.clear()
    head = [
        (":method", "GET"),
        (":scheme", "https"),
        (":authority", "localhost:8443"),
        (":path", "/2k.bin"),
        ("user-agent", "h2load nghttp2/1.52.0"),
    ]
    prof = cProfile.Profile() if a.profile else None
    sid = 1
    spent = 0.0
    for i in range(a.n):
        client.send_headers(sid, head, end_stream=True)
        request = client.data_to_send()
        t1 = time.process_time()
        if prof and i >= 500:
            prof.enable()
        server.data_received(request)
        for _ in range(3):
            await asyncio.sleep(0)
        if prof:
            prof.disable()
        spent += time.process_time() - t1
        events = client.receive_data(b"".join(sink.out))
        sink.out.clear()
        for e in events:
            if isinstance(e, h2.events.DataReceived):
                client.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
        sid += 2
    dt = spent
    if prof:
        pstats.Stats(prof).sort_stats(a.sort).print_stats(35)
    print(f"{a.mode}: {a.n} responses, {1e6 * dt / a.n:.1f} µs CPU each (server side)")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--mode", default="prepared", choices=["prepared", "plain", "now"])
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--sort", default="tottime")
    asyncio.run(main(ap.parse_args(sys.argv[1:])))
