"""Decisions and shared per-address counters through Redis, for many edges and origins.

Every edge can write to a shared Redis (and a compromised one will), so nothing there is
believed for being there:
- A decision is a key `blindfold:decision:<scope>:<value>` holding the decision signed by the
  origin that made it (blindfold.decisions.signed), with a TTL equal to its duration, and the
  same text as a message on the `blindfold:decisions` channel. Only origins write them. Every
  `WATCH_S` the origin checks that its newest decision's key is still there (`EXISTS`); when
  it is not (Redis restarted
  without its data, or the key was deleted) it writes and publishes its whole set again. An
  edge verifies every one against the origins' public keys it is configured with; unsigned,
  badly signed, expired and replayed ones are dropped and counted. It reads every key at
  start, after every reconnection (pub/sub loses messages across them) and every `RESYNC_S`,
  then follows the channel. A verified ban is enforced until its signed `until`, or until a
  signed lift of it arrives: never lifted because its key is gone (a Redis that evicts keys
  under memory pressure, filled by an edge, would otherwise lift the origin's bans).
- Per-address connection counts: every edge adds what it accepted in the last second to its
  own counter `blindfold:rate:<edge>:<addr>:<window>` (INCRBY, expiring; IPv6 per prefix),
  which the ACL lets only that edge write, and reads its peers' counters of the addresses it
  counted in the window. The total is the sum of every edge's count, each taken as at least 0
  (a negative count exempts nobody); an address over the per-address budget it refuses itself
  until the window ends. These counters, preferably on a Redis of their own, are the only keys
  edges write.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.exceptions import NoPermissionError, RedisError, ResponseError

from blindfold.config.edge import DecisionSourceConfig, EdgeConfig
from blindfold.core.ratelimit import TokenBucket
from blindfold.decisions.bans import BanTable
from blindfold.decisions.core import Decision, DecisionStore, ban_target
from blindfold.decisions.purge import (
    HEAD_EVERY_S,
    HEAD_WAIT_S,
    MAX_FETCH_BYTES,
    MAX_PURGE_BYTES,
    PURGE_KEY_TTL_S,
    Need,
    Purge,
    PurgeSequence,
    is_signed_head,
    is_signed_purge,
    new_epoch,
    open_head,
    open_signed_purge,
    purge_key,
    sign_head,
    sign_purge,
)
from blindfold.decisions.signed import (
    DecisionSigner,
    DecisionVerifier,
    SignedDecision,
    load_public_key,
)
from blindfold.errors import ProtocolError
from blindfold.obs.log import JsonLog

PREFIX = "blindfold:decision:"
CHANNEL = "blindfold:decisions"
RATE_PREFIX = "blindfold:rate:"
RESYNC_S = 300.0
WATCH_S = 1.0  # the origin checks that Redis still holds its decisions this often
PRUNE_EVERY_S = 5.0  # an edge forgets origins' silent lives this often (PurgeSequence.prune)
FETCH_BATCH = 20  # purge keys read per round trip (at most MAX_PURGE_BYTES each)
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


def rate_key(edge: str, target: str, window: int) -> str:
    return f"{RATE_PREFIX}{edge}:{target}:{window}"


def shared_total(values: Iterable[object]) -> tuple[int, int]:
    """(total, bad) of one address's counters in one window, one value per edge as Redis
    answered (an int from INCRBY, bytes from MGET, None for no key, an exception for a
    failed command). Each edge's count is taken as at least 0: a compromised edge writing
    -10^9 into its own counter must not exempt an address from the others' counts. What is
    not a count (an error, a non-integer) adds nothing and is counted as bad. Python's ints
    do not overflow: a counter at 2^63-1 only makes the address's total large."""
    total = bad = 0
    for value in values:
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, bytes, str)):
            bad += 1
            continue
        try:
            n = int(value)
        except ValueError:
            bad += 1
            continue
        if n < 0:
            bad += 1
            continue
        total += n
    return total, bad


class RedisPublisher:
    """The origin side: every decision becomes a signed key with a TTL and a channel message;
    a lift replaces the ban's key (until the ban's own end) and goes out on the channel."""

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
        self._purge_keys = True  # False once the ACL refused them: purges on the channel only
        # purges are numbered in this life of the origin (decisions.purge.PurgeSequence);
        # the lock keeps their numbers in the order Redis gets them, HEADs after them
        self.epoch = new_epoch()
        self.seq = 0
        self._purge_lock = asyncio.Lock()
        self._heads: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self.store is not None:  # also when Redis is down now: it fills it once it is up
            self._watch = asyncio.get_running_loop().create_task(self._watch_loop())
        self._heads = asyncio.get_running_loop().create_task(self._head_loop())
        try:
            await self.redis.ping()
        except (RedisError, OSError) as exc:
            self.log.emit("redis_down", url=_redacted(self.url), error=str(exc))
            return
        await self._check_eviction()

    async def _check_eviction(self) -> None:
        """A Redis that evicts keys under memory pressure may evict decisions, and edges that
        start (or reconnect) then never see those bans: say so. Needs INFO, which the
        documented ACL gives the origin; without it nothing is said."""
        try:
            info = await self.redis.info("memory")
        except NoPermissionError:
            return
        except (RedisError, OSError):
            return
        policy = str(info.get("maxmemory_policy", ""))
        if info.get("maxmemory") and policy != "noeviction":
            self.log.emit(
                "config_warning",
                problem=f"the decisions' Redis has maxmemory with maxmemory-policy {policy}: "
                "decision keys may be evicted (edges starting then miss those bans); use "
                "noeviction, and a Redis of their own for the edges' counters "
                "(edge.decisions.rate_redis_url)",
            )

    async def _watch_loop(self) -> None:
        down = False
        while True:
            try:
                await self.check(time.time())
                down = False
            except NoPermissionError:
                self.log.emit(
                    "config_warning",
                    problem="the decisions' Redis ACL does not give the origin EXISTS: it "
                    "cannot notice a Redis that lost its decisions (see docs/decisions.md)",
                )
                return
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
        # EXISTS, not a rewrite: the key may hold a signed lift (or another origin's ban of
        # the same network), which a rewrite would undo
        if await self.redis.exists(f"{PREFIX}{probe.scope}:{probe.value}"):
            return 0
        decisions = [d for d in self.store.decisions.values() if d.until - now >= 1.0]
        for i in range(0, len(decisions), BATCH):
            async with self.redis.pipeline(transaction=False) as pipe:
                for d in decisions[i : i + BATCH]:
                    text = self._signed(d)
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

    def _signed(self, d: Decision) -> str:
        return self.signer.sign(
            d.scope, d.value, d.until, d.created, d.reason, d.edge, d.edge_address, operator_of(d)
        )

    def publish(self, decision: Decision, now: float) -> None:
        self._spawn(self._publish(decision, self._signed(decision), now))

    def publish_lift(self, decision: Decision, now: float, operator: str = "") -> None:
        """The end, now, of `decision` (removed from the origin's store) at every edge;
        `operator`: the key id of the operator who deleted it."""
        d = decision
        body = self.signer.sign_lift(d.scope, d.value, d.until, now, "lifted", operator)
        self._spawn(self._publish(d, body, now))

    def publish_purge(self, purge: Purge) -> None:
        """A purge, numbered in this origin's life, signed, stored under its own key (an edge
        that lost the channel reads it there) and published on the channel, at once (MULTI)
        (decisions.purge.PurgeSequence; docs/decisions.md)."""
        self._spawn(self._publish_purge(purge))

    async def _publish_purge(self, purge: Purge) -> None:
        async with self._purge_lock:
            self.seq += 1
            numbered = replace(purge, epoch=self.epoch, seq=self.seq)
            body = sign_purge(self.signer.key, numbered)
            key = purge_key(self.signer.signer, self.epoch, self.seq)
            if self._purge_keys:
                try:
                    async with self.redis.pipeline(transaction=True) as pipe:
                        pipe.set(key, body, ex=PURGE_KEY_TTL_S)
                        pipe.publish(CHANNEL, body)
                        await pipe.execute()
                    return
                except ResponseError as exc:
                    if "NOPERM" not in str(exc) and not isinstance(exc, NoPermissionError):
                        self.errors += 1
                        self.log.emit("redis_publish_failed", value=purge.id, error=str(exc))
                        return
                    self._purge_keys = False
                    self.log.emit(
                        "config_warning",
                        problem="the decisions' Redis ACL does not let the origin store its "
                        "purges (SET blindfold:purge:*): edges that lose the channel empty "
                        "their caches (see docs/decisions.md)",
                    )
                except (RedisError, OSError) as exc:
                    self.errors += 1
                    self.log.emit("redis_publish_failed", value=purge.id, error=str(exc))
                    return
            await self._publish_message(body, purge.id)

    async def publish_head(self, final: bool = False) -> None:
        """This origin's HEAD (its epoch and last purge's number), signed, on the channel."""
        async with self._purge_lock:
            head = sign_head(self.signer.key, self.epoch, self.seq, time.time(), final)
            await self._publish_message(head, "head")

    async def _head_loop(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self.publish_head(), HEAD_EVERY_S)
            except TimeoutError:
                pass
            except Exception as exc:  # the heads must outlive any one failure, and say so
                self.log.emit("redis_head_failed", error=f"{type(exc).__name__}: {exc}"[:300])
            await asyncio.sleep(HEAD_EVERY_S)

    async def _publish_message(self, body: str, what: str) -> None:
        try:
            await self.redis.publish(CHANNEL, body)
        except (RedisError, OSError) as exc:
            self.errors += 1
            self.log.emit("redis_publish_failed", value=what, error=str(exc))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _publish(self, d: Decision, body: str, now: float) -> None:
        ttl = max(1, int(d.until - now + 0.999))
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
        if self._heads is not None:
            self._heads.cancel()
        # the last word of this life: edges that heard it take the next life's purges from 1
        # instead of emptying their caches (the purges in flight first: the lock)
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=2.0)
        try:
            await asyncio.wait_for(self.publish_head(final=True), 2.0)
        except (TimeoutError, RedisError, OSError):
            pass
        for task in list(self.tasks):
            task.cancel()
        await self.redis.aclose()


def operator_of(d: Decision) -> str:
    """The operator key id of a decision an operator made (origin 'operator:<id>'), or ''."""
    return d.origin[len("operator:") :] if d.origin.startswith("operator:") else ""


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
        self.rates = client(cfg.rate_redis_url, cfg.redis_ca) if cfg.rate_redis_url else self.redis
        self.name = cfg.counter_name
        self.peers = tuple(p for p in dict.fromkeys(cfg.rate_peers) if p != self.name)
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
        # decision key -> digest of the value last read there: a full resync verifies only
        # what changed (bounded: a Redis full of junk keys costs this edge no memory)
        self._digests: dict[bytes, bytes] = {}
        self._max_digests = 2 * table.limits.max_bans + 10_000
        # purges (decisions.purge): signed by the same origins, on the same channel
        self.on_purge: Callable[[Purge, str], None] | None = None
        # called when this edge cannot show it has every purge the origins numbered
        # (PurgeSequence): the master empties every cache unless an HTTPS stream carries a
        # purge log
        self.on_gap: Callable[[], None] | None = None
        self._connected_before = False
        self.seqs = PurgeSequence(started=time.time())  # caches are empty until now
        self._head_due = 0.0  # monotonic: after a reconnection, the HEADs are awaited until
        self._down_at = 0.0  # when the channel was lost (this edge's clock)
        self._caught_up_now = 0
        self.caught_up = 0  # purges read from their keys after gaps

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
        if not self._down_at:
            self._down_at = time.time()

    def admit(self, body: bytes | str, now: float) -> SignedDecision | None:
        """One decision or lift read from Redis: believed only if signed by a known origin."""
        try:
            d = self.verifier.admit(body, now)
        except ProtocolError as exc:
            self._dropped(exc.reason, str(exc))
            return None
        except Exception as exc:
            self._dropped("bad_decision", f"{type(exc).__name__}: {exc}")
            return None
        if d is None:
            return None
        if d.operator:  # what an operator did, as this edge applied it
            self.log.emit(
                "operator_decision",
                source="redis",
                operator=d.operator,
                action="delete" if d.lift else "add",
                value=d.value,
                until=d.until,
            )
        if not d.lift:
            self.table.update("redis", [(d.scope, d.value, d.until - now, d.reason)], [], now)
            return d
        # a lift ends this signer's ban; another signer's may still hold the address
        self.table.update("redis", [], [(d.scope, d.value)], now)
        left = self.verifier.holds_until(d.scope, d.value, now)
        if left is not None:
            self.table.update("redis", [(d.scope, d.value, left - now, "")], [], now)
        self.log.log("decision_lifted", source="redis", value=d.value, signer=d.signer)
        return d

    def admit_purge(self, body: bytes | str, now: float) -> tuple[Purge | None, Need]:
        """A purge from the channel: applied only if signed by a known origin, and recent
        (older ones are replays: decisions.purge.MAX_SIGNED_AGE_S); and what its number says
        this edge missed."""
        try:
            signer, purge = open_signed_purge(body, self.verifier.keys, now)
        except ProtocolError as exc:
            self._purge_dropped(exc.reason, str(exc))
            return None, Need()
        need = self.seqs.on_purge(signer, purge, now)
        if need.dropped:  # a replay: of a purge heard (the master counts it a duplicate),
            self._count(f"purge_{need.dropped}")  # or of a life that is over (dropped)
            if need.dropped != "seen":
                return None, Need()
            need = Need()
        if self.on_purge is not None:
            self.on_purge(purge, "redis")
        return purge, need

    def admit_head(self, body: bytes | str, now: float) -> Need:
        try:
            head = open_head(body, self.verifier.keys, now)
        except ProtocolError as exc:
            self._purge_dropped(f"head_{exc.reason}", str(exc))
            return Need()
        need = self.seqs.on_head(head, now)
        if need.dropped:
            self._count(f"head_{need.dropped}")
            return Need()
        return need

    def _purge_dropped(self, reason: str, detail: str) -> None:
        self._count(f"purge_{reason}")
        if self._drop_log.allow(time.monotonic()):
            self.log.emit("purge_dropped", source="redis", reason=reason, detail=detail[:200])

    async def _fetch(self, need: Need) -> tuple[list[Purge], str]:
        """Read and verify the purges `need` names, FETCH_BATCH per round trip, each key read
        with GETRANGE 0 MAX_PURGE_BYTES: one byte more than a purge can be, however large the
        value (an origin's Redis user can SET 500 MB there; the edge reads 512 KiB). Each
        batch is checked as it arrives (at most one batch of values held), the first bad
        one ends the read, and more than MAX_FETCH_BYTES in all is a loss. -> (the purges,
        lost: '' or why)."""
        purges: list[Purge] = []
        read = 0
        wanted = need.fetch
        for i in range(0, len(wanted), FETCH_BATCH):
            batch = wanted[i : i + FETCH_BATCH]
            async with self.redis.pipeline(transaction=False) as pipe:
                for signer, epoch, seq in batch:
                    pipe.getrange(purge_key(signer, epoch, seq), 0, MAX_PURGE_BYTES)
                values = await pipe.execute(raise_on_error=False)
            if any(isinstance(v, NoPermissionError) or "NOPERM" in str(v) for v in values):
                self.log.emit(
                    "config_warning",
                    problem="the decisions' Redis ACL does not let this edge read the purges' "
                    "keys (blindfold:purge:*: getrange): it empties its caches after every gap "
                    "(see docs/decisions.md)",
                )
            read += sum(len(v) for v in values if isinstance(v, (bytes, str)))
            if read > MAX_FETCH_BYTES:
                return purges, "too_big"
            got, lost = self.seqs.check(
                batch, values, self.verifier.keys, time.time(), since=need.since
            )
            del values
            purges += got
            if lost:
                return purges, lost
            if need.since and len(got) < len(batch):
                return purges, ""  # walked back to a purge the emptying covers
        return purges, "gap_too_big" if need.cut else ""

    async def _settle(self, need: Need) -> None:
        """Do what `need` says: read and apply the purges this edge missed, or empty every
        cache (on_gap) when it cannot show it has them."""
        lost = need.lost
        if need.fetch and not lost:
            try:
                purges, lost = await self._fetch(need)
            except (RedisError, OSError) as exc:
                # the numbers were taken as had (PurgeSequence): unread, they are a loss
                purges, lost = [], "missing"
                self.log.emit("purge_fetch_failed", source="redis", error=str(exc)[:200])
            if lost:
                self._count(f"purge_fetch_{lost}")
            self.caught_up += len(purges)
            self._caught_up_now += len(purges)
            if self.on_purge is not None:
                for purge in purges:
                    self.on_purge(purge, "redis")
        if lost:
            self._head_due = 0.0
            self._caught_up("lost", lost)
            self.seqs.emptied(time.time())  # every cache emptied: nothing before matters
            if self.on_gap is not None:
                self.on_gap()

    def _caught_up(self, how: str, lost: str = "") -> None:
        self.log.emit(
            "purge_log_read",
            source="redis",
            how=how,
            gap_s=round(time.time() - self._down_at, 1) if self._down_at else 0.0,
            purges=self._caught_up_now,
            lost=lost,
        )
        self._caught_up_now = 0
        self._down_at = 0.0

    def _dropped(self, reason: str, detail: str) -> None:
        self.table.refuse(reason)
        if self._drop_log.allow(time.monotonic()):
            self.log.log("decision_dropped", source="redis", reason=reason, detail=detail[:200])

    async def _sync(self, full: bool) -> None:
        """Read the decision keys. `full` (at start and after every reconnection: pub/sub
        lost whatever was published meanwhile): every key's value, verifying those that
        changed since they were last read. Otherwise (the periodic resync): only keys not
        held verified, or whose ban ends before the next resync (an extension missed).

        Nothing is dropped for being absent: a key can vanish without the origin's say (an
        eviction, a compromised edge without the ACL); a ban ends at its signed `until` or
        with a signed lift."""
        now = time.time()
        horizon = now + RESYNC_S
        digests: dict[bytes, bytes] = {}
        wanted: list[bytes] = []
        async for raw in self.redis.scan_iter(match=PREFIX + "*", count=1000):
            name = raw if isinstance(raw, bytes) else str(raw).encode("latin-1")
            if not full and self._held_past(name, horizon):
                old = self._digests.get(name)
                if old is not None:
                    digests[name] = old
                continue
            wanted.append(name)
            if len(wanted) >= BATCH:
                await self._check(wanted, digests)
                wanted = []
        await self._check(wanted, digests)
        if full:
            self._digests = digests  # keys gone since are forgotten here, not at the table
        else:
            self._digests.update(digests)
        self.verifier.sweep(now)
        self._count("ok")

    async def _check(self, names: list[bytes], digests: dict[bytes, bytes]) -> None:
        if not names:
            return
        for name, body in zip(names, await self.redis.mget(names), strict=True):
            if body is None:
                continue
            digest = hashlib.blake2b(
                body if isinstance(body, bytes) else str(body).encode(), digest_size=16
            ).digest()
            if self._digests.get(name) != digest:
                self.admit(body, time.time())
            if len(digests) < self._max_digests:
                digests[name] = digest

    def _held_past(self, name: bytes, horizon: float) -> bool:
        scope, _, value = name[len(PREFIX) :].decode("latin-1").partition(":")
        for signer in self.verifier.keys:
            held = self.verifier.held.get((signer, scope, value))
            if held is not None and held[1] > horizon:
                return True
        return False

    async def _follow(self) -> None:
        pubsub = self.redis.pubsub()
        try:
            subscribed = time.time()  # what is published from now on comes on the channel
            await pubsub.subscribe(CHANNEL)
            await self._sync(full=True)
            # after a reconnection every origin's life must now say where it is
            self.seqs.subscribed(subscribed, first=not self._connected_before)
            if self._connected_before:
                self._head_due = time.monotonic() + HEAD_WAIT_S
            self._connected_before = True
            next_prune = time.monotonic() + PRUNE_EVERY_S
            if not self.up:
                self.up = True
                self.log.emit("decisions_source_up", url=self.url, active=self.table.size)
            next_sync = time.monotonic() + RESYNC_S
            while True:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if message is not None and message.get("type") == "message":
                    data = message["data"]
                    if is_signed_head(data):
                        await self._settle(self.admit_head(data, time.time()))
                    elif is_signed_purge(data):
                        await self._settle(self.admit_purge(data, time.time())[1])
                    else:
                        self.admit(data, time.time())
                if time.monotonic() >= next_prune:
                    self.seqs.prune(time.time())
                    next_prune = time.monotonic() + PRUNE_EVERY_S
                if self._head_due and (not self.seqs.pending or time.monotonic() >= self._head_due):
                    self._head_due = 0.0
                    need = self.seqs.overdue()
                    if need.lost:
                        await self._settle(need)
                    else:
                        self._caught_up("heads")
                if time.monotonic() >= next_sync:
                    await self._sync(full=False)
                    next_sync = time.monotonic() + RESYNC_S
        finally:
            await pubsub.aclose()

    async def share_rates(self, counts: dict[str, int]) -> list[str]:
        """Add this edge's new-connection counts (IPv6 per prefix) to its own counters and
        read its peers' counters of every address this edge has counted in the current
        window (so it learns when the other edges' connections push one over); return the
        addresses over the shared budget, which this edge refuses until the window ends.
        Each command's failure is that address's alone (raise_on_error=False): one counter
        a compromised edge broke costs no other address its count."""
        if not self.rate_budget:
            return []
        window = int(time.time()) // RATE_WINDOW_S
        if window != self._window:
            self._window, self._reported = window, set()
        mine: dict[str, int] = {}
        for ip, n in counts.items():
            try:
                target = ban_target(ip, self.ipv6_prefix_len)
            except ProtocolError:
                continue
            mine[target] = mine.get(target, 0) + n
        for target in self._reported:
            mine.setdefault(target, 0)  # INCRBY 0: read the total other edges made
        if not mine:
            return []
        items = list(mine.items())
        try:
            async with self.rates.pipeline(transaction=False) as pipe:
                for target, n in items:
                    key = rate_key(self.name, target, window)
                    pipe.incrby(key, n)
                    pipe.expire(key, RATE_WINDOW_S * 2)
                    if self.peers:
                        pipe.mget([rate_key(peer, target, window) for peer in self.peers])
                results = await pipe.execute(raise_on_error=False)
        except (RedisError, OSError):
            self._count("rate_error")
            return []
        step = 3 if self.peers else 2
        over = []
        errors = bad = 0
        for i, (target, n) in enumerate(items):
            own = results[i * step]
            if isinstance(own, Exception):  # this edge's own count is at least what it adds
                errors += 1
                own = n
            values: list[object] = [own]
            if self.peers:
                theirs = results[i * step + 2]
                if isinstance(theirs, list):
                    values += theirs
                else:
                    errors += 1
            total, wrong = shared_total(values)
            bad += wrong
            if total > self.rate_budget:
                over.append(target)
                self._reported.discard(target)  # refused from now on: nothing more to read
            elif len(self._reported) < MAX_REPORTED:
                self._reported.add(target)
        if errors:
            self._count("rate_error")
        if bad:
            self._count("rate_bad_count")
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
        if self.rates is not self.redis:
            await self.rates.aclose()
