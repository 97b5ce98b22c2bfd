"""Configuration: one TOML file describes a deployment; each process reads its own section."""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blindfold.config.edge import EdgeConfig
from blindfold.config.keyserver import KeyServerConfig
from blindfold.config.origin import OriginConfig
from blindfold.config.schema import build, setting
from blindfold.errors import ConfigError

__all__ = ["Config", "ConfigError", "EdgeConfig", "OriginConfig", "load_file", "loads"]


@dataclass(frozen=True, slots=True)
class Config:
    edge: EdgeConfig | None = setting(  # setting() returns a dataclasses.field
        None, doc="The edge process (`blindfold edge`)."
    )
    origin: OriginConfig | None = setting(
        None, doc="The origin agent (`blindfold origin`) beside the site's application."
    )
    keyserver: KeyServerConfig | None = setting(
        None,
        doc="The key server (`blindfold keyserver`): the site's private keys, signing "
        "TLS 1.3 handshakes for authorised edges.",
    )

    def __post_init__(self) -> None:
        if self.edge is not None and self.origin is not None:
            edge_len, origin_len = self.edge.ipv6_prefix_len, self.origin.decisions.ipv6_prefix_len
            if edge_len != origin_len:
                raise ConfigError(
                    "origin.decisions.ipv6_prefix_len",
                    f"is {origin_len} but edge.ipv6_prefix_len is {edge_len}: bans must cover "
                    "the prefix the edge's limits count as one client",
                )


def loads(text: str, source: str = "<config>") -> Config:
    """Parse and validate TOML text. Raises ConfigError naming the key."""
    try:
        data: dict[str, Any] = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("", f"{source}: not valid TOML: {exc}") from None
    except RecursionError:  # tomllib parses nested arrays and tables recursively
        raise ConfigError("", f"{source}: not valid TOML: nested too deeply") from None
    try:
        return build(Config, data)
    except ConfigError as exc:
        where = _named(data, exc.key)
        if where and not exc.where:
            raise ConfigError(exc.key, exc.message, where) from None
        raise


_INDEXED = re.compile(r"([A-Za-z0-9_.]+)\[(\d+)\]")


def _named(data: dict[str, Any], key: str) -> str:
    """'(route "www")' for a key under edge.routes[i] whose table has a name (likewise
    keyserver.edges[i], origin.edges[i]...): the name people know the table by."""
    found = ""
    node: Any = data
    at = 0
    for m in _INDEXED.finditer(key):
        for part in key[at : m.start(1)].strip(".").split(".") + m.group(1).split("."):
            if part:
                node = node.get(part) if isinstance(node, dict) else None
        index = int(m.group(2))
        node = node[index] if isinstance(node, list) and index < len(node) else None
        at = m.end()
        name = node.get("name") if isinstance(node, dict) else None
        if isinstance(name, str) and name:
            kind = m.group(1).rpartition(".")[2].removesuffix("s")
            found = f"({kind} {json.dumps(name)[:80]})"
    return found


def load_file(path: str | Path) -> tuple[Config, str]:
    """Read, parse and validate a config file; returns the config and its text."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("", f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError("", f"{path} is not UTF-8 text") from None
    return loads(text, str(path)), text
