"""The origin's request handler: WAF inspection, decision rules, then the reverse proxy.

The WAF sees the request head, then up to its inspection limit of body, before any byte goes to
the application; the inspected bytes are then replayed to the application and the rest of the
body streams through unseen (or is refused, with `body_limit_action = "reject"`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

from blindfold.decisions.core import DecisionRules
from blindfold.decisions.purge import CACHE_TAG_HEADER
from blindfold.obs.metrics import TopLabels
from blindfold.origin.edges import Reporter
from blindfold.waf.engine import Match, Verdict, WafEngine
from blindfold.web.messages import (
    BodyStream,
    BodyTimeout,
    BodyTooLarge,
    Request,
    Responder,
    simple_response,
)
from blindfold.web.proxy import ReverseProxy

# (ip, duration_s, reason, the trusted edge whose PROXY claim named the visitor, if one did)
Ban = Callable[[str, float, str, Reporter | None], None]


def path_label(path: bytes) -> str:
    """A blocked request's path as a metric label: its first segment, printable, short."""
    first = path.split(b"?", 1)[0].lstrip(b"/").split(b"/", 1)[0][:40]
    return "/" + "".join(chr(b) if 0x21 <= b < 0x7F and b != 0x22 else "_" for b in first)


Log = Callable[..., None]


class RemoteRules(Protocol):
    """Where a worker's gate sends what the decision rules count (origin.worker.MasterLink):
    the master applies them, so counts and bans hold across workers."""

    def request(self, ip: str, path: bytes, now: float, reporter: Reporter | None) -> None: ...

    def block(self, ip: str, now: float, reporter: Reporter | None, label: str = "") -> None:
        """`label`: the blocked path's (path_label), counted by the master (count_waf_path)."""


def count_waf_path(stats: dict[str, Any], paths: TopLabels, label: str, now: float) -> None:
    """One WAF block of a path, in its `waf_path:<label>` counter; only in the process that
    holds the one TopLabels (the master with workers: workers send the label with the block),
    so a counter dropped when its label leaves is not one that others still add to (a summed
    series that went down while exported: attack review of issue 13, finding 7)."""
    label, left = paths.observe(label, now)
    if left is not None:  # its series ends (TopLabels): a counter never goes down
        stats.pop(f"waf_path:{left}", None)
    stats[f"waf_path:{label}"] = stats.get(f"waf_path:{label}", 0) + 1


class OriginGate:
    def __init__(
        self,
        proxy: ReverseProxy,
        waf: WafEngine | None,
        rules: DecisionRules,
        ban: Ban,
        log: Log,
        *,
        inspect_limit: int,
        reject_over_limit: bool,
        detect_only: bool,
        stats: dict[str, Any],
        access_log: bool = True,
        remote: RemoteRules | None = None,
    ) -> None:
        """`remote`: in a worker, the master's decision rules (`rules` then only says which
        paths rate rules cover)."""
        self.proxy = proxy
        self.waf = waf
        self.rules = rules
        self.ban = ban
        self.log = log
        self.inspect_limit = inspect_limit
        self.reject_over_limit = reject_over_limit
        self.detect_only = detect_only
        self.stats = stats
        self.waf_paths = TopLabels(30)  # the agent hands its own, kept across reloads
        self.access_log = access_log
        self.remote = remote

    def _count(self, key: str, n: int = 1) -> None:
        self.stats[key] = self.stats.get(key, 0) + n

    async def __call__(
        self,
        request: Request,
        body: BodyStream,
        respond: Responder,
        reporter: Reporter | None = None,
    ) -> None:
        """`reporter`: the trusted edge whose PROXY header named `request.client` (None for a
        direct visitor); written with every log line and decision the request causes."""
        t0 = time.monotonic()
        now = time.time()
        ip = request.client[0]
        status = 0
        sent = 0
        waf_state = None
        remote = self.remote
        if remote is not None:
            if self.rules.rate_rules:
                remote.request(ip, request.path, now, reporter)
        else:
            ban = self.rules.on_request(ip, request.path, now)
            if ban is not None:
                self.ban(*ban, reporter)
        tx = None
        verdict_ids: tuple[int, ...] = ()
        try:
            verdict: Verdict | None = None
            prefix: list[bytes] = []
            if self.waf is not None:
                tx = self.waf.transaction(request.request_id, request.client, request.server)
                version = {"2": "2.0", "3": "3.0"}.get(request.http_version, request.http_version)
                headers = request.headers
                if request.http_version in ("2", "3") and request.header(b"host") is None:
                    headers = [(b"host", request.authority), *headers]
                verdict = tx.request_headers(request.method, request.target, version, headers)
                if verdict is None:
                    verdict, prefix = await self._inspect_body(tx, body)
            if verdict is not None:
                verdict_ids = verdict.rule_ids
            detect = self.detect_only or (tx is not None and tx.mode == "detect")
            if verdict is not None and not detect:
                status = verdict.status
                waf_state = "blocked"
                await self._block(request, respond, verdict, reporter)
                return
            response = await self.proxy.forward(request, body, respond, prefix)
            if response is None:
                status = 502
                return
            status = response.status
            if tx is not None:
                tx.response_headers(
                    response.status, response.headers, response.http_version.decode()
                )
            if not request.from_http_edge:
                # Cache-Tag is for an edge's cache: one that speaks HTTP strips it itself; on
                # passthrough (or to a direct visitor) it would show the site's internal tags
                response.headers = [(k, v) for k, v in response.headers if k != CACHE_TAG_HEADER]
            sent = await self.proxy.relay(request, response, respond)
        except BodyTooLarge:
            status = 413
            await simple_response(respond, 413, "request body too large\n")
        except BodyTimeout:
            status = 408
            await simple_response(respond, 408, "request body not received in time\n")
        finally:
            matches: list[Match] = tx.finish() if tx is not None else []
            if verdict_ids:
                matches += [
                    Match(r, "blocking verdict")
                    for r in verdict_ids
                    if all(m.rule_id != r for m in matches)
                ]
            if matches:
                waf_state = waf_state or "matched"
                mode = tx.mode if tx is not None else "block"
                self._audit(request, status, matches, waf_state, mode, reporter)
            self._count(f"requests:{status // 100}xx" if status else "requests:aborted")
            if self.access_log:
                self.log(
                    "request",
                    request_id=request.request_id,
                    client=ip,
                    method=request.method.decode("latin-1"),
                    path=request.path.decode("latin-1")[:300],
                    host=request.authority.decode("latin-1")[:200],
                    status=status,
                    bytes_out=sent,
                    http=request.http_version,
                    waf=waf_state,
                    duration_s=round(time.monotonic() - t0, 6),
                    **edge_fields(reporter),
                )

    async def _inspect_body(self, tx: Any, body: BodyStream) -> tuple[Verdict | None, list[bytes]]:
        prefix: list[bytes] = []
        seen = 0
        while seen < self.inspect_limit:
            chunk = await body.read()
            if not chunk:
                break
            prefix.append(chunk)
            take = chunk[: self.inspect_limit - seen]
            tx.request_body(take)
            seen += len(chunk)
        if seen >= self.inspect_limit and not body.finished and self.reject_over_limit:
            # read on: the body may end exactly at the limit
            chunk = await body.read()
            if chunk:
                raise BodyTooLarge("over the WAF's inspection limit")
        return tx.end_request(), prefix

    async def _block(
        self, request: Request, respond: Responder, verdict: Verdict, reporter: Reporter | None
    ) -> None:
        self._count("waf_blocks")
        for rule in verdict.rule_ids:
            self._count(f"waf_rule:{rule}")
        label = path_label(request.path)
        if self.remote is not None:  # the master counts the path (one TopLabels for all)
            self.remote.block(request.client[0], time.time(), reporter, label)
        else:
            count_waf_path(self.stats, self.waf_paths, label, time.time())
            ban = self.rules.on_block(request.client[0], time.time())
            if ban is not None:
                self.ban(*ban, reporter)
        text = f"Request blocked by the site's firewall.\nrequest id: {request.request_id}\n"
        await simple_response(
            respond, verdict.status, text, [(b"x-request-id", request.request_id.encode())]
        )

    def _audit(
        self,
        request: Request,
        status: int,
        matches: list[Match],
        state: str,
        mode: str,
        reporter: Reporter | None,
    ) -> None:
        self.log(
            "waf",
            request_id=request.request_id,
            client=request.client[0],
            method=request.method.decode("latin-1"),
            uri=request.target.decode("latin-1")[:500],  # as forwarded (canonical path)
            raw_uri=request.raw_target.decode("latin-1")[:500] or None,  # as sent
            host=request.authority.decode("latin-1")[:200],
            status=status,
            path=request.path.decode("latin-1")[:300],  # canonical, no query: what rules name
            result=state,
            mode=mode,
            rule_ids=sorted({m.rule_id for m in matches}),
            messages=[m.message[:100] for m in matches][:20],
            # [rule id, variable, anomaly points] in the order of `messages`: where each rule
            # matched (the variable's name, never its value); what `blindfold waf report` reads
            targets=[[m.rule_id, m.variable[:80], m.points] for m in matches][:20],
            audit=True,
            **edge_fields(reporter),
        )


def edge_fields(reporter: Reporter | None) -> dict[str, Any]:
    """Log fields naming the edge whose PROXY claim named the client (none for a direct
    visitor): `edge` (its name, null when it has none) and `edge_address`."""
    if reporter is None:
        return {}
    return {"edge": reporter.name or None, "edge_address": reporter.address}
