"""A decision stream the test drives: CrowdSec's bouncer API shape (`GET /v1/decisions/stream`)
over plain HTTP on loopback, in a thread. It plays the part of a source we do not control: it
can answer garbage, huge sets, or bans no honest origin would make."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

KEY = "test-source-key-0123456789"


class StreamSource:
    """One follower: `startup=true` answers every active decision, later calls what changed
    since the previous call. `poison` bodies are answered instead, in order, first."""

    def __init__(self) -> None:
        self.active: dict[tuple[str, str], int] = {}  # (scope, value) -> duration in s
        self.new: dict[tuple[str, str], int] = {}
        self.deleted: set[tuple[str, str]] = set()
        self.poison: list[bytes] = []
        self.throttle: list[str] = []  # Retry-After values: answered 429 with each, first
        self.requests: list[str] = []
        self.times: list[float] = []  # time.monotonic() of each request
        # a blindfold origin's purge log (/v1/purges) when purge_log: the answers to give, in
        # order (then an empty one), and the positions the edge sent
        self.purge_log = False
        self.purge_answers: list[dict[str, Any]] = []
        self.purge_positions: list[str | None] = []
        self.lock = threading.Lock()
        source = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.startswith("/v1/purges") and source.purge_log:
                    with source.lock:
                        source.purge_positions.append(self.headers.get("x-blindfold-purges"))
                        answer = source.purge_answers.pop(0) if source.purge_answers else None
                    log = json.dumps(
                        answer or {"position": "e.0", "reset": False, "purges": []}
                    ).encode()
                    self.send_response(200)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(log)))
                    self.end_headers()
                    self.wfile.write(log)
                    return
                if not self.path.startswith("/v1/decisions"):  # as CrowdSec's LAPI: no purges
                    self.send_response(404)
                    self.send_header("content-length", "0")
                    self.end_headers()
                    return
                with source.lock:
                    source.times.append(time.monotonic())
                    retry_after = source.throttle.pop(0) if source.throttle else None
                if retry_after is not None:  # the origin rations whole-set answers per key
                    self.send_response(429)
                    self.send_header("retry-after", retry_after)
                    self.send_header("content-length", "0")
                    self.end_headers()
                    return
                body = source.answer(self.path, self.headers.get("x-api-key", ""))
                self.send_response(200 if body is not None else 403)
                body = body if body is not None else b'{"message":"access forbidden"}'
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def add(self, values: Iterable[str], duration_s: int = 600) -> None:
        with self.lock:
            for value in values:
                key = ("Range" if "/" in value else "Ip", value)
                self.active[key] = duration_s
                self.new[key] = duration_s
                self.deleted.discard(key)

    def remove(self, values: Iterable[str]) -> None:
        with self.lock:
            for value in values:
                key = ("Range" if "/" in value else "Ip", value)
                self.active.pop(key, None)
                self.new.pop(key, None)
                self.deleted.add(key)

    def answer(self, target: str, key: str) -> bytes | None:
        with self.lock:
            self.requests.append(target)
            if key != KEY:
                return None
            if self.poison:
                return self.poison.pop(0)
            url = urlsplit(target)
            startup = parse_qs(url.query).get("startup", ["false"])[0] == "true"
            if startup:
                new, deleted = dict(self.active), set()
            else:
                new, deleted = self.new, self.deleted
            self.new, self.deleted = {}, set()
            return _stream(new, deleted)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def _stream(new: dict[tuple[str, str], int], deleted: set[tuple[str, str]]) -> bytes:
    def item(scope: str, value: str, duration: str) -> dict[str, Any]:
        return {
            "duration": duration,
            "origin": "test",
            "scenario": "test",
            "scope": scope,
            "type": "ban",
            "value": value,
        }

    payload = {
        "new": [item(s, v, f"{d}s") for (s, v), d in new.items()] or None,
        "deleted": [item(s, v, "-1s") for s, v in deleted] or None,
    }
    return json.dumps(payload, separators=(",", ":")).encode()
