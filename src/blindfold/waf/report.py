"""`blindfold waf report LOG...`: what the WAF blocked, by rule, path and argument, and the
exclusions that would stop the blocks, as TOML to paste into `[origin.waf]`.

It reads the origin agent's WAF audit lines (JSON, `"event": "waf"`, from the main log or
`[origin.waf] audit_log`). A request counts when it was blocked, or when it would have been (a
`detect` path or mode: the CRS blocking evaluation, rule 949110, matched). Exclusions are
proposed by argument (rule ids + canonical path + `args`), the narrowest kind ModSecurity has:
a rule stops looking at one argument of one path and keeps looking at everything else.
Matches in anything but an argument (headers, cookies, the path itself) are listed for review,
never proposed: excluding them would blind the rule for the whole path.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from blindfold.web.target import path_has_prefix

MAX_LINE = 1 << 20  # an audit line is a few KB; longer ones are not ours
_ARG = "ARGS:"


def evaluation_rule(rule_id: int) -> bool:
    """The CRS's scoring and correlation rules (949xxx, 959xxx, 980xxx): they say that a
    request was blocked, not why; excluding one would switch blocking off."""
    return 949000 <= rule_id < 950000 or 959000 <= rule_id < 960000 or 980000 <= rule_id < 981000


@dataclass
class Block:
    """One blocked (or would-be-blocked) request."""

    path: str
    client: str
    rule_ids: tuple[int, ...]
    targets: tuple[tuple[int, str, int], ...]  # (rule id, variable, points) per scoring rule
    request_id: str = ""

    def still_blocked(self, excluded: list[tuple[str, str, int]], threshold: int) -> bool:
        """Whether the request would still be blocked with these (path prefix, argument,
        rule) exclusions: what is left scores `threshold` or more. A rule that blocked
        without scoring (a protocol rule, a body the engine could not parse) keeps it blocked."""

        def gone(rule: int, var: str) -> bool:
            return var.startswith(_ARG) and any(
                r == rule and a == var[len(_ARG) :] and path_has_prefix(self.path, p)
                for p, a, r in excluded
            )

        left = [(r, v, p) for r, v, p in self.targets if not gone(r, v)]
        if len(left) == len(self.targets):
            return True
        scoring = {r for r, _, _ in self.targets}
        if any(r not in scoring and not evaluation_rule(r) for r in self.rule_ids):
            return True
        return any(p == 0 for _, _, p in left) or sum(p for _, _, p in left) >= threshold


@dataclass
class Proposal:
    path: str
    args: tuple[str, ...]
    rule_ids: tuple[int, ...]
    requests: int
    clients: int


@dataclass
class Report:
    lines: int = 0
    unreadable: int = 0
    blocks: list[Block] = field(default_factory=list)
    messages: dict[int, str] = field(default_factory=dict)


def read(paths: Iterable[str]) -> Report:
    report = Report()
    for path in paths:
        with open(path, "rb") as f:
            for raw in _lines(f):
                report.lines += 1
                _take(report, raw)
    return report


def _lines(f: Iterable[bytes]) -> Iterator[bytes]:
    for raw in f:
        if len(raw) <= MAX_LINE and b'"waf"' in raw:
            yield raw


def _take(report: Report, raw: bytes) -> None:
    try:
        rec = json.loads(raw)
    except ValueError:
        report.unreadable += 1
        return
    if not isinstance(rec, dict) or rec.get("event") != "waf":
        return
    try:
        rule_ids = tuple(int(r) for r in rec.get("rule_ids") or ())
        messages = [str(m) for m in rec.get("messages") or ()]
        targets = [
            (int(t[0]), str(t[1]), messages[i] if i < len(messages) else "", int(t[2]))
            for i, t in enumerate(rec.get("targets") or ())
        ]
        path = str(rec.get("path") or str(rec.get("uri") or "/").partition("?")[0])
        client = str(rec.get("client") or "")
    except (TypeError, ValueError, IndexError):
        report.unreadable += 1
        return
    if rec.get("result") != "blocked" and 949110 not in rule_ids:
        return  # matched below the threshold: nothing was (or would have been) blocked
    scoring = tuple((r, v, p) for r, v, _, p in targets if v and not evaluation_rule(r))
    report.blocks.append(Block(path, client, rule_ids, scoring, str(rec.get("request_id") or "")))
    for rule, _, text, _ in targets:
        if text and text != "blocking verdict":
            report.messages.setdefault(rule, text[:100])


@dataclass
class Refused:
    path: str
    targets: tuple[tuple[str, int], ...]  # (argument, rule) the fix would exclude
    requests: int
    attacks: int  # known attacks that the exclusion would let through


def propose(
    report: Report,
    min_requests: int = 1,
    min_clients: int = 2,
    attacks: Report | None = None,
    threshold: int = 5,
    max_lost: int = 0,
) -> tuple[list[Proposal], list[Refused]]:
    """The argument exclusions that unblock the blocked requests, arguments of a path with the
    same rules in one entry.

    A request is unblocked by excluding, on its path, every rule that matched in one of its
    arguments; requests that need the same exclusions form one fix, proposed when seen in
    `min_requests` requests from `min_clients` addresses. Fixes are taken most requests first.
    With `attacks` (the audit lines of a replay of known attacks against the same site), a
    fix that would let those attacks through (what is left of their matches scores under
    `threshold`) beyond `max_lost` in all is refused and listed instead: those false positives
    need a narrower fix (a rule of the site's own, or the application encoding what it sends)."""
    fixes: dict[tuple[str, frozenset[tuple[str, int]]], tuple[set[int], set[str]]] = defaultdict(
        lambda: (set(), set())
    )
    for i, b in enumerate(report.blocks):
        need = frozenset(
            (var[len(_ARG) :], rule)
            for rule, var, _ in b.targets
            if var.startswith(_ARG) and len(var) > len(_ARG)
        )
        if not need or b.still_blocked([(b.path, a, r) for a, r in need], threshold):
            continue  # not fixable by argument (listed under "not in an argument")
        requests, clients = fixes[(b.path, need)]
        requests.add(i)
        clients.add(b.client)
    accepted: list[tuple[str, str, int]] = []
    refused: list[Refused] = []
    kept: dict[tuple[str, str], tuple[set[int], set[int], set[str]]] = defaultdict(
        lambda: (set(), set(), set())
    )
    for (path, need), (requests, clients) in sorted(
        fixes.items(), key=lambda kv: (-len(kv[1][0]), kv[0][0], sorted(kv[0][1]))
    ):
        if len(requests) < min_requests or len(clients) < min_clients:
            continue
        trial = accepted + [(path, a, r) for a, r in sorted(need)]
        lost = 0
        if attacks is not None:
            lost = sum(
                1
                for a in attacks.blocks
                if a.still_blocked(accepted, threshold) and not a.still_blocked(trial, threshold)
            )
        if lost > max_lost:
            refused.append(Refused(path, tuple(sorted(need)), len(requests), lost))
            continue
        max_lost -= lost
        accepted = trial
        for arg, rule in need:
            rules, reqs, cls = kept[(path, arg)]
            rules.add(rule)
            reqs |= requests
            cls |= clients
    grouped: dict[tuple[str, tuple[int, ...]], list[str]] = defaultdict(list)
    counts: dict[tuple[str, tuple[int, ...]], tuple[set[int], set[str]]] = defaultdict(
        lambda: (set(), set())
    )
    for (path, arg), (rules, reqs, cls) in kept.items():
        key = (path, tuple(sorted(rules)))
        grouped[key].append(arg)
        counts[key][0].update(reqs)
        counts[key][1].update(cls)
    out = []
    for (path, rule_ids), names in grouped.items():
        reqs2, cls2 = counts[(path, rule_ids)]
        out.append(Proposal(path, tuple(sorted(names)), rule_ids, len(reqs2), len(cls2)))
    out.sort(key=lambda p: (-p.requests, p.path, p.args))
    return out, refused


def not_by_argument(report: Report) -> Counter[tuple[str, int, str]]:
    """(path, rule, variable) matches outside arguments, for review."""
    c: Counter[tuple[str, int, str]] = Counter()
    for b in report.blocks:
        for rule, var, _ in b.targets:
            if not var.startswith(_ARG):
                c[(b.path, rule, var)] += 1
    return c


def toml(proposals: list[Proposal], messages: dict[int, str]) -> str:
    out = []
    for p in proposals:
        out.append(
            f"# {p.requests} blocked request(s) from {p.clients} client(s): "
            + "; ".join(f"{r} {messages.get(r, '')}".rstrip() for r in p.rule_ids)
        )
        out.append("[[origin.waf.exclusions]]")
        out.append(f"path_prefix = {json.dumps(p.path)}")
        out.append(f"rule_ids = [{', '.join(str(r) for r in p.rule_ids)}]")
        out.append(f"args = [{', '.join(json.dumps(a) for a in p.args)}]")
        out.append("")
    return "\n".join(out)


def text(
    report: Report,
    proposals: list[Proposal],
    refused: list[Refused],
    top: int,
    min_clients: int,
) -> str:
    rules: Counter[int] = Counter()
    paths: Counter[str] = Counter()
    args: Counter[str] = Counter()
    for b in report.blocks:
        paths[b.path] += 1
        for r in {t[0] for t in b.targets} | {r for r in b.rule_ids if not evaluation_rule(r)}:
            rules[r] += 1
        for v in {t[1] for t in b.targets if t[1].startswith(_ARG)}:
            args[v[len(_ARG) :]] += 1
    out = [
        f"{len(report.blocks)} blocked request(s) in {report.lines} WAF line(s)"
        + (f" ({report.unreadable} unreadable)" if report.unreadable else ""),
        "",
        "by rule:",
        *(f"  {n:7d}  {r}  {report.messages.get(r, '')}" for r, n in rules.most_common(top)),
        "",
        "by path:",
        *(f"  {n:7d}  {p}" for p, n in paths.most_common(top)),
        "",
        "by argument:",
        *(f"  {n:7d}  {a}" for a, n in args.most_common(top)),
    ]
    other = not_by_argument(report)
    if other:
        out += ["", "not in an argument (review; not proposed):"]
        out += [f"  {n:7d}  {p}  {r}  {v}" for (p, r, v), n in other.most_common(top)]
    if refused:
        out += ["", "not proposed: the exclusion would let known attacks through (--attacks):"]
        out += [
            f"  {r.path}  {' '.join(f'{rule}:ARGS:{arg}' for arg, rule in r.targets)}: fixes "
            f"{r.requests} request(s), lets {r.attacks} attack(s) through"
            for r in refused[:top]
        ]
    out += ["", f"proposed exclusions ({len(proposals)}; seen from >= {min_clients} client(s)):"]
    out.append(toml(proposals, report.messages) or "  (none)")
    return "\n".join(out)
