"""The key server's per-edge signature rate, with a clock the test controls: an edge's own
rate_per_s/burst override the key server's defaults, and its bucket refills at that rate."""

from __future__ import annotations

import struct
from pathlib import Path

from blindfold import pki
from blindfold.config import loads
from blindfold.core import keyless_wire as w
from blindfold.keyserver.server import KeyServer, _Edge
from blindfold.obs.log import JsonLog

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


def test_a_request_costs_a_token_per_started_8_kib(tmp_path: Path, ca: pki.Issued) -> None:
    """atk-trust finding 6: the bucket counts work, not requests. A request just over 64 KiB
    costs the key server some eight honest ones' reading and hashing, so it takes nine tokens
    (one per started 8 KiB); an ordinary request (a few KiB) takes one."""
    ca.write(tmp_path / "ca.pem")
    pki.issue(ca, ["keyserver.test"]).write(tmp_path / "ks.pem", tmp_path / "ks.key")
    pki.issue(ca, ["example.test"]).write(tmp_path / "site.pem", tmp_path / "site.key")
    text = (
        CONFIG.replace("/etc/blindfold/", f"{tmp_path}/")
        .replace("/var/lib/blindfold-keyserver/", f"{tmp_path}/")
        .replace("edge-ca.pem", "ca.pem")
        .replace("rate_per_s = 1.0\nburst = 2", "rate_per_s = 0.001\nburst = 20")
    )
    path = tmp_path / "ks.toml"
    path.write_text(text)
    cfg = loads(text).keyserver
    assert cfg is not None
    ks = KeyServer(str(path), cfg, JsonLog.open("", process="keyserver"))
    edge = ks.edges[bytes.fromhex("a" * 64)]  # edge2: 0.001/s, burst 20

    def answer(body_bytes: int) -> int:
        """The ERROR code (0 for none) the key server answers a sign request of this size."""
        body = struct.pack(">HB", 0x0403, 0) + bytes(body_bytes - 3)  # not a handshake
        frames = w.FrameDecoder().feed(ks._handle(edge, w.Frame(w.SIGN_REQUEST, 1, body)))
        return w.decode_error(frames[0].body)[0] if frames[0].type == w.ERROR else 0

    big = 64 * 1024 + 1
    assert answer(big) == w.E_BAD_HANDSHAKE  # 9 tokens: 11 left
    assert answer(big) == w.E_BAD_HANDSHAKE  # 2 left
    assert answer(big) == w.E_RATE_LIMITED
    assert answer(8192) == w.E_BAD_HANDSHAKE  # one token
    assert answer(3000) == w.E_BAD_HANDSHAKE  # the last one
    assert answer(100) == w.E_RATE_LIMITED
    ks.audit.close()
