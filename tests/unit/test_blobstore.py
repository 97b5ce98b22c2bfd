"""The blind edge's cache: two bounded LRU tiers, whole files only, rebuilt from disk."""

from __future__ import annotations

import os
from pathlib import Path

from blindfold.config.edge import BlindRouteConfig
from blindfold.edge.modes.blind import BlobStore


def _id(n: int) -> str:
    return f"{n:032x}"


def _put_disk(store: BlobStore, blob: str, size: int) -> None:
    tmp = store.temp_file(blob)
    assert tmp is not None
    tmp.write_bytes(os.urandom(size))
    store.commit_disk(blob, tmp, size)


def test_memory_tier_is_bounded_lru() -> None:
    store = BlobStore(BlindRouteConfig(memory_cache_bytes=1000, memory_max_object_bytes=400), 0)
    store.put_memory(_id(1), b"a" * 400)
    store.put_memory(_id(2), b"b" * 400)
    assert store.memory(_id(1)) is not None  # 1 is now the most recently used
    store.put_memory(_id(3), b"c" * 400)  # over 1000: the least recently used (2) goes
    assert store.memory(_id(2)) is None
    assert store.memory(_id(1)) is not None and store.memory(_id(3)) is not None
    assert store.mem_used == 800
    store.put_memory(_id(4), b"d" * 401)  # bigger than an object may be: not kept
    assert store.memory(_id(4)) is None and store.mem_used == 800


def test_disk_tier_is_bounded_lru_and_removes_files(tmp_path: Path) -> None:
    cfg = BlindRouteConfig(cache_dir=str(tmp_path), disk_cache_bytes=3000)
    store = BlobStore(cfg, 1)
    for n in range(3):
        _put_disk(store, _id(n), 1000)
    assert store.disk_path(_id(0)) is not None  # touch 0
    _put_disk(store, _id(3), 1000)  # evicts 1, the least recently used
    assert store.disk_path(_id(1)) is None
    assert not (tmp_path / "w1" / _id(1)).exists()
    assert sorted(p.name for p in (tmp_path / "w1").iterdir()) == [_id(0), _id(2), _id(3)]
    assert store.disk_used == 3000
    _put_disk(store, _id(9), 5000)  # bigger than the whole tier: never stored
    assert store.disk_path(_id(9)) is None and store.disk_used == 3000
    assert not any(p.name.endswith(".tmp") for p in (tmp_path / "w1").iterdir())


def test_restart_rebuilds_the_index_and_drops_partial_files(tmp_path: Path) -> None:
    cfg = BlindRouteConfig(cache_dir=str(tmp_path), disk_cache_bytes=10_000)
    store = BlobStore(cfg, 0)
    _put_disk(store, _id(1), 1234)
    _put_disk(store, _id(2) + ".js", 10)
    (tmp_path / "w0" / f".{_id(3)}.123.tmp").write_bytes(b"partial")  # a pull cut short
    (tmp_path / "w0" / "not-a-blob").write_bytes(b"x")
    again = BlobStore(cfg, 0)
    assert again.disk_path(_id(1)) is not None and again.disk_path(_id(2) + ".js") is not None
    assert again.disk_used == 1244
    assert sorted(p.name for p in (tmp_path / "w0").iterdir()) == [_id(1), _id(2) + ".js"]


def test_a_smaller_disk_limit_at_start_evicts(tmp_path: Path) -> None:
    store = BlobStore(BlindRouteConfig(cache_dir=str(tmp_path), disk_cache_bytes=10_000), 0)
    for n in range(5):
        _put_disk(store, _id(n), 1000)
    smaller = BlobStore(BlindRouteConfig(cache_dir=str(tmp_path), disk_cache_bytes=2500), 0)
    assert smaller.disk_used <= 2500 and len(list((tmp_path / "w0").iterdir())) == 2


def test_drop_removes_every_copy_and_its_check(tmp_path: Path) -> None:
    store = BlobStore(BlindRouteConfig(cache_dir=str(tmp_path), disk_cache_bytes=10_000), 0)
    _put_disk(store, _id(1), 1000)
    store.put_memory(_id(1), b"x" * 1000)
    assert _id(1) in store.verified  # a committed pull was checked while it was pulled
    assert store.drop(_id(1))
    assert store.memory(_id(1)) is None and store.disk_path(_id(1)) is None
    assert store.mem_used == 0 and store.disk_used == 0 and _id(1) not in store.verified
    assert not (store.dir / _id(1)).exists() if store.dir else False
    assert not store.drop(_id(1))  # nothing left to drop
    # A rescan (a restart) starts with no file checked.
    _put_disk(store, _id(2), 1000)
    again = BlobStore(BlindRouteConfig(cache_dir=str(tmp_path), disk_cache_bytes=10_000), 0)
    assert again.disk_path(_id(2)) is not None and _id(2) not in again.verified


def test_the_report_check_budget_counts_bytes() -> None:
    """Reports make the edge hash its copies: bounded in bytes per second, not in reports,
    so many reports of big blobs cannot keep it hashing."""
    from blindfold.edge.modes.blind import ByteBudget

    budget = ByteBudget(1000.0, 5000, now=0.0)
    assert budget.take(5000, 0.0)  # the burst
    assert not budget.take(1, 0.0)
    assert not budget.take(2000, 1.0)  # 1000 back after 1 s: not enough for 2000
    assert budget.take(2000, 2.0)  # (2000 by now) enough
    assert not budget.take(6000, 100.0)  # never more than the burst at once
    assert budget.take(5000, 100.0)
