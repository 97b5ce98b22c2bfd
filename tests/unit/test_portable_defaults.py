"""No default in the project names a path that exists on one machine only (a developer's
checkout, a local mirror): such inputs come from an option or from a registry."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# a workplace checkout or mirror, a home directory, a user's scratch tree
LOCAL = re.compile(r"/work/|\.mirror/|/home/[a-z_][\w-]*/|/root/|/Users/\w+/")


def test_no_machine_specific_paths() -> None:
    files = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=30
    ).stdout.split(b"\0")
    hits = []
    for rel in filter(None, files):
        name = rel.decode()
        if name == "requirements.lock" or name.startswith("fuzz/corpus/"):
            continue
        path = ROOT / name
        if not path.is_file():
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        for n, line in enumerate(text.splitlines(), 1):
            if LOCAL.search(line) and "LOCAL = re.compile" not in line:
                hits.append(f"{name}:{n}: {line.strip()}")
    assert not hits, "machine-specific paths:\n" + "\n".join(hits)
