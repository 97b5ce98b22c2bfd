"""The edge's side of decisions: follow a decision stream (blindfold's origin or a CrowdSec
Local API) into the master's ban table. If the source cannot be reached, or answers something
that is not a decision stream, the last known set keeps being enforced (and says so).

Every poll is one try: whatever a response provokes (a RecursionError from JSON nested too
deep, a UnicodeError, a ValueError) is counted as a `bad_response` and the feed goes on.
`supervise` restarts any feed task that dies anyway, with back-off, and marks it down.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import time
from collections.abc import Awaitable, Callable
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from blindfold import __version__
from blindfold.config.edge import DecisionSourceConfig
from blindfold.decisions.bans import BanTable
from blindfold.decisions.core import parse_stream
from blindfold.decisions.purge import (
    MAX_PURGE_BYTES,
    MAX_PURGE_LOG,
    MAX_PURGES_PER_ANSWER,
    Purge,
    purge_from_json,
)
from blindfold.errors import ConfigError, ProtocolError, UpstreamError
from blindfold.obs.log import JsonLog
from blindfold.web.client import UpstreamPool

MAX_STREAM_BYTES = 64 << 20
MAX_PURGES_BYTES = (MAX_PURGES_PER_ANSWER + 1) * MAX_PURGE_BYTES  # one answer of the purge log
# A 429 from the source (the origin rations whole-set answers per key): wait as long as its
# Retry-After asks, within these bounds (a source cannot park the feed for hours), then ask again.
THROTTLED_MIN_S = 1.0
THROTTLED_MAX_S = 300.0
THROTTLED_DEFAULT_S = 10.0  # no Retry-After, or one we cannot read
APPLY_SLICE = 20_000  # decisions added to the table per turn of the master's loop


def read_key_file(path: str, where: str, log: JsonLog) -> bytes:
    try:
        key = Path(path).read_text().strip().encode()
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise ConfigError(where, f"cannot read {path}: {exc.strerror}") from None
    if not key:
        raise ConfigError(where, "the file is empty")
    if mode & 0o077:
        log.emit("key_file_readable_by_others", path=path, mode=oct(mode & 0o777), fix="chmod 600")
    return key


def retry_after_s(value: bytes | None, now: float) -> float:
    """A Retry-After value (RFC 9110 §10.2.3: delay-seconds or an HTTP-date) as seconds from
    `now` (time.time()), bounded by THROTTLED_MIN_S..THROTTLED_MAX_S."""
    delay = THROTTLED_DEFAULT_S
    if value is not None:
        text = value.decode("latin-1").strip()
        if text.isdigit():
            delay = float(int(text[:10]))
        else:
            try:
                delay = parsedate_to_datetime(text).timestamp() - now
            except (TypeError, ValueError, IndexError, OverflowError):
                pass
    return min(THROTTLED_MAX_S, max(THROTTLED_MIN_S, delay))


def decode_stream(body: bytes | bytearray) -> Any:
    """A decision stream response body -> its JSON value. Raises ProtocolError."""
    try:
        return json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: nested too deeply
        raise ProtocolError("bad_stream", "not JSON") from None


MAX_OPERATOR_LINES = 20  # operator decisions logged per poll (the rest: counted)


def _operator_items(payload: Any) -> list[dict[str, Any]]:
    """The stream's new decisions an operator made (origin 'operator:<id>'), for the log."""
    out = []
    items = payload.get("new") if isinstance(payload, dict) else None
    for item in items if isinstance(items, list) else ():
        origin = item.get("origin") if isinstance(item, dict) else None
        if isinstance(origin, str) and origin.startswith("operator:"):
            out.append({"operator": origin[9:73], "value": str(item.get("value"))[:64]})
    return out


def _parse_body(
    body: bytes,
) -> tuple[list[Any], list[Any], list[str], str | None, bool, list[dict[str, Any]]]:
    """(new, deleted, problems, position token, whole set?, operators' new decisions) of one
    stream answer. Runs in a thread: a 64 MB answer must not stop the master's loop while it
    is decoded."""
    payload: Any = decode_stream(body)
    new, deleted, problems = parse_stream(payload)
    ext = payload.get("blindfold")
    position, full = None, False
    if isinstance(ext, dict):
        if isinstance(ext.get("position"), str) and len(ext["position"]) <= 200:
            position = ext["position"]
        full = ext.get("full") is True
    return new, deleted, problems, position, full, ([] if full else _operator_items(payload))


class StreamFeed:
    """Poll `url`/v1/decisions/stream (startup=true first, then deltas)."""

    kind = "stream"

    def __init__(self, cfg: DecisionSourceConfig, table: BanTable, log: JsonLog) -> None:
        self.cfg = cfg
        self.table = table
        self.log = log
        self.key = read_key_file(cfg.api_key_file, "edge.decisions.api_key_file", log)
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
        self._position: bytes | None = None
        self._logged_down = False
        self._retry_after = 0.0
        # the origin's purge log (/v1/purges): followed after every poll of the stream; a
        # source without one (a CrowdSec LAPI answers 404) is not asked again
        self.purge_path = (parts.path.rstrip("/") + "/v1/purges").encode()
        self.on_purge: Callable[[Purge, str], None] | None = None
        self.on_gap: Callable[[], None] | None = None
        self.purges_supported = True
        self._purge_position: bytes | None = None
        self._purges_failing = False

    async def _fetch(self) -> bytes:
        target = self.path + (b"?startup=true" if self._startup else b"?startup=false")
        headers = [
            (b"host", self.pool.target.authority),
            (b"x-api-key", self.key),
            (b"user-agent", f"blindfold-edge/{__version__}".encode()),
            (b"accept", b"application/json"),
        ]
        if self._position is not None and not self._startup:
            headers.append((b"x-blindfold-position", self._position))
        response = await self.pool.request(b"GET", target, headers, None)
        body = bytearray()
        async for chunk in response.body():
            body += chunk
            if len(body) > MAX_STREAM_BYTES:
                response.close()
                raise ProtocolError("bad_stream", "stream response too large")
        if response.status == 429:
            value = next((v for k, v in response.headers if k == b"retry-after"), None)
            self._retry_after = retry_after_s(value, time.time())
            raise UpstreamError("throttled", f"retry after {self._retry_after:g} s", status=429)
        if response.status != 200:
            raise UpstreamError("bad_status", f"status {response.status}: {bytes(body[:200])!r}")
        return bytes(body)

    async def poll_once(self) -> None:
        body = await asyncio.wait_for(self._fetch(), self.cfg.timeout_s * 2)
        new, deleted, problems, position, full, operated = await asyncio.to_thread(
            _parse_body, body
        )
        for item in operated[:MAX_OPERATOR_LINES]:  # what an operator did, as applied here
            self.log.emit("operator_decision", source="stream", action="add", **item)
        for problem in problems[:10]:
            self.log.log("decision_ignored", problem=problem)
        for problem in problems:
            self.table.refuse(problem.partition(":")[0])
        full = full or self._startup
        now = time.time()
        table = self.table
        if full:
            table.begin_resync("stream")
        try:
            table.update("stream", [], deleted, now)
            for i in range(0, len(new), APPLY_SLICE):
                table.update("stream", new[i : i + APPLY_SLICE], [], now)
                await asyncio.sleep(0)
        except BaseException:
            if full:
                table.abort_resync("stream")
            raise
        if full:
            table.end_resync("stream")
        self._position = position.encode("latin-1") if position else None
        self._startup = False
        if self.on_purge is not None and self.purges_supported:
            # its own failure: the decisions just applied stay applied and the feed stays up;
            # the next poll asks again from the same position
            try:
                await asyncio.wait_for(self._follow_purges(), self.cfg.timeout_s * 2)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._count("purge_error")
                if not self._purges_failing:
                    self.log.emit(
                        "purges_failed",
                        url=self.cfg.url,
                        error=f"{type(exc).__name__}: {exc}"[:300],
                    )
                self._purges_failing = True
            else:
                self._purges_failing = False

    async def _follow_purges(self) -> None:
        """Ask the origin's purge log for what came after our position; apply it."""
        headers = [
            (b"host", self.pool.target.authority),
            (b"x-api-key", self.key),
            (b"user-agent", f"blindfold-edge/{__version__}".encode()),
            (b"accept", b"application/json"),
        ]
        if self._purge_position is not None:
            headers.append((b"x-blindfold-purges", self._purge_position))
        response = await self.pool.request(b"GET", self.purge_path, headers, None)
        body = bytearray()
        async for chunk in response.body():
            body += chunk
            if len(body) > MAX_PURGES_BYTES:
                response.close()
                raise ProtocolError("bad_stream", "purge log answer too large")
        if response.status in (401, 403, 404, 405):
            # not a blindfold origin (a CrowdSec LAPI): it has no purge log
            self.purges_supported = False
            self.log.emit("purges_unsupported", url=self.cfg.url, status=response.status)
            return
        if response.status != 200:
            raise UpstreamError("bad_status", f"purges: status {response.status}")
        payload = decode_stream(bytes(body))
        if not isinstance(payload, dict) or not isinstance(payload.get("purges"), list):
            self.purges_supported = False  # a 200 that is no purge log: not a blindfold origin
            self.log.emit("purges_unsupported", url=self.cfg.url, status=response.status)
            return
        position = payload.get("position")
        if not isinstance(position, str) or len(position) > 200 or not position.isascii():
            raise ProtocolError("bad_stream", "purge log answer without a position")
        if payload.get("reset") is True and self.on_gap is not None:
            self.on_gap()  # more purges than the origin keeps since we asked: we missed some
        for item in payload["purges"][:MAX_PURGE_LOG]:
            try:
                purge = purge_from_json(item)
            except ProtocolError as exc:
                self.log.emit("purge_dropped", source="stream", reason=exc.reason, detail=str(exc))
                continue
            self.on_purge(purge, "stream")  # type: ignore[misc]
        self._purge_position = position.encode("ascii")

    async def run(self) -> None:
        while True:
            try:
                await self.poll_once()
            except asyncio.CancelledError:
                raise
            except UpstreamError as exc:
                if exc.reason != "throttled":
                    self.down("error", exc)
                else:
                    # The source is up and answered: it asks us to wait. What we hold stays
                    # enforced and our position stays valid; not "down", no resync.
                    self._count("throttled")
                    self.log.log(
                        "decisions_source_throttled",
                        url=self.cfg.url,
                        retry_after_s=self._retry_after,
                    )
                    await asyncio.sleep(max(self._retry_after, self.cfg.poll_interval_s))
                    continue
            except (TimeoutError, OSError) as exc:
                self.down("error", exc)
            except Exception as exc:
                # Anything else came from what the source sent (RecursionError, ValueError,
                # UnicodeError, ProtocolError...): one bad answer, not the end of the feed.
                self.down("bad_response", exc)
            else:
                self._count("ok")
                self.last_ok = time.time()
                if not self.up:
                    self.up = True
                    self._logged_down = False
                    self.log.emit("decisions_source_up", url=self.cfg.url, active=self.table.size)
            await asyncio.sleep(self.cfg.poll_interval_s)

    def down(self, result: str, exc: BaseException | None = None) -> None:
        """Count the failure; enforce the last known set; resync fully once it answers."""
        self._count(result)
        if self.up or not self._logged_down:
            self._logged_down = True
            self.log.emit(
                "decisions_source_down",
                url=self.cfg.url,
                reason=result,
                error=f"{type(exc).__name__}: {exc}"[:300] if exc is not None else "",
                enforcing=self.table.size,
            )
        self.up = False
        self._startup = True
        self._position = None
        self.table.abort_resync("stream")

    def _count(self, result: str) -> None:
        self.polls[result] = self.polls.get(result, 0) + 1


async def supervise(
    name: str,
    run: Callable[[], Awaitable[None]],
    log: JsonLog,
    on_down: Callable[[BaseException], None] | None = None,
    *,
    backoff_s: float = 1.0,
    max_backoff_s: float = 30.0,
) -> None:
    """Run `run()` until it returns; when it raises, report it (`on_down`, a log line) and
    start it again after a back-off that doubles up to `max_backoff_s` (and starts over after
    a minute of good health). A feed must never die unobserved."""
    delay = backoff_s
    while True:
        started = time.monotonic()
        try:
            await run()
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if time.monotonic() - started > 60.0:
                delay = backoff_s
            if on_down is not None:
                on_down(exc)
            log.emit(
                "decisions_task_failed",
                task=name,
                error=f"{type(exc).__name__}: {exc}"[:300],
                restart_in_s=delay,
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, max_backoff_s)
