"""WAF tuning on real traffic: the origin agent (ModSecurity + CRS 3.3.4, PL1) answers the OWASP
CRS regression suite's cases, PayloadsAllTheThings' attacks and libinjection's false-positive
list (tests/data/waf, exported from ../shared/waf by bench/waf/export_cases.py);
`blindfold waf report` reads its audit lines and proposes exclusions; the exclusions go into the
config, a SIGHUP applies them, and the same requests are sent again.

The application behind the agent answers 200 to everything, so a request counts as blocked when
the answer is not 2xx/3xx (as the shared kit's run_ftw.py counts)."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from blindfold.waf import report
from tests.helpers.edgeproc import OriginProcess

DATA = Path(__file__).resolve().parents[1] / "data" / "waf"
STATUS = re.compile(rb"HTTP/1\.[01] (\d{3})")
REQUEST_ID = re.compile(rb"\r\nx-request-id: ([^\r\n]+)", re.I)


def cases(name: str) -> list[dict[str, Any]]:
    with gzip.open(DATA / f"{name}.jsonl.gz", "rt") as f:
        return [json.loads(line) for line in f]


class AlwaysOk:
    """An application that answers every request 200 and closes (no framing to get wrong)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.port = 0

        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)
                w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
                await w.drain()
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
                pass
            finally:
                w.close()

        async def start() -> None:
            self.server = await asyncio.start_server(handle, "127.0.0.1", 0)
            self.port = self.server.sockets[0].getsockname()[1]
            ready.set()

        self.thread = threading.Thread(
            target=lambda: (self.loop.run_until_complete(start()), self.loop.run_forever()),
            daemon=True,
        )
        self.thread.start()
        assert ready.wait(10)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def always_ok() -> Iterator[AlwaysOk]:
    a = AlwaysOk()
    yield a
    a.close()


def send(port: int, raw: bytes) -> tuple[int | None, str]:
    """(status or None when refused without an answer, the answer's x-request-id)."""
    buf = b""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(raw)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
                head, sep, body = buf.partition(b"\r\n\r\n")
                n = re.search(rb"\r\ncontent-length:\s*(\d+)", head, re.I)
                if sep and n and len(body) >= int(n.group(1)):
                    break
    except OSError:
        pass
    m = STATUS.match(buf)
    rid = REQUEST_ID.search(buf)
    return (int(m.group(1)) if m else None), (rid.group(1).decode() if rid else "")


def replay(port: int, batch: list[dict[str, Any]]) -> dict[str, tuple[int | None, str]]:
    def one(c: dict[str, Any]) -> tuple[str, tuple[int | None, str]]:
        return c["id"], send(port, base64.b64decode(c["raw"]))

    with ThreadPoolExecutor(16) as ex:
        return dict(ex.map(one, batch))


def blocked(result: tuple[int | None, str]) -> bool:
    return result[0] is None or result[0] >= 400


def settle(path: Path) -> int:
    """The audit log's size once the agent has written the last request's line (it writes
    what it has once a second)."""
    last, since = -1, time.monotonic()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        size = path.stat().st_size if path.exists() else 0
        if size != last:
            last, since = size, time.monotonic()
        elif time.monotonic() - since > 1.5:
            return last
        time.sleep(0.1)
    raise AssertionError(f"{path} still grows after 30 s")


def config(app_port: int, audit: Path, extra: str = "") -> str:
    return f"""
[origin]
upstream = "http://127.0.0.1:{app_port}"
listen = []
http_listen = ["127.0.0.1:0"]
proxy_protocol = "off"
admin_listen = "127.0.0.1:0"
access_log = false

[origin.waf]
paranoia_level = 1
body_limit_action = "reject"
audit_log = "{audit}"

[origin.decisions]
ban_after_blocks = 1000000
{extra}"""


def run_report(*args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "blindfold", "waf", "report", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_proposed_exclusions_end_the_false_positives_they_target_and_keep_detection(
    always_ok: AlwaysOk, tmp_path: Path
) -> None:
    attacks, benign = cases("attacks"), cases("benign")
    assert len(attacks) > 4000 and len(benign) > 600  # the whole exported sets
    audit = tmp_path / "audit.log"
    origin = OriginProcess(config(always_ok.port, audit), tmp_path, name="origin")
    try:
        port = int(origin.ready["http_listen"][0].rpartition(":")[2])
        # 1. a replay of known attacks, then ordinary traffic with its false positives
        before_attacks = replay(port, attacks)
        split = settle(audit)
        before_benign = replay(port, benign)
        end = settle(audit)
        lines = audit.read_bytes()
        (tmp_path / "attacks.log").write_bytes(lines[:split])
        (tmp_path / "traffic.log").write_bytes(lines[split:end])

        # 2. the report, guarded by the attack replay; and unguarded, to see what it guards
        args = ["--min-clients", "1", "--toml", str(tmp_path / "traffic.log")]
        guarded = run_report("--attacks", str(tmp_path / "attacks.log"), *args)
        unguarded = run_report(*args)
        assert guarded.count("[[origin.waf.exclusions]]") >= 1
        assert unguarded.count("[[origin.waf.exclusions]]") > guarded.count(
            "[[origin.waf.exclusions]]"
        )
        text = run_report(
            "--min-clients", "1", "--attacks", str(tmp_path / "attacks.log"),
            str(tmp_path / "traffic.log"),
        )  # fmt: skip
        assert "by rule:" in text and "by argument:" in text and "942100" in text

        # which false positives the guarded proposals target: by the request id in the 403
        traffic = report.read([str(tmp_path / "traffic.log")])
        exclusions = [
            (p, a, r)
            for p, a, r in _triples(guarded)  # what the TOML says, parsed back
        ]
        by_id = {b.request_id: b for b in traffic.blocks}
        targeted = {
            cid
            for cid, res in before_benign.items()
            if blocked(res) and res[1] in by_id and not by_id[res[1]].still_blocked(exclusions, 5)
        }
        assert targeted, "the proposals target no false positive"

        # 3. the exclusions into the config, applied by a reload, the same requests again
        origin.write_config(config(always_ok.port, audit, guarded))
        assert (r := origin.reload()) is not None and r["event"] == "reloaded", r
        after_attacks = replay(port, attacks)
        after_benign = replay(port, benign)
    finally:
        origin.stop()
    still = sorted(cid for cid in targeted if blocked(after_benign[cid]))
    assert not still, f"false positives the exclusions target are still blocked: {still}"
    fp_before = sum(blocked(r) for r in before_benign.values())
    fp_after = sum(blocked(r) for r in after_benign.values())
    assert fp_after <= fp_before - len(targeted)
    det_before = sum(blocked(r) for r in before_attacks.values())
    det_after = sum(blocked(r) for r in after_attacks.values())
    drop_pp = 100 * (det_before - det_after) / len(attacks)
    print(
        f"\nfalse positives: {fp_before}/{len(benign)} -> {fp_after} "
        f"({len(targeted)} targeted by {guarded.count('[[')} exclusion(s), all gone); "
        f"attacks blocked: {det_before}/{len(attacks)} -> {det_after} ({drop_pp:.2f} pp)"
    )
    assert drop_pp <= 0.5
    assert det_before / len(attacks) > 0.8  # the engine really ran the CRS (PL1: ~82%)


def _triples(toml_text: str) -> list[tuple[str, str, int]]:
    import tomllib

    doc = tomllib.loads(toml_text)
    return [
        (e["path_prefix"], a, r)
        for e in doc["origin"]["waf"]["exclusions"]
        for a in e["args"]
        for r in e["rule_ids"]
    ]


def test_a_detect_path_logs_what_it_would_block_and_blocks_nothing(
    always_ok: AlwaysOk, tmp_path: Path
) -> None:
    audit = tmp_path / "audit.log"
    extra = """
[[origin.waf.modes]]
path_prefix = "/beta"
mode = "detect"

[[origin.waf.modes]]
path_prefix = "/beta/admin"
mode = "block"

[[origin.waf.modes]]
path_prefix = "/staging"
hostnames = ["staging.example"]
mode = "detect"
"""
    cfg = config(always_ok.port, audit, extra)
    origin = OriginProcess(cfg, tmp_path, name="origin")
    try:
        port = int(origin.ready["http_listen"][0].rpartition(":")[2])

        def get(path: str, host: str = "shop.example") -> int | None:
            raw = f"GET {path}?id=1%27%20OR%201=1-- HTTP/1.1\r\nHost: {host}\r\n"
            raw += "User-Agent: Mozilla/5.0\r\nAccept: */*\r\nConnection: close\r\n\r\n"
            return send(port, raw.encode())[0]

        assert get("/beta/x") == 200  # detect: passes
        assert get("/beta/./x") == 200  # the canonical path decides, not the raw one
        assert get("/beta/admin/x") == 403  # the longer prefix blocks
        assert get("/other") == 403  # the global mode
        assert get("/staging/x", "staging.example") == 200  # detect for this hostname only
        assert get("/staging/x", "shop.example:443") == 403
        assert get("/staging/x", "staging.example:443") == 200  # a port does not matter
        settle(audit)
        # what a detect path lets through is not a block: not counted, never towards a ban
        assert origin.metric("blindfold_waf_blocks_total") == 3
    finally:
        origin.stop()
    lines = [json.loads(x) for x in audit.read_text().splitlines()]
    detected = [x for x in lines if x["mode"] == "detect"]
    assert len(detected) == 4, lines
    assert all(x["result"] == "matched" for x in detected)
    assert all(949110 in x["rule_ids"] for x in detected)  # would have been blocked
    assert all(any(t[1] == "ARGS:id" for t in x["targets"]) for x in detected)
    # `blindfold waf report` counts the detect path's would-be blocks with the real ones
    out = subprocess.run(
        [sys.executable, "-m", "blindfold", "waf", "report", str(audit)],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    assert out.startswith("7 blocked request(s)"), out
