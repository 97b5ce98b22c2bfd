"""A shared HTTP cache's decisions (RFC 9111), sans-IO, with a byte-bounded LRU store.

What is stored (§3): responses to GET with a final status (not 206: ranges are not kept; not
304) that carry explicit freshness for a shared cache (s-maxage, max-age or Expires; an error
status outside §4.2.2's list only with s-maxage or a targeted field, and never in place of a
fresh 2xx/3xx), or `no-cache` with a heuristically cacheable status or `public` (revalidated on
every use), unless `no-store` (`must-understand` on a status this cache understands overrides
it, §5.2.2.3) or `private` says otherwise, the request carried Authorization without
`public`/`s-maxage`/`must-revalidate` (§3.5), the response sets a cookie (kept out on purpose:
a shared cache must not hand one visitor's cookie to another), `Vary: *`, or Vary names a header
the edge sets itself (`edge_set`: the origin saw the edge's value). An origin answer with
`no-store` or `private` drops the stored copy (`forget`). Heuristic freshness (§4.2.2) is not
used: without an explicit lifetime nothing is reused without revalidation. Fields named by
Connection or by a qualified `no-cache="..."`/`private="..."` are not stored. A targeted field
(RFC 9213: `Blindfold-Cache-Control`, then `CDN-Cache-Control`), when valid, replaces
Cache-Control and Expires. Dates: one strict parser for the three HTTP-date formats (RFC 9110
§5.6.7); an invalid or repeated Expires means expired, a missing or invalid Date means the time
of receipt.

What is served: a stored response whose Vary'd request headers match (§4.1) while fresh (§4.2,
age per §4.2.3); past its lifetime only within the response's stale-while-revalidate window
(then refreshed after), its stale-if-error window when the origin fails (RFC 5861; a request's
stale-if-error only narrows it), or the request's max-stale (§5.2.1.2; off by default, and never
for a zero lifetime or a copy stored for a request with Cookie or Authorization), each
switchable per route (StalePolicy) and never where §4.2.4 forbids it. `no-cache` (either side)
and a request max-age the response is older than mean revalidation with the stored validators
(§4.3.1), and a 304 freshens the stored headers (§4.3.4) unless it is not for sharing: a 304
with Set-Cookie, `no-store` or `private`, or one that makes the merged response unstorable,
answers only the visitor who asked and removes the entry. Unsafe methods invalidate the target
(§4.4).

Memory: each entry is charged what its objects really take (sys.getsizeof over the entry, its
header tuples and bytes, its body and its key), not just its body and header bytes: for small
responses the objects cost several times the bytes they hold.
"""

from __future__ import annotations

import calendar
import re
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import http_sf

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
_PREPARED_BYTES = 512  # a prepared head's dict of encodings, its status line and bytes objects


# RFC 9110 §5.6.2 token characters; a directive is token [ "=" ( token / quoted-string ) ]
_TCHAR = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]"
_DIRECTIVE = re.compile(
    rb"[ \t]*(" + _TCHAR + rb"+)(?:=(" + _TCHAR + rb'+|"(?:[^"\\]|\\.)*"))?[ \t]*(?:,|$)'
)
# the targeted fields this edge answers to (RFC 9213 §2.1), most specific first
TARGETED_FIELDS = (b"blindfold-cache-control", b"cdn-cache-control")


def directives(headers: Headers, name: bytes = b"cache-control") -> dict[str, str]:
    """Cache-Control directives (RFC 9111 §5.2: `token [ "=" ( token / quoted-string ) ]`),
    names lower-cased, quoted values unquoted; a repeated directive keeps the first value. A
    member that does not match the grammar (`max-age =3600`, `max-age= 3600`) is ignored
    (§4.2.1: invalid means not there), up to the next comma."""
    out: dict[str, str] = {}
    for k, v in headers:
        if k != name:
            continue
        pos, end = 0, len(v)
        while pos < end:
            m = _DIRECTIVE.match(v, pos)
            if m is None:  # skip the broken member (commas inside quotes are rare and lost)
                comma = v.find(b",", pos)
                pos = end if comma < 0 else comma + 1
                continue
            pos = m.end()
            key = m.group(1).decode("latin-1").lower()
            raw = m.group(2) or b""
            if raw.startswith(b'"'):
                raw = re.sub(rb"\\(.)", rb"\1", raw[1:-1])
            if key not in out:
                out[key] = raw.decode("latin-1")
    return out


def targeted_directives(headers: Headers) -> dict[str, str] | None:
    """RFC 9213 §2.1: the first targeted field (TARGETED_FIELDS order) whose value is a valid,
    non-empty Structured Fields Dictionary (RFC 8941, parsed by http-sf) replaces Cache-Control
    and Expires for this cache; None when there is none. A directive of the wrong type (RFC 9213
    §2.2: `max-age="10"`) is ignored, not the field."""
    for name in TARGETED_FIELDS:
        lines = [v for k, v in headers if k == name]
        if not lines:
            continue
        try:
            parsed = http_sf.parse(b", ".join(lines), tltype="dictionary")
        except (http_sf.StructuredFieldError, ValueError, TypeError):
            continue
        if not isinstance(parsed, dict) or not parsed:
            continue
        out: dict[str, str] = {}
        for key, member in parsed.items():
            value = member[0] if isinstance(member, tuple) else member
            if value is True:
                out[key] = ""
            elif isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                out[key] = str(value)
            elif isinstance(value, str) and key not in _NUMERIC:
                out[key] = value
            # anything else (a string max-age, a list): that directive is ignored
        return out
    return None


_NUMERIC = frozenset({"max-age", "s-maxage", "stale-while-revalidate", "stale-if-error"})


def response_directives(headers: Headers) -> tuple[dict[str, str], bool]:
    """The directives this shared cache obeys for a response, and whether they come from a
    targeted field (RFC 9213: then Expires is ignored too)."""
    targeted = targeted_directives(headers)
    if targeted is not None:
        return targeted, True
    return directives(headers), False


def _seconds(value: str | None) -> int | None:
    """A delta-seconds value (§1.2.2); invalid is None, huge is capped."""
    if value is None or not (value.isascii() and value.isdigit()):  # "²".isdigit() is True
        return None
    if len(value) > 10:  # past 2**31 anyway; int() of > 4300 digits raises (int_max_str_digits)
        return 2**31
    return min(int(value), 2**31)


# RFC 9110 §5.6.7: exactly three formats. Names are matched without regard to case (recipients
# "are encouraged to be robust in parsing timestamps"); the structure is not: no 2-digit year
# in IMF-fixdate, one space between parts, "GMT" and nothing else.
_DAY = rb"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun)"
_LONG_DAY = rb"(?:Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday)"
_MONTH = rb"(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)"
_TIME = rb"(\d\d):(\d\d):(\d\d)"
_IMF_FIXDATE = re.compile(_DAY + rb", (\d\d) " + _MONTH + rb" (\d{4}) " + _TIME + rb" GMT", re.I)
_RFC850_DATE = re.compile(
    _LONG_DAY + rb", (\d\d)-" + _MONTH + rb"-(\d\d) " + _TIME + rb" GMT", re.I
)
_ASCTIME_DATE = re.compile(_DAY + rb" " + _MONTH + rb" ([ \d]\d) " + _TIME + rb" (\d{4})", re.I)
_MONTHS = {
    m: i for i, m in enumerate(b"jan feb mar apr may jun jul aug sep oct nov dec".split(), 1)
}


def http_date(value: bytes | None, now: float | None = None) -> float | None:
    """An HTTP-date (RFC 9110 §5.6.7) as a POSIX time; None when absent or not one of the three
    formats. `now` places an rfc850-date's 2-digit year: more than 50 years ahead of now means
    the century before."""
    if not value:
        return None
    text = value.strip(b" \t")
    if m := _IMF_FIXDATE.fullmatch(text):
        day, mon, year, hh, mm, ss = m.groups()
    elif m := _RFC850_DATE.fullmatch(text):
        day, mon, yy, hh, mm, ss = m.groups()
        this_year = time.gmtime(now if now is not None else time.time()).tm_year
        year_n = this_year - this_year % 100 + int(yy)
        if year_n > this_year + 50:
            year_n -= 100
        year = str(year_n).encode()
    elif m := _ASCTIME_DATE.fullmatch(text):
        mon, day, hh, mm, ss, year = m.groups()
    else:
        return None
    try:
        fields = (int(year), _MONTHS[mon.lower()], int(day), int(hh), int(mm), int(ss))
        if fields[3] > 23 or fields[4] > 59 or fields[5] > 60:
            return None
        if fields[2] < 1 or fields[2] > calendar.monthrange(fields[0], fields[1])[1]:
            return None
    except (KeyError, ValueError):
        return None
    return float(calendar.timegm((*fields, 0, 0, 0)))


def _date(value: bytes | None, now: float | None = None) -> float | None:
    return http_date(value, now)


def _single(headers: Headers, name: bytes) -> tuple[bytes | None, bool]:
    """A singleton field's value and whether it is usable: two lines make it invalid (an
    HTTP-date holds a comma, so they cannot be told apart from one list)."""
    values = [v for k, v in headers if k == name]
    if len(values) > 1:
        return None, False
    return (values[0] if values else None), True


def age_value(headers: Headers) -> int:
    """RFC 9111 §5.1: Age is a delta-seconds; a list (`Age: 7200, 0`, or two lines) is an
    error the cache recovers from by using the first member; an invalid first member is 0."""
    first = _header(headers, b"age")
    if first is None:
        return 0
    return _seconds(first.split(b",")[0].strip(b" \t").decode("latin-1")) or 0


# request fields `HttpCache.lookup` reads; a request without any of them (most) needs no more
_LOOKUP_FIELDS = frozenset((b"range", b"pragma", b"cache-control"))
_NO_DIRECTIVES: dict[str, str] = {}  # never written to
_CONDITIONAL_FIELDS = frozenset((b"if-none-match", b"if-modified-since"))  # not_modified


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
    # RFC 5861 windows the response grants (seconds past its lifetime), and whether it forbids
    # serving it stale at all (RFC 9111 §4.2.4: must-revalidate, proxy-revalidate, s-maxage)
    stale_while_revalidate_s: float = 0.0
    stale_if_error_s: float = 0.0
    may_serve_stale: bool = True
    tags: frozenset[str] = frozenset()  # its Cache-Tag names, for purges by tag
    # stored from a request with Cookie or Authorization: what the origin answered may be that
    # visitor's own page, so a request's max-stale never gets it stale (attack review hops #1)
    personal: bool = False
    # the response head made ready to send (HttpCache.prepare: the edge's web.messages
    # PreparedHead), made when the entry is stored and again when a 304 freshens its fields;
    # None when there is no `prepare` or the fields could not be prepared
    prepared: object | None = None

    def age(self, wall: float) -> float:
        """§4.2.3 current_age."""
        resident = wall - self.response_time  # (not max(): a builtin call costs more)
        return self.corrected_initial_age + (resident if resident > 0.0 else 0.0)

    @property
    def etag(self) -> bytes | None:
        return _header(self.headers, b"etag")

    @property
    def last_modified(self) -> bytes | None:
        return _header(self.headers, b"last-modified")


@dataclass(slots=True, eq=False)  # not frozen: a frozen __init__ costs a call per field
class Lookup:
    """A stored response for this request: `fresh` ones are served as they are (also a stale
    one the request's max-stale accepts), the others need the conditional request `validators`
    first (none: a plain request, the entry kept for stale-if-error). `revalidate_after`: served
    stale now (stale-while-revalidate), revalidated once the visitor has it."""

    entry: Entry
    fresh: bool
    validators: Headers
    revalidate_after: bool = False


@dataclass(frozen=True, slots=True)
class StalePolicy:
    """Which stale responses a route may serve (RFC 5861, RFC 9111 §5.2.1.2), each only where
    the response allows it and never beyond `max_s` past its lifetime."""

    while_revalidate: bool = True
    if_error: bool = True
    max_stale: bool = False  # a request's max-stale: a cache MAY honour it; off unless asked
    max_s: float = 86400.0


# statuses this cache understands (RFC 9110 §15): `must-understand` (§5.2.2.3) lets only these
# be stored in spite of `no-store`
UNDERSTOOD_STATUS = frozenset(
    {*range(200, 207), *range(300, 306), 307, 308, *range(400, 418), 421, 422, 426}
    | set(range(500, 506))
)
# RFC 5861 §4: the errors stale-if-error covers
STALE_IF_ERROR_STATUS = frozenset({500, 502, 503, 504})


def freshness_lifetime(
    headers: Headers,
    cc: dict[str, str],
    response_time: float | None = None,
    use_expires: bool = True,
) -> float | None:
    """§4.2.1 for a shared cache: s-maxage, then max-age, then Expires minus Date. Date
    missing or invalid: the time the response was received (§4.2.1 "if Date is not available
    ... use the response_time"); Expires invalid or given twice: already expired (§5.3).
    `use_expires` False: the directives came from a targeted field (RFC 9213 §2.1)."""
    for name in ("s-maxage", "max-age"):
        if name in cc:
            return float(_seconds(cc[name]) or 0)
    if not use_expires:
        return None
    expires, single = _single(headers, b"expires")
    if expires is None and single:
        return None
    exp = _date(expires, response_time) if single else None
    if exp is None:
        return 0.0  # §5.3: an invalid Expires means already expired
    date_value, date_single = _single(headers, b"date")
    date = _date(date_value, response_time) if date_single else None
    if date is None:
        date = response_time if response_time is not None else exp
    return max(0.0, exp - date)


def _window(value: str | None, cap: float) -> float:
    seconds = _seconds(value)
    return min(float(seconds), cap) if seconds is not None else 0.0


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
    stale: StalePolicy = field(default_factory=StalePolicy)
    stale_served: int = 0
    purged: int = 0
    # request header names the edge itself sets or drops on the way to the origin: the origin's
    # answer depends on the edge's value, not the visitor's, so a response varying on one is
    # not stored (it would be matched against the wrong value; attack review hops #5)
    edge_set: Callable[[bytes], bool] | None = None
    # makes an entry's ready-to-send head from its status, fields and body (`Entry.prepared`),
    # once per store or freshen rather than once per hit; None: no prepared heads
    prepare: Callable[[Entry], object | None] | None = None

    @staticmethod
    def key(authority: bytes, target: bytes) -> tuple[bytes, bytes]:
        return (authority.lower(), target)

    def __len__(self) -> int:
        return sum(len(v) for v in self._store.values())

    # ---------------------------------------------------------------- request side
    def lookup(
        self, key: tuple[bytes, bytes], method: bytes, request_headers: Headers, wall: float
    ) -> Lookup | None:
        if method != b"GET" and method != b"HEAD":
            return None
        # one scan for the request fields a lookup reads (most requests carry none of them)
        pragma: bytes | None = None
        has_cc = False
        for k, v in request_headers:
            if k in _LOOKUP_FIELDS:
                if k == b"range":
                    return None
                if k == b"pragma":
                    if pragma is None:
                        pragma = v
                else:
                    has_cc = True
        entries = self._store.get(key)
        if not entries:
            self.misses += 1
            return None
        req_cc = directives(request_headers) if has_cc else _NO_DIRECTIVES
        if "no-store" in req_cc:
            return None
        for entry in entries:
            if not entry.vary or all(
                _normalise(_joined(request_headers, n)) == v for n, v in entry.vary
            ):
                break
        else:
            self.misses += 1
            return None
        self._store.move_to_end(key)
        age = entry.age(wall)
        fresh = age < entry.lifetime and not entry.no_cache
        # what the request itself demands (§5.2.1): it may forbid reusing even a fresh copy
        strict = pragma == b"no-cache"
        min_fresh = None
        if has_cc:
            strict = strict or "no-cache" in req_cc
            max_age = _seconds(req_cc.get("max-age"))
            if max_age is not None and age > max_age:
                strict = True
            min_fresh = _seconds(req_cc.get("min-fresh"))
            if min_fresh is not None and age + min_fresh > entry.lifetime:
                fresh = False  # §5.2.1.3
        stale_ok = entry.may_serve_stale and not entry.no_cache and not strict
        if (
            not fresh
            and stale_ok
            and min_fresh is None
            and "max-stale" in req_cc
            and self.stale.max_stale
            and entry.lifetime > 0  # "revalidate on every use" is never served on a visitor's say
            and not entry.personal
        ):
            # §5.2.1.2: the client accepts a response this much past its lifetime (no value:
            # any, here at most the route's limit)
            value = req_cc["max-stale"]
            window = self.stale.max_s if value == "" else _window(value, self.stale.max_s)
            if age < entry.lifetime + window:
                fresh = True
                self.stale_served += 1
        fresh = fresh and not strict
        validators: Headers = []
        if not fresh:
            if entry.etag is not None:
                validators.append((b"if-none-match", entry.etag))
            if entry.last_modified is not None:
                validators.append((b"if-modified-since", entry.last_modified))
            if (
                stale_ok
                and self.stale.while_revalidate
                and age < entry.lifetime + min(entry.stale_while_revalidate_s, self.stale.max_s)
            ):
                # RFC 5861 §3: serve it now, refresh it in the background
                self.hits += 1
                entry.hits += 1
                self.stale_served += 1
                return Lookup(entry, False, validators, True)
            if not validators:
                self.misses += 1  # a plain request; the entry may still answer an error
        else:
            self.hits += 1
            entry.hits += 1
        return Lookup(entry, fresh, validators)

    def stale_on_error(self, entry: Entry, request_headers: Headers, wall: float) -> bool:
        """RFC 5861 §4: may this stored response answer a request the origin failed (no answer,
        or 500/502/503/504)? Within the response's stale-if-error window (a request's
        stale-if-error may narrow it, never widen it: the visitor does not decide what the
        origin lets others see stale), never where §4.2.4 forbids stale responses, at most the
        route's limit past its lifetime."""
        if not self.stale.if_error or not entry.may_serve_stale or entry.no_cache:
            return False
        req_cc = directives(request_headers)
        if "no-cache" in req_cc:
            return False
        window = min(entry.stale_if_error_s, self.stale.max_s)
        if "stale-if-error" in req_cc:
            window = min(window, _window(req_cc["stale-if-error"], self.stale.max_s))
        if entry.age(wall) >= entry.lifetime + window:
            return False
        self.stale_served += 1
        return True

    def forget(
        self, key: tuple[bytes, bytes], request_headers: Headers, status: int, headers: Headers
    ) -> None:
        """The origin answered a GET for a stored response with `no-store` or `private`: the
        stored variant this request selects is dropped, never served again, stale or not (the
        origin's latest word on the page). Errors other than 404/410 say nothing about the page
        and leave it (a visitor can provoke them). Set-Cookie alone does not drop it: a rolling
        session cookie on a logged-in visitor's answer says nothing about the shared copy."""
        if status >= 400 and status not in (404, 410):
            return
        cc, _targeted = response_directives(headers)
        if not ("no-store" in cc or ("private" in cc and not cc["private"])):
            return
        for entry in list(self._store.get(key, ())):
            if all(_normalise(_joined(request_headers, n)) == v for n, v in entry.vary):
                self._remove(key, entry)

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
        """May this response be stored (§3), before its body is seen? Any final status but
        206 (ranges are not kept) and 304 (it only freshens), as long as it has explicit
        freshness, `public`, or a status heuristically cacheable (§4.2.2's list, which only
        limits heuristics; this cache uses none, so that one needs no-cache and validators). An
        error status outside that list only when the origin asks a shared cache explicitly
        (s-maxage or a targeted field): a site's blanket max-age on every response would
        otherwise let a visitor who provokes a 400 store it for everyone (attack review hops
        #2)."""
        if method != b"GET" or status < 200 or status in (206, 304):
            return False
        if _header(request_headers, b"range") is not None:
            return False
        if "no-store" in directives(request_headers):
            return False
        cc, targeted = response_directives(headers)
        if "must-understand" in cc and status not in UNDERSTOOD_STATUS:
            return False  # §5.2.2.3
        if status >= 400 and status not in CACHEABLE_STATUS and not (targeted or "s-maxage" in cc):
            return False
        return self._shareable(request_headers, headers, status)

    def _shareable(self, request_headers: Headers, headers: Headers, status: int = 200) -> bool:
        """§3's rules on a response's header fields, for a shared cache."""
        cc, targeted = response_directives(headers)
        # §5.2.2.3: must-understand on a status this cache understands overrides no-store
        if "no-store" in cc and not ("must-understand" in cc and status in UNDERSTOOD_STATUS):
            return False
        if "private" in cc and not cc["private"]:
            return False  # qualified private="a, b": the rest may be stored (§5.2.2.7)
        if _header(headers, b"set-cookie") is not None:
            return False  # one visitor's cookie is never handed to another
        vary = _vary_names(headers)
        if vary is None:
            return False
        if self.edge_set is not None and any(self.edge_set(n) for n in vary):
            return False  # the origin saw the edge's value of that header, not the visitor's
        if _header(request_headers, b"authorization") is not None and not (
            "public" in cc or "s-maxage" in cc or "must-revalidate" in cc
        ):
            return False  # §3.5
        length = _header(headers, b"content-length")
        if (
            length is not None
            and length.isdigit()
            and (len(length) > 18 or int(length) > self.max_object_bytes)  # no int() of 5000 digits
        ):
            return False
        lifetime = freshness_lifetime(headers, cc, None, not targeted)
        if lifetime is None and not (
            "no-cache" in cc and ("public" in cc or status in CACHEABLE_STATUS)
        ):
            return False  # no explicit freshness; heuristics are not used
        return self.max_bytes > 0

    def _policy(self, entry: Entry, headers: Headers, response_time: float) -> None:
        """Set an entry's lifetime and stale rules from (stored or merged) header fields."""
        cc, targeted = response_directives(headers)
        entry.lifetime = freshness_lifetime(headers, cc, response_time, not targeted) or 0.0
        entry.no_cache = "no-cache" in cc and not cc["no-cache"]
        entry.stale_while_revalidate_s = _window(cc.get("stale-while-revalidate"), 2**31)
        entry.stale_if_error_s = _window(cc.get("stale-if-error"), 2**31)
        # §4.2.4 and §5.2.2.2/§5.2.2.8/§5.2.2.10: no stale copy of these, ever
        entry.may_serve_stale = not (
            "must-revalidate" in cc or "proxy-revalidate" in cc or "s-maxage" in cc
        )

    @staticmethod
    def _kept(headers: Headers) -> Headers:
        """The header fields stored with a response: not hop-by-hop ones, not those its
        Connection field names (RFC 9110 §7.6.1), not those a qualified no-cache or private
        names (RFC 9111 §5.2.2.4, §5.2.2.7: the rest of the response may be reused)."""
        drop = set(_NOT_STORED)
        for k, v in headers:
            if k == b"connection":
                drop.update(p.strip().lower() for p in v.split(b",") if p.strip())
        cc, _targeted = response_directives(headers)
        for name in ("no-cache", "private"):
            if cc.get(name):
                drop.update(
                    p.strip().lower().encode("latin-1") for p in cc[name].split(",") if p.strip()
                )
        return [(k, v) for k, v in headers if k not in drop]

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
        vary_names = _vary_names(headers) or ()
        kept = self._kept(headers)
        # §4.2.3: the age the response already had when it arrived
        date_value, date_single = _single(headers, b"date")
        date = _date(date_value, response_time) if date_single else None
        apparent_age = max(0.0, response_time - date) if date is not None else 0.0
        corrected_age = age_value(headers) + (response_time - request_time)
        entry = Entry(
            status,
            kept,
            body,
            tuple((n, _normalise(_joined(request_headers, n))) for n in vary_names),
            response_time,
            max(apparent_age, corrected_age),
            0.0,
            False,
            tags=tags,
        )
        self._policy(entry, headers, response_time)
        entry.personal = any(k in (b"cookie", b"authorization") for k, _ in request_headers)
        if self.prepare is not None:
            entry.prepared = self.prepare(entry)
        entries = self._store.get(key)
        if entries is None:
            entries = self._store[key] = []
        same = [e for e in entries if e.vary == entry.vary]
        if status >= 400 and any(
            e.status < 400 and not e.no_cache and e.age(response_time) < e.lifetime for e in same
        ):
            # an error never replaces a fresh page: a visitor who provokes one (no-cache and a
            # header the application refuses) must not serve it to everyone (hops #2)
            return
        for old in same:
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
        replaced = {k for k, _ in self._kept(not_modified_headers) if k != b"content-length"}
        merged = [(k, v) for k, v in entry.headers if k not in replaced] + [
            (k, v) for k, v in not_modified_headers if k in replaced
        ]
        date_value, date_single = _single(merged, b"date")
        date = _date(date_value, response_time) if date_single else None
        apparent_age = max(0.0, response_time - date) if date is not None else 0.0
        nm_cc, _targeted = response_directives(not_modified_headers)
        shared = (
            _header(not_modified_headers, b"set-cookie") is None
            and "no-store" not in nm_cc
            and not ("private" in nm_cc and not nm_cc["private"])
            and self._shareable(request_headers, merged, entry.status)
            and _vary_names(merged) == tuple(n for n, _ in entry.vary)
        )
        self.revalidated += 1
        if not shared:
            self._remove(key, entry)
            private = Entry(
                entry.status,
                merged,
                entry.body,
                entry.vary,
                response_time,
                max(apparent_age, response_time - request_time),
                0.0,
                True,
            )
            if self.prepare is not None:
                private.prepared = self.prepare(private)
            return private
        entry.headers = self._kept(merged)
        entry.prepared = self.prepare(entry) if self.prepare is not None else None
        self._policy(entry, merged, response_time)
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
        + 5 * _FLOAT_BYTES
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
    if entry.prepared is not None:
        # a prepared head: its own list of the same fields (a Content-Length of its own), and
        # room for its per-protocol encodings (about the fields' bytes each, made on first use)
        size += getsize(entry.prepared) + getsize(entry.headers) + _PREPARED_BYTES
        for k, v in entry.headers:
            size += _PAIR_BYTES + 2 * (len(k) + len(v) + 8)
    return size


def not_modified(entry: Entry, request_headers: Headers) -> bool:
    """RFC 9110 §13.1.2/§13.1.3 for a GET/HEAD served from the cache: does the visitor's own
    conditional header say it already has this response?"""
    inm = ims_value = None
    for k, v in request_headers:  # one scan: most requests carry neither field
        if k in _CONDITIONAL_FIELDS:
            if k == b"if-none-match":
                if inm is None:
                    inm = v
            elif ims_value is None:
                ims_value = v
    if inm is None and ims_value is None:
        return False
    etag = entry.etag
    if inm is not None:
        if etag is None:
            return False
        if inm.strip() == b"*":
            return True
        weak = etag.removeprefix(b"W/")  # §8.8.3.2: If-None-Match uses weak comparison
        return any(t.strip().removeprefix(b"W/") == weak for t in inm.split(b","))
    # RFC 9110 §13.1.3: an invalid date (the same strict parser) means no condition
    ims = http_date(ims_value, entry.response_time)
    if ims is None:
        return False
    # RFC 9111 §4.3.2: without Last-Modified, "the stored response's Date field value (or, if
    # no Date field is present, the time that the stored response was received)"
    if entry.last_modified is not None:
        lm = http_date(entry.last_modified, entry.response_time)
    else:
        lm = http_date(_header(entry.headers, b"date"), entry.response_time)
        lm = entry.response_time if lm is None else lm
    return lm is not None and lm <= ims
