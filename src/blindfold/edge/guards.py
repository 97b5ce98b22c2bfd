"""The edge's admission decisions, sans-IO: block/allow lists, bans, per-address limits, the
global connection cap and JA4 rules. All checks happen before a byte reaches an origin."""

from __future__ import annotations

from dataclasses import dataclass

from blindfold.config.edge import EdgeConfig, Ja4Rule
from blindfold.core.iplist import IPSet, MutableIPSet
from blindfold.core.ratelimit import KeyedLimiter, TokenBucket

# refusal reasons (metric label values)
BLOCKLIST = "blocklist"
BANNED = "banned"
PER_IP_CONCURRENT = "per_ip_concurrent"
PER_IP_RATE = "per_ip_rate"
GLOBAL_CAP = "global_cap"
JA4_BLOCK = "ja4_block"
JA4_RATE = "ja4_rate"


@dataclass(slots=True)
class Admission:
    """A connection's standing with the guards; `release` must be called once at its end."""

    key: int
    allowlisted: bool
    counted: bool  # holds a per-address slot


def client_key(version: int, addr: int, ipv6_prefix_len: int) -> int:
    """The per-address key: the IPv4 address, or the IPv6 prefix (negative, so the two spaces
    never collide)."""
    if version == 4:
        return addr
    return -1 - (addr >> (128 - ipv6_prefix_len))


class _RuleState:
    __slots__ = ("bucket", "buckets", "index", "rule")

    def __init__(self, index: int, rule: Ja4Rule, now: float) -> None:
        self.index = index
        self.rule = rule
        self.bucket = TokenBucket(rule.rate_per_s, rule.burst, now)
        self.buckets: KeyedLimiter | None = None
        if rule.per == "ip":
            self.buckets = KeyedLimiter(rule.rate_per_s, rule.burst, 1 << 62, 100_000)


class Guards:
    def __init__(self, config: EdgeConfig, workers: int, now: float) -> None:
        self.block = IPSet()
        self.allow = IPSet()
        self.bans = MutableIPSet()  # replaced and changed by edge.bans.BanUpdates
        self.open = 0
        self._limiter = KeyedLimiter(
            config.per_ip_rate_per_s,
            config.per_ip_burst,
            config.per_ip_concurrent,
            config.max_tracked_ips,
        )
        self._rules: list[_RuleState] = []
        self._rule_cache: dict[str, _RuleState | None] = {}
        self.rule_matches: dict[tuple[str, str], int] = {}  # (rule, refusal or "pass")
        self.configure(config, workers, now)

    def configure(self, config: EdgeConfig, workers: int, now: float) -> None:
        """Apply a (re)loaded config; open-connection counts and buckets are kept."""
        self.max_open = max(1, -(-config.max_connections // workers))
        self.prefix = config.ipv6_prefix_len
        self._limiter.configure(
            config.per_ip_rate_per_s,
            config.per_ip_burst,
            config.per_ip_concurrent,
            config.max_tracked_ips,
        )
        old = {(r.rule.ja4, r.rule.prefix, r.rule.per): r for r in self._rules}
        rules = []
        for i, rule in enumerate(config.ja4_rules):
            state = _RuleState(i, rule, now)
            kept = old.get((rule.ja4, rule.prefix, rule.per))
            if kept is not None and kept.rule == rule:
                state.bucket, state.buckets = kept.bucket, kept.buckets
            rules.append(state)
        self._rules = rules
        self._rule_cache = {}

    def rule_name(self, state: _RuleState) -> str:
        return state.rule.name or f"ja4_rule{state.index}"

    def admit(self, version: int, addr: int, now: float) -> tuple[str | None, Admission | None]:
        """At accept. Returns (refusal reason, None) or (None, admission)."""
        if self.open >= self.max_open:
            return GLOBAL_CAP, None
        key = client_key(version, addr, self.prefix)
        allowlisted = self.allow.size > 0 and self.allow.contains(addr, version)
        if not allowlisted:
            if self.block.size and self.block.contains(addr, version):
                return BLOCKLIST, None
            if self.bans.size and self.bans.contains(addr, version):
                return BANNED, None
            refused = self._limiter.try_open(key, now)
            if refused is not None:
                return (PER_IP_CONCURRENT if refused == "concurrent" else PER_IP_RATE), None
        self.open += 1
        return None, Admission(key, allowlisted, not allowlisted)

    def check_fingerprint(self, ja4: str, adm: Admission, now: float) -> str | None:
        """After the ClientHello: the refusal reason, or None. The matching rule (if any)
        counts the result in `rule_matches`."""
        if not self._rules or adm.allowlisted:
            return None
        if ja4 in self._rule_cache:
            state = self._rule_cache[ja4]
        else:
            state = None
            for candidate in self._rules:
                rule = candidate.rule
                if (ja4 == rule.ja4) if rule.ja4 else ja4.startswith(rule.prefix):
                    state = candidate
                    break
            if len(self._rule_cache) > 10_000:
                self._rule_cache.clear()
            self._rule_cache[ja4] = state
        if state is None:
            return None
        refused: str | None = None
        if state.rule.action == "block":
            refused = JA4_BLOCK
        elif state.buckets is not None:
            if state.buckets.try_open(adm.key, now) is not None:
                refused = JA4_RATE
            else:
                state.buckets.release(adm.key)  # rate only: no open-connection accounting
        elif not state.bucket.allow(now):
            refused = JA4_RATE
        key = (self.rule_name(state), refused or "pass")
        self.rule_matches[key] = self.rule_matches.get(key, 0) + 1
        return refused

    def standing(self, version: int, addr: int) -> Admission:
        """An address's standing for the checks made before a slot is taken (the JA4 rules
        of a QUIC flow whose client has not proven its address yet); takes nothing, and is
        never released."""
        allowlisted = self.allow.size > 0 and self.allow.contains(addr, version)
        return Admission(client_key(version, addr, self.prefix), allowlisted, False)

    def release(self, adm: Admission) -> None:
        self.open -= 1
        if adm.counted:
            self._limiter.release(adm.key)

    def is_banned(self, version: int, addr: int) -> bool:
        return (
            bool(self.bans)
            and self.bans.contains(addr, version)
            and not (bool(self.allow) and self.allow.contains(addr, version))
        )

    def sweep(self, now: float) -> None:
        self._limiter.sweep(now)
        for state in self._rules:
            if state.buckets is not None:
                state.buckets.sweep(now)

    @property
    def tracked(self) -> int:
        return len(self._limiter)
