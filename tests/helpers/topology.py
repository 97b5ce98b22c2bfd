"""Configs for the whole chain: visitor -> edge (passthrough) -> origin agent -> application."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.conftest import DECISIONS_NAME

API_KEY = "test-edge-key-0123456789abcdef"


def origin_config(
    site: dict[str, Path],
    app_port: int,
    workdir: Path,
    *,
    proxy_protocol: str = "required",
    decisions: dict[str, Any] | None = None,
    waf: dict[str, Any] | None = None,
    http: dict[str, Any] | None = None,
    **origin: Any,
) -> str:
    keys = workdir / "edge-keys.txt"
    keys.write_text(f"edge1:{API_KEY}\nedge2:{API_KEY}-2\n")
    keys.chmod(0o600)
    base: dict[str, Any] = {
        "upstream": f"http://127.0.0.1:{app_port}",
        "listen": ["127.0.0.1:0"],
        "trusted_edges": ["127.0.0.1/32"],
        "proxy_protocol": proxy_protocol,
        "admin_listen": "127.0.0.1:0",
        # one worker: per-client limits, descriptor limits and the order of log lines are
        # per worker process (tests/integration/test_origin_workers.py runs several)
        "workers": 1,
    }
    base.update(origin)
    dec = {
        "listen": "127.0.0.1:0",
        "cert": str(site["decisions_cert"]),
        "key": str(site["decisions_key"]),
        "api_keys_file": str(keys),
        "ban_after_blocks": 1,
        "ban_duration_s": 60,
    }
    dec.update(decisions or {})
    out = "[origin]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in base.items())
    out += f'\n[[origin.certificates]]\ncert = "{site["cert"]}"\nkey = "{site["key"]}"\n'
    rate_rules: list[dict[str, Any]] = dec.pop("rate_rules", [])  # type: ignore[assignment]
    out += "\n[origin.decisions]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in dec.items())
    for rule in rate_rules:
        out += "\n[[origin.decisions.rate_rules]]\n" + "".join(
            f"{k} = {json.dumps(v)}\n" for k, v in rule.items()
        )
    if waf:
        out += "\n[origin.waf]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in waf.items())
    if http:
        out += "\n[origin.http]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in http.items())
    return out


def edge_decisions(
    site: dict[str, Path], decisions_port: int, workdir: Path, key: str = API_KEY, **extra: Any
) -> str:
    keyfile = workdir / f"edge-{abs(hash(key)) % 10000}.key"
    keyfile.write_text(key + "\n")
    keyfile.chmod(0o600)
    values: dict[str, Any] = {
        "url": f"https://127.0.0.1:{decisions_port}",
        "api_key_file": str(keyfile),
        "ca": str(site["ca"]),
        "server_name": DECISIONS_NAME,
        "poll_interval_s": 0.5,
    }
    values.update(extra)
    return "[edge.decisions]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())
