"""Which of the site's keys each edge may sign with, worked out when the configuration is loaded
(start, SIGHUP, `blindfold check-config`) so that a request costs one dictionary lookup.

An edge may have a handshake signed with a key only if it is authorised for every name that
key's certificate covers: once the handshake completes, a browser sends requests for any of
those names over the same connection (HTTP/2 connection reuse, RFC 9113 §9.1.1), and the edge
would read them without the key server ever seeing their names. An edge whose hostnames cover a
certificate only partly gets nothing signed with it; the key server says so at start and at
reload, and check-config warns."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from blindfold.config.keyserver import EdgeAccessConfig, KeyServerConfig
from blindfold.core.keyless_handshake import names_overlap, uncovered_names
from blindfold.keyserver.signer import SiteKey, load_key


def too_broad(patterns: Sequence[str], keys: Sequence[SiteKey]) -> dict[bytes, tuple[str, ...]]:
    """Certificate SHA-256 -> the names it covers that `patterns` do not authorise, for every
    key that an edge with these hostnames may not sign with."""
    out = {}
    for key in keys:
        extra = uncovered_names(key.names, patterns)
        if extra:
            out[key.cert_sha256] = extra
    return out


@dataclass(frozen=True, slots=True)
class PartialGrant:
    """An edge authorised for some of a certificate's names but not all: it gets nothing
    signed with that key."""

    edge_index: int
    edge: str
    key_index: int
    key: str
    unauthorised: tuple[str, ...]

    def text(self) -> str:
        return (
            f"keyserver.edges[{self.edge_index}] ({self.edge}) is authorised for some names of "
            f"keyserver.keys[{self.key_index}] ({self.key})'s certificate but not for "
            f"{', '.join(self.unauthorised)}: the key server signs nothing with that key for "
            "this edge (a browser may send those names' requests over a connection opened for "
            "another; RFC 9113 §9.1.1). Give the edge's names a certificate of their own, or "
            "authorise the edge for all of the certificate's names"
        )


def partial_grants(
    edges: Sequence[EdgeAccessConfig], keys: Sequence[SiteKey]
) -> list[PartialGrant]:
    out = []
    for i, edge in enumerate(edges):
        for j, key in enumerate(keys):
            extra = uncovered_names(key.names, edge.hostnames)
            if extra and names_overlap(key.names, edge.hostnames):
                out.append(PartialGrant(i, edge.name, j, key.name, extra))
    return out


def check_keys(cfg: KeyServerConfig) -> list[str]:
    """For check-config: load every key as the key server would (ConfigError naming the key),
    and return a warning per edge whose hostnames cover a certificate only partly."""
    keys = [load_key(i, k) for i, k in enumerate(cfg.keys)]
    return [g.text() for g in partial_grants(cfg.edges, keys)]
