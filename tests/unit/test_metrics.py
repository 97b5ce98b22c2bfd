from __future__ import annotations

from typing import Any

from blindfold.obs.metrics import Histogram, MetricSpec, merge, render

SPECS = [
    MetricSpec("x_total", "counter", "Things.", ("reason",)),
    MetricSpec("up", "gauge", "Up.", ("o",), merge="min"),
    MetricSpec("lat_seconds", "histogram", "Latency.", buckets=(0.1, 1.0)),
    MetricSpec("plain", "gauge", "No labels."),
]


def test_merge_and_render() -> None:
    h1, h2 = Histogram((0.1, 1.0)), Histogram((0.1, 1.0))
    for v in (0.05, 0.5, 5.0):
        h1.observe(v)
    h2.observe(0.05)
    a: dict[str, list[list[Any]]] = {
        "x_total": [[['a"b'], 2]],
        "up": [[["o1"], 1]],
        "lat_seconds": [[[], h1.value()]],
    }
    b: dict[str, list[list[Any]]] = {
        "x_total": [[['a"b'], 3], [["c"], 1]],
        "up": [[["o1"], 0]],
        "lat_seconds": [[[], h2.value()]],
    }
    text = render(merge([a, b], {s.name: s for s in SPECS}), SPECS)
    assert 'x_total{reason="a\\"b"} 5' in text
    assert 'x_total{reason="c"} 1' in text
    assert 'up{o="o1"} 0' in text  # min across workers
    assert 'lat_seconds_bucket{le="0.1"} 2' in text
    assert 'lat_seconds_bucket{le="1.0"} 3' in text
    assert 'lat_seconds_bucket{le="+Inf"} 4' in text
    assert "lat_seconds_count 4" in text
    assert "# TYPE lat_seconds histogram" in text
    assert "plain 0" in text  # label-less families always appear


def test_an_unused_histogram_renders_its_buckets_not_a_bare_zero() -> None:
    spec = MetricSpec("idle_seconds", "histogram", "Unused.", buckets=(0.5, 1.0))
    text = render({}, [spec])
    assert "idle_seconds 0" not in text
    assert 'idle_seconds_bucket{le="0.5"} 0' in text
    assert 'idle_seconds_bucket{le="+Inf"} 0' in text
    assert "idle_seconds_count 0" in text and "idle_seconds_sum 0" in text


def test_ja4_labels_are_the_top_n_plus_other() -> None:
    from blindfold.edge.stats import JA4_OTHER, TOP_JA4, WorkerStats, top_ja4

    workers = []
    for w in range(2):
        stats = WorkerStats()
        for i in range(TOP_JA4 * 5):
            for _ in range(i + 1 + w):
                stats.count_ja4(f"t13d{i:04d}")
        workers.append(stats.snapshot(0, 0, 0, [], {}))
    specs = {
        "blindfold_ja4_connections_total": MetricSpec(
            "blindfold_ja4_connections_total", "counter", "x", ("ja4",)
        )
    }
    merged = top_ja4(merge(workers, specs))["blindfold_ja4_connections_total"]
    labels = [s[0][0] for s in merged]
    assert len(labels) == TOP_JA4 + 1 and labels[-1] == JA4_OTHER
    total = sum((i + 1) + (i + 2) for i in range(TOP_JA4 * 5))
    assert sum(s[1] for s in merged) == total  # nothing lost: the rest is in "other"
