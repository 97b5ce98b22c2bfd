"""The HTTP server settings, one table for every place blindfold serves HTTP: the origin agent
(`[origin.http]`) and the edge's keyless and blind routes (`[edge.routes.http]`). Each adds
the settings of its own upstream; `limits()` is the one mapping to the HTTP layer's bounds."""

from __future__ import annotations

from dataclasses import dataclass

from blindfold.config.schema import setting
from blindfold.web.limits import HttpLimits


@dataclass(frozen=True, slots=True)
class HttpServerConfig:
    max_header_bytes: int = setting(
        16384,
        doc="Largest request head (HTTP/1.1) or header list (HTTP/2); larger gets 431 (HTTP/2: "
        "or a connection error beyond what HPACK admits).",
        min=1024,
        max=1 << 20,
    )
    max_headers: int = setting(100, doc="Most header fields in a request.", min=8, max=10000)
    max_body_bytes: int = setting(100 << 20, doc="Largest request body; larger gets 413.", min=0)
    header_timeout_s: float = setting(10.0, doc="Deadline for a whole request head.", min=0.1)
    body_timeout_s: float = setting(
        30.0, doc="Longest pause inside a request body (slow uploads get 408).", min=0.1
    )
    keepalive_timeout_s: float = setting(
        60.0, doc="Idle time before a client connection is closed.", min=0.1
    )
    send_timeout_s: float = setting(
        60.0,
        doc="A client that reads nothing of its response for this long is disconnected.",
        min=0.1,
    )
    tls_handshake_timeout_s: float = setting(
        10.0,
        doc="Deadline for the TLS handshake (at a keyless edge route, the key server's "
        "signature included).",
        min=0.1,
    )
    h2_max_concurrent_streams: int = setting(
        100, doc="HTTP/2 streams a client may have open.", min=1, max=1000
    )
    h2_max_resets_per_window: int = setting(
        200, doc="Client stream resets tolerated per 10 s (rapid reset defence).", min=1
    )
    h2_max_control_frames_per_window: int = setting(
        500,
        doc="SETTINGS/PING/WINDOW_UPDATE/PRIORITY/empty DATA frames tolerated per 10 s.",
        min=10,
    )

    def limits(self, *, max_body_bytes: int | None = None) -> HttpLimits:
        """The bounds the HTTP layer (web.http1, web.http2) enforces for these settings;
        `max_body_bytes` replaces the configured one (a blind route takes no request body)."""
        return HttpLimits(
            max_header_bytes=self.max_header_bytes,
            max_headers=self.max_headers,
            max_body_bytes=self.max_body_bytes if max_body_bytes is None else max_body_bytes,
            header_timeout_s=self.header_timeout_s,
            body_timeout_s=self.body_timeout_s,
            keepalive_timeout_s=self.keepalive_timeout_s,
            send_timeout_s=self.send_timeout_s,
            h2_max_concurrent_streams=self.h2_max_concurrent_streams,
            h2_max_header_list_size=self.max_header_bytes,
            h2_max_resets_per_window=self.h2_max_resets_per_window,
            h2_max_control_frames_per_window=self.h2_max_control_frames_per_window,
        )
