"""The status page's data (obs.status / metrics.to_json) and the page itself: the JSON holds
exactly the numbers /metrics renders, the page loads nothing from anywhere, and the CSP allows
its own inline script and style only."""

from __future__ import annotations

import base64
import hashlib
import json
import re

from blindfold.obs.metrics import (
    BoundedLabels,
    Histogram,
    MetricSpec,
    Snapshot,
    TopLabels,
    render,
    to_json,
)
from blindfold.obs.status import CSP, PAGE, status_json
from blindfold.origin.gate import path_label

SPECS = [
    MetricSpec("t_total", "counter", "c", ("route", "mode")),
    MetricSpec("t_gauge", "gauge", "g"),
    MetricSpec("t_seconds", "histogram", "h", buckets=(0.1, 1.0)),
    MetricSpec("t_absent_total", "counter", "no series yet", ("x",)),
]


def _parse(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def test_status_json_has_the_numbers_metrics_renders() -> None:
    h = Histogram((0.1, 1.0))
    for v in (0.05, 0.5, 0.7, 3.0):
        h.observe(v)
    snap: Snapshot = {
        "t_total": [[["a", "keyless"], 3], [["b", 'pass"through'], 7]],
        "t_gauge": [[[], 2]],
        "t_seconds": [[[], h.value()]],
    }
    rendered = _parse(render(snap, SPECS))
    data = json.loads(status_json("edge", "n", snap, SPECS, {"x": 1}, now=5.0))
    assert data["component"] == "edge" and data["time"] == 5.0 and data["info"] == {"x": 1}
    m = data["metrics"]
    assert "t_absent_total" not in m and "t_absent_total" not in str(rendered)
    for labels, value in m["t_total"]["series"]:
        inner = ",".join(f'{k}="{v}"' for k, v in labels.items()).replace('s"t', 's\\"t')
        assert rendered[f"t_total{{{inner}}}"] == value
    assert rendered["t_gauge"] == m["t_gauge"]["series"][0][1] == 2
    hist = m["t_seconds"]["series"][0][1]
    assert hist["le"] == [0.1, 1.0, "+Inf"]
    for le, count in zip(hist["le"], hist["counts"], strict=True):
        assert rendered[f't_seconds_bucket{{le="{le}"}}'] == count
    assert rendered["t_seconds_count"] == hist["count"] == 4
    assert rendered["t_seconds_sum"] == hist["sum"]
    assert to_json({}, SPECS)["t_gauge"]["series"] == [[{}, 0]]


def test_the_page_loads_nothing_and_its_csp_admits_only_its_own_blocks() -> None:
    html = PAGE.decode()
    # no element that fetches: scripts, styles, images, fonts, frames all inline or absent
    assert not re.search(r"\b(src|href|srcset|action|poster)\s*=", html, re.I)
    assert "@import" not in html and "url(" not in html
    # the only absolute URL is the SVG namespace name (an identifier, never fetched)
    assert set(re.findall(r"https?://[^\s\"'`]+", html)) == {"http://www.w3.org/2000/svg"}
    scripts = re.findall(r"<script>(.*?)</script>", html, re.S)
    styles = re.findall(r"<style>(.*?)</style>", html, re.S)
    assert len(scripts) == 1 and len(styles) == 1
    assert "<script " not in html and "<style " not in html  # no block the CSP would not admit
    directives = dict(d.strip().split(" ", 1) for d in CSP.split(";"))
    assert directives["default-src"] == "'none'" and directives["connect-src"] == "'self'"
    for block, key in ((scripts[0], "script-src"), (styles[0], "style-src")):
        digest = base64.b64encode(hashlib.sha256(block.encode()).digest()).decode()
        assert directives[key] == f"'sha256-{digest}'"
    assert "unsafe" not in CSP and "method" not in html.lower().replace("methods", "")


def test_bounded_labels_keep_the_first_ones_and_count_the_rest_as_other() -> None:
    b = BoundedLabels(2)
    labels = [b.label(v) for v in ("/a", "/b", "/c", "/a", "/d")]
    assert labels == ["/a", "/b", "other", "/a", "other"]


class Counted:
    """A TopLabels driven as the origin's gate drives it: counters per label, a label that
    left dropped."""

    def __init__(self, top: TopLabels) -> None:
        self.top = top
        self.counts: dict[str, int] = {}

    def block(self, value: str, now: float) -> str:
        label, left = self.top.observe(value, now)
        if left is not None:
            del self.counts[left]
        self.counts[label] = self.counts.get(label, 0) + 1
        return label


def test_a_hot_path_gets_a_label_after_30_junk_ones() -> None:
    c = Counted(TopLabels(30))
    for i in range(30):
        assert c.block(f"/junk{i}", 1000.0 + i) == f"/junk{i}"
    labels = [c.block("/hot", 1040.0 + i * 0.1) for i in range(50)]
    assert labels[0] == "other"  # once is not busier than a junk path...
    assert set(labels[1:]) == {"/hot"}  # ... twice is, and it stays
    assert c.counts["/hot"] == 49 and c.counts["other"] == 1
    assert len(c.counts) == 31  # 30 + other
    assert "/junk0" not in c.counts  # the least busy (the oldest) gave its place


def test_top_labels_stay_bounded_and_follow_what_is_busy_now() -> None:
    c = Counted(TopLabels(3, half_life_s=60.0))
    before: dict[str, int] = {}
    ever: set[str] = set()
    for i in range(4000):  # a flood of distinct junk (20/s), a slow hot path among it
        now = 1000.0 + i * 0.05
        c.block(f"/j{i}", now)
        if i % 40 == 0:
            c.block("/hot", now)
        assert len(c.counts) <= 4 and len(c.top.scores) <= c.top.max_candidates
        for label, n in before.items():  # an exported counter never goes down
            assert c.counts.get(label, n) >= n
        before = dict(c.counts)
        ever |= c.counts.keys()
    assert "/hot" in c.counts
    assert len(ever) <= 6, ever  # the junk does not churn the series (3 first, hot, other)
    # an hour later the old hot path has decayed: a path blocked a few times now replaces it
    for _ in range(3):
        c.block("/new", 5000.0)
    assert "/new" in c.counts
    # renormalisation over days keeps scores finite and the order right
    for day in range(1, 4):
        for _ in range(5):
            c.block("/daily", 1000.0 + day * 86400)
    assert "/daily" in c.counts
    assert all(v == v and v < float("inf") for v in c.top.scores.values())


def test_a_blocked_path_label_is_its_first_segment_printable_and_short() -> None:
    assert path_label(b"/admin/x.php?id=1") == "/admin"
    assert path_label(b"/") == "/"
    assert path_label(b'/a"b\x00c') == "/a_b_c"
    assert len(path_label(b"/" + b"x" * 500)) == 41
