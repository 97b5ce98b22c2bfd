"""Decisions, sans-IO: the store the origin serves, the rules that create decisions, and the
wire format of CrowdSec's bouncer stream API (`GET /v1/decisions/stream`), so an edge can read
ours or a real CrowdSec Local API.

A decision is {scope ip|range, value, type ban, duration, reason}. Time is passed in (`now`,
seconds since the epoch, because durations cross processes and machines).

The store tells a listener of every decision it makes or lifts; the origin's journal
(blindfold.decisions.journal) writes them as the lines `journal_line` makes, and
`DecisionStore.replay` reads them back at the next start.
"""

from __future__ import annotations

import heapq
import ipaddress
import json
import math
import secrets
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from blindfold.config.common import duration_seconds
from blindfold.core.ratelimit import KeyedLimiter
from blindfold.errors import ProtocolError
from blindfold.web.target import path_has_prefix

Scope = Literal["ip", "range"]
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
    try:
        return duration_seconds(text)
    except ValueError as exc:
        raise ProtocolError("bad_decision", str(exc)) from None


def parse_net(scope: str, value: str) -> tuple[int, int, int]:
    """('ip'|'Ip'|'range'|'Range', text) -> (IP version, network as an integer, prefix length).
    IPv4-mapped IPv6 becomes IPv4. Raises ProtocolError ('unsupported_scope' for CrowdSec's
    country/AS scopes, which layer 4 cannot enforce without a database; 'bad_decision' for
    anything that is not an address or CIDR).

    Our own parser over inet_pton rather than `ipaddress` because the edge parses every ban of
    a set that may hold a million: inet_pton is ten times faster, and as strict (no leading
    zeros, no short forms, no spaces)."""
    s = scope.lower() if isinstance(scope, str) else ""
    if s not in ("ip", "range"):
        raise ProtocolError("unsupported_scope", f"scope {scope!r}")
    if not isinstance(value, str) or len(value) > 64:
        raise ProtocolError("bad_decision", f"{scope} {value!r}"[:100])
    text, sep, length = value.partition("/")
    if sep and s == "ip":
        raise ProtocolError("bad_decision", f"{scope} {value!r}: an address has no prefix")
    try:
        if ":" in text:
            version, bits = 6, 128
            addr = int.from_bytes(socket.inet_pton(socket.AF_INET6, text), "big")
        else:
            version, bits = 4, 32
            addr = int.from_bytes(socket.inet_pton(socket.AF_INET, text), "big")
    except OSError:
        raise ProtocolError("bad_decision", f"{scope} {value!r}") from None
    if sep:
        if not length.isascii() or not length.isdigit() or len(length) > 3:
            raise ProtocolError("bad_decision", f"{scope} {value!r}: bad prefix length")
        plen = int(length)
        if plen > bits:
            raise ProtocolError("bad_decision", f"{scope} {value!r}: prefix longer than {bits}")
    else:
        plen = bits
    if version == 6 and addr >> 32 == 0xFFFF and plen >= 96:  # ::ffff:a.b.c.d (RFC 4291 §2.5.5.2)
        version, bits, addr, plen = 4, 32, addr & 0xFFFFFFFF, plen - 96
    return version, addr >> (bits - plen) << (bits - plen), plen


def format_net(version: int, net: int, plen: int, *, scope: Scope | None = None) -> str:
    """The canonical text of a network: the bare address for a single address (unless
    `scope` is 'range'), 'net/len' otherwise (RFC 5952 text for IPv6)."""
    if version == 4:
        text = socket.inet_ntop(socket.AF_INET, net.to_bytes(4, "big"))
        bits = 32
    else:
        text = str(ipaddress.IPv6Address(net))
        bits = 128
    return text if plen == bits and scope != "range" else f"{text}/{plen}"


def normalise(scope: str, value: str) -> tuple[Scope, str]:
    """('Ip'|'ip'|'Range'|'range', text) -> canonical scope and network text. Raises
    ProtocolError as `parse_net` does."""
    version, net, plen = parse_net(scope, value)
    s: Scope = "ip" if scope.lower() == "ip" else "range"
    return s, format_net(version, net, plen, scope=s)


def ban_target(ip: str, ipv6_prefix_len: int) -> str:
    """What a ban on the client `ip` covers: the IPv4 address, or the IPv6 prefix of
    `ipv6_prefix_len` bits that holds it (the unit the edge's per-address limits count: one
    host usually owns a whole /64 and can rotate through it)."""
    version, addr, _plen = parse_net("ip", ip)
    if version == 4 or ipv6_prefix_len >= 128:
        return format_net(version, addr, 32 if version == 4 else 128)
    shift = 128 - ipv6_prefix_len
    return format_net(6, addr >> shift << shift, ipv6_prefix_len)


def scope_of(value: str) -> Scope:
    return "range" if "/" in value else "ip"


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
    # the trusted edge whose PROXY claim of the visitor's address made (or last extended) it:
    # its name at the origin ("" if it has none) and its address; both "" when no edge's
    # claim did (a direct visitor, an operator)
    edge: str = ""
    edge_address: str = ""

    def to_crowdsec(self, now: float) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "origin": self.origin,
            "type": self.type,
            "scope": "Ip" if self.scope == "ip" else "Range",
            "value": self.value,
            "duration": format_duration(self.until - now),
            "scenario": self.reason,
            "until": _rfc3339(self.until),
        }
        if self.edge_address:  # our extension; CrowdSec's bouncers ignore unknown fields
            out["edge"] = self.edge or None
            out["edge_address"] = self.edge_address
        return out


def _rfc3339(ts: float) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


MAX_CURSORS = 10_000  # stream followers remembered without a position token (LRU)
MAX_DELETED_LOG = 100_000
MAX_JOURNAL_LINE = 4096  # bytes; a decision's line is ~250 (reason capped at 200 characters)
_JOURNAL_ENCODE = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True).encode


def journal_line(decision: Decision) -> bytes:
    """One line of the decision journal: a decision made or extended (the later line for the
    same network wins when it lasts longer, as `DecisionStore.add` never shortens)."""
    d = decision
    record = {
        "v": 1,
        "id": d.id,
        "scope": d.scope,
        "value": d.value,
        "type": d.type,
        "reason": d.reason[:200],
        "origin": d.origin[:64],
        "created": d.created,
        "until": d.until,
    }
    if d.edge_address:  # the edge whose claim made it: kept for audit and per-edge budgets
        record["edge"] = d.edge[:64]
        record["edge_address"] = d.edge_address[:64]
    return _JOURNAL_ENCODE(record).encode() + b"\n"


def journal_removal(decision: Decision) -> bytes:
    """One line of the decision journal: a decision lifted before its time."""
    record = {"v": 1, "op": "del", "scope": decision.scope, "value": decision.value}
    return _JOURNAL_ENCODE(record).encode() + b"\n"


def _journal_time(record: dict[str, Any], key: str) -> float:
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ProtocolError("bad_journal", f"{key} is not a time")
    return float(value)


def _journal_text(record: dict[str, Any], key: str, cap: int) -> str:
    value = record.get(key)
    if not isinstance(value, str) or len(value) > cap:
        raise ProtocolError("bad_journal", f"{key} is not a string of at most {cap} characters")
    return value


class StoreListener(Protocol):
    """Told of every change the store makes itself (not of expiry: each decision carries its
    `until`)."""

    def added(self, decision: Decision) -> None: ...

    def removed(self, decision: Decision) -> None: ...


@dataclass(slots=True)
class _Cursor:
    seen_id: int = 0  # decisions with a higher id are new to it
    seen_deleted: int = 0  # index into the deletion history already delivered


class DecisionStore:
    """Active decisions with ids, a log of deletions, and stream positions.

    A follower's position is (highest id seen, deletions seen). Our edges carry it themselves
    (a token in each answer, sent back with the next poll), so any number of edges may share
    an API key without taking each other's updates. Followers that send no token (CrowdSec
    bouncers) get one position per (API key, User-Agent): one key per edge, as with CrowdSec.
    """

    def __init__(self) -> None:
        self.decisions: dict[tuple[str, str], Decision] = {}  # kept in id order
        self.deleted: list[Decision] = []
        self.deleted_base = 0  # index of deleted[0] in the whole deletion history
        self.cursors: dict[tuple[str, str], _Cursor] = {}
        self.next_id = 1
        # positions from before a restart (ids start again at 1) are not ours to trust
        self.epoch = secrets.token_hex(4)
        self._expiry: list[tuple[float, int, tuple[str, str]]] = []
        self.listener: StoreListener | None = None

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
        edge: str = "",
        edge_address: str = "",
    ) -> Decision:
        """Add or extend (never shorten) a decision. `edge`, `edge_address`: the trusted edge
        whose PROXY claim caused it (an extension records the latest)."""
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
        decision = self._put(key, type_, reason, origin, now, until, edge, edge_address)
        if self.listener is not None:
            self.listener.added(decision)
        return decision

    def _put(
        self,
        key: tuple[Scope, str],
        type_: str,
        reason: str,
        origin: str,
        now: float,
        until: float,
        edge: str = "",
        edge_address: str = "",
    ) -> Decision:
        decision = Decision(
            self.next_id, key[0], key[1], type_, reason, origin, now, until, edge, edge_address
        )
        self.next_id += 1
        self.decisions.pop(key, None)  # an extension moves to the end: the dict stays in id order
        self.decisions[key] = decision
        heapq.heappush(self._expiry, (until, decision.id, key))
        if len(self._expiry) > 2 * len(self.decisions) + 1024:
            self._expiry = [(d.until, d.id, k) for k, d in self.decisions.items()]
            heapq.heapify(self._expiry)
        return decision

    def remove(self, scope: str, value: str) -> Decision | None:
        decision = self.decisions.pop(normalise(scope, value), None)
        if decision is not None:
            self._log_deleted(decision)
            if self.listener is not None:
                self.listener.removed(decision)
        return decision

    def replay(self, lines: Iterable[bytes], now: float) -> tuple[int, list[str]]:
        """Restore decisions from journal lines (`journal_line`, `journal_removal`), in the
        order written, before anyone follows the stream: the listener is not told, and the
        decisions get new ids in this store's new epoch, so every follower's next answer is
        the whole set. Expired ones are dropped. A line that is not a journal record (a line a
        crash cut short, a damaged block) is skipped and named in the problems returned.
        Returns (decisions restored, problems)."""
        problems: list[str] = []
        for n, raw in enumerate(lines, 1):
            try:
                self._replay_one(raw, now)
            except ProtocolError as exc:
                if len(problems) < 100:
                    problems.append(f"line {n}: {exc}")
        self.expire(now)
        self.deleted.clear()  # nobody followed the old store: nothing to tell of its deletions
        return len(self.decisions), problems

    def _replay_one(self, raw: bytes, now: float) -> None:
        if not raw.endswith(b"\n"):
            raise ProtocolError("bad_journal", "cut short (no end of line)")
        if len(raw) > MAX_JOURNAL_LINE:
            raise ProtocolError("bad_journal", "line too long")
        try:
            record = json.loads(raw)
        except (ValueError, RecursionError):
            raise ProtocolError("bad_journal", "not JSON") from None
        if not isinstance(record, dict) or record.get("v") != 1:
            raise ProtocolError("bad_journal", "not a version 1 record")
        key = normalise(_journal_text(record, "scope", 8), _journal_text(record, "value", 64))
        if record.get("op") == "del":
            self.decisions.pop(key, None)
            return
        if "op" in record:
            raise ProtocolError("bad_journal", f"unknown op {str(record['op'])[:20]!r}")
        until = _journal_time(record, "until")
        created = _journal_time(record, "created")
        type_ = _journal_text(record, "type", 32)
        reason = _journal_text(record, "reason", 200)
        origin = _journal_text(record, "origin", 64)
        edge = _journal_text(record, "edge", 64) if "edge" in record else ""
        edge_address = _journal_text(record, "edge_address", 64) if "edge_address" in record else ""
        old = self.decisions.get(key)
        if until <= now or (old is not None and old.until >= until):
            return
        if old is None and len(self.decisions) >= MAX_DECISIONS:
            raise ProtocolError("too_many_decisions", f"{MAX_DECISIONS} active")
        self._put(key, type_, reason, origin, created, until, edge, edge_address)

    def expire(self, now: float) -> list[Decision]:
        gone = []
        heap = self._expiry
        while heap and heap[0][0] <= now:
            _until, id_, key = heapq.heappop(heap)
            d = self.decisions.get(key)
            if d is not None and d.id == id_:
                del self.decisions[key]
                self._log_deleted(d)
                gone.append(d)
        return gone

    def _log_deleted(self, decision: Decision) -> None:
        self.deleted.append(decision)
        if len(self.deleted) > MAX_DELETED_LOG:  # bounded: a follower that far behind resyncs
            drop = len(self.deleted) - MAX_DELETED_LOG // 2
            del self.deleted[:drop]
            self.deleted_base += drop

    def active(self, now: float) -> list[Decision]:
        return [d for d in self.decisions.values() if d.until > now]

    def position(self, token: str) -> _Cursor | None:
        """A position token from a previous answer, or None if it is not one of ours, from
        before a restart, or too old for the deletion log."""
        epoch, _, rest = token.partition(".")
        seen_id, _, seen_deleted = rest.partition(".")
        if epoch != self.epoch or not (seen_id.isdigit() and seen_deleted.isdigit()):
            return None
        if len(seen_id) > 18 or len(seen_deleted) > 18:
            return None
        cursor = _Cursor(int(seen_id), int(seen_deleted))
        end = self.deleted_base + len(self.deleted)
        if cursor.seen_id >= self.next_id or not self.deleted_base <= cursor.seen_deleted <= end:
            return None
        return cursor

    def stream(
        self,
        bouncer: str,
        startup: bool,
        now: float,
        *,
        position: str | None = None,
        instance: str = "",
    ) -> dict[str, Any]:
        """CrowdSec's /v1/decisions/stream: on startup every active decision, then only what
        is new or deleted since the follower's position. The answer carries our extension
        `blindfold: {position, full}`: the token to send back, and whether this answer is the
        whole set (startup, or a position we could not continue from)."""
        cursor = self.begin_poll(bouncer, startup, now, position=position, instance=instance)
        if cursor is None:
            snapshot = self.snapshot(now)
            if position is None:
                self.remember(bouncer, instance, snapshot.after)
            return snapshot.payload(now)
        payload, after = self.delta(cursor, now)
        if position is None:
            self.remember(bouncer, instance, after)
        return payload

    def begin_poll(
        self,
        bouncer: str,
        startup: bool,
        now: float,
        *,
        position: str | None = None,
        instance: str = "",
    ) -> _Cursor | None:
        """Where a poll continues from, or None when it must be answered with the whole set
        (`snapshot`). A follower without a token gives up its remembered position here;
        `remember` sets it again."""
        self.expire(now)
        cursor: _Cursor | None = None
        if not startup:
            if position is not None:
                cursor = self.position(position)
            else:
                cursor = self.cursors.pop((bouncer, instance), None)
        if cursor is None or cursor.seen_deleted < self.deleted_base:
            return None
        return cursor

    def delta(self, cursor: _Cursor, now: float) -> tuple[dict[str, Any], _Cursor]:
        """What is new or deleted since `cursor`, and the position after it."""
        new = []
        for d in reversed(self.decisions.values()):
            if d.id <= cursor.seen_id:
                break
            new.append(d)
        new.reverse()
        deleted = self.deleted[cursor.seen_deleted - self.deleted_base :]
        after = self._after()
        payload = {
            "new": [d.to_crowdsec(now) for d in new] or None,
            "deleted": [d.to_crowdsec(now) for d in deleted] or None,
            "blindfold": {"position": self.token(after), "full": False},
        }
        return payload, after

    def snapshot(self, now: float) -> Snapshot:
        """The whole active set as of now, with the position after it (cheap: the answer
        itself is built by `Snapshot.payload` or `Snapshot.encode`, which a server runs off
        its event loop: 100k decisions take ~0.6 s)."""
        self.expire(now)
        after = self._after()
        return Snapshot(self.active(now), self.token(after), after, now)

    def remember(self, bouncer: str, instance: str, after: _Cursor) -> None:
        """The position of a follower without a token (one per API key and User-Agent)."""
        key = (bouncer, instance)
        self.cursors.pop(key, None)
        self.cursors[key] = after
        while len(self.cursors) > MAX_CURSORS:
            del self.cursors[next(iter(self.cursors))]

    def _after(self) -> _Cursor:
        return _Cursor(self.next_id - 1, self.deleted_base + len(self.deleted))

    def token(self, cursor: _Cursor) -> str:
        return f"{self.epoch}.{cursor.seen_id}.{cursor.seen_deleted}"


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The whole set of decisions at `taken`, and the stream position right after it."""

    decisions: list[Decision]
    position: str
    after: _Cursor
    taken: float

    def payload(self, now: float) -> dict[str, Any]:
        return {
            "new": [d.to_crowdsec(now) for d in self.decisions] or None,
            "deleted": None,
            "blindfold": {"position": self.position, "full": True},
        }

    def encode(self, now: float) -> bytes:
        """`payload(now)` as compact JSON (see `encode_list`)."""
        tail = json.dumps(
            {"deleted": None, "blindfold": {"position": self.position, "full": True}},
            separators=(",", ":"),
        )[1:]
        return b'{"new":' + self.encode_list(now) + b"," + tail.encode()

    def encode_list(self, now: float, chunk: int = 1000) -> bytes:
        """The decisions as a compact JSON list (null when none), encoded `chunk` at a time:
        run in a thread, the GIL is let go between chunks (json's C encoder holds it through
        one call), so the event loop keeps running."""
        if not self.decisions:
            return b"null"
        parts = []
        for i in range(0, len(self.decisions), chunk):
            items = [d.to_crowdsec(now) for d in self.decisions[i : i + chunk]]
            parts.append(json.dumps(items, separators=(",", ":"))[1:-1])
        return ("[" + ",".join(parts) + "]").encode()


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
        ipv6_prefix_len: int = 64,
    ) -> None:
        self.ban_after_blocks = ban_after_blocks
        self.ipv6_prefix_len = ipv6_prefix_len
        self.block_window_s = block_window_s
        self.ban_duration_s = ban_duration_s
        self.rate_rules = rate_rules
        self._blocks: dict[str, list[float]] = {}
        self._max_tracked = max_tracked
        self._limiters = [
            KeyedLimiter(r.rate_per_s, r.burst, 1 << 62, max_tracked) for r in rate_rules
        ]

    def _target(self, ip: str) -> str | None:
        try:
            return ban_target(ip, self.ipv6_prefix_len)
        except ProtocolError:
            return None

    def on_block(self, ip: str, now: float) -> tuple[str, float, str] | None:
        """A WAF block from `ip`: (value, duration, reason) of a new ban, or None yet. Blocks
        are counted, and bans made, per `ban_target` (an IPv6 client's whole prefix)."""
        target = self._target(ip)
        if target is None:
            return None
        ip = target
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
        target = self._target(ip)
        if target is None:
            return None
        ip = target
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
