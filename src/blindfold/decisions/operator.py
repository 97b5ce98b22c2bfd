"""The operator's write API on the origin's decisions listener: list, add and delete
decisions, and purge the edges' caches (`blindfold decisions ...`, `blindfold purge ...`).

Operator keys are not the edges' read keys: they live in `origin.decisions.operator_keys_file`
('id:secret' per line), are sent as `Authorization: Bearer <secret>` (RFC 6750 §2.1), and are
compared in constant time with every key. A request without one, with a wrong one, or with an
edge's read key is answered 401 and logged (`operator_refused`, with the client address and
what it showed: never the key). Every action is logged with the operator key's id
(`operator_action`) and goes through the same pipeline as the origin's own decisions: the
store (journal, stream) and Redis, signed.

Routes (JSON in and out):
    GET    /v1/operator/decisions                       the active decisions
    POST   /v1/operator/decisions  {scope, value, duration, reason}
    DELETE /v1/operator/decisions?scope=ip&value=...    (or ?id=N)
    POST   /v1/operator/purge      {urls, prefixes, tags, blobs}
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import time
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

from blindfold.core.ratelimit import TokenBucket
from blindfold.decisions.api import OPERATOR_PREFIX, load_api_keys
from blindfold.decisions.core import Decision, normalise, parse_duration, parse_net
from blindfold.decisions.purge import MAX_REQUEST_BYTES, Purge, new_purge_id, parse_purge
from blindfold.errors import ConfigError, ProtocolError
from blindfold.obs.log import JsonLog
from blindfold.web.messages import BodyStream, Request, Responder

PREFIX = OPERATOR_PREFIX
MAX_BODY_BYTES = MAX_REQUEST_BYTES
BODY_TIMEOUT_S = 5.0
MAX_DURATION_S = 366 * 86400.0
# the narrowest ranges an edge refuses by default (edge.decisions.min_ban_prefix_len_v4/_v6):
# wider ones are refused here already, with a clear answer
MIN_PREFIX_V4 = 16
MIN_PREFIX_V6 = 32
MAX_KEY_ID_CHARS = 32


def check_key_file_mode(path: str, where: str) -> None:
    """A file of write keys must not be readable by others, nor writable by its group
    (0600 or 0640): ConfigError naming `where` otherwise."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise ConfigError(where, f"cannot read {path}: {exc.strerror}") from None
    if mode & 0o037:
        raise ConfigError(
            where, f"{path} is mode {oct(mode & 0o777)}: operator keys must be 0600 (chmod 600)"
        )


def load_operator_keys(
    path: str, edge_keys_file: str = "", edge_keys: dict[str, bytes] | None = None
) -> dict[str, bytes]:
    """'id:secret' per line ('#' comments), at least 16 characters of secret; the id (at most
    32 characters) names the operator in every log line. Refused: the edges' api_keys_file
    itself, and any secret an edge also holds (an edge's read key would add bans and purges,
    logged as an operator: attack review B)."""
    where = "origin.decisions.operator_keys_file"
    check_key_file_mode(path, where)
    if edge_keys_file:
        try:
            same = os.path.samefile(path, edge_keys_file)
        except OSError:
            same = False
        if same:
            raise ConfigError(
                where, "is the edges' api_keys_file: give operators keys of their own"
            )
    keys = load_api_keys(path, where)
    for name in keys:
        if not name or len(name) > MAX_KEY_ID_CHARS or not name.isprintable() or " " in name:
            raise ConfigError(where, f"key id {name[:40]!r}: 1 to 32 printable characters")
    for name, secret in keys.items():
        if match_key(secret, edge_keys or {}) is not None:
            raise ConfigError(where, f"key {name!r} is also an edge's read key (api_keys_file)")
    return keys


def match_key(presented: bytes, keys: dict[str, bytes]) -> str | None:
    """The id of the key equal to `presented` (compared with every key: no timing leak)."""
    found = None
    for name, expected in keys.items():
        if hmac.compare_digest(presented, expected):
            found = name
    return found


class OperatorActions(Protocol):
    """What the origin does for an operator (origin.agent.OriginAgent)."""

    def operator_add(
        self, scope: str, value: str, duration_s: float, reason: str, operator: str
    ) -> Decision: ...

    def operator_delete(self, scope: str, value: str, operator: str) -> Decision | None: ...

    def operator_purge(self, purge: Purge) -> None: ...

    def operator_list(self, now: float) -> list[Decision]: ...


class OperatorApi:
    def __init__(
        self,
        keys: dict[str, bytes],
        edge_keys: dict[str, bytes],
        actions: OperatorActions,
        log: JsonLog,
    ) -> None:
        self.keys = keys
        self.edge_keys = edge_keys
        self.actions = actions
        self.log = log
        self.requests: dict[str, int] = {}  # action or refusal -> count
        self._refusal_log = TokenBucket(2.0, 20, time.monotonic())

    def _count(self, key: str) -> None:
        self.requests[key] = self.requests.get(key, 0) + 1

    def authenticate(self, request: Request) -> tuple[str | None, str]:
        """(operator key id, '') or (None, why: missing | malformed | edge_key | wrong_key)."""
        header = request.header(b"authorization")
        if header is None:
            return None, "missing"
        scheme, _, token = header.strip().partition(b" ")
        token = token.strip()
        if scheme.lower() != b"bearer" or not token or len(token) > 512:
            return None, "malformed"
        operator = match_key(token, self.keys)
        if operator is not None:
            return operator, ""
        if match_key(token, self.edge_keys) is not None:
            return None, "edge_key"  # a read key can never write
        return None, "wrong_key"

    async def __call__(self, request: Request, body: BodyStream, respond: Responder) -> bool:
        """Answer one request under PREFIX; True if it showed a valid operator key."""
        client = request.client[0] if request.client else ""
        operator, why = self.authenticate(request)
        url = urlsplit(request.target.decode("latin-1"))
        if operator is None:
            self._count(f"refused_{why}")
            if self._refusal_log.allow(time.monotonic()):
                self.log.emit(
                    "operator_refused",
                    client=client,
                    reason=why,
                    method=request.method.decode("latin-1")[:10],
                    path=url.path[:100],
                )
            await _json(
                respond,
                401,
                {"message": "a valid operator key is required"},
                [(b"www-authenticate", b'Bearer realm="blindfold"'), (b"connection", b"close")],
            )
            return False
        try:
            await self._route(request, body, respond, url.path, url.query, operator, client)
        except ProtocolError as exc:
            self._count(f"bad_{exc.reason}")
            await _json(respond, 400, {"message": str(exc)[:300]})
        return True

    async def _route(
        self,
        request: Request,
        body: BodyStream,
        respond: Responder,
        path: str,
        query: str,
        operator: str,
        client: str,
    ) -> None:
        method = request.method
        if path == PREFIX + "decisions" and method in (b"GET", b"HEAD"):
            now = time.time()
            items = [_decision_json(d, now) for d in self.actions.operator_list(now)]
            self._count("list")
            self.log.emit(  # reading the whole set is an operator's act too (who looked, when)
                "operator_action",
                operator=operator,
                client=client,
                action="decisions_list",
                count=len(items),
            )
            await _json(respond, 200, {"decisions": items})
        elif path == PREFIX + "decisions" and method == b"POST":
            obj = await _read_json(body)
            scope, value, duration_s, reason = _decision_request(obj)
            d = self.actions.operator_add(scope, value, duration_s, reason, operator)
            self._count("add")
            self.log.emit(
                "operator_action",
                operator=operator,
                client=client,
                action="decision_add",
                id=d.id,
                scope=d.scope,
                value=d.value,
                duration_s=duration_s,
                until=round(d.until, 3),
                reason=reason,
            )
            await _json(respond, 200, {"decision": _decision_json(d, time.time())})
        elif path == PREFIX + "decisions" and method == b"DELETE":
            scope, value = _delete_target(query, self.actions.operator_list(time.time()))
            gone = self.actions.operator_delete(scope, value, operator)
            self._count("delete")
            self.log.emit(
                "operator_action",
                operator=operator,
                client=client,
                action="decision_delete",
                scope=scope,
                value=value,
                id=gone.id if gone is not None else None,
                found=gone is not None,
            )
            if gone is None:
                await _json(respond, 404, {"message": f"no decision on {scope} {value}"})
            else:
                await _json(respond, 200, {"deleted": _decision_json(gone, time.time())})
        elif path == PREFIX + "purge" and method == b"POST":
            obj = await _read_json(body)
            purge = parse_purge(obj, id_=new_purge_id(), issued=time.time(), operator=operator)
            self.actions.operator_purge(purge)
            self._count("purge")
            self.log.emit(
                "operator_action",
                operator=operator,
                client=client,
                action="purge",
                purge=purge.id,
                urls=list(purge.urls[:10]),
                prefixes=list(purge.prefixes[:10]),
                tags=list(purge.tags[:10]),
                blobs=list(purge.blobs[:10]),
                items=purge.size,
            )
            await _json(respond, 200, {"purge": purge.id, "items": purge.size})
        elif path in (PREFIX + "decisions", PREFIX + "purge"):
            await _json(respond, 405, {"message": "method not allowed"})
        else:
            await _json(respond, 404, {"message": "not found"})


def _decision_json(d: Decision, now: float) -> dict[str, Any]:
    out = d.to_crowdsec(now)
    out["reason"] = d.reason
    return out


async def _read_json(body: BodyStream) -> Any:
    try:
        data = await asyncio.wait_for(body.read_all(MAX_BODY_BYTES), BODY_TIMEOUT_S)
    except TimeoutError:
        raise ProtocolError("bad_request", "body not received in time") from None
    except Exception as exc:  # BodyTooLarge, a reset: the request is refused, nothing else
        raise ProtocolError("bad_request", f"body: {exc}"[:200]) from None
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        raise ProtocolError("bad_request", "the body is not JSON") from None


def _decision_request(obj: Any) -> tuple[str, str, float, str]:
    if not isinstance(obj, dict):
        raise ProtocolError("bad_decision", "not a JSON object")
    scope, value = str(obj.get("scope", "")), str(obj.get("value", ""))
    version, _net, plen = parse_net(scope, value)
    if scope.lower() == "range":
        least = MIN_PREFIX_V4 if version == 4 else MIN_PREFIX_V6
        if plen < least:
            raise ProtocolError("too_wide", f"{value}: ranges wider than /{least} are refused")
    duration = obj.get("duration", "4h")
    duration_s = parse_duration(str(duration)[:40])
    if not 0 < duration_s <= MAX_DURATION_S:
        raise ProtocolError("bad_decision", "duration must be positive and at most 366 days")
    reason = obj.get("reason", "manual")
    if not isinstance(reason, str) or len(reason) > 200 or not reason.isprintable():
        raise ProtocolError("bad_decision", "reason: printable text of at most 200 characters")
    s, v = normalise(scope, value)
    return s, v, duration_s, reason or "manual"


def _delete_target(query: str, active: list[Decision]) -> tuple[str, str]:
    try:
        q = parse_qs(query, max_num_fields=4)
    except ValueError:
        raise ProtocolError("bad_request", "too many query fields") from None
    if "id" in q:
        text = q["id"][0]
        if not text.isdigit() or len(text) > 18:
            raise ProtocolError("bad_decision", "id must be a number")
        for d in active:
            if d.id == int(text):
                return d.scope, d.value
        raise ProtocolError("not_found", f"no active decision {text}")
    scope, value = q.get("scope", [""])[0], q.get("value", [""])[0]
    return normalise(scope, value)


async def _json(
    respond: Responder, status: int, obj: Any, extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    data = json.dumps(obj, separators=(",", ":")).encode()
    await respond.start(
        status,
        [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(data)).encode()),
            (b"cache-control", b"no-store"),
            *(extra or []),
        ],
    )
    await respond.send(data)
    await respond.end()
