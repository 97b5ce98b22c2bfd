"""A shared HTTP cache's decisions (RFC 9111), sans-IO, with a byte-bounded LRU store.

What is stored: responses to GET whose status is cacheable by default (§4.2.2's list) and that
carry explicit freshness for a shared cache (s-maxage, max-age or Expires), unless `no-store`
or `private` says otherwise, the request carried Authorization without `public`/`s-maxage`/
`must-revalidate` (§3.5), the response sets a cookie (kept out on purpose: a shared cache must
not hand one visitor's cookie to another), or `Vary: *`. Heuristic freshness (§4.2.2) is not
used: without an explicit lifetime nothing is reused without revalidation.

What is served: a stored response whose Vary'd request headers match (§4.1) while fresh
(§4.2, age per §4.2.3), never stale; `no-cache` (either side) and a request max-age the
response is older than mean revalidation with the stored validators (§4.3.1), and a 304
freshens the stored headers (§4.3.4) unless it is not for sharing: a 304 with Set-Cookie,
`no-store` or `private`, or one that makes the merged response unstorable, answers only the
visitor who asked and removes the entry. Unsafe methods invalidate the target (§4.4).

Memory: each entry is charged what its objects really take (sys.getsizeof over the entry, its
header tuples and bytes, its body and its key), not just its body and header bytes: for small
responses the objects cost several times the bytes they hold.
"""

from __future__ import annotations

import email.utils
import sys
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

Headers = list[tuple[bytes, bytes]]  # names lower-case (the web layer's type)

# §4.2.2: statuses "heuristically cacheable" — the ones a cache may store by default
CACHEABLE_STATUS = frozenset({200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501})
# hop-by-hop and per-response headers not kept with a stored response (RFC 9110 §7.6.1)
_NOT_STORED = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"age",
    }
)
_FLOAT_BYTES = sys.getsizeof(0.0)
_INT_BYTES = sys.getsizeof(1 << 30)  # Entry.size: an int object of its own
_LIST_BYTES = sys.getsizeof([]) + 4 * 8  # a key's list of variants: append() allocates 4 slots
_PAIR_BYTES = sys.getsizeof((b"", b""))
_EMPTY_STORE_BYTES = sys.getsizeof(OrderedDict())


def directives(headers: Headers, name: bytes = b"cache-control") -> dict[str, str]:
    """Cache-Control directives (§5.2), names lower-cased; a repeated directive keeps the
    first value."""
    out: dict[str, str] = {}
    for k, v in headers:
        if k != name:
            continue
        for part in v.decode("latin-1").split(","):
            key, _, value = part.strip().partition("=")
            key = key.strip().lower()
            if key and key not in out:
                out[key] = value.strip().strip('"')
    return out


def _seconds(value: str | None) -> int | None:
    """A delta-seconds value (§1.2.2); invalid is None, huge is capped."""
    if value is None or not (value.isascii() and value.isdigit()):  # "²".isdigit() is True
        return None
    return min(int(value), 2**31)


def _date(value: bytes | None) -> float | None:
    if not value:
        return None
    try:
        parsed = email.utils.parsedate_to_datetime(value.decode("latin-1"))
    except (TypeError, ValueError):
        return None
    return parsed.timestamp() if parsed is not None else None


def _header(headers: Headers, name: bytes) -> bytes | None:
    for k, v in headers:
        if k == name:
            return v
    return None


def _joined(headers: Headers, name: bytes) -> bytes:
    return b", ".join(v for k, v in headers if k == name)


def _vary_names(headers: Headers) -> tuple[bytes, ...] | None:
    """Header names the response varies on; None for `Vary: *`."""
    names: list[bytes] = []
    for k, v in headers:
        if k != b"vary":
            continue
        for part in v.split(b","):
            n = part.strip().lower()
            if n == b"*":
                return None
            if n and n not in names:
                names.append(n)
    return tuple(sorted(names))


def _normalise(value: bytes) -> bytes:
    # §4.1: whitespace and case differences in field values may be normalised
    return b",".join(p.strip() for p in value.split(b",")).lower()


@dataclass(slots=True, eq=False)  # compared by identity: two stored copies are two entries
class Entry:
    status: int
    headers: Headers
    body: bytes
    vary: tuple[tuple[bytes, bytes], ...]  # (name, normalised request value)
    response_time: float  # wall clock when the response arrived
    corrected_initial_age: float
    lifetime: float
    no_cache: bool  # revalidate on every use
    size: int = 0
    hits: int = 0
    tags: frozenset[str] = frozenset()  # its Cache-Tag names, for purges by tag

    def age(self, wall: float) -> float:
        """§4.2.3 current_age."""
        return self.corrected_initial_age + max(0.0, wall - self.response_time)

    @property
    def etag(self) -> bytes | None:
        return _header(self.headers, b"etag")

    @property
    def last_modified(self) -> bytes | None:
        return _header(self.headers, b"last-modified")


@dataclass(frozen=True, slots=True)
class Lookup:
    """A stored response for this request: `fresh` ones are served as they are, the others
    need the conditional request `validators` first."""

    entry: Entry
    fresh: bool
    validators: Headers


def freshness_lifetime(headers: Headers, cc: dict[str, str]) -> float | None:
    """§4.2.1 for a shared cache: s-maxage, then max-age, then Expires minus Date."""
    for name in ("s-maxage", "max-age"):
        if name in cc:
            return float(_seconds(cc[name]) or 0)
    expires = _header(headers, b"expires")
    if expires is not None:
        exp = _date(expires)
        if exp is None:
            return 0.0  # §5.3: an invalid Expires means already expired
        date = _date(_header(headers, b"date"))
        return max(0.0, exp - (date if date is not None else exp))
    return None


@dataclass
class HttpCache:
    max_bytes: int
    max_object_bytes: int
    used: int = 0  # bytes held: the entries (`Entry.size`) and the store's own table
    _store: OrderedDict[tuple[bytes, bytes], list[Entry]] = field(default_factory=OrderedDict)
    _table_bytes: int = 0
    hits: int = 0
    misses: int = 0
    revalidated: int = 0
    stores: int = 0
    evictions: int = 0
    purged: int = 0

    @staticmethod
    def key(authority: bytes, target: bytes) -> tuple[bytes, bytes]:
        return (authority.lower(), target)

    def __len__(self) -> int:
        return sum(len(v) for v in self._store.values())

    # ---------------------------------------------------------------- request side
    def lookup(
        self, key: tuple[bytes, bytes], method: bytes, request_headers: Headers, wall: float
    ) -> Lookup | None:
        if method not in (b"GET", b"HEAD") or _header(request_headers, b"range") is not None:
            return None
        entries = self._store.get(key)
        if not entries:
            self.misses += 1
            return None
        req_cc = directives(request_headers)
        if "no-store" in req_cc:
            return None
        for entry in entries:
            if all(_normalise(_joined(request_headers, n)) == v for n, v in entry.vary):
                break
        else:
            self.misses += 1
            return None
        self._store.move_to_end(key)
        age = entry.age(wall)
        fresh = age < entry.lifetime and not entry.no_cache
        if "no-cache" in req_cc or _header(request_headers, b"pragma") == b"no-cache":
            fresh = False
        max_age = _seconds(req_cc.get("max-age"))
        if max_age is not None and age > max_age:
            fresh = False
        validators: Headers = []
        if not fresh:
            if entry.etag is not None:
                validators.append((b"if-none-match", entry.etag))
            if entry.last_modified is not None:
                validators.append((b"if-modified-since", entry.last_modified))
            if not validators:
                self.misses += 1
                return None  # nothing to revalidate with: a plain request
        else:
            self.hits += 1
            entry.hits += 1
        return Lookup(entry, fresh, validators)

    def invalidate(self, method: bytes, key: tuple[bytes, bytes], status: int) -> None:
        """§4.4: a non-error response to an unsafe method invalidates the target."""
        if method in (b"GET", b"HEAD", b"OPTIONS", b"TRACE") or status >= 400:
            return
        for entry in self._store.pop(key, []):
            self.used -= entry.size
        self._retable()

    # ---------------------------------------------------------------- response side
    def storable(
        self, method: bytes, request_headers: Headers, status: int, headers: Headers
    ) -> bool:
        """May this response be stored (§3), before its body is seen?"""
        if method != b"GET" or status not in CACHEABLE_STATUS:
            return False
        if _header(request_headers, b"range") is not None:
            return False
        if "no-store" in directives(request_headers):
            return False
        return self._shareable(request_headers, headers)

    def _shareable(self, request_headers: Headers, headers: Headers) -> bool:
        """§3's rules on a response's header fields, for a shared cache."""
        cc = directives(headers)
        if "no-store" in cc or "private" in cc:
            return False
        if _header(headers, b"set-cookie") is not None:
            return False  # one visitor's cookie is never handed to another
        if _vary_names(headers) is None:
            return False
        if _header(request_headers, b"authorization") is not None and not (
            "public" in cc or "s-maxage" in cc or "must-revalidate" in cc
        ):
            return False  # §3.5
        length = _header(headers, b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_object_bytes:
            return False
        lifetime = freshness_lifetime(headers, cc)
        if lifetime is None and "no-cache" not in cc:
            return False  # no explicit freshness; heuristics are not used
        return self.max_bytes > 0

    def store(
        self,
        key: tuple[bytes, bytes],
        request_headers: Headers,
        status: int,
        headers: Headers,
        body: bytes,
        request_time: float,
        response_time: float,
        tags: frozenset[str] = frozenset(),
    ) -> None:
        if len(body) > self.max_object_bytes:
            return
        cc = directives(headers)
        lifetime = freshness_lifetime(headers, cc) or 0.0
        vary_names = _vary_names(headers) or ()
        kept = [(k, v) for k, v in headers if k not in _NOT_STORED]
        # §4.2.3: the age the response already had when it arrived
        date = _date(_header(headers, b"date"))
        apparent_age = max(0.0, response_time - date) if date is not None else 0.0
        age_value = float(_seconds((_header(headers, b"age") or b"").decode("latin-1")) or 0)
        corrected_age = age_value + (response_time - request_time)
        entry = Entry(
            status,
            kept,
            body,
            tuple((n, _normalise(_joined(request_headers, n))) for n in vary_names),
            response_time,
            max(apparent_age, corrected_age),
            lifetime,
            "no-cache" in cc,
            tags=tags,
        )
        entries = self._store.get(key)
        if entries is None:
            entries = self._store[key] = []
        for old in [e for e in entries if e.vary == entry.vary]:
            entries.remove(old)
            self.used -= old.size
        entries.append(entry)
        self._store.move_to_end(key)
        entry.size = _cost(key, entry)
        self.used += entry.size
        self.stores += 1
        self._retable()
        self._evict()

    def stored_keys(self) -> list[tuple[bytes, bytes]]:
        return list(self._store)

    def purge(
        self,
        matches: Callable[[bytes, bytes, frozenset[str]], bool],
        keys: Iterable[tuple[bytes, bytes]] | None = None,
    ) -> int:
        """Remove every entry for which `matches(authority, target, tags)` (an operator's
        purge: decisions.purge.PurgeMatcher), among `keys` (from `stored_keys`, a slice at a
        time so a big cache is purged between other work) or all; returns how many."""
        removed = 0
        for key in list(self._store) if keys is None else keys:
            entries = self._store.get(key)
            if entries is None:
                continue
            gone = [e for e in entries if matches(key[0], key[1], e.tags)]
            for entry in gone:
                entries.remove(entry)
                self.used -= entry.size
            removed += len(gone)
            if not entries:
                del self._store[key]
        self.purged += removed
        self._retable()
        return removed

    def purge_all(self) -> int:
        """Remove every entry (purges may have been missed); returns how many."""
        removed = len(self)
        self._store = OrderedDict()
        self.used = self._table_bytes = 0
        self.purged += removed
        return removed

    def _evict(self) -> None:
        while self.used > self.max_bytes and self._store:
            _k, evicted = self._store.popitem(last=False)
            for e in evicted:
                self.used -= e.size
                self.evictions += 1
            self._retable()

    def _retable(self) -> None:
        """Charge the store's hash table and ordered-dict nodes (sys.getsizeof), which grow
        with the number of keys and, like any dict's, never shrink: an emptied store starts
        afresh."""
        if not self._store and self._table_bytes:
            self._store = OrderedDict()
        table = sys.getsizeof(self._store) - _EMPTY_STORE_BYTES
        self.used += table - self._table_bytes
        self._table_bytes = table

    def _remove(self, key: tuple[bytes, bytes], entry: Entry) -> None:
        entries = self._store.get(key)
        if entries is None or entry not in entries:
            return
        entries.remove(entry)
        self.used -= entry.size
        if not entries:
            del self._store[key]
            self._retable()

    def freshen(
        self,
        key: tuple[bytes, bytes],
        entry: Entry,
        not_modified_headers: Headers,
        request_headers: Headers,
        request_time: float,
        response_time: float,
    ) -> Entry:
        """§4.3.4: the 304's header fields replace the stored ones (hop-by-hop fields and
        Content-Length excepted) and the entry's age restarts. Returns what answers this
        visitor: the freshened stored entry, or, when the 304 is not for sharing (Set-Cookie,
        `no-store`, `private`) or the merged response may not be stored (§3: on the merged
        header fields, with this request) or varies otherwise, a private copy with the stored
        body and the merged fields; the stored entry is then removed."""
        replaced = {
            k for k, _ in not_modified_headers if k not in _NOT_STORED and k != b"content-length"
        }
        merged = [(k, v) for k, v in entry.headers if k not in replaced] + [
            (k, v) for k, v in not_modified_headers if k in replaced
        ]
        cc = directives(merged)
        date = _date(_header(merged, b"date"))
        apparent_age = max(0.0, response_time - date) if date is not None else 0.0
        nm_cc = directives(not_modified_headers)
        shared = (
            _header(not_modified_headers, b"set-cookie") is None
            and "no-store" not in nm_cc
            and "private" not in nm_cc
            and self._shareable(request_headers, merged)
            and _vary_names(merged) == tuple(n for n, _ in entry.vary)
        )
        self.revalidated += 1
        if not shared:
            self._remove(key, entry)
            return Entry(
                entry.status,
                merged,
                entry.body,
                entry.vary,
                response_time,
                max(apparent_age, response_time - request_time),
                0.0,
                True,
            )
        entry.headers = merged
        entry.lifetime = freshness_lifetime(merged, cc) or 0.0
        entry.no_cache = "no-cache" in cc
        entry.response_time = response_time
        entry.corrected_initial_age = max(apparent_age, response_time - request_time)
        if entry in self._store.get(key, ()):  # not evicted or replaced meanwhile
            self.used -= entry.size
            entry.size = _cost(key, entry)
            self.used += entry.size
            self._evict()
        return entry


def _cost(key: tuple[bytes, bytes], entry: Entry) -> int:
    """The bytes an entry really holds: its objects as sys.getsizeof counts them (header
    tuples and bytes, body, vary key, floats) and its key with the key's list of variants (the
    store's table is charged apart). A key with several variants is charged once per variant:
    a little over, never under."""
    getsize = sys.getsizeof
    size = (
        getsize(entry)
        + getsize(entry.headers)
        + getsize(entry.body)
        + getsize(entry.vary)
        + 3 * _FLOAT_BYTES
        + _INT_BYTES
        + getsize(key)
        + getsize(key[0])
        + getsize(key[1])
        + _LIST_BYTES
    )
    for k, v in entry.headers:
        size += _PAIR_BYTES + getsize(k) + getsize(v)
    for k, v in entry.vary:
        size += _PAIR_BYTES + getsize(k) + getsize(v)
    if entry.tags:
        size += getsize(entry.tags) + sum(getsize(t) for t in entry.tags)
    return size


def not_modified(entry: Entry, request_headers: Headers) -> bool:
    """RFC 9110 §13.1.2/§13.1.3 for a GET/HEAD served from the cache: does the visitor's own
    conditional header say it already has this response?"""
    inm = _header(request_headers, b"if-none-match")
    etag = entry.etag
    if inm is not None:
        if etag is None:
            return False
        if inm.strip() == b"*":
            return True
        weak = etag.removeprefix(b"W/")  # §8.8.3.2: If-None-Match uses weak comparison
        return any(t.strip().removeprefix(b"W/") == weak for t in inm.split(b","))
    ims = _date(_header(request_headers, b"if-modified-since"))
    lm = _date(entry.last_modified)
    return ims is not None and lm is not None and lm <= ims
