"""The origin's decision journal: the lines the store's changes become, replayed with `now`
passed in (expired decisions dropped, damaged lines skipped and named), and the file kept by
DecisionJournal (a crash's cut line, compaction, what is on disk at every step)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st

from blindfold.decisions.core import (
    Decision,
    DecisionStore,
    journal_line,
    journal_removal,
)
from blindfold.decisions.journal import COMPACT_MIN_LINES, DecisionJournal
from blindfold.errors import ConfigError
from blindfold.obs.log import JsonLog


class Lines:
    """A store listener that keeps the journal lines in memory (the codec without the file)."""

    def __init__(self) -> None:
        self.lines: list[bytes] = []

    def added(self, decision: Decision) -> None:
        self.lines.append(journal_line(decision))

    def removed(self, decision: Decision) -> None:
        self.lines.append(journal_removal(decision))


def journaled() -> tuple[DecisionStore, Lines]:
    store, lines = DecisionStore(), Lines()
    store.listener = lines
    return store, lines


def test_replay_restores_what_is_still_active_with_its_own_times() -> None:
    store, lines = journaled()
    store.add("ip", "192.0.2.1", 10, "waf: 3 blocked requests", 1000.0)
    store.add("ip", "192.0.2.2", 3600, "rate: login", 1000.0)
    store.add("range", "2001:db8:1:2::/64", 60, "waf", 1000.0)
    store.add("range", "2001:db8:1:2::/64", 600, "waf", 1005.0)  # extended
    store.add("ip", "192.0.2.2", 5, "shorter", 1006.0)  # never shortens: nothing written
    assert len(lines.lines) == 4

    again = DecisionStore()
    restored, problems = again.replay(lines.lines, 1020.0)
    assert (restored, problems) == (2, [])
    got = {d.value: (d.created, d.until, d.reason) for d in again.active(1020.0)}
    assert got == {
        "192.0.2.2": (1000.0, 4600.0, "rate: login"),
        "2001:db8:1:2::/64": (1005.0, 1605.0, "waf"),
    }
    assert again.epoch != store.epoch
    # a follower's position from before the restart gets the whole set
    old_position = store.stream("edge", True, 1001.0)["blindfold"]["position"]
    answer = again.stream("edge", False, 1020.0, position=old_position)
    assert answer["blindfold"]["full"] is True
    assert sorted(d["value"] for d in answer["new"]) == ["192.0.2.2", "2001:db8:1:2::/64"]
    assert answer["deleted"] is None
    # and the restored store goes on: new ids after the restored ones
    d = again.add("ip", "192.0.2.3", 60, "waf", 1021.0)
    assert d.id > max(x.id for x in again.decisions.values() if x is not d)


def test_replay_honours_removals_and_skips_what_is_not_a_record() -> None:
    store, lines = journaled()
    store.add("ip", "192.0.2.1", 600, "waf", 1000.0)
    store.add("ip", "192.0.2.2", 600, "waf", 1000.0)
    store.remove("ip", "192.0.2.1")
    good = lines.lines
    damaged = [
        good[0],
        b"\x00\x00\x00\x00\n",  # a block of zeros (a file system's torn write)
        b'{"v":2,"scope":"ip","value":"192.0.2.9","until":9999}\n',  # unknown version
        b'{"v":1,"scope":"ip","value":"192.0.2.300","type":"ban","reason":"","origin":"",'
        b'"created":1,"until":9999}\n',  # not an address
        b'{"v":1,"scope":"ip","value":"192.0.2.8","type":"ban","reason":"","origin":"",'
        b'"created":1,"until":1e999}\n',  # not a time
        good[1],
        good[2],
        good[1][:40],  # the last line a crash cut short
    ]
    again = DecisionStore()
    restored, problems = again.replay(damaged, 1001.0)
    assert restored == 1
    assert [d.value for d in again.active(1001.0)] == ["192.0.2.2"]
    assert [p.split(":")[0] for p in problems] == ["line 2", "line 3", "line 4", "line 5", "line 8"]
    assert "cut short" in problems[-1]


def test_a_line_over_the_cap_is_refused() -> None:
    store = DecisionStore()
    big = {
        "v": 1,
        "scope": "ip",
        "value": "192.0.2.1",
        "type": "ban",
        "reason": "x" * 5000,
        "origin": "",
        "created": 1,
        "until": 9999,
    }
    restored, problems = store.replay([json.dumps(big).encode() + b"\n"], 10.0)
    assert restored == 0 and "too long" in problems[0]


GOOD = journal_line(Decision(1, "ip", "192.0.2.1", "ban", "waf", "blindfold", 1.0, 9999.0))


@given(st.binary(max_size=300), st.integers(0, len(GOOD)))
@example(b"1", 40)  # found by hypothesis: another valid address
def test_any_damage_is_a_problem_named_by_line_never_an_exception(data: bytes, at: int) -> None:
    """Whatever a disk gives back: the good line before the damage is restored, every other
    line either restores (damage can make another valid decision: a `1` inserted into the
    address is another address) or is named."""
    assume(b'"op"' not in data)  # damage that writes a removal of this very ban is a removal
    lines = [GOOD, *(GOOD[:at] + data + GOOD[at:]).splitlines(keepends=True)]
    store = DecisionStore()
    restored, problems = store.replay(lines, 10.0)
    assert "192.0.2.1" in [d.value for d in store.decisions.values()]
    assert restored == len(store.decisions) and restored <= len(lines)
    assert all(p.startswith("line ") for p in problems)


def journal_at(path: Path) -> tuple[DecisionStore, DecisionJournal, tuple[int, list[str]]]:
    store = DecisionStore()
    journal = DecisionJournal(str(path), JsonLog(2, process="test", nonblocking=False))
    return store, journal, journal.open(store, 1000.0)


def test_the_journal_file_survives_a_crash_in_mid_write(tmp_path: Path) -> None:
    path = tmp_path / "decisions.journal"
    store, journal, opened = journal_at(path)
    assert opened == (0, []) and path.read_bytes() == b""
    store.add("ip", "192.0.2.1", 600, "waf", 1000.0)
    store.add("ip", "192.0.2.2", 600, "waf", 1000.0)
    # on disk as soon as made (a SIGKILL right now loses nothing)
    assert path.read_bytes().count(b"\n") == 2
    with path.open("ab") as fh:
        fh.write(b'{"v":1,"scope":"ip","value":"192.0.2.3","ty')  # the cut of a crash
    asyncio.run(journal.close())

    store2, journal2, (restored, problems) = journal_at(path)
    assert restored == 2 and len(problems) == 1 and "cut short" in problems[0]
    assert sorted(d.value for d in store2.active(1000.0)) == ["192.0.2.1", "192.0.2.2"]
    # the damaged file is kept aside; the journal is whole again and goes on
    assert (tmp_path / "decisions.journal.damaged").read_bytes().endswith(b'"ty')
    assert path.read_bytes().count(b"\n") == 2 and path.read_bytes().endswith(b"\n")
    store2.add("ip", "192.0.2.4", 600, "waf", 1001.0)
    asyncio.run(journal2.close())
    _store3, _journal3, (restored, problems) = journal_at(path)
    assert (restored, problems) == (3, [])


def test_the_journal_is_compacted_as_it_grows(tmp_path: Path) -> None:
    path = tmp_path / "decisions.journal"

    async def grow() -> tuple[int, int, DecisionJournal]:
        store, journal, _ = journal_at(path)
        for i in range(COMPACT_MIN_LINES + 10):  # one network, extended again and again
            store.add("ip", "192.0.2.1", 600 + i, "waf", 1000.0)
        before = path.read_bytes().count(b"\n")
        journal.tick(store)
        assert journal._compacting is not None
        store.add("ip", "192.0.2.2", 600, "waf", 1000.0)  # made while it is rewritten
        await journal._compacting
        after = path.read_bytes().count(b"\n")
        store.add("ip", "192.0.2.3", 600, "waf", 1000.0)  # appended to the new file
        await journal.close()
        return before, after, journal

    before, after, journal = asyncio.run(grow())
    assert before == COMPACT_MIN_LINES + 10
    assert after == 2 and journal.lines == 3
    store, _journal, (restored, problems) = journal_at(path)
    assert (restored, problems) == (3, [])
    assert store.decisions[("ip", "192.0.2.1")].until == 1000.0 + 600 + COMPACT_MIN_LINES + 9
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_journal_that_cannot_be_written_is_a_config_error_naming_the_key(
    tmp_path: Path,
) -> None:
    store = DecisionStore()
    journal = DecisionJournal(
        str(tmp_path / "missing-dir" / "decisions.journal"),
        JsonLog(2, process="test", nonblocking=False),
    )
    with pytest.raises(ConfigError) as info:
        journal.open(store, 1000.0)
    assert info.value.key == "origin.decisions.journal"
    assert "cannot write" in info.value.message and store.listener is None
