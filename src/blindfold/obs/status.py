"""The status page every admin listener serves at `/`, and the JSON it polls.

The page is one self-contained file (inline style and script, allowed by their hashes in a
Content-Security-Policy that lets it connect to its own listener only). /status.json carries
the same snapshot /metrics renders (`metrics.to_json`), plus a few facts that are not numbers
(the audit log's head, certificate dates). The admin listener is read-only.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import time
from collections.abc import Sequence
from importlib import resources
from typing import Any

from blindfold.obs.metrics import MetricSpec, Snapshot, to_json

PAGE = resources.files("blindfold.obs").joinpath("static/status.html").read_bytes()


def _hashes(tag: str) -> str:
    blocks = re.findall(rb"<%s>(.*?)</%s>" % (tag.encode(), tag.encode()), PAGE, re.S)
    return " ".join(
        "'sha256-" + base64.b64encode(hashlib.sha256(b).digest()).decode() + "'" for b in blocks
    )


# Nothing but this page's own script and style; fetches to this listener only; no frames,
# forms, plugins or base changes.
CSP = (
    f"default-src 'none'; script-src {_hashes('script')}; style-src {_hashes('style')}; "
    "connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
# browsers ask for /favicon.ico by themselves: a small mark rather than a 404 in their console
ICON = (
    b'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16">'
    b'<rect width="16" height="16" rx="3" fill="#1b1b1b"/>'
    b'<rect x="2" y="6" width="12" height="4" fill="#3b6fd8"/></svg>'
)
HTML_TYPE = "text/html; charset=utf-8"
JSON_TYPE = "application/json"


def status_json(
    component: str,
    name: str,
    snapshot: Snapshot,
    specs: Sequence[MetricSpec],
    info: dict[str, Any] | None = None,
    now: float | None = None,
) -> bytes:
    body = {
        "component": component,
        "name": name,
        "time": time.time() if now is None else now,
        "metrics": to_json(snapshot, specs),
        "info": info or {},
    }
    return json.dumps(body, separators=(",", ":")).encode()
