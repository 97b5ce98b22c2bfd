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
