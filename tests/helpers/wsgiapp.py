"""A WSGI application behind the standard library's WSGI server (wsgiref, one thread per
request): it answers with what a Python web framework would believe about the request, i.e. its
WSGI environ (where `X_Forwarded_For` and `X-Forwarded-For` both become HTTP_X_FORWARDED_FOR)."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Handler(WSGIRequestHandler):
    def get_environ(self) -> dict[str, Any]:
        env = super().get_environ()
        env["RAW_URI"] = self.path  # the target as received (PATH_INFO is percent-decoded)
        return env

    def log_message(self, format: str, *args: Any) -> None:
        pass


class WsgiApp:
    """Answers every request with its view of it, as JSON; `/slow` first waits (at most 20 s)
    until `release` is set, counting the requests waiting in `waiting`."""

    def __init__(self) -> None:
        self.seen: list[dict[str, str]] = []
        self.lock = threading.Lock()
        self.release = threading.Event()
        self.waiting = 0
        self.server = make_server(
            "127.0.0.1", 0, self._app, server_class=_Server, handler_class=_Handler
        )
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def _app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        view = {
            k: str(v)
            for k, v in environ.items()
            if k.startswith("HTTP_") or k in ("PATH_INFO", "QUERY_STRING", "RAW_URI")
        }
        with self.lock:
            self.seen.append(view)
        if environ.get("PATH_INFO") == "/slow":
            with self.lock:
                self.waiting += 1
            self.release.wait(20)
            with self.lock:
                self.waiting -= 1
        body = json.dumps(view).encode()
        start_response(
            "200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
        )
        return [body]

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
