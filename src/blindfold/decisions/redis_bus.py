"""Decisions and shared per-address counters through Redis, for many edges and origins.

- A decision is a key `blindfold:decision:<scope>:<value>` holding its JSON, with a TTL equal to
  its duration, and a message on the `blindfold:decisions` channel. An edge loads every key at
  start (and every `RESYNC_S`, since pub/sub loses messages across disconnects), then follows
  the channel.
- Per-address connection counts: every edge adds what it accepted in the last second to
  `blindfold:rate:<addr>:<window>` (INCRBY, expiring); an address whose total across edges in
  the window passes the per-address budget is refused by every edge until the window ends.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from blindfold.config.edge import EdgeConfig
from blindfold.decisions.core import Decision, DecisionStore, normalise
from blindfold.decisions.feed import BanSet
from blindfold.errors import ProtocolError
from blindfold.obs.log import JsonLog

PREFIX = "blindfold:decision:"
CHANNEL = "blindfold:decisions"
RATE_PREFIX = "blindfold:rate:"
RESYNC_S = 30.0
RATE_WINDOW_S = 10


def _client(url: str) -> aioredis.Redis:
    return aioredis.from_url(
        url, socket_timeout=5, socket_connect_timeout=5, health_check_interval=15
    )


def decision_json(d: Decision) -> str:
    return json.dumps(
        {
            "scope": d.scope,
            "value": d.value,
            "type": d.type,
            "reason": d.reason,
            "until": d.until,
            "origin": d.origin,
        }
    )


class RedisPublisher:
    """The origin side: every decision becomes a key with a TTL and a channel message."""

    def __init__(self, url: str, log: JsonLog) -> None:
        self.url = url
        self.log = log
        self.redis = _client(url)
        self.tasks: set[asyncio.Task[None]] = set()
        self.errors = 0

    async def start(self, store: DecisionStore) -> None:
        try:
            await self.redis.ping()
        except (RedisError, OSError) as exc:
            self.log.emit("redis_down", url=self.url, error=str(exc))

    def publish(self, decision: Decision, now: float) -> None:
        task = asyncio.get_running_loop().create_task(self._publish(decision, now))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _publish(self, d: Decision, now: float) -> None:
        ttl = max(1, int(d.until - now + 0.999))
        body = decision_json(d)
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.set(f"{PREFIX}{d.scope}:{d.value}", body, ex=ttl)
                pipe.publish(CHANNEL, body)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            self.errors += 1
            self.log.emit("redis_publish_failed", value=d.value, error=str(exc))

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        await self.redis.aclose()


def _parse(body: bytes | str) -> tuple[Any, str, float, str] | None:
    try:
        item = json.loads(body)
        scope, value = normalise(str(item["scope"]), str(item["value"]))
        until = float(item["until"])
        if not math.isfinite(until):  # inf would ban forever; NaN compares false
            return None
        return scope, value, until, str(item.get("reason", ""))[:200]
    except (ValueError, KeyError, TypeError, ProtocolError, RecursionError):
        return None


class RedisFeed:
    """The edge side: follow decisions in Redis and share per-address connection counts."""

    kind = "redis"

    def __init__(self, url: str, bans: BanSet, log: JsonLog, config: EdgeConfig) -> None:
        self.url = url
        self.bans = bans
        self.log = log
        self.redis = _client(url)
        self.up = False
        self.polls: dict[str, int] = {}
        self.rate_budget = (
            config.per_ip_rate_per_s * RATE_WINDOW_S + config.per_ip_burst
            if config.per_ip_rate_per_s > 0
            else 0.0
        )
        self.shared_refusals = 0

    async def run(self) -> None:
        while True:
            try:
                await self._follow()
            except (RedisError, OSError) as exc:
                self._count("error")
                if self.up:
                    self.log.emit(
                        "decisions_source_down",
                        url=self.url,
                        error=str(exc),
                        enforcing=len(self.bans.active),
                    )
                self.up = False
            await asyncio.sleep(1.0)

    async def _sync(self) -> None:
        now = time.time()
        new = []
        keys = [k async for k in self.redis.scan_iter(match=PREFIX + "*", count=1000)]
        for i in range(0, len(keys), 500):
            for body in await self.redis.mget(keys[i : i + 500]):
                parsed = _parse(body) if body is not None else None
                if parsed is not None and parsed[2] > now:
                    new.append((parsed[0], parsed[1], parsed[2] - now, parsed[3]))
        self.bans.apply("redis", new, [], now, replace=True)
        self._count("ok")

    async def _follow(self) -> None:
        pubsub = self.redis.pubsub()
        try:
            await pubsub.subscribe(CHANNEL)
            await self._sync()
            if not self.up:
                self.up = True
                self.log.emit("decisions_source_up", url=self.url, active=len(self.bans.active))
            next_sync = time.monotonic() + RESYNC_S
            while True:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if message is not None and message.get("type") == "message":
                    parsed = _parse(message["data"])
                    now = time.time()
                    if parsed is not None and parsed[2] > now:
                        self.bans.apply(
                            "redis", [(parsed[0], parsed[1], parsed[2] - now, parsed[3])], [], now
                        )
                if time.monotonic() >= next_sync:
                    await self._sync()
                    next_sync = time.monotonic() + RESYNC_S
        finally:
            await pubsub.aclose()

    async def share_rates(self, counts: dict[str, int]) -> list[str]:
        """Add this edge's new-connection counts; return the addresses over the shared budget
        (they are refused by every edge until the window ends)."""
        if not counts or not self.rate_budget:
            return []
        window = int(time.time()) // RATE_WINDOW_S
        items = list(counts.items())
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for ip, n in items:
                    key = f"{RATE_PREFIX}{ip}:{window}"
                    pipe.incrby(key, n)
                    pipe.expire(key, RATE_WINDOW_S * 2)
                results = await pipe.execute()
        except (RedisError, OSError):
            self._count("rate_error")
            return []
        over = [
            ip
            for (ip, _n), total in zip(items, results[::2], strict=True)
            if total > self.rate_budget and ("ip", ip) not in self.bans.active
        ]
        if over:
            # publish as short decisions: an edge that has not reported this address since
            # the budget was passed learns it through the channel like any other ban
            now = time.time()
            until = (window + 1) * RATE_WINDOW_S
            try:
                async with self.redis.pipeline(transaction=False) as pipe:
                    for ip in over:
                        body = json.dumps(
                            {
                                "scope": "ip",
                                "value": ip,
                                "type": "ban",
                                "reason": "shared_rate",
                                "until": until,
                                "origin": "edge",
                            }
                        )
                        pipe.set(f"{PREFIX}ip:{ip}", body, ex=max(1, int(until - now + 1)))
                        pipe.publish(CHANNEL, body)
                    await pipe.execute()
            except (RedisError, OSError):
                self._count("rate_error")
            self.bans.apply(
                "redis", [("ip", ip, until - now, "shared_rate") for ip in over], [], now
            )
            self.shared_refusals += len(over)
        return over

    def _count(self, result: str) -> None:
        self.polls[result] = self.polls.get(result, 0) + 1

    async def close(self) -> None:
        await self.redis.aclose()
