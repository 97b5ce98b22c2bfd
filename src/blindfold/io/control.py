"""The worker's end of the master <-> worker control channel: newline-delimited JSON over a
socketpair, read and written without blocking from the reactor, with bounded buffers.

What a message carries is bounded by what is sent: ban chunks of at most 10,000 keys (~0.45 MB
of JSON for IPv6 /128s, `decisions.bans.CHUNK`) and the edge's config file (the master refuses
one whose message would not fit: `check_config_size`). A longer line closes the channel (the
worker then drains). A line that is not a JSON object, or a handler that fails, costs that one
message: `on_error` hears of it, and nothing reaches the reactor.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

from blindfold.errors import ConfigError
from blindfold.io.reactor import EPOLLIN, EPOLLOUT, Reactor

MAX_MESSAGE_BYTES = 2 << 20


def encode(message: dict[str, Any]) -> bytes:
    """One message as it travels: compact JSON, one line."""
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def check_config_size(text: str) -> None:
    """ConfigError unless a config message carrying `text` fits under MAX_MESSAGE_BYTES."""
    size = len(encode({"op": "config", "text": text, "seq": 1 << 62}))
    if size > MAX_MESSAGE_BYTES:
        raise ConfigError(
            "",
            f"the config file takes {size} bytes to send to a worker, more than "
            f"{MAX_MESSAGE_BYTES}: put long address lists in blocklist_files/allowlist_files",
        )


class ControlChannel:
    def __init__(
        self,
        reactor: Reactor,
        fd: int,
        on_message: Callable[[dict[str, Any]], None],
        on_closed: Callable[[], None],
        on_error: Callable[[str, BaseException], None],
    ) -> None:
        self._reactor = reactor
        self._fd = fd
        self._on_message = on_message
        self._on_closed = on_closed
        self._on_error = on_error
        self._inbuf = bytearray()
        self._out = bytearray()
        self._closed = False
        os.set_blocking(fd, False)
        reactor.add(fd, EPOLLIN, self._on_event)

    def send(self, message: dict[str, Any]) -> None:
        if self._closed:
            return
        self._out += encode(message)
        self._write()

    def _write(self) -> None:
        while self._out:
            try:
                n = os.write(self._fd, self._out)
            except BlockingIOError:
                self._reactor.modify(self._fd, EPOLLIN | EPOLLOUT)
                return
            except OSError:
                self._close()
                return
            del self._out[:n]
        self._reactor.modify(self._fd, EPOLLIN)

    def _on_event(self, mask: int) -> None:
        if mask & EPOLLOUT:
            self._write()
        if self._closed or not mask & ~EPOLLOUT:
            return
        try:
            data = os.read(self._fd, 1 << 20)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._close()
            return
        self._inbuf += data
        while not self._closed:
            end = self._inbuf.find(b"\n")
            if end < 0:
                break
            line = bytes(self._inbuf[:end])
            del self._inbuf[: end + 1]
            self._deliver(line)
        if len(self._inbuf) > MAX_MESSAGE_BYTES:
            self._close()

    def _deliver(self, line: bytes) -> None:
        try:
            message = json.loads(line)
            if not isinstance(message, dict):
                raise ValueError(f"a JSON {type(message).__name__}, not an object")
        except ValueError as exc:
            self._on_error("bad_message", exc)
            return
        try:
            self._on_message(message)
        except Exception as exc:  # a bug in one handler: that message, not the worker
            self._on_error("handler_error", exc)

    def _close(self) -> None:
        if not self._closed:
            self._closed = True
            self._reactor.remove(self._fd)
            os.close(self._fd)
            self._on_closed()
