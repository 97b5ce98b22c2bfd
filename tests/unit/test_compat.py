"""The private CPython internals blindfold relies on are checked at start-up: a Python that
lacks one gets a clear error naming its version and what is missing, before anything runs."""

from __future__ import annotations

import asyncio
import asyncio.selector_events
import sys
from pathlib import Path

import pytest

from blindfold.io import compat
from blindfold.io.service import EXIT_RUNTIME, Service, run_service


def test_this_python_has_every_internal() -> None:
    compat.check()


def test_a_missing_internal_is_named_with_the_python_version(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    loop_cls = asyncio.selector_events.BaseSelectorEventLoop
    monkeypatch.delattr(loop_cls, "_make_socket_transport")
    with pytest.raises(compat.CompatError) as info:
        compat.check()
    version = ".".join(map(str, sys.version_info[:3]))
    assert f"Python {version}" in str(info.value)
    assert "BaseSelectorEventLoop._make_socket_transport" in str(info.value)
    conf = tmp_path / "edge.toml"
    conf.write_text('[edge]\nlisten = ["127.0.0.1:0"]\n')

    def never(*_args: object) -> Service:
        raise AssertionError("the service must not be made")

    assert run_service("edge", str(conf), "edge", "edge-master", never) == EXIT_RUNTIME
    err = capsys.readouterr().err
    assert err.startswith("blindfold edge: Python ") and "_make_socket_transport" in err
