"""origin/worker.py: the cyclic garbage collector in a worker (bench/origin/NOTES.md)."""

from __future__ import annotations

import gc

from blindfold.origin import worker


def test_start_up_objects_leave_the_collectors_scans() -> None:
    """What start-up made is frozen (no collection scans it again), after a full collection;
    the thresholds make collections rare."""
    made = [[i] for i in range(1000)]  # start-up's objects
    before = gc.get_freeze_count()
    try:
        worker.freeze_start_up()
        assert gc.get_freeze_count() >= before + len(made)
        assert gc.get_count()[0] < 100  # collected just before
    finally:
        gc.unfreeze()
    assert worker.GC_THRESHOLDS[0] >= 10000
