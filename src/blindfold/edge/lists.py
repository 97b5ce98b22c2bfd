"""Block and allow lists from files plus inline entries, reloaded when a file changes.

A file that cannot be read keeps its previous contents (a list source going away must not
silently lift a block); at start-up it is a configuration error.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass

from blindfold.core.iplist import IPNetwork, IPSet, ListEntryError, parse_list
from blindfold.errors import ConfigError


@dataclass(slots=True)
class _File:
    path: str
    stamp: tuple[int, int, int] | None  # (mtime_ns, size, inode)
    networks: list[IPNetwork]
    errors: list[ListEntryError]


def _stamp(path: str) -> tuple[int, int, int]:
    st = os.stat(path)
    return st.st_mtime_ns, st.st_size, st.st_ino


def _read(path: str) -> tuple[list[IPNetwork], list[ListEntryError]]:
    with open(path, encoding="utf-8", errors="replace") as fh:
        return parse_list(fh.read())


class ListSet:
    """One named list (block or allow): files + inline entries -> IPSet."""

    def __init__(
        self,
        name: str,
        key: str,
        files: tuple[str, ...],
        inline: tuple[str, ...],
        previous: ListSet | None = None,
        *,
        strict: bool,
    ) -> None:
        self.name = name
        self.inline = [ipaddress.ip_network(v, strict=False) for v in inline]
        self.files: list[_File] = []
        old = {f.path: f for f in previous.files} if previous else {}
        for i, path in enumerate(files):
            try:
                stamp = _stamp(path)
                kept = old.get(path)
                if kept is not None and kept.stamp == stamp:
                    self.files.append(kept)
                    continue
                nets, errors = _read(path)
                self.files.append(_File(path, stamp, nets, errors))
            except OSError as exc:
                if strict:
                    raise ConfigError(
                        f"edge.{key}[{i}]", f"cannot read {path}: {exc.strerror}"
                    ) from None
                kept = old.get(path)
                self.files.append(kept or _File(path, None, [], []))
        self.ipset = self._build()

    def _build(self) -> IPSet:
        nets: list[IPNetwork] = list(self.inline)
        for f in self.files:
            nets.extend(f.networks)
        return IPSet(nets)

    @property
    def errors(self) -> list[tuple[str, ListEntryError]]:
        return [(f.path, e) for f in self.files for e in f.errors]

    def refresh(self) -> tuple[bool, list[str]]:
        """Re-read files whose stamp changed. Returns (changed, problems)."""
        changed = False
        problems = []
        for f in self.files:
            try:
                stamp = _stamp(f.path)
                if stamp == f.stamp:
                    continue
                f.networks, f.errors = _read(f.path)
                f.stamp = stamp
                changed = True
            except OSError as exc:
                problems.append(f"{f.path}: {exc.strerror}; keeping the previous contents")
        if changed:
            self.ipset = self._build()
        return changed, problems
