"""RFC 9111 decisions of the edge's shared cache, fed requests and responses with `now`."""

from __future__ import annotations

import email.utils
import gc
import tracemalloc

import h11
import pytest
from hypothesis import given
from hypothesis import strategies as st

from blindfold.core.httpcache import (
    Entry,
    HttpCache,
    StalePolicy,
    age_value,
    directives,
    freshness_lifetime,
    http_date,
    not_modified,
)
from blindfold.core.ratelimit import BucketMap

KEY = HttpCache.key(b"Example.TEST", b"/a")
T0 = 1_800_000_000.0


def imf(t: float) -> bytes:
    return email.utils.formatdate(t, usegmt=True).encode()


def stored(
    cache: HttpCache,
    headers: list[tuple[bytes, bytes]],
    body: bytes = b"body",
    req: list[tuple[bytes, bytes]] | None = None,
    status: int = 200,
) -> bool:
    req = req or []
    if not cache.storable(b"GET", req, status, headers):
        return False
    cache.store(KEY, req, status, headers, body, T0, T0)
    return True


def test_key_ignores_host_case_only() -> None:
    assert HttpCache.key(b"EXAMPLE.test", b"/a") == KEY
    assert HttpCache.key(b"example.test", b"/A") != KEY


@pytest.mark.parametrize(
    "headers,req,ok",
    [
        ([(b"cache-control", b"max-age=60")], [], True),
        ([(b"cache-control", b"public, s-maxage=10")], [], True),
        ([(b"expires", imf(T0 + 60)), (b"date", imf(T0))], [], True),
        ([], [], False),  # no explicit freshness: no heuristics
        ([(b"cache-control", b"max-age=60, private")], [], False),
        ([(b"cache-control", b"no-store, max-age=60")], [], False),
        ([(b"cache-control", b"max-age=60")], [(b"cache-control", b"no-store")], False),
        ([(b"cache-control", b"max-age=60"), (b"set-cookie", b"a=b")], [], False),
        ([(b"cache-control", b"max-age=60"), (b"vary", b"*")], [], False),
        ([(b"cache-control", b"max-age=60")], [(b"authorization", b"Basic x")], False),
        ([(b"cache-control", b"public, max-age=60")], [(b"authorization", b"Basic x")], True),
        ([(b"cache-control", b"max-age=60")], [(b"range", b"bytes=0-1")], False),
        ([(b"cache-control", b"no-cache")], [], True),  # stored, revalidated on every use
    ],
)
def test_what_is_stored(
    headers: list[tuple[bytes, bytes]], req: list[tuple[bytes, bytes]], ok: bool
) -> None:
    assert stored(HttpCache(1 << 20, 1 << 16), headers, req=req) is ok


def test_status_and_method_rules() -> None:
    cache = HttpCache(1 << 20, 1 << 16)
    cc = [(b"cache-control", b"max-age=60")]
    assert cache.storable(b"GET", [], 404, cc)
    assert cache.storable(b"GET", [], 302, cc)  # RFC 9111 §3: explicit freshness suffices
    assert not cache.storable(b"GET", [], 206, cc)
    assert not cache.storable(b"POST", [], 200, cc)


def test_fresh_then_stale_then_revalidated() -> None:
    cache = HttpCache(1 << 20, 1 << 16)
    assert stored(cache, [(b"cache-control", b"max-age=10"), (b"etag", b'"v1"')])
    hit = cache.lookup(KEY, b"GET", [], T0 + 5)
    assert hit is not None and hit.fresh and int(hit.entry.age(T0 + 5)) == 5
    stale = cache.lookup(KEY, b"GET", [], T0 + 11)
    assert stale is not None and not stale.fresh
    assert stale.validators == [(b"if-none-match", b'"v1"')]
    served = cache.freshen(
        KEY,
        stale.entry,
        [(b"cache-control", b"max-age=100"), (b"etag", b'"v1"')],
        [],
        T0 + 11,
        T0 + 11,
    )
    assert served is stale.entry  # shared: the stored entry itself was freshened
    again = cache.lookup(KEY, b"GET", [], T0 + 50)
    assert again is not None and again.fresh and again.entry.body == b"body"


STORED_304 = [
    (b"cache-control", b"max-age=10"),
    (b"etag", b'"v1"'),
    (b"content-type", b"text/plain"),
    (b"content-length", b"4"),
]


def stale_entry(cache: HttpCache) -> Entry:
    assert stored(cache, STORED_304)
    stale = cache.lookup(KEY, b"GET", [], T0 + 11)
    assert stale is not None and not stale.fresh
    assert stale.validators == [(b"if-none-match", b'"v1"')]
    return stale.entry


def test_a_304_freshens_the_stored_headers_it_carries() -> None:
    """RFC 9111 §4.3.4: the 304's fields replace the stored ones (all instances), except
    Content-Length and hop-by-hop fields."""
    cache = HttpCache(1 << 20, 1 << 16)
    entry = stale_entry(cache)
    served = cache.freshen(
        KEY,
        entry,
        [
            (b"cache-control", b"max-age=100"),
            (b"etag", b'"v1"'),
            (b"content-length", b"0"),
            (b"connection", b"close"),
            (b"x-served-by", b"o2"),
        ],
        [],
        T0 + 11,
        T0 + 11,
    )
    assert served is entry
    assert entry.headers == [
        (b"content-type", b"text/plain"),
        (b"content-length", b"4"),
        (b"cache-control", b"max-age=100"),
        (b"etag", b'"v1"'),
        (b"x-served-by", b"o2"),
    ]
    hit = cache.lookup(KEY, b"GET", [], T0 + 60)
    assert hit is not None and hit.fresh and hit.entry is entry
    assert cache.revalidated == 1


@pytest.mark.parametrize(
    "extra",
    [
        [(b"set-cookie", b"session=alice; HttpOnly")],  # one visitor's cookie
        [(b"cache-control", b"no-store")],
        [(b"cache-control", b"private, max-age=100")],
        [(b"cache-control", b"max-age=100"), (b"vary", b"*")],
        [(b"cache-control", b"max-age=100"), (b"vary", b"cookie")],  # a new variant key
    ],
)
def test_a_304_not_for_sharing_answers_only_its_visitor_and_drops_the_entry(
    extra: list[tuple[bytes, bytes]],
) -> None:
    """Issue 15 finding 1: a 304 carrying Set-Cookie, no-store or private (or making the
    merged response unstorable) answers the visitor who asked, with the stored body and the
    304's headers, and the shared entry is removed, so the next visitor never sees them."""
    cache = HttpCache(1 << 20, 1 << 16)
    entry = stale_entry(cache)
    nm = [(b"etag", b'"v1"'), *extra]
    served = cache.freshen(KEY, entry, nm, [(b"cookie", b"session=alice")], T0 + 11, T0 + 11)
    assert served is not entry
    assert (served.status, served.body) == (200, b"body")
    for name, value in extra:
        assert (name, value) in served.headers  # the visitor gets what the origin said
    assert (b"content-type", b"text/plain") in served.headers
    assert cache.lookup(KEY, b"GET", [], T0 + 12) is None
    assert cache.used == 0 and len(cache) == 0
    assert all(k != b"set-cookie" for k, _ in entry.headers)  # the shared copy never had it


def test_a_304_to_an_authorized_request_is_not_shared() -> None:
    """§3.5: what answers a request with Authorization is shared only when the response
    allows it; the storability rules apply to the merged result."""
    cache = HttpCache(1 << 20, 1 << 16)
    entry = stale_entry(cache)
    nm = [(b"etag", b'"v1"'), (b"cache-control", b"max-age=100")]
    served = cache.freshen(KEY, entry, nm, [(b"authorization", b"Basic x")], T0 + 11, T0 + 11)
    assert served is not entry and cache.lookup(KEY, b"GET", [], T0 + 12) is None
    entry = stale_entry(cache)
    nm = [(b"etag", b'"v1"'), (b"cache-control", b"public, max-age=100")]
    served = cache.freshen(KEY, entry, nm, [(b"authorization", b"Basic x")], T0 + 11, T0 + 11)
    assert served is entry
    hit = cache.lookup(KEY, b"GET", [], T0 + 12)
    assert hit is not None and hit.fresh


def test_other_variants_survive_a_private_304() -> None:
    cache = HttpCache(1 << 20, 1 << 16)
    headers = [(b"cache-control", b"max-age=10"), (b"etag", b'"v1"'), (b"vary", b"accept")]
    for accept in (b"a", b"b"):
        cache.store(KEY, [(b"accept", accept)], 200, headers, accept, T0, T0)
    stale = cache.lookup(KEY, b"GET", [(b"accept", b"a")], T0 + 11)
    assert stale is not None
    used_by_b = cache.used - stale.entry.size
    served = cache.freshen(
        KEY, stale.entry, [(b"set-cookie", b"s=1")], [(b"accept", b"a")], T0 + 11, T0 + 11
    )
    assert served.body == b"a"
    assert cache.lookup(KEY, b"GET", [(b"accept", b"a")], T0 + 11) is None
    other = cache.lookup(KEY, b"GET", [(b"accept", b"b")], T0 + 11)
    assert other is not None and other.entry.body == b"b"
    assert cache.used == used_by_b


def test_age_counts_what_the_response_already_had() -> None:
    cache = HttpCache(1 << 20, 1 << 16)
    assert stored(cache, [(b"cache-control", b"max-age=10"), (b"age", b"8")])
    entry = cache.lookup(KEY, b"GET", [], T0 + 1)
    assert entry is not None and entry.fresh and int(entry.entry.age(T0 + 1)) == 9
    stale = cache.lookup(KEY, b"GET", [], T0 + 3)
    assert stale is None or not stale.fresh


def test_non_ascii_digits_are_not_delta_seconds() -> None:
    # found by hypothesis: "\xb2" (superscript two) passes str.isdigit() but not int()
    cache = HttpCache(1 << 20, 1 << 16)
    assert stored(cache, [(b"cache-control", b"max-age=10"), (b"age", b"\xb2")])
    bad = [(b"cache-control", b"max-age=\xb2")]
    # not a token (RFC 9111 §5.2): the member is ignored, no explicit freshness, not stored
    assert directives(bad) == {}
    assert freshness_lifetime(bad, directives(bad)) is None
    assert not stored(cache, bad)


def test_request_directives_force_revalidation() -> None:
    cache = HttpCache(1 << 20, 1 << 16)
    assert stored(cache, [(b"cache-control", b"max-age=100"), (b"last-modified", imf(T0 - 100))])
    for req in (
        [(b"cache-control", b"no-cache")],
        [(b"pragma", b"no-cache")],
        [(b"cache-control", b"max-age=0")],
    ):
        found = cache.lookup(KEY, b"GET", req, T0 + 5)
        assert found is not None and not found.fresh
        assert found.validators == [(b"if-modified-since", imf(T0 - 100))]
    assert cache.lookup(KEY, b"GET", [(b"cache-control", b"no-store")], T0) is None


def test_stale_without_validators_is_a_plain_miss() -> None:
    cache = HttpCache(1 << 20, 1 << 16)
    assert stored(cache, [(b"cache-control", b"max-age=1")])
    found = cache.lookup(KEY, b"GET", [], T0 + 5)
    # a plain request goes out (no validators); the entry is only there for stale-if-error
    assert found is not None and not found.fresh and found.validators == []
    assert cache.misses == 1


def test_vary_selects_the_variant() -> None:
    cache = HttpCache(1 << 20, 1 << 16)
    headers = [(b"cache-control", b"max-age=60"), (b"vary", b"Accept-Language")]
    for lang, body in ((b"en", b"hello"), (b"fr", b"bonjour")):
        req = [(b"accept-language", lang)]
        assert cache.storable(b"GET", req, 200, headers)
        cache.store(KEY, req, 200, headers, body, T0, T0)
    en = cache.lookup(KEY, b"GET", [(b"accept-language", b"EN")], T0)  # case normalised
    fr = cache.lookup(KEY, b"GET", [(b"accept-language", b"fr")], T0)
    assert en is not None and en.entry.body == b"hello"
    assert fr is not None and fr.entry.body == b"bonjour"
    assert cache.lookup(KEY, b"GET", [(b"accept-language", b"de")], T0) is None
    assert cache.lookup(KEY, b"GET", [], T0) is None


def test_unsafe_methods_invalidate() -> None:
    cache = HttpCache(1 << 20, 1 << 16)
    assert stored(cache, [(b"cache-control", b"max-age=60")])
    cache.invalidate(b"POST", KEY, 500)  # an error does not
    assert cache.lookup(KEY, b"GET", [], T0) is not None
    cache.invalidate(b"POST", KEY, 200)
    assert cache.lookup(KEY, b"GET", [], T0) is None and cache.used == 0


def test_size_bounds_evict_least_recently_used() -> None:
    cache = HttpCache(3000, 1500)
    cc = [(b"cache-control", b"max-age=60")]
    for i in range(5):
        key = HttpCache.key(b"h", f"/{i}".encode())
        cache.store(key, [], 200, cc, b"x" * 1000, T0, T0)
        assert cache.used <= cache.max_bytes
    assert cache.lookup(HttpCache.key(b"h", b"/4"), b"GET", [], T0) is not None
    assert cache.lookup(HttpCache.key(b"h", b"/0"), b"GET", [], T0) is None
    cache.store(KEY, [], 200, cc, b"x" * 2000, T0, T0)  # over max_object_bytes: not kept
    assert cache.lookup(KEY, b"GET", [], T0) is None
    assert not cache.storable(b"GET", [], 200, [*cc, (b"content-length", b"2000")])


def test_not_modified_for_the_visitors_own_validators() -> None:
    cache = HttpCache(1 << 20, 1 << 16)
    assert stored(
        cache,
        [
            (b"cache-control", b"max-age=60"),
            (b"etag", b'W/"v1"'),
            (b"last-modified", imf(T0 - 10)),
        ],
    )
    entry = cache.lookup(KEY, b"GET", [], T0)
    assert entry is not None
    assert not_modified(entry.entry, [(b"if-none-match", b'"v1"')])  # weak comparison
    assert not_modified(entry.entry, [(b"if-none-match", b'"x", W/"v1"')])
    assert not not_modified(entry.entry, [(b"if-none-match", b'"v2"')])
    assert not_modified(entry.entry, [(b"if-modified-since", imf(T0))])
    assert not not_modified(entry.entry, [(b"if-modified-since", imf(T0 - 20))])


def test_freshness_lifetime_precedence() -> None:
    h = [(b"expires", imf(T0 + 500)), (b"date", imf(T0))]
    assert freshness_lifetime(h, directives(h)) == 500
    h2 = [*h, (b"cache-control", b"max-age=20")]
    assert freshness_lifetime(h2, directives(h2)) == 20
    h3 = [*h2, (b"cache-control", b"s-maxage=5")]
    assert freshness_lifetime(h3, directives(h3)) == 5
    bad = [(b"expires", b"0")]
    assert freshness_lifetime(bad, directives(bad)) == 0.0  # invalid Expires: expired


@given(
    st.lists(
        st.tuples(
            st.sampled_from(
                [b"cache-control", b"expires", b"date", b"vary", b"age", b"etag", b"set-cookie"]
            ),
            st.binary(max_size=40),
        ),
        max_size=8,
    )
)
def test_any_response_headers_are_handled(headers: list[tuple[bytes, bytes]]) -> None:
    cache = HttpCache(1 << 16, 1 << 12)
    if cache.storable(b"GET", [], 200, headers):
        cache.store(KEY, [], 200, headers, b"b", T0, T0)
        cache.lookup(KEY, b"GET", [], T0 + 1)


def test_bucket_map_rate_and_bound() -> None:
    buckets = BucketMap(1.0, 2, max_keys=3)
    assert buckets.take("a", 0.0) == 0.0 and buckets.take("a", 0.0) == 0.0
    wait = buckets.take("a", 0.0)
    assert 0.9 < wait <= 1.0  # one token per second: about a second to wait
    assert buckets.take("a", 1.01) == 0.0
    for key in "bcd":
        buckets.take(key, 2.0)
    assert len(buckets) == 3  # "a" (least recently used) was evicted


def _origin_response(i: int) -> tuple[int, list[tuple[bytes, bytes]]]:
    """A typical origin response head for /static/<i>, parsed by h11 as the edge does (the
    header bytes are the objects a stored entry really keeps)."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target=f"/static/{i}", headers=[("host", "x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(
        b"HTTP/1.1 200 OK\r\n"
        b"Server: nginx/1.22.1\r\n"
        b"Date: Sat, 05 Dec 2026 10:00:00 GMT\r\n"
        b"Content-Type: text/css; charset=utf-8\r\n"
        b"Content-Length: %d\r\n"
        b"Last-Modified: Fri, 04 Dec 2026 10:00:00 GMT\r\n"
        b'ETag: "%08x-1f4"\r\n'
        b"Cache-Control: public, max-age=3600\r\n"
        b"Vary: Accept-Encoding\r\n"
        b"X-Content-Type-Options: nosniff\r\n"
        b"\r\n" % (i % 300, i)
    )
    event = conn.next_event()
    assert isinstance(event, h11.Response)
    return event.status_code, list(event.headers)


def test_charged_bytes_cover_what_the_entries_really_take() -> None:
    """Issue 15 finding 13: small entries cost far more than their body and header bytes (the
    objects holding them); with the cache full, the memory it really holds (tracemalloc)
    stays within max_bytes, and what it charges is not far above that either."""
    max_bytes = 1 << 20
    cache = HttpCache(max_bytes, 1 << 16)
    req = [(b"accept-encoding", b"gzip, br")]
    tracemalloc.start()
    try:
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        for i in range(6000):
            status, headers = _origin_response(i)
            key = HttpCache.key(b"www.example.test", f"/static/{i}".encode())
            body = bytes(i % 300)
            cache.store(key, req, status, headers, body, T0 + i, T0 + i)
        del status, headers, key, body
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert cache.evictions > 0 and cache.used <= max_bytes
    assert held <= max_bytes * 1.02 + 16384, (held, cache.used, len(cache))
    assert held >= cache.used * 0.9, (held, cache.used, len(cache))


def test_a_304_for_an_entry_evicted_meanwhile_keeps_the_accounting() -> None:
    cache = HttpCache(1 << 20, 1 << 16)
    entry = stale_entry(cache)
    cache.invalidate(b"POST", KEY, 200)  # another visitor's POST, during the revalidation
    assert cache.used == 0
    nm = [(b"etag", b'"v1"'), (b"cache-control", b"max-age=100"), (b"x-long", b"v" * 500)]
    served = cache.freshen(KEY, entry, nm, [], T0 + 11, T0 + 11)
    assert served is entry and served.lifetime == 100
    assert cache.used == 0 and cache.lookup(KEY, b"GET", [], T0 + 12) is None


# ---------------------------------------------- issue 17: the rules the public cache suite checks
FUTURE = 2524608000.0  # Thu, 01 Jan 2050 00:00:00 GMT


@pytest.mark.parametrize(
    "value,expected",
    [
        # RFC 9110 §5.6.7: "Recipients of timestamp values are encouraged to be robust in
        # parsing timestamps": the three formats, names in any case
        (b"Sun, 06 Nov 1994 08:49:37 GMT", 784111777.0),  # IMF-fixdate
        (b"Sunday, 06-Nov-94 08:49:37 GMT", 784111777.0),  # obsolete RFC 850 format
        (b"Sun Nov  6 08:49:37 1994", 784111777.0),  # ANSI C's asctime() format
        (b"SUN, 06 NOV 1994 08:49:37 gmt", 784111777.0),
        (b"Thursday, 18-Aug-50 02:01:18 GMT", 2544400878.0),  # "50 years in the future" rule
        (b"Tue, 19 Jan 2038 14:14:08 GMT", 2147523248.0),  # past 32 bits
        # anything else is not an HTTP-date
        (b"Thu, 18 Aug 2050 02:01:18 UTC", None),
        (b"Thu, 18 Aug 2050 02:01:18 AEST", None),
        (b"Thu, 18 Aug 50 02:01:18 GMT", None),  # 2-digit year in IMF-fixdate
        (b"Thu 18 Aug 2050 02:01:18 GMT", None),  # no comma
        (b"Thu, 18  Aug  2050 02:01:18 GMT", None),  # extra spaces
        (b"Thu, 18-Aug-2050 02:01:18 GMT", None),  # dashes
        (b"Thu, 18 Aug 2050 02.01.18 GMT", None),  # periods in the time
        (b"Thu, 18 Aug 2050 2:01:18 GMT", None),  # 1-digit hour
        (b"Thu, 31 Feb 2050 02:01:18 GMT", None),  # no such day
        (b"Thu, 18 Aug 2050 25:01:18 GMT", None),
        (b"0", None),
        (b"", None),
        ("Thu, 18 Aug \uff12\uff10\uff15\uff10 02:01:18 GMT".encode(), None),  # fullwidth digits
    ],
)
def test_http_date_accepts_exactly_the_three_formats(value: bytes, expected: float | None) -> None:
    assert http_date(value, now=T0) == expected


@pytest.mark.parametrize(
    "expires",
    [
        [(b"expires", b"Thu, 18 Aug 50 02:01:18 GMT")],
        [(b"expires", b"Thu, 18 Aug 2050 2:01:18 GMT")],
        # two lines: "Thu, 18 Aug 2050 02:01:18 GMT, Thu, ..." cannot be one HTTP-date
        [(b"expires", imf(FUTURE)), (b"expires", imf(FUTURE + 1))],
    ],
)
def test_invalid_expires_is_already_expired(expires: list[tuple[bytes, bytes]]) -> None:
    # RFC 9111 §5.3: "A cache recipient MUST interpret invalid date formats, especially the
    # value "0", as representing a time in the past (i.e., "already expired")."
    headers = [*expires, (b"date", imf(T0))]
    assert freshness_lifetime(headers, directives(headers), T0) == 0.0
    cache = HttpCache(1 << 20, 1 << 16)
    assert stored(cache, [*headers, (b"etag", b'"e"')])
    found = cache.lookup(KEY, b"GET", [], T0 + 1)
    assert found is not None and not found.fresh


@pytest.mark.parametrize("date", [[], [(b"date", b"yesterday")]])
def test_expires_without_a_usable_date_counts_from_receipt(
    date: list[tuple[bytes, bytes]],
) -> None:
    # RFC 9111 §4.2.1 (freshness_lifetime = expires_value - date_value): a recipient with no
    # valid Date uses the time it received the response (RFC 9110 §6.6.1, §4.2.3's
    # response_time)
    headers = [(b"expires", imf(T0 + 100)), *date]
    assert freshness_lifetime(headers, directives(headers), T0) == 100.0
    cache = HttpCache(1 << 20, 1 << 16)
    assert stored(cache, headers)
    found = cache.lookup(KEY, b"GET", [], T0 + 50)
    assert found is not None and found.fresh


def test_last_modified_and_if_modified_since_use_the_strict_parser() -> None:
    # RFC 9110 §13.1.3: "A recipient MUST ignore the If-Modified-Since header field if the
    # received field value is not a valid HTTP-date"
    cache = HttpCache(1 << 20, 1 << 16)
    assert stored(cache, [(b"cache-control", b"max-age=60"), (b"last-modified", imf(T0))])
    found = cache.lookup(KEY, b"GET", [], T0)
    assert found is not None
    assert not_modified(found.entry, [(b"if-modified-since", imf(T0 + 1))])
    assert not not_modified(found.entry, [(b"if-modified-since", b"Thu, 18 Aug 50 02:01:18 GMT")])


@pytest.mark.parametrize(
    "age,expected", [(b"7200, 0", 7200), (b"7200,0", 7200), (b"3600a", 0), (b"", 0)]
)
def test_age_list_uses_the_first_member(age: bytes, expected: int) -> None:
    # RFC 9111 §5.1: "If the field value (after discarding ...) is a list, a recipient SHOULD
    # use the first member ... and discard subsequent ones"; an invalid value is not an age
    assert age_value([(b"age", age)]) == expected
    cache = HttpCache(1 << 20, 1 << 16)
    assert stored(cache, [(b"cache-control", b"max-age=3600"), (b"age", age)])
    found = cache.lookup(KEY, b"GET", [], T0)
    assert found is not None and found.fresh == (expected < 3600)


@pytest.mark.parametrize(
    "value,expected",
    [
        (b"max-age=3600", {"max-age": "3600"}),
        (b"max-age =3600", {}),  # RFC 9111 §5.2: token [ "=" ( token / quoted-string ) ]
        (b"max-age= 3600", {}),
        (b"max-age=3600 x, public", {"public": ""}),
        (b'max-age="3600"', {"max-age": "3600"}),  # §5.2: quoted form is accepted
        (b'no-cache="a, b", max-age=5', {"no-cache": "a, b", "max-age": "5"}),
        (b"MAX-AGE=5, max-age=6", {"max-age": "5"}),  # names case-insensitive; first wins
    ],
)
def test_cache_control_grammar(value: bytes, expected: dict[str, str]) -> None:
    assert directives([(b"cache-control", value)]) == expected


def test_invalid_max_age_member_is_ignored_not_obeyed() -> None:
    cache = HttpCache(1 << 20, 1 << 16)
    assert not stored(cache, [(b"cache-control", b"max-age =3600")])


@pytest.mark.parametrize(
    "status,cc",
    [
        (200, b"max-age=60"),
        (299, b"max-age=60"),
        (302, b"max-age=60"),
        (303, b"max-age=60"),
        (307, b"max-age=60"),
        (404, b"max-age=60"),
        (501, b"max-age=60"),
        (400, b"s-maxage=60"),
        (499, b"s-maxage=60"),
        (500, b"s-maxage=60"),
        (502, b"public, s-maxage=60"),
        (503, b"s-maxage=60"),
        (504, b"s-maxage=60"),
        (599, b"s-maxage=60"),
    ],
)
def test_any_final_status_with_explicit_freshness_is_stored(status: int, cc: bytes) -> None:
    # RFC 9111 §3: a cache MAY store a response if "the response status code is final" and it
    # contains "a max-age response directive" (or Expires, s-maxage, public), not only a
    # heuristically cacheable status (§4.2.2's list limits heuristics only); an error outside
    # that list only when the origin addresses shared caches (s-maxage, a targeted field)
    cache = HttpCache(1 << 20, 1 << 16)
    assert stored(cache, [(b"cache-control", cc)], status=status)
    found = cache.lookup(KEY, b"GET", [], T0 + 1)
    assert found is not None and found.fresh and found.entry.status == status
    stale = cache.lookup(KEY, b"GET", [], T0 + 61)
    assert stale is None or not stale.fresh


@pytest.mark.parametrize("status", [100, 103, 206, 304])
def test_interim_partial_and_not_modified_are_not_stored(status: int) -> None:
    cache = HttpCache(1 << 20, 1 << 16)
    assert not stored(cache, [(b"cache-control", b"max-age=60")], status=status)


def test_heuristic_statuses_still_need_explicit_freshness_or_no_cache() -> None:
    cache = HttpCache(1 << 20, 1 << 16)
    assert not stored(cache, [(b"cache-control", b"public")], status=302)
    assert not stored(cache, [(b"cache-control", b"no-cache")], status=302)
    assert stored(cache, [(b"cache-control", b"no-cache")], status=200)


@pytest.mark.parametrize("status,ok", [(200, True), (404, True), (599, False), (299, False)])
def test_must_understand(status: int, ok: bool) -> None:
    # RFC 9111 §5.2.2.3: "a cache that understands and conforms to the requirements of that
    # status code MAY store it ... When the must-understand directive is present, caches
    # ignore the no-store directive"; an unknown status with must-understand is not stored
    cache = HttpCache(1 << 20, 1 << 16)
    cc = [(b"cache-control", b"max-age=3600, no-store, must-understand")]
    assert stored(cache, cc, status=status) is ok


@pytest.mark.parametrize(
    "headers,lifetime",
    [
        # RFC 9213 §2.1: the targeted field replaces Cache-Control (and Expires)
        ([(b"cdn-cache-control", b"max-age=3600")], 3600.0),
        ([(b"cache-control", b"no-store"), (b"cdn-cache-control", b"max-age=100")], 100.0),
        ([(b"cache-control", b"max-age=1"), (b"cdn-cache-control", b"max-age=100")], 100.0),
        ([(b"cache-control", b"max-age=100"), (b"cdn-cache-control", b"max-age=1")], 1.0),
        ([(b"cdn-cache-control", b"max-age=100"), (b"expires", b"0")], 100.0),
        ([(b"cdn-cache-control", b"max-age=99999999999")], float(2**31)),
        ([(b"cdn-cache-control", b"foo, max-age=100")], 100.0),
        # the edge's own targeted field comes before CDN-Cache-Control
        (
            [(b"cdn-cache-control", b"max-age=5"), (b"blindfold-cache-control", b"max-age=7")],
            7.0,
        ),
        # an invalid Structured Field: as if absent, Cache-Control applies
        ([(b"cache-control", b"max-age=1"), (b"cdn-cache-control", b"max-age =100")], 1.0),
        ([(b"cache-control", b"max-age=1"), (b"cdn-cache-control", b"max-age=100, &&")], 1.0),
    ],
)
def test_cdn_cache_control_overrides_cache_control(
    headers: list[tuple[bytes, bytes]], lifetime: float
) -> None:
    cache = HttpCache(1 << 20, 1 << 16)
    assert stored(cache, headers)
    found = cache.lookup(KEY, b"GET", [], T0)
    assert found is not None and found.entry.lifetime == lifetime


@pytest.mark.parametrize(
    "headers",
    [
        [(b"cdn-cache-control", b"private"), (b"cache-control", b"max-age=100")],
        [(b"cdn-cache-control", b"no-store"), (b"cache-control", b"max-age=100")],
        [(b"cdn-cache-control", b'max-age="100"'), (b"cache-control", b"max-age=100")],
    ],
)
def test_cdn_cache_control_forbids_what_cache_control_allows(
    headers: list[tuple[bytes, bytes]],
) -> None:
    # RFC 9213 §2.1; §2.2: a directive of the wrong type (a String max-age) is ignored
    cache = HttpCache(1 << 20, 1 << 16)
    assert not stored(cache, headers)


def test_cdn_no_cache_means_revalidate() -> None:
    cache = HttpCache(1 << 20, 1 << 16)
    assert stored(
        cache,
        [
            (b"cdn-cache-control", b"no-cache"),
            (b"cache-control", b"max-age=100"),
            (b"etag", b'"e"'),
        ],
    )
    found = cache.lookup(KEY, b"GET", [], T0)
    assert found is not None and not found.fresh and found.validators


def test_connection_and_qualified_no_cache_fields_are_not_stored() -> None:
    # RFC 9110 §7.6.1 (fields named in Connection are hop-by-hop); RFC 9111 §5.2.2.4: with
    # `no-cache="a"` the listed fields are not reused but the rest of the response may be
    cache = HttpCache(1 << 20, 1 << 16)
    headers = [
        (b"cache-control", b'max-age=60, no-cache="x-a", private="x-b"'),
        (b"connection", b"x-c"),
        (b"x-a", b"1"),
        (b"x-b", b"2"),
        (b"x-c", b"3"),
        (b"x-d", b"4"),
    ]
    assert stored(cache, headers)
    found = cache.lookup(KEY, b"GET", [], T0 + 1)
    assert found is not None and found.fresh
    names = {k for k, _ in found.entry.headers}
    assert b"x-d" in names and not names & {b"x-a", b"x-b", b"x-c", b"connection"}


def _stale_entry(cc: bytes, policy: StalePolicy | None = None) -> HttpCache:
    cache = HttpCache(1 << 20, 1 << 16)
    if policy is not None:
        cache.stale = policy
    assert stored(cache, [(b"cache-control", cc), (b"etag", b'"e"')])
    return cache


def test_stale_while_revalidate_window() -> None:
    # RFC 5861 §3: "indicates that caches MAY serve the response in which it appears after it
    # becomes stale, up to the indicated number of seconds", revalidating it meanwhile
    cache = _stale_entry(b"max-age=1, stale-while-revalidate=10")
    inside = cache.lookup(KEY, b"GET", [], T0 + 5)
    assert inside is not None and inside.revalidate_after and not inside.fresh
    assert inside.validators == [(b"if-none-match", b'"e"')]
    after = cache.lookup(KEY, b"GET", [], T0 + 12)
    assert after is not None and not after.revalidate_after and not after.fresh
    off = _stale_entry(b"max-age=1, stale-while-revalidate=10", StalePolicy(False))
    found = off.lookup(KEY, b"GET", [], T0 + 5)
    assert found is not None and not found.revalidate_after
    capped = _stale_entry(b"max-age=1, stale-while-revalidate=100", StalePolicy(max_s=3))
    found = capped.lookup(KEY, b"GET", [], T0 + 5)
    assert found is not None and not found.revalidate_after


@pytest.mark.parametrize(
    "cc", [b"must-revalidate", b"proxy-revalidate", b"s-maxage=1", b"no-cache"]
)
def test_no_stale_where_the_response_forbids_it(cc: bytes) -> None:
    # RFC 9111 §4.2.4: "A cache MUST NOT generate a stale response if it is prohibited by an
    # explicit in-protocol directive (e.g., by a no-cache response directive, a
    # must-revalidate response directive, or an applicable s-maxage or proxy-revalidate
    # response directive)"
    cache = _stale_entry(b"max-age=1, stale-while-revalidate=100, stale-if-error=100, " + cc)
    found = cache.lookup(KEY, b"GET", [(b"cache-control", b"max-stale")], T0 + 5)
    assert found is not None and not found.fresh and not found.revalidate_after
    assert not cache.stale_on_error(found.entry, [], T0 + 5)


def test_stale_if_error_window() -> None:
    # RFC 5861 §4: "when an error is encountered, a cached stale response MAY be used to
    # satisfy the request, regardless of other freshness information", within N seconds; the
    # request may set its own window
    cache = _stale_entry(b"max-age=1, stale-if-error=10")
    found = cache.lookup(KEY, b"GET", [], T0 + 5)
    assert found is not None and not found.fresh
    assert cache.stale_on_error(found.entry, [], T0 + 5)
    assert not cache.stale_on_error(found.entry, [], T0 + 12)
    # the request's window narrows the response's, never widens it (attack review hops #1)
    assert not cache.stale_on_error(
        found.entry, [(b"cache-control", b"stale-if-error=60")], T0 + 30
    )
    assert not cache.stale_on_error(found.entry, [(b"cache-control", b"stale-if-error=2")], T0 + 5)
    assert cache.stale_on_error(found.entry, [(b"cache-control", b"stale-if-error=8")], T0 + 5)
    assert not cache.stale_on_error(found.entry, [(b"cache-control", b"no-cache")], T0 + 5)
    off = _stale_entry(b"max-age=1, stale-if-error=10", StalePolicy(if_error=False))
    found = off.lookup(KEY, b"GET", [], T0 + 5)
    assert found is not None and not off.stale_on_error(found.entry, [], T0 + 5)


def test_request_max_stale() -> None:
    # RFC 9111 §5.2.1.2: "the client is willing to accept a response that has exceeded its
    # freshness lifetime"; with a value, by at most that many seconds (a cache MAY: on per route)
    cache = _stale_entry(b"max-age=1", StalePolicy(max_stale=True))
    for req, at, fresh in (
        (b"max-stale=10", T0 + 5, True),
        (b"max-stale=10", T0 + 12, False),
        (b"max-stale", T0 + 1000, True),
        (b"max-stale, no-cache", T0 + 5, False),
    ):
        found = cache.lookup(KEY, b"GET", [(b"cache-control", req)], at)
        assert found is not None and found.fresh is fresh, (req, at)
    capped = _stale_entry(b"max-age=1", StalePolicy(max_stale=True, max_s=50))
    found = capped.lookup(KEY, b"GET", [(b"cache-control", b"max-stale")], T0 + 100)
    assert found is not None and not found.fresh
    off = _stale_entry(b"max-age=1")  # the default
    found = off.lookup(KEY, b"GET", [(b"cache-control", b"max-stale=10")], T0 + 5)
    assert found is not None and not found.fresh


SESSION = [(b"cookie", b"sid=alice")]
ACCOUNT = [(b"cache-control", b"max-age=0"), (b"etag", b'"a"')]


@pytest.mark.parametrize(
    "response,req",
    [
        (ACCOUNT, SESSION),  # revalidate-every-use page to a logged-in visitor
        ([(b"expires", b"0"), (b"etag", b'"a"')], SESSION),  # an invalid Expires: the same
        ([(b"expires", b"0"), (b"etag", b'"a"')], []),  # zero lifetime, no cookie
        ([(b"cache-control", b"max-age=60"), (b"etag", b'"a"')], SESSION),  # stored for a cookie
        ([(b"cache-control", b"public, max-age=60")], [(b"authorization", b"Basic YTpi")]),
    ],
)
@pytest.mark.parametrize("policy", [StalePolicy(), StalePolicy(max_stale=True)])
def test_max_stale_never_hands_a_visitors_page_to_another(
    response: list[tuple[bytes, bytes]], req: list[tuple[bytes, bytes]], policy: StalePolicy
) -> None:
    # attack review hops #1: alice's page (max-age=0, no private, no Set-Cookie) was stored and
    # any visitor sending `Cache-Control: max-stale` got it from the cache for 24 h; the
    # request's stale-if-error handed it over when the application answered 503
    cache = HttpCache(1 << 20, 1 << 16)
    cache.stale = policy
    assert stored(cache, response, b"account of alice", req)
    for cc in (b"max-stale", b"max-stale=86400"):
        found = cache.lookup(KEY, b"GET", [(b"cache-control", cc)], T0 + 90)
        assert found is not None and not found.fresh and not found.revalidate_after, cc
    sie = [(b"cache-control", b"stale-if-error=86400")]
    found = cache.lookup(KEY, b"GET", sie, T0 + 90)
    assert found is not None and not cache.stale_on_error(found.entry, sie, T0 + 90)


def test_an_error_never_replaces_a_fresh_page() -> None:
    # attack review hops #2: a visitor sends no-cache and a header the application refuses;
    # the 400 carries the site's blanket `public, max-age=300` and replaced the page for all
    cache = HttpCache(1 << 20, 1 << 16)
    blanket = [(b"cache-control", b"public, max-age=300")]
    assert stored(cache, blanket, b"the real page")
    assert not stored(cache, blanket, b"bad request", status=400)
    assert not stored(cache, blanket, b"down", status=503)
    # asked explicitly (s-maxage), an error is stored, but still not over a fresh page
    explicit = [(b"cache-control", b"s-maxage=300")]
    assert cache.storable(b"GET", [], 400, explicit)
    cache.store(KEY, [], 400, explicit, b"bad request", T0 + 10, T0 + 10)
    found = cache.lookup(KEY, b"GET", [], T0 + 11)
    assert found is not None and found.fresh and found.entry.body == b"the real page"
    # once the page is stale, the origin's latest explicit answer takes its place
    cache.store(KEY, [], 404, explicit, b"gone", T0 + 400, T0 + 400)
    found = cache.lookup(KEY, b"GET", [], T0 + 401)
    assert found is not None and found.fresh and found.entry.status == 404


HUGE = "9" * 5000  # past Python's int max str digits (4300): int() raises ValueError


@pytest.mark.parametrize(
    "response,req",
    [
        ([(b"cache-control", b"max-age=" + HUGE.encode())], []),
        ([(b"cache-control", b"max-age=60"), (b"age", HUGE.encode())], []),
        ([(b"cache-control", b"max-age=60")], [(b"cache-control", b"max-age=" + HUGE.encode())]),
        ([(b"cache-control", b"max-age=60")], [(b"cache-control", b"min-fresh=" + HUGE.encode())]),
        (
            [(b"cache-control", b"max-age=1, stale-if-error=" + HUGE.encode())],
            [
                (
                    b"cache-control",
                    b"max-stale=" + HUGE.encode() + b", stale-if-error=" + HUGE.encode(),
                )
            ],
        ),
    ],
)
def test_huge_delta_seconds_are_capped_not_an_error(
    response: list[tuple[bytes, bytes]], req: list[tuple[bytes, bytes]]
) -> None:
    # attack review hops #4: 5000 digits in any delta-seconds made int() raise, a 500 per request
    cache = HttpCache(1 << 20, 1 << 16)
    cache.stale = StalePolicy(max_stale=True)
    assert cache.storable(b"GET", [], 200, response)
    cache.store(KEY, [], 200, response, b"body", T0, T0)
    for at in (T0 + 0.5, T0 + 5):
        found = cache.lookup(KEY, b"GET", req, at)
        assert found is not None
        cache.stale_on_error(found.entry, req, at)
    assert age_value([(b"age", HUGE.encode())]) == 2**31
    too_big = [(b"cache-control", b"max-age=5"), (b"content-length", HUGE.encode())]
    assert not cache.storable(b"GET", [], 200, too_big)


def test_a_response_varying_on_a_header_the_edge_sets_is_not_stored() -> None:
    # attack review hops #5: the origin answered the forwarded request, whose X-Forwarded-For the
    # edge set; matched against the visitor's (absent) header it was served to everyone
    cache = HttpCache(1 << 20, 1 << 16)
    cache.edge_set = lambda name: name in (b"x-forwarded-for", b"forwarded")
    for vary in (b"X-Forwarded-For", b"accept-encoding, Forwarded"):
        assert not stored(cache, [(b"cache-control", b"max-age=60"), (b"vary", vary)])
    assert stored(cache, [(b"cache-control", b"max-age=60"), (b"vary", b"accept-encoding")])


@pytest.mark.parametrize(
    "answer",
    [
        [(b"cache-control", b"no-store")],
        [(b"cache-control", b"private, max-age=60")],
    ],
)
def test_an_answer_not_to_be_stored_drops_the_stored_copy(
    answer: list[tuple[bytes, bytes]],
) -> None:
    # the origin's latest answer for the page says no-store: the old copy must never be served
    # again, not even stale on an error (attack review hops, "possible gap")
    cache = HttpCache(1 << 20, 1 << 16)
    assert stored(cache, [(b"cache-control", b"max-age=1, stale-if-error=600")], b"old")
    found = cache.lookup(KEY, b"GET", [], T0 + 5)
    assert found is not None and cache.stale_on_error(found.entry, [], T0 + 5)
    cache.forget(KEY, [], 400, answer)  # a visitor-provoked error says nothing about the page
    assert cache.lookup(KEY, b"GET", [], T0 + 5) is not None
    cache.forget(KEY, [], 200, answer)
    assert cache.lookup(KEY, b"GET", [], T0 + 5) is None and len(cache) == 0
    assert cache.used == 0


def test_stale_entry_without_validators_is_kept_for_errors() -> None:
    cache = HttpCache(1 << 20, 1 << 16)
    assert stored(cache, [(b"cache-control", b"max-age=1, stale-if-error=60")])
    found = cache.lookup(KEY, b"GET", [], T0 + 5)
    assert found is not None and not found.fresh and found.validators == []
    assert cache.stale_on_error(found.entry, [], T0 + 5)


def test_if_modified_since_without_last_modified_uses_date_then_receipt() -> None:
    # RFC 9111 §4.3.2: "If a request contains an If-Modified-Since header field and the
    # Last-Modified header field is not present in a selected stored response, a cache SHOULD
    # use the stored response's Date field value (or, if no Date field is present, the time
    # that the stored response was received) to evaluate the conditional."
    cache = HttpCache(1 << 20, 1 << 16)
    assert stored(cache, [(b"cache-control", b"max-age=60"), (b"date", imf(T0 - 30))])
    found = cache.lookup(KEY, b"GET", [], T0)
    assert found is not None
    assert not_modified(found.entry, [(b"if-modified-since", imf(T0 - 30))])
    assert not not_modified(found.entry, [(b"if-modified-since", imf(T0 - 31))])
    other = HttpCache(1 << 20, 1 << 16)
    assert stored(other, [(b"cache-control", b"max-age=60")])  # received at T0
    found = other.lookup(KEY, b"GET", [], T0)
    assert found is not None
    assert not_modified(found.entry, [(b"if-modified-since", imf(T0))])
    assert not not_modified(found.entry, [(b"if-modified-since", imf(T0 - 1))])


_DATE_FORMATS = (
    "%a, %d %b %Y %H:%M:%S GMT",  # IMF-fixdate
    "%A, %d-%b-%y %H:%M:%S GMT",  # rfc850-date
    "%a %b %e %H:%M:%S %Y",  # asctime-date (day padded with a space)
)


@given(st.integers(0, 253402300799), st.sampled_from(_DATE_FORMATS))
def test_http_date_round_trips_every_format(t: int, fmt: str) -> None:
    import time as _time

    text = _time.strftime(fmt, _time.gmtime(t)).encode()
    # rfc850-date's 2-digit year is placed within 50 years of `now` (RFC 9110 §5.6.7): here
    # now is the date itself, so every format gives it back exactly
    assert http_date(text, now=float(t)) == float(t)


@given(st.binary(max_size=80), st.binary(max_size=80))
def test_fields_never_raise(date: bytes, cc: bytes) -> None:
    # any bytes: an HTTP-date or None; directives or none; never an exception
    assert http_date(date, now=T0) is None or isinstance(http_date(date, now=T0), float)
    directives([(b"cache-control", cc)])
    cache = HttpCache(1 << 20, 1 << 16)
    headers = [(b"cache-control", cc), (b"cdn-cache-control", cc), (b"expires", date)]
    headers += [(b"date", date), (b"age", cc)]
    if cache.storable(b"GET", [(b"cache-control", cc)], 200, headers):
        cache.store(KEY, [], 200, headers, b"x", T0, T0)
    found = cache.lookup(KEY, b"GET", [(b"cache-control", cc)], T0 + 1)
    assert found is None or found.entry.lifetime >= 0


# ---------------------------------------------------------------- prepared heads (issue 19)
def test_a_prepared_head_is_made_at_store_and_freshen_not_per_hit() -> None:
    from blindfold.edge.modes.keyless import prepare_head
    from blindfold.web.messages import PreparedHead

    made: list[Entry] = []

    def prepare(entry: Entry) -> object | None:
        made.append(entry)
        return prepare_head(entry)

    cache = HttpCache(1 << 20, 1 << 16)
    cache.prepare = prepare
    headers = [*STORED_304, (b"cache-tag", b"a,b")]
    assert stored(cache, headers)
    entry = made[-1]
    head = entry.prepared
    assert isinstance(head, PreparedHead) and head.status == 200
    # Content-Length of the body, last; Cache-Tag is for this cache only
    assert head.headers == [
        (b"cache-control", b"max-age=10"),
        (b"etag", b'"v1"'),
        (b"content-type", b"text/plain"),
        (b"content-length", b"4"),
    ]
    for t in (1, 2, 3):
        hit = cache.lookup(KEY, b"GET", [], T0 + t)
        assert hit is not None and hit.fresh and hit.entry.prepared is head
    assert len(made) == 1
    # a 304 changes the fields: a new head, charged like the old one
    used = cache.used
    stale = cache.lookup(KEY, b"GET", [], T0 + 11)
    assert stale is not None
    nm = [(b"etag", b'"v1"'), (b"cache-control", b"max-age=100"), (b"x-served-by", b"o2")]
    served = cache.freshen(KEY, stale.entry, nm, [], T0 + 11, T0 + 11)
    assert served is entry and len(made) == 2
    new = entry.prepared
    assert isinstance(new, PreparedHead) and new is not head
    assert (b"x-served-by", b"o2") in new.headers and (b"cache-control", b"max-age=100") in (
        new.headers
    )
    assert cache.used > used  # one more field, charged in the entry and in its head
    # a 304 not for sharing answers its visitor from a private copy, with a head of its own
    stale = cache.lookup(KEY, b"GET", [(b"cache-control", b"no-cache")], T0 + 12)
    assert stale is not None
    private = cache.freshen(
        KEY, entry, [(b"set-cookie", b"s=1")], [(b"cookie", b"s=0")], T0 + 12, T0 + 12
    )
    assert private is not entry and isinstance(private.prepared, PreparedHead)
    assert (b"set-cookie", b"s=1") in private.prepared.headers
    assert cache.used == 0


def test_fields_a_response_must_not_carry_get_no_prepared_head() -> None:
    from blindfold.edge.modes.keyless import prepare_head

    cache = HttpCache(1 << 20, 1 << 16)
    cache.prepare = prepare_head
    assert stored(cache, [*STORED_304, (b"x-odd", b" leading space")])
    hit = cache.lookup(KEY, b"GET", [], T0 + 1)
    assert hit is not None and hit.entry.prepared is None  # served through `start` instead


def test_charged_bytes_cover_prepared_heads_and_their_encodings() -> None:
    """With prepared heads, and each one's HTTP/1.1-sized and HTTP/2 encodings made (the
    worst case: every entry served on HTTP/2), the cache still holds no more than it charges
    (max_bytes), and charges not far above what it holds."""
    from blindfold.edge.modes.keyless import prepare_head
    from blindfold.web.http2 import _H2Head
    from blindfold.web.messages import PreparedHead

    max_bytes = 1 << 20
    cache = HttpCache(max_bytes, 1 << 16)
    cache.prepare = prepare_head
    req = [(b"accept-encoding", b"gzip, br")]
    tracemalloc.start()
    try:
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        for i in range(6000):
            status, headers = _origin_response(i)
            key = HttpCache.key(b"www.example.test", f"/static/{i}".encode())
            body = bytes(i % 300)
            cache.store(key, req, status, headers, body, T0 + i, T0 + i)
            hit = cache.lookup(key, b"GET", req, T0 + i)
            assert hit is not None
            head = hit.entry.prepared
            assert isinstance(head, PreparedHead)
            head.encoded["h2"] = _H2Head(head)
        del status, headers, key, body, hit, head
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert cache.evictions > 0 and cache.used <= max_bytes
    assert held <= max_bytes * 1.02 + 16384, (held, cache.used, len(cache))
    assert held >= cache.used * 0.8, (held, cache.used, len(cache))
