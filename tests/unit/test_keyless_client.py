"""keyless.client.KeyServerClient against small in-process key servers (real TLS on loopback):
answers matched by request id, failover to the next key server when a connection breaks, a
refusal of the edge itself failing every request without retry, deadlines."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from blindfold import pki
from blindfold.core import keyless_wire as w
from blindfold.errors import KeyServerError
from blindfold.keyless.client import KeyServerClient

Behaviour = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("kc")
    ca = pki.make_ca("test key server CA")
    ca.write(d / "ca.pem")
    leaf = pki.issue(ca, ["keyserver.test"])
    leaf.write(d / "ks.pem", d / "ks.key")
    return {"ca": d / "ca.pem", "cert": d / "ks.pem", "key": d / "ks.key"}


async def _serve(certs: dict[str, Path], behaviour: Behaviour) -> tuple[asyncio.Server, str]:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(certs["cert"], certs["key"])
    server = await asyncio.start_server(behaviour, "127.0.0.1", 0, ssl=ctx)
    return server, f"127.0.0.1:{server.sockets[0].getsockname()[1]}"


def _client(certs: dict[str, Path], addresses: tuple[str, ...], **kw: float) -> KeyServerClient:
    ctx = ssl.create_default_context(cafile=str(certs["ca"]))
    return KeyServerClient(addresses, ctx, server_name="keyserver.test", **kw)


async def _signer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers each sign request with b'sig:' + its messages, in reverse order of a batch."""
    decoder = w.FrameDecoder()
    try:
        while data := await reader.read(65536):
            frames = decoder.feed(data)
            out = [
                w.encode_sign_response(
                    f.request_id, b"sig:" + w.decode_sign_request(f.body).messages
                )
                for f in reversed(frames)
            ]
            writer.write(b"".join(out))
    except (OSError, ssl.SSLError):
        pass
    finally:
        writer.close()


async def _hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read(65536)  # the first request: then the connection breaks
    writer.transport.abort()


async def _refuse_edge(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read(65536)
    writer.write(w.encode_error(0, w.E_UNAUTHORIZED, "edge not listed"))
    await writer.drain()
    await asyncio.sleep(1)
    writer.close()


async def _silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await asyncio.sleep(5)
    writer.close()


def _request(tag: bytes) -> w.SignRequest:
    return w.SignRequest(0x0403, "192.0.2.1", b"\x01\x00\x00\x00" + tag)


def test_answers_go_to_their_own_requests(certs: dict[str, Path]) -> None:
    async def main() -> None:
        server, address = await _serve(certs, _signer)
        client = _client(certs, (address,))
        try:
            tags = [f"m{i}".encode() for i in range(20)]
            got = await asyncio.wait_for(
                asyncio.gather(*(client.submit(_request(t)) for t in tags)), 10
            )
            assert got == [b"sig:\x01\x00\x00\x00" + t for t in tags]
            # and again on the same connection
            assert await asyncio.wait_for(client.sign(_request(b"x")), 10) == (
                b"sig:\x01\x00\x00\x00x"
            )
            assert client.results == {"ok": 21}
        finally:
            await client.close()
            server.close()

    asyncio.run(main())


def test_a_broken_connection_moves_the_request_to_the_next_key_server(
    certs: dict[str, Path],
) -> None:
    async def main() -> None:
        bad, bad_address = await _serve(certs, _hang_up)
        good, good_address = await _serve(certs, _signer)
        client = _client(certs, (bad_address, good_address))
        try:
            sig = await asyncio.wait_for(client.sign(_request(b"a")), 10)
            assert sig == b"sig:\x01\x00\x00\x00a"
        finally:
            await client.close()
            bad.close()
            good.close()

    asyncio.run(main())


def test_a_refused_edge_fails_at_once_with_the_key_servers_reason(
    certs: dict[str, Path],
) -> None:
    async def main() -> None:
        server, address = await _serve(certs, _refuse_edge)
        client = _client(certs, (address,))
        try:
            with pytest.raises(KeyServerError) as info:
                await asyncio.wait_for(client.sign(_request(b"a")), 10)
            assert info.value.reason == "unauthorized"
        finally:
            await client.close()
            server.close()

    asyncio.run(main())


def test_a_silent_key_server_times_out(certs: dict[str, Path]) -> None:
    async def main() -> None:
        server, address = await _serve(certs, _silent)
        client = _client(certs, (address,), sign_timeout_s=0.3)
        try:
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            with pytest.raises(KeyServerError) as info:
                await asyncio.wait_for(client.sign(_request(b"a")), 10)
            assert info.value.reason == "timeout"
            assert loop.time() - t0 < 2
            assert client.results.get("timeout") == 1
        finally:
            await client.close()
            server.close()

    asyncio.run(main())
