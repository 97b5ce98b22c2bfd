"""Prometheus metrics that several worker processes report and one admin listener serves.

Each process keeps plain numbers (the hot path does dictionary increments, nothing more) and
produces a *snapshot*: ``{metric name: [[label values...], value], ...]}`` where a histogram's
value is ``[bucket counts..., sum, count]``. The admin listener merges the snapshots of all
workers (sum, or min/max where the spec says so) and renders the text exposition format
(https://prometheus.io/docs/instrumenting/exposition_formats/).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

Sample = list[Any]  # [labels: list[str], value: float | list[float]] (JSON between processes)
Snapshot = dict[str, list[Sample]]


@dataclass(frozen=True, slots=True)
class MetricSpec:
    name: str
    kind: Literal["counter", "gauge", "histogram"]
    help: str
    labels: tuple[str, ...] = ()
    merge: Literal["sum", "min", "max"] = "sum"
    buckets: tuple[float, ...] = ()


class Histogram:
    """Cumulative-on-render histogram with fixed buckets."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # last = +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.sum += value
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
                return
        self.counts[-1] += 1

    def value(self) -> list[float]:
        return [*map(float, self.counts), self.sum, float(sum(self.counts))]


def merge(snapshots: Iterable[Snapshot], specs: Mapping[str, MetricSpec]) -> Snapshot:
    out: dict[str, dict[tuple[str, ...], Any]] = {}
    for snap in snapshots:
        for name, samples in snap.items():
            spec = specs.get(name)
            if spec is None:
                continue
            table = out.setdefault(name, {})
            for labels, value in samples:
                key = tuple(labels)
                old = table.get(key)
                if old is None:
                    table[key] = value
                elif spec.kind == "histogram":
                    table[key] = [a + b for a, b in zip(old, value, strict=True)]
                elif spec.merge == "min":
                    table[key] = min(old, value)
                elif spec.merge == "max":
                    table[key] = max(old, value)
                else:
                    table[key] = old + value
    return {name: [[list(k), v] for k, v in table.items()] for name, table in out.items()}


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _fmt(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(str(v))}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def render(snapshot: Snapshot, specs: Sequence[MetricSpec]) -> str:
    lines: list[str] = []
    for spec in specs:
        samples = snapshot.get(spec.name)
        if samples is None and spec.labels:
            continue  # no series yet
        lines.append(f"# HELP {spec.name} {spec.help}")
        lines.append(f"# TYPE {spec.name} {spec.kind}")
        if samples is None:
            if spec.kind != "histogram":
                lines.append(f"{spec.name} 0")
                continue
            # unused so far: zero in every bucket (a bare `name 0` is not a histogram)
            samples = [[[], [0.0] * (len(spec.buckets) + 1) + [0.0, 0.0]]]
        for labels, value in sorted(samples, key=lambda s: [str(x) for x in s[0]]):
            if spec.kind == "histogram":
                counts = value[:-2]
                total_sum, total = value[-2], value[-1]
                running = 0.0
                for bound, count in zip([*spec.buckets, math.inf], counts, strict=True):
                    running += count
                    le = 'le="' + ("+Inf" if math.isinf(bound) else repr(bound)) + '"'
                    lines.append(
                        f"{spec.name}_bucket{_labels(spec.labels, labels, le)} {_fmt(running)}"
                    )
                lines.append(f"{spec.name}_sum{_labels(spec.labels, labels)} {_fmt(total_sum)}")
                lines.append(f"{spec.name}_count{_labels(spec.labels, labels)} {_fmt(total)}")
            else:
                lines.append(f"{spec.name}{_labels(spec.labels, labels)} {_fmt(value)}")
    return "\n".join(lines) + "\n"


def to_json(snapshot: Snapshot, specs: Sequence[MetricSpec]) -> dict[str, Any]:
    """The same series `render` writes, as JSON for the status page: one source of numbers
    for /metrics and /status.json, so the two cannot disagree. A histogram's value is
    ``{"le": [bounds..., "+Inf"], "counts": [cumulative...], "sum", "count"}``."""
    out: dict[str, Any] = {}
    for spec in specs:
        samples = snapshot.get(spec.name)
        if samples is None and spec.labels:
            continue
        series: list[list[Any]] = []
        if samples is None:
            series.append([{}, 0])
        for labels, value in samples or ():
            names = dict(zip(spec.labels, (str(v) for v in labels), strict=True))
            if spec.kind == "histogram":
                cumulative, running = [], 0.0
                for count in value[:-2]:
                    running += count
                    cumulative.append(running)
                value = {
                    "le": [*spec.buckets, "+Inf"],
                    "counts": cumulative,
                    "sum": value[-2],
                    "count": value[-1],
                }
            series.append([names, value])
        out[spec.name] = {"kind": spec.kind, "help": spec.help, "series": series}
    return out


class BoundedLabels:
    """Label values an outsider chooses (a path, a fingerprint) kept to `cap` distinct ones:
    the first `cap` seen keep their own series, every later one is counted as `other`."""

    __slots__ = ("cap", "seen")

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.seen: set[str] = set()

    def label(self, value: str) -> str:
        if value in self.seen:
            return value
        if len(self.seen) < self.cap:
            self.seen.add(value)
            return value
        return "other"


class TopLabels:
    """Label values an outsider chooses (a blocked path), kept to the `cap` busiest of the last
    minutes, every other one counted as `other`: a visitor who sends `cap` junk values first
    does not hold the labels forever (BoundedLabels' weakness), a value that becomes busy
    later gets its own series.

    Busy = a decaying count (halved every `half_life_s`), kept for at most `candidates` values
    by space-saving (Metwally et al., 2005): a new value takes the place of the least busy
    candidate that has no label, and its count (so any value whose share of recent events is
    above about 1/(candidates - cap) stays a candidate, however many junk values flow past),
    remembering how much of it was inherited. A value takes the label of the least busy
    labelled one when what it earned itself is more than twice that one's count and more than
    one event's worth: a flood of distinct junk values does not churn the labels (each has
    one event), and one label changes hands at most when its holder's count halved, about
    `cap` new series per half-life at most.

    The series of a label that left (`observe`'s second answer) is dropped, not kept: it
    disappears from the metrics, and if the value comes back its counter starts again from 0,
    which Prometheus' rate() and increase() read as a counter reset. No exported counter goes
    down while exported; at most `cap` + 1 series exist at a time. Sans-IO: `now` is passed."""

    __slots__ = (
        "_epoch",
        "cap",
        "half_life_s",
        "inherited",
        "labelled",
        "max_candidates",
        "scores",
    )

    def __init__(self, cap: int, half_life_s: float = 300.0, candidates: int = 0) -> None:
        self.cap = cap
        self.half_life_s = half_life_s
        self.max_candidates = max(candidates, 4 * cap)
        # counts in units of an event at `_epoch` (an event at `now` weighs
        # 2^((now - _epoch)/half_life_s)): decay without touching every count
        self.scores: dict[str, float] = {}
        self.inherited: dict[str, float] = {}  # of each count, what space-saving handed on
        self.labelled: set[str] = set()
        self._epoch: float | None = None

    def _weight(self, now: float) -> float:
        if self._epoch is None:
            self._epoch = now
        exponent = (now - self._epoch) / self.half_life_s
        if exponent > 60:  # renormalise before the weights grow past what a float holds well
            scale = 2.0**-exponent
            self.scores = {k: v * scale for k, v in self.scores.items()}
            self.inherited = {k: v * scale for k, v in self.inherited.items()}
            self._epoch, exponent = now, 0.0
        return float(2.0 ** max(exponent, -60.0))

    def observe(self, value: str, now: float) -> tuple[str, str | None]:
        """One event of `value`: (the label to count it under, a label that left or None)."""
        weight = self._weight(now)
        scores = self.scores
        score = scores.get(value)
        if score is None:
            score = 0.0
            if len(scores) >= self.max_candidates:  # space-saving: replace the least busy
                free = (k for k in scores if k not in self.labelled)
                victim = min(free, key=scores.__getitem__, default=None)
                if victim is None:
                    return "other", None
                score = scores.pop(victim)
                del self.inherited[victim]
            self.inherited[value] = score
        score += weight
        scores[value] = score
        if value in self.labelled:
            return value, None
        if len(self.labelled) < self.cap:
            self.labelled.add(value)
            return value, None
        least = min(self.labelled, key=scores.__getitem__)
        earned = score - self.inherited[value]
        if earned <= 2 * scores[least] or earned <= 1.5 * weight:
            return "other", None
        self.labelled.discard(least)
        self.labelled.add(value)
        return value, least


# Every component that serves or signs for a certificate exports these two (issue 12). Labels:
# `component` (edge, origin, keyserver), `hostname` (the certificate's first DNS name), and
# `certificate` (the key's, route's or listener's configured name): one series per configured
# certificate, never per SAN name or per request.
CERTIFICATE_METRICS = (
    MetricSpec(
        "blindfold_certificate_expiry_seconds",
        "gauge",
        "Seconds until the certificate in service expires (negative once expired).",
        ("component", "hostname", "certificate"),
        merge="min",
    ),
    MetricSpec(
        "blindfold_certificate_reloads_total",
        "counter",
        "Replaced certificate files or fetched chains by result: swapped, or why the old one "
        "stayed (invalid: did not parse, key does not fit, expired, names not covered).",
        ("component", "certificate", "result"),
    ),
)


def certificate_first_name(cert: Any) -> str:
    """The first DNS name of a cryptography x509.Certificate (or its subject's CN)."""
    from cryptography import x509  # local: most metric users never load a certificate

    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = san.get_values_for_type(x509.DNSName)
        if names:
            return str(names[0]).lower()
    except x509.ExtensionNotFound:
        pass
    cns = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(cns[0].value) if cns else ""
