"""Schema of the `[keyserver]` section: the site's private keys, and which edge may ask what."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from blindfold.config.acme import AcmeConfig
from blindfold.config.common import (
    ADMIN_TOKEN_DOC,
    admin_exposure,
    check_ip_hostport,
    check_sni_pattern,
)
from blindfold.config.schema import setting
from blindfold.errors import ConfigError

_FP = re.compile(r"^[0-9a-f]{64}$")


def _fingerprint(value: str) -> str | None:
    v = value.replace(":", "").lower()
    return None if _FP.match(v) else "expected the SHA-256 of the certificate, 64 hex digits"


def _cidrs(values: tuple[str, ...]) -> str | None:
    for i, v in enumerate(values):
        try:
            ipaddress.ip_network(v, strict=False)
        except ValueError:
            return f"[{i}]: {v!r} is not an IP address or CIDR"
    return None


def _patterns(values: tuple[str, ...]) -> str | None:
    for i, v in enumerate(values):
        problem = check_sni_pattern(v)
        if problem:
            return f"[{i}]: {problem}"
    return None


@dataclass(frozen=True, slots=True)
class Pkcs11Config:
    module: str = setting(
        doc="The token's PKCS#11 library (e.g. /usr/lib/softhsm/libsofthsm2.so).",
        check=lambda v: None if v.startswith("/") else "an absolute path",
    )
    token_label: str = setting(doc="Label of the token that holds the key.")
    key_label: str = setting(
        doc="CKA_LABEL of the private key (ECDSA P-256/P-384 or RSA >= 2048 bits, signing "
        "with RSA-PSS). It must be non-extractable and sensitive: the key server refuses "
        "a key the token would hand out."
    )
    pin_file: str = setting(
        doc="File holding the user PIN (one line; mode 0600 or stricter, like the audit key)."
    )
    sessions: int = setting(
        1,
        doc="Sessions kept open with the token for this key; a signature borrows one (a "
        "PKCS#11 session serves one operation at a time). Calls into one PKCS#11 library are "
        "serialised (python-pkcs11 initialises it without OS locking) and the key server signs "
        "on one thread: 1 is enough.",
        min=1,
        max=64,
    )
    allow_imported_key: bool = setting(
        False,
        doc="Accept a key the token did not generate itself or that was once readable "
        "(CKA_LOCAL, CKA_NEVER_EXTRACTABLE or CKA_ALWAYS_SENSITIVE false): a key imported "
        "from a file may still exist outside the token. Refused unless this is true.",
    )


@dataclass(frozen=True, slots=True)
class KeyConfig:
    certificate: str = setting(
        doc="Its certificate (chain): a handshake whose Certificate message carries this "
        "leaf is signed with this key, only for an SNI its DNS names cover, and only for an "
        "edge authorised for every name it covers (give keyless hostnames a certificate of "
        "their own)."
    )
    key: str = setting(
        "",
        doc="PEM private key (ECDSA P-256/P-384, RSA >= 2048 bits, Ed25519); or `pkcs11` "
        "instead. Replaced files (certificate and key) are picked up within "
        "`keyserver.reload_interval_s`, only if the pair fits (see docs/config.md).",
    )
    name: str = setting("", doc="Name in logs, metrics and the audit log (default: key<N>).")
    pkcs11: Pkcs11Config | None = setting(
        None,
        doc="The private key in a PKCS#11 token (an HSM) instead of `key`: it never leaves "
        "the token; the key server asks the token for each signature.",
    )

    def __post_init__(self) -> None:
        if bool(self.key) == (self.pkcs11 is not None):
            raise ConfigError("key", "give either `key` (a PEM file) or `pkcs11`, not both")


@dataclass(frozen=True, slots=True)
class EdgeAccessConfig:
    name: str = setting(doc="The edge's name (audit log, metrics).")
    cert_sha256: str = setting(
        doc="SHA-256 fingerprint of the edge's client certificate "
        "(`blindfold pki edge` prints it); colons allowed.",
        check=_fingerprint,
    )
    hostnames: tuple[str, ...] = setting(
        doc="Hostnames (exact or '*.suffix') it may have handshakes signed for: matched "
        "against the SNI in the visitor's ClientHello, which the key server reads itself. A "
        "key is used for this edge only if these cover all of its certificate's names.",
        check=_patterns,
    )
    rate_per_s: float = setting(
        0.0, doc="Sign requests per second for this edge (0: the keyserver default).", min=0
    )
    burst: int = setting(0, doc="Burst for this edge (0: the keyserver default).", min=0)

    @property
    def fingerprint(self) -> bytes:
        return bytes.fromhex(self.cert_sha256.replace(":", "").lower())


def _one_listen(value: tuple[str, ...] | str) -> str | None:
    if isinstance(value, str):
        return check_ip_hostport(value)
    if len(value) != 1:
        return f"one address (a list of one), got {len(value)}"
    return check_ip_hostport(value[0])


@dataclass(frozen=True, slots=True)
class KeyServerConfig:
    listen: tuple[str, ...] | str = setting(
        doc="Address edges connect to (mutual TLS): a list of one 'ip:port', like every "
        "`listen` (a plain string is accepted too).",
        check=lambda v: _one_listen(v),
    )
    cert: str = setting(doc="The key server's own TLS certificate (chain).")
    key: str = setting(doc="Its private key.")
    client_ca: str = setting(
        doc="CA that issued the edges' client certificates (the site's "
        "own CA; `blindfold pki` makes one)."
    )
    keys: tuple[KeyConfig, ...] = setting(doc="The site's signing keys.")
    audit_log: str = setting(
        doc="Keyed, hash-chained log of every signature and refusal (append-only JSON "
        "lines); `blindfold audit verify --key KEY FILE` checks it."
    )
    audit_key: str = setting(
        doc="The audit log's HMAC key (hex, created with mode 0600 at the first start if "
        "missing). Keep it apart from the log: whoever has it can rewrite the log undetected."
    )
    edges: tuple[EdgeAccessConfig, ...] = setting(
        (),
        doc="Edges allowed to ask for signatures. Revoke one by removing it and sending "
        "SIGHUP: its next request is refused and its connections closed.",
    )
    admin_listen: str = setting(
        "127.0.0.1:7745",
        doc="Address of the status page (/), /status.json, /metrics and /healthz.",
        check=check_ip_hostport,
    )
    admin_token_file: str = setting("", doc=ADMIN_TOKEN_DOC)
    rate_per_s: float = setting(
        2000.0,
        doc="Default sign requests per second per edge (refused ones count too: the bucket "
        "bounds the work and audit lines an edge can cause).",
        min=0.001,
    )
    burst: int = setting(4000, doc="Default burst per edge.", min=1)
    max_connections_per_edge: int = setting(
        64,
        doc="Open connections per edge identity (an edge keeps one per worker process and key "
        "server); more are closed once their handshake names the edge.",
        min=1,
    )
    max_inflight_per_edge: int = setting(
        256,
        doc="Requests of one edge waiting to be served, counted in cost units like the rate "
        "(one per started 8 KiB); while it has this many its connections are not read. "
        "Edges are served in turn, so one edge's backlog never delays another's requests "
        "by more than one of its own.",
        min=1,
    )
    allowed_sources: tuple[str, ...] = setting(
        (),
        doc="Addresses/CIDRs that may connect at all, checked at accept before any TLS (like "
        "origin.trusted_edges): list the edges' addresses. Empty: any address (mutual TLS "
        "still refuses strangers, but each costs a handshake and holds a descriptor until it "
        "fails).",
        check=_cidrs,
    )
    max_connections: int = setting(
        1024,
        doc="Open connections at most, TLS handshakes included; more are closed at accept. "
        "Lowered at start to what the open-files limit allows (with a log line).",
        min=1,
    )
    max_connections_per_source: int = setting(
        64,
        doc="Open connections per source address (IPv6: per /64), TLS handshakes included; "
        "more are closed at accept.",
        min=1,
    )
    tls_handshake_timeout_s: float = setting(
        2.0,
        doc="A connection that has not completed its mutual-TLS handshake by then is closed.",
        min=0.1,
        max=60,
    )
    replay_window_s: float = setting(
        60.0,
        doc="A ClientHello random signed within this many seconds is not signed again for "
        "another handshake (a retry of the same request is); 0: no replay check.",
        min=0,
        max=3600,
    )
    idle_timeout_s: float = setting(
        300.0, doc="An edge connection silent this long is closed.", min=1
    )
    log_path: str = setting("", doc="Where JSON log lines go; empty = standard output.")
    reload_interval_s: float = setting(
        1.0,
        doc="How often the keys' certificate and key files are checked for replacement "
        "(inode, size, modification time); a change is loaded once it is unchanged for one "
        "more check (a key and a certificate renamed one after the other are taken together). "
        "A replaced pair is used only if the chain parses, "
        "the key fits the leaf, each certificate is signed by the next, the leaf is valid now "
        "and names every DNS name of the certificate it replaces (a renewal may add names, "
        "never drop one), else the old one stays (log line "
        "`key_reload_failed`, metric blindfold_certificate_reloads_total). 0: only on SIGHUP.",
        min=0,
        max=3600,
    )
    previous_certificate_grace_s: float = setting(
        60.0,
        doc="After a replaced certificate is swapped in, handshakes that carry the previous one "
        "are still signed this long (edges serve it until their next chain request, "
        "`chain_refresh_s`); 0: refused at once. A SIGHUP reload ends it: after replacing a "
        "compromised key, send SIGHUP so that it signs nothing more.",
        min=0,
        max=86400,
    )
    acme: AcmeConfig | None = setting(
        None,
        doc="Certificates the key server obtains and renews by ACME for keyless hostnames "
        "(docs/acme.md): the key is made and kept here; list each order's key/cert as a "
        "[[keyserver.keys]] entry too. tls-alpn-01 is answered by the origin agent from the "
        "shared challenge_dir; otherwise use dns-01.",
    )

    @property
    def address(self) -> str:
        """The one address `listen` names."""
        return self.listen if isinstance(self.listen, str) else self.listen[0]

    def __post_init__(self) -> None:
        if not self.keys:
            raise ConfigError("keys", "at least one [[keyserver.keys]] is needed")
        if exposed := admin_exposure(self.admin_listen, self.admin_token_file):
            raise ConfigError("admin_token_file", exposed)
        names = [e.name for e in self.edges]
        if len(set(names)) != len(names):
            raise ConfigError("edges", "edge names must be unique")
        fps = [e.fingerprint for e in self.edges]
        if len(set(fps)) != len(fps):
            raise ConfigError("edges", "two edges share a certificate fingerprint")
