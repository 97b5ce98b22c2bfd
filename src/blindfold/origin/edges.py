"""Who the origin's trusted peers are, and what their PROXY claims may do. Sans-IO (`now`
passed in).

A trusted edge names the visitor of each connection in a PROXY header, and the origin bans
what that visitor's requests earn: a compromised edge (or someone on the path who rewrites a
header) could have any address banned at every edge. So:
- an edge configured with a key ([[origin.edges]] proxy_auth_key_file) must authenticate every
  header for the very connection it arrives on (core/proxyproto.py); missing, bad, stale and
  replayed headers are refused with their reason;
- each decision records the peer whose claim caused it (`Reporter`: the edge's name where
  known, and the address its connection came from);
- each peer may cause at most `per_edge_decisions` decisions per window (`DecisionBudget`).
"""

from __future__ import annotations

from dataclasses import dataclass

from blindfold.config.origin import OriginConfig
from blindfold.core.iplist import IPSet, parse_address, parse_list
from blindfold.core.proxyproto import (
    ProxyHeader,
    ReplayCache,
    load_auth_key,
    read_auth,
    verify_auth,
)
from blindfold.core.ratelimit import BucketMap
from blindfold.errors import ProtocolError

Endpoint = tuple[str, int]


@dataclass(frozen=True, slots=True)
class Reporter:
    """The trusted peer whose PROXY claim named a visitor: its [[origin.edges]] name ("" for
    an address only in trusted_edges) and the address its connection came from."""

    name: str
    address: str

    @property
    def key(self) -> str:
        """What budgets count by: the name, or the address of an unnamed edge."""
        return self.name or self.address


@dataclass(frozen=True, slots=True)
class _Edge:
    name: str
    addresses: IPSet
    key: bytes | None


class TrustedEdges:
    """trusted_edges and [[origin.edges]]: which addresses may send PROXY headers, their
    names, and the authentication they owe."""

    def __init__(self, cfg: OriginConfig, replay: ReplayCache | None = None) -> None:
        nets = parse_list("\n".join(cfg.trusted_edges))[0]
        self._edges: list[_Edge] = []
        for i, e in enumerate(cfg.edges):
            own = parse_list("\n".join(e.addresses))[0]
            nets += own
            key = (
                load_auth_key(e.proxy_auth_key_file, f"origin.edges[{i}].proxy_auth_key_file")
                if e.proxy_auth_key_file
                else None
            )
            self._edges.append(_Edge(e.name, IPSet(own), key))
        self.trusted = IPSet(nets)
        self.max_skew_s = cfg.proxy_auth_max_skew_s
        self.replay = replay if replay is not None else ReplayCache()

    def _matching(self, peer: str) -> list[_Edge]:
        version, addr = parse_address(peer)
        return [e for e in self._edges if e.addresses.contains(addr, version)]

    def is_trusted(self, peer: str) -> bool:
        version, addr = parse_address(peer)
        return self.trusted.contains(addr, version)

    def must_authenticate(self, peer: str) -> bool:
        """True when `peer` belongs to an edge with a key: its connections must start with an
        authenticated v2 header, never come without one."""
        return any(e.key is not None for e in self._matching(peer))

    def admit(self, header: ProxyHeader, peer: Endpoint, local: Endpoint, now: float) -> Reporter:
        """The reporter of a header from trusted `peer` (as the origin sees the connection:
        `peer` its remote end, `local` its own). Raises ProtocolError with reason
        proxy_auth_missing | proxy_auth_bad | proxy_auth_stale | proxy_auth_unknown_edge |
        proxy_auth_replayed when `peer` belongs to an edge with a key and the header does not
        prove to be that edge's, for this connection, now."""
        matching = self._matching(peer[0])
        keyed = [e for e in matching if e.key is not None]
        if not keyed:
            return Reporter(matching[0].name if matching else "", peer[0])
        claim = read_auth(header)
        if claim is None:
            raise ProtocolError("proxy_auth_missing", "no authentication TLV", status=400)
        # the claimed name picks the key among the keyed edges of this address (one, unless
        # several edges share it behind a NAT); an edge's key never vouches from elsewhere
        edge = next((e for e in keyed if e.name == claim.name), None)
        if edge is None or edge.key is None:
            raise ProtocolError(
                "proxy_auth_unknown_edge", f"{claim.name!r} is not an edge of {peer[0]}", status=400
            )
        claim = verify_auth(header, edge.key, (peer, local), now, self.max_skew_s)
        if not self.replay.first_time(claim.mac, claim.timestamp + self.max_skew_s, now):
            raise ProtocolError(
                "proxy_auth_replayed", f"a header of {claim.name!r} seen before", status=400
            )
        return Reporter(claim.name, peer[0])


class DecisionBudget:
    """How many decisions the claims of one reporter may cause per window: a token bucket
    per reporter (`per_edge_decisions` tokens, refilled over the window)."""

    def __init__(self, per_window: int, window_s: float, max_reporters: int = 10_000) -> None:
        self._buckets = BucketMap(per_window / window_s, per_window, max_reporters)

    def allow(self, reporter: Reporter, now: float) -> bool:
        return self._buckets.take(reporter.key, now) == 0.0
