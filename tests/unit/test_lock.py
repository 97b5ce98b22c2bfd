"""requirements.lock (made by scripts/lock) must agree with pyproject.toml: every requirement of
the project, its test, dev and fuzz extras and its build backend is pinned there, with hashes, at a
version its range admits. A dependency added to pyproject without `scripts/lock` fails here."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
ENV = {
    "python_version": "3.11",
    "python_full_version": "3.11.7",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "platform_machine": "x86_64",
    "extra": "",
}


def _lock() -> dict[str, tuple[Version, str, int]]:
    """name -> (version, marker, number of hashes), from the lock's requirement blocks."""
    text = (ROOT / "requirements.lock").read_text()
    pins: dict[str, tuple[Version, str, int]] = {}
    for block in re.split(r"\n(?=[A-Za-z0-9])", text):
        head = block.split("\\", 1)[0].strip()
        if not head or head.startswith("#"):
            continue
        m = re.fullmatch(r"([A-Za-z0-9._-]+)==([^\s;]+)\s*(?:;\s*(.*))?", head)
        assert m, f"requirements.lock: not a pinned requirement: {head!r}"
        pins[canonicalize_name(m[1])] = (Version(m[2]), m[3] or "", block.count("--hash=sha256:"))
    return pins


def _wanted() -> list[Requirement]:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = meta["project"]
    reqs = [*project["dependencies"], *meta["build-system"]["requires"]]
    for extra in ("test", "dev", "fuzz"):
        reqs += project["optional-dependencies"][extra]
    return [Requirement(r) for r in reqs]


def test_every_requirement_is_pinned_in_range_with_hashes() -> None:
    pins = _lock()
    problems = []
    for req in _wanted():
        if req.marker is not None and not req.marker.evaluate(ENV):
            continue
        name = canonicalize_name(req.name)
        if name not in pins:
            problems.append(f"{req} is not in requirements.lock")
            continue
        version, _marker, hashes = pins[name]
        if not req.specifier.contains(version, prereleases=True):
            problems.append(f"requirements.lock pins {name}=={version}, outside {req}")
        if hashes == 0:
            problems.append(f"requirements.lock has no hash for {name}")
    assert not problems, "run scripts/lock:\n" + "\n".join(problems)


def test_every_pin_has_hashes_and_a_valid_marker() -> None:
    pins = _lock()
    assert len(pins) >= 10
    for name, (_version, marker, hashes) in pins.items():
        assert hashes >= 1, name
        if marker:
            Marker(marker)  # parses
