"""The floor under blindfold's per-core WAF number: CPU per request of ModSecurity + CRS alone
(blindfold.waf.engine through ctypes: connection, URI, headers, body, response headers,
logging; no sockets, no HTTP parsing, no event loop), for bench/waf/run.sh's two requests
(the shared kit's anchor/get_page.lua and post_form.lua), against the baseline of the same
process doing nothing but building the transaction and freeing it (same run).

    PYTHONPATH=src .venv/bin/python bench/waf/engine_only.py [--pl 1] [--n 2000]

Compare its µs/request with run.sh's "WAF CPU per request" of both columns (nginx's whole
request includes its engine): what remains is the HTTP path around the engine."""

from __future__ import annotations

import argparse
import time

from blindfold.waf.engine import CrsSettings, ModSecurityEngine

UA = b"Mozilla/5.0 (X11; Linux x86_64; rv:126.0) Gecko/20100101 Firefox/126.0"
COMMON = [
    (b"host", b"127.0.0.1:8080"),
    (b"user-agent", UA),
    (b"accept", b"text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"),
    (b"accept-language", b"en-US,en;q=0.5"),
    (b"cookie", b"sessionid=8f3a2b1c9d8e7f6a5b4c3d2e1f0a9b8c; csrftoken=AbCdEf123456; theme=dark"),
]
GET = (
    b"GET",
    b"/products/search?q=blue+running+shoes&category=sport&sort=price_asc&page=2",
    [*COMMON, (b"referer", b"https://shop.example.com/products?page=2")],
    b"",
)
BODY = (
    b"csrfmiddlewaretoken=AbCdEf123456&first_name=Mary&last_name=O%27Brien&email=mary.obrien"
    b"%40example.com&phone=%2B1-555-0100&address=12+Main+Street%2C+Apt+4&city=Springfield&zip="
    b"12345&comment=Please+deliver+after+5pm%2C+thanks%21&newsletter=on"
)
POST = (
    b"POST",
    b"/",
    [
        *COMMON,
        (b"content-type", b"application/x-www-form-urlencoded"),
        (b"content-length", str(len(BODY)).encode()),
    ],
    BODY,
)
RESPONSE = [(b"content-type", b"text/plain"), (b"content-length", b"2")]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--pl", type=int, default=1)
    p.add_argument("--n", type=int, default=2000)
    a = p.parse_args()
    engine = ModSecurityEngine(
        CrsSettings(paranoia_level=a.pl, mode="block", body_limit_action="reject")
    )

    def whole(method: bytes, uri: bytes, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        tx = engine.transaction("bench", ("127.0.0.1", 40000), ("127.0.0.1", 8080))
        assert tx.request_headers(method, uri, "1.1", headers) is None
        if body:
            tx.request_body(body)
        assert tx.end_request() is None
        tx.response_headers(200, RESPONSE, "1.1")
        tx.finish()

    def empty(*_: object) -> None:
        engine.transaction("bench", ("127.0.0.1", 40000), ("127.0.0.1", 8080)).finish()

    for name, req in (("GET", GET), ("form POST", POST)):
        out = {}
        for label, fn in (("baseline", empty), ("engine", whole)):
            for _ in range(a.n // 10):
                fn(*req)
            t0 = time.process_time()
            for _ in range(a.n):
                fn(*req)
            out[label] = 1e6 * (time.process_time() - t0) / a.n
        print(
            f"PL{a.pl} {name:9s}: engine {out['engine']:7.0f} µs CPU/request, empty transaction "
            f"{out['baseline']:5.0f} µs ({out['engine'] / out['baseline']:.0f}x)"
        )


if __name__ == "__main__":
    main()
