"""Reading a PROXY header from an accepted socket (io/accepted.py) on real loopback sockets:
exactly the header is consumed, never a byte of what follows (the ClientHello)."""

from __future__ import annotations

import asyncio
import socket

import pytest

from blindfold.core.proxyproto import encode_v1, encode_v2
from blindfold.errors import ProtocolError
from blindfold.io.accepted import read_proxy_header

HELLO = b"\x16\x03\x01\x00\xc8\x01\x00\x00\xc4\x03\x03"  # the start of a ClientHello record


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    lsock = socket.create_server(("127.0.0.1", 0))
    a = socket.create_connection(lsock.getsockname())
    b, _ = lsock.accept()
    lsock.close()
    b.setblocking(False)
    return a, b


async def _read_after(
    sender: socket.socket, receiver: socket.socket, chunks: list[bytes]
) -> tuple[object, bytes]:
    loop = asyncio.get_running_loop()
    task = loop.create_task(read_proxy_header(receiver, 5.0))
    for chunk in chunks:
        sender.sendall(chunk)
        await asyncio.sleep(0.01)
    header = await task
    rest = b""
    async with asyncio.timeout(5):
        while len(rest) < len(HELLO):
            rest += await loop.sock_recv(receiver, 4096)
    return header, rest


@pytest.mark.parametrize(
    "header",
    [
        b"PROXY UNKNOWN\r\n",  # 15 bytes: shorter than a v2 header's fixed part
        b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n",
        encode_v1(("192.0.2.1", 1234), ("198.51.100.2", 443)),
        encode_v2(("192.0.2.1", 1234), ("198.51.100.2", 443)),
        encode_v2(None, None),
    ],
)
@pytest.mark.parametrize("split", [False, True])
def test_exactly_the_header_is_consumed(header: bytes, split: bool) -> None:
    a, b = tcp_pair()
    try:
        data = header + HELLO
        chunks = [data[i : i + 1] for i in range(len(data))] if split else [data]
        parsed, rest = asyncio.run(_read_after(a, b, chunks))
        assert rest == HELLO
        assert parsed is not None
    finally:
        a.close()
        b.close()


def test_a_truncated_header_is_refused() -> None:
    a, b = tcp_pair()
    try:
        a.sendall(b"PROXY UNKN")
        a.shutdown(socket.SHUT_WR)
        with pytest.raises(ProtocolError):
            asyncio.run(read_proxy_header(b, 5.0))
    finally:
        a.close()
        b.close()
