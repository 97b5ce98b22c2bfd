"""The origin's decision stream, served to edges over HTTPS in the shape of CrowdSec's bouncer
API: `GET /v1/decisions/stream?startup=true` with `X-Api-Key`, answering
`{"new": [...], "deleted": [...]}`. Keys are compared in constant time.

Our extension: each answer carries `"blindfold": {"position": TOKEN, "full": BOOL}` and our
edges send the token back in `X-Blindfold-Position`, so the stream position belongs to the
edge, not to the API key. A follower without a token (a CrowdSec bouncer) has one position
per (API key, User-Agent).

The whole set (a startup poll, a position we cannot continue from, /v1/decisions) costs ~6 ms
per 1,000 decisions to build and encode: it is built in a thread, at most once per
`FULL_CACHE_S` however many ask (answers within that time share it, position token included,
so their next delta brings whatever changed since), and each (API key, address) gets
`full_per_minute` of them (atk-trust #9: pollers asking for 100k decisions again and again
stalled the event loop that serves the site for seconds)."""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from blindfold.core.ratelimit import BucketMap
from blindfold.decisions.core import DecisionStore, Snapshot
from blindfold.decisions.purge import PurgeLog
from blindfold.errors import ConfigError
from blindfold.web.messages import BodyStream, Request, Responder, simple_response


def load_api_keys(path: str, where: str = "origin.decisions.api_keys_file") -> dict[str, bytes]:
    """'name:key' or 'key' per line, '#' comments. Returns {name: key}."""
    keys: dict[str, bytes] = {}
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(where, f"cannot read {path}: {exc.strerror}") from None
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, key = line.partition(":")
        if not sep:
            name, key = f"key{n}", name
        if len(key) < 16:
            raise ConfigError(where, f"{path}:{n}: keys must be at least 16 characters")
        keys[name.strip()] = key.strip().encode()
    if not keys:
        raise ConfigError(where, f"{path} holds no key")
    return keys


OPERATOR_PREFIX = "/v1/operator/"  # the operator's write API (decisions.operator)
# (request, body, respond) -> whether it showed a valid operator key
OperatorHandler = Callable[[Request, BodyStream, Responder], Awaitable[bool]]

FULL_CACHE_S = 5.0  # a whole-set answer is at most this old (durations likewise)
MAX_PURGE_ANSWERS = 64  # purge-log answers kept serialised
BIG_PURGE_ANSWER = 256 << 10  # larger purge-log answers count as whole-set answers


class DecisionApi:
    def __init__(
        self, store: DecisionStore, keys: dict[str, bytes], *, full_per_minute: int = 12
    ) -> None:
        self.store = store
        self.keys = keys
        self.requests: dict[str, int] = {}
        self.full_limit = BucketMap(full_per_minute / 60.0, full_per_minute, 10_000)
        self.full_builds = 0
        self._full: tuple[float, Snapshot, bytes] | None = None  # (built at, snapshot, JSON)
        self._building: asyncio.Future[tuple[float, Snapshot, bytes]] | None = None
        # the operator's write API (decisions.operator) and the purges edges follow
        self.operator: OperatorHandler | None = None
        self.purges: PurgeLog | None = None
        # answers of the purge log, by what they hold (attack review D: each poll at an old
        # position re-serialised up to 50 purges, megabytes, on the loop)
        self._purge_answers: dict[tuple[str, bool, int, int, int], bytes] = {}
        self.purge_builds = 0

    def _bouncer(self, key: bytes | None) -> str | None:
        if key is None:
            return None
        found = None
        for name, expected in self.keys.items():  # compare with every key: no timing leak
            if hmac.compare_digest(key, expected):
                found = name
        return found

    async def __call__(
        self,
        request: Request,
        body: BodyStream,
        respond: Responder,
        on_authorized: Callable[[], None] | None = None,
    ) -> None:
        """`on_authorized`: called once the request has shown a valid API key."""
        url = urlsplit(request.target.decode("latin-1"))
        if self.operator is not None and url.path.startswith(OPERATOR_PREFIX):
            # operator keys only: an edge's read key is refused there (401), and logged
            if await self.operator(request, body, respond) and on_authorized is not None:
                on_authorized()
            return
        bouncer = self._bouncer(request.header(b"x-api-key"))
        if bouncer is None:
            self.requests["unauthorized"] = self.requests.get("unauthorized", 0) + 1
            await simple_response(
                respond, 403, '{"message":"access forbidden"}', [(b"connection", b"close")]
            )
            return
        if on_authorized is not None:
            on_authorized()
        if request.method not in (b"GET", b"HEAD"):
            await simple_response(respond, 405, "method not allowed\n")
            return
        now = time.time()
        store = self.store
        data: bytes
        if url.path == "/v1/decisions/stream":
            startup = parse_qs(url.query).get("startup", ["false"])[0].lower() == "true"
            header = request.header(b"x-blindfold-position")
            position = header.decode("latin-1") if header is not None else None
            instance = (request.header(b"user-agent") or b"").decode("latin-1")[:200]
            cursor = store.begin_poll(bouncer, startup, now, position=position, instance=instance)
            if cursor is not None:
                payload, after = store.delta(cursor, now)
                if position is None:
                    store.remember(bouncer, instance, after)
                data = json.dumps(payload, separators=(",", ":")).encode()
            else:
                if not await self._full_allowed(bouncer, request, respond):
                    return  # (a token-less follower's position is gone: its next answer is full)
                snapshot, data = await self._whole_set(now)
                if position is None:
                    store.remember(bouncer, instance, snapshot.after)
        elif url.path == "/v1/purges" and self.purges is not None:
            header = request.header(b"x-blindfold-purges")
            purge_position = header.decode("latin-1")[:100] if header is not None else None
            data = self.purge_answer(purge_position)
            if len(data) > BIG_PURGE_ANSWER and not await self._full_allowed(
                bouncer, request, respond
            ):
                return  # a large answer is limited per key like a whole set
        elif url.path == "/v1/decisions":
            if not await self._full_allowed(bouncer, request, respond):
                return
            snapshot = store.snapshot(now)
            data = await asyncio.to_thread(snapshot.encode_list, now)
        else:
            await simple_response(respond, 404, "not found\n")
            return
        self.requests[bouncer] = self.requests.get(bouncer, 0) + 1
        await respond.start(
            200,
            [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())],
        )
        await respond.send(data)
        await respond.end()

    def purge_answer(self, position: str | None) -> bytes:
        """The purge log's answer after `position`, serialised once per content (the log's
        state and the slice it holds); at most MAX_PURGE_ANSWERS kept."""
        assert self.purges is not None
        log = self.purges
        items, after, reset = log.since(position)
        key = (after, reset, len(items), log.base, log.end)
        data = self._purge_answers.get(key)
        if data is None:
            self.purge_builds += 1
            data = json.dumps(
                {"position": after, "reset": reset, "purges": [p.to_json() for p in items]},
                separators=(",", ":"),
            ).encode()
            if len(self._purge_answers) >= MAX_PURGE_ANSWERS:
                del self._purge_answers[next(iter(self._purge_answers))]
            self._purge_answers[key] = data
        return data

    async def _full_allowed(self, bouncer: str, request: Request, respond: Responder) -> bool:
        wait = self.full_limit.take((bouncer, request.client[0]), time.monotonic())
        if not wait:
            return True
        self.requests["full_limited"] = self.requests.get("full_limited", 0) + 1
        await simple_response(
            respond,
            429,
            '{"message":"too many whole-set answers"}',
            [(b"retry-after", str(max(1, math.ceil(wait))).encode())],
        )
        return False

    async def _whole_set(self, now: float) -> tuple[Snapshot, bytes]:
        """The whole set as JSON: the cached one if younger than FULL_CACHE_S, else one
        built in a thread (concurrent askers wait for the same build)."""
        clock = time.monotonic()
        if self._full is not None and clock - self._full[0] < FULL_CACHE_S:
            return self._full[1], self._full[2]
        if self._building is None:
            self._building = asyncio.get_running_loop().create_future()
            building = self._building
            try:
                snapshot = self.store.snapshot(now)
                data = await asyncio.to_thread(snapshot.encode, now)
                self.full_builds += 1
                self._full = (clock, snapshot, data)
                building.set_result(self._full)
            except BaseException as exc:
                building.set_exception(exc)
                building.exception()  # retrieved: the waiters, if any, get it
                raise
            finally:
                self._building = None
            return snapshot, data
        _clock, snapshot, data = await asyncio.shield(self._building)
        return snapshot, data
