"""The edge's metrics: their definitions, and the per-worker numbers behind them."""

from __future__ import annotations

from blindfold.obs.metrics import Histogram, MetricSpec, Snapshot

HELLO_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 5e-3)
TOP_JA4 = 20
JA4_OTHER = "other"  # never a JA4 fingerprint (those are t/q + digits + ...)

EDGE_METRICS = [
    MetricSpec(
        "blindfold_connections_accepted_total",
        "counter",
        "Connections accepted, by listener.",
        ("listener",),
    ),
    MetricSpec(
        "blindfold_connections_refused_total",
        "counter",
        "Connections closed before reaching an origin, by reason.",
        ("reason",),
    ),
    MetricSpec(
        "blindfold_connections_closed_total",
        "counter",
        "Connections that reached a route, by route and outcome.",
        ("route", "outcome"),
    ),
    MetricSpec("blindfold_connections_active", "gauge", "Open visitor connections."),
    MetricSpec(
        "blindfold_route_connections_total",
        "counter",
        "Connections admitted to a route (its guards passed), by route and mode.",
        ("route", "mode"),
    ),
    MetricSpec(
        "blindfold_route_connections_active",
        "gauge",
        "Open relayed connections per route.",
        ("route",),
    ),
    MetricSpec(
        "blindfold_bytes_relayed_total",
        "counter",
        "Bytes relayed, by route and direction (to_origin, to_client).",
        ("route", "direction"),
    ),
    MetricSpec(
        "blindfold_origin_up",
        "gauge",
        "1 if no worker has the origin marked down, else 0.",
        ("route", "origin"),
        merge="min",
    ),
    MetricSpec(
        "blindfold_origin_connections_active",
        "gauge",
        "Open connections per origin.",
        ("route", "origin"),
    ),
    MetricSpec(
        "blindfold_origin_connect_failures_total",
        "counter",
        "Failed connects to an origin, by reason.",
        ("route", "origin", "reason"),
    ),
    MetricSpec(
        "blindfold_hello_parse_seconds",
        "histogram",
        "CPU time spent parsing ClientHello bytes (per parse call).",
        buckets=HELLO_BUCKETS,
    ),
    MetricSpec(
        "blindfold_ja4_connections_total",
        "counter",
        f"Connections per JA4 fingerprint: the {TOP_JA4} most frequent, the rest as "
        'ja4="other" (bounded label cardinality).',
        ("ja4",),
    ),
    MetricSpec(
        "blindfold_ja4_rule_matches_total",
        "counter",
        "Connections matched by a JA4 rule, by rule and result.",
        ("rule", "result"),
    ),
    MetricSpec(
        "blindfold_list_entries",
        "gauge",
        "Entries loaded from block/allow lists.",
        ("list",),
        merge="max",
    ),
    MetricSpec(
        "blindfold_list_reloads_total",
        "counter",
        "List file (re)loads by result.",
        ("result",),
        merge="max",
    ),
    MetricSpec("blindfold_tracked_addresses", "gauge", "Client addresses with per-address state."),
    MetricSpec(
        "blindfold_log_lines_dropped_total",
        "counter",
        "Log lines dropped because the log reader was too slow.",
    ),
    MetricSpec(
        "blindfold_config_reloads_total", "counter", "Configuration reloads by result.", ("result",)
    ),
    MetricSpec("blindfold_workers", "gauge", "Worker processes by state.", ("state",)),
    MetricSpec("blindfold_decisions_active", "gauge", "Bans from decision sources being enforced."),
    MetricSpec(
        "blindfold_decisions_source_up",
        "gauge",
        "1 if the decision source answered its last poll; 0: enforcing the last known set.",
        ("source",),
    ),
    MetricSpec(
        "blindfold_decisions_polls_total",
        "counter",
        "Decision source polls by result.",
        ("source", "result"),
    ),
    MetricSpec(
        "blindfold_decisions_refused_total",
        "counter",
        "Decisions not enforced, by reason: too_wide, cap, unsigned, unknown_signer, "
        "bad_signature, expired, replayed, bad_decision, unsupported_scope, unsupported_type.",
        ("reason",),
    ),
    MetricSpec(
        "blindfold_ban_updates_pending",
        "gauge",
        "Ban changes not yet acknowledged by the workers (0: every worker enforces the set).",
    ),
    MetricSpec(
        "blindfold_ban_resyncs_total",
        "counter",
        "Workers sent a whole ban snapshot because they fell too far behind.",
    ),
    MetricSpec(
        "blindfold_connections_closed_by_ban_total",
        "counter",
        "Open connections closed because their address was banned.",
    ),
]
EDGE_SPECS = {spec.name: spec for spec in EDGE_METRICS}


class RouteStats:
    """Counters of one route name; kept across reloads so they never go backwards."""

    __slots__ = ("active", "bytes_to_client", "bytes_to_origin", "mode", "opened", "outcomes")

    def __init__(self) -> None:
        self.active = 0
        self.opened = 0  # connections the route was chosen for (its guards let them in)
        self.mode = ""
        self.bytes_to_origin = 0
        self.bytes_to_client = 0
        self.outcomes: dict[str, int] = {}


class WorkerStats:
    def __init__(self) -> None:
        self.accepted: dict[str, int] = {}
        self.refused: dict[str, int] = {}
        self.routes: dict[str, RouteStats] = {}
        self.hello_parse = Histogram(HELLO_BUCKETS)
        self.ja4: dict[str, int] = {}
        self.ja4_total = 0  # every fingerprint counted, those evicted from `ja4` included
        self.list_entries: dict[str, int] = {}
        self.list_reloads: dict[str, int] = {}

    def route(self, name: str) -> RouteStats:
        stats = self.routes.get(name)
        if stats is None:
            stats = self.routes[name] = RouteStats()
        return stats

    def refuse(self, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1

    def count_ja4(self, ja4: str) -> None:
        counts = self.ja4
        counts[ja4] = counts.get(ja4, 0) + 1
        self.ja4_total += 1
        if len(counts) > 2000:  # bounded: keep the most frequent half
            keep = sorted(counts.items(), key=lambda kv: kv[1], reverse=True)[:1000]
            self.ja4 = dict(keep)

    def snapshot(
        self,
        active: int,
        tracked: int,
        dropped_logs: int,
        origins: list[tuple[str, str, int, int, dict[str, int]]],
        ja4_rules: dict[tuple[str, str], int],
    ) -> Snapshot:
        top = sorted(self.ja4.items(), key=lambda kv: kv[1], reverse=True)[: TOP_JA4 * 3]
        rest = self.ja4_total - sum(n for _k, n in top)
        if rest:
            top.append((JA4_OTHER, rest))
        return {
            "blindfold_connections_accepted_total": [[[k], v] for k, v in self.accepted.items()],
            "blindfold_connections_refused_total": [[[k], v] for k, v in self.refused.items()],
            "blindfold_connections_closed_total": [
                [[route, outcome], n]
                for route, s in self.routes.items()
                for outcome, n in s.outcomes.items()
            ],
            "blindfold_connections_active": [[[], active]],
            "blindfold_route_connections_total": [
                [[route, s.mode], s.opened] for route, s in self.routes.items() if s.opened
            ],
            "blindfold_route_connections_active": [
                [[route], s.active] for route, s in self.routes.items()
            ],
            "blindfold_bytes_relayed_total": [
                item
                for route, s in self.routes.items()
                for item in (
                    [[route, "to_origin"], s.bytes_to_origin],
                    [[route, "to_client"], s.bytes_to_client],
                )
            ],
            "blindfold_origin_up": [[[r, o], up] for r, o, up, _a, _f in origins],
            "blindfold_origin_connections_active": [[[r, o], a] for r, o, _u, a, _f in origins],
            "blindfold_origin_connect_failures_total": [
                [[r, o, reason], n] for r, o, _u, _a, f in origins for reason, n in f.items()
            ],
            "blindfold_hello_parse_seconds": [[[], self.hello_parse.value()]],
            "blindfold_ja4_connections_total": [[[k], v] for k, v in top],
            "blindfold_ja4_rule_matches_total": [
                [[rule, result], n] for (rule, result), n in ja4_rules.items()
            ],
            "blindfold_list_entries": [[[k], v] for k, v in self.list_entries.items()],
            "blindfold_list_reloads_total": [[[k], v] for k, v in self.list_reloads.items()],
            "blindfold_tracked_addresses": [[[], tracked]],
            "blindfold_log_lines_dropped_total": [[[], dropped_logs]],
        }


def top_ja4(snapshot: Snapshot) -> Snapshot:
    """After merging workers: keep only the TOP_JA4 most frequent fingerprints."""
    samples = snapshot.get("blindfold_ja4_connections_total")
    if samples:
        other = sum(s[1] for s in samples if s[0] == [JA4_OTHER])
        samples[:] = [s for s in samples if s[0] != [JA4_OTHER]]
        samples.sort(key=lambda s: s[1], reverse=True)
        other += sum(s[1] for s in samples[TOP_JA4:])
        del samples[TOP_JA4:]
        if other:
            samples.append([[JA4_OTHER], other])
    return snapshot
