"""The caps on the origin pulls one visitor of a blind route starts (edge.modes.blind.Slots):
per key, in order, until a deadline (atk-visitor #1)."""

from __future__ import annotations

import asyncio

from blindfold.edge.modes.blind import Slots


def test_a_key_at_its_cap_waits_and_other_keys_do_not() -> None:
    async def run() -> None:
        loop = asyncio.get_running_loop()
        slots = Slots(2)
        soon = loop.time() + 0.05
        assert await slots.acquire("a", soon)
        assert await slots.acquire("a", soon)
        assert not await slots.acquire("a", soon)  # at its cap: refused at the deadline
        assert await slots.acquire("b", soon)  # another address is not held up
        # a waiter gets the slot given back, in order
        first = loop.create_task(slots.acquire("a", loop.time() + 5))
        second = loop.create_task(slots.acquire("a", loop.time() + 5))
        await asyncio.sleep(0)
        slots.release("a")
        assert await first
        assert not second.done()
        slots.release("a")
        assert await second
        for _ in range(2):
            slots.release("a")
        slots.release("b")
        assert slots.held == {} and slots.waiters == {}  # nothing kept for idle addresses

    asyncio.run(run())


def test_a_waiter_that_leaves_passes_its_slot_on() -> None:
    async def run() -> None:
        loop = asyncio.get_running_loop()
        slots = Slots(1)
        assert await slots.acquire("a", loop.time() + 1)
        gone = loop.create_task(slots.acquire("a", loop.time() + 5))
        stays = loop.create_task(slots.acquire("a", loop.time() + 5))
        await asyncio.sleep(0)
        gone.cancel()
        await asyncio.gather(gone, return_exceptions=True)
        slots.release("a")
        assert await stays
        slots.release("a")
        assert slots.held == {} and slots.waiters == {}

    asyncio.run(run())
