"""Decisions, sans-IO: the store the origin serves, the rules that create decisions, and the
wire format of CrowdSec's bouncer stream API (`GET /v1/decisions/stream`), so an edge can read
ours or a real CrowdSec Local API.

A decision is {scope ip|range, value, type ban, duration, reason}. Time is passed in (`now`,
seconds since the epoch, because durations cross processes and machines).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from blindfold.core.ratelimit import KeyedLimiter
from blindfold.errors import ProtocolError
from blindfold.web.target import path_has_prefix

Scope = Literal["ip", "range"]
_GO_DURATION = re.compile(r"(-?)((?:\d+(?:\.\d*)?|\.\d+)(?:h|ms|us|µs|ns|m|s))+")
_GO_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(h|ms|us|µs|ns|m|s)")
_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
MAX_DECISIONS = 1_000_000


def format_duration(seconds: float) -> str:
    """Go's time.Duration text, as CrowdSec writes it: '3h59m58.5s', '45s', '-2s'."""
    sign = "-" if seconds < 0 else ""
    seconds = abs(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    out = sign
    if hours:
        out += f"{int(hours)}h"
    if hours or minutes:
        out += f"{int(minutes)}m"
    text = f"{secs:.3f}".rstrip("0").rstrip(".")
    return out + f"{text or '0'}s"


def parse_duration(text: str) -> float:
    """Parse a Go duration ('4h', '3h59m59.99s', '-1.5s'). Raises ProtocolError."""
    if not isinstance(text, str) or not _GO_DURATION.fullmatch(text):
        raise ProtocolError("bad_decision", f"duration {text!r}")
    total = sum(float(n) * _UNITS[u] for n, u in _GO_PART.findall(text))
    return -total if text.startswith("-") else total


def normalise(scope: str, value: str) -> tuple[Scope, str]:
    """('Ip'|'ip'|'Range'|'range', text) -> canonical scope and network text. Raises
    ProtocolError for anything else (CrowdSec also has country/AS scopes: not enforceable at
    layer 4 without a database, so refused by the caller and counted)."""
    s = scope.lower()
    try:
        if s == "ip":
            addr = ipaddress.ip_address(value)
            if addr.version == 6 and addr.ipv4_mapped is not None:
                addr = addr.ipv4_mapped
            return "ip", str(addr)
        if s == "range":
            return "range", str(ipaddress.ip_network(value, strict=False))
    except ValueError:
        raise ProtocolError("bad_decision", f"{scope} {value!r}") from None
    raise ProtocolError("unsupported_scope", f"scope {scope!r}")


@dataclass(slots=True)
class Decision:
    id: int
    scope: Scope
    value: str
    type: str
    reason: str
    origin: str
    created: float
    until: float

    def to_crowdsec(self, now: float) -> dict[str, Any]:
        return {
            "id": self.id,
            "origin": self.origin,
            "type": self.type,
            "scope": "Ip" if self.scope == "ip" else "Range",
            "value": self.value,
            "duration": format_duration(self.until - now),
            "scenario": self.reason,
            "until": _rfc3339(self.until),
        }


def _rfc3339(ts: float) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(slots=True)
class _Bouncer:
    seen_id: int = 0  # decisions with a higher id are new to it
    seen_deleted: int = 0  # index into the deletion log already delivered


@dataclass(slots=True)
class DecisionStore:
    """Active decisions with ids, a log of deletions, and per-bouncer stream cursors."""

    decisions: dict[tuple[str, str], Decision] = field(default_factory=dict)
    deleted: list[Decision] = field(default_factory=list)
    deleted_base: int = 0  # index of deleted[0] in the whole deletion history
    bouncers: dict[str, _Bouncer] = field(default_factory=dict)
    next_id: int = 1

    def add(
        self,
        scope: str,
        value: str,
        duration_s: float,
        reason: str,
        now: float,
        *,
        origin: str = "blindfold",
        type_: str = "ban",
    ) -> Decision:
        """Add or extend (never shorten) a decision."""
        s, v = normalise(scope, value)
        key = (s, v)
        old = self.decisions.get(key)
        until = now + duration_s
        if old is not None and old.until >= until:
            return old
        if old is None and len(self.decisions) >= MAX_DECISIONS:
            self.expire(now)
            if len(self.decisions) >= MAX_DECISIONS:
                raise ProtocolError("too_many_decisions", f"{MAX_DECISIONS} active")
        decision = Decision(self.next_id, s, v, type_, reason, origin, now, until)
        self.next_id += 1
        self.decisions[key] = decision
        return decision

    def remove(self, scope: str, value: str) -> Decision | None:
        decision = self.decisions.pop(normalise(scope, value), None)
        if decision is not None:
            self._log_deleted(decision)
        return decision

    def expire(self, now: float) -> list[Decision]:
        gone = [d for d in self.decisions.values() if d.until <= now]
        for d in gone:
            del self.decisions[(d.scope, d.value)]
            self._log_deleted(d)
        return gone

    def _log_deleted(self, decision: Decision) -> None:
        self.deleted.append(decision)
        if len(self.deleted) > 100_000:  # bounded: a bouncer that far behind resyncs
            drop = len(self.deleted) - 50_000
            del self.deleted[:drop]
            self.deleted_base += drop

    def active(self, now: float) -> list[Decision]:
        return [d for d in self.decisions.values() if d.until > now]

    def stream(self, bouncer: str, startup: bool, now: float) -> dict[str, Any]:
        """CrowdSec's /v1/decisions/stream: on startup every active decision, then only what
        is new or deleted since this bouncer's previous call."""
        self.expire(now)
        state = self.bouncers.get(bouncer)
        if startup or state is None or state.seen_deleted < self.deleted_base:
            state = self.bouncers[bouncer] = _Bouncer()
            new = self.active(now)
            deleted: list[Decision] = []
        else:
            new = [d for d in self.decisions.values() if d.id > state.seen_id]
            deleted = self.deleted[state.seen_deleted - self.deleted_base :]
        state.seen_id = self.next_id - 1
        state.seen_deleted = self.deleted_base + len(self.deleted)
        return {
            "new": [d.to_crowdsec(now) for d in new] or None,
            "deleted": [d.to_crowdsec(now) for d in deleted] or None,
        }


@dataclass(frozen=True, slots=True)
class RateRule:
    path_prefix: str
    rate_per_s: float
    burst: int
    ban_duration_s: float
    name: str


class DecisionRules:
    """Turn what the origin sees into decisions: repeated WAF blocks from one address, or a
    request rate above a per-path rule."""

    def __init__(
        self,
        *,
        ban_after_blocks: int,
        block_window_s: float,
        ban_duration_s: float,
        rate_rules: tuple[RateRule, ...] = (),
        max_tracked: int = 100_000,
    ) -> None:
        self.ban_after_blocks = ban_after_blocks
        self.block_window_s = block_window_s
        self.ban_duration_s = ban_duration_s
        self.rate_rules = rate_rules
        self._blocks: dict[str, list[float]] = {}
        self._max_tracked = max_tracked
        self._limiters = [
            KeyedLimiter(r.rate_per_s, r.burst, 1 << 62, max_tracked) for r in rate_rules
        ]

    def on_block(self, ip: str, now: float) -> tuple[str, float, str] | None:
        """A WAF block from `ip`: (value, duration, reason) of a new ban, or None yet."""
        times = [t for t in self._blocks.get(ip, []) if now - t < self.block_window_s]
        times.append(now)
        if len(times) >= self.ban_after_blocks:
            self._blocks.pop(ip, None)
            return ip, self.ban_duration_s, f"waf: {len(times)} blocked requests"
        if len(self._blocks) >= self._max_tracked and ip not in self._blocks:
            self._blocks.pop(next(iter(self._blocks)))
        self._blocks[ip] = times
        return None

    def on_request(self, ip: str, path: bytes, now: float) -> tuple[str, float, str] | None:
        text = path.decode("latin-1")
        for rule, limiter in zip(self.rate_rules, self._limiters, strict=True):
            if path_has_prefix(text, rule.path_prefix):  # canonical path, by segment
                if limiter.try_open(ip, now) is not None:
                    return ip, rule.ban_duration_s, f"rate: {rule.name}"
                limiter.release(ip)
        return None

    def sweep(self, now: float) -> None:
        for limiter in self._limiters:
            limiter.sweep(now)
        stale = [ip for ip, ts in self._blocks.items() if now - ts[-1] >= self.block_window_s]
        for ip in stale:
            del self._blocks[ip]


def parse_stream(
    payload: Any,
) -> tuple[list[tuple[Scope, str, float, str]], list[tuple[Scope, str]], list[str]]:
    """A stream response -> (new [(scope, value, duration_s, reason)], deleted [(scope,
    value)], problems). Only 'ban' decisions on ip/range scopes are taken; others are
    reported, never guessed at."""
    if not isinstance(payload, dict):
        raise ProtocolError("bad_stream", "not a JSON object")
    new: list[tuple[Scope, str, float, str]] = []
    deleted: list[tuple[Scope, str]] = []
    problems: list[str] = []
    for key in ("new", "deleted"):
        items = payload.get(key) or []
        if not isinstance(items, list):
            raise ProtocolError("bad_stream", f"{key} is not a list")
        for item in items:
            try:
                if not isinstance(item, dict):
                    raise ProtocolError("bad_decision", "not an object")
                if str(item.get("type", "ban")).lower() != "ban":
                    raise ProtocolError("unsupported_type", str(item.get("type")))
                scope, value = normalise(str(item.get("scope", "")), str(item.get("value", "")))
                if key == "new":
                    duration = parse_duration(str(item.get("duration", "")))
                    reason = str(item.get("scenario") or item.get("origin") or "")[:200]
                    new.append((scope, value, duration, reason))
                else:
                    deleted.append((scope, value))
            except ProtocolError as exc:
                problems.append(str(exc))
    return new, deleted, problems
