"""Install it anywhere: `python -m build` makes an sdist and a wheel (the wheel built from the
sdist, as a distribution would), and the wheel installed in an empty virtualenv outside the
repository gives a `blindfold` whose every command works, static files included.

Nothing unpinned is fetched: the build runs with `--no-isolation` on the locked setuptools and
wheel of the test's own environment, and the empty venv installs exactly the wheel's runtime
dependencies as pinned, with their hashes, in requirements.lock (`--require-hashes`).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.helpers.demo import CHECKS, run_demo_self_check

ROOT = Path(__file__).resolve().parents[2]
COMMANDS = (
    "edge",
    "origin",
    "keyserver",
    "audit",
    "pki",
    "seal",
    "fetch",
    "verify",
    "check-config",
    "demo",
)

SDIST_FILES = (
    "src/blindfold/blind/static/sw.js",
    "requirements.lock",
    "deploy/systemd/blindfold-edge.service",
    "docs/deploy.md",
    "tests/unit/test_lock.py",
)

pytestmark = pytest.mark.slow


def _run(argv: list[str | Path], cwd: Path, env: dict[str, str], timeout: float = 300) -> str:
    out = subprocess.run(
        [str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert out.returncode == 0, f"{argv}: exit {out.returncode}\n{out.stdout}\n{out.stderr}"
    return out.stdout


def _runtime_closure(requires: list[str]) -> set[str]:
    """The distributions `requires` pulls in (no extras), from the metadata of this
    environment, where the locked versions are installed."""
    env = {"extra": ""}
    seen: set[str] = set()
    todo = [Requirement(r) for r in requires]
    while todo:
        req = todo.pop()
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        name = canonicalize_name(req.name)
        if name in seen:
            continue
        seen.add(name)
        todo += [Requirement(r) for r in metadata.distribution(name).requires or []]
    return seen


def _locked(names: set[str]) -> str:
    """The blocks of requirements.lock (pin, marker, hashes) for exactly these names."""
    blocks = re.split(r"\n(?=[A-Za-z0-9])", (ROOT / "requirements.lock").read_text())
    out = {}
    for block in blocks:
        head = block.split("\\", 1)[0].strip()
        m = re.match(r"([A-Za-z0-9._-]+)==", head)
        if m and canonicalize_name(m[1]) in names:
            out[canonicalize_name(m[1])] = block.strip()
    missing = names - set(out)
    assert not missing, f"not in requirements.lock: {missing} (run scripts/lock)"
    return "\n".join(out[n] for n in sorted(out)) + "\n"


def test_wheel_installs_and_works_outside_the_repository(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    # the sources as git has them (no build/, no .venv, no egg-info left by an editable install)
    src = tmp_path / "src"
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout.split(b"\0")
    for rel in filter(None, files):
        path = ROOT / rel.decode()
        if path.is_file():
            (src / rel.decode()).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, src / rel.decode())
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", dist, src], src, env)
    (sdist,) = dist.glob("blindfold-*.tar.gz")
    (wheel,) = dist.glob("blindfold-*.whl")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for needed in SDIST_FILES:
        assert needed in names, f"the sdist lacks {needed}"
    with zipfile.ZipFile(wheel) as whl:
        inside = set(whl.namelist())
        meta = next(n for n in inside if n.endswith(".dist-info/METADATA"))
        requires = [
            line.split(":", 1)[1].strip()
            for line in whl.read(meta).decode().splitlines()
            if line.startswith("Requires-Dist:")
        ]
    assert {"blindfold/blind/static/sw.js", "blindfold/py.typed"} <= inside

    # an empty venv, somewhere else, with the locked runtime dependencies and the wheel only
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", venv], tmp_path, env)
    py = venv / "bin" / "python"
    lock = tmp_path / "runtime.lock"
    lock.write_text(_locked(_runtime_closure(requires)))
    pip: list[str | Path] = [py, "-m", "pip", "install", "-q", "--no-deps"]
    _run([*pip, "--require-hashes", "-r", lock], tmp_path, env, timeout=600)
    _run([*pip, wheel], tmp_path, env)
    _run([py, "-m", "pip", "check"], tmp_path, env)

    away = tmp_path / "elsewhere"
    away.mkdir()
    where = _run([py, "-c", "import blindfold; print(blindfold.__file__)"], away, env)
    assert where.startswith(str(venv)), where
    sw = _run(
        [
            py,
            "-c",
            "from importlib import resources; print(len(resources.files('blindfold.blind')"
            ".joinpath('static/sw.js').read_text()))",
        ],
        away,
        env,
    )
    assert int(sw) > 1000
    blindfold = venv / "bin" / "blindfold"
    for command in COMMANDS:
        assert "usage: blindfold" in _run([blindfold, command, "--help"], away, env)
    # the file-making commands, for real
    _run([blindfold, "pki", "ca", away / "pki"], away, env)
    _run([blindfold, "pki", "edge", "edge1", away / "pki"], away, env)
    (away / "site").mkdir()
    (away / "site" / "app.js").write_text("console.log('hello')\n")
    _run(
        [
            blindfold,
            "seal",
            "--signing-key",
            away / "m.pem",
            "--id-secret",
            away / "id",
            "--create-keys",
            away / "site",
            away / "sealed",
        ],
        away,
        env,
    )
    assert (away / "sealed" / "manifest.json").is_file()
    (away / "edge.toml").write_text(
        '[edge]\nlisten = ["127.0.0.1:0"]\n\n[[edge.routes]]\nsni = ["example.test"]\n'
        'origins = ["127.0.0.1:9"]\n'
    )
    _run([blindfold, "check-config", away / "edge.toml"], away, env)
    # and the whole topology: edge, origin agent (WAF, sealed store, service worker), key
    # server, fetch and verify, all from the installed package
    demo = run_demo_self_check([str(blindfold)], cwd=away, env=env, timeout_s=180)
    assert demo.returncode == 0, demo.stdout + demo.stderr
    for check in CHECKS:
        assert f"self-check: {check}: OK" in demo.stdout
