"""How the TLS transport cuts what the HTTP layer wrote in one turn into records
(io.tls13_transport.records): full records across write boundaries, nothing lost or reordered,
slices rather than copies inside one write."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blindfold import pki
from blindfold.core import tls13_server as ts
from blindfold.core.clienthello import peek_client_hello
from blindfold.io import tls13_transport as tt
from blindfold.io.tls13_transport import RECORD_BYTES, records
from tests.unit.test_tls13_server import HOST, Site

DEADLINE_S = 10.0


@pytest.fixture(scope="module")
def site(ca: pki.Issued, tmp_path_factory: pytest.TempPathFactory) -> Site:
    return Site(ca, "ec256", tmp_path_factory.mktemp("records"))


@given(st.lists(st.integers(min_value=1, max_value=3 * RECORD_BYTES + 7), max_size=8))
def test_records_are_full_in_order_and_complete(sizes: list[int]) -> None:
    pieces = [bytes([i % 251]) * n for i, n in enumerate(sizes)]
    out = records(pieces)
    total = sum(sizes)
    assert b"".join(bytes(r) for r in out) == b"".join(pieces)
    assert len(out) == -(-total // RECORD_BYTES)  # ceil: no short record but the last
    assert all(len(r) == RECORD_BYTES for r in out[:-1])
    assert all(0 < len(r) <= RECORD_BYTES for r in out)


def test_a_head_shares_the_first_record_with_its_body_and_big_bodies_are_not_copied() -> None:
    head, body = b"HTTP/1.1 200 OK\r\ncontent-length: 102400\r\n\r\n", bytes(102400)
    out = records([head, body])
    assert len(out) == 7 and bytes(out[0]).startswith(head)  # not 8: no record for the head
    assert all(isinstance(r, memoryview) and r.obj is body for r in out[1:-1])


# ---------------------------------------------------------------- on a real connection
BIG = bytes(range(256)) * 800  # 204,800 bytes


class Writer(asyncio.Protocol):
    """Answers the first read with writes of every kind made in one turn: a bytearray changed
    right after write (must be sent as it was), slices of immutable bytes (kept, not copied),
    small bytes; then closes."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buf = bytearray(b"head:")
        self.transport.write(buf)
        buf[:] = b"XXXXX"  # the caller may reuse its buffer once write returns
        view = memoryview(BIG)
        for i in range(0, len(view), 70000):
            self.transport.write(view[i : i + 70000])
        self.transport.write(b":tail")
        self.transport.close()


def _read_all(site: Site, port: int, result: list[bytes]) -> None:
    ctx = ssl.create_default_context(cafile=str(site.cafile))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=DEADLINE_S) as raw,
        ctx.wrap_socket(raw, server_hostname=HOST) as tls,
    ):
        tls.sendall(b"go")
        data = b""
        with contextlib.suppress(ssl.SSLEOFError, ConnectionError):
            while chunk := tls.recv(65536):
                data += chunk
        result.append(data)


def test_writes_of_every_kind_arrive_whole_and_in_order(site: Site) -> None:
    async def main() -> bytes:
        loop = asyncio.get_running_loop()
        listener = socket.create_server(("127.0.0.1", 0))
        listener.setblocking(False)
        answer: list[bytes] = []
        port = listener.getsockname()[1]
        client = threading.Thread(target=_read_all, args=(site, port, answer), daemon=True)
        client.start()
        sock, _ = await asyncio.wait_for(loop.sock_accept(listener), DEADLINE_S)
        listener.close()
        data, hello = b"", None
        while hello is None:
            data += await asyncio.wait_for(loop.sock_recv(sock, 4096), DEADLINE_S)
            hello = peek_client_hello(data)
        server = ts.TlsServer(site.identity, ts.TlsSettings(), ts.SessionStore(10, 10), HOST, hello)
        (request,) = server.receive(data, loop.time())
        assert isinstance(request, ts.SignatureRequested)
        server.signature_received(site.keyserver_sign(request), loop.time())
        done = loop.create_future()
        proto = tt.TlsServerProtocol(
            server, lambda alpn: Writer(), lambda *_: done.set_result(None), DEADLINE_S
        )
        await loop.connect_accepted_socket(lambda: proto, sock)
        await asyncio.wait_for(done, DEADLINE_S)
        await asyncio.to_thread(client.join, DEADLINE_S)
        return b"".join(answer)

    assert asyncio.run(main()) == b"head:" + BIG + b":tail"
