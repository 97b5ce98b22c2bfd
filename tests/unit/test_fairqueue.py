"""core.fairqueue: deficit round robin. One key's backlog delays another key's item by at most
one of its own per turn; costly items take proportionally more turns; order within a key is
kept; nothing is lost or served twice."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blindfold.core.fairqueue import FairQueue


def drain(q: FairQueue[str, int]) -> list[tuple[str, int]]:
    out = []
    while (got := q.pop()) is not None:
        out.append(got)
    return out


def test_a_backlog_does_not_delay_another_key() -> None:
    q: FairQueue[str, int] = FairQueue()
    for i in range(1000):
        q.push("flood", i)
    q.push("honest", 0)
    order = drain(q)
    assert order.index(("honest", 0)) <= 1
    assert [i for k, i in order if k == "flood"] == list(range(1000))  # in order


def test_keys_alternate_item_for_item_at_equal_cost() -> None:
    q: FairQueue[str, int] = FairQueue()
    for i in range(3):
        q.push("a", i)
        q.push("b", i)
    assert [k for k, _ in drain(q)] == ["a", "b", "a", "b", "a", "b"]


def test_costly_items_take_more_turns() -> None:
    q: FairQueue[str, int] = FairQueue()
    for i in range(4):
        q.push("big", i, cost=4.0)
    for i in range(16):
        q.push("small", i)
    assert q.pending("big") == 16.0 and q.pending("small") == 16.0 and len(q) == 20
    order = [k for k, _ in drain(q)]
    # over any stretch both have been served about the same cost
    for n in range(4, len(order), 4):
        served = order[:n]
        big, small = 4 * served.count("big"), served.count("small")
        assert abs(big - small) <= 4, (n, order)
    assert q.pending("big") == 0.0 and len(q) == 0


def test_a_key_that_empties_keeps_no_credit() -> None:
    q: FairQueue[str, int] = FairQueue()
    q.push("a", 1, cost=3.0)
    q.push("b", 1)
    assert [k for k, _ in drain(q)] == ["b", "a"]
    # "a" waited three turns for its one item; it starts again from nothing
    q.push("a", 2)
    q.push("b", 2)
    q.push("b", 3)
    assert [k for k, _ in drain(q)] == ["a", "b", "b"]


def test_quantum_must_be_positive() -> None:
    with pytest.raises(ValueError):
        FairQueue(quantum=0)


@given(st.lists(st.tuples(st.sampled_from("abcd"), st.integers(1, 5)), max_size=200))
def test_every_item_once_in_its_keys_order(pushes: list[tuple[str, int]]) -> None:
    q: FairQueue[str, int] = FairQueue()
    for n, (key, cost) in enumerate(pushes):
        q.push(key, n, cost=float(cost))
    order = drain(q)
    assert sorted(i for _, i in order) == list(range(len(pushes)))
    for key in "abcd":
        mine = [i for k, i in order if k == key]
        assert mine == sorted(mine)
        assert q.pending(key) == 0.0
