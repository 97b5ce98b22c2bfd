"""Turn parsed TOML into frozen dataclasses, rejecting unknown keys and wrong types.

A schema is a frozen dataclass whose fields carry their documentation and bounds in
`field(metadata=...)` (see `setting`). `build(cls, table, path)` checks every key and names the
offending one (as a dotted path such as ``edge.routes[1].mode``) in the `ConfigError` it raises.
We keep this small loader rather than a validation framework because the contract is narrow
(TOML types only, frozen dataclasses, exact key paths in errors) and it keeps the install small.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, Literal, TypeVar

from blindfold.config.common import duration_seconds
from blindfold.errors import ConfigError

T = TypeVar("T")

_MISSING = dataclasses.MISSING


def setting(
    default: Any = _MISSING,
    *,
    doc: str,
    min: float | None = None,
    max: float | None = None,
    check: Callable[[Any], str | None] | None = None,
    default_factory: Callable[[], Any] | None = None,
) -> Any:
    """A documented config field. `check(value)` returns an error message or None."""
    meta = {"doc": doc, "min": min, "max": max, "check": check}
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    if default is _MISSING:
        return dataclasses.field(metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        inner = typing.get_args(tp)[0]
        return f"a list of {_plural(_describe(inner))}"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp) if a is not type(None))
    if dataclasses.is_dataclass(tp):
        return "a table"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _plural(described: str) -> str:
    """'a string' -> 'strings', 'an integer' -> 'integers', "'a' | 'b'" -> "'a' | 'b'"."""
    for article in ("a ", "an "):
        if described.startswith(article) and " " not in described[len(article) :]:
            return described[len(article) :] + "s"
    return described


def _is_seconds(tp: Any, value: Any, path: str) -> bool:
    """A duration key (named `..._s`, a number of seconds) given as text with units."""
    return tp in (int, float) and isinstance(value, str) and path.endswith("_s")


def _seconds(tp: Any, value: str, path: str) -> Any:
    """'30s', '4h', '1h30m', '250ms' -> seconds (an int key takes whole seconds only)."""
    try:
        seconds = duration_seconds(value)
    except ValueError:
        raise ConfigError(
            path,
            f"expected seconds (a number, or a duration such as '30s', '4h', '1h30m'), "
            f"got {value!r}",
        ) from None
    if tp is int:
        if seconds != int(seconds):
            raise ConfigError(path, f"expected whole seconds, got {value!r} ({seconds} s)")
        return int(seconds)
    return seconds


def _convert(tp: Any, value: Any, path: str) -> Any:
    if _is_seconds(tp, value, path):
        return _seconds(tp, value, path)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None and len(args) != len(typing.get_args(tp)):
            return None
        if len(args) == 1:  # Optional[X]: X's own error is the useful one
            return _convert(args[0], value, path)
        for arg in args:
            try:
                return _convert(arg, value, path)
            except ConfigError:
                continue
        raise ConfigError(path, f"expected {_describe(tp)}, got {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed or type(value) is not type(allowed[0]):
            raise ConfigError(path, f"expected one of {_describe(tp)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise ConfigError(path, f"expected {_describe(tp)}, got {value!r}")
        inner = typing.get_args(tp)[0]
        return tuple(_convert(inner, v, f"{path}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(path, f"expected a table, got {value!r}")
        return build(typing.cast(type[Any], tp), value, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(path, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(path, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(path, f"expected a number, got {value!r}")
        if not math.isfinite(value):  # TOML has nan and inf; NaN would disable every check
            raise ConfigError(path, f"expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(path, f"expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported schema type {tp!r} at {path}")  # a bug in our schema


def build(cls: type[T], table: Mapping[str, Any], path: str = "") -> T:
    """Build dataclass `cls` from `table`; every error names the key's dotted path."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for key in table:
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=3, cutoff=0.6)
            if close:
                hint = " or ".join(repr(c) for c in close)
                raise ConfigError(_join(path, key), f"unknown key; did you mean {hint}?")
            known = ", ".join(sorted(fields))
            raise ConfigError(_join(path, key), f"unknown key; allowed here: {known}")
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        key_path = _join(path, name)
        if name not in table:
            if f.default is _MISSING and f.default_factory is _MISSING:
                raise ConfigError(key_path, f"required; expected {_describe(hints[name])}")
            continue
        value = _convert(hints[name], table[name], key_path)
        meta = f.metadata
        lo, hi = meta.get("min"), meta.get("max")
        if lo is not None and value < lo:
            raise ConfigError(key_path, f"must be >= {lo}, got {value!r}")
        if hi is not None and value > hi:
            raise ConfigError(key_path, f"must be <= {hi}, got {value!r}")
        check = meta.get("check")
        if check is not None:
            problem = check(value)
            if problem:
                # list checks report the element as "[i]: message"
                if problem.startswith("[") and "]: " in problem:
                    index, _, problem = problem.partition(": ")
                    key_path += index
                raise ConfigError(key_path, problem)
        kwargs[name] = value
    try:
        obj = cls(**kwargs)
    except ConfigError as exc:
        # __post_init__ cross-field checks report keys relative to this table
        raise ConfigError(_join(path, exc.key), exc.message) from None
    return obj


def _join(path: str, key: str) -> str:
    if not key:
        return path
    if not path:
        return key
    return f"{path}.{key}"


REQUIRED = object()  # iter_documented's default for keys without one


def iter_documented(cls: type[Any], path: str = "") -> list[tuple[str, str, str, Any]]:
    """(dotted key, type description, doc, default) for every field, nested tables included.
    Used by the docs test that keeps docs/config.md complete."""
    out: list[tuple[str, str, str, Any]] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = _join(path, f.name)
        tp = hints[f.name]
        if f.default is not _MISSING:
            default: Any = f.default
        elif f.default_factory is not _MISSING:
            default = f.default_factory()
        else:
            default = REQUIRED
        out.append((key, _describe(tp), f.metadata.get("doc", ""), default))
        inner = tp
        if typing.get_origin(tp) in (list, tuple):
            inner = typing.get_args(tp)[0]
        if dataclasses.is_dataclass(inner):
            out.extend(iter_documented(typing.cast(type[Any], inner), key))
        elif typing.get_origin(tp) in (typing.Union, types.UnionType):
            for arg in typing.get_args(tp):
                if dataclasses.is_dataclass(arg):
                    out.extend(iter_documented(typing.cast(type[Any], arg), key))
    return out


def changes(old: Any, new: Any, path: str = "") -> list[str]:
    """What a reload changes, for its log line: the dotted keys whose values differ, a list
    of named tables (routes, edges, keys) as `key[name]` added (+), removed (-) or changed."""
    if not (dataclasses.is_dataclass(old) and type(old) is type(new)):
        return [] if old == new else [path or "(all)"]
    out: list[str] = []
    for f in dataclasses.fields(old):
        a, b = getattr(old, f.name), getattr(new, f.name)
        if a == b:
            continue
        key = _join(path, f.name)
        named = isinstance(a, tuple) and isinstance(b, tuple)
        named = named and all(getattr(x, "name", "") for x in (*a, *b))
        if named:
            before = {x.name: x for x in a}
            after = {x.name: x for x in b}
            out += [f"+{key}[{n}]" for n in after if n not in before]
            out += [f"-{key}[{n}]" for n in before if n not in after]
            out += [f"{key}[{n}]" for n in after if n in before and before[n] != after[n]]
        elif dataclasses.is_dataclass(a) and type(a) is type(b):
            out += changes(a, b, key)
        else:
            out.append(key)
    return out
