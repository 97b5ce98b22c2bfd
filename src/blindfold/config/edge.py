"""Schema of the `[edge]` section: listeners, routes, guards and timeouts."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal
from urllib.parse import unquote, urlsplit

from blindfold.config.acme import AcmeConfig
from blindfold.config.common import (
    ADMIN_TOKEN_DOC,
    admin_exposure,
    check_hostport,
    check_ip_hostport,
    check_redis_url,
    check_sni_pattern,
    covers,
)
from blindfold.config.http import HttpServerConfig
from blindfold.config.schema import setting
from blindfold.core.routing import SniRouter
from blindfold.errors import ConfigError
from blindfold.web.target import check_rule_prefix


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


def _rate_name(value: str) -> str | None:
    """An edge's name in counter keys and ACL key patterns: no ':' (the key separator) and
    no glob character."""
    ok = 0 < len(value) <= 64 and all(c.isascii() and (c.isalnum() or c in "._-") for c in value)
    return None if ok else f"{value!r}: 1-64 ASCII letters, digits, '.', '_' or '-'"


def _hex_fingerprints(values: tuple[str, ...]) -> str | None:
    for i, v in enumerate(values):
        h = v.replace(":", "").lower()
        if len(h) != 64 or any(c not in "0123456789abcdef" for c in h):
            return f"[{i}]: expected a SHA-256 fingerprint, 64 hex digits (colons allowed)"
    return None


@dataclass(frozen=True, slots=True)
class KeyServerRef:
    addresses: tuple[str, ...] = setting(
        doc="Key servers 'host:port', tried in order; the next one takes over when one fails.",
        check=lambda v: _nonempty(v) or _each(check_hostport)(v),
    )
    client_cert: str = setting(
        doc="This edge's client certificate (PEM), issued by the site's "
        "edge CA (`blindfold pki edge NAME DIR`)."
    )
    client_key: str = setting(
        doc="Its private key (this key is the edge's own identity, not the site's)."
    )
    ca: str = setting(doc="CA that verifies the key server's certificate.")
    server_name: str = setting(
        "", doc="Name expected in the key server's certificate (default: the address's host)."
    )
    sign_timeout_s: float = setting(
        1.0,
        doc="Deadline for one signature, failover included. A key server that misses it is "
        "treated as down for 2 s; when every key server is down new handshakes fail (or fall "
        "back, see keyserver_down) at once.",
        min=0.01,
        max=30,
    )
    connect_timeout_s: float = setting(
        1.0, doc="Deadline for connecting to one key server.", min=0.01, max=30
    )
    chain_refresh_s: float = setting(
        2.0,
        doc="How often the edge asks the key server for the current certificate chain of each "
        "keyless route (over the same mutual-TLS connection). A different chain is checked "
        "(it parses, each certificate is signed by the next, the leaf is valid now and covers "
        "every name in the route's `sni`) and then used for new handshakes; open connections "
        "keep theirs. The route's `certificate` file is the chain used until then (and after "
        "a restart). After a refusal or a failure the next request waits at least 30 s. "
        "Checked at each worker's housekeeping tick (every second). Keep it well below the "
        "key server's previous_certificate_grace_s (60 s), the time it still signs for the "
        "chain it replaced. 0: never ask (renew the file on the edge yourself).",
        min=0,
        max=3600,
    )


@dataclass(frozen=True, slots=True)
class PathRateLimit:
    rate_per_s: float = setting(
        doc="Requests per second admitted (token bucket refill).", min=0.001
    )
    burst: int = setting(doc="Bucket size.", min=1)
    path_prefix: str = setting(
        "/",
        doc="Requests whose canonical path is this path or below it are counted (whole "
        "segments: '/login' covers '/login/x', not '/loginX'; see 'Paths and path rules').",
        check=check_rule_prefix,
    )
    per: Literal["ip", "route"] = setting(
        "ip",
        doc="One bucket per client address ('ip'; IPv6 by ipv6_prefix_len) or one for the "
        "whole route ('route').",
    )
    name: str = setting("", doc="Name in logs and metrics (default: rate_limit<N>).")


@dataclass(frozen=True, slots=True)
class BlindRouteConfig:
    site_names: tuple[str, ...] = setting(
        (),
        doc="The hostnames of the site whose blobs this route serves, where its pages and "
        "manifest are (default: origin_server_name). The edge refuses to start with a "
        "keyless route that would take one of them (it would read the manifest).",
        check=lambda v: (
            _each(check_sni_pattern)(v)
            or next((f"{n!r}: an exact name" for n in v if "*" in n), None)
        ),
    )
    manifest_public_key: str = setting(
        "",
        doc="The site's manifest public key (PEM, `manifest-public.pem` of `blindfold "
        "seal`; required): the edge checks the signed blob index with it, and every blob "
        "it pulls or serves from its cache against that index (a copy that does not match "
        "is dropped). The public half only: the edge never holds a content key.",
    )
    origin_index_path: str = setting(
        "/.blindfold/blob-index.json",
        doc="URL path of the signed blob index on the origin agent ([origin.blind] "
        "blob_index_path).",
        check=lambda v: None if v.startswith("/") else "must start with /",
    )
    origin_blobs_path: str = setting(
        "/.blindfold/blobs/",
        doc="URL prefix of the sealed blobs on the origin agent ([origin.blind] blobs_path).",
        check=lambda v: (
            None if v.startswith("/") and v.endswith("/") else "must start and end with /"
        ),
    )
    origin_public_path: str = setting(
        "/.blindfold/public/",
        doc="URL prefix of the plaintext "
        "SRI copies on the origin agent ([origin.blind] "
        "public_path), served here at /p/<name>.",
        check=lambda v: (
            None if v.startswith("/") and v.endswith("/") else "must start and end with /"
        ),
    )
    memory_cache_bytes: int = setting(
        256 << 20, doc="Memory for cached blobs per worker (LRU).", min=0
    )
    memory_max_object_bytes: int = setting(
        8 << 20, doc="Largest blob kept in memory (bigger ones are served from disk).", min=0
    )
    cache_dir: str = setting(
        "",
        doc="Directory for the disk cache (each worker uses a "
        "subdirectory 'w<N>'); empty: memory only.",
    )
    disk_cache_bytes: int = setting(
        4 << 30,
        doc="Disk space for cached blobs per worker (LRU). Without cache_dir: the most the "
        "temporary files of blobs too big for memory take at once, per route and worker (a "
        "quarter of it per visitor address).",
        min=0,
    )
    max_blob_bytes: int = setting(
        1 << 30, doc="Largest blob pulled from the origin; a bigger one is refused (502).", min=1
    )
    allow_origins: tuple[str, ...] = setting(
        ("*",),
        doc="Access-Control-Allow-Origin for "
        "the pages' service workers ('*': any; blobs are "
        "sealed, so reading them gains nothing).",
    )


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
    mode: Literal["passthrough", "keyless", "blind"] = setting(
        "passthrough",
        doc="How much the edge sees. 'passthrough': TLS is forwarded at layer 4, the edge sees "
        "only addresses, SNI and the cleartext ClientHello. 'keyless': the edge terminates "
        "TLS 1.3 with `certificate`, each handshake signed by the site's key server; it sees "
        "HTTP and proxies it to the origins over verified TLS. 'blind': a CDN hostname of its "
        "own (`certificate` + `key`) serving sealed blobs (`blindfold seal`) by id, pulled "
        "from the origins over verified TLS and cached; it never sees a key or a manifest. "
        "The site hostname of a blind deployment (origin.blind.site_names: its pages and "
        "manifest, which holds the content keys) must stay passthrough, never keyless; a "
        "keyless or blind route's certificate must cover all its `sni` names (check-config).",
    )
    certificate: str = setting(
        "",
        doc="keyless: the site's certificate chain (PEM, leaf "
        "first). No private key: the key server signs. blind: the "
        "CDN hostname's certificate chain.",
    )
    key: str = setting(
        "",
        doc="blind: the private key of `certificate` (the CDN hostname's own; never the site's).",
    )
    blind: BlindRouteConfig | None = setting(None, doc="blind: the blob cache and origin pulls.")
    keyserver: KeyServerRef | None = setting(None, doc="keyless: where handshakes are signed.")
    keyserver_down: Literal["fail", "passthrough"] = setting(
        "fail",
        doc="keyless: when no key server signs in time, 'fail' the new handshake "
        "(internal_error alert) or forward the connection as 'passthrough' to the origins "
        "(nothing has been sent to the visitor yet, so the origin completes the handshake).",
    )
    origin_ca: str = setting(
        "",
        doc="keyless, blind: CA bundle that verifies the origins' "
        "certificates. The edge never talks plaintext or unverified TLS "
        "to an origin: give this or origin_pin_sha256.",
    )
    origin_pin_sha256: tuple[str, ...] = setting(
        (),
        doc="keyless, blind: accept an origin only if its leaf certificate has one of these "
        "SHA-256 fingerprints (checked in addition to origin_ca when both are given).",
        check=_hex_fingerprints,
    )
    origin_server_name: str = setting(
        "",
        doc="keyless, blind: name checked in the origin's "
        "certificate and sent as SNI (default: the visitor's "
        "SNI; blind routes must set it: their SNI is the CDN "
        "name).",
    )
    session_ticket_lifetime_s: float = setting(
        7200.0,
        doc="keyless: lifetime of TLS 1.3 session tickets (resumption without asking "
        "the key server; never 0-RTT). Tickets are kept by the edge worker, single use. "
        "0 = no tickets.",
        min=0,
        max=604800,
    )
    max_sessions: int = setting(
        100000,
        doc="keyless: most resumable sessions kept per worker (oldest dropped first).",
        min=1,
    )
    rate_limits: tuple[PathRateLimit, ...] = setting(
        (),
        doc="keyless: HTTP request rate limits by path prefix; a request over any matching "
        "limit gets 429 with Retry-After.",
    )
    cache_max_bytes: int = setting(
        64 << 20,
        doc="keyless: memory for cached responses per worker (RFC 9111: only what "
        "Cache-Control/Expires make cacheable by a shared cache; Vary and validators honoured). "
        "Each entry is charged what its objects really take, headers included (a small "
        "response costs ~2 KiB). 0 = no cache.",
        min=0,
    )
    cache_max_object_bytes: int = setting(
        8 << 20, doc="keyless: largest response body cached.", min=0
    )
    cache_stale_while_revalidate: bool = setting(
        True,
        doc="keyless: honour a response's `stale-while-revalidate=N` (RFC 5861 §3): within N "
        "seconds past its lifetime, serve the stored copy at once and revalidate it with the "
        "origin in the background (one refresh per URL, at most 64 at once per worker). Never "
        "where must-revalidate, "
        "proxy-revalidate, s-maxage or no-cache forbid stale responses (RFC 9111 §4.2.4).",
    )
    cache_stale_if_error: bool = setting(
        True,
        doc="keyless: honour a response's `stale-if-error=N` (RFC 5861 §4): when the origin "
        "cannot be reached or answers 500/502/503/504, a copy at most N seconds past its "
        "lifetime answers instead. A request's `stale-if-error` may only shorten that window, "
        "never open one the response did not grant. Same exceptions as above.",
    )
    cache_max_stale: bool = setting(
        False,
        doc="keyless: honour a request's `max-stale[=N]` (RFC 9111 §5.2.1.2: a cache MAY): serve "
        "a copy up to N seconds past its lifetime without asking the origin. Off by default: "
        "any visitor could then read a stale copy the origin meant to revalidate on every use. "
        "Even when on, never a response stored with a zero lifetime (max-age=0, an Expires in "
        "the past) or stored from a request with Cookie or Authorization. Same exceptions as "
        "above.",
    )
    cache_stale_max_s: float = setting(
        86400.0,
        doc="keyless: the most any of the three above serves a copy past its lifetime, "
        "whatever the response or request asks (max-stale without a value: this).",
        min=0,
        max=2**31,
    )
    http: EdgeHttpConfig | None = setting(
        None,
        doc="keyless, blind: HTTP limits and deadlines for visitors (the settings of "
        "origin.http, one table), and the route's connections to its origins.",
    )
    proxy_protocol: Literal["none", "v1", "v2"] = setting(
        "v2",
        doc="PROXY protocol header sent to the origin before the ClientHello so it learns the "
        "visitor's address: 'v2' (binary, HAProxy's proxy-protocol.txt; the default, what the "
        "origin agent requires by default and the only one that can carry proxy_auth), 'v1' "
        "(text) or 'none' (for an origin that reads no PROXY header).",
    )
    proxy_protocol_tlvs: bool = setting(
        True,
        doc="With v2, also send the SNI (PP2_TYPE_AUTHORITY) and the first ALPN protocol "
        "(PP2_TYPE_ALPN) as TLVs.",
    )
    proxy_auth_name: str = setting(
        "",
        doc="With v2 and proxy_auth_key_file: this edge's name at the origins "
        "([[origin.edges]] name), sent in the authentication TLV.",
        check=lambda v: _rate_name(v) if v else None,
    )
    proxy_auth_key_file: str = setting(
        "",
        doc="With v2: file holding the key (hex, `openssl rand -hex 32`) shared with the "
        "origins' [[origin.edges]] entry for this edge; every PROXY header (LOCAL ones "
        "included) then carries an HMAC over itself, this connection's addresses and ports, "
        "and the time (docs/decisions.md), so that nobody on the path can change it.",
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
    quic: bool = setting(
        False,
        doc="passthrough: also take QUIC (HTTP/3) on UDP at every listen address's port. The "
        "edge reads only the Initial packets' ClientHello (public keys, RFC 9001 §5.2), "
        "applies the same routing, lists, bans, limits and JA4 rules, and forwards the flow "
        "to `quic_origins`, announcing the visitor with edge.quic.announce_key_file "
        "(docs/quic.md). Needs [edge.quic].",
    )
    quic_origins: tuple[str, ...] = setting(
        (),
        doc="With quic: the origins' QUIC listeners 'host:port' ([origin.quic] listen); "
        "empty = the same addresses as `origins`, over UDP.",
        check=_each(check_hostport),
    )

    def __post_init__(self) -> None:
        if self.mode != "passthrough" and (self.quic or self.quic_origins):
            raise ConfigError(
                "quic", f"only for mode = 'passthrough' (this route is {self.mode!r})"
            )
        if self.quic_origins and not self.quic:
            raise ConfigError("quic_origins", "only with quic = true")
        if bool(self.proxy_auth_name) != bool(self.proxy_auth_key_file):
            raise ConfigError(
                "proxy_auth_key_file" if self.proxy_auth_name else "proxy_auth_name",
                "authenticated PROXY headers need both proxy_auth_name and proxy_auth_key_file",
            )
        if self.proxy_auth_key_file and self.proxy_protocol != "v2":
            raise ConfigError(
                "proxy_protocol", "authenticated PROXY headers need proxy_protocol = 'v2'"
            )
        if self.mode == "keyless":
            if not self.certificate:
                raise ConfigError(
                    "certificate", "a keyless route needs the site's certificate chain (no key)"
                )
            if self.keyserver is None:
                raise ConfigError(
                    "keyserver",
                    "a keyless route needs its key servers: "
                    "keyserver = { addresses = [...], client_cert, client_key, ca }",
                )
            if not self.origin_ca and not self.origin_pin_sha256:
                raise ConfigError(
                    "origin_ca",
                    "a keyless route talks to its origins over "
                    "verified TLS only: give origin_ca or origin_pin_sha256",
                )
        if self.mode == "blind":
            if not self.certificate or not self.key:
                raise ConfigError(
                    "certificate",
                    "a blind route needs its own certificate "
                    "and key (the CDN hostname's, not the site's)",
                )
            if not self.origin_ca and not self.origin_pin_sha256:
                raise ConfigError(
                    "origin_ca",
                    "a blind route pulls blobs over verified TLS "
                    "only: give origin_ca or origin_pin_sha256",
                )
            if not self.origin_server_name:
                raise ConfigError(
                    "origin_server_name",
                    "a blind route must name its origin (the visitors' SNI is the CDN hostname)",
                )
            if self.blind is None or not self.blind.manifest_public_key:
                raise ConfigError(
                    "blind.manifest_public_key",
                    "a blind route checks what it caches against the site's signed blob "
                    "index: give the site's manifest public key (manifest-public.pem)",
                )
        if self.mode == "passthrough":
            for key in ("certificate", "origin_ca", "origin_server_name"):
                if getattr(self, key):
                    raise ConfigError(
                        key, f"only for mode = 'keyless' or 'blind' (this route is {self.mode!r})"
                    )
        if self.mode != "blind":
            for key in ("key", "blind"):
                if getattr(self, key):
                    raise ConfigError(key, f"only for mode = 'blind' (this route is {self.mode!r})")
        if self.mode != "keyless":
            if self.keyserver is not None:
                raise ConfigError("keyserver", "only for mode = 'keyless'")
            if self.rate_limits:
                raise ConfigError(
                    "rate_limits",
                    "HTTP rate limits need mode = 'keyless' (a "
                    "passthrough edge cannot see requests)",
                )


@dataclass(frozen=True, slots=True)
class EdgeHttpConfig(HttpServerConfig):
    """The HTTP server settings (config.http), and the route's origins as the upstream."""

    upstream_connect_timeout_s: float = setting(
        5.0, doc="Deadline to connect to an origin (TCP and TLS).", min=0.05
    )
    upstream_timeout_s: float = setting(
        60.0, doc="Longest wait for the origin to send or accept bytes.", min=0.1
    )
    upstream_connections: int = setting(
        8,
        doc="Idle origin connections kept open for reuse: keyless, per visitor connection "
        "(at most upstream_connections_per_client_conn; each carries the visitor's address in "
        "a PROXY header when proxy_protocol is set); blind, per route and worker.",
        min=1,
        max=256,
    )
    upstream_connections_per_client_conn: int = setting(
        8,
        doc="keyless: most origin connections one visitor connection holds at once (in use, "
        "idle or opening). Its other requests (HTTP/2 streams) wait for one of them, first "
        "come first served, at most upstream_queue_timeout_s. blind: most origin pulls in "
        "flight one visitor connection started (joining another's pull is free).",
        min=1,
        max=256,
    )
    upstream_connections_per_ip: int = setting(
        32,
        doc="keyless: most origin connections the visitor connections of one client address "
        "(IPv6: per ipv6_prefix_len prefix) hold at once, per route and worker (one address's "
        "connections all reach the same worker). Requests beyond it wait likewise; idle "
        "connections of that address are closed to make room. blind: most origin pulls in "
        "flight one client address started, per route and worker.",
        min=1,
        max=65536,
    )
    upstream_queue_timeout_s: float = setting(
        10.0,
        doc="keyless (blind: for a pull slot): longest a request waits for an origin "
        "connection under those caps; "
        "then it gets 503 with Retry-After. The wait is bounded in number too: one per "
        "request a visitor connection may have open (h2_max_concurrent_streams).",
        min=0.01,
        max=300,
    )


@dataclass(frozen=True, slots=True)
class Ja4Rule:
    action: Literal["block", "rate_limit"] = setting(
        doc="'block' refuses matching connections; 'rate_limit' admits them at rate_per_s "
        "with burst."
    )
    ja4: str = setting(
        "",
        doc="Exact JA4 fingerprint to match (FoxIO JA4, e.g. "
        "'t13d1516h2_8daaf6152771_e5627efa2ab1').",
    )
    prefix: str = setting(
        "",
        doc="Match every fingerprint that starts with this text "
        "(e.g. 't12' for TLS 1.2 clients, or a whole 'a' part).",
    )
    name: str = setting("", doc="Name used in logs and metrics; defaults to 'ja4_rule<N>'.")
    rate_per_s: float = setting(
        1.0, doc="rate_limit: new connections per second admitted.", min=0.001
    )
    burst: int = setting(5, doc="rate_limit: bucket size (connections admitted at once).", min=1)
    per: Literal["fingerprint", "ip"] = setting(
        "fingerprint",
        doc="rate_limit: one bucket for the fingerprint across all clients ('fingerprint') or one "
        "per fingerprint and client address ('ip').",
    )

    def __post_init__(self) -> None:
        if bool(self.ja4) == bool(self.prefix):
            raise ConfigError("ja4", "give exactly one of 'ja4' (exact) or 'prefix'")


def _decisions_url(url: str) -> str | None:
    """https://host[:port][/path], or plain http to a loopback address literal; never
    userinfo (`http://127.0.0.1@evil:8089` is the host `evil`), query or fragment."""
    if not url:
        return None
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises ValueError for a bad port)
    except ValueError as exc:
        return f"{url!r} is not a URL ({exc})"
    if parts.scheme not in ("https", "http"):
        return f"{url!r}: expected an https:// URL"
    if "@" in parts.netloc:
        return f"{url!r}: no user name or password in the URL (the API key is in api_key_file)"
    if not parts.hostname:
        return f"{url!r}: no host"
    if parts.query or parts.fragment or "?" in url or "#" in url:
        return f"{url!r}: no query or fragment"
    if parts.scheme == "http":
        try:
            loopback = ipaddress.ip_address(parts.hostname).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            return (
                f"{url!r}: decisions travel over https (plain http only to a loopback address "
                "such as 127.0.0.1: the API key would cross the network in clear)"
            )
    return None


@dataclass(frozen=True, slots=True)
class DecisionSourceConfig:
    url: str = setting(
        "",
        doc="Decision stream to follow: blindfold's origin "
        "('https://origin:8089') or a CrowdSec Local API; its "
        "/v1/decisions/stream is polled. Plain http only to a loopback address.",
        check=_decisions_url,
    )
    api_key_file: str = setting("", doc="File holding this edge's API key (sent as X-Api-Key).")
    ca: str = setting(
        "",
        doc="CA bundle that verifies the decision source's certificate; empty: the system's CAs.",
    )
    server_name: str = setting(
        "", doc="Name expected in the source's certificate (default: the URL's host)."
    )
    poll_interval_s: float = setting(1.0, doc="How often the stream is polled.", min=0.1, max=300)
    timeout_s: float = setting(5.0, doc="Deadline for one poll.", min=0.1, max=60)
    close_grace_s: float = setting(
        1.0,
        doc="New connections from a newly banned address are refused at once; its open "
        "connections are closed after this grace (so the response that earned the ban, e.g. "
        "the WAF's 403 page, still reaches it).",
        min=0,
        max=60,
    )
    redis_url: str = setting(
        "",
        doc="Follow decisions through Redis instead of (or as well "
        "as) the URL, and share per-address connection rates with the "
        "other edges there: 'rediss://user:password@host:6380/0' (TLS); plain "
        "'redis://' only to a loopback address. Give each edge its own Redis user "
        "(docs/decisions.md has an ACL).",
        check=check_redis_url,
    )
    redis_ca: str = setting(
        "", doc="CA bundle that verifies a rediss:// server's certificate; empty: the system's CAs."
    )
    signer_public_keys: tuple[str, ...] = setting(
        (),
        doc="Ed25519 public keys (PEM files) of the origins whose decisions on Redis are "
        "believed: a decision there without a valid signature by one of them is dropped and "
        "counted. Required with redis_url.",
    )
    rate_redis_url: str = setting(
        "",
        doc="Redis for the shared per-address counters, if not redis_url's: every edge writes "
        "there, so a Redis of their own keeps a compromised edge from filling the one that "
        "holds the decisions (docs/decisions.md). Same forms as redis_url; redis_ca applies.",
        check=check_redis_url,
    )
    rate_name: str = setting(
        "",
        doc="This edge's name in its counter keys (blindfold:rate:<name>:...), which only it "
        "writes (the ACL in docs/decisions.md); default: the user name in the counters' Redis "
        "URL ('default' without one).",
        check=lambda v: _rate_name(v) if v else None,
    )
    rate_peers: tuple[str, ...] = setting(
        (),
        doc="The rate_name of every other edge whose counters count: an address's total in a "
        "window is the sum over these edges and this one, each edge's count taken as at least "
        "0. An edge not listed here shares nothing with this one.",
        check=_each(_rate_name),
    )
    max_bans: int = setting(
        1_000_000,
        doc="Most bans enforced at once, all sources together; more are refused and counted "
        '(blindfold_decisions_refused_total{reason="cap"}).',
        min=1,
        max=10_000_000,
    )
    min_ban_prefix_len_v4: int = setting(
        16,
        doc="Widest IPv4 range a ban may cover: a ban on a shorter prefix (0.0.0.0/0, a /8) "
        "from any source is refused and counted (reason too_wide).",
        min=0,
        max=32,
    )
    min_ban_prefix_len_v6: int = setting(
        32, doc="Widest IPv6 range a ban may cover, likewise.", min=0, max=128
    )

    def __post_init__(self) -> None:
        if self.url and not self.api_key_file:
            raise ConfigError("api_key_file", "a decision stream URL needs this edge's API key")
        if self.redis_url and not self.signer_public_keys:
            raise ConfigError(
                "signer_public_keys",
                "decisions on Redis must be signed: name the origins' Ed25519 public keys",
            )
        if (self.rate_redis_url or self.rate_name or self.rate_peers) and not self.redis_url:
            raise ConfigError("redis_url", "the shared counters come with redis_url")
        if self.redis_url and not self.rate_name:
            problem = _rate_name(self.counter_name)
            if problem:
                raise ConfigError(
                    "rate_name", f"the Redis user name cannot name the counters: {problem}"
                )

    @property
    def counter_name(self) -> str:
        """This edge's name in its counter keys: rate_name, or the counters' Redis user."""
        if self.rate_name:
            return self.rate_name
        user = urlsplit(self.rate_redis_url or self.redis_url).username
        return unquote(user) if user else "default"


@dataclass(frozen=True, slots=True)
class EdgeQuicConfig:
    """QUIC pass-through (routes with quic = true): the flow table's bounds (per worker)."""

    announce_key_file: str = setting(
        doc="File holding the key (hex, `openssl rand -hex 32`) that authenticates the "
        "visitor announcements this edge sends the origins; the same file is in the origins' "
        "[origin.quic] edge_keys."
    )
    max_flows: int = setting(
        100000, doc="Most QUIC flows per worker (every state, rejected tombstones included).", min=1
    )
    max_pending: int = setting(
        10000, doc="Most flows per worker whose ClientHello is not yet read and decided.", min=1
    )
    max_pending_per_address: int = setting(
        8, doc="Most such undecided flows per client address.", min=1
    )
    hello_timeout_s: float = setting(
        5.0,
        doc="Deadline from a flow's first Initial to its decided ClientHello, and from its "
        "acceptance to its client's proof of address (its first Handshake packet).",
        min=0.1,
        max=120,
    )
    idle_timeout_s: float = setting(
        60.0,
        doc="A flow with no datagram either way for this long ends; keep above the origin's "
        "QUIC idle timeout.",
        min=1,
        max=3600,
    )
    max_paths: int = setting(
        4, doc="Client addresses per flow (NAT rebinding); a new one replaces the oldest.", min=1
    )
    vn_rate_per_s: float = setting(
        50.0,
        doc="Version Negotiation packets per second per worker, all addresses together.",
        min=0.0,
    )


@dataclass(frozen=True, slots=True)
class EdgeConfig:
    listen: tuple[str, ...] = setting(
        doc="Addresses the edge accepts visitors on, 'ip:port' ('[::]:443' for IPv6).",
        check=lambda v: _nonempty(v) or _each(check_ip_hostport)(v),
    )
    routes: tuple[RouteConfig, ...] = setting(doc="Routes, chosen by SNI.", check=_nonempty)
    admin_listen: str = setting(
        "127.0.0.1:7743",
        doc="Address of the admin listener: the status page (/), /status.json, /metrics "
        "(Prometheus text) and /healthz.",
        check=check_ip_hostport,
    )
    admin_token_file: str = setting("", doc=ADMIN_TOKEN_DOC)
    workers: int = setting(
        0,
        doc="Worker processes sharing the listeners (SO_REUSEPORT; a BPF program sends every "
        "connection from one client address to the same worker so per-address limits are exact). "
        "0 = number of CPUs.",
        min=0,
        max=256,
    )
    defer_accept: bool = setting(
        False,
        doc="TCP_DEFER_ACCEPT on the listeners: the kernel hands a connection over only "
        "once its first bytes arrive (idle connects never reach a worker). Saves a wake-up per "
        "connection but added ~80 µs to new-connection latency in bench/l4; off by default. "
        "Takes effect at start.",
    )
    hello_timeout_s: float = setting(
        5.0, doc="Deadline for the whole ClientHello, from accept.", min=0.1, max=120
    )
    max_hello_bytes: int = setting(
        16384,
        doc="Most bytes read while waiting for a complete ClientHello (it may span several "
        "TLS records).",
        min=512,
        max=65536,
    )
    max_hello_records: int = setting(
        64,
        doc="Most TLS records one ClientHello may span (RFC 8446 lets a sender cut it into "
        "records as small as 1 byte). Browsers and TLS libraries use one, two above 16 KiB; "
        "tools that fragment the hello to slip past SNI filters a few dozen at most. More is "
        "refused (reason hello_too_many_records).",
        min=1,
        max=16384,
    )
    connect_timeout_s: float = setting(
        3.0,
        doc="Deadline for connecting to one origin before the next is tried.",
        min=0.05,
        max=120,
    )
    idle_timeout_s: float = setting(
        300.0,
        doc="A relayed connection with no bytes either way for this long is closed.",
        min=1,
        max=86400,
    )
    drain_timeout_s: float = setting(
        30.0,
        doc="On SIGTERM, how long open connections may continue before they are closed.",
        min=0,
        max=3600,
    )
    origin_down_s: float = setting(
        10.0, doc="How long an origin that refused or timed out is skipped.", min=0.1, max=3600
    )
    max_connections: int = setting(
        20000,
        doc="Global cap on open visitor connections for this edge (split evenly across "
        "workers). Applies to allowlisted addresses too.",
        min=1,
    )
    per_ip_concurrent: int = setting(
        256,
        doc="Open connections allowed per client address (IPv6: per ipv6_prefix_len prefix).",
        min=1,
    )
    per_ip_rate_per_s: float = setting(
        50.0,
        doc="New connections per second per client address (token bucket refill rate); "
        "0 disables the rate limit.",
        min=0.0,
    )
    per_ip_burst: int = setting(
        100, doc="Token bucket size for new connections per client address.", min=1
    )
    ipv6_prefix_len: int = setting(
        64,
        doc="IPv6 clients are grouped by this prefix for per-address limits and steering.",
        min=32,
        max=128,
    )
    max_tracked_ips: int = setting(
        200000,
        doc="Bound on the per-address state each worker keeps; idle entries are evicted first.",
        min=1000,
    )
    blocklist_files: tuple[str, ...] = setting(
        (),
        doc="Files of IPv4/IPv6 addresses and CIDRs to refuse, one per line, '#' or ';' "
        "comments (the format of published drop lists). Reloaded when they change and on SIGHUP.",
    )
    allowlist_files: tuple[str, ...] = setting(
        (),
        doc="Files in the same format; listed addresses bypass the blocklists, the per-address "
        "limits and the JA4 rules (not max_connections).",
    )
    block: tuple[str, ...] = setting(
        (),
        doc="Inline addresses/CIDRs to refuse, added to the blocklist files.",
        check=_check_cidrs,
    )
    allow: tuple[str, ...] = setting(
        (), doc="Inline addresses/CIDRs added to the allowlist.", check=_check_cidrs
    )
    list_check_interval_s: float = setting(
        2.0, doc="How often list files are checked for changes.", min=0.1, max=3600
    )
    ja4_rules: tuple[Ja4Rule, ...] = setting((), doc="Fingerprint rules, first match wins.")
    decisions: DecisionSourceConfig | None = setting(
        None,
        doc="Bans made elsewhere (the origin agent, CrowdSec) that this edge enforces: "
        "new connections from a banned address are refused and its open ones closed.",
    )
    pipe_size_bytes: int = setting(
        262144,
        doc="Kernel pipe capacity per direction used by splice (rounded by the kernel to "
        "pages). Non-root processes are limited by fs.pipe-user-pages-soft.",
        min=4096,
        max=1 << 20,
    )
    log_path: str = setting("", doc="Where JSON log lines go; empty = standard output.")
    log_connections: bool = setting(True, doc="Write one JSON line per finished connection.")
    log_refused_per_s: float = setting(
        200.0,
        doc="Most log lines per second per worker for refused connections (a flood must "
        "not fill the disk); the rest are counted in blindfold_log_lines_suppressed_total. "
        "0 = no limit.",
        min=0.0,
    )
    quic: EdgeQuicConfig | None = setting(
        None, doc="QUIC pass-through for routes with quic = true (docs/quic.md)."
    )
    relay: Literal["auto", "splice", "copy"] = setting(
        "auto",
        doc="How bytes are moved after the hello: 'splice' (Linux zero-copy through "
        "pipes), 'copy' (portable user-space buffers), 'auto' (splice where available).",
    )
    acme: AcmeConfig | None = setting(
        None,
        doc="The edge's own certificates by ACME: a blind route's CDN hostname is the "
        "edge's name, its key is made and kept here (docs/acme.md). Name the route's "
        "certificate and key as an order's cert and key; tls-alpn-01 is answered by the "
        "edge itself from challenge_dir.",
    )

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
        if exposed := admin_exposure(self.admin_listen, self.admin_token_file):
            raise ConfigError("admin_token_file", exposed)
        if self.decisions and self.decisions.min_ban_prefix_len_v6 > self.ipv6_prefix_len:
            raise ConfigError(
                "decisions.min_ban_prefix_len_v6",
                f"must be at most ipv6_prefix_len ({self.ipv6_prefix_len}): IPv6 bans cover "
                "that prefix",
            )
        quic = [i for i, r in enumerate(self.routes) if r.quic]
        if quic and self.quic is None:
            raise ConfigError(
                f"routes[{quic[0]}].quic",
                "QUIC routes need [edge.quic] with announce_key_file (the key the origins "
                "verify visitor announcements with)",
            )
        _check_blind_sites(self.routes)  # no keyless route serving a blind site's manifest

    def route_name(self, index: int) -> str:
        return self.routes[index].name or f"route{index}"


# Where a blind site's manifest may be served: only where the edge cannot read it (see
# blindfold.blind.exposure, which checks a whole deployment file with these helpers).
MANIFEST_EXPOSED = (
    "the edge ends TLS there and would read the blind manifest (the content keys); "
    "serve that name through a passthrough route"
)


def keyless_route_for(routes: tuple[RouteConfig, ...], name: str) -> str | None:
    """The dotted key (under edge.) that makes the edge end TLS for `name` on a keyless route
    (as the edge's router chooses: exact, longest wildcard, then the default route), if any."""
    default = next((i for i, r in enumerate(routes) if r.default), None)
    router = SniRouter(((p, i) for i, r in enumerate(routes) for p in r.sni), default)
    i = router.lookup(name)
    if i is None or routes[i].mode != "keyless":
        return None
    if any(covers(p, name) for p in routes[i].sni):
        return f"routes[{i}].sni"
    return f"routes[{i}].default"


def _check_blind_sites(routes: tuple[RouteConfig, ...]) -> None:
    """An edge config alone: no keyless route for the site names of its blind routes."""
    for i, rc in enumerate(routes):
        if rc.mode != "blind":
            continue
        names = rc.blind.site_names if rc.blind is not None and rc.blind.site_names else ()
        where = f"routes[{i}].blind.site_names"
        if not names:
            names, where = (rc.origin_server_name,), f"routes[{i}].origin_server_name"
        for name in names:
            key = keyless_route_for(routes, name)
            if key is not None:
                raise ConfigError(
                    key, f"takes {name!r}, which serves the site (edge.{where}): {MANIFEST_EXPOSED}"
                )
