"""Passthrough routes: TLS is forwarded at layer 4. The edge sees addresses, the SNI and the
cleartext ClientHello; admission forwards the hello bytes unchanged (after a PROXY header when
the route sends one) and the connection relays both ways (`edge.connection`)."""

from __future__ import annotations

from blindfold.edge.mode import Mode


class PassthroughMode(Mode):
    name = "passthrough"  # the defaults: no state, every connection forwarded
