"""Decisions and shared per-address counters through Redis, for many edges and origins.

Every edge can write to a shared Redis (and a compromised one will), so nothing there is
believed for being there:
- A decision is a key `blindfold:decision:<scope>:<value>` holding the decision signed by the
  origin that made it (blindfold.decisions.signed), with a TTL equal to its duration, and the
  same text as a message on the `blindfold:decisions` channel. Only origins write them. Every
  `WATCH_S` the origin checks that its newest decision's key is still there (`SET ... XX
  KEEPTTL` of the same signed text: a no-op when it is); when it is not (Redis restarted
  without its data, or the key was deleted) it writes and publishes its whole set again. An
  edge verifies every one against the origins' public keys it is configured with; unsigned,
  badly signed, expired and replayed ones are dropped and counted. It reads every key at
  start, after every reconnection (pub/sub loses messages across them) and every `RESYNC_S`,
  then follows the channel.
- Per-address connection counts: every edge adds what it accepted in the last second to
  `blindfold:rate:<addr>:<window>` (INCRBY, expiring; IPv6 per prefix) and reads the totals
  of the addresses it counted in the window; one over the per-address budget it refuses itself
  until the window ends. These counters are the only keys edges write.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from blindfold.config.edge import DecisionSourceConfig, EdgeConfig
from blindfold.core.ratelimit import TokenBucket
from blindfold.decisions.bans import BanTable
from blindfold.decisions.core import Decision, DecisionStore, ban_target, normalise
from blindfold.decisions.signed import DecisionSigner, DecisionVerifier, load_public_key
from blindfold.errors import ProtocolError
from blindfold.obs.log import JsonLog

PREFIX = "blindfold:decision:"
CHANNEL = "blindfold:decisions"
RATE_PREFIX = "blindfold:rate:"
RESYNC_S = 300.0
WATCH_S = 1.0  # the origin checks that Redis still holds its decisions this often
RATE_WINDOW_S = 10
BATCH = 500
MAX_REPORTED = 50_000  # addresses whose shared total an edge follows within one window


def client(url: str, ca: str = "") -> aioredis.Redis:
    extra: dict[str, Any] = {}
    if urlsplit(url).scheme == "rediss" and ca:
        extra["ssl_ca_certs"] = ca
    return aioredis.from_url(
        url, socket_timeout=5, socket_connect_timeout=5, health_check_interval=15, **extra
    )


class RedisPublisher:
    """The origin side: every decision becomes a signed key with a TTL and a channel
    message."""

    def __init__(
        self,
        url: str,
        ca: str,
        signer: DecisionSigner,
        log: JsonLog,
        store: DecisionStore | None = None,
    ) -> None:
        self.url = url
        self.log = log
        self.signer = signer
        self.redis = client(url, ca)
        self.tasks: set[asyncio.Task[None]] = set()
        self.errors = 0
        self.store = store  # what Redis must hold: checked every WATCH_S, written again if lost
        self.republished = 0
        self._watch: asyncio.Task[None] | None = None

    async def start(self) -> None:
        try:
            await self.redis.ping()
        except (RedisError, OSError) as exc:
            self.log.emit("redis_down", url=_redacted(self.url), error=str(exc))
        if self.store is not None:
            self._watch = asyncio.get_running_loop().create_task(self._watch_loop())

    async def _watch_loop(self) -> None:
        down = False
        while True:
            try:
                await self.check(time.time())
                down = False
            except (RedisError, OSError) as exc:
                if not down:
                    down = True
                    self.log.emit("redis_down", url=_redacted(self.url), error=str(exc))
            except Exception as exc:  # the watch must outlive any one failure, and say so
                self.log.emit("redis_watch_failed", error=f"{type(exc).__name__}: {exc}"[:300])
            await asyncio.sleep(WATCH_S)

    async def check(self, now: float) -> int:
        """If Redis no longer holds our newest decision, write and publish every active one
        again; returns how many. Edges that followed Redis through its restart resynced to an
        empty set and take them back from the channel."""
        assert self.store is not None
        newest = itertools.islice(reversed(self.store.decisions.values()), 100)
        probe = next((d for d in newest if d.until - now > 2.0), None)  # not about to expire
        if probe is None:
            return 0
        body = self.signer.sign(probe.scope, probe.value, probe.until, probe.created, probe.reason)
        # the same signed text (Ed25519 is deterministic) over itself: a no-op while it is there
        if await self.redis.set(
            f"{PREFIX}{probe.scope}:{probe.value}", body, xx=True, keepttl=True
        ):
            return 0
        decisions = [d for d in self.store.decisions.values() if d.until - now >= 1.0]
        for i in range(0, len(decisions), BATCH):
            async with self.redis.pipeline(transaction=False) as pipe:
                for d in decisions[i : i + BATCH]:
                    text = self.signer.sign(d.scope, d.value, d.until, d.created, d.reason)
                    pipe.set(f"{PREFIX}{d.scope}:{d.value}", text, ex=max(1, int(d.until - now)))
                    pipe.publish(CHANNEL, text)
                await pipe.execute()
        self.republished += len(decisions)
        self.log.emit(
            "redis_republished",
            decisions=len(decisions),
            reason=f"the key of decision {probe.id} ({probe.value}) was gone",
        )
        return len(decisions)

    def publish(self, decision: Decision, now: float) -> None:
        task = asyncio.get_running_loop().create_task(self._publish(decision, now))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _publish(self, d: Decision, now: float) -> None:
        ttl = max(1, int(d.until - now + 0.999))
        body = self.signer.sign(d.scope, d.value, d.until, d.created, d.reason)
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.set(f"{PREFIX}{d.scope}:{d.value}", body, ex=ttl)
                pipe.publish(CHANNEL, body)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            self.errors += 1
            self.log.emit("redis_publish_failed", value=d.value, error=str(exc))

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        for task in list(self.tasks):
            task.cancel()
        await self.redis.aclose()


def _redacted(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@")).geturl()


class RedisFeed:
    """The edge side: follow signed decisions in Redis and share per-address counts."""

    kind = "redis"

    def __init__(
        self, cfg: DecisionSourceConfig, table: BanTable, log: JsonLog, config: EdgeConfig
    ) -> None:
        self.url = _redacted(cfg.redis_url)
        self.table = table
        self.log = log
        self.verifier = DecisionVerifier(
            [
                load_public_key(path, f"edge.decisions.signer_public_keys[{i}]")
                for i, path in enumerate(cfg.signer_public_keys)
            ]
        )
        self.redis = client(cfg.redis_url, cfg.redis_ca)
        self.up = False
        self.polls: dict[str, int] = {}
        self.ipv6_prefix_len = config.ipv6_prefix_len
        self.rate_budget = (
            config.per_ip_rate_per_s * RATE_WINDOW_S + config.per_ip_burst
            if config.per_ip_rate_per_s > 0
            else 0.0
        )
        self.shared_refusals = 0
        self._window = 0
        self._reported: set[str] = set()  # addresses counted here in this window
        self._drop_log = TokenBucket(1.0, 20, time.monotonic())

    async def run(self) -> None:
        while True:
            try:
                await self._follow()
            except (RedisError, OSError) as exc:
                self.down(exc)
            await asyncio.sleep(1.0)

    def down(self, exc: BaseException) -> None:
        self._count("error")
        if self.up:
            self.log.emit(
                "decisions_source_down",
                url=self.url,
                reason="error",
                error=f"{type(exc).__name__}: {exc}"[:300],
                enforcing=self.table.size,
            )
        self.up = False
        self.table.abort_resync("redis")

    def admit(self, body: bytes | str, now: float) -> None:
        """One decision read from Redis: believed only if signed by a known origin."""
        try:
            d = self.verifier.admit(body, now)
        except ProtocolError as exc:
            self._dropped(exc.reason, str(exc))
            return
        except Exception as exc:
            self._dropped("bad_decision", f"{type(exc).__name__}: {exc}")
            return
        if d is not None:
            self.table.update("redis", [(d.scope, d.value, d.until - now, d.reason)], [], now)

    def _dropped(self, reason: str, detail: str) -> None:
        self.table.refuse(reason)
        if self._drop_log.allow(time.monotonic()):
            self.log.log("decision_dropped", source="redis", reason=reason, detail=detail[:200])

    async def _sync(self) -> None:
        """Read every decision key: known ones (already verified, still valid) are kept
        without a second verification, unknown ones are verified; what is no longer there
        is dropped."""
        now = time.time()
        self.table.begin_resync("redis")
        try:
            unknown: list[bytes] = []
            kept: list[tuple[str, str, float, str]] = []
            async for raw in self.redis.scan_iter(match=PREFIX + "*", count=1000):
                name = raw.decode("latin-1") if isinstance(raw, bytes) else str(raw)
                scope, _, value = name[len(PREFIX) :].partition(":")
                until = self._held_until(scope, value, now)
                if until is not None:
                    kept.append((scope, value, until - now, ""))
                else:
                    unknown.append(raw)
                if len(kept) >= BATCH:
                    self.table.update("redis", kept, [], now)
                    kept = []
            self.table.update("redis", kept, [], now)
            for i in range(0, len(unknown), BATCH):
                for body in await self.redis.mget(unknown[i : i + BATCH]):
                    if body is not None:
                        self.admit(body, time.time())
        except BaseException:
            self.table.abort_resync("redis")
            raise
        self.table.end_resync("redis")
        self.verifier.sweep(now)
        self._count("ok")

    def _held_until(self, scope: str, value: str, now: float) -> float | None:
        try:
            key = normalise(scope, value)
        except ProtocolError:
            return None
        best = None
        for signer in self.verifier.keys:
            held = self.verifier.held.get((signer, *key))
            if held is not None and held[1] > now and (best is None or held[1] > best):
                best = held[1]
        return best

    async def _follow(self) -> None:
        pubsub = self.redis.pubsub()
        try:
            await pubsub.subscribe(CHANNEL)
            await self._sync()
            if not self.up:
                self.up = True
                self.log.emit("decisions_source_up", url=self.url, active=self.table.size)
            next_sync = time.monotonic() + RESYNC_S
            while True:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if message is not None and message.get("type") == "message":
                    self.admit(message["data"], time.time())
                if time.monotonic() >= next_sync:
                    await self._sync()
                    next_sync = time.monotonic() + RESYNC_S
        finally:
            await pubsub.aclose()

    async def share_rates(self, counts: dict[str, int]) -> list[str]:
        """Add this edge's new-connection counts (IPv6 per prefix) and read the totals of
        every address this edge has reported in the current window (so it learns when the
        other edges' connections push one over); return the addresses over the shared
        budget, which this edge refuses until the window ends."""
        if not self.rate_budget:
            return []
        window = int(time.time()) // RATE_WINDOW_S
        if window != self._window:
            self._window, self._reported = window, set()
        totals: dict[str, int] = {}
        for ip, n in counts.items():
            try:
                target = ban_target(ip, self.ipv6_prefix_len)
            except ProtocolError:
                continue
            totals[target] = totals.get(target, 0) + n
        for target in self._reported:
            totals.setdefault(target, 0)  # INCRBY 0: read the total other edges made
        if not totals:
            return []
        items = list(totals.items())
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for target, n in items:
                    key = f"{RATE_PREFIX}{target}:{window}"
                    pipe.incrby(key, n)
                    pipe.expire(key, RATE_WINDOW_S * 2)
                results = await pipe.execute()
        except (RedisError, OSError):
            self._count("rate_error")
            return []
        over = []
        for (target, _n), total in zip(items, results[::2], strict=True):
            if total > self.rate_budget:
                over.append(target)
                self._reported.discard(target)  # refused from now on: nothing more to read
            elif len(self._reported) < MAX_REPORTED:
                self._reported.add(target)
        if over:
            now = time.time()
            until = (window + 1) * RATE_WINDOW_S
            self.table.update(
                "shared_rate",
                [("range" if "/" in t else "ip", t, until - now, "shared_rate") for t in over],
                [],
                now,
            )
            self.shared_refusals += len(over)
        return over

    def _count(self, result: str) -> None:
        self.polls[result] = self.polls.get(result, 0) + 1

    async def close(self) -> None:
        await self.redis.aclose()
