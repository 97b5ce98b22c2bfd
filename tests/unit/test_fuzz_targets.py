"""The fuzz targets (fuzz/targets.py) on their seed corpora and on every input the fuzzer has
recorded as a crash: each must parse or raise the error its parser documents. The crashes the
fuzzer found also have their own tests, next to the parser's (they name the documented error)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fuzz import targets

FUZZ = Path(__file__).resolve().parents[2] / "fuzz"


def _inputs(kind: str) -> list[tuple[str, Path]]:
    return [
        (name, path)
        for name in targets.TARGETS
        for path in sorted((FUZZ / kind / name).glob("*"))
        if path.is_file()
    ]


def test_every_target_has_seeds() -> None:
    for name in targets.TARGETS:
        assert len(list((FUZZ / "corpus" / name).glob("*"))) >= 2, name


@pytest.mark.parametrize(("name", "path"), _inputs("corpus"), ids=lambda v: str(v)[-24:])
def test_seed(name: str, path: Path) -> None:
    targets.check(name, path.read_bytes())


@pytest.mark.parametrize(("name", "path"), _inputs("crashes"), ids=lambda v: str(v)[-24:])
def test_recorded_crash(name: str, path: Path) -> None:
    targets.check(name, path.read_bytes())
