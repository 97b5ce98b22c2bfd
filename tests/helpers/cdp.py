"""Headless Chromium driven over the DevTools protocol through a pipe (--remote-debugging-pipe:
JSON messages ended by NUL on file descriptors 3 and 4), so a test needs no WebSocket client.
It records every request the page makes, console errors and exceptions, and can evaluate
script and take screenshots. Every wait has a deadline."""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import subprocess
import time
from pathlib import Path
from typing import Any


class CdpError(Exception):
    pass


class Chromium:
    def __init__(self, browser: str, profile: Path, extra_args: list[str] | None = None) -> None:
        pipe_r, self._to_child = os.pipe()
        self._from_child, pipe_w = os.pipe()
        # numbers above 4, so that moving them to 3 and 4 clobbers neither
        to_child_r = fcntl.fcntl(pipe_r, fcntl.F_DUPFD_CLOEXEC, 10)
        from_child_w = fcntl.fcntl(pipe_w, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(pipe_r)
        os.close(pipe_w)
        # the child reads commands on fd 3 and writes answers on fd 4 (bash moves them: dash
        # handles single-digit descriptors only)
        move = f'exec "$@" 3<&{to_child_r} 4>&{from_child_w} {to_child_r}<&- {from_child_w}>&-'
        self.proc = subprocess.Popen(
            [
                "/bin/bash",
                "-c",
                move,
                "bash",
                browser,
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-default-apps",
                "--metrics-recording-only",
                f"--user-data-dir={profile}",
                "--remote-debugging-pipe",
                "--window-size=1280,1800",
                *(extra_args or []),
                "about:blank",
            ],
            pass_fds=(to_child_r, from_child_w),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_child_r)
        os.close(from_child_w)
        self._buf = b""
        self._id = 0
        self.events: list[dict[str, Any]] = []
        self.session = ""

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=5, session=False)
        except (CdpError, OSError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()  # the browser we started, by its handle
            self.proc.wait(10)
        os.close(self._to_child)
        os.close(self._from_child)

    def _read_message(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise CdpError("no message from Chromium in time")
            ready, _, _ = select.select([self._from_child], [], [], left)
            if ready:
                chunk = os.read(self._from_child, 1 << 20)
                if not chunk:
                    raise CdpError("Chromium closed its DevTools pipe")
                self._buf += chunk
        raw, _, self._buf = self._buf.partition(b"\0")
        message: dict[str, Any] = json.loads(raw)
        return message

    def send(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        *,
        timeout: float = 15,
        session: bool = True,
    ) -> dict[str, Any]:
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        if session and self.session:
            msg["sessionId"] = self.session
        os.write(self._to_child, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise CdpError(f"{method}: {reply['error']}")
                result: dict[str, Any] = reply.get("result", {})
                return result
            if "method" in reply:
                self.events.append(reply)

    def pump(self, seconds: float) -> None:
        """Collect events for `seconds`."""
        deadline = time.monotonic() + seconds
        try:
            while True:
                event = self._read_message(deadline)
                if "method" in event:
                    self.events.append(event)
        except CdpError as exc:
            if "in time" not in str(exc):
                raise

    def open(self, url: str) -> str:
        """A new tab showing `url`, with network, console and log events recorded; it becomes
        the one `send` talks to (set `session` to the returned id to come back to it)."""
        target = self.send("Target.createTarget", {"url": "about:blank"}, session=False)
        attached = self.send(
            "Target.attachToTarget",
            {"targetId": target["targetId"], "flatten": True},
            session=False,
        )
        self.session = attached["sessionId"]
        for domain in ("Network", "Runtime", "Log", "Page"):
            self.send(f"{domain}.enable")
        self.send("Page.navigate", {"url": url})
        return self.session

    def evaluate(self, expression: str) -> Any:
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in result:
            raise CdpError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise CdpError(f"not true within {timeout} s: {expression}")
            self.pump(0.2)

    def screenshot(self, path: Path) -> None:
        data = self.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
        path.write_bytes(base64.b64decode(data["data"]))

    def _mine(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("sessionId") == self.session]

    def requested_urls(self) -> list[str]:
        """Every request the current tab made (documents, fetches, images, anything)."""
        return [
            e["params"]["request"]["url"]
            for e in self._mine()
            if e.get("method") == "Network.requestWillBeSent"
        ]

    def errors(self) -> list[str]:
        """Uncaught exceptions, console errors, and browser log errors (CSP violations,
        failed loads) of the current tab."""
        out = []
        for e in self._mine():
            method, params = e.get("method"), e.get("params", {})
            if method == "Runtime.exceptionThrown":
                out.append(json.dumps(params.get("exceptionDetails"))[:500])
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                out.append(json.dumps(params.get("args"))[:500])
            elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                out.append(json.dumps(params["entry"])[:500])
        return out
