"""Value checks shared by every section of the configuration."""

from __future__ import annotations

import ipaddress
import math
import os
import re
import stat

from blindfold.errors import ConfigError

# Go's time.Duration text ('4h', '1h30m', '2.5s', '-1.5s'): CrowdSec's durations, and what
# people type for a duration in a config file
_GO_DURATION = re.compile(r"(-?)((?:\d+(?:\.\d*)?|\.\d+)(?:h|ms|us|µs|ns|m|s))+")
_GO_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(h|ms|us|µs|ns|m|s)")
_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


def duration_seconds(text: str) -> float:
    """Seconds in a Go-style duration ('4h', '3h59m59.99s', '-1.5s'). Raises ValueError."""
    if not isinstance(text, str) or not _GO_DURATION.fullmatch(text):
        raise ValueError(f"duration {text!r}")
    total = sum(float(n) * _UNITS[u] for n, u in _GO_PART.findall(text))
    if not math.isfinite(total):  # '999…9h' past a float's range: not a duration
        raise ValueError(f"duration {text[:40]!r}… too long")
    return -total if text.startswith("-") else total


def check_readable(*files: tuple[str, str]) -> None:
    """(key, path) pairs: a ConfigError naming the key of the first file that cannot be read,
    so that a wrong key path blames `key`, not the certificate loaded with it."""
    from blindfold.errors import ConfigError

    for key, path in files:
        try:
            with open(path, "rb") as fh:
                fh.read(1)
        except OSError as exc:
            raise ConfigError(key, f"cannot read {path}: {exc.strerror or exc}") from None


_HOSTNAME_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")


def parse_hostport(text: str) -> tuple[str, int]:
    """'127.0.0.1:8443' or '[::1]:8443' -> (host, port). Raises ValueError with the fix."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"{text!r} is not '[ipv6]:port'")
    else:
        host, sep, port = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"{text!r} is not 'host:port'")
        if ":" in host:
            raise ValueError(f"{text!r}: write IPv6 addresses as '[addr]:port'")
    if not (port.isascii() and port.isdigit()) or not 0 <= int(port) <= 65535:
        raise ValueError(f"{text!r}: port must be 0..65535")
    return host, int(port)


def check_ip_hostport(text: str) -> str | None:
    """A listen address: an IP literal and a port."""
    try:
        host, _port = parse_hostport(text)
        ipaddress.ip_address(host)
    except ValueError as exc:
        return f"{exc}; expected an IP address and port such as '127.0.0.1:8443'"
    return None


def check_hostport(text: str) -> str | None:
    """An upstream address: an IP literal or a hostname, and a port."""
    try:
        host, port = parse_hostport(text)
    except ValueError as exc:
        return str(exc)
    if port == 0:
        return f"{text!r}: port 0 is not a destination"
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not is_hostname(host):
            return f"{text!r}: {host!r} is neither an IP address nor a hostname"
    return None


def is_hostname(name: str) -> bool:
    name = name.lower().rstrip(".")
    if not name or len(name) > 253:
        return False
    return all(_HOSTNAME_LABEL.match(label) for label in name.split("."))


def check_sni_pattern(pattern: str) -> str | None:
    """An exact hostname or a '*.' wildcard covering every name below a suffix."""
    body = pattern[2:] if pattern.startswith("*.") else pattern
    if not is_hostname(body) or "*" in body:
        return (
            f"{pattern!r} is not a hostname or '*.suffix' wildcard "
            "(ASCII letters, digits, '-', '_'; IDNs in their xn-- form)"
        )
    if pattern != pattern.lower():
        return f"{pattern!r}: write names in lower case"
    return None


def covers(pattern: str, name: str) -> bool:
    """An SNI pattern (exact, or '*.suffix': any depth below the suffix) covers `name`."""
    if pattern.startswith("*."):
        return name.endswith(pattern[1:]) and len(name) > len(pattern) - 1
    return pattern == name


def _loopback(host: str | None) -> bool:
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_redis_url(text: str) -> str | None:
    """rediss:// (TLS), redis:// to a loopback address only, or unix:// (a local socket)."""
    from urllib.parse import urlsplit

    if not text:
        return None
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 (raises ValueError for a bad port)
    except ValueError as exc:
        return f"{text!r} is not a URL: {exc}"
    if parts.scheme == "unix":
        return None if parts.path else f"{text!r}: unix:// needs a socket path"
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        return f"{text!r}: expected rediss://host:port/db (or redis:// on loopback, unix://)"
    if parts.scheme == "redis" and not _loopback(parts.hostname):
        return (
            "a Redis that is not on this machine needs TLS: use rediss:// "
            "(plain redis:// only to 127.0.0.1 or [::1])"
        )
    return None


def unspecified_listen(text: str) -> bool:
    """'0.0.0.0:p' or '[::]:p': every address of the machine."""
    try:
        host, _port = parse_hostport(text)
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


ADMIN_TOKEN_DOC = (
    "File holding the admin listener's bearer token (at least 16 characters; clients send "
    "'Authorization: Bearer <token>'; the status page reads it from its URL's fragment, "
    "'#token=...'). The file must be a regular file owned by the process's user or root, mode "
    "0600 or 0640 (not writable by its group, nothing for others), or the process refuses to "
    "start. Required when admin_listen is not a loopback "
    "address; empty = no token."
)


def admin_exposure(listen: str, token_file: str) -> str | None:
    """Why an admin listener off loopback without a token is refused (None: fine)."""
    try:
        host, _port = parse_hostport(listen)
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        return None  # the address check names the problem
    if loopback or token_file:
        return None
    return (
        f"admin_listen = {listen!r} is not a loopback address: set admin_token_file (its "
        "/metrics and /status.json would be readable by anyone who reaches it)"
    )


MAX_TOKEN_FILE_BYTES = 4096


def load_admin_token(path: str, where: str) -> bytes | None:
    """The admin token from its file (None when no file is set); ConfigError names `where`.
    Opened, then checked on what was opened (fstat: no stat-then-read race): a regular file,
    owned by this process's user or root, and like ssh with a private key, not readable by
    others nor writable by its group (a token others can read or change is not secret;
    group-read, 0640 for a service group, is allowed as for operator keys)."""
    if not path:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise ConfigError(where, f"cannot read {path}: {exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(where, f"{path} is not a regular file")
        mode = st.st_mode
        if st.st_uid not in (os.geteuid(), 0):
            raise ConfigError(
                where,
                f"{path} is owned by uid {st.st_uid}: the admin token must be owned by this "
                f"process's user (uid {os.geteuid()}) or root (someone else can rewrite it)",
            )
        if mode & 0o037:
            raise ConfigError(
                where,
                f"{path} is mode {oct(mode & 0o777)}: the admin token must be readable by its "
                "owner (and its group) only: chmod 600 (or 640)",
            )
        token = os.read(fd, MAX_TOKEN_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(where, f"cannot read {path}: {exc}") from None
    finally:
        os.close(fd)
    if len(token) > MAX_TOKEN_FILE_BYTES:
        raise ConfigError(where, f"{path}: longer than {MAX_TOKEN_FILE_BYTES} bytes")
    token = token.strip()
    if len(token) < 16 or not all(0x21 <= b < 0x7F for b in token):
        raise ConfigError(where, f"{path}: the token must be 16 or more printable characters")
    return token
