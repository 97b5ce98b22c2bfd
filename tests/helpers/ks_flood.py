"""A compromised edge flooding the key server (atk-trust finding 6), run as its own process so
that it has a CPU of its own: CONNS mutual-TLS connections with a real edge identity, each
writing sign requests as fast as the key server reads them, for SECONDS (or until stopped).

    python -m tests.helpers.ks_flood PORT CA CERT KEY SECONDS CONNS

Each request's ClientHello is 64 KiB of 16,000 distinct empty extensions (it cost the key
server ~5 ms of parsing before it was refused), its ServerHello junk. Prints a JSON line when
its connections are up (the flood starts then), and one with the frames sent and answers read
when done."""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import struct
import sys
import time

from blindfold.core import keyless_wire as w
from blindfold.errors import ProtocolError


def big_hello(n_ext: int = 16000) -> bytes:
    """RFC 8446 §4.1.2 layout: SNI other.test, TLS 1.3, then `n_ext` empty extensions."""
    sni = b"other.test"
    sn = struct.pack(">HBH", len(sni) + 3, 0, len(sni)) + sni
    exts = struct.pack(">HH", 0, len(sn)) + sn
    exts += struct.pack(">HH", 43, 3) + b"\x02\x03\x04"
    exts += struct.pack(">HH", 13, 4) + b"\x00\x02\x04\x03"
    share = struct.pack(">H", 36) + struct.pack(">HH", 29, 32) + os.urandom(32)
    exts += struct.pack(">HH", 51, len(share)) + share
    t = 100
    for _ in range(n_ext):
        exts += struct.pack(">HH", t, 0)
        t += 1
    body = (
        b"\x03\x03"
        + os.urandom(32)
        + b"\x00"
        + b"\x00\x02\x13\x01"
        + b"\x01\x00"
        + struct.pack(">H", len(exts))
        + exts
    )
    return b"\x01" + len(body).to_bytes(3, "big") + body


async def _connect(
    port: int, ctx: ssl.SSLContext
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    async with asyncio.timeout(10):
        return await asyncio.open_connection(
            "127.0.0.1", port, ssl=ctx, server_hostname="keyserver.test"
        )


async def _flood(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    frame: bytes,
    until: float,
    counts: dict[str, int],
) -> None:
    async def drain_replies() -> None:
        decoder = w.FrameDecoder()
        while data := await reader.read(65536):
            counts["answers"] += len(decoder.feed(data))

    replies = asyncio.create_task(drain_replies())
    try:
        while time.monotonic() < until:
            writer.write(frame * 4)
            async with asyncio.timeout(max(0.1, until - time.monotonic())):
                await writer.drain()
            counts["sent"] += 4
    except (OSError, TimeoutError, ProtocolError):
        pass
    finally:
        replies.cancel()
        writer.close()


async def main(argv: list[str]) -> None:
    port, ca, cert, key, seconds, conns = argv
    ctx = ssl.create_default_context(cafile=ca)
    ctx.load_cert_chain(cert, key)
    messages = big_hello() + b"\x02\x00\x00\x00"  # the ServerHello is junk: refused after
    frame = w.encode_frame(w.SIGN_REQUEST, 7, struct.pack(">HB", 0x0403, 0) + messages)
    got = await asyncio.gather(
        *(_connect(int(port), ctx) for _ in range(int(conns))), return_exceptions=True
    )
    streams = [g for g in got if not isinstance(g, BaseException)]
    print(json.dumps({"connected": len(streams)}), flush=True)  # the flood starts now
    until = time.monotonic() + float(seconds)
    counts = {"sent": 0, "answers": 0}
    await asyncio.gather(*(_flood(r, wr, frame, until, counts) for r, wr in streams))
    print(json.dumps({**counts, "frame_bytes": len(frame)}), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
