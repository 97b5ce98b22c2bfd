"""When to renew a certificate, which profile to ask for, how long to wait after a failure.

Sans-IO: times are POSIX seconds passed in (`now`), randomness is a `random.Random` passed in.
- Without renewal information: at `fraction` (default 2/3) of the certificate's lifetime.
- With ACME Renewal Information (RFC 9773): at a time chosen uniformly inside the CA's
  `suggestedWindow` (§4.2); a window that has already passed means "renew now".
- Certificate profiles (draft-ietf-acme-profiles §3, §4): the directory's `meta.profiles`
  object lists the profiles by name; the order names one of them.
- Retries: exponential backoff with full jitter, capped, never sooner than the CA's
  Retry-After.
"""

from __future__ import annotations

import base64
import datetime
import json
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography import x509

from blindfold.errors import ProtocolError

MAX_RENEWAL_INFO_BYTES = 16384


@dataclass(frozen=True, slots=True)
class RenewalWindow:
    """RFC 9773 §4.2 `suggestedWindow` (POSIX seconds) and the optional explanation URL."""

    start: float
    end: float
    explanation_url: str = ""


def _timestamp(value: Any, where: str) -> float:
    # RFC 9773 §4.2: RFC 3339 date-times
    if not isinstance(value, str):
        raise ProtocolError("bad_renewal_info", f"{where} is not a string")
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        when = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise ProtocolError("bad_renewal_info", f"{where} is not an RFC 3339 time") from None
    if when.tzinfo is None:
        raise ProtocolError("bad_renewal_info", f"{where} has no time zone")
    return when.timestamp()


def parse_renewal_info(body: bytes) -> RenewalWindow:
    """The CA's RenewalInfo object (RFC 9773 §4.2). ProtocolError on anything else: a window
    whose end is not after its start is invalid (§4.2: the client then treats it as absent)."""
    if len(body) > MAX_RENEWAL_INFO_BYTES:
        raise ProtocolError("bad_renewal_info", "renewal info too large")
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ProtocolError("bad_renewal_info", "not JSON") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("suggestedWindow"), dict):
        raise ProtocolError("bad_renewal_info", "no suggestedWindow object")
    window = doc["suggestedWindow"]
    start = _timestamp(window.get("start"), "suggestedWindow.start")
    end = _timestamp(window.get("end"), "suggestedWindow.end")
    if not end > start:
        raise ProtocolError("bad_renewal_info", "suggestedWindow.end is not after its start")
    url = doc.get("explanationURL", "")
    return RenewalWindow(start, end, url if isinstance(url, str) else "")


def renewal_info_id(cert: x509.Certificate) -> str:
    """RFC 9773 §4.1: base64url(AKI keyIdentifier) "." base64url(DER serial bytes), no
    padding. ProtocolError when the certificate has no Authority Key Identifier."""
    try:
        aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    except x509.ExtensionNotFound:
        raise ProtocolError("no_aki", "certificate has no Authority Key Identifier") from None
    if aki.key_identifier is None:
        raise ProtocolError("no_aki", "Authority Key Identifier has no keyIdentifier")
    serial = cert.serial_number
    # the DER INTEGER's content octets: two's complement, with room for the sign bit
    raw = serial.to_bytes(math.ceil((serial.bit_length() + 1) / 8), "big", signed=True)

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).decode().rstrip("=")

    return f"{b64(aki.key_identifier)}.{b64(raw)}"


def lifetime_renewal_time(not_before: float, not_after: float, fraction: float) -> float:
    """Renew once `fraction` of the lifetime has passed (2/3 for 90-day and 6-day
    certificates alike: 30 days resp. 2 days of margin)."""
    return not_before + (not_after - not_before) * fraction


def renewal_time(
    not_before: float,
    not_after: float,
    fraction: float,
    window: RenewalWindow | None,
    rng: random.Random,
) -> float:
    """When to renew: inside the ARI window when there is one (RFC 9773 §4.2: a uniformly
    random time in it), else at `fraction` of the lifetime. The caller renews when
    `now >= renewal_time(...)`: a window in the past therefore means at once."""
    if window is None:
        return lifetime_renewal_time(not_before, not_after, fraction)
    return window.start + rng.random() * (window.end - window.start)


def select_profile(directory_meta: Any, wanted: str) -> str | None:
    """The profile to name in newOrder (draft-ietf-acme-profiles §4): None when `wanted` is
    empty (the CA's default). ProtocolError `profile_unavailable` when the CA advertises no
    profiles or not this one: an order must not silently get another profile."""
    if not wanted:
        return None
    profiles = directory_meta.get("profiles") if isinstance(directory_meta, Mapping) else None
    if not isinstance(profiles, Mapping) or not profiles:
        raise ProtocolError("profile_unavailable", f"the CA offers no profiles (wanted {wanted!r})")
    if wanted not in profiles:
        offered = ", ".join(sorted(str(p) for p in profiles))
        raise ProtocolError("profile_unavailable", f"{wanted!r} not offered (offered: {offered})")
    return wanted


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with full jitter: attempt n (1-based) waits a uniformly random time
    in [base/2, base] where base = min(initial_s * 2**(n-1), max_s), and never less than a
    Retry-After the CA sent."""

    initial_s: float = 60.0
    max_s: float = 6 * 3600.0

    def delay(self, attempt: int, rng: random.Random, retry_after_s: float = 0.0) -> float:
        base = min(self.initial_s * (2.0 ** max(0, min(attempt - 1, 60))), self.max_s)
        return max(base / 2 + rng.random() * base / 2, retry_after_s)
