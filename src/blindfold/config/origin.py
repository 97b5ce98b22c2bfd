"""Schema of the `[origin]` section: the agent beside the site's application."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Literal

from blindfold.config.acme import AcmeConfig
from blindfold.config.common import (
    ADMIN_TOKEN_DOC,
    admin_exposure,
    check_ip_hostport,
    check_redis_url,
    unspecified_listen,
)
from blindfold.config.http import HttpServerConfig
from blindfold.config.schema import setting
from blindfold.errors import ConfigError
from blindfold.web.target import check_rule_prefix


def _cidrs(values: tuple[str, ...]) -> str | None:
    for i, v in enumerate(values):
        try:
            ipaddress.ip_network(v, strict=False)
        except ValueError:
            return f"[{i}]: {v!r} is not an IP address or CIDR"
    return None


def _listens(values: tuple[str, ...]) -> str | None:
    for i, v in enumerate(values):
        problem = check_ip_hostport(v)
        if problem:
            return f"[{i}]: {problem}"
    return None


def _upstream(value: str) -> str | None:
    from blindfold.web.client import UpstreamTarget

    try:
        UpstreamTarget.parse(value)
    except ValueError as exc:
        return str(exc)
    return None


@dataclass(frozen=True, slots=True)
class CertificateConfig:
    cert: str = setting(doc="PEM certificate chain (leaf first). Its DNS names select it by SNI.")
    key: str = setting(
        doc="PEM private key of that certificate (the origin is where the site's keys live)."
    )


@dataclass(frozen=True, slots=True)
class HttpConfig(HttpServerConfig):
    """The HTTP server settings (config.http), and the application as the upstream."""

    upstream_connect_timeout_s: float = setting(
        5.0, doc="Deadline to connect to the application.", min=0.05
    )
    upstream_timeout_s: float = setting(
        60.0, doc="Longest wait for the application to send or accept bytes.", min=0.1
    )
    upstream_pool_size: int = setting(
        32, doc="Idle keep-alive connections kept to the application.", min=0
    )


_ARG_NAME = re.compile(r"[A-Za-z0-9_.\-\[\]]{1,100}")


def _arg_names(values: tuple[str, ...]) -> str | None:
    # the names go into a ModSecurity ctl: action, so only characters that cannot end it
    for i, v in enumerate(values):
        if not _ARG_NAME.fullmatch(v):
            return f"[{i}]: {v!r} must be 1-100 of A-Z a-z 0-9 _ . - [ ]"
    return None


@dataclass(frozen=True, slots=True)
class WafExclusionConfig:
    path_prefix: str = setting(
        doc="Requests whose canonical path is this path or below it (whole segments: "
        "'/webhook' covers '/webhook/x', not '/webhookX'; see 'Paths and path rules')...",
        check=check_rule_prefix,
    )
    rule_ids: tuple[int, ...] = setting(
        (),
        doc="...skip these rule ids (with `args`: only for those arguments); empty: no rule "
        "runs for the path (with `args`: no CRS rule looks at those arguments).",
    )
    args: tuple[str, ...] = setting(
        (),
        doc="Argument names (query string or form body, as ModSecurity's ARGS:name) the "
        "exclusion is limited to; empty: the whole request. What `blindfold waf report` proposes.",
        check=_arg_names,
    )


def _waf_mode_hostnames(values: tuple[str, ...]) -> str | None:
    return _hostnames(values) if values else None


@dataclass(frozen=True, slots=True)
class WafModeConfig:
    path_prefix: str = setting(
        doc="Requests whose canonical path is this path or below it (whole segments)...",
        check=check_rule_prefix,
    )
    mode: Literal["block", "detect"] = setting(
        doc="...are inspected in this mode ('detect': log what would be blocked, block nothing)."
    )
    hostnames: tuple[str, ...] = setting(
        (),
        doc="Only for these site hostnames (the request's Host/:authority); empty: all of them.",
        check=_waf_mode_hostnames,
    )


@dataclass(frozen=True, slots=True)
class WafConfig:
    enabled: bool = setting(True, doc="Inspect requests with ModSecurity v3 and the OWASP CRS.")
    mode: Literal["block", "detect"] = setting(
        "block", doc="'block' answers 403 (with a request id); 'detect' only logs."
    )
    paranoia_level: int = setting(1, doc="CRS paranoia level 1-4.", min=1, max=4)
    anomaly_threshold: int = setting(5, doc="CRS inbound anomaly score that blocks.", min=1)
    allowed_methods: str = setting(
        "",
        doc="CRS tx.allowed_methods, space separated (e.g. "
        "'GET HEAD POST OPTIONS PUT PATCH DELETE' for a REST API); "
        "empty keeps CRS's GET HEAD POST OPTIONS.",
    )
    allowed_content_types: str = setting(
        "",
        doc="CRS tx.allowed_request_content_type, space separated (add "
        "'application/octet-stream' for binary uploads); empty keeps CRS's list (forms, "
        "multipart, XML, JSON).",
    )
    body_limit_bytes: int = setting(
        13107200,
        doc="Most request body bytes the WAF buffers and inspects (SecRequestBodyLimit).",
        min=0,
    )
    body_no_files_limit_bytes: int = setting(
        131072, doc="Most non-file body bytes inspected (SecRequestBodyNoFilesLimit).", min=0
    )
    body_limit_action: Literal["reject", "partial"] = setting(
        "partial",
        doc="A body over body_limit_bytes: 'reject' answers 413; 'partial' inspects "
        "the first body_limit_bytes and streams the rest unseen.",
    )
    exclusions: tuple[WafExclusionConfig, ...] = setting(
        (), doc="Per-path rule exclusions, optionally per argument."
    )
    modes: tuple[WafModeConfig, ...] = setting(
        (),
        doc="Per-path (and per-hostname) `mode` overriding `mode` above: the longest matching "
        "`path_prefix` wins, an entry naming the request's hostname before one naming none.",
    )
    extra_rules_files: tuple[str, ...] = setting(
        (), doc="More ModSecurity rule files, loaded after the CRS."
    )
    crs_rules_dir: str = setting(
        "/usr/share/modsecurity-crs/rules", doc="The CRS rules (Debian's modsecurity-crs)."
    )
    crs_setup_dir: str = setting(
        "/etc/modsecurity/crs",
        doc="Where crs-setup.conf and the REQUEST-900/RESPONSE-999 exclusion files are.",
    )
    unicode_map_file: str = setting(
        "/etc/modsecurity/unicode.mapping", doc="SecUnicodeMapFile (scripts/bootstrap installs it)."
    )
    audit_log: str = setting(
        "",
        doc="JSON lines of every request a rule matched (request id, "
        "client, rule ids); empty: the main log.",
    )


@dataclass(frozen=True, slots=True)
class RateRuleConfig:
    path_prefix: str = setting(
        doc="Requests whose canonical path is this path or below it (whole segments) "
        "are counted...",
        check=check_rule_prefix,
    )
    rate_per_s: float = setting(doc="...per client address at this rate...", min=0.001)
    burst: int = setting(10, doc="...with this burst; past it the address is banned.", min=1)
    ban_duration_s: float = setting(600.0, doc="How long that ban lasts.", min=1)
    name: str = setting("", doc="Shown as the decision's reason.")


@dataclass(frozen=True, slots=True)
class DecisionsConfig:
    listen: str = setting(
        "",
        doc="HTTPS address serving the decision stream to edges "
        "(CrowdSec bouncer API shape); empty: not served.",
        check=lambda v: check_ip_hostport(v) if v else None,
    )
    cert: str = setting(
        "",
        doc="Certificate of that listener, required with listen: one of its own, never the "
        "site's (anyone reaching the port would learn the site's names and map them to this "
        "address), e.g. `blindfold pki server decisions DIR --host origin.internal`; edges "
        "verify it with [edge.decisions] ca and server_name.",
    )
    key: str = setting("", doc="Its key.")
    max_connections: int = setting(
        64,
        doc="Open connections to the decision stream at most (counted apart from the "
        "site's max_connections).",
        min=1,
    )
    api_keys_file: str = setting(
        "", doc="Edge API keys, one per line ('name:key' or 'key'); edges send theirs in X-Api-Key."
    )
    operator_keys_file: str = setting(
        "",
        doc="Operator keys, one per line ('id:secret', the secret at least 16 characters, "
        "mode 0600 or 0640): they alone may add and delete decisions and purge the edges' "
        "caches through this listener (`blindfold decisions`, `blindfold purge`); every "
        "action is logged with the key's id. Empty: no write API. Never an edge's key.",
    )
    operator_addresses: tuple[str, ...] = setting(
        ("127.0.0.1/32", "::1/128"),
        doc="Addresses/CIDRs, besides the trusted edges', that may connect to this listener "
        "to use the operator API (they still need an operator key).",
        check=_cidrs,
    )
    ban_after_blocks: int = setting(
        3,
        doc="WAF blocks from one address within "
        "block_window_s that ban it (1: the first block bans).",
        min=1,
    )
    block_window_s: float = setting(60.0, doc="Window for counting WAF blocks.", min=1)
    ban_duration_s: float = setting(3600.0, doc="Duration of a ban created by WAF blocks.", min=1)
    journal: str = setting(
        "",
        doc="File where every decision is kept as it is made (append-only JSON lines, "
        "compacted) and read back at start, expired ones dropped, so a restart or a crash "
        "lifts no ban; e.g. '/var/lib/blindfold-origin/decisions.journal'. Empty: decisions "
        "live in memory only. Takes effect at the next start.",
    )
    rate_rules: tuple[RateRuleConfig, ...] = setting(
        (), doc="Per-path request-rate rules that ban."
    )
    redis_url: str = setting(
        "",
        doc="Publish decisions to Redis too (keys with TTL + "
        "pub/sub), for many edges: 'rediss://user:password@host:6380/0' (TLS); plain "
        "'redis://' only to a loopback address. Needs signing_key.",
        check=check_redis_url,
    )
    redis_ca: str = setting(
        "", doc="CA bundle that verifies a rediss:// server's certificate; empty: the system's CAs."
    )
    signing_key: str = setting(
        "",
        doc="Ed25519 private key (PEM) that signs every decision published to Redis; edges "
        "believe only decisions signed by a key in their signer_public_keys "
        "(`openssl genpkey -algorithm ed25519`).",
    )
    ipv6_prefix_len: int = setting(
        64,
        doc="A ban on an IPv6 client covers its prefix of this length, and WAF blocks and rate "
        "rules count per prefix: the unit edge.ipv6_prefix_len limits (keep the two equal).",
        min=32,
        max=128,
    )
    per_edge_decisions: int = setting(
        100,
        doc="Decisions (new bans and extensions of bans) that the requests arriving through one "
        "trusted edge may cause per per_edge_decisions_window_s: an edge names the visitor in "
        "its PROXY header, so a compromised one could get any address banned. Beyond it the "
        "WAF still blocks, but no ban is made (decision_refused, reason edge_budget). Counted "
        "per [[origin.edges]] name, or per address for trusted_edges.",
        min=1,
    )
    per_edge_decisions_window_s: float = setting(
        60.0, doc="The window of per_edge_decisions.", min=1
    )
    per_edge_connections: int = setting(
        4,
        doc="Open connections to the decision stream from one address (an edge needs one): "
        "one trusted address cannot hold every slot of max_connections.",
        min=1,
    )
    request_timeout_s: float = setting(
        2.0,
        doc="Deadline, from accept, for a decision-stream connection's TLS handshake and first "
        "request with a valid API key; a request with a wrong key closes the connection.",
        min=0.1,
        max=60,
    )
    full_answers_per_minute: int = setting(
        12,
        doc="Whole-set answers (startup polls, /v1/decisions) per API key and address per "
        "minute; more are answered 429 with Retry-After. Deltas are not limited.",
        min=1,
    )


def _url_path(value: str) -> str | None:
    if not value.startswith("/") or any(c in value for c in "?#\x00 "):
        return f"{value!r} must be a URL path starting with / (no query, no spaces)"
    return None


def _url_prefix(value: str) -> str | None:
    return _url_path(value) or (None if value.endswith("/") else f"{value!r} must end with /")


def _hostnames(values: tuple[str, ...]) -> str | None:
    from blindfold.config.common import is_hostname

    if not values:
        return "name at least one hostname"
    for i, v in enumerate(values):
        if not is_hostname(v) or v != v.lower():
            return f"[{i}]: {v!r} is not a hostname in lower case (no wildcards)"
    return None


@dataclass(frozen=True, slots=True)
class BlindStoreConfig:
    dir: str = setting(doc="The OUT_DIR of `blindfold seal`: manifest.json and blobs/.")
    site_names: tuple[str, ...] = setting(
        doc="The site's hostnames that visitors reach over TLS ending here "
        "(passthrough routes, never keyless ones). The manifest and the plaintext "
        "fallback are served only to requests whose TLS server name and Host are both "
        "one of these: elsewhere an edge could read them (403). check-config refuses a "
        "keyless route or a key server authorisation for these names that it can see.",
        check=_hostnames,
    )
    source_dir: str = setting(
        "",
        doc="The SRC_DIR that was sealed: the origin serves the "
        "plaintext of sealed paths from it under plaintext_path (the "
        "visitors' fallback when an edge copy fails verification), and "
        "the pages under pages_prefix. Empty: no fallback.",
    )
    pages_prefix: str = setting(
        "",
        doc="URL prefix under which the store serves source_dir's files "
        "itself, at their own paths (after the WAF, like every request): "
        "'/' for a static site, '/static/' for part of one. A path under it "
        "that is a file of source_dir is answered from the file, so that "
        "file hides the application's path of the same name; any other path "
        "goes to the application. Empty: the application serves every page "
        "and file (the store only its reserved paths).",
        check=lambda v: _url_prefix(v) if v else None,
    )
    plaintext_path: str = setting(
        "/.well-known/blindfold/plain/",
        doc="URL prefix of the plaintext of sealed files (PREFIX + the "
        "file's path without its leading /), whole or from a byte offset: "
        "the visitors' fallback when an edge copy fails verification. Only "
        "files the manifest names; without source_dir none (the service worker "
        "and `blindfold fetch` then fall back to the file's own URL).",
        check=_url_prefix,
    )
    manifest_path: str = setting(
        "/.well-known/blindfold/manifest.json",
        doc="URL path of the "
        "signed manifest (it holds the content keys: served with "
        "no-store, by the origin only).",
        check=_url_path,
    )
    private_manifest_path: str = setting(
        "/.well-known/blindfold/manifest-private.json",
        doc="URL path of the signed private manifest (`blindfold seal --private`: the keys "
        "of private files). Served only after private_auth_path admitted the request, with "
        "`Cache-Control: private, no-store`.",
        check=_url_path,
    )
    private_auth_path: str = setting(
        "",
        doc="Path of the application asked, like nginx's auth_request, whether a visitor "
        "may have the private manifest and the plaintext of private files: a GET carrying "
        "the visitor's Cookie and Authorization (and X-Original-URI). A 2xx admits, a 401 or "
        "403 is passed to the visitor, anything else or no answer within "
        "private_auth_timeout_s is a 503. Empty: private files are never served, and a store "
        "holding them is refused (check-config).",
        check=lambda v: _url_path(v) if v else None,
    )
    private_auth_timeout_s: float = setting(
        5.0,
        doc="Deadline of the application's answer to a private_auth_path request (then 503).",
        min=0.1,
        max=60,
    )
    blobs_path: str = setting(
        "/.blindfold/blobs/",
        doc="URL prefix under which edges pull sealed blobs by id.",
        check=_url_prefix,
    )
    blob_index_path: str = setting(
        "/.blindfold/blob-index.json",
        doc="URL path of the signed blob index (each blob's and SRI copy's SHA-256 and "
        "size; no keys, no paths) that edges check their copies against.",
        check=_url_path,
    )
    public_path: str = setting(
        "/.blindfold/public/",
        doc="URL prefix under which edges pull the plaintext SRI copies (`blindfold seal --sri`).",
        check=_url_prefix,
    )
    rewrite_html: bool = setting(
        False,
        doc="Rewrite the HTML pages served under pages_prefix for "
        "Subresource Integrity: <script src> and <link "
        "rel=stylesheet> of files published with `seal --sri` point "
        "at the edge copy with integrity and crossorigin, and a "
        "page with such a tag is sent with Integrity-Policy (no "
        "script without integrity runs on it). Needs edge_url.",
    )
    response_signing_key: str = setting(
        "",
        doc="Ed25519 private key (PEM) that signs every "
        "whole (200) response of the blind store with "
        "RFC 9421 HTTP Message Signatures (@status, content-type, "
        "content-digest, date, and the request's method, authority, path "
        "and query; `blindfold verify` checks them). Empty: responses are "
        "not signed.",
    )
    response_signature_lifetime_s: float = setting(
        300.0, doc="How long such a signature is valid (its `expires`).", min=1
    )
    edge_url: str = setting(
        "",
        doc="Base URL of the blind edge for the service worker, e.g. "
        "'https://cdn.example.test' (blobs at EDGE/b/<id>). Empty: no "
        "service worker is served.",
        check=lambda v: (
            None
            if not v or (v.startswith("https://") and not v.endswith("/"))
            else "must be an https:// URL without a trailing /"
        ),
    )
    service_worker_path: str = setting(
        "/blindfold-sw.js",
        doc="URL path of the service worker (its scope is its directory: keep it at /).",
        check=_url_path,
    )
    register_path: str = setting(
        "/.well-known/blindfold/register.js",
        doc="URL path of the registration snippet pages include with <script src>.",
        check=_url_path,
    )
    report_path: str = setting(
        "/.well-known/blindfold/report",
        doc="URL path where clients POST verification failures (logged as blind_client_report).",
        check=_url_path,
    )


def _check_allocator(value: str) -> str | None:
    if value in ("auto", "system") or value.startswith("/"):
        return None
    return "'auto', 'system' or the absolute path of an allocator library"


def _edge_name(value: str) -> str | None:
    ok = 0 < len(value) <= 64 and all(c.isascii() and (c.isalnum() or c in "._-") for c in value)
    return None if ok else f"{value!r}: 1-64 ASCII letters, digits, '.', '_' or '-'"


@dataclass(frozen=True, slots=True)
class TrustedEdgeConfig:
    name: str = setting(
        doc="The edge's name: in decision, WAF and request log lines, in the decision stream, "
        "and in its authenticated PROXY headers (the edge's proxy_auth_name).",
        check=_edge_name,
    )
    addresses: tuple[str, ...] = setting(
        doc="Addresses/CIDRs its connections come from; their PROXY headers are believed "
        "(as with trusted_edges).",
        check=lambda v: ("must not be empty" if not v else None) or _cidrs(v),
    )
    proxy_auth_key_file: str = setting(
        "",
        doc="File holding the key (hex, `openssl rand -hex 32`) this edge authenticates its "
        "PROXY v2 headers with (the edge's route proxy_auth_key_file): then every connection "
        "from its addresses must start with a v2 header carrying a valid authentication TLV, "
        "made for that very connection, or it is refused (conn_refused, reason "
        "proxy_auth_missing, proxy_auth_bad, proxy_auth_stale, proxy_auth_replayed). Empty: "
        "its headers are believed unauthenticated.",
    )


@dataclass(frozen=True, slots=True)
class OriginQuicConfig:
    listen: tuple[str, ...] = setting(
        (),
        doc="UDP addresses serving HTTP/3 (QUIC v1 and v2, aioquic) with the site's "
        "certificates, through the same WAF, decisions and proxy as HTTP/1.1 and HTTP/2; "
        "empty: no HTTP/3. Datagrams follow proxy_protocol: from trusted_edges only after "
        "an authenticated visitor announcement (docs/quic.md).",
        check=_listens,
    )
    edge_keys: tuple[str, ...] = setting(
        (),
        doc="Files holding the keys (hex, at least 32 bytes: `openssl rand -hex 32`) "
        "that authenticate the edges' visitor announcements; one per edge group, an edge "
        "is revoked by removing its key.",
    )
    advertise: bool = setting(
        True,
        doc="Send `Alt-Svc: h3` on HTTP/1.1 and HTTP/2 responses over TLS; turn it off while "
        "the edges in front of the site do not carry QUIC for it (browsers would try UDP "
        "there first).",
    )
    advertise_port: int = setting(
        0,
        doc="The UDP port in Alt-Svc: the one visitors reach (the edge's, usually 443); "
        "0: the first quic.listen port.",
        min=0,
        max=65535,
    )
    alt_svc_max_age_s: int = setting(
        86400, doc="Alt-Svc `ma`: how long clients remember it.", min=1
    )
    idle_timeout_s: float = setting(
        30.0,
        doc="QUIC idle timeout; keep it below the edge's QUIC flow idle timeout.",
        min=1,
    )
    max_connections: int = setting(10000, doc="Open QUIC connections at most.", min=1)
    announcement_window_s: float = setting(
        30.0,
        doc="How far an announcement's timestamp may be from this clock (run NTP on edges "
        "and origin).",
        min=1,
        max=600,
    )
    max_buffered_body_bytes: int = setting(
        16 << 20,
        doc="Request body bytes one QUIC connection may hold unread by the application "
        "(aioquic opens receive windows as data arrives); the stream that passes it is "
        "stopped.",
        min=65536,
    )


@dataclass(frozen=True, slots=True)
class OriginConfig:
    upstream: str = setting(
        doc="The application: 'http://127.0.0.1:8080', "
        "'https://host:port' or 'unix:/run/app.sock'.",
        check=_upstream,
    )
    listen: tuple[str, ...] = setting(
        ("127.0.0.1:9443",),
        doc="TLS listeners for edges (and direct visitors if allowed).",
        check=_listens,
    )
    http_listen: tuple[str, ...] = setting(
        (),
        doc="Plain-HTTP listeners (no TLS): for local "
        "health checks and WAF measurements, never for "
        "edges.",
        check=_listens,
    )
    certificates: tuple[CertificateConfig, ...] = setting(
        (), doc="The site's certificates; the SNI picks one, the first is the default."
    )
    certificate_reload_interval_s: float = setting(
        1.0,
        doc="How often the certificates' files are checked for replacement (inode, size, "
        "modification time; an ACME client renames renewed files into place); a change is "
        "loaded once it is unchanged for one more check. The replaced set is used for new "
        "TLS connections only if every pair loads, each key fits its certificate and each "
        "replaced chain is signed certificate by certificate, its leaf valid now and naming "
        "every DNS name of the one it replaces; else the old set stays (log line "
        "`certificate_reload_failed`, metric blindfold_certificate_reloads_total). Open "
        "connections keep theirs. 0: only on SIGHUP. HTTP/3 listeners take new files at "
        "restart only.",
        min=0,
        max=3600,
    )
    trusted_edges: tuple[str, ...] = setting(
        (), doc="Edge addresses/CIDRs whose PROXY header is believed.", check=_cidrs
    )
    edges: tuple[TrustedEdgeConfig, ...] = setting(
        (),
        doc="Trusted edges by name (their addresses are trusted as trusted_edges are), with "
        "the key that authenticates their PROXY headers: someone on the path between an edge "
        "and the origin can rewrite a header that is not authenticated.",
    )
    proxy_auth_max_skew_s: float = setting(
        30.0,
        doc="An authenticated PROXY header's time may differ from the origin's clock by this "
        "much (each is accepted once: a header replayed within it is refused).",
        min=1,
        max=600,
    )
    proxy_protocol: Literal["required", "optional", "off"] = setting(
        "required",
        doc="'required': every connection must come from a trusted edge and start "
        "with a PROXY v1/v2 header; 'optional': trusted edges may send one, others connect "
        "directly; 'off': no PROXY header is read.",
    )
    proxy_header_timeout_s: float = setting(5.0, doc="Deadline for the PROXY header.", min=0.1)
    admin_listen: str = setting(
        "127.0.0.1:7744",
        doc="Address of the status page (/), /status.json, /metrics and /healthz.",
        check=check_ip_hostport,
    )
    admin_token_file: str = setting("", doc=ADMIN_TOKEN_DOC)
    log_path: str = setting("", doc="Where JSON log lines go; empty = standard output.")
    access_log: bool = setting(True, doc="One JSON line per request.")
    workers: int = setting(
        0,
        doc="Worker processes serving listen and http_listen (one SO_REUSEPORT socket each; "
        "the kernel spreads connections by their addresses and ports). A master process owns "
        "the decisions (rules, store, stream, Redis, journal), the admin listener and HTTP/3; "
        "workers report WAF blocks and rate-rule hits to it. 0 = number of CPUs. "
        "max_connections, per_client_connections and per_client_requests apply per worker.",
        min=0,
        max=256,
    )
    worker_allocator: str = setting(
        "auto",
        doc="Memory allocator of the worker processes: 'auto' (mimalloc when installed, "
        "Debian package libmimalloc2.0; else the C library's), 'system' (the C library's "
        "malloc) or the absolute path of an allocator library, preloaded with LD_PRELOAD. "
        "ModSecurity allocates and frees tens of thousands of small strings per inspected "
        "request: with mimalloc a worker needs ~22% fewer instructions per request, with the "
        "same WAF decisions. An LD_PRELOAD already in the environment is kept ('auto' then "
        "adds nothing).",
        check=_check_allocator,
    )
    max_connections: int = setting(10000, doc="Open client connections at most.", min=1)
    per_client_connections: int = setting(
        64,
        doc="Open connections per visitor address (the PROXY header's; IPv6 by /64) that are "
        "served. Up to as many more are answered 429 (after TLS, so an edge never takes the "
        "origin for down) and closed; beyond twice this number they are closed at once. "
        "Connections an edge opens for itself (PROXY LOCAL) do not count.",
        min=1,
    )
    per_client_requests: int = setting(
        128,
        doc="Requests in flight per visitor address; more are answered 429.",
        min=1,
    )
    trust_any_address: bool = setting(
        False,
        doc="Allow trusted_edges to cover every address (0.0.0.0/0, ::/0): then anyone who "
        "can connect may claim any visitor address. Only behind a firewall that admits the "
        "edges alone.",
    )
    http: HttpConfig = setting(
        default_factory=HttpConfig,
        doc="HTTP limits and timeouts (the settings of an edge route's http, one table), and "
        "the connections to the application.",
    )
    waf: WafConfig = setting(default_factory=WafConfig, doc="The web application firewall.")
    decisions: DecisionsConfig = setting(
        default_factory=DecisionsConfig, doc="Bans created here and served to edges."
    )
    blind: BlindStoreConfig | None = setting(
        None, doc="Blind delivery: serve the sealed store made by `blindfold seal`."
    )
    quic: OriginQuicConfig = setting(
        default_factory=OriginQuicConfig, doc="HTTP/3 over QUIC (docs/quic.md)."
    )
    acme: AcmeConfig | None = setting(
        None,
        doc="Certificates this agent obtains and renews by ACME for the hostnames it "
        "terminates (docs/acme.md); each order's cert/key is served like a certificates "
        "entry, a self-signed placeholder until the first issuance.",
    )
    acme_challenge_dir: str = setting(
        "",
        doc="Answer ACME tls-alpn-01 (RFC 8737) from the challenge certificates in this "
        "directory: a ClientHello offering only ALPN acme-tls/1 gets the certificate for its "
        "SNI. Default: acme.challenge_dir. Set it to the key server's acme.challenge_dir to "
        "answer for keyless hostnames.",
    )

    def __post_init__(self) -> None:
        if self.listen and not (self.certificates or self.acme):
            raise ConfigError(
                "certificates", "TLS listeners need at least one [[origin.certificates]]"
            )
        if self.proxy_protocol == "required" and not (self.trusted_edges or self.edges):
            raise ConfigError(
                "trusted_edges", "proxy_protocol = 'required' needs the edges' addresses"
            )
        if exposed := admin_exposure(self.admin_listen, self.admin_token_file):
            raise ConfigError("admin_token_file", exposed)
        names = [e.name for e in self.edges]
        if len(set(names)) != len(names):
            raise ConfigError("edges", "edge names must be unique")
        if self.proxy_protocol == "off" and any(e.proxy_auth_key_file for e in self.edges):
            raise ConfigError(
                "proxy_protocol", "authenticated PROXY headers need proxy_protocol on"
            )
        if self.decisions.listen and not self.decisions.api_keys_file:
            raise ConfigError("decisions.api_keys_file", "the decision stream needs API keys")
        if self.decisions.operator_keys_file and not self.decisions.listen:
            raise ConfigError(
                "decisions.operator_keys_file",
                "the operator API is served on decisions.listen: set it too",
            )
        if self.decisions.redis_url and not self.decisions.signing_key:
            raise ConfigError(
                "decisions.signing_key", "decisions published to Redis must be signed"
            )
        if self.decisions.listen and not (self.decisions.cert and self.decisions.key):
            raise ConfigError(
                "decisions.cert",
                "the decision stream needs a certificate and key of its own (not the site's), "
                "e.g. from `blindfold pki server decisions DIR --host NAME`",
            )
        if self.decisions.listen and not (self.trusted_edges or self.edges):
            raise ConfigError(
                "decisions.listen",
                "the decision stream answers only trusted_edges: list the edges' addresses",
            )
        if self.quic.listen and not (self.certificates or self.acme):
            raise ConfigError("quic.listen", "HTTP/3 needs at least one [[origin.certificates]]")
        if (
            self.quic.listen
            and self.proxy_protocol != "off"
            and self.trusted_edges
            and not self.quic.edge_keys
        ):
            raise ConfigError(
                "quic.edge_keys",
                "edges' QUIC flows are believed only with an announcement key: list the "
                "key files (`openssl rand -hex 32 > FILE`, the same on the edges)",
            )
        if self.proxy_protocol != "off" and not self.trust_any_address:
            places = [(f"trusted_edges[{i}]", v) for i, v in enumerate(self.trusted_edges)]
            for j, edge in enumerate(self.edges):
                places += [(f"edges[{j}].addresses[{i}]", v) for i, v in enumerate(edge.addresses)]
            for where, value in places:
                if ipaddress.ip_network(value, strict=False).prefixlen == 0:
                    raise ConfigError(
                        where,
                        f"{value!r} trusts every address to name the visitor: list the edges' "
                        "addresses (or set trust_any_address = true behind a firewall)",
                    )


def listen_warnings(cfg: OriginConfig) -> list[str]:
    """What is valid but probably unintended: listeners meant for a few peers, on every
    address (check-config prints these; the agent logs them at start)."""
    out = []
    if unspecified_listen(cfg.admin_listen):
        out.append(
            f"origin.admin_listen = {cfg.admin_listen!r} serves /metrics to every network; "
            "bind it to 127.0.0.1 or an internal address"
        )
    if cfg.decisions.listen and unspecified_listen(cfg.decisions.listen):
        out.append(
            f"origin.decisions.listen = {cfg.decisions.listen!r} listens on every address; "
            "only trusted_edges get a handshake, but prefer the address the edges reach"
        )
    return out


def fds_needed(cfg: OriginConfig) -> int:
    """Descriptors the agent may need at its limits: a client and an application connection
    per site connection, one per decision-stream connection, and some for itself."""
    return 2 * cfg.max_connections + cfg.decisions.max_connections + 64
