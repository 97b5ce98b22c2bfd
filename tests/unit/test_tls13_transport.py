"""The asyncio glue of the keyless TLS core (io.tls13_transport) on a real loopback socket: a
Python ssl client talks to an echo protocol through TlsServerProtocol, and the key share the
handshake used is made again for the pool, behind the connection's I/O."""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading

import pytest

from blindfold import pki
from blindfold.core import tls13_server as ts
from blindfold.core.clienthello import peek_client_hello
from blindfold.io import tls13_transport as tt
from tests.unit.test_tls13_server import HOST, Site

DEADLINE_S = 10.0


@pytest.fixture(scope="module")
def site(ca: pki.Issued, tmp_path_factory: pytest.TempPathFactory) -> Site:
    return Site(ca, "ec256", tmp_path_factory.mktemp("transport"))


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data.upper())


def _client(site: Site, port: int, result: list[bytes]) -> None:
    ctx = ssl.create_default_context(cafile=str(site.cafile))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=DEADLINE_S) as raw,
        ctx.wrap_socket(raw, server_hostname=HOST) as tls,
    ):
        tls.sendall(b"ping")
        result.append(tls.recv(100))


async def _serve_one(site: Site, pool: ts.KeySharePool) -> tuple[bytes, str]:
    """Accept one visitor like the edge does: read its ClientHello, get the signature, then
    hand the socket to asyncio with the flight ready."""
    loop = asyncio.get_running_loop()
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    answer: list[bytes] = []
    client = threading.Thread(
        target=_client, args=(site, listener.getsockname()[1], answer), daemon=True
    )
    client.start()
    sock, _addr = await asyncio.wait_for(loop.sock_accept(listener), DEADLINE_S)
    listener.close()
    data = b""
    hello = None
    while hello is None:
        data += await asyncio.wait_for(loop.sock_recv(sock, 4096), DEADLINE_S)
        hello = peek_client_hello(data)
    server = ts.TlsServer(
        site.identity, ts.TlsSettings(), ts.SessionStore(10, 10), HOST, hello, key_shares=pool
    )
    (request,) = server.receive(data, loop.time())
    assert isinstance(request, ts.SignatureRequested)
    assert server.signature_received(site.keyserver_sign(request), loop.time()) == []
    done = loop.create_future()
    proto = tt.TlsServerProtocol(
        server,
        lambda alpn: Echo(),
        lambda reason, _in, _out: done.set_result(reason),
        handshake_timeout_s=DEADLINE_S,
    )
    await loop.connect_accepted_socket(lambda: proto, sock)
    reason = await asyncio.wait_for(done, DEADLINE_S)
    await asyncio.to_thread(client.join, DEADLINE_S)
    return b"".join(answer), reason


def test_a_visitor_is_served_and_its_key_share_replaced(site: Site) -> None:
    pool = ts.KeySharePool(size=3)
    pool.fill(3)

    async def main() -> tuple[bytes, str, int]:
        answer, reason = await _serve_one(site, pool)
        for _ in range(100):  # the refill is queued behind the connection's callbacks
            if len(pool) == pool.size:
                break
            await asyncio.sleep(0.01)
        return answer, reason, len(pool)

    answer, reason, size = asyncio.run(main())
    assert answer == b"PING"
    assert reason in ("closed", "eof")
    assert size == 3 and pool.made_on_demand == 0


def test_the_refill_is_queued_once_and_in_small_batches() -> None:
    pool = ts.KeySharePool(size=2 * tt.KEY_SHARE_FILL_BATCH + 1)

    async def main() -> list[int]:
        loop = asyncio.get_running_loop()
        tt.fill_key_shares_later(loop, pool)
        tt.fill_key_shares_later(loop, pool)  # already queued: nothing more
        sizes = []
        for _ in range(4):
            await asyncio.sleep(0)  # one turn of the loop
            sizes.append(len(pool))
        return sizes

    assert asyncio.run(main()) == [2, 4, 5, 5]


class _Dirty:
    """What the flusher needs of an app transport: its owner's loop and _flush."""

    def __init__(self, loop: asyncio.AbstractEventLoop, log: list[str], name: str) -> None:
        self._owner = type("Owner", (), {"loop": loop})()
        self.log, self.name = log, name

    def _flush(self) -> None:
        self.log.append(self.name)
        if self.name == "bad":
            raise RuntimeError("seal failed")


def test_one_callback_a_turn_flushes_every_connection_written_in_it() -> None:
    async def main() -> tuple[list[str], list[str], int, list[str]]:
        loop = asyncio.get_running_loop()
        errors: list[str] = []
        loop.set_exception_handler(lambda _loop, ctx: errors.append(str(ctx["exception"])))
        flusher = tt.flusher_of(loop)
        assert tt.flusher_of(loop) is flusher
        log: list[str] = []
        ready = len(loop._ready)  # type: ignore[attr-defined]
        for name in ("a", "bad", "c"):
            flusher.add(_Dirty(loop, log, name))  # type: ignore[arg-type]
        queued = len(loop._ready) - ready  # type: ignore[attr-defined]
        assert log == []  # nothing is sent from inside the turn that wrote it
        await asyncio.sleep(0)
        first = list(log)
        flusher.add(_Dirty(loop, log, "d"))  # type: ignore[arg-type]
        await asyncio.sleep(0)
        return first, log, queued, errors

    first, log, queued, errors = asyncio.run(main())
    assert queued == 1
    assert first == ["a", "bad", "c"]  # one failure stops no other connection's flush
    assert log == ["a", "bad", "c", "d"]  # a later turn's writes queue the callback again
    assert errors == ["seal failed"]
