"""A plain-HTTP server for bench/http1/run.py: one HTTP/1.1 connection class (`new`: web.http1,
`old`: the h11 reference in tests/helpers) and a trivial handler answering 2 KB, with a
PreparedHead (`/prepared`) or with start() (anything else). Prints its port, then serves until
killed. Benchmarks only."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
sys.path[:0] = [str(REPO / "src"), str(REPO)]

from blindfold.web.http1 import ConnInfo  # noqa: E402
from blindfold.web.limits import HttpLimits  # noqa: E402
from blindfold.web.messages import (  # noqa: E402
    BodyStream,
    PreparedHead,
    Request,
    Responder,
    start_prepared,
)

BODY = b"x" * 2048
FIELDS = [
    (b"content-type", b"text/html; charset=utf-8"),
    (b"content-length", b"%d" % len(BODY)),
    (b"cache-control", b"public, max-age=60"),
    (b"etag", b'"0123456789abcdef"'),
]
HEAD = PreparedHead(200, FIELDS)


async def handler(request: Request, body: BodyStream, respond: Responder) -> None:
    extra = [(b"age", b"1"), (b"x-cache", b"HIT")]
    if request.target == b"/prepared":
        await start_prepared(respond, HEAD, extra)
    else:
        await respond.start(200, [*FIELDS, *extra])
    await respond.send(BODY)
    await respond.end()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("impl", choices=["old", "new"])
    ap.add_argument("--uvloop", action="store_true")
    args = ap.parse_args()
    if args.impl == "new":
        from blindfold.web.http1 import H1Connection
    else:
        from tests.helpers.h11_reference import H1Connection  # type: ignore[assignment]
    limits = HttpLimits()

    async def serve() -> None:
        loop = asyncio.get_running_loop()

        def factory() -> asyncio.Protocol:
            info = ConnInfo(("127.0.0.1", 1), ("127.0.0.1", 2), b"http", {})
            return H1Connection(handler, limits, info)

        server = await loop.create_server(factory, "127.0.0.1", 0, backlog=512)
        print(server.sockets[0].getsockname()[1], flush=True)
        await asyncio.Event().wait()

    if args.uvloop:
        import uvloop

        uvloop.run(serve())
    else:
        asyncio.run(serve())


if __name__ == "__main__":
    main()
