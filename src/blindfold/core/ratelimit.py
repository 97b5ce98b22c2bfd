"""Token buckets and per-key connection accounting with a hard bound on memory.

Time is passed in (`now`, seconds on any monotonic clock). `KeyedLimiter` keeps one entry per
key (a client address or prefix): a token bucket for new connections and a count of open ones.
Entries live in a dict kept in least-recently-used order (a key is moved to the end when
used), so idle entries are found at the front and evicted in amortised O(1).
"""

from __future__ import annotations

from collections.abc import Hashable


class TokenBucket:
    """One bucket: `rate_per_s` tokens per second, at most `burst`; a request takes one, or
    `cost` (a request that costs more work takes more)."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate_per_s: float, burst: int, now: float) -> None:
        self.rate = rate_per_s
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = now

    def allow(self, now: float, cost: float = 1.0) -> bool:
        tokens = self.tokens + (now - self.stamp) * self.rate
        if tokens > self.burst:
            tokens = self.burst
        self.stamp = now
        if tokens >= cost:
            self.tokens = tokens - cost
            return True
        self.tokens = tokens
        return False


RATE = "rate"
CONCURRENT = "concurrent"


class KeyedLimiter:
    """Per-key token bucket (`rate_per_s` 0 disables it) plus a cap on open connections.

    Entry layout: [tokens, stamp, open]. `try_open` returns None when admitted (the caller
    must call `release` when the connection ends) or the refusal reason.
    """

    __slots__ = ("_entries", "_refill_s", "burst", "concurrent", "max_keys", "rate")

    def __init__(self, rate_per_s: float, burst: int, concurrent: int, max_keys: int) -> None:
        self._entries: dict[Hashable, list[float]] = {}
        self.configure(rate_per_s, burst, concurrent, max_keys)

    def configure(self, rate_per_s: float, burst: int, concurrent: int, max_keys: int) -> None:
        """Change limits in place (config reload); open-connection counts are kept."""
        self.rate = rate_per_s
        self.burst = float(burst)
        self.concurrent = concurrent
        self.max_keys = max_keys
        self._refill_s = burst / rate_per_s if rate_per_s > 0 else 0.0

    def __len__(self) -> int:
        return len(self._entries)

    def open_count(self, key: Hashable) -> int:
        entry = self._entries.get(key)
        return int(entry[2]) if entry else 0

    def try_open(self, key: Hashable, now: float) -> str | None:
        entries = self._entries
        entry = entries.pop(key, None)
        if entry is None:
            entry = [self.burst, now, 0.0]
            if len(entries) >= self.max_keys:
                self._evict(len(entries) - self.max_keys + 1, now)
        entries[key] = entry  # most recently used goes last
        if entry[2] >= self.concurrent:
            return CONCURRENT
        if self.rate > 0:
            tokens = entry[0] + (now - entry[1]) * self.rate
            if tokens > self.burst:
                tokens = self.burst
            entry[1] = now
            if tokens < 1.0:
                entry[0] = tokens
                return RATE
            entry[0] = tokens - 1.0
        entry[2] += 1
        return None

    def release(self, key: Hashable) -> None:
        entry = self._entries.get(key)
        if entry is not None and entry[2] > 0:
            entry[2] -= 1

    def sweep(self, now: float, budget: int = 1000) -> int:
        """Drop entries that are idle and fully refilled (they equal a fresh entry). Looks at
        most `budget` entries from the least recently used end; returns how many it dropped."""
        entries = self._entries
        dropped = 0
        for _ in range(min(budget, len(entries))):
            key = next(iter(entries))
            entry = entries[key]
            if entry[2] > 0:
                entries[key] = entries.pop(key)  # open connections: keep, look later
                continue
            if now - entry[1] < self._refill_s:
                break  # everything after this was used more recently
            del entries[key]
            dropped += 1
        return dropped

    def _evict(self, count: int, now: float) -> None:
        """Make room: drop the least recently used entries without open connections. Their
        rate state is forgotten, which can only admit more, never refuse a legitimate key."""
        entries = self._entries
        scanned = 0
        limit = len(entries)
        while count > 0 and scanned < limit:
            key = next(iter(entries))
            entry = entries.pop(key)
            scanned += 1
            if entry[2] > 0:
                entries[key] = entry
                continue
            count -= 1


class BucketMap:
    """Token buckets by key (request rate limits per client address), bounded: beyond
    `max_keys` the least recently used bucket goes (a full bucket is what a new key gets
    anyway, so evicting idle ones costs nothing)."""

    __slots__ = ("_buckets", "burst", "max_keys", "rate")

    def __init__(self, rate_per_s: float, burst: int, max_keys: int) -> None:
        self.rate = rate_per_s
        self.burst = float(burst)
        self.max_keys = max_keys
        self._buckets: dict[Hashable, list[float]] = {}  # key -> [tokens, stamp]

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: Hashable, now: float) -> float:
        """0.0 if admitted, else the seconds until a token will be there (for Retry-After)."""
        buckets = self._buckets
        entry = buckets.pop(key, None)
        if entry is None:
            entry = [self.burst, now]
            if len(buckets) >= self.max_keys:
                del buckets[next(iter(buckets))]
        buckets[key] = entry  # most recently used last
        tokens = min(self.burst, entry[0] + (now - entry[1]) * self.rate)
        entry[1] = now
        if tokens >= 1.0:
            entry[0] = tokens - 1.0
            return 0.0
        entry[0] = tokens
        return (1.0 - tokens) / self.rate
