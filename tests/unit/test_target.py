"""The canonical request path and the Host check (web/target.py), by example and by property."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blindfold.errors import ProtocolError
from blindfold.web.target import (
    canonical_path,
    check_authority,
    host_of,
    parse_target,
    path_has_prefix,
    rule_path,
    rule_prefix,
)


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        (b"/", b"/"),
        (b"/login", b"/login"),
        (b"/%6cogin", b"/login"),
        (b"/%6Cogin", b"/login"),
        (b"//login", b"/login"),
        (b"/./login", b"/login"),
        (b"/x/../login", b"/login"),
        (b"/../../login", b"/login"),
        (b"/%2e%2e/login", b"/login"),
        (b"/.%2E/x/%2e/login", b"/x/login"),
        (b"/a/b/..", b"/a/"),
        (b"/a/b/.", b"/a/b/"),
        (b"/a//", b"/a/"),
        (b"/webhook/../login", b"/login"),
        (b"/a%2fb", b"/a%2Fb"),  # %2F stays encoded: one segment
        (b"/a%2F..%2Fb", b"/a%2F..%2Fb"),
        (b"/%7e/%41", b"/~/A"),
        (b"/caf%c3%a9", b"/caf%C3%A9"),
        (b"/a;b=c/d", b"/a;b=c/d"),
        (b"/static/..;/login", b"/login"),  # a dot-segment with parameters (servlets)
        (b"/static/..;x=1/login", b"/login"),
        (b"/a/.;x/b", b"/a/b"),
        (b"/a/b/..;", b"/a/"),
    ],
)
def test_canonical_paths(raw: bytes, canonical: bytes) -> None:
    assert canonical_path(raw) == canonical


@pytest.mark.parametrize(
    "raw",
    [b"", b"login", b"/%", b"/%4", b"/%zz", b"/%00", b"/a\x00b", b"/a b", b"/a\\b", b"/\xc3\xa9"],
)
def test_bad_paths_are_400(raw: bytes) -> None:
    with pytest.raises(ProtocolError) as exc:
        canonical_path(raw)
    assert exc.value.status == 400


def test_absolute_form_is_reduced_to_origin_form() -> None:
    t = parse_target(b"GET", b"https://Internal.Example:8443/a/../secret?x=1")
    assert (t.authority, t.path, t.query) == (b"Internal.Example:8443", b"/secret", b"x=1")
    assert t.origin_form == b"/secret?x=1"
    assert parse_target(b"GET", b"http://h.example").origin_form == b"/"
    assert parse_target(b"GET", b"http://h.example?q").origin_form == b"/?q"
    assert parse_target(b"GET", b"/p?").origin_form == b"/p?"  # an empty query is kept
    assert parse_target(b"OPTIONS", b"*").path == b"*"


@pytest.mark.parametrize(
    "raw",
    [
        b"*",  # not OPTIONS
        b"example.com:443",  # authority-form
        b"ftp://h/x",
        b"https://user@h/x",  # userinfo (RFC 9110 §4.2.4)
        b"https:///x",
        b"/x#frag",
        b"https://h, for=6.6.6.6/x",
    ],
)
def test_bad_targets_are_400(raw: bytes) -> None:
    with pytest.raises(ProtocolError) as exc:
        parse_target(b"GET", raw)
    assert exc.value.status == 400


@pytest.mark.parametrize(
    "value",
    [
        b"example.test",
        b"example.test:8443",
        b"EXAMPLE.test.",
        b"a_b.internal",
        b"127.0.0.1:1",
        b"[::1]",
        b"[2001:db8::1]:443",
        b"localhost",
    ],
)
def test_valid_authorities(value: bytes) -> None:
    assert check_authority(value) == value


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"example.test, for=6.6.6.6",
        b'example.test";for=6.6.6.6',
        b"evil.example,example.test",
        b"example.test;for=1.2.3.4",
        b"user@example.test",
        b"example.test:",
        b"example.test:99999",
        b"example.test:8x",
        b"example.test:80:80",
        b"[::1",
        b"[1.2.3.4]",
        b"[fe80::1%25eth0]",
        b"[::1]x",
        b".example.test",
        b"a..b",
        b"exa mple.test",
        b"ex%41mple.test",
        b"x" * 300,
    ],
)
def test_invalid_authorities_are_400(value: bytes) -> None:
    with pytest.raises(ProtocolError) as exc:
        check_authority(value)
    assert exc.value.status == 400


def test_host_of() -> None:
    assert host_of(b"Example.TEST:443") == "example.test"
    assert host_of(b"[2001:DB8::1]:443") == "2001:db8::1"
    assert host_of(b"example.test.") == "example.test"


def test_prefixes_match_on_segment_boundaries() -> None:
    login = rule_prefix("/login")
    assert rule_prefix("/login/") == login == "/login"
    assert rule_prefix("/") == "/"
    for path in ("/login", "/login/", "/login/x", "/login;jsessionid=1"):
        assert path_has_prefix(path, login), path
    for path in ("/loginX", "/logi", "/x/login", "/", "/logins"):
        assert not path_has_prefix(path, login), path
    assert path_has_prefix("/anything", "/")
    # `;` parameters are dropped from every segment before matching (servlet routing)
    admin = rule_prefix("/api/admin")
    for path in ("/api;x/admin", "/;x/api/admin", "/api;/admin;y/z", "/api/admin;"):
        assert path_has_prefix(path, admin), path
    assert not path_has_prefix("/api;x/adminX", admin)
    webhook = rule_prefix("/webhook")
    for raw in (b"/webhook/../login?id=1", b"/webhookX/a", b"/webhook%2F..%2Flogin"):
        path = parse_target(b"GET", raw).path.decode()
        assert not path_has_prefix(path, webhook), raw


# ---------------------------------------------------------------------- properties
_SEGMENT = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABC0123456789-._~!$&'()*+,;=:@", min_size=1, max_size=8
).filter(lambda s: s.partition(";")[0] not in (".", ".."))  # no dot-segments, ";" or not


def _obfuscate(data: st.DataObject, path: str) -> bytes:
    """An equivalent spelling: escaped unreserved bytes, `./`, `x/../`, doubled slashes."""
    draw = data.draw
    out = []
    for segment in path.split("/")[1:]:
        spelled = "".join(
            f"%{ord(c):02{draw(st.sampled_from('xX'))}}"
            if c.isalnum() and draw(st.booleans())
            else c
            for c in segment
        )
        noise = draw(st.sampled_from(["", ".", "", "zz/..", "", "%2e", "a/%2E%2e"]))
        if noise:
            out.append(noise)
        if draw(st.booleans()):
            out.append("")  # a doubled slash
        out.append(spelled)
    return ("/" + "/".join(out)).encode()


@st.composite
def paths(draw: st.DrawFn) -> str:
    return "/" + "/".join(draw(st.lists(_SEGMENT, min_size=0, max_size=5)))


@given(st.binary(max_size=64))
def test_any_input_yields_a_path_or_400(raw: bytes) -> None:
    for candidate in (raw, b"/" + raw):
        try:
            path = canonical_path(candidate)
        except ProtocolError as exc:
            assert exc.status == 400
            continue
        assert path.startswith(b"/")
        segments = path.split(b"/")[1:-1]  # the last may be empty (a trailing slash)
        assert all(s not in (b"", b".", b"..") for s in segments)
        assert path.split(b"/")[-1] not in (b".", b"..")
        assert canonical_path(path) == path  # idempotent


@given(st.text(alphabet="/.%2eE", max_size=30))
def test_dot_segments_never_escape_the_root(raw: str) -> None:
    try:
        path = canonical_path(("/" + raw).encode())
    except ProtocolError:
        return
    assert path.startswith(b"/")
    assert not {b".", b".."} & set(path.split(b"/"))


@given(st.data())
def test_every_spelling_of_a_protected_path_is_matched(data: st.DataObject) -> None:
    below = data.draw(paths())
    path = "/login" + (below if below != "/" else "")
    raw = _obfuscate(data, path)
    canonical = parse_target(b"GET", raw + b"?id=1").path.decode()
    assert canonical == path
    assert path_has_prefix(canonical, rule_prefix("/login"))


@given(st.data())
def test_no_spelling_of_another_path_is_matched(data: st.DataObject) -> None:
    path = data.draw(paths())
    routed = rule_path(path)  # what a servlet container would route
    if routed == "/login" or routed.startswith("/login/"):
        return
    raw = _obfuscate(data, path)
    assert not path_has_prefix(canonical_path(raw).decode(), rule_prefix("/login"))


@given(st.binary(max_size=40))
def test_any_authority_is_checked_or_400(value: bytes) -> None:
    try:
        checked = check_authority(value)
    except ProtocolError as exc:
        assert exc.status == 400
        return
    assert checked == value
    # nothing that could split a list-valued or quoted forwarding header survives
    assert not set(value) & set(b',;"= \t\\@%')
    host_of(value)


@given(st.sampled_from([b"GET", b"OPTIONS", b"POST"]), st.binary(max_size=60))
def test_any_target_parses_or_is_400(method: bytes, raw: bytes) -> None:
    for candidate in (raw, b"/" + raw, b"https://h" + raw):
        try:
            target = parse_target(method, candidate)
        except ProtocolError as exc:
            assert exc.status == 400
            continue
        assert target.path == b"*" or canonical_path(target.path) == target.path
        reparsed = parse_target(method, target.origin_form)
        assert reparsed.path == target.path and reparsed.query == target.query


def test_remembered_parsing_is_bounded_and_answers_as_the_parser() -> None:
    """parse_target, check_authority and host_of remember valid answers (issue 19: a keep-alive
    connection parses the same target and host again and again): at most 1,024 of each, never
    an error (a bad value is refused each time), never a long target."""
    import blindfold.web.target as t

    for memo in (t._parse_target_memo, t._check_authority_memo, host_of):
        assert memo.cache_info().maxsize == 1024
    for i in range(3000):
        assert parse_target(b"GET", b"/p%d?q" % i) == t._parse_target(b"GET", b"/p%d?q" % i)
        assert check_authority(b"h%d.test:8443" % i) == b"h%d.test:8443" % i
        assert host_of(b"H%d.test:8443" % i) == f"h{i}.test"
    assert t._parse_target_memo.cache_info().currsize <= 1024
    assert t._check_authority_memo.cache_info().currsize <= 1024
    for _ in range(2):  # a refusal is not remembered as an answer
        with pytest.raises(ProtocolError):
            parse_target(b"GET", b"/a#frag")
        with pytest.raises(ProtocolError):
            check_authority(b"bad host")
    long = b"/" + b"a" * 600
    before = t._parse_target_memo.cache_info()
    parse_target(b"GET", long)
    parse_target(b"GET", long)
    after = t._parse_target_memo.cache_info()
    assert (after.hits, after.misses) == (before.hits, before.misses)  # not kept: too long
    # the memo hands back the same immutable answer
    assert parse_target(b"GET", b"/x?y") is parse_target(b"GET", b"/x?y")
