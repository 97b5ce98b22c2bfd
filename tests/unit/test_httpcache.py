"""RFC 9111 decisions of the edge's shared cache, fed requests and responses with `now`."""

from __future__ import annotations

import email.utils
import gc
import tracemalloc

import h11
import pytest
from hypothesis import given
from hypothesis import strategies as st

from blindfold.core.httpcache import Entry, HttpCache, directives, freshness_lifetime, not_modified
from blindfold.core.ratelimit import BucketMap

KEY = HttpCache.key(b"Example.TEST", b"/a")
T0 = 1_800_000_000.0


def http_date(t: float) -> bytes:
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
        ([(b"expires", http_date(T0 + 60)), (b"date", http_date(T0))], [], True),
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
    assert not cache.storable(b"GET", [], 302, cc)
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
    assert freshness_lifetime(bad, directives(bad)) == 0.0  # invalid: stale (RFC 9111 §4.2.1)


def test_request_directives_force_revalidation() -> None:
    cache = HttpCache(1 << 20, 1 << 16)
    assert stored(
        cache, [(b"cache-control", b"max-age=100"), (b"last-modified", http_date(T0 - 100))]
    )
    for req in (
        [(b"cache-control", b"no-cache")],
        [(b"pragma", b"no-cache")],
        [(b"cache-control", b"max-age=0")],
    ):
        found = cache.lookup(KEY, b"GET", req, T0 + 5)
        assert found is not None and not found.fresh
        assert found.validators == [(b"if-modified-since", http_date(T0 - 100))]
    assert cache.lookup(KEY, b"GET", [(b"cache-control", b"no-store")], T0) is None


def test_stale_without_validators_is_a_plain_miss() -> None:
    cache = HttpCache(1 << 20, 1 << 16)
    assert stored(cache, [(b"cache-control", b"max-age=1")])
    assert cache.lookup(KEY, b"GET", [], T0 + 5) is None


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
            (b"last-modified", http_date(T0 - 10)),
        ],
    )
    entry = cache.lookup(KEY, b"GET", [], T0)
    assert entry is not None
    assert not_modified(entry.entry, [(b"if-none-match", b'"v1"')])  # weak comparison
    assert not_modified(entry.entry, [(b"if-none-match", b'"x", W/"v1"')])
    assert not not_modified(entry.entry, [(b"if-none-match", b'"v2"')])
    assert not_modified(entry.entry, [(b"if-modified-since", http_date(T0))])
    assert not not_modified(entry.entry, [(b"if-modified-since", http_date(T0 - 20))])


def test_freshness_lifetime_precedence() -> None:
    h = [(b"expires", http_date(T0 + 500)), (b"date", http_date(T0))]
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
