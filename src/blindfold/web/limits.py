"""Bounds for every HTTP connection: sizes, counts and deadlines."""

from __future__ import annotations

import itertools
import os
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class HttpLimits:
    max_header_bytes: int = 16384
    max_headers: int = 100
    max_body_bytes: int = 100 << 20
    header_timeout_s: float = 10.0  # the whole request head, once it started
    body_timeout_s: float = 30.0  # between two pieces of a request body
    keepalive_timeout_s: float = 60.0  # idle between requests
    send_timeout_s: float = 60.0  # a client that stops reading the response
    body_high_water: int = 256 << 10  # stop reading the client above this much buffered body
    # HTTP/2 (RFC 9113 §6.5.2 settings we advertise, and abuse thresholds)
    h2_max_concurrent_streams: int = 100
    h2_initial_window: int = 256 << 10
    h2_max_header_list_size: int = 16384
    h2_header_table_size: int = 4096
    h2_max_streams_per_connection: int = 10000
    h2_max_resets_per_window: int = 200  # client RST_STREAMs (CVE-2023-44487 "rapid reset")
    h2_max_control_frames_per_window: int = 500  # SETTINGS, PING, empty DATA, WINDOW_UPDATE...
    h2_abuse_window_s: float = 10.0


_counter = itertools.count(1)
_PREFIX = f"{os.getpid():x}{int(time.time()) & 0xFFFFFF:06x}"


def new_request_id() -> str:
    """Unique per process lifetime and across restarts: pid, start time, counter."""
    return f"{_PREFIX}-{next(_counter):x}"


_EDGE_ID = re.compile(rb"[A-Za-z0-9._-]{1,64}")


def request_id_for(headers: Iterable[tuple[bytes, bytes]], from_edge: bool) -> str:
    """The request's id: the edge's (its X-Request-Id, when the connection comes from an
    edge that speaks HTTP itself and the value is a plain token), else a new one of ours. One
    id then follows a request through the edge's, the origin's and the application's logs."""
    if from_edge:
        for name, value in headers:
            if name.lower() == b"x-request-id":
                if _EDGE_ID.fullmatch(value):
                    return value.decode("ascii")
                break
    return new_request_id()
