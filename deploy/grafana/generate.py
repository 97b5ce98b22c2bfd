"""Writes the Grafana dashboards in this directory (one per component) from the panel lists
below: `python deploy/grafana/generate.py`. The JSON files are what you import into Grafana
(Dashboards > New > Import); a test checks they match this script and that every metric they
query is one blindfold exports (tests/integration/test_observability_rules.py).

Each dashboard has a `datasource` variable (any Prometheus) and an `instance` variable (the
scraped admin listeners of that component, by the `job` you gave them: blindfold-edge,
blindfold-origin, blindfold-keyserver)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SEL = 'instance=~"$instance"'


def rate(metric: str, by: str, where: str = "") -> str:
    labels = f"{SEL},{where}" if where else SEL
    return f"sum by ({by}) (rate({metric}{{{labels}}}[$__rate_interval]))"


def quantiles(metric: str) -> list[tuple[str, str]]:
    buckets = f"sum by (le) (rate({metric}_bucket{{{SEL}}}[$__rate_interval]))"
    return [(f"histogram_quantile({q}, {buckets})", f"p{int(q * 100)}") for q in (0.5, 0.99)]


KEYLESS_HITS = 'result=~"hit|revalidated"'
KEYLESS_LOOKUPS = 'result=~"hit|revalidated|miss"'
BLIND_HITS = 'result=~"hit_memory|hit_disk"'
BLIND_LOOKUPS = 'result=~"hit_memory|hit_disk|miss|uncached|joined"'

# (title, unit, [(expr, legend)], kind)
Panel = tuple[str, str, list[tuple[str, str]], str]

EDGE: list[Panel] = [
    (
        "Open connections",
        "short",
        [(f"sum(blindfold_connections_active{{{SEL}}})", "open")],
        "stat",
    ),
    ("Active bans", "short", [(f"max(blindfold_decisions_active{{{SEL}}})", "bans")], "stat"),
    (
        "Workers ready",
        "short",
        [(f'sum(blindfold_workers{{{SEL},state="ready"}})', "ready")],
        "stat",
    ),
    (
        "Decision sources up",
        "short",
        [(f"min by (source) (blindfold_decisions_source_up{{{SEL}}})", "{{source}}")],
        "stat",
    ),
    (
        "New connections/s by route and mode",
        "cps",
        [(rate("blindfold_route_connections_total", "route, mode"), "{{route}} ({{mode}})")],
        "timeseries",
    ),
    (
        "Open connections by route",
        "short",
        [
            (f"sum by (route) (blindfold_route_connections_active{{{SEL}}})", "{{route}} relayed"),
            (
                f"sum by (route) (blindfold_keyless_connections_active{{{SEL}}})",
                "{{route}} keyless",
            ),
        ],
        "timeseries",
    ),
    (
        "Refusals/s by reason",
        "cps",
        [(rate("blindfold_connections_refused_total", "reason"), "{{reason}}")],
        "timeseries",
    ),
    (
        "Top JA4 fingerprints (connections/s)",
        "cps",
        [(f"topk(10, {rate('blindfold_ja4_connections_total', 'ja4')})", "{{ja4}}")],
        "timeseries",
    ),
    (
        "Keyless handshakes/s by result",
        "ops",
        [(rate("blindfold_keyless_handshakes_total", "result"), "{{result}}")],
        "timeseries",
    ),
    (
        "Key-server latency (seen by the edge)",
        "s",
        quantiles("blindfold_keyless_sign_seconds"),
        "timeseries",
    ),
    (
        "Cache hit ratio",
        "percentunit",
        [
            (
                rate("blindfold_keyless_cache_total", "route", KEYLESS_HITS)
                + " / "
                + rate("blindfold_keyless_cache_total", "route", KEYLESS_LOOKUPS),
                "{{route}} keyless",
            ),
            (
                rate("blindfold_blind_requests_total", "route", BLIND_HITS)
                + " / "
                + rate("blindfold_blind_requests_total", "route", BLIND_LOOKUPS),
                "{{route}} blind",
            ),
        ],
        "timeseries",
    ),
    (
        "Cache bytes by tier",
        "bytes",
        [
            (
                f"sum by (route) (blindfold_keyless_cache_bytes{{{SEL}}})",
                "{{route}} memory (keyless)",
            ),
            (f"sum by (route, tier) (blindfold_blind_cache_bytes{{{SEL}}})", "{{route}} {{tier}}"),
        ],
        "timeseries",
    ),
    (
        "Bytes relayed/s",
        "Bps",
        [(rate("blindfold_bytes_relayed_total", "route, direction"), "{{route}} {{direction}}")],
        "timeseries",
    ),
    (
        "Origins up",
        "short",
        [(f"min by (route, origin) (blindfold_origin_up{{{SEL}}})", "{{route}} {{origin}}")],
        "timeseries",
    ),
]

ORIGIN: list[Panel] = [
    (
        "Requests/s",
        "reqps",
        [(rate("blindfold_origin_requests_total", "instance"), "{{instance}}")],
        "stat",
    ),
    (
        "Active decisions",
        "short",
        [(f"max(blindfold_decisions_active{{{SEL}}})", "decisions")],
        "stat",
    ),
    (
        "Open connections",
        "short",
        [(f"sum(blindfold_origin_connections_active{{{SEL}}})", "open")],
        "stat",
    ),
    (
        "Requests/s by status",
        "reqps",
        [(rate("blindfold_origin_requests_total", "status"), "{{status}}")],
        "timeseries",
    ),
    (
        "WAF blocks/s by rule",
        "reqps",
        [(f"topk(10, {rate('blindfold_waf_rule_blocks_total', 'rule')})", "{{rule}}")],
        "timeseries",
    ),
    (
        "WAF blocks/s by path",
        "reqps",
        [(f"topk(10, {rate('blindfold_waf_path_blocks_total', 'path')})", "{{path}}")],
        "timeseries",
    ),
    (
        "Decisions made/s by cause",
        "ops",
        [(rate("blindfold_decisions_created_total", "cause"), "{{cause}}")],
        "timeseries",
    ),
    (
        "Upstream errors/s by reason",
        "ops",
        [(rate("blindfold_origin_upstream_errors_total", "reason"), "{{reason}}")],
        "timeseries",
    ),
    (
        "Upstream latency (to response head)",
        "s",
        quantiles("blindfold_origin_upstream_seconds"),
        "timeseries",
    ),
    (
        "Connections/s by result",
        "cps",
        [(rate("blindfold_origin_connections_total", "result"), "{{result}}")],
        "timeseries",
    ),
    (
        "Decision stream requests/s by edge",
        "reqps",
        [(rate("blindfold_decision_stream_requests_total", "bouncer"), "{{bouncer}}")],
        "timeseries",
    ),
]

KEYSERVER: list[Panel] = [
    (
        "Signatures/s",
        "ops",
        [(rate("blindfold_keyserver_signatures_total", "instance", 'result="ok"'), "{{instance}}")],
        "stat",
    ),
    (
        "Edges connected",
        "short",
        [(f"sum(blindfold_keyserver_connections_active{{{SEL}}})", "edges")],
        "stat",
    ),
    (
        "Certificate expiry",
        "s",
        [(f"min by (hostname) (blindfold_certificate_expiry_seconds{{{SEL}}})", "{{hostname}}")],
        "stat",
    ),
    (
        "Signatures/s by edge",
        "ops",
        [(rate("blindfold_keyserver_signatures_total", "edge", 'result="ok"'), "{{edge}}")],
        "timeseries",
    ),
    (
        "Signatures/s by hostname",
        "ops",
        [(rate("blindfold_keyserver_hostname_signatures_total", "hostname"), "{{hostname}}")],
        "timeseries",
    ),
    (
        "Refusals/s by reason",
        "ops",
        [
            (
                rate("blindfold_keyserver_signatures_total", "edge, result", 'result!="ok"'),
                "{{edge}} {{result}}",
            )
        ],
        "timeseries",
    ),
    (
        "Signing latency (authorise, sign, log)",
        "s",
        quantiles("blindfold_keyserver_sign_seconds"),
        "timeseries",
    ),
    (
        "Edge connections/s by result",
        "cps",
        [(rate("blindfold_keyserver_connections_total", "result"), "{{result}}")],
        "timeseries",
    ),
]


def dashboard(uid: str, title: str, job: str, panels: list[Panel]) -> dict[str, Any]:
    out = []
    x = y = 0
    for i, (name, unit, targets, kind) in enumerate(panels):
        w, h = (6, 4) if kind == "stat" else (12, 8)
        if x + w > 24:
            x, y = 0, y + h
        out.append(
            {
                "id": i + 1,
                "type": kind,
                "title": name,
                "datasource": {"type": "prometheus", "uid": "${datasource}"},
                "gridPos": {"x": x, "y": y, "w": w, "h": h},
                "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                "options": {"legend": {"displayMode": "list", "placement": "bottom"}}
                if kind == "timeseries"
                else {"reduceOptions": {"calcs": ["lastNotNull"]}},
                "targets": [
                    {
                        "refId": chr(ord("A") + j),
                        "datasource": {"type": "prometheus", "uid": "${datasource}"},
                        "expr": expr,
                        "legendFormat": legend,
                    }
                    for j, (expr, legend) in enumerate(targets)
                ],
            }
        )
        x += w
    return {
        "uid": uid,
        "title": title,
        "tags": ["blindfold"],
        "timezone": "utc",
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {
            "list": [
                {"name": "datasource", "type": "datasource", "query": "prometheus"},
                {
                    "name": "instance",
                    "type": "query",
                    "datasource": {"type": "prometheus", "uid": "${datasource}"},
                    "query": f'label_values(up{{job="{job}"}}, instance)',
                    "multi": True,
                    "includeAll": True,
                    "current": {"text": "All", "value": "$__all"},
                },
            ]
        },
        "panels": out,
    }


DASHBOARDS = {
    "edge.json": dashboard("blindfold-edge", "blindfold edge", "blindfold-edge", EDGE),
    "origin.json": dashboard(
        "blindfold-origin", "blindfold origin agent", "blindfold-origin", ORIGIN
    ),
    "keyserver.json": dashboard(
        "blindfold-keyserver", "blindfold key server", "blindfold-keyserver", KEYSERVER
    ),
}


def render(board: dict[str, Any]) -> str:
    return json.dumps(board, indent=2) + "\n"


if __name__ == "__main__":
    for name, board in DASHBOARDS.items():
        (HERE / name).write_text(render(board))
        print(f"wrote {HERE / name}", file=sys.stderr)
