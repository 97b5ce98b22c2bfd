from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.edgeproc import EdgeProcess
from tests.helpers.origin import TlsOrigin


@pytest.fixture
def marker() -> str:
    """A random plaintext secret the origin puts in every response."""
    return "PLAINTEXT-" + secrets.token_hex(12)


@pytest.fixture
def origin(site: dict[str, Path], marker: str) -> Iterator[TlsOrigin]:
    o = TlsOrigin(site["cert"], site["key"], name="A", marker=marker)
    yield o
    o.close()


@pytest.fixture
def pp_origin(site: dict[str, Path], marker: str) -> Iterator[TlsOrigin]:
    """An origin that requires a PROXY header."""
    o = TlsOrigin(site["cert"], site["key"], name="PP", proxy=True, marker=marker)
    yield o
    o.close()


@pytest.fixture
def start_edge(tmp_path: Path) -> Iterator[Callable[..., EdgeProcess]]:
    """Start edges as real processes; at teardown stop them and fail on any traceback."""
    started: list[EdgeProcess] = []

    def start(config_text: str, **kw: Any) -> EdgeProcess:
        edge = EdgeProcess(config_text, tmp_path, name=f"edge{len(started)}", **kw)
        started.append(edge)
        return edge

    yield start
    problems = []
    for edge in started:
        edge.stop()
        if edge.tracebacks():
            problems.append("".join(edge.stderr_lines))
    assert not problems, "edge wrote tracebacks:\n" + "\n".join(problems)


@pytest.fixture
def app() -> Iterator[Any]:
    from blindfold.demo.app import DemoApp

    a = DemoApp()
    a.seen.clear()
    yield a
    a.close()


@pytest.fixture
def start_origin(tmp_path: Path) -> Iterator[Callable[..., Any]]:
    from tests.helpers.edgeproc import OriginProcess

    started: list[OriginProcess] = []

    def start(config_text: str) -> OriginProcess:
        o = OriginProcess(config_text, tmp_path, name=f"origin{len(started)}")
        started.append(o)
        return o

    yield start
    problems = []
    for o in started:
        o.stop()
        if o.tracebacks():
            problems.append("".join(o.stderr_lines))
    assert not problems, "origin wrote tracebacks:\n" + "\n".join(problems)
