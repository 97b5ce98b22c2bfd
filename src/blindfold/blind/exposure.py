"""Where the manifest may be served: only where the edge cannot read it.

The manifest holds the content keys, so it goes to visitors over TLS that ends at the origin
(a passthrough route), never over TLS the edge ends (a keyless route, whose HTTP the edge
reads). The origin serves it only to requests naming one of `[origin.blind] site_names`, and
these checks refuse a configuration in which the edge would end TLS for such a name: a
keyless route the edge would choose for it, or a key server that would sign its handshakes.
An `[edge]` section alone is checked when it is loaded (`config.edge`); what only a file with
several sections shows is checked here. They see what one file shows (docs/blind.md says what
they cannot see)."""

from __future__ import annotations

from blindfold.config import Config
from blindfold.config.common import covers
from blindfold.config.edge import MANIFEST_EXPOSED, keyless_route_for
from blindfold.errors import ConfigError


def check_deployment(config: Config) -> None:
    """What one file holding several sections shows: the origin's site names against the
    edge's keyless routes and against the names the key server signs for."""
    origin = config.origin
    if origin is None or origin.blind is None:
        return
    names = origin.blind.site_names
    if config.edge is not None:
        for name in names:
            key = keyless_route_for(config.edge.routes, name)
            if key is not None:
                raise ConfigError(
                    f"edge.{key}",
                    f"takes {name!r}, which serves the site (origin.blind.site_names): "
                    + MANIFEST_EXPOSED,
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
