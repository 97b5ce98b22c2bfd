"""Every metric blindfold exports, by process, and the series names Prometheus sees for them
(a histogram `x` is scraped as `x_bucket`, `x_sum` and `x_count`). The dashboards and alert
rules in deploy/ are checked against this list (and it against the live endpoints), so a
renamed metric cannot leave a panel or an alert silently empty."""

from __future__ import annotations

import re
from collections.abc import Iterable

from blindfold.obs.metrics import MetricSpec

# a name inside a PromQL expression; label names and values never start with it
_NAME = re.compile(r"\bblindfold_[a-z0-9_]+\b")


def metrics_by_process() -> dict[str, list[MetricSpec]]:
    from blindfold.edge.master import EDGE_METRICS_ALL
    from blindfold.edge.modes import metrics as mode_metrics
    from blindfold.keyserver.server import KEYSERVER_METRICS
    from blindfold.origin.agent import ORIGIN_METRICS
    from blindfold.origin.h3 import QUIC_METRICS

    return {
        "edge": [*EDGE_METRICS_ALL, *mode_metrics()],
        "origin": [*ORIGIN_METRICS, *QUIC_METRICS],
        "keyserver": list(KEYSERVER_METRICS),
    }


def series_names(specs: Iterable[MetricSpec]) -> set[str]:
    out: set[str] = set()
    for spec in specs:
        if spec.kind == "histogram":
            out.update(f"{spec.name}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
        else:
            out.add(spec.name)
    return out


def exported_series() -> set[str]:
    return {n for specs in metrics_by_process().values() for n in series_names(specs)}


def names_in(text: str) -> set[str]:
    """The blindfold metric names an expression (or a whole rules/dashboard file) uses."""
    return set(_NAME.findall(text))
