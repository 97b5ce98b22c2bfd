"""The origin's decision stream, served to edges over HTTPS in the shape of CrowdSec's bouncer
API: `GET /v1/decisions/stream?startup=true` with `X-Api-Key`, answering
`{"new": [...], "deleted": [...]}`. Keys are compared in constant time.

Our extension: each answer carries `"blindfold": {"position": TOKEN, "full": BOOL}` and our
edges send the token back in `X-Blindfold-Position`, so the stream position belongs to the
edge, not to the API key. A follower without a token (a CrowdSec bouncer) has one position
per (API key, User-Agent)."""

from __future__ import annotations

import hmac
import json
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from blindfold.decisions.core import DecisionStore
from blindfold.errors import ConfigError
from blindfold.web.messages import BodyStream, Request, Responder, simple_response


def load_api_keys(path: str) -> dict[str, bytes]:
    """'name:key' or 'key' per line, '#' comments. Returns {name: key}."""
    keys: dict[str, bytes] = {}
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(
            "origin.decisions.api_keys_file", f"cannot read {path}: {exc.strerror}"
        ) from None
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, key = line.partition(":")
        if not sep:
            name, key = f"key{n}", name
        if len(key) < 16:
            raise ConfigError(
                "origin.decisions.api_keys_file", f"{path}:{n}: keys must be at least 16 characters"
            )
        keys[name.strip()] = key.strip().encode()
    if not keys:
        raise ConfigError("origin.decisions.api_keys_file", f"{path} holds no key")
    return keys


class DecisionApi:
    def __init__(self, store: DecisionStore, keys: dict[str, bytes]) -> None:
        self.store = store
        self.keys = keys
        self.requests: dict[str, int] = {}

    def _bouncer(self, key: bytes | None) -> str | None:
        if key is None:
            return None
        found = None
        for name, expected in self.keys.items():  # compare with every key: no timing leak
            if hmac.compare_digest(key, expected):
                found = name
        return found

    async def __call__(self, request: Request, body: BodyStream, respond: Responder) -> None:
        bouncer = self._bouncer(request.header(b"x-api-key"))
        if bouncer is None:
            self.requests["unauthorized"] = self.requests.get("unauthorized", 0) + 1
            await simple_response(respond, 403, '{"message":"access forbidden"}')
            return
        url = urlsplit(request.target.decode("latin-1"))
        if request.method not in (b"GET", b"HEAD"):
            await simple_response(respond, 405, "method not allowed\n")
            return
        if url.path == "/v1/decisions/stream":
            startup = parse_qs(url.query).get("startup", ["false"])[0].lower() == "true"
            position = request.header(b"x-blindfold-position")
            agent = request.header(b"user-agent") or b""
            payload = self.store.stream(
                bouncer,
                startup,
                time.time(),
                position=position.decode("latin-1") if position is not None else None,
                instance=agent.decode("latin-1")[:200],
            )
        elif url.path == "/v1/decisions":
            now = time.time()
            payload = [d.to_crowdsec(now) for d in self.store.active(now)] or None  # type: ignore
        else:
            await simple_response(respond, 404, "not found\n")
            return
        self.requests[bouncer] = self.requests.get(bouncer, 0) + 1
        data = json.dumps(payload, separators=(",", ":")).encode()
        await respond.start(
            200,
            [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())],
        )
        await respond.send(data)
        await respond.end()
