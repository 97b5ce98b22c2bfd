"""The project's small, flat error set. Library exceptions are translated into these once, at
the I/O boundary; protocol cores raise them directly."""

from __future__ import annotations


class BlindfoldError(Exception):
    """Base of every error blindfold raises on purpose."""


class ConfigError(BlindfoldError):
    """The configuration is invalid. `key` is the dotted path of the offending key."""

    def __init__(self, key: str, message: str, where: str = "") -> None:
        # `where`: what the key path alone does not say, e.g. the name of the route at
        # edge.routes[1] ('(route "www")'): shown after the path
        label = f"{key} {where}" if where else key
        super().__init__(f"{label}: {message}" if key else message)
        self.key = key
        self.message = message
        self.where = where


class ProtocolError(BlindfoldError):
    """A peer sent bytes that do not follow the protocol.

    `reason` is a short stable token used as a metric label and in logs (for example
    ``not_tls`` or ``hello_too_large``); `alert` is the TLS alert number to answer with when
    the protocol has one, `status` the HTTP status code likewise.
    """

    def __init__(
        self, reason: str, detail: str = "", *, alert: int | None = None, status: int | None = None
    ) -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.alert = alert
        self.status = status


class UpstreamError(BlindfoldError):
    """An origin or upstream could not be reached or misbehaved.

    `reason` is a short stable token (``connect_failed``, ``timeout``, ``closed``...: a metric
    label and log field); `status` the HTTP status a proxy answers with for it: 504 when the
    upstream did not answer in time, 503 when it was not even tried, 502 otherwise.
    """

    def __init__(self, reason: str, detail: str = "", *, status: int = 502) -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.status = status


class KeyServerError(BlindfoldError):
    """The key server refused or could not be reached. `reason` is a short stable token: the
    key server's own reason for a refusal (``unauthorized_sni``, ``rate_limited``...) or what
    went wrong on the way (``timeout``, ``unreachable``, ``down``...). `retryable`: another key
    server (or a new connection) may succeed; a refusal is final."""

    def __init__(self, reason: str, detail: str = "", *, retryable: bool = False) -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.retryable = retryable


class VerificationError(BlindfoldError):
    """A signature, digest, certificate pin or manifest did not verify."""
