"""Request targets and authorities, sans-IO: the one canonical path every path rule matches
(edge rate limits, origin rate rules, WAF exclusions), and the Host / `:authority` check.

The canonical path is RFC 3986 §6.2.2 syntax-based normalisation of the path: percent-escapes
of unreserved characters decoded (`%6c` -> `l`), the others upper-cased (`%2f` -> `%2F`), empty
segments collapsed (`//`), dot-segments removed (§5.2.4, never above `/`). A `%2F` stays encoded:
it is part of a segment, never a separator. What goes upstream is this canonical path with the
query as sent, so the application routes on exactly what the rules matched. Written here
because the standard library has no such function (`urllib.parse` neither removes dot-segments
from a path nor refuses bad escapes) and every rule needs one exact, property-tested definition.
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass

from blindfold.errors import ProtocolError

_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEX = frozenset(b"0123456789abcdefABCDEF")
# RFC 3986 §3.3 pchar, plus "/" and "%" (checked separately): what a path may hold unescaped.
# A raw backslash is refused (some servers treat it as "/"; browsers never send one).
_PATH_BYTES = frozenset(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~!$&'()*+,;=:@/%"
)
# query: visible ASCII (RFC 3986 §3.4 is stricter, but clients send `|`, `[`, `"`... raw)
# the path bytes that stand for themselves (all but "%"), deleted by bytes.translate
_PLAIN_PATH_BYTES = bytes(sorted(_PATH_BYTES - {0x25}))
_QUERY_BYTES = frozenset(range(0x21, 0x7F)) - {ord("#")}
# a host name as Host headers carry them: DNS labels (and `_`, which some internal names use).
# Narrower than RFC 3986 reg-name on purpose: sub-delims (`,` `;` `=` `"`...) and escapes have
# no place in a name we route on and would split list-valued forwarding headers.
_NAME_BYTES = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._")
_NAME_BYTES_TABLE = bytes(sorted(_NAME_BYTES))  # for bytes.translate (deletes them)
MAX_AUTHORITY = 255 + 8  # a DNS name and ":65535"
# per-request parsing remembered (bounded: at most _MEMO_ENTRIES of each, keys of bounded size)
_MEMO_ENTRIES = 1024
_MEMO_TARGET_BYTES = 512


def _bad(reason: str, detail: str) -> ProtocolError:
    return ProtocolError(reason, detail, status=400)


def canonical_path(raw: bytes) -> bytes:
    """The canonical form of an origin-form path (no query). Raises ProtocolError (400) for a
    path not starting with `/`, a byte a path cannot hold, a bad or NUL percent-escape."""
    if not raw.startswith(b"/"):
        raise _bad("bad_target", "the path must start with /")
    # A path whose every byte stands for itself (no escape, nothing refused; most paths) is
    # what `_normalise_escapes` would return: bytes.translate tells in C, where that pass costs
    # ~4 lines of Python per byte.
    path = _normalise_escapes(raw) if raw.translate(None, _PLAIN_PATH_BYTES) else bytes(raw)
    if b"//" not in path and b"/." not in path:
        return path  # no empty segment, no dot-segment: the pass below returns it unchanged
    # RFC 3986 §5.2.4 on segments, with empty segments dropped ("//" -> "/"). A dot-segment
    # with `;` parameters (`..;x`) is a dot-segment too: servlet containers strip parameters
    # before they remove dot-segments, so `/static/..;/login` is their `/login`.
    parts = path.split(b"/")[1:]
    stack: list[bytes] = []
    for segment in parts:
        name = segment.partition(b";")[0] if b";" in segment else segment
        if segment == b"" or name == b".":
            continue
        if name == b"..":
            if stack:
                stack.pop()
            continue
        stack.append(segment)
    if not stack:
        return b"/"
    last = parts[-1].partition(b";")[0]
    trailing = parts[-1] == b"" or last in (b".", b"..")
    return b"/" + b"/".join(stack) + (b"/" if trailing else b"")


def _normalise_escapes(raw: bytes) -> bytes:
    """Percent-escapes of unreserved characters decoded, the others upper-cased (RFC 3986
    §6.2.2.1-2); every other byte checked against what a path may hold."""
    out = bytearray()
    i, n = 0, len(raw)
    while i < n:
        c = raw[i]
        if c == 0x25:  # "%"
            pair = raw[i + 1 : i + 3]
            if len(pair) != 2 or pair[0] not in _HEX or pair[1] not in _HEX:
                raise _bad("bad_target", "invalid percent-escape in the path")
            value = int(pair, 16)
            if value == 0:
                raise _bad("bad_target", "NUL in the path")
            if value in _UNRESERVED:
                out.append(value)  # RFC 3986 §6.2.2.2
            else:
                out += b"%" + pair.upper()  # RFC 3986 §6.2.2.1
            i += 3
            continue
        if c not in _PATH_BYTES:
            raise _bad("bad_target", f"byte 0x{c:02x} in the path")
        out.append(c)
        i += 1
    return bytes(out)


@dataclass(frozen=True, slots=True)
class Target:
    """A request target, reduced to what is forwarded: `path` (canonical, or `*`), the query
    as sent (None: no `?`), and the authority of an absolute-form target (None otherwise)."""

    path: bytes
    query: bytes | None
    authority: bytes | None = None

    @property
    def origin_form(self) -> bytes:
        return self.path if self.query is None else self.path + b"?" + self.query


def parse_target(method: bytes, raw: bytes) -> Target:
    """`_parse_target`, remembered for short targets (a keep-alive connection asks for the same
    few; a Target is immutable): valid ones only, errors are raised each time."""
    if len(raw) <= _MEMO_TARGET_BYTES:
        return _parse_target_memo(method, raw)
    return _parse_target(method, raw)


def _parse_target(method: bytes, raw: bytes) -> Target:
    """RFC 9112 §3.2: origin-form, absolute-form (http/https; reduced to origin-form, its
    authority returned) or asterisk-form (OPTIONS only). Authority-form (CONNECT) is not served
    by a reverse proxy. Raises ProtocolError (400)."""
    if raw == b"*":
        if method != b"OPTIONS":
            raise _bad("bad_target", "'*' is a target for OPTIONS only")
        return Target(b"*", None)
    authority = None
    if not raw.startswith(b"/"):
        scheme, sep, rest = raw.partition(b"://")
        if not sep or scheme.lower() not in (b"http", b"https"):
            raise _bad("bad_target", "expected /path or an http(s):// absolute URI")
        end = min((i for i in (rest.find(b"/"), rest.find(b"?")) if i >= 0), default=len(rest))
        authority = check_authority(rest[:end])
        raw = rest[end:]
        if not raw.startswith(b"/"):
            raw = b"/" + raw  # RFC 9112 §3.2.2: an empty path is "/"
    if b"#" in raw:
        raise _bad("bad_target", "a fragment is not part of a request target")
    path, sep, query = raw.partition(b"?")
    if sep and any(c not in _QUERY_BYTES for c in query):
        raise _bad("bad_target", "invalid byte in the query")
    return Target(canonical_path(path), query if sep else None, authority)


def check_authority(value: bytes) -> bytes:
    """`_check_authority`, remembered: a site's visitors send the same few hosts (valid ones
    are at most MAX_AUTHORITY bytes; errors are raised each time, never remembered)."""
    return _check_authority_memo(value)


def _check_authority(value: bytes) -> bytes:
    """A Host / `:authority` value: RFC 3986 host (IP-literal, IPv4 address, or a DNS-style
    name) and an optional port; no userinfo. Returns it unchanged; raises ProtocolError (400)."""
    if not value or len(value) > MAX_AUTHORITY:
        raise _bad("bad_host", "empty or overlong host")
    if value.startswith(b"["):
        end = value.find(b"]")
        if end < 0:
            raise _bad("bad_host", "unterminated IP literal")
        literal, rest = value[1:end], value[end + 1 :]
        try:
            if ipaddress.ip_address(literal.decode("ascii")).version != 6:
                raise ValueError
        except (ValueError, UnicodeDecodeError):
            raise _bad("bad_host", "invalid IPv6 literal") from None
        if b"%" in literal:
            raise _bad("bad_host", "zone identifiers are not allowed")  # RFC 6874 §2 in URIs
    else:
        name, colon, port_text = value.partition(b":")
        rest = colon + port_text
        if not name or name.translate(None, _NAME_BYTES_TABLE):  # a byte a name cannot hold
            raise _bad("bad_host", "invalid host name")
        if name.startswith((b".", b"-")) or b".." in name:
            raise _bad("bad_host", "invalid host name")
    if rest:
        port = rest[1:]
        if not rest.startswith(b":") or not port.isdigit() or len(port) > 5 or int(port) > 65535:
            raise _bad("bad_host", "invalid port")
    return value


@functools.lru_cache(maxsize=_MEMO_ENTRIES)
def host_of(authority: bytes) -> str:
    """The host of a checked authority, lower-case, without brackets or port."""
    text = authority.decode("ascii").lower()
    if text.startswith("["):
        return text[1:].partition("]")[0]
    return text.partition(":")[0].rstrip(".")


_parse_target_memo = functools.lru_cache(maxsize=_MEMO_ENTRIES)(_parse_target)
_check_authority_memo = functools.lru_cache(maxsize=_MEMO_ENTRIES)(_check_authority)


def same_authority(a: bytes, b: bytes) -> bool:
    """Two authorities name the same host and port (case-insensitive host)."""
    return a.lower() == b.lower()


@functools.lru_cache(maxsize=1024)
def rule_prefix(prefix: str) -> str:
    """A configured path prefix in the form paths are compared in: canonical, without a
    trailing `/` (so `/api` and `/api/` both mean "the /api segment and below")."""
    path = canonical_path(prefix.encode("latin-1")).decode("latin-1")
    return path.rstrip("/") or "/"


def check_rule_prefix(prefix: str) -> str | None:
    """Config check for a path prefix: None, or the problem."""
    try:
        rule_prefix(prefix)
    except (ProtocolError, UnicodeEncodeError) as exc:
        return f"{prefix!r} is not a URL path ({exc})"
    return None


def rule_path(path: str) -> str:
    """What a path rule compares: the canonical path with the `;` parameters of every segment
    dropped and the segments left empty collapsed, as servlet containers route it
    (`/api;x/admin` and `/;x/api/admin` are their `/api/admin`). Applications that keep `;` in
    the segment see a path no rule-protected resource has, so matching the stricter reading
    errs on the side of applying the rule."""
    if ";" not in path:
        return path
    names = [segment.partition(";")[0] for segment in path.split("/")[1:]]
    return "/" + "/".join(name for name in names if name)


def path_has_prefix(path: str, prefix: str) -> bool:
    """`path` (canonical) is the configured `prefix` or below it, on a segment boundary:
    `/login` covers `/login`, `/login/x` and `/login;jsessionid=1`, not `/loginX`; `;`
    parameters anywhere are ignored (`rule_path`)."""
    prefix = rule_prefix(prefix)
    if prefix == "/":
        return True
    path = rule_path(path)
    if not path.startswith(prefix):
        return False
    return len(path) == len(prefix) or path[len(prefix)] == "/"
