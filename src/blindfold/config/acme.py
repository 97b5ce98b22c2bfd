"""Schema of an `[<component>.acme]` table: certificates a component obtains and renews by
ACME (RFC 8555) for the keys it holds (`[origin.acme]`, `[keyserver.acme]`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from blindfold.config.schema import setting
from blindfold.errors import ConfigError


def _url(value: str) -> str | None:
    if not value.startswith("https://"):
        return "must be an https:// URL (RFC 8555 §6.1: ACME runs over HTTPS)"
    return None


def _hostnames(values: tuple[str, ...]) -> str | None:
    from blindfold.acme.challenge import valid_hostname

    if not values:
        return "at least one hostname"
    for i, v in enumerate(values):
        if not valid_hostname(v):
            return f"[{i}]: {v!r} is not a lowercase DNS name (or '*.name')"
    return None


def _contacts(values: tuple[str, ...]) -> str | None:
    for i, v in enumerate(values):
        if not v.startswith("mailto:") or "@" not in v:
            return f"[{i}]: {v!r}: contacts are 'mailto:address' URLs"
    return None


@dataclass(frozen=True, slots=True)
class AcmeOrderConfig:
    hostnames: tuple[str, ...] = setting(
        doc="The names of one certificate (its SANs; '*.name' needs challenge = 'dns-01').",
        check=_hostnames,
    )
    cert: str = setting(
        doc="Where the chain is written (atomically: temporary file, then rename). The origin "
        "agent serves it without a certificates entry; the key server signs for it once a "
        "[[keyserver.keys]] entry names it (and this key)."
    )
    key: str = setting(
        doc="Its private key: generated here (mode 0600) if missing, kept across renewals; "
        "it never leaves this host."
    )
    key_type: Literal["ec-p256", "ec-p384", "rsa-2048", "rsa-3072"] = setting(
        "ec-p256", doc="The key made when `key` does not exist."
    )


@dataclass(frozen=True, slots=True)
class AcmeConfig:
    directory: str = setting(doc="The CA's ACME directory URL.", check=_url)
    account_key: str = setting(
        doc="The ACME account key (ECDSA P-256), created with mode 0600 at the first start."
    )
    orders: tuple[AcmeOrderConfig, ...] = setting(doc="The certificates to obtain and renew.")
    ca_bundle: str = setting(
        "", doc="CA bundle that verifies the ACME server's HTTPS; empty: the system's CAs."
    )
    contact: tuple[str, ...] = setting(
        (), doc="Account contacts ('mailto:ops@example.com').", check=_contacts
    )
    challenge: Literal["tls-alpn-01", "dns-01"] = setting(
        "tls-alpn-01",
        doc="tls-alpn-01 (RFC 8737): the CA connects to the hostname on 443 offering ALPN "
        "acme-tls/1; edges forward such a hello to the origin agent in every mode and it "
        "answers from challenge_dir. dns-01: a TXT record set through dns_hook (wildcards, "
        "hosts with no inbound path).",
    )
    challenge_dir: str = setting(
        "",
        doc="tls-alpn-01: directory where challenge certificates (throwaway keys) are written "
        "for the origin agent, which answers from origin.acme_challenge_dir; the key server "
        "and the origin agent must share it (same host or shared mount), else use dns-01.",
    )
    dns_hook: tuple[str, ...] = setting(
        (),
        doc="dns-01: the command run as `CMD... set|clear NAME VALUE` (no shell); it must exit "
        "0 once the TXT record is served.",
    )
    dns_hook_timeout_s: float = setting(
        120.0, doc="Deadline for one hook run; it is killed after it.", min=1, max=3600
    )
    profile: str = setting(
        "",
        doc="Certificate profile to ask for (draft-ietf-acme-profiles, e.g. 'shortlived'); "
        "the order fails if the CA does not offer it. Empty: the CA's default.",
    )
    renew_fraction: float = setting(
        0.6667,
        doc="Renew once this fraction (two thirds by default) of the lifetime has passed, "
        "unless the CA's renewal "
        "information (RFC 9773) suggests a window: then at a random time inside it.",
        min=0.1,
        max=0.95,
    )
    check_interval_s: float = setting(
        3600.0,
        doc="How often the renewal time is recomputed (the CA's window may move).",
        min=1,
        max=86400,
    )
    retry_initial_s: float = setting(
        60.0, doc="First wait after a failed order; doubled each failure, with jitter.", min=0.1
    )
    forced_renewals_per_week: int = setting(
        3,
        doc="Most admin `POST /acme/renew` accepted in any 7 days (the CA's duplicate-"
        "certificate limit is a few a week); 0 turns forced renewals off.",
        min=0,
        max=50,
    )
    retry_max_s: float = setting(6 * 3600.0, doc="Longest wait between attempts.", min=1)
    order_timeout_s: float = setting(
        300.0, doc="Deadline for one order, challenges and finalisation included.", min=5
    )
    request_timeout_s: float = setting(
        30.0, doc="Deadline for one HTTP request to the CA.", min=1, max=300
    )

    def __post_init__(self) -> None:
        if self.challenge == "tls-alpn-01" and not self.challenge_dir:
            raise ConfigError("challenge_dir", "tls-alpn-01 needs a challenge_dir")
        if self.challenge == "dns-01" and not self.dns_hook:
            raise ConfigError("dns_hook", "dns-01 needs a dns_hook command")
        if self.challenge == "tls-alpn-01":
            for i, o in enumerate(self.orders):
                if any(h.startswith("*.") for h in o.hostnames):
                    raise ConfigError(
                        f"orders[{i}].hostnames", "wildcards need challenge = 'dns-01'"
                    )
        if not self.orders:
            raise ConfigError("orders", "at least one [[...acme.orders]]")
        if self.retry_max_s < self.retry_initial_s:
            raise ConfigError("retry_max_s", "is below retry_initial_s")
