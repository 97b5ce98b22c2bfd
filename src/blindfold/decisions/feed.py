"""The edge's side of decisions: follow a decision stream (blindfold's origin or a CrowdSec
Local API) and keep the set of active bans, expiring them locally by their duration. If the
source cannot be reached, the last known set keeps being enforced (and says so)."""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from blindfold.config.edge import DecisionSourceConfig
from blindfold.decisions.core import Scope, parse_stream
from blindfold.errors import ConfigError, ProtocolError, UpstreamError
from blindfold.obs.log import JsonLog
from blindfold.web.client import UpstreamPool

MAX_STREAM_BYTES = 64 << 20


def decode_stream(body: bytes | bytearray) -> Any:
    """A decision stream response body -> its JSON value. Raises ProtocolError."""
    try:
        return json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: nested too deeply
        raise ProtocolError("bad_stream", "not JSON") from None


class BanSet:
    """(scope, value) -> (expires_at, reason). Notifies on every change of the active set."""

    def __init__(self, on_change: Callable[[list[str]], None]) -> None:
        self.active: dict[tuple[Scope, str], tuple[float, str]] = {}
        self.on_change = on_change
        self.sources: dict[str, set[tuple[Scope, str]]] = {}

    def apply(
        self,
        source: str,
        new: list[tuple[Scope, str, float, str]],
        deleted: list[tuple[Scope, str]],
        now: float,
        *,
        replace: bool = False,
    ) -> bool:
        mine = self.sources.setdefault(source, set())
        changed = False
        if replace:
            for key in list(mine):
                if self._drop(source, key):
                    changed = True
        for scope, value in deleted:
            if self._drop(source, (scope, value)):
                changed = True
        for scope, value, duration, reason in new:
            if duration <= 0:
                continue
            key = (scope, value)
            until = now + duration
            old = self.active.get(key)
            if old is None or old[0] < until:
                if old is None:
                    changed = True
                self.active[key] = (until, reason)
            mine.add(key)
        if changed:
            self.notify()
        return changed

    def _drop(self, source: str, key: tuple[Scope, str]) -> bool:
        self.sources[source].discard(key)
        if any(key in keys for keys in self.sources.values()):
            return False  # another source still bans it
        return self.active.pop(key, None) is not None

    def expire(self, now: float) -> None:
        gone = [k for k, (until, _r) in self.active.items() if until <= now]
        for key in gone:
            del self.active[key]
            for keys in self.sources.values():
                keys.discard(key)
        if gone:
            self.notify()

    def networks(self) -> list[str]:
        return [value for _scope, value in self.active]

    def notify(self) -> None:
        self.on_change(self.networks())


class StreamFeed:
    """Poll `url`/v1/decisions/stream (startup=true first, then deltas)."""

    def __init__(self, cfg: DecisionSourceConfig, bans: BanSet, log: JsonLog) -> None:
        self.cfg = cfg
        self.bans = bans
        self.log = log
        try:
            self.key = Path(cfg.api_key_file).read_text().strip().encode()
        except OSError as exc:
            raise ConfigError(
                "edge.decisions.api_key_file", f"cannot read {cfg.api_key_file}: {exc.strerror}"
            ) from None
        if not self.key:
            raise ConfigError("edge.decisions.api_key_file", "the file is empty")
        parts = urlsplit(cfg.url)
        base = f"{parts.scheme}://{parts.netloc}"
        self.path = (parts.path.rstrip("/") + "/v1/decisions/stream").encode()
        tls = None
        if parts.scheme == "https":
            try:
                tls = ssl.create_default_context(cafile=cfg.ca or None)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError("edge.decisions.ca", f"cannot load {cfg.ca}: {exc}") from None
        self.pool = UpstreamPool(
            base,
            max_idle=1,
            connect_timeout_s=cfg.timeout_s,
            timeout_s=cfg.timeout_s,
            tls=tls,
            server_hostname=cfg.server_name or parts.hostname,
        )
        self.up = False
        self.polls: dict[str, int] = {}
        self.last_ok = 0.0
        self._startup = True

    async def poll_once(self) -> None:
        target = self.path + (b"?startup=true" if self._startup else b"?startup=false")
        headers = [
            (b"host", self.pool.target.authority),
            (b"x-api-key", self.key),
            (b"user-agent", b"blindfold-edge"),
            (b"accept", b"application/json"),
        ]
        response = await self.pool.request(b"GET", target, headers, None)
        body = bytearray()
        async for chunk in response.body():
            body += chunk
            if len(body) > MAX_STREAM_BYTES:
                response.close()
                raise ProtocolError("bad_stream", "stream response too large")
        if response.status != 200:
            raise UpstreamError(f"status {response.status}: {bytes(body[:200])!r}")
        new, deleted, problems = parse_stream(decode_stream(body))
        for problem in problems[:10]:
            self.log.log("decision_ignored", problem=problem)
        self.bans.apply("stream", new, deleted, time.time(), replace=self._startup)
        self._startup = False

    async def run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self.poll_once(), self.cfg.timeout_s * 2)
                self._count("ok")
                self.last_ok = time.time()
                if not self.up:
                    self.up = True
                    self.log.emit(
                        "decisions_source_up", url=self.cfg.url, active=len(self.bans.active)
                    )
            except (UpstreamError, ProtocolError, TimeoutError, OSError) as exc:
                self._count("error")
                if self.up or not self.polls.get("logged_down"):
                    self.polls["logged_down"] = 1
                    self.log.emit(
                        "decisions_source_down",
                        url=self.cfg.url,
                        error=str(exc),
                        enforcing=len(self.bans.active),
                    )
                self.up = False
                self._startup = True  # resync fully when it comes back
            await asyncio.sleep(self.cfg.poll_interval_s)

    def _count(self, result: str) -> None:
        self.polls[result] = self.polls.get(result, 0) + 1
