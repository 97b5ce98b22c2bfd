"""Token buckets and per-key accounting (time is passed in)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from blindfold.core.ratelimit import CONCURRENT, RATE, KeyedLimiter, TokenBucket


def test_bucket_burst_then_rate() -> None:
    b = TokenBucket(rate_per_s=2.0, burst=3, now=0.0)
    assert [b.allow(0.0) for _ in range(4)] == [True, True, True, False]
    assert not b.allow(0.4)
    assert b.allow(0.5)  # one token after 0.5 s at 2/s
    assert not b.allow(0.5)
    assert [b.allow(100.0) for _ in range(4)] == [True, True, True, False]  # capped at burst


def test_keyed_concurrency_and_rate() -> None:
    lim = KeyedLimiter(rate_per_s=1.0, burst=10, concurrent=2, max_keys=100)
    assert lim.try_open("a", 0.0) is None
    assert lim.try_open("a", 0.0) is None
    assert lim.try_open("a", 0.0) == CONCURRENT
    assert lim.try_open("b", 0.0) is None  # another key is independent
    lim.release("a")
    assert lim.try_open("a", 0.0) is None
    lim2 = KeyedLimiter(rate_per_s=1.0, burst=2, concurrent=100, max_keys=100)
    assert [lim2.try_open("x", 0.0) for _ in range(3)] == [None, None, RATE]
    assert lim2.try_open("x", 1.0) is None


def test_rate_zero_disables_the_rate_limit() -> None:
    lim = KeyedLimiter(rate_per_s=0.0, burst=1, concurrent=1000, max_keys=10)
    assert all(lim.try_open("k", 0.0) is None for _ in range(500))


def test_memory_is_bounded_and_open_keys_survive_eviction() -> None:
    lim = KeyedLimiter(rate_per_s=1.0, burst=1, concurrent=1, max_keys=50)
    assert lim.try_open("held", 0.0) is None  # stays open throughout
    for i in range(10_000):
        lim.try_open(i, 0.0)
        lim.release(i)
        assert len(lim) <= 50
    assert lim.open_count("held") == 1
    assert lim.try_open("held", 0.0) == CONCURRENT


def test_sweep_drops_only_idle_refilled_entries() -> None:
    lim = KeyedLimiter(rate_per_s=10.0, burst=10, concurrent=5, max_keys=1000)
    for i in range(20):
        lim.try_open(i, 0.0)
    for i in range(10):
        lim.release(i)
    assert lim.sweep(0.5) == 0  # not refilled yet (needs 1 s)
    assert lim.sweep(2.0) == 10  # released ones go, open ones stay
    assert len(lim) == 10


@given(st.lists(st.tuples(st.sampled_from("abc"), st.booleans(), st.floats(0, 0.5)), max_size=200))
def test_open_counts_never_exceed_the_cap(ops: list[tuple[str, bool, float]]) -> None:
    lim = KeyedLimiter(rate_per_s=5.0, burst=3, concurrent=2, max_keys=2)
    held: dict[str, int] = {}
    now = 0.0
    for key, opening, dt in ops:
        now += dt
        if opening:
            if lim.try_open(key, now) is None:
                held[key] = held.get(key, 0) + 1
        elif held.get(key):
            lim.release(key)
            held[key] -= 1
        assert held.get(key, 0) <= 2
        assert lim.open_count(key) == held.get(key, 0)
