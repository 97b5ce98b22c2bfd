"""Differential test: web.http1 (llhttp) against the h11-based connection it replaced
(tests/helpers/h11_reference.py), both on real loopback sockets, fed a corpus of hostile request
bytes. Every case must give the same answers (statuses, and the bodies of what reached the
handler), except the few listed in CHANGED, each with the reason the new answer is right."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

import pytest

from blindfold.web.http1 import ConnInfo, H1Connection
from blindfold.web.limits import HttpLimits
from blindfold.web.messages import BodyStream, BodyTimeout, BodyTooLarge, Request, Responder
from tests.helpers import h11_reference

LIMITS = HttpLimits(
    max_body_bytes=1000,
    body_timeout_s=0.6,
    header_timeout_s=0.6,
    keepalive_timeout_s=0.4,
    max_headers=20,
    max_header_bytes=2048,
)

H = b"Host: a.test\r\n"


def get(target: bytes = b"/", extra: bytes = b"", method: bytes = b"GET") -> bytes:
    return method + b" " + target + b" HTTP/1.1\r\n" + H + extra + b"\r\n"


def post(body: bytes, framing: bytes) -> bytes:
    return b"POST /p HTTP/1.1\r\n" + H + framing + b"\r\n" + body


CHUNKED = b"Transfer-Encoding: chunked\r\n"

CORPUS: dict[str, bytes] = {
    "simple": get(),
    "http10": b"GET / HTTP/1.0\r\n\r\n",
    "http10-keepalive": b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n" * 2,
    "http10-host": b"GET /x HTTP/1.0\r\nHost: a.test\r\n\r\n",
    "connection-close": get(extra=b"Connection: close\r\n"),
    "connection-close-mixed-case": get(extra=b"Connection: Keep-Alive, CLOSE\r\n"),
    "pipelined-3": get(b"/1") + get(b"/2") + get(b"/3"),
    "pipelined-post-get": post(b"hello", b"Content-Length: 5\r\n") + get(b"/2"),
    "pipelined-300": b"".join(get(b"/%d" % i) for i in range(300)),
    "pipelined-bodies": b"".join(
        post(b"x" * i, b"Content-Length: %d\r\n" % i)
        + post(b"%x\r\n%s\r\n0\r\n\r\n" % (i, b"y" * i), CHUNKED)
        for i in range(1, 1000, 37)
    ),
    "pipelined-then-garbage": get(b"/1") + b"GARBAGE\r\n\r\n",
    "pipelined-then-partial": get(b"/1") + b"GET /2 HTTP/1.1\r\nHo",
    "leading-crlf": b"\r\n" + get(),
    "no-host-11": b"GET / HTTP/1.1\r\n\r\n",
    "two-hosts": get(extra=b"Host: b.test\r\n"),
    "empty-host": b"GET / HTTP/1.1\r\nHost:\r\n\r\n",
    "bad-host": b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
    "obs-fold": get(extra=b"X-A: one\r\n two\r\n"),
    "space-before-colon": get(extra=b"X-A : one\r\n"),
    "tab-before-colon": get(extra=b"X-A\t: one\r\n"),
    "bare-lf": b"GET / HTTP/1.1\nHost: a.test\n\n",
    "bare-lf-headers": b"GET / HTTP/1.1\r\nHost: a.test\nX: y\r\n\r\n",
    "bare-cr": b"GET / HTTP/1.1\r\nHost: a.test\rX: y\r\n\r\n",
    "nul-in-value": get(extra=b"X-A: a\x00b\r\n"),
    "ctl-in-value": get(extra=b"X-A: a\x01b\r\n"),
    "del-in-value": get(extra=b"X-A: a\x7fb\r\n"),
    "obs-text-value": get(extra=b"X-A: caf\xe9\r\n"),
    "ows-around-value": get(extra=b"X-A: \t  a b \t \r\n"),
    "empty-value": get(extra=b"X-A:\r\n"),
    "ctl-in-name": get(extra=b"X\x01A: b\r\n"),
    "nul-in-name": get(extra=b"X\x00A: b\r\n"),
    "empty-name": get(extra=b": b\r\n"),
    "space-in-name": get(extra=b"X A: b\r\n"),
    "leading-space-header": b"GET / HTTP/1.1\r\n " + H + b"\r\n",
    "cl-ok": post(b"hello", b"Content-Length: 5\r\n"),
    "cl-1-1": post(b"x", b"Content-Length: 1, 1\r\n"),
    "cl-1-2": post(b"x", b"Content-Length: 1, 2\r\n"),
    "cl-dup": post(b"x", b"Content-Length: 1\r\nContent-Length: 1\r\n"),
    "cl-dup-differ": post(b"x", b"Content-Length: 1\r\nContent-Length: 2\r\n"),
    "cl-plus": post(b"x", b"Content-Length: +1\r\n"),
    "cl-minus": post(b"x", b"Content-Length: -1\r\n"),
    "cl-hex": post(b"x" * 16, b"Content-Length: 0x10\r\n"),
    "cl-space-inside": post(b"x", b"Content-Length: 1 1\r\n"),
    "cl-empty": post(b"", b"Content-Length: \r\n"),
    "cl-huge": post(b"x", b"Content-Length: 99999999999999999999999\r\n"),
    "cl-over-limit": post(b"x", b"Content-Length: 5000\r\n"),
    "cl-short-body": post(b"abc", b"Content-Length: 10\r\n"),
    "te-chunked": post(b"5\r\nhello\r\n0\r\n\r\n", CHUNKED),
    "te-chunked-upper": post(b"5\r\nhello\r\n0\r\n\r\n", b"Transfer-Encoding: CHUNKED\r\n"),
    "te-chunked-and-cl": post(b"5\r\nhello\r\n0\r\n\r\n", CHUNKED + b"Content-Length: 5\r\n"),
    "cl-and-te-chunked": post(b"5\r\nhello\r\n0\r\n\r\n", b"Content-Length: 5\r\n" + CHUNKED),
    "te-chunked-identity": post(b"0\r\n\r\n", b"Transfer-Encoding: chunked, identity\r\n"),
    "te-identity": post(b"", b"Transfer-Encoding: identity\r\n"),
    "te-gzip": post(b"", b"Transfer-Encoding: gzip\r\n"),
    "te-gzip-chunked": post(b"0\r\n\r\n", b"Transfer-Encoding: gzip, chunked\r\n"),
    "te-twice": post(b"0\r\n\r\n", CHUNKED + CHUNKED),
    "te-empty": post(b"", b"Transfer-Encoding: \r\n"),
    "te-in-http10": b"POST /p HTTP/1.0\r\n" + CHUNKED + b"\r\n5\r\nhello\r\n0\r\n\r\n",
    "chunk-size-overflow": post(b"fffffffffffffffff1\r\nx\r\n0\r\n\r\n", CHUNKED),
    "chunk-size-garbage": post(b"zz\r\nx\r\n0\r\n\r\n", CHUNKED),
    "chunk-size-negative": post(b"-1\r\nx\r\n0\r\n\r\n", CHUNKED),
    "chunk-size-space": post(b"1 \r\nx\r\n0\r\n\r\n", CHUNKED),
    "chunk-size-0x": post(b"0x1\r\nx\r\n0\r\n\r\n", CHUNKED),
    "chunk-ext": post(b"1;a=b\r\nx\r\n0\r\n\r\n", CHUNKED),
    "chunk-ext-ctl": post(b"1;a=\x01\r\nx\r\n0\r\n\r\n", CHUNKED),
    "chunk-ext-lf": post(b"1;a=b\nx\r\n0\r\n\r\n", CHUNKED),
    "chunk-data-overrun": post(b"1\r\nxy\r\n0\r\n\r\n", CHUNKED),
    "chunk-missing-crlf": post(b"1\r\nx0\r\n\r\n", CHUNKED),
    "chunk-trailer": post(b"1\r\nx\r\n0\r\nX-T: y\r\n\r\n", CHUNKED),
    "chunk-trailer-bad-name": post(b"1\r\nx\r\n0\r\nX T: y\r\n\r\n", CHUNKED),
    "chunk-trailer-ctl": post(b"1\r\nx\r\n0\r\nX-T: \x01\r\n\r\n", CHUNKED),
    "chunk-trailer-no-colon": post(b"1\r\nx\r\n0\r\nXT\r\n\r\n", CHUNKED),
    "chunked-body-over-limit": post(b"7d0\r\n" + b"x" * 2000 + b"\r\n0\r\n\r\n", CHUNKED),
    "http09": b"GET /\r\n\r\n",
    "http20": b"GET / HTTP/2.0\r\nHost: a.test\r\n\r\n",
    "http12": b"GET / HTTP/1.2\r\nHost: a.test\r\n\r\n",
    "http11-lower": b"GET / http/1.1\r\nHost: a.test\r\n\r\n",
    "http3-digits": b"GET / HTTP/11.1\r\nHost: a.test\r\n\r\n",
    "h2-preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    "absolute-form": get(b"http://a.test/x?q=1"),
    "absolute-form-other-host": get(b"http://b.test/x"),
    "absolute-form-https": get(b"https://a.test/x"),
    "asterisk-options": get(b"*", method=b"OPTIONS"),
    "asterisk-get": get(b"*"),
    "connect": b"CONNECT a.test:443 HTTP/1.1\r\nHost: a.test:443\r\n\r\n",
    "connect-with-data": b"CONNECT a.test:443 HTTP/1.1\r\nHost: a.test:443\r\n\r\n\x16\x03\x01",
    "lowercase-method": get(method=b"get"),
    "unknown-method": get(method=b"FOO"),
    "long-method": get(method=b"G" * 300),
    "purge-method": get(method=b"PURGE"),
    "propfind-method": get(method=b"PROPFIND"),
    "two-spaces": b"GET  / HTTP/1.1\r\n" + H + b"\r\n",
    "two-spaces-after-target": b"GET /  HTTP/1.1\r\n" + H + b"\r\n",
    "two-spaces-pipelined": get(b"/1") + b"GET  /2 HTTP/1.1\r\n" + H + b"\r\n",
    "space-then-request-line-split": b"GET  /",
    "tab-separator": b"GET\t/ HTTP/1.1\r\n" + H + b"\r\n",
    "trailing-space-line": b"GET / HTTP/1.1 \r\n" + H + b"\r\n",
    "no-version": b"GET / \r\n" + H + b"\r\n",
    "target-space": b"GET /a b HTTP/1.1\r\n" + H + b"\r\n",
    "target-high-byte": get(b"/caf\xe9"),
    "target-tab": get(b"/a\tb"),
    "target-query-chars": get(b'/q?a={"x"}|<>^`'),
    "target-fragment": get(b"/q#frag"),
    "target-backslash": get(b"/a\\b"),
    "target-dotdot": get(b"/a/../../b"),
    "many-headers": get(extra=b"".join(b"X-%d: v\r\n" % i for i in range(30))),
    "header-limit-exact": get(extra=b"".join(b"X-%d: v\r\n" % i for i in range(19))),
    "big-header": get(extra=b"X-Big: " + b"v" * 3000 + b"\r\n"),
    "big-target": get(b"/" + b"a" * 3000),
    "expect-100": post(b"hello", b"Content-Length: 5\r\nExpect: 100-continue\r\n"),
    "expect-100-no-body-yet": post(b"", b"Content-Length: 5\r\nExpect: 100-continue\r\n"),
    "expect-other": post(b"hello", b"Content-Length: 5\r\nExpect: something\r\n"),
    "expect-twice": post(b"", b"Content-Length: 5\r\nExpect: 100-continue\r\nExpect: x\r\n"),
    "connection-twice": get(extra=b"Connection: keep-alive\r\nConnection: close\r\n"),
    "cl-leading-zeros": post(b"hello", b"Content-Length: 0005\r\n"),
    "expect-100-http10": b"POST /p HTTP/1.0\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n",
    "head": get(method=b"HEAD"),
    "head-with-body": get(method=b"HEAD", extra=b"Content-Length: 2\r\n") + b"ab",
    "head-then-get": get(method=b"HEAD") + get(b"/2"),
    "get-with-body": get(extra=b"Content-Length: 3\r\n") + b"abc" + get(b"/2"),
    "upgrade-h2c": get(
        extra=b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABk\r\n"
    )
    + get(b"/2"),
    "upgrade-websocket": get(
        extra=b"Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: x\r\n"
    ),
    "close-then-pipelined": get(extra=b"Connection: close\r\n") + get(b"/2"),
    "empty": b"",
    "only-crlf": b"\r\n\r\n",
    "partial-head": b"GET / HTTP/1.1\r\nHost: a",
    "partial-line": b"GET /",
    "binary": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
    "x-request-id": get(extra=b"X-Request-Id: abc\r\n"),
    "header-case": get(extra=b"X-MiXed: Value\r\n"),
}

# Where the new connection answers differently, and why that answer is right.
CHANGED: dict[str, str] = {
    # RFC 9112 §5.2: a server MUST either reject obs-fold with 400 or replace it; llhttp rejects
    "obs-fold": "400 (RFC 9112 §5.2 allows rejecting obs-fold)",
    # RFC 9112 §2.2: a recipient MAY accept a bare LF; llhttp (strict) does not
    "bare-lf": "400 (RFC 9112 §2.2: bare LF is a MAY)",
    "bare-lf-headers": "400 (RFC 9112 §2.2: bare LF is a MAY)",
    # RFC 9110 §8.6: a list of identical values MAY be accepted or rejected as invalid
    "cl-1-1": "400 (RFC 9110 §8.6: identical Content-Length values MAY be rejected)",
    "cl-dup": "400 (RFC 9110 §8.6: identical Content-Length values MAY be rejected)",
    # RFC 9110 §9.1: methods are case-sensitive; an unknown method is answered 501 (SHOULD)
    "lowercase-method": "501 (RFC 9110 §9.1: unknown method)",
    "unknown-method": "501 (RFC 9110 §9.1: unknown method)",
    "long-method": "501 (RFC 9110 §9.1: unknown method)",
    # RFC 9110 §15.6.6: 505 for a major version not supported; llhttp refuses 1.2 (strict)
    "http20": "505 (RFC 9110 §15.6.6)",
    "http12": "505 (llhttp strict; RFC 9112 §2.3 says SHOULD treat as 1.1)",
    # RFC 9112 §7.1: no whitespace between chunk-size and CRLF; chunk-ext is token/quoted
    "chunk-size-space": "400 (RFC 9112 §7.1 chunk grammar)",
    "chunk-ext-ctl": "400 (RFC 9112 §7.1.1 chunk-ext grammar)",
    # RFC 9112 §9.6: the server answers the request with close, then MUST NOT process more
    "close-then-pipelined": "the first request answered, then closed (RFC 9112 §9.6)",
    # h11 never keeps an HTTP/1.0 connection alive and refused the second request at once
    "http10-keepalive": "the first request answered, then closed (as every HTTP/1.0 one)",
    # RFC 9112 §2.2: a server SHOULD ignore at least one empty line before the request-line
    "leading-crlf": "200 (RFC 9112 §2.2 SHOULD)",
    "only-crlf": "408, the request line never came (RFC 9112 §2.2: empty lines are skipped)",
    # RFC 9110 §5.5: CTLs other than HTAB make a field value invalid (h11 let them through)
    "ctl-in-value": "400 (RFC 9110 §5.5)",
    "del-in-value": "400 (RFC 9110 §5.5)",
    "chunk-trailer-ctl": "400 (RFC 9110 §5.5)",
    # h11 waited for more bytes of a chunk size that can never be valid
    "chunk-size-overflow": "400 at once instead of 408",
    # (sent with a half-close after it) h11's connection failed the body of the last
    # pipelined request when the EOF was read before the handler had read that body, so the
    # handler got an error instead of a complete body: a race, and a bug (RFC 9112 §9.6 lets a
    # client half-close after its last request)
    "pipelined-bodies@eof": "the last request answered like the others",
}

Outcome = list[tuple[int, bytes]]


async def app(request: Request, body: BodyStream, respond: Responder) -> None:
    try:
        data = await body.read_all(100_000)
    except BodyTooLarge:
        out, status = b"too large", 413
    except BodyTimeout:
        out, status = b"too slow", 408
    else:
        fields = b";".join(b"%s=%s" % kv for kv in request.headers if kv[0] != b"x-request-id")
        out = b"%s %s %s %s body=%r [%s]" % (
            request.method,
            request.target,
            request.authority,
            request.http_version.encode(),
            data,
            fields,
        )
        status = 200
    await respond.start(status, [(b"content-length", str(len(out)).encode())])
    await respond.send(out)
    await respond.end()


def parse_responses(data: bytes) -> Outcome:
    """The answers in a byte stream: (status, body) each; bodies only of 2xx answers."""
    out: Outcome = []
    while data:
        end = data.find(b"\r\n\r\n")
        if end < 0:
            out.append((-1, data[:60]))  # a torn head
            break
        head, data = data[:end], data[end + 4 :]
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ")[1])
        fields = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            fields[name.strip().lower()] = value.strip()
        if 100 <= status < 200:
            out.append((status, b""))
            continue
        if b"content-length" in fields:
            n = int(fields[b"content-length"])
            body, data = data[:n], data[n:]
        elif fields.get(b"transfer-encoding") == b"chunked":
            body = b""
            while True:
                line, _, data = data.partition(b"\r\n")
                n = int(line, 16)
                body, data = body + data[:n], data[n + 2 :]
                if n == 0:
                    break
        else:
            body, data = data, b""
        out.append((status, body if 200 <= status < 300 else b""))
    return out


async def exchange(port: int, data: bytes, eof: bool, pieces: int) -> Outcome:
    """Send `data` (in `pieces`, stopping if the server closes first: writing into a closed
    socket would reset the connection and lose its answer), read until the server closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    got = bytearray()

    async def read_all() -> None:
        try:
            while chunk := await reader.read(65536):
                got.extend(chunk)
        except ConnectionResetError:
            pass

    reading = asyncio.create_task(read_all())
    try:
        step = max(1, -(-len(data) // pieces))
        for i in range(0, len(data), step):
            if reading.done():
                break
            writer.write(data[i : i + step])
            await writer.drain()
            if pieces > 1:
                await asyncio.sleep(0.03)
        if eof and not reading.done():
            writer.write_eof()
        async with asyncio.timeout(5):
            await reading
    except (ConnectionResetError, BrokenPipeError):
        pass
    finally:
        reading.cancel()
        writer.close()
    return parse_responses(bytes(got))


async def serve(connection: Callable[..., Any]) -> asyncio.Server:
    def factory() -> asyncio.Protocol:
        info = ConnInfo(("127.0.0.1", 1), ("127.0.0.1", 2), b"http", {})
        proto: asyncio.Protocol = connection(app, LIMITS, info, None)
        return proto

    return await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)


def run_corpus(eof: bool, pieces: int) -> dict[str, tuple[Outcome, Outcome]]:
    async def main() -> dict[str, tuple[Outcome, Outcome]]:
        old = await serve(h11_reference.H1Connection)
        new = await serve(H1Connection)
        ports = [s.sockets[0].getsockname()[1] for s in (old, new)]
        try:
            names = list(CORPUS)
            results = await asyncio.gather(
                *(exchange(p, CORPUS[n], eof, pieces) for n in names for p in ports)
            )
        finally:
            old.close()
            new.close()
        return {n: (results[2 * i], results[2 * i + 1]) for i, n in enumerate(names)}

    return asyncio.run(main())


@pytest.mark.parametrize(("eof", "pieces"), [(False, 1), (True, 1), (False, 3)])
def test_same_answers_as_h11(eof: bool, pieces: int) -> None:
    results = run_corpus(eof, pieces)
    changed = {n.partition("@")[0] for n in CHANGED if not n.endswith("@eof") or eof}
    differ = {n: r for n, r in results.items() if r[0] != r[1] and n not in changed}
    assert not differ, "\n".join(f"{n}: h11 {o} new {w}" for n, (o, w) in differ.items())
    for name in CHANGED:  # the listed changes are real (else the list is stale)
        if "@" in name:
            continue
        old, new = results[name]
        assert old != new or eof or pieces > 1, name
    assert len(CORPUS) >= 100


def test_corpus_is_answered_at_all() -> None:
    """The corpus exercises both paths: requests that reach the handler and refusals."""
    results = run_corpus(False, 1)
    statuses = {s for _, new in results.values() for s, _ in new}
    assert {200, 400, 413, 431, 501}.issubset(statuses), statuses
    assert socket  # loopback only
