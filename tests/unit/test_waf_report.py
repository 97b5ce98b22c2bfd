"""`blindfold waf report`: reading audit lines, proposing exclusions, the attack guard."""

from __future__ import annotations

import json
from pathlib import Path

from blindfold.waf import report


def line(
    path: str, client: str, targets: list[list[object]], result: str = "blocked", **kw: object
) -> str:
    rec: dict[str, object] = {
        "event": "waf",
        "request_id": kw.pop("request_id", "r"),
        "client": client,
        "path": path,
        "uri": path + "?x=1",
        "result": result,
        "rule_ids": sorted({int(str(t[0])) for t in targets} | {949110}),
        "messages": [f"rule {t[0]}" for t in targets],
        "targets": targets,
    }
    rec.update(kw)
    return json.dumps(rec)


def write(tmp_path: Path, name: str, lines: list[str]) -> str:
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n")
    return str(p)


def test_a_false_positive_seen_from_two_clients_becomes_an_argument_exclusion(
    tmp_path: Path,
) -> None:
    log = write(
        tmp_path,
        "a.log",
        [
            line("/search", "192.0.2.1", [[942100, "ARGS:q", 5]]),
            line("/search", "192.0.2.2", [[942100, "ARGS:q", 5]]),
            line("/contact", "192.0.2.3", [[941160, "ARGS:comment", 5]]),  # one client only
            '{"event":"request","path":"/"}',  # other events are skipped
            '{"event":"waf", "cut short',  # a line cut short
            line("/x", "192.0.2.9", [[942100, "ARGS:q", 3]], result="matched", rule_ids=[942100]),
        ],
    )
    rep = report.read([log])
    assert len(rep.blocks) == 3 and rep.unreadable == 1
    proposals, refused = report.propose(rep)  # default: seen from 2 clients
    assert [(p.path, p.args, p.rule_ids, p.clients) for p in proposals] == [
        ("/search", ("q",), (942100,), 2)
    ]
    assert refused == []
    text = report.toml(proposals, rep.messages)
    import tomllib

    doc = tomllib.loads(text)
    assert doc["origin"]["waf"]["exclusions"] == [
        {"path_prefix": "/search", "rule_ids": [942100], "args": ["q"]}
    ]
    assert len(report.propose(rep, min_clients=1)[0]) == 2


def test_a_detect_paths_would_be_block_counts_and_a_mere_match_does_not(tmp_path: Path) -> None:
    log = write(
        tmp_path,
        "a.log",
        [
            line("/beta", "192.0.2.1", [[942100, "ARGS:q", 5]], result="matched"),  # 949110
            json.dumps(
                {
                    "event": "waf",
                    "client": "192.0.2.1",
                    "path": "/beta",
                    "result": "matched",
                    "rule_ids": [920350],
                    "messages": ["Host header is a numeric IP address"],
                    "targets": [[920350, "REQUEST_HEADERS:Host", 3]],
                }
            ),
        ],
    )
    assert len(report.read([log]).blocks) == 1


def test_matches_outside_arguments_are_listed_never_proposed(tmp_path: Path) -> None:
    t = [[920450, "TX:header_name_accept-charset", 5]]
    log = write(tmp_path, "a.log", [line("/", f"192.0.2.{i}", t) for i in range(3)])
    rep = report.read([log])
    proposals, _ = report.propose(rep)
    assert proposals == []
    assert report.not_by_argument(rep)[("/", 920450, "TX:header_name_accept-charset")] == 3
    assert "not in an argument" in report.text(rep, proposals, [], 10, 2)


def test_a_request_needing_more_than_arguments_is_not_proposed(tmp_path: Path) -> None:
    # excluding q would leave the header match: still blocked, so nothing to propose
    t = [[942100, "ARGS:q", 5], [920450, "TX:header_name_x", 5]]
    log = write(tmp_path, "a.log", [line("/s", f"192.0.2.{i}", t) for i in range(3)])
    assert report.propose(report.read([log]))[0] == []


def test_the_attack_guard_refuses_an_exclusion_that_lets_a_known_attack_through(
    tmp_path: Path,
) -> None:
    fps = [
        line("/search", f"192.0.2.{i}", [[942100, "ARGS:q", 5]], request_id=f"f{i}")
        for i in range(3)
    ] + [line("/search", f"192.0.2.{i}", [[932115, "ARGS:q", 5]]) for i in range(2)]
    attacks = [
        # caught by 942100 on q alone: the 942100 exclusion would let it through
        line("/search", "203.0.113.1", [[942100, "ARGS:q", 5]]),
        # caught by 932115 and by 942270: excluding 932115 leaves 5 points
        line("/search", "203.0.113.2", [[932115, "ARGS:q", 5], [942270, "ARGS:q", 5]]),
        # a protocol rule that blocks without scoring keeps it blocked whatever is excluded
        line("/search/x", "203.0.113.3", [[942100, "ARGS:q", 5]], rule_ids=[200002, 942100]),
    ]
    rep = report.read([write(tmp_path, "fp.log", fps)])
    guard = report.read([write(tmp_path, "att.log", attacks)])
    proposals, refused = report.propose(rep, attacks=guard)
    assert [(p.path, p.rule_ids) for p in proposals] == [("/search", (932115,))]
    assert [(r.path, r.targets, r.requests, r.attacks) for r in refused] == [
        ("/search", (("q", 942100),), 3, 1)
    ]
    # a budget of one attack lets the 942100 fix in
    proposals, refused = report.propose(rep, attacks=guard, max_lost=1)
    assert {p.rule_ids for p in proposals} == {(932115, 942100)} and refused == []
    # without the guard both are proposed
    assert len(report.propose(rep)[0]) == 1


def test_the_threshold_decides_what_is_left(tmp_path: Path) -> None:
    b = report.Block("/s", "c", (942100, 941100), ((942100, "ARGS:q", 5), (941100, "ARGS:r", 3)))
    assert b.still_blocked([("/s", "q", 942100)], threshold=3)
    assert not b.still_blocked([("/s", "q", 942100)], threshold=5)
    assert b.still_blocked([("/other", "q", 942100)], threshold=5)  # another path
    assert not b.still_blocked([("/", "q", 942100)], threshold=5)  # a prefix of it
