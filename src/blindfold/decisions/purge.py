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
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
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
_EPOCH = re.compile(r"[0-9a-f]{8,32}")
MAX_SEQ = 1 << 53  # exact in JSON numbers


@dataclass(frozen=True, slots=True)
class Purge:
    id: str
    urls: tuple[str, ...] = ()
    prefixes: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    blobs: tuple[str, ...] = ()
    issued: float = 0.0
    operator: str = ""
    # on Redis: the signing origin's life (a random id chosen at its start) and this purge's
    # number in it (from 1), inside the signed body (PurgeSequence); 0: not numbered
    epoch: str = ""
    seq: int = 0

    def to_json(self) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "id": self.id,
            "urls": list(self.urls),
            "prefixes": list(self.prefixes),
            "tags": list(self.tags),
            "blobs": list(self.blobs),
            "issued": self.issued,
            "operator": self.operator,
        }
        if self.seq:
            obj["epoch"], obj["seq"] = self.epoch, self.seq
        return obj

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
    epoch, seq = _epoch_seq(obj)
    rest = {k: v for k, v in obj.items() if k not in ("epoch", "seq")}
    purge = parse_purge(rest, id_=id_, issued=float(issued), operator=operator)
    return replace(purge, epoch=epoch, seq=seq) if seq else purge


def _epoch_seq(obj: dict[str, Any]) -> tuple[str, int]:
    if "seq" not in obj and "epoch" not in obj:
        return "", 0
    epoch, seq = obj.get("epoch"), obj.get("seq")
    if not isinstance(epoch, str) or not _EPOCH.fullmatch(epoch):
        raise ProtocolError("bad_purge", "bad epoch")
    if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq <= MAX_SEQ:
        raise ProtocolError("bad_purge", "bad sequence number")
    return epoch, seq


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
    return _seal(key, PURGE_MAGIC, PURGE_PURPOSE, purge.to_json())


def is_signed_purge(message: bytes | str) -> bool:
    return _has_magic(message, PURGE_MAGIC)


def _seal(key: Ed25519PrivateKey, magic: str, purpose: bytes, body: Any) -> str:
    """`magic.signer.payload.signature`: the envelope `_open` verifies (purges and HEADs,
    each with its own magic and signing purpose, so neither passes for the other)."""
    signer = key_id(key.public_key())
    payload = _b64(json.dumps(body, separators=(",", ":")).encode())
    signature = key.sign(purpose + f"{signer}.{payload}".encode("ascii"))
    return f"{magic}.{signer}.{payload}.{_b64(signature)}"


def _has_magic(message: bytes | str, magic: str) -> bool:
    prefix = magic + "."
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
    return open_signed_purge(message, keys, now, max_age_s)[1]


def open_signed_purge(
    message: bytes | str,
    keys: dict[str, Ed25519PublicKey],
    now: float,
    max_age_s: float = MAX_SIGNED_AGE_S,
) -> tuple[str, Purge]:
    """open_purge, with the signer's key id: (signer, purge)."""
    signer, obj = _open(message, keys, PURGE_MAGIC, PURGE_PURPOSE, MAX_PURGE_BYTES)
    purge = purge_from_json(obj)
    if abs(now - purge.issued) > max_age_s:
        raise ProtocolError("expired", f"purge {purge.id} issued {purge.issued}")
    return signer, purge


def _open(
    message: bytes | str,
    keys: dict[str, Ed25519PublicKey],
    magic: str,
    purpose: bytes,
    max_bytes: int,
) -> tuple[str, Any]:
    if len(message) > max_bytes:
        raise ProtocolError("unsigned", f"too long to be a signed {magic}")
    if isinstance(message, bytes):
        try:
            message = message.decode("ascii")
        except UnicodeDecodeError:
            raise ProtocolError("unsigned", "not ASCII") from None
    parts = message.split(".")
    if len(parts) != 4 or parts[0] != magic:
        raise ProtocolError("unsigned", f"not a {magic} signed message")
    _magic, signer, encoded, sig_text = parts
    key = keys.get(signer)
    if key is None:
        raise ProtocolError("unknown_signer", f"signer {signer[:20]!r}")
    try:
        key.verify(_unb64(sig_text), purpose + f"{signer}.{encoded}".encode("ascii"))
    except (ValueError, binascii.Error, InvalidSignature, UnicodeEncodeError):
        raise ProtocolError("bad_signature", f"signer {signer}") from None
    try:
        obj = json.loads(_unb64(encoded))
    except (ValueError, binascii.Error, RecursionError):
        raise ProtocolError("bad_purge", "signed payload is not JSON") from None
    return signer, obj


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


# ---------------------------------------------------------------- numbered purges on Redis
# Pub/sub loses what is published while an edge is not subscribed. What proves that an edge
# missed nothing is what the origins sign, never what Redis holds (the attack review of issue
# 13 made a list that "held a purge I knew" skip purges: trimmed, rolled back, or kept by
# one origin only): every origin numbers its purges (epoch, seq) inside the signed body,
# stores each under its own key (purge_key, PURGE_KEY_TTL_S) and publishes a signed HEAD
# (its epoch and last number) every HEAD_EVERY_S. An edge knows, per origin life (signer,
# epoch), the last number it has; a number it has not had is read from its key, and one that
# is not there (or not that purge) empties its caches: a hostile Redis can withhold a purge
# (the edges then empty their caches), never make an edge skip one.
PURGE_KEY_PREFIX = "blindfold:purge:"
HEAD_MAGIC = "bfh1"
HEAD_PURPOSE = b"blindfold purge head v1\x00"
MAX_HEAD_BYTES = 1024
HEAD_EVERY_S = 2.0  # an origin publishes its HEAD this often
MAX_HEAD_AGE_S = 10.0  # a HEAD issued longer ago (or later) than this is refused
# after a reconnection an edge waits this long for a fresh HEAD of every origin it follows
# (issued at most HEAD_SKEW_S before it subscribed again: clocks' skew); none: caches emptied
HEAD_WAIT_S = 5.0
HEAD_SKEW_S = 2.0
# a life first heard just after an emptying is read back to its first purge issued this long
# before the emptying: an origin clock behind the edge's by up to this much cannot make the walk
# stop before a purge made after the emptying (one applied twice costs a miss; one skipped,
# a stale page)
WALK_SKEW_S = MAX_HEAD_AGE_S
# a purge's key lives this long: longer than MAX_SIGNED_AGE_S (a purge an edge could still
# take from the channel is still there to read) and than the gaps an edge reconnects after
# (it retries every second; a gap longer than about PURGE_KEY_TTL_S - HEAD_WAIT_S finds the
# keys gone and empties the caches, as an edge that cannot know what it missed must)
PURGE_KEY_TTL_S = 120
MAX_FETCH = 1000  # purges read back after one gap; more: the caches are emptied
MAX_LIVES = 256  # origins' lives an edge follows at once
# after an edge first subscribes or empties its caches, the lives it hears of within this are
# taken where they are (every origin's HEAD comes within HEAD_EVERY_S); later, from 1
BASELINE_S = 3 * HEAD_EVERY_S
SILENT_S = 30.0  # a life that said nothing this long (HEADs every 2 s) is over
# an ended life (final HEAD, or SILENT_S) is remembered this long, longer than a signed purge
# or HEAD of it can be replayed (MAX_SIGNED_AGE_S), with its last number: a replay of it is
# dropped, never read from 1 (its expired keys would empty the caches at every replay)
ENDED_KEEP_S = MAX_SIGNED_AGE_S + 30.0
MAX_ENDED = 1024
MAX_FETCH_BYTES = 32 << 20  # bytes of purge keys read after one gap; more: the caches are emptied


def purge_key(signer: str, epoch: str, seq: int) -> str:
    return f"{PURGE_KEY_PREFIX}{signer}:{epoch}:{seq}"


@dataclass(frozen=True, slots=True)
class Head:
    """An origin's signed word: in life `epoch` it has made purges 1..`seq` (`final`: and it
    is stopping; the next life's purges follow these)."""

    signer: str
    epoch: str
    seq: int
    issued: float
    final: bool = False


def new_epoch() -> str:
    return secrets.token_hex(8)


def sign_head(
    key: Ed25519PrivateKey, epoch: str, seq: int, issued: float, final: bool = False
) -> str:
    body = {"epoch": epoch, "seq": seq, "issued": issued, "final": final}
    return _seal(key, HEAD_MAGIC, HEAD_PURPOSE, body)


def is_signed_head(message: bytes | str) -> bool:
    return _has_magic(message, HEAD_MAGIC)


def open_head(
    message: bytes | str,
    keys: dict[str, Ed25519PublicKey],
    now: float,
    max_age_s: float = MAX_HEAD_AGE_S,
) -> Head:
    """Verify a signed HEAD. Raises ProtocolError as open_purge (bad_head for a bad body)."""
    signer, obj = _open(message, keys, HEAD_MAGIC, HEAD_PURPOSE, MAX_HEAD_BYTES)
    if not isinstance(obj, dict) or set(obj) != {"epoch", "seq", "issued", "final"}:
        raise ProtocolError("bad_head", "not a head")
    try:
        epoch, seq = _epoch_seq(obj)
    except ProtocolError:
        raise ProtocolError("bad_head", "bad epoch or number") from None
    issued, final = obj["issued"], obj["final"]
    if isinstance(issued, bool) or not isinstance(issued, (int, float)):
        raise ProtocolError("bad_head", "no issued time")
    if not isinstance(final, bool) or not math.isfinite(issued):
        raise ProtocolError("bad_head", "bad issued time or final")
    if abs(now - issued) > max_age_s:
        raise ProtocolError("expired", f"head {epoch}:{seq} issued {issued}")
    return Head(signer, epoch, seq, float(issued), final)


@dataclass(slots=True)
class Need:
    """What an edge must do after a message: read these purges' keys (signer, epoch, seq),
    oldest first, then check them (PurgeSequence.check); or, `lost` (why), empty its caches."""

    fetch: list[tuple[str, str, int]] = field(default_factory=list)
    lost: str = ""
    # > 0: `fetch` walks a life back (newest first) just after an emptying: its purges issued
    # at `since` or later are applied, the first one issued before it ends the walk (the
    # emptying covers it and all before it); a walk that ends neither so nor at 1 is a loss
    since: float = 0.0
    cut: bool = False  # the walk was cut at max_fetch: not ended by an older purge, a loss
    dropped: str = ""  # the message is not to be applied (a replay of an ended life, a seen id)


class PurgeSequence:
    """Sans-IO, an edge's side: per life of a signing origin (signer, epoch), the last number
    it has. A purge or HEAD past it: the numbers in between are read (`Need.fetch`). A life it
    does not know (an origin started, or a second origin with the same key) is read from 1,
    but in the BASELINE_S after this edge subscribed for the first time or emptied its caches
    (nothing cached yet: every origin's first word is where it is). Lost (the caches must be
    emptied, then `emptied()`):
    - `no_head`: after a reconnection, no fresh HEAD within HEAD_WAIT_S from a life it follows
      (Redis withholds it; the origin stopped without its final HEAD; or it is an older
      version that numbers nothing);
    - `gap_too_big` (more than MAX_FETCH to read), `too_many_lives` (MAX_LIVES), or from
      `check`: `missing` (a key not there: expired, withheld, never written), or a key that is
      not that signed purge.
    A life ends with its final HEAD (at the number this edge has), or SILENT_S without a word
    while this edge follows the channel (it heard every purge that life published; if it
    speaks again past that number, it is read from there). An ended life is remembered
    ENDED_KEEP_S: its replayed messages are dropped (`Need.dropped`), as is a purge whose id
    was already heard. In the BASELINE_S after an emptying (or the first subscription), a
    life not known is walked back from its first word (`Need.since`): only purges issued
    before the emptying (or this edge's start) are covered by the empty caches."""

    def __init__(
        self, max_fetch: int = MAX_FETCH, max_lives: int = MAX_LIVES, started: float = 0.0
    ) -> None:
        self.last: dict[tuple[str, str], int] = {}  # (signer, epoch) -> last number had
        self.heard: dict[tuple[str, str], float] = {}  # -> when it last said something
        self.pending: set[tuple[str, str]] = set()  # lives whose fresh HEAD is awaited
        self.fresh_after = 0.0
        self.baseline_until = 0.0
        self.baseline_from = (
            0.0  # when the caches were (last) empty: this edge's start, an emptying
        )
        self.started = started  # when this edge started caching (0: at its first subscription)
        # lives' numbers up to which an emptying covered them (all issued before it)
        self.covered: OrderedDict[tuple[str, str], int] = OrderedDict()
        # ended lives: (signer, epoch) -> (last number, when it ended)
        self.ended: OrderedDict[tuple[str, str], tuple[int, float]] = OrderedDict()
        self.seen = SeenPurges()
        self.max_fetch = max_fetch
        self.max_lives = max_lives

    def subscribed(self, now: float, first: bool) -> None:
        """Subscribed at `now` (this edge's clock): for the first time, or again after losing
        the channel (every life it follows must now say where it is)."""
        if first:
            self.baseline_until = now + BASELINE_S
            self.baseline_from = min(self.started or now, now)
            return
        self.pending = set(self.last)
        self.fresh_after = now - HEAD_SKEW_S
        self.baseline_until = 0.0

    def on_purge(self, signer: str, purge: Purge, now: float) -> Need:
        """A verified purge heard on the channel (it is applied whatever this says)."""
        if not self.seen.first(purge.id, now):  # a replay: never a new life, never a read
            return Need(dropped="seen")
        if not purge.seq:  # not numbered (an older origin): nothing proves continuity
            self.last[(signer, "")] = 0
            self.heard[(signer, "")] = now
            return Need()
        return self._to((signer, purge.epoch), purge.seq, purge.seq - 1, now)

    def on_head(self, head: Head, now: float) -> Need:
        life = (head.signer, head.epoch)
        if head.issued >= self.fresh_after:
            self.pending.discard(life)
        need = self._to(life, head.seq, head.seq, now)
        if head.final and not need.lost and self.last.get(life) == head.seq:
            self._end(life, now)  # ended, and this edge has all of it
        return need

    def _end(self, life: tuple[str, str], now: float) -> None:
        self.ended[life] = (self.last.pop(life), now)
        del self.heard[life]
        self.ended.move_to_end(life)
        while len(self.ended) > MAX_ENDED:
            self.ended.popitem(last=False)

    def _to(self, life: tuple[str, str], seq: int, fetch_to: int, now: float) -> Need:
        last = self.last.get(life)
        ended = self.ended.get(life)
        if last is None and ended is not None and ended[1] > now - ENDED_KEEP_S:
            if seq <= ended[0]:
                return Need(dropped="ended_life")  # a replay of a life that is over
            last = ended[0]  # it speaks again (a silence, not an end): from where it was
            del self.ended[life]
            if len(self.last) >= self.max_lives:
                return Need(lost="too_many_lives")
        if last is None:
            if len(self.last) >= self.max_lives:
                return Need(lost="too_many_lives")
            covered = self.covered.get(life, 0)
            if now < self.baseline_until:
                # the caches were empty at baseline_from: what was issued before is covered;
                # what was issued since (and withheld on the channel) is read from its key
                self.last[life] = seq
                self.heard[life] = now
                end = max(covered, fetch_to - self.max_fetch)
                if end >= fetch_to:
                    return Need()
                return Need(
                    [(life[0], life[1], n) for n in range(fetch_to, end, -1)],
                    since=self.baseline_from - WALK_SKEW_S,
                    cut=end > covered,
                )
            start = covered + 1  # a new life (or one forgotten): all of it
        elif seq <= last:
            self.heard[life] = now
            return Need()  # had it: a replay, a stale HEAD
        else:
            start = last + 1
        if fetch_to - start + 1 > self.max_fetch:
            return Need(lost="gap_too_big")
        self.last[life] = seq
        self.heard[life] = now
        return Need([(life[0], life[1], n) for n in range(start, fetch_to + 1)])

    def overdue(self) -> Need:
        """HEAD_WAIT_S after a reconnection: a life that said nothing is a loss."""
        if self.pending:
            self.pending = set()
            return Need(lost="no_head")
        return Need()

    def prune(self, now: float) -> None:
        """Forget the lives silent for SILENT_S (not while HEADs are awaited; never an
        unnumbered one: it is what makes every reconnection empty the caches)."""
        if self.pending:
            return
        for life, heard in list(self.heard.items()):
            if life[1] and heard < now - SILENT_S:
                self._end(life, now)
        while self.ended and next(iter(self.ended.values()))[1] <= now - ENDED_KEEP_S:
            self.ended.popitem(last=False)

    def check(
        self,
        wanted: Sequence[tuple[str, str, int]],
        values: Sequence[object],
        keys: dict[str, Ed25519PublicKey],
        now: float,
        since: float = 0.0,
    ) -> tuple[list[Purge], str]:
        """The keys' values as read (GETRANGE 0 MAX_PURGE_BYTES: at most one byte more than
        a purge can be; b'' or None: no key) -> (the purges, in `wanted`'s order; lost: ''
        or why). `since` (a walk back, Need.since): the first purge issued before it ends
        the list (fewer purges than `wanted`, not lost)."""
        purges = []
        for (signer, epoch, seq), value in zip(wanted, values, strict=True):
            if not value or not isinstance(value, (bytes, str)):
                return [], "missing"
            try:  # old is fine (the number binds it); from the future is not
                got, purge = open_signed_purge(value, keys, now, max_age_s=math.inf)
            except ProtocolError as exc:
                return [], exc.reason
            if (got, purge.epoch, purge.seq) != (signer, epoch, seq):
                return [], "wrong_purge"
            if purge.issued - now > MAX_SIGNED_AGE_S:
                return [], "expired"
            if since and purge.issued < since:
                break  # issued before the emptying: covered, and so are those before it
            self.seen.first(purge.id, now)
            purges.append(purge)
        return purges, ""

    def emptied(self, now: float) -> None:
        """The caches were emptied at `now`: nothing before matters."""
        for life, seq in self.last.items():  # issued before now: covered by the emptying
            if life[1]:
                self.covered[life] = max(seq, self.covered.get(life, 0))
                self.covered.move_to_end(life)
        while len(self.covered) > MAX_ENDED:
            self.covered.popitem(last=False)
        self.last.clear()
        self.heard.clear()
        self.pending = set()
        self.baseline_until = now + BASELINE_S
        self.baseline_from = now
