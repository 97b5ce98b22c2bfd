"""Cache purges, sans-IO: what an operator asks to remove from every edge's caches, how the
origin keeps them for the edges that follow its stream, how they are signed for Redis, and
how an edge recognises one it has already applied.

A purge names, all bounded (MAX_PURGE_ITEMS in all, each at most MAX_ITEM_CHARS):
- `urls`: "host/target" (scheme dropped, host lower-cased): the keyless cache's key for one
  request target (path and query);
- `prefixes`: "host/path-prefix": every stored target of that host whose path is the prefix or
  below it, on a segment boundary (web.target.path_has_prefix, as rate rules match);
- `tags`: the names a response listed in its `Cache-Tag` header when the edge stored it;
- `blobs`: blind routes' blob ids (`/b/<id>`, `/p/<id>.js|.css`).

Trust: a purge comes only from the origin's own channels, the ones decisions come from: the
HTTPS stream (TLS to the origin, the edge's API key) and Redis, where every edge can write,
so there it is signed with the origin's decision key (Ed25519, its own purpose prefix) and
refused when older than MAX_SIGNED_AGE_S or already seen (a replay would only make misses,
but misses cost the origin).

Wire format on Redis (version 1), as `blindfold.decisions.signed`'s:
    bfp1.<signer>.<payload>.<signature>
signature over b"blindfold purge v1\\x00" + signer + b"." + payload.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import secrets
from collections import OrderedDict
from collections.abc import Container, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from blindfold.decisions.signed import key_id
from blindfold.errors import ProtocolError
from blindfold.web.target import rule_path, rule_prefix

PURGE_PURPOSE = b"blindfold purge v1\x00"
PURGE_MAGIC = "bfp1"
MAX_PURGE_ITEMS = 100  # urls + prefixes + tags + blobs in one purge
MAX_ITEM_CHARS = 1024
MAX_TAG_CHARS = 128
MAX_OPERATOR_CHARS = 64
MAX_REQUEST_BYTES = 160 * 1024  # an operator's purge request (100 items of 1024 characters)
MAX_PURGE_BYTES = 512 * 1024  # one purge as sent to the edges (JSON escapes, base64)
MAX_PURGE_LOG = 1000  # purges the origin keeps for its stream followers
MAX_PURGE_LOG_BYTES = 16 << 20  # ... and their items' characters at most
MAX_PURGES_PER_ANSWER = 50  # purges in one answer of the log (the rest: at the next poll)
MAX_SIGNED_AGE_S = 60.0  # a signed purge older (or newer) than this is refused
MAX_SEEN = 10_000  # purge ids an edge remembers (dedupe across stream and Redis)
SEEN_S = 600.0
MAX_TAGS_PER_RESPONSE = 32  # tags recorded per stored response; more are ignored
MAX_CACHE_TAG_BYTES = 4096  # a Cache-Tag header longer than this is not read
CACHE_TAG_HEADER = b"cache-tag"

_TAG = re.compile(r"[!#-+\--~]{1,128}")  # visible ASCII but for space, comma, and '"'
_BLOB = re.compile(r"[0-9a-f]{32}(?:\.js|\.css)?")
_HOST = re.compile(r"[a-z0-9._:\[\]-]{1,255}")


@dataclass(frozen=True, slots=True)
class Purge:
    id: str
    urls: tuple[str, ...] = ()
    prefixes: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    blobs: tuple[str, ...] = ()
    issued: float = 0.0
    operator: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "urls": list(self.urls),
            "prefixes": list(self.prefixes),
            "tags": list(self.tags),
            "blobs": list(self.blobs),
            "issued": self.issued,
            "operator": self.operator,
        }

    @property
    def size(self) -> int:
        return len(self.urls) + len(self.prefixes) + len(self.tags) + len(self.blobs)


def _url_item(text: str, what: str) -> str:
    """'https://Host/target', 'host/target' -> 'host/target'. The target starts with '/'."""
    if not isinstance(text, str) or not text or len(text) > MAX_ITEM_CHARS or not text.isascii():
        raise ProtocolError("bad_purge", f"{what}: not a URL of at most {MAX_ITEM_CHARS} chars")
    rest = text
    for scheme in ("https://", "http://"):
        if rest.lower().startswith(scheme):
            rest = rest[len(scheme) :]
            break
    host, slash, target = rest.partition("/")
    host = host.lower()
    if not slash or not _HOST.fullmatch(host) or "#" in target:
        raise ProtocolError("bad_purge", f"{what}: {text[:100]!r} is not host/path")
    if any(c <= " " or c == "\x7f" for c in target):
        raise ProtocolError("bad_purge", f"{what}: {text[:100]!r} has spaces or controls")
    return f"{host}/{target}"


def _items(obj: dict[str, Any], key: str) -> list[str]:
    value = obj.get(key) or []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ProtocolError("bad_purge", f"{key} is not a list of strings")
    return value


def parse_purge(obj: Any, *, id_: str, issued: float, operator: str) -> Purge:
    """An operator's request ({urls, prefixes, tags, blobs}) or a purge as the origin sends it
    -> Purge, every item checked and normalised. Raises ProtocolError('bad_purge')."""
    if not isinstance(obj, dict):
        raise ProtocolError("bad_purge", "not a JSON object")
    unknown = set(obj) - {"urls", "prefixes", "tags", "blobs", "id", "issued", "operator"}
    if unknown:
        raise ProtocolError("bad_purge", f"unknown field {sorted(unknown)[0][:40]!r}")
    urls = tuple(dict.fromkeys(_url_item(u, "urls") for u in _items(obj, "urls")))
    prefixes = []
    for p in _items(obj, "prefixes"):
        item = _url_item(p, "prefixes")
        if "?" in item:
            raise ProtocolError("bad_purge", f"prefixes: {p[:100]!r} has a query")
        host, _, path = item.partition("/")
        try:  # the form paths are compared in (as rate rules' prefixes): canonical, no '/' end
            path = rule_prefix("/" + path)
        except (ProtocolError, UnicodeEncodeError):
            raise ProtocolError("bad_purge", f"prefixes: {p[:100]!r} is not a path") from None
        prefixes.append(f"{host}{path}")
    tags = _items(obj, "tags")
    for t in tags:
        if not _TAG.fullmatch(t):
            raise ProtocolError("bad_purge", f"tags: {t[:100]!r} is not a tag")
    blobs = _items(obj, "blobs")
    for b in blobs:
        if not _BLOB.fullmatch(b):
            raise ProtocolError("bad_purge", f"blobs: {b[:100]!r} is not a blob id")
    purge = Purge(
        id_,
        urls,
        tuple(dict.fromkeys(prefixes)),
        tuple(dict.fromkeys(tags)),
        tuple(dict.fromkeys(blobs)),
        issued,
        operator[:MAX_OPERATOR_CHARS],
    )
    if purge.size == 0:
        raise ProtocolError("bad_purge", "names nothing to purge")
    if purge.size > MAX_PURGE_ITEMS:
        raise ProtocolError("bad_purge", f"more than {MAX_PURGE_ITEMS} items")
    return purge


def purge_from_json(obj: Any) -> Purge:
    """A purge as the origin sent it (stream, or a verified Redis payload)."""
    if not isinstance(obj, dict):
        raise ProtocolError("bad_purge", "not a JSON object")
    id_ = obj.get("id")
    issued = obj.get("issued")
    operator = obj.get("operator", "")
    if not isinstance(id_, str) or not re.fullmatch(r"[0-9a-f]{16,64}", id_):
        raise ProtocolError("bad_purge", "no id")
    if isinstance(issued, bool) or not isinstance(issued, (int, float)):
        raise ProtocolError("bad_purge", "no issued time")
    if not math.isfinite(issued) or not isinstance(operator, str):
        raise ProtocolError("bad_purge", "bad issued time or operator")
    return parse_purge(obj, id_=id_, issued=float(issued), operator=operator)


def new_purge_id() -> str:
    return secrets.token_hex(8)


# ---------------------------------------------------------------- what an edge's cache matches
@dataclass(frozen=True, slots=True)
class PurgeMatcher:
    """A purge as a keyless cache tests its keys (authority, target) and tags. Per entry: a
    tag set test, a host lookup (memoised per authority), then the URL set and the path's
    ancestors in the prefix set: the cost does not grow with the number of prefixes."""

    urls: dict[str, frozenset[str]]  # host -> targets
    prefixes: dict[str, frozenset[str]]  # host -> canonical path prefixes (rule_prefix)
    tags: frozenset[str]
    _hosts: dict[bytes, tuple[str, ...]] = field(default_factory=dict)  # authority -> named hosts

    @classmethod
    def of(cls, purge: Purge) -> PurgeMatcher:
        urls: dict[str, set[str]] = {}
        for u in purge.urls:
            host, _, target = u.partition("/")
            urls.setdefault(host, set()).add("/" + target)
        prefixes: dict[str, set[str]] = {}
        for p in purge.prefixes:
            host, _, path = p.partition("/")
            prefixes.setdefault(host, set()).add("/" + path)
        return cls(
            {h: frozenset(t) for h, t in urls.items()},
            {h: frozenset(ps) for h, ps in prefixes.items()},
            frozenset(purge.tags),
        )

    @property
    def empty(self) -> bool:
        return not (self.urls or self.prefixes or self.tags)

    def _named(self, authority: bytes) -> tuple[str, ...]:
        """The hosts of this purge that `authority` is (with or without its port)."""
        hosts = self._hosts.get(authority)
        if hosts is None:
            full = authority.decode("latin-1").lower()
            host = _without_port(full)
            named = self.urls.keys() | self.prefixes.keys()
            hosts = tuple(h for h in dict.fromkeys((host, full)) if h in named)
            if len(self._hosts) < 10_000:
                self._hosts[authority] = hosts
        return hosts

    def matches(self, authority: bytes, target: bytes, tags: frozenset[str]) -> bool:
        if tags and self.tags and not self.tags.isdisjoint(tags):
            return True
        hosts = self._named(authority)
        if not hosts:
            return False
        text = target.decode("latin-1")
        path = ""
        for h in hosts:
            if text in self.urls.get(h, ()):
                return True
            prefixes = self.prefixes.get(h)
            if not prefixes:
                continue
            if "/" in prefixes:
                return True
            path = path or rule_path(text.partition("?")[0])
            i = path.find("/", 1)  # each ancestor segment boundary, then the path itself
            while i != -1:
                if path[:i] in prefixes:
                    return True
                i = path.find("/", i + 1)
            if path.rstrip("/") in prefixes:
                return True
        return False


def _without_port(authority: str) -> str:
    """'example.com:8443' -> 'example.com', '[2001:db8::1]:443' -> '[2001:db8::1]': a purge
    that names a host without a port covers every port (one with a port, that port only)."""
    if authority.startswith("["):
        return authority.partition("]")[0] + "]"
    host, sep, port = authority.rpartition(":")
    return host if sep and port.isdigit() else authority


def parse_cache_tags(headers: list[tuple[bytes, bytes]]) -> frozenset[str]:
    """The tags of a response's `Cache-Tag` header fields (comma-separated), at most
    MAX_TAGS_PER_RESPONSE, each a valid tag of at most MAX_TAG_CHARS; the rest is ignored."""
    tags: list[str] = []
    total = 0
    for k, v in headers:
        if k != CACHE_TAG_HEADER:
            continue
        total += len(v)
        if total > MAX_CACHE_TAG_BYTES:
            break
        for part in v.decode("latin-1").split(","):
            tag = part.strip()
            if tag and _TAG.fullmatch(tag) and tag not in tags:
                tags.append(tag)
                if len(tags) >= MAX_TAGS_PER_RESPONSE:
                    return frozenset(tags)
    return frozenset(tags)


# ---------------------------------------------------------------- the origin's log
class PurgeLog:
    """The purges an origin made, for the edges following its HTTPS stream. A position is
    `<epoch>.<count>`: the purges an edge has seen. A position from another epoch (the origin
    restarted) or past the end is answered from the start of this log (every purge made since
    the restart: an edge that skipped to the end kept serving what they purged), or `reset`
    when the log no longer holds its start; one older than the log holds (more than
    MAX_PURGE_LOG purges since) is answered `reset` too: the edge cannot know what it missed
    and empties its caches."""

    def __init__(
        self, max_entries: int = MAX_PURGE_LOG, max_bytes: int = MAX_PURGE_LOG_BYTES
    ) -> None:
        self.epoch = secrets.token_hex(4)
        self.items: list[Purge] = []
        self.base = 0  # the count of items[0]
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.bytes = 0  # the characters of the items held (about their size)

    def add(self, purge: Purge) -> None:
        self.items.append(purge)
        self.bytes += _chars(purge)
        drop = 0
        while len(self.items) - drop > self.max_entries or (
            self.bytes > self.max_bytes and len(self.items) - drop > 1
        ):
            self.bytes -= _chars(self.items[drop])
            drop += 1
        if drop:
            del self.items[:drop]
            self.base += drop

    @property
    def end(self) -> int:
        return self.base + len(self.items)

    def since(self, position: str | None) -> tuple[list[Purge], str, bool]:
        """(purges after `position`, the new position, reset?)."""
        here = f"{self.epoch}.{self.end}"
        if not position:
            return [], here, False
        epoch, _, count = position.partition(".")
        n = int(count) if count.isdigit() and len(count) <= 18 else -1
        if epoch != self.epoch or not 0 <= n <= self.end:
            n = 0  # another life of this log (or a made-up position): all of this one
        if n < self.base:
            return [], here, True
        items = self.items[n - self.base : n - self.base + MAX_PURGES_PER_ANSWER]
        return items, f"{self.epoch}.{n + len(items)}", False


def _chars(purge: Purge) -> int:
    return 100 + sum(map(len, (*purge.urls, *purge.prefixes, *purge.tags, *purge.blobs)))


# ---------------------------------------------------------------- signed, for Redis
def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    if not text or not text.isascii() or "=" in text:
        raise ValueError("not base64url")
    return base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)


def sign_purge(key: Ed25519PrivateKey, purge: Purge) -> str:
    signer = key_id(key.public_key())
    payload = _b64(json.dumps(purge.to_json(), separators=(",", ":")).encode())
    signature = key.sign(PURGE_PURPOSE + f"{signer}.{payload}".encode("ascii"))
    return f"{PURGE_MAGIC}.{signer}.{payload}.{_b64(signature)}"


def is_signed_purge(message: bytes | str) -> bool:
    prefix = PURGE_MAGIC + "."
    if isinstance(message, bytes):
        return message.startswith(prefix.encode())
    return message.startswith(prefix)


def open_purge(
    message: bytes | str,
    keys: dict[str, Ed25519PublicKey],
    now: float,
    max_age_s: float = MAX_SIGNED_AGE_S,
) -> Purge:
    """Verify one signed purge against the origins' keys ({key id: key}). Raises ProtocolError:
    unsigned | unknown_signer | bad_signature | bad_purge | expired (issued more than
    `max_age_s` away from `now`)."""
    if len(message) > MAX_PURGE_BYTES:
        raise ProtocolError("unsigned", "too long to be a signed purge")
    if isinstance(message, bytes):
        try:
            message = message.decode("ascii")
        except UnicodeDecodeError:
            raise ProtocolError("unsigned", "not ASCII") from None
    parts = message.split(".")
    if len(parts) != 4 or parts[0] != PURGE_MAGIC:
        raise ProtocolError("unsigned", "not a bfp1 signed purge")
    _magic, signer, encoded, sig_text = parts
    key = keys.get(signer)
    if key is None:
        raise ProtocolError("unknown_signer", f"signer {signer[:20]!r}")
    try:
        key.verify(_unb64(sig_text), PURGE_PURPOSE + f"{signer}.{encoded}".encode("ascii"))
    except (ValueError, binascii.Error, InvalidSignature, UnicodeEncodeError):
        raise ProtocolError("bad_signature", f"signer {signer}") from None
    try:
        obj = json.loads(_unb64(encoded))
    except (ValueError, binascii.Error, RecursionError):
        raise ProtocolError("bad_purge", "signed payload is not JSON") from None
    purge = purge_from_json(obj)
    if abs(now - purge.issued) > max_age_s:
        raise ProtocolError("expired", f"purge {purge.id} issued {purge.issued}")
    return purge


class SeenPurges:
    """Purge ids an edge has applied (a purge arrives by the stream and by Redis): bounded,
    oldest forgotten first, each kept SEEN_S."""

    def __init__(self, max_entries: int = MAX_SEEN, keep_s: float = SEEN_S) -> None:
        self.ids: OrderedDict[str, float] = OrderedDict()
        self.max_entries = max_entries
        self.keep_s = keep_s

    def first(self, purge_id: str, now: float) -> bool:
        """True the first time `purge_id` is seen (and remembers it)."""
        while self.ids and next(iter(self.ids.values())) <= now - self.keep_s:
            self.ids.popitem(last=False)
        if purge_id in self.ids:
            return False
        self.ids[purge_id] = now
        while len(self.ids) > self.max_entries:
            self.ids.popitem(last=False)
        return True


# ---------------------------------------------------------------- the Redis purge log
# The origin pushes every signed purge onto a Redis list too (the same text as on the channel),
# so that an edge that lost the channel a while reads what it missed instead of emptying its
# caches. The list is trimmed from its head only (LTRIM), to the newest REDIS_LOG_ENTRIES and,
# of what this origin pushed, REDIS_LOG_BYTES: so whatever the list holds, it holds every purge
# issued after its first entry. It is not trimmed by age (entries older than MAX_SIGNED_AGE_S
# no longer verify as purges): a list trimmed by age would empty and vanish when no purge is
# made for a minute, which an edge could not tell from a Redis that lost its data, and its
# first entry, older than an edge's gap, is what proves that the gap is covered. The age bound
# is the edge's: it reads back from the newest entry only as far as its gap's start, and a gap
# longer than MAX_GAP_S is not read at all (the purges at its start would no longer verify).
REDIS_LOG_ENTRIES = MAX_PURGE_LOG
REDIS_LOG_BYTES = MAX_PURGE_LOG_BYTES
# between the edge's clock (when it last heard from Redis) and the origins' (`issued`): their
# skew, and a message in flight when the connection dropped; re-reading a purge costs nothing
# (the edge applies each id once)
GAP_MARGIN_S = 15.0
MAX_GAP_S = MAX_SIGNED_AGE_S - GAP_MARGIN_S
LOG_PAGE = 20  # entries per LRANGE
MAX_LOG_READ = REDIS_LOG_ENTRIES + 1  # a longer log (a hostile Redis) proves nothing
MAX_LOG_READ_BYTES = 32 << 20


class LogCatchUp:
    """Sans-IO: an edge back on Redis after a gap (it last heard from it at `heard`) reads the
    purge log newest first, a page at a time (`page()` -> the LRANGE indices, `feed()` the
    entries), and learns the purges it may have missed (`purges`, oldest first) and whether
    the log covers the gap (`lost`: '' when it does, else why not; the edge then empties its
    caches):
    - the first verified entry this edge already had (`known`: received on the channel before
      the gap; the origin pushes and publishes in one MULTI, so the list's order is the
      channel's), or issued before the gap (minus GAP_MARGIN_S), proves it: the list is
      trimmed from its head only, so every purge pushed after that one is in it;
    - reaching the head of the list without one: if this edge had seen the log (or a purge on
      the channel) before, the list was trimmed past the gap or made anew (Redis lost its
      data): `log_trimmed`; otherwise the log began within the gap and is all applied;
    - no list at all: `log_lost` if this edge had seen one (or a purge) before;
    - `gap_too_long` (longer than MAX_GAP_S: its first purges no longer verify) and
      `log_too_long` (more than MAX_LOG_READ entries or MAX_LOG_READ_BYTES read without an
      answer: a hostile Redis does not make the edge read without bound).
    Entries that do not verify (unsigned, unknown signer, forged, too long, issued in the
    future) are dropped and counted by reason in `dropped`, never applied, never an anchor."""

    def __init__(
        self,
        keys: dict[str, Ed25519PublicKey],
        heard: float,
        now: float,
        had_log: bool,
        length: int,
        known: Container[str] = (),
    ) -> None:
        self.keys = keys
        self.known = known
        self.length_at_start = length
        self.since = heard - GAP_MARGIN_S
        self.now = now
        self.had_log = had_log
        self.purges: list[Purge] = []
        self.dropped: dict[str, int] = {}
        self.read = 0
        self.bytes = 0
        self.lost = ""
        self.done = False
        if now - heard > MAX_GAP_S:
            self._end("gap_too_long")
        elif length <= 0:
            self._end("log_lost" if had_log else "")

    def _end(self, lost: str) -> None:
        self.lost, self.done = lost, True
        self.purges.reverse()  # read newest first; applied oldest first

    def page(self) -> tuple[int, int] | None:
        """The next LRANGE (start, stop), counted from the tail; None: done."""
        if self.done:
            return None
        return -(self.read + LOG_PAGE), -(self.read + 1)

    def feed(self, entries: Sequence[object]) -> None:
        """One page's entries, as LRANGE answered them (head to tail)."""
        if self.done:
            return
        for entry in reversed(entries):
            self.read += 1
            self.bytes += len(entry) if isinstance(entry, (bytes, str)) else 0
            if self.read > MAX_LOG_READ or self.bytes > MAX_LOG_READ_BYTES:
                self._end("log_too_long")
                return
            if not isinstance(entry, (bytes, str)):
                self.dropped["unsigned"] = self.dropped.get("unsigned", 0) + 1
                continue
            try:
                purge = open_purge(entry, self.keys, self.now, max_age_s=math.inf)
            except ProtocolError as exc:
                self.dropped[exc.reason] = self.dropped.get(exc.reason, 0) + 1
                continue
            if purge.id in self.known or purge.issued <= self.since:
                self._end("")  # the anchor: everything after it is in the list
                return
            if purge.issued - self.now > MAX_SIGNED_AGE_S:
                self.dropped["expired"] = self.dropped.get("expired", 0) + 1
                continue
            self.purges.append(purge)
        if len(entries) < LOG_PAGE:  # the head of the list
            self._end("log_trimmed" if self.had_log else "")
