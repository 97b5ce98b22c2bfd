"""The key server's per-edge signature rate, with a clock the test controls: an edge's own
rate_per_s/burst override the key server's defaults, and its bucket refills at that rate."""

from __future__ import annotations

from blindfold.config import loads
from blindfold.keyserver.server import _Edge

CONFIG = """
[keyserver]
listen = "127.0.0.1:0"
cert = "/etc/blindfold/ks.pem"
key = "/etc/blindfold/ks.key"
client_ca = "/etc/blindfold/edge-ca.pem"
audit_log = "/var/lib/blindfold-keyserver/audit.log"
audit_key = "/etc/blindfold/audit.key"
rate_per_s = 50
burst = 100

[[keyserver.keys]]
key = "/etc/blindfold/site.key"
certificate = "/etc/blindfold/site.pem"

[[keyserver.edges]]
name = "edge2"
cert_sha256 = "{a}"
hostnames = ["example.test"]
rate_per_s = 1.0
burst = 2

[[keyserver.edges]]
name = "edge1"
cert_sha256 = "{b}"
hostnames = ["example.test"]
""".format(a="a" * 64, b="b" * 64)


def test_edge_rate_overrides_the_default_and_refills() -> None:
    ks = loads(CONFIG).keyserver
    assert ks is not None
    slow, default = (_Edge(e, ks) for e in ks.edges)
    now = slow.bucket.stamp
    assert [slow.bucket.allow(now) for _ in range(3)] == [True, True, False]  # burst 2
    assert not slow.bucket.allow(now + 0.5)  # half a token
    assert slow.bucket.allow(now + 1.5)  # 1 per second: one and a half tokens
    assert not slow.bucket.allow(now + 1.5)
    now = default.bucket.stamp
    assert sum(default.bucket.allow(now) for _ in range(150)) == 100
    assert sum(default.bucket.allow(now + 1.0) for _ in range(150)) == 50
