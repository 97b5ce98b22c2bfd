"""The worker's end of the master <-> worker control channel: newline-delimited JSON over a
socketpair, read and written without blocking from the reactor, with bounded buffers."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

from blindfold.io.reactor import EPOLLIN, EPOLLOUT, Reactor

MAX_MESSAGE_BYTES = 64 << 20  # decisions lists can be large; anything bigger is a bug


class ControlChannel:
    def __init__(
        self,
        reactor: Reactor,
        fd: int,
        on_message: Callable[[dict[str, Any]], None],
        on_closed: Callable[[], None],
    ) -> None:
        self._reactor = reactor
        self._fd = fd
        self._on_message = on_message
        self._on_closed = on_closed
        self._inbuf = bytearray()
        self._out = bytearray()
        self._closed = False
        os.set_blocking(fd, False)
        reactor.add(fd, EPOLLIN, self._on_event)

    def send(self, message: dict[str, Any]) -> None:
        if self._closed:
            return
        self._out += json.dumps(message, separators=(",", ":")).encode() + b"\n"
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
        while True:
            end = self._inbuf.find(b"\n")
            if end < 0:
                break
            line = bytes(self._inbuf[:end])
            del self._inbuf[: end + 1]
            self._on_message(json.loads(line))
        if len(self._inbuf) > MAX_MESSAGE_BYTES:
            self._close()

    def _close(self) -> None:
        if not self._closed:
            self._closed = True
            self._reactor.remove(self._fd)
            os.close(self._fd)
            self._on_closed()
