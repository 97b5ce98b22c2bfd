"""io.compat.release_transport: a closed asyncio socket transport is freed by reference
counting, not left for the cyclic collector (CPython's _SelectorSocketTransport keeps a bound
method of itself)."""

from __future__ import annotations

import asyncio
import gc
import socket
import weakref

from blindfold.io import compat


def _closed_transport_survives(release: bool) -> bool:
    async def main() -> weakref.ref[asyncio.Transport]:
        loop = asyncio.get_running_loop()
        a, b = socket.socketpair()
        a.setblocking(False)
        lost = loop.create_future()

        class Proto(asyncio.Protocol):
            def connection_lost(self, exc: Exception | None) -> None:
                lost.set_result(None)

        transport = compat.socket_transport(loop, a, Proto())
        await asyncio.sleep(0)  # connection_made, reader added
        b.close()
        await asyncio.wait_for(lost, 5)  # EOF: the transport closes itself
        await asyncio.sleep(0)
        if release:
            compat.release_transport(transport)
        ref = weakref.ref(transport)
        del transport
        return ref

    gc.collect()
    gc.disable()
    try:
        ref = asyncio.run(main())
        return ref() is not None
    finally:
        gc.enable()
        gc.collect()


def test_a_released_transport_is_freed_at_once() -> None:
    assert not _closed_transport_survives(release=True)


def test_without_release_the_cycle_keeps_it() -> None:
    """What release_transport is for (if CPython drops the cycle, this says so)."""
    assert _closed_transport_survives(release=False)
