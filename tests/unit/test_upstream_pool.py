"""The upstream pool's caps on real loopback sockets: per pool (`max_open`), shared between
pools (`SharedCap`, one client address's pools on the edge), the queue of waiting requests with
its deadline, and slots that survive cancellation, failures and stale connections."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, cast

import pytest

from blindfold.errors import UpstreamError
from blindfold.web.client import SharedCaps, UpstreamBusy, UpstreamPool
from blindfold.web.proxy import interim_sender


@pytest.fixture(autouse=True, params=["h11", "httptools"])
def parser(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test runs with both response parsers (UpstreamPool(parser=...))."""
    init = UpstreamPool.__init__

    def with_parser(self: UpstreamPool, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("parser", request.param)
        init(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(UpstreamPool, "__init__", with_parser)
    return str(request.param)


class HeldServer:
    """HTTP/1.1 keep-alive server on 127.0.0.1:0 that answers each request only when the test
    lets it (`release(n)`), counting the connections open at once."""

    def __init__(self) -> None:
        self.open = 0
        self.max_open = 0
        self.accepted = 0
        self.requests = 0
        self.gate = asyncio.Semaphore(0)
        self.close_after_response = False
        self.writers: set[asyncio.StreamWriter] = set()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open += 1
        self.accepted += 1
        self.max_open = max(self.max_open, self.open)
        self.writers.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if not head:
                    return
                self.requests += 1
                await self.gate.acquire()
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                await writer.drain()
                if self.close_after_response:
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            self.open -= 1
            self.writers.discard(writer)
            writer.close()

    def release(self, n: int = 1) -> None:
        for _ in range(n):
            self.gate.release()


@asynccontextmanager
async def held_server() -> AsyncIterator[tuple[HeldServer, str]]:
    srv = HeldServer()
    server = await asyncio.start_server(srv.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield srv, f"http://127.0.0.1:{port}"
    finally:
        server.close()
        for w in list(srv.writers):
            w.close()


async def get(pool: UpstreamPool) -> bytes:
    response = await pool.request(b"GET", b"/", [(b"host", b"x")], None)
    return b"".join([chunk async for chunk in response.body()])


async def until(pred: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not pred():
            await asyncio.sleep(0.005)


def run(coro: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(coro(), 30))


def test_a_pool_holds_at_most_max_open_and_hands_connections_on() -> None:
    async def main() -> None:
        async with held_server() as (srv, url):
            pool = UpstreamPool(url, max_open=3, queue_timeout_s=10)
            tasks = [asyncio.create_task(get(pool)) for _ in range(20)]
            await until(lambda: srv.requests == 3)
            await asyncio.sleep(0.05)
            assert (srv.open, pool.open, len(pool._waiters)) == (3, 3, 17)
            srv.release(20)
            assert await asyncio.gather(*tasks) == [b"ok"] * 20
            # the waiting requests got the finished requests' connections: none were opened
            assert srv.accepted == 3 and srv.max_open == 3 and pool.opened == 3
            assert pool.open == 3 and len(pool._idle) == 3
            pool.close()
            await until(lambda: srv.open == 0)
            assert pool.open == 0

    run(main)


def test_a_request_that_waits_too_long_gets_upstream_busy() -> None:
    async def main() -> None:
        async with held_server() as (srv, url):
            pool = UpstreamPool(url, max_open=1, queue_timeout_s=0.2)
            first = asyncio.create_task(get(pool))
            await until(lambda: srv.requests == 1)
            with pytest.raises(UpstreamBusy):
                await get(pool)
            assert isinstance(UpstreamBusy("x"), UpstreamError)  # callers that know less: 502
            assert not pool._waiters and pool.open == 1
            srv.release(2)
            assert await first == b"ok"
            assert await get(pool) == b"ok"  # the slot was not lost
            assert srv.accepted == 1
            pool.close()

    run(main)


def test_a_cancelled_waiter_passes_on_what_it_was_handed() -> None:
    """A visitor that resets its stream while waiting must not take a slot with it."""

    async def main() -> None:
        async with held_server() as (srv, url):
            pool = UpstreamPool(url, max_open=1, queue_timeout_s=10)
            first = asyncio.create_task(get(pool))
            await until(lambda: srv.requests == 1)
            gone = asyncio.create_task(get(pool))
            third = asyncio.create_task(get(pool))
            await until(lambda: len(pool._waiters) == 2)
            gone.cancel()
            srv.release(1)
            assert await first == b"ok"
            await until(lambda: srv.requests == 2)
            srv.release(1)
            assert await third == b"ok"
            assert gone.cancelled() and pool.open == 1 and srv.accepted == 1
            pool.close()

    run(main)


def test_pools_sharing_a_cap_hold_at_most_its_limit_together() -> None:
    """One client address's visitor connections: each has its own pool, all share one cap."""

    async def main() -> None:
        async with held_server() as (srv, url):
            caps = SharedCaps(4)
            pools = []
            for _ in range(3):
                pool = UpstreamPool(url, max_open=3, queue_timeout_s=10)
                pool.shared = caps.join("192.0.2.1", pool)
                pools.append(pool)
            tasks = [asyncio.create_task(get(p)) for p in pools for _ in range(5)]
            await until(lambda: srv.requests == 4)
            await asyncio.sleep(0.05)
            cap = caps.get("192.0.2.1")
            assert srv.open == 4 and cap is not None and cap.open == 4
            assert all(p.open == 3 for p in pools)  # each pool's slots: in use or waiting
            assert cap.waiting == 9 - 4
            for _ in range(15):
                srv.release(1)
                await asyncio.sleep(0.01)
                assert srv.open <= 4
            assert await asyncio.gather(*tasks) == [b"ok"] * 15
            assert srv.max_open == 4
            for p in pools:
                p.close()
            await until(lambda: srv.open == 0)
            assert len(caps) == 0  # forgotten once unused

    run(main)


def test_an_idle_connection_of_another_pool_makes_room() -> None:
    async def main() -> None:
        async with held_server() as (srv, url):
            caps = SharedCaps(2)
            a = UpstreamPool(url, max_open=2, queue_timeout_s=10)
            a.shared = caps.join(1, a)
            b = UpstreamPool(url, max_open=2, queue_timeout_s=1)
            b.shared = caps.join(1, b)
            srv.release(2)
            assert list(await asyncio.gather(get(a), get(a))) == [b"ok", b"ok"]
            assert len(a._idle) == 2  # a's visitor is idle, holding the address's two slots
            srv.release(1)
            assert await get(b) == b"ok"  # not after queue_timeout_s: at once
            assert (len(a._idle), a.open, b.open) == (1, 1, 1)
            assert srv.max_open <= 2
            a.close()
            b.close()

    run(main)


def test_a_failed_connect_frees_its_slots() -> None:
    async def main() -> None:
        refused = 0

        async def connector() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            nonlocal refused
            refused += 1
            raise UpstreamError("connect: refused")

        caps = SharedCaps(1)
        pool = UpstreamPool("http://127.0.0.1:9", max_open=1, connector=connector)
        pool.shared = caps.join("k", pool)
        for _ in range(3):
            with pytest.raises(UpstreamError) as info:
                await get(pool)
            assert not isinstance(info.value, UpstreamBusy)
        assert refused == 3 and pool.open == 0
        pool.close()
        assert len(caps) == 0

    run(main)


def test_a_stale_connection_is_replaced_within_its_slot() -> None:
    async def main() -> None:
        async with held_server() as (srv, url):
            srv.close_after_response = True  # keep-alive promised, then closed
            caps = SharedCaps(1)
            pool = UpstreamPool(url, max_open=1, queue_timeout_s=1)
            pool.shared = caps.join("k", pool)
            srv.release(2)
            assert await get(pool) == b"ok"
            await until(lambda: srv.open == 0)
            assert await get(pool) == b"ok"  # the idle one was dead: retried on a new one
            cap = caps.get("k")
            assert cap is not None and (pool.open, cap.open, srv.accepted) == (1, 1, 2)
            pool.close()

    run(main)


def test_closing_the_pool_fails_its_waiters_and_frees_the_shared_slots() -> None:
    """The visitor connection ends while its requests wait and one is in flight."""

    async def main() -> None:
        async with held_server() as (srv, url):
            caps = SharedCaps(1)
            pool = UpstreamPool(url, max_open=1, queue_timeout_s=10)
            pool.shared = caps.join("k", pool)
            first = asyncio.create_task(get(pool))
            await until(lambda: srv.requests == 1)
            waiting = asyncio.create_task(get(pool))
            await until(lambda: len(pool._waiters) == 1)
            pool.close()
            with pytest.raises(UpstreamError) as info:
                await waiting
            assert not isinstance(info.value, UpstreamBusy)
            srv.release(1)
            assert await first == b"ok"  # the request in flight ends normally...
            await until(lambda: srv.open == 0)  # ...and its connection is closed
            assert pool.open == 0 and len(caps) == 0

    run(main)


def test_failures_carry_a_stable_reason_and_the_status_to_answer() -> None:
    """What a proxy answers is read from the error's reason and status, never from its text:
    an upstream that does not answer in time is a 504, one that refuses a 502, a pool whose
    caps are full a 503."""

    async def main() -> None:
        async with held_server() as (srv, url):
            slow = UpstreamPool(url, timeout_s=0.2)
            with pytest.raises(UpstreamError) as info:
                await get(slow)  # the server holds its answer: the read deadline passes
            assert (info.value.reason, info.value.status) == ("timeout", 504)
            busy = UpstreamPool(url, max_open=1, queue_timeout_s=0.1)
            first = asyncio.create_task(get(busy))
            await until(lambda: srv.requests == 2)
            with pytest.raises(UpstreamBusy) as busy_info:
                await get(busy)
            assert (busy_info.value.reason, busy_info.value.status) == ("busy", 503)
            srv.release(2)
            assert await first == b"ok"
            slow.close()
            busy.close()
        with socket.socket() as free:  # nothing listens on this port once it is closed
            free.bind(("127.0.0.1", 0))
            port = free.getsockname()[1]
        refused = UpstreamPool(f"http://127.0.0.1:{port}")
        with pytest.raises(UpstreamError) as refused_info:
            await get(refused)
        assert (refused_info.value.reason, refused_info.value.status) == ("connect_failed", 502)

    run(main)


@asynccontextmanager
async def scripted_server(answers: list[bytes]) -> AsyncIterator[tuple[list[int], str]]:
    """One answer per request, in order, each on whatever connection asks; returns the
    connection number each request came on."""
    conns: list[int] = []
    writers: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        me = len(writers)
        try:
            while answers:
                await reader.readuntil(b"\r\n\r\n")
                conns.append(me)
                answer = answers.pop(0)
                if not answer:
                    return  # closes without answering
                writer.write(answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield conns, f"http://127.0.0.1:{port}"
    finally:
        server.close()
        for w in writers:
            w.close()


def test_bytes_past_a_response_end_retire_its_connection() -> None:
    # an origin whose body is longer than its Content-Length: on a reused connection the rest
    # would be read as the next response (here a whole forged one); fails without the check
    # of h11's trailing data in UpstreamPool._release
    forged = b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nforged"
    answers = [
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok" + forged,
        b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nreal",
    ]

    async def main() -> None:
        async with scripted_server(answers) as (conns, url):
            pool = UpstreamPool(url, max_open=1, queue_timeout_s=2)
            assert await get(pool) == b"ok"
            assert await get(pool) == b"real"
            assert conns == [1, 2]
            pool.close()

    run(main)


def test_interim_responses_are_passed_on_then_the_final_one_returned() -> None:
    answers = [
        b"HTTP/1.1 103 Early Hints\r\nlink: </a.css>; rel=preload\r\n\r\n"
        b"HTTP/1.1 102 Processing\r\n\r\n"
        + b"HTTP/1.1 103 Early Hints\r\n\r\n" * 10
        + b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
    ]

    async def main() -> None:
        async with scripted_server(answers) as (_conns, url):
            pool = UpstreamPool(url, max_open=1, queue_timeout_s=2)
            seen: list[tuple[int, list[tuple[bytes, bytes]]]] = []

            async def interim(status: int, headers: list[tuple[bytes, bytes]]) -> None:
                seen.append((status, headers))

            response = await pool.request(b"GET", b"/", [(b"host", b"x")], None, interim)
            assert response.status == 200
            assert b"".join([c async for c in response.body()]) == b"ok"
            assert seen[0] == (103, [(b"link", b"</a.css>; rel=preload")])
            assert seen[1] == (102, [])
            assert len(seen) == 8  # MAX_INTERIM: the rest are dropped
            pool.close()

    run(main)


def test_an_upstream_that_closes_on_the_retry_too_is_an_upstream_error() -> None:
    # the idle connection is dead, and so is the fresh one the request is retried on: the
    # caller gets UpstreamError("closed") (it could serve stale-if-error), not the pool's
    # internal _Stale (which the edge logged as handler_error and answered 500)
    ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"

    async def main() -> None:
        async with scripted_server([ok, b"", b""]) as (conns, url):
            pool = UpstreamPool(url, max_open=1, queue_timeout_s=2)
            assert await get(pool) == b"ok"
            with pytest.raises(UpstreamError) as failed:
                await get(pool)
            assert failed.value.reason == "closed" and conns == [1, 1, 2]
            assert pool.open == 0
            pool.close()

    run(main)


def test_an_upstream_that_keeps_sending_interim_responses_hits_a_total_deadline() -> None:
    # attack review hops: an origin sending `102 Processing` every 0.1 s, never a final
    # response, reset the per-read timeout each time and held the request open for ever; the
    # final response's head now has timeout_s in all
    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        try:
            for _ in range(200):  # bounded: 20 s at most
                writer.write(b"HTTP/1.1 102 Processing\r\n\r\n")
                await writer.drain()
                await asyncio.sleep(0.1)
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(flood, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        pool = UpstreamPool(f"http://127.0.0.1:{port}", max_open=1, timeout_s=0.8)
        seen: list[int] = []

        async def interim(status: int, headers: list[tuple[bytes, bytes]]) -> None:
            seen.append(status)

        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(UpstreamError) as failed:
            await pool.request(b"GET", b"/", [(b"host", b"x")], None, interim)
        elapsed = loop.time() - t0
        assert failed.value.reason == "timeout" and failed.value.status == 504
        assert "final response" in str(failed.value)
        assert 0.7 < elapsed < 3, elapsed
        assert seen and set(seen) == {102}
        pool.close()
        server.close()
        await server.wait_closed()

    run(main)


def test_an_interim_response_reaches_the_client_without_cache_tag() -> None:
    """Attack review of issue 13, 6: a Cache-Tag in a 103 Early Hints reached visitors (the
    final response's was stripped, the interim's not), on the origin's and the keyless
    edge's paths alike: both send interims through interim_sender."""
    sent: list[tuple[int, list[tuple[bytes, bytes]]]] = []

    class Client:
        async def interim(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
            sent.append((status, headers))

    headers = [
        (b"link", b"</s.css>; rel=preload"),
        (b"cache-tag", b"secret-interim-tag"),
        (b"Cache-Tag", b"other"),
        (b"connection", b"close"),
    ]

    async def main() -> None:
        await interim_sender(cast(Any, Client()))(103, headers)

    asyncio.run(main())
    assert sent == [(103, [(b"link", b"</s.css>; rel=preload")])]
