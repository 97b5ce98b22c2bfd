"""sd_notify: datagrams to a real AF_UNIX socket, as systemd receives them."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import pytest

from blindfold.obs import sdnotify
from tests.helpers.notify import NotifySocket


def test_ready_reaches_a_path_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    receiver = NotifySocket(tmp_path / "notify")
    monkeypatch.setenv("NOTIFY_SOCKET", receiver.address)
    try:
        assert sdnotify.ready("listening on 127.0.0.1:443")
        got = receiver.receive(5)
    finally:
        receiver.close()
    assert got is not None
    fields, pid = got
    assert fields == {
        "READY": "1",
        "STATUS": "listening on 127.0.0.1:443",
        "MAINPID": str(os.getpid()),
    }
    assert pid == os.getpid()


def test_abstract_namespace(monkeypatch: pytest.MonkeyPatch) -> None:
    """sd_notify(3): an address starting with '@' is in the abstract namespace."""
    receiver = NotifySocket(abstract=f"blindfold-test-{secrets.token_hex(6)}")
    monkeypatch.setenv("NOTIFY_SOCKET", receiver.address)
    try:
        assert sdnotify.notify("STOPPING=1")
        got = receiver.receive(5)
    finally:
        receiver.close()
    assert got is not None and got[0] == {"STOPPING": "1"}


@pytest.mark.parametrize("value", [None, "", "relative/path", "vsock:2:1234"])
def test_nothing_sent_without_a_unix_socket(
    value: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    if value is None:
        monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    else:
        monkeypatch.setenv("NOTIFY_SOCKET", value)
    assert sdnotify.ready("up") is False


def test_a_missing_socket_is_not_fatal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    assert sdnotify.ready("up") is False
