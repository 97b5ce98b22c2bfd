"""Schema of the `[edge]` section: listeners, routes, guards and timeouts."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from blindfold.config.common import check_hostport, check_ip_hostport, check_sni_pattern
from blindfold.config.schema import setting
from blindfold.errors import ConfigError


def _each(check: Callable[[str], str | None]) -> Callable[[tuple[str, ...]], str | None]:
    def run(values: tuple[str, ...]) -> str | None:
        for i, value in enumerate(values):
            problem = check(value)
            if problem:
                return f"[{i}]: {problem}"
        return None

    return run


def _nonempty(values: tuple[object, ...]) -> str | None:
    return None if values else "must not be empty"


def _check_cidrs(values: tuple[str, ...]) -> str | None:
    for i, value in enumerate(values):
        try:
            ipaddress.ip_network(value, strict=False)
        except ValueError:
            return f"[{i}]: {value!r} is not an IP address or CIDR such as '192.0.2.0/24'"
    return None


@dataclass(frozen=True, slots=True)
class RouteConfig:
    sni: tuple[str, ...] = setting(
        doc="Server names this route serves: exact names and '*.suffix' wildcards (any depth "
        "below the suffix). The most specific match wins: exact, then the longest suffix.",
        check=lambda v: _nonempty(v) or _each(check_sni_pattern)(v),
    )
    origins: tuple[str, ...] = setting(
        doc="Origin addresses 'host:port' (IPv6 as '[addr]:port'); the edge connects to one per "
        "visitor connection.",
        check=lambda v: _nonempty(v) or _each(check_hostport)(v),
    )
    name: str = setting("", doc="Name used in logs and metrics; defaults to 'route<N>'.")
    mode: Literal["passthrough"] = setting(
        "passthrough",
        doc="How much the edge sees. 'passthrough': TLS is forwarded at layer 4, the edge sees "
        "only addresses, SNI and the cleartext ClientHello.",
    )
    proxy_protocol: Literal["none", "v1", "v2"] = setting(
        "none",
        doc="PROXY protocol header sent to the origin before the ClientHello so it learns the "
        "visitor's address: 'none', 'v1' (text) or 'v2' (binary, HAProxy's proxy-protocol.txt).",
    )
    proxy_protocol_tlvs: bool = setting(
        True,
        doc="With v2, also send the SNI (PP2_TYPE_AUTHORITY) and the first ALPN protocol "
        "(PP2_TYPE_ALPN) as TLVs.",
    )
    balance: Literal["round_robin", "least_conn"] = setting(
        "round_robin",
        doc="How an origin is chosen: 'round_robin' or 'least_conn' (fewest open connections "
        "from this worker).",
    )
    default: bool = setting(
        False,
        doc="Serve connections whose SNI matches no route, or that send no SNI. At most one "
        "route may be the default; without one, such connections are refused.",
    )


@dataclass(frozen=True, slots=True)
class Ja4Rule:
    action: Literal["block", "rate_limit"] = setting(
        doc="'block' refuses matching connections; 'rate_limit' admits them at rate_per_s "
        "with burst."
    )
    ja4: str = setting("", doc="Exact JA4 fingerprint to match (FoxIO JA4, e.g. "
                       "'t13d1516h2_8daaf6152771_e5627efa2ab1').")
    prefix: str = setting("", doc="Match every fingerprint that starts with this text "
                          "(e.g. 't12' for TLS 1.2 clients, or a whole 'a' part).")
    name: str = setting("", doc="Name used in logs and metrics; defaults to 'ja4_rule<N>'.")
    rate_per_s: float = setting(1.0, doc="rate_limit: new connections per second admitted.",
                                min=0.001)
    burst: int = setting(5, doc="rate_limit: bucket size (connections admitted at once).", min=1)
    per: Literal["fingerprint", "ip"] = setting(
        "fingerprint",
        doc="rate_limit: one bucket for the fingerprint across all clients ('fingerprint') or one "
        "per fingerprint and client address ('ip').",
    )

    def __post_init__(self) -> None:
        if bool(self.ja4) == bool(self.prefix):
            raise ConfigError("ja4", "give exactly one of 'ja4' (exact) or 'prefix'")


@dataclass(frozen=True, slots=True)
class DecisionSourceConfig:
    url: str = setting("", doc="Decision stream to follow: blindfold's origin "
                       "('https://origin:8089') or a CrowdSec Local API; its "
                       "/v1/decisions/stream is polled.",
                       check=lambda v: None if not v or v.startswith(("https://", "http://"))
                       else "expected an https:// URL")
    api_key_file: str = setting("", doc="File holding this edge's API key (sent as X-Api-Key).")
    ca: str = setting("", doc="CA bundle that verifies the decision source's certificate; "
                      "empty: the system's CAs.")
    server_name: str = setting("", doc="Name expected in the source's certificate (default: "
                               "the URL's host).")
    poll_interval_s: float = setting(1.0, doc="How often the stream is polled.", min=0.1,
                                     max=300)
    timeout_s: float = setting(5.0, doc="Deadline for one poll.", min=0.1, max=60)
    close_grace_s: float = setting(
        1.0, doc="New connections from a newly banned address are refused at once; its open "
        "connections are closed after this grace (so the response that earned the ban, e.g. "
        "the WAF's 403 page, still reaches it).", min=0, max=60)
    redis_url: str = setting("", doc="Follow decisions through Redis instead of (or as well "
                             "as) the URL, and share per-address connection rates with the "
                             "other edges there; e.g. 'redis://127.0.0.1:6379/0'.")

    def __post_init__(self) -> None:
        if self.url and not self.api_key_file:
            raise ConfigError("api_key_file", "a decision stream URL needs this edge's API key")
        if self.url.startswith("http://") and not self.url.startswith("http://127."):
            raise ConfigError("url", "decisions travel over https (plain http only on loopback)")


@dataclass(frozen=True, slots=True)
class EdgeConfig:
    listen: tuple[str, ...] = setting(
        doc="Addresses the edge accepts visitors on, 'ip:port' ('[::]:443' for IPv6).",
        check=lambda v: _nonempty(v) or _each(check_ip_hostport)(v),
    )
    routes: tuple[RouteConfig, ...] = setting(doc="Routes, chosen by SNI.", check=_nonempty)
    admin_listen: str = setting(
        "127.0.0.1:9100",
        doc="Address of the admin listener serving /metrics (Prometheus text) and /healthz.",
        check=check_ip_hostport,
    )
    workers: int = setting(
        0,
        doc="Worker processes sharing the listeners (SO_REUSEPORT; a BPF program sends every "
        "connection from one client address to the same worker so per-address limits are exact). "
        "0 = number of CPUs.",
        min=0,
        max=256,
    )
    defer_accept: bool = setting(
        False, doc="TCP_DEFER_ACCEPT on the listeners: the kernel hands a connection over only "
        "once its first bytes arrive (idle connects never reach a worker). Saves a wake-up per "
        "connection but added ~80 µs to new-connection latency in bench/l4; off by default. "
        "Takes effect at start.")
    hello_timeout_s: float = setting(
        5.0, doc="Deadline for the whole ClientHello, from accept.", min=0.1, max=120)
    max_hello_bytes: int = setting(
        16384, doc="Most bytes read while waiting for a complete ClientHello (it may span several "
        "TLS records).", min=512, max=65536)
    connect_timeout_s: float = setting(
        3.0, doc="Deadline for connecting to one origin before the next is tried.", min=0.05,
        max=120)
    idle_timeout_s: float = setting(
        300.0, doc="A relayed connection with no bytes either way for this long is closed.",
        min=1, max=86400)
    drain_timeout_s: float = setting(
        30.0, doc="On SIGTERM, how long open connections may continue before they are closed.",
        min=0, max=3600)
    origin_down_s: float = setting(
        10.0, doc="How long an origin that refused or timed out is skipped.", min=0.1, max=3600)
    max_connections: int = setting(
        20000, doc="Global cap on open visitor connections for this edge (split evenly across "
        "workers). Applies to allowlisted addresses too.", min=1)
    per_ip_concurrent: int = setting(
        256, doc="Open connections allowed per client address (IPv6: per ipv6_prefix_len "
        "prefix).", min=1)
    per_ip_rate_per_s: float = setting(
        50.0, doc="New connections per second per client address (token bucket refill rate); "
        "0 disables the rate limit.", min=0.0)
    per_ip_burst: int = setting(
        100, doc="Token bucket size for new connections per client address.", min=1)
    ipv6_prefix_len: int = setting(
        64, doc="IPv6 clients are grouped by this prefix for per-address limits and steering.",
        min=32, max=128)
    max_tracked_ips: int = setting(
        200000, doc="Bound on the per-address state each worker keeps; idle entries are evicted "
        "first.", min=1000)
    blocklist_files: tuple[str, ...] = setting(
        (), doc="Files of IPv4/IPv6 addresses and CIDRs to refuse, one per line, '#' or ';' "
        "comments (the format of published drop lists). Reloaded when they change and on SIGHUP.")
    allowlist_files: tuple[str, ...] = setting(
        (), doc="Files in the same format; listed addresses bypass the blocklists, the per-address "
        "limits and the JA4 rules (not max_connections).")
    block: tuple[str, ...] = setting(
        (), doc="Inline addresses/CIDRs to refuse, added to the blocklist files.",
        check=_check_cidrs)
    allow: tuple[str, ...] = setting(
        (), doc="Inline addresses/CIDRs added to the allowlist.", check=_check_cidrs)
    list_check_interval_s: float = setting(
        2.0, doc="How often list files are checked for changes.", min=0.1, max=3600)
    ja4_rules: tuple[Ja4Rule, ...] = setting(
        (), doc="Fingerprint rules, first match wins.")
    decisions: DecisionSourceConfig | None = setting(
        None, doc="Bans made elsewhere (the origin agent, CrowdSec) that this edge enforces: "
        "new connections from a banned address are refused and its open ones closed.")
    pipe_size_bytes: int = setting(
        262144, doc="Kernel pipe capacity per direction used by splice (rounded by the kernel to "
        "pages). Non-root processes are limited by fs.pipe-user-pages-soft.", min=4096,
        max=1 << 20)
    log_path: str = setting(
        "", doc="Where JSON log lines go; empty = standard output.")
    log_connections: bool = setting(
        True, doc="Write one JSON line per finished connection.")
    log_refused_per_s: float = setting(
        200.0, doc="Most log lines per second per worker for refused connections (a flood must "
        "not fill the disk); the rest are counted in blindfold_log_lines_suppressed_total. "
        "0 = no limit.", min=0.0)
    relay: Literal["auto", "splice", "copy"] = setting(
        "auto", doc="How bytes are moved after the hello: 'splice' (Linux zero-copy through "
        "pipes), 'copy' (portable user-space buffers), 'auto' (splice where available).")

    def __post_init__(self) -> None:
        defaults = [i for i, r in enumerate(self.routes) if r.default]
        if len(defaults) > 1:
            raise ConfigError(f"routes[{defaults[1]}].default", "only one route may be the default")
        seen: dict[str, int] = {}
        for i, route in enumerate(self.routes):
            for pattern in route.sni:
                if pattern in seen:
                    raise ConfigError(
                        f"routes[{i}].sni",
                        f"{pattern!r} is already served by routes[{seen[pattern]}]",
                    )
                seen[pattern] = i
        names = [r.name for r in self.routes if r.name]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ConfigError("routes", f"route names must be unique: {sorted(dup)}")
        if self.admin_listen in self.listen and not self.admin_listen.endswith(":0"):
            raise ConfigError("admin_listen", "must differ from every listen address")

    def route_name(self, index: int) -> str:
        return self.routes[index].name or f"route{index}"
