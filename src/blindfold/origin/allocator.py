"""The memory allocator of origin workers (`[origin] worker_allocator`).

ModSecurity + CRS allocate and free tens of thousands of small C++ strings per inspected
request: with the C library's malloc, malloc/free are about a quarter of a worker's user-space
instructions. A worker started with mimalloc preloaded runs the same rules on the same requests
with ~22% fewer instructions per request (callgrind, bench/origin/NOTES.md); nothing the engine
decides changes. The master starts each worker with LD_PRELOAD naming the allocator; the worker
says in its `ready` message which allocator it runs on (`loaded`).
"""

from __future__ import annotations

import os
import sysconfig
from collections.abc import Mapping, Sequence
from pathlib import Path

from blindfold.errors import ConfigError

# what "auto" looks for, in this order (Debian: libmimalloc2.0)
AUTO_NAMES = ("libmimalloc.so.2",)
# allocators recognised in a worker's memory map (`loaded`)
KNOWN = {"libmimalloc": "mimalloc", "libjemalloc": "jemalloc", "libtcmalloc": "tcmalloc"}


def library_dirs() -> list[str]:
    arch = sysconfig.get_config_var("MULTIARCH") or ""
    dirs = [f"/usr/lib/{arch}", f"/lib/{arch}"] if arch else []
    return [*dirs, "/usr/local/lib", "/usr/lib", "/lib"]


def resolve(setting: str, dirs: Sequence[str] | None = None) -> str | None:
    """The library a worker preloads for `setting` ('auto', 'system' or a path), or None for
    the C library's malloc. 'auto' without mimalloc installed is the C library's."""
    if setting == "system":
        return None
    if setting == "auto":
        for d in library_dirs() if dirs is None else dirs:
            for name in AUTO_NAMES:
                path = Path(d) / name
                if path.is_file():
                    return str(path)
        return None
    if not Path(setting).is_file():
        raise ConfigError("origin.worker_allocator", f"{setting}: no such file")
    return setting


def worker_env(
    setting: str, env: Mapping[str, str], dirs: Sequence[str] | None = None
) -> dict[str, str]:
    """The environment of a worker: `env` with the allocator preloaded. An LD_PRELOAD already
    set by the operator is kept: 'auto' then adds nothing, a path is put before it."""
    out = dict(env)
    lib = resolve(setting, dirs)
    if lib is None:
        return out
    current = out.get("LD_PRELOAD", "")
    if current and setting == "auto":
        return out
    out["LD_PRELOAD"] = f"{lib}:{current}" if current else lib
    return out


def loaded(maps: str = "/proc/self/maps") -> str:
    """Which known allocator this process runs on ('system' when none is mapped)."""
    try:
        text = Path(maps).read_text()
    except OSError:
        return "unknown"
    for line in text.splitlines():
        name = os.path.basename(line.rpartition(" ")[2])
        for prefix, label in KNOWN.items():
            if name.startswith(prefix):
                return label
    return "system"
