"""Where the manifest may be served: only where the edge cannot read it.

The manifest holds the content keys, so it goes to visitors over TLS that ends at the origin
(a passthrough route), never over TLS the edge ends (a keyless route, whose HTTP the edge
reads). The origin serves it only to requests naming one of `[origin.blind] site_names`, and
these checks refuse a configuration in which the edge would end TLS for such a name: a
keyless route the edge would choose for it, or a key server that would sign its handshakes.
They see what one file shows (docs/blind.md says what they cannot see)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from blindfold.core.routing import SniRouter
from blindfold.errors import ConfigError

if TYPE_CHECKING:
    from blindfold.config import Config
    from blindfold.config.edge import RouteConfig

_WHY = (
    "the edge ends TLS there and would read the blind manifest (the content keys); "
    "serve that name through a passthrough route"
)


def covers(pattern: str, name: str) -> bool:
    """An SNI pattern (exact, or '*.suffix': any depth below the suffix) covers `name`."""
    if pattern.startswith("*."):
        return name.endswith(pattern[1:]) and len(name) > len(pattern) - 1
    return pattern == name


def route_for(routes: tuple[RouteConfig, ...], name: str) -> int | None:
    """The index of the route the edge chooses for `name` (as the edge's router does: exact,
    longest wildcard, then the default route)."""
    default = next((i for i, r in enumerate(routes) if r.default), None)
    router = SniRouter(((p, i) for i, r in enumerate(routes) for p in r.sni), default)
    return router.lookup(name)


def _keyless_for(routes: tuple[RouteConfig, ...], name: str) -> str | None:
    """The dotted key (under edge.) that makes the edge end TLS for `name`, if any."""
    i = route_for(routes, name)
    if i is None or routes[i].mode != "keyless":
        return None
    if any(covers(p, name) for p in routes[i].sni):
        return f"routes[{i}].sni"
    return f"routes[{i}].default"


def check_edge(routes: tuple[RouteConfig, ...]) -> None:
    """An edge config alone: no keyless route for the site names of its blind routes."""
    for i, rc in enumerate(routes):
        if rc.mode != "blind":
            continue
        names = rc.blind.site_names if rc.blind is not None and rc.blind.site_names else ()
        where = f"edge.routes[{i}].blind.site_names"
        if not names:
            names, where = (rc.origin_server_name,), f"edge.routes[{i}].origin_server_name"
        for name in names:
            key = _keyless_for(routes, name)
            if key is not None:
                raise ConfigError(key, f"takes {name!r}, which serves the site ({where}): {_WHY}")


def check_deployment(config: Config) -> None:
    """What one file holding several sections shows: the origin's site names against the
    edge's keyless routes and against the names the key server signs for."""
    origin = config.origin
    if origin is None or origin.blind is None:
        return
    names = origin.blind.site_names
    if config.edge is not None:
        for name in names:
            key = _keyless_for(config.edge.routes, name)
            if key is not None:
                raise ConfigError(
                    f"edge.{key}",
                    f"takes {name!r}, which serves the site (origin.blind.site_names): {_WHY}",
                )
    if config.keyserver is not None:
        for k, edge in enumerate(config.keyserver.edges):
            for name in names:
                if any(covers(p, name) for p in edge.hostnames):
                    raise ConfigError(
                        f"keyserver.edges[{k}].hostnames",
                        f"lets edge {edge.name!r} end TLS for {name!r}, which serves the site "
                        f"(origin.blind.site_names): the edge would read the blind manifest "
                        "(the content keys); sign only for names served through keyless routes",
                    )
