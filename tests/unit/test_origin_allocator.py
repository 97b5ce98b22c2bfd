"""origin/allocator.py: which allocator a worker preloads for `[origin] worker_allocator`."""

from __future__ import annotations

from pathlib import Path

import pytest

from blindfold.config import loads
from blindfold.errors import ConfigError
from blindfold.origin import allocator


def _lib(tmp_path: Path, name: str = "libmimalloc.so.2") -> Path:
    path = tmp_path / name
    path.write_bytes(b"\x7fELF")
    return path


def test_auto_finds_mimalloc_in_the_library_dirs(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    lib = _lib(tmp_path)
    assert allocator.resolve("auto", [str(empty), str(tmp_path)]) == str(lib)
    assert allocator.resolve("auto", [str(empty)]) is None  # not installed: the C library's
    assert allocator.resolve("system", [str(tmp_path)]) is None


def test_an_explicit_path_must_exist(tmp_path: Path) -> None:
    lib = _lib(tmp_path, "libjemalloc.so.2")
    assert allocator.resolve(str(lib)) == str(lib)
    with pytest.raises(ConfigError) as err:
        allocator.resolve(str(tmp_path / "nope.so"))
    assert err.value.key == "origin.worker_allocator"


def test_worker_env_keeps_the_operators_preload(tmp_path: Path) -> None:
    lib = _lib(tmp_path)
    dirs = [str(tmp_path)]
    assert allocator.worker_env("auto", {"A": "1"}, dirs) == {"A": "1", "LD_PRELOAD": str(lib)}
    assert allocator.worker_env("system", {"A": "1"}, dirs) == {"A": "1"}
    # the operator preloads something already: auto adds nothing, a path goes first
    assert allocator.worker_env("auto", {"LD_PRELOAD": "/x.so"}, dirs) == {"LD_PRELOAD": "/x.so"}
    assert allocator.worker_env(str(lib), {"LD_PRELOAD": "/x.so"}, dirs) == {
        "LD_PRELOAD": f"{lib}:/x.so"
    }
    assert allocator.worker_env("auto", {}, [str(tmp_path / "none")]) == {}


def test_loaded_reads_the_memory_map(tmp_path: Path) -> None:
    maps = tmp_path / "maps"
    maps.write_text(
        "7f00-7f01 r-xp 00000000 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n"
        "7f02-7f03 r-xp 00000000 08:01 2 /usr/lib/x86_64-linux-gnu/libmimalloc.so.2.0\n"
    )
    assert allocator.loaded(str(maps)) == "mimalloc"
    maps.write_text("7f00-7f01 r-xp 00000000 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n")
    assert allocator.loaded(str(maps)) == "system"
    assert allocator.loaded(str(tmp_path / "missing")) == "unknown"
    assert allocator.loaded() in ("system", "mimalloc", "jemalloc", "tcmalloc")


def test_config_key_is_checked() -> None:
    base = (
        '[origin]\nupstream = "http://127.0.0.1:1"\nlisten = []\n'
        'http_listen = ["127.0.0.1:8080"]\nproxy_protocol = "off"\n'
    )
    for value in ("auto", "system", "/usr/lib/libjemalloc.so.2"):
        cfg = loads(base + f'worker_allocator = "{value}"\n')
        assert cfg.origin is not None and cfg.origin.worker_allocator == value
    with pytest.raises(ConfigError) as err:
        loads(base + 'worker_allocator = "jemalloc"\n')
    assert "worker_allocator" in err.value.key
