"""The worker's end of the control channel on a real socketpair: bounded messages, and a bad
message or a failing handler that never reaches the reactor."""

from __future__ import annotations

import socket
from typing import Any

import pytest

from blindfold.decisions.bans import CHUNK, encode
from blindfold.errors import ConfigError
from blindfold.io import control
from blindfold.io.control import ControlChannel
from blindfold.io.reactor import Reactor


class Host:
    def __init__(self) -> None:
        self.reactor = Reactor()
        self.ours, theirs = socket.socketpair()
        self.got: list[dict[str, Any]] = []
        self.errors: list[tuple[str, str]] = []
        self.closed = False
        self.channel = ControlChannel(
            self.reactor, theirs.detach(), self.on_message, self.on_closed, self.on_error
        )

    def on_message(self, message: dict[str, Any]) -> None:
        if message.get("op") == "boom":
            raise RuntimeError("a bug in a handler")
        self.got.append(message)
        if message.get("op") == "last":
            self.reactor.stop()

    def on_error(self, problem: str, exc: BaseException) -> None:
        self.errors.append((problem, repr(exc)))

    def on_closed(self) -> None:
        self.closed = True
        self.reactor.stop()

    def run(self, timeout_s: float = 5.0) -> None:
        self.reactor.call_later(timeout_s, self.reactor.stop)
        self.reactor.run()

    def send(self, data: bytes) -> None:
        """Write `data` to the channel while the reactor reads it (socket buffers are smaller
        than a big message), until all is sent or the channel closed; then run a while."""
        self.ours.setblocking(False)
        sent = 0
        while sent < len(data) and not self.closed:
            try:
                sent += self.ours.send(data[sent:])
            except BlockingIOError:
                pass
            self.reactor.call_later(0.01, self.reactor.stop)
            self.reactor.run()
        if not self.closed:
            self.run(1.0)

    def close(self) -> None:
        self.ours.close()
        self.reactor.close()


def test_a_failing_handler_or_a_bad_line_costs_that_message_only() -> None:
    host = Host()
    try:
        host.ours.sendall(b'{"op":"boom"}\nnot json\n[1,2]\n{"op":"ok"}\n{"op":"last"}\n')
        host.run()  # returns: nothing escaped into the reactor
        assert [m["op"] for m in host.got] == ["ok", "last"]
        assert [p for p, _ in host.errors] == ["handler_error", "bad_message", "bad_message"]
        assert "a bug in a handler" in host.errors[0][1]
        assert not host.closed
    finally:
        host.close()


def test_a_message_over_the_cap_closes_the_channel() -> None:
    host = Host()
    try:
        host.send(b"x" * (control.MAX_MESSAGE_BYTES + 1))  # no newline: one endless message
        assert host.closed
    finally:
        host.close()


def test_the_largest_messages_sent_fit_under_the_cap() -> None:
    """A ban chunk of the widest keys (IPv6 /128s) and the largest config the master accepts
    both arrive whole: the cap is what the messages need (2 MiB), not 64 MB."""
    widest = encode(6, (1 << 128) - 1, 128)
    bans = {"op": "bans", "id": 1 << 40, "reset": True, "swap": True, "more": True}
    chunk = {**bans, "add": [widest] * CHUNK, "del": []}
    assert len(control.encode(chunk)) < control.MAX_MESSAGE_BYTES
    text = "#" * (control.MAX_MESSAGE_BYTES - 64)
    control.check_config_size(text)  # the master would send this one...
    with pytest.raises(ConfigError):
        control.check_config_size(text + "#" * 64)  # ...and refuses this one
    host = Host()
    try:
        out = control.encode(chunk) + control.encode({"op": "config", "text": text, "seq": 1})
        host.send(out + control.encode({"op": "last"}))
        assert [m["op"] for m in host.got] == ["bans", "config", "last"]
        assert host.got[1]["text"] == text and not host.closed
    finally:
        host.close()
