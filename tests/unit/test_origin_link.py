"""The worker -> master reports of the origin (origin/worker.py MasterLink): only what the
decision rules count is sent, batched; the master applies a batch through its one set of rules
and skips what is malformed (origin/master.py OriginMaster._apply)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from blindfold.decisions.core import DecisionRules, RateRule
from blindfold.origin.edges import Reporter
from blindfold.origin.worker import EVENT_BATCH, MasterLink


class Writer:
    def __init__(self) -> None:
        self.lines: list[dict[str, Any]] = []

    def write(self, data: bytes) -> None:
        self.lines += [json.loads(line) for line in data.splitlines()]

    def is_closing(self) -> bool:
        return False


def test_only_rate_rule_paths_and_blocks_are_sent_in_batches() -> None:
    async def run() -> Writer:
        w = Writer()
        link = MasterLink(w)  # type: ignore[arg-type]
        link.set_rules((RateRule("/login", 1.0, 5, 60, "login"),))
        link.request("192.0.2.1", b"/", 1.0, None)  # no rule covers it: nothing to send
        link.request("192.0.2.1", b"/loginx", 1.0, None)  # not the /login segment
        link.request("192.0.2.1", b"/login/form", 2.0, Reporter("edge-a", "10.0.0.1"))
        link.block("192.0.2.2", 3.0, None)
        assert w.lines == []  # batched: sent a few ms later
        await asyncio.sleep(0.05)
        assert len(w.lines) == 1
        for i in range(EVENT_BATCH):  # a full batch goes at once
            link.block(f"192.0.2.{i % 200}", 4.0, None)
        assert len(w.lines) == 2
        return w

    w = asyncio.run(run())
    assert w.lines[0] == {
        "op": "events",
        "e": [
            ["r", "192.0.2.1", 2.0, "edge-a", "10.0.0.1", "/login/form"],
            ["b", "192.0.2.2", 3.0, "", "", ""],
        ],
    }
    assert len(w.lines[1]["e"]) == EVENT_BATCH


def test_master_applies_events_through_one_set_of_rules() -> None:
    from blindfold.origin.master import OriginMaster

    bans: list[tuple[Any, ...]] = []

    class Agent:
        rules = DecisionRules(ban_after_blocks=3, block_window_s=60, ban_duration_s=60)

        def ban(self, *args: Any) -> None:
            bans.append(args)

    master = OriginMaster.__new__(OriginMaster)
    master.agent = Agent()  # type: ignore[assignment]
    master._apply(
        [
            ["b", "192.0.2.9", 1.0, "", "", ""],  # worker 0
            ["b"],  # malformed: skipped
            ["x", "192.0.2.9", 1.0, "", "", ""],  # unknown kind: skipped
            ["b", "192.0.2.9", "not a time", "", "", ""],
            ["b", "192.0.2.9", 1.5, "edge-a", "10.0.0.1", ""],  # worker 1
        ]
    )
    assert bans == []
    master._apply([["b", "192.0.2.9", 2.0, "edge-a", "10.0.0.1", ""]])
    assert bans == [("192.0.2.9", 60, "waf: 3 blocked requests", Reporter("edge-a", "10.0.0.1"))]
