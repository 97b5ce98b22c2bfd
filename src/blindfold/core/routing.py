"""Choose a route by TLS server name: exact names first, then '*.suffix' wildcards with the
longest suffix winning, then the default route (if any)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Generic, TypeVar

T = TypeVar("T")


class SniRouter(Generic[T]):
    __slots__ = ("_default", "_exact", "_wild")

    def __init__(self, entries: Iterable[tuple[str, T]], default: T | None = None) -> None:
        self._exact: dict[str, T] = {}
        self._wild: dict[str, T] = {}
        for pattern, target in entries:
            if pattern.startswith("*."):
                self._wild[pattern[2:]] = target
            else:
                self._exact[pattern] = target
        self._default = default

    def lookup(self, sni: str | None) -> T | None:
        """`sni` must already be lower case without a trailing dot (the ClientHello parser
        normalises it)."""
        if sni is None:
            return self._default
        hit = self._exact.get(sni)
        if hit is not None:
            return hit
        if self._wild:
            dot = sni.find(".")
            while dot >= 0:
                hit = self._wild.get(sni[dot + 1 :])
                if hit is not None:
                    return hit
                dot = sni.find(".", dot + 1)
        return self._default
