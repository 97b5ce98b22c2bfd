"""The README's walkthrough ("## Your first site, step by step"), run as written.

Every ```sh block of that section, in order, becomes one bash script (`set -euo pipefail`:
the first failing command fails the test). The only changes, as the README says: each example
port (PORTS) becomes a free one, and /tmp/shop becomes a temporary directory. The commands run
for real: `blindfold pki`, the three daemons, Python's http.server as the application, curl,
openssl, `blindfold seal`, `fetch`, `verify`, `audit verify`. Every process the script starts
is in one process group, ended at the end. The test prints how long the walkthrough took."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT

SECTION = "## Your first site, step by step"
PORTS = (8080, 9443, 8089, 7744, 8443, 7743, 7443, 7745)  # the README's example ports
BASE = "/tmp/shop"
TIMEOUT_S = 240


def walkthrough_script(readme: str) -> str:
    start = readme.index(SECTION)
    end = readme.find("\n## ", start + len(SECTION))
    section = readme[start : end if end >= 0 else len(readme)]
    blocks = re.findall(r"^```sh\n(.*?)^```$", section, re.S | re.M)
    assert len(blocks) >= 6, "the walkthrough's sh blocks are missing"
    return "\n".join(blocks)


def free_ports(n: int) -> list[int]:
    socks = [socket.create_server(("127.0.0.1", 0)) for _ in range(n)]
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def substitute(script: str, base: Path) -> str:
    for example, free in zip(PORTS, free_ports(len(PORTS)), strict=True):
        script = re.sub(rf"(?<![0-9]){example}(?![0-9])", str(free), script)
    return script.replace(BASE, str(base))


def test_the_readme_walkthrough_runs_as_written(tmp_path: Path) -> None:
    for tool in ("curl", "openssl", "bash"):
        if subprocess.run(["which", tool], capture_output=True).returncode:
            pytest.skip(f"{tool} is not installed (scripts/bootstrap installs it)")
    script = substitute(walkthrough_script((ROOT / "README.md").read_text()), tmp_path / "shop")
    (tmp_path / "walkthrough.sh").write_text(script)
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(ROOT / "src")  # this tree's blindfold, whatever the venv holds
    started = time.monotonic()
    proc = subprocess.Popen(
        ["bash", "-c", "set -euo pipefail\n" + script],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # the daemons it starts share this group: ended below
    )
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"the walkthrough did not finish in {TIMEOUT_S} s:\n{out}\n{_logs(tmp_path)}")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # anything a failed step left running
    took = time.monotonic() - started
    print(f"\nREADME walkthrough: {took:.1f} s end to end")
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{out}\n{_logs(tmp_path)}"
    for expected in (
        "<h1>shop.example</h1>",  # through the origin, then the edge, then keyless
        "403",  # the WAF
        "refused: 127.0.0.2 is banned",  # the ban at the edge
        "the edge's blob decrypts to the original",
        ": in edge.log and origin.log",  # one request id across hops
    ):
        assert expected in out, f"{expected!r} not in the output:\n{out}"
    assert out.count("<h1>shop.example</h1>") >= 3
    assert "BROKEN" not in out and "FAIL" not in out, out
    shop = tmp_path / "shop"
    for name in ("pki/ca.key", "pki/site.key", "pki/www.key", "edges/edge1.key"):
        assert (shop / name).stat().st_mode & 0o777 == 0o600, name
    for name in ("keys/edge1.api-key", "keys/api-keys.txt", "keys/audit.key", "pki/cdn.key"):
        assert (shop / name).stat().st_mode & 0o777 == 0o600, name
    for name in ("keys/manifest.pem", "keys/id-secret"):  # made by blindfold seal --create-keys
        assert (shop / name).stat().st_mode & 0o777 == 0o600, name
    for log, last in (("edge", "edge_stopped"), ("origin", "origin_stopped")):
        lines = (shop / f"{log}.log").read_text().splitlines()
        assert lines and f'"event":"{last}"' in lines[-1], lines[-3:]
        assert "Traceback" not in "\n".join(lines)
    assert '"event":"keyserver_stopped"' in (shop / "keyserver.log").read_text()


def _logs(tmp_path: Path) -> str:
    out = []
    for log in sorted((tmp_path / "shop").glob("*.log")):
        out.append(f"--- {log.name}\n" + "\n".join(log.read_text().splitlines()[-15:]))
    return "\n".join(out)
